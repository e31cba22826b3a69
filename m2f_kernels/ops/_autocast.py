"""Autocast for the m2f_kernels custom ops (as torchvision registers it for its ops).

Without a rule, a custom op under ``torch.autocast`` receives whatever dtypes its caller
holds. Each op declares a rule ({argument: LOW | FP32}, ``define_op(autocast=...)``) and
gets an ``AutocastCPU`` / ``AutocastCUDA`` kernel that casts those floating inputs, then
runs the op with autocast off for that device; ``fp32_outputs`` ops (the losses) widen their
floating outputs to float32, as torch's fp32 autocast list does. Float64 tensors are never
cast (autocast's own rule). The eager fast path applies the same rules through
:func:`cast_args` / :func:`cast_outputs`. ``RULES`` holds every registered rule; each op's
docstring says what its rule is and why.
"""
from __future__ import annotations

from typing import Dict

import torch

LOW = "autocast"  # the autocast dtype of the device (torch.get_autocast_dtype)
FP32 = "float32"

RULES: Dict[str, Dict[str, str]] = {}  # op name -> {argument name: LOW | FP32}
_FP32_OUTPUTS: set = set()

_DISPATCH_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_LIB = torch.library.Library("m2f_kernels", "IMPL")  # lives as long as this module
_TARGETS: Dict[str, Dict[int, str]] = {}  # op name -> {schema position: LOW | FP32}


def _cast(t, device_type: str, dtype: torch.dtype):
    """``t`` in ``dtype`` if it is a floating, non-float64 tensor on ``device_type``."""
    if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == device_type and t.dtype != dtype):
        return t.to(dtype)
    return t


def _widen(out, device_type: str):
    if isinstance(out, tuple):
        return tuple(_cast(o, device_type, torch.float32) for o in out)
    return _cast(out, device_type, torch.float32)


def _targets(name: str, custom_op, rule: Dict[str, str]) -> Dict[int, str]:
    """{positional index in the op's schema: LOW or FP32} for the arguments ``rule`` names."""
    arguments = custom_op._opoverload._schema.arguments
    targets = {i: rule[arg.name] for i, arg in enumerate(arguments) if arg.name in rule}
    missing = set(rule) - {arguments[i].name for i in targets}
    if missing:  # a misspelt argument must not silently lose its rule
        raise ValueError(f"autocast rule for m2f_kernels::{name} names unknown arguments {sorted(missing)}")
    bad = {t for t in rule.values() if t not in (LOW, FP32)}
    if bad:
        raise ValueError(f"autocast rule for m2f_kernels::{name}: targets must be LOW or FP32, got {sorted(bad)}")
    return targets


def cast_args(name: str, args: tuple, device_type: str) -> tuple:
    """``args`` (the op's positional arguments) cast as RULES says under the current autocast."""
    low = torch.get_autocast_dtype(device_type)
    targets = _TARGETS[name]
    return tuple(
        _cast(a, device_type, low if targets[i] == LOW else torch.float32) if i in targets else a
        for i, a in enumerate(args)
    )


def cast_outputs(name: str, out, device_type: str):
    """The op's outputs, floating ones widened to float32 for the ops in FP32_OUTPUTS."""
    return _widen(out, device_type) if name in _FP32_OUTPUTS else out


def _register_kernel(name: str, custom_op, device_type: str) -> None:
    op = custom_op._opoverload
    key_name = _DISPATCH_KEYS[device_type]
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

    def kernel(_keyset, *args):
        cast = cast_args(name, args, device_type)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            out = op(*cast)
        return cast_outputs(name, out, device_type)

    _LIB.impl(name, kernel, key_name, with_keyset=True)


def register(name: str, custom_op, rule: Dict[str, str], fp32_outputs: bool) -> None:
    """Install op ``name``'s autocast kernels (an empty rule still disables autocast inside it)."""
    _TARGETS[name] = _targets(name, custom_op, rule)
    RULES[name] = dict(rule)
    if fp32_outputs:
        _FP32_OUTPUTS.add(name)
    for device_type in _DISPATCH_KEYS:
        _register_kernel(name, custom_op, device_type)

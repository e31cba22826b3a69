"""Autocast rules for the m2f_kernels custom ops (as torchvision registers them for its ops).

Without a rule, a custom op under ``torch.autocast`` receives whatever dtypes its caller
holds. Each op gets an ``AutocastCPU`` / ``AutocastCUDA`` kernel that casts its own
floating inputs, then runs the op with autocast off for that device:

====================== ============================= ==================================
op                     autocast dtype (fp16 / bf16)  float32
====================== ============================= ==================================
masked_attention       q, k, v                       (mask untouched: bool or logits)
ms_deform_attn         value                         sampling_locations, attention_weights
point_sample           (input untouched)             coords
uncertain_point_coords (logits untouched)            candidates, random
point_mask_loss        (pred, target untouched)      coords; the two losses returned
pairwise_mask_cost     (pred, target untouched)      coords (costs are float32 already)
====================== ============================= ==================================

Coordinates stay float32: a bf16 coordinate is off by up to half a pixel at 256 px.
The point losses read pred in its own dtype and accumulate in float32 inside the
kernels; only the two 0-dim results are widened to float32. Casting pred itself would
copy the whole [B, Q, H, W] prediction once per call (the op reads the matched masks in
place), for values that the widening cast reproduces exactly.

Float64 tensors are never cast (autocast's own rule). Importing this module registers
the rules; ``m2f_kernels.ops`` imports it. The eager fast path (``_common.call_op``) applies
the same rules through ``cast_args`` / ``cast_outputs``.
"""
from __future__ import annotations

from typing import Dict

import torch

LOW = "autocast"  # the autocast dtype of the device (torch.get_autocast_dtype)
FP32 = "float32"

# op name -> {argument name: target}; arguments not named are passed through.
RULES: Dict[str, Dict[str, str]] = {
    "masked_attention": {"q": LOW, "k": LOW, "v": LOW},
    "ms_deform_attn": {"value": LOW, "sampling_locations": FP32, "attention_weights": FP32},
    "point_sample": {"coords": FP32},
    "uncertain_point_coords": {"candidates": FP32, "random": FP32},
    "point_mask_loss": {"coords": FP32},
    "pairwise_mask_cost": {"coords": FP32},
}
# ops whose floating outputs are widened to float32 (losses, as torch's fp32 autocast list)
FP32_OUTPUTS = ("point_mask_loss",)

_DISPATCH_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_LIB = torch.library.Library("m2f_kernels", "IMPL")  # lives as long as this module
_TARGETS: Dict[str, Dict[int, str]] = {}  # filled by _register_all


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


def _targets(name: str) -> Dict[int, str]:
    """{positional index in the op's schema: LOW or FP32} for the arguments RULES names."""
    arguments = getattr(torch.ops.m2f_kernels, name).default._schema.arguments
    targets = {i: RULES[name][arg.name] for i, arg in enumerate(arguments) if arg.name in RULES[name]}
    missing = set(RULES[name]) - {arguments[i].name for i in targets}
    if missing:  # a renamed argument must not silently lose its rule
        raise RuntimeError(f"autocast rule for m2f_kernels::{name} names unknown arguments {sorted(missing)}")
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
    return _widen(out, device_type) if name in FP32_OUTPUTS else out


def _register(name: str, device_type: str) -> None:
    op = getattr(torch.ops.m2f_kernels, name).default
    key_name = _DISPATCH_KEYS[device_type]
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

    def kernel(_keyset, *args):
        cast = cast_args(name, args, device_type)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            out = op(*cast)
        return cast_outputs(name, out, device_type)

    _LIB.impl(name, kernel, key_name, with_keyset=True)


def _register_all() -> None:
    for name in RULES:
        _TARGETS[name] = _targets(name)
        for device_type in _DISPATCH_KEYS:
            _register(name, device_type)


_register_all()

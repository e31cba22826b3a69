"""Backend selection: the one place that decides which implementation runs.

Backends are Python modules that export functions named after the ops
(``masked_attention_fwd``, ``ms_deform_attn_bwd``, ...; see ``BACKEND_FUNCTIONS``).
They never import each other; this module imports them lazily, so a missing
Triton or an unbuilt CUDA extension costs nothing until that backend is asked for.

Precedence for the backend of one call: the call's ``backend=`` argument, else the
innermost :func:`use_backend` scope, else :func:`set_backend`, else the environment
variable ``M2F_KERNELS_BACKEND``, else ``'auto'``.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Iterator, Optional

import torch

BACKENDS = ("reference", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "M2F_KERNELS_BACKEND"

# The functions a backend module may export. A backend that lacks one of them
# simply does not implement that op (yet); dispatch reports it by name.
BACKEND_FUNCTIONS = {
    "masked_attention": ("masked_attention_fwd", "masked_attention_bwd"),
    "ms_deform_attn": ("ms_deform_attn_fwd", "ms_deform_attn_bwd"),
    "point_sample": ("point_sample_fwd", "point_sample_bwd"),
    "uncertain_point_coords": ("uncertain_point_coords",),
    "point_mask_loss": ("point_mask_loss_fwd", "point_mask_loss_bwd"),
    "pairwise_mask_cost": ("pairwise_mask_cost",),
}

_MODULES = {
    "reference": "m2f_kernels.reference",
    "triton": "m2f_kernels.triton",
    "cuda": "m2f_kernels.cuda",
}

# dtypes each compiled backend accepts for its floating inputs.
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# 'auto' on a CUDA tensor: per (op, dtype class) the backends to try, fastest measured
# first; an unavailable one (e.g. the extension not built) is passed over. The one table of
# that choice. Measured at the standard shapes (DESIGN.md) in
# bench/results/nvidia-h200-2026-11-27-3.json (H200, milliseconds, medians):
#   masked_attention      bf16 Q200 N16384 fwd: triton 0.24, cuda 3.44; fwd+bwd: 0.94 vs 10.1
#   pairwise_mask_cost    matcher, 10 predictions: fp32 triton 3.6, cuda 10.4; bf16 4.7 vs 10.5
#   point_mask_loss and   loss (importance sampling + loss), 10 predictions, fp32:
#   uncertain_point_coords  fwd triton 8.2, cuda 6.4; fwd+bwd 15.8 vs 12.8 (host-bound: the
#                         C++ ops launch with less host time than Triton's launcher)
# Not yet measured with cuda, so Triton first: ms_deform_attn, point_sample, the 16-bit loss.
AUTO_TABLE_SOURCE = "bench/results/nvidia-h200-2026-11-27-3.json"
_TRITON_FIRST = ("triton", "cuda", "reference")
_CUDA_FIRST = ("cuda", "triton", "reference")
AUTO_ORDER_CUDA = {
    ("point_mask_loss", "fp32"): _CUDA_FIRST,
    ("uncertain_point_coords", "fp32"): _CUDA_FIRST,
}


def auto_order(op: str, dtype: torch.dtype) -> tuple:
    """The backends 'auto' tries for ``op`` on a CUDA tensor of ``dtype``, in order."""
    dtype_class = "fp32" if dtype == torch.float32 else "16bit"
    return AUTO_ORDER_CUDA.get((op, dtype_class), _TRITON_FIRST)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly and cannot run this call; the message says why."""


def _check_choice(name: str, argname: str) -> str:
    if not isinstance(name, str) or name.lower() not in CHOICES:
        raise ValueError(f"{argname} must be one of {CHOICES}, got {name!r}")
    return name.lower()


def _env_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto") or "auto"
    return _check_choice(value, f"environment variable {ENV_VAR}")


class _State(threading.local):
    def __init__(self) -> None:
        self.default: Optional[str] = None  # set_backend()
        self.scopes: list[str] = []  # use_backend() stack


_state = _State()


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend ('auto', 'reference', 'triton', 'cuda').

    ``None`` clears it, so the environment variable ``M2F_KERNELS_BACKEND`` (or 'auto')
    applies again.
    """
    _state.default = None if name is None else _check_choice(name, "backend")


def get_backend() -> str:
    """The backend a call without ``backend=`` asks for (may be 'auto')."""
    if _state.scopes:
        return _state.scopes[-1]
    if _state.default is not None:
        return _state.default
    return _env_backend()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: calls inside the ``with`` block use backend ``name``."""
    _state.scopes.append(_check_choice(name, "backend"))
    try:
        yield
    finally:
        _state.scopes.pop()



def _load(backend: str):
    """Import a backend module; returns (module, None) or (None, reason)."""
    try:
        return importlib.import_module(_MODULES[backend]), None
    except ImportError as exc:  # triton not installed, extension not built, ...
        hint = _IMPORT_HINTS.get(backend, "it could not be imported")
        # a missing module is the common case; anything else (a broken build) shows its error
        return None, hint if isinstance(exc, ModuleNotFoundError) else f"{hint}: {exc}"


def backend_status(backend: str, device: Optional[torch.device] = None) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` at all, or None if it can (for some ops)."""
    if backend == "reference":
        return None
    module, reason = _load(backend)
    if module is None:
        return f"backend {backend!r} is not available: {reason}"
    device_reason = module.device_unavailable_reason(device)
    if device_reason is not None:
        return f"backend {backend!r} cannot run here: {device_reason}"
    return None


def _why_not(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on ``device`` with floating inputs of ``dtype``, or None."""
    status = backend_status(backend, device)
    if status is not None:
        return status
    if backend == "reference":
        return None
    if dtype not in _KERNEL_DTYPES:
        return (
            f"backend {backend!r} supports {', '.join(str(d) for d in _KERNEL_DTYPES)} "
            f"for {op}, got {dtype} (use backend='reference' for float64)"
        )
    module, _ = _load(backend)
    if any(not hasattr(module, f) for f in BACKEND_FUNCTIONS[op]):
        return f"backend {backend!r} does not implement {op} yet"
    return None


def resolve(op: str, device: torch.device, dtype: torch.dtype, backend: Optional[str] = None) -> str:
    """The concrete backend that runs ``op`` on ``device`` with floating inputs of ``dtype``.

    ``backend`` None means the current default. 'auto' never fails (it falls back to
    'reference'); an explicit backend that cannot run raises BackendUnavailableError.
    """
    requested = get_backend() if backend is None else _check_choice(backend, "backend")
    if requested != "auto":
        reason = _why_not(requested, op, device, dtype)
        if reason is not None:
            raise BackendUnavailableError(f"m2f_kernels.{op}: {reason}")
        return requested
    if device.type != "cuda":
        return "reference"
    for candidate in auto_order(op, dtype):
        if _why_not(candidate, op, device, dtype) is None:
            return candidate
    return "reference"


def implementation(backend: str, function: str):
    """The backend's function object (``backend`` already resolved)."""
    module, reason = _load(backend)
    if module is None:  # resolve() already checked; keep the message if called directly
        raise BackendUnavailableError(f"backend {backend!r} is not available: {reason}")
    return getattr(module, function)


_IMPORT_HINTS = {
    "triton": "Triton is not installed (pip install triton)",
    "cuda": "the CUDA extension m2f_kernels._C is not built (pip install --no-build-isolation -e . with a CUDA torch and nvcc)",
}

"""Backend selection: the one place that decides which implementation runs.

A backend is a package ``m2f_kernels.<backend>`` (reference, triton, cuda) that declares:

- ``device_unavailable_reason(device) -> str | None``: why it cannot run on ``device`` at all;
- ``DTYPES``: the floating input dtypes its ops accept;
- per op, in its module ``m2f_kernels.<backend>.<op module>``: the functions the op's
  declaration names (``masked_attention_fwd``, ``masked_attention_bwd``, ...), and optionally
  ``LIMITS = {op: Limit(...)}``, what else it cannot do (a head dim, a size).

Ops declare themselves with :func:`register` (``m2f_kernels.ops._define`` does it). Nothing
here lists ops or functions: a new op or a backend that gains one changes no table.
Backends never import each other; this module imports them lazily, so a missing Triton or
an unbuilt CUDA extension costs nothing until that backend is asked for. Every refusal is a
:class:`BackendUnavailableError` whose message says why, and ``python -m m2f_kernels.info``
prints the same reasons.

Precedence for the backend of one call: the call's ``backend=`` argument, else the
innermost :func:`use_backend` scope, else :func:`set_backend`, else the environment
variable ``M2F_KERNELS_BACKEND``, else ``'auto'``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import threading
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

BACKENDS = ("reference", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "M2F_KERNELS_BACKEND"

TRITON_FIRST = ("triton", "cuda", "reference")
CUDA_FIRST = ("cuda", "triton", "reference")
# Where the per-op 'auto' orders (OpDispatch.auto_order_cuda) were measured.
AUTO_TABLE_SOURCE = "bench/results/nvidia-h200-2026-11-27-3.json"

_IMPORT_HINTS = {
    "triton": "Triton is not installed (pip install triton)",
    "cuda": "the CUDA extension m2f_kernels._C is not built (pip install --no-build-isolation -e . with a CUDA torch and nvcc)",
}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly and cannot run this call; the message says why."""


@dataclasses.dataclass(frozen=True)
class Limit:
    """A backend's limit on one op beyond device and dtype.

    ``text`` is what ``info`` prints; ``reason(*args)`` gets the op's custom-op arguments
    (without ``backend``) and returns why these exceed the limit, or None. It may read
    shapes, dtypes and Python values only (it runs under torch.compile too).
    """
    text: str
    reason: Callable[..., Optional[str]]


@dataclasses.dataclass(frozen=True)
class OpDispatch:
    """What dispatch knows of an op: where its backends implement it and who 'auto' tries.

    ``module``: the module name inside each backend package (``point_loss`` for
    ``m2f_kernels.triton.point_loss``); ``functions``: {kind: function name} it needs there
    (kinds such as 'fwd', 'bwd'); ``auto_order_cuda``: {'fp32' | '16bit': backend order}
    where the measured order on a CUDA tensor is not :data:`TRITON_FIRST`.
    """
    name: str
    module: str
    functions: Dict[str, str]
    auto_order_cuda: Dict[str, Tuple[str, ...]] = dataclasses.field(default_factory=dict)


OPS: Dict[str, OpDispatch] = {}


def register(op: OpDispatch) -> None:
    """Make ``op`` known to dispatch (one registration per name)."""
    if op.name in OPS:
        raise RuntimeError(f"m2f_kernels op {op.name!r} is registered twice")
    for dtype_class, order in op.auto_order_cuda.items():
        if dtype_class not in ("fp32", "16bit") or sorted(order) != sorted(BACKENDS) or order[-1] != "reference":
            raise ValueError(f"{op.name}: auto order for {dtype_class!r} must list every backend, "
                             f"reference last; got {order}")
    OPS[op.name] = op


def auto_order(op: str, dtype: torch.dtype) -> tuple:
    """The backends 'auto' tries for ``op`` on a CUDA tensor of ``dtype``, in order."""
    dtype_class = "fp32" if dtype == torch.float32 else "16bit"
    return OPS[op].auto_order_cuda.get(dtype_class, TRITON_FIRST)


# --- the default backend ----------------------------------------------------------------------

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


# --- what a backend can do --------------------------------------------------------------------

def _load(module_name: str, backend: str):
    """Import ``module_name``; returns (module, None) or (None, reason)."""
    try:
        return importlib.import_module(module_name), None
    except ImportError as exc:  # triton not installed, extension not built, ...
        hint = _IMPORT_HINTS.get(backend, "it could not be imported")
        # a missing module is the common case; anything else (a broken build) shows its error
        return None, hint if isinstance(exc, ModuleNotFoundError) else f"{hint}: {exc}"


def backend_status(backend: str, device: Optional[torch.device] = None) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` at all, or None if it can (for some ops)."""
    package, reason = _load(f"m2f_kernels.{backend}", backend)
    if package is None:
        return f"backend {backend!r} is not available: {reason}"
    device_reason = package.device_unavailable_reason(device)
    if device_reason is not None:
        return f"backend {backend!r} cannot run here: {device_reason}"
    return None


_MISSING = object()
_op_modules: dict = {}  # (backend, op) -> module, or _MISSING when the backend lacks the op


def _op_module(backend: str, op: str):
    """The backend's module for ``op`` (it exports every function the op names), or None."""
    key = (backend, op)
    module = _op_modules.get(key)
    if module is None:
        info = OPS[op]
        name = f"m2f_kernels.{backend}.{info.module}"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            module = _MISSING
        if module is not _MISSING and any(not hasattr(module, f) for f in info.functions.values()):
            module = _MISSING
        _op_modules[key] = module
    return None if module is _MISSING else module


def why_not(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on ``device`` with floating inputs of ``dtype``, or None.

    Argument limits (:class:`Limit`) are not checked here; :func:`limit_reason` does.
    """
    status = backend_status(backend, device)
    if status is not None:
        return status
    dtypes = importlib.import_module(f"m2f_kernels.{backend}").DTYPES
    if dtype not in dtypes:
        hint = " (use backend='reference' for float64)" if dtype == torch.float64 else ""
        return f"backend {backend!r} supports {', '.join(str(d) for d in dtypes)} for {op}, got {dtype}{hint}"
    if _op_module(backend, op) is None:
        return f"backend {backend!r} does not implement {op} yet"
    return None


def limits(backend: str, op: str) -> Optional[Limit]:
    """The backend's declared :class:`Limit` on ``op`` (None: none, or the op is missing)."""
    module = _op_module(backend, op)
    return None if module is None else getattr(module, "LIMITS", {}).get(op)


def limit_reason(backend: str, op: str, args: tuple, limit: Optional[Limit] = None) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on these arguments (the custom op's, without
    ``backend``) although it runs the op, or None. ``limit``: its :class:`Limit`, if known."""
    limit = limits(backend, op) if limit is None else limit
    if limit is None:
        return None
    reason = limit.reason(*args)
    return None if reason is None else f"backend {backend!r} limits {op} to {limit.text}: {reason}"


def candidates(op: str, device: torch.device, dtype: torch.dtype, backend: Optional[str] = None) -> tuple:
    """The backends that may run ``op`` on ``device`` with floating inputs of ``dtype``, in order.

    ``backend`` None means the current default. An explicit backend that cannot run raises
    BackendUnavailableError; 'auto' lists those that can, ending on 'reference'.
    """
    requested = get_backend() if backend is None else _check_choice(backend, "backend")
    if requested != "auto":
        reason = why_not(requested, op, device, dtype)
        if reason is not None:
            raise BackendUnavailableError(f"m2f_kernels.{op}: {reason}")
        return (requested,)
    if device.type != "cuda":
        return ("reference",)
    return tuple(c for c in auto_order(op, dtype) if c == "reference" or why_not(c, op, device, dtype) is None)


def resolve(op: str, device: torch.device, dtype: torch.dtype, backend: Optional[str] = None) -> str:
    """The concrete backend that runs ``op`` on ``device`` with floating inputs of ``dtype``
    (before the backends' :class:`Limit` checks, which need the arguments: see
    ``m2f_kernels.ops._define.Op.choose_backend``)."""
    return candidates(op, device, dtype, backend)[0]


_functions: dict = {}  # (backend, op, kind) -> function


def implementation(backend: str, op: str, kind: str):
    """The backend's function of ``kind`` for ``op`` (``backend`` already resolved)."""
    key = (backend, op, kind)
    fn = _functions.get(key)
    if fn is None:
        module = _op_module(backend, op)
        if module is None:  # resolve() already refused; keep the reason if called directly
            raise BackendUnavailableError(f"m2f_kernels.{op}: {why_not(backend, op, torch.device('cpu'), torch.float32)}")
        fn = _functions[key] = getattr(module, OPS[op].functions[kind])
    return fn

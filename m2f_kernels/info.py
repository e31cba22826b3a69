"""``python -m m2f_kernels.info``: versions, device, and which backend can run each op.

Every row is asked of the dispatcher itself, so the table says what a call would do.
"""
from __future__ import annotations

import importlib
import os
import platform

import torch

from . import _dispatch


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except ImportError as exc:
        return f"not installed ({exc.__class__.__name__})"
    return getattr(mod, "__version__", "?")


def _cuda_arch_of_extension() -> str:
    try:
        from . import _C  # noqa: F401
    except ImportError:
        return "not built"
    archs = getattr(_C, "compiled_archs", None)
    return f"built ({archs()})" if callable(archs) else "built"


def _dtypes(backend: str) -> str:
    try:
        package = importlib.import_module(f"m2f_kernels.{backend}")
    except ImportError:
        return "-"
    return "/".join(str(d).replace("torch.", "") for d in package.DTYPES)


def report() -> str:
    """The info table as text."""
    lines = [
        f"m2f_kernels {__import__('m2f_kernels').__version__}",
        f"python      {platform.python_version()} ({platform.machine()})",
        f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton      {_version('triton')}",
        f"numpy       {_version('numpy')}",
    ]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device      {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)")
        device = torch.device("cuda")
    else:
        lines.append("device      cpu (no CUDA GPU)")
        device = torch.device("cpu")
    lines.append(f"extension   m2f_kernels._C: {_cuda_arch_of_extension()}")
    try:
        default = _dispatch.get_backend()
    except ValueError as exc:  # a bad M2F_KERNELS_BACKEND: say so instead of a traceback
        default = f"invalid: {exc}"
    lines.append(f"default     {default} (env {_dispatch.ENV_VAR}="
                 f"{os.environ.get(_dispatch.ENV_VAR, '<unset>')}, TRITON_INTERPRET="
                 f"{os.environ.get('TRITON_INTERPRET', '<unset>')})")
    lines.append("")
    lines.append(f"backend    on {device.type}")
    for backend in _dispatch.BACKENDS:
        reason = _dispatch.backend_status(backend, device)
        lines.append(f"{backend:<10} {'available' if reason is None else reason}")
    lines.append("")
    width = max(len(op) for op in _dispatch.OPS)
    lines.append(f"{'op':<{width}}  {'auto ->':<10} " + " ".join(f"{b:<10}" for b in _dispatch.BACKENDS))
    limits = []
    for op in _dispatch.OPS:
        cells = []
        for backend in _dispatch.BACKENDS:
            if _dispatch.backend_status(backend, device) is not None:
                cells.append("-")
            elif _dispatch.why_not(backend, op, device, torch.float32) is not None:
                cells.append("not yet")
            else:
                limit = _dispatch.limits(backend, op)
                cells.append("yes" if limit is None else "limited")
                if limit is not None:
                    limits.append(f"  {op} on {backend}: {limit.text}")
        auto = _dispatch.resolve(op, device, torch.float32, "auto")
        lines.append(f"{op:<{width}}  {auto:<10} " + " ".join(f"{c:<10}" for c in cells))
    lines.append("(yes: runs here; limited: runs here within the limit below; not yet: the backend lacks this op; "
                 "-: the backend is unavailable, see above)")
    lines.extend(limits)
    dtypes = ", ".join(f"{b}: {_dtypes(b)}" for b in _dispatch.BACKENDS)
    lines.append(f"dtypes: {dtypes}")
    lines.append(f"auto -> for float32 inputs; on a GPU its order per op and dtype was measured in "
                 f"{_dispatch.AUTO_TABLE_SOURCE}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()

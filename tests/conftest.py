"""Shared test helpers: error measure, tolerances, poisoning, backend availability."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

# DESIGN.md numerics: relative error ||out - ref|| / ||ref||.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
TF32_TOLERANCE = 1e-3  # float32 through tensor-core (tf32) dots

ON_GPU = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if ON_GPU else "cpu"


def _cuda_extension_built() -> bool:
    try:
        import m2f_kernels._C  # noqa: F401
    except ImportError:
        return False
    return True


CUDA_EXTENSION_BUILT = _cuda_extension_built()
requires_cuda_backend = pytest.mark.skipif(
    not (CUDA_EXTENSION_BUILT and ON_GPU),
    reason="the cuda backend needs the built extension m2f_kernels._C and a CUDA GPU "
           f"(built: {CUDA_EXTENSION_BUILT}, GPU: {ON_GPU})",
)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf; an all-zero ref compares absolutely."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference shape {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / denom if denom > 0 else num


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a tensor that a call is about to overwrite with NaN (in place) and return it."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)


@contextlib.contextmanager
def poisoned_empty():
    """Inside: torch.empty hands out NaN (float) / -1 (int) filled memory, so outputs and
    scratch a kernel forgets to write show up in the comparison."""
    real = torch.empty
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", lambda *a, **k: poison(real(*a, **k)))
        yield


def triton_runnable() -> bool:
    return ON_GPU or INTERPRETING


requires_triton = pytest.mark.skipif(
    not triton_runnable(), reason="the triton backend needs a CUDA GPU or TRITON_INTERPRET=1"
)
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (full-size check)")

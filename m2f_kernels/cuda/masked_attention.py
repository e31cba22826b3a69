"""Masked cross-attention through the CUDA extension (``csrc/masked_attention``).

Shapes (DESIGN.md): q [B, H, Q, D], k [B, H, N, D], v [B, H, N, Dv] with D, Dv <= 128;
mask [B, Q, N] (shared by the heads: the kernels read it with head stride 0, it is never
repeated) or [B, H, Q, N], bool (True = blocked) or floating logits (blocked where < 0).
A row whose keys are all blocked attends to all keys (the empty-row rule).

The kernels take contiguous q, k, v (and grad_out, out, lse) on one device; the mask is
read in place through its strides (a bool mask as uint8), so it is never copied.
"""
from __future__ import annotations

import torch


def _mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask as the kernels read it: bool viewed as uint8 (no copy), logits as they are."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


MAX_HEAD_DIM = 128  # kMaxDim in csrc/masked_attention/masked_attention_kernel.cu


def _check_head_dims(q, v):
    # checked here, not only by the kernel's TORCH_CHECK: an error thrown inside the extension
    # crashed the process on the GPU image (tests/test_cuda_masked_attention.py, first GPU run)
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"masked_attention (cuda backend): head dims D and Dv must be <= {MAX_HEAD_DIM}, "
                         f"got q with D = {q.shape[-1]} and v with Dv = {v.shape[-1]}; use backend='triton'")


def masked_attention_fwd(q, k, v, mask, scale: float):
    """(out [B, H, Q, Dv] in q.dtype, lse [B, H, Q] float32: natural-log log-sum-exp of the
    scaled scores over the keys each row uses)."""
    _check_head_dims(q, v)
    return torch.ops.m2f_kernels_C.masked_attention_fwd(
        q.contiguous(), k.contiguous(), v.contiguous(), _mask(mask), float(scale))


def masked_attention_bwd(grad_out, q, k, v, mask, out, lse, scale: float):
    """(dq [B, H, Q, D], dk [B, H, N, D], dv [B, H, N, Dv]), contiguous, in q/k/v's dtypes;
    recomputes the probabilities from ``lse``. Deterministic (no atomics)."""
    _check_head_dims(q, v)
    return torch.ops.m2f_kernels_C.masked_attention_bwd(
        grad_out.to(q.dtype).contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), _mask(mask),
        out.to(q.dtype).contiguous(), lse.to(torch.float32).contiguous(), float(scale))

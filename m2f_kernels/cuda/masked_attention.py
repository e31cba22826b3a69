"""Masked cross-attention through the CUDA extension (``csrc/masked_attention``).

Shapes (docs/ops.md): q [B, H, Q, D], k [B, H, N, D], v [B, H, N, Dv] with D, Dv <= 128;
mask [B, Q, N] (shared by the heads: the kernels read it with head stride 0, it is never
repeated) or [B, H, Q, N], bool (True = blocked) or floating logits (blocked where < 0).
A row whose keys are all blocked attends to all keys (the empty-row rule).

The kernels take contiguous q, k, v (and grad_out, out, lse) on one device; the mask is
read in place through its strides (a bool mask as uint8), so it is never copied.
"""
from __future__ import annotations

import torch

from .._dispatch import Limit


def _mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask as the kernels read it: bool viewed as uint8 (no copy), logits as they are."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


MAX_HEAD_DIM = 128  # kMaxDim in csrc/masked_attention/masked_attention_kernel.cu


def _head_dims_reason(q, k, v, mask, scale):
    # refused before the launch: a TORCH_CHECK thrown inside the extension crashes the
    # process on the H200 image (bench/notes/cuda.md)
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"got D = {q.shape[-1]}, Dv = {v.shape[-1]} (backend='triton' has no such limit)"
    return None


LIMITS = {"masked_attention": Limit(f"head dims D, Dv <= {MAX_HEAD_DIM}", _head_dims_reason)}


def masked_attention_fwd(q, k, v, mask, scale: float):
    """(out [B, H, Q, Dv] in q.dtype, lse [B, H, Q] float32: natural-log log-sum-exp of the
    scaled scores over the keys each row uses)."""
    return torch.ops.m2f_kernels_C.masked_attention_fwd(
        q.contiguous(), k.contiguous(), v.contiguous(), _mask(mask), float(scale))


def masked_attention_bwd(grad_out, q, k, v, mask, out, lse, scale: float):
    """(dq [B, H, Q, D], dk [B, H, N, D], dv [B, H, N, Dv]), contiguous, in q/k/v's dtypes;
    recomputes the probabilities from ``lse``. Deterministic (no atomics)."""
    return torch.ops.m2f_kernels_C.masked_attention_bwd(
        grad_out.to(q.dtype).contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), _mask(mask),
        out.to(q.dtype).contiguous(), lse.to(torch.float32).contiguous(), float(scale))

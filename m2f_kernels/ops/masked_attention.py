"""``m2f_kernels.masked_attention``: the op's declaration, checks and public function."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validation import check_dim, check_finite, check_float, check_same_device, check_same_dtype, check_tensor
from ._autocast import LOW
from ._define import Backward, accumulate_dtype, define_op, implementation

OP = "masked_attention"


def _forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    """(out [B, H, Q, Dv], lse [B, H, Q] float32)."""
    if q.numel() == 0 or v.numel() == 0:
        b, h, nq, _ = q.shape
        return q.new_zeros(b, h, nq, v.shape[-1]), q.new_zeros(b, h, nq, dtype=accumulate_dtype(q))
    return implementation(backend, OP, "fwd")(q, k, v, mask, scale)


def _fake(q, k, v, mask, scale, backend):
    b, h, nq, _ = q.shape
    return q.new_empty(b, h, nq, v.shape[-1]), q.new_empty(b, h, nq, dtype=accumulate_dtype(q))


def _backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, out: Tensor, lse: Tensor,
              scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) shaped like q, k, v."""
    if q.numel() == 0 or v.numel() == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    return implementation(backend, OP, "bwd")(grad_out, q, k, v, mask, out, lse, scale)


def _backward_fake(grad_out, q, k, v, mask, out, lse, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


MASKED_ATTENTION = define_op(
    OP, _forward, _fake,
    module="masked_attention", functions={"fwd": "masked_attention_fwd", "bwd": "masked_attention_bwd"},
    backward=Backward(
        _backward, _backward_fake,
        args=lambda grads, x, outputs: (grads[0], x.q, x.k, x.v, x.mask, *outputs, x.scale),
        differentiable=("q", "k", "v"), save_outputs=True, non_differentiable_outputs=(1,),
    ),
    # the mask stays as it is: bool, or logits whose sign is all that is read
    autocast={"q": LOW, "k": LOW, "v": LOW},
)


def _check(q, k, v, mask, scale) -> None:
    check_tensor("q", q, (4,), "[B, H, Q, D]")
    check_tensor("k", k, (4,), "[B, H, N, D]")
    check_tensor("v", v, (4,), "[B, H, N, Dv]")
    check_tensor("mask", mask, (3, 4), "[B, Q, N] or [B, H, Q, N]")
    check_float("q", q)
    if q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError(f"q and v need a head dim >= 1, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    check_same_dtype(("q", "k", "v"), (q, k, v))
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"mask must be bool (True = blocked) or floating mask logits, got {mask.dtype}")
    check_same_device(("q", "k", "v", "mask"), (q, k, v, mask))
    b, h, nq, d = q.shape
    n = k.shape[2]
    check_dim("k", k, 0, b, "batch, as q")
    check_dim("k", k, 1, h, "heads, as q")
    check_dim("k", k, 3, d, "head dim, as q")
    check_dim("v", v, 0, b, "batch, as q")
    check_dim("v", v, 1, h, "heads, as q")
    check_dim("v", v, 2, n, "keys, as k")
    if n < 1:
        raise ValueError(f"k must have at least one key (N >= 1), got shape {tuple(k.shape)}")
    expected = (b, nq, n) if mask.dim() == 3 else (b, h, nq, n)
    if tuple(mask.shape) != expected:
        form = "[B, Q, N]" if mask.dim() == 3 else "[B, H, Q, N]"
        raise ValueError(f"mask must be {form} = {expected} for these q, k, got shape {tuple(mask.shape)}")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, scale: Optional[float] = None,
                     backend: Optional[str] = None) -> Tensor:
    """Masked cross-attention as in the Mask2Former decoder.

    Args:
        q: [B, H, Q, D] queries.
        k: [B, H, N, D] keys; v: [B, H, N, Dv] values (same dtype as q).
        mask: [B, Q, N] (shared by all heads) or [B, H, Q, N]; bool with True = blocked
            (the ``nn.MultiheadAttention`` convention), or floating mask logits, blocked
            where logit < 0 (sigmoid < 0.5); a NaN logit is not blocked (the official
            ``sigmoid(logit) < 0.5`` is False for NaN), -inf is, +inf is not. A row with
            every key blocked attends to all keys (the official empty-row rule). The mask
            gets no gradient.
        scale: score scale, default D ** -0.5.
        backend: 'auto', 'reference', 'triton' or 'cuda'; None uses the current default.

    Returns:
        out [B, H, Q, Dv] in q's dtype, differentiable in q, k and v.

    Under autocast q, k and v run in the autocast dtype; the mask is never cast.
    """
    _check(q, k, v, mask, scale)
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    check_finite((("q", q), ("k", k), ("v", v), ("mask", mask), ("scale", scale)), allow_inf=("mask",))
    out, _ = MASKED_ATTENTION(q, k, v, mask, scale, backend=backend)
    return out

"""``m2f_kernels.masked_attention``: the custom op, its autograd and the public function."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _validation
from .._dispatch import implementation
from ._common import accumulate_dtype, choose_backend, call_op, eager_function

OP = "masked_attention"


def _forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    if q.numel() == 0 or v.numel() == 0:
        b, h, nq, _ = q.shape
        return q.new_zeros(b, h, nq, v.shape[-1]), q.new_zeros(b, h, nq, dtype=accumulate_dtype(q))
    return implementation(backend, "masked_attention_fwd")(q, k, v, mask, scale)


def _backward_impl(grad_out, q, k, v, mask, out, lse, scale, backend):
    if q.numel() == 0 or v.numel() == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    return implementation(backend, "masked_attention_bwd")(grad_out, q, k, v, mask, out, lse, scale)


@torch.library.custom_op("m2f_kernels::masked_attention", mutates_args=())
def masked_attention_op(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float,
                        backend: str) -> tuple[Tensor, Tensor]:
    """(out [B, H, Q, Dv], lse [B, H, Q] float32). See :func:`masked_attention`."""
    return _forward(q, k, v, mask, scale, backend)


@masked_attention_op.register_fake
def _(q, k, v, mask, scale, backend):
    b, h, nq, _ = q.shape
    return q.new_empty(b, h, nq, v.shape[-1]), q.new_empty(b, h, nq, dtype=accumulate_dtype(q))


@torch.library.custom_op("m2f_kernels::masked_attention_backward", mutates_args=())
def masked_attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor,
                                 out: Tensor, lse: Tensor, scale: float,
                                 backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) shaped like q, k, v."""
    return _backward_impl(grad_out, q, k, v, mask, out, lse, scale, backend)


@masked_attention_backward_op.register_fake
def _(grad_out, q, k, v, mask, out, lse, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, out, lse)
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(lse)


def _backward_with(backward_fn):
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        dq, dk, dv = backward_fn(grad_out, q, k, v, mask, out, lse, ctx.scale, ctx.backend)
        return dq, dk, dv, None, None, None

    return backward


torch.library.register_autograd("m2f_kernels::masked_attention", _backward_with(masked_attention_backward_op),
                                setup_context=_setup_context)
_MaskedAttentionEager = eager_function("MaskedAttentionEager", _forward, _setup_context,
                                       _backward_with(_backward_impl))


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, scale: Optional[float] = None,
                     backend: Optional[str] = None) -> Tensor:
    """Masked cross-attention as in the Mask2Former decoder.

    Args:
        q: [B, H, Q, D] queries.
        k: [B, H, N, D] keys; v: [B, H, N, Dv] values (same dtype as q).
        mask: [B, Q, N] (shared by all heads) or [B, H, Q, N]; bool with True = blocked
            (the ``nn.MultiheadAttention`` convention), or floating mask logits, blocked
            where logit < 0 (sigmoid < 0.5). A row with every key blocked attends to all
            keys (the official empty-row rule). The mask gets no gradient.
        scale: score scale, default D ** -0.5.
        backend: 'auto', 'reference', 'triton' or 'cuda'; None uses the current default.

    Returns:
        out [B, H, Q, Dv] in q's dtype, differentiable in q, k and v.
    """
    _validation.masked_attention(q, k, v, mask, scale)
    chosen = choose_backend(OP, q, backend)
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    out, _ = call_op(OP, _MaskedAttentionEager.apply, masked_attention_op, q, k, v, mask, scale, chosen)
    return out

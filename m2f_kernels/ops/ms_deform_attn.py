"""``m2f_kernels.ms_deform_attn``: the custom op, its autograd and the public function."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _validation
from .._dispatch import implementation
from ._common import call_op, choose_backend, eager_function

OP = "ms_deform_attn"


def _forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax,
             deterministic, backend):
    if value.numel() == 0 or sampling_locations.numel() == 0:
        b, lq, h = sampling_locations.shape[:3]
        return value.new_zeros(b, lq, h * value.shape[-1])
    return implementation(backend, "ms_deform_attn_fwd")(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax
    )


def _backward_impl(grad_out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   softmax, deterministic, backend):
    if value.numel() == 0 or sampling_locations.numel() == 0:
        return (value.new_zeros(value.shape), sampling_locations.new_zeros(sampling_locations.shape),
                attention_weights.new_zeros(attention_weights.shape))
    return implementation(backend, "ms_deform_attn_bwd")(
        grad_out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        softmax, deterministic,
    )


@torch.library.custom_op("m2f_kernels::ms_deform_attn", mutates_args=())
def ms_deform_attn_op(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                      sampling_locations: Tensor, attention_weights: Tensor, softmax: bool,
                      deterministic: bool, backend: str) -> Tensor:
    """out [B, Lq, H*D]; ``deterministic`` only matters for the backward."""
    return _forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax,
                    deterministic, backend)


@ms_deform_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax,
      deterministic, backend):
    b, lq, h = sampling_locations.shape[:3]
    return value.new_empty(b, lq, h * value.shape[-1])


@torch.library.custom_op("m2f_kernels::ms_deform_attn_backward", mutates_args=())
def ms_deform_attn_backward_op(grad_out: Tensor, value: Tensor, spatial_shapes: Tensor,
                               level_start_index: Tensor, sampling_locations: Tensor,
                               attention_weights: Tensor, softmax: bool, deterministic: bool,
                               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_value, grad_sampling_locations, grad_attention_weights)."""
    return _backward_impl(grad_out, value, spatial_shapes, level_start_index, sampling_locations,
                          attention_weights, softmax, deterministic, backend)


@ms_deform_attn_backward_op.register_fake
def _(grad_out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
      softmax, deterministic, backend):
    # contiguous, as every backend returns them (empty_like would copy the inputs' strides)
    return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, loc, weights, softmax, deterministic, backend = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, loc, weights)
    ctx.softmax, ctx.deterministic, ctx.backend = softmax, deterministic, backend


def _backward_with(backward_fn):
    def backward(ctx, grad_out):
        value, spatial_shapes, level_start_index, loc, weights = ctx.saved_tensors
        gv, gl, gw = backward_fn(grad_out, value, spatial_shapes, level_start_index, loc, weights,
                                 ctx.softmax, ctx.deterministic, ctx.backend)
        return gv, None, None, gl, gw, None, None, None

    return backward


torch.library.register_autograd("m2f_kernels::ms_deform_attn", _backward_with(ms_deform_attn_backward_op),
                                setup_context=_setup_context)
_MSDeformAttnEager = eager_function("MSDeformAttnEager", _forward, _setup_context, _backward_with(_backward_impl))


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   sampling_locations: Tensor, attention_weights: Tensor, *, softmax: bool = False,
                   deterministic: Optional[bool] = None, backend: Optional[str] = None) -> Tensor:
    """Multi-scale deformable attention (Deformable DETR / Mask2Former pixel decoder).

    Args:
        value: [B, S, H, D], S = sum over levels of H_l * W_l.
        spatial_shapes: [L, 2] int64, (H_l, W_l) per level.
        level_start_index: [L] int64, the running sum of H_l * W_l.
        sampling_locations: [B, Lq, H, L, P, 2], (x, y) in [0, 1]; bilinear with zero
            padding, grid_sample(align_corners=False) convention.
        attention_weights: [B, Lq, H, L, P]; with ``softmax=True``, logits over the L*P
            entries of each (query, head), normalised inside the op.
        deterministic: bitwise repeatable backward; None follows
            ``torch.are_deterministic_algorithms_enabled()``.
        backend: 'auto', 'reference', 'triton' or 'cuda'; None uses the current default.

    Returns:
        out [B, Lq, H*D] in value's dtype, differentiable in value, sampling_locations
        and attention_weights.
    """
    _validation.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    chosen = choose_backend(OP, value, backend)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return call_op(OP, _MSDeformAttnEager.apply, ms_deform_attn_op, value, spatial_shapes, level_start_index,
                   sampling_locations, attention_weights, bool(softmax), bool(deterministic), chosen)

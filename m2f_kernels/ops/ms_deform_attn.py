"""``m2f_kernels.ms_deform_attn``: the op's declaration, checks and public function."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validation import check_dim, check_finite, check_float, check_same_device, check_tensor, spatial_layout
from ._autocast import FP32, LOW
from ._define import Backward, define_op, implementation

OP = "ms_deform_attn"


def _forward(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
             attention_weights: Tensor, softmax: bool, deterministic: bool, backend: str) -> Tensor:
    """out [B, Lq, H*D]; ``deterministic`` only matters for the backward."""
    if value.numel() == 0 or sampling_locations.numel() == 0:
        b, lq, h = sampling_locations.shape[:3]
        return value.new_zeros(b, lq, h * value.shape[-1])
    return implementation(backend, OP, "fwd")(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax
    )


def _backward(grad_out: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
              sampling_locations: Tensor, attention_weights: Tensor, softmax: bool, deterministic: bool,
              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_value, grad_sampling_locations, grad_attention_weights)."""
    if value.numel() == 0 or sampling_locations.numel() == 0:
        return (value.new_zeros(value.shape), sampling_locations.new_zeros(sampling_locations.shape),
                attention_weights.new_zeros(attention_weights.shape))
    return implementation(backend, OP, "bwd")(
        grad_out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        softmax, deterministic,
    )


def _fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax,
          deterministic, backend):
    b, lq, h = sampling_locations.shape[:3]
    return value.new_empty(b, lq, h * value.shape[-1])


def _backward_fake(grad_out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   softmax, deterministic, backend):
    # contiguous, as every backend returns them (empty_like would copy the inputs' strides)
    return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


MS_DEFORM_ATTN = define_op(
    OP, _forward, _fake,
    module="ms_deform_attn", functions={"fwd": "ms_deform_attn_fwd", "bwd": "ms_deform_attn_bwd"},
    backward=Backward(
        _backward, _backward_fake,
        args=lambda grads, x, _: (grads[0], x.value, x.spatial_shapes, x.level_start_index, x.sampling_locations,
                                  x.attention_weights, x.softmax, x.deterministic),
        differentiable=("value", "sampling_locations", "attention_weights"),
    ),
    # locations and weights stay float32: a bf16 location is off by up to half a pixel at 256 px
    autocast={"value": LOW, "sampling_locations": FP32, "attention_weights": FP32},
)


def _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    check_tensor("value", value, (4,), "[B, S, H, D]")
    check_tensor("sampling_locations", sampling_locations, (6,), "[B, Lq, H, L, P, 2]")
    check_tensor("attention_weights", attention_weights, (5,), "[B, Lq, H, L, P]")
    check_float("value", value)
    check_float("sampling_locations", sampling_locations)
    check_float("attention_weights", attention_weights)
    check_same_device(("value", "sampling_locations", "attention_weights"),
                      (value, sampling_locations, attention_weights))
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if isinstance(t, torch.Tensor) and t.device not in (value.device, torch.device("cpu")):
            raise ValueError(f"{name} must be on the CPU or on value's device ({value.device}), got {t.device}")
    spatial_layout(value, spatial_shapes, level_start_index)
    b, _, h, _ = value.shape
    num_levels = spatial_shapes.shape[0]
    loc = sampling_locations
    if loc.shape[-1] != 2:
        raise ValueError(f"sampling_locations must end in 2 (x, y) [B, Lq, H, L, P, 2], got shape {tuple(loc.shape)}")
    check_dim("sampling_locations", loc, 0, b, "batch, as value")
    check_dim("sampling_locations", loc, 2, h, "heads, as value")
    check_dim("sampling_locations", loc, 3, num_levels, "levels, as spatial_shapes")
    if loc.shape[4] < 1:
        raise ValueError(f"sampling_locations must have at least one point per level, got shape {tuple(loc.shape)}")
    if tuple(attention_weights.shape) != tuple(loc.shape[:5]):
        raise ValueError(
            f"attention_weights must be [B, Lq, H, L, P] = {tuple(loc.shape[:5])} to match sampling_locations, "
            f"got shape {tuple(attention_weights.shape)}"
        )


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

    Under autocast value runs in the autocast dtype; sampling_locations and
    attention_weights in float32.
    """
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    check_finite((("value", value), ("sampling_locations", sampling_locations),
                  ("attention_weights", attention_weights)))
    return MS_DEFORM_ATTN(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                          bool(softmax), bool(deterministic), backend=backend)

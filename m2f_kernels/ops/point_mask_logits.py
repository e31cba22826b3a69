"""``m2f_kernels.point_mask_logits``: the op's declaration, checks and public function."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from .._validation import (
    check_coords, check_dim, check_finite, check_float, check_pred_index, check_same_dtype, check_tensor,
)
from ._autocast import FP32, LOW
from ._define import Backward, define_op, implementation

OP = "point_mask_logits"


def _forward(mask_embed: Tensor, mask_features: Tensor, coords: Tensor, batch_index: Tensor, query_index: Tensor,
             backend: str) -> Tensor:
    """[N, P] in mask_embed's dtype."""
    if coords.numel() == 0 or mask_embed.shape[-1] == 0:
        return mask_embed.new_zeros(coords.shape[0], coords.shape[1])
    return implementation(backend, OP, "fwd")(mask_embed, mask_features, coords, batch_index, query_index)


def _fake(mask_embed, mask_features, coords, batch_index, query_index, backend):
    return mask_embed.new_empty(coords.shape[0], coords.shape[1])


def _backward(grad_out: Tensor, mask_embed: Tensor, mask_features: Tensor, coords: Tensor, batch_index: Tensor,
              query_index: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(grad_mask_embed, grad_mask_features) shaped like the inputs."""
    if coords.numel() == 0 or mask_embed.shape[-1] == 0:
        return mask_embed.new_zeros(mask_embed.shape), mask_features.new_zeros(mask_features.shape)
    return implementation(backend, OP, "bwd")(grad_out, mask_embed, mask_features, coords, batch_index, query_index)


def _backward_fake(grad_out, mask_embed, mask_features, coords, batch_index, query_index, backend):
    return mask_embed.new_empty(mask_embed.shape), mask_features.new_empty(mask_features.shape)


POINT_MASK_LOGITS = define_op(
    OP, _forward, _fake,
    module="point_mask_logits", functions={"fwd": "point_mask_logits_fwd", "bwd": "point_mask_logits_bwd"},
    backward=Backward(
        _backward, _backward_fake,
        args=lambda grads, x, _: (grads[0], x.mask_embed, x.mask_features, x.coords, x.batch_index, x.query_index),
        differentiable=("mask_embed", "mask_features"), refuse_grad=("coords",),
    ),
    autocast={"mask_embed": LOW, "mask_features": LOW, "coords": FP32},
)


def point_mask_logits(mask_embed: Tensor, mask_features: Tensor, coords: Tensor, pred_index: Sequence[Tensor], *,
                      backend: Optional[str] = None) -> Tensor:
    """Mask logits at points, without building the masks.

    ``point_sample(einsum('bqc,bchw->bqhw', mask_embed, mask_features)[b, q], coords[n])``
    for each matched mask n = (b, q), computed from the sampled features (bilinear
    sampling is linear): neither the [B, Q, H, W] logits nor the [N, C, P] sampled
    features are kept; the backward recomputes the samples.

    Args:
        mask_embed: [B, Q, C] mask embeddings.
        mask_features: [B, C, H, W] per-pixel mask features (same dtype).
        coords: [N, P, 2] points of each matched mask, (x, y) in [0, 1]; bilinear with zero
            padding, grid_sample(align_corners=False) convention.
        pred_index: (batch_index [N], query_index [N]), the matched masks.
        backend: 'auto', 'reference' or 'triton'; None uses the current default.
    Returns:
        [N, P] in mask_embed's dtype, differentiable in mask_embed and mask_features.

    Under autocast mask_embed and mask_features run in the autocast dtype (as the einsum
    they stand for), coords in float32.
    """
    check_tensor("mask_embed", mask_embed, (3,), "[B, Q, C]")
    check_tensor("mask_features", mask_features, (4,), "[B, C, H, W]")
    check_float("mask_embed", mask_embed)
    check_same_dtype(("mask_embed", "mask_features"), (mask_embed, mask_features))
    check_dim("mask_features", mask_features, 0, mask_embed.shape[0], "batch, as mask_embed")
    check_dim("mask_features", mask_features, 1, mask_embed.shape[2], "channels, as mask_embed")
    if mask_features.shape[-1] < 1 or mask_features.shape[-2] < 1:
        raise ValueError(f"mask_features must have H, W >= 1, got shape {tuple(mask_features.shape)}")
    check_coords("coords", coords, 3, "[N, P, 2]")
    if pred_index is None:
        raise ValueError("pred_index=(batch_index, query_index) is required: the matched masks of mask_embed")
    check_pred_index("mask_embed", mask_embed.unsqueeze(-1), pred_index, "[B, Q, C]",
                     (("mask_features", mask_features), ("coords", coords)), coords.shape[0], "as coords")
    check_finite((("mask_embed", mask_embed), ("mask_features", mask_features), ("coords", coords)))
    batch_index, query_index = pred_index
    return POINT_MASK_LOGITS(mask_embed, mask_features, coords, batch_index, query_index, backend=backend)

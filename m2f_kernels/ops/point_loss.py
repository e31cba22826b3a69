"""The point-sampled mask loss ops: point_sample, uncertain_point_coords, point_mask_loss,
pairwise_mask_cost (custom ops, autograd, public functions)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _validation
from .._dispatch import implementation
from ._common import accumulate_dtype, call_op, choose_backend, eager_function, not_differentiable

# --- point_sample ---------------------------------------------------------------------------


def _point_sample(input, coords, backend):
    if input.numel() == 0 or coords.numel() == 0:
        return input.new_zeros(input.shape[0], input.shape[1], coords.shape[1])
    return implementation(backend, "point_sample_fwd")(input, coords)


def _point_sample_bwd(grad_out, input, coords, backend):
    if input.numel() == 0 or coords.numel() == 0:
        return input.new_zeros(input.shape)
    return implementation(backend, "point_sample_bwd")(grad_out, input, coords)


@torch.library.custom_op("m2f_kernels::point_sample", mutates_args=())
def point_sample_op(input: Tensor, coords: Tensor, backend: str) -> Tensor:
    """[N, C, P]."""
    return _point_sample(input, coords, backend)


@point_sample_op.register_fake
def _(input, coords, backend):
    return input.new_empty(input.shape[0], input.shape[1], coords.shape[1])


@torch.library.custom_op("m2f_kernels::point_sample_backward", mutates_args=())
def point_sample_backward_op(grad_out: Tensor, input: Tensor, coords: Tensor, backend: str) -> Tensor:
    return _point_sample_bwd(grad_out, input, coords, backend)


@point_sample_backward_op.register_fake
def _(grad_out, input, coords, backend):
    return input.new_empty(input.shape)


def _point_sample_setup(ctx, inputs, output):
    input, coords, backend = inputs
    ctx.save_for_backward(input, coords)
    ctx.backend = backend


def _point_sample_backward_with(backward_fn):
    def backward(ctx, grad_out):
        if ctx.needs_input_grad[1]:
            raise RuntimeError("m2f_kernels.point_sample is differentiable in input only, not in coords")
        input, coords = ctx.saved_tensors
        return backward_fn(grad_out, input, coords, ctx.backend), None, None

    return backward


torch.library.register_autograd("m2f_kernels::point_sample", _point_sample_backward_with(point_sample_backward_op),
                                setup_context=_point_sample_setup)
_PointSampleEager = eager_function("PointSampleEager", _point_sample, _point_sample_setup,
                                   _point_sample_backward_with(_point_sample_bwd))


def point_sample(input: Tensor, coords: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Bilinear samples of ``input`` at ``coords`` (the official ``point_sample``).

    Args:
        input: [N, C, H, W].
        coords: [N, P, 2], (x, y) in [0, 1]; zero padding outside, grid_sample
            (align_corners=False) convention.
    Returns:
        [N, C, P] in input's dtype, differentiable in input.
    """
    _validation.point_sample(input, coords)
    chosen = choose_backend("point_sample", input, backend)
    return call_op("point_sample", _PointSampleEager.apply, point_sample_op, input, coords, chosen)


# --- uncertain_point_coords -----------------------------------------------------------------


def _uncertain_point_coords(logits, candidates, random, num_uncertain, batch_index, query_index, backend):
    if candidates.shape[0] == 0 or num_uncertain == 0:
        return torch.cat([candidates[:, :num_uncertain], random.to(candidates.dtype)], dim=1).contiguous()
    return implementation(backend, "uncertain_point_coords")(
        logits, candidates, random, num_uncertain, batch_index, query_index
    )


@torch.library.custom_op("m2f_kernels::uncertain_point_coords", mutates_args=())
def uncertain_point_coords_op(logits: Tensor, candidates: Tensor, random: Tensor, num_uncertain: int,
                              batch_index: Optional[Tensor], query_index: Optional[Tensor],
                              backend: str) -> Tensor:
    """[N, num_uncertain + R, 2]: most uncertain candidates, then the random points."""
    return _uncertain_point_coords(logits, candidates, random, num_uncertain, batch_index, query_index, backend)


@uncertain_point_coords_op.register_fake
def _(logits, candidates, random, num_uncertain, batch_index, query_index, backend):
    return candidates.new_empty(candidates.shape[0], num_uncertain + random.shape[1], 2)


torch.library.register_autograd(
    "m2f_kernels::uncertain_point_coords",
    not_differentiable("uncertain_point_coords", "its inputs (compute it under torch.no_grad())"),
    setup_context=lambda ctx, inputs, output: None,
)


def uncertain_point_coords(logits: Tensor, num_points: int, oversample_ratio: float = 3.0,
                           importance_sample_ratio: float = 0.75,
                           generator: Optional[torch.Generator] = None, *,
                           pred_index: Optional[Sequence[Tensor]] = None,
                           backend: Optional[str] = None) -> Tensor:
    """The official importance sampling of point coordinates (PointRend / Mask2Former).

    Draws ``int(num_points * oversample_ratio)`` uniform candidates per mask, keeps the
    ``int(importance_sample_ratio * num_points)`` whose logit is closest to 0, and fills
    the rest with fresh uniform points.

    Args:
        logits: [N, H, W] mask logits, or [B, Q, H, W] with ``pred_index``.
        generator: a torch.Generator on logits' device, for reproducible points.
        pred_index: (batch_index [N], query_index [N]) picking the matched masks out of a
            4-D logits without copying them (as in :func:`point_mask_loss`). The draws are
            those of ``logits[batch_index, query_index]``, so both forms give the same points.
    Returns:
        [N, num_points, 2] (x, y) in [0, 1], float32 (float64 for float64 logits).
        Not differentiable: logits are detached.
    """
    n = _validation.uncertain_point_coords(logits, num_points, oversample_ratio, importance_sample_ratio,
                                           pred_index)
    batch_index, query_index = (None, None) if pred_index is None else pred_index
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    dtype = accumulate_dtype(logits)
    candidates = torch.rand(n, num_sampled, 2, device=logits.device, dtype=dtype, generator=generator)
    random = torch.rand(n, num_points - num_uncertain, 2, device=logits.device, dtype=dtype, generator=generator)
    chosen = choose_backend("uncertain_point_coords", logits, backend)
    # detached: point selection has no gradient, and a graph through it would only cost memory
    logits = logits.detach()
    # no gradient, so the eager fast path is the backend call itself
    return call_op("uncertain_point_coords", _uncertain_point_coords, uncertain_point_coords_op,
                   logits, candidates, random, num_uncertain, batch_index, query_index, chosen)


# --- point_mask_loss ------------------------------------------------------------------------


@torch.library.custom_op("m2f_kernels::point_mask_loss", mutates_args=())
def point_mask_loss_op(pred: Tensor, target: Tensor, coords: Tensor, num_masks: float,
                       batch_index: Optional[Tensor], query_index: Optional[Tensor],
                       backend: str) -> tuple[Tensor, Tensor]:
    """(loss_bce, loss_dice), 0-dim in pred's dtype."""
    return _point_mask_loss(pred, target, coords, num_masks, batch_index, query_index, backend)


def _point_mask_loss(pred, target, coords, num_masks, batch_index, query_index, backend):
    if target.shape[0] == 0:
        return pred.new_zeros(()), pred.new_zeros(())
    return implementation(backend, "point_mask_loss_fwd")(
        pred, target, coords, num_masks, batch_index, query_index
    )


def _point_mask_loss_bwd(grad_bce, grad_dice, pred, target, coords, num_masks, batch_index, query_index, backend):
    if target.shape[0] == 0:
        return pred.new_zeros(pred.shape)
    return implementation(backend, "point_mask_loss_bwd")(
        grad_bce, grad_dice, pred, target, coords, num_masks, batch_index, query_index
    )


@point_mask_loss_op.register_fake
def _(pred, target, coords, num_masks, batch_index, query_index, backend):
    return pred.new_empty(()), pred.new_empty(())


@torch.library.custom_op("m2f_kernels::point_mask_loss_backward", mutates_args=())
def point_mask_loss_backward_op(grad_bce: Tensor, grad_dice: Tensor, pred: Tensor, target: Tensor,
                                coords: Tensor, num_masks: float, batch_index: Optional[Tensor],
                                query_index: Optional[Tensor], backend: str) -> Tensor:
    """grad_pred, shaped like pred."""
    return _point_mask_loss_bwd(grad_bce, grad_dice, pred, target, coords, num_masks, batch_index, query_index,
                                backend)


@point_mask_loss_backward_op.register_fake
def _(grad_bce, grad_dice, pred, target, coords, num_masks, batch_index, query_index, backend):
    return pred.new_empty(pred.shape)


def _point_mask_loss_setup(ctx, inputs, output):
    pred, target, coords, num_masks, batch_index, query_index, backend = inputs
    ctx.save_for_backward(pred, target, coords, batch_index, query_index)
    ctx.num_masks, ctx.backend = num_masks, backend


def _point_mask_loss_backward_with(backward_fn):
    def backward(ctx, grad_bce, grad_dice):
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("m2f_kernels.point_mask_loss is differentiable in pred only, not in target or coords")
        pred, target, coords, batch_index, query_index = ctx.saved_tensors
        grad = backward_fn(grad_bce, grad_dice, pred, target, coords, ctx.num_masks,
                           batch_index, query_index, ctx.backend)
        return grad, None, None, None, None, None, None

    return backward


torch.library.register_autograd("m2f_kernels::point_mask_loss",
                                _point_mask_loss_backward_with(point_mask_loss_backward_op),
                                setup_context=_point_mask_loss_setup)
_PointMaskLossEager = eager_function("PointMaskLossEager", _point_mask_loss, _point_mask_loss_setup,
                                     _point_mask_loss_backward_with(_point_mask_loss_bwd))


def point_mask_loss(pred: Tensor, target: Tensor, coords: Tensor, num_masks: float, *,
                    pred_index: Optional[Sequence[Tensor]] = None,
                    backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """The official criterion's mask losses on sampled points.

    Samples pred and target at ``coords`` and returns
    ``(sigmoid_ce_loss, dice_loss)``: BCE-with-logits averaged over points, summed over
    masks, divided by ``num_masks``; and the +1-smoothed dice loss summed over masks,
    divided by ``num_masks``.

    Args:
        pred: [N, Hp, Wp] mask logits, or [B, Q, Hp, Wp] with ``pred_index``.
        target: [N, Ht, Wt] bool, uint8 (0/1) or floating; any resolution.
        coords: [N, P, 2], (x, y) in [0, 1].
        num_masks: the normaliser (a Python number, > 0).
        pred_index: (batch_index [N], query_index [N]) picking the matched masks out of a
            4-D pred without copying them.
    Returns:
        (loss_bce, loss_dice), 0-dim tensors in pred's dtype (float32 under autocast),
        differentiable in pred.
    """
    _validation.point_mask_loss(pred, target, coords, num_masks, pred_index)
    batch_index, query_index = (None, None) if pred_index is None else pred_index
    chosen = choose_backend("point_mask_loss", pred, backend)
    return call_op("point_mask_loss", _PointMaskLossEager.apply, point_mask_loss_op,
                   pred, target, coords, float(num_masks), batch_index, query_index, chosen)


# --- pairwise_mask_cost ---------------------------------------------------------------------


@torch.library.custom_op("m2f_kernels::pairwise_mask_cost", mutates_args=())
def pairwise_mask_cost_op(pred: Tensor, target: Tensor, coords: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(cost_bce [Q, T], cost_dice [Q, T]) in float32 (float64 for float64 pred)."""
    return _pairwise_mask_cost(pred, target, coords, backend)


def _pairwise_mask_cost(pred, target, coords, backend):
    if pred.shape[0] == 0 or target.shape[0] == 0:
        dtype = accumulate_dtype(pred)
        empty = pred.new_zeros(pred.shape[0], target.shape[0], dtype=dtype)
        return empty, empty.clone()
    return implementation(backend, "pairwise_mask_cost")(pred, target, coords)


@pairwise_mask_cost_op.register_fake
def _(pred, target, coords, backend):
    dtype = accumulate_dtype(pred)
    return (pred.new_empty(pred.shape[0], target.shape[0], dtype=dtype),
            pred.new_empty(pred.shape[0], target.shape[0], dtype=dtype))


torch.library.register_autograd(
    "m2f_kernels::pairwise_mask_cost",
    not_differentiable("pairwise_mask_cost", "its inputs (the matcher runs under torch.no_grad())"),
    setup_context=lambda ctx, inputs, output: None,
)


def pairwise_mask_cost(pred: Tensor, target: Tensor, coords: Tensor, *,
                       backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """The Hungarian matcher's mask costs between every prediction and every target.

    Args:
        pred: [Q, Hp, Wp] mask logits.
        target: [T, Ht, Wt] bool, uint8 (0/1) or floating; any resolution.
        coords: [P, 2] points shared by all masks, (x, y) in [0, 1].
    Returns:
        (cost_bce [Q, T], cost_dice [Q, T]) in float32 whatever pred's dtype (float64 for
        float64 pred):
        batch_sigmoid_ce_loss (divided by P) and batch_dice_loss of the official matcher.
        Not differentiable: the inputs are detached.
    """
    _validation.pairwise_mask_cost(pred, target, coords)
    chosen = choose_backend("pairwise_mask_cost", pred, backend)
    pred, target, coords = pred.detach(), target.detach(), coords.detach()
    # no gradient, so the eager fast path is the backend call itself
    return call_op("pairwise_mask_cost", _pairwise_mask_cost, pairwise_mask_cost_op, pred, target, coords, chosen)

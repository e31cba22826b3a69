"""The point-sampled mask loss ops: point_sample, uncertain_point_coords, point_mask_loss,
pairwise_mask_cost (declarations, checks, public functions).

Under autocast the coordinates run in float32 (a bf16 coordinate is off by up to half a
pixel at 256 px) and pred / logits / target are never cast: the kernels read pred in its
own dtype and accumulate in float32 (casting pred would copy the whole [B, Q, H, W]
prediction once per call). point_mask_loss returns its losses in float32 whatever pred's
dtype, so a 16-bit pred's losses keep float32 precision and their gradients arrive in
float32 (a float16 loss would round the value, and turn a loss scale times a weight above
65504 into an inf gradient). point_sample's input runs in its own dtype too.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .._validation import (
    check_coords, check_dim, check_finite, check_float, check_pred_index, check_same_device, check_spatial,
    check_tensor,
)
from ._autocast import FP32
from .._dispatch import CUDA_FIRST
from ._define import Backward, accumulate_dtype, define_op, implementation

# --- point_sample ---------------------------------------------------------------------------


def _point_sample(input: Tensor, coords: Tensor, backend: str) -> Tensor:
    """[N, C, P]."""
    if input.numel() == 0 or coords.numel() == 0:
        return _point_sample_fake(input, coords, backend).zero_()
    return implementation(backend, "point_sample", "fwd")(input, coords)


def _point_sample_fake(input, coords, backend):
    dtype = input.dtype if input.is_floating_point() else torch.float32
    return input.new_empty(input.shape[0], input.shape[1], coords.shape[1], dtype=dtype)


def _point_sample_bwd(grad_out: Tensor, input: Tensor, coords: Tensor, backend: str) -> Tensor:
    """grad_input, shaped like input."""
    if input.numel() == 0 or coords.numel() == 0:
        return input.new_zeros(input.shape)
    return implementation(backend, "point_sample", "bwd")(grad_out, input, coords)


def _point_sample_bwd_fake(grad_out, input, coords, backend):
    return input.new_empty(input.shape)


POINT_SAMPLE = define_op(
    "point_sample", _point_sample, _point_sample_fake,
    module="point_loss", functions={"fwd": "point_sample_fwd", "bwd": "point_sample_bwd"},
    backward=Backward(_point_sample_bwd, _point_sample_bwd_fake,
                      args=lambda grads, x, _: (grads[0], x.input, x.coords),
                      differentiable=("input",), refuse_grad=("coords",)),
    autocast={"coords": FP32},
)


def point_sample(input: Tensor, coords: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Bilinear samples of ``input`` at ``coords`` (the official ``point_sample``).

    Args:
        input: [N, C, H, W] floating, or bool / uint8 (0/1 masks, read as bytes: no float
            copy of the maps).
        coords: [N, P, 2], (x, y) in [0, 1]; zero padding outside, grid_sample
            (align_corners=False) convention.
    Returns:
        [N, C, P] in input's dtype (float32 for bool / uint8), differentiable in a
        floating input.
    """
    check_tensor("input", input, (4,), "[N, C, H, W]")
    if input.dtype not in (torch.bool, torch.uint8):
        check_float("input", input)
    check_spatial("input", input, "[N, C, H, W]")
    check_coords("coords", coords, 3, "[N, P, 2]")
    check_same_device(("input", "coords"), (input, coords))
    check_dim("coords", coords, 0, input.shape[0], "N, as input")
    check_finite((("input", input), ("coords", coords)))
    return POINT_SAMPLE(input, coords, backend=backend)


# --- uncertain_point_coords -----------------------------------------------------------------


def _uncertain_point_coords(logits: Tensor, candidates: Tensor, random: Tensor, num_uncertain: int,
                            batch_index: Optional[Tensor], query_index: Optional[Tensor], backend: str) -> Tensor:
    """[N, num_uncertain + R, 2]: most uncertain candidates, then the random points."""
    if candidates.shape[0] == 0 or num_uncertain == 0:
        return torch.cat([candidates[:, :num_uncertain], random.to(candidates.dtype)], dim=1).contiguous()
    return implementation(backend, "uncertain_point_coords", "fwd")(
        logits, candidates, random, num_uncertain, batch_index, query_index
    )


def _uncertain_point_coords_fake(logits, candidates, random, num_uncertain, batch_index, query_index, backend):
    return candidates.new_empty(candidates.shape[0], num_uncertain + random.shape[1], 2)


UNCERTAIN_POINT_COORDS = define_op(
    "uncertain_point_coords", _uncertain_point_coords, _uncertain_point_coords_fake,
    module="point_loss", functions={"fwd": "uncertain_point_coords"},
    no_grad="its inputs (compute it under torch.no_grad())",
    autocast={"candidates": FP32, "random": FP32},
    auto_order_cuda={"fp32": CUDA_FIRST},
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
        generator: a torch.Generator on logits' device, for reproducible points (under
            torch.compile its draws run outside the graph: a generator cannot be traced).
        pred_index: (batch_index [N], query_index [N]) picking the matched masks out of a
            4-D logits without copying them (as in :func:`point_mask_loss`). The draws are
            those of ``logits[batch_index, query_index]``, so both forms give the same points.
    Returns:
        [N, num_points, 2] (x, y) in [0, 1], float32 (float64 for float64 logits).
        Not differentiable: logits are detached.
    """
    check_tensor("logits", logits, (3, 4), "[N, H, W] or [B, Q, H, W] with pred_index")
    check_float("logits", logits)
    check_spatial("logits", logits, "[N, H, W] or [B, Q, H, W]")
    if isinstance(num_points, bool) or not isinstance(num_points, int):
        raise TypeError(f"num_points must be an int, got {type(num_points).__name__}")
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if not isinstance(oversample_ratio, (int, float)) or not 1 <= oversample_ratio < math.inf:
        raise ValueError(f"oversample_ratio must be a finite number >= 1, got {oversample_ratio!r}")
    if not isinstance(importance_sample_ratio, (int, float)) or not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio!r}")
    n = check_pred_index("logits", logits, pred_index, "[B, Q, H, W]")
    batch_index, query_index = (None, None) if pred_index is None else pred_index
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    dtype = accumulate_dtype(logits)
    candidates = _rand((n, num_sampled, 2), logits.device, dtype, generator)
    random = _rand((n, num_points - num_uncertain, 2), logits.device, dtype, generator)
    check_finite((("logits", logits),))
    # detached: point selection has no gradient, and a graph through it would only cost memory
    return UNCERTAIN_POINT_COORDS(logits.detach(), candidates, random, num_uncertain, batch_index, query_index,
                                  backend=backend)


def _rand(shape, device, dtype, generator):
    """``torch.rand(shape)`` from ``generator``; under torch.compile with a generator, drawn
    outside the graph (a generator cannot be traced: a graph break, the eager numbers)."""
    if generator is not None and torch.compiler.is_compiling():
        return _rand_outside_graph(shape, device, dtype, generator)
    return torch.rand(shape, device=device, dtype=dtype, generator=generator)


# torch.compiler.disable imports torch._dynamo (~1 s) at decoration; this, torch's own lazy
# form of it, imports it at the first call, which only happens under compilation.
@torch._disable_dynamo
def _rand_outside_graph(shape, device, dtype, generator):
    return torch.rand(shape, device=device, dtype=dtype, generator=generator)


# --- point_mask_loss ------------------------------------------------------------------------


def _point_mask_loss(pred: Tensor, target: Tensor, coords: Tensor, num_masks: float,
                     batch_index: Optional[Tensor], query_index: Optional[Tensor], weight: Optional[Tensor],
                     backend: str) -> tuple[Tensor, Tensor]:
    """(loss_bce, loss_dice), 0-dim in float32 (float64 for float64 pred)."""
    if target.shape[0] == 0:
        dtype = accumulate_dtype(pred)
        return pred.new_zeros((), dtype=dtype), pred.new_zeros((), dtype=dtype)
    return implementation(backend, "point_mask_loss", "fwd")(
        pred, target, coords, num_masks, batch_index, query_index, weight
    )


def _point_mask_loss_fake(pred, target, coords, num_masks, batch_index, query_index, weight, backend):
    dtype = accumulate_dtype(pred)
    return pred.new_empty((), dtype=dtype), pred.new_empty((), dtype=dtype)


def _point_mask_loss_bwd(grad_bce: Tensor, grad_dice: Tensor, pred: Tensor, target: Tensor, coords: Tensor,
                         num_masks: float, batch_index: Optional[Tensor], query_index: Optional[Tensor],
                         weight: Optional[Tensor], backend: str) -> Tensor:
    """grad_pred, shaped like pred."""
    if target.shape[0] == 0:
        return pred.new_zeros(pred.shape)
    return implementation(backend, "point_mask_loss", "bwd")(
        grad_bce, grad_dice, pred, target, coords, num_masks, batch_index, query_index, weight
    )


def _point_mask_loss_bwd_fake(grad_bce, grad_dice, pred, target, coords, num_masks, batch_index, query_index,
                              weight, backend):
    return pred.new_empty(pred.shape)


POINT_MASK_LOSS = define_op(
    "point_mask_loss", _point_mask_loss, _point_mask_loss_fake,
    module="point_loss", functions={"fwd": "point_mask_loss_fwd", "bwd": "point_mask_loss_bwd"},
    backward=Backward(_point_mask_loss_bwd, _point_mask_loss_bwd_fake,
                      args=lambda grads, x, _: (*grads, x.pred, x.target, x.coords, x.num_masks, x.batch_index,
                                                x.query_index, x.weight),
                      differentiable=("pred",), refuse_grad=("target", "coords", "weight")),
    autocast={"coords": FP32, "weight": FP32}, fp32_outputs=True,
    auto_order_cuda={"fp32": CUDA_FIRST},
)


def point_mask_loss(pred: Tensor, target: Tensor, coords: Tensor, num_masks: Union[float, Tensor], *,
                    pred_index: Optional[Sequence[Tensor]] = None, mask_weight: Optional[Tensor] = None,
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
        num_masks: the normaliser: a Python number > 0, or a 0-dim floating tensor on
            pred's device (> 0; not checked, as reading it would cost a host sync), which
            stays on the device.
        pred_index: (batch_index [N], query_index [N]) picking the matched masks out of a
            4-D pred without copying them.
        mask_weight: [N] floating, a factor per mask on both of its terms (0 drops a
            padded slot of a static-shape batch); None: ones. Not differentiable.
    Returns:
        (loss_bce, loss_dice), 0-dim float32 tensors whatever pred's dtype (float64 for
        float64 pred), differentiable in pred (its gradient comes in pred's dtype).
    """
    check_tensor("pred", pred, (3, 4), "[N, Hp, Wp] or [B, Q, Hp, Wp] with pred_index")
    check_float("pred", pred)
    check_spatial("pred", pred, "[N, Hp, Wp] or [B, Q, Hp, Wp]")
    _check_target("target", target, "[N, Ht, Wt]")
    check_coords("coords", coords, 3, "[N, P, 2]")
    n = target.shape[0]
    check_pred_index("pred", pred, pred_index, "[B, Q, Hp, Wp]", (("target", target), ("coords", coords)),
                     n, "as target")
    check_dim("coords", coords, 0, n, "matched masks, as target")
    if coords.shape[1] < 1:
        raise ValueError(f"coords must hold at least one point per mask [N, P >= 1, 2], got shape {tuple(coords.shape)}")
    check_finite((("pred", pred), ("target", target), ("coords", coords), ("num_masks", num_masks),
                  ("mask_weight", mask_weight)))
    if mask_weight is not None:
        check_tensor("mask_weight", mask_weight, (1,), "[N]")
        check_float("mask_weight", mask_weight)
        check_dim("mask_weight", mask_weight, 0, n, "matched masks, as target")
        check_same_device(("pred", "mask_weight"), (pred, mask_weight))
    if isinstance(num_masks, torch.Tensor):
        if num_masks.dim() != 0 or not num_masks.is_floating_point():
            raise TypeError(f"num_masks as a tensor must be 0-dim floating, got {num_masks.dtype} "
                            f"of shape {tuple(num_masks.shape)}")
        check_same_device(("pred", "num_masks"), (pred, num_masks))
        # divided into the weights: the kernels take a host number, and this one stays on the device
        scale = 1.0 / num_masks.detach().float()
        mask_weight = scale.expand(n) if mask_weight is None else mask_weight.float() * scale
        num_masks = 1.0
    elif isinstance(num_masks, bool) or not isinstance(num_masks, (int, float)) or not num_masks > 0:
        raise ValueError(f"num_masks must be a number > 0 or a 0-dim tensor, got {num_masks!r}")
    if mask_weight is not None:
        mask_weight = mask_weight.detach().to(torch.float32).contiguous()
    batch_index, query_index = (None, None) if pred_index is None else pred_index
    return POINT_MASK_LOSS(pred, target, coords, float(num_masks), batch_index, query_index, mask_weight,
                           backend=backend)


# --- pairwise_mask_cost ---------------------------------------------------------------------


def _pairwise_mask_cost(pred: Tensor, target: Tensor, coords: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(cost_bce [Q, T], cost_dice [Q, T]) in float32 (float64 for float64 pred)."""
    if pred.shape[0] == 0 or target.shape[0] == 0:
        empty = pred.new_zeros(pred.shape[0], target.shape[0], dtype=accumulate_dtype(pred))
        return empty, empty.clone()
    return implementation(backend, "pairwise_mask_cost", "fwd")(pred, target, coords)


def _pairwise_mask_cost_fake(pred, target, coords, backend):
    dtype = accumulate_dtype(pred)
    return (pred.new_empty(pred.shape[0], target.shape[0], dtype=dtype),
            pred.new_empty(pred.shape[0], target.shape[0], dtype=dtype))


PAIRWISE_MASK_COST = define_op(
    "pairwise_mask_cost", _pairwise_mask_cost, _pairwise_mask_cost_fake,
    module="point_loss", functions={"fwd": "pairwise_mask_cost"},
    no_grad="its inputs (the matcher runs under torch.no_grad())",
    autocast={"coords": FP32},
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
    check_tensor("pred", pred, (3,), "[Q, Hp, Wp]")
    check_float("pred", pred)
    check_spatial("pred", pred, "[Q, Hp, Wp]")
    _check_target("target", target, "[T, Ht, Wt]")
    check_coords("coords", coords, 2, "[P, 2]")
    if coords.shape[0] < 1:
        raise ValueError(f"coords must hold at least one point [P >= 1, 2], got shape {tuple(coords.shape)}")
    check_same_device(("pred", "target", "coords"), (pred, target, coords))
    check_finite((("pred", pred), ("target", target), ("coords", coords)))
    return PAIRWISE_MASK_COST(pred.detach(), target.detach(), coords.detach(), backend=backend)


def _check_target(name: str, target, form: str) -> None:
    check_tensor(name, target, (3,), form)
    check_spatial(name, target, form)
    if target.dtype not in (torch.bool, torch.uint8) and not target.is_floating_point():
        raise TypeError(f"{name} must be bool, uint8 or floating, got {target.dtype}")

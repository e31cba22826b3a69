"""Point-sampled mask loss through the CUDA extension (``csrc/point_loss``).

Coordinates are (x, y) in [0, 1], sampled bilinearly with zero padding in the
``grid_sample(align_corners=False)`` convention. The kernels read maps (input, logits,
pred, target) through their strides, so no map is copied (except the matched logits of
an indexed uncertain_point_coords, gathered here for the 3-D C++ op); this module hands them
coordinates as float32 contiguous, bool maps (targets, point_sample inputs) viewed as
uint8 (read as bytes, never converted) and index tensors as int64 on pred's device. Shapes and dtypes follow the
backend contract (``m2f_kernels.reference.point_loss``).
"""
from __future__ import annotations

from typing import Optional

import torch


def _check_device(op: str, ref: torch.Tensor, **tensors) -> None:
    if ref.device.type != "cuda":
        raise RuntimeError(f"{op}: the cuda backend needs CUDA tensors, got {ref.device}")
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(f"{op}: {name} is on {t.device}, expected {ref.device}")


def _coords(coords: torch.Tensor) -> torch.Tensor:
    return coords.to(torch.float32).contiguous()


def _target(target: torch.Tensor) -> torch.Tensor:
    return target.view(torch.uint8) if target.dtype == torch.bool else target


def _index(index: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    return None if index is None else index.to(device=device, dtype=torch.int64).contiguous()


def _weight(weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if weight is None else weight.to(torch.float32).contiguous()


def point_sample_fwd(input, coords):
    """input [N, C, H, W] (floating, or bool / uint8 read as bytes), coords [N, P, 2] ->
    [N, C, P] contiguous, in input.dtype (float32 for bool / uint8)."""
    _check_device("point_sample", input, coords=coords)
    return torch.ops.m2f_kernels_C.point_sample_fwd(_target(input), _coords(coords))


def point_sample_bwd(grad_out, input, coords):
    """grad_out [N, C, P] -> grad_input [N, C, H, W] contiguous, in input.dtype."""
    _check_device("point_sample", input, coords=coords, grad_out=grad_out)
    return torch.ops.m2f_kernels_C.point_sample_bwd(grad_out.contiguous(), input, _coords(coords))


def uncertain_point_coords(logits, candidates, random, num_uncertain: int,
                           batch_index: Optional[torch.Tensor] = None,
                           query_index: Optional[torch.Tensor] = None):
    """logits [N, H, W] (or [B, Q, H, W] with batch_index / query_index [N]), candidates
    [N, S, 2], random [N, R, 2] -> [N, num_uncertain + R, 2].

    The ``num_uncertain`` candidates of largest -|logit| (top-k order), then the random
    points, in candidates.dtype.
    """
    _check_device("uncertain_point_coords", logits, candidates=candidates, random=random,
                  batch_index=batch_index, query_index=query_index)
    if batch_index is not None:
        # The C++ op takes a 3-D logits [N, H, W] only: this backend gathers the matched
        # masks here (a copy of N maps, as the callers made before pred_index existed) and
        # runs the op unchanged. The triton backend reads them in place.
        logits = logits[batch_index, query_index]
    return torch.ops.m2f_kernels_C.uncertain_point_coords(logits, candidates.contiguous(), random.contiguous(),
                                                          int(num_uncertain))


def point_mask_loss_fwd(pred, target, coords, num_masks: float,
                        batch_index: Optional[torch.Tensor] = None,
                        query_index: Optional[torch.Tensor] = None,
                        weight: Optional[torch.Tensor] = None):
    """(loss_bce, loss_dice): 0-dim fp32 tensors.

    pred [N, Hp, Wp], or [B, Q, Hp, Wp] with batch_index / query_index [N]; target
    [N, Ht, Wt] bool/uint8/floating; coords [N, P, 2]; weight [N] or None: a factor on each
    mask's two terms. Deterministic.
    """
    _check_device("point_mask_loss", pred, target=target, coords=coords, weight=weight)
    return torch.ops.m2f_kernels_C.point_mask_loss_fwd(
        pred, _target(target), _coords(coords), float(num_masks),
        _index(batch_index, pred.device), _index(query_index, pred.device), _weight(weight))


def point_mask_loss_bwd(grad_bce, grad_dice, pred, target, coords, num_masks: float,
                        batch_index: Optional[torch.Tensor] = None,
                        query_index: Optional[torch.Tensor] = None,
                        weight: Optional[torch.Tensor] = None):
    """grad_pred shaped like pred (contiguous, pred.dtype; zero where no point of a matched mask landed)."""
    _check_device("point_mask_loss", pred, target=target, coords=coords, weight=weight)
    return torch.ops.m2f_kernels_C.point_mask_loss_bwd(
        grad_bce.to(device=pred.device, dtype=torch.float32), grad_dice.to(device=pred.device, dtype=torch.float32),
        pred, _target(target), _coords(coords), float(num_masks),
        _index(batch_index, pred.device), _index(query_index, pred.device), _weight(weight))


def pairwise_mask_cost(pred, target, coords):
    """pred [Q, Hp, Wp], target [T, Ht, Wt], coords [P, 2] -> (cost_bce [Q, T], cost_dice [Q, T]) float32."""
    _check_device("pairwise_mask_cost", pred, target=target, coords=coords)
    return torch.ops.m2f_kernels_C.pairwise_mask_cost(pred, _target(target), _coords(coords))

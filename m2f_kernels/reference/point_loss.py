"""Reference point-sampled mask loss ops: the official criterion and matcher in plain PyTorch.

Coordinates are (x, y) in [0, 1], sampled bilinearly with zero padding in the
``grid_sample(align_corners=False)`` convention (the official ``point_sample``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._common import compute_dtype, grid_from_coords, grid_sample, grid_sample_backward


def _sample(input: torch.Tensor, coords: torch.Tensor, ct) -> torch.Tensor:
    """input [N, C, H, W], coords [N, P, 2] -> [N, C, P] in ``ct``."""
    return grid_sample(input.to(ct), grid_from_coords(coords.to(ct)).unsqueeze(2)).squeeze(3)


def point_sample_fwd(input, coords):
    """[N, C, P] in input.dtype (float32 for a bool or uint8 input)."""
    dtype = input.dtype if input.is_floating_point() else torch.float32
    return _sample(input, coords, compute_dtype(input)).to(dtype).contiguous()


def point_sample_bwd(grad_out, input, coords):
    """grad_input [N, C, H, W] in input.dtype."""
    ct = compute_dtype(input)
    grid = grid_from_coords(coords.to(ct)).unsqueeze(2)
    gi, _ = grid_sample_backward(grad_out.to(ct).unsqueeze(-1), input.to(ct), grid, True, False)
    return gi.to(input.dtype)


def uncertain_point_coords(logits, candidates, random, num_uncertain: int,
                           batch_index: Optional[torch.Tensor] = None,
                           query_index: Optional[torch.Tensor] = None):
    """The official importance sampling, given its random draws.

    logits [N, H, W], or [B, Q, H, W] with batch_index / query_index [N] (the matched
    masks, gathered here); candidates [N, S, 2] uniform points (S = oversample * P);
    random [N, R, 2] uniform points. Returns [N, num_uncertain + R, 2]: the
    ``num_uncertain`` candidates with the smallest |logit| (top-k of -|logit|, in
    top-k order), then the random points.
    """
    logits = _selected(logits, batch_index, query_index)
    ct = compute_dtype(logits)
    uncertainty = -_sample(logits.unsqueeze(1), candidates, ct)[:, 0].abs()  # [N, S]
    idx = torch.topk(uncertainty, k=num_uncertain, dim=1).indices
    chosen = candidates.gather(1, idx.unsqueeze(-1).expand(-1, -1, 2))
    return torch.cat([chosen, random.to(candidates.dtype)], dim=1).contiguous()


def _selected(pred, batch_index: Optional[torch.Tensor], query_index: Optional[torch.Tensor]):
    """The matched masks [N, Hp, Wp] (a gather copy: the reference may make one)."""
    return pred if batch_index is None else pred[batch_index, query_index]


def _point_logits_labels(pred, target, coords, batch_index, query_index, ct):
    logits = _sample(_selected(pred, batch_index, query_index).unsqueeze(1), coords, ct)[:, 0]
    labels = _sample(target.unsqueeze(1), coords, ct)[:, 0]
    return logits, labels


def point_mask_loss_fwd(pred, target, coords, num_masks: float,
                        batch_index: Optional[torch.Tensor] = None,
                        query_index: Optional[torch.Tensor] = None,
                        weight: Optional[torch.Tensor] = None):
    """(loss_bce, loss_dice): 0-dim tensors in float32 (float64 for float64 pred).

    BCE-with-logits averaged over points, summed over masks, over ``num_masks``;
    dice 1 - (2 sum(s t) + 1) / (sum(s) + sum(t) + 1) with s = sigmoid(logit),
    summed over masks, over ``num_masks``. ``weight`` [N] float32 (None: ones) multiplies
    each mask's two terms before the sums (0 drops a padded mask).
    """
    ct = compute_dtype(pred)
    x, t = _point_logits_labels(pred, target, coords, batch_index, query_index, ct)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(1)
    s = x.sigmoid()
    dice = 1 - (2 * (s * t).sum(-1) + 1) / (s.sum(-1) + t.sum(-1) + 1)
    if weight is not None:
        bce, dice = bce * weight.to(ct), dice * weight.to(ct)
    return bce.sum() / num_masks, dice.sum() / num_masks


def point_mask_loss_bwd(grad_bce, grad_dice, pred, target, coords, num_masks: float,
                        batch_index: Optional[torch.Tensor] = None,
                        query_index: Optional[torch.Tensor] = None,
                        weight: Optional[torch.Tensor] = None):
    """grad_pred, shaped like pred (zero where no point of a matched mask landed)."""
    ct = compute_dtype(pred)
    x, t = _point_logits_labels(pred, target, coords, batch_index, query_index, ct)
    s = x.sigmoid()
    num = 2 * (s * t).sum(-1, keepdim=True) + 1
    den = s.sum(-1, keepdim=True) + t.sum(-1, keepdim=True) + 1
    d_bce = (s - t) / x.shape[1]
    d_dice = -(2 * t * den - num) / den.square() * s * (1 - s)
    gx = (grad_bce.to(ct) * d_bce + grad_dice.to(ct) * d_dice) / num_masks  # [N, P]
    if weight is not None:
        gx = gx * weight.to(ct)[:, None]

    selected = _selected(pred, batch_index, query_index).unsqueeze(1).to(ct)
    grid = grid_from_coords(coords.to(ct)).unsqueeze(2)
    g_sel, _ = grid_sample_backward(gx[:, None, :, None], selected, grid, True, False)
    g_sel = g_sel[:, 0]
    if batch_index is None:
        return g_sel.to(pred.dtype)
    grad = torch.zeros(pred.shape, dtype=ct, device=pred.device)
    grad.index_put_((batch_index, query_index), g_sel, accumulate=True)
    return grad.to(pred.dtype)


def pairwise_mask_cost(pred, target, coords):
    """(cost_bce [Q, T], cost_dice [Q, T]) in float32 (float64 for float64 pred).

    The matcher's batch_sigmoid_ce_loss (divided by the number of points) and
    batch_dice_loss, with every mask sampled at the same points coords [P, 2].
    """
    ct = compute_dtype(pred)
    q, t_count, p = pred.shape[0], target.shape[0], coords.shape[0]
    x = _sample(pred.unsqueeze(1), coords.unsqueeze(0).expand(q, p, 2), ct)[:, 0]  # [Q, P]
    t = _sample(target.unsqueeze(1), coords.unsqueeze(0).expand(t_count, p, 2), ct)[:, 0]  # [T, P]
    pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    cost_bce = (pos @ t.T + neg @ (1 - t).T) / p
    s = x.sigmoid()
    cost_dice = 1 - (2 * s @ t.T + 1) / (s.sum(-1)[:, None] + t.sum(-1)[None, :] + 1)
    return cost_bce.contiguous(), cost_dice.contiguous()

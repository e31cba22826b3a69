"""The official mask loss and matching-cost functions (Mask2Former criterion.py / matcher.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float, reduce: bool = True) -> torch.Tensor:
    """inputs (logits) / targets [N, P] -> sum over masks of the +1-smoothed dice loss / num_masks
    (``reduce=False``: the [N] per-mask terms / num_masks)."""
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return (loss.sum() if reduce else loss) / num_masks


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float,
                    reduce: bool = True) -> torch.Tensor:
    """inputs (logits) / targets [N, P] -> BCE averaged over points, summed over masks, / num_masks
    (``reduce=False``: the [N] per-mask terms / num_masks)."""
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").mean(1)
    return (loss.sum() if reduce else loss) / num_masks


def batch_dice_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """inputs (logits) [..., Q, P], targets [..., T, P] -> pairwise dice cost [..., Q, T]."""
    inputs = inputs.sigmoid()
    numerator = 2 * torch.einsum("...nc,...mc->...nm", inputs, targets)
    denominator = inputs.sum(-1)[..., :, None] + targets.sum(-1)[..., None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """inputs (logits) [..., Q, P], targets [..., T, P] -> pairwise mean BCE cost [..., Q, T]."""
    hw = inputs.shape[-1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    loss = torch.einsum("...nc,...mc->...nm", pos, targets) + torch.einsum("...nc,...mc->...nm", neg, 1 - targets)
    return loss / hw

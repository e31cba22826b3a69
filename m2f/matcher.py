"""Hungarian matcher (Mask2Former's ``HungarianMatcher``) with the kernels switch.

Cost = cost_class * (-p[target class]) + cost_mask * mean BCE + cost_dice * dice, solved
per image with scipy's ``linear_sum_assignment``. ``mask_loss='point'`` (official):
the mask costs use ``num_points`` random points shared by all masks of an image;
``'full'``: whole masks, predictions bilinearly upsampled to the target resolution.
With ``kernels='fused'`` the point costs come from ``m2f_kernels.pairwise_mask_cost``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

import m2f_kernels

from .kernels import KernelSwitch
from .losses import batch_dice_loss, batch_sigmoid_ce_loss
from .point_features import point_sample

MASK_LOSSES = ("point", "full")


class HungarianMatcher(KernelSwitch, nn.Module):
    def __init__(self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0,
                 num_points: int = 12544, mask_loss: str = "point"):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all costs can't be 0")
        if mask_loss not in MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {MASK_LOSSES}, got {mask_loss!r}")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points
        self.mask_loss = mask_loss

    @torch.no_grad()
    def forward(self, outputs: Dict, targets: List[Dict],
                generator: Optional[torch.Generator] = None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """outputs: pred_logits [B, Q, K+1], pred_masks [B, Q, Hp, Wp]; targets: labels [T],
        masks [T, Ht, Wt]. Returns per image (query indices, target indices), int64 on the CPU."""
        num_queries = outputs["pred_logits"].shape[1]
        indices = []
        for b, target in enumerate(targets):
            out_prob = outputs["pred_logits"][b].softmax(-1)
            cost_class = -out_prob[:, target["labels"]]
            cost_mask, cost_dice = self._mask_costs(outputs["pred_masks"][b], target["masks"], generator)
            cost = self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice
            indices.append(linear_sum_assignment(cost.reshape(num_queries, -1).cpu()))
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]

    def _mask_costs(self, out_mask: torch.Tensor, tgt_mask: torch.Tensor, generator):
        """out_mask [Q, Hp, Wp] logits, tgt_mask [T, Ht, Wt] -> (cost_mask, cost_dice) [Q, T] float32."""
        if self.mask_loss == "full":
            out = F.interpolate(out_mask[:, None], size=tgt_mask.shape[-2:], mode="bilinear", align_corners=False)
            return self._costs(out.flatten(1), tgt_mask.to(out).flatten(1))
        # all masks share the same set of points for efficient matching
        point_coords = torch.rand(1, self.num_points, 2, device=out_mask.device, generator=generator)
        if self.fused:
            return m2f_kernels.pairwise_mask_cost(out_mask, tgt_mask, point_coords[0])
        tgt = tgt_mask.to(out_mask)[:, None]
        tgt = point_sample(tgt, point_coords.repeat(tgt.shape[0], 1, 1), align_corners=False).squeeze(1)
        out = point_sample(out_mask[:, None], point_coords.repeat(out_mask.shape[0], 1, 1),
                           align_corners=False).squeeze(1)
        return self._costs(out, tgt)

    @staticmethod
    def _costs(out: torch.Tensor, tgt: torch.Tensor):
        with torch.autocast(device_type=out.device.type, enabled=False):
            out, tgt = out.float(), tgt.float()
            return batch_sigmoid_ce_loss(out, tgt), batch_dice_loss(out, tgt)

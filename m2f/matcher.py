"""Hungarian matcher (Mask2Former's ``HungarianMatcher``) with the kernels switch.

Cost = cost_class * (-p[target class]) + cost_mask * mean BCE + cost_dice * dice.
``mask_loss='point'`` (official): the mask costs use ``num_points`` random points shared by
all masks of an image; ``'full'``: whole masks, predictions bilinearly upsampled to the
target resolution.

Two entry points:

- ``forward(outputs, targets)`` (the official matcher, per-image lists): solved per image
  with scipy's ``linear_sum_assignment`` on the host; the point costs come from
  ``m2f_kernels.pairwise_mask_cost`` with ``kernels='fused'``.
- ``cost_matrix(outputs, padded)`` (static shapes, :class:`~m2f.targets.PaddedTargets`):
  the [B, Q, T] costs on the device, for ``m2f_kernels.linear_sum_assignment`` to solve
  all predictions and images of a step in one call (the fused criterion).
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
from .point_features import point_sample, sample_masks
from .targets import PaddedTargets

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

    def draw_points(self, images: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[images, num_points, 2] uniform points, one set per image shared by all its masks."""
        return torch.rand(images, self.num_points, 2, device=device, generator=generator)

    @torch.no_grad()
    def cost_matrix(self, outputs: Dict, targets: PaddedTargets,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[B, Q, T] float32 costs between every query and every target slot of each image
        (padding slots hold finite garbage: the solver ignores them). Point costs only."""
        if self.mask_loss != "point":
            raise ValueError("cost_matrix computes point costs; mask_loss='full' takes forward()")
        logits = outputs["pred_logits"]
        b, q = logits.shape[:2]
        slots = targets.labels.shape[1]
        prob = logits.float().softmax(-1)
        cost_class = -prob.gather(2, targets.labels[:, None, :].expand(b, q, slots))
        coords = self.draw_points(b, logits.device, generator)
        if "mask_embed" in outputs:
            # mask-free: each image's features sampled once at its points, then the logits of
            # all queries there are one batched matmul; targets sampled at the same points
            features = m2f_kernels.point_sample(outputs["mask_features"], coords)  # [B, C, P]
            point_logits = torch.bmm(outputs["mask_embed"], features).float()  # [B, Q, P]
            point_labels = sample_masks(targets.masks, coords)  # [B, T, P]
            cost_mask, cost_dice = self._costs(point_logits, point_labels)
        else:
            pred_masks = outputs["pred_masks"]
            costs = [self._point_costs(pred_masks[i], targets.masks[i], coords[i]) for i in range(b)]
            cost_mask = torch.stack([c[0] for c in costs])
            cost_dice = torch.stack([c[1] for c in costs])
        return self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice

    def _point_costs(self, out_mask: torch.Tensor, tgt_mask: torch.Tensor, coords: torch.Tensor):
        """out_mask [Q, Hp, Wp], tgt_mask [T, Ht, Wt], coords [P, 2] -> (cost_mask, cost_dice) [Q, T]."""
        if self.fused:
            return m2f_kernels.pairwise_mask_cost(out_mask, tgt_mask, coords)
        p = coords.shape[0]
        tgt = point_sample(tgt_mask.to(out_mask)[:, None], coords.expand(tgt_mask.shape[0], p, 2),
                           align_corners=False).squeeze(1)
        out = point_sample(out_mask[:, None], coords.expand(out_mask.shape[0], p, 2), align_corners=False).squeeze(1)
        return self._costs(out, tgt)

    def _mask_costs(self, out_mask: torch.Tensor, tgt_mask: torch.Tensor, generator):
        """out_mask [Q, Hp, Wp] logits, tgt_mask [T, Ht, Wt] -> (cost_mask, cost_dice) [Q, T] float32."""
        if self.mask_loss == "full":
            out = F.interpolate(out_mask[:, None], size=tgt_mask.shape[-2:], mode="bilinear", align_corners=False)
            return self._costs(out.flatten(1), tgt_mask.to(out).flatten(1))
        return self._point_costs(out_mask, tgt_mask, self.draw_points(1, out_mask.device, generator)[0])

    @staticmethod
    def _costs(out: torch.Tensor, tgt: torch.Tensor):
        """out (logits) [..., Q, P], tgt [..., T, P] -> (cost_mask, cost_dice) [..., Q, T] float32."""
        with torch.autocast(device_type=out.device.type, enabled=False):
            out, tgt = out.float(), tgt.float()
            return batch_sigmoid_ce_loss(out, tgt), batch_dice_loss(out, tgt)

"""Hungarian matcher (Mask2Former's ``HungarianMatcher``) with the kernels switch.

Cost = cost_class * (-p[target class]) + cost_mask * mean BCE + cost_dice * dice.
``mask_loss='point'`` (official): the mask costs use ``num_points`` random points shared by
all masks of an image; ``'full'``: whole masks, predictions bilinearly upsampled to the
target resolution.

Two entry points:

- ``forward(outputs, targets)`` (the official matcher, per-image lists): solved per image
  with scipy's ``linear_sum_assignment`` on the host; the point costs come from
  ``m2f_kernels.pairwise_mask_cost`` with ``kernels='fused'``.
- ``cost_matrices(predictions, padded)`` (static shapes, :class:`~m2f.targets.PaddedTargets`):
  the [L, B, Q, T] costs of all L predictions on the device, for
  ``m2f_kernels.linear_sum_assignment`` to solve in one call (the fused criterion).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import m2f_kernels

from .kernels import KernelSwitch
from .losses import batch_dice_loss, batch_sigmoid_ce_loss
from .point_features import point_sample, sample_masks, uniform
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
        from scipy.optimize import linear_sum_assignment  # ~0.3 s, paid here by the first call

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
        return uniform(images, self.num_points, 2, device=device, generator=generator)

    @torch.no_grad()
    def cost_matrices(self, predictions: List[Dict], targets: PaddedTargets,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[L, B, Q, T] float32 costs between every query and every target slot of each image,
        for each of the L predictions (padding slots hold finite garbage: the solver ignores
        them). One set of points per prediction and image. Point costs only."""
        if self.mask_loss != "point":
            raise ValueError("cost_matrices computes point costs; mask_loss='full' takes forward()")
        logits = torch.stack([p["pred_logits"] for p in predictions]).float()  # [L, B, Q, K+1]
        num, b, q = logits.shape[:3]
        slots = targets.labels.shape[1]
        cost_class = -logits.softmax(-1).gather(3, targets.labels[None, :, None, :].expand(num, b, q, slots))
        coords = self.draw_points(num * b, logits.device, generator).view(num, b, -1, 2)
        if "mask_embed" in predictions[0]:
            # mask-free: each image's features sampled at each prediction's points, the logits of
            # all queries there a batched matmul; the targets sampled at all points in one call
            features = predictions[0]["mask_features"]
            point_logits = torch.stack([torch.bmm(p["mask_embed"], m2f_kernels.point_sample(features, coords[i]))
                                        for i, p in enumerate(predictions)]).float()  # [L, B, Q, P]
            points = coords.shape[2]
            labels = sample_masks(targets.masks, coords.transpose(0, 1).reshape(b, num * points, 2))
            point_labels = labels.view(b, slots, num, points).permute(2, 0, 1, 3)  # [L, B, T, P]
            cost_mask, cost_dice = self._costs(point_logits, point_labels)
        else:
            costs = [self._point_costs(p["pred_masks"][i], targets.masks[i], coords[n, i])
                     for n, p in enumerate(predictions) for i in range(b)]
            cost_mask = torch.stack([c[0] for c in costs]).view(num, b, q, slots)
            cost_dice = torch.stack([c[1] for c in costs]).view(num, b, q, slots)
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

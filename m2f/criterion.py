"""The set criterion (Mask2Former's ``SetCriterion``) with the kernels switch.

Losses per prediction (final and every auxiliary one): cross-entropy over K+1 classes
with the no-object class weighted ``eos_coef``; sigmoid BCE and dice on the matched
masks. ``mask_loss='point'`` (official) computes the mask losses on ``num_points``
importance-sampled points per mask; ``'full'`` on whole masks, predictions bilinearly
upsampled to the target resolution. With ``kernels='fused'`` the point sampling and
the point losses run in m2f_kernels (``uncertain_point_coords``, ``point_mask_loss``
straight on [B, Q, H, W] with the matched indices); the random draws are identical.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import m2f_kernels

from .kernels import KernelSwitch
from .losses import dice_loss, sigmoid_ce_loss
from .matcher import MASK_LOSSES, HungarianMatcher
from .point_features import calculate_uncertainty, get_uncertain_point_coords_with_randomness, point_sample


class SetCriterion(KernelSwitch, nn.Module):
    """forward(outputs, targets, generator=None) -> unweighted losses
    {"loss_ce", "loss_mask", "loss_dice", and "<name>_<i>" for each aux prediction i}."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Dict[str, float], eos_coef: float,
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 mask_loss: str = "point"):
        super().__init__()
        if mask_loss not in MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {MASK_LOSSES}, got {mask_loss!r}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        # not persistent: the official checkpoints carry criterion.empty_weight, the converter drops it
        self.register_buffer("empty_weight", empty_weight, persistent=False)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.mask_loss = mask_loss

    def loss_labels(self, outputs, targets, indices, num_masks):
        src_logits = outputs["pred_logits"].float()
        idx = _src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=src_logits.device)
        target_classes[idx] = target_classes_o.to(src_logits.device)
        return {"loss_ce": F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)}

    def loss_masks(self, outputs, targets, indices, num_masks, generator=None):
        pred_masks = outputs["pred_masks"]
        b_idx, q_idx = (i.to(pred_masks.device) for i in _src_permutation_idx(indices))
        if self.fused and self.mask_loss == "point":
            target_masks = torch.cat([t["masks"][j.to(t["masks"].device)] for t, (_, j) in zip(targets, indices)])
            with torch.no_grad():
                point_coords = m2f_kernels.uncertain_point_coords(
                    pred_masks.detach(), self.num_points, self.oversample_ratio, self.importance_sample_ratio,
                    generator, pred_index=(b_idx, q_idx))
            loss_bce, loss_dice = m2f_kernels.point_mask_loss(pred_masks, target_masks, point_coords, num_masks,
                                                              pred_index=(b_idx, q_idx))
            return {"loss_mask": loss_bce, "loss_dice": loss_dice}

        src_masks = pred_masks[b_idx, q_idx]
        tgt_b, tgt_j = _tgt_permutation_idx(indices)
        target_masks = _padded_stack([t["masks"] for t in targets]).to(src_masks)[tgt_b, tgt_j]
        if self.mask_loss == "full":
            src = F.interpolate(src_masks[:, None], size=target_masks.shape[-2:], mode="bilinear",
                                align_corners=False)[:, 0].flatten(1)
            tgt = target_masks.flatten(1)
            return {"loss_mask": sigmoid_ce_loss(src, tgt, num_masks), "loss_dice": dice_loss(src, tgt, num_masks)}
        src_masks, target_masks = src_masks[:, None], target_masks[:, None]
        with torch.no_grad():
            point_coords = get_uncertain_point_coords_with_randomness(
                src_masks, calculate_uncertainty, self.num_points, self.oversample_ratio,
                self.importance_sample_ratio, generator)
            point_labels = point_sample(target_masks, point_coords, align_corners=False).squeeze(1)
        point_logits = point_sample(src_masks, point_coords, align_corners=False).squeeze(1)
        return {"loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
                "loss_dice": dice_loss(point_logits, point_labels, num_masks)}

    def _losses(self, outputs, targets, num_masks, generator):
        indices = self.matcher(outputs, targets, generator)
        losses = self.loss_labels(outputs, targets, indices, num_masks)
        losses.update(self.loss_masks(outputs, targets, indices, num_masks, generator))
        return losses

    def forward(self, outputs: Dict, targets: List[Dict],
                generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        device = outputs["pred_logits"].device
        num_masks = average_num_masks(sum(len(t["labels"]) for t in targets), device)
        final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        losses = self._losses(final, targets, num_masks, generator)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self._losses(aux, targets, num_masks, generator).items()})
        return losses


def average_num_masks(local: int, device) -> float:
    """The number of target masks averaged over processes (when torch.distributed is up), at least 1."""
    num_masks = torch.as_tensor([local], dtype=torch.float, device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_masks)
        world = dist.get_world_size()
    return torch.clamp(num_masks / world, min=1).item()


def _src_permutation_idx(indices):
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch_idx, torch.cat([src for src, _ in indices])


def _tgt_permutation_idx(indices):
    batch_idx = torch.cat([torch.full_like(tgt, i) for i, (_, tgt) in enumerate(indices)])
    return batch_idx, torch.cat([tgt for _, tgt in indices])


def _padded_stack(masks: List[torch.Tensor]) -> torch.Tensor:
    """[B, T_max, H_max, W_max] zero-padded stack (the official nested_tensor_from_tensor_list)."""
    t = max(m.shape[0] for m in masks)
    h = max(m.shape[1] for m in masks)
    w = max(m.shape[2] for m in masks)
    out = masks[0].new_zeros((len(masks), t, h, w))
    for i, m in enumerate(masks):
        out[i, : m.shape[0], : m.shape[1], : m.shape[2]] = m
    return out

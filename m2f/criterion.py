"""The set criterion (Mask2Former's ``SetCriterion``) with the kernels switch.

Losses per prediction (final and every auxiliary one): cross-entropy over K+1 classes
with the no-object class weighted ``eos_coef``; sigmoid BCE and dice on the matched
masks. ``mask_loss='point'`` (official) computes the mask losses on ``num_points``
importance-sampled points per mask; ``'full'`` on whole masks, predictions bilinearly
upsampled to the target resolution.

With ``kernels='fused'`` and ``mask_loss='point'`` the criterion works in static shapes
(:class:`~m2f.targets.PaddedTargets`, list targets are padded first) and never leaves the
device: the matcher's [B, Q, T] costs of every prediction are solved in one
``m2f_kernels.linear_sum_assignment`` call, the matched pairs are fixed-size index tensors
with a validity mask (padding and unmatched slots weigh 0 in ``point_mask_loss``),
``num_masks`` stays a tensor, and the point sampling and losses read [B, Q, H, W] in place
(``uncertain_point_coords``, ``point_mask_loss`` with ``pred_index``). No ``.item()``,
``nonzero`` or data-dependent shape: the step can be compiled or captured in a CUDA graph.
The losses equal the official path's for the same points and assignment; the random draws
come in another order (all matcher points first), so a seeded run differs from it.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import m2f_kernels

from .kernels import KernelSwitch
from .loss_dict import LossDict
from .losses import dice_loss, sigmoid_ce_loss
from .matcher import MASK_LOSSES, HungarianMatcher
from .point_features import (
    calculate_uncertainty, get_uncertain_point_coords_with_randomness, point_sample, sample_masks, uniform,
)
from .targets import PaddedTargets, pad_targets


class SetCriterion(KernelSwitch, nn.Module):
    """forward(outputs, targets, generator=None) -> unweighted losses, a :class:`~m2f.loss_dict.LossDict`
    {"loss_ce", "loss_mask", "loss_dice", and "<name>_<i>" for each aux prediction i}.

    List targets' masks are expected at the padded image size, as the official
    ``prepare_targets`` (``Mask2Former.prepare_targets`` / ``pad_targets``) makes them. Masks
    of different sizes are zero-padded to the largest by the static criterion; the reference
    one, as the official code, matches each image's masks as given and pads them only for
    the losses, so the two paths differ for such input (neither knows the padded size)."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Dict[str, float], eos_coef: float,
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 mask_loss: str = "point"):
        super().__init__()
        if mask_loss not in MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {MASK_LOSSES}, got {mask_loss!r}")
        # the point sampling's own checks (official: asserts) run per step, and the mask-free
        # path has none: a bad ratio fails here, once, whichever path runs
        if not 1 <= oversample_ratio < float("inf") or not 0 <= importance_sample_ratio <= 1:
            raise ValueError("oversample_ratio must be a finite number >= 1 and importance_sample_ratio in [0, 1], "
                             f"got {oversample_ratio!r} and {importance_sample_ratio!r}")
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
        src_masks = pred_masks[b_idx, q_idx]
        tgt_b, tgt_j = _tgt_permutation_idx(indices)
        target_masks = _padded_stack([t["masks"] for t in targets]).to(src_masks)[tgt_b, tgt_j]
        if self.mask_loss == "full":
            src = F.interpolate(src_masks[:, None], size=target_masks.shape[-2:], mode="bilinear",
                                align_corners=False)[:, 0].flatten(1)
            tgt = target_masks.flatten(1)
            return {"loss_mask": sigmoid_ce_loss(src, tgt, num_masks), "loss_dice": dice_loss(src, tgt, num_masks)}
        src_masks, target_masks = src_masks[:, None], target_masks[:, None]
        point_coords = self.sample_points(outputs, (b_idx, q_idx), generator)
        with torch.no_grad():
            point_labels = point_sample(target_masks, point_coords, align_corners=False).squeeze(1)
        point_logits = point_sample(src_masks, point_coords, align_corners=False).squeeze(1)
        return {"loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
                "loss_dice": dice_loss(point_logits, point_labels, num_masks)}

    @torch.no_grad()
    def sample_points(self, outputs: Dict, index, generator=None) -> torch.Tensor:
        """[N, num_points, 2]: the official importance sampling of points for the matched masks
        ``index`` = (batch_index [N], query_index [N]) of a prediction (its ``pred_masks``, or
        its ``mask_embed`` with the ``mask_features`` when mask-free)."""
        if "mask_embed" in outputs:
            return _uncertain_points_mask_free(outputs, index, self.num_points, self.oversample_ratio,
                                               self.importance_sample_ratio, generator)
        pred_masks = outputs["pred_masks"]
        if self.fused:
            return m2f_kernels.uncertain_point_coords(
                pred_masks.detach(), self.num_points, self.oversample_ratio, self.importance_sample_ratio,
                generator, pred_index=index)
        return get_uncertain_point_coords_with_randomness(
            pred_masks[index][:, None], calculate_uncertainty, self.num_points, self.oversample_ratio,
            self.importance_sample_ratio, generator)

    def _losses(self, outputs, targets, num_masks, generator):
        indices = self.matcher(outputs, targets, generator)
        losses = self.loss_labels(outputs, targets, indices, num_masks)
        losses.update(self.loss_masks(outputs, targets, indices, num_masks, generator))
        return losses

    @property
    def static(self) -> bool:
        """True where the criterion runs in static shapes (fused point losses)."""
        return self.fused and self.mask_loss == "point"

    def forward(self, outputs: Dict, targets: Union[List[Dict], PaddedTargets],
                generator: Optional[torch.Generator] = None) -> LossDict:
        if self.static:
            if not isinstance(targets, PaddedTargets):
                targets = pad_targets(targets, _largest_mask_size(targets), device=outputs["pred_logits"].device)
            return self._static_forward(outputs, targets, generator)
        if isinstance(targets, PaddedTargets):
            targets = targets.to_list()
        device = outputs["pred_logits"].device
        num_masks = average_num_masks(sum(len(t["labels"]) for t in targets), device).item()
        final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        losses = self._losses(final, targets, num_masks, generator)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self._losses(aux, targets, num_masks, generator).items()})
        return LossDict(losses)

    # --- static shapes (kernels='fused', mask_loss='point') -----------------------------------

    def _static_forward(self, outputs: Dict, targets: PaddedTargets, generator) -> LossDict:
        """All L predictions (final, then the auxiliary ones) as one batch: one matcher cost
        pass, one assignment call, one class loss, and (mask-free) one point-loss pass."""
        shared = {"mask_features": outputs["mask_features"]} if "mask_features" in outputs else {}
        predictions = [outputs] + [{**aux, **shared} for aux in outputs.get("aux_outputs", [])]
        num = len(predictions)
        batch, slots = targets.labels.shape
        num_masks = average_num_masks(targets.num_targets.sum(), outputs["pred_logits"].device)
        with torch.no_grad():
            costs = self.matcher.cost_matrices(predictions, targets, generator)  # [L, B, Q, T]
            matched = m2f_kernels.linear_sum_assignment(costs.flatten(0, 1), targets.num_targets.repeat(num))
        matched = matched.view(num, batch, slots)
        pairs = targets.valid() & (matched >= 0)  # [L, B, T]: slots that hold a matched target
        loss_ce = self._static_class_loss(predictions, targets, matched, pairs)
        if "mask_embed" in outputs:
            loss_mask, loss_dice = self._mask_free_losses(predictions, targets, matched, pairs, num_masks, generator)
        else:
            masks = [self._static_mask_losses(p, targets, matched[i], pairs[i], num_masks, generator)
                     for i, p in enumerate(predictions)]
            loss_mask, loss_dice = (torch.stack(x) for x in zip(*masks))
        return LossDict.from_terms(("loss_ce", "loss_mask", "loss_dice"), (loss_ce, loss_mask, loss_dice))

    def _static_class_loss(self, predictions, targets: PaddedTargets, matched, pairs) -> torch.Tensor:
        """[L] the official weighted cross-entropy of each prediction: matched queries get their
        target's label, the rest the no-object class (the unmatched slots write to a spare
        column Q)."""
        logits = torch.stack([p["pred_logits"] for p in predictions]).float()  # [L, B, Q, K+1]
        num, batch, num_queries = logits.shape[:3]
        target_classes = torch.full((num, batch, num_queries + 1), self.num_classes, dtype=torch.int64,
                                    device=logits.device)
        target_classes.scatter_(2, torch.where(pairs, matched, num_queries),
                                torch.where(pairs, targets.labels.expand_as(matched), self.num_classes))
        target_classes = target_classes[..., :num_queries]
        weighted = F.cross_entropy(logits.flatten(0, 1).transpose(1, 2), target_classes.flatten(0, 1),
                                   self.empty_weight, reduction="none")  # [L*B, Q]: weight * nll
        return weighted.view(num, -1).sum(1) / self.empty_weight[target_classes].view(num, -1).sum(1)

    def _static_mask_losses(self, outputs: Dict, targets: PaddedTargets, query, pairs, num_masks, generator):
        """(loss_mask, loss_dice) of one prediction with mask logits; ``query`` [B, T] the query
        matched to each slot, ``pairs`` [B, T] the slots that count."""
        batch, slots = query.shape
        index = (torch.arange(batch, device=query.device).repeat_interleave(slots), query.clamp(min=0).reshape(-1))
        point_coords = self.sample_points(outputs, index, generator)
        return m2f_kernels.point_mask_loss(outputs["pred_masks"], targets.masks.flatten(0, 1), point_coords,
                                           num_masks, pred_index=index, mask_weight=pairs.reshape(-1).float())

    def _mask_free_losses(self, predictions, targets: PaddedTargets, matched, pairs, num_masks, generator):
        """([L] loss_mask, [L] loss_dice) of all predictions in one pass, from logits at points
        (``point_mask_logits``): the L predictions' embeddings side by side, [B, L*Q, C], and
        one entry per (image, slot, prediction), so each target mask is sampled once for all
        its predictions' points."""
        num, batch, slots = matched.shape
        embed = torch.cat([p["mask_embed"] for p in predictions], dim=1)  # [B, L*Q, C]
        features = predictions[0]["mask_features"]
        num_queries = predictions[0]["mask_embed"].shape[1]
        offsets = torch.arange(num, device=matched.device) * num_queries
        query = (matched.clamp(min=0) + offsets[:, None, None]).permute(1, 2, 0).reshape(-1)  # (b, t, l) order
        index = (torch.arange(batch, device=matched.device).repeat_interleave(slots * num), query)
        outputs = {"mask_embed": embed, "mask_features": features, "queries_per_prediction": num_queries}
        point_coords = self.sample_points(outputs, index, generator)  # [B*T*L, P, 2]
        point_logits = m2f_kernels.point_mask_logits(embed, features, point_coords, index).float()
        points = point_coords.shape[1]
        point_labels = sample_masks(targets.masks, point_coords.view(batch, slots, num * points, 2))
        point_labels = point_labels.view(-1, points)
        weight = pairs.permute(1, 2, 0).reshape(-1).float()
        loss_bce = sigmoid_ce_loss(point_logits, point_labels, 1.0, reduce=False) * weight
        loss_dice = dice_loss(point_logits, point_labels, 1.0, reduce=False) * weight
        return (loss_bce.view(-1, num).sum(0) / num_masks, loss_dice.view(-1, num).sum(0) / num_masks)


def _uncertain_points_mask_free(outputs: Dict, index, num_points: int, oversample_ratio: float,
                                importance_sample_ratio: float, generator) -> torch.Tensor:
    """``uncertain_point_coords`` for a mask-free prediction: the candidates' logits come from
    ``point_mask_logits`` (same draws, in the same order, as ``uncertain_point_coords``)."""
    mask_embed, mask_features = outputs["mask_embed"].detach(), outputs["mask_features"].detach()
    n = index[0].shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    device = mask_embed.device
    candidates = uniform(n, num_sampled, 2, device=device, generator=generator)
    random = uniform(n, num_points - num_uncertain, 2, device=device, generator=generator)
    if num_uncertain == 0 or n == 0:
        return torch.cat([candidates[:, :num_uncertain], random], dim=1)
    uncertainty = -m2f_kernels.point_mask_logits(mask_embed, mask_features, candidates, index).abs()
    chosen = torch.topk(uncertainty, k=num_uncertain, dim=1).indices
    return torch.cat([candidates.gather(1, chosen.unsqueeze(-1).expand(-1, -1, 2)), random], dim=1)


def average_num_masks(local, device) -> torch.Tensor:
    """The number of target masks averaged over processes (when torch.distributed is up), at
    least 1, as a 0-dim float tensor on ``device`` (``local``: a number or a tensor)."""
    num_masks = torch.as_tensor(local, dtype=torch.float, device=device).reshape(1)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_masks)
        world = dist.get_world_size()
    return torch.clamp(num_masks / world, min=1)[0]


def _largest_mask_size(targets: List[Dict]):
    return max(t["masks"].shape[-2] for t in targets), max(t["masks"].shape[-1] for t in targets)


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

"""Inference post-processing of one image's predictions (the official MaskFormer meta-arch).

All functions take ``mask_cls`` [Q, K+1] class logits (last = no object) and ``mask_pred``
[Q, H, W] mask logits already resized to the output resolution (see
:func:`upsample_masks` and :func:`sem_seg_postprocess`).
"""
from __future__ import annotations

from typing import Collection, Dict, List, Tuple

import torch
import torch.nn.functional as F


def upsample_masks(pred_masks: torch.Tensor, size) -> torch.Tensor:
    """[B, Q, h, w] -> [B, Q, *size], bilinear (the official upsampling to the padded input size)."""
    return F.interpolate(pred_masks, size=tuple(size), mode="bilinear", align_corners=False)


def sem_seg_postprocess(result: torch.Tensor, img_size, output_height: int, output_width: int) -> torch.Tensor:
    """detectron2's sem_seg_postprocess: crop [C, H_pad, W_pad] to ``img_size`` (the unpadded
    input), then resize bilinearly to (output_height, output_width)."""
    result = result[:, : img_size[0], : img_size[1]].expand(1, -1, -1, -1)
    return F.interpolate(result, size=(output_height, output_width), mode="bilinear", align_corners=False)[0]


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """-> [K, H, W] per-class scores: sum over queries of p(class) * sigmoid(mask)."""
    probs = F.softmax(mask_cls, dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_pred.sigmoid())


def instance_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor, *, topk: int = 100,
                       thing_ids: Collection[int] = None) -> Dict[str, torch.Tensor]:
    """Top-``topk`` (query, class) pairs by class probability (all Q * K of them when fewer;
    the official ``topk`` raises there).

    Returns {"pred_masks": [n, H, W] float 0/1 (logit > 0), "scores": [n] class probability
    times the mean mask probability inside the mask, "pred_classes": [n] int64}. With
    ``thing_ids`` (panoptic models) only those classes are kept, as the official code does
    when panoptic inference is on.
    """
    num_queries, num_classes = mask_cls.shape[0], mask_cls.shape[1] - 1
    scores = F.softmax(mask_cls, dim=-1)[:, :-1]
    labels = torch.arange(num_classes, device=mask_cls.device).unsqueeze(0).repeat(num_queries, 1).flatten(0, 1)
    scores_per_image, topk_indices = scores.flatten(0, 1).topk(min(topk, scores.numel()), sorted=False)
    labels_per_image = labels[topk_indices]
    mask_pred = mask_pred[torch.div(topk_indices, num_classes, rounding_mode="floor")]
    if thing_ids is not None:
        keep = torch.tensor([int(lab) in set(thing_ids) for lab in labels_per_image.tolist()],
                            dtype=torch.bool, device=mask_cls.device)
        scores_per_image, labels_per_image, mask_pred = scores_per_image[keep], labels_per_image[keep], mask_pred[keep]
    binary = (mask_pred > 0).float()
    mask_scores = (mask_pred.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return {"pred_masks": binary, "scores": scores_per_image * mask_scores, "pred_classes": labels_per_image}


def panoptic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor, *, thing_ids: Collection[int],
                       object_mask_threshold: float = 0.8,
                       overlap_threshold: float = 0.8) -> Tuple[torch.Tensor, List[Dict]]:
    """-> (panoptic_seg [H, W] int32 segment ids, 0 = void; segments_info list of
    {"id", "isthing", "category_id"}).

    Queries whose best class is not "no object" and scores above ``object_mask_threshold``
    compete per pixel by score * mask probability; a segment is kept when the pixels it
    wins (with mask probability >= 0.5) are at least ``overlap_threshold`` of its own
    mask; stuff segments of one class are merged.
    """
    thing_ids = set(int(t) for t in thing_ids)
    num_classes = mask_cls.shape[-1] - 1
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    mask_prob = mask_pred.sigmoid()
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_prob[keep]
    h, w = mask_pred.shape[-2:]
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=mask_pred.device)
    segments_info: List[Dict] = []
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info
    cur_mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    current_segment_id = 0
    stuff_memory: Dict[int, int] = {}
    for k in range(cur_classes.shape[0]):
        pred_class = int(cur_classes[k])
        isthing = pred_class in thing_ids
        mask_area = (cur_mask_ids == k).sum().item()
        original_area = (cur_masks[k] >= 0.5).sum().item()
        mask = (cur_mask_ids == k) & (cur_masks[k] >= 0.5)
        if mask_area > 0 and original_area > 0 and mask.sum().item() > 0:
            if mask_area / original_area < overlap_threshold:
                continue
            if not isthing:  # merge stuff regions
                if pred_class in stuff_memory:
                    panoptic_seg[mask] = stuff_memory[pred_class]
                    continue
                stuff_memory[pred_class] = current_segment_id + 1
            current_segment_id += 1
            panoptic_seg[mask] = current_segment_id
            segments_info.append({"id": current_segment_id, "isthing": isthing, "category_id": pred_class})
    return panoptic_seg, segments_info

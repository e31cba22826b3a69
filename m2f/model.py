"""The Mask2Former meta-architecture (the official ``MaskFormer`` meta-arch, tensor in/out)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .criterion import SetCriterion
from .targets import PaddedTargets, pad_targets
from .kernels import get_kernels, set_kernels
from .layers import PixelNormalizer
from .pixel_decoder import MSDeformAttnPixelDecoder
from .transformer_decoder import MultiScaleMaskedTransformerDecoder


class MaskFormerHead(nn.Module):
    """Pixel decoder + transformer decoder (keys ``sem_seg_head.pixel_decoder.*`` / ``.predictor.*``)."""

    def __init__(self, pixel_decoder: MSDeformAttnPixelDecoder, predictor: MultiScaleMaskedTransformerDecoder,
                 num_classes: int):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor
        self.num_classes = num_classes

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict:
        mask_features, _, multi_scale_features = self.pixel_decoder.forward_features(features)
        return self.predictor(multi_scale_features, mask_features)


class Mask2Former(PixelNormalizer):
    """Normalise, pad to ``size_divisibility``, backbone, head; losses in training.

    forward(images [B, 3, H, W] float RGB in 0..255, targets=None, *, generator=None):
      - training: targets is a list of dict(labels int64 [T], masks bool [T, H, W]), or
        :class:`~m2f.targets.PaddedTargets` (masks at the padded size, see
        :meth:`pad_targets`); returns the weighted losses (their sum is the total loss).
        The fused criterion pads list targets to ``max_targets`` slots per image (None: the
        batch's largest count; a fixed value gives every step the same shapes). ``generator`` drives
        the matcher's and the loss's random points (same draws in both kernel modes).
      - eval: {"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, H'/4, W'/4]} with H', W'
        the padded size (H, W when they are multiples of ``size_divisibility``).
    """

    def __init__(self, backbone: nn.Module, sem_seg_head: MaskFormerHead, criterion: SetCriterion, *,
                 num_queries: int, size_divisibility: int = 32,
                 pixel_mean: Sequence[float] = (123.675, 116.280, 103.530),
                 pixel_std: Sequence[float] = (58.395, 57.120, 57.375), deep_supervision: bool = True,
                 max_targets: Optional[int] = None):
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.num_queries = num_queries
        self.deep_supervision = deep_supervision
        self.max_targets = max_targets
        self._init_pixels(pixel_mean, pixel_std, size_divisibility)

    @property
    def num_classes(self) -> int:
        return self.sem_seg_head.num_classes

    @property
    def kernels(self) -> str:
        return get_kernels(self)

    def set_kernels(self, mode: str) -> "Mask2Former":
        """Switch every hotspot between 'reference' and 'fused' (weights untouched)."""
        return set_kernels(self, mode)

    def forward(self, images: torch.Tensor, targets: Optional[List[Dict]] = None, *,
                generator: Optional[torch.Generator] = None):
        x = self.preprocess(images)
        outputs = self.sem_seg_head(self.backbone(x))
        if not self.training:
            return {"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"]}
        if targets is None:
            raise ValueError("training mode needs targets (list of dict(labels=[T], masks=[T, H, W]))")
        count = targets.labels.shape[0] if isinstance(targets, PaddedTargets) else len(targets)
        if count != images.shape[0]:
            raise ValueError(f"got {count} targets for a batch of {images.shape[0]} images")
        if not self.deep_supervision:
            outputs.pop("aux_outputs")
        if isinstance(targets, PaddedTargets):
            if tuple(targets.masks.shape[-2:]) != tuple(x.shape[-2:]):
                raise ValueError(f"padded target masks are {tuple(targets.masks.shape[-2:])}, the padded images "
                                 f"{tuple(x.shape[-2:])}: pad them with Mask2Former.pad_targets")
        elif self.criterion.static:
            targets = self.pad_targets(targets, x.shape[-2:], self.max_targets)
        else:
            targets = self.prepare_targets(targets, x.shape[-2:])
        return self.criterion(outputs, targets, generator).weighted(self.criterion.weight_dict)

    @staticmethod
    def pad_targets(targets: List[Dict], padded_size, max_targets: Optional[int] = None) -> PaddedTargets:
        """Per-image targets as :class:`~m2f.targets.PaddedTargets`, masks zero-padded to the
        padded image size (see :func:`m2f.targets.pad_targets`)."""
        return pad_targets(targets, padded_size, max_targets)

    @staticmethod
    def prepare_targets(targets: List[Dict], padded_size) -> List[Dict]:
        """Zero-pad each target's masks to the padded image size (the official prepare_targets)."""
        h_pad, w_pad = padded_size
        out = []
        for t in targets:
            masks = t["masks"]
            if masks.shape[-2] > h_pad or masks.shape[-1] > w_pad:
                raise ValueError(f"target masks {tuple(masks.shape)} are larger than the padded image {h_pad}x{w_pad}")
            padded = masks.new_zeros((masks.shape[0], h_pad, w_pad))
            padded[:, : masks.shape[1], : masks.shape[2]] = masks
            out.append({"labels": t["labels"], "masks": padded})
        return out

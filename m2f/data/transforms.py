"""Augmentations of a sample's image and label maps (the official Mask2Former recipes).

Every transform takes a sample dict (``image`` uint8 [3, H, W]; optional ``sem_seg`` and
``pan_seg`` int64 [H, W]) and a ``numpy.random.Generator``, and returns a new dict with
the same geometry applied to all three. Pads: image 128 (detectron2's FixedSizeCrop),
``sem_seg`` 255 (ignore), ``pan_seg`` 0 (void).

- :class:`LargeScaleJitter`: COCO LSJ (``COCOPanopticNewBaselineDatasetMapper``): flip,
  ``ResizeScale(0.1, 2.0)`` to the target size, ``FixedSizeCrop`` (random crop, then pad).
- :class:`SemanticCrop`: ADE20K (``MaskFormerSemanticDatasetMapper``): ``ResizeShortestEdge``
  to a choice of 0.5..2.0 x size, ``RandomCrop_CategoryAreaConstraint``, SSD colour
  augmentation, flip, pad.
- :class:`ResizePad`: evaluation: longest side to ``size``, then pad to a square; the
  sample's ``image_size`` is the size before the padding.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

LABEL_KEYS = ("sem_seg", "pan_seg")
PAD_VALUES = {"image": 128, "sem_seg": 255, "pan_seg": 0}


def resize(sample: Dict, h: int, w: int) -> Dict:
    """Image bilinear (antialiased when shrinking), label maps nearest (pixel centres)."""
    out = dict(sample)
    H, W = sample["image"].shape[-2:]
    if (H, W) == (h, w):
        return out
    img = sample["image"].float()[None]
    img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False, antialias=h < H or w < W)
    out["image"] = img[0].round_().clamp_(0, 255).to(torch.uint8)
    rows = ((torch.arange(h) + 0.5) * (H / h)).long().clamp_(max=H - 1)
    cols = ((torch.arange(w) + 0.5) * (W / w)).long().clamp_(max=W - 1)
    for key in LABEL_KEYS:
        if key in sample:
            out[key] = sample[key][rows][:, cols]
    return out


def crop(sample: Dict, top: int, left: int, h: int, w: int) -> Dict:
    out = dict(sample)
    for key in ("image",) + LABEL_KEYS:
        if key in sample:
            out[key] = sample[key][..., top:top + h, left:left + w].contiguous()
    return out


def pad(sample: Dict, h: int, w: int) -> Dict:
    """Pad on the bottom / right to at least [h, w]."""
    out = dict(sample)
    H, W = sample["image"].shape[-2:]
    padding = (0, max(w - W, 0), 0, max(h - H, 0))
    if padding == (0, 0, 0, 0):
        return out
    for key in ("image",) + LABEL_KEYS:
        if key in sample:
            out[key] = F.pad(sample[key], padding, value=PAD_VALUES[key])
    return out


def hflip(sample: Dict) -> Dict:
    out = dict(sample)
    for key in ("image",) + LABEL_KEYS:
        if key in sample:
            out[key] = sample[key].flip(-1)
    return out


def random_crop(sample: Dict, h: int, w: int, rng: np.random.Generator) -> Dict:
    """A uniformly placed crop of at most [h, w] (detectron2 RandomCrop 'absolute')."""
    H, W = sample["image"].shape[-2:]
    ch, cw = min(h, H), min(w, W)
    return crop(sample, int(rng.integers(H - ch + 1)), int(rng.integers(W - cw + 1)), ch, cw)


class LargeScaleJitter:
    """COCO LSJ: flip (p=0.5), scale the image to fit ``uniform(min_scale, max_scale) * size``,
    crop a random ``size`` x ``size`` window and pad to it."""

    def __init__(self, size: int, min_scale: float = 0.1, max_scale: float = 2.0, flip: bool = True):
        self.size, self.min_scale, self.max_scale, self.flip = size, min_scale, max_scale, flip

    def __call__(self, sample: Dict, rng: np.random.Generator) -> Dict:
        if self.flip and rng.random() < 0.5:
            sample = hflip(sample)
        H, W = sample["image"].shape[-2:]
        target = self.size * rng.uniform(self.min_scale, self.max_scale)
        scale = min(target / H, target / W)  # ResizeScale keeps the aspect ratio
        sample = resize(sample, max(1, round(H * scale)), max(1, round(W * scale)))
        h, w = sample["image"].shape[-2:]
        # FixedSizeCrop: offset = round(uniform(0, max_offset))
        top = int(round(rng.uniform(0, max(h - self.size, 0))))
        left = int(round(rng.uniform(0, max(w - self.size, 0))))
        sample = crop(sample, top, left, min(self.size, h), min(self.size, w))
        return pad(sample, self.size, self.size)


class SemanticCrop:
    """ADE20K recipe: shortest edge to a choice of ``int(x * 0.1 * size)`` for x in 5..20
    (longest edge at most ``4 * size``), a ``size`` crop with at most
    ``single_category_max_area`` of it one class (10 tries), colour augmentation, flip, pad."""

    def __init__(self, size: int, single_category_max_area: float = 1.0, ignore_label: int = 255,
                 color_aug: bool = True, flip: bool = True):
        self.size = size
        self.short_edges = [int(x * 0.1 * size) for x in range(5, 21)]
        self.max_size = 4 * size
        self.single_category_max_area, self.ignore_label = single_category_max_area, ignore_label
        self.color_aug, self.flip = color_aug, flip

    def __call__(self, sample: Dict, rng: np.random.Generator) -> Dict:
        H, W = sample["image"].shape[-2:]
        short = self.short_edges[int(rng.integers(len(self.short_edges)))]
        scale = short / min(H, W)
        if max(H, W) * scale > self.max_size:
            scale = self.max_size / max(H, W)
        sample = resize(sample, int(H * scale + 0.5), int(W * scale + 0.5))
        sample = self._crop(sample, rng)
        if self.color_aug:
            sample = dict(sample, image=color_aug_ssd(sample["image"], rng))
        if self.flip and rng.random() < 0.5:
            sample = hflip(sample)
        return pad(sample, self.size, self.size)

    def _crop(self, sample: Dict, rng: np.random.Generator) -> Dict:
        if self.single_category_max_area >= 1.0:
            return random_crop(sample, self.size, self.size, rng)
        for _ in range(10):
            cropped = random_crop(sample, self.size, self.size, rng)
            _, counts = torch.unique(cropped["sem_seg"][cropped["sem_seg"] != self.ignore_label], return_counts=True)
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.single_category_max_area:
                break
        return cropped


class ResizePad:
    """Evaluation: longest side to ``size`` (aspect kept), then pad to ``size`` x ``size``;
    ``image_size`` = (h, w) before the padding, which evaluation crops away."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, sample: Dict, rng: Optional[np.random.Generator] = None) -> Dict:
        H, W = sample["image"].shape[-2:]
        scale = self.size / max(H, W)
        h, w = max(1, round(H * scale)), max(1, round(W * scale))
        sample = pad(resize(sample, h, w), self.size, self.size)
        sample["image_size"] = (h, w)
        return sample


def color_aug_ssd(image: torch.Tensor, rng: np.random.Generator, brightness_delta: float = 32,
                  contrast: Sequence[float] = (0.5, 1.5), saturation: Sequence[float] = (0.5, 1.5),
                  hue_delta: int = 18) -> torch.Tensor:
    """Mask2Former's ``ColorAugSSDTransform`` on uint8 [3, H, W]: brightness, then contrast
    before or after the HSV saturation and hue changes, each applied with p=0.5."""
    img = image.permute(1, 2, 0).numpy().astype(np.float32)

    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x * alpha + beta, 0, 255)

    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        img = convert(img, alpha=rng.uniform(*contrast))
    do_sat, do_hue = rng.integers(2), rng.integers(2)
    if do_sat or do_hue:
        hsv = rgb_to_hsv(img / 255.0)
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*saturation), 0, 1)
        if do_hue:  # OpenCV hue is in 0..180
            hsv[..., 0] = (hsv[..., 0] + rng.integers(-hue_delta, hue_delta + 1) / 180.0) % 1.0
        img = hsv_to_rgb(hsv) * 255.0
    if not contrast_first and rng.integers(2):
        img = convert(img, alpha=rng.uniform(*contrast))
    return torch.from_numpy(np.round(img).clip(0, 255).astype(np.uint8)).permute(2, 0, 1).contiguous()

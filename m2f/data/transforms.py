"""Augmentations of a sample's image and label maps (the official Mask2Former recipes).

Every transform takes a sample dict (``image`` uint8 [3, H, W]; optional ``sem_seg`` and
``pan_seg`` int64 [H, W]) and a ``numpy.random.Generator``, and returns a new dict with
the same geometry applied to all three. Pads: image 128 (detectron2's FixedSizeCrop),
``sem_seg`` 255 (ignore), ``pan_seg`` 0 (void; detectron2 pads the RGB panoptic PNG with
255, an id no segment has, so the targets are the same).

- :class:`LargeScaleJitter`: COCO LSJ (``COCOPanopticNewBaselineDatasetMapper``): flip,
  ``ResizeScale(0.1, 2.0)`` to the target size, ``FixedSizeCrop`` (random crop, then pad).
- :class:`SemanticCrop`: ADE20K (``MaskFormerSemanticDatasetMapper``): ``ResizeShortestEdge``
  to a choice of 0.5..2.0 x size, ``RandomCrop_CategoryAreaConstraint``, SSD colour
  augmentation, flip, pad.
- :class:`ResizePad`: evaluation (``m2f.evaluate --protocol fixed``): longest side to
  ``size``, then pad to a square; the sample's ``image_size`` is the size before the padding.
- :class:`ResizeShortestEdge`: evaluation (``--protocol official``): detectron2's test
  resize of the image alone; the label maps keep the original resolution (``output_size``).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from PIL import Image

LABEL_KEYS = ("sem_seg", "pan_seg")
PAD_VALUES = {"image": 128, "sem_seg": 255, "pan_seg": 0}


def resize(sample: Dict, h: int, w: int, labels: str = "pil") -> Dict:
    """Resize as detectron2's ``ResizeTransform``, which resizes uint8 arrays with PIL and
    other arrays with ``F.interpolate``: the image (uint8) with PIL BILINEAR (antialiased
    when shrinking); label maps nearest, by ``labels``:

    - ``"pil"``: PIL NEAREST, as the COCO mapper resizes the uint8 RGB panoptic PNG;
    - ``"torch"``: ``F.interpolate(mode="nearest")``, source pixel ``floor(dst * in / out)``,
      as the semantic mapper resizes its float64 label map (up to one source pixel off the
      pixel centres when shrinking).
    """
    if labels not in ("pil", "torch"):
        raise ValueError(f"labels must be 'pil' or 'torch', got {labels!r}")
    out = dict(sample)
    H, W = sample["image"].shape[-2:]
    if (H, W) == (h, w):
        return out
    img = Image.fromarray(sample["image"].permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR)
    out["image"] = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    for key in LABEL_KEYS:
        if key in sample:
            out[key] = _resize_nearest(sample[key], h, w, labels)
    return out


def _resize_nearest(label: torch.Tensor, h: int, w: int, method: str) -> torch.Tensor:
    if method == "torch":
        return F.interpolate(label[None, None].double(), size=(h, w), mode="nearest")[0, 0].to(label.dtype)
    lo, hi = int(label.min()), int(label.max())
    if lo < 0 or hi >= 256 ** 3:
        raise ValueError(f"label values must lie in [0, 2**24) for PIL resizing, got [{lo}, {hi}]")
    # NEAREST picks the same source pixel in every mode: a 32-bit "I" image of the ids
    # resizes as the RGB PNG does, without packing the ids into channels and back
    ids = label.numpy().astype(np.uint8 if hi < 256 else np.int32)
    return torch.from_numpy(np.array(Image.fromarray(ids).resize((w, h), Image.NEAREST))).to(label.dtype)


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
    crop a random ``size`` x ``size`` window and pad to it.

    As detectron2's ``FixedSizeCrop``, one uniform draw places the crop on both axes (the
    offsets are the same fraction of their ranges). The output side is at least 1 pixel
    (detectron2 would fail on a side rounded to 0)."""

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
        # FixedSizeCrop: offset = round(max_offset * u), one u for both axes
        u = rng.uniform(0.0, 1.0)
        top, left = int(np.round(max(h - self.size, 0) * u)), int(np.round(max(w - self.size, 0) * u))
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
        sample = resize(sample, *shortest_edge_size(H, W, short, self.max_size), labels="torch")
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
            if len(counts) > 1 and counts.max().item() < counts.sum().item() * self.single_category_max_area:
                break
        return cropped


def shortest_edge_size(H: int, W: int, short: int, max_size: int):
    """detectron2's ``ResizeShortestEdge.get_output_shape``: (h, w) with the short side
    ``short``, scaled down so that the long side is at most ``max_size``, in its float steps."""
    scale = short / min(H, W)
    h, w = (float(short), scale * W) if H < W else (scale * H, float(short))
    if max(h, w) > max_size:
        scale = max_size / max(h, w)
        h, w = h * scale, w * scale
    return int(h + 0.5), int(w + 0.5)


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


class ResizeShortestEdge:
    """Evaluation, the official protocol (detectron2's test ``ResizeShortestEdge(short,
    max_size)``, PIL bilinear): the image's shortest side to ``short``, the longest at most
    ``max_size``; the label maps stay at the original resolution, where predictions are
    compared. ``image_size`` = the resized (h, w), ``output_size`` = the original (H, W)."""

    def __init__(self, short: int, max_size: int):
        self.short, self.max_size = short, max_size

    def __call__(self, sample: Dict, rng: Optional[np.random.Generator] = None) -> Dict:
        H, W = sample["image"].shape[-2:]
        h, w = shortest_edge_size(H, W, self.short, self.max_size)
        out = dict(sample, image=resize({"image": sample["image"]}, h, w)["image"])
        out["image_size"], out["output_size"] = (h, w), (H, W)
        return out


def color_aug_ssd(image: torch.Tensor, rng: np.random.Generator, brightness_delta: float = 32,
                  contrast: Sequence[float] = (0.5, 1.5), saturation: Sequence[float] = (0.5, 1.5),
                  hue_delta: int = 18) -> torch.Tensor:
    """Mask2Former's ``ColorAugSSDTransform`` on uint8 [3, H, W]: brightness, then contrast
    before or after the saturation and hue changes, each applied with p=0.5; every step
    returns uint8 (brightness, contrast: truncated as ``astype(uint8)``; the HSV steps:
    rounded). The HSV round trips are float (matplotlib), where OpenCV quantizes hue to 180
    and saturation to 256 levels: those steps differ by a few levels at most."""
    img = image.permute(1, 2, 0).numpy()

    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def brightness(x):
        return convert(x, beta=rng.uniform(-brightness_delta, brightness_delta)) if rng.integers(2) else x

    def contrast_(x):
        return convert(x, alpha=rng.uniform(*contrast)) if rng.integers(2) else x

    def saturation_(x):
        if not rng.integers(2):
            return x
        hsv = rgb_to_hsv(x / 255.0)
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*saturation), 0, 1)
        return np.round(hsv_to_rgb(hsv) * 255.0).astype(np.uint8)

    def hue(x):
        if not rng.integers(2):
            return x
        hsv = rgb_to_hsv(x / 255.0)  # OpenCV hue is in 0..180
        hsv[..., 0] = (hsv[..., 0] + rng.integers(-hue_delta, hue_delta + 1) / 180.0) % 1.0
        return np.round(hsv_to_rgb(hsv) * 255.0).astype(np.uint8)

    img = brightness(img)
    if rng.integers(2):
        img = hue(saturation_(contrast_(img)))
    else:
        img = contrast_(hue(saturation_(img)))
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).clone(memory_format=torch.contiguous_format)

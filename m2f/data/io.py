"""Image and label-map files (PIL, which matplotlib already depends on).

Every file is read as detectron2's ``read_image`` reads it: oriented by its EXIF
orientation tag (where it has one) before anything else.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps


def _oriented(im: Image.Image) -> Image.Image:
    """``im`` turned upright by its EXIF orientation tag (2-8), as detectron2 does; as is
    without one (or with an unreadable EXIF block, which detectron2 also ignores)."""
    try:
        orientation = im.getexif().get(0x0112)
    except Exception:
        return im
    return ImageOps.exif_transpose(im) if orientation in range(2, 9) else im


def read_image(path: Path) -> torch.Tensor:
    """RGB image file -> uint8 [3, H, W]."""
    with Image.open(path) as im:
        return torch.from_numpy(np.array(_oriented(im).convert("RGB"))).permute(2, 0, 1).contiguous()


def read_label_png(path: Path) -> torch.Tensor:
    """Single-channel (L or P mode) label PNG -> int64 [H, W] raw values."""
    with Image.open(path) as im:
        return torch.from_numpy(np.array(_oriented(im)).astype(np.int64))


def read_panoptic_png(path: Path) -> torch.Tensor:
    """COCO panoptic PNG -> int64 [H, W] segment ids, id = R + 256 G + 256^2 B (panopticapi rgb2id)."""
    with Image.open(path) as im:
        rgb = np.array(_oriented(im).convert("RGB")).astype(np.int64)
    return torch.from_numpy(rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2])


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """int [H, W] segment ids -> uint8 [H, W, 3] (panopticapi id2rgb), for writing panoptic PNGs."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 256 ** 2 % 256], axis=-1).astype(np.uint8)

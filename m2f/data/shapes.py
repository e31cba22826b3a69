"""``shapes``: a panoptic dataset generated on the fly (no files), deterministic per (seed, split, index).

Stuff: the background is split into horizontal bands, vertical bands or Voronoi cells,
each painted as one of three textured, muted "stuff" classes (cells of one class merge
into one segment, as panoptic stuff does). Things: 1-4 circles, squares and triangles
of bright colours (hue range per class), random sizes and rotations, painted in order,
so later ones occlude earlier ones; they may leave the image. An instance left with too little visible area is
dropped before painting, so every labelled instance is clearly visible.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from matplotlib.colors import hsv_to_rgb
from torch.utils.data import Dataset

from .sample import DatasetInfo, finalize

THING_CLASSES = ("circle", "square", "triangle")
STUFF_CLASSES = ("sky", "grass", "wall")
INFO = DatasetInfo("shapes", THING_CLASSES + STUFF_CLASSES, frozenset(range(len(THING_CLASSES))), panoptic=True)
SPLITS = ("train", "val", "test")
DEFAULT_LENGTH = {"train": 100_000, "val": 100, "test": 100}

# bright colours from a hue range per class (warm circles, green-cyan squares, blue-magenta
# triangles): colour and shape both tell the class, so small models learn it in minutes
THING_HUES = ((-0.04, 0.14), (0.25, 0.5), (0.58, 0.8))
MAX_THINGS = 4
MIN_VISIBLE_FRACTION = 0.35  # of the instance's in-image area
MIN_VISIBLE_PIXELS = 12


class ShapesDataset(Dataset):
    """``dataset[i]`` (or ``dataset[(i, epoch)]``; the epoch is ignored) -> a sample (see
    :mod:`m2f.data.sample`) of ``image_size`` x ``image_size`` pixels."""

    info = INFO

    def __init__(self, split: str = "train", image_size: int = 64, seed: int = 0, length: Optional[int] = None):
        if split not in SPLITS:
            raise ValueError(f"shapes split must be one of {SPLITS}, got {split!r}")
        self.split, self.image_size, self.seed = split, image_size, seed
        self.length = DEFAULT_LENGTH[split] if length is None else length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Dict:
        index = key[0] if isinstance(key, tuple) else key
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        image, pan, segments = render(rng, self.image_size)
        sample = {
            "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            "pan_seg": torch.from_numpy(pan),
            "segments": segments,
            "index": index,
        }
        return finalize(sample, INFO)


def render(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    """-> (image uint8 [S, S, 3], panoptic ids int64 [S, S] (no void), segments)."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size  # pixel centres in [0, 1]
    image = np.zeros((size, size, 3), np.float32)
    pan = np.zeros((size, size), np.int64)
    segments: List[Dict] = []

    region_class = _stuff_layout(rng, xx, yy)
    for k, name in enumerate(STUFF_CLASSES):
        area = region_class == k
        if area.any():
            image[area] = _stuff_texture(rng, name, xx, yy, size)[area]
            segments.append({"id": len(segments) + 1, "category_id": len(THING_CLASSES) + k,
                             "isthing": False, "iscrowd": 0})
            pan[area] = segments[-1]["id"]

    things = [_thing(rng, xx, yy) for _ in range(int(rng.integers(1, MAX_THINGS + 1)))]
    things = _drop_hidden(things)
    for category, mask, color in things:
        shade = 1.0 - 0.2 * np.clip((yy - yy[mask].min()) / 0.5, 0, 1)  # a little top-down shading
        image[mask] = (color[None, None] * shade[..., None])[mask]
        segments.append({"id": len(segments) + 1, "category_id": category, "isthing": True, "iscrowd": 0})
        pan[mask] = segments[-1]["id"]

    image += rng.normal(0.0, 6.0, image.shape).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), pan, segments


def _stuff_layout(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """int [S, S] stuff class index per pixel: bands (horizontal or vertical) or Voronoi cells."""
    n = int(rng.integers(2, 5))
    classes = rng.integers(0, len(STUFF_CLASSES), n)
    kind = rng.integers(3)
    if kind < 2:  # bands with random borders
        coord = yy if kind == 0 else xx
        borders = np.sort(rng.uniform(0.15, 0.85, n - 1))
        return classes[np.searchsorted(borders, coord)]
    sites = rng.uniform(0, 1, (n, 2))
    dist = (xx[None] - sites[:, 0, None, None]) ** 2 + (yy[None] - sites[:, 1, None, None]) ** 2
    return classes[dist.argmin(0)]


def _stuff_texture(rng: np.random.Generator, name: str, xx, yy, size: int) -> np.ndarray:
    """float [S, S, 3]: a muted colour with the class's texture (gradient, grain or bricks)."""
    jitter = rng.uniform(-12, 12, 3)
    if name == "sky":  # pale blue-grey vertical gradient
        base = np.array([150.0, 170.0, 200.0]) + jitter
        return base[None, None] * (0.85 + 0.3 * yy[..., None])
    if name == "grass":  # olive with coarse grain
        base = np.array([110.0, 130.0, 90.0]) + jitter
        grain = rng.normal(0, 14, (size // 2 + 1, size // 2 + 1)).repeat(2, 0).repeat(2, 1)[:size, :size]
        return base[None, None] + grain[..., None]
    period = max(4, size // 12)  # "wall": brown-grey bricks (dark mortar lines)
    base = np.array([140.0, 115.0, 105.0]) + jitter
    row = np.floor(yy * size / period)
    mortar = ((yy * size) % period < 1) | (((xx * size + (row % 2) * period) % (2 * period)) < 1)
    return base[None, None] * np.where(mortar, 0.6, 1.0)[..., None]


def _thing(rng: np.random.Generator, xx, yy) -> Tuple[int, np.ndarray, np.ndarray]:
    """(class, full in-image mask bool [S, S], RGB colour) of one random shape."""
    category = int(rng.integers(len(THING_CLASSES)))
    cx, cy = rng.uniform(0.0, 1.0, 2)
    r = rng.uniform(0.1, 0.25)
    theta = rng.uniform(0, 2 * np.pi)
    u, v = xx - cx, yy - cy
    if category == 0:
        mask = u ** 2 + v ** 2 <= r ** 2
    else:
        c, s = np.cos(theta), np.sin(theta)
        ur, vr = c * u + s * v, -s * u + c * v
        if category == 1:
            half = 0.85 * r
            mask = (np.abs(ur) <= half) & (np.abs(vr) <= half)
        else:  # equilateral triangle of circumradius 1.15 r: three half-planes
            R = 1.15 * r
            mask = np.ones_like(u, dtype=bool)
            for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
                mask &= ur * np.cos(a) + vr * np.sin(a) >= -R / 2
    hue = rng.uniform(*THING_HUES[category]) % 1.0
    color = hsv_to_rgb([hue, rng.uniform(0.65, 1.0), rng.uniform(0.75, 1.0)]) * 255.0
    return category, mask, color.astype(np.float32)


def _drop_hidden(things: List[Tuple[int, np.ndarray, np.ndarray]]) -> List[Tuple[int, np.ndarray, np.ndarray]]:
    """Remove instances that later ones (or the border) leave barely visible; returns the kept
    instances with their *visible* masks, in painting order."""
    while True:
        visible, covered = [], np.zeros_like(things[0][1]) if things else None
        for category, mask, color in reversed(things):
            visible.append((category, mask & ~covered, color, mask.sum()))
            covered = covered | mask
        visible.reverse()
        bad = [i for i, (_, vis, _, full) in enumerate(visible)
               if vis.sum() < max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * full)]
        if not bad:
            return [(c, vis, color) for c, vis, color, _ in visible]
        things = [t for i, t in enumerate(things) if i != bad[0]]

"""COCO panoptic (panopticapi format): a JSON of annotations plus one PNG of segment ids per image.

Layout under ``root`` (detectron2's ``datasets/coco``)::

    annotations/panoptic_{split}2017.json
    annotations/panoptic_{split}2017/*.png     (or panoptic_{split}2017/*.png)
    {split}2017/*.jpg

Category ids are mapped to contiguous ids in the JSON's sorted order; ``isthing`` comes
from the categories. Training uses the official LSJ recipe, evaluation ``test_transform`` (default
:class:`ResizePad`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
from torch.utils.data import Dataset

from .io import read_image, read_panoptic_png
from .sample import DatasetInfo, finalize
from .transforms import LargeScaleJitter, ResizePad


def _first_existing(what: str, *paths: Path) -> Path:
    for p in paths:
        if p.exists():
            return p
    raise FileNotFoundError(f"coco_panoptic: no {what}: expected {' or '.join(str(p) for p in paths)}")


class COCOPanoptic(Dataset):
    """``dataset[(index, epoch)]`` or ``dataset[index]`` -> a panoptic sample of ``image_size``^2 pixels
    (evaluation with a ``test_transform``: of the size it gives)."""

    def __init__(self, root: Union[str, Path], split: str = "train", image_size: int = 1024, seed: int = 0,
                 augment: Optional[bool] = None, max_images: Optional[int] = None,
                 test_transform: Optional[Callable] = None):
        root = Path(root)
        json_path = _first_existing(f"{split} annotation file", root / "annotations" / f"panoptic_{split}2017.json")
        self.png_dir = _first_existing(f"{split} panoptic PNG folder", root / "annotations" / f"panoptic_{split}2017",
                                       root / f"panoptic_{split}2017")
        self.image_dir = _first_existing(f"{split} image folder", root / f"{split}2017")
        try:
            with open(json_path) as f:
                data = json.load(f)
            data["categories"], data["images"], data["annotations"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"coco_panoptic: {json_path} is not a COCO panoptic annotation file ({e!r})") from None
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_map = {c["id"]: i for i, c in enumerate(categories)}
        self.info = DatasetInfo("coco_panoptic", tuple(c["name"] for c in categories),
                                frozenset(i for i, c in enumerate(categories) if c.get("isthing", 1)), panoptic=True)
        images = {im["id"]: im["file_name"] for im in data["images"]}
        self.records = [(images[a["image_id"]], a["file_name"], a["segments_info"])
                        for a in data["annotations"]][:max_images]
        self.seed = seed
        augment = split == "train" if augment is None else augment
        self.transform = LargeScaleJitter(image_size) if augment else (test_transform or ResizePad(image_size))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image_file, png_file, segments_info = self.records[index]
        segments = [{"id": s["id"], "category_id": self.category_map[s["category_id"]],
                     "isthing": self.category_map[s["category_id"]] in self.info.thing_ids,
                     "iscrowd": int(s.get("iscrowd", 0))} for s in segments_info]
        sample = {"image": read_image(self.image_dir / image_file),
                  "pan_seg": read_panoptic_png(self.png_dir / png_file), "segments": segments, "index": index}
        sample = self.transform(sample, np.random.default_rng([self.seed, epoch, index]))
        return finalize(sample, self.info)

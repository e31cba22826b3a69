"""ADE20K-style semantic segmentation folders (``ADEChallengeData2016``).

Layout under ``root``::

    images/{training,validation}/NAME.jpg
    annotations/{training,validation}/NAME.png    (uint8 labels, 0 = "other" -> ignored)

Label ``c`` >= 1 becomes class ``c - 1``; 0 becomes 255 (ignore). ``split`` 'train' / 'val'
select 'training' / 'validation'. Training uses the official crop recipe
(:class:`SemanticCrop`), evaluation ``test_transform`` (default :class:`ResizePad`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
from torch.utils.data import Dataset

from .io import read_image, read_label_png
from .sample import IGNORE_LABEL, DatasetInfo, finalize
from .transforms import ResizePad, SemanticCrop

SPLIT_DIRS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class ADE20K(Dataset):
    """``dataset[(index, epoch)]`` or ``dataset[index]`` -> a semantic sample of ``image_size``^2 pixels
    (evaluation with a ``test_transform``: of the size it gives)."""

    def __init__(self, root: Union[str, Path], split: str = "train", image_size: int = 512, seed: int = 0,
                 num_classes: int = 150, augment: Optional[bool] = None, max_images: Optional[int] = None,
                 test_transform: Optional[Callable] = None):
        if split not in SPLIT_DIRS:
            raise ValueError(f"ADE20K split must be one of {sorted(SPLIT_DIRS)}, got {split!r}")
        root = Path(root)
        image_dir = root / "images" / SPLIT_DIRS[split]
        label_dir = root / "annotations" / SPLIT_DIRS[split]
        for what, folder in (("image", image_dir), ("annotation", label_dir)):
            if not folder.is_dir():
                raise FileNotFoundError(f"ade20k: no {split} {what} folder: expected {folder} (and "
                                        f"{label_dir if what == 'image' else image_dir})")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_images]
        self.records = [(p, label_dir / (p.stem + ".png")) for p in images]
        missing = [str(lab) for _, lab in self.records if not lab.exists()]
        if missing:
            raise FileNotFoundError(f"ade20k: {len(missing)} annotation PNGs missing, e.g. {missing[0]} (one per "
                                    f"image in {image_dir})")
        self.info = DatasetInfo("ade20k", tuple(f"class{i + 1}" for i in range(num_classes)), frozenset(),
                                panoptic=False)
        self.seed = seed
        augment = SPLIT_DIRS[split] == "training" if augment is None else augment
        self.transform = SemanticCrop(image_size) if augment else (test_transform or ResizePad(image_size))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image_path, label_path = self.records[index]
        raw = read_label_png(label_path)
        sem = raw - 1
        sem[(raw == 0) | (sem >= self.info.num_classes)] = IGNORE_LABEL
        sample = {"image": read_image(image_path), "sem_seg": sem, "index": index}
        sample = self.transform(sample, np.random.default_rng([self.seed, epoch, index]))
        return finalize(sample, self.info)

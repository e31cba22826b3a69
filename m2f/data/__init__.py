"""Datasets for training and evaluation: the built-in ``shapes`` and two real formats.

    from m2f.data import build_dataset, collate
    ds = build_dataset("shapes", root=None, split="train", image_size=64, seed=0)
    ds.info.num_classes, ds.info.thing_ids      # class metadata (DatasetInfo)
    sample = ds[0]                               # see m2f.data.sample for the fields

Every dataset accepts ``dataset[(index, epoch)]`` keys from :class:`StreamSampler`, which
seed its augmentation, so the data of a run is a pure function of its seed and step.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

from torch.utils.data import Dataset

from .sample import IGNORE_LABEL, VOID, DatasetInfo, collate
from .sampler import ShardSampler, StreamSampler

DATASETS = ("shapes", "coco_panoptic", "ade20k")
PROTOCOLS = ("fixed", "official")
# what a data root holds, for the messages when it does not
LAYOUTS = {
    "coco_panoptic": "annotations/panoptic_{split}2017.json, annotations/panoptic_{split}2017/*.png and "
                     "{split}2017/*.jpg (detectron2's datasets/coco)",
    "ade20k": "images/{training,validation}/*.jpg and annotations/{training,validation}/*.png "
              "(ADEChallengeData2016)",
}


def official_test_size(name: str, image_size: int) -> Optional[Tuple[int, int]]:
    """(MIN_SIZE_TEST, MAX_SIZE_TEST) of the official configs: COCO 800 / 1333 (detectron2's
    defaults, which the COCO configs keep); ADE20K the training crop and 4x it, as every ADE20K
    config (512 / 2048; 640 / 2560 in the Swin-B/L res640 ones); None for ``shapes``, whose
    images are generated at ``image_size`` and evaluated at that size."""
    if name == "coco_panoptic":
        return 800, 1333
    if name == "ade20k":
        return image_size, 4 * image_size
    return None


def build_dataset(name: str, root: Optional[str] = None, split: str = "train", image_size: int = 64,
                  seed: int = 0, length: Optional[int] = None, protocol: str = "fixed") -> Dataset:
    """A dataset by name; ``root`` is its folder (unused by ``shapes``), ``length`` caps
    the number of images (the shapes dataset's size; the first ``length`` files otherwise).
    ``protocol``: how a split that is not augmented (evaluation) is resized: 'fixed'
    (:class:`~m2f.data.transforms.ResizePad` to ``image_size``) or 'official'
    (:class:`~m2f.data.transforms.ResizeShortestEdge` to :func:`official_test_size`, label
    maps at the original resolution)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; choose one of {PROTOCOLS}")
    if name == "shapes":
        from .shapes import ShapesDataset

        return ShapesDataset(split, image_size, seed, length)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    layout = LAYOUTS[name].replace("{split}", split)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a data root (--data-root) holding {layout}")
    if not os.path.isdir(root):
        what = "is not a folder" if os.path.exists(root) else "does not exist"
        raise FileNotFoundError(f"{name} data root {root} {what}; it should hold {layout}")
    test_transform = None
    if protocol == "official":
        from .transforms import ResizeShortestEdge

        test_transform = ResizeShortestEdge(*official_test_size(name, image_size))
    if name == "coco_panoptic":
        from .coco_panoptic import COCOPanoptic

        return COCOPanoptic(root, split, image_size, seed, max_images=length, test_transform=test_transform)
    from .ade20k import ADE20K

    return ADE20K(root, split, image_size, seed, max_images=length, test_transform=test_transform)


__all__ = ["build_dataset", "official_test_size", "collate", "DatasetInfo", "StreamSampler", "ShardSampler",
           "DATASETS", "PROTOCOLS", "IGNORE_LABEL", "VOID"]

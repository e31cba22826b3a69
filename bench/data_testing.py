"""Fake COCO panoptic and ADE20K folders in the datasets' own layouts, for the data and
evaluation tests and ``bench.data_speed`` (which writes them at realistic sizes)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from m2f.data.io import id2rgb


def fixture_sizes(rng, n, sizes=None):
    """``sizes``, or ``n`` random (h, w) in 40..79."""
    return sizes or [(int(rng.integers(40, 80)), int(rng.integers(40, 80))) for _ in range(n)]


def write_coco_fixture(root: Path, rng, n_images=(3, 2), val_sizes=None, extra_things=0):
    """COCO panoptic folders: 2 thing categories (ids 1, 7), 1 stuff (id 100), one crowd;
    ``val_sizes``: the (h, w) of each val image (default: ``n_images[1]`` random sizes);
    ``extra_things``: that many more thing segments per image, random rectangles painted on top
    (a realistic segment count for ``bench.data_speed``)."""
    categories = [{"id": 1, "name": "person", "isthing": 1}, {"id": 7, "name": "car", "isthing": 1},
                  {"id": 100, "name": "sky", "isthing": 0}]
    for split, n in zip(("train", "val"), n_images):
        (root / f"{split}2017").mkdir(parents=True)
        (root / "annotations" / f"panoptic_{split}2017").mkdir(parents=True)
        images, annotations = [], []
        for i, (h, w) in enumerate(fixture_sizes(rng, n, val_sizes if split.startswith("val") else None)):
            ids = np.zeros((h, w), np.int64)
            sky, person, car, crowd = 5_000_001 + i, 300 + i, 70_000 + i, 12
            ids[: h // 2] = sky
            ids[h // 2:, : w // 3] = person
            ids[h // 2:, w // 3: 2 * w // 3] = car
            ids[h // 2:, 2 * w // 3:] = crowd  # the rest of the bottom: a crowd of persons
            ids[-3:] = 0  # a void strip
            extra = []
            for k in range(extra_things):
                seg_id, y, x = 1_000_000 + 1000 * i + k, int(rng.integers(h)), int(rng.integers(w))
                ids[y:y + int(rng.integers(1, h // 3 + 2)), x:x + int(rng.integers(1, w // 3 + 2))] = seg_id
                extra.append({"id": seg_id, "category_id": (1, 7)[k % 2], "iscrowd": 0})
            name = f"{i:012d}"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{split}2017" / f"{name}.jpg")
            Image.fromarray(id2rgb(ids)).save(root / "annotations" / f"panoptic_{split}2017" / f"{name}.png")
            images.append({"id": i, "file_name": f"{name}.jpg", "height": h, "width": w})
            annotations.append({"image_id": i, "file_name": f"{name}.png", "segments_info": [
                {"id": sky, "category_id": 100, "iscrowd": 0}, {"id": person, "category_id": 1, "iscrowd": 0},
                {"id": car, "category_id": 7, "iscrowd": 0}, {"id": crowd, "category_id": 1, "iscrowd": 1}] + extra})
        with open(root / "annotations" / f"panoptic_{split}2017.json", "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def write_ade_fixture(root: Path, rng, n_images=(3, 2), val_sizes=None):
    """ADE20K folders: labels 0 (ignored) .. 4; ``val_sizes`` as in :func:`write_coco_fixture`."""
    for split, n in zip(("training", "validation"), n_images):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i, (h, w) in enumerate(fixture_sizes(rng, n, val_sizes if split.startswith("val") else None)):
            label = np.zeros((h, w), np.uint8)
            label[: h // 2] = 1
            label[h // 2:, : w // 2] = 3
            label[h // 2:, w // 2:] = 4
            label[:2] = 0
            name = f"ADE_{split}_{i:08d}"
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{name}.jpg")
            Image.fromarray(label).save(root / "annotations" / split / f"{name}.png")

"""What every dataset returns, and the ground truth derived from its label maps.

A sample is a dict:
  - ``image``: uint8 [3, H, W] RGB.
  - ``sem_seg``: int64 [H, W] contiguous class ids, ``ignore_label`` (255) where unlabelled.
  - ``pan_seg`` (panoptic datasets only): int64 [H, W] segment ids, 0 = void.
  - ``segments`` (panoptic datasets only): list of dict(id, category_id, isthing, iscrowd),
    the segments present in ``pan_seg``.
  - ``targets``: dict(labels int64 [T], masks bool [T, H, W]), the training targets (panoptic:
    every annotated non-crowd segment, with an empty mask where augmentation removed it).
  - ``index``: the dataset index.
  - ``image_size`` (evaluation samples): (h, w) of the image inside the bottom / right
    padding (absent: no padding).
  - ``output_size`` (evaluation samples of the official protocol): (H, W) of the label maps,
    the original resolution, at which predictions are compared (detectron2's "height" /
    "width"; absent: ``image_size``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Tuple

import torch

IGNORE_LABEL = 255
VOID = 0  # panoptic segment id of unlabelled pixels (panopticapi)


@dataclass(frozen=True)
class DatasetInfo:
    """Class names and which contiguous class ids are things (the rest are stuff)."""

    name: str
    class_names: Tuple[str, ...]
    thing_ids: FrozenSet[int]
    panoptic: bool  # panoptic / instance ground truth available (else semantic only)
    ignore_label: int = IGNORE_LABEL

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def stuff_ids(self) -> FrozenSet[int]:
        return frozenset(range(self.num_classes)) - self.thing_ids


def targets_from_panoptic(pan_seg: torch.Tensor, segments: List[Dict]) -> Dict[str, torch.Tensor]:
    """One target per non-crowd segment of ``segments``, in order, empty masks included (the
    official panoptic mapper): labels [T], masks bool [T, H, W]."""
    kept = [s for s in segments if not s["iscrowd"]]
    labels = torch.tensor([s["category_id"] for s in kept], dtype=torch.int64)
    ids = torch.tensor([s["id"] for s in kept], dtype=pan_seg.dtype)
    masks = pan_seg[None] == ids[:, None, None] if kept else pan_seg.new_zeros((0, *pan_seg.shape), dtype=torch.bool)
    return {"labels": labels, "masks": masks}


def targets_from_semantic(sem_seg: torch.Tensor, ignore_label: int = IGNORE_LABEL) -> Dict[str, torch.Tensor]:
    """One target per class present (the official semantic mapper): labels [T], masks bool [T, H, W]."""
    classes = torch.unique(sem_seg)
    classes = classes[classes != ignore_label]
    return {"labels": classes.to(torch.int64), "masks": sem_seg[None] == classes[:, None, None]}


def semantic_from_panoptic(pan_seg: torch.Tensor, segments: List[Dict],
                           ignore_label: int = IGNORE_LABEL) -> torch.Tensor:
    """int64 [H, W] class map of every segment (crowd included); void -> ``ignore_label``."""
    sem = torch.full_like(pan_seg, ignore_label)
    for s in segments:
        sem[pan_seg == s["id"]] = s["category_id"]
    return sem


def finalize(sample: Dict, info: DatasetInfo) -> Dict:
    """Attach ``targets`` and ``sem_seg``, and drop the segments no longer present.

    Panoptic targets are every annotated non-crowd segment, those a crop or resize removed
    included (an empty mask), as the official panoptic mapper builds them; ``segments``
    keeps the ones present in ``pan_seg``."""
    if info.panoptic:
        sample["targets"] = targets_from_panoptic(sample["pan_seg"], sample["segments"])
        present = set(torch.unique(sample["pan_seg"]).tolist())
        sample["segments"] = [s for s in sample["segments"] if s["id"] in present]
        sample["sem_seg"] = semantic_from_panoptic(sample["pan_seg"], sample["segments"], info.ignore_label)
    else:
        sample["targets"] = targets_from_semantic(sample["sem_seg"], info.ignore_label)
    return sample


def collate(samples: List[Dict]) -> Dict:
    """Batch same-sized samples: images uint8 [B, 3, H, W], sem_seg [B, H, W], pan_seg [B, H, W]
    (or None), and per-image lists ``targets``, ``segments`` (or None), ``index``,
    ``image_sizes`` ((h, w) without the padding), ``output_sizes`` ((H, W) the predictions
    are compared at: ``output_size``, else ``image_size``)."""
    sizes = [tuple(int(n) for n in s.get("image_size", s["image"].shape[-2:])) for s in samples]
    panoptic = "pan_seg" in samples[0]
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "sem_seg": torch.stack([s["sem_seg"] for s in samples]),
        "pan_seg": torch.stack([s["pan_seg"] for s in samples]) if panoptic else None,
        "segments": [s["segments"] for s in samples] if panoptic else None,
        "targets": [s["targets"] for s in samples],
        "index": [s["index"] for s in samples],
        "image_sizes": sizes,
        "output_sizes": [tuple(int(n) for n in s["output_size"]) if "output_size" in s else size
                         for s, size in zip(samples, sizes)],
    }

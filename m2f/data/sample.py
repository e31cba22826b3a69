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

import numpy as np
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


def segment_index(pan_seg: torch.Tensor, segments: List[Dict]) -> Tuple[np.ndarray, np.ndarray]:
    """``(slots, index)``: ``index`` [H, W] holds ``k + 1`` where ``pan_seg`` is the k-th distinct
    segment id of ``segments``, 0 elsewhere (void, ids no segment has); ``slots[i]`` is the
    value of ``segments[i]``'s pixels. One pass over the map for all the segments (a lookup
    table when the ids lie in [0, 2**24), as the PNG's RGB ids do), where a comparison per
    segment would read it once for each."""
    pan = pan_seg.numpy()
    ids = np.array([s["id"] for s in segments], dtype=np.int64)
    distinct, slots = np.unique(ids, return_inverse=True)
    slots = slots.reshape(-1) + 1
    dtype = np.min_scalar_type(len(distinct))
    if pan.size and 0 <= pan.min() and pan.max() < 256 ** 3:
        lut = np.zeros(int(pan.max()) + 1, dtype)  # zero pages: only the ones written are allocated
        inside = (distinct >= 0) & (distinct <= pan.max())
        lut[distinct[inside]] = np.arange(1, len(distinct) + 1)[inside]
        return slots, np.take(lut, pan)
    if not len(distinct):
        return slots, np.zeros(pan.shape, dtype)
    pos = np.searchsorted(distinct, pan).clip(max=len(distinct) - 1)
    return slots, np.where(distinct[pos] == pan, pos + 1, 0).astype(dtype)


def targets_from_panoptic(pan_seg: torch.Tensor, segments: List[Dict], index=None) -> Dict[str, torch.Tensor]:
    """One target per non-crowd segment of ``segments``, in order, empty masks included (the
    official panoptic mapper): labels [T], masks bool [T, H, W]. ``index``: the
    :func:`segment_index` of ``pan_seg`` and ``segments``, where the caller has it."""
    slots, index = segment_index(pan_seg, segments) if index is None else index
    kept = [i for i, s in enumerate(segments) if not s["iscrowd"]]
    labels = torch.tensor([segments[i]["category_id"] for i in kept], dtype=torch.int64)
    masks = np.empty((len(kept), *index.shape), dtype=bool)
    for mask, i in zip(masks, kept):
        np.equal(index, slots[i], out=mask)
    return {"labels": labels, "masks": torch.from_numpy(masks)}


def targets_from_semantic(sem_seg: torch.Tensor, ignore_label: int = IGNORE_LABEL) -> Dict[str, torch.Tensor]:
    """One target per class present (the official semantic mapper): labels [T], masks bool [T, H, W]."""
    classes = torch.unique(sem_seg)
    classes = classes[classes != ignore_label]
    return {"labels": classes.to(torch.int64), "masks": sem_seg[None] == classes[:, None, None]}


def semantic_from_panoptic(pan_seg: torch.Tensor, segments: List[Dict],
                           ignore_label: int = IGNORE_LABEL, index=None) -> torch.Tensor:
    """int64 [H, W] class map of every segment (crowd included; of two segments with one id,
    the later); void -> ``ignore_label``. ``index`` as in :func:`targets_from_panoptic`."""
    slots, index = segment_index(pan_seg, segments) if index is None else index
    classes = np.full(len(slots) + 1, ignore_label, dtype=pan_seg.numpy().dtype)  # by slot, at most len + 1
    for slot, s in zip(slots, segments):
        classes[slot] = s["category_id"]
    return torch.from_numpy(np.take(classes, index))


def finalize(sample: Dict, info: DatasetInfo) -> Dict:
    """Attach ``targets`` and ``sem_seg``, and drop the segments no longer present.

    Panoptic targets are every annotated non-crowd segment, those a crop or resize removed
    included (an empty mask), as the official panoptic mapper builds them; ``segments``
    keeps the ones present in ``pan_seg``."""
    if info.panoptic:
        segments = sample["segments"]
        index = segment_index(sample["pan_seg"], segments)
        sample["targets"] = targets_from_panoptic(sample["pan_seg"], segments, index)
        sample["sem_seg"] = semantic_from_panoptic(sample["pan_seg"], segments, info.ignore_label, index)
        counts = np.bincount(index[1].reshape(-1), minlength=len(index[0]) + 1)
        sample["segments"] = [s for s, slot in zip(segments, index[0]) if counts[slot]]
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

"""Targets in static shapes: every image's targets padded to one count, on the device.

The official criterion takes a list of per-image dicts of different lengths; everything
computed from it has data-dependent shapes (and the matcher leaves the device). The fused
criterion takes :class:`PaddedTargets` instead, so a training step has the same shapes every
time: no host sync, one torch.compile graph, one CUDA graph capture.
"""
from __future__ import annotations

import functools
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch


class PaddedTargets(NamedTuple):
    """labels [B, T] int64 (0 in padding slots); masks [B, T, H, W] bool (or the targets'
    dtype, promoted over the images that hold targets; 0 in padding);
    num_targets [B] int64: image b's targets are slots 0 .. num_targets[b] - 1."""

    labels: torch.Tensor
    masks: torch.Tensor
    num_targets: torch.Tensor

    def valid(self) -> torch.Tensor:
        """[B, T] bool: the slots that hold a target."""
        slots = torch.arange(self.labels.shape[1], device=self.labels.device)
        return slots[None, :] < self.num_targets[:, None]

    def to_list(self) -> List[Dict]:
        """The official per-image list (reads num_targets on the host)."""
        counts = self.num_targets.tolist()
        return [{"labels": self.labels[b, :n], "masks": self.masks[b, :n]} for b, n in enumerate(counts)]


def pad_targets(targets: Sequence[Dict], padded_size: Sequence[int], max_targets: Optional[int] = None,
                device=None) -> PaddedTargets:
    """Pad a batch of per-image targets (dict(labels [T_b], masks [T_b, h, w])) to
    ``max_targets`` slots (None: the batch's largest T_b) and masks to ``padded_size``
    (the padded image, as the official ``prepare_targets``; masks start at the top left).

    Only host metadata (lengths, shapes) is read: no device sync.
    """
    h_pad, w_pad = (int(x) for x in padded_size)
    counts = [int(t["labels"].shape[0]) for t in targets]
    if max_targets is None:
        slots = max(counts, default=0)
    else:
        slots = int(max_targets)
        worst = max(range(len(counts)), key=counts.__getitem__, default=None)
        if worst is not None and counts[worst] > slots:
            raise ValueError(f"image {worst} of the batch has {counts[worst]} targets, more than max_targets={slots}; "
                             "raise max_targets")
    if device is None:
        device = targets[0]["masks"].device if targets else torch.device("cpu")
    labels = torch.zeros((len(targets), slots), dtype=torch.int64, device=device)
    # one dtype holding every image's values (bool + soft float masks: float); an image
    # without targets (often a float zeros((0, h, w))) does not widen the others' bool masks
    dtypes = [t["masks"].dtype for t, n in zip(targets, counts) if n] or [t["masks"].dtype for t in targets[:1]]
    dtype = functools.reduce(torch.promote_types, dtypes, dtypes[0]) if dtypes else torch.bool
    masks = torch.zeros((len(targets), slots, h_pad, w_pad), dtype=dtype, device=device)
    for b, t in enumerate(targets):
        m = t["masks"]
        if m.shape[-2] > h_pad or m.shape[-1] > w_pad:
            raise ValueError(f"target masks {tuple(m.shape)} are larger than the padded image {h_pad}x{w_pad}")
        n = counts[b]
        labels[b, :n] = t["labels"]
        masks[b, :n, : m.shape[-2], : m.shape[-1]] = m
    num_targets = torch.tensor(counts, dtype=torch.int64).to(device, non_blocking=True)
    return PaddedTargets(labels, masks, num_targets)

"""Samplers whose order is a pure function of (seed, position): resumable and rank-sharded.

The training stream is an endless sequence of epochs, each a permutation of the dataset
drawn from ``(seed, epoch)``. Item ``k`` of rank ``r`` in a world of ``W`` ranks is global
item ``k * W + r``, so the ``W`` ranks' batches of ``b`` images at step ``s`` are exactly
the single process's batch of ``b * W`` images at step ``s`` (global items
``s*b*W .. (s+1)*b*W - 1``), and resuming at step ``s`` is starting at ``k = s * b``.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np
from torch.utils.data import Sampler


def epoch_permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(size)


class StreamSampler(Sampler):
    """Endless, shuffled, resumable stream of ``(index, epoch)`` keys for one rank.

    The epoch travels with the index so a dataset can seed its augmentation from
    ``(seed, epoch, index)``: independent of workers, identical after a resume.
    """

    def __init__(self, size: int, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if size <= 0:
            raise ValueError("the dataset is empty")
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        k, cached = self.start, (None, None)
        while True:
            epoch, pos = divmod(k * self.world_size + self.rank, self.size)
            if cached[0] != epoch:
                cached = (epoch, epoch_permutation(self.size, self.seed, epoch))
            yield int(cached[1][pos]), epoch
            k += 1


class ShardSampler(Sampler):
    """Indices ``rank, rank + W, ...`` of ``range(size)`` (evaluation: every image once overall)."""

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

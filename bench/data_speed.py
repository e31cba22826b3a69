"""CPU cost of one training sample (``dataset[i]``: decode, augmentation, targets), one thread.

    python -m bench.data_speed                 # ms per sample, COCO LSJ 1024 and ADE20K 512
    python -m bench.data_speed --profile coco  # plus cProfile's top entries

The folders are the test fixtures (bench/data_testing.py) at realistic sizes: COCO 480x640 JPEGs
with ~20-40 segments, ADE20K 512x683. Each sample index is drawn with its own seed, as the
loader does; the timing is the median of ``--rounds`` passes over the samples.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from m2f.data.ade20k import ADE20K
from m2f.data.coco_panoptic import COCOPanoptic
from bench.data_testing import write_ade_fixture, write_coco_fixture


def make_datasets(root: Path, n: int):
    rng = np.random.default_rng(0)
    write_coco_fixture(root / "coco", rng, n_images=(0, n), val_sizes=[(480, 640)] * n, extra_things=30)
    write_ade_fixture(root / "ade", rng, n_images=(0, n), val_sizes=[(512, 683)] * n)
    # the val split (the fixture sizes it) with the training augmentation
    return {"coco": COCOPanoptic(root / "coco", split="val", image_size=1024, augment=True),
            "ade": ADE20K(root / "ade", split="val", image_size=512, augment=True)}


def time_dataset(ds, rounds: int) -> float:
    per_round = []
    for r in range(rounds):
        t = time.perf_counter()
        for i in range(len(ds)):
            ds[(i, r)]
        per_round.append((time.perf_counter() - t) / len(ds))
    return 1e3 * statistics.median(per_round)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", choices=("coco", "ade"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        datasets = make_datasets(Path(tmp), args.images)
        for name, ds in datasets.items():
            ds[0]  # warm up
            print(f"{name}: {time_dataset(ds, args.rounds):.1f} ms / sample ({args.images} images x {args.rounds} epochs)")
        if args.profile:
            ds = datasets[args.profile]
            prof = cProfile.Profile()
            prof.enable()
            for i in range(len(ds)):
                ds[(i, 99)]
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()

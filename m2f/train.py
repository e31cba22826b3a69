"""Train Mask2Former: ``python -m m2f.train --kernels=fused`` (built-in ``shapes`` data by default).

    python -m m2f.train                                         # 'small' on a GPU, 'tiny' on a CPU
    python -m m2f.train --preset tiny                           # CPU-sized: about a minute
    torchrun --nproc_per_node=8 -m m2f.train --dataset coco_panoptic --data-root datasets/coco \\
        --preset official                                       # the official R50 COCO recipe
    python -m m2f.train --out runs/x --resume                   # continue runs/x exactly (after Ctrl-C too)
    python -m m2f.train --compile                               # torch.compile the forward and loss
    python -m m2f.train --cuda-graph --model max_targets=8      # the whole step as one CUDA graph

A run folder (``--out``) gets ``config.json``, ``metrics.jsonl`` (one JSON record per log
step and per evaluation), ``checkpoint.pt`` (written every ``--ckpt-every`` steps, every
``--ckpt-minutes`` minutes and at the end; the ``--keep-checkpoints`` - 1 before it stay as
``checkpoint_<step>.pt``; each with a ``.sha256`` record) and ``plots/`` (loss curve,
predictions over images). ``--resume`` takes the newest valid checkpoint (saying which it
skipped and why) and restores the step, model, optimiser, schedule, AMP scaler, every RNG
(python, numpy, torch, CUDA, the loss's point sampler, per rank) and the data position, so
the resumed run is the uninterrupted one. ``--batch-size`` is global: under torchrun each of
the N ranks takes batch/N images of the same global batch a single process would take.

SIGINT (Ctrl-C) or SIGTERM: the step in progress finishes, a checkpoint is written, the
resume command is printed and the run exits with 130 / 143 (a second signal stops at once,
keeping the last checkpoint). A checkpoint is written to a temporary file and renamed, so a
kill or a full disk never damages the previous one. A job that torchrun restarts
(``--max-restarts``) resumes from the checkpoint in ``--out`` by itself. Errors are one line
(``--debug`` shows the traceback), and a run that cannot start (missing data, a bad
checkpoint) creates nothing.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import pickle
import random
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import build_model
from .backbone import SWINS, calibrate_frozen_bn
from .data import DATASETS, PROTOCOLS, StreamSampler, build_dataset, collate
from .data.sample import DatasetInfo
from .evaluate import AMP_DTYPES, autocast, eval_loader, evaluate, format_metrics, ignore_stop_signals, one_line_error
from .graph_step import GraphStep, no_autocast_cache
from .plots import read_log, save_loss_curve, save_predictions
from .semantic import ARCHS, build_from_config as build_semantic_model, configure as configure_arch
from .checkpoint import (CHECKPOINT, CheckpointMismatchError, CheckpointWriter, InvalidCheckpointError,
                         OptimizerStateMismatchError, check_state_dict, checkpoint_files, latest_checkpoint,
                         load_checkpoint, load_optimizer_state)
from .checkpoint import atomic_save as _atomic_save
from .cli_args import at_least
from .loss_dict import total_loss
from .solver import SCHEDULES, build_optimizer, build_scheduler, clip_gradients, current_lrs

# Presets: model size and schedule. Explicit flags override them. The from-scratch presets
# use a higher lr than the official 1e-4 (which assumes a pretrained backbone and 50 epochs).
PRESETS = {
    # smoke tests: seconds on a CPU
    "micro": dict(backbone="resnet18", image_size=64, batch_size=2, steps=2, lr=1e-3, num_queries=8,
                  model=dict(backbone_width=8, hidden_dim=32, nheads=2, dim_feedforward=32, dec_layers=1,
                             enc_layers=1, enc_dim_feedforward=32, num_points=64)),
    # under a minute on a CPU: PQ 62-67 on shapes (seeds 0-2)
    "tiny": dict(backbone="resnet18", image_size=64, batch_size=8, steps=300, lr=1e-3, num_queries=16,
                 model=dict(backbone_width=16, hidden_dim=64, nheads=4, dim_feedforward=128, dec_layers=3,
                            enc_layers=1, enc_dim_feedforward=128, num_points=784)),
    # minutes on one GPU
    "small": dict(backbone="resnet18", image_size=128, batch_size=16, steps=1500, lr=5e-4, num_queries=50,
                  model=dict(hidden_dim=128, nheads=8, dim_feedforward=512, dec_layers=6, enc_layers=3,
                             enc_dim_feedforward=512, num_points=3136)),
    # the official Mask2Former R50 COCO panoptic recipe (50 epochs at batch 16; give --weights,
    # the ImageNet backbone, as the official runs start from it); other datasets and backbones
    # get their official config's values (official_recipe)
    "official": dict(backbone="resnet50", image_size=1024, batch_size=16, steps=368750, lr=1e-4,
                     num_queries=100, model={}),
}
PRESET_KEYS = ("backbone", "image_size", "batch_size", "steps", "lr", "num_queries")
# what a resumed run may change: where and how it runs and reports, never what it computes
RUNTIME_KEYS = ("out", "num_workers", "device", "eval_every", "eval_images", "eval_protocol", "ckpt_every",
                "log_every", "compile", "cuda_graph", "ckpt_minutes", "keep_checkpoints")
# flags that are neither the run's configuration nor runtime options
CLI_ONLY = ("resume", "preset", "model", "debug")
LOG = "metrics.jsonl"
# what a run's configuration needs (a checkpoint's config without them is of another version)
CONFIG_KEYS = ("preset", "dataset", "data_root", "seed", "model", "backbone", "image_size", "batch_size", "steps",
               "lr", "amp", "out")


# ----------------------------------------------------------------------------- processes


@dataclass
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: Optional[str] = None) -> Env:
    """Join the torchrun process group when launched by torchrun (nccl on CUDA, gloo on CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if world_size > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Env(rank, world_size, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def kernels_notice(kernels: str, device: torch.device) -> Optional[str]:
    if kernels == "fused" and device.type != "cuda":
        return "m2f: no CUDA GPU: kernels=fused runs the m2f_kernels ops on their reference backend"
    return None


# ----------------------------------------------------------------------------- configuration


def parse_args(argv=None) -> argparse.Namespace:
    """Every option defaults to None so that explicit flags can be told from preset values."""
    p = argparse.ArgumentParser(prog="python -m m2f.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS),
                   help="model size and schedule (default: small on a GPU, tiny without one)")
    p.add_argument("--kernels", choices=("reference", "fused"), help="hotspot implementation (default: fused)")
    p.add_argument("--mask-loss", choices=("point", "full"), help="mask losses on sampled points (default) or "
                   "whole masks")
    p.add_argument("--backbone", help="resnet18/50/101, swin_tiny/small/base/large")
    p.add_argument("--weights", help="backbone weights file (torchvision ResNet or official Swin state dict); "
                   "without it the backbone starts from scratch")
    p.add_argument("--dataset", choices=DATASETS, help="default: shapes (generated, no files)")
    p.add_argument("--data-root", help="dataset folder (coco_panoptic, ade20k)")
    p.add_argument("--steps", type=at_least(1), help="optimiser steps")
    p.add_argument("--batch-size", type=at_least(1), help="global batch size (all ranks together)")
    p.add_argument("--image-size", type=at_least(32), help="training crop / evaluation size in pixels")
    p.add_argument("--train-images", type=at_least(1), help="train on the first N images only (e.g. to overfit)")
    p.add_argument("--lr", type=at_least(0.0, float), help="base learning rate (official: 1e-4)")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help="lr schedule: 'step' (x0.1 at 89%% and 96%% of the steps, the official COCO configs) or "
                        "'poly' (power 0.9, the official ADE20K configs); default: step on coco_panoptic, else poly")
    p.add_argument("--num-queries", type=at_least(1))
    p.add_argument("--model", action="append", metavar="KEY=VALUE",
                   help="extra build_model override, e.g. --model dec_layers=6 (repeatable); or the architecture: "
                   "--model segformer (with --backbone mit_b0..mit_b5; see m2f.semantic)")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), help="autocast dtype of the training step (default: fp16 "
                   "with --preset official, as the official configs; off otherwise); evaluation runs in float32")
    p.add_argument("--out", help="run folder (default: runs/<dataset>_<preset>)")
    p.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                   help="continue the run in --out (or from CHECKPOINT)")
    p.add_argument("--eval-every", type=at_least(0), help="evaluate every N steps (default 0: at the end only)")
    p.add_argument("--eval-images", type=at_least(1), help="evaluate on the first N val images (default: all; "
                   "shapes has 100)")
    p.add_argument("--eval-protocol", choices=PROTOCOLS,
                   help="official (default with --preset official): detectron2's test, images resized by their "
                   "shortest side, one per forward, compared at the original resolution (m2f.evaluate --protocol); "
                   "fixed (default otherwise): resized to --image-size, batched")
    p.add_argument("--ckpt-every", type=at_least(1), help="checkpoint every N steps (default: 500), besides --ckpt-minutes, "
                   "the end and SIGINT / SIGTERM")
    p.add_argument("--ckpt-minutes", type=at_least(0.0, float), help="also checkpoint every M minutes (default: 10; 0: off)")
    p.add_argument("--keep-checkpoints", type=at_least(1), help="keep the newest K checkpoints (default: 3): checkpoint.pt "
                   "and checkpoint_<step>.pt")
    p.add_argument("--log-every", type=at_least(1), help="log every N steps (default: 10)")
    p.add_argument("--seed", type=at_least(0), help="seed of the model, the data and the sampling (default: 0)")
    p.add_argument("--num-workers", type=at_least(0), help="data loader workers per rank (default: 4 on GPU, 0 on CPU)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the model's training forward, loss included (default: off)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction,
                   help="capture the whole step (forward, loss, backward, optimiser) once in a CUDA graph and "
                   "replay it (default: off); needs a CUDA device, --kernels fused, point losses and a fixed "
                   "target count per image (--model max_targets=N)")
    p.add_argument("--debug", action="store_true", default=None,
                   help="show the traceback of an error (default: one line)")
    return p.parse_args(argv)


def _parse_overrides(items) -> Dict:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            if key.strip() in ARCHS:  # the architecture (m2f.semantic.model_arch), not an override
                continue
            raise SystemExit(f"--model expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def default_preset() -> str:
    """'small' on a GPU, 'tiny' without one (the small model needs hours on a CPU)."""
    return "small" if torch.cuda.is_available() else "tiny"


def resolve_config(args: argparse.Namespace) -> Dict:
    """A complete, JSON-serialisable run configuration from the flags and the preset."""
    preset = args.preset or default_preset()
    base = PRESETS[preset]
    cfg = {
        "preset": preset,
        "kernels": args.kernels or "fused",
        "mask_loss": args.mask_loss or "point",
        "weights": args.weights,
        "dataset": args.dataset or "shapes",
        "data_root": args.data_root,
        "amp": args.amp,
        "train_images": args.train_images,
        "seed": 0 if args.seed is None else args.seed,
        "model": {**base["model"], **_parse_overrides(args.model)},
    }
    for key in PRESET_KEYS:
        value = getattr(args, key)
        cfg[key] = base[key] if value is None else value
    if preset == "official":
        for key, value in official_recipe(cfg["dataset"], cfg["backbone"]).items():
            if getattr(args, key) is None:
                cfg[key] = value
    cfg.update({
        "out": args.out or os.path.join("runs", f"{cfg['dataset']}_{preset}"),
        "eval_every": args.eval_every or 0,
        "eval_images": args.eval_images,
        "eval_protocol": args.eval_protocol or ("official" if preset == "official" else "fixed"),
        "ckpt_every": 500 if args.ckpt_every is None else args.ckpt_every,
        "ckpt_minutes": 10.0 if args.ckpt_minutes is None else args.ckpt_minutes,
        "keep_checkpoints": 3 if args.keep_checkpoints is None else args.keep_checkpoints,
        "log_every": 10 if args.log_every is None else args.log_every,
        "num_workers": args.num_workers,
        "device": args.device,
        "compile": bool(args.compile),
        "cuda_graph": bool(args.cuda_graph),
    })
    cfg = configure_arch(cfg, args)  # --model segformer: m2f.semantic
    if cfg["amp"] is None:  # the official Mask2Former configs train in fp16 (SOLVER.AMP.ENABLED), SegFormer's in fp32
        official_amp = preset == "official" and cfg.get("arch", "mask2former") == "mask2former"
        cfg["amp"] = "fp16" if official_amp else "off"
    cfg["schedule"] = args.schedule or default_schedule(cfg)
    return cfg


def official_recipe(dataset: str, backbone: str) -> Dict:
    """The official Mask2Former config's values for ``dataset`` and ``backbone`` where they
    differ from the 'official' preset (R50 COCO panoptic): ADE20K semantic
    (Base-ADE20K-SemanticSegmentation.yaml) crops 512 (640 in the Swin-B/L 'res640' configs)
    and trains 160k steps with 100 queries, Swin-L included; COCO Swin-L trains 100 epochs
    (737,500 steps) with 200 queries."""
    variant = SWINS.get(backbone)
    if dataset == "ade20k":
        return dict(image_size=640 if variant in ("base", "large") else 512, steps=160_000)
    if dataset == "coco_panoptic" and variant == "large":
        return dict(steps=737_500, num_queries=200)
    return {}


def default_schedule(cfg: Dict) -> str:
    """The official config's schedule: multi-step for COCO, poly for ADE20K (and elsewhere)."""
    return "step" if cfg["dataset"] == "coco_panoptic" and cfg.get("arch") != "segformer" else "poly"


def static_targets(cfg: Dict) -> bool:
    """Whether the step pads targets on the host to the model's fixed ``max_targets`` slots:
    the static-shape criterion (fused point losses) with a fixed slot count."""
    return cfg["kernels"] == "fused" and cfg["mask_loss"] == "point" and cfg["model"].get("max_targets") is not None


def check_step_options(cfg: Dict, env: Env) -> None:
    """One-line refusals of --cuda-graph where it cannot work."""
    if not cfg["cuda_graph"]:
        return
    if env.device.type != "cuda":
        raise SystemExit("--cuda-graph needs a CUDA device")
    if cfg["kernels"] != "fused" or cfg["mask_loss"] != "point":
        raise SystemExit("--cuda-graph needs the static-shape criterion: --kernels fused --mask-loss point")
    if cfg["model"].get("max_targets") is None:
        raise SystemExit("--cuda-graph needs a fixed target count per image: --model max_targets=N")
    if cfg["amp"] == "fp16":
        raise SystemExit("--cuda-graph does not support --amp fp16 (the loss scaler decides on the host whether "
                         "to skip a step); use --amp bf16")
    if env.world_size > 1:
        raise SystemExit("--cuda-graph runs in one process; without torchrun")


def resume_config(args: argparse.Namespace, saved: Dict) -> Dict:
    """The saved configuration, with only the runtime options taken from the command line."""
    cfg = dict(saved)
    for key in RUNTIME_KEYS:
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    changed = [f"{k} (saved {cfg.get(k)!r}, given {v!r})" for k, v in sorted(vars(args).items())
               if v is not None and k not in RUNTIME_KEYS + CLI_ONLY and cfg.get(k) != v]
    if args.preset is not None and args.preset != saved["preset"]:
        changed.append(f"preset (saved {saved['preset']!r}, given {args.preset!r})")
    if args.model:
        changed.append("model (--model)")
    if changed:
        raise SystemExit(f"--resume continues the saved run; it cannot change {', '.join(changed)} "
                         f"(only {', '.join(RUNTIME_KEYS)})")
    return cfg


def restart_config(args: argparse.Namespace, fresh: Dict, saved: Dict, where: str) -> Dict:
    """A torchrun restart's configuration: the saved one, which this command line (the
    original one, ``fresh``) must describe except for runtime options."""
    differ = [f"{k} (saved {saved.get(k)!r}, this command {v!r})" for k, v in sorted(fresh.items())
              if k not in RUNTIME_KEYS and saved.get(k) != v]
    if differ:
        raise SystemExit(f"torchrun restart: the checkpoint {where} is of another run: {', '.join(differ)}; "
                         "use another --out or remove it")
    cfg = dict(saved)
    cfg.update({k: fresh[k] for k in RUNTIME_KEYS if getattr(args, k) is not None})
    return cfg


def build_model_from_config(cfg: Dict, info: DatasetInfo) -> torch.nn.Module:
    if cfg.get("arch") == "segformer":
        return build_semantic_model(cfg, info)
    overrides = dict(cfg["model"])
    weights = cfg.get("weights")
    if weights:
        if not os.path.isfile(weights):
            raise SystemExit(f"--weights {weights}: no such file")
        overrides["backbone_weights"] = weights
    try:
        return build_model(cfg["backbone"], num_classes=info.num_classes, num_queries=cfg["num_queries"],
                           kernels=cfg["kernels"], mask_loss=cfg["mask_loss"], **overrides)
    except CheckpointMismatchError as e:  # the backbone weights' keys or shapes
        raise SystemExit(f"--weights {weights}: {e.one_line()}") from e
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        if not weights:
            raise
        raise SystemExit(f"--weights {weights}: cannot read it ({' '.join(str(e).split())})") from e


# ----------------------------------------------------------------------------- state


def rng_state(generator: torch.Generator) -> Dict:
    """This process's random streams, in types ``torch.load(weights_only=True)`` reads
    (numpy's MT19937 keys as an int64 tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "sampler": generator.get_state(),
    }


def set_rng_state(state: Dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]  # keys: a tensor, or an ndarray in older checkpoints
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["sampler"])


def gather_objects(obj, env: Env) -> list:
    if env.world_size == 1:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def atomic_save(obj, path: str) -> str:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: never a torn
    file (m2f.checkpoint.atomic_save) -> the file's sha256."""
    return _atomic_save(obj, path)


def truncate_log(path: str, step: int) -> None:
    """Drop records of steps after ``step`` (written before an interruption) from the JSONL log."""
    if not os.path.exists(path):
        return
    lines = [json.dumps(r) + "\n" for r in read_log(path) if r["step"] <= step]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


class Logger:
    """Appends JSON records to ``metrics.jsonl`` (main rank only)."""

    def __init__(self, path: Optional[str]):
        self.path = path

    def write(self, record: Dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- training


def wrap_ddp(model: torch.nn.Module, env: Env) -> DistributedDataParallel:
    """DDP as detectron2's ``create_ddp_model(model, broadcast_buffers=False)``: gradients
    averaged over the ranks in backward, buffers not broadcast at each forward. Rank 0's
    buffers (the frozen-BN statistics that ``calibrate`` computes on each rank) are
    broadcast once here: with ``broadcast_buffers=False`` recent torch versions no longer
    sync buffers at construction, and ranks whose statistics differ in the last bits
    (another GPU, another kernel) would train and evaluate other models."""
    with torch.no_grad():
        for buffer in model.buffers():
            received = buffer.detach().clone()
            dist.broadcast(received, 0)
            # written by copy_: a collective's write does not bump the version counter, which
            # the caches of values made from buffers (FrozenBatchNorm2d's scale / bias) key on
            buffer.copy_(received)
    return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                   broadcast_buffers=False)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def train_step(model, batch: Dict, optimizer, scheduler, scaler, device: torch.device, amp: str,
               generator: torch.Generator, clip: float = 0.01, *, forward=None, pad: bool = False,
               graph: Optional[GraphStep] = None) -> Dict[str, torch.Tensor]:
    """One optimiser step on this rank's share of the batch -> detached losses (+ grad_norm).

    ``forward`` runs the model (the torch.compile'd model under --compile; default: model);
    ``pad``: the targets go to the device padded on the host to the model's ``max_targets``
    (static shapes); ``graph``: the step runs as a CUDA graph (``make_graph_step``, padded).
    No host sync in any of them unless the model has one.
    """
    if graph is not None:
        stats = graph(graph_inputs(model, batch), key=graph_key(optimizer, amp))
    else:
        images = to_device(batch["images"], device).float()
        if pad:
            padded = pad_batch_targets(model, batch)
            targets = type(padded)(*(to_device(t, device) for t in padded))
        else:
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch["targets"]]
        stats = optimizer_step(model if forward is None else forward, model, images, targets, optimizer, scaler,
                               autocast(device, amp), generator, clip)
    scheduler.step()
    return stats


def optimizer_step(forward, model, images, targets, optimizer, scaler, amp_context, generator,
                   clip: float) -> Dict[str, torch.Tensor]:
    """Forward and loss (in ``amp_context``), backward, clipping, optimiser step -> detached losses."""
    with amp_context:
        losses = forward(images, targets, generator=generator)
    loss = total_loss(losses)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = clip_gradients(unwrap(model).parameters(), clip)
    scaler.step(optimizer)
    scaler.update()
    out = {"loss": loss.detach().float(), "grad_norm": grad_norm.detach().float()}
    for name in ("loss_ce", "loss_mask", "loss_dice"):  # the final prediction's (weighted) terms
        if name in losses:
            out[name] = losses[name].detach().float()
    return out


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without blocking (through pinned memory for CUDA)."""
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def pad_batch_targets(model, batch: Dict):
    """The batch's targets as host PaddedTargets: ``max_targets`` slots per image, masks at the
    padded image size. An image with more targets ends the run with a one-line message."""
    m = unwrap(model)
    h, w = batch["images"].shape[-2:]
    d = m.size_divisibility
    try:
        return m.pad_targets(batch["targets"], (h + (-h) % d, w + (-w) % d), m.max_targets)
    except ValueError as e:
        raise SystemExit(f"m2f.train: {e}")


def graph_inputs(model, batch: Dict) -> tuple:
    """The host tensors a captured step reads: images (uint8) and the padded targets' fields."""
    return (batch["images"], *pad_batch_targets(model, batch))


def graph_key(optimizer, amp: str) -> tuple:
    """What a captured step depends on besides its inputs (see m2f.graph_step)."""
    lrs = [g["lr"] for g in optimizer.param_groups]
    if not all(isinstance(lr, torch.Tensor) for lr in lrs):
        raise RuntimeError("a captured optimiser step needs tensor lrs that the schedule fills in place "
                           "(build_optimizer(capturable=True)); a float lr would keep its capture-time value")
    return amp, tuple(id(lr) for lr in lrs), id(optimizer.state)


def make_graph_step(model, forward, optimizer, scaler, device: torch.device, amp: str, generator: torch.Generator,
                    clip: float = 0.01) -> GraphStep:
    """The --cuda-graph step: ``optimizer_step`` on static buffers of the images and the
    padded targets, autocast without its cast cache."""
    from .targets import PaddedTargets

    dtype = AMP_DTYPES[amp]

    def step(images, labels, masks, num_targets):
        return optimizer_step(forward, model, images.float(), PaddedTargets(labels, masks, num_targets), optimizer,
                              scaler, no_autocast_cache(device, dtype), generator, clip)

    return GraphStep(step, device, generators=(generator,))


def reduce_mean(values: Dict[str, torch.Tensor], env: Env) -> Dict[str, float]:
    keys = sorted(values)
    t = torch.stack([values[k] for k in keys])
    if env.world_size > 1:
        dist.all_reduce(t)
        t /= env.world_size
    return dict(zip(keys, t.tolist()))


def _memory_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0


def calibrate(model: torch.nn.Module, dataset, device: torch.device, n: int = 8) -> None:
    """Frozen-BN statistics of a from-scratch backbone set from the first ``n`` training
    images: the same images on every rank, so every rank computes the same buffers."""
    images = torch.stack([dataset[(i, 0)]["image"] for i in range(min(n, len(dataset)))]).to(device).float()
    calibrate_frozen_bn(model.backbone, model.preprocess(images))


def run_eval(model, cfg: Dict, dataset_val, env: Env, step: int, logger: Logger) -> Dict[str, float]:
    """Evaluate on the val split, log the metrics, redraw the plots."""
    per_rank = 1 if cfg["eval_protocol"] == "official" else max(1, cfg["batch_size"] // env.world_size)
    loader = eval_loader(dataset_val, per_rank, env.rank, env.world_size, cfg["num_workers"], cfg["eval_images"])
    # in float32 whatever the training precision, as detectron2 tests (m2f.evaluate --amp for another)
    metrics, examples = evaluate(unwrap(model), loader, dataset_val.info, env.device)
    if env.main:
        logger.write({"step": step, "eval": metrics})
        save_predictions(examples, dataset_val.info, os.path.join(cfg["out"], "plots", f"predictions_{step:07d}.png"),
                         title=f"{cfg['dataset']} val, step {step}")
        save_loss_curve(os.path.join(cfg["out"], LOG), os.path.join(cfg["out"], "plots", "loss.png"))
    return metrics


# ----------------------------------------------------------------------------- interruptions

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """Raised by the signal handler where nothing is left to finish (see StopControl)."""

    def __init__(self, signum: int, again: bool = False):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.again = signum, again


class Stopped(Exception):
    """The run stopped at a signal: the message says what was saved and how to continue; the
    CLI exits with 128 + ``signum`` (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopControl:
    """SIGINT / SIGTERM and the time-based checkpoint cadence of a run.

    While ``immediate`` (before the first step, during a single process's evaluations, after
    the last checkpoint) a signal raises Interrupted at once: nothing is lost. During the
    training steps it only sets ``signum``; the loop finishes the step, writes a checkpoint
    and stops. A second signal raises Interrupted(again=True) wherever the run is.
    ``poll`` -> (signal number or 0, whether ``minutes`` passed since the last checkpoint):
    under torchrun the max over the ranks (an all-reduce of two integers through gloo: no
    device sync), so every rank saves and stops at the same step.
    """

    def __init__(self, minutes: float = 0.0):
        self.signum = 0
        self.immediate = True
        self.started = False  # whether a training step has run
        self.minutes = minutes
        self.last_save = time.monotonic()
        self._group = None

    @contextlib.contextmanager
    def installed(self):
        """The handlers for SIGINT and SIGTERM (in the main thread; elsewhere the defaults stay)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum or self.immediate:
            again = bool(self.signum)
            self.signum = self.signum or signum
            raise Interrupted(signum, again)
        self.signum = signum

    def poll(self, env: Env):
        signum = self.signum
        due = self.minutes > 0 and time.monotonic() - self.last_save >= 60 * self.minutes
        if env.world_size > 1:
            if self._group is None:  # a CPU group beside nccl; the default one under gloo
                self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
            flags = torch.tensor([signum, int(due)], dtype=torch.int64)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
            signum, due = int(flags[0]), bool(flags[1])
            self.signum = self.signum or signum
        return signum, due

    def saved(self) -> None:
        self.last_save = time.monotonic()


def resume_command(cfg: Dict, env: Env) -> str:
    """The command line that continues the run."""
    if env.world_size == 1:
        head = "python -m m2f.train"
    elif int(os.environ.get("LOCAL_WORLD_SIZE", "0")) == env.world_size:
        head = f"torchrun --nproc_per_node={env.world_size} -m m2f.train"
    else:
        head = "torchrun <this job's options> -m m2f.train"
    cmd = f"{head} --out {shlex.quote(cfg['out'])} --resume"
    if cfg.get("device"):
        cmd += f" --device {shlex.quote(str(cfg['device']))}"
    return cmd


# ----------------------------------------------------------------------------- the CLI


def main(argv=None) -> Dict[str, float]:
    """The CLI: errors are one line (``--debug``: the traceback); a signal stops the run with a
    checkpoint and exit status 128 + signal (130 SIGINT, 143 SIGTERM)."""
    args = parse_args(argv)
    control = StopControl()
    try:
        with control.installed():
            env = setup_distributed(args.device)
            try:
                return train(args, env, control)
            finally:
                cleanup_distributed()
    except Stopped as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(e, file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    except SystemExit as e:
        if args.debug and e.__cause__ is not None:  # a one-line error: the exception behind it
            raise e.__cause__
        raise
    except (Interrupted, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        when = "" if control.started else " before the first step; no checkpoint was written"
        print(f"m2f.train: {signal.Signals(signum).name}: stopped{when}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None
    except Exception as e:
        if args.debug:
            raise
        raise SystemExit(one_line_error("m2f.train", e)) from None


def find_checkpoint(where: str, env: Env, what: str, folder: bool = False):
    """-> (path, checkpoint): the file ``where``, or the newest valid checkpoint of the folder
    ``where`` (printing which newer ones it skipped and why); one-line errors."""
    folder = folder or os.path.isdir(where)
    try:
        if folder:
            path, ckpt, skipped = latest_checkpoint(where)
            if env.main:
                for bad, why in skipped:
                    print(f"m2f.train: {what}: skipped {bad}: {why}", flush=True)
        else:
            path, ckpt = where, load_checkpoint(where)
    except InvalidCheckpointError as e:
        raise SystemExit(f"{what}: {e}" if folder else f"{what}: {where}: {e}") from e
    saved = ckpt["config"]
    missing = [k for k in CONFIG_KEYS if k not in saved] if isinstance(saved, dict) else list(CONFIG_KEYS)
    if missing:
        raise SystemExit(f"{what}: {path}: incompatible: its configuration has no {', '.join(missing)} "
                         "(written by another version of m2f.train?)")
    saved.setdefault("schedule", "poly")  # a configuration without one trained with the poly schedule
    saved.setdefault("eval_protocol", "fixed")  # and was evaluated at its image size
    return path, ckpt


def load_run_config(args: argparse.Namespace, env: Env):
    """-> (cfg, checkpoint or None, its path or None): a new run's configuration, or the
    resumed run's. ``--resume`` takes the newest valid checkpoint of --out (or the given file
    or folder); a job that torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0) resumes from
    the checkpoints in --out by itself."""
    ckpt = path = None
    if args.resume is not None:
        if not args.resume and not args.out:
            raise SystemExit("--resume needs --out RUN_FOLDER or a checkpoint path")
        path, ckpt = find_checkpoint(args.resume or args.out, env, "--resume", folder=not args.resume)
        cfg = resume_config(args, ckpt["config"])
    else:
        cfg = resolve_config(args)
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
        if restarts > 0:
            what = f"torchrun restart {restarts}"
            if checkpoint_files(cfg["out"]):
                path, ckpt = find_checkpoint(cfg["out"], env, what, folder=True)
                cfg = restart_config(args, cfg, ckpt["config"], path)
                if env.main:
                    print(f"m2f.train: {what}: resuming automatically from {path} (step {ckpt['step']})", flush=True)
            elif env.main:
                print(f"m2f.train: {what}: no checkpoint in {cfg['out']} yet: starting the run over", flush=True)
    cfg.setdefault("compile", False)  # runs saved before the options existed
    cfg.setdefault("cuda_graph", False)
    cfg.setdefault("ckpt_minutes", 10.0)
    cfg.setdefault("keep_checkpoints", 3)
    check_step_options(cfg, env)
    if cfg["num_workers"] is None:
        cfg["num_workers"] = min(4, os.cpu_count() or 1) if env.device.type == "cuda" else 0
    if cfg["batch_size"] % env.world_size:
        raise SystemExit(f"--batch-size {cfg['batch_size']} is not divisible by the {env.world_size} ranks")
    return cfg, ckpt, path


def build_datasets(cfg: Dict):
    """-> (train, val) datasets; a missing data root, annotation or image folder is one line."""
    try:
        dataset = build_dataset(cfg["dataset"], cfg["data_root"], "train", cfg["image_size"], cfg["seed"],
                                cfg.get("train_images"))
        dataset_val = build_dataset(cfg["dataset"], cfg["data_root"], "val", cfg["image_size"], cfg["seed"],
                                    protocol=cfg["eval_protocol"])
    except (OSError, ValueError) as e:
        raise SystemExit(f"m2f.train: {e}") from e
    for split, ds in (("train", dataset), ("val", dataset_val)):
        if len(ds) == 0:
            raise SystemExit(f"m2f.train: the {cfg['dataset']} {split} split under {cfg['data_root']} has no images")
    return dataset, dataset_val


def restore_state(ckpt: Dict, path: str, model, optimizer, scheduler, scaler) -> int:
    """Load a checkpoint's model, optimiser, schedule and scaler -> its step. What does not fit
    is one line naming it (the mismatched keys and shapes, the optimiser groups, ...)."""
    state = ckpt["model"]
    try:
        if not isinstance(state, dict):
            raise CheckpointMismatchError(f"the checkpoint's model ({type(state).__name__}, not a state dict)")
        check_state_dict("the checkpoint's model", state, model)
    except CheckpointMismatchError as e:
        raise SystemExit(f"--resume: {path}: {e.one_line()}") from e
    model.load_state_dict(state)
    try:
        load_optimizer_state(optimizer, ckpt["optimizer"], model, scheduler, ckpt["scheduler"])
    except OptimizerStateMismatchError as e:
        raise SystemExit(f"--resume: {e} ({path})") from e
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise SystemExit(f"--resume: {path}: its optimizer or schedule state does not fit ({e!r})") from e
    try:
        scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise SystemExit(f"--resume: {path}: its AMP scaler state does not fit ({e!r})") from e
    return int(ckpt["step"])


def prepare_run_folder(cfg: Dict, resumed: bool, env: Env) -> None:
    """Create the run folder: only once the run has everything it needs to start."""
    out = cfg["out"]
    if not env.main:
        return
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    notice = kernels_notice(cfg["kernels"], env.device)
    if notice:
        print(notice, flush=True)
    if not resumed:
        if checkpoint_files(out):
            print(f"m2f.train: starting a new run in {out}, replacing its checkpoints and log "
                  "(--resume continues it instead)", flush=True)
        truncate_log(os.path.join(out, LOG), 0)


def train(args: argparse.Namespace, env: Env, control: Optional[StopControl] = None) -> Dict[str, float]:
    """A run from the parsed flags (``main`` is the CLI around it). Everything is checked and
    loaded before the run folder is created."""
    control = control or StopControl()
    cfg, ckpt, ckpt_path = load_run_config(args, env)
    out, seed, steps = cfg["out"], cfg["seed"], cfg["steps"]
    random.seed(seed + env.rank)
    np.random.seed(seed + env.rank)
    torch.manual_seed(seed)  # the same initial model on every rank
    generator = torch.Generator(env.device).manual_seed(seed * 1009 + env.rank)  # the loss's random points

    dataset, dataset_val = build_datasets(cfg)
    model = build_model_from_config(cfg, dataset.info).to(env.device)
    optimizer = build_optimizer(model, lr=cfg["lr"], device=env.device, capturable=cfg["cuda_graph"])
    scheduler = build_scheduler(optimizer, steps, schedule=cfg["schedule"])
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg["amp"] == "fp16")  # bf16 needs none
    start = 0
    if ckpt is not None:
        start = restore_state(ckpt, ckpt_path, model, optimizer, scheduler, scaler)
    elif not cfg.get("weights"):
        calibrate(model, dataset, env.device)

    prepare_run_folder(cfg, ckpt is not None, env)
    log = os.path.join(out, LOG)
    if ckpt is not None and env.main:
        truncate_log(log, start)
        print(f"m2f.train: resuming {out} at step {min(start, steps)} of {steps} from {ckpt_path}", flush=True)
    writer = CheckpointWriter(out, cfg["keep_checkpoints"], resumed=(ckpt_path, start) if ckpt is not None else None) \
        if env.main else None
    logger = Logger(log if env.main else None)
    if start >= steps:
        evals = [r for r in read_log(log) if "eval" in r] if env.main and os.path.exists(log) else []
        final = gather_objects(evals[-1]["eval"] if evals and evals[-1]["step"] >= steps else None, env)[0]
        if final is not None:  # rank 0's log decides for every rank
            if env.main:
                print(f"m2f.train: the run is already complete; last evaluation: {format_metrics(final)}")
            return final
        if env.main:
            print(f"m2f.train: the run is complete; evaluating step {steps}", flush=True)
    else:
        run_steps(model, cfg, env, control, writer, logger, dataset, dataset_val, optimizer, scheduler, scaler,
                  generator, start, ckpt)
    control.immediate = True  # the checkpoint of the last step is written
    try:
        metrics = run_eval(model, cfg, dataset_val, env, steps, logger)
    except Interrupted as e:
        raise Stopped(e.signum, f"m2f.train: {signal.Signals(e.signum).name} during the final evaluation: "
                      f"the checkpoint of step {steps} is written; evaluate with: {resume_command(cfg, env)}") from None
    if env.main:
        print(f"step {steps}: {format_metrics(metrics)}", flush=True)
        print(f"m2f.train: run folder {out} (checkpoint.pt, metrics.jsonl, plots/)", flush=True)
    return metrics


def run_steps(model, cfg: Dict, env: Env, control: StopControl, writer: Optional[CheckpointWriter], logger: Logger,
              dataset, dataset_val, optimizer, scheduler, scaler, generator: torch.Generator, start: int,
              ckpt: Optional[Dict]) -> None:
    """Training steps ``start + 1 .. steps``: a checkpoint every ``ckpt_every`` steps, every
    ``ckpt_minutes`` and at the last one; at SIGINT / SIGTERM the step in progress finishes,
    a checkpoint is written and Stopped is raised."""
    steps, seed, local_batch = cfg["steps"], cfg["seed"], cfg["batch_size"] // env.world_size
    if env.world_size > 1:
        model = wrap_ddp(model, env)
    sampler = StreamSampler(len(dataset), seed=seed, rank=env.rank, world_size=env.world_size,
                            start=start * local_batch)
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=cfg["num_workers"],
                        collate_fn=collate, pin_memory=env.device.type == "cuda", drop_last=True,
                        persistent_workers=cfg["num_workers"] > 0, worker_init_fn=ignore_stop_signals,
                        generator=torch.Generator())  # keeps the global RNG out of the loader
    batches = iter(loader)
    if ckpt is not None:  # after everything that draws from the RNGs at start-up
        states = ckpt["rng"]
        if len(states) != env.world_size and env.main:
            print(f"m2f.train: the checkpoint has {len(states)} ranks' RNG states, this run "
                  f"{env.world_size}: the random streams will differ from the original run")
        try:
            if env.rank < len(states):  # a rank the saved run lacked keeps its own seeds: another
                set_rng_state(states[env.rank], generator)  # rank's streams would repeat its draws
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise SystemExit(f"--resume: the checkpoint's RNG states do not fit ({e!r})") from e

    forward = torch.compile(model) if cfg["compile"] else model
    graph = make_graph_step(model, forward, optimizer, scaler, env.device, cfg["amp"], generator) \
        if cfg["cuda_graph"] else None
    bar = tqdm(total=steps, initial=start, disable=not env.main, dynamic_ncols=True, desc="train", mininterval=0.5)
    meter = Meter()
    model.train()
    saved = step = start
    control.minutes = cfg["ckpt_minutes"]
    control.saved()  # the time-based cadence counts from here

    def save(at: int) -> None:
        nonlocal saved
        meter.check(at, env)  # never a checkpoint of a non-finite loss's update
        save_checkpoint(model, optimizer, scheduler, scaler, generator, cfg, at, env, writer)
        saved = at
        control.saved()

    def kept() -> str:
        if saved == start and ckpt is None:
            return "nothing was saved"
        return f"the checkpoint of step {saved} is kept; continue with: {resume_command(cfg, env)}"

    control.immediate, control.started = False, True
    try:
        for step in range(start + 1, steps + 1):
            try:
                stats = train_step(model, next(batches), optimizer, scheduler, scaler, env.device, cfg["amp"],
                                   generator, forward=forward, pad=static_targets(cfg), graph=graph)
            except Exception:
                meter.check(step - 1)  # a step that fails after a non-finite loss (the matcher's NaN costs)
                raise
            meter.add(stats)
            last = step == steps
            if step % cfg["log_every"] == 0 or last:
                record = meter.flush(env, step)
                record.update(step=step, lr=max(current_lrs(scheduler)), max_mem_gb=_memory_gb(env.device))
                logger.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                mem=f"{record['max_mem_gb']:.2f}GB", refresh=False)
            bar.update(1)
            if cfg["eval_every"] and step % cfg["eval_every"] == 0 and not last:
                control.immediate = env.world_size == 1  # a signal stops a single process's evaluation
                metrics = run_eval(model, cfg, dataset_val, env, step, logger)
                control.immediate = False
                if env.main:
                    bar.write(f"step {step}: {format_metrics(metrics)}")
            signum, due = control.poll(env)
            if signum or due or step % cfg["ckpt_every"] == 0 or last:
                save(step)
            if signum:
                raise Stopped(signum, f"m2f.train: {signal.Signals(signum).name}: stopped after step {step} of "
                              f"{steps}; checkpoint {os.path.join(cfg['out'], CHECKPOINT)}; continue with: "
                              f"{resume_command(cfg, env)}")
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        if e.again:  # the state may be half-way through a step or a save
            raise Stopped(e.signum, f"m2f.train: {name} again: stopped at once in step {step}; {kept()}") from None
        save(step)  # a single process's evaluation after step `step`: its state is complete
        raise Stopped(e.signum, f"m2f.train: {name}: stopped during the evaluation after step {step}; checkpoint "
                      f"{os.path.join(cfg['out'], CHECKPOINT)}; continue with: {resume_command(cfg, env)}") from None
    finally:
        bar.close()


class Meter:
    """Averages a log interval's losses (the last grad norm), reduced over ranks, with it/s.

    A non-finite loss is a FloatingPointError naming its step (detectron2's check, which stops
    the official run at that step), checked at each log and before each checkpoint rather than
    at each step (no host sync per step): no checkpoint holds the update of a non-finite loss.
    """

    def __init__(self):
        self.sums: Dict[str, torch.Tensor] = {}
        self.losses: List[torch.Tensor] = []  # each step's loss since the last flush
        self.count, self.t0 = 0, time.perf_counter()

    def add(self, stats: Dict[str, torch.Tensor]) -> None:
        for k, v in stats.items():
            self.sums[k] = v if k == "grad_norm" else self.sums.get(k, 0.0) + v
        self.losses.append(stats["loss"])
        self.count += 1

    def check(self, step: int, env: Optional[Env] = None) -> None:
        """FloatingPointError if the loss of a step since the last flush is not finite (``step``:
        the last one added). With ``env`` the ranks' losses are summed first (a collective:
        every rank raises); without it only this rank's are read."""
        if not self.losses:
            return
        losses = torch.stack(self.losses)
        if env is not None and env.world_size > 1:
            dist.all_reduce(losses)
        bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
        if bad:
            at = step - len(self.losses) + 1 + bad[0]
            raise FloatingPointError(f"the training loss is {losses[bad[0]].item()} at step {at}")

    def flush(self, env: Env, step: int) -> Dict:
        means = reduce_mean({k: v if k == "grad_norm" else v / self.count for k, v in self.sums.items()}, env)
        if not math.isfinite(means["loss"]):
            self.check(step, env)  # every rank sees the mean: the collective runs on all of them
            raise FloatingPointError(f"the training loss is {means['loss']} (steps {step - self.count + 1}-{step})")
        if not math.isfinite(means["grad_norm"]):  # an fp16 step the scaler skipped
            means["grad_norm"] = None
        means["it_s"] = self.count / (time.perf_counter() - self.t0)
        self.__init__()
        return means


def save_checkpoint(model, optimizer, scheduler, scaler, generator, cfg: Dict, step: int, env: Env,
                    writer: Optional[CheckpointWriter] = None) -> None:
    """Every rank's RNG streams, then (main rank) the checkpoint through ``writer`` (or
    ``atomic_save`` to ``checkpoint.pt``). A failed write (a full disk) ends the run with one
    line; the previous checkpoints stay as they were."""
    states = gather_objects(rng_state(generator), env)  # every rank's streams
    if not env.main:
        return
    obj = {
        "config": cfg, "step": step, "world_size": env.world_size, "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "rng": states,
    }
    if writer is None:
        atomic_save(obj, os.path.join(cfg["out"], CHECKPOINT))
        return
    try:
        writer.save(obj, step)
    except OSError as e:
        if writer.latest is None:
            kept = "no checkpoint of this run was written before"
        else:
            kept = (f"the previous checkpoint is kept ({writer.latest[0]}, step {writer.latest[1]}); continue with: "
                    f"{resume_command(cfg, env)}")
        raise SystemExit(f"m2f.train: cannot write the checkpoint of step {step} ({e.strerror or e}); {kept}") from e


if __name__ == "__main__":
    main()

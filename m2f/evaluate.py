"""Evaluate a Mask2Former: PQ (panoptic datasets), mIoU (all), mask AP (datasets with things).

    python -m m2f.evaluate --run runs/shapes_tiny            # the run's newest valid checkpoint on its val split
    torchrun --nproc_per_node=8 -m m2f.evaluate --checkpoint path/to/checkpoint.pt
    python -m m2f.evaluate --official-checkpoint model_final.pkl --dataset coco_panoptic \
        --data-root datasets/coco --backbone swin_large          # an official detectron2 checkpoint

Two protocols (``--protocol``):

* ``fixed`` (m2f.train's ``--eval-protocol`` default but with ``--preset official``, and so
  the default for those runs here): images resized
  (longest side) to the run's image size, padded to a square (128 before normalising) and
  batched; predictions and ground truth are compared at that resized size, so the numbers
  are not the papers' (a 4:3 ADE20K image is seen at 3/4 of the official scale).
* ``official`` (the default for ``--official-checkpoint`` and ``--preset official`` runs):
  detectron2's test. The image
  alone is resized (``ResizeShortestEdge``: shortest side 800 / longest at most 1333 on COCO,
  on ADE20K the crop size / 4x it: 512 / 2048, 640 / 2560 in the Swin-B/L res640 configs;
  ``shapes`` images at their generated size), one image per forward and rank; the model
  normalises and zero-pads to a multiple of 32; the mask logits are upsampled to the padded
  size, cropped to the resized image and resized bilinearly to the original size
  (``sem_seg_postprocess``), where they are compared with the original ground truth.

Both then post-process per image with the official inference (``m2f.inference``): semantic =
argmax of the per-class scores, panoptic with thresholds 0.8 / 0.8, instances = top 100
(query, class) pairs of thing classes; as the official code, datasets with panoptic ground
truth post-process the masks first, semantic-only ones (ADE20K) the class scores. A SegFormer
run (per-pixel logits) follows either protocol the same way. ``--official-checkpoint`` builds
the model as ``m2f.train --preset official`` (``official_recipe`` of ``--dataset`` and
``--backbone``; ``--num-queries``, ``--model`` override it) and loads the file with
``m2f.load_official_checkpoint`` (a pickle: only files you trust). Errors (a missing, damaged
or mismatched checkpoint, missing data) are one line; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import signal
import sys
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from .cli_args import at_least
from .data import DATASETS, PROTOCOLS, ShardSampler, collate
from .data.sample import DatasetInfo
from .inference import (instance_inference, panoptic_inference, sem_seg_postprocess, semantic_inference,
                        upsample_masks)
from .metrics import MaskAP, PanopticQuality, SemanticIoU

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def one_line_error(prog: str, e: BaseException) -> str:
    """An unexpected exception as the one line a CLI prints instead of a traceback."""
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    else:
        text = " ".join(str(e).split()) or "(no message)"
    if len(text) > 500:
        text = text[:500] + " ..."
    return f"{prog}: {type(e).__name__}: {text} (--debug shows the traceback)"


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader worker's init: ignore SIGINT / SIGTERM, which a terminal's Ctrl-C and
    torchrun send to the whole process group; the main process decides, the workers end with it."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def eval_loader(dataset, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                max_images: Optional[int] = None) -> DataLoader:
    """Every image (or the first ``max_images``) once across all ranks."""
    size = len(dataset) if max_images is None else min(max_images, len(dataset))
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(size, rank=rank, world_size=world_size),
                      num_workers=num_workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=ignore_stop_signals if num_workers else None,
                      generator=torch.Generator())  # keeps the global RNG untouched (exact resume)


def example_image(image: torch.Tensor, image_size, output_size) -> torch.Tensor:
    """uint8 [3, H, W] of an example plot: ``image`` without its padding, at ``output_size``
    (resized like the dataset's images where the protocol compares at the original size)."""
    from .data.transforms import resize

    image = image[:, : image_size[0], : image_size[1]]
    return resize({"image": image}, *output_size)["image"]


def instance_ground_truth(pan_seg: torch.Tensor, segments: List[Dict]) -> Tuple[torch.Tensor, ...]:
    """Thing segments of a panoptic map -> (masks bool [G, H, W], labels [G], iscrowd bool [G])."""
    things = [s for s in segments if s["isthing"]]
    ids = torch.tensor([s["id"] for s in things], dtype=pan_seg.dtype)
    masks = pan_seg[None] == ids[:, None, None]
    labels = torch.tensor([s["category_id"] for s in things], dtype=torch.int64)
    crowd = torch.tensor([bool(s["iscrowd"]) for s in things], dtype=torch.bool)
    return masks, labels, crowd


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, info: DatasetInfo, device: torch.device, *,
             amp: str = "off", num_examples: int = 4) -> Tuple[Dict[str, float], List[Dict]]:
    """Run ``model`` (not DDP-wrapped) over ``loader``; metrics are merged across ranks.

    Returns (metrics, examples): metrics has PQ/SQ/RQ(_th/_st) for panoptic datasets, mIoU,
    fwIoU, mACC, pACC, and AP/AP50/AP75 when there are thing classes; examples are this
    rank's first ``num_examples`` images with ground truth and predictions (for plots).
    A per-pixel model (``model.task == 'semantic'``, SegFormer) gets the semantic metrics
    only (``m2f.semantic.evaluate_semantic``).
    """
    if getattr(model, "task", None) == "semantic":
        from .semantic import evaluate_semantic

        return evaluate_semantic(model, loader, info, device, amp=amp, num_examples=num_examples)
    was_training = model.training
    model.eval()
    pq = PanopticQuality(info.num_classes, info.thing_ids) if info.panoptic else None
    sem_metric = SemanticIoU(info.num_classes, info.ignore_label)
    ap = MaskAP(info.num_classes) if info.panoptic and info.thing_ids else None
    examples: List[Dict] = []
    for batch in loader:
        images = batch["images"].to(device, non_blocking=True).float()
        with autocast(device, amp):
            out = model(images)
        h, w = images.shape[-2:]
        d = max(1, model.size_divisibility)  # the model pads its input to a multiple of this
        padded = (-(-h // d) * d, -(-w // d) * d)
        masks = upsample_masks(out["pred_masks"].float(), padded)
        for b in range(images.shape[0]):
            # the image without the model's and the dataset's padding, and the size predictions
            # are compared at (the label maps': the image's, or the original resolution)
            image_size = batch["image_sizes"][b] if "image_sizes" in batch else (h, w)
            oh, ow = batch["output_sizes"][b] if "output_sizes" in batch else image_size
            mask_cls = out["pred_logits"][b].float()
            sem_gt = batch["sem_seg"][b][:oh, :ow]
            if info.panoptic:  # panoptic / instance inference: on the masks at the output size
                mask_pred = sem_seg_postprocess(masks[b], image_size, oh, ow)
                sem = semantic_inference(mask_cls, mask_pred)
            else:  # semantic only: the class scores at the padded size, then cropped and resized
                sem = sem_seg_postprocess(semantic_inference(mask_cls, masks[b]), image_size, oh, ow)
            sem = sem.argmax(0).cpu()
            sem_metric.update(sem, sem_gt)
            example = {"sem_seg": sem_gt, "pred_sem_seg": sem}
            pan_gt = batch["pan_seg"][b][:oh, :ow] if batch["pan_seg"] is not None else None
            if pq is not None:
                pan, segments = panoptic_inference(mask_cls, mask_pred, thing_ids=info.thing_ids)
                pan = pan.cpu()
                pq.update(pan, segments, pan_gt, batch["segments"][b])
                example.update(pan_seg=pan_gt, segments=batch["segments"][b],
                               pred_pan_seg=pan, pred_segments=segments)
            if ap is not None:
                inst = instance_inference(mask_cls, mask_pred, thing_ids=info.thing_ids)
                gt_masks, gt_labels, gt_crowd = instance_ground_truth(pan_gt, batch["segments"][b])
                ap.update(inst["pred_masks"] > 0.5, inst["scores"], inst["pred_classes"], gt_masks, gt_labels,
                          gt_crowd, image_id=batch["index"][b])
            if len(examples) < num_examples:
                examples.append(dict(example, image=example_image(batch["images"][b], image_size, (oh, ow))))
    metrics: Dict[str, float] = {}
    for metric in (pq, sem_metric, ap):
        if metric is not None:
            metric.sync()
            metrics.update(metric.compute())
    metrics.pop("IoU", None)
    model.train(was_training)
    return metrics, examples


def format_metrics(metrics: Dict[str, float]) -> str:
    """One line: PQ (things / stuff), SQ, RQ, mIoU, AP, as available."""
    parts = []
    if "PQ" in metrics:
        parts.append(f"PQ {metrics['PQ']:.1f} (things {metrics['PQ_th']:.1f}, stuff {metrics['PQ_st']:.1f})"
                     f"  SQ {metrics['SQ']:.1f}  RQ {metrics['RQ']:.1f}")
    parts.append(f"mIoU {metrics['mIoU']:.1f}")
    if "AP" in metrics:
        parts.append(f"AP {metrics['AP']:.1f}  AP50 {metrics['AP50']:.1f}")
    return " | ".join(parts)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m m2f.evaluate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run folder of m2f.train (uses its checkpoint.pt)")
    src.add_argument("--checkpoint", help="a checkpoint written by m2f.train")
    src.add_argument("--official-checkpoint", metavar="PKL",
                     help="an official Mask2Former (detectron2) checkpoint, e.g. model_final.pkl: the model is "
                     "m2f.train's --preset official for --dataset and --backbone (and --num-queries, --model)")
    p.add_argument("--protocol", choices=PROTOCOLS,
                   help="default: the run's (m2f.train --eval-protocol), official for --official-checkpoint. "
                   "fixed: longest side resized to the run's image size, padded to a square, batched, compared at "
                   "that size; official: detectron2's test (shortest side 800 / longest <= 1333 on coco_panoptic, "
                   "the crop size / 4x on ade20k, shapes as generated; one image per forward; predictions resized "
                   "to and compared at the original resolution). SegFormer runs follow either")
    p.add_argument("--split", default="val")
    p.add_argument("--data-root", help="the dataset folder (default: the run's)")
    p.add_argument("--eval-images", type=at_least(1), help="evaluate only the first N images")
    p.add_argument("--batch-size", type=at_least(1),
                   help="global batch size of --protocol fixed (default: 8); official runs one image per rank")
    p.add_argument("--kernels", choices=("reference", "fused"), help="override the run's kernels")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), help="autocast dtype of the evaluation (default: off, "
                   "float32 as detectron2 tests, whatever the run trained with)")
    official = p.add_argument_group("the model of --official-checkpoint (as m2f.train's flags)")
    official.add_argument("--dataset", choices=DATASETS, help="the checkpoint's dataset (required)")
    official.add_argument("--backbone", help="resnet50 (default), resnet101, swin_tiny/small/base/large")
    official.add_argument("--num-queries", type=at_least(1), help="default: the official config's")
    official.add_argument("--image-size", type=at_least(32),
                          help="default: the official config's crop (1024; ade20k 512, 640 for swin_base/large): "
                          "--protocol fixed resizes to it; ade20k's official test size is it / 4x it")
    official.add_argument("--model", action="append", metavar="KEY=VALUE",
                          help="a build_model override, e.g. --model dec_layers=6 (repeatable)")
    p.add_argument("--num-workers", type=at_least(0), default=0)
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", help="folder for eval.json and the prediction plot (default: the checkpoint's folder)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (default: one line)")
    return p.parse_args(argv)


OFFICIAL_MODEL_FLAGS = ("dataset", "backbone", "num_queries", "image_size", "model")


def official_config(args: argparse.Namespace) -> Dict:
    """The m2f.train configuration (``resolve_config``: the 'official' preset and
    ``official_recipe(dataset, backbone)``) that builds the model of ``--official-checkpoint``."""
    from .train import parse_args as train_args, resolve_config

    if args.dataset is None:
        raise SystemExit("m2f.evaluate: --official-checkpoint needs --dataset (the checkpoint's: coco_panoptic or "
                         "ade20k)")
    argv = ["--preset", "official"]
    for key in OFFICIAL_MODEL_FLAGS[:-1] + ("data_root", "kernels"):
        if getattr(args, key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for item in args.model or ():
        argv += ["--model", item]
    cfg = resolve_config(train_args(argv))
    if cfg.get("arch", "mask2former") != "mask2former":
        raise SystemExit("m2f.evaluate: --official-checkpoint is a Mask2Former checkpoint; evaluate a SegFormer "
                         "as an m2f.train run (m2f.train --weights loads its official checkpoint)")
    return cfg


def load_official_weights(model: torch.nn.Module, path: str) -> None:
    """``load_official_checkpoint`` with one-line errors (the mismatched keys, an unreadable file)."""
    from .checkpoint import CheckpointMismatchError, load_official_checkpoint

    try:
        load_official_checkpoint(model, path)
    except CheckpointMismatchError as e:
        raise SystemExit(f"m2f.evaluate: --official-checkpoint {path}: {e.one_line()} (another --dataset, "
                         "--backbone, --num-queries or --model?)") from e
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise SystemExit(f"m2f.evaluate: --official-checkpoint {path}: cannot read it "
                         f"({' '.join(str(e).split()) or type(e).__name__})") from e


EVAL_KEYS = ("config", "step", "model")
EVAL_CONFIG_KEYS = ("dataset", "data_root", "image_size", "seed", "amp")


def load_for_evaluation(args: argparse.Namespace, rank: int = 0) -> Tuple[str, Dict]:
    """-> (path, checkpoint): ``--checkpoint`` or the newest valid one of ``--run`` (saying
    which it skipped and why); one-line errors for missing, damaged or foreign files."""
    from .checkpoint import InvalidCheckpointError, latest_checkpoint, load_checkpoint

    try:
        if args.checkpoint:
            path, ckpt = args.checkpoint, load_checkpoint(args.checkpoint, EVAL_KEYS)
        else:
            path, ckpt, skipped = latest_checkpoint(args.run, EVAL_KEYS)
            for bad, why in skipped if rank == 0 else ():
                print(f"m2f.evaluate: skipped {bad}: {why}", flush=True)
    except InvalidCheckpointError as e:
        where = f"--checkpoint {args.checkpoint}: " if args.checkpoint else ""
        hint = " (a detectron2 .pkl? use --official-checkpoint)" if str(args.checkpoint).endswith(".pkl") else ""
        raise SystemExit(f"m2f.evaluate: {where}{e}{hint}") from e
    cfg = ckpt["config"]
    missing = [k for k in EVAL_CONFIG_KEYS if k not in cfg] if isinstance(cfg, dict) else list(EVAL_CONFIG_KEYS)
    if missing:
        raise SystemExit(f"m2f.evaluate: {path}: incompatible: its configuration has no {', '.join(missing)}")
    return path, ckpt


def main(argv=None) -> Dict[str, float]:
    """The CLI: errors are one line unless ``--debug``."""
    args = parse_args(argv)
    try:
        return _main(args)
    except SystemExit as e:
        if args.debug and e.__cause__ is not None:  # a one-line error: the exception behind it
            raise e.__cause__
        raise
    except KeyboardInterrupt:
        print("m2f.evaluate: SIGINT: stopped", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGINT) from None
    except Exception as e:
        if args.debug:
            raise
        raise SystemExit(one_line_error("m2f.evaluate", e)) from None


def _main(args: argparse.Namespace) -> Dict[str, float]:
    from .checkpoint import CheckpointMismatchError, check_state_dict
    from .data import build_dataset
    from .plots import save_predictions
    from .train import build_model_from_config, cleanup_distributed, kernels_notice, setup_distributed

    given = [f"--{k.replace('_', '-')}" for k in OFFICIAL_MODEL_FLAGS if getattr(args, k) is not None]
    if given and not args.official_checkpoint:
        raise SystemExit(f"m2f.evaluate: {', '.join(given)}: only with --official-checkpoint (a run's checkpoint "
                         "remembers its model and dataset)")
    env = setup_distributed(args.device)
    if args.official_checkpoint:
        path, ckpt = args.official_checkpoint, None
        if not os.path.isfile(path):
            raise SystemExit(f"m2f.evaluate: --official-checkpoint {path}: "
                             f"{'a folder, not a checkpoint file' if os.path.isdir(path) else 'no such file'}")
        cfg = official_config(args)
    else:
        path, ckpt = load_for_evaluation(args, env.rank)
        cfg = dict(ckpt["config"])
        for key in ("data_root", "kernels"):
            if getattr(args, key) is not None:
                cfg[key] = getattr(args, key)
    # the run's own (m2f.train --eval-protocol), else official for official weights
    protocol = args.protocol or cfg.get("eval_protocol") or ("official" if args.official_checkpoint else "fixed")
    if protocol == "official" and args.batch_size not in (None, env.world_size):
        raise SystemExit(f"m2f.evaluate: --batch-size {args.batch_size}: --protocol official runs one image per "
                         "rank (detectron2's test batch); leave it out")
    try:
        dataset = build_dataset(cfg["dataset"], cfg["data_root"], args.split, cfg["image_size"], cfg["seed"],
                                protocol=protocol)
    except (OSError, ValueError) as e:
        raise SystemExit(f"m2f.evaluate: {e}") from e
    model = build_model_from_config(cfg, dataset.info).to(env.device)
    if ckpt is None:
        load_official_weights(model, path)
    else:
        try:
            if not isinstance(ckpt["model"], dict):
                raise CheckpointMismatchError(f"the checkpoint's model ({type(ckpt['model']).__name__}, not a state "
                                              "dict)")
            check_state_dict("the checkpoint's model", ckpt["model"], model)
        except CheckpointMismatchError as e:
            raise SystemExit(f"m2f.evaluate: {path}: {e.one_line()}") from e
        model.load_state_dict(ckpt["model"])
    if env.rank == 0:
        notice = kernels_notice(cfg["kernels"], env.device)
        if notice:
            print(notice)
    per_rank = 1 if protocol == "official" else max(1, (args.batch_size or 8) // env.world_size)
    loader = eval_loader(dataset, per_rank, env.rank, env.world_size, args.num_workers, args.eval_images)
    metrics, examples = evaluate(model, loader, dataset.info, env.device, amp=args.amp or "off")
    if env.rank == 0:
        step = ckpt["step"] if ckpt is not None else None
        out = args.out or os.path.dirname(os.path.abspath(path))
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump({"checkpoint": path, "step": step, "split": args.split, "protocol": protocol, **metrics}, f,
                      indent=1)
        save_predictions(examples, dataset.info, os.path.join(out, f"predictions_{args.split}.png"))
        what = f"step {step}" if step is not None else os.path.basename(path)
        print(f"{what} {args.split}{', official protocol' if protocol == 'official' else ''}: "
              f"{format_metrics(metrics)}")
    cleanup_distributed()
    return metrics


if __name__ == "__main__":
    main()

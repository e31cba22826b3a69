"""Evaluate a Mask2Former: PQ (panoptic datasets), mIoU (all), mask AP (datasets with things).

    python -m m2f.evaluate --run runs/shapes_tiny            # the run's newest valid checkpoint on its val split
    torchrun --nproc_per_node=8 -m m2f.evaluate --checkpoint path/to/checkpoint.pt

Predictions are upsampled to the (padded) input size, cropped to the image inside the
padding (``batch["image_sizes"]``, as detectron2's ``sem_seg_postprocess`` crops to
``image_sizes``) and post-processed per image with the official inference
(``m2f.inference``): semantic = argmax of the per-class scores, panoptic with thresholds
0.8 / 0.8, instances = top 100 (query, class) pairs of thing classes. Evaluation images are
resized (longest side) and padded to the run's image size; predictions and ground truth are
compared at that resized size, not at the original image resolution as the official
evaluation does (its test input has the shortest side at MIN_SIZE_TEST, ADE20K 512 with the
longest at most 2048, COCO 800 / 1333: a 4:3 ADE20K image is seen here at 3/4 of the official
scale, so mIoU is not the paper's). Errors (a missing or damaged checkpoint, missing data) are one line;
``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from .cli_args import at_least
from .data import ShardSampler, collate
from .data.sample import DatasetInfo
from .inference import instance_inference, panoptic_inference, semantic_inference, upsample_masks
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
            # the image without the model's and the dataset's padding
            hb, wb = batch["image_sizes"][b] if "image_sizes" in batch else (h, w)
            mask_cls, mask_pred = out["pred_logits"][b].float(), masks[b, :, :hb, :wb]
            sem_gt = batch["sem_seg"][b][:hb, :wb]
            sem = semantic_inference(mask_cls, mask_pred).argmax(0).cpu()
            sem_metric.update(sem, sem_gt)
            example = {"image": batch["images"][b][:, :hb, :wb], "sem_seg": sem_gt, "pred_sem_seg": sem}
            pan_gt = batch["pan_seg"][b][:hb, :wb] if batch["pan_seg"] is not None else None
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
                examples.append(example)
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
    p.add_argument("--split", default="val")
    p.add_argument("--data-root", help="override the run's data root")
    p.add_argument("--eval-images", type=at_least(1), help="evaluate only the first N images")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="global batch size")
    p.add_argument("--kernels", choices=("reference", "fused"), help="override the run's kernels")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), help="override the run's autocast mode")
    p.add_argument("--num-workers", type=at_least(0), default=0)
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", help="folder for eval.json and the prediction plot (default: the run folder)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (default: one line)")
    return p.parse_args(argv)


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
        raise SystemExit(f"m2f.evaluate: {where}{e}") from e
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

    env = setup_distributed(args.device)
    path, ckpt = load_for_evaluation(args, env.rank)
    cfg = dict(ckpt["config"])
    for key in ("data_root", "kernels", "amp"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    try:
        dataset = build_dataset(cfg["dataset"], cfg["data_root"], args.split, cfg["image_size"], cfg["seed"])
    except (OSError, ValueError) as e:
        raise SystemExit(f"m2f.evaluate: {e}") from e
    model = build_model_from_config(cfg, dataset.info).to(env.device)
    try:
        if not isinstance(ckpt["model"], dict):
            raise CheckpointMismatchError(f"the checkpoint's model ({type(ckpt['model']).__name__}, not a state dict)")
        check_state_dict("the checkpoint's model", ckpt["model"], model)
    except CheckpointMismatchError as e:
        raise SystemExit(f"m2f.evaluate: {path}: {e.one_line()}") from e
    model.load_state_dict(ckpt["model"])
    if env.rank == 0:
        notice = kernels_notice(cfg["kernels"], env.device)
        if notice:
            print(notice)
    loader = eval_loader(dataset, max(1, args.batch_size // env.world_size), env.rank, env.world_size,
                         args.num_workers, args.eval_images)
    metrics, examples = evaluate(model, loader, dataset.info, env.device, amp=cfg["amp"])
    if env.rank == 0:
        out = args.out or os.path.dirname(os.path.abspath(path))
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump({"checkpoint": path, "step": ckpt["step"], "split": args.split, **metrics}, f, indent=1)
        save_predictions(examples, dataset.info, os.path.join(out, f"predictions_{args.split}.png"))
        print(f"step {ckpt['step']} {args.split}: {format_metrics(metrics)}")
    cleanup_distributed()
    return metrics


if __name__ == "__main__":
    main()

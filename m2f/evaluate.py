"""Evaluate a Mask2Former: PQ (panoptic datasets), mIoU (all), mask AP (datasets with things).

    python -m m2f.evaluate --run runs/shapes_tiny            # the run's checkpoint.pt on its val split
    torchrun --nproc_per_node=8 -m m2f.evaluate --checkpoint path/to/checkpoint.pt

Predictions are upsampled to the (padded) input size and post-processed per image with
the official inference (``m2f.inference``): semantic = argmax of the per-class scores,
panoptic with thresholds 0.8 / 0.8, instances = top 100 (query, class) pairs of thing
classes. Evaluation images are resized (longest side) and padded to the run's image size;
the padding is void / ignore in the ground truth, so it never counts.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from .data import ShardSampler, collate
from .data.sample import DatasetInfo
from .inference import instance_inference, panoptic_inference, semantic_inference, upsample_masks
from .metrics import MaskAP, PanopticQuality, SemanticIoU

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def eval_loader(dataset, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                max_images: Optional[int] = None) -> DataLoader:
    """Every image (or the first ``max_images``) once across all ranks."""
    size = len(dataset) if max_images is None else min(max_images, len(dataset))
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(size, rank=rank, world_size=world_size),
                      num_workers=num_workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
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
        masks = upsample_masks(out["pred_masks"].float(), padded)[..., :h, :w]
        for b in range(images.shape[0]):
            mask_cls, mask_pred = out["pred_logits"][b].float(), masks[b]
            sem = semantic_inference(mask_cls, mask_pred).argmax(0).cpu()
            sem_metric.update(sem, batch["sem_seg"][b])
            example = {"image": batch["images"][b], "sem_seg": batch["sem_seg"][b], "pred_sem_seg": sem}
            if pq is not None:
                pan, segments = panoptic_inference(mask_cls, mask_pred, thing_ids=info.thing_ids)
                pan = pan.cpu()
                pq.update(pan, segments, batch["pan_seg"][b], batch["segments"][b])
                example.update(pan_seg=batch["pan_seg"][b], segments=batch["segments"][b],
                               pred_pan_seg=pan, pred_segments=segments)
            if ap is not None:
                inst = instance_inference(mask_cls, mask_pred, thing_ids=info.thing_ids)
                gt_masks, gt_labels, gt_crowd = instance_ground_truth(batch["pan_seg"][b], batch["segments"][b])
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
    p.add_argument("--eval-images", type=int, help="evaluate only the first N images")
    p.add_argument("--batch-size", type=int, default=8, help="global batch size")
    p.add_argument("--kernels", choices=("reference", "fused"), help="override the run's kernels")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), help="override the run's autocast mode")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", help="folder for eval.json and the prediction plot (default: the run folder)")
    return p.parse_args(argv)


def main(argv=None) -> Dict[str, float]:
    from .data import build_dataset
    from .plots import save_predictions
    from .train import build_model_from_config, cleanup_distributed, kernels_notice, setup_distributed

    args = parse_args(argv)
    env = setup_distributed(args.device)
    path = args.checkpoint or os.path.join(args.run, "checkpoint.pt")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = dict(ckpt["config"])
    for key in ("data_root", "kernels", "amp"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    dataset = build_dataset(cfg["dataset"], cfg["data_root"], args.split, cfg["image_size"], cfg["seed"])
    model = build_model_from_config(cfg, dataset.info).to(env.device)
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

"""SegFormer in ``m2f.train`` and ``m2f.evaluate``: ``--model segformer``.

    python -m m2f.train --model segformer --backbone mit_b0                # shapes; 'tiny' on a CPU
    python -m m2f.train --model segformer --backbone mit_b2 --dataset ade20k --data-root ADEChallengeData2016 \\
        --preset official --weights mit_b2.pth                            # the paper's ADE20K recipe
    torchrun --nproc_per_node=8 -m m2f.train --model segformer --backbone mit_b5 ...

Everything else is the Mask2Former run's: datasets, schedule, checkpoints, exact resume,
torchrun, ``metrics.jsonl`` and plots. A ``mit_*`` backbone implies ``--model segformer``.
What differs:

* the model is ``m2f.build_segformer(backbone, num_classes, **--model overrides)``; the
  preset's Mask2Former sizes (queries, decoder layers, ...) do not apply; ``--weights`` is an
  official MiT backbone or a whole SegFormer checkpoint (``m2f.segformer.load_segformer_weights``);
* the loss is the per-pixel cross-entropy; the training targets are the datasets' per-image
  masks turned back into a class map (pixels in no target, e.g. COCO crowd regions, are ignored);
* evaluation is per pixel (:func:`evaluate_semantic`: mIoU, fwIoU, mACC, pACC), no PQ / AP;
* ``--preset official`` means the SegFormer ADE20K recipe: 512² crops (B5: 640²), batch 16,
  160k steps, base lr 6e-4, so the MiT encoder trains at 6e-5 and the head at 6e-4 (the
  solver's backbone multiplier 0.1 is the official head x10); weight decay and the poly
  schedule stay the solver's (0.05, power 0.9, no warm-up; the paper: 0.01, power 1.0, 1500
  warm-up steps);
* the data are Mask2Former's ADE20K pipeline (``m2f.data.transforms.SemanticCrop``, no
  category-area limit; evaluation as ``m2f.evaluate``, either ``--protocol``); SegFormer's
  mmseg one rescales by ratio 0.5-2.0 of (2048, 512), crops with ``cat_max_ratio=0.75``, pads
  with 0 after normalising, and tests on (2048, 512) keep-ratio images at the original
  resolution, the scale of ``--protocol official`` on ADE20K at 512 (which resizes with PIL,
  as detectron2, and zero-pads to a multiple of 32);
* ``--kernels``, ``--mask-loss``, ``--num-queries`` and ``--cuda-graph`` are Mask2Former's;
* the default run folder is ``runs/<dataset>_<preset>_<backbone>``;
* under torchrun on CUDA the decoder's BatchNorm is SyncBatchNorm (as the official config).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Tuple

import torch

from .data.sample import DatasetInfo
from .segformer import SEGFORMERS, SegFormerOverrides, build_segformer

ARCHS = ("mask2former", "segformer")
DEFAULT_BACKBONE = "mit_b0"
# SegFormer's own values of a preset, where they differ from Mask2Former's (explicit flags win)
PRESETS = {"official": dict(image_size=512, batch_size=16, steps=160_000, lr=6e-4)}
OFFICIAL_CROP = {"mit_b5": 640}  # segformer.b5.640x640.ade.160k.py; B0-B4 crop 512
MASK2FORMER_FLAGS = ("kernels", "mask_loss", "num_queries", "cuda_graph")


def model_arch(items, backbone: Optional[str]) -> str:
    """The architecture named by ``--model`` (a bare word among the KEY=VALUE items), else
    implied by the backbone: 'segformer' for ``mit_*``, 'mask2former' otherwise."""
    words = sorted({item.strip() for item in items or () if "=" not in item})
    if len(words) > 1:
        raise SystemExit(f"--model names one architecture, got {words}")
    if words and words[0] not in ARCHS:
        raise SystemExit(f"--model expects KEY=VALUE or an architecture ({', '.join(ARCHS)}), got {words[0]!r}")
    if words:
        arch = words[0]
        if arch == "mask2former" and backbone in SEGFORMERS:
            raise SystemExit(f"--backbone {backbone} is a SegFormer encoder: use --model segformer")
        return arch
    return "segformer" if backbone in SEGFORMERS else "mask2former"


def configure(cfg: Dict, args) -> Dict:
    """A new run's configuration (``m2f.train.resolve_config``) for the architecture the
    flags name; a Mask2Former configuration is returned unchanged."""
    if model_arch(args.model, args.backbone) == "mask2former":
        return cfg
    from .train import _parse_overrides

    given = [f"--{k.replace('_', '-')}" for k in MASK2FORMER_FLAGS if getattr(args, k, None)]
    if given:
        raise SystemExit(f"{', '.join(given)}: Mask2Former options; a SegFormer run has none of them")
    backbone = args.backbone or DEFAULT_BACKBONE
    if backbone not in SEGFORMERS:
        raise SystemExit(f"--model segformer needs a MiT backbone ({', '.join(SEGFORMERS)}), got {backbone!r}")
    overrides = _parse_overrides(args.model)
    valid = {f.name for f in dataclasses.fields(SegFormerOverrides)} - {"weights"}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise SystemExit(f"--model {unknown[0]}=...: not a SegFormer option; valid: {', '.join(sorted(valid))}")
    cfg = dict(cfg, arch="segformer", backbone=backbone, model=overrides, kernels=None, mask_loss=None,
               num_queries=None)
    preset = dict(PRESETS.get(cfg["preset"], {}))
    if cfg["preset"] == "official" and backbone in OFFICIAL_CROP:
        preset["image_size"] = OFFICIAL_CROP[backbone]
    for key, value in preset.items():
        if getattr(args, key) is None:
            cfg[key] = value
    if args.out is None:
        cfg["out"] = os.path.join("runs", f"{cfg['dataset']}_{cfg['preset']}_{backbone}")
    return cfg


def build_from_config(cfg: Dict, info: DatasetInfo) -> torch.nn.Module:
    """The SegFormer of a run configuration; weight-file errors end the run with one line."""
    from .checkpoint import CheckpointMismatchError

    if cfg.get("cuda_graph"):
        raise SystemExit("--cuda-graph: Mask2Former only")
    overrides = dict(cfg["model"])
    try:
        model = build_segformer(cfg["backbone"], num_classes=info.num_classes, ignore_index=info.ignore_label,
                                weights=cfg.get("weights"), **overrides)
    except CheckpointMismatchError as e:
        raise SystemExit(f"--weights {cfg['weights']}: " + "; ".join(str(e).splitlines())) from None
    except (OSError, RuntimeError) as e:
        if not cfg.get("weights"):
            raise
        raise SystemExit(f"--weights {cfg['weights']}: cannot read it ({e})") from None
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1 and torch.distributed.get_backend() == "nccl":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


@torch.no_grad()
def evaluate_semantic(model: torch.nn.Module, loader, info: DatasetInfo, device: torch.device, *,
                      amp: str = "off", num_examples: int = 4) -> Tuple[Dict[str, float], List[Dict]]:
    """``m2f.evaluate.evaluate`` for per-pixel models (``model.task == 'semantic'``): the
    argmax of ``model.semantic_logits`` (cropped to the image, resized to the batch's
    ``output_sizes`` as ``sem_seg_postprocess``: both protocols of ``m2f.evaluate``) against
    ``sem_seg`` -> (mIoU, fwIoU, mACC, pACC merged across ranks, this rank's first
    ``num_examples`` images with their predictions)."""
    from .evaluate import autocast, example_image
    from .inference import sem_seg_postprocess
    from .metrics import SemanticIoU

    was_training = model.training
    model.eval()
    metric = SemanticIoU(info.num_classes, info.ignore_label)
    examples: List[Dict] = []
    for batch in loader:
        images = batch["images"].to(device, non_blocking=True).float()
        with autocast(device, amp):
            logits = model.semantic_logits(images)
        for b in range(images.shape[0]):
            image_size = batch["image_sizes"][b] if "image_sizes" in batch else images.shape[-2:]
            oh, ow = batch["output_sizes"][b] if "output_sizes" in batch else image_size
            # the scores without the dataset's padding, at the size the labels are compared at
            pred = sem_seg_postprocess(logits[b].float(), image_size, oh, ow).argmax(0).cpu()
            sem_gt = batch["sem_seg"][b][:oh, :ow]
            metric.update(pred, sem_gt)
            if len(examples) < num_examples:
                examples.append({"image": example_image(batch["images"][b], image_size, (oh, ow)), "sem_seg": sem_gt,
                                 "pred_sem_seg": pred})
    metric.sync()
    metrics = metric.compute()
    metrics.pop("IoU", None)
    model.train(was_training)
    return metrics, examples


__all__ = ["ARCHS", "model_arch", "configure", "build_from_config", "evaluate_semantic"]

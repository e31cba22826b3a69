"""m2f: a faithful Mask2Former whose hotspots run the official way or on m2f_kernels.

    from m2f import build_model
    model = build_model(backbone="resnet50", num_classes=133, kernels="fused")
    model.train(); losses = model(images, targets)      # weighted losses, sum = total
    model.eval(); out = model(images)                   # pred_logits, pred_masks

See :func:`build_model` for the configuration and ``m2f.inference`` for post-processing.
SegFormer (MiT-B0..B5, semantic segmentation) beside it: :func:`build_segformer` (``m2f.segformer``).
"""
from .build import BACKBONES, Overrides, build_criterion, build_model
from .checkpoint import (
    CheckpointMismatchError,
    load_backbone_weights,
    load_official_checkpoint,
    save_official_checkpoint,
    to_official_state_dict,
)
from .kernels import KERNELS, get_kernels, set_kernels
from .model import Mask2Former
from .segformer import SegFormer, build_segformer, load_segformer_weights

__all__ = [
    "build_model", "build_criterion", "Overrides", "BACKBONES", "Mask2Former", "KERNELS", "set_kernels", "get_kernels",
    "load_backbone_weights", "load_official_checkpoint", "save_official_checkpoint", "to_official_state_dict",
    "CheckpointMismatchError", "build_segformer", "SegFormer", "load_segformer_weights",
]

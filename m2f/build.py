"""``build_model``: the official Mask2Former configurations, shrinkable for tests."""
from __future__ import annotations

import collections.abc
import dataclasses
import numbers
import os
import typing
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from .backbone import BACKBONES, SWINS, build_backbone
from .criterion import SetCriterion
from .kernels import check_kernels, set_kernels
from .matcher import MASK_LOSSES, HungarianMatcher
from .model import Mask2Former, MaskFormerHead
from .pixel_decoder import MSDeformAttnPixelDecoder
from .transformer_decoder import MultiScaleMaskedTransformerDecoder


def checked_overrides(cls, overrides: dict, caller: str):
    """``cls(**overrides)`` (a dataclass of a builder's optional settings), or a TypeError
    naming the unknown keys and the valid ones, or the first value whose type does not fit
    its field's annotation (a sequence may be a list or a tuple, a float field takes an int)."""
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise TypeError(f"{caller} got unknown overrides {unknown}; valid: {sorted(valid)}")
    hints = typing.get_type_hints(cls)
    for key, value in overrides.items():
        if not _fits(value, hints[key]):
            shown = str(hints[key]).replace("typing.", "")
            raise TypeError(f"{caller}: override {key} must be {shown}, got {value!r} ({type(value).__name__})")
    return cls(**overrides)


def _fits(value, hint) -> bool:
    """Whether ``value`` fits the type annotation ``hint`` (the forms Overrides classes use)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, (str, os.PathLike))
    if origin in (tuple, collections.abc.Sequence):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and Ellipsis not in args:  # Tuple[int, str]: one type per item
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return all(_fits(v, args[0]) for v in value)
    return True


@dataclass
class Overrides:
    """Everything ``build_model`` accepts besides its named arguments (official defaults)."""

    # transformer decoder
    hidden_dim: int = 256
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 9  # official DEC_LAYERS = 10 counts the prediction on the queries
    pre_norm: bool = False
    enforce_input_project: bool = False
    # pixel decoder (conv_dim / mask_dim default to hidden_dim)
    conv_dim: Optional[int] = None
    mask_dim: Optional[int] = None
    norm: str = "GN"
    enc_layers: int = 6
    enc_dim_feedforward: int = 1024
    enc_n_points: int = 4
    dropout: float = 0.0
    transformer_in_features: Tuple[str, ...] = ("res3", "res4", "res5")
    common_stride: int = 4
    pixel_decoder_fp32: Optional[bool] = None  # None: only with kernels='reference' (official)
    # criterion
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    deep_supervision: bool = True
    mask_head: str = "points"  # 'points': mask-free fused training (mask_loss='point'); 'logits': official
    max_targets: Optional[int] = None  # target slots per image in the fused criterion (None: the batch's most)
    # input
    size_divisibility: int = 32
    pixel_mean: Tuple[float, ...] = (123.675, 116.280, 103.530)
    pixel_std: Tuple[float, ...] = (58.395, 57.120, 57.375)
    # backbone (None: the named backbone's standard value)
    backbone_width: Optional[int] = None
    backbone_depths: Optional[Sequence[int]] = None
    swin_num_heads: Optional[Sequence[int]] = None
    swin_window_size: Optional[int] = None
    drop_path_rate: float = 0.3
    backbone_weights: Optional[str] = None  # local file: torchvision ResNet / official Swin state dict


def build_model(backbone: str = "resnet50", num_classes: int = 133, num_queries: Optional[int] = None,
                kernels: str = "reference", mask_loss: str = "point", **overrides) -> Mask2Former:
    """A Mask2Former with the official configuration of ``backbone``.

    Args:
        backbone: 'resnet18', 'resnet50', 'resnet101', 'swin_tiny', 'swin_small', 'swin_base',
            'swin_large' (or 'swin_t/s/b/l').
        num_classes: K, without the no-object class (133 for COCO panoptic).
        num_queries: None means the official value: 200 for Swin-L, 100 otherwise (the panoptic
            and instance configs; the semantic ones, ADE20K's included, keep 100 for Swin-L).
        kernels: 'reference' (the official code path) or 'fused' (m2f_kernels ops).
        mask_loss: 'point' (official, sampled points) or 'full' (whole masks, as MaskFormer).
        **overrides: fields of :class:`Overrides` (e.g. hidden_dim, dec_layers, enc_layers,
            num_points, backbone_width, backbone_depths) for small test configurations.
    """
    check_kernels(kernels)
    if mask_loss not in MASK_LOSSES:
        raise ValueError(f"mask_loss must be one of {MASK_LOSSES}, got {mask_loss!r}")
    cfg = checked_overrides(Overrides, overrides, "build_model")
    if num_queries is None:
        num_queries = 200 if SWINS.get(backbone) == "large" else 100
    conv_dim = cfg.conv_dim or cfg.hidden_dim
    mask_dim = cfg.mask_dim or cfg.hidden_dim

    body = build_backbone(backbone, width=cfg.backbone_width, depths=cfg.backbone_depths,
                          num_heads=cfg.swin_num_heads, window_size=cfg.swin_window_size,
                          drop_path_rate=cfg.drop_path_rate)
    if cfg.backbone_weights is not None:
        from .checkpoint import load_backbone_weights

        load_backbone_weights(body, cfg.backbone_weights)
    pixel_decoder = MSDeformAttnPixelDecoder(
        body.output_shape(), conv_dim=conv_dim, mask_dim=mask_dim, norm=cfg.norm,
        transformer_dropout=cfg.dropout, transformer_nheads=cfg.nheads,
        transformer_dim_feedforward=cfg.enc_dim_feedforward, transformer_enc_layers=cfg.enc_layers,
        transformer_n_points=cfg.enc_n_points, transformer_in_features=cfg.transformer_in_features,
        common_stride=cfg.common_stride, fp32=cfg.pixel_decoder_fp32,
    )
    predictor = MultiScaleMaskedTransformerDecoder(
        conv_dim, num_classes=num_classes, hidden_dim=cfg.hidden_dim, num_queries=num_queries,
        nheads=cfg.nheads, dim_feedforward=cfg.dim_feedforward, dec_layers=cfg.dec_layers,
        pre_norm=cfg.pre_norm, mask_dim=mask_dim, enforce_input_project=cfg.enforce_input_project,
        mask_head=cfg.mask_head if mask_loss == "point" else "logits",
    )
    model = Mask2Former(body, MaskFormerHead(pixel_decoder, predictor, num_classes),
                        _criterion(cfg, num_classes, mask_loss),
                        num_queries=num_queries, size_divisibility=cfg.size_divisibility,
                        pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std,
                        deep_supervision=cfg.deep_supervision, max_targets=cfg.max_targets)
    return set_kernels(model, kernels)


def build_criterion(num_classes: int = 133, kernels: str = "reference", mask_loss: str = "point",
                    **overrides) -> SetCriterion:
    """The official ``SetCriterion`` and its matcher alone (what ``build_model`` gives its
    model), with ``build_model``'s criterion overrides (num_points, class_weight,
    deep_supervision, dec_layers for the auxiliary weights, ...)."""
    check_kernels(kernels)
    if mask_loss not in MASK_LOSSES:
        raise ValueError(f"mask_loss must be one of {MASK_LOSSES}, got {mask_loss!r}")
    return set_kernels(_criterion(checked_overrides(Overrides, overrides, "build_criterion"), num_classes, mask_loss),
                       kernels)


def _criterion(cfg: Overrides, num_classes: int, mask_loss: str) -> SetCriterion:
    matcher = HungarianMatcher(cfg.class_weight, cfg.mask_weight, cfg.dice_weight, cfg.num_points, mask_loss)
    base_weights = {"loss_ce": cfg.class_weight, "loss_mask": cfg.mask_weight, "loss_dice": cfg.dice_weight}
    weight_dict = dict(base_weights)
    if cfg.deep_supervision:  # one aux copy per decoder layer (the predictions before the last)
        for i in range(cfg.dec_layers):
            weight_dict.update({f"{k}_{i}": v for k, v in base_weights.items()})
    return SetCriterion(num_classes, matcher, weight_dict, cfg.no_object_weight, cfg.num_points,
                        cfg.oversample_ratio, cfg.importance_sample_ratio, mask_loss)


__all__ = ["build_model", "build_criterion", "Overrides", "BACKBONES"]

"""Backbones: ResNet-18/50/101 (torchvision names) and Swin-T/S/B/L (official Swin names).

Each returns {"res2": ..., "res5": ...} at strides 4..32 and has ``output_shape()``
-> {name: (channels, stride)}.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn as nn

from .resnet import ResNet, FrozenBatchNorm2d, calibrate_frozen_bn
from .swin import VARIANTS as SWIN_VARIANTS, SwinTransformer

RESNETS = {"resnet18": 18, "resnet50": 50, "resnet101": 101}
SWINS = {f"swin_{v}": v for v in SWIN_VARIANTS} | {f"swin_{v[0]}": v for v in SWIN_VARIANTS}
BACKBONES = tuple(RESNETS) + tuple(f"swin_{v}" for v in SWIN_VARIANTS)


def build_backbone(name: str, *, width: Optional[int] = None, depths: Optional[Sequence[int]] = None,
                   num_heads: Optional[Sequence[int]] = None, window_size: Optional[int] = None,
                   drop_path_rate: float = 0.3) -> nn.Module:
    """A backbone by name ('resnet18/50/101', 'swin_tiny/small/base/large' or 'swin_t/s/b/l').

    ``width`` / ``depths`` shrink the network for tests: the ResNet stem width and blocks
    per stage, or the Swin embed dim and blocks per stage (Swin heads then default to
    one per 32 channels). ``num_heads`` / ``window_size`` / ``drop_path_rate`` are Swin only.
    """
    if name in RESNETS:
        if num_heads is not None or window_size is not None:
            raise ValueError("num_heads / window_size apply to Swin backbones only")
        return ResNet(RESNETS[name], width=64 if width is None else width, layers=depths)
    if name in SWINS:
        embed_dim, d, heads, ws = SWIN_VARIANTS[SWINS[name]]
        if width is not None:
            embed_dim = width
            heads = num_heads or tuple(max(1, width * 2 ** i // 32) for i in range(4))
        return SwinTransformer(embed_dim, tuple(depths or d), tuple(num_heads or heads),
                               window_size or ws, drop_path_rate=drop_path_rate)
    raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")


__all__ = ["build_backbone", "BACKBONES", "ResNet", "SwinTransformer", "FrozenBatchNorm2d",
           "calibrate_frozen_bn"]

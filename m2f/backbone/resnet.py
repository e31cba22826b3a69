"""ResNet-18/50/101 backbones returning res2..res5 (strides 4..32), torchvision key names.

The official Mask2Former ResNet config (detectron2 ``build_resnet_backbone``: basic stem,
stride in the 3x3 conv, FrozenBN, FREEZE_AT 0) is the torchvision architecture with
frozen batch norm, so the modules carry torchvision's names (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.0`` ...) and a torchvision state dict loads as is
(see :mod:`m2f.checkpoint` for the detectron2 names of the official checkpoints).
The norm is FrozenBN for every dataset: the official ADE20K R101 semantic config (and the
Cityscapes ones) set ``RESNETS.NORM: SyncBN``, trainable batch norm, which is not provided.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from m2f_kernels.nn.shape_cache import cached

DEPTHS = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine terms, all buffers (detectron2's FrozenBN).

    ``x * scale + bias`` with detectron2's per-channel scale and bias, which depend on the
    buffers only: they are computed once per buffer state (the same values, two kernel
    launches a call instead of seven). A buffer changed in place (load_state_dict,
    calibration) or replaced (``.to()``) is seen by its version and identity.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, bias = self._affine(x.dtype)
        return x * scale + bias

    def _affine(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scale, bias), each [1, C, 1, 1] in ``dtype``."""
        buffers = (self.weight, self.bias, self.running_mean, self.running_var)
        if torch.compiler.is_compiling() or any(b.requires_grad for b in buffers):
            return self._compute_affine(dtype)
        cache = self.__dict__.setdefault("_affine_cache", {})
        # the cache is stamped on the buffers it was made from: a new tensor (even one reusing
        # a freed id()) has no stamp, and the cache starts over
        if not all(getattr(b, "_m2f_affine", None) is cache for b in buffers):
            cache.clear()
            for b in buffers:
                b._m2f_affine = cache
        return cached(cache, (dtype, self.eps, *(b._version for b in buffers)), lambda: self._compute_affine(dtype),
                      max_entries=2)

    def _compute_affine(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return scale.to(dtype).view(1, -1, 1, 1), bias.to(dtype).view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv(cin, width, 3, stride), FrozenBatchNorm2d(width)
        self.conv2, self.bn2 = _conv(width, cout, 3), FrozenBatchNorm2d(cout)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv(cin, width, 1), FrozenBatchNorm2d(width)
        self.conv2, self.bn2 = _conv(width, width, 3, stride), FrozenBatchNorm2d(width)  # stride in 3x3
        self.conv3, self.bn3 = _conv(width, cout, 1), FrozenBatchNorm2d(cout)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def _shortcut(cin: int, cout: int, stride: int):
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv(cin, cout, 1, stride), FrozenBatchNorm2d(cout))


class ResNet(nn.Module):
    """forward(x [B, 3, H, W]) -> {"res2": stride 4, ..., "res5": stride 32}.

    Args:
        depth: 18, 50 or 101 (picks the block and, unless ``layers`` is given, the stage depths).
        width: stem channels and first-stage width (64 in the standard nets; smaller for tests).
        layers: blocks per stage, overriding the depth's default (for tiny test models).
    """

    def __init__(self, depth: int = 50, width: int = 64, layers: Sequence[int] = None):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        kind, default_layers = DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        layers = tuple(default_layers if layers is None else layers)
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)
        cin = width
        self._channels = {}
        for i, n in enumerate(layers):
            stage_width = width * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, stage_width, stride=2 if (j == 0 and i > 0) else 1))
                cin = stage_width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self._channels[f"res{i + 2}"] = cin
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def output_shape(self) -> Dict[str, tuple]:
        """{name: (channels, stride)} of the returned features."""
        return {name: (c, 2 ** (i + 2)) for i, (name, c) in enumerate(self._channels.items())}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        out = {}
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            out[f"res{i + 2}"] = x
        return out


@torch.no_grad()
def calibrate_frozen_bn(module: nn.Module, *inputs, **kwargs) -> None:
    """Set every FrozenBatchNorm2d's statistics to those of its input on one forward pass.

    A randomly initialised network with identity frozen norms has activations that grow
    block after block; calibrating on a batch gives realistic activations for tests and
    benchmarks that run without pretrained weights. ``module(*inputs, **kwargs)`` is run
    once in eval mode (training mode is restored).
    """
    hooks = []

    def set_stats(bn, args):
        x = args[0].float()
        bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            hooks.append(m.register_forward_pre_hook(set_stats))
    was_training = module.training
    module.eval()
    try:
        module(*inputs, **kwargs)
    finally:
        for h in hooks:
            h.remove()
        module.train(was_training)

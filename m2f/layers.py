"""Small building blocks shared by the backbones, pixel decoder and transformer decoder."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from m2f_kernels.nn.shape_cache import cached


class Conv2d(nn.Conv2d):
    """detectron2's Conv2d: a convolution followed by an optional norm and activation.

    The norm is a child named ``norm``, so keys read ``<name>.weight``, ``<name>.norm.weight``
    as in the official checkpoints.
    """

    def __init__(self, *args, norm: Optional[nn.Module] = None,
                 activation: Optional[Callable] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def c2_xavier_fill(module: nn.Module) -> None:
    """fvcore's c2_xavier_fill: kaiming-uniform (a=1) weight, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the official ``MLP``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class PositionEmbeddingSine(nn.Module):
    """DETR's normalised sine position embedding, as in Mask2Former's position_encoding.py.

    forward(x [B, C, H, W]) -> [B, 2 * num_pos_feats, H, W] float32 (y features, then x),
    the same for every image: one [1, ...] embedding per size and device, made once
    (:func:`m2f_kernels.nn.shape_cache.cached`) and expanded over the batch; never modify it
    in place.
    """

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000,
                 normalize: bool = False, scale: Optional[float] = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("normalize should be True if scale is passed")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self._embeddings: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        embedding = cached(self._embeddings, (h, w, str(x.device)), lambda: self._embed(h, w, x.device))
        return embedding.expand(b, -1, -1, -1)

    def _embed(self, h: int, w: int, device) -> torch.Tensor:
        """[1, 2 * num_pos_feats, H, W]."""
        # no padding mask: every position is valid, so the cumsums are plain ranges
        not_mask = torch.ones((1, h, w), device=device, dtype=torch.bool)
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PixelNormalizer(nn.Module):
    """Input normalisation shared by the segmentation models: ``preprocess(images)`` =
    (images - mean) / std, zero-padded on the right/bottom to ``size_divisibility``.
    ``pixel_mean`` / ``pixel_std`` are non-persistent buffers (not in checkpoints)."""

    def _init_pixels(self, pixel_mean, pixel_std, size_divisibility: int) -> None:
        self.size_divisibility = size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(images - mean) / std, zero-padded on the right/bottom to ``size_divisibility``."""
        x = (images - self.pixel_mean) / self.pixel_std
        d = self.size_divisibility
        if d > 1:
            x = F.pad(x, (0, (-x.shape[-1]) % d, 0, (-x.shape[-2]) % d))
        return x

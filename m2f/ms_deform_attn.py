"""MSDeformAttn: the official multi-scale deformable attention layer, with the kernels switch.

Parameters and their init are Deformable DETR's (``sampling_offsets``, ``attention_weights``,
``value_proj``, ``output_proj``). ``kernels='reference'`` runs the official
softmax + ``ms_deform_attn_core_pytorch`` (grid_sample); ``'fused'`` runs
``m2f_kernels.ms_deform_attn(..., softmax=True)`` on the logits.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import m2f_kernels

from .kernels import KernelSwitch


def ms_deform_attn_core_pytorch(value, spatial_shapes, sampling_locations, attention_weights):
    """The official pure-PyTorch core.

    value [B, S, H, D]; spatial_shapes [L, 2]; sampling_locations [B, Lq, H, L, P, 2] in
    [0, 1]; attention_weights [B, Lq, H, L, P] (already softmaxed) -> [B, Lq, H*D].
    """
    b, _, h, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = [(int(hh), int(ww)) for hh, ww in spatial_shapes.tolist()]
    value_list = value.split([hh * ww for hh, ww in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (hh, ww) in enumerate(shapes):
        value_l = value_list[lvl].flatten(2).transpose(1, 2).reshape(b * h, d, hh, ww)
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # [B*H, Lq, P, 2]
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # [B*H, D, Lq, P]
    weights = attention_weights.transpose(1, 2).reshape(b * h, 1, lq, num_levels * num_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(b, h * d, lq)
    return out.transpose(1, 2).contiguous()


class MSDeformAttn(KernelSwitch, nn.Module):
    """Multi-scale deformable attention (official constructor and forward).

    forward(query [B, Lq, C], reference_points [B, Lq, L, 2], input_flatten [B, S, C],
    input_spatial_shapes [L, 2], input_level_start_index [L], input_padding_mask [B, S] or
    None) -> [B, Lq, C].
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes,
                input_level_start_index, input_padding_mask: Optional[torch.Tensor] = None):
        b, lq, _ = query.shape
        s = input_flatten.shape[1]
        h, lv, p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(b, s, h, self.d_model // h)
        offsets = self.sampling_offsets(query).view(b, lq, h, lv, p, 2)
        logits = self.attention_weights(query).view(b, lq, h, lv * p)
        if reference_points.shape[-1] != 2:
            raise ValueError("only 2-d reference points are used by the Mask2Former pixel decoder")
        normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        if self.fused:
            out = m2f_kernels.ms_deform_attn(value, input_spatial_shapes, input_level_start_index,
                                             locations, logits.view(b, lq, h, lv, p), softmax=True)
        else:
            weights = F.softmax(logits, -1).view(b, lq, h, lv, p)
            out = ms_deform_attn_core_pytorch(value, input_spatial_shapes, locations, weights)
        return self.output_proj(out)

"""MSDeformAttn: the official multi-scale deformable attention layer, with the kernels switch.

Parameters, init and forward are ``m2f_kernels.nn.MSDeformAttn``'s (Deformable DETR's).
``kernels='reference'`` runs the official softmax + ``ms_deform_attn_core_pytorch``
(grid_sample); ``'fused'`` runs ``m2f_kernels.ms_deform_attn(..., softmax=True)`` on the logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import m2f_kernels
import m2f_kernels.nn

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


class MSDeformAttn(KernelSwitch, m2f_kernels.nn.MSDeformAttn):
    """Multi-scale deformable attention: ``m2f_kernels.nn.MSDeformAttn`` (official
    constructor, parameters, init and forward) whose core follows the kernels switch.

    forward(query [B, Lq, C], reference_points [B, Lq, L, 2], input_flatten [B, S, C],
    input_spatial_shapes [L, 2], input_level_start_index [L], input_padding_mask [B, S] or
    None) -> [B, Lq, C].
    """

    def _attend(self, value, spatial_shapes, level_start_index, sampling_locations, attention_logits):
        if self.fused:
            return m2f_kernels.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                              attention_logits, softmax=True)
        b, lq, h, lv, p = attention_logits.shape
        weights = F.softmax(attention_logits.reshape(b, lq, h, lv * p), -1).view(b, lq, h, lv, p)
        return ms_deform_attn_core_pytorch(value, spatial_shapes, sampling_locations, weights)

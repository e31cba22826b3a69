"""Reference multi-scale deformable attention (Deformable DETR's ``ms_deform_attn_core_pytorch``).

value [B, S, H, D]; spatial_shapes [L, 2] (H_l, W_l); sampling_locations
[B, Lq, H, L, P, 2] as (x, y) in [0, 1]; attention_weights [B, Lq, H, L, P]
(or logits over the L*P entries when ``softmax`` is set); out [B, Lq, H*D].
"""
from __future__ import annotations

import torch

from .._validation import level_shapes
from ._common import compute_dtype, grid_from_coords, grid_sample, grid_sample_backward


def _weights(attention_weights, softmax: bool, ct):
    w = attention_weights.to(ct)
    if softmax:
        b, lq, h, l, p = w.shape
        w = torch.softmax(w.reshape(b, lq, h, l * p), dim=-1).reshape(b, lq, h, l, p)
    return w


def _levels(value, spatial_shapes, ct):
    """Per level: value as [B*H, D, H_l, W_l] in the compute dtype."""
    b, _, h, d = value.shape
    shapes = level_shapes(spatial_shapes)
    chunks = value.to(ct).split([hh * ww for hh, ww in shapes], dim=1)
    return shapes, [c.permute(0, 2, 3, 1).reshape(b * h, d, hh, ww) for c, (hh, ww) in zip(chunks, shapes)]


def _level_grid(sampling_locations, level, ct):
    """[B*H, Lq, P, 2] grid_sample grid of one level."""
    loc = sampling_locations[:, :, :, level].to(ct)  # [B, Lq, H, P, 2]
    return grid_from_coords(loc.transpose(1, 2).flatten(0, 1))


def _sampled(value, spatial_shapes, sampling_locations, ct):
    """[B*H, D, Lq, L, P]: bilinear samples of every (query, head, level, point)."""
    _, levels = _levels(value, spatial_shapes, ct)
    return torch.stack(
        [grid_sample(v, _level_grid(sampling_locations, i, ct)) for i, v in enumerate(levels)], dim=-2
    )


def ms_deform_attn_fwd(value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights, softmax: bool = False):
    """out [B, Lq, H*D] in value.dtype."""
    ct = compute_dtype(value)
    b, lq, h, l, p, _ = sampling_locations.shape
    d = value.shape[-1]
    w = _weights(attention_weights, softmax, ct).transpose(1, 2).reshape(b * h, 1, lq, l, p)
    out = (_sampled(value, spatial_shapes, sampling_locations, ct) * w).sum((-1, -2))
    return out.view(b, h * d, lq).transpose(1, 2).to(value.dtype).contiguous()


def ms_deform_attn_bwd(grad_out, value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights, softmax: bool = False, deterministic: bool = False):
    """(grad_value, grad_sampling_locations, grad_attention_weights), shaped like the inputs.

    With ``softmax`` the weight gradient is taken with respect to the logits.
    ``deterministic`` is accepted for interface parity: on the CPU this path is
    deterministic; on CUDA it inherits grid_sample's atomics.
    """
    ct = compute_dtype(value)
    b, lq, h, l, p, _ = sampling_locations.shape
    s, d = value.shape[1], value.shape[-1]
    g = grad_out.to(ct).view(b, lq, h, d).permute(0, 2, 3, 1).reshape(b * h, d, lq)
    w = _weights(attention_weights, softmax, ct)
    w_bh = w.transpose(1, 2).reshape(b * h, lq, l, p)

    shapes, levels = _levels(value, spatial_shapes, ct)
    grad_levels, grad_grids, grad_w = [], [], []
    for i, v in enumerate(levels):
        grid = _level_grid(sampling_locations, i, ct)
        sampled = grid_sample(v, grid)  # [B*H, D, Lq, P]
        grad_w.append((g.unsqueeze(-1) * sampled).sum(1))  # [B*H, Lq, P]
        gs = g.unsqueeze(-1) * w_bh[:, None, :, i, :]
        gv, gg = grid_sample_backward(gs, v, grid, True, True)
        hh, ww = shapes[i]
        grad_levels.append(gv.reshape(b, h, d, hh * ww).permute(0, 3, 1, 2))
        grad_grids.append(gg)  # [B*H, Lq, P, 2]

    grad_value = torch.cat(grad_levels, dim=1) if grad_levels else value.new_zeros(b, s, h, d, dtype=ct)
    # d(grid)/d(loc) = 2
    grad_loc = 2.0 * torch.stack(grad_grids, dim=2).view(b, h, lq, l, p, 2).transpose(1, 2)
    grad_w = torch.stack(grad_w, dim=2).view(b, h, lq, l, p).transpose(1, 2)
    if softmax:
        flat_w, flat_g = w.reshape(b, lq, h, l * p), grad_w.reshape(b, lq, h, l * p)
        grad_w = (flat_w * (flat_g - (flat_g * flat_w).sum(-1, keepdim=True))).view(b, lq, h, l, p)
    return (
        grad_value.to(value.dtype).contiguous(),
        grad_loc.to(sampling_locations.dtype).contiguous(),
        grad_w.to(attention_weights.dtype).contiguous(),
    )

"""Triton ``point_mask_logits``: mask logits at points from mask embeddings and mask features.

``point_mask_logits_fwd/bwd``: mask_embed [B, Q, C], mask_features [B, C, H, W], coords
[N, P, 2], batch_index / query_index [N] (contract: ``m2f_kernels.reference.point_mask_logits``).
One program per (mask, block of points): the bilinear taps of its points are computed once
and reused for every channel block; each channel block gathers the four taps of
[BLOCK_P, BLOCK_C] features (contiguous in C for channels-last features) and reduces them
against the mask's embedding. The [N, C, P] samples are never stored: the backward
recomputes them and scatters g * embed into the features' gradient (fp32 atomics, so the
feature gradient is not bitwise repeatable) and reduces g * samples into the embedding's.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._launch import cdiv, chosen, next_pow2
from ._point_sample import _gather, _load_coords, _scatter, _taps


@dataclasses.dataclass(frozen=True)
class PointMaskLogitsConfig:
    """Launch configuration: points per program, channels per step, warps."""

    block_p: int = 64
    block_c: int = 32
    num_warps: int = 4


def point_mask_logits_config(mask_embed) -> PointMaskLogitsConfig:
    """The default: channel blocks no wider than the channels (a power of 2, >= 16)."""
    return PointMaskLogitsConfig(block_c=min(32, max(16, next_pow2(mask_embed.shape[-1]))))


@triton.jit
def _program_points(coords, bidx, qidx, P, H, W, s_cn, s_cp, s_cxy, BLOCK_P: tl.constexpr):
    """This program's mask n = (b, q), its points offs (pm: in range) and their :func:`_taps`
    as [BLOCK_P, 1] columns, to broadcast over channels."""
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = offs < P
    b = tl.load(bidx + n).to(tl.int64)
    q = tl.load(qidx + n).to(tl.int64)
    cx, cy = _load_coords(coords + n * s_cn, offs, s_cp, s_cxy, pm)
    x0, y0, wx0, wx1, wy0, wy1, vx0, vx1, vy0, vy1 = _taps(cx, cy, H, W)
    return (n, offs, pm, b, q, x0[:, None], y0[:, None], wx0[:, None], wx1[:, None], wy0[:, None], wy1[:, None],
            vx0[:, None], vx1[:, None], vy0[:, None], vy1[:, None])


@triton.jit
def _fwd_kernel(
    embed, features, coords, bidx, qidx, out, P, C, H, W,
    s_eb, s_eq, s_ec, s_fb, s_fc, s_fh, s_fw, s_cn, s_cp, s_cxy,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (N, cdiv(P, BLOCK_P)): out [N, P] fp32."""
    n, offs, pm, b, q, x0, y0, wx0, wx1, wy0, wy1, vx0, vx1, vy0, vy1 = _program_points(
        coords, bidx, qidx, P, H, W, s_cn, s_cp, s_cxy, BLOCK_P)
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cm = cs < C
        e = tl.load(embed + b * s_eb + q * s_eq + cs * s_ec, mask=cm, other=0).to(tl.float32)
        v = _gather(features + b * s_fb + cs[None, :] * s_fc, s_fh, s_fw, x0, y0, wx0, wx1, wy0, wy1,
                    vx0, vx1, vy0, vy1, pm[:, None] & cm[None, :])
        acc += tl.sum(v * e[None, :], 1)
    tl.store(out + n * P + offs, acc, mask=pm)


@triton.jit
def _bwd_kernel(
    grad_out, embed, features, coords, bidx, qidx, grad_embed, grad_features, P, C, H, W,
    s_eb, s_eq, s_ec, s_fb, s_fc, s_fh, s_fw, s_cn, s_cp, s_cxy, s_gon, s_gop,
    s_geb, s_geq, s_gfb, s_gfc, s_gfh, s_gfw,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (N, cdiv(P, BLOCK_P)): atomically adds into the fp32 grad_embed [B, Q, C] and
    grad_features [B, C, H, W] (strides s_ge*, s_gf*)."""
    n, offs, pm, b, q, x0, y0, wx0, wx1, wy0, wy1, vx0, vx1, vy0, vy1 = _program_points(
        coords, bidx, qidx, P, H, W, s_cn, s_cp, s_cxy, BLOCK_P)
    g = tl.load(grad_out + n * s_gon + offs * s_gop, mask=pm, other=0).to(tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cm = cs < C
        m2 = pm[:, None] & cm[None, :]
        e = tl.load(embed + b * s_eb + q * s_eq + cs * s_ec, mask=cm, other=0).to(tl.float32)
        v = _gather(features + b * s_fb + cs[None, :] * s_fc, s_fh, s_fw, x0, y0, wx0, wx1, wy0, wy1,
                    vx0, vx1, vy0, vy1, m2)
        tl.atomic_add(grad_embed + b * s_geb + q * s_geq + cs, tl.sum(g[:, None] * v, 0), mask=cm, sem="relaxed")
        _scatter(grad_features + b * s_gfb + cs[None, :] * s_gfc, s_gfh, s_gfw, g[:, None] * e[None, :],
                 x0, y0, wx0, wx1, wy0, wy1, vx0, vx1, vy0, vy1, m2)


def _launch_args(mask_embed, mask_features, coords, batch_index, query_index):
    tensors = (mask_embed, mask_features, coords, batch_index.contiguous(), query_index.contiguous())
    sizes = (coords.shape[1], mask_embed.shape[2], *mask_features.shape[-2:])
    strides = (*mask_embed.stride(), *mask_features.stride(), *coords.stride())
    return tensors, sizes, strides


def point_mask_logits_fwd(mask_embed, mask_features, coords, batch_index, query_index, *,
                          config: "PointMaskLogitsConfig | None" = None):
    """[N, P] in mask_embed.dtype. ``config``: the launch configuration (None: the default)."""
    config = chosen(config, PointMaskLogitsConfig, point_mask_logits_config, mask_embed)
    n, p = coords.shape[:2]
    out = torch.empty((n, p), dtype=torch.float32, device=mask_embed.device)
    tensors, sizes, strides = _launch_args(mask_embed, mask_features, coords, batch_index, query_index)
    _fwd_kernel[(n, cdiv(p, config.block_p))](
        *tensors, out, *sizes, *strides,
        BLOCK_P=config.block_p, BLOCK_C=config.block_c, num_warps=config.num_warps,
    )
    return out if mask_embed.dtype == torch.float32 else out.to(mask_embed.dtype)


def point_mask_logits_bwd(grad_out, mask_embed, mask_features, coords, batch_index, query_index, *,
                          config: "PointMaskLogitsConfig | None" = None):
    """(grad_mask_embed, grad_mask_features) in the inputs' dtypes (fp32 accumulation)."""
    config = chosen(config, PointMaskLogitsConfig, point_mask_logits_config, mask_embed)
    n, p = coords.shape[:2]
    grad_embed = torch.zeros(mask_embed.shape, dtype=torch.float32, device=mask_embed.device)
    grad_features = torch.zeros(mask_features.shape, dtype=torch.float32, device=mask_features.device)
    tensors, sizes, strides = _launch_args(mask_embed, mask_features, coords, batch_index, query_index)
    _bwd_kernel[(n, cdiv(p, config.block_p))](
        grad_out, *tensors, grad_embed, grad_features, *sizes, *strides, *grad_out.stride(),
        grad_embed.stride(0), grad_embed.stride(1), *grad_features.stride(),
        BLOCK_P=config.block_p, BLOCK_C=config.block_c, num_warps=config.num_warps,
    )
    return grad_embed.to(mask_embed.dtype), grad_features.to(mask_features.dtype)

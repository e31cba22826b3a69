"""Triton point_sample and importance sampling, and the sampling helpers of every point-loss kernel.

Maps are sampled bilinearly with zero padding in the ``grid_sample(align_corners=False)``
convention (pixel = coord * size - 0.5), in fp32:

- ``point_sample_fwd(input [N, C, H, W], coords [N, P, 2]) -> [N, C, P]``
- ``uncertain_point_coords(logits [N, H, W], candidates [N, S, 2], random [N, R, 2], k)``;
  logits may be [B, Q, H, W] + (batch, query) index [N], as pred of the loss

The ``@triton.jit`` helpers below (coordinates, taps, gather, scatter) are shared with the
mask loss (``_point_mask_loss``) and the matcher cost (``_pairwise_mask_cost``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

from ._bilinear import bilinear_cell
from ._launch import cdiv, chosen


@dataclasses.dataclass(frozen=True)
class PointConfig:
    """Launch config of the per-point kernels: points per program and warps."""

    block_p: int = 256
    num_warps: int = 4


# The default; bench/sweep_point_loss.py times the alternatives.
POINT_CONFIG = PointConfig()


def point_sample_config(input) -> PointConfig:
    """The launch config of point_sample (``input``: its maps) and of the importance
    sampling's uncertainty kernel (``input``: the logits)."""
    return POINT_CONFIG


# ----------------------------------------------------------------------------- sampling


@triton.jit
def _load_coords(ptr, offs, stride_p, stride_xy, mask):
    """(x, y) fp32 [BLOCK] of the points ``offs`` of one coords row."""
    cx = tl.load(ptr + offs * stride_p, mask=mask, other=0.0).to(tl.float32)
    cy = tl.load(ptr + offs * stride_p + stride_xy, mask=mask, other=0.0).to(tl.float32)
    return cx, cy


@triton.jit
def _pred_base(bidx, qidx, n, s_b, s_q, INDEXED: tl.constexpr):
    """Element offset of matched mask n in a [B, Q, ...] map ([N, ...] is B=1, Q=N)."""
    if INDEXED:
        base = tl.load(bidx + n).to(tl.int64) * s_b + tl.load(qidx + n).to(tl.int64) * s_q
    else:
        base = n * s_q
    return base


@triton.jit
def _taps(cx, cy, H, W):
    """Bilinear taps of points (cx, cy) in [0, 1] on an H x W map.

    Returns int64 x0, y0 (the top-left tap; the others are x0 + 1, y0 + 1), fp32 weights
    wx0, wx1 (columns x0, x0 + 1), wy0, wy1 (rows y0, y0 + 1), NaN for a non-finite
    coordinate, and whether each tap lies inside the map: v00, v01, v10, v11 for
    (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1). A tap outside the map is never
    read (its load is masked: zero padding) nor written, whatever its weight, as in
    grid_sample.
    """
    fx, fy, x0f, y0f, vx0, vx1, vy0, vy1 = bilinear_cell(cx, cy, H, W)
    return (x0f.to(tl.int64), y0f.to(tl.int64), 1.0 - fx, fx, 1.0 - fy, fy,
            vy0 & vx0, vy0 & vx1, vy1 & vx0, vy1 & vx1)


@triton.jit
def _gather(ptr, stride_h, stride_w, x0, y0, wx0, wx1, wy0, wy1, v00, v01, v10, v11, mask):
    """fp32 bilinear value at the taps of :func:`_taps` (``ptr`` may be a broadcast row base);
    taps outside the map read 0, so a NaN weight gives NaN."""
    p00 = ptr + y0 * stride_h + x0 * stride_w
    t00 = tl.load(p00, mask=mask & v00, other=0).to(tl.float32)
    t01 = tl.load(p00 + stride_w, mask=mask & v01, other=0).to(tl.float32)
    t10 = tl.load(p00 + stride_h, mask=mask & v10, other=0).to(tl.float32)
    t11 = tl.load(p00 + stride_h + stride_w, mask=mask & v11, other=0).to(tl.float32)
    return wy0 * (wx0 * t00 + wx1 * t01) + wy1 * (wx0 * t10 + wx1 * t11)


@triton.jit
def _scatter(ptr, stride_h, stride_w, g, x0, y0, wx0, wx1, wy0, wy1, v00, v01, v10, v11, mask):
    """Atomically add ``g`` times each tap's weight into the fp32 map at ``ptr``: every tap
    inside the map, none outside (a non-finite coordinate has none inside)."""
    p00 = ptr + y0 * stride_h + x0 * stride_w
    tl.atomic_add(p00, g * (wy0 * wx0), mask=mask & v00, sem="relaxed")
    tl.atomic_add(p00 + stride_w, g * (wy0 * wx1), mask=mask & v01, sem="relaxed")
    tl.atomic_add(p00 + stride_h, g * (wy1 * wx0), mask=mask & v10, sem="relaxed")
    tl.atomic_add(p00 + stride_h + stride_w, g * (wy1 * wx1), mask=mask & v11, sem="relaxed")


# ----------------------------------------------------------------------------- point_sample


@triton.jit
def _point_sample_fwd_kernel(
    inp, coords, out, C, P, H, W,
    s_in, s_ic, s_ih, s_iw, s_cn, s_cp, s_cxy,
    bidx, qidx, s_ib,
    NEG_ABS: tl.constexpr, INDEXED: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Grid (N, cdiv(P, BLOCK_P)); out [N, C, P] contiguous (-|value| when NEG_ABS).

    INDEXED: inp is [B, Q, C, H, W] (s_ib its batch stride, s_in its query stride) and row n
    samples map (bidx[n], qidx[n]); else inp is [N, C, H, W] and bidx, qidx, s_ib are None.
    """
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = offs < P
    cx, cy = _load_coords(coords + n * s_cn, offs, s_cp, s_cxy, pm)
    taps = _taps(cx, cy, H, W)
    src = inp + _pred_base(bidx, qidx, n, s_ib, s_in, INDEXED)
    dst = out + n * C * P + offs
    for _ in range(C):
        v = _gather(src, s_ih, s_iw, *taps, pm)
        if NEG_ABS:
            v = -tl.abs(v)
        tl.store(dst, v.to(out.dtype.element_ty), mask=pm)
        src += s_ic
        dst += P


@triton.jit
def _point_sample_bwd_kernel(
    grad_out, coords, grad_in, C, P, H, W,
    s_gn, s_gc, s_gp, s_cn, s_cp, s_cxy,
    BLOCK_P: tl.constexpr,
):
    """Grid (N, cdiv(P, BLOCK_P)); scatters into grad_in, fp32 [N, C, H, W] contiguous zeros."""
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = offs < P
    cx, cy = _load_coords(coords + n * s_cn, offs, s_cp, s_cxy, pm)
    taps = _taps(cx, cy, H, W)
    src = grad_out + n * s_gn + offs * s_gp
    dst = grad_in + n * C * H * W
    for _ in range(C):
        g = tl.load(src, mask=pm, other=0.0).to(tl.float32)
        _scatter(dst, W, 1, g, *taps, pm)
        src += s_gc
        dst += H * W


def _launch_point_sample(input, coords, out, neg_abs: bool, config: PointConfig,
                         batch_index: Optional[torch.Tensor] = None,
                         query_index: Optional[torch.Tensor] = None) -> None:
    """Sample input [N, C, H, W] at coords [N, P, 2] into out [N, C, P] (contiguous).

    With batch_index / query_index [N], input is [B, Q, C, H, W] and row n samples the map
    (batch_index[n], query_index[n]) in place: no gather copy. The plain launch passes None
    for the index arguments (constexpr None), so its compiled code is the INDEXED=False one.
    """
    c, h, w = input.shape[-3:]
    n, p = coords.shape[:2]
    if batch_index is None:
        index_args = (None, None, None)
        strides = input.stride()
    else:
        s_b, *strides = input.stride()
        index_args = (batch_index.contiguous(), query_index.contiguous(), s_b)
    _point_sample_fwd_kernel[(n, cdiv(p, config.block_p))](
        input, coords, out, c, p, h, w,
        *strides, *coords.stride(), *index_args,
        NEG_ABS=neg_abs, INDEXED=batch_index is not None, BLOCK_P=config.block_p, num_warps=config.num_warps,
    )


def point_sample_fwd(input, coords, *, config: "PointConfig | None" = None):
    """input [N, C, H, W], coords [N, P, 2] -> [N, C, P] in input.dtype (float32 for a bool or
    uint8 input, read as bytes). ``config``: the launch configuration (None:
    :func:`point_sample_config`)."""
    n, c = input.shape[:2]
    dtype = input.dtype if input.is_floating_point() else torch.float32
    if input.dtype == torch.bool:
        input = input.view(torch.uint8)
    out = torch.empty((n, c, coords.shape[1]), dtype=dtype, device=input.device)
    _launch_point_sample(input, coords, out, False, chosen(config, PointConfig, point_sample_config, input))
    return out


def point_sample_bwd(grad_out, input, coords, *, config: "PointConfig | None" = None):
    """grad_out [N, C, P] -> grad_input [N, C, H, W] in input.dtype. ``config``: the launch
    configuration (None: :func:`point_sample_config`)."""
    n, c, h, w = input.shape
    p = coords.shape[1]
    cfg = chosen(config, PointConfig, point_sample_config, input)
    grad = torch.zeros((n, c, h, w), dtype=torch.float32, device=input.device)
    _point_sample_bwd_kernel[(n, cdiv(p, cfg.block_p))](
        grad_out, coords, grad, c, p, h, w,
        *grad_out.stride(), *coords.stride(),
        BLOCK_P=cfg.block_p, num_warps=cfg.num_warps,
    )
    return grad.to(input.dtype)


# ----------------------------------------------------------------------------- importance sampling


def uncertain_point_coords(logits, candidates, random, num_uncertain: int,
                           batch_index: Optional[torch.Tensor] = None,
                           query_index: Optional[torch.Tensor] = None, *,
                           config: "PointConfig | None" = None):
    """The official importance sampling given its draws: [N, num_uncertain + R, 2].

    logits [N, H, W], or [B, Q, H, W] with batch_index / query_index [N] (the matched
    masks are read in place, never gathered); candidates [N, S, 2]; random [N, R, 2].
    The only float intermediate is the uncertainty -|logit| [N, S] (fp32) that top-k
    reads; the chosen candidates come in top-k order, then the random points.
    ``config``: the launch configuration (None: :func:`point_sample_config`).
    """
    cfg = chosen(config, PointConfig, point_sample_config, logits)
    n, s = candidates.shape[:2]
    uncertainty = torch.empty((n, 1, s), dtype=torch.float32, device=logits.device)
    # a channel dim of 1: [N, 1, H, W], or [B, Q, 1, H, W] for the indexed launch
    _launch_point_sample(logits.unsqueeze(-3), candidates, uncertainty, True, cfg, batch_index, query_index)
    # sorted=True: the reference's (official) point order. The loss does not depend on the
    # order; sorted=False would skip a segmented sort of [N, k] (see bench/notes/point_loss.md).
    idx = torch.topk(uncertainty[:, 0], k=num_uncertain, dim=1).indices
    del uncertainty
    out = torch.empty((n, num_uncertain + random.shape[1], 2), dtype=candidates.dtype, device=candidates.device)
    torch.gather(candidates, 1, idx.unsqueeze(-1).expand(-1, -1, 2), out=out[:, :num_uncertain])
    out[:, num_uncertain:] = random
    return out

"""Triton point-sampled mask loss ops: point_sample, importance sampling, mask loss, matcher cost.

Every op samples maps bilinearly with zero padding in the ``grid_sample(align_corners=False)``
convention (pixel = coord * size - 0.5), computes in fp32 and returns contiguous tensors.
Shapes follow the backend contract (see ``m2f_kernels.reference.point_loss``):

- ``point_sample_fwd(input [N, C, H, W], coords [N, P, 2]) -> [N, C, P]``
- ``uncertain_point_coords(logits [N, H, W], candidates [N, S, 2], random [N, R, 2], k)``;
  logits may be [B, Q, H, W] + (batch, query) index [N], as pred of the loss
- ``point_mask_loss_fwd/bwd``: pred [N, Hp, Wp], or [B, Q, Hp, Wp] + (batch, query) index
  [N]; target [N, Ht, Wt] bool/uint8/float; coords [N, P, 2]
- ``pairwise_mask_cost(pred [Q, Hp, Wp], target [T, Ht, Wt], coords [P, 2])``

Bool targets are read as bytes; no full-resolution map is ever converted or gathered.
Launch configs come from the tables below (POINT_CONFIG, LOSS_CONFIG, PAIRWISE_CONFIGS);
the ``*_with(..., config)`` variants take one explicitly (bench/sweep_point_loss.py).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

from ._bilinear import bilinear_cell


@dataclasses.dataclass(frozen=True)
class PointConfig:
    """Launch config of the per-point kernels: points per program and warps."""

    block_p: int = 256
    num_warps: int = 4


@dataclasses.dataclass(frozen=True)
class PairwiseConfig:
    """Launch config of the matcher cost kernel.

    Each program forms a [block_q, block_t] tile of the cost sums over one chunk of the
    points, block_p points per step; P is split into chunks so that the grid has about
    ``programs`` programs. num_stages=1: the tap gathers get their addresses from the same
    step's coordinates, so software pipelining buys nothing and its shared-memory buffers
    (num_stages - 1 copies of every gathered tile) cost occupancy; see :func:`pairwise_smem_bytes`.
    """

    block_q: int = 64
    block_t: int = 32
    block_p: int = 16
    programs: int = 256
    num_warps: int = 8
    num_stages: int = 1
    precision: str = "ieee"  # tl.dot input_precision: "ieee" (CUDA-core FMA) or "tf32x3" (tensor cores)


# Defaults; bench/sweep_point_loss.py times the alternatives. Every pairwise entry must fit
# the shared memory of sm_80, sm_86 and sm_90 for every pred/target dtype
# (tests/test_point_loss_triton.py checks the estimate, and a compile for sm_80 and sm_90).
# The pairwise default compiles (real launch specialisation, fp32 pred, bool targets) to
# 149 registers on sm_90 (128 on sm_80), no spills, 10 KiB shared: on sm_90 one 8-warp
# program per SM by registers, so the ~224 programs of the standard shape take two waves
# (a candidate for the GPU sweep: bench/notes/point_loss.md).
POINT_CONFIG = PointConfig()  # point_sample and the importance-sampling uncertainty
LOSS_CONFIG = PointConfig()  # point_mask_loss stats and gradient kernels
PAIRWISE_CONFIGS = {
    torch.float32: PairwiseConfig(),
    torch.float16: PairwiseConfig(),
    torch.bfloat16: PairwiseConfig(),
}

_BLOCK_K = 64  # partial-sum blocks of one mask read per step by the loss finish/grad kernels
_BLOCK_N = 32  # masks reduced per step by the loss finish kernel
_FINISH_BLOCK_E, _FINISH_BLOCK_S = 32, 32  # pairwise finish: cost entries per program, splits per step


def pairwise_smem_bytes(config: PairwiseConfig, pred_bytes: int, target_bytes: int) -> int:
    """Upper estimate of the pairwise kernel's shared memory (bytes) as Triton 3.6 lays it out.

    (num_stages - 1) pipelined copies of the 4 gathered taps of the pred and target tiles,
    the fp32 operands of the two dots (two [BQ, BP] A tiles, and the [BP, BT] B tile, which
    tf32x3 stores twice; counted twice always), and 2 KiB of reduction scratch. Checked
    against sm_80 and sm_90 compiles (tests/test_point_loss_triton.py); the old
    (64, 32, 64, num_stages=3) config with fp32 pred and target compiles to 239616 bytes,
    the GPU run's OutOfResources number, and is estimated at 247808.
    """
    c = config
    taps = 4 * (c.block_q * c.block_p * pred_bytes + c.block_t * c.block_p * target_bytes)
    dots = 4 * (2 * c.block_q * c.block_p + 2 * c.block_p * c.block_t)
    return max(c.num_stages - 1, 0) * taps + dots + 2048


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

    Returns in-range int64 indices x0, x1, y0, y1 and fp32 weights wx0, wx1, wy0, wy1; a
    tap outside the map has weight 0 and a clamped index, so callers may load every tap
    unmasked (per point) and still get zero padding.
    """
    ix, iy, fx, fy = bilinear_cell(cx, cy, H, W)  # clamped, so the int casts cannot overflow
    lx = ix - fx
    ly = iy - fy
    x0 = fx.to(tl.int64)
    y0 = fy.to(tl.int64)
    x1 = x0 + 1
    y1 = y0 + 1
    wx0 = tl.where((x0 >= 0) & (x0 < W), 1.0 - lx, 0.0)
    wx1 = tl.where((x1 >= 0) & (x1 < W), lx, 0.0)
    wy0 = tl.where((y0 >= 0) & (y0 < H), 1.0 - ly, 0.0)
    wy1 = tl.where((y1 >= 0) & (y1 < H), ly, 0.0)
    x0 = tl.minimum(tl.maximum(x0, 0), W - 1)
    x1 = tl.minimum(tl.maximum(x1, 0), W - 1)
    y0 = tl.minimum(tl.maximum(y0, 0), H - 1)
    y1 = tl.minimum(tl.maximum(y1, 0), H - 1)
    return x0, x1, y0, y1, wx0, wx1, wy0, wy1


@triton.jit
def _gather(ptr, stride_h, stride_w, x0, x1, y0, y1, wx0, wx1, wy0, wy1, mask):
    """fp32 bilinear value at the taps of :func:`_taps` (``ptr`` may be a broadcast row base)."""
    r0 = y0 * stride_h
    r1 = y1 * stride_h
    c0 = x0 * stride_w
    c1 = x1 * stride_w
    v00 = tl.load(ptr + r0 + c0, mask=mask, other=0).to(tl.float32)
    v01 = tl.load(ptr + r0 + c1, mask=mask, other=0).to(tl.float32)
    v10 = tl.load(ptr + r1 + c0, mask=mask, other=0).to(tl.float32)
    v11 = tl.load(ptr + r1 + c1, mask=mask, other=0).to(tl.float32)
    return wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (wx0 * v10 + wx1 * v11)


@triton.jit
def _scatter(ptr, stride_h, stride_w, g, x0, x1, y0, y1, wx0, wx1, wy0, wy1, mask):
    """Atomically add ``g`` times each tap's weight into the fp32 map at ``ptr`` (taps outside skip)."""
    r0 = y0 * stride_h
    r1 = y1 * stride_h
    c0 = x0 * stride_w
    c1 = x1 * stride_w
    w00 = wy0 * wx0
    w01 = wy0 * wx1
    w10 = wy1 * wx0
    w11 = wy1 * wx1
    tl.atomic_add(ptr + r0 + c0, g * w00, mask=mask & (w00 != 0), sem="relaxed")
    tl.atomic_add(ptr + r0 + c1, g * w01, mask=mask & (w01 != 0), sem="relaxed")
    tl.atomic_add(ptr + r1 + c0, g * w10, mask=mask & (w10 != 0), sem="relaxed")
    tl.atomic_add(ptr + r1 + c1, g * w11, mask=mask & (w11 != 0), sem="relaxed")


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
    x0, x1, y0, y1, wx0, wx1, wy0, wy1 = _taps(cx, cy, H, W)
    src = inp + _pred_base(bidx, qidx, n, s_ib, s_in, INDEXED)
    dst = out + n * C * P + offs
    for _ in range(C):
        v = _gather(src, s_ih, s_iw, x0, x1, y0, y1, wx0, wx1, wy0, wy1, pm)
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
    x0, x1, y0, y1, wx0, wx1, wy0, wy1 = _taps(cx, cy, H, W)
    src = grad_out + n * s_gn + offs * s_gp
    dst = grad_in + n * C * H * W
    for _ in range(C):
        g = tl.load(src, mask=pm, other=0.0).to(tl.float32)
        _scatter(dst, W, 1, g, x0, x1, y0, y1, wx0, wx1, wy0, wy1, pm)
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
    _point_sample_fwd_kernel[(n, triton.cdiv(p, config.block_p))](
        input, coords, out, c, p, h, w,
        *strides, *coords.stride(), *index_args,
        NEG_ABS=neg_abs, INDEXED=batch_index is not None, BLOCK_P=config.block_p, num_warps=config.num_warps,
    )


def point_sample_fwd(input, coords):
    """input [N, C, H, W], coords [N, P, 2] -> [N, C, P] in input.dtype."""
    n, c = input.shape[:2]
    out = torch.empty((n, c, coords.shape[1]), dtype=input.dtype, device=input.device)
    _launch_point_sample(input, coords, out, False, POINT_CONFIG)
    return out


def point_sample_bwd(grad_out, input, coords):
    """grad_out [N, C, P] -> grad_input [N, C, H, W] in input.dtype."""
    n, c, h, w = input.shape
    p = coords.shape[1]
    cfg = POINT_CONFIG
    grad = torch.zeros((n, c, h, w), dtype=torch.float32, device=input.device)
    _point_sample_bwd_kernel[(n, triton.cdiv(p, cfg.block_p))](
        grad_out, coords, grad, c, p, h, w,
        *grad_out.stride(), *coords.stride(),
        BLOCK_P=cfg.block_p, num_warps=cfg.num_warps,
    )
    return grad.to(input.dtype)


# ----------------------------------------------------------------------------- importance sampling


def uncertain_point_coords(logits, candidates, random, num_uncertain: int,
                           batch_index: Optional[torch.Tensor] = None,
                           query_index: Optional[torch.Tensor] = None):
    """The official importance sampling given its draws: [N, num_uncertain + R, 2].

    logits [N, H, W], or [B, Q, H, W] with batch_index / query_index [N] (the matched
    masks are read in place, never gathered); candidates [N, S, 2]; random [N, R, 2].
    The only float intermediate is the uncertainty -|logit| [N, S] (fp32) that top-k
    reads; the chosen candidates come in top-k order, then the random points.
    """
    return uncertain_point_coords_with(logits, candidates, random, num_uncertain, batch_index, query_index,
                                       POINT_CONFIG)


def uncertain_point_coords_with(logits, candidates, random, num_uncertain: int, batch_index, query_index,
                                config: PointConfig):
    """:func:`uncertain_point_coords` with an explicit launch config (for the sweep)."""
    n, s = candidates.shape[:2]
    uncertainty = torch.empty((n, 1, s), dtype=torch.float32, device=logits.device)
    # a channel dim of 1: [N, 1, H, W], or [B, Q, 1, H, W] for the indexed launch
    _launch_point_sample(logits.unsqueeze(-3), candidates, uncertainty, True, config, batch_index, query_index)
    # sorted=True: the reference's (official) point order. The loss does not depend on the
    # order; sorted=False would skip a segmented sort of [N, k] (see bench/notes/point_loss.md).
    idx = torch.topk(uncertainty[:, 0], k=num_uncertain, dim=1).indices
    del uncertainty
    out = torch.empty((n, num_uncertain + random.shape[1], 2), dtype=candidates.dtype, device=candidates.device)
    torch.gather(candidates, 1, idx.unsqueeze(-1).expand(-1, -1, 2), out=out[:, :num_uncertain])
    out[:, num_uncertain:] = random
    return out


# ----------------------------------------------------------------------------- point_mask_loss


@triton.jit
def _mask_points(
    pred, bidx, qidx, target, coords, n, offs, pm, Hp, Wp, Ht, Wt,
    s_pb, s_pq, s_ph, s_pw, s_tn, s_th, s_tw, s_cn, s_cp, s_cxy, INDEXED: tl.constexpr,
):
    """Logits x and labels t (fp32, 0 where not pm) of mask n at points offs, plus pred taps."""
    cx, cy = _load_coords(coords + n * s_cn, offs, s_cp, s_cxy, pm)
    x0, x1, y0, y1, wx0, wx1, wy0, wy1 = _taps(cx, cy, Hp, Wp)
    x = _gather(pred + _pred_base(bidx, qidx, n, s_pb, s_pq, INDEXED), s_ph, s_pw,
                x0, x1, y0, y1, wx0, wx1, wy0, wy1, pm)
    a0, a1, b0, b1, wa0, wa1, wb0, wb1 = _taps(cx, cy, Ht, Wt)
    t = _gather(target + n * s_tn, s_th, s_tw, a0, a1, b0, b1, wa0, wa1, wb0, wb1, pm)
    return x, t, x0, x1, y0, y1, wx0, wx1, wy0, wy1


@triton.jit
def _mask_loss_stats_kernel(
    pred, bidx, qidx, target, coords, partial, N, P, NBLK, Hp, Wp, Ht, Wt,
    s_pb, s_pq, s_ph, s_pw, s_tn, s_th, s_tw, s_cn, s_cp, s_cxy,
    INDEXED: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Grid (N, NBLK): partial [4, N, NBLK] fp32 = per block sums of BCE, s*t, s, t."""
    n = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = offs < P
    x, t, _, _, _, _, _, _, _, _ = _mask_points(
        pred, bidx, qidx, target, coords, n, offs, pm, Hp, Wp, Ht, Wt,
        s_pb, s_pq, s_ph, s_pw, s_tn, s_th, s_tw, s_cn, s_cp, s_cxy, INDEXED)
    s = tl.where(pm, tl.sigmoid(x), 0.0)
    # BCE with logits: softplus(x) - x t, with a stable softplus.
    bce = tl.where(pm, tl.maximum(x, 0.0) - x * t + tl.log(1.0 + tl.exp(-tl.abs(x))), 0.0)
    dst = partial + n * NBLK + blk
    stride = N * NBLK
    tl.store(dst, tl.sum(bce, 0))
    tl.store(dst + stride, tl.sum(s * t, 0))
    tl.store(dst + 2 * stride, tl.sum(s, 0))
    tl.store(dst + 3 * stride, tl.sum(t, 0))


@triton.jit
def _mask_loss_finish_kernel(
    partial, out_bce, out_dice, N, NBLK, inv_p, inv_num_masks,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: the two loss scalars (pred dtype) from the stats partials."""
    bce_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    dice_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    stride = N * NBLK
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rm = rows < N
        bce = tl.zeros([BLOCK_N], dtype=tl.float32)
        st = tl.zeros([BLOCK_N], dtype=tl.float32)
        ss = tl.zeros([BLOCK_N], dtype=tl.float32)
        tt = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, NBLK, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            m = rm[:, None] & (cols < NBLK)[None, :]
            src = partial + rows[:, None] * NBLK + cols[None, :]
            bce += tl.sum(tl.load(src, mask=m, other=0.0), 1)
            st += tl.sum(tl.load(src + stride, mask=m, other=0.0), 1)
            ss += tl.sum(tl.load(src + 2 * stride, mask=m, other=0.0), 1)
            tt += tl.sum(tl.load(src + 3 * stride, mask=m, other=0.0), 1)
        bce_acc += tl.where(rm, bce * inv_p, 0.0)
        dice_acc += tl.where(rm, 1.0 - (2.0 * st + 1.0) / (ss + tt + 1.0), 0.0)
    tl.store(out_bce, (tl.sum(bce_acc, 0) * inv_num_masks).to(out_bce.dtype.element_ty))
    tl.store(out_dice, (tl.sum(dice_acc, 0) * inv_num_masks).to(out_dice.dtype.element_ty))


@triton.jit
def _mask_loss_grad_kernel(
    pred, bidx, qidx, target, coords, partial, grad_bce, grad_dice, grad_pred,
    N, P, NBLK, Hp, Wp, Ht, Wt,
    s_pb, s_pq, s_ph, s_pw, s_tn, s_th, s_tw, s_cn, s_cp, s_cxy,
    s_gb, s_gq, inv_p, inv_num_masks,
    INDEXED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (N, NBLK): recompute each point's dloss/dlogit and scatter it into grad_pred.

    grad_pred is fp32, contiguous, shaped like pred (s_gb, s_gq its batch/query strides).
    """
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = offs < P
    # The gathers first, so their latency overlaps the reads of the mask's sums below.
    x, t, x0, x1, y0, y1, wx0, wx1, wy0, wy1 = _mask_points(
        pred, bidx, qidx, target, coords, n, offs, pm, Hp, Wp, Ht, Wt,
        s_pb, s_pq, s_ph, s_pw, s_tn, s_th, s_tw, s_cn, s_cp, s_cxy, INDEXED)
    # This mask's dice sums from the stats partials (every block of the mask).
    stride = N * NBLK
    st = tl.zeros([BLOCK_K], dtype=tl.float32)
    ss = tl.zeros([BLOCK_K], dtype=tl.float32)
    tt = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, NBLK, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        src = partial + n * NBLK + cols
        km = cols < NBLK
        st += tl.load(src + stride, mask=km, other=0.0)
        ss += tl.load(src + 2 * stride, mask=km, other=0.0)
        tt += tl.load(src + 3 * stride, mask=km, other=0.0)
    num = 2.0 * tl.sum(st, 0) + 1.0
    den = tl.sum(ss, 0) + tl.sum(tt, 0) + 1.0

    s = tl.sigmoid(x)
    gb = tl.load(grad_bce).to(tl.float32)
    gd = tl.load(grad_dice).to(tl.float32)
    d_dice = -(2.0 * t * den - num) / (den * den) * s * (1.0 - s)
    gx = (gb * (s - t) * inv_p + gd * d_dice) * inv_num_masks
    dst = grad_pred + _pred_base(bidx, qidx, n, s_gb, s_gq, INDEXED)
    _scatter(dst, Wp, 1, gx, x0, x1, y0, y1, wx0, wx1, wy0, wy1, pm)


def _block_k(nblk: int) -> int:
    """Partial-sum blocks read per step: all of them up to _BLOCK_K (a power of 2 >= 2)."""
    return min(_BLOCK_K, max(2, triton.next_power_of_2(nblk)))


def _mask_loss_launch(pred, target, coords, batch_index, query_index, config: PointConfig):
    """Run the stats kernel; returns (partial [4, N, NBLK] fp32, launch args for the grad kernel).

    The launch args are the stats kernel's own (tensors, sizes N, P, NBLK, Hp, Wp, Ht, Wt,
    strides) and ``indexed``. A plain pred [N, Hp, Wp] is addressed as B=1, Q=N.
    """
    indexed = batch_index is not None
    if indexed:
        bidx, qidx = batch_index.contiguous(), query_index.contiguous()
        pred_strides = pred.stride()
    else:
        bidx = qidx = pred  # placeholders, never read
        pred_strides = (0, *pred.stride())
    if target.dtype == torch.bool:
        target = target.view(torch.uint8)
    n, p = coords.shape[:2]
    nblk = triton.cdiv(p, config.block_p)
    tensors = (pred, bidx, qidx, target, coords)
    sizes = (n, p, nblk, *pred.shape[-2:], *target.shape[-2:])
    strides = (*pred_strides, *target.stride(), *coords.stride())
    partial = torch.empty((4, n, nblk), dtype=torch.float32, device=pred.device)
    _mask_loss_stats_kernel[(n, nblk)](
        *tensors, partial, *sizes, *strides,
        INDEXED=indexed, BLOCK_P=config.block_p, num_warps=config.num_warps,
    )
    return partial, (tensors, sizes, strides, indexed)


def point_mask_loss_fwd(pred, target, coords, num_masks: float,
                        batch_index: Optional[torch.Tensor] = None,
                        query_index: Optional[torch.Tensor] = None):
    """(loss_bce, loss_dice): 0-dim tensors in pred.dtype (see the reference for the formulas)."""
    return point_mask_loss_fwd_with(pred, target, coords, num_masks, batch_index, query_index, LOSS_CONFIG)


def point_mask_loss_fwd_with(pred, target, coords, num_masks: float, batch_index, query_index,
                             config: PointConfig):
    """:func:`point_mask_loss_fwd` with an explicit launch config (for the sweep and tests)."""
    partial, _ = _mask_loss_launch(pred, target, coords, batch_index, query_index, config)
    _, n, nblk = partial.shape
    loss_bce = torch.empty((), dtype=pred.dtype, device=pred.device)
    loss_dice = torch.empty((), dtype=pred.dtype, device=pred.device)
    _mask_loss_finish_kernel[(1,)](
        partial, loss_bce, loss_dice, n, nblk, 1.0 / coords.shape[1], 1.0 / float(num_masks),
        BLOCK_N=_BLOCK_N, BLOCK_K=_block_k(nblk),
    )
    return loss_bce, loss_dice


def point_mask_loss_bwd(grad_bce, grad_dice, pred, target, coords, num_masks: float,
                        batch_index: Optional[torch.Tensor] = None,
                        query_index: Optional[torch.Tensor] = None):
    """grad_pred shaped like pred, in pred.dtype (zero where no point of a matched mask landed).

    Recomputes the per-mask dice sums (stats pass), then scatters each point's gradient
    into an fp32 buffer shaped like pred.
    """
    return point_mask_loss_bwd_with(grad_bce, grad_dice, pred, target, coords, num_masks,
                                    batch_index, query_index, LOSS_CONFIG)


def point_mask_loss_bwd_with(grad_bce, grad_dice, pred, target, coords, num_masks: float,
                             batch_index, query_index, config: PointConfig):
    """:func:`point_mask_loss_bwd` with an explicit launch config (for the sweep and tests)."""
    partial, (tensors, sizes, strides, indexed) = _mask_loss_launch(
        pred, target, coords, batch_index, query_index, config)
    _, n, nblk = partial.shape
    grad = torch.zeros(pred.shape, dtype=torch.float32, device=pred.device)
    grad_strides = (grad.stride(0), grad.stride(1)) if indexed else (0, grad.stride(0))
    _mask_loss_grad_kernel[(n, nblk)](
        *tensors, partial, grad_bce, grad_dice, grad, *sizes, *strides, *grad_strides,
        1.0 / coords.shape[1], 1.0 / float(num_masks),
        INDEXED=indexed, BLOCK_P=config.block_p, BLOCK_K=_block_k(nblk), num_warps=config.num_warps,
    )
    return grad if pred.dtype == torch.float32 else grad.to(pred.dtype)


# ----------------------------------------------------------------------------- pairwise_mask_cost


@triton.jit
def _pairwise_partial_kernel(
    pred, target, coords, part,
    Q, T, P, CHUNK, E, Hp, Wp, Ht, Wt,
    s_pq, s_ph, s_pw, s_tt, s_th, s_tw, s_cp, s_cxy,
    BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(Q, BQ), cdiv(T, BT), SPLIT): sums over the points [split*CHUNK, +CHUNK).

    part [SPLIT, E] fp32 with E = 2QT + 2Q + T; row ``split`` holds, over its points,
    x @ t.T [Q, T], s @ t.T [Q, T] (s = sigmoid(x)), then sum softplus(x) [Q] and sum s [Q]
    (written by the pid_t == 0 programs), then sum t [T] (written by pid_q == 0).
    """
    pid_q = tl.program_id(0)
    pid_t = tl.program_id(1)
    split = tl.program_id(2)
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    qm = rq < Q
    tm = rt < T
    pred_rows = pred + rq.to(tl.int64)[:, None] * s_pq
    target_rows = target + rt.to(tl.int64)[:, None] * s_tt

    acc_xt = tl.zeros([BLOCK_Q, BLOCK_T], dtype=tl.float32)
    acc_st = tl.zeros([BLOCK_Q, BLOCK_T], dtype=tl.float32)
    sp_sum = tl.zeros([BLOCK_Q], dtype=tl.float32)
    s_sum = tl.zeros([BLOCK_Q], dtype=tl.float32)
    t_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    p_lo = split * CHUNK
    p_hi = tl.minimum(p_lo + CHUNK, P)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pm = offs < p_hi
        cx, cy = _load_coords(coords, offs, s_cp, s_cxy, pm)
        x0, x1, y0, y1, wx0, wx1, wy0, wy1 = _taps(cx, cy, Hp, Wp)
        xm = qm[:, None] & pm[None, :]
        x = _gather(pred_rows, s_ph, s_pw, x0[None, :], x1[None, :], y0[None, :], y1[None, :],
                    wx0[None, :], wx1[None, :], wy0[None, :], wy1[None, :], xm)
        a0, a1, b0, b1, wa0, wa1, wb0, wb1 = _taps(cx, cy, Ht, Wt)
        t = _gather(target_rows, s_th, s_tw, a0[None, :], a1[None, :], b0[None, :], b1[None, :],
                    wa0[None, :], wa1[None, :], wb0[None, :], wb1[None, :],
                    tm[:, None] & pm[None, :])
        s = tl.where(xm, tl.sigmoid(x), 0.0)
        softplus = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
        # x and t are 0 outside (q, p) / (t, p) range, so the dots need no masking.
        t_trans = tl.trans(t)
        acc_xt += tl.dot(x, t_trans, input_precision=PRECISION)
        acc_st += tl.dot(s, t_trans, input_precision=PRECISION)
        sp_sum += tl.sum(tl.where(xm, softplus, 0.0), 1)
        s_sum += tl.sum(s, 1)
        t_sum += tl.sum(t, 1)

    row = part + split.to(tl.int64) * E
    qt = row + rq[:, None] * T + rt[None, :]
    qtm = qm[:, None] & tm[None, :]
    tl.store(qt, acc_xt, mask=qtm)
    tl.store(qt + Q * T, acc_st, mask=qtm)
    q_dst = row + 2 * Q * T + rq
    tl.store(q_dst, sp_sum, mask=qm & (pid_t == 0))
    tl.store(q_dst + Q, s_sum, mask=qm & (pid_t == 0))
    tl.store(row + 2 * Q * T + 2 * Q + rt, t_sum, mask=tm & (pid_q == 0))


@triton.jit
def _pairwise_finish_kernel(
    part, cost_bce, cost_dice, Q, T, SPLIT, E, inv_p,
    BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Grid (cdiv(Q*T, BLOCK_E),): sum the split partials of BLOCK_E cost entries (q, t)
    (flat index q*T + t), BLOCK_S splits per step, and form both costs."""
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    qt_count = Q * T
    em = e < qt_count
    q = e // T
    t = e - q * T
    xt = tl.zeros([BLOCK_E], dtype=tl.float32)
    st = tl.zeros([BLOCK_E], dtype=tl.float32)
    sp = tl.zeros([BLOCK_E], dtype=tl.float32)
    ss = tl.zeros([BLOCK_E], dtype=tl.float32)
    tt = tl.zeros([BLOCK_E], dtype=tl.float32)
    for s0 in range(0, SPLIT, BLOCK_S):
        rows = s0 + tl.arange(0, BLOCK_S)
        m = (rows < SPLIT)[:, None] & em[None, :]
        base = part + rows.to(tl.int64)[:, None] * E
        xt += tl.sum(tl.load(base + e[None, :], mask=m, other=0.0), 0)
        st += tl.sum(tl.load(base + qt_count + e[None, :], mask=m, other=0.0), 0)
        sp += tl.sum(tl.load(base + 2 * qt_count + q[None, :], mask=m, other=0.0), 0)
        ss += tl.sum(tl.load(base + 2 * qt_count + Q + q[None, :], mask=m, other=0.0), 0)
        tt += tl.sum(tl.load(base + 2 * qt_count + 2 * Q + t[None, :], mask=m, other=0.0), 0)
    # softplus(-x) t + softplus(x) (1 - t) = softplus(x) - x t, summed over the points.
    tl.store(cost_bce + e, (sp - xt) * inv_p, mask=em)
    tl.store(cost_dice + e, 1.0 - (2.0 * st + 1.0) / (ss + tt + 1.0), mask=em)


def pairwise_mask_cost(pred, target, coords):
    """(cost_bce [Q, T], cost_dice [Q, T]) float32: the matcher's costs on shared points.

    Intermediates: the split-P partial sums [SPLIT, 2QT + 2Q + T] fp32 (2.8 MB at the
    standard shape); the sampled [Q, P] / [T, P] values live only in registers.
    """
    return pairwise_mask_cost_with(pred, target, coords, PAIRWISE_CONFIGS[pred.dtype])


def pairwise_split(config: PairwiseConfig, q: int, t: int, p: int) -> tuple:
    """(grid, points per split): P split so the grid has about config.programs programs."""
    grid_q = triton.cdiv(q, config.block_q)
    grid_t = triton.cdiv(t, config.block_t)
    steps = triton.cdiv(p, config.block_p)
    splits = max(1, min(steps, config.programs // (grid_q * grid_t)))
    chunk = triton.cdiv(steps, splits) * config.block_p
    return (grid_q, grid_t, triton.cdiv(p, chunk)), chunk


def pairwise_mask_cost_with(pred, target, coords, config: PairwiseConfig):
    """:func:`pairwise_mask_cost` with an explicit launch config (for the sweep and tests)."""
    q, hp, wp = pred.shape
    t_count, ht, wt = target.shape
    p = coords.shape[0]
    if target.dtype == torch.bool:
        target = target.view(torch.uint8)
    grid, chunk = pairwise_split(config, q, t_count, p)
    e = 2 * q * t_count + 2 * q + t_count
    dev = pred.device
    part = torch.empty((grid[2], e), dtype=torch.float32, device=dev)
    _pairwise_partial_kernel[grid](
        pred, target, coords, part,
        q, t_count, p, chunk, e, hp, wp, ht, wt,
        *pred.stride(), *target.stride(), *coords.stride(),
        BLOCK_Q=config.block_q, BLOCK_T=config.block_t, BLOCK_P=config.block_p,
        PRECISION=config.precision, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    cost_bce = torch.empty((q, t_count), dtype=torch.float32, device=dev)
    cost_dice = torch.empty((q, t_count), dtype=torch.float32, device=dev)
    _pairwise_finish_kernel[(triton.cdiv(q * t_count, _FINISH_BLOCK_E),)](
        part, cost_bce, cost_dice, q, t_count, grid[2], e, 1.0 / p,
        BLOCK_E=_FINISH_BLOCK_E, BLOCK_S=_FINISH_BLOCK_S,
    )
    return cost_bce, cost_dice

"""Triton point_mask_loss: the criterion's BCE + dice mask loss on sampled points, fwd and bwd.

``point_mask_loss_fwd/bwd``: pred [N, Hp, Wp], or [B, Q, Hp, Wp] + (batch, query) index
[N]; target [N, Ht, Wt] bool/uint8/float (bool read as bytes); coords [N, P, 2]. Sampling
as in ``_point_sample`` (whose helpers these kernels use), in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import cdiv, chosen, next_pow2
from ._point_sample import PointConfig, _gather, _load_coords, _pred_base, _scatter, _taps

# The default; bench/sweep_point_loss.py times the alternatives.
LOSS_CONFIG = PointConfig()  # the stats and gradient kernels

_BLOCK_K = 64  # partial-sum blocks of one mask read per step by the loss finish/grad kernels
_BLOCK_N = 32  # masks reduced per step by the loss finish kernel


def point_mask_loss_config(pred) -> PointConfig:
    """The launch config of the loss's stats and gradient kernels."""
    return LOSS_CONFIG


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _mask_points(
    pred, bidx, qidx, target, coords, n, offs, pm, Hp, Wp, Ht, Wt,
    s_pb, s_pq, s_ph, s_pw, s_tn, s_th, s_tw, s_cn, s_cp, s_cxy, INDEXED: tl.constexpr,
):
    """Logits x and labels t (fp32, 0 where not pm) of mask n at points offs, plus pred's
    taps (the tuple of :func:`_taps`)."""
    cx, cy = _load_coords(coords + n * s_cn, offs, s_cp, s_cxy, pm)
    pred_taps = _taps(cx, cy, Hp, Wp)
    x = _gather(pred + _pred_base(bidx, qidx, n, s_pb, s_pq, INDEXED), s_ph, s_pw, *pred_taps, pm)
    t = _gather(target + n * s_tn, s_th, s_tw, *_taps(cx, cy, Ht, Wt), pm)
    return x, t, pred_taps


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
    x, t, _ = _mask_points(
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
    partial, weight, out_bce, out_dice, N, NBLK, inv_p, inv_num_masks,
    HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: the two loss scalars (fp32) from the stats partials; with
    HAS_WEIGHT each mask's two terms are scaled by weight [N] fp32."""
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
        bce_n = bce * inv_p
        dice_n = 1.0 - (2.0 * st + 1.0) / (ss + tt + 1.0)
        if HAS_WEIGHT:
            w = tl.load(weight + rows, mask=rm, other=0.0)
            bce_n = bce_n * w
            dice_n = dice_n * w
        bce_acc += tl.where(rm, bce_n, 0.0)
        dice_acc += tl.where(rm, dice_n, 0.0)
    tl.store(out_bce, (tl.sum(bce_acc, 0) * inv_num_masks).to(out_bce.dtype.element_ty))
    tl.store(out_dice, (tl.sum(dice_acc, 0) * inv_num_masks).to(out_dice.dtype.element_ty))


@triton.jit
def _mask_loss_grad_kernel(
    pred, bidx, qidx, target, coords, partial, grad_bce, grad_dice, weight, grad_pred,
    N, P, NBLK, Hp, Wp, Ht, Wt,
    s_pb, s_pq, s_ph, s_pw, s_tn, s_th, s_tw, s_cn, s_cp, s_cxy,
    s_gb, s_gq, inv_p, inv_num_masks,
    INDEXED: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (N, NBLK): recompute each point's dloss/dlogit and scatter it into grad_pred.

    grad_pred is fp32, contiguous, shaped like pred (s_gb, s_gq its batch/query strides).
    """
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = offs < P
    # The gathers first, so their latency overlaps the reads of the mask's sums below.
    x, t, pred_taps = _mask_points(
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
    if HAS_WEIGHT:
        gx = gx * tl.load(weight + n)
    dst = grad_pred + _pred_base(bidx, qidx, n, s_gb, s_gq, INDEXED)
    _scatter(dst, Wp, 1, gx, *pred_taps, pm)


def _block_k(nblk: int) -> int:
    """Partial-sum blocks read per step: all of them up to _BLOCK_K (a power of 2 >= 2)."""
    return min(_BLOCK_K, max(2, next_pow2(nblk)))


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
    nblk = cdiv(p, config.block_p)
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
                        query_index: Optional[torch.Tensor] = None,
                        weight: Optional[torch.Tensor] = None, *,
                        config: "PointConfig | None" = None):
    """(loss_bce, loss_dice): 0-dim fp32 tensors (see the reference for the formulas;
    ``weight`` [N] fp32 scales each mask's terms). ``config``: the launch configuration
    (None: :func:`point_mask_loss_config`)."""
    config = chosen(config, PointConfig, point_mask_loss_config, pred)
    partial, _ = _mask_loss_launch(pred, target, coords, batch_index, query_index, config)
    _, n, nblk = partial.shape
    loss_bce = torch.empty((), dtype=torch.float32, device=pred.device)
    loss_dice = torch.empty((), dtype=torch.float32, device=pred.device)
    _mask_loss_finish_kernel[(1,)](
        partial, partial if weight is None else weight, loss_bce, loss_dice, n, nblk, 1.0 / coords.shape[1],
        1.0 / float(num_masks), HAS_WEIGHT=weight is not None, BLOCK_N=_BLOCK_N, BLOCK_K=_block_k(nblk),
    )
    return loss_bce, loss_dice


def point_mask_loss_bwd(grad_bce, grad_dice, pred, target, coords, num_masks: float,
                        batch_index: Optional[torch.Tensor] = None,
                        query_index: Optional[torch.Tensor] = None,
                        weight: Optional[torch.Tensor] = None, *,
                        config: "PointConfig | None" = None):
    """grad_pred shaped like pred, in pred.dtype (zero where no point of a matched mask landed).

    Recomputes the per-mask dice sums (stats pass), then scatters each point's gradient
    into an fp32 buffer shaped like pred. ``config``: the launch configuration (None:
    :func:`point_mask_loss_config`).
    """
    config = chosen(config, PointConfig, point_mask_loss_config, pred)
    partial, (tensors, sizes, strides, indexed) = _mask_loss_launch(
        pred, target, coords, batch_index, query_index, config)
    _, n, nblk = partial.shape
    grad = torch.zeros(pred.shape, dtype=torch.float32, device=pred.device)
    grad_strides = (grad.stride(0), grad.stride(1)) if indexed else (0, grad.stride(0))
    _mask_loss_grad_kernel[(n, nblk)](
        *tensors, partial, grad_bce, grad_dice, partial if weight is None else weight, grad, *sizes, *strides,
        *grad_strides, 1.0 / coords.shape[1], 1.0 / float(num_masks),
        INDEXED=indexed, HAS_WEIGHT=weight is not None, BLOCK_P=config.block_p, BLOCK_K=_block_k(nblk),
        num_warps=config.num_warps,
    )
    return grad if pred.dtype == torch.float32 else grad.to(pred.dtype)

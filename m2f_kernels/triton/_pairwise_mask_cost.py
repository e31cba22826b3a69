"""Triton pairwise_mask_cost: the matcher's BCE and dice costs of every (query, target) pair.

``pairwise_mask_cost(pred [Q, Hp, Wp], target [T, Ht, Wt], coords [P, 2])``: every pred and
target mask sampled at the same P points (as in ``_point_sample``, whose helpers these
kernels use; bool targets read as bytes), costs in fp32.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._launch import cdiv, chosen
from ._point_sample import _gather, _load_coords, _taps


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


# Defaults per pred dtype; bench/sweep_point_loss.py times the alternatives. Every entry must
# fit the shared memory of sm_80, sm_86 and sm_90 for every pred/target dtype
# (tests/test_op_point_loss.py checks the estimate, and a compile for sm_80 and sm_90).
# The default compiles (real launch specialisation, every pred dtype, bool targets) to 124
# registers on sm_90 (125 on sm_80), no spills, 10 KiB shared: two 8-warp programs per SM
# by registers, so the ~224 programs of the standard shape fit one wave on an H100 / H200
# (a compile result, not a GPU measurement; the sweep: bench/notes/point_loss.md).
PAIRWISE_CONFIGS = {
    torch.float32: PairwiseConfig(),
    torch.float16: PairwiseConfig(),
    torch.bfloat16: PairwiseConfig(),
}

_FINISH_BLOCK_E, _FINISH_BLOCK_S = 32, 32  # pairwise finish: cost entries per program, splits per step


def pairwise_mask_cost_config(pred) -> PairwiseConfig:
    """The launch config of the matcher cost kernel for this pred (by its dtype)."""
    return PAIRWISE_CONFIGS[pred.dtype]


def pairwise_smem_bytes(config: PairwiseConfig, pred_bytes: int, target_bytes: int) -> int:
    """Upper estimate of the pairwise kernel's shared memory (bytes) as Triton 3.6 lays it out.

    (num_stages - 1) pipelined copies of the 4 gathered taps of the pred and target tiles,
    the fp32 operands of the two dots (two [BQ, BP] A tiles, and the [BP, BT] B tile, which
    tf32x3 stores twice; counted twice always), and 2 KiB of reduction scratch. Checked
    against sm_80 and sm_90 compiles (tests/test_op_point_loss.py); the old
    (64, 32, 64, num_stages=3) config with fp32 pred and target compiles to 239616 bytes,
    the GPU run's OutOfResources number, and is estimated at 247808.
    """
    c = config
    taps = 4 * (c.block_q * c.block_p * pred_bytes + c.block_t * c.block_p * target_bytes)
    dots = 4 * (2 * c.block_q * c.block_p + 2 * c.block_p * c.block_t)
    return max(c.num_stages - 1, 0) * taps + dots + 2048


def pairwise_split(config: PairwiseConfig, q: int, t: int, p: int) -> tuple:
    """(grid, points per split): P split so the grid has about config.programs programs."""
    grid_q = cdiv(q, config.block_q)
    grid_t = cdiv(t, config.block_t)
    steps = cdiv(p, config.block_p)
    splits = max(1, min(steps, config.programs // (grid_q * grid_t)))
    chunk = cdiv(steps, splits) * config.block_p
    return (grid_q, grid_t, cdiv(p, chunk)), chunk


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _row_taps(cx, cy, H, W):
    """:func:`_taps` of points [BLOCK_P] as [1, BLOCK_P] rows, for gathers of [rows, BLOCK_P] tiles."""
    x0, y0, wx0, wx1, wy0, wy1, v00, v01, v10, v11 = _taps(cx, cy, H, W)
    return (x0[None, :], y0[None, :], wx0[None, :], wx1[None, :], wy0[None, :], wy1[None, :],
            v00[None, :], v01[None, :], v10[None, :], v11[None, :])


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
    # Rows past Q / T read row Q - 1 / T - 1 (their sums are never stored), so the gathers
    # are masked by point only.
    pred_rows = pred + tl.minimum(rq, Q - 1).to(tl.int64)[:, None] * s_pq
    target_rows = target + tl.minimum(rt, T - 1).to(tl.int64)[:, None] * s_tt

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
        pm_row = pm[None, :]
        x = _gather(pred_rows, s_ph, s_pw, *_row_taps(cx, cy, Hp, Wp), pm_row)
        t = _gather(target_rows, s_th, s_tw, *_row_taps(cx, cy, Ht, Wt), pm_row)
        s = tl.where(pm_row, tl.sigmoid(x), 0.0)
        softplus = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
        # x, s and t are 0 at points past P, so the dots need no masking.
        t_trans = tl.trans(t)
        acc_xt += tl.dot(x, t_trans, input_precision=PRECISION)
        acc_st += tl.dot(s, t_trans, input_precision=PRECISION)
        sp_sum += tl.sum(tl.where(pm_row, softplus, 0.0), 1)
        s_sum += tl.sum(s, 1)
        t_sum += tl.sum(t, 1)

    row = part + split.to(tl.int64) * E
    qt = row + rq[:, None] * T + rt[None, :]
    qtm = qm[:, None] & tm[None, :]
    tl.store(qt, acc_xt, mask=qtm)
    tl.store(qt + Q * T, acc_st, mask=qtm)
    # Every pid_t program has the same per-query sums, every pid_q program the same per-target
    # sums: only the pid_t == 0 / pid_q == 0 programs store them (the row bound is 0 in the
    # others; `qm & (pid_t == 0)`, a scalar condition broadcast into a block, becomes an
    # int32 mask in Triton 3.9's interpreter, which its stores refuse).
    q_dst = row + 2 * Q * T + rq
    q_stored = rq < tl.where(pid_t == 0, Q, 0)
    tl.store(q_dst, sp_sum, mask=q_stored)
    tl.store(q_dst + Q, s_sum, mask=q_stored)
    tl.store(row + 2 * Q * T + 2 * Q + rt, t_sum, mask=rt < tl.where(pid_q == 0, T, 0))


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


def pairwise_mask_cost(pred, target, coords, *, config: "PairwiseConfig | None" = None):
    """(cost_bce [Q, T], cost_dice [Q, T]) float32: the matcher's costs on shared points.

    Intermediates: the split-P partial sums [SPLIT, 2QT + 2Q + T] fp32 (2.8 MB at the
    standard shape); the sampled [Q, P] / [T, P] values live only in registers.
    ``config``: the launch configuration (None: :func:`pairwise_mask_cost_config`).
    """
    config = chosen(config, PairwiseConfig, pairwise_mask_cost_config, pred)
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
    _pairwise_finish_kernel[(cdiv(q * t_count, _FINISH_BLOCK_E),)](
        part, cost_bce, cost_dice, q, t_count, grid[2], e, 1.0 / p,
        BLOCK_E=_FINISH_BLOCK_E, BLOCK_S=_FINISH_BLOCK_S,
    )
    return cost_bce, cost_dice

"""Masked cross-attention in Triton: flash-attention forward and backward with a key mask.

Contract (see ``m2f_kernels.reference.masked_attention``): q ``[B, H, Q, D]``, k ``[B, H, N, D]``,
v ``[B, H, N, Dv]``, mask ``[B, Q, N]`` (shared by the heads: read with head stride 0, never
repeated) or ``[B, H, Q, N]``, bool (True = blocked, read as uint8) or floating logits
(blocked where < 0, read in their own dtype). A row whose keys are all blocked attends to
all keys (the empty-row rule).

Forward (``_fwd_kernel``): one program per (query block, head, key split, batch) runs an
online softmax over its key tiles in the base-2 domain with fp32 accumulators. The empty-row
rule costs no extra pass: each row starts in "all keys" mode and switches to "visible keys"
mode at its first visible key, dropping what it had accumulated. When the keys are split
over programs (flash-decoding, to fill the GPU when B*H*Q is small), ``_combine_kernel``
merges the partial results, ignoring a split's "all keys" partial whenever another split saw
a visible key of the row. Only ``out`` and ``lse`` are saved.

Backward, two launches: ``_bwd_prologue_kernel`` computes per mask row the empty-row flag
(the backward needs it before it sees the whole row) and zeroes the arrival counters;
``_bwd_kernel`` walks key tiles, recomputes P = exp(S - lse) tile by tile (delta =
rowsum(dO * O) from the tiles), writes dk/dv per key tile once and dq per key chunk into an
fp32 partial buffer; the last chunk program of each (b, h) to finish sums the partials in
chunk order and writes dq (deterministic: the sum order never depends on who finishes last).

The key loops are straight-line by default, so Triton software-pipelines their mask, k and
v loads. ``Config.skip_tiles`` adds a branch that neither reads nor computes a key tile no
row may use (exact: the accumulators are untouched), at the price of that pipelining.

No tensor of size B*H*Q*N exists anywhere; the largest scratch is the dq / forward partial
buffer of (chunks or splits) * B*H*Q*D floats. There is no host synchronisation.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)  # kernels may only read constexpr globals
_LOG2E = tl.constexpr(LOG2E)
CONFIG_ENV = "M2F_MA_CONFIG"


# ---------------------------------------------------------------------------------------------
# Shared tile helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _visible(mask_ptrs, ok, MASK_IS_BOOL: tl.constexpr):
    """int1 tile: key in bounds (``ok``) and not blocked by the mask."""
    mt = tl.load(mask_ptrs, mask=ok, other=0)
    if MASK_IS_BOOL:
        vis = mt == 0
    else:
        vis = (mt < 0) == 0  # NaN logits count as visible, as in the reference (mask < 0)
    return vis & ok


@triton.jit
def _mma(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST (interpreter + bf16 only) feeds fp32 copies of
    the operands: the interpreter's bf16 dot is wrong, and bf16 values are exact in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _load_tile(base, offs_r, offs_c, s_r, s_c, r_ok, c_ok):
    """[len(offs_r), len(offs_c)] tile of a strided 2-D slice, zero where a row or column
    is not ok."""
    ptrs = base + offs_r.to(tl.int64)[:, None] * s_r + offs_c[None, :] * s_c
    return tl.load(ptrs, mask=r_ok[:, None] & c_ok[None, :], other=0.0)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _fwd_update(q, k, v, vis, tile_any, n_ok, m_i, l_i, acc, seen, scale_log2,
                DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile of the online softmax with the per-row mode switch (see _fwd_kernel)."""
    newly = tile_any & (seen == 0)
    seen = seen | tile_any
    select = tl.where(seen[:, None], vis, n_ok[None, :])
    s = _mma(q, tl.trans(k), DOT_PREC, UPCAST) * scale_log2
    s = tl.where(select, s, float("-inf"))
    # A row switching mode restarts from -inf, so alpha = 0 wipes its l and acc.
    m_prev = tl.where(newly, float("-inf"), m_i)
    m_new = tl.maximum(m_prev, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padding rows only
    alpha = tl.exp2(m_prev - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PREC, UPCAST)
    return m_new, l_i, acc, seen


@triton.jit(do_not_specialize=["kb_per_split", "num_splits", "num_qb"])
def _fwd_kernel(
    Q, K, V, M, O, LSE, PART,
    s_qb, s_qh, s_qq, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_mb, s_mh, s_mq, s_mn,
    H, NQ, NK, D, DV, scale_log2, kb_per_split, num_splits, num_qb, stats_offset,
    MASK_IS_BOOL: tl.constexpr, SPLIT: tl.constexpr, SKIP_TILES: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """PART (SPLIT only), fp32: acc [B*H*splits, NQ, DV], then from ``stats_offset`` on
    [B*H*splits, 3, NQ] (m, l, seen)."""
    # Query blocks vary fastest (they read the same k/v tiles), then heads (they read the
    # same mask tiles of a [B, Q, N] mask), so L2 serves the repeats.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    qb = pid % num_qb
    h = ((pid // num_qb) % H).to(tl.int64)
    split = pid // (num_qb * H)

    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ok = offs_q < NQ
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    q = _load_tile(Q + b * s_qb + h * s_qh, offs_q, offs_d, s_qq, s_qd, q_ok, d_ok)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    m_rows = M + b * s_mb + h * s_mh + offs_q.to(tl.int64)[:, None] * s_mq

    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], tl.float32)
    # seen[r]: row r has met a visible key in this split. Until then it accumulates over
    # all keys (its answer if the row turns out empty); at the first visible key it resets
    # and from then on accumulates visible keys only. Padding rows start "seen" so they
    # never stop a tile from being skipped.
    seen = offs_q >= NQ

    kb_start = split * kb_per_split
    kb_end = tl.minimum(kb_start + kb_per_split, tl.cdiv(NK, BLOCK_N))
    for kb in range(kb_start, kb_end):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NK
        vis = _visible(m_rows + offs_n.to(tl.int64)[None, :] * s_mn,
                       q_ok[:, None] & n_ok[None, :], MASK_IS_BOOL)
        tile_any = tl.max(vis.to(tl.int32), axis=1) > 0
        if SKIP_TILES:
            # No row sees a key here and none still collects all keys: k/v stay unread.
            # The branch keeps Triton from pipelining the loop (see the notes).
            if tl.max((tile_any | (seen == 0)).to(tl.int32), axis=0) > 0:
                k = _load_tile(k_base, offs_n, offs_d, s_kn, s_kd, n_ok, d_ok)
                v = _load_tile(v_base, offs_n, offs_dv, s_vn, s_vd, n_ok, dv_ok)
                m_i, l_i, acc, seen = _fwd_update(q, k, v, vis, tile_any, n_ok, m_i, l_i, acc, seen,
                                                  scale_log2, DOT_PREC, UPCAST)
        else:  # straight-line body: the mask, k and v loads are software-pipelined
            k = _load_tile(k_base, offs_n, offs_d, s_kn, s_kd, n_ok, d_ok)
            v = _load_tile(v_base, offs_n, offs_dv, s_vn, s_vd, n_ok, dv_ok)
            m_i, l_i, acc, seen = _fwd_update(q, k, v, vis, tile_any, n_ok, m_i, l_i, acc, seen,
                                              scale_log2, DOT_PREC, UPCAST)

    bh = b * H + h
    out_mask = q_ok[:, None] & dv_ok[None, :]
    if SPLIT:
        row = bh * num_splits + split
        tl.store(PART + (row * NQ + offs_q)[:, None] * DV + offs_dv[None, :], acc, mask=out_mask)
        s_ptrs = PART + stats_offset + row * 3 * NQ + offs_q
        tl.store(s_ptrs, m_i, mask=q_ok)
        tl.store(s_ptrs + NQ, l_i, mask=q_ok)
        tl.store(s_ptrs + 2 * NQ, seen.to(tl.float32), mask=q_ok)
    else:
        l_safe = tl.where(q_ok, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(O + (bh * NQ + offs_q)[:, None] * DV + offs_dv[None, :],
                 out.to(O.dtype.element_ty), mask=out_mask)
        tl.store(LSE + bh * NQ + offs_q, (m_i + tl.log2(l_safe)) * _LN2, mask=q_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _combine_kernel(
    PART, O, LSE, NQ, DV, num_splits, stats_offset,
    BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merge the key splits of one (b, h, query block); splits whose rows never met a
    visible key hold all-keys partials and count only if no split met one (empty row).
    BLOCK_S splits are loaded at once ([BLOCK_S, BLOCK_Q(, BLOCK_DV)] tiles), so the
    standard shapes take one round of loads per pass instead of one per split."""
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ok = offs_q < NQ
    dv_ok = offs_dv < DV
    stats = PART + stats_offset + bh * num_splits * 3 * NQ + offs_q[None, :]  # [split, 3, NQ]

    any_seen = tl.zeros([BLOCK_Q], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        sp = s0 + offs_s
        ok = (sp < num_splits)[:, None] & q_ok[None, :]
        seen = tl.load(stats + (sp * 3 + 2)[:, None] * NQ, mask=ok, other=0.0)
        any_seen = tl.maximum(any_seen, tl.max(seen, axis=0))

    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        sp = s0 + offs_s
        ok = (sp < num_splits)[:, None] & q_ok[None, :]
        m_s = tl.load(stats + (sp * 3)[:, None] * NQ, mask=ok, other=float("-inf"))
        l_s = tl.load(stats + (sp * 3 + 1)[:, None] * NQ, mask=ok, other=0.0)
        seen_s = tl.load(stats + (sp * 3 + 2)[:, None] * NQ, mask=ok, other=0.0)
        rows = (bh * num_splits + sp)[:, None, None] * NQ + offs_q[None, :, None]
        o_s = tl.load(PART + rows * DV + offs_dv[None, None, :], mask=ok[:, :, None] & dv_ok[None, None, :],
                      other=0.0)
        m_s = tl.where((seen_s > 0) | (any_seen[None, :] == 0), m_s, float("-inf"))
        m_new = tl.maximum(m, tl.max(m_s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m - m_safe)
        c = tl.exp2(m_s - m_safe[None, :])
        l = l * a + tl.sum(l_s * c, axis=0)
        acc = acc * a[:, None] + tl.sum(o_s * c[:, :, None], axis=0)
        m = m_new

    l_safe = tl.where(q_ok, l, 1.0)
    o_mask = q_ok[:, None] & dv_ok[None, :]
    tl.store(O + (bh * NQ + offs_q)[:, None] * DV + offs_dv[None, :],
             (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=o_mask)
    tl.store(LSE + bh * NQ + offs_q, (m + tl.log2(l_safe)) * _LN2, mask=q_ok)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _bwd_prologue_kernel(
    M, ROWVIS, SEM, s_mb, s_mh, s_mq, s_mn, H, HM, NQ, NK,
    MASK_IS_BOOL: tl.constexpr, ZERO_SEM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (query block, batch x mask head): ROWVIS[b, hm, q] (int32) = 1 if the
    mask row has a visible key; SEM[b, h] = 0 for the heads sharing the mask row (the
    backward's arrival counters). Few rows and long key tiles: few dependent loads."""
    qb = tl.program_id(0)
    bhm = tl.program_id(1).to(tl.int64)
    b = bhm // HM
    hm = bhm % HM
    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < NQ
    m_rows = M + b * s_mb + hm * s_mh + offs_q.to(tl.int64)[:, None] * s_mq
    any_vis = tl.zeros([BLOCK_Q], tl.int32)
    for nb in range(0, tl.cdiv(NK, BLOCK_N)):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        vis = _visible(m_rows + offs_n.to(tl.int64)[None, :] * s_mn,
                       q_ok[:, None] & (offs_n < NK)[None, :], MASK_IS_BOOL)
        any_vis = tl.maximum(any_vis, tl.max(vis.to(tl.int32), axis=1))
    tl.store(ROWVIS + bhm * NQ + offs_q, any_vis, mask=q_ok)
    if ZERO_SEM:
        if qb == 0:
            heads = H // HM
            for i in range(0, heads):
                tl.store(SEM + b * H + hm * heads + i, 0)


@triton.jit
def _bwd_rows(
    Q, DO, O, LSE, RV, offs_q, s_qq, s_qd, s_oq, s_od, s_doq, s_dod, NQ, D, DV,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Per-query-block state: q, dO, lse (base 2), delta = rowsum(dO * O), empty-row flag."""
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ok = offs_q < NQ
    dv_ok = offs_dv < DV
    q = _load_tile(Q, offs_q, tl.arange(0, BLOCK_D), s_qq, s_qd, q_ok, tl.arange(0, BLOCK_D) < D)
    do = _load_tile(DO, offs_q, offs_dv, s_doq, s_dod, q_ok, dv_ok)
    o = _load_tile(O, offs_q, offs_dv, s_oq, s_od, q_ok, dv_ok)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    lse2 = tl.load(LSE + offs_q, mask=q_ok, other=0.0) * _LOG2E
    empty = (tl.load(RV + offs_q, mask=q_ok, other=1) == 0) & q_ok
    return q, do, lse2, delta, empty


@triton.jit
def _bwd_select(m_base, offs_q, offs_n, s_mq, s_mn, empty, NQ, NK, MASK_IS_BOOL: tl.constexpr):
    """int1 [BLOCK_Q, BLOCK_N]: keys each row attends to (all keys for empty rows)."""
    ok = (offs_q < NQ)[:, None] & (offs_n < NK)[None, :]
    vis = _visible(m_base + offs_q.to(tl.int64)[:, None] * s_mq + offs_n.to(tl.int64)[None, :] * s_mn,
                   ok, MASK_IS_BOOL)
    return vis | (empty[:, None] & ok)


@triton.jit
def _bwd_tile(q, do, lse2, delta, k, v, select, scale_log2, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Unscaled contributions of one (query block, key tile): dk/scale, dv, dq/scale."""
    s = _mma(q, tl.trans(k), DOT_PREC, UPCAST) * scale_log2
    p = tl.where(select, tl.exp2(s - lse2[:, None]), 0.0)
    dv = _mma(tl.trans(p.to(do.dtype)), do, DOT_PREC, UPCAST)
    dp = _mma(do, tl.trans(v), DOT_PREC, UPCAST)
    ds = p * (dp - delta[:, None])
    dk = _mma(tl.trans(ds.to(q.dtype)), q, DOT_PREC, UPCAST)
    dq = _mma(ds.to(k.dtype), k, DOT_PREC, UPCAST)
    return dk, dv, dq


@triton.jit
def _reduce_dq(DQ_PART, DQ, SEM, bh, BH, NQ, D, num_chunks, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """Called by every chunk program of (b, h) once its fp32 partial DQ_PART[chunk, bh] is
    written: the last to arrive sums all partials in chunk order and writes dq (so the
    result never depends on which program is last)."""
    tl.debug_barrier()  # every thread's partial stores precede the release below
    arrived = tl.atomic_add(SEM + bh, 1, sem="acq_rel", scope="gpu")
    if arrived == num_chunks - 1:
        offs_d = tl.arange(0, BLOCK_D)
        for qb in range(0, tl.cdiv(NQ, BLOCK_Q)):
            offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
            ok = (offs_q < NQ)[:, None] & (offs_d < D)[None, :]
            offs = offs_q[:, None] * D + offs_d[None, :]
            acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
            for c in range(0, num_chunks):
                # volatile: read what the other programs wrote (L2), never a stale L1 line
                acc += tl.load(DQ_PART + (c * BH + bh) * NQ * D + offs, mask=ok, other=0.0, volatile=True)
            tl.store(DQ + bh * NQ * D + offs, acc.to(DQ.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["kb_per_chunk", "num_chunks"])
def _bwd_kernel(
    Q, K, V, M, O, DO, LSE, RV, DK, DV_OUT, DQ, DQ_PART, SEM,
    s_qb, s_qh, s_qq, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_mb, s_mh, s_mq, s_mn,
    s_ob, s_oh, s_oq, s_od,
    s_dob, s_doh, s_doq, s_dod,
    s_rvb, s_rvh,
    B, H, NQ, NK, D, DV, scale, scale_log2, kb_per_chunk, num_chunks,
    MASK_IS_BOOL: tl.constexpr, ONE_QB: tl.constexpr, PARTIAL_DQ: tl.constexpr,
    SKIP_TILES: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program per (head, key chunk, batch): dk, dv of the chunk's key tiles; dq either
    directly (one chunk, one query block) or through DQ_PART[chunk, b, h] ([NQ, D] fp32) and
    _reduce_dq."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = (pid % H).to(tl.int64)
    chunk = pid // H

    q_base = Q + b * s_qb + h * s_qh
    o_base = O + b * s_ob + h * s_oh
    do_base = DO + b * s_dob + h * s_doh
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    m_base = M + b * s_mb + h * s_mh
    bh = b * H + h
    lse_base = LSE + bh * NQ
    rv_base = RV + b * s_rvb + h * s_rvh
    dk_base = DK + bh * NK * D
    dv_base = DV_OUT + bh * NK * DV
    dq_part = DQ_PART + (chunk * B * H + bh) * NQ * D

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    kb_start = chunk * kb_per_chunk
    kb_end = tl.minimum(kb_start + kb_per_chunk, tl.cdiv(NK, BLOCK_N))

    if ONE_QB:  # all queries in one block: its state stays in registers for the whole chunk
        offs_q = tl.arange(0, BLOCK_Q)
        q, do, lse2, delta, empty = _bwd_rows(
            q_base, do_base, o_base, lse_base, rv_base, offs_q,
            s_qq, s_qd, s_oq, s_od, s_doq, s_dod, NQ, D, DV, BLOCK_D, BLOCK_DV)
        dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
        for kb in range(kb_start, kb_end):
            offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < NK
            select = _bwd_select(m_base, offs_q, offs_n, s_mq, s_mn, empty, NQ, NK, MASK_IS_BOOL)
            if SKIP_TILES:  # no row attends to this tile: k/v stay unread, dk = dv = 0
                dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
                dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
                if tl.max(select.to(tl.int32)) > 0:
                    k = _load_tile(k_base, offs_n, offs_d, s_kn, s_kd, n_ok, d_ok)
                    v = _load_tile(v_base, offs_n, offs_dv, s_vn, s_vd, n_ok, dv_ok)
                    dk, dv, dq_c = _bwd_tile(q, do, lse2, delta, k, v, select, scale_log2, DOT_PREC, UPCAST)
                    dq += dq_c
            else:  # straight-line body: software-pipelined loads
                k = _load_tile(k_base, offs_n, offs_d, s_kn, s_kd, n_ok, d_ok)
                v = _load_tile(v_base, offs_n, offs_dv, s_vn, s_vd, n_ok, dv_ok)
                dk, dv, dq_c = _bwd_tile(q, do, lse2, delta, k, v, select, scale_log2, DOT_PREC, UPCAST)
                dq += dq_c
            tl.store(dk_base + offs_n[:, None] * D + offs_d[None, :],
                     (dk * scale).to(DK.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
            tl.store(dv_base + offs_n[:, None] * DV + offs_dv[None, :],
                     dv.to(DV_OUT.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])
        dq_offs = offs_q[:, None] * D + offs_d[None, :]
        dq_mask = (offs_q < NQ)[:, None] & d_ok[None, :]
        if PARTIAL_DQ:
            tl.store(dq_part + dq_offs, dq * scale, mask=dq_mask)
        else:
            tl.store(DQ + bh * NQ * D + dq_offs, (dq * scale).to(DQ.dtype.element_ty), mask=dq_mask)
    else:  # several query blocks: dk/dv stay in registers, dq is read-modify-written
        for kb in range(kb_start, kb_end):
            offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < NK
            k = _load_tile(k_base, offs_n, offs_d, s_kn, s_kd, n_ok, d_ok)
            v = _load_tile(v_base, offs_n, offs_dv, s_vn, s_vd, n_ok, dv_ok)
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
            for qb in range(0, tl.cdiv(NQ, BLOCK_Q)):
                offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
                q, do, lse2, delta, empty = _bwd_rows(
                    q_base, do_base, o_base, lse_base, rv_base, offs_q,
                    s_qq, s_qd, s_oq, s_od, s_doq, s_dod, NQ, D, DV, BLOCK_D, BLOCK_DV)
                select = _bwd_select(m_base, offs_q, offs_n, s_mq, s_mn, empty, NQ, NK, MASK_IS_BOOL)
                dq_c = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
                run = True
                if SKIP_TILES:  # k/v are shared by the query blocks: skip the compute only
                    run = tl.max(select.to(tl.int32)) > 0
                if run:
                    dk_c, dv_c, dq_c = _bwd_tile(q, do, lse2, delta, k, v, select, scale_log2,
                                                 DOT_PREC, UPCAST)
                    dk += dk_c
                    dv += dv_c
                dq_ptrs = dq_part + offs_q[:, None] * D + offs_d[None, :]
                dq_mask = (offs_q < NQ)[:, None] & d_ok[None, :]
                dq_old = tl.load(dq_ptrs, mask=dq_mask & (kb > kb_start), other=0.0)
                tl.store(dq_ptrs, dq_old + dq_c * scale, mask=dq_mask)
                tl.debug_barrier()  # the next key tile re-reads these rows
            tl.store(dk_base + offs_n[:, None] * D + offs_d[None, :],
                     (dk * scale).to(DK.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
            tl.store(dv_base + offs_n[:, None] * DV + offs_dv[None, :],
                     dv.to(DV_OUT.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])
    if PARTIAL_DQ:
        _reduce_dq(DQ_PART, DQ, SEM, bh, B * H, NQ, D, num_chunks, BLOCK_Q, BLOCK_D)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------
FP32_DOTS = ("tf32x3", "tf32", "ieee")


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiling of one launch. Any valid Config gives the same result up to fp32 rounding
    (``kb_per_split`` only regroups the sums; block sizes only re-tile them), except
    ``fp32_dot``: how fp32 inputs meet the tensor cores ('tf32x3': ~fp32 accuracy, the
    default; 'tf32': fewer registers, but dq's error reaches ~2e-3 (H200, first GPU run),
    above DESIGN.md's 1e-3 for tf32 dots, so only where torch's fp32 matmul precision is
    not 'highest' or M2F_MA_CONFIG asks for it; 'ieee': CUDA cores)."""
    block_q: int
    block_n: int
    kb_per_split: int  # key tiles per program (forward split / backward chunk)
    skip_tiles: bool = False
    num_warps: int = 4
    num_stages: int = 2
    fp32_dot: str = "tf32x3"


@dataclasses.dataclass(frozen=True)
class Rules:
    """How the heuristic tiles one pass for one dtype class (see ``make_config``).

    block_q_max: largest query block; block_n: key tile; num_warps: 0 picks by block_q;
    programs_per_sm: the key split aims at this many programs per SM in one wave (the
    resident programs an SM holds at these register counts); min_tiles: fewest key tiles
    per program (so the partials stay small next to the k/v traffic); wide_block_n: key tile
    cap when max(D, Dv) > 64 (0: none); other_d_programs_per_sm: programs_per_sm when the
    padded head dims are not both 32 (0: programs_per_sm)."""
    block_q_max: int
    block_n: int
    num_stages: int
    programs_per_sm: int
    wide_block_n: int = 0
    other_d_programs_per_sm: int = 0
    num_warps: int = 0
    min_tiles: int = 4
    skip_tiles: bool = False
    fp32_dot: str = "tf32x3"


# Keyed by (pass, dtype class). Register counts behind them: bench/notes/masked_attention.md.
# Round 3 (bench/results/nvidia-h200-2026-11-27-2-sweep-masked-attention.txt, H200, D=32,
# N=16384): fwd fp32 block_q_max 64 + 3 programs/SM 1.10x, bwd fp32 block_q_max 64 1.17x,
# bwd 16-bit block_n 64 1.66x. Measured at D=32 only; the other head dims keep what the
# sm_90a/sm_80 compile check supports: 3 fp32 forward programs fit an SM's registers only at
# BLOCK_D 32 (162 regs; 185-230 elsewhere -> 2), and the 16-bit backward with 64-key tiles
# spills more than with 32 at D=128 (1280 vs 1024 B), so wide heads keep 32.
RULES = {
    ("fwd", "fp32"): Rules(block_q_max=64, block_n=32, num_stages=3, programs_per_sm=3,
                           wide_block_n=16, other_d_programs_per_sm=2),
    ("fwd", "16bit"): Rules(block_q_max=128, block_n=32, num_stages=3, programs_per_sm=2),
    ("bwd", "fp32"): Rules(block_q_max=64, block_n=16, num_stages=3, programs_per_sm=1,
                           wide_block_n=16),
    ("bwd", "16bit"): Rules(block_q_max=256, block_n=64, num_stages=3, programs_per_sm=1,
                            wide_block_n=32),
}


def parse_rules_override(text: str) -> dict:
    """``M2F_MA_CONFIG`` syntax -> {(pass, class): {field: value}}.

    ``"fwd:block_n=64,num_stages=4;bwd.fp32:fp32_dot=tf32"``: groups separated by ';', each
    ``<pass>[.<class>]:<field>=<value>,...`` with pass fwd/bwd and class fp32/16bit (no
    class: both). Fields are those of :class:`Rules`."""
    out: dict = {}
    fields = {f.name for f in dataclasses.fields(Rules)}
    for group in filter(None, (g.strip() for g in text.split(";"))):
        target, _, assignments = group.partition(":")
        pass_, _, cls = target.strip().partition(".")
        if pass_ not in ("fwd", "bwd") or cls not in ("", "fp32", "16bit"):
            raise ValueError(f"{CONFIG_ENV}: bad target {target!r} (fwd|bwd[.fp32|.16bit])")
        values = {}
        for item in filter(None, (a.strip() for a in assignments.split(","))):
            name, _, raw = (x.strip() for x in item.partition("="))
            if name not in fields:
                raise ValueError(f"{CONFIG_ENV}: unknown field {name!r}; fields: {sorted(fields)}")
            if name == "fp32_dot":
                if raw not in FP32_DOTS:
                    raise ValueError(f"{CONFIG_ENV}: fp32_dot must be one of {FP32_DOTS}, got {raw!r}")
                values[name] = raw
            elif name == "skip_tiles":
                values[name] = raw.lower() in ("1", "true", "yes")
            elif raw.isdigit():
                values[name] = int(raw)
            else:
                raise ValueError(f"{CONFIG_ENV}: {name} must be a positive integer, got {raw!r}")
        for c in ((cls,) if cls else ("fp32", "16bit")):
            out.setdefault((pass_, c), {}).update(values)
    return out


@functools.lru_cache(maxsize=8)
def _rules_table(env_text: str, matmul_precision: str) -> dict:
    overrides = parse_rules_override(env_text)
    table = {}
    for key, rules in RULES.items():
        if matmul_precision != "highest" and key[1] == "fp32":
            # torch.set_float32_matmul_precision("high" / "medium"): fp32 matmuls may use TF32,
            # so ours do too (one tensor-core pass instead of three); M2F_MA_CONFIG still wins
            rules = dataclasses.replace(rules, fp32_dot="tf32")
        table[key] = dataclasses.replace(rules, **overrides.get(key, {}))
    return table


def rules_for(backward: bool, fp32: bool) -> Rules:
    """The Rules in force: RULES, with TF32 dots for fp32 inputs where
    ``torch.get_float32_matmul_precision()`` is not 'highest', and the ``M2F_MA_CONFIG``
    environment override applied."""
    table = _rules_table(os.environ.get(CONFIG_ENV, ""), torch.get_float32_matmul_precision())
    return table[("bwd" if backward else "fwd", "fp32" if fp32 else "16bit")]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    # The interpreter gets a small pretend GPU so CPU tests exercise the split paths.
    if device.type != "cuda" or _interpreting():
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# Host-side integer helpers: triton.cdiv / next_power_of_2 are constexpr functions whose
# Python call path costs microseconds, paid on every launch.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _block_d(d: int) -> int:
    return max(16, _next_pow2(d))


@functools.lru_cache(maxsize=1024)
def _config(backward: bool, bh: int, nq: int, nk: int, d: int, dv: int, fp32: bool, sms: int,
            rules: Rules) -> Config:
    """Tiling for one shape under ``rules``.

    One query block covering all queries (Q <= block_q_max) reads each k/v tile once per
    head; the backward then also keeps q, dO and dq in registers for the whole key chunk.
    Wide heads shrink the query block (and, per ``wide_block_n``, the key tile) to stay
    within registers.
    The keys are split until one wave of programs fills the SMs (B*H*Q alone gives only
    B*H*num_qb programs), rounding down so no nearly empty second wave is left.
    """
    width = max(32, _block_d(d), _block_d(dv))
    block_n = rules.block_n
    if width > 64 and rules.wide_block_n:
        block_n = min(block_n, rules.wide_block_n)
    ppsm = rules.programs_per_sm
    if rules.other_d_programs_per_sm and not _block_d(d) == _block_d(dv) == 32:
        ppsm = rules.other_d_programs_per_sm
    cap = max(16, rules.block_q_max * 32 // width)
    block_q = min(cap, max(16, _next_pow2(nq)))
    num_warps = rules.num_warps or {16: 4, 32: 4, 64: 4, 128: 8}.get(block_q, 8 if backward else 16)
    num_qb = _cdiv(nq, block_q)
    num_kb = _cdiv(nk, block_n)
    programs = bh if backward else bh * num_qb
    splits = max(1, min(sms * ppsm // programs, num_kb // rules.min_tiles))
    return Config(block_q=block_q, block_n=block_n, kb_per_split=_cdiv(num_kb, splits),
                  skip_tiles=rules.skip_tiles, num_warps=num_warps, num_stages=rules.num_stages,
                  fp32_dot=rules.fp32_dot)


def make_config(q, k, v, backward: bool, rules: "Rules | None" = None) -> Config:
    """The Config for these inputs; ``rules`` defaults to :func:`rules_for` (sweeps pass
    their own)."""
    B, H, NQ, D = q.shape
    fp32 = q.element_size() == 4
    rules = rules if rules is not None else rules_for(backward, fp32)
    return _config(backward, B * H, NQ, k.shape[2], D, v.shape[3], fp32, _num_sms(q.device), rules)


def fwd_config(q, k, v) -> Config:
    return make_config(q, k, v, backward=False)


def bwd_config(q, k, v) -> Config:
    return make_config(q, k, v, backward=True)


def _upcast_dots(q: torch.Tensor) -> bool:
    return q.dtype == torch.bfloat16 and _interpreting()


def _dot_precision(dtype: torch.dtype, cfg: Config) -> str:
    # 16-bit inputs ignore it; fp32 takes the Config's choice (default 3xTF32, ~fp32).
    return cfg.fp32_dot if dtype == torch.float32 else "tf32"


def _mask_args(mask: torch.Tensor):
    """(mask tensor as the kernel reads it, is_bool, strides b, h, q, n); head stride 0
    for a [B, Q, N] mask so every head reads the same rows."""
    is_bool = mask.dtype == torch.bool
    m = mask.view(torch.uint8) if is_bool else mask
    if m.dim() == 3:
        sb, sq, sn = m.stride()
        return m, is_bool, (sb, 0, sq, sn)
    return m, is_bool, tuple(m.stride())


# ---------------------------------------------------------------------------------------------
# Backend entry points
# ---------------------------------------------------------------------------------------------
def forward(q, k, v, mask, scale: float, cfg: Config):
    """masked_attention_fwd with an explicit launch configuration."""
    B, H, NQ, D = q.shape
    NK, DV = k.shape[2], v.shape[3]
    m, is_bool, ms = _mask_args(mask)
    out = torch.empty((B, H, NQ, DV), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    num_qb = _cdiv(NQ, cfg.block_q)
    num_kb = _cdiv(NK, cfg.block_n)
    splits = _cdiv(num_kb, cfg.kb_per_split)
    block_d, block_dv = _block_d(D), _block_d(DV)
    stats_offset = B * H * splits * NQ * DV  # partial acc first, then m, l, seen
    part = (torch.empty(B * H * splits * NQ * (DV + 3), dtype=torch.float32, device=q.device)
            if splits > 1 else out)  # out: unused placeholder
    _fwd_kernel[(H * splits * num_qb, B)](
        q, k, v, m, out, lse, part,
        *q.stride(), *k.stride(), *v.stride(), *ms,
        H, NQ, NK, D, DV, scale * LOG2E, cfg.kb_per_split, splits, num_qb, stats_offset,
        MASK_IS_BOOL=is_bool, SPLIT=splits > 1, SKIP_TILES=cfg.skip_tiles,
        DOT_PREC=_dot_precision(q.dtype, cfg), UPCAST=_upcast_dots(q), BLOCK_Q=cfg.block_q,
        BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if splits > 1:
        block_s = min(_next_pow2(splits), 16)
        combine_q = max(1, min(64, 4096 // (block_s * block_dv)))  # <= 32 partial values per thread
        _combine_kernel[(_cdiv(NQ, combine_q), B * H)](
            part, out, lse, NQ, DV, splits, stats_offset,
            BLOCK_S=block_s, BLOCK_Q=combine_q, BLOCK_DV=block_dv, num_warps=4,
        )
    return out, lse


# The prologue's mask scan: few rows and long key tiles, so each program makes few
# dependent loads (4 at N = 16384) and there are many programs.
_PROLOGUE_Q, _PROLOGUE_N = 4, 4096


def backward(grad_out, q, k, v, mask, out, lse, scale: float, cfg: Config):
    """masked_attention_bwd with an explicit launch configuration."""
    B, H, NQ, D = q.shape
    NK, DV = k.shape[2], v.shape[3]
    dev = q.device
    m, is_bool, ms = _mask_args(mask)
    mask_heads = H if mask.dim() == 4 else 1
    lse = lse.contiguous()
    num_kb = _cdiv(NK, cfg.block_n)
    chunks = _cdiv(num_kb, cfg.kb_per_split)
    one_qb = NQ <= cfg.block_q
    partial_dq = chunks > 1 or not one_qb

    # One fp32 scratch: [row flags (int32) | arrival counters (int32) | dq partials]
    n_flags, n_sem = B * mask_heads * NQ, B * H
    n_ints = _cdiv(n_flags + n_sem, 4) * 4  # keep the partials 16-byte aligned
    scratch = torch.empty(n_ints + (chunks * B * H * NQ * D if partial_dq else 0),
                          dtype=torch.float32, device=dev)
    ints = scratch[:n_ints].view(torch.int32)
    rowvis, sem = ints, ints[n_flags:]
    dq_part = scratch[n_ints:] if partial_dq else scratch
    dq = torch.empty((B, H, NQ, D), dtype=q.dtype, device=dev)
    dk = torch.empty((B, H, NK, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, H, NK, DV), dtype=v.dtype, device=dev)

    _bwd_prologue_kernel[(_cdiv(NQ, _PROLOGUE_Q), B * mask_heads)](
        m, rowvis, sem, *ms, H, mask_heads, NQ, NK,
        MASK_IS_BOOL=is_bool, ZERO_SEM=partial_dq, BLOCK_Q=_PROLOGUE_Q, BLOCK_N=_PROLOGUE_N,
        num_warps=4, num_stages=1,
    )
    _bwd_kernel[(H * chunks, B)](
        q, k, v, m, out, grad_out, lse, rowvis, dk, dv, dq, dq_part, sem,
        *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(), *grad_out.stride(),
        mask_heads * NQ, NQ if mask_heads > 1 else 0,
        B, H, NQ, NK, D, DV, scale, scale * LOG2E, cfg.kb_per_split, chunks,
        MASK_IS_BOOL=is_bool, ONE_QB=one_qb, PARTIAL_DQ=partial_dq, SKIP_TILES=cfg.skip_tiles,
        DOT_PREC=_dot_precision(q.dtype, cfg), UPCAST=_upcast_dots(q), BLOCK_Q=cfg.block_q,
        BLOCK_N=cfg.block_n, BLOCK_D=_block_d(D), BLOCK_DV=_block_d(DV), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return dq, dk, dv


def masked_attention_fwd(q, k, v, mask, scale: float):
    """(out [B, H, Q, Dv] in q.dtype, lse [B, H, Q] float32); see the module docstring."""
    return forward(q, k, v, mask, scale, fwd_config(q, k, v))


def masked_attention_bwd(grad_out, q, k, v, mask, out, lse, scale: float):
    """(dq, dk, dv), each shaped and typed like its input; recomputes P tile by tile."""
    return backward(grad_out, q, k, v, mask, out, lse, scale, bwd_config(q, k, v))

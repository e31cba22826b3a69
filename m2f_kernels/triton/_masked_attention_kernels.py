"""Masked cross-attention in Triton: the kernels (launched by ``masked_attention.py``).

Forward (``_fwd_kernel``): one program per (query block, head, key split, batch) runs an
online softmax over its key tiles in the base-2 domain with fp32 accumulators. The empty-row
rule costs no extra pass: each row starts in "all keys" mode and switches to "visible keys"
mode at its first visible key, dropping what it had accumulated. When the keys are split
over programs (flash-decoding, to fill the GPU when B*H*Q is small), each program writes its
partial result and the last program of the row block to arrive (an arrival counter per row
block, as the backward's dq reduction) merges the partials in split order (``_combine_rows``),
ignoring a split's "all keys" partial whenever another split saw a visible key of the row,
and zeroes the counter for the next launch: the forward is one launch. Only ``out`` and
``lse`` are saved.

Backward, two launches: ``_bwd_prologue_kernel`` computes per mask row the empty-row flag
(the backward needs it before it sees the whole row) and zeroes the arrival counters;
``_bwd_kernel`` walks key tiles, recomputes P = exp(S - lse) tile by tile (delta =
rowsum(dO * O) from the tiles), writes dk/dv per key tile once and dq per key chunk into an
fp32 partial buffer; the last chunk program of each (b, h) to finish sums the partials in
chunk order and writes dq (deterministic: the sum order never depends on who finishes last).

The key loops are straight-line by default, so Triton software-pipelines their mask, k and
v loads. ``SKIP_TILES`` adds a branch that neither reads nor computes a key tile no row may
use (exact: the accumulators are untouched), at the price of that pipelining.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)  # kernels may only read constexpr globals
_LOG2E = tl.constexpr(LOG2E)


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
        if mt.dtype == tl.bfloat16:
            # bf16 -> fp32 is exact. Triton 3.9's interpreter compares bf16 as its raw
            # uint16 bits (never < 0); earlier ones, and the GPU, compare the values.
            mt = mt.to(tl.float32)
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
    SEM, COMBINE_Q: tl.constexpr,
):
    """PART (SPLIT only), fp32: acc [B*H*splits, NQ, DV], then from ``stats_offset`` on
    [B*H*splits, 3, NQ] (m, l, seen). SEM (SPLIT only; None otherwise, so an unsplit launch
    compiles without it): int32 arrival counter per (b, h, query block), zero at launch and
    left zero. COMBINE_Q: rows the merge takes per step (BLOCK_Q or a divisor)."""
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
        # Last to arrive merges (threadFenceReduction, as _reduce_dq): the barrier orders every
        # thread's partial stores before the release; the acquire orders the merge's loads after
        # every other split's release.
        tl.debug_barrier()
        counter = SEM + bh * num_qb + qb
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            tl.store(counter, 0)  # every split has counted: zero for the next launch
            for r in range(0, BLOCK_Q // COMBINE_Q):
                _combine_rows(PART, O, LSE, bh, qb * BLOCK_Q + r * COMBINE_Q, NQ, DV, num_splits,
                              stats_offset, COMBINE_Q, BLOCK_DV)
    else:
        l_safe = tl.where(q_ok, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(O + (bh * NQ + offs_q)[:, None] * DV + offs_dv[None, :],
                 out.to(O.dtype.element_ty), mask=out_mask)
        tl.store(LSE + bh * NQ + offs_q, (m_i + tl.log2(l_safe)) * _LN2, mask=q_ok)


@triton.jit
def _combine_rows(PART, O, LSE, bh, row0, NQ, DV, num_splits, stats_offset,
                  BLOCK_Q: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Merge the key splits of rows row0 + [0, BLOCK_Q) of (b, h) into out and lse, one
    split's [BLOCK_Q, BLOCK_DV] partial per step, in split order (so the result never depends
    on which program merges). A split whose row never met a visible key holds an all-keys
    partial: it counts only while no split has met one, and the first split that has drops
    what was merged before (alpha = 0, the forward's mode switch), so one pass gives the
    visible-keys merge, or for an empty row the all-keys merge. Volatile loads: the other
    programs' partials are read from L2, never from a stale L1 line. (A [splits, rows, DV]
    tile per step, reduced over the splits, needs ~130 more registers per thread than the
    key loop: AOT compile, sm_90a; bench/notes/masked_attention.md.)"""
    offs_q = row0 + tl.arange(0, BLOCK_Q)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ok = offs_q < NQ
    o_mask = q_ok[:, None] & (offs_dv < DV)[None, :]
    stats = PART + stats_offset + bh * num_splits * 3 * NQ + offs_q  # [split, 3, NQ]
    parts = PART + (bh * num_splits * NQ + offs_q)[:, None] * DV + offs_dv[None, :]  # [split, NQ, DV]

    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], tl.float32)
    any_seen = tl.zeros([BLOCK_Q], tl.int1)
    for sp in range(0, num_splits):
        m_s = tl.load(stats + sp * 3 * NQ, mask=q_ok, other=float("-inf"), volatile=True)
        l_s = tl.load(stats + (sp * 3 + 1) * NQ, mask=q_ok, other=0.0, volatile=True)
        seen_s = tl.load(stats + (sp * 3 + 2) * NQ, mask=q_ok, other=0.0, volatile=True) > 0
        o_s = tl.load(parts + sp * NQ * DV, mask=o_mask, other=0.0, volatile=True)
        newly = seen_s & (any_seen == 0)
        any_seen = any_seen | seen_s
        m_s = tl.where(seen_s | (any_seen == 0), m_s, float("-inf"))
        m_prev = tl.where(newly, float("-inf"), m)
        m_new = tl.maximum(m_prev, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m_prev - m_safe)
        c = tl.exp2(m_s - m_safe)
        l = l * a + l_s * c
        acc = acc * a[:, None] + o_s * c[:, None]
        m = m_new

    l_safe = tl.where(q_ok, l, 1.0)
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
                # The chunk's first key tile starts the sum (a uniform branch: the mask
                # `dq_mask & (kb > kb_start)` becomes int32 in Triton 3.9's interpreter,
                # which its loads refuse).
                dq_old = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
                if kb > kb_start:
                    dq_old = tl.load(dq_ptrs, mask=dq_mask, other=0.0)
                tl.store(dq_ptrs, dq_old + dq_c * scale, mask=dq_mask)
                tl.debug_barrier()  # the next key tile re-reads these rows
            tl.store(dk_base + offs_n[:, None] * D + offs_d[None, :],
                     (dk * scale).to(DK.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
            tl.store(dv_base + offs_n[:, None] * DV + offs_dv[None, :],
                     dv.to(DV_OUT.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])
    if PARTIAL_DQ:
        _reduce_dq(DQ_PART, DQ, SEM, bh, B * H, NQ, D, num_chunks, BLOCK_Q, BLOCK_D)

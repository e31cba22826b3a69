"""Masked cross-attention in Triton: flash-attention forward and backward with a key mask.

Contract (see ``m2f_kernels.reference.masked_attention``): q ``[B, H, Q, D]``, k ``[B, H, N, D]``,
v ``[B, H, N, Dv]``, mask ``[B, Q, N]`` (shared by the heads: read with head stride 0, never
repeated) or ``[B, H, Q, N]``, bool (True = blocked, read as uint8) or floating logits
(blocked where < 0, read in their own dtype). A row whose keys are all blocked attends to
all keys (the empty-row rule).

Forward (``_fwd_kernel``): one program per (query block, head, key split, batch) runs an
online softmax over its key tiles in the base-2 domain with fp32 accumulators. The empty-row
rule costs no extra pass: each row starts in "all keys" mode and switches to "visible keys"
mode at its first visible key, dropping what it had accumulated (see ``_fwd_kernel``). When
the keys are split over programs (flash-decoding, to fill the GPU when B*H*Q is small),
``_combine_kernel`` merges the partial results, ignoring a split's "all keys" partial
whenever another split saw a visible key of the row. Only ``out`` and ``lse`` are saved.

Backward: ``_row_visible_kernel`` computes, per mask row, whether any key is visible (the
backward needs the empty-row decision before it sees the whole row); ``_bwd_kernel`` walks
key tiles, recomputes P = exp(S - lse) tile by tile, writes dk/dv per key tile once and
accumulates dq per key chunk into an fp32 partial buffer that is summed afterwards
(deterministic, no atomics). delta = rowsum(dO * O) is computed in-kernel from the tiles.

No tensor of size B*H*Q*N exists anywhere; the largest scratch is the dq / forward partial
buffer of (chunks or splits) * B*H*Q*D floats.
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
def _load_tile(base, offs_r, offs_c, s_r, s_c, n_r, n_c):
    """[len(offs_r), len(offs_c)] tile of a strided 2-D slice, zero outside [n_r, n_c]."""
    ptrs = base + offs_r.to(tl.int64)[:, None] * s_r + offs_c[None, :] * s_c
    return tl.load(ptrs, mask=(offs_r < n_r)[:, None] & (offs_c < n_c)[None, :], other=0.0)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(
    Q, K, V, M, O, LSE, PART_O, PART_S,
    s_qb, s_qh, s_qq, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_mb, s_mh, s_mq, s_mn,
    H, NQ, NK, D, DV, scale_log2, kb_per_split, num_splits, num_qb,
    MASK_IS_BOOL: tl.constexpr, SPLIT: tl.constexpr, SKIP_TILES: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
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
    q = _load_tile(Q + b * s_qb + h * s_qh, offs_q, offs_d, s_qq, s_qd, NQ, D)
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
        run = True
        if SKIP_TILES:  # no row sees a key here and none still collects all keys
            run = tl.max((tile_any | (seen == 0)).to(tl.int32), axis=0) > 0
        if run:
            newly = tile_any & (seen == 0)
            seen = seen | tile_any
            select = tl.where(seen[:, None], vis, n_ok[None, :])
            k = _load_tile(k_base, offs_n, offs_d, s_kn, s_kd, NK, D)
            s = _mma(q, tl.trans(k), DOT_PREC, UPCAST) * scale_log2
            s = tl.where(select, s, float("-inf"))
            # A row switching mode restarts from -inf, so alpha = 0 wipes its l and acc.
            m_prev = tl.where(newly, float("-inf"), m_i)
            m_new = tl.maximum(m_prev, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padding rows only
            alpha = tl.exp2(m_prev - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = _load_tile(v_base, offs_n, offs_dv, s_vn, s_vd, NK, DV)
            acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PREC, UPCAST)
            m_i = m_new

    bh = b * H + h
    out_mask = q_ok[:, None] & (offs_dv < DV)[None, :]
    if SPLIT:
        row = bh * num_splits + split
        tl.store(PART_O + (row * NQ + offs_q)[:, None] * DV + offs_dv[None, :], acc, mask=out_mask)
        s_ptrs = PART_S + row * 3 * NQ + offs_q
        tl.store(s_ptrs, m_i, mask=q_ok)
        tl.store(s_ptrs + NQ, l_i, mask=q_ok)
        tl.store(s_ptrs + 2 * NQ, seen.to(tl.float32), mask=q_ok)
    else:
        l_safe = tl.where(q_ok, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(O + (bh * NQ + offs_q)[:, None] * DV + offs_dv[None, :],
                 out.to(O.dtype.element_ty), mask=out_mask)
        tl.store(LSE + bh * NQ + offs_q, (m_i + tl.log2(l_safe)) * _LN2, mask=q_ok)


@triton.jit
def _combine_kernel(
    PART_O, PART_S, O, LSE, NQ, DV, num_splits,
    BLOCK_Q: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merge the key splits of one (b, h, query block); splits whose rows never met a
    visible key hold all-keys partials and count only if no split met one (empty row)."""
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ok = offs_q < NQ
    o_mask = q_ok[:, None] & (offs_dv < DV)[None, :]
    stats = PART_S + bh * num_splits * 3 * NQ + offs_q

    any_seen = tl.zeros([BLOCK_Q], tl.float32)
    for sp in range(num_splits):
        any_seen = tl.maximum(any_seen, tl.load(stats + (sp * 3 + 2) * NQ, mask=q_ok, other=0.0))

    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], tl.float32)
    for sp in range(num_splits):
        m_s = tl.load(stats + sp * 3 * NQ, mask=q_ok, other=float("-inf"))
        l_s = tl.load(stats + (sp * 3 + 1) * NQ, mask=q_ok, other=0.0)
        seen_s = tl.load(stats + (sp * 3 + 2) * NQ, mask=q_ok, other=0.0)
        m_s = tl.where((seen_s > 0) | (any_seen == 0), m_s, float("-inf"))
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m - m_safe)
        c = tl.exp2(m_s - m_safe)
        o_s = tl.load(PART_O + ((bh * num_splits + sp) * NQ + offs_q)[:, None] * DV + offs_dv[None, :],
                      mask=o_mask, other=0.0)
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
def _row_visible_kernel(
    M, ROWVIS, s_mb, s_mh, s_mq, s_mn, HM, NQ, NK, nb_per_prog,
    MASK_IS_BOOL: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """ROWVIS[b, hm, q] (int32, zero-initialised) = 1 if the mask row has a visible key."""
    qb = tl.program_id(0)
    chunk = tl.program_id(1)
    bhm = tl.program_id(2).to(tl.int64)
    b = bhm // HM
    hm = bhm % HM
    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < NQ
    m_rows = M + b * s_mb + hm * s_mh + offs_q.to(tl.int64)[:, None] * s_mq
    any_vis = tl.zeros([BLOCK_Q], tl.int32)
    nb_start = chunk * nb_per_prog
    nb_end = tl.minimum(nb_start + nb_per_prog, tl.cdiv(NK, BLOCK_N))
    for nb in range(nb_start, nb_end):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        vis = _visible(m_rows + offs_n.to(tl.int64)[None, :] * s_mn,
                       q_ok[:, None] & (offs_n < NK)[None, :], MASK_IS_BOOL)
        any_vis = tl.maximum(any_vis, tl.max(vis.to(tl.int32), axis=1))
    tl.atomic_max(ROWVIS + bhm * NQ + offs_q, any_vis, mask=q_ok & (any_vis > 0), sem="relaxed")


@triton.jit
def _bwd_rows(
    Q, DO, O, LSE, RV, offs_q, s_qq, s_qd, s_oq, s_od, s_doq, s_dod, NQ, D, DV,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Per-query-block state: q, dO, lse (base 2), delta = rowsum(dO * O), empty-row flag."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ok = offs_q < NQ
    q = _load_tile(Q, offs_q, offs_d, s_qq, s_qd, NQ, D)
    do = _load_tile(DO, offs_q, offs_dv, s_doq, s_dod, NQ, DV)
    o = _load_tile(O, offs_q, offs_dv, s_oq, s_od, NQ, DV)
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
def _bwd_kernel(
    Q, K, V, M, O, DO, LSE, RV, DK, DV_OUT, DQ_PART,
    s_qb, s_qh, s_qq, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_mb, s_mh, s_mq, s_mn,
    s_ob, s_oh, s_oq, s_od,
    s_dob, s_doh, s_doq, s_dod,
    s_rvb, s_rvh,
    B, H, NQ, NK, D, DV, scale, scale_log2, kb_per_chunk,
    MASK_IS_BOOL: tl.constexpr, ONE_QB: tl.constexpr, SKIP_TILES: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program per (head, key chunk, batch): dk, dv of the chunk's key tiles and the
    chunk's partial dq, DQ_PART[chunk, b, h] ([NQ, D] fp32, summed over chunks outside)."""
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
    dq_base = DQ_PART + (chunk * B * H + bh) * NQ * D

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
            select = _bwd_select(m_base, offs_q, offs_n, s_mq, s_mn, empty, NQ, NK, MASK_IS_BOOL)
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
            run = True
            if SKIP_TILES:
                run = tl.max(select.to(tl.int32)) > 0
            if run:
                k = _load_tile(k_base, offs_n, offs_d, s_kn, s_kd, NK, D)
                v = _load_tile(v_base, offs_n, offs_dv, s_vn, s_vd, NK, DV)
                dk, dv, dq_c = _bwd_tile(q, do, lse2, delta, k, v, select, scale_log2, DOT_PREC, UPCAST)
                dq += dq_c
            n_ok = (offs_n < NK)[:, None]
            tl.store(dk_base + offs_n[:, None] * D + offs_d[None, :],
                     (dk * scale).to(DK.dtype.element_ty), mask=n_ok & d_ok[None, :])
            tl.store(dv_base + offs_n[:, None] * DV + offs_dv[None, :],
                     dv.to(DV_OUT.dtype.element_ty), mask=n_ok & dv_ok[None, :])
        tl.store(dq_base + offs_q[:, None] * D + offs_d[None, :], dq * scale,
                 mask=(offs_q < NQ)[:, None] & d_ok[None, :])
    else:  # several query blocks: dk/dv stay in registers, dq is read-modify-written
        for kb in range(kb_start, kb_end):
            offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
            k = _load_tile(k_base, offs_n, offs_d, s_kn, s_kd, NK, D)
            v = _load_tile(v_base, offs_n, offs_dv, s_vn, s_vd, NK, DV)
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
                if SKIP_TILES:
                    run = tl.max(select.to(tl.int32)) > 0
                if run:
                    dk_c, dv_c, dq_c = _bwd_tile(q, do, lse2, delta, k, v, select, scale_log2,
                                                 DOT_PREC, UPCAST)
                    dk += dk_c
                    dv += dv_c
                dq_ptrs = dq_base + offs_q[:, None] * D + offs_d[None, :]
                dq_mask = (offs_q < NQ)[:, None] & d_ok[None, :]
                dq_old = tl.load(dq_ptrs, mask=dq_mask & (kb > kb_start), other=0.0)
                tl.store(dq_ptrs, dq_old + dq_c * scale, mask=dq_mask)
                tl.debug_barrier()  # the next key tile re-reads these rows
            n_ok = (offs_n < NK)[:, None]
            tl.store(dk_base + offs_n[:, None] * D + offs_d[None, :],
                     (dk * scale).to(DK.dtype.element_ty), mask=n_ok & d_ok[None, :])
            tl.store(dv_base + offs_n[:, None] * DV + offs_dv[None, :],
                     dv.to(DV_OUT.dtype.element_ty), mask=n_ok & dv_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Config:
    """Tiling of one launch. Any valid Config gives the same result up to fp32 rounding
    (``kb_per_split`` only regroups the sums; block sizes only re-tile them)."""
    block_q: int
    block_n: int
    kb_per_split: int  # key tiles per program (forward split / backward chunk)
    skip_tiles: bool = True
    num_warps: int = 4
    num_stages: int = 2


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


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


@functools.lru_cache(maxsize=1024)
def _config(backward: bool, bh: int, nq: int, nk: int, d: int, dv: int, elem_size: int,
            sms: int) -> Config:
    """Heuristic tiling keyed on shape and dtype width.

    Block sizes follow register pressure measured with ptxas for sm_90 (no spills, or a
    few bytes for fp32 backward; table in bench/notes/masked_attention.md): BLOCK_N = 64
    costs far more registers than 32 here, the backward holds five dot operands, and fp32
    dots run as 3xTF32 (split operands). One query block covering all queries (Q <= cap)
    reads each k/v tile once per head; the backward then also keeps q, dO and dq in
    registers for the whole key chunk.
    """
    width = max(32, _block_d(d), _block_d(dv))
    fp32 = elem_size == 4
    if backward:
        cap, block_n = (128, 16) if fp32 else (256, 32)
    else:
        cap, block_n = (128, 32) if fp32 else (256, 32)
    if width > 64 and fp32:
        block_n = 16
    cap = max(16, cap * 32 // width)
    block_q = min(cap, max(16, triton.next_power_of_2(nq)))
    num_warps = {16: 4, 32: 4, 64: 4, 128: 8}.get(block_q, 8 if backward else 16)
    num_qb = triton.cdiv(nq, block_q)
    num_kb = triton.cdiv(nk, block_n)
    # Split the keys until about two programs per SM (B*H*Q alone gives only B*H*num_qb),
    # keeping >= 4 tiles per program so the partials stay small next to the k/v traffic.
    programs = bh if backward else bh * num_qb
    splits = max(1, min(triton.cdiv(2 * sms, programs), num_kb // 4))
    kb_per_split = triton.cdiv(num_kb, splits)
    return Config(block_q=block_q, block_n=block_n, kb_per_split=kb_per_split, num_warps=num_warps)


def fwd_config(q, k, v) -> Config:
    B, H, NQ, D = q.shape
    return _config(False, B * H, NQ, k.shape[2], D, v.shape[3], q.element_size(), _num_sms(q.device))


def bwd_config(q, k, v) -> Config:
    B, H, NQ, D = q.shape
    return _config(True, B * H, NQ, k.shape[2], D, v.shape[3], q.element_size(), _num_sms(q.device))


def _upcast_dots(q: torch.Tensor) -> bool:
    return q.dtype == torch.bfloat16 and _interpreting()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32: 3xTF32 on the tensor cores keeps ~fp32 accuracy (tests hold 1e-4) at a fraction
    # of the cost of FMA ("ieee") dots; 16-bit inputs ignore it.
    return "tf32x3" if dtype == torch.float32 else "tf32"


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
    num_qb = triton.cdiv(NQ, cfg.block_q)
    num_kb = triton.cdiv(NK, cfg.block_n)
    splits = triton.cdiv(num_kb, cfg.kb_per_split)
    block_d, block_dv = _block_d(D), _block_d(DV)
    if splits > 1:
        part_o = torch.empty((B * H * splits, NQ, DV), dtype=torch.float32, device=q.device)
        part_s = torch.empty((B * H * splits, 3, NQ), dtype=torch.float32, device=q.device)
    else:
        part_o = part_s = out  # unused
    _fwd_kernel[(H * splits * num_qb, B)](
        q, k, v, m, out, lse, part_o, part_s,
        *q.stride(), *k.stride(), *v.stride(), *ms,
        H, NQ, NK, D, DV, scale * LOG2E, cfg.kb_per_split, splits, num_qb,
        MASK_IS_BOOL=is_bool, SPLIT=splits > 1, SKIP_TILES=cfg.skip_tiles,
        DOT_PREC=_dot_precision(q.dtype), UPCAST=_upcast_dots(q), BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n,
        BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        combine_q = min(cfg.block_q, 64)
        _combine_kernel[(triton.cdiv(NQ, combine_q), B * H)](
            part_o, part_s, out, lse, NQ, DV, splits, BLOCK_Q=combine_q, BLOCK_DV=block_dv,
        )
    return out, lse


def _row_visible(m, is_bool, ms, B, heads, NQ, NK, device):
    """int32 [B, heads, NQ]: 1 where the mask row has a visible key (heads = 1 or H)."""
    rowvis = torch.zeros((B, heads, NQ), dtype=torch.int32, device=device)
    block_q, block_n = 32, 128
    num_qb, num_nb = triton.cdiv(NQ, block_q), triton.cdiv(NK, block_n)
    chunks = max(1, min(num_nb, triton.cdiv(2 * _num_sms(device), B * heads * num_qb)))
    nb_per_prog = triton.cdiv(num_nb, chunks)
    _row_visible_kernel[(num_qb, triton.cdiv(num_nb, nb_per_prog), B * heads)](
        m, rowvis, ms[0], ms[1], ms[2], ms[3], heads, NQ, NK, nb_per_prog,
        MASK_IS_BOOL=is_bool, BLOCK_Q=block_q, BLOCK_N=block_n,
    )
    return rowvis


def backward(grad_out, q, k, v, mask, out, lse, scale: float, cfg: Config):
    """masked_attention_bwd with an explicit launch configuration."""
    B, H, NQ, D = q.shape
    NK, DV = k.shape[2], v.shape[3]
    m, is_bool, ms = _mask_args(mask)
    mask_heads = H if mask.dim() == 4 else 1
    rowvis = _row_visible(m, is_bool, ms, B, mask_heads, NQ, NK, q.device)
    s_rvh = NQ if mask_heads > 1 else 0
    lse = lse.contiguous()

    num_kb = triton.cdiv(NK, cfg.block_n)
    chunks = triton.cdiv(num_kb, cfg.kb_per_split)
    dk = torch.empty((B, H, NK, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, NK, DV), dtype=v.dtype, device=q.device)
    dq_part = torch.empty((chunks, B, H, NQ, D), dtype=torch.float32, device=q.device)
    _bwd_kernel[(H * chunks, B)](
        q, k, v, m, out, grad_out, lse, rowvis, dk, dv, dq_part,
        *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(), *grad_out.stride(),
        mask_heads * NQ, s_rvh,
        B, H, NQ, NK, D, DV, scale, scale * LOG2E, cfg.kb_per_split,
        MASK_IS_BOOL=is_bool, ONE_QB=NQ <= cfg.block_q, SKIP_TILES=cfg.skip_tiles,
        DOT_PREC=_dot_precision(q.dtype), UPCAST=_upcast_dots(q), BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n,
        BLOCK_D=_block_d(D), BLOCK_DV=_block_d(DV), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    dq = dq_part[0] if chunks == 1 else dq_part.sum(0)
    return dq.to(q.dtype), dk, dv


def masked_attention_fwd(q, k, v, mask, scale: float):
    """(out [B, H, Q, Dv] in q.dtype, lse [B, H, Q] float32); see the module docstring."""
    return forward(q, k, v, mask, scale, fwd_config(q, k, v))


def masked_attention_bwd(grad_out, q, k, v, mask, out, lse, scale: float):
    """(dq, dk, dv), each shaped and typed like its input; recomputes P tile by tile."""
    return backward(grad_out, q, k, v, mask, out, lse, scale, bwd_config(q, k, v))

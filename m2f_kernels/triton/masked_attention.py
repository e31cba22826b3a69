"""Masked cross-attention in Triton: flash-attention forward and backward with a key mask.

Contract (see ``m2f_kernels.reference.masked_attention``): q ``[B, H, Q, D]``, k ``[B, H, N, D]``,
v ``[B, H, N, Dv]``, mask ``[B, Q, N]`` (shared by the heads: read with head stride 0, never
repeated) or ``[B, H, Q, N]``, bool (True = blocked, read as uint8) or floating logits
(blocked where < 0, read in their own dtype). A row whose keys are all blocked attends to
all keys (the empty-row rule).

This module holds the launch configuration (:class:`MaskedAttentionConfig`, picked by
:func:`masked_attention_config` from :data:`RULES`; see ``_launch`` for the pattern every op
follows), the launches and the backend entry points; the kernels and how they work are in
``_masked_attention_kernels``.

No tensor of size B*H*Q*N exists anywhere; the largest scratch is the dq / forward partial
buffer of (chunks or splits) * B*H*Q*D floats. There is no host synchronisation. Launches:
one forward (the split merge is fused in), two backward.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch

from ._launch import cdiv, chosen, interpreting, next_pow2, num_sms
from ._masked_attention_kernels import LOG2E, _bwd_kernel, _bwd_prologue_kernel, _fwd_kernel

CONFIG_ENV = "M2F_MA_CONFIG"

# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------
FP32_DOTS = ("tf32x3", "tf32", "ieee")


@dataclasses.dataclass(frozen=True)
class MaskedAttentionConfig:
    """Tiling of one forward or backward launch. Any valid config gives the same result up
    to fp32 rounding (``kb_per_split`` only regroups the sums; block sizes only re-tile
    them), except ``fp32_dot``: how fp32 inputs meet the tensor cores ('tf32x3': ~fp32
    accuracy, the default; 'tf32': fewer registers, but dq's error reaches ~2e-3 (measured
    on an H200), above the 1e-3 bound for tf32 dots, so only where torch's fp32 matmul
    precision is not 'highest' or M2F_MA_CONFIG asks for it; 'ieee': CUDA cores).
    ``skip_tiles``: the kernels skip key tiles no row may use, at the price of the
    software pipelining of their key loops (see ``_masked_attention_kernels``).
    ``maxnreg``: register cap per thread of a split forward launch (ptxas ``.maxnreg``; 0:
    ptxas's choice; unsplit forwards and the backward ignore it): the fused split merge
    raises ptxas's choice above what ``programs_per_sm`` resident programs leave, and
    :func:`masked_attention_config` sets the cap where that is 128-254 registers
    (bench/notes/masked_attention.md)."""
    block_q: int
    block_n: int
    kb_per_split: int  # key tiles per program (forward split / backward chunk)
    skip_tiles: bool = False
    num_warps: int = 4
    num_stages: int = 2
    fp32_dot: str = "tf32x3"
    maxnreg: int = 0


@dataclasses.dataclass(frozen=True)
class MaskedAttentionRules:
    """How :func:`masked_attention_config` tiles one pass for one dtype class.

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
# Sweep (bench/results/nvidia-h200-2026-11-27-2-sweep-masked-attention.txt, H200, D=32,
# N=16384): fwd fp32 block_q_max 64 + 3 programs/SM 1.10x, bwd fp32 block_q_max 64 1.17x,
# bwd 16-bit block_n 64 1.66x. Measured at D=32 only; the other head dims keep what the
# sm_90a/sm_80 compile check supports: 3 fp32 forward programs fit an SM's registers only at
# BLOCK_D 32 (162 regs; 185-230 elsewhere -> 2), and the 16-bit backward with 64-key tiles
# spills more than with 32 at D=128 (1280 vs 1024 B), so wide heads keep 32.
RULES = {
    ("fwd", "fp32"): MaskedAttentionRules(block_q_max=64, block_n=32, num_stages=3, programs_per_sm=3,
                                          wide_block_n=16, other_d_programs_per_sm=2),
    ("fwd", "16bit"): MaskedAttentionRules(block_q_max=128, block_n=32, num_stages=3, programs_per_sm=2),
    ("bwd", "fp32"): MaskedAttentionRules(block_q_max=64, block_n=16, num_stages=3, programs_per_sm=1,
                                          wide_block_n=16),
    ("bwd", "16bit"): MaskedAttentionRules(block_q_max=256, block_n=64, num_stages=3, programs_per_sm=1,
                                           wide_block_n=32),
}


def parse_rules_override(text: str) -> dict:
    """``M2F_MA_CONFIG`` syntax -> {(pass, class): {field: value}}.

    ``"fwd:block_n=64,num_stages=4;bwd.fp32:fp32_dot=tf32"``: groups separated by ';', each
    ``<pass>[.<class>]:<field>=<value>,...`` with pass fwd/bwd and class fp32/16bit (no
    class: both). Fields are those of :class:`MaskedAttentionRules`."""
    out: dict = {}
    fields = {f.name for f in dataclasses.fields(MaskedAttentionRules)}
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


def rules_for(backward: bool, fp32: bool) -> MaskedAttentionRules:
    """The rules in force: RULES, with TF32 dots for fp32 inputs where
    ``torch.get_float32_matmul_precision()`` is not 'highest', and the ``M2F_MA_CONFIG``
    environment override applied."""
    table = _rules_table(os.environ.get(CONFIG_ENV, ""), torch.get_float32_matmul_precision())
    return table[("bwd" if backward else "fwd", "fp32" if fp32 else "16bit")]


def _block_d(d: int) -> int:
    return max(16, next_pow2(d))


@functools.lru_cache(maxsize=1024)
def _config_for_shape(backward: bool, bh: int, nq: int, nk: int, d: int, dv: int, fp32: bool, sms: int,
                      rules: MaskedAttentionRules) -> MaskedAttentionConfig:
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
    block_q = min(cap, max(16, next_pow2(nq)))
    num_warps = rules.num_warps or {16: 4, 32: 4, 64: 4, 128: 8}.get(block_q, 8 if backward else 16)
    num_qb = cdiv(nq, block_q)
    num_kb = cdiv(nk, block_n)
    programs = bh if backward else bh * num_qb
    splits = max(1, min(sms * ppsm // programs, num_kb // rules.min_tiles))
    kb_per_split = cdiv(num_kb, splits)
    maxnreg = 0
    if not backward and cdiv(num_kb, kb_per_split) > 1:
        # ppsm programs of num_warps warps in an SM's 64K registers (allocated in steps of 8);
        # none below 128, where the key loop itself would spill (e.g. ppsm=4 at 8 warps)
        cap = 65536 // (ppsm * num_warps * 32) // 8 * 8
        maxnreg = cap if 128 <= cap < 255 else 0
    return MaskedAttentionConfig(block_q=block_q, block_n=block_n, kb_per_split=kb_per_split,
                                 skip_tiles=rules.skip_tiles, num_warps=num_warps,
                                 num_stages=rules.num_stages, fp32_dot=rules.fp32_dot, maxnreg=maxnreg)


def masked_attention_config(q, k, v, backward: bool,
                            rules: "MaskedAttentionRules | None" = None) -> MaskedAttentionConfig:
    """The config of the forward (``backward=False``) or backward launch for these inputs:
    shape, dtype class and the device's SM count, under ``rules`` (default
    :func:`rules_for`: RULES as adjusted by torch's fp32 matmul precision and M2F_MA_CONFIG;
    sweeps pass their own)."""
    B, H, NQ, D = q.shape
    fp32 = q.element_size() == 4
    rules = rules if rules is not None else rules_for(backward, fp32)
    return _config_for_shape(backward, B * H, NQ, k.shape[2], D, v.shape[3], fp32, num_sms(q.device), rules)


def _upcast_dots(q: torch.Tensor) -> bool:
    return q.dtype == torch.bfloat16 and interpreting()


def _dot_precision(dtype: torch.dtype, cfg: MaskedAttentionConfig) -> str:
    # 16-bit inputs ignore it; fp32 takes the config's choice (default 3xTF32, ~fp32).
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


# The split forward's arrival counters, one int32 per (b, h, query block): zero between
# launches (the merging program zeroes its own), so one zeroed buffer per (device, stream)
# serves every call without a launch. Per stream: kernels on one stream run in order, so two
# launches never share counters at once. During CUDA graph capture a fresh zeroed buffer is
# taken instead (its memset is captured, so replays on any stream start from zero).
_FWD_COUNTERS: dict = {}
_MIN_COUNTERS = 4096


def _fwd_counters(device: torch.device, n: int) -> torch.Tensor:
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(n, dtype=torch.int32, device=device)
        key = (device.index, torch._C._cuda_getCurrentRawStream(device.index))
    else:  # the interpreter
        key = (device.type, device.index)
    buf = _FWD_COUNTERS.get(key)
    if buf is None or buf.numel() < n:  # first call or a larger grid: one memset, then never again
        buf = _FWD_COUNTERS[key] = torch.zeros(max(n, _MIN_COUNTERS), dtype=torch.int32, device=device)
    return buf


def _combine_step_rows(block_q: int, block_dv: int, num_warps: int) -> int:
    """COMBINE_Q: rows per step of the split merge, <= 16 partial values per thread (the
    whole query block at the standard shapes)."""
    return max(1, min(block_q, 512 * num_warps // block_dv))


# ---------------------------------------------------------------------------------------------
# Backend entry points
# ---------------------------------------------------------------------------------------------
def masked_attention_fwd(q, k, v, mask, scale: float, *, config: "MaskedAttentionConfig | None" = None):
    """(out [B, H, Q, Dv] in q.dtype, lse [B, H, Q] float32); see the module docstring.
    ``config``: the launch configuration (None: :func:`masked_attention_config`)."""
    cfg = chosen(config, MaskedAttentionConfig, masked_attention_config, q, k, v, False)
    B, H, NQ, D = q.shape
    NK, DV = k.shape[2], v.shape[3]
    m, is_bool, ms = _mask_args(mask)
    out = torch.empty((B, H, NQ, DV), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    num_qb = cdiv(NQ, cfg.block_q)
    num_kb = cdiv(NK, cfg.block_n)
    splits = cdiv(num_kb, cfg.kb_per_split)
    block_d, block_dv = _block_d(D), _block_d(DV)
    stats_offset = B * H * splits * NQ * DV  # partial acc first, then m, l, seen
    if splits > 1:
        part = torch.empty(B * H * splits * NQ * (DV + 3), dtype=torch.float32, device=q.device)
        sem = _fwd_counters(q.device, B * H * num_qb)
        combine_q = _combine_step_rows(cfg.block_q, block_dv, cfg.num_warps)
    else:  # unused: out as PART's placeholder, None for SEM (a constexpr, absent from the kernel)
        part, sem, combine_q = out, None, 1
    maxnreg = cfg.maxnreg if sem is not None and cfg.maxnreg else None
    _fwd_kernel[(H * splits * num_qb, B)](
        q, k, v, m, out, lse, part,
        *q.stride(), *k.stride(), *v.stride(), *ms,
        H, NQ, NK, D, DV, scale * LOG2E, cfg.kb_per_split, splits, num_qb, stats_offset,
        MASK_IS_BOOL=is_bool, SPLIT=splits > 1, SKIP_TILES=cfg.skip_tiles,
        DOT_PREC=_dot_precision(q.dtype, cfg), UPCAST=_upcast_dots(q), BLOCK_Q=cfg.block_q,
        BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, SEM=sem, COMBINE_Q=combine_q,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=maxnreg,
    )
    return out, lse


# The prologue's mask scan: few rows and long key tiles, so each program makes few
# dependent loads (4 at N = 16384) and there are many programs.
_PROLOGUE_Q, _PROLOGUE_N = 4, 4096


def masked_attention_bwd(grad_out, q, k, v, mask, out, lse, scale: float, *,
                         config: "MaskedAttentionConfig | None" = None):
    """(dq, dk, dv), each shaped and typed like its input; recomputes P tile by tile.
    ``config``: the launch configuration (None: :func:`masked_attention_config`)."""
    cfg = chosen(config, MaskedAttentionConfig, masked_attention_config, q, k, v, True)
    B, H, NQ, D = q.shape
    NK, DV = k.shape[2], v.shape[3]
    dev = q.device
    m, is_bool, ms = _mask_args(mask)
    mask_heads = H if mask.dim() == 4 else 1
    lse = lse.contiguous()
    num_kb = cdiv(NK, cfg.block_n)
    chunks = cdiv(num_kb, cfg.kb_per_split)
    one_qb = NQ <= cfg.block_q
    partial_dq = chunks > 1 or not one_qb

    # One fp32 scratch: [row flags (int32) | arrival counters (int32) | dq partials]
    n_flags, n_sem = B * mask_heads * NQ, B * H
    n_ints = cdiv(n_flags + n_sem, 4) * 4  # keep the partials 16-byte aligned
    scratch = torch.empty(n_ints + (chunks * B * H * NQ * D if partial_dq else 0),
                          dtype=torch.float32, device=dev)
    ints = scratch[:n_ints].view(torch.int32)
    rowvis, sem = ints, ints[n_flags:]
    dq_part = scratch[n_ints:] if partial_dq else scratch
    dq = torch.empty((B, H, NQ, D), dtype=q.dtype, device=dev)
    dk = torch.empty((B, H, NK, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, H, NK, DV), dtype=v.dtype, device=dev)

    _bwd_prologue_kernel[(cdiv(NQ, _PROLOGUE_Q), B * mask_heads)](
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

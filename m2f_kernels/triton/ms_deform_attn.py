"""Triton multi-scale deformable attention (MSDeformAttn), forward and backward.

Shapes (see ``m2f_kernels.reference.ms_deform_attn``): value [B, S, H, D]; spatial_shapes [L, 2] int64 (H_l, W_l);
level_start_index [L] int64; sampling_locations [B, Lq, H, L, P, 2] as (x, y) in
[0, 1]; attention_weights [B, Lq, H, L, P] (logits over the L*P entries when
``softmax``); out [B, Lq, H*D].

Every kernel program owns one (query block, batch*head) pair, so the D channels of a
head load as one contiguous vector per bilinear corner and reductions over D
(location and weight gradients) stay in registers. Sampling follows
``grid_sample(align_corners=False)`` with zero padding: pixel = loc * size - 0.5.

grad_value is a scatter. The default path adds into an fp32 buffer with float
atomics (summation order varies run to run). ``deterministic=True`` (or
``torch.use_deterministic_algorithms``) adds the same contributions as int64
fixed-point numbers instead: integer addition is associative, so the result is
bitwise repeatable whatever order the atomics land in, at the cost of an int64
buffer and a bound computed up front so the sums cannot overflow.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._bilinear import bilinear_cell
from ._launch import cdiv, chosen, next_pow2


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _corners(lx, ly, hl, wl, start, qmask):
    """The 4 bilinear corners of points (lx, ly) on level (hl x wl, first pixel ``start``).

    Returns fp32 offsets fx, fy from the top-left corner (NaN for a non-finite location),
    then (pixel index along S as int64, in-bounds mask) of the corners a = (x0, y0),
    b = (x0 + 1, y0), c = (x0, y0 + 1), d = (x0 + 1, y0 + 1). A corner outside the map is
    masked: it reads 0 and gets no gradient, as in grid_sample.
    """
    fx, fy, x0f, y0f, vx0, vx1, vy0, vy1 = bilinear_cell(lx, ly, hl, wl)  # clamped: the int casts cannot overflow
    ia = start + y0f.to(tl.int32).to(tl.int64) * wl + x0f.to(tl.int32)
    ic = ia + wl
    return (fx, fy, ia, qmask & vy0 & vx0, ia + 1, qmask & vy0 & vx1,
            ic, qmask & vy1 & vx0, ic + 1, qmask & vy1 & vx1)


@triton.jit
def _gather(v_base, stride_s, idx, valid, dmask):
    """[BLOCK_Q, BLOCK_D] fp32 value rows at pixels idx (zeros where not valid)."""
    ptrs = v_base + idx[:, None] * stride_s
    return tl.load(ptrs, mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _logits_tile(w_base, qmask, s_wl, s_wp, NP: tl.constexpr, LP: tl.constexpr, LP2: tl.constexpr):
    """[BLOCK_Q, LP2] attention logits of the queries (-inf in the padding columns)."""
    j = tl.arange(0, LP2)
    jmask = j < LP
    ptrs = w_base[:, None] + (j // NP)[None, :] * s_wl + (j % NP)[None, :] * s_wp
    x = tl.load(ptrs, mask=qmask[:, None] & jmask[None, :], other=0.0).to(tl.float32)
    return tl.where(jmask[None, :], x, float("-inf"))


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_kernel(
    value, shapes, starts, loc, attw, out,
    Lq, H,
    s_vb, s_vs, s_vh, s_vd,
    s_lb, s_lq, s_lh, s_ll, s_lp, s_lc,
    s_wb, s_wq, s_wh, s_wl, s_wp,
    NL: tl.constexpr, NP: tl.constexpr, LP2: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
    SOFTMAX: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q = (pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    qmask = q < Lq
    d = tl.arange(0, BLOCK_D)
    dmask = d < D

    v_base = value + b * s_vb + h * s_vh + d[None, :] * s_vd
    l_base = loc + b * s_lb + q * s_lq + h * s_lh
    w_base = attw + b * s_wb + q * s_wq + h * s_wh
    if SOFTMAX:
        logits = _logits_tile(w_base, qmask, s_wl, s_wp, NP, NL * NP, LP2)
        w_max = tl.max(logits, 1)
        w_inv = 1.0 / tl.sum(tl.exp(logits - w_max[:, None]), 1)

    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for lvl in range(NL):
        hl = tl.load(shapes + 2 * lvl)
        wl = tl.load(shapes + 2 * lvl + 1)
        start = tl.load(starts + lvl)
        for p in range(NP):
            lp = l_base + lvl * s_ll + p * s_lp
            lx = tl.load(lp, mask=qmask, other=0.0).to(tl.float32)
            ly = tl.load(lp + s_lc, mask=qmask, other=0.0).to(tl.float32)
            w = tl.load(w_base + lvl * s_wl + p * s_wp, mask=qmask, other=0.0).to(tl.float32)
            if SOFTMAX:
                w = tl.exp(w - w_max) * w_inv
            fx, fy, ia, ma, ib, mb, ic, mc, i_d, md = _corners(lx, ly, hl, wl, start, qmask)
            gx = 1.0 - fx
            gy = 1.0 - fy
            acc += (w * gx * gy)[:, None] * _gather(v_base, s_vs, ia, ma, dmask)
            acc += (w * fx * gy)[:, None] * _gather(v_base, s_vs, ib, mb, dmask)
            acc += (w * gx * fy)[:, None] * _gather(v_base, s_vs, ic, mc, dmask)
            acc += (w * fx * fy)[:, None] * _gather(v_base, s_vs, i_d, md, dmask)

    o_ptrs = out + ((b * Lq + q) * H + h)[:, None] * D + d[None, :]
    tl.store(o_ptrs, acc, mask=qmask[:, None] & dmask[None, :])


# ----------------------------------------------------------------------------- backward
@triton.jit
def _scatter_corner(gv_base, s_gs, idx, valid, coef, g, dmask, scale, FIXED_POINT: tl.constexpr):
    """grad_value[idx, :] += coef * g: fp32 atomics, or exact int64 atomics of round_to_zero(x * scale)."""
    ptrs = gv_base + idx[:, None] * s_gs
    mask = valid[:, None] & dmask[None, :]
    contrib = coef[:, None] * g
    if FIXED_POINT:
        tl.atomic_add(ptrs, (contrib * scale).to(tl.int64), mask=mask, sem="relaxed")
    else:
        tl.atomic_add(ptrs, contrib, mask=mask, sem="relaxed")


@triton.jit
def _bwd_kernel(
    grad_out, value, shapes, starts, loc, attw,
    grad_value, grad_loc, grad_w, fixed_point_scale,
    Lq, S, H,
    s_gb, s_gq, s_gc,
    s_vb, s_vs, s_vh, s_vd,
    s_lb, s_lq, s_lh, s_ll, s_lp, s_lc,
    s_wb, s_wq, s_wh, s_wl, s_wp,
    NL: tl.constexpr, NP: tl.constexpr, LP2: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
    SOFTMAX: tl.constexpr, FIXED_POINT: tl.constexpr,
):
    LP: tl.constexpr = NL * NP
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q = (pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    qmask = q < Lq
    d = tl.arange(0, BLOCK_D)
    dmask = d < D

    g = tl.load(grad_out + b * s_gb + q[:, None] * s_gq + (h * D + d)[None, :] * s_gc,
                mask=qmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    v_base = value + b * s_vb + h * s_vh + d[None, :] * s_vd
    gv_base = grad_value + (b * S * H + h) * D + d[None, :]  # contiguous [B, S, H, D] accumulator
    s_gs = H * D
    l_base = loc + b * s_lb + q * s_lq + h * s_lh
    w_base = attw + b * s_wb + q * s_wq + h * s_wh
    row = (b * Lq + q) * H + h  # (b, q, h) row of the contiguous loc / weight gradients
    scale = 1.0
    if FIXED_POINT:
        scale = tl.load(fixed_point_scale)
    if SOFTMAX:
        logits = _logits_tile(w_base, qmask, s_wl, s_wp, NP, LP, LP2)
        w_max = tl.max(logits, 1)
        w_inv = 1.0 / tl.sum(tl.exp(logits - w_max[:, None]), 1)

    cols = tl.arange(0, LP2)
    gw_tile = tl.zeros([BLOCK_Q, LP2], dtype=tl.float32)  # d loss / d weight, column l*P+p
    for lvl in range(NL):
        hl = tl.load(shapes + 2 * lvl)
        wl = tl.load(shapes + 2 * lvl + 1)
        start = tl.load(starts + lvl)
        for p in range(NP):
            lp = l_base + lvl * s_ll + p * s_lp
            lx = tl.load(lp, mask=qmask, other=0.0).to(tl.float32)
            ly = tl.load(lp + s_lc, mask=qmask, other=0.0).to(tl.float32)
            w = tl.load(w_base + lvl * s_wl + p * s_wp, mask=qmask, other=0.0).to(tl.float32)
            if SOFTMAX:
                w = tl.exp(w - w_max) * w_inv
            fx, fy, ia, ma, ib, mb, ic, mc, i_d, md = _corners(lx, ly, hl, wl, start, qmask)
            # <grad_out, value> at each corner: the only reductions over D the gradients need.
            ga = tl.sum(g * _gather(v_base, s_vs, ia, ma, dmask), 1)
            gb = tl.sum(g * _gather(v_base, s_vs, ib, mb, dmask), 1)
            gc = tl.sum(g * _gather(v_base, s_vs, ic, mc, dmask), 1)
            gd = tl.sum(g * _gather(v_base, s_vs, i_d, md, dmask), 1)
            gx = 1.0 - fx
            gy = 1.0 - fy
            gw = gx * gy * ga + fx * gy * gb + gx * fy * gc + fx * fy * gd
            gw_tile = tl.where(cols[None, :] == lvl * NP + p, gw[:, None], gw_tile)

            dx = gy * (gb - ga) + fy * (gd - gc)  # d<g, sample> / d x_pixel
            dy = gx * (gc - ga) + fx * (gd - gb)
            gl_ptr = grad_loc + (row * LP + lvl * NP + p) * 2
            tl.store(gl_ptr, w * dx * wl.to(tl.float32), mask=qmask)
            tl.store(gl_ptr + 1, w * dy * hl.to(tl.float32), mask=qmask)

            _scatter_corner(gv_base, s_gs, ia, ma, w * gx * gy, g, dmask, scale, FIXED_POINT)
            _scatter_corner(gv_base, s_gs, ib, mb, w * fx * gy, g, dmask, scale, FIXED_POINT)
            _scatter_corner(gv_base, s_gs, ic, mc, w * gx * fy, g, dmask, scale, FIXED_POINT)
            _scatter_corner(gv_base, s_gs, i_d, md, w * fx * fy, g, dmask, scale, FIXED_POINT)

    if SOFTMAX:
        # softmax backward over the L*P logits: w * (gw - <gw, w>)
        wt = tl.exp(logits - w_max[:, None]) * w_inv[:, None]
        gw_tile = wt * (gw_tile - tl.sum(gw_tile * wt, 1)[:, None])
    gw_ptrs = grad_w + row[:, None] * LP + cols[None, :]
    tl.store(gw_ptrs, gw_tile, mask=qmask[:, None] & (cols < LP)[None, :])


# ----------------------------------------------------------------------------- launch
@dataclasses.dataclass(frozen=True)
class MSDeformAttnConfig:
    """Launch config of the forward and backward kernels: queries per program and warps.
    BLOCK_D (D padded to a power of two) and LP2 (levels x points, likewise) follow from
    the inputs and are not tunables."""

    block_q: int
    num_warps: int = 4


def ms_deform_attn_config(value) -> MSDeformAttnConfig:
    """For value [B, S, H, D], forward and backward: ~2K fp32 elements per [BLOCK_Q,
    BLOCK_D] tile, 4 warps."""
    return MSDeformAttnConfig(block_q=max(16, min(128, 2048 // next_pow2(value.shape[3]))))


def _launch_sizes(value, sampling_locations, config):
    """(config, grid, constexprs shared by the forward and backward launches)."""
    b, _, h, d = value.shape
    lq, n_levels, n_points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    cfg = chosen(config, MSDeformAttnConfig, ms_deform_attn_config, value)
    constexprs = dict(NL=n_levels, NP=n_points, LP2=next_pow2(n_levels * n_points), D=d,
                      BLOCK_D=next_pow2(d), BLOCK_Q=cfg.block_q)
    return cfg, (cdiv(lq, cfg.block_q), b * h), constexprs


def _small_index_tensors(spatial_shapes, level_start_index, device):
    return (spatial_shapes.to(device=device, dtype=torch.int64).contiguous(),
            level_start_index.to(device=device, dtype=torch.int64).contiguous())


def ms_deform_attn_fwd(value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights, softmax: bool = False, *, config: "MSDeformAttnConfig | None" = None):
    """out [B, Lq, H*D] in value.dtype (fp32 accumulation). ``config``: the launch
    configuration (None: :func:`ms_deform_attn_config`)."""
    b, s, h, d = value.shape
    lq = sampling_locations.shape[1]
    cfg, grid, constexprs = _launch_sizes(value, sampling_locations, config)
    shapes, starts = _small_index_tensors(spatial_shapes, level_start_index, value.device)
    out = torch.empty((b, lq, h * d), dtype=value.dtype, device=value.device)
    _fwd_kernel[grid](
        value, shapes, starts, sampling_locations, attention_weights, out,
        lq, h,
        *value.stride(), *sampling_locations.stride(), *attention_weights.stride(),
        **constexprs, SOFTMAX=bool(softmax), num_warps=cfg.num_warps,
    )
    return out


# |sum| * scale stays below 2**_FIXED_POINT_BITS < 2**63; the margin covers log2 rounding.
_FIXED_POINT_BITS = 60


def _fixed_point_scales(grad_out, attention_weights, softmax: bool):
    """(scale, 1/scale): 0-dim fp32 powers of two, computed on the device (no host sync).

    Every value pixel's gradient is a sum of w * bilinear_weight * grad_out terms, so
    |grad_value| <= Lq * max over (b, q, h) of sum |w| * max |grad_out| (sum w = 1 with
    the softmax). Non-finite inputs make the bound NaN or inf; the gradient then comes
    out NaN instead of silently wrapping.
    """
    g_max = torch.linalg.vector_norm(grad_out, ord=float("inf"), dtype=torch.float32)
    if softmax:
        # 1, or NaN when a logit is NaN / +inf (which would make the softmax NaN).
        w_bound = 1.0 + 0.0 * attention_weights.amax().float()
    else:
        w_bound = torch.linalg.vector_norm(attention_weights, ord=1, dim=(-2, -1), dtype=torch.float32).amax()
    bound = g_max * w_bound * grad_out.shape[1]
    exponent = torch.floor(_FIXED_POINT_BITS - torch.log2(bound)).clamp(max=100.0)  # bound 0 -> 2**100
    return torch.exp2(exponent), torch.exp2(-exponent)


def ms_deform_attn_bwd(grad_out, value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights, softmax: bool = False, deterministic: bool = False, *,
                       config: "MSDeformAttnConfig | None" = None):
    """(grad_value, grad_sampling_locations, grad_attention_weights), contiguous, in the inputs' dtypes.

    With ``softmax`` the weight gradient is with respect to the logits. ``deterministic``
    (the op layer sets it from ``torch.are_deterministic_algorithms_enabled()`` when the
    caller leaves it None) accumulates grad_value in int64 fixed point: bitwise repeatable.
    ``config``: the launch configuration (None: :func:`ms_deform_attn_config`).
    """
    fixed_point = bool(deterministic)
    b, s, h, d = value.shape
    lq = sampling_locations.shape[1]
    dev = value.device
    cfg, grid, constexprs = _launch_sizes(value, sampling_locations, config)
    shapes, starts = _small_index_tensors(spatial_shapes, level_start_index, dev)

    grad_loc = torch.empty(sampling_locations.shape, dtype=torch.float32, device=dev)
    grad_w = torch.empty(attention_weights.shape, dtype=torch.float32, device=dev)
    acc = torch.zeros((b, s, h, d), dtype=torch.int64 if fixed_point else torch.float32, device=dev)
    if fixed_point:
        scale, inv_scale = _fixed_point_scales(grad_out, attention_weights, softmax)
    else:
        scale = inv_scale = None
    _bwd_kernel[grid](
        grad_out, value, shapes, starts, sampling_locations, attention_weights,
        acc, grad_loc, grad_w, scale if fixed_point else acc,
        lq, s, h,
        *grad_out.stride(), *value.stride(), *sampling_locations.stride(), *attention_weights.stride(),
        **constexprs, SOFTMAX=bool(softmax), FIXED_POINT=fixed_point, num_warps=cfg.num_warps,
    )
    if fixed_point:
        grad_value = acc.to(torch.float32).mul_(inv_scale).to(value.dtype)
    else:
        grad_value = acc.to(value.dtype)  # no copy for fp32
    return grad_value, grad_loc.to(sampling_locations.dtype), grad_w.to(attention_weights.dtype)

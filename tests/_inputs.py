"""Input builders and comparisons shared by the per-op kernel tests (tests/test_op_*.py).

Random draws come from torch's and Python's global generators, which the ``seed`` fixture
(tests/conftest.py) seeds afresh for every test. Builders put tensors on ``DEVICE`` (the
GPU when there is one) unless they say otherwise; the float64 inputs of the loop oracles
stay on the CPU.
"""
from __future__ import annotations

import contextlib
import math
import random
import types

import numpy as np
import torch
import torch.nn.functional as F

import m2f_kernels as mk
from .conftest import DEVICE, TOLERANCE, assert_close, poisoned, poisoned_empty

# ============================================================================ comparisons


def assert_close_floored(out, expected, tol, what):
    """||out - expected|| / ||expected||, with the denominator floored at 1e-2 * sqrt(numel)
    (gradients that are analytically zero, e.g. dq with one key, are rounding noise of
    the dp - delta cancellation: they compare absolutely); NaN fails."""
    out64, exp64 = out.detach().double().cpu(), expected.detach().double().cpu()
    assert out64.shape == exp64.shape, f"{what}: shape {tuple(out64.shape)} != {tuple(exp64.shape)}"
    assert torch.isfinite(out64).all(), f"{what}: non-finite values"
    denom = max(exp64.norm().item(), 1e-2 * exp64.numel() ** 0.5)
    err = (out64 - exp64).norm().item() / denom
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def rel_scalar(out: torch.Tensor, expected: torch.Tensor) -> float:
    """|out - expected| / |expected| of two 0-dim tensors; a non-finite ``out`` fails."""
    out, expected = out.double(), expected.double()
    assert torch.isfinite(out), f"non-finite {out}"
    return abs(out - expected).item() / max(abs(expected).item(), 1e-30)


# ============================================================================ masked attention
ATTENTION_OUTPUTS = ("out", "lse", "dq", "dk", "dv")


def make_mask(B, H, Q, N, kind, per_head, dtype=torch.float32, visible=0.3, device=DEVICE):
    """[B, Q, N] or [B, H, Q, N] mask with, besides random rows (``visible`` of the keys
    visible), empty rows, rows with one visible key (anywhere, the last key included) and
    all-visible rows. kind 'bool' (True = blocked) or 'logits' (blocked where < 0, some
    exact zeros, which are visible)."""
    shape = (B, H, Q, N) if per_head else (B, Q, N)
    blocked = torch.rand(shape) >= visible
    rows = blocked.view(-1, Q, N)
    for r in range(rows.shape[0]):
        special = torch.randperm(Q)[: max(1, Q // 3)].tolist()
        for i, q in enumerate(special):
            if i % 3 == 0:
                rows[r, q] = True  # empty row: attends to all keys
            elif i % 3 == 1:
                rows[r, q] = True
                rows[r, q, N - 1 if i % 2 else random.randrange(N)] = False
            else:
                rows[r, q] = False
    if kind == "bool":
        return blocked.to(device)
    magnitude = torch.rand(shape) * 4 + 0.05
    logits = torch.where(blocked, -magnitude, magnitude)
    logits[(~blocked) & (torch.rand(shape) < 0.1)] = 0.0
    return logits.to(device=device, dtype=dtype)


def standard_mask(B, Q, N, kind, dtype, device):
    """~30% visible keys, 5% empty rows, as in the benchmark."""
    blocked = torch.rand(B, Q, N, device=device) >= 0.3
    blocked[torch.rand(B, Q, device=device) < 0.05] = True
    if kind == "bool":
        return blocked
    magnitude = torch.rand(B, Q, N, device=device) * 4 + 0.05
    return torch.where(blocked, -magnitude, magnitude).to(dtype)


def make_qkv(B, H, Q, N, D, dtype, layout="contiguous", device=DEVICE):
    """q [B, H, Q, D], k and v [B, H, N, D]: views of leaf tensors that require grad.

    layout 'contiguous'; 'seq_first': views of [L, B, H*D] projections as the decoder
    makes them; 'strided': every other element of a wider last dim (stride 2 along D)."""
    def one(L):
        if layout == "seq_first":
            leaf = torch.randn(L, B, H * D, device=device, dtype=dtype).requires_grad_()
            return leaf.view(L, B, H, D).permute(1, 2, 0, 3)
        if layout == "strided":
            leaf = torch.randn(B, H, L, 2 * D, device=device, dtype=dtype).requires_grad_()
            return leaf[..., ::2]
        return torch.randn(B, H, L, D, device=device, dtype=dtype).requires_grad_()
    return one(Q), one(N), one(N)


def attention_result(backend, q, k, v, mask, scale, grad_out):
    """(out, lse, dq, dk, dv) from ``backend`` through the registered custom op (the op behind
    m2f_kernels.masked_attention, which also returns lse) and its autograd, with every
    allocation poisoned."""
    with poisoned(backend):
        out, lse = torch.ops.m2f_kernels.masked_attention(q, k, v, mask, scale, backend)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    return out.detach(), lse, dq, dk, dv


def reference_attention(q, k, v, mask, scale, grad_out):
    """(out, lse, dq, dk, dv) from the reference backend on float32 copies."""
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out, lse = torch.ops.m2f_kernels.masked_attention(q32, k32, v32, mask, scale, "reference")
    dq, dk, dv = torch.autograd.grad(out, (q32, k32, v32), grad_out.float())
    return out.detach(), lse.detach(), dq, dk, dv


def assert_attention_outputs(got, want, tol):
    for name, a, b in zip(ATTENTION_OUTPUTS, got, want):
        assert_close_floored(a, b, tol, name)


def assert_attention_matches(backend, q, k, v, mask, scale=None, tol=None):
    """``backend``'s (out, lse, dq, dk, dv) against the reference: dtypes and values."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tol = TOLERANCE[q.dtype] if tol is None else tol
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), device=q.device, dtype=q.dtype)
    got = attention_result(backend, q, k, v, mask, scale, grad_out)
    want = reference_attention(q, k, v, mask, scale, grad_out)
    assert got[0].dtype == q.dtype and got[1].dtype == torch.float32
    assert got[2].dtype == q.dtype and got[3].dtype == k.dtype and got[4].dtype == v.dtype
    assert_attention_outputs(got, want, tol)


# ============================================================================ MSDeformAttn
DEFORM_OUTPUTS = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")


def levels(*hw, device=DEVICE):
    """(spatial_shapes [L, 2], level_start_index [L], S) for level sizes (H_l, W_l)."""
    shapes = torch.tensor(hw, dtype=torch.int64, device=device)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return shapes, starts, int(sizes.sum())


def make_deform_inputs(hw, b=2, lq=7, h=2, d=8, p=2, dtype=torch.float32, aux_dtype=None, softmax=False):
    """Random (value, shapes, starts, locations, weights, grad_out); points spill outside [0, 1].

    Locations and weights are in ``aux_dtype`` (default: value's dtype); with ``softmax``
    the weights are logits, else they sum to 1 over the levels and points."""
    aux_dtype = aux_dtype or dtype
    shapes, starts, s = levels(*hw)
    n_levels = len(hw)
    value = torch.randn(b, s, h, d, device=DEVICE).to(dtype)
    loc = (torch.rand(b, lq, h, n_levels, p, 2, device=DEVICE) * 1.4 - 0.2).to(aux_dtype)
    logits = torch.randn(b, lq, h, n_levels, p, device=DEVICE)
    weights = logits if softmax else logits.flatten(-2).softmax(-1).view_as(logits)
    grad_out = torch.randn(b, lq, h * d, device=DEVICE).to(dtype)
    return value, shapes, starts, loc, weights.to(aux_dtype), grad_out


def deform_api(backend, value, shapes, starts, loc, weights, grad_out, softmax, deterministic=False):
    """(out, grad_value, grad_loc, grad_weights) through the public op and autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, weights)]
    out = mk.ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], softmax=softmax,
                            deterministic=deterministic, backend=backend)
    out.backward(grad_out)
    return (out.detach(),) + tuple(t.grad for t in leaves)


def deform_direct(module, inputs, softmax, deterministic=False):
    """(out, grad_value, grad_loc, grad_weights) from a backend module's fwd/bwd functions."""
    value, shapes, starts, loc, weights, grad_out = inputs
    out = module.ms_deform_attn_fwd(value, shapes, starts, loc, weights, softmax)
    grads = module.ms_deform_attn_bwd(grad_out, value, shapes, starts, loc, weights, softmax, deterministic)
    return (out,) + tuple(grads)


def assert_deform_matches(backend, inputs, softmax, seed, deterministic=False):
    """``backend``'s output and three gradients (public op + autograd, allocations poisoned)
    against the reference: dtype and tolerance per tensor."""
    with poisoned(backend):
        got = deform_api(backend, *inputs, softmax, deterministic)
    want = deform_api("reference", *inputs, softmax)
    for name, g, w in zip(DEFORM_OUTPUTS, got, want):
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype} (seed {seed})"
        assert_close(g, w, TOLERANCE[w.dtype], f"{name} (seed {seed})")


def assert_deterministic_twice(module, inputs, softmax, seed, poison_outputs=False):
    """Two deterministic runs of ``module``'s fwd/bwd are bitwise equal and match the
    reference. Returns the first run's (out, grad_value, grad_loc, grad_weights)."""
    from m2f_kernels.reference import ms_deform_attn as reference

    with poisoned_empty() if poison_outputs else contextlib.nullcontext():
        first = deform_direct(module, inputs, softmax, deterministic=True)
        second = deform_direct(module, inputs, softmax, deterministic=True)
    for name, a, b in zip(DEFORM_OUTPUTS, first, second):
        assert torch.equal(a, b), f"{name}: deterministic backward differs between two runs (seed {seed})"
    want = deform_direct(reference, inputs, softmax)
    for name, g, w in zip(DEFORM_OUTPUTS, first, want):
        assert_close(g, w, TOLERANCE[w.dtype], f"{name} (seed {seed})")
    return first


def special_coords(size: int, n: int) -> torch.Tensor:
    """n coordinates along an axis of ``size`` pixels: exact pixel centres, borders, outside both sides.

    Power-of-two sizes keep the centres (i + 0.5) / size and loc * size - 0.5 exact in
    fp32, so both implementations pick the same corners where the bilinear kink is.
    """
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    special = torch.tensor([0.0, 1.0, -0.5 / size, 1 + 0.5 / size, -0.25, 1.25, -1e6, 1e6], dtype=torch.float64)
    pool = torch.cat([centres, special])
    return pool[torch.randint(len(pool), (n,))].float()


STANDARD_LEVELS = [(128, 128), (64, 64), (32, 32)]  # Lq = S = 21504


def off_grid_lines(loc, shapes, margin=1e-3):
    """Move each point at least ``margin`` pixel away from its level's pixel-grid lines.

    Bilinear sampling has no derivative with respect to the location on a grid line; a
    point within rounding of one may floor to either cell, and the two correct kernels
    then give location gradients that differ by O(1) for that point. At the standard
    shape (~4M points) a few dozen such points are expected per run on random data
    (seen on the H200: 4e-4 to 8e-4 relative error in grad_sampling_locations), so the
    full-size comparison keeps points clear of the lines.
    """
    size = shapes.flip(-1).to(loc.dtype).view(1, 1, 1, -1, 1, 2)  # (W_l, H_l) per level
    pix = loc * size - 0.5
    cell = pix.floor()
    pix = cell + margin + (pix - cell) * (1 - 2 * margin)
    return (pix + 0.5) / size


def standard_deform_inputs(dtype):
    """The docs/ops.md standard shape: B=2, Lq=S=21504 over 3 levels, H=8, D=32, P=4, softmax
    logits in fp32; points kept off the pixel-grid lines."""
    value, shapes, starts, loc, weights, grad_out = make_deform_inputs(
        STANDARD_LEVELS, b=2, lq=levels(*STANDARD_LEVELS)[2], h=8, d=32, p=4, dtype=dtype,
        aux_dtype=torch.float32, softmax=True)
    return value, shapes, starts, off_grid_lines(loc, shapes), weights, grad_out


# The official Deformable DETR code (what the drop-in MSDeformAttn replaces), verbatim in logic.


def official_core(value, value_spatial_shapes, sampling_locations, attention_weights):
    """Deformable DETR's ``ms_deform_attn_core_pytorch`` (the official CPU path), verbatim in logic."""
    n_, s_, m_, d_ = value.shape
    _, lq_, m_, l_, p_, _ = sampling_locations.shape
    hw = [tuple(x) for x in value_spatial_shapes.tolist()]
    value_list = value.split([h_ * w_ for h_, w_ in hw], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for lid_, (h_, w_) in enumerate(hw):
        value_l_ = value_list[lid_].flatten(2).transpose(1, 2).reshape(n_ * m_, d_, h_, w_)
        sampling_grid_l_ = sampling_grids[:, :, :, lid_].transpose(1, 2).flatten(0, 1)
        sampling_value_list.append(
            F.grid_sample(value_l_, sampling_grid_l_, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    attention_weights = attention_weights.transpose(1, 2).reshape(n_ * m_, 1, lq_, l_ * p_)
    output = (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights).sum(-1).view(n_, m_ * d_, lq_)
    return output.transpose(1, 2).contiguous()


class OfficialMSDeformAttn(torch.nn.Module):
    """The official module's forward on the pure PyTorch core (parameters loaded from ours)."""

    def __init__(self, d_model, n_levels, n_heads, n_points):
        super().__init__()
        self.im2col_step = 64
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = torch.nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = torch.nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = torch.nn.Linear(d_model, d_model)
        self.output_proj = torch.nn.Linear(d_model, d_model)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):
        n, len_q, _ = query.shape
        n, len_in, _ = input_flatten.shape
        assert (input_spatial_shapes[:, 0] * input_spatial_shapes[:, 1]).sum() == len_in
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], float(0))
        value = value.view(n, len_in, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(n, len_q, self.n_heads, self.n_levels, self.n_points, 2)
        attention_weights = self.attention_weights(query).view(n, len_q, self.n_heads, self.n_levels * self.n_points)
        attention_weights = F.softmax(attention_weights, -1).view(n, len_q, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            offset_normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            sampling_locations = reference_points[:, :, None, :, None, :] \
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
        else:
            sampling_locations = reference_points[:, :, None, :, None, :2] \
                + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
        output = official_core(value, input_spatial_shapes, sampling_locations, attention_weights)
        return self.output_proj(output)


# ============================================================================ point-loss ops
POINT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TARGET_KINDS = ("bool", "uint8", "float32", "float16")


def make_coords(n: int, p: int, sizes, device=DEVICE) -> torch.Tensor:
    """[n, p, 2] points: up to half are special (corners, borders, pixel centres and pixel
    edges of each (h, w) in ``sizes``, points outside the map), the rest uniform in
    [-0.05, 1.05]; shuffled per row."""
    special = [(0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.0, 0.37), (1.0, 0.61),
               (0.29, 0.0), (0.83, 1.0), (-0.2, 0.5), (0.5, 1.3), (-3.0, -7.0), (1e4, 0.5)]
    for h, w in sizes:
        ix, iy = torch.randint(0, w, (4,)), torch.randint(0, h, (4,))
        special += [((x + 0.5) / w, (y + 0.5) / h) for x, y in zip(ix.tolist(), iy.tolist())]
        special += [(x / w, y / h) for x, y in zip(ix.tolist(), iy.tolist())]
    special = torch.tensor(special, dtype=torch.float32)
    coords = torch.rand(n, p, 2) * 1.1 - 0.05
    m = min(len(special), p // 2)
    for row in coords:
        row[:m] = special[torch.randperm(len(special))[:m]]
        row.copy_(row[torch.randperm(p)])
    return coords.to(device)


def make_target(kind: str, n: int, h: int, w: int, padded: bool = False, device=DEVICE) -> torch.Tensor:
    """[n, h, w] target masks of ``kind`` ('bool', 'uint8': hard 0/1; 'float32', 'float16':
    soft in [0, 1)); ``padded`` takes them out of a larger (padded) batch tensor, so they
    are non-contiguous."""
    big = (n, h + 3, w + 5) if padded else (n, h, w)
    if kind in ("bool", "uint8"):
        t = torch.rand(big, device=device) > 0.5
        t = t if kind == "bool" else t.to(torch.uint8)
    else:
        t = torch.rand(big, device=device, dtype=getattr(torch, kind))
    return t[:, :h, :w] if padded else t


def make_point_sample_inputs(n, channels, h, w, p, dtype, strided):
    """input [n, channels, h, w] and coords [n, p, 2]; strided: channels-last input and
    [N, 2, P]-transposed coords."""
    if strided:
        x = torch.randn(n, h, w, channels, device=DEVICE).to(dtype).permute(0, 3, 1, 2)
        coords = make_coords(n, p, [(h, w)]).transpose(1, 2).contiguous().transpose(1, 2)
    else:
        x = torch.randn(n, channels, h, w, device=DEVICE).to(dtype)
        coords = make_coords(n, p, [(h, w)])
    return x, coords


def point_sample_api(backend, x, coords, weights):
    """(out, grad input) of the public op for the loss sum(out * weights)."""
    x = x.detach().requires_grad_()
    out = mk.point_sample(x, coords, backend=backend)
    (grad,) = torch.autograd.grad((out.float() * weights).sum(), x)
    return out.detach(), grad


def _point_keys(points: torch.Tensor) -> torch.Tensor:
    """An int64 key per fp32 (x, y) point (its two bit patterns)."""
    bits = points.float().contiguous().view(torch.int32).long()
    return (bits[..., 0] << 32) | (bits[..., 1] & 0xFFFFFFFF)


def check_importance_points(out, logits, candidates, random, k):
    """out is the reference's importance sampling up to fp32 near-ties of -|logit|.

    The chosen points are distinct candidates whose reference uncertainty equals the
    reference top-k values (in top-k order); rows without near-ties match exactly.
    Returns which rows had no near-ties.
    """
    from m2f_kernels.reference import point_loss as ref

    expected = ref.uncertain_point_coords(logits, candidates, random, k)
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.is_contiguous()
    assert ((out >= 0) & (out <= 1)).all()
    assert torch.equal(out[:, k:], expected[:, k:]), "the random points must follow unchanged"

    chosen_keys = _point_keys(out[:, :k])
    cand_keys, _ = _point_keys(candidates).sort(dim=1)
    pos = torch.searchsorted(cand_keys, chosen_keys).clamp_max(cand_keys.shape[1] - 1)
    assert torch.equal(cand_keys.gather(1, pos), chosen_keys), "a chosen point is not a candidate"
    sorted_keys, _ = chosen_keys.sort(dim=1)
    assert (sorted_keys[:, 1:] != sorted_keys[:, :-1]).all(), "a candidate was chosen twice"

    def uncertainty(points):
        return -ref.point_sample_fwd(logits.float().unsqueeze(1), points)[:, 0].abs()

    all_u = uncertainty(candidates)
    top = torch.topk(all_u, k=min(k + 1, all_u.shape[1]), dim=1).values
    scale = 1e-5 * (1.0 + all_u.abs().max().item())
    assert (uncertainty(out[:, :k]) - top[:, :k]).abs().max().item() <= scale, \
        "the chosen points are not the most uncertain ones"
    clear = (top[:, :-1] - top[:, 1:]).min(dim=1).values > scale  # rows without near-ties
    assert torch.equal(out[clear], expected[clear])
    return clear


def make_indexed_logits(dtype, layout: str, index_dtype=torch.int64):
    """(logits [B=2, Q=4, 11, 13], batch_index, query_index [5]) with a repeated (1, 3) pair
    and pairs out of order. layout 'strided': logits a non-contiguous [B, Q, H, W] view
    (spatial dims outermost, inside a padded tensor)."""
    b, q, h, w = 2, 4, 11, 13
    if layout == "strided":
        logits = (torch.randn(h + 2, w + 3, b, q, device=DEVICE) * 3).to(dtype)[1:h + 1, :w].permute(2, 3, 0, 1)
    else:
        logits = (torch.randn(b, q, h, w, device=DEVICE) * 3).to(dtype)
    bidx = torch.tensor([1, 0, 1, 1, 0], device=DEVICE, dtype=index_dtype)
    qidx = torch.tensor([3, 2, 0, 3, 1], device=DEVICE, dtype=index_dtype)
    return logits, bidx, qidx


def uncertain_points_indexed_vs_copied(backend_module, dtype, layout, index_dtype=torch.int64):
    """A backend's indexed importance sampling against the same backend on the gathered copy
    (bit for bit), both with fresh draws and torch.empty poisoned; returns (points, the
    gathered logits, candidates, random points, k) for further checks."""
    logits, bidx, qidx = make_indexed_logits(dtype, layout, index_dtype)
    n, points = bidx.shape[0], 16
    s, k = 3 * points, int(0.75 * points)
    candidates = torch.rand(n, s, 2, device=DEVICE)
    candidates[1] = candidates[3] = candidates[0]  # rows 0 and 3 read the same mask, row 1 another
    random = torch.rand(n, points - k, 2, device=DEVICE)
    copied = logits[bidx, qidx]
    with poisoned_empty():
        out = backend_module.uncertain_point_coords(logits, candidates, random, k, bidx, qidx)
        expected = backend_module.uncertain_point_coords(copied, candidates, random, k)
    assert out.shape == expected.shape == (n, points, 2) and out.dtype == expected.dtype and out.is_contiguous()
    assert torch.equal(out, expected), "the indexed form must equal the form on the gathered copy"
    # not vacuous: on the same candidates, the repeated pair gets the same points, another mask others
    assert torch.equal(out[0, :k], out[3, :k]) and not torch.equal(out[0, :k], out[1, :k])
    return out, copied, candidates, random, k


def make_loss_inputs(dtype, form, n, p, pred_hw=(10, 12), target_hw=None, target_kind="bool"):
    """(pred, target, coords, batch_index, query_index) for one loss call.

    form: 'plain' [N, Hp, Wp]; 'strided' the same, non-contiguous; 'indexed' [B, Q, Hp, Wp]
    with distinct (batch, query) pairs. A ``target_hw`` (another resolution) comes padded.
    """
    hp, wp = pred_hw
    ht, wt = target_hw or pred_hw
    if form == "indexed":
        b, q = 2, max(3, (n + 1) // 2 + 1)
        pred = (torch.randn(b, q, hp, wp, device=DEVICE) * 3).to(dtype)
        pairs = torch.randperm(b * q, device=DEVICE)[:n]
        bidx, qidx = pairs // q, pairs % q
    else:
        pred = (torch.randn(hp, wp, n, device=DEVICE) * 3).to(dtype)
        pred = pred.permute(2, 0, 1) if form == "strided" else pred.permute(2, 0, 1).contiguous()
        bidx = qidx = None
    target = make_target(target_kind, n, ht, wt, padded=target_hw is not None)
    coords = make_coords(n, p, {pred_hw, (ht, wt)})
    return pred, target, coords, bidx, qidx


def point_loss_api(backend, pred, target, coords, bidx, qidx, num_masks, gb, gd):
    """(loss_bce, loss_dice, grad pred) of the public op for gb * bce + gd * dice."""
    pred = pred.detach().requires_grad_()
    index = None if bidx is None else (bidx, qidx)
    bce, dice = mk.point_mask_loss(pred, target, coords, num_masks, pred_index=index, backend=backend)
    (grad,) = torch.autograd.grad(gb * bce + gd * dice, pred)
    return bce.detach(), dice.detach(), grad


def assert_loss_matches(backend, dtype, pred, target, coords, bidx, qidx, num_masks, seed, repeat_forward=False):
    """``backend``'s losses and gradient (public op + autograd, allocations poisoned) against
    the reference; masks that were not matched get exactly zero gradient. ``repeat_forward``:
    a second forward gives bitwise the same losses."""
    tol = TOLERANCE[dtype]
    gb, gd = torch.randn(2).tolist()
    with poisoned(backend):
        bce, dice, grad = point_loss_api(backend, pred, target, coords, bidx, qidx, num_masks, gb, gd)
    ebce, edice, egrad = point_loss_api("reference", pred, target, coords, bidx, qidx, num_masks, gb, gd)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert bce.shape == () and dice.shape == () and bce.dtype == loss_dtype and dice.dtype == loss_dtype
    assert rel_scalar(bce, ebce) <= tol, f"loss_bce {bce.item()} vs {ebce.item()} (seed {seed})"
    assert rel_scalar(dice, edice) <= tol, f"loss_dice {dice.item()} vs {edice.item()} (seed {seed})"
    assert grad.shape == pred.shape and grad.dtype == dtype and grad.is_contiguous()
    assert_close(grad, egrad, tol, f"grad pred (seed {seed})")
    if bidx is not None:
        untouched = torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device)
        untouched[bidx, qidx] = False
        assert (grad[untouched] == 0).all(), f"gradient outside the matched masks (seed {seed})"
    if repeat_forward:
        index = None if bidx is None else (bidx, qidx)
        again = mk.point_mask_loss(pred, target, coords, num_masks, pred_index=index, backend=backend)
        assert torch.equal(again[0], bce) and torch.equal(again[1], dice), "forward is not deterministic"


def assert_costs_match(got, pred, target, coords, seed=None):
    """Matcher costs (cost_bce, cost_dice) against the reference's: fp32, contiguous, within
    1e-4 (fp32 sums of the same fp32 samples, whatever the pred dtype)."""
    expected = mk.pairwise_mask_cost(pred, target, coords, backend="reference")
    for out, exp, what in zip(got, expected, ("cost_bce", "cost_dice")):
        assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == exp.shape, what
        assert_close(out, exp, 1e-4, f"{what} (seed {seed})")


def standard_point_loss_case(dtype):
    """docs/ops.md point-loss shapes: pred [B=2, Q=100, 256, 256] in ``dtype``, 30 blobby bool
    targets per image at 1024^2, P=12544, 30 matches per image (bidx, qidx), and the
    importance-sampling draws (3P candidates, P - k random points, k = 0.75 P) per match."""
    b, q, t, p, hp, ht = 2, 100, 30, 12544, 256, 1024
    pred = (torch.randn(b, q, hp, hp, device=DEVICE) * 3).to(dtype)
    # blobby masks: upsampled low-resolution noise, as bool
    target = torch.nn.functional.interpolate(torch.randn(b * t, 1, 16, 16, device=DEVICE),
                                             size=(ht, ht), mode="bilinear")[:, 0] > 0.3
    bidx = torch.arange(b, device=DEVICE).repeat_interleave(t)
    qidx = torch.cat([torch.randperm(q, device=DEVICE)[:t] for _ in range(b)])
    k = int(0.75 * p)
    candidates = torch.rand(b * t, 3 * p, 2, device=DEVICE)
    random = torch.rand(b * t, p - k, 2, device=DEVICE)
    return types.SimpleNamespace(b=b, t=t, p=p, k=k, pred=pred, target=target, bidx=bidx, qidx=qidx,
                                 candidates=candidates, random=random)


# ============================================================================ loop oracles
# The reference backend is checked against float64 loops written from the op contracts
# (docs/ops.md), not from grid_sample or the reference's own tensor formulas: bilinear
# sampling by hand (pixel coordinate = coord * size - 0.5, zero outside the map), softmax
# by hand, BCE as max(x, 0) - x t + log(1 + exp(-|x|)), dice with +1 smoothing. Gradients
# are checked against central finite differences of the loops. Shapes are tiny: the loops
# are slow. Their inputs are float64 on the CPU.
FD_TOL = 1e-6  # central differences in float64 (eps 1e-6): truncation ~1e-12, rounding ~1e-10
EXACT = TOLERANCE[torch.float64]
LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def np64(t: torch.Tensor) -> np.ndarray:
    """A float64 NumPy copy (bool/uint8 targets become 0/1)."""
    return t.detach().to(torch.float64).cpu().numpy().copy()


def corner_weights(height: int, width: int, x: float, y: float) -> list[tuple[int, int, float]]:
    """(row, col, weight) of the in-map corners of a bilinear sample at (x, y) in [0, 1] coords."""
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    corners = []
    for row, wy in ((y0, 1.0 - fy), (y0 + 1, fy)):
        for col, wx in ((x0, 1.0 - fx), (x0 + 1, fx)):
            if 0 <= row < height and 0 <= col < width:
                corners.append((row, col, wy * wx))
    return corners


def bilinear(img: np.ndarray, x: float, y: float):
    """img [H, W, ...] sampled at (x, y); zero padding. Returns img's trailing shape."""
    acc = np.zeros(img.shape[2:])
    for row, col, w in corner_weights(img.shape[0], img.shape[1], x, y):
        acc = acc + w * img[row, col]
    return acc


def softmax(xs: np.ndarray) -> np.ndarray:
    m = max(xs)
    e = np.array([math.exp(x - m) for x in xs])
    return e / e.sum()


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce(x: float, t: float) -> float:
    return max(x, 0.0) - x * t + math.log1p(math.exp(-abs(x)))


def dice(s: list[float], t: list[float]) -> float:
    return 1.0 - (2.0 * sum(a * b for a, b in zip(s, t)) + 1.0) / (sum(s) + sum(t) + 1.0)


def fd_grads(loss, arrays: list[np.ndarray], eps: float = 1e-6) -> list[np.ndarray]:
    """Central differences of the scalar ``loss()`` w.r.t. each array (perturbed in place)."""
    grads = []
    for a in arrays:
        g = np.zeros_like(a)
        for i in range(a.size):
            old = a.flat[i]
            a.flat[i] = old + eps
            up = loss()
            a.flat[i] = old - eps
            down = loss()
            a.flat[i] = old
            g.flat[i] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


def special_points(height: int, width: int):
    """(inside, outside) lists of (x, y): pixel centres, borders, corners, half-pixel overhangs
    (partly inside: they read the border pixels) and points beyond every side (read zero)."""
    cx = lambda c: (c + 0.5) / width  # noqa: E731
    cy = lambda r: (r + 0.5) / height  # noqa: E731
    inside = [
        (cx(width - 1), cy(0)), (cx(0), cy(height - 1)), (cx(width // 2), cy(height // 2)),
        (0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0),
        (0.0, cy(0)), (1.0, cy(height - 1)), (cx(0), 0.0), (cx(width - 1), 1.0),
        (-0.25 / width, cy(0)), (1 + 0.25 / width, cy(0)), (cx(0), -0.25 / height), (cx(0), 1 + 0.25 / height),
    ]
    outside = [(-0.75, 0.5), (1.75, 0.5), (0.5, -0.75), (0.5, 1.75), (-0.75, -0.75), (1.75, 1.75), (-3.0, 4.0)]
    return inside, outside


def smooth_coord(size: int) -> float:
    """A coordinate (inside, partly or wholly outside) whose pixel coordinate is >= 0.05 away
    from every integer: bilinear sampling is differentiable there."""
    pixel = torch.randint(-2, size + 2, ()).item() + 0.05 + 0.9 * torch.rand(()).item()
    return (pixel + 0.5) / size


def loop_attention_mask(b, h, nq, n, kind: str, per_head: bool, contiguous: bool = True):
    """A random mask with the edge rows in every (batch[, head]): row 0 all keys blocked,
    row 1 exactly one visible key, row 2 all visible. Per-head masks also get a row 3 that
    is empty in head 0 only. Logit masks hold exact zeros, which are visible."""
    shape = (b, h, nq, n) if per_head else (b, nq, n)
    blocked = torch.rand(shape) < 0.5
    rows = blocked.view(-1, nq, n)
    for r in rows:
        r[0] = True
        if nq > 1:
            r[1] = True
            r[1, torch.randint(n, ())] = False
        if nq > 2:
            r[2] = False
    if per_head and h > 1 and nq > 3:
        blocked[:, 0, 3] = True
        blocked[:, 1, 3, 0] = False
    if kind == "bool":
        mask = blocked
    else:
        magnitude = torch.rand(shape) + 0.05
        mask = torch.where(blocked, -magnitude, magnitude)
        mask[~blocked & (torch.rand(shape) < 0.3)] = 0.0  # sigmoid(0) = 0.5 is not < 0.5: visible
    if not contiguous:
        mask = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    return mask


def loop_attention_inputs(b, h, nq, n, d, dv, dtype=torch.float64, contiguous=True):
    """q [b, h, nq, d], k [b, h, n, d], v [b, h, n, dv]; not contiguous: transposed storage."""
    if contiguous:
        return torch.randn(b, h, nq, d, dtype=dtype), torch.randn(b, h, n, d, dtype=dtype), \
            torch.randn(b, h, n, dv, dtype=dtype)
    q = torch.randn(b, nq, h, d, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, n, h, d, dtype=dtype).transpose(1, 2)
    v = torch.randn(b, h, dv, n, dtype=dtype).transpose(2, 3)
    return q, k, v


LOOP_LEVELS = [(2, 3), (1, 1), (1, 4), (3, 1)]  # a 1x1 level, a single row, a single column


def loop_deform_inputs(b, lq, h, d, npt, hw=LOOP_LEVELS, dtype=torch.float64, contiguous=True):
    """(value, shapes, starts, loc in [-0.2, 1.2], weights in [0, 1)) on the CPU."""
    shapes, starts, s = levels(*hw, device="cpu")
    nl = len(hw)
    if contiguous:
        value = torch.randn(b, s, h, d, dtype=dtype)
        loc = torch.rand(b, lq, h, nl, npt, 2, dtype=dtype) * 1.4 - 0.2
        weights = torch.rand(b, lq, h, nl, npt, dtype=dtype)
    else:
        value = torch.randn(b, h, s, d, dtype=dtype).transpose(1, 2)
        loc = (torch.rand(b, lq, h, nl, npt, 4, dtype=dtype) * 1.4 - 0.2)[..., ::2]
        weights = torch.rand(b, h, lq, nl, npt, dtype=dtype).transpose(1, 2)
    return value, shapes, starts, loc, weights


def sample_coords(n: int, height: int, width: int, extra: int = 4, dtype=torch.float64):
    """[n, K + extra, 2]: the special points of an H x W map, then random ones in [-0.2, 1.2];
    also returns the point indices that lie wholly outside."""
    inside, outside = special_points(height, width)
    fixed = torch.tensor(inside + outside, dtype=dtype).expand(n, -1, -1)
    coords = torch.cat([fixed, torch.rand(n, extra, 2, dtype=dtype) * 1.4 - 0.2], dim=1)
    return coords, list(range(len(inside), len(inside) + len(outside)))


def loss_coords(n: int, npt: int, hp: int, wp: int) -> torch.Tensor:
    """[n, npt, 2] float64: random points in [-0.1, 1.1], some replaced by special points of pred's map."""
    coords = torch.rand(n, npt, 2, dtype=torch.float64) * 1.2 - 0.1
    inside, outside = special_points(hp, wp)
    special = torch.tensor(inside + outside, dtype=torch.float64)
    pick = torch.rand(n, npt) < 0.3
    coords[pick] = special[torch.randint(len(special), (int(pick.sum()),))]
    return coords

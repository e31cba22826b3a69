"""The triton point-loss kernels (point_sample, uncertain_point_coords, point_mask_loss,
pairwise_mask_cost) against the reference backend on the same points.

CPU: TRITON_INTERPRET=1 and small shapes. GPU: the same tests, plus the standard
Mask2Former shapes of DESIGN.md.
"""
from __future__ import annotations

import types

import json
import os
import pathlib
import random
import subprocess
import sys

import pytest
import torch

import m2f_kernels as mk
from .conftest import DEVICE, TOLERANCE, assert_close, poisoned_empty, requires_gpu, requires_triton
from m2f_kernels import reference as ref

pytestmark = [
    requires_triton,
    # the Triton interpreter's own range(<runtime int>) (numpy >= 1.25), not this code
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]
triton = pytest.importorskip("triton", reason="triton is not installed")
tri = pytest.importorskip("m2f_kernels.triton.point_loss", reason="triton is not installed")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TARGET_KINDS = ("bool", "uint8", "float32", "float16")


def _seed() -> int:
    """A fresh seed per test (torch's own start-up seed is fixed), printed for replay."""
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    print(f"seed={seed}")
    return seed


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


def make_target(kind: str, n: int, h: int, w: int, padded: bool) -> torch.Tensor:
    """[n, h, w] target masks; ``padded`` takes them out of a larger (padded) batch tensor,
    so they are non-contiguous."""
    big = (n, h + 3, w + 5) if padded else (n, h, w)
    if kind in ("bool", "uint8"):
        t = torch.rand(big, device=DEVICE) > 0.5
        t = t if kind == "bool" else t.to(torch.uint8)
    else:
        t = torch.rand(big, device=DEVICE, dtype=getattr(torch, kind))
    return t[:, :h, :w] if padded else t


def rel_scalar(out: torch.Tensor, expected: torch.Tensor) -> float:
    out, expected = out.double(), expected.double()
    assert torch.isfinite(out), f"non-finite {out}"
    return abs(out - expected).item() / max(abs(expected).item(), 1e-30)


# ----------------------------------------------------------------------------- point_sample


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels,strided", [(1, False), (3, True)])
def test_point_sample(dtype, channels, strided):
    _seed()
    n, h, w, p = 3, 7, 9, 41
    x, coords = make_point_sample_inputs(n, channels, h, w, p, dtype, strided)
    out = tri.point_sample_fwd(x, coords)
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, ref.point_sample_fwd(x, coords), TOLERANCE[dtype], "point_sample")

    grad_out = torch.randn(n, channels, p, device=DEVICE).to(dtype)
    grad = tri.point_sample_bwd(grad_out, x, coords)
    assert grad.dtype == dtype and grad.is_contiguous() and grad.shape == x.shape
    assert_close(grad, ref.point_sample_bwd(grad_out, x, coords), TOLERANCE[dtype], "grad input")


def test_point_sample_public_autograd():
    _seed()
    x = torch.randn(2, 2, 6, 5, device=DEVICE, requires_grad=True)
    coords = make_coords(2, 1, [(6, 5)])  # a single point
    outs, grads = [], []
    for backend in ("triton", "reference"):
        x.grad = None
        out = mk.point_sample(x, coords, backend=backend)
        (out * torch.arange(1.0, 3.0, device=DEVICE)[None, :, None]).sum().backward()
        outs.append(out.detach())
        grads.append(x.grad.clone())
    assert_close(outs[0], outs[1], 1e-4, "point_sample")
    assert_close(grads[0], grads[1], 1e-4, "grad input")


# ----------------------------------------------------------------------------- importance sampling


def _point_keys(points: torch.Tensor) -> torch.Tensor:
    """An int64 key per fp32 (x, y) point (its two bit patterns)."""
    bits = points.float().contiguous().view(torch.int32).long()
    return (bits[..., 0] << 32) | (bits[..., 1] & 0xFFFFFFFF)


def check_importance_points(out, logits, candidates, random, k):
    """out is the reference's importance sampling up to fp32 near-ties of -|logit|.

    The chosen points are distinct candidates whose reference uncertainty equals the
    reference top-k values (in top-k order); rows without near-ties match exactly.
    """
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


@pytest.mark.parametrize("dtype", DTYPES)
def test_uncertain_point_coords(dtype):
    _seed()
    n, h, w, points = 3, 11, 13, 16
    s, k = 3 * points, int(0.75 * points)
    logits = (torch.randn(n, h, w, device=DEVICE) * 3).to(dtype)
    candidates = torch.rand(n, s, 2, device=DEVICE)
    random = torch.rand(n, points - k, 2, device=DEVICE)
    out = tri.uncertain_point_coords(logits, candidates, random, k)
    clear = check_importance_points(out, logits, candidates, random, k)
    assert clear.any(), "no row could be compared exactly (near-ties everywhere is implausible)"


def test_uncertain_point_coords_public():
    """Reproducible with a seeded generator; the same points as the reference backend."""
    _seed()
    logits = torch.randn(2, 9, 10, device=DEVICE) * 3
    seed = random.SystemRandom().randrange(2**31)

    def run(backend):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        return mk.uncertain_point_coords(logits, 20, generator=gen, backend=backend)

    out = run("triton")
    assert out.shape == (2, 20, 2) and out.dtype == torch.float32
    assert torch.equal(out, run("triton")), "same generator seed, different points"
    expected = run("reference")
    k = 15
    assert torch.equal(out[:, k:], expected[:, k:])
    u = [ref.point_sample_fwd(logits.unsqueeze(1), pts[:, :k])[:, 0].abs() for pts in (out, expected)]
    assert (u[0] - u[1]).abs().max().item() <= 1e-4


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
    (bit for bit), both with fresh draws and torch.empty poisoned; returns the gathered
    logits and the draws for further checks."""
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ("contiguous", "strided"))
def test_uncertain_point_coords_indexed(dtype, layout):
    """logits [B, Q, H, W] + (batch, query) index: the uncertainty kernel reads the matched
    masks in place and gives exactly the points of the gathered [N, H, W] copy."""
    _seed()
    out, copied, candidates, random, k = uncertain_points_indexed_vs_copied(tri, dtype, layout)
    check_importance_points(out, copied, candidates, random, k)


def test_uncertain_point_coords_indexed_int32_index():
    _seed()
    uncertain_points_indexed_vs_copied(tri, torch.float32, "contiguous", torch.int32)


def test_uncertain_point_coords_indexed_gathers_nothing():
    """The triton backend never indexes the logits (no [N, H, W] copy): aten.index is not called."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    logits, bidx, qidx = make_indexed_logits(torch.float32, "contiguous")
    candidates, random = torch.rand(5, 12, 2, device=DEVICE), torch.rand(5, 3, 2, device=DEVICE)
    with Ops() as ops:
        tri.uncertain_point_coords(logits, candidates, random, 4, bidx, qidx)
    assert not any(name.startswith("aten.index") for name in ops.seen), sorted(ops.seen)
    with Ops() as ops:  # the check sees a gather where there is one
        ref.uncertain_point_coords(logits, candidates, random, 4, bidx, qidx)
    assert any(name.startswith("aten.index") for name in ops.seen), sorted(ops.seen)


def check_uncertain_public_indexed(backend: str, dtype):
    """Public op: pred_index gives the points of logits[batch_index, query_index], bit for
    bit, from the same generator draws; N = 0 matched masks gives [0, P, 2]."""
    logits, bidx, qidx = make_indexed_logits(dtype, "contiguous")
    seed = random.SystemRandom().randrange(2**31)

    def run(x, **kw):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        return mk.uncertain_point_coords(x, 20, generator=gen, backend=backend, **kw)

    out = run(logits, pred_index=(bidx, qidx))
    assert out.shape == (5, 20, 2) and out.dtype == torch.float32
    assert torch.equal(out, run(logits[bidx, qidx])), f"seed {seed}"
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    none = run(logits, pred_index=(empty, empty))
    assert none.shape == (0, 20, 2) and none.dtype == torch.float32
    assert torch.equal(none, run(logits[empty, empty]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ("triton", "reference"))
def test_uncertain_point_coords_public_indexed(backend, dtype):
    _seed()
    check_uncertain_public_indexed(backend, dtype)


# ----------------------------------------------------------------------------- point_mask_loss


def make_loss_inputs(dtype, form, n, p, pred_hw=(10, 12), target_hw=None, target_kind="bool"):
    """(pred, target, coords, batch_index, query_index) for one loss call.

    form: 'plain' [N, Hp, Wp]; 'strided' the same, non-contiguous; 'indexed' [B, Q, Hp, Wp]
    with distinct (batch, query) pairs.
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


def check_mask_loss(dtype, pred, target, coords, bidx, qidx, num_masks):
    tol = TOLERANCE[dtype]
    bce, dice = tri.point_mask_loss_fwd(pred, target, coords, num_masks, bidx, qidx)
    ebce, edice = ref.point_mask_loss_fwd(pred, target, coords, num_masks, bidx, qidx)
    assert bce.shape == () and dice.shape == () and bce.dtype == dtype and dice.dtype == dtype
    assert rel_scalar(bce, ebce) <= tol, f"loss_bce {bce.item()} vs {ebce.item()}"
    assert rel_scalar(dice, edice) <= tol, f"loss_dice {dice.item()} vs {edice.item()}"

    gb, gd = (torch.randn((), device=DEVICE).to(dtype) for _ in range(2))
    grad = tri.point_mask_loss_bwd(gb, gd, pred, target, coords, num_masks, bidx, qidx)
    expected = ref.point_mask_loss_bwd(gb, gd, pred, target, coords, num_masks, bidx, qidx)
    assert grad.shape == pred.shape and grad.dtype == dtype and grad.is_contiguous()
    assert_close(grad, expected, tol, "grad pred")
    if bidx is not None:  # masks that were not matched get exactly zero
        untouched = torch.ones(pred.shape[:2], dtype=torch.bool, device=DEVICE)
        untouched[bidx, qidx] = False
        assert (grad[untouched] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ("plain", "strided", "indexed"))
@pytest.mark.parametrize("target_kind", TARGET_KINDS)
@pytest.mark.parametrize("target_hw", (None, (17, 9)), ids=("same_res", "other_res"))
def test_point_mask_loss(dtype, form, target_kind, target_hw):
    _seed()
    inputs = make_loss_inputs(dtype, form, n=3, p=53, target_hw=target_hw, target_kind=target_kind)
    check_mask_loss(dtype, *inputs, num_masks=4.5)


_SMALL_SIZES = [pytest.param(dtype, n, p, None, id=f"{name}-{str(dtype)[6:]}") for dtype in DTYPES
                for name, n, p in (("one_point_one_mask", 1, 1), ("one_mask", 1, 40), ("one_point", 4, 1))]


@pytest.mark.parametrize("dtype,n,p,block_k", _SMALL_SIZES + [
    pytest.param(torch.float32, 33, 9, None, id="many_masks"),
    pytest.param(torch.float32, 1, 4200, None, id="several_blocks"),
    pytest.param(torch.float32, 2, 2900, 4, id="many_blocks"),
])
@pytest.mark.parametrize("form", ("plain", "indexed"))
def test_point_mask_loss_sizes(dtype, n, p, block_k, form, monkeypatch):
    """One point / one mask; more masks than one finish step reduces (32); several point
    blocks; more point blocks than one partial-sum step reduces (the step, 64 blocks,
    lowered to 4 here to keep the interpreter fast)."""
    _seed()
    if block_k is not None:
        monkeypatch.setattr(tri, "_BLOCK_K", block_k)
        assert triton.cdiv(p, tri.LOSS_CONFIG.block_p) > 2 * block_k
    inputs = make_loss_inputs(dtype, form, n=n, p=p, pred_hw=(5, 7), target_hw=(9, 6))
    check_mask_loss(dtype, *inputs, num_masks=float(n))


@pytest.mark.parametrize("form", ("plain", "indexed"))
def test_point_mask_loss_public_autograd(form):
    _seed()
    pred, target, coords, bidx, qidx = make_loss_inputs(torch.float32, form, n=3, p=29,
                                                        target_hw=(15, 11), target_kind="uint8")
    pred.requires_grad_()
    index = None if bidx is None else (bidx, qidx)
    gb, gd = torch.randn(2).tolist()
    results = []
    for backend in ("triton", "reference"):
        pred.grad = None
        bce, dice = mk.point_mask_loss(pred, target, coords, 2.0, pred_index=index, backend=backend)
        (gb * bce + gd * dice).backward()
        results.append((bce.detach(), dice.detach(), pred.grad.clone()))
    (bce, dice, grad), (ebce, edice, egrad) = results
    assert rel_scalar(bce, ebce) <= 1e-4 and rel_scalar(dice, edice) <= 1e-4
    assert_close(grad, egrad, 1e-4, "grad pred")


def check_zero_masks(backend: str):
    """No matched mask: both losses 0, a zero gradient, no error."""
    pred = torch.randn(2, 4, 6, 5, device=DEVICE, requires_grad=True)
    target = torch.zeros(0, 8, 8, dtype=torch.bool, device=DEVICE)
    coords = torch.rand(0, 7, 2, device=DEVICE)
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    bce, dice = mk.point_mask_loss(pred, target, coords, 1.0, pred_index=(empty, empty), backend=backend)
    assert bce.item() == 0 and dice.item() == 0
    (bce + dice).backward()
    assert pred.grad is not None and (pred.grad == 0).all()


def test_point_mask_loss_zero_masks():
    check_zero_masks("triton")


# ----------------------------------------------------------------------------- pairwise_mask_cost


def check_pairwise(pred, target, coords, config=None):
    if config is None:
        bce, dice = tri.pairwise_mask_cost(pred, target, coords)
    else:
        bce, dice = tri.pairwise_mask_cost_with(pred, target, coords, config)
    ebce, edice = ref.pairwise_mask_cost(pred, target, coords)
    for out, expected, what in ((bce, ebce, "cost_bce"), (dice, edice, "cost_dice")):
        assert out.dtype == torch.float32 and out.is_contiguous()
        # fp32 sums of the same fp32 samples, whatever the pred dtype
        assert_close(out, expected, 1e-4, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target_kind", TARGET_KINDS)
def test_pairwise_mask_cost(dtype, target_kind):
    _seed()
    q, t, hp, wp, ht, wt, p = 7, 5, 10, 12, 23, 19, 150
    pred = (torch.randn(q, hp, wp, device=DEVICE) * 3).to(dtype)
    target = make_target(target_kind, t, ht, wt, padded=True)
    coords = make_coords(1, p, [(hp, wp), (ht, wt)])[0]
    check_pairwise(pred, target, coords)


@pytest.mark.parametrize("q,t,p", [(1, 1, 1), (70, 35, 130), (3, 2, 1)])
def test_pairwise_mask_cost_sizes(q, t, p):
    """A single point / mask, and Q, T across tile edges."""
    _seed()
    pred = (torch.randn(6, 5, q, device=DEVICE) * 3).permute(2, 0, 1)  # non-contiguous
    target = make_target("bool", t, 8, 9, padded=False)
    coords = make_coords(1, p, [(6, 5), (8, 9)])[0]
    check_pairwise(pred, target, coords)


_PW = tri.PairwiseConfig


@pytest.mark.parametrize("config,p,covers", [
    pytest.param(_PW(16, 16, 16, programs=1), 100, lambda splits, steps: splits == 1 and steps > 1,
                 id="one_split_many_steps"),
    pytest.param(_PW(32, 32, 16, programs=4096), 530, lambda splits, steps: splits > tri._FINISH_BLOCK_S,
                 id="more_splits_than_a_finish_step"),
    pytest.param(_PW(64, 32, 16, programs=8, precision="tf32x3"), 90, lambda splits, steps: True, id="tf32x3"),
])
def test_pairwise_mask_cost_configs(config, p, covers):
    """Launch configs the sweep may pick: a program over many point steps, more splits
    than one finish step reduces, tensor-core dots."""
    _seed()
    q, t = 19, 21
    grid, chunk = tri.pairwise_split(config, q, t, p)
    assert grid[2] * chunk >= p > (grid[2] - 1) * chunk and chunk % config.block_p == 0
    assert covers(grid[2], chunk // config.block_p)
    pred = torch.randn(q, 6, 7, device=DEVICE) * 3
    target = make_target("uint8", t, 9, 8, padded=True)
    check_pairwise(pred, target, make_coords(1, p, [(6, 7), (9, 8)])[0], config)


def test_pairwise_mask_cost_public():
    _seed()
    pred = torch.randn(4, 6, 6, device=DEVICE, dtype=torch.bfloat16) * 3
    target = torch.rand(3, 12, 12, device=DEVICE) > 0.5
    coords = torch.rand(33, 2, device=DEVICE)
    out = mk.pairwise_mask_cost(pred, target, coords, backend="triton")
    expected = mk.pairwise_mask_cost(pred, target, coords, backend="reference")
    for o, e in zip(out, expected):
        assert o.dtype == torch.float32
        assert_close(o, e, 1e-4, "cost")


# ----------------------------------------------------------------------------- launch configs

# Shared memory a program may opt into, bytes (CUDA programming guide, compute capabilities).
SMEM_LIMITS = {80: 166912, 86: 101376, 90: 232448}


def _element_bytes(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def test_pairwise_configs_fit_shared_memory():
    """Every default matcher config fits sm_80, sm_86 and sm_90 for every pred and target
    dtype, by the estimate; the estimate catches the first GPU run's failing config."""
    old = _PW(64, 32, 64, 256, 8, num_stages=3)
    assert tri.pairwise_smem_bytes(old, 4, 4) >= 239616 > SMEM_LIMITS[90]  # the GPU's number
    assert set(tri.PAIRWISE_CONFIGS) == set(DTYPES)
    for dtype, config in tri.PAIRWISE_CONFIGS.items():
        for target_bytes in (1, 2, 4):
            need = tri.pairwise_smem_bytes(config, _element_bytes(dtype), target_bytes)
            for arch, limit in SMEM_LIMITS.items():
                assert need <= limit, f"{config} for {dtype}, {target_bytes}-byte targets: {need} B > sm_{arch}'s {limit}"
        for block in (config.block_q, config.block_t, config.block_p):
            assert block >= 16 and block & (block - 1) == 0, f"{config}: tl.dot needs powers of 2 >= 16"
    for config in (tri.POINT_CONFIG, tri.LOSS_CONFIG):
        assert config.block_p & (config.block_p - 1) == 0


ROOT = pathlib.Path(__file__).resolve().parents[1]  # scripts/ (a namespace package) lives here

# Runs in a fresh interpreter without TRITON_INTERPRET (this process's kernels are
# interpreted, not JITFunctions): scripts/triton_aot_dump.py records the launches that the
# real backend wrapper makes on CPU tensors, so each compile request carries the
# specialisation of a GPU launch (pointer dtypes, bool targets as u8, unit strides as
# constexpr 1, 16-divisible ints, num_warps / num_stages), not a hand-written signature.
_COMPILE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import scripts.triton_aot_dump as aot  # first: it unsets TRITON_INTERPRET before any kernel exists
import torch
from m2f_kernels.triton import point_loss as pl

launches = {}


def matcher_calls():
    # the matcher's call per image at the DESIGN.md shape: pred [Q=100, 256, 256] in each
    # dtype of the config table, 30 bool targets at 1024^2 (and fp32 targets, the largest
    # gathered tiles, for fp32 pred), P = 12544 shared points
    q, t, hp, ht, p = 100, 30, 256, 1024, 12544
    coords = torch.empty(p, 2)
    for dtype, config in pl.PAIRWISE_CONFIGS.items():
        for target_dtype in (torch.bool, torch.float32) if dtype == torch.float32 else (torch.bool,):
            name = f"{dtype}-{target_dtype}".replace("torch.", "")
            pred, target = torch.empty(q, hp, hp, dtype=dtype), torch.empty(t, ht, ht, dtype=target_dtype)
            launches["_pairwise_partial_kernel." + name] = {
                "config": repr(config), "num_warps": config.num_warps, "num_stages": config.num_stages,
                "estimate": pl.pairwise_smem_bytes(config, pred.element_size(), target.element_size())}
            with aot.tag(name):
                pl.pairwise_mask_cost(pred, target, coords)


results = aot.compile_launches([matcher_calls], json.loads(sys.argv[2]), kernels={"_pairwise_partial_kernel"}, jobs=2)
print(json.dumps([dict(r, **launches[r["name"]]) for r in results]))
"""


@pytest.mark.slow
def test_pairwise_default_compiles_within_shared_memory():
    """Compile the default matcher kernel for sm_80 and sm_90 (no GPU needed) exactly as the
    matcher launches it (scripts/triton_aot_dump.py; every pred dtype with bool targets, fp32
    pred with fp32 targets): shared memory within the estimate and the limit, and no
    register spills (the first GPU run's config spilled 2.6 KB per thread)."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    archs = (80, 90)
    run = subprocess.run([sys.executable, "-c", _COMPILE, str(ROOT), json.dumps(archs)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    # one compile per (pred dtype, target dtype, arch): a recorder that caught nothing fails here
    assert len(results) == (len(tri.PAIRWISE_CONFIGS) + 1) * len(archs), [r["name"] for r in results]
    for r in results:
        what = f"{r['name']} ({r['config']}) on sm_{r['arch']}"
        res, limit = r["resources"], SMEM_LIMITS[r["arch"]]
        assert (r["options"]["num_warps"], r["options"]["num_stages"]) == (r["num_warps"], r["num_stages"]), what
        assert 0 < res["shared"] <= r["estimate"] <= limit, \
            f"{what}: {res['shared']} B shared, estimate {r['estimate']}, limit {limit}"
        if "regs" in res:  # cuobjdump ships with Triton's NVIDIA backend
            assert res["stack"] == 0 and res["local"] == 0, \
                f"{what} spills registers: {res['regs']} registers, {res['stack']} B stack, {res['local']} B local"


# ----------------------------------------------------------------------------- standard shapes (GPU)


def standard_case(dtype):
    """DESIGN.md point-loss shapes: pred [B=2, Q=100, 256, 256] in ``dtype``, 30 blobby bool
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


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_standard_shapes_gpu(dtype):
    """DESIGN.md point-loss shapes: B=2, Q=100, pred 256^2, 30 targets per image at 1024^2,
    P=12544: the matcher cost per image, importance sampling and the loss on 60 matches."""
    _seed()
    case = standard_case(dtype)
    for i in range(case.b):
        check_pairwise(case.pred[i], case.target[i * case.t:(i + 1) * case.t], torch.rand(case.p, 2, device=DEVICE))
    logits = case.pred[case.bidx, case.qidx]
    coords = tri.uncertain_point_coords(logits, case.candidates, case.random, case.k)
    check_importance_points(coords, logits, case.candidates, case.random, case.k)
    indexed = tri.uncertain_point_coords(case.pred, case.candidates, case.random, case.k, case.bidx, case.qidx)
    assert torch.equal(indexed, coords)

    num_masks = float(case.b * case.t)
    check_mask_loss(dtype, case.pred, case.target, coords, case.bidx, case.qidx, num_masks=num_masks)
    check_mask_loss(dtype, logits, case.target, coords, None, None, num_masks=num_masks)

"""The ``cuda`` backend's point-loss ops (csrc/point_loss) against the reference backend.

point_sample, uncertain_point_coords, point_mask_loss and pairwise_mask_cost through the
public ops with backend="cuda" (and autograd where differentiable), on fresh random inputs
(the seed is printed): every pred dtype, points on borders, corners and outside the maps,
targets of another resolution, bool/uint8/float targets, the pred_index form, one point,
one mask, and the standard Mask2Former shapes once. GPU-only: every test skips with the
reason without a built extension and a CUDA GPU.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import m2f_kernels as mk
from m2f_kernels import _dispatch
from m2f_kernels import reference as ref
from .conftest import DEVICE, TOLERANCE, assert_close, poisoned_empty, requires_cuda_backend
from .test_point_loss_triton import (
    DTYPES, TARGET_KINDS, _seed, check_importance_points, check_uncertain_public_indexed, check_zero_masks,
    make_coords, make_loss_inputs, make_point_sample_inputs, make_target, rel_scalar, standard_case,
    uncertain_points_indexed_vs_copied,
)


pytestmark = requires_cuda_backend


def cuda_backend():
    import m2f_kernels.cuda

    return m2f_kernels.cuda


def test_dispatcher_sees_point_loss_ops():
    dev = torch.device("cuda")
    for op in ("point_sample", "uncertain_point_coords", "point_mask_loss", "pairwise_mask_cost"):
        for dtype in DTYPES:
            assert _dispatch._why_not("cuda", op, dev, dtype) is None, op


# ----------------------------------------------------------------------------- point_sample


def _point_sample_api(backend, x, coords, weights):
    """(out, grad input) of the public op for the loss sum(out * weights)."""
    x = x.detach().requires_grad_()
    with poisoned_empty() if backend == "cuda" else contextlib.nullcontext():
        out = mk.point_sample(x, coords, backend=backend)
        (out.float() * weights).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels,strided,p", [(1, False, 41), (3, True, 57), (2, False, 1)])
def test_point_sample(dtype, channels, strided, p):
    seed = _seed()
    n, h, w = 3, 7, 9
    x, coords = make_point_sample_inputs(n, channels, h, w, p, dtype, strided)
    weights = torch.randn(n, channels, p, device=DEVICE)
    out, grad = _point_sample_api("cuda", x, coords, weights)
    eout, egrad = _point_sample_api("reference", x, coords, weights)
    assert out.dtype == dtype and out.shape == (n, channels, p) and out.is_contiguous()
    assert grad.dtype == dtype and grad.shape == x.shape
    assert_close(out, eout, TOLERANCE[dtype], f"point_sample (seed {seed})")
    assert_close(grad, egrad, TOLERANCE[dtype], f"grad input (seed {seed})")


# ----------------------------------------------------------------------------- importance sampling


@pytest.mark.parametrize("dtype", DTYPES)
def test_uncertain_point_coords_given_draws(dtype):
    """The same candidates / random points give the reference's points."""
    seed = _seed()
    n, h, w, points = 3, 11, 13, 16
    s, k = 3 * points, int(0.75 * points)
    logits = (torch.randn(n, h, w, device=DEVICE) * 3).to(dtype)
    candidates = torch.rand(n, s, 2, device=DEVICE)
    random = torch.rand(n, points - k, 2, device=DEVICE)
    with poisoned_empty():
        out = cuda_backend().uncertain_point_coords(logits, candidates, random, k)
    clear = check_importance_points(out, logits, candidates, random, k)
    assert clear.any(), f"no row could be compared exactly (seed {seed})"


@pytest.mark.parametrize("dtype", DTYPES)
def test_uncertain_point_coords_public(dtype):
    """Public op, seeded generator: reproducible, the reference's random points and uncertainties."""
    _seed()
    logits = (torch.randn(2, 9, 10, device=DEVICE) * 3).to(dtype)
    gen_seed = int(torch.randint(0, 2**31, ()).item())

    def run(backend):
        gen = torch.Generator(device=DEVICE).manual_seed(gen_seed)
        return mk.uncertain_point_coords(logits, 20, generator=gen, backend=backend)

    out = run("cuda")
    assert out.shape == (2, 20, 2) and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out, run("cuda")), "same generator seed, different points"
    expected = run("reference")
    k = 15
    assert torch.equal(out[:, k:], expected[:, k:])
    u = [ref.point_sample_fwd(logits.float().unsqueeze(1), pts[:, :k])[:, 0].abs() for pts in (out, expected)]
    assert (u[0] - u[1]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ("contiguous", "strided"))
def test_uncertain_point_coords_indexed(dtype, layout):
    """logits [B, Q, H, W] + (batch, query) index (repeated, out of order; the wrapper
    gathers them for the 3-D C++ op): the points of the gathered copy, bit for bit."""
    seed = _seed()
    out, copied, candidates, random, k = uncertain_points_indexed_vs_copied(cuda_backend(), dtype, layout)
    clear = check_importance_points(out, copied, candidates, random, k)
    assert clear.any(), f"no row could be compared exactly (seed {seed})"


@pytest.mark.parametrize("dtype", DTYPES)
def test_uncertain_point_coords_public_indexed(dtype):
    """Public op with pred_index: the points of logits[batch_index, query_index]; N = 0."""
    _seed()
    check_uncertain_public_indexed("cuda", dtype)


# ----------------------------------------------------------------------------- point_mask_loss


def _loss_api(backend, pred, target, coords, bidx, qidx, num_masks, gb, gd):
    """(loss_bce, loss_dice, grad pred) of the public op for gb * bce + gd * dice."""
    pred = pred.detach().requires_grad_()
    index = None if bidx is None else (bidx, qidx)
    bce, dice = mk.point_mask_loss(pred, target, coords, num_masks, pred_index=index, backend=backend)
    (grad,) = torch.autograd.grad(gb * bce + gd * dice, pred)
    return bce.detach(), dice.detach(), grad


def check_loss(dtype, pred, target, coords, bidx, qidx, num_masks, seed):
    tol = TOLERANCE[dtype]
    gb, gd = torch.randn(2).tolist()
    with poisoned_empty():
        bce, dice, grad = _loss_api("cuda", pred, target, coords, bidx, qidx, num_masks, gb, gd)
    ebce, edice, egrad = _loss_api("reference", pred, target, coords, bidx, qidx, num_masks, gb, gd)
    assert bce.shape == () and dice.shape == () and bce.dtype == dtype and dice.dtype == dtype
    assert rel_scalar(bce, ebce) <= tol, f"loss_bce {bce.item()} vs {ebce.item()} (seed {seed})"
    assert rel_scalar(dice, edice) <= tol, f"loss_dice {dice.item()} vs {edice.item()} (seed {seed})"
    assert grad.shape == pred.shape and grad.dtype == dtype
    assert_close(grad, egrad, tol, f"grad pred (seed {seed})")
    if bidx is not None:  # masks that were not matched get exactly zero
        untouched = torch.ones(pred.shape[:2], dtype=torch.bool, device=DEVICE)
        untouched[bidx, qidx] = False
        assert (grad[untouched] == 0).all(), f"gradient outside the matched masks (seed {seed})"
    # deterministic forward: bitwise the same twice
    again = mk.point_mask_loss(pred, target, coords, num_masks,
                               pred_index=None if bidx is None else (bidx, qidx), backend="cuda")
    assert torch.equal(again[0], bce) and torch.equal(again[1], dice), "forward is not deterministic"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ("plain", "strided", "indexed"))
@pytest.mark.parametrize("target_kind", TARGET_KINDS)
@pytest.mark.parametrize("target_hw", (None, (17, 9)), ids=("same_res", "other_res"))
def test_point_mask_loss(dtype, form, target_kind, target_hw):
    seed = _seed()
    inputs = make_loss_inputs(dtype, form, n=3, p=53, target_hw=target_hw, target_kind=target_kind)
    check_loss(dtype, *inputs, num_masks=4.5, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,p", [(1, 1), (1, 40), (4, 1), (33, 9), (1, 4200), (2, 2900)],
                         ids=["one_point_one_mask", "one_mask", "one_point", "many_masks", "several_blocks",
                              "many_blocks"])
@pytest.mark.parametrize("form", ("plain", "indexed"))
def test_point_mask_loss_sizes(dtype, n, p, form):
    seed = _seed()
    inputs = make_loss_inputs(dtype, form, n=n, p=p, pred_hw=(5, 7), target_hw=(9, 6))
    check_loss(dtype, *inputs, num_masks=float(n), seed=seed)


def test_point_mask_loss_int32_index():
    seed = _seed()
    pred, target, coords, bidx, qidx = make_loss_inputs(torch.float32, "indexed", n=4, p=30, target_kind="uint8")
    check_loss(torch.float32, pred, target, coords, bidx.int(), qidx.int(), num_masks=3.0, seed=seed)


def test_point_mask_loss_zero_masks():
    check_zero_masks("cuda")


# ----------------------------------------------------------------------------- pairwise_mask_cost


def check_pairwise(pred, target, coords, seed):
    with poisoned_empty():
        bce, dice = mk.pairwise_mask_cost(pred, target, coords, backend="cuda")
    ebce, edice = mk.pairwise_mask_cost(pred, target, coords, backend="reference")
    for out, expected, what in ((bce, ebce, "cost_bce"), (dice, edice, "cost_dice")):
        assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == expected.shape
        # fp32 sums of the same fp32 samples, whatever the pred dtype
        assert_close(out, expected, 1e-4, f"{what} (seed {seed})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target_kind", TARGET_KINDS)
def test_pairwise_mask_cost(dtype, target_kind):
    seed = _seed()
    q, t, hp, wp, ht, wt, p = 7, 5, 10, 12, 23, 19, 150
    pred = (torch.randn(q, hp, wp, device=DEVICE) * 3).to(dtype)
    target = make_target(target_kind, t, ht, wt, padded=True)
    coords = make_coords(1, p, [(hp, wp), (ht, wt)])[0]
    check_pairwise(pred, target, coords, seed)


@pytest.mark.parametrize("q,t,p", [(1, 1, 1), (70, 35, 130), (3, 2, 1), (17, 16, 33)])
def test_pairwise_mask_cost_sizes(q, t, p):
    """A single point / mask, and Q, T, P across the 16-wide tile edges; non-contiguous pred."""
    seed = _seed()
    pred = (torch.randn(6, 5, q, device=DEVICE) * 3).permute(2, 0, 1)
    target = make_target("bool", t, 8, 9, padded=False)
    coords = make_coords(1, p, [(6, 5), (8, 9)])[0]
    check_pairwise(pred, target, coords, seed)


# ----------------------------------------------------------------------------- standard shapes


def test_standard_shapes():
    """DESIGN.md point-loss shapes (fp32): B=2, Q=100, pred 256^2, 30 targets per image at
    1024^2, P=12544: the matcher cost per image, importance sampling and the loss on 60 matches."""
    seed = _seed()
    case = standard_case(torch.float32)
    for i in range(case.b):
        check_pairwise(case.pred[i], case.target[i * case.t:(i + 1) * case.t],
                       torch.rand(case.p, 2, device=DEVICE), seed)
    logits = case.pred[case.bidx, case.qidx]
    coords = cuda_backend().uncertain_point_coords(logits, case.candidates, case.random, case.k)
    check_importance_points(coords, logits, case.candidates, case.random, case.k)
    indexed = cuda_backend().uncertain_point_coords(case.pred, case.candidates, case.random, case.k,
                                                    case.bidx, case.qidx)
    assert torch.equal(indexed, coords)

    num_masks = float(case.b * case.t)
    check_loss(torch.float32, case.pred, case.target, coords, case.bidx, case.qidx, num_masks=num_masks, seed=seed)
    check_loss(torch.float32, logits, case.target, coords, None, None, num_masks=num_masks, seed=seed)

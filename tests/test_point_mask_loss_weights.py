"""point_mask_loss with per-mask weights and a tensor num_masks (the static-shape criterion)."""
from __future__ import annotations

import pytest
import torch

import m2f_kernels as mk

from .conftest import ALL_BACKENDS, KERNEL_BACKENDS, ON_GPU, rel_err

DEVICE = "cuda" if ON_GPU else "cpu"
BACKENDS = ALL_BACKENDS  # cuda on a GPU, cuda-emulated (its kernels on the CPU) elsewhere


def _inputs(dtype=torch.float32):
    pred = torch.randn(2, 5, 9, 11, device=DEVICE, dtype=dtype)
    target = torch.rand(4, 13, 10, device=DEVICE) > 0.5
    coords = torch.rand(4, 33, 2, device=DEVICE)
    index = (torch.tensor([0, 1, 1, 0], device=DEVICE), torch.tensor([3, 0, 2, 1], device=DEVICE))
    return pred, target, coords, index


def _loss_and_grad(pred, *args, **kwargs):
    leaf = pred.detach().clone().requires_grad_()
    bce, dice = mk.point_mask_loss(leaf, *args, **kwargs)
    (2 * bce + 3 * dice).backward()
    return torch.stack([bce, dice]).detach(), leaf.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_equals_dropping_the_mask(backend):
    seed = torch.seed()
    pred, target, coords, (bi, qi) = _inputs()
    weight = torch.tensor([1.0, 0.0, 2.5, 1.0], device=DEVICE)
    keep = torch.tensor([0, 2, 3], device=DEVICE)
    got = _loss_and_grad(pred, target, coords, 3.0, pred_index=(bi, qi), mask_weight=weight, backend=backend)
    # weight 2.5 on mask 2 == mask 2 counted 2.5 times: check against the reference's linear combination
    parts = [_loss_and_grad(pred, target[[i]], coords[[i]], 3.0, pred_index=(bi[[i]], qi[[i]]), backend="reference")
             for i in keep.tolist()]
    want_losses = parts[0][0] + 2.5 * parts[1][0] + parts[2][0]
    want_grad = parts[0][1] + 2.5 * parts[1][1] + parts[2][1]
    assert rel_err(got[0], want_losses) < 1e-5, seed
    assert rel_err(got[1], want_grad) < 1e-5, seed


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_num_masks_equals_the_number(backend):
    seed = torch.seed()
    pred, target, coords, index = _inputs()
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0], device=DEVICE)
    got = _loss_and_grad(pred, target, coords, torch.tensor(3.5, device=DEVICE), pred_index=index,
                         mask_weight=weight, backend=backend)
    want = _loss_and_grad(pred, target, coords, 3.5, pred_index=index, mask_weight=weight, backend="reference")
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1], want[1]) < 1e-5, seed
    unweighted = _loss_and_grad(pred, target, coords, torch.tensor(2.0, device=DEVICE), pred_index=index,
                                backend=backend)
    plain = _loss_and_grad(pred, target, coords, 2.0, pred_index=index, backend="reference")
    assert rel_err(unweighted[0], plain[0]) < 1e-5 and rel_err(unweighted[1], plain[1]) < 1e-5, seed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_weights_in_16bit(backend, dtype):
    seed = torch.seed()
    pred, target, coords, index = _inputs(dtype)
    weight = torch.rand(4, device=DEVICE)
    got = _loss_and_grad(pred, target, coords, 2.0, pred_index=index, mask_weight=weight, backend=backend)
    want = _loss_and_grad(pred.double(), target, coords.double(), 2.0, pred_index=index,
                          mask_weight=weight.double(), backend="reference")
    assert rel_err(got[0], want[0]) < 1e-2 and rel_err(got[1], want[1]) < 1e-2, seed


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_weights_without_index(backend):
    """Plain [N, Hp, Wp] pred, weights with a NaN-free zero and a negative factor."""
    seed = torch.seed()
    pred, target, coords = torch.randn(4, 9, 11, device=DEVICE), torch.rand(4, 13, 10, device=DEVICE), \
        torch.rand(4, 33, 2, device=DEVICE)
    weight = torch.tensor([0.5, 0.0, -1.0, 3.0], device=DEVICE)
    got = _loss_and_grad(pred, target, coords, 2.5, mask_weight=weight, backend=backend)
    want = _loss_and_grad(pred, target, coords, 2.5, mask_weight=weight, backend="reference")
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1], want[1]) < 1e-5, seed


def test_weight_and_num_masks_checks():
    pred, target, coords, index = _inputs()
    with pytest.raises(ValueError, match="mask_weight"):
        mk.point_mask_loss(pred, target, coords, 1.0, pred_index=index, mask_weight=torch.ones(3, device=DEVICE))
    with pytest.raises(TypeError, match="mask_weight"):
        mk.point_mask_loss(pred, target, coords, 1.0, pred_index=index,
                           mask_weight=torch.ones(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="num_masks"):
        mk.point_mask_loss(pred, target, coords, torch.ones(2, device=DEVICE), pred_index=index)
    leaf = torch.ones(4, device=DEVICE, requires_grad=True)
    bce, _ = mk.point_mask_loss(pred.requires_grad_(), target, coords, 1.0, pred_index=index, mask_weight=leaf)
    assert leaf.grad is None and bce.grad_fn is not None  # weights are taken as constants (detached)


def test_weighted_op_passes_opcheck():
    pred, target, coords, (bi, qi) = _inputs(torch.float64)
    pred.requires_grad_()
    torch.library.opcheck(torch.ops.m2f_kernels.point_mask_loss.default,
                          (pred, target, coords.double(), 1.0, bi, qi, torch.rand(4, device=DEVICE), "reference"))

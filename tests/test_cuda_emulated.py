"""The CUDA kernels on the CPU (tests/cuda_emulation): the emulation itself, and what the
op tests' ``cuda-emulated`` parameters do not cover.

The op tests (test_op_*.py, test_nonfinite.py, test_assignment.py, test_fuzz.py,
test_point_mask_loss_weights.py) and the tiny model (test_m2f_equivalence.py) run the cuda
backend's kernels under the emulation against the reference. Here: every kernel whose result the
docs call deterministic gives bitwise the same result whatever order its threads and blocks
run in (a result that moves with the order reads another thread's write without a barrier
between: a race on a GPU); every TORCH_CHECK of the launch code raises as on the GPU; and
the emulation catches what it is there to catch (unsynchronised reads, divergent barriers,
partial-warp shuffles).
"""
from __future__ import annotations

import pytest
import torch

from . import cuda_emulation
from ._inputs import make_coords, make_deform_inputs, make_loss_inputs, make_mask, make_qkv
from .conftest import EMULATION_ORDERS, requires_cuda_emulation
from .test_cuda_extension_errors import CASES as ERROR_CASES

pytestmark = requires_cuda_emulation


@pytest.fixture(scope="module")
def emu():
    return cuda_emulation.load()


def in_every_order(fn, seed):
    """fn() under each order of the emulated threads and blocks (allocations NaN-filled);
    asserts the results are bitwise equal and returns them."""
    results = []
    for name in EMULATION_ORDERS:
        with cuda_emulation.order(name, seed), cuda_emulation.filled_allocations():
            out = fn()
        results.append(out if isinstance(out, tuple) else (out,))
    for name, result in zip(EMULATION_ORDERS[1:], results[1:]):
        for i, (a, b) in enumerate(zip(results[0], result)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"output {i}, ascending vs {name} order: {m}")
    return results[0]


# ============================================================================ the emulation


def test_an_unsynchronised_read_changes_with_the_order(emu):
    """Each thread writes its slot and reads its neighbour's (t + 1, the last thread slot 0):
    without the barrier between, the ascending order reads slots before their writes, the
    descending after them, except the last thread's."""
    expected = (torch.arange(64, dtype=torch.int32) + 1).roll(-1)
    with cuda_emulation.order("ascending"):
        racy_ascending = emu.emulation_self_test("racy_neighbour")[:64]
        synced_ascending = emu.emulation_self_test("neighbour")[:64]
    with cuda_emulation.order("descending"):
        racy_descending = emu.emulation_self_test("racy_neighbour")[:64]
        synced_descending = emu.emulation_self_test("neighbour")[:64]
    assert torch.equal(synced_ascending, expected) and torch.equal(synced_descending, expected)
    # dynamic shared memory starts as 0xff bytes: -1 where a slot is read before its write
    assert (racy_ascending[:-1] == -1).all() and racy_ascending[-1] == expected[-1]
    assert torch.equal(racy_descending[:-1], expected[:-1]) and racy_descending[-1] == -1


def test_static_shared_memory_is_poisoned_per_block(emu):
    """Block 0 writes a static __shared__ array; block 1 reads it without writing: 0xff bytes."""
    with cuda_emulation.order("ascending"):
        out = emu.emulation_self_test("static_shared")
    assert torch.equal(out[:64], torch.arange(64, dtype=torch.int32) + 1) and (out[64:] == -1).all()


def test_warp_collectives(emu):
    t = torch.arange(64, dtype=torch.int32)
    assert torch.equal(emu.emulation_self_test("shuffle")[:64], (t ^ 5) + 100 * (t // 32 == 1))


@pytest.mark.parametrize("kernel,message", [
    ("divergent_barrier", "32 threads wait at __syncthreads, 32 have exited"),
    ("half_warp_shuffle", "32 have exited, 32 wait at warp collectives"),
])
def test_divergence_raises(emu, kernel, message):
    with pytest.raises(RuntimeError, match="divergent barrier or incomplete warp collective") as info:
        emu.emulation_self_test(kernel)
    assert message in str(info.value)


def test_launches_are_counted(emu):
    before = emu.emulation_launches()
    emu.linear_sum_assignment(torch.rand(2, 5, 4), torch.tensor([4, 2]))
    assert emu.emulation_launches() == before + 1


@pytest.mark.parametrize("name", [n for n in ERROR_CASES if n.startswith("m2f_kernels_C.")])
def test_launch_code_checks_raise(emu, name):
    """The TORCH_CHECKs test_cuda_extension_errors trips on a GPU, on CPU tensors here."""
    args, fragment = ERROR_CASES[name]

    def z(*shape, dtype=torch.float32):
        return torch.zeros(shape, dtype=dtype)

    with pytest.raises(RuntimeError) as info:
        getattr(emu, name.split(".")[1])(*eval(f"({args},)"))
    assert fragment in str(info.value)


# ============================================================================ order independence


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind,per_head", [("bool", False), ("logits", True)])
def test_masked_attention_is_order_independent(emu, dtype, mask_kind, per_head, seed):
    B, H, Q, N, D = 2, 2, 19, 70, 32
    q, k, v = (t.detach() for t in make_qkv(B, H, Q, N, D, dtype, device="cpu"))
    mask = make_mask(B, H, Q, N, mask_kind, per_head, device="cpu")
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    grad_out = torch.randn(B, H, Q, D).to(dtype)

    def run():
        out, lse = emu.masked_attention_fwd(q, k, v, mask, D ** -0.5)
        return (out, lse) + tuple(emu.masked_attention_bwd(grad_out, q, k, v, mask, out, lse, D ** -0.5))
    in_every_order(run, seed)


@pytest.mark.parametrize("softmax", [False, True], ids=["weights", "softmax"])
def test_ms_deform_attn_is_order_independent(emu, softmax, seed):
    """The forward, and the deterministic backward's fixed-point grad_value sums."""
    value, shapes, starts, loc, w, grad_out = make_deform_inputs([(6, 5), (3, 4)], b=2, lq=9, h=2, d=16, p=3,
                                                                 softmax=softmax)

    def run():
        out = emu.ms_deform_attn_fwd(value, shapes, starts, loc, w, softmax)
        return (out,) + tuple(emu.ms_deform_attn_bwd(grad_out, value, shapes, starts, loc, w, softmax, True))
    in_every_order(run, seed)


@pytest.mark.parametrize("form", ["plain", "indexed"])
def test_point_loss_ops_are_order_independent(emu, form, seed):
    """point_mask_loss's forward (per-block partials, fixed-order finish), point_sample's
    forward, pairwise_mask_cost and uncertain_point_coords."""
    pred, target, coords, bidx, qidx = make_loss_inputs(torch.float32, form, 5, 300, target_hw=(13, 11))
    target = target.view(torch.uint8)
    weight = torch.rand(5)
    maps = torch.randn(3, 4, 9, 10)
    sample_coords = make_coords(3, 40, [(9, 10)], device="cpu")
    logits = torch.randn(4, 9, 10)
    candidates, random = torch.rand(4, 48, 2), torch.rand(4, 4, 2)

    def run():
        return (emu.point_mask_loss_fwd(pred, target, coords, 5.0, bidx, qidx, weight)
                + (emu.point_sample_fwd(maps, sample_coords),)
                + emu.pairwise_mask_cost(maps[:, 0], target[:4], coords[0])
                + (emu.uncertain_point_coords(logits, candidates, random, 12),))
    in_every_order(run, seed)

"""linear_sum_assignment backends against scipy.optimize.linear_sum_assignment.

Each backend function (``m2f_kernels.<backend>.assignment.linear_sum_assignment``) runs on
the same cases: random, integer-valued (many ties), constant, square, T = 0, Q = 0, more
targets than queries, padded columns (holding garbage), ±inf, NaN, every floating dtype.
A result must be a valid assignment (distinct queries, -1 exactly on padding and on the
targets a wide matrix leaves unmatched) whose total cost is scipy's within 1e-6 relative;
ties may pick another optimum. With ±inf the documented rule is checked: the same
(number of +inf pairs - number of -inf pairs) as scipy on the matrix with ±inf -> ±P,
and the same finite cost.

The reference runs twice: with its CPU early exits and compaction (``early``) and with the
fixed-length masked loops it uses off the CPU (``masked``, on the GPU when there is one).
"""
from __future__ import annotations

import pytest
import torch

from . import cuda_emulation
from .conftest import ON_GPU, op_module, requires_cuda_backend, requires_cuda_emulation, requires_gpu

scipy_optimize = pytest.importorskip("scipy.optimize", reason="scipy is the reference optimum of these tests")

SOLVERS = [
    pytest.param("reference-early", id="reference-early"),
    pytest.param("reference-masked", id="reference-masked"),
    pytest.param("cuda", id="cuda", marks=requires_cuda_backend),
    pytest.param("cuda-emulated", id="cuda-emulated", marks=requires_cuda_emulation),
]
REL_TOL = 1e-6


def solve(solver: str, cost: torch.Tensor, num_targets: torch.Tensor) -> torch.Tensor:
    """Run one backend; the result comes back on the CPU after the device checks."""
    if solver == "cuda":
        device = torch.device("cuda")
        out = op_module("cuda", "assignment").linear_sum_assignment(cost.to(device), num_targets.to(device))
    elif solver == "cuda-emulated":  # the kernel on the CPU, called as the cuda backend calls it
        device = torch.device("cpu")
        out = cuda_emulation.load().linear_sum_assignment(cost.contiguous(), num_targets.to(torch.int64).contiguous())
    else:
        early = solver == "reference-early"
        device = torch.device("cpu" if early else ("cuda" if ON_GPU else "cpu"))
        out = op_module("reference", "assignment").linear_sum_assignment(
            cost.to(device), num_targets.to(device), early_exit=early)
    assert out.device.type == device.type
    assert out.dtype == torch.int64
    assert out.shape == (cost.shape[0], cost.shape[2])
    return out.cpu()


# --- the expected optimum ------------------------------------------------------------------------

def _penalty(c: torch.Tensor, n: int) -> float:
    """The documented ±inf stand-in P = (2n + 1) * max finite |c| (1 when that is 0)."""
    finite = c[torch.isfinite(c)]
    f = float(finite.abs().max()) if finite.numel() else 0.0
    return (2 * n + 1) * f if f > 0 else 1.0


def _score(c: torch.Tensor, rows, cols):
    """(number of +inf pairs - number of -inf pairs, finite cost) of pairs (rows, cols) of c."""
    vals = c[torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)]
    k = int((vals == float("inf")).sum()) - int((vals == float("-inf")).sum())
    return k, float(vals[torch.isfinite(vals)].sum())


def check(cost: torch.Tensor, num_targets: torch.Tensor, out: torch.Tensor) -> None:
    """out is a valid assignment with scipy's optimum for every matrix."""
    B, Q, T = cost.shape
    c64 = cost.double().nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    for b in range(B):
        n = min(max(int(num_targets[b]), 0), T)
        a = out[b]
        assert (a[n:] == -1).all(), f"matrix {b}: padded targets must get -1, got {a[n:].tolist()}"
        matched = a[:n] >= 0
        assert int(matched.sum()) == min(n, Q), f"matrix {b}: {int(matched.sum())} matched, expected {min(n, Q)}"
        assert ((a[:n] >= -1) & (a[:n] < Q)).all(), f"matrix {b}: query index out of range: {a[:n].tolist()}"
        rows = a[:n][matched]
        assert rows.unique().numel() == rows.numel(), f"matrix {b}: a query matched twice: {rows.tolist()}"
        if n == 0 or Q == 0:
            continue
        c = c64[b, :, :n]
        got = _score(c, rows, matched.nonzero()[:, 0])
        p = _penalty(c, min(n, Q))
        stand_in = torch.where(c == float("inf"), p, torch.where(c == float("-inf"), -p, c))
        r, k = scipy_optimize.linear_sum_assignment(stand_in.numpy())
        want = _score(c, r, k)
        assert got[0] == want[0], f"matrix {b}: (+inf - -inf) pairs {got[0]}, the optimum has {want[0]}"
        finite = c[torch.isfinite(c)]
        scale = max(abs(want[1]), float(finite.abs().max()) if finite.numel() else 0.0, 1e-300)
        assert abs(got[1] - want[1]) <= REL_TOL * scale, (
            f"matrix {b}: total cost {got[1]!r}, scipy's optimum {want[1]!r}")


# --- cases ---------------------------------------------------------------------------------------

def _counts(B, T, low=0, gen=None):
    return torch.randint(low, T + 1, (B,), generator=gen)


def _random(B, Q, T, padded=True):
    cost = torch.rand(B, Q, T)
    return cost, _counts(B, T) if padded else torch.full((B,), T)


def _integer(B, Q, T, high):
    return torch.randint(0, high, (B, Q, T)).float(), _counts(B, T)


def _constant(B, Q, T):
    return torch.full((B, Q, T), 0.5), _counts(B, T)


def _padding_garbage():
    cost, nt = _random(60, 10, 14)
    pad = torch.arange(14) >= nt[:, None]
    garbage = torch.tensor([float("nan"), float("-inf"), float("inf"), -1e30])[torch.randint(0, 4, (60, 10, 14))]
    return torch.where(pad[:, None, :], garbage, cost), nt


def _with(cost_nt, value, fraction):
    cost, nt = cost_nt
    return cost.masked_fill(torch.rand(cost.shape) < fraction, value), nt


def _infeasible():
    """Some targets' columns entirely +inf, some queries' rows entirely +inf."""
    cost, nt = _random(40, 8, 6, padded=False)
    cost[::2, :, 0] = float("inf")
    cost[1::3, :5, :] = float("inf")
    return cost, nt


CASES = {
    "random": lambda: _random(200, 20, 10),
    "random_square": lambda: _random(100, 16, 16, padded=False),
    "random_wide": lambda: _random(100, 8, 16),                 # T_b > Q and T_b <= Q mixed
    "random_all_wide": lambda: (torch.rand(50, 5, 12), torch.randint(6, 13, (50,))),
    "negative": lambda: (torch.randn(100, 12, 9), _counts(100, 9)),
    "integer_ties": lambda: _integer(200, 12, 12, 4),
    "integer_wide": lambda: _integer(100, 6, 12, 3),
    "binary": lambda: _integer(100, 15, 10, 2),
    "constant": lambda: _constant(20, 10, 7),
    "constant_wide": lambda: _constant(20, 7, 10),
    "one_by_one": lambda: _random(10, 1, 1),
    "one_query": lambda: _random(20, 1, 6),
    "one_target": lambda: _random(20, 6, 1),
    "t_zero": lambda: (torch.rand(5, 10, 0), torch.zeros(5, dtype=torch.int64)),
    "q_zero": lambda: (torch.rand(4, 0, 5), torch.full((4,), 5)),
    "b_zero": lambda: (torch.rand(0, 5, 5), torch.zeros(0, dtype=torch.int64)),
    "no_valid_targets": lambda: (torch.rand(6, 5, 4), torch.zeros(6, dtype=torch.int64)),
    "counts_clamped": lambda: (torch.rand(6, 5, 4), torch.tensor([-3, 0, 2, 4, 5, 100])),
    "scaled_up": lambda: (torch.rand(50, 10, 8) * 1e6 + 1e7, _counts(50, 8)),
    "scaled_down": lambda: (torch.rand(50, 10, 8) * 1e-6, _counts(50, 8)),
    "padding_garbage": _padding_garbage,
    "plus_inf": lambda: _with(_random(100, 10, 6), float("inf"), 0.3),
    "plus_inf_wide": lambda: _with(_random(60, 6, 10), float("inf"), 0.3),
    "infeasible": _infeasible,
    "all_inf": lambda: (torch.full((5, 4, 3), float("inf")), _counts(5, 3)),
    "minus_inf": lambda: _with(_random(100, 10, 6), float("-inf"), 0.1),
    "both_inf": lambda: _with(_with(_random(100, 10, 8), float("inf"), 0.3), float("-inf"), 0.1),
    "fp64": lambda: (torch.rand(100, 12, 8, dtype=torch.float64), _counts(100, 8)),
    "fp16": lambda: (torch.rand(100, 12, 8).half(), _counts(100, 8)),
    "bf16": lambda: (torch.rand(100, 12, 8).bfloat16(), _counts(100, 8)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("solver", SOLVERS)
def test_optimum(solver, case, seed):
    cost, nt = CASES[case]()
    check(cost, nt, solve(solver, cost, nt))


@pytest.mark.parametrize("solver", SOLVERS)
def test_nan_gives_a_valid_assignment(solver, seed):
    """NaN: unspecified pairs, but a valid assignment (these backends treat NaN as +inf)."""
    cost, nt = _with(_random(100, 10, 8), float("nan"), 0.2)
    cost[0] = float("nan")
    out = solve(solver, cost, nt)
    check(cost, nt, out)  # check() reads NaN as +inf: the behaviour of these backends


@pytest.mark.parametrize("solver", SOLVERS)
def test_non_contiguous_cost(solver, seed):
    cost = torch.rand(40, 9, 12).transpose(1, 2)  # [40, 12, 9]
    nt = _counts(40, 9)
    check(cost, nt, solve(solver, cost, nt))


@pytest.mark.parametrize("solver", [pytest.param("reference-early", id="reference-early"),
                                    pytest.param("cuda", id="cuda", marks=requires_cuda_backend)])
def test_matcher_size(solver, seed):
    """A training step's shape class: Q = 100 queries, up to 50 targets per image."""
    cost, nt = _random(64, 100, 50)
    check(cost, nt, solve(solver, cost, nt))


def test_reference_modes_agree(seed):
    """The early-exit (CPU) and masked (GPU fallback) loops run the same algorithm: same result."""
    cost, nt = _integer(100, 10, 14, 3)
    ref = op_module("reference", "assignment").linear_sum_assignment
    assert torch.equal(ref(cost, nt, early_exit=True), ref(cost, nt, early_exit=False))


# --- GPU only ------------------------------------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("solver", [pytest.param("reference-masked", id="reference-masked"),
                                    pytest.param("cuda", id="cuda", marks=requires_cuda_backend)])
def test_no_host_sync(solver):
    """On a GPU neither the cuda backend nor the reference's masked loops sync with the host."""
    cost = torch.rand(16, 12, 10, device="cuda")
    nt = torch.randint(0, 11, (16,), device="cuda")
    if solver == "cuda":
        fn = op_module("cuda", "assignment").linear_sum_assignment
    else:
        fn = op_module("reference", "assignment").linear_sum_assignment
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fn(cost, nt)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check(cost.cpu(), nt.cpu(), out.cpu())


@requires_cuda_backend
@pytest.mark.parametrize("shape", [(640, 100, 50), (64, 300, 300), (32, 300, 100), (32, 100, 300)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_full_size(shape, seed):
    """The issue's sizes: 10 predictions x batch 64, Q = T = 300, and both wide orientations."""
    B, Q, T = shape
    cost, nt = _random(B, Q, T)
    check(cost, nt, solve("cuda", cost, nt))


@requires_cuda_backend
@pytest.mark.parametrize("case", ["random", "random_wide", "integer_ties", "binary", "padding_garbage", "plus_inf",
                                  "both_inf", "fp16"])
def test_cuda_matches_reference(case, seed):
    """The kernel runs the reference's fp64 arithmetic operation for operation with the same
    tie-breaking (lowest path cost, free column first, lowest index): the same indices. A
    difference here with test_optimum passing is a divergence to explain, not a wrong result."""
    cost, nt = CASES[case]()
    assert torch.equal(solve("cuda", cost, nt), solve("reference-early", cost, nt))


@requires_cuda_emulation
@pytest.mark.parametrize("case", ["random", "random_wide", "random_all_wide", "integer_ties", "binary", "constant",
                                  "padding_garbage", "plus_inf", "both_inf", "infeasible", "fp16", "fp64"])
def test_cuda_emulated_matches_reference(case, emulation_order, seed):
    """The kernel on the CPU (tests/cuda_emulation) gives the reference's indices in every
    order of its threads and blocks: its one-barrier-per-step design has no race."""
    cost, nt = CASES[case]()
    assert torch.equal(solve("cuda-emulated", cost, nt), solve("reference-early", cost, nt))


@requires_cuda_emulation
@pytest.mark.parametrize("shape", [(1, 270, 30), (1, 30, 270), (2, 40, 300)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_emulated_more_columns_than_threads(shape, seed):
    """Matrices of more than 256 columns (the block's most threads): threads own several columns."""
    cost, nt = _random(*shape, padded=False)
    assert torch.equal(solve("cuda-emulated", cost, nt), solve("reference-early", cost, nt))


@requires_cuda_backend
def test_cuda_full_size_integer(seed):
    cost, nt = _integer(16, 300, 300, 5)
    check(cost, nt, solve("cuda", cost, nt))


@requires_cuda_backend
def test_cuda_rejects_bad_input():
    fn = op_module("cuda", "assignment").linear_sum_assignment
    with pytest.raises(RuntimeError):
        fn(torch.rand(2, 3, 4), torch.full((2,), 4))  # CPU tensors
    with pytest.raises(RuntimeError):
        fn(torch.rand(2, 3, 4, device="cuda"), torch.full((3,), 4, device="cuda"))  # wrong B

"""The Hungarian matching of a training step: scipy on the host (the official matcher) vs
``m2f_kernels.linear_sum_assignment`` on the device.

One call solves every cost matrix of a step: cost [N, Q, T] float32 on the GPU (N = the
predictions x the batch; the standard case: 10 predictions x batch 16, Q 100, T 50) with
``num_targets`` [N] valid columns each (padding columns ignored). Every provider returns
the matched query per target [N, T] (int64 on the GPU, -1 for padding) and the total cost
of each matrix [N] (computed on the GPU from the matching, the same way for every
provider), which the harness checks against scipy's optimum.

- ``scipy``: the official path. The cost goes to the host (one device-to-host copy, a
  sync), ``scipy.optimize.linear_sum_assignment`` solves each matrix in a Python loop, and
  the indices come back to the device (one host-to-device copy), all timed.
- ``cuda``: the extension's kernel (one thread block per matrix), no host sync.
- ``reference``: the backend's exact solver in torch ops on the GPU (launch-bound: the
  fallback where no kernel is built); the standard shape only.

Costs are uniform in [0, 5) (continuous, so the optimum is unique and every provider's
matching is the same), with all T columns valid, or 1..T valid per matrix ("ragged": the
padded targets of a real batch).
"""
from __future__ import annotations

import torch

from bench import harness
from bench.harness import Block, Inputs, OpSpec

STANDARD = {"N": 160, "Q": 100, "T": 50, "ragged": 0}
SHAPES = (STANDARD, {"N": 160, "Q": 100, "T": 50, "ragged": 1}, {"N": 640, "Q": 100, "T": 50, "ragged": 0},
          {"N": 16, "Q": 300, "T": 300, "ragged": 0})


def make_inputs(shape: dict, dtype: torch.dtype, device) -> Inputs:
    n, q, t = shape["N"], shape["Q"], shape["T"]
    cost = 5.0 * torch.rand(n, q, t, device=device, dtype=dtype)
    if shape["ragged"]:
        num_targets = torch.randint(1, t + 1, (n,), device=device)
    else:
        num_targets = torch.full((n,), t, dtype=torch.int64, device=device)
    return Inputs({"cost": cost, "num_targets": num_targets}, meta=dict(shape))


def total_cost(cost: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
    """[N] float64: sum over the matched (query, target) pairs of each matrix (-1: none)."""
    picked = cost.gather(1, matched.clamp_min(0).unsqueeze(1)).squeeze(1)  # [N, T]: cost[n, matched[n, t], t]
    return picked.double().where(matched >= 0, 0.0).sum(1)


TABLE = OpSpec(
    name="assignment",
    make_inputs=make_inputs,
    blocks=[
        Block(SHAPES, ("fp32",), ("fwd",), providers=("scipy", "cuda")),
        Block((STANDARD,), ("fp32",), ("fwd",), providers=("reference",)),
    ],
    check_against=("scipy",),
    input_sets=2,
    id_keys=("N", "Q", "T", "ragged"),
)


@TABLE.provider("scipy", requires=harness.requires_module("scipy", "pip install scipy"))
def _scipy(inputs: Inputs):
    """the official matcher: cost to the host, scipy.optimize.linear_sum_assignment per matrix, indices back"""
    from scipy.optimize import linear_sum_assignment

    cost, num_targets = inputs["cost"], inputs["num_targets"]

    def run():
        host, counts = cost.cpu(), num_targets.tolist()  # the device-to-host copies (and the sync)
        matched = torch.full(cost.shape[::2], -1, dtype=torch.int64)
        for n, t in enumerate(counts):
            rows, cols = linear_sum_assignment(host[n, :, :t].numpy())
            matched[n, torch.from_numpy(cols)] = torch.from_numpy(rows)
        matched = matched.to(cost.device, non_blocking=False)
        return matched, total_cost(cost, matched)

    return run


def _m2f(backend: str):
    def build(inputs: Inputs):
        cost, num_targets = inputs["cost"], inputs["num_targets"]
        solve = harness.m2f_op("linear_sum_assignment", backend)

        def run():
            matched = solve(cost, num_targets)
            return matched, total_cost(cost, matched)

        return run

    build.__doc__ = f"m2f_kernels.linear_sum_assignment (backend='{backend}')"
    return build


for _backend in ("reference", "cuda"):
    TABLE.provider(_backend)(_m2f(_backend))


def test_assignment(case, bench_run):
    bench_run(TABLE, case)

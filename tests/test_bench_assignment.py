"""bench/test_bench_assignment.py on the CPU: the table's cases, the total cost it checks,
and the scipy / reference providers run through the harness on small matrices."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `bench` is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from bench.harness import Case  # noqa: E402
from bench.test_bench_assignment import TABLE, total_cost  # noqa: E402

pytest.importorskip("scipy.optimize", reason="the scipy provider is the table's baseline")
TINY = harness.Settings(budget_ms=1.0, min_rounds=1, max_rounds=2, warmup_rounds=0)


def test_cases_cover_the_standard_step_and_the_large_ones():
    cases = TABLE.cases("default")
    shapes = {(c.provider, c.params["N"], c.params["Q"], c.params["T"], c.params["ragged"]) for c in cases}
    assert ("cuda", 160, 100, 50, 0) in shapes and ("scipy", 160, 100, 50, 0) in shapes  # 10 x 16, Q 100, T 50
    assert ("cuda", 640, 100, 50, 0) in shapes and ("cuda", 16, 300, 300, 0) in shapes
    assert {c.provider for c in cases if c.params["N"] == 640} == {"scipy", "cuda"}  # the fallback: standard only
    assert all(c.mode == "fwd" and c.dtype == "fp32" for c in cases)


def test_total_cost_sums_the_matched_pairs_and_skips_padding():
    cost = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # [N, Q, T]
    matched = torch.tensor([[2, 0], [1, -1]])
    assert total_cost(cost, matched).tolist() == [cost[0, 2, 0] + cost[0, 0, 1], cost[1, 1, 0]]


@pytest.mark.parametrize("ragged", [0, 1])
def test_scipy_and_reference_agree_through_the_harness(ragged):
    shape = {"N": 6, "Q": 9, "T": 7, "ragged": ragged}
    records = {}
    for provider in ("scipy", "reference"):
        case = Case.make("assignment", provider, shape, "fp32", "fwd", TABLE.id_keys)
        records[provider] = harness.run_case(TABLE, case, "cpu", settings=TINY)
    assert records["scipy"]["check"] is None  # the baseline
    check = records["reference"]["check"]
    assert check["against"] == "scipy" and check["ok"] and check["rel_err"] < 1e-6, check


def test_a_wrong_matching_fails_the_check(monkeypatch):
    shape = {"N": 4, "Q": 6, "T": 5, "ragged": 0}
    inputs = TABLE.make_inputs(shape, torch.float32, "cpu")
    matched, total = TABLE.providers["scipy"].build(inputs)()
    worse = matched.flip(1)  # a valid but (almost surely) not minimal matching
    assert (total_cost(inputs["cost"], worse) > total).any()
    err = harness.rel_err((worse, total_cost(inputs["cost"], worse)), (matched, total))
    assert err > harness.CHECK_TOLERANCE["fp32"]


def test_the_report_states_speedups_against_scipy():
    from bench import report

    shape = {"N": 4, "Q": 6, "T": 5, "ragged": 0}
    records = [harness.run_case(TABLE, Case.make("assignment", p, shape, "fp32", "fwd", TABLE.id_keys), "cpu",
                                settings=TINY) for p in ("scipy", "reference")]
    section = report.op_section({"cases": records}, "assignment")
    assert "1.00x vs scipy" in section and "first present of scipy" in section and "baseline (scipy)" in section

"""bench/test_bench_criterion.py on the CPU: every provider runs through the harness on a
small configuration, forward and backward, and the mask-free criterion passes the check
against the mask-logits one."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `bench` is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from bench.harness import Case  # noqa: E402
from bench.test_bench_criterion import STANDARD, TABLE  # noqa: E402

pytest.importorskip("scipy.optimize", reason="the official path's matcher")
SMALL = {"B": 2, "Q": 8, "C": 16, "mask": 16, "T": 3, "target": 64, "P": 256, "layers": 3, "K": 5}
TINY = harness.Settings(budget_ms=1.0, min_rounds=1, max_rounds=1, warmup_rounds=0)


def test_cases_compare_mask_logits_with_mask_free():
    cases = TABLE.cases("default")
    assert {c.params["layers"] for c in cases} == {10} and STANDARD["mask"] == 256 and STANDARD["P"] == 12544
    assert {(c.provider, c.mode) for c in cases} == {
        ("logits-reference", "fwd+bwd"), ("logits-fused", "fwd+bwd"), ("mask-free", "fwd+bwd"),
        ("logits-fused", "fwd"), ("mask-free", "fwd")}


@pytest.mark.parametrize("provider", ["logits-reference", "logits-fused", "mask-free"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_providers_run_forward_and_backward(provider, dtype):
    record = harness.run_case(TABLE, Case.make("criterion", provider, SMALL, dtype, "fwd+bwd"), "cpu", settings=TINY)
    assert record["status"] == "ok" and record["time_ms"]["median"] > 0


def test_mask_free_passes_the_check_against_the_mask_logits_criterion():
    record = harness.run_case(TABLE, Case.make("criterion", "mask-free", SMALL, "fp32", "fwd"), "cpu", settings=TINY)
    check = record["check"]
    assert check["against"] == "logits-fused" and check["ok"], check

"""The benchmark harness (bench/) on the CPU: cases, running, the JSON schema, report, compare.

The GPU timings themselves only run in ``pytest bench/ --benchmark`` on a GPU; here the
same code paths run on tiny CPU cases with the wall-clock timer.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `bench` is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

from bench import compare, data, harness, measure, report, results  # noqa: E402
from bench.harness import Block, Case, Inputs, OpSpec, Settings  # noqa: E402
from bench.test_bench_assignment import TABLE as ASSIGNMENT  # noqa: E402
from bench.test_bench_criterion import TABLE as CRITERION  # noqa: E402
from bench.test_bench_masked_attention import TABLE as MASKED_ATTENTION  # noqa: E402
from bench.test_bench_model import TABLE as MODEL  # noqa: E402
from bench.test_bench_ms_deform_attn import TABLE as MS_DEFORM_ATTN  # noqa: E402
from bench.test_bench_point_loss import TABLE as POINT_LOSS  # noqa: E402

TABLES = (MASKED_ATTENTION, MS_DEFORM_ATTN, POINT_LOSS, CRITERION, ASSIGNMENT, MODEL)
TINY = Settings(budget_ms=1.0, min_rounds=3, max_rounds=3, warmup_rounds=1)
TINY_ATTENTION = {"B": 1, "H": 2, "D": 8, "Q": 6, "N": 49, "visible": 0.3, "empty": 0.2}


def _keys(table: OpSpec, scope: str) -> set:
    return {c.key for c in table.cases(scope)}


# ----------------------------------------------------------------------------- cases


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_case_generation(table):
    for scope in harness.SCOPES:
        cases = table.cases(scope)
        assert cases, f"{table.name}: no cases in scope {scope}"
        assert len({c.id for c in cases}) == len(cases), f"{table.name}: duplicate pytest ids in {scope}"
        assert len({c.key for c in cases}) == len(cases)
        assert all(c.provider in table.providers and c.op == table.name for c in cases)
    quick, default, full = (_keys(table, s) for s in harness.SCOPES)
    assert quick < default <= full
    first_dtypes = {b.dtypes[0] for b in table.blocks}
    assert {c.dtype for c in table.cases("quick")} <= first_dtypes


def _grid(table, provider, scope="default"):
    return {(tuple(sorted(c.params.items())), c.dtype, c.mode) for c in table.cases(scope) if c.provider == provider}


def test_tables_cover_the_design_shapes():
    ma = _grid(MASKED_ATTENTION, "triton")
    for q in (100, 200):
        for n in (1024, 4096, 16384):
            shape = tuple(sorted({"B": 2, "H": 8, "D": 32, "Q": q, "N": n, "visible": 0.3, "empty": 0.05}.items()))
            assert {(shape, d, m) for d in ("fp32", "bf16") for m in ("fwd", "fwd+bwd")} <= ma
    for provider in ("reference", "official", "sdpa", "flex", "flex+block_mask"):
        assert any(c.params["N"] == 16384 for c in MASKED_ATTENTION.cases() if c.provider == provider), provider
    assert all(c.params["N"] == 16384 for c in MASKED_ATTENTION.cases() if c.provider.startswith("flex"))
    assert any(c.params["N"] == 1024 for c in MASKED_ATTENTION.cases("full") if c.provider == "flex")

    msda = {c.params["setting"]: c.params for c in MS_DEFORM_ATTN.cases()}
    assert msda["coco1024"]["levels"] == ((128, 128), (64, 64), (32, 32)) and msda["coco1024"]["B"] == 2
    assert msda["ade512"]["B"] == 16
    assert {c.mode for c in MS_DEFORM_ATTN.cases() if c.provider == "triton"} == {"fwd", "bwd", "fwd+bwd"}
    assert {c.provider for c in MS_DEFORM_ATTN.cases()} >= {"reference", "triton", "triton-deterministic",
                                                            "original", "dcnv4"}

    parts = {(c.params["part"], c.mode) for c in POINT_LOSS.cases() if c.provider == "triton"}
    assert parts == {("matcher", "fwd"), ("loss", "fwd"), ("loss", "fwd+bwd"), ("criterion", "fwd+bwd")}
    assert {c.params["P"] for c in POINT_LOSS.cases()} == {12544}

    r50 = {(c.provider, c.dtype) for c in MODEL.cases() if c.mode == "train" and c.params["backbone"] == "resnet50"}
    steps = report.TRAIN_CONFIGS + (report.MASK_FREE, report.COMPILED, report.CUDA_GRAPH)
    assert {(p, d) for p in steps for d in ("fp32", "bf16")} == r50
    assert all(c.params["image"] == 1024 and c.params["batch"] == 2 for c in MODEL.cases() if c.mode == "train")


def test_case_validation_and_identity():
    with pytest.raises(ValueError, match="dtype"):
        Case.make("op", "p", {}, "fp64", "fwd")
    with pytest.raises(ValueError, match="mode"):
        Case.make("op", "p", {}, "fp32", "backward")
    case = Case.make("op", "p", {"N": 4, "levels": [(2, 2)]}, "bf16", "fwd+bwd", id_keys=("N",))
    assert case.id == "p-N4-bf16-fwd+bwd"
    assert case.shape_json == {"N": 4, "levels": [[2, 2]]}
    assert case.key == harness.case_key("op", "p", {"N": 4, "levels": [[2, 2]]}, "bf16", "fwd+bwd")
    with pytest.raises(ValueError, match="scope"):
        MASKED_ATTENTION.cases("huge")


def test_settings_rounds():
    s = Settings(budget_ms=100.0, min_rounds=5, max_rounds=30, warmup_rounds=2)
    assert s.rounds_for(1000.0) == 5
    assert s.rounds_for(10.0) == 10
    assert s.rounds_for(0.0) == 30
    assert MODEL.settings_for("default").max_rounds == 5


# ----------------------------------------------------------------------------- inputs


def test_blob_masks_visible_share_and_empty_rows():
    blocked = data.blob_masks(40, 1024, visible=0.3, empty=0.05, device="cpu")
    assert blocked.shape == (40, 1024) and blocked.dtype == torch.bool
    empty = blocked.all(dim=1)
    assert int(empty.sum()) == 2
    visible = (~blocked[~empty]).float().mean(dim=1)
    assert torch.allclose(visible, torch.full_like(visible, 0.3), atol=2 / 1024)
    # blobs, not noise: neighbours agree far more often than for independent keys
    grid = blocked[~empty].view(-1, 32, 32)
    agree = (grid[:, :, 1:] == grid[:, :, :-1]).float().mean()
    assert agree > 0.9


def test_box_masks_and_locations():
    masks = data.box_masks(7, 33, 20, "cpu")
    assert masks.shape == (7, 33, 20) and masks.any(dim=(1, 2)).all()
    loc = data.deformable_locations(2, [(8, 8), (4, 4)], heads=2, points=3, device="cpu")
    assert loc.shape == (2, 80, 2, 2, 3, 2)
    inside = ((loc >= 0) & (loc <= 1)).float().mean()
    assert 0.5 < inside < 1.0  # most inside, some outside the borders (zero padding is exercised)


# ----------------------------------------------------------------------------- running


class CountingTimer:
    """A fake timer: runs the call and reports a fixed time, so the statistics are known."""

    def __init__(self, ms: float) -> None:
        self.ms, self.calls = ms, 0

    def __call__(self, fn):
        fn()
        self.calls += 1
        return self.ms


def _probe_spec(seen: list) -> OpSpec:
    """A toy op out = sum(3 x w) whose provider records which input set each call used."""
    counter = itertools.count()

    def make_inputs(shape, dtype, device):
        x = torch.randn(shape["n"], dtype=dtype, device=device)
        return Inputs({"x": x, "w": torch.randn_like(x)}, grad=("x",), meta={"tag": next(counter)})

    spec = OpSpec("probe", make_inputs, [Block(({"n": 5},), ("fp32",), ("fwd", "bwd", "fwd+bwd"))],
                  floor_bytes=lambda inputs, mode: 1000, check_against=("good",), input_sets=3)

    @spec.provider("good")
    def good(inputs):
        def run():
            seen.append((inputs.meta["tag"], torch.is_grad_enabled()))
            return (3 * inputs["x"] * inputs["w"]).sum()

        return run

    @spec.provider("wrong")
    def wrong(inputs):
        return lambda: 1.01 * (3 * inputs["x"] * inputs["w"]).sum()

    @spec.provider("nan")
    def nan(inputs):
        return lambda: (inputs["x"] * float("nan")).sum()

    @spec.provider("missing", requires=lambda: "package foo is not installed")
    def missing(inputs):
        raise AssertionError("never built")

    @spec.provider("fp16only", dtypes=("fp16",))
    def fp16only(inputs):
        raise AssertionError("never built")

    @spec.provider("oom")
    def oom(inputs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    @spec.provider("broken")
    def broken(inputs):
        raise ValueError("bad provider")

    return spec


def test_run_case_rotation_rounds_and_clock():
    seen = []
    spec = _probe_spec(seen)
    case = spec.cases()[0]
    assert case.mode == "fwd"
    calls = []

    def runner(target, rounds, warmup):
        calls.append((rounds, warmup))
        harness.run_rounds(target, rounds, warmup)

    timer = CountingTimer(2.0)
    before = measure.gpu_clock()
    record = harness.run_case(spec, case, "cpu", settings=TINY, runner=runner, timer=timer, copy_bandwidth=1e6)
    assert calls == [(3, 1)]
    assert timer.calls == 1 + 1 + 3  # the estimate, the warm-up round, the timed rounds
    assert measure.gpu_clock() - before == pytest.approx((1 + 3) * 2e-3)  # rounds run through the runner
    assert record["time_ms"]["median"] == 2.0 and record["time_ms"]["rounds"] == 3
    # every input set was primed, then the timed calls rotated through all three
    tags = [tag for tag, _ in seen]
    assert set(tags) == {0, 1, 2}
    assert tags[:3] == [0, 1, 2] and set(tags[3:]) == {0, 1, 2}
    assert not any(grad for _, grad in seen), "fwd mode must run without autograd"
    assert record["floor"] == {"bytes": 1000, "ms": 1.0, "share": 0.5}
    assert record["check"] is None  # 'good' is the baseline itself
    assert record["memory"] is None  # no allocator statistics on the CPU
    assert not results._validate_record(record)


@pytest.mark.parametrize("mode", ["bwd", "fwd+bwd"])
def test_run_case_backward_modes_differentiate_the_grad_inputs(mode):
    seen = []
    spec = _probe_spec(seen)
    case = next(c for c in spec.cases() if c.mode == mode)
    inputs = spec.make_inputs({"n": 5}, torch.float32, "cpu")
    inputs.tensors["x"].requires_grad_(True)
    call = harness.make_call(spec.providers["good"], inputs, mode)
    forwards = len(seen)
    grads = call()
    assert len(seen) == forwards + (mode == "fwd+bwd"), "bwd must not rerun the forward"
    assert len(grads) == 1 and torch.allclose(grads[0], 3 * inputs["w"])  # d sum(3 x w) / dx
    record = harness.run_case(spec, case, "cpu", settings=TINY, timer=CountingTimer(1.0))
    assert record["mode"] == mode and record["status"] == "ok"


def test_run_case_checks_against_the_baseline():
    spec = _probe_spec([])
    case = next(c for c in spec.cases() if c.mode == "fwd")
    wrong = harness.run_case(spec, Case.make("probe", "wrong", case.params, "fp32", "fwd"), "cpu",
                             settings=TINY, timer=CountingTimer(1.0))
    assert wrong["check"]["against"] == "good" and not wrong["check"]["ok"]
    assert wrong["check"]["rel_err"] == pytest.approx(0.01, rel=1e-4)
    nan = harness.run_case(spec, Case.make("probe", "nan", case.params, "fp32", "fwd"), "cpu",
                           settings=TINY, timer=CountingTimer(1.0))
    assert nan["check"]["rel_err"] == float("inf") and not nan["check"]["ok"]


def test_a_training_step_with_a_non_finite_loss_is_an_error():
    spec = _probe_spec([])
    for name in ("good", "nan"):
        case = Case.make("probe", name, {"n": 5}, "fp32", "train")
        if name == "good":
            assert harness.run_case(spec, case, "cpu", settings=TINY, timer=CountingTimer(1.0))["status"] == "ok"
            continue
        with pytest.raises(harness.CaseError, match="the training step's loss is not finite"):
            harness.run_case(spec, case, "cpu", settings=TINY, timer=CountingTimer(1.0))


@pytest.mark.parametrize("provider, status, text", [
    ("missing", "skipped", "package foo is not installed"),
    ("fp16only", "skipped", "supports fp16 only"),
    ("oom", "oom", "out of GPU memory"),
])
def test_run_case_skips_with_the_reason(provider, status, text):
    spec = _probe_spec([])
    case = Case.make("probe", provider, {"n": 5}, "fp32", "fwd")
    with pytest.raises(harness.CaseSkipped) as info:
        harness.run_case(spec, case, "cpu", settings=TINY)
    assert info.value.status == status and text in info.value.reason
    record = harness.base_record(case, info.value.status, info.value.reason)
    assert not results._validate_record(record)


def test_run_case_error_carries_the_traceback():
    spec = _probe_spec([])
    with pytest.raises(harness.CaseError, match="ValueError: bad provider"):
        harness.run_case(spec, Case.make("probe", "broken", {"n": 5}, "fp32", "fwd"), "cpu", settings=TINY)


@pytest.fixture(scope="module")
def cpu_records():
    """Real records of the masked-attention table at a tiny shape, run on the CPU."""
    out = []
    for provider in ("reference", "official", "sdpa"):
        for mode in ("fwd", "fwd+bwd"):
            case = Case.make("masked_attention", provider, TINY_ATTENTION, "fp32", mode, ("Q", "N"))
            out.append(harness.run_case(MASKED_ATTENTION, case, "cpu", settings=TINY, copy_bandwidth=1e11))
    return out


def test_returned_bytes_counts_new_storages_once():
    x = torch.zeros(4, 8)
    inputs = Inputs({"x": x, "i": torch.arange(3)})
    new = torch.ones(16, dtype=torch.float64)
    assert harness.returned_bytes((x[1:], new, new[:4], {"y": torch.ones(5)}), inputs) == 16 * 8 + 5 * 4
    assert harness.returned_bytes(None, inputs) == 0


def test_masked_attention_peers_agree_on_cpu(cpu_records):
    checks = {r["provider"]: r["check"] for r in cpu_records if r["mode"] == "fwd"}
    assert checks["reference"] is None
    for peer in ("official", "sdpa"):
        assert checks[peer]["against"] == "reference" and checks[peer]["ok"], checks[peer]
    assert all(r["floor"]["bytes"] > 0 for r in cpu_records)


def test_model_case_runs_on_cpu():
    pytest.importorskip("m2f", reason="the model package m2f is not importable")
    tiny = {"backbone": "resnet18", "queries": 4, "image": 64, "T": 2, "batch": 1,
            "overrides": (("hidden_dim", 32), ("dim_feedforward", 64), ("dec_layers", 1), ("enc_layers", 1),
                          ("enc_dim_feedforward", 64), ("num_points", 16), ("backbone_width", 8))}
    case = Case.make("model", "b-point-reference", tiny, "fp32", "train", ("backbone",))
    record = harness.run_case(MODEL, case, "cpu", settings=Settings(1.0, 1, 1, 0))
    assert record["status"] == "ok" and record["metrics"]["parameters"] > 0
    assert record["floor"] is None


# ----------------------------------------------------------------------------- results files


def _fake_results(cpu_records) -> dict:
    """A schema-valid result set: the real CPU records (with GPU-like memory) plus model cases."""
    cases = copy.deepcopy(cpu_records)
    for i, r in enumerate(cases):
        r["memory"] = {"case_base_bytes": 0, "call_base_bytes": 1 << 20, "peak_bytes": (i + 2) << 20,
                       "extra_bytes": (i + 1) << 20, "footprint_bytes": (i + 2) << 20,
                       "returned_bytes": 1 << 20, "work_bytes": i << 20}
    template = cases[0]
    shape = {"backbone": "resnet50", "queries": 100, "image": 1024, "T": 30, "batch": 2}
    for provider, gb, ms in zip(report.TRAIN_CONFIGS, (36.0, 12.0, 6.0), (900.0, 600.0, 300.0)):
        r = copy.deepcopy(template)
        r.update(op="model", provider=provider, mode="train", dtype="bf16", shape=dict(shape), check=None, floor=None,
                 label="resnet50-batch2",
                 key=harness.case_key("model", provider, shape, "bf16", "train"))
        r["time_ms"] = dict(r["time_ms"], median=ms)
        r["memory"] = dict(r["memory"], footprint_bytes=int(gb * report.GB))
        cases.append(r)
    skipped = Case.make("ms_deform_attn", "original", {"setting": "coco1024"}, "bf16", "fwd")
    cases.append(harness.base_record(skipped, "skipped", "the original CUDA op supports fp32 only"))
    env = results.environment(torch.device("cpu"), copy_bandwidth_bytes_per_s=3.0e12)
    return {"schema": results.SCHEMA, "created": "2025-01-01T00:00:00+00:00", "scope": "default",
            "env": env, "cases": cases}


def test_results_json_schema(tmp_path, cpu_records, capsys):
    fake = _fake_results(cpu_records)
    path = results.result_path(tmp_path, "NVIDIA H100 80GB HBM3", "default")
    assert path.name.startswith("nvidia-h100-80gb-hbm3-") and path.suffix == ".json"
    collector = results.Results(fake["env"], "default", path)
    for record in fake["cases"]:
        collector.add(record)
    loaded = results.load(path)
    assert loaded["cases"] == json.loads(json.dumps(fake["cases"]))
    assert path.with_suffix(".md").read_text().startswith("# Benchmark results")
    assert results.result_path(tmp_path, "NVIDIA H100 80GB HBM3", "default").name.endswith("-2.json")
    assert results.result_path(tmp_path, "NVIDIA H100 80GB HBM3", "quick").stem.endswith("-quick")

    broken = copy.deepcopy(fake)
    del broken["env"]["commit"]
    broken["cases"][0]["status"] = "fine"
    del broken["cases"][1]["time_ms"]
    broken["cases"][-1].pop("reason")
    broken["cases"][2]["memory"]["work_bytes"] = 1.5
    problems = results.validate(broken)
    assert "env.commit missing" in problems
    assert any(p.startswith("cases[0]: status") for p in problems)
    assert any(p.startswith("cases[1]: an ok record needs 'time_ms'") for p in problems)
    assert any("needs a 'reason'" in p for p in problems)
    assert "cases[2]: memory.work_bytes not an integer" in problems
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="env.commit missing"):
        results.load(bad)
    not_json = tmp_path / "not.json"
    not_json.write_text("{")
    for path, message in ((bad, "does not match schema m2f-bench/1: env.commit missing; "),
                          (not_json, f"{not_json} is not JSON: "), (tmp_path / "none.json", "No such file")):
        with pytest.raises(SystemExit) as info:
            report.main([str(path)])
        assert info.value.code == 2
        error = capsys.readouterr().err.splitlines()[-1]
        assert error.startswith("python -m bench.report: error: ") and message in error


def test_report_writes_markdown_tables_and_charts(tmp_path, cpu_records, capsys):
    path = tmp_path / "fake-device-2025-01-01.json"
    results.write_json(_fake_results(cpu_records), path)
    out = tmp_path / "out"
    assert report.main([str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| shape | dtype | mode | reference | official | sdpa | HBM floor ms |" in printed
    # the claim table: a/b = 36/12, b/c = 12/6, a/c = 36/6 GB per image (batch 2)
    claim = next(line for line in printed.splitlines() if "3.00x" in line)
    assert "3.00x" in claim and "2.00x" in claim and "6.00x" in claim
    summary = (out / f"{path.stem}.md").read_text()
    assert "## masked_attention" in summary and "the original CUDA op supports fp32 only" in summary
    # op tables: peak extra and work space (peak extra minus the returned tensors) side by side
    assert "| peak extra MiB | work MiB |" in summary and "| 3.0 | 2.0 |" in summary
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {f"{path.stem}-{op}-{m}.png" for op in ("masked_attention", "model")
                                      for m in ("time", "memory")}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_compare_prints_ratios(tmp_path, cpu_records, capsys):
    old = _fake_results(cpu_records)
    new = copy.deepcopy(old)
    for r in new["cases"]:
        if r["status"] == "ok":
            r["time_ms"]["median"] /= 2
            r["memory"]["extra_bytes"] *= 3
            r["memory"]["footprint_bytes"] *= 3
    dropped = new["cases"].pop(0)
    out = compare.compare(old, new)
    assert out["only_old"] == [dropped["key"]] and out["only_new"] == []
    assert all(row["speedup"] == pytest.approx(2.0) and row["memory_ratio"] == pytest.approx(3.0)
               for row in out["rows"])
    assert out["geomean"][("model", "c-point-fused")] == pytest.approx(2.0)
    paths = []
    for name, d in (("old", old), ("new", new)):
        paths.append(tmp_path / f"{name}.json")
        results.write_json(d, paths[-1])
    assert compare.main([str(p) for p in paths] + ["--op", "model"]) == 0
    printed = capsys.readouterr().out
    assert "2.00x" in printed and "masked_attention" not in printed.split("geometric")[0]


# ----------------------------------------------------------------------------- pytest wiring


def _pytest(*args, cwd=ROOT):
    # a fresh session: not an xdist worker of the outer run (pytest-benchmark turns itself off
    # when it believes xdist is active, as happened when the GPU suite ran under -n 8)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_ADDOPTS"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider", "-p", "no:xdist"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _assert_all_skipped(done, reason):
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|skipped|failed)", line)][-1]
    assert "skipped" in summary and "passed" not in summary and "error" not in summary, summary
    assert reason in text, text[-3000:]


def test_bench_suite_skips_without_the_flag(tmp_path):
    done = _pytest("bench", "-q", "-rs", "--benchmark-results", str(tmp_path))
    _assert_all_skipped(done, "benchmarks run only with --benchmark")
    assert not list(tmp_path.iterdir()), "a skipped run must not write results"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, --benchmark would run the real suite")
def test_bench_suite_skips_without_a_gpu(tmp_path):
    done = _pytest("bench", "-q", "-rs", "--benchmark", "--benchmark-results", str(tmp_path))
    _assert_all_skipped(done, "benchmarks need a CUDA GPU")
    assert not list(tmp_path.iterdir())


def test_bench_suite_wiring_end_to_end_on_cpu(tmp_path):
    """``pytest bench/ --benchmark`` through conftest, the bench_run fixture, pytest-benchmark and
    the results file, with --benchmark-device=cpu on one real-size case and one skipped case.

    pytest-benchmark's statistics must be exactly the harness's timings (its timer is the
    GPU clock the harness advances), warm-up rounds excluded (same round count)."""
    stats_json = tmp_path / "pytest-benchmark.json"
    done = _pytest("bench/test_bench_masked_attention.py", "bench/test_bench_ms_deform_attn.py", "-q", "-rs",
                   "--benchmark", "--benchmark-device=cpu",
                   "--benchmark-results", str(tmp_path / "results"), f"--benchmark-json={stats_json}",
                   "-k", "official-Q100-N1024-fp32-fwd and not bwd or original-coco1024-fp32-fwd and not bwd")
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    assert "1 passed, 1 skipped" in text, text[-3000:]
    assert "m2f benchmark results" in text and "the original CUDA op is not installed" in text
    (result_file,) = (tmp_path / "results").glob("*.json")
    data = results.load(result_file)
    assert data["scope"] == "default" and data["env"]["timer"].startswith("wall clock")
    ok, skipped = sorted(data["cases"], key=lambda r: r["status"])
    assert ok["provider"] == "official" and ok["check"]["against"] == "reference" and ok["check"]["ok"]
    assert skipped["status"] == "skipped" and "not installed" in skipped["reason"]
    assert result_file.with_suffix(".md").exists()
    (stats,) = json.loads(stats_json.read_text())["benchmarks"]
    assert stats["stats"]["rounds"] == ok["time_ms"]["rounds"]
    assert stats["stats"]["median"] * 1e3 == pytest.approx(ok["time_ms"]["median"])
    assert stats["extra_info"]["median_ms"] == pytest.approx(ok["time_ms"]["median"])


@pytest.mark.parametrize("provider", ["d-point-mask-free"])  # (e) compiles: minutes on a CPU
def test_mask_free_step_cases_run_on_cpu(provider):
    pytest.importorskip("m2f", reason="the model package m2f is not importable")
    tiny = {"backbone": "resnet18", "queries": 4, "image": 64, "T": 2, "batch": 1,
            "overrides": (("hidden_dim", 32), ("dim_feedforward", 64), ("dec_layers", 1), ("enc_layers", 1),
                          ("enc_dim_feedforward", 64), ("num_points", 16), ("backbone_width", 8))}
    case = Case.make("model", provider, tiny, "fp32", "train", ("backbone",))
    record = harness.run_case(MODEL, case, "cpu", settings=Settings(1.0, 1, 1, 0))
    assert record["status"] == "ok", record.get("reason")


def test_cuda_graph_step_captures_in_the_memory_call_and_times_replays_only(monkeypatch):
    """(f): the capture lands in the estimate call that measures peak memory (a replay
    allocates nothing, so a replay's peak would leave out the graph's pool), and every
    timed round is a replay: neither an eager warm-up step nor the capture is timed."""
    pytest.importorskip("m2f", reason="the model package m2f is not importable")
    import m2f.graph_step as graph_step
    import m2f.solver as solver
    from bench import test_bench_model

    events = []

    class FakeGraphStep:  # m2f.graph_step.GraphStep's call sequence, on the CPU
        def __init__(self, step_fn, device, warmup=graph_step.WARMUP_STEPS, generators=()):
            self.step_fn, self.warmup, self.calls = step_fn, warmup, 0

        def __call__(self, inputs, key=()):
            self.calls += 1
            kind = "eager" if self.calls <= self.warmup else "capture" if self.calls == self.warmup + 1 else "replay"
            events.append(kind)
            return self.step_fn(*inputs)

    real_optimizer = solver.build_optimizer
    monkeypatch.setattr(graph_step, "GraphStep", FakeGraphStep)
    monkeypatch.setattr(solver, "build_optimizer", lambda *a, capturable=False, **k: real_optimizer(*a, **k))
    monkeypatch.setattr(test_bench_model, "_require_cuda", lambda device, what: None)

    def peak_memory(fn, device):
        events.append("memory(")
        out = fn()
        events.append(")")
        return out, None

    class Timer:
        def __call__(self, fn):
            events.append("timed(")
            fn()
            events.append(")")
            return 1.0

    monkeypatch.setattr(measure, "peak_memory", peak_memory)
    tiny = {"backbone": "resnet18", "queries": 4, "image": 64, "T": 2, "batch": 1,
            "overrides": (("hidden_dim", 32), ("dim_feedforward", 64), ("dec_layers", 1), ("enc_layers", 1),
                          ("enc_dim_feedforward", 64), ("num_points", 16), ("backbone_width", 8))}
    case = Case.make("model", "f-mask-free-cuda-graph", tiny, "fp32", "train", ("backbone",))
    record = harness.run_case(MODEL, case, "cpu", settings=MODEL.settings_for("default"), timer=Timer())
    assert record["status"] == "ok"
    text = " ".join(events)
    memory = text[text.index("memory("):]
    assert memory.startswith("memory( timed( capture ) )"), text
    rounds = memory[len("memory( timed( capture ) )"):].split()
    assert rounds == ["timed(", "replay", ")"] * record["time_ms"]["rounds"], text


def test_report_shows_cases_that_did_not_run_as_such(tmp_path, cpu_records, monkeypatch):
    """An oom / skipped / error case is its status in the README tables, the model tables and
    the charts (no bar, a label), never a blank, a missing row or a zero bar; a failed check
    is marked beside its time; every speedup names its baseline."""
    data = _fake_results(cpu_records)
    sdpa = next(i for i, r in enumerate(data["cases"]) if r["provider"] == "sdpa" and r["mode"] == "fwd+bwd")
    oom = Case.make("masked_attention", "sdpa", TINY_ATTENTION, "fp32", "fwd+bwd", ("Q", "N"))
    data["cases"][sdpa] = harness.base_record(oom, "oom", "out of GPU memory")
    official = next(r for r in data["cases"] if r["provider"] == "official" and r["mode"] == "fwd")
    official["check"] = dict(official["check"], ok=False)
    full = next(r for r in data["cases"] if r["provider"] == report.TRAIN_CONFIGS[0])
    data["cases"].remove(full)
    data["cases"].append(harness.base_record(
        Case.make("model", full["provider"], full["shape"], full["dtype"], "train", ("backbone", "batch")),
        "oom", "out of GPU memory"))
    assert not results.validate(data)

    tables = report.readme_tables(data)
    fwd_bwd = next(line for line in tables.splitlines() if "| fp32 | fwd+bwd |" in line)
    assert fwd_bwd.split("|")[6].strip() == "oom", fwd_bwd  # the sdpa column
    fwd = next(line for line in tables.splitlines() if "| fp32 | fwd |" in line)
    assert fwd.split("|")[5].strip().endswith("FAIL"), fwd  # the official column
    assert f"| resnet50 Q100 1024px batch 2 | bf16 | {report.TRAIN_CONFIGS[0]} | oom | oom |" in tables
    summary = report.markdown(data)
    assert "| 1.00x vs official |" in summary

    import matplotlib.pyplot as plt

    axes, real_subplots = [], plt.subplots

    def subplots(*args, **kwargs):
        fig, ax = real_subplots(*args, **kwargs)
        axes.append(ax)
        return fig, ax

    monkeypatch.setattr(plt, "subplots", subplots)
    report.charts(data, tmp_path, "chart")
    for ax in axes:
        assert all(p.get_height() != 0 for p in ax.patches), "a case without a number drawn as a zero bar"
    assert {t.get_text() for ax in axes for t in ax.texts} == {"oom"}


def test_compare_reports_a_case_that_stopped_running_by_its_status(cpu_records, capsys):
    """A case ok in the old file and oom in the new one is a status change, not 'only in old'
    (as if it had been dropped from the suite)."""
    old = _fake_results(cpu_records)
    new = copy.deepcopy(old)
    r = new["cases"][0]
    case = Case.make(r["op"], r["provider"], r["shape"], r["dtype"], r["mode"], ("Q", "N"))
    new["cases"][0] = harness.base_record(case, "oom", "out of GPU memory")
    out = compare.compare(old, new)
    assert out["only_old"] == [] and out["only_new"] == []
    assert out["status_changed"] == [(r["key"], "ok", "oom")]
    assert r["key"] not in {row["key"] for row in out["rows"]}
    skipped = next(x["key"] for x in old["cases"] if x["status"] == "skipped")
    assert skipped not in {k for k, _, _ in out["status_changed"]}  # skipped in both: nothing to say
    printed = compare.format_comparison(out)
    assert f"{r['key']}: ok -> oom" in printed and "only in old" not in printed


def test_providers_of_a_case_get_the_same_inputs_and_the_global_rng_is_left_alone():
    """Every provider of one (op, shape, dtype) is timed on the same input sets (a block-sparse
    kernel's work depends on the mask drawn), set i differing from set j; building them
    leaves the global random state where it was."""
    seen = []
    spec = _probe_spec([])

    @spec.provider("recorder")
    def recorder(inputs):
        seen.append(inputs["x"].detach().clone())
        return lambda: (3 * inputs["x"] * inputs["w"]).sum()

    torch.manual_seed(0)
    for provider in ("recorder", "good"):  # another provider's case in between changes nothing
        harness.run_case(spec, Case.make("probe", provider, {"n": 5}, "fp32", "fwd"), "cpu", settings=TINY,
                         timer=CountingTimer(1.0))
    after = torch.rand(3)
    torch.manual_seed(1)
    harness.run_case(spec, Case.make("probe", "recorder", {"n": 5}, "fp32", "fwd+bwd"), "cpu", settings=TINY,
                     timer=CountingTimer(1.0))
    first, second = seen[:3], seen[3:]
    assert len(first) == len(second) == 3
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


def test_summary_shows_the_precision_flags_the_numbers_depend_on(cpu_records):
    data = _fake_results(cpu_records)
    data["env"].update(tf32_matmul=False, tf32_cudnn=True, commit="abc123", dirty=True)
    assert "| TF32 matmul / cuDNN | False / True |" in report.markdown(data)
    assert "commit abc123 + uncommitted changes (" in report.readme_tables(data)  # the README quotes this

"""pytest wiring of the benchmark suite: ``pytest bench/ --benchmark``.

- ``--benchmark`` turns the suite on; without it, or without a CUDA GPU, every bench test
  is collected and skipped with the reason.
- ``--benchmark-scope quick|default|full`` (``--benchmark-quick`` = quick) picks the
  cases and how long each is measured; ``--benchmark-results DIR`` where the files go;
  ``--benchmark-device cpu`` runs the wiring on the CPU (for testing the suite only).
- A test function taking ``case`` is parametrized with its module's ``TABLE.cases()``.
- Each bench test runs under ``@pytest.mark.benchmark(timer=gpu_clock)``, so the
  statistics pytest-benchmark prints are of CUDA-event time (bench/README.md).
- One session object measures the copy bandwidth and opens NVML once, and rewrites the
  run's JSON + markdown in bench/results/ after every case.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
import torch

from bench import harness, measure
from bench.results import Results, environment, result_path

BENCH_DIR = Path(__file__).resolve().parent
# Run order: the op tables first, the slow and memory-hungry model cases last.
FILE_ORDER = (
    "test_bench_masked_attention.py",
    "test_bench_ms_deform_attn.py",
    "test_bench_point_loss.py",
    "test_bench_criterion.py",
    "test_bench_assignment.py",
    "test_bench_model.py",
)
_SESSION = pytest.StashKey()


def pytest_addoption(parser):
    group = parser.getgroup("m2f-bench", "m2f_kernels benchmark suite (bench/)")
    group.addoption("--benchmark", action="store_true", default=False,
                    help="run the GPU benchmark suite in bench/ (without it every bench test skips)")
    group.addoption("--benchmark-scope", choices=harness.SCOPES, default="default",
                    help="quick: one shape per table, few rounds; default: the standard shapes "
                         "(about 5 minutes on an H100); full: every provider at every shape, more rounds")
    group.addoption("--benchmark-quick", action="store_true", default=False,
                    help="same as --benchmark-scope=quick")
    group.addoption("--benchmark-results", default=str(BENCH_DIR / "results"),
                    help="directory for the run's <device>-<date>.json and .md (default: bench/results)")
    group.addoption("--benchmark-device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu only tests the suite's wiring (wall-clock times, no memory): not a benchmark")


def _option(config, name: str, default):
    # getoption with a default: this conftest may be loaded after option parsing
    # (pytest run from the repository root), when its options are not registered.
    return config.getoption(name, default=default)


def scope_of(config) -> str:
    return "quick" if _option(config, "--benchmark-quick", False) else _option(config, "--benchmark-scope", "default")


def skip_reason(config) -> Optional[str]:
    """Why the bench tests skip in this session, or None when they run."""
    if not _option(config, "--benchmark", False):
        return "benchmarks run only with --benchmark (pytest bench/ --benchmark)"
    if _option(config, "--benchmark-device", "cuda") == "cuda" and not torch.cuda.is_available():
        return "benchmarks need a CUDA GPU (torch.cuda.is_available() is False)"
    return None


def _in_bench(item) -> bool:
    return BENCH_DIR in Path(str(item.fspath)).resolve().parents


def pytest_generate_tests(metafunc):
    table = getattr(metafunc.module, "TABLE", None)
    if "case" in metafunc.fixturenames and isinstance(table, harness.OpSpec):
        cases = table.cases(scope_of(metafunc.config))
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def pytest_collection_modifyitems(config, items):
    reason = skip_reason(config)
    slots = [i for i, item in enumerate(items) if _in_bench(item)]
    ordered = sorted((items[i] for i in slots), key=_file_rank)  # stable: table order within a file
    for i, item in zip(slots, ordered):
        items[i] = item
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
            continue
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        group = case.group if isinstance(case, harness.Case) else None
        item.add_marker(pytest.mark.benchmark(timer=measure.gpu_clock, group=group))


def _file_rank(item) -> int:
    name = Path(str(item.fspath)).name
    return FILE_ORDER.index(name) if name in FILE_ORDER else len(FILE_ORDER)


class BenchSession:
    """What every case of the run shares: device, NVML, copy bandwidth, the results file."""

    def __init__(self, config) -> None:
        on_gpu = _option(config, "--benchmark-device", "cuda") == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        self.scope = scope_of(config)
        self.nvml = measure.Nvml(self.device)
        self.bandwidth = measure.copy_bandwidth(self.device, nbytes=(1 << 30) if on_gpu else (32 << 20))
        env = environment(
            self.device,
            timer="CUDA events" if on_gpu else "wall clock (--benchmark-device=cpu: a wiring test, not a benchmark)",
            copy_bandwidth_bytes_per_s=self.bandwidth,
            nvml=self.nvml.info(),
            nvml_error=self.nvml.error,
        )
        directory = Path(_option(config, "--benchmark-results", str(BENCH_DIR / "results")))
        self.results = Results(env, self.scope, result_path(directory, env["device"], self.scope))

    def run(self, spec: harness.OpSpec, case: harness.Case, runner) -> dict:
        return harness.run_case(
            spec, case, self.device, settings=spec.settings_for(self.scope), runner=runner,
            nvml=self.nvml, copy_bandwidth=self.bandwidth,
        )


@pytest.fixture(scope="session")
def bench_session(request) -> BenchSession:
    session = BenchSession(request.config)
    request.config.stash[_SESSION] = session
    return session


@pytest.fixture
def bench_run(benchmark, bench_session):
    """``bench_run(TABLE, case)``: run and record one case; skip with the reason if it cannot run.

    Timing goes through ``benchmark.pedantic`` (fixed rounds, warm-up rounds excluded)
    on the GPU clock; the record lands in the results file and its headline numbers in
    ``benchmark.extra_info``. A provider whose output disagrees with the baseline fails
    the test after its numbers are recorded.
    """

    def runner(target, rounds: int, warmup: int) -> None:
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup, iterations=1)

    def run(spec: harness.OpSpec, case: harness.Case) -> dict:
        try:
            record = bench_session.run(spec, case, runner)
        except harness.CaseSkipped as skip:
            bench_session.results.add(harness.base_record(case, skip.status, skip.reason))
            pytest.skip(skip.reason)
        except Exception as exc:
            bench_session.results.add(harness.base_record(case, "error", f"{type(exc).__name__}: {exc}"[-2000:]))
            raise
        bench_session.results.add(record)
        benchmark.extra_info.update(harness.summary_fields(record))
        print(harness.describe(record))
        check = record.get("check")
        if check is not None and not check["ok"]:
            pytest.fail(f"{case.id}: output differs from {check['against']}: relative error "
                        f"{check['rel_err']:.3e} > {check['tolerance']:.0e}")
        return record

    return run


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = config.stash.get(_SESSION, None)
    if session is None or not session.results.data["cases"]:
        return
    from bench.report import markdown

    terminalreporter.write_sep("=", "m2f benchmark results")
    terminalreporter.write_line(markdown(session.results.data))
    terminalreporter.write_line(f"results: {session.results.path} (+ .md); charts and README tables: "
                                f"python -m bench.report {session.results.path}")

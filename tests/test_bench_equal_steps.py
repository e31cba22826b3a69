"""bench/equal_steps.py: variants, verdicts, the plan of runs, resuming, result files, Ctrl-C;
one real pair of micro runs end to end (the others stand in for m2f.train)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `bench` is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

from bench import equal_steps  # noqa: E402


def test_variants_by_name_and_by_flags():
    assert equal_steps.parse_variant("mask-free") == ("mask-free", ["--kernels", "fused", "--model", "mask_head=points"])
    assert equal_steps.parse_variant("six=--kernels fused --model dec_layers=6") == \
        ("six", ["--kernels", "fused", "--model", "dec_layers=6"])
    with pytest.raises(equal_steps.ArgumentError, match="unknown variant 'nope'"):
        equal_steps.parse_variant("nope")
    with pytest.raises(equal_steps.ArgumentError, match="--seed is set by bench.equal_steps"):
        equal_steps.parse_variant("x=--seed 3")
    with pytest.raises(equal_steps.ArgumentError, match="variant 'x'"):
        equal_steps.parse_variant("x=--model 'unclosed")


@pytest.mark.parametrize("argv, message", [
    (["foo"], "unknown variant 'foo'"),
    (["fused", "fused"], "variant names repeat"),
    (["fused", "--seeds", "1", "1"], "--seeds: distinct"),
    (["fused", "--steps", "0"], "--steps: at least 1"),
    (["fused", "--train-args", "--out x"], "--train-args: --out is set by"),
    pytest.param(["fused", "--device", "cuda"], "--device cuda: no CUDA GPU here",
                 marks=pytest.mark.skipif(equal_steps.torch.cuda.is_available(), reason="a GPU is here")),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        equal_steps.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_eval_every_defaults_to_five_points():
    assert equal_steps.parse_args(["fused", "--steps", "300"]).eval_every == 60
    assert equal_steps.parse_args(["fused"]).eval_every is None  # the preset's steps: m2f.train's default


@pytest.mark.parametrize("values, expected", [([60.0, 62.0], "within"), ([59.0, 60.0], "below"),
                                              ([66.0, 67.0], "above"), ([61.0, 61.0], "within")])
def test_verdict_against_the_baselines_seed_range(values, expected):
    base = equal_steps.summarize([60.0, 64.0, 62.0])
    assert base == {"n": 3, "mean": 62.0, "min": 60.0, "max": 64.0}
    assert equal_steps.verdict(equal_steps.summarize(values), base) == expected
    assert equal_steps.verdict(None, base) is None
    assert equal_steps.summarize([None, float("nan")]) is None


class FakeTrain:
    """Stands in for train_once: writes the run folder m2f.train would (a checkpoint, the log
    with evaluations) and records each command; PQ = 50 + seed (+ 5 for variant 'b')."""

    def __init__(self, fail=(), interrupt_at=None):
        self.commands, self.fail, self.interrupt_at = [], set(fail), interrupt_at

    def __call__(self, cmd, out):
        self.commands.append(cmd)
        if self.interrupt_at == len(self.commands):
            raise KeyboardInterrupt
        out = Path(out)
        name, seed = out.parent.name, int(out.name[len("seed"):])
        if (name, seed) in self.fail:
            return {"out": str(out), "command": cmd[1:], "wall_s": 1.0, "curve": [], "it_s": None, "steps": 4,
                    "status": "failed", "final": None, "error": "exit status 1: boom"}
        (out / "checkpoint.pt").write_bytes(b"x")
        pq = 50.0 + seed + (5.0 if name == "b" else 0.0)
        records = [{"step": 2, "loss": 1.0, "it_s": 3.0}, {"step": 2, "eval": {"PQ": pq - 1, "mIoU": 1.0}},
                   {"step": 4, "eval": {"PQ": pq, "mIoU": 2.0}}]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / "config.json").write_text(json.dumps({"steps": 4}))
        return {"out": str(out), "command": cmd[1:], "wall_s": 1.0, **equal_steps.read_run(str(out)),
                "status": "ok", "final": {"PQ": pq, "mIoU": 2.0}}


def _main(tmp_path, monkeypatch, fake, *variants, extra=()):
    monkeypatch.setattr(equal_steps, "train_once", fake)
    return equal_steps.main([*variants, "--seeds", "0", "1", "--steps", "4", "--device", "cpu",
                             "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), *extra])


def _result(tmp_path) -> dict:
    newest = sorted((tmp_path / "out").glob("*.json"), key=lambda p: p.stat().st_mtime)[-1]
    return json.loads(newest.read_text())


def test_runs_every_seed_of_every_variant_and_writes_the_results(tmp_path, monkeypatch, capsys):
    fake = FakeTrain()
    assert _main(tmp_path, monkeypatch, fake, "a=--kernels reference", "b=--kernels fused") == 0
    # seeds outermost; each new run gets its flags, the device and the evaluation points
    assert [(c[c.index("--out") + 1].split("/")[-2:]) for c in fake.commands] == \
        [["a", "seed0"], ["b", "seed0"], ["a", "seed1"], ["b", "seed1"]]
    first = fake.commands[0]
    assert first[1:3] == ["-m", "m2f.train"] and "--resume" not in first
    for flag, value in (("--kernels", "reference"), ("--seed", "0"), ("--steps", "4"), ("--eval-every", "1"),
                        ("--device", "cpu"), ("--keep-checkpoints", "1")):
        assert first[first.index(flag) + 1] == value
    data = _result(tmp_path)
    assert data["schema"] == equal_steps.SCHEMA and data["settings"]["baseline"] == "a"
    assert data["variants"]["a"]["summary"] == {"n": 2, "mean": 50.5, "min": 50.0, "max": 51.0}
    assert data["variants"]["b"]["verdict"] == "above" and data["variants"]["a"]["verdict"] is None
    assert data["variants"]["b"]["runs"]["1"]["curve"] == [[2, {"PQ": 55.0, "mIoU": 1.0}], [4, {"PQ": 56.0, "mIoU": 2.0}]]
    stem = tmp_path / "out" / Path(next((tmp_path / "out").glob("*.json")).name).stem
    md = stem.with_suffix(".md").read_text()
    assert "| b | `--kernels fused` | 0: 55.0, 1: 56.0 | 55.5 | 55.0 - 56.0 | above |" in md
    assert stem.with_suffix(".png").stat().st_size > 0
    assert "[4/4] b seed 1 ... PQ 56.0" in capsys.readouterr().out


def test_a_second_call_resumes_the_same_runs_and_refuses_other_flags(tmp_path, monkeypatch, capsys):
    assert _main(tmp_path, monkeypatch, FakeTrain(), "a=--kernels reference") == 0
    again = FakeTrain()
    assert _main(tmp_path, monkeypatch, again, "a=--kernels reference") == 0
    # m2f.train takes a resumed run's flags from its checkpoint: only the run folder and our own flags
    assert all(c[3:6] == ["--out", c[4], "--resume"] and "--kernels" not in c for c in again.commands)
    assert "(finished before)" in capsys.readouterr().out
    other = FakeTrain()
    assert _main(tmp_path, monkeypatch, other, "a=--kernels fused") == 2
    assert other.commands == []  # checked before anything runs
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a run of other flags (--preset tiny --kernels reference" in err[0]


def test_a_failed_run_is_recorded_and_the_others_go_on(tmp_path, monkeypatch):
    assert _main(tmp_path, monkeypatch, FakeTrain(fail={("b", 0)}), "a=--kernels reference", "b=--kernels fused") == 1
    data = _result(tmp_path)
    assert data["variants"]["b"]["runs"]["0"]["status"] == "failed"
    assert data["variants"]["b"]["summary"]["n"] == 1 and data["variants"]["a"]["summary"]["n"] == 2
    stem = next((tmp_path / "out").glob("*.md"))
    assert "- b seed 0: exit status 1: boom" in stem.read_text()


def test_ctrl_c_keeps_the_finished_runs(tmp_path, monkeypatch, capsys):
    assert _main(tmp_path, monkeypatch, FakeTrain(interrupt_at=3), "a=--kernels reference", "b=--kernels fused") == 130
    data = _result(tmp_path)
    assert sorted(data["variants"]["a"]["runs"]) == ["0"] and sorted(data["variants"]["b"]["runs"]) == ["0"]
    assert "the same command resumes" in capsys.readouterr().err


def test_real_micro_runs_end_to_end(tmp_path, capsys):
    argv = ["mask-logits", "--seeds", "0", "--train-args", "--preset micro --eval-images 2", "--device", "cpu",
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    assert equal_steps.main(argv) == 0
    run = _result(tmp_path)["variants"]["mask-logits"]["runs"]["0"]
    assert run["status"] == "ok" and run["steps"] == 2 and run["curve"][-1][0] == 2 and "PQ" in run["final"]
    assert equal_steps.main(argv) == 0  # read back from the finished run, not trained again
    assert "(finished before)" in capsys.readouterr().out
    assert _result(tmp_path)["variants"]["mask-logits"]["runs"]["0"]["final"] == run["final"]


_CHILD = """
import signal, sys, time
signal.signal(signal.SIGINT, {handler})
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("handler, code", [("lambda *a: sys.exit(130)", 130), ("signal.SIG_IGN", -15)])
def test_stop_child_interrupts_then_terminates(handler, code):
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(handler=handler)], stdout=subprocess.PIPE,
                             start_new_session=True, text=True)
    assert child.stdout.readline().strip() == "ready"
    equal_steps.stop_child(child, grace_s=0.5)  # SIGINT; where ignored, SIGTERM after the grace
    assert child.returncode == code

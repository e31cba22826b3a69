"""m2f.train / m2f.evaluate when things go wrong, on the CPU: SIGINT / SIGTERM write a checkpoint
and exit 130 / 143, a SIGKILL in a checkpoint write and a full disk keep the previous one, the
last k checkpoints carry a sha256 record and --resume takes the newest valid one, a torchrun
restart resumes by itself, and missing data or bad checkpoints are one-line errors that
create nothing."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import m2f.evaluate as evaluate_mod
import m2f.train as train_mod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = ["--preset", "micro", "--device", "cpu", "--num-workers", "0", "--eval-images", "2", "--batch-size", "2",
         "--log-every", "1"]
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture(autouse=True)
def quiet_and_isolated(monkeypatch):
    """No plots (matplotlib takes seconds), the global RNGs restored afterwards, no torchrun
    restart count inherited from the environment."""
    import random

    for name in ("save_predictions", "save_loss_curve"):
        monkeypatch.setattr(train_mod, name, lambda *a, **k: None)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


def read_log(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def same_model(a, b):
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def run_folder_files(run):
    return sorted(os.listdir(run))


def start_cli(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "m2f.train"] + args, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for_first_step(proc, run, timeout=120):
    """Until metrics.jsonl has a training record (the first logged step)."""
    log = os.path.join(run, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.returncode}\n{proc.stderr.read()[-3000:]}")
        if os.path.exists(log) and any("loss" in r for r in read_log(run)):
            return
        time.sleep(0.02)
    raise AssertionError("no logged step")


# ----------------------------------------------------------------------------- signals


def test_sigint_finishes_the_step_saves_and_resume_continues(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, DataLoader workers included) with the default
    --ckpt-every 500 > steps: a checkpoint of the finished step, the resume command, exit 130,
    no traceback; --resume continues to the end."""
    run = str(tmp_path / "run")
    proc = start_cli(MICRO + ["--num-workers", "1", "--steps", "16", "--out", run], start_new_session=True)
    wait_for_first_step(proc, run)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    ckpt = load(os.path.join(run, "checkpoint.pt"))
    stopped = ckpt["step"]
    assert 1 <= stopped < 16
    assert f"SIGINT: stopped after step {stopped} of 16" in err
    assert f"continue with: python -m m2f.train --out {run} --resume --device cpu" in err
    assert [r["step"] for r in read_log(run)] == list(range(1, stopped + 1))

    train_mod.main(["--out", run, "--resume", "--device", "cpu"])
    assert load(os.path.join(run, "checkpoint.pt"))["step"] == 16
    log = read_log(run)
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 17)) and "eval" in log[-1]


def test_sigterm_saves_exits_143_and_the_resumed_run_is_the_uninterrupted_one(tmp_path):
    args = MICRO + ["--steps", "16", "--seed", "3"]
    run, straight = str(tmp_path / "run"), str(tmp_path / "straight")
    proc = start_cli(args + ["--out", run])
    wait_for_first_step(proc, run)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "SIGTERM: stopped after step" in err and "--resume" in err
    assert load(os.path.join(run, "checkpoint.pt"))["step"] < 16

    train_mod.main(["--out", run, "--resume", "--device", "cpu"])
    train_mod.main(args + ["--out", straight])
    a, b = load(os.path.join(straight, "checkpoint.pt")), load(os.path.join(run, "checkpoint.pt"))
    assert b["step"] == 16 and same_model(a, b)
    assert [r.get("loss") for r in read_log(run)] == [r.get("loss") for r in read_log(straight)]


def test_a_second_signal_stops_at_once_and_signals_outside_steps_raise():
    control = train_mod.StopControl()
    with pytest.raises(train_mod.Interrupted):  # before the first step: nothing to finish
        control._handle(signal.SIGINT, None)
    control = train_mod.StopControl()
    control.immediate = False
    control._handle(signal.SIGTERM, None)  # in a step: noted, the loop finishes it
    assert control.poll(train_mod.Env(0, 1, 0, torch.device("cpu"))) == (signal.SIGTERM, False)
    with pytest.raises(train_mod.Interrupted) as info:
        control._handle(signal.SIGINT, None)
    assert info.value.again


def test_stop_during_the_final_evaluation_and_resume_evaluates(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    real_eval = train_mod.run_eval

    def interrupted_eval(*a, **k):
        raise train_mod.Interrupted(signal.SIGINT)

    monkeypatch.setattr(train_mod, "run_eval", interrupted_eval)
    with pytest.raises(SystemExit) as info:
        train_mod.main(MICRO + ["--steps", "2", "--out", run])
    assert info.value.code == 130
    assert load(os.path.join(run, "checkpoint.pt"))["step"] == 2
    assert not any("eval" in r for r in read_log(run))
    monkeypatch.setattr(train_mod, "run_eval", real_eval)
    metrics = train_mod.main(["--out", run, "--resume", "--device", "cpu"])
    assert "mIoU" in metrics and read_log(run)[-1]["step"] == 2 and read_log(run)[-1]["eval"].keys() == metrics.keys()
    again = train_mod.main(["--out", run, "--resume", "--device", "cpu"])  # complete: nothing to do
    assert again == pytest.approx(metrics, nan_ok=True) and len(read_log(run)) == len([1, 2]) + 1


# ----------------------------------------------------------------------------- checkpoint files


def test_time_based_cadence_keeps_the_last_k_with_sha256_records(tmp_path):
    from m2f.checkpoint import sha256_file

    assert train_mod.resolve_config(train_mod.parse_args([]))["ckpt_minutes"] == 10  # by default
    assert train_mod.resolve_config(train_mod.parse_args([]))["keep_checkpoints"] == 3
    run = str(tmp_path / "run")
    # --ckpt-minutes 1e-9: a checkpoint after every step, though --ckpt-every is 1000
    train_mod.main(MICRO + ["--steps", "4", "--ckpt-every", "1000", "--ckpt-minutes", "1e-9",
                            "--keep-checkpoints", "3", "--out", run])
    names = [n for n in run_folder_files(run) if n.startswith("checkpoint")]
    assert names == ["checkpoint.pt", "checkpoint.pt.sha256", "checkpoint_0000002.pt", "checkpoint_0000002.pt.sha256",
                     "checkpoint_0000003.pt", "checkpoint_0000003.pt.sha256"]
    for name, step in (("checkpoint.pt", 4), ("checkpoint_0000003.pt", 3), ("checkpoint_0000002.pt", 2)):
        path = os.path.join(run, name)
        assert load(path)["step"] == step
        with open(path + ".sha256") as f:
            assert f.read() == f"{sha256_file(path)}  {name}\n"  # sha256sum -c format


def test_resume_takes_the_newest_valid_checkpoint_and_says_what_it_skipped(tmp_path, capsys):
    run = str(tmp_path / "run")
    train_mod.main(MICRO + ["--steps", "4", "--ckpt-every", "1", "--out", run])
    final = load(os.path.join(run, "checkpoint.pt"))
    with open(os.path.join(run, "checkpoint.pt"), "r+b") as f:  # truncated
        f.truncate(1000)
    older = os.path.join(run, "checkpoint_0000003.pt")
    stat = os.stat(older)
    with open(older, "r+b") as f:  # one byte flipped in place (bit rot: same size and time)
        f.seek(stat.st_size // 2)
        byte = f.read(1)
        f.seek(stat.st_size // 2)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(older, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    capsys.readouterr()

    train_mod.main(["--out", run, "--resume", "--device", "cpu"])
    out = capsys.readouterr().out
    assert f"skipped {os.path.join(run, 'checkpoint.pt')}: cannot be read" in out
    assert f"skipped {older}: damaged: its sha256" in out
    assert f"resuming {run} at step 2 of 4 from {os.path.join(run, 'checkpoint_0000002.pt')}" in out
    again = load(os.path.join(run, "checkpoint.pt"))
    assert again["step"] == 4 and same_model(final, again)  # the steps redone give the same model
    assert [n for n in run_folder_files(run) if n.endswith(".pt")] == [
        "checkpoint.pt", "checkpoint_0000002.pt", "checkpoint_0000003.pt"]
    assert load(older)["step"] == 3  # rewritten by the resumed run

    for name in ("checkpoint.pt", "checkpoint_0000002.pt", "checkpoint_0000003.pt"):
        with open(os.path.join(run, name), "wb") as f:
            f.write(b"not a checkpoint")
    with pytest.raises(SystemExit) as info:
        train_mod.main(["--out", run, "--resume", "--device", "cpu"])
    message = str(info.value)
    assert message.startswith(f"--resume: no valid checkpoint in {run}: checkpoint.pt: cannot be read")
    assert "checkpoint_0000002.pt: cannot be read" in message and "\n" not in message


def test_disk_full_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            with open(f, "wb") as fh:
                fh.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as info:
        train_mod.main(MICRO + ["--steps", "3", "--ckpt-every", "1", "--out", run])
    monkeypatch.setattr(torch, "save", real_save)
    message = str(info.value)
    assert message == (f"m2f.train: cannot write the checkpoint of step 2 (No space left on device); the previous "
                       f"checkpoint is kept ({os.path.join(run, 'checkpoint.pt')}, step 1); continue with: "
                       f"python -m m2f.train --out {run} --resume --device cpu")
    assert [n for n in run_folder_files(run) if n.startswith("checkpoint")] == [
        "checkpoint.pt", "checkpoint.pt.sha256"]  # no temporary file
    assert load(os.path.join(run, "checkpoint.pt"))["step"] == 1
    train_mod.main(["--out", run, "--resume", "--device", "cpu"])
    assert load(os.path.join(run, "checkpoint.pt"))["step"] == 3


def test_torchrun_restart_after_a_sigkill_in_a_checkpoint_write_resumes_by_itself(tmp_path):
    """torchrun --max-restarts=1: the first attempt is SIGKILLed half-way through writing its
    second checkpoint; the restarted job finds the first one intact, resumes from it by itself
    (saying so), removes the torn temporary file and ends as the uninterrupted run."""
    wrapper = tmp_path / "killed_in_a_write.py"
    wrapper.write_text(textwrap.dedent("""
        import os, signal, sys
        import torch
        if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
            real_save, calls = torch.save, []
            def dying_save(obj, f, *a, **k):
                calls.append(1)
                if len(calls) == 2:
                    with open(f, "wb") as fh:
                        fh.write(b"half a checkpoint")
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_save(obj, f, *a, **k)
            torch.save = dying_save
        from m2f.train import main
        main(sys.argv[1:])
    """))
    args = MICRO + ["--steps", "3", "--ckpt-every", "1", "--seed", "5"]
    run, straight = str(tmp_path / "run"), str(tmp_path / "straight")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           "--max-restarts=1", "--monitor-interval=0.1", str(wrapper), "--out", run] + args,
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"torchrun restart 1: resuming automatically from {os.path.join(run, 'checkpoint.pt')} (step 1)" \
        in proc.stdout, proc.stdout[-3000:]
    assert not [n for n in run_folder_files(run) if ".tmp" in n]
    train_mod.main(args + ["--out", straight])
    a, b = load(os.path.join(straight, "checkpoint.pt")), load(os.path.join(run, "checkpoint.pt"))
    assert b["step"] == 3 and same_model(a, b)
    assert [r.get("loss") for r in read_log(run)] == [r.get("loss") for r in read_log(straight)]


# ----------------------------------------------------------------------------- one-line errors


def write_coco_annotations_only(root):
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "panoptic_train2017.json").write_text("{}")


@pytest.mark.parametrize("dataset, make_root, message", [
    ("coco_panoptic", None, "coco_panoptic data root {root} does not exist; it should hold "
                            "annotations/panoptic_train2017.json, annotations/panoptic_train2017/*.png and "
                            "train2017/*.jpg"),
    ("coco_panoptic", lambda root: root.mkdir(), "coco_panoptic: no train annotation file: expected "
                                                 "{root}/annotations/panoptic_train2017.json"),
    ("coco_panoptic", write_coco_annotations_only,
     "coco_panoptic: no train panoptic PNG folder: expected {root}/annotations/panoptic_train2017 or "
     "{root}/panoptic_train2017"),
    ("ade20k", lambda root: root.mkdir(), "ade20k: no train image folder: expected {root}/images/training"),
])
def test_missing_data_is_one_line_and_creates_no_run_folder(tmp_path, dataset, make_root, message):
    root, run = tmp_path / "data", tmp_path / "run"
    if make_root:
        make_root(root)
    argv = MICRO + ["--dataset", dataset, "--data-root", str(root), "--out", str(run)]
    with pytest.raises(SystemExit) as info:
        train_mod.main(argv)
    assert message.format(root=root) in str(info.value) and "\n" not in str(info.value)
    assert not run.exists()
    with pytest.raises(FileNotFoundError):  # --debug: the exception itself
        train_mod.main(argv + ["--debug"])


@pytest.mark.parametrize("module, flag, value, bound", [
    (train_mod, "--steps", "0", "an integer >= 1"), (train_mod, "--batch-size", "-2", "an integer >= 1"),
    (train_mod, "--image-size", "16", "an integer >= 32"), (train_mod, "--seed", "-1", "an integer >= 0"),
    (train_mod, "--lr", "-1e-4", "a number >= 0.0"), (train_mod, "--ckpt-minutes", "nan", "a number >= 0.0"),
    (train_mod, "--keep-checkpoints", "0", "an integer >= 1"), (train_mod, "--log-every", "x", "an integer >= 1"),
    (evaluate_mod, "--eval-images", "0", "an integer >= 1"),
])
def test_out_of_range_numbers_are_usage_errors_naming_the_flag(capsys, module, flag, value, bound):
    with pytest.raises(SystemExit) as info:
        module.parse_args([f"{flag}={value}"] + (["--run", "x"] if module is evaluate_mod else []))
    assert info.value.code == 2
    assert f"argument {flag}: must be {bound}, got {value!r}" in capsys.readouterr().err


def test_model_override_of_the_wrong_type_is_one_line_and_creates_nothing(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        train_mod.main(MICRO + ["--model", "max_targets=abc", "--out", str(run)])
    assert "override max_targets must be Optional[int], got 'abc'" in str(info.value)
    assert "\n" not in str(info.value) and not run.exists()


class _RunsCode:
    """Unpickling this calls os.mkdir(path): what a weights-only load must refuse."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_checkpoints_load_weights_only_and_older_ones_still_resume(tmp_path):
    run = str(tmp_path / "run")
    train_mod.main(MICRO + ["--steps", "2", "--ckpt-every", "1", "--keep-checkpoints", "2", "--out", run])
    ckpt = torch.load(os.path.join(run, "checkpoint.pt"), map_location="cpu", weights_only=True)  # no allowlist
    assert isinstance(ckpt["rng"][0]["numpy"][1], torch.Tensor)
    # a checkpoint from before: numpy's RNG keys as an ndarray; it loads and resumes the same run
    step1 = torch.load(os.path.join(run, "checkpoint_0000001.pt"), map_location="cpu", weights_only=True)
    name, keys, *rest = step1["rng"][0]["numpy"]
    old = tmp_path / "old.pt"
    torch.save(dict(step1, rng=[dict(step1["rng"][0], numpy=(name, keys.numpy().astype(np.uint32), *rest))]), old)
    resumed = str(tmp_path / "resumed")
    train_mod.main(["--resume", str(old), "--out", resumed, "--device", "cpu"])
    final = torch.load(os.path.join(resumed, "checkpoint.pt"), map_location="cpu", weights_only=True)
    for key, value in ckpt["model"].items():
        assert torch.equal(value, final["model"][key]), key


def test_bad_checkpoints_are_one_line_errors_that_create_nothing(tmp_path):
    run = str(tmp_path / "run")
    train_mod.main(MICRO + ["--steps", "1", "--out", run])
    ckpt = load(os.path.join(run, "checkpoint.pt"))
    new = str(tmp_path / "new")

    def refused(path, *extra):
        with pytest.raises(SystemExit) as info:
            train_mod.main(["--resume", str(path), "--out", new, "--device", "cpu", *extra])
        assert not os.path.exists(new)  # refused before anything was written
        assert "\n" not in str(info.value)
        return str(info.value)

    missing = tmp_path / "missing.pt"
    assert refused(missing) == f"--resume: {missing}: no such file"
    with pytest.raises(SystemExit, match=f"^--resume: no checkpoint in {tmp_path / 'nothing'} "):
        train_mod.main(["--resume", "--out", str(tmp_path / "nothing")])

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(os.path.join(run, "checkpoint.pt"), "rb").read()[:5000])
    assert refused(truncated).startswith(f"--resume: {truncated}: cannot be read (")

    foreign = tmp_path / "foreign.pt"
    torch.save({"model": ckpt["model"]}, foreign)
    assert refused(foreign) == (f"--resume: {foreign}: not an m2f.train checkpoint: it has no 'config', 'step', "
                                "'optimizer', 'scheduler', 'scaler', 'rng'")

    old = tmp_path / "old_config.pt"
    torch.save(dict(ckpt, config={k: v for k, v in ckpt["config"].items() if k != "image_size"}), old)
    assert refused(old) == (f"--resume: {old}: incompatible: its configuration has no image_size "
                            "(written by another version of m2f.train?)")

    other = tmp_path / "other_model.pt"
    model = dict(ckpt["model"])
    key = "sem_seg_head.predictor.class_embed.weight"
    model[key] = torch.zeros(5, model[key].shape[1])
    dropped = sorted(model)[0]
    del model[dropped]
    torch.save(dict(ckpt, model=model), other)
    message = refused(other)
    assert message.startswith(f"--resume: {other}: the checkpoint's model does not match the model")
    assert f"missing keys (1): {dropped}" in message
    assert f"shape mismatches (1): {key}: file (5, 32) vs model ({ckpt['model'][key].shape[0]}, 32)" in message

    assert "lr (saved 0.001, given 0.5)" in refused(os.path.join(run, "checkpoint.pt"), "--lr", "0.5")

    marker = tmp_path / "code_ran"
    code = tmp_path / "code.pt"
    torch.save(dict(ckpt, step=_RunsCode(str(marker))), code)  # a pickle that would create a folder
    assert refused(code).startswith(f"--resume: {code}: cannot be read (")
    assert not marker.exists()

    coco = tmp_path / "coco.pt"
    torch.save(dict(ckpt, config=dict(ckpt["config"], dataset="coco_panoptic", data_root=str(missing))), coco)
    with pytest.raises(SystemExit, match=f"^m2f.evaluate: no checkpoint in {tmp_path / 'nothing'} "):
        evaluate_mod.main(["--run", str(tmp_path / "nothing"), "--device", "cpu"])
    for bad, expected in ((missing, "no such file"), (truncated, "cannot be read ("), (other, "shape mismatches (1)"),
                          (coco, f"coco_panoptic data root {missing} does not exist")):
        with pytest.raises(SystemExit) as info:
            evaluate_mod.main(["--checkpoint", str(bad), "--device", "cpu", "--eval-images", "2"])
        assert str(info.value).startswith("m2f.evaluate: ") and expected in str(info.value)
        assert "\n" not in str(info.value)


def test_bad_weights_files_are_one_line_errors_that_create_nothing(tmp_path):
    run = tmp_path / "run"
    torn, foreign = tmp_path / "torn.pth", tmp_path / "foreign.pth"
    torn.write_bytes(b"PK\x03\x04 half a file")
    torch.save({"conv1.weight": torch.zeros(3)}, foreign)
    for weights, message in ((tmp_path / "missing.pth", "no such file"), (torn, "cannot read it ("),
                             (foreign, "backbone weights does not match the model; missing keys (")):
        with pytest.raises(SystemExit) as info:
            train_mod.main(MICRO + ["--weights", str(weights), "--out", str(run)])
        assert str(info.value).startswith(f"--weights {weights}: {message}") and "\n" not in str(info.value)
        assert not run.exists()


def test_evaluate_run_takes_the_newest_valid_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("m2f.plots.save_predictions", lambda *a, **k: None)
    run = str(tmp_path / "run")
    train_mod.main(MICRO + ["--steps", "2", "--ckpt-every", "1", "--out", run])
    with open(os.path.join(run, "checkpoint.pt"), "wb") as f:
        f.write(b"torn")
    capsys.readouterr()
    evaluate_mod.main(["--run", run, "--device", "cpu", "--eval-images", "2", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert f"skipped {os.path.join(run, 'checkpoint.pt')}: cannot be read" in out and "step 1 val:" in out

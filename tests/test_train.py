"""The training CLI on the CPU: the loss falls, kill-and-resume is exact, torchrun (gloo) with
2 ranks computes the single process's step, the solver follows the official recipe."""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import m2f.train as train_mod
from m2f.solver import build_optimizer, build_scheduler, clip_gradients

from .conftest import fresh_seed, requires_gpu
from ._rng import keep_global_rng  # noqa: F401  (autouse fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = ["--preset", "micro", "--device", "cpu", "--num-workers", "0", "--eval-images", "4"]


def read_log(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_state(run):
    return torch.load(os.path.join(run, "checkpoint.pt"), map_location="cpu", weights_only=False)


def rel_diff(a, b) -> float:
    num = sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in b)
    den = sum((b[k].double() ** 2).sum().item() for k in b)
    return math.sqrt(num / den)


def test_tiny_model_loss_falls(tmp_path):
    run = str(tmp_path / "run")
    # 4 training images: the model can fit them in 40 steps (typically -25..-35 %)
    train_mod.main(MICRO + ["--steps", "40", "--batch-size", "4", "--train-images", "4", "--log-every", "1",
                            "--seed", str(fresh_seed()), "--out", run])
    losses = [r["loss"] for r in read_log(run) if "loss" in r]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < 0.85 * first, f"loss {first:.2f} -> {last:.2f}"
    plots = os.listdir(os.path.join(run, "plots"))
    assert "loss.png" in plots and any(p.startswith("predictions_") for p in plots)


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in the CLI catches it."""


@pytest.mark.parametrize("amp", ["off", "fp16"])  # fp16: the loss scaler's scale and growth tracker too
def test_kill_and_resume_equals_uninterrupted_run(tmp_path, monkeypatch, amp):
    seed = fresh_seed()
    args = MICRO + ["--steps", "6", "--batch-size", "2", "--ckpt-every", "2", "--log-every", "1",
                    "--seed", str(seed), "--amp", amp]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    train_mod.main(args + ["--out", straight])

    real_step, calls = train_mod.train_step, []

    def dying_step(*a, **k):
        calls.append(1)
        if len(calls) == 5:  # step 5 starts: the checkpoint of step 4 exists, steps 5-6 are lost
            raise Killed()
        return real_step(*a, **k)

    monkeypatch.setattr(train_mod, "train_step", dying_step)
    with pytest.raises(Killed):
        train_mod.main(args + ["--out", killed])
    monkeypatch.setattr(train_mod, "train_step", real_step)
    assert final_state(killed)["step"] == 4
    torch.manual_seed(seed + 1)  # the resumed process starts with other RNG states
    np.random.seed(seed + 1)
    train_mod.main(["--out", killed, "--resume", "--device", "cpu"])

    a, b = final_state(straight), final_state(killed)
    assert b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"parameter {k} differs after resuming"
    assert a["scaler"] == b["scaler"]
    log_a, log_b = read_log(straight), read_log(killed)
    assert [r["step"] for r in log_b] == [r["step"] for r in log_a]  # no duplicated or missing records
    assert [r.get("loss") for r in log_b] == [r.get("loss") for r in log_a]


@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_a_nonfinite_loss_ends_the_run_naming_its_step_and_no_checkpoint_holds_it(tmp_path, monkeypatch, amp):
    """detectron2 raises FloatingPointError at the step whose loss is not finite. m2f.train
    checks at each log and before each checkpoint (no host sync per step): the run ends with
    one line naming the step, the last checkpoint is the step before (not one whose weights
    took the NaN update, from which a resume would fail at once), and the next step's failure
    on the NaN weights (the matcher's NaN costs) is reported as the non-finite loss."""
    run = str(tmp_path / "run")
    real, calls = train_mod.total_loss, []

    def nan_at_step_2(losses):
        calls.append(1)
        loss = real(losses)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(train_mod, "total_loss", nan_at_step_2)
    with pytest.raises(SystemExit, match=r"^m2f.train: FloatingPointError: the training loss is nan at step 2 "):
        train_mod.main(MICRO + ["--steps", "4", "--ckpt-every", "1", "--log-every", "10", "--amp", amp,
                                "--out", run])
    state = final_state(run)
    assert state["step"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_fp16_step_clips_unscaled_gradients_and_skips_nonfinite_ones():
    """detectron2's AMPTrainer with the official full-model clipping, which runs inside the
    optimizer's step (after GradScaler.step unscales): the clipping sees the true gradients
    (clipping scaled ones would clip at 0.01 x scale), and a step with an inf gradient changes
    no parameter nor AdamW's step count (the fused AdamW takes the scaler's found_inf) and
    halves the scale; the schedule still steps (detectron2's LRScheduler hook does)."""
    from bench.m2f_testing import TINY, random_images, random_targets
    from m2f import build_model

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    model = build_model("resnet18", kernels="fused", **TINY).train()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, lr=1e-3, device=cpu)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)  # no overflow of its own in the first step
    images, targets = random_images(2, 64, 64), random_targets(2, TINY["num_classes"], 64, 64)
    seen = {}

    def grad_norm_at_step(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        seen["norm"] = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()

    optimizer.register_step_pre_hook(grad_norm_at_step)
    scheduler = build_scheduler(optimizer, 10)

    def train_step(amp="fp16", optimizer=optimizer, scheduler=scheduler, scaler=scaler):
        batch = {"images": images, "targets": targets}
        return train_mod.train_step(model, batch, optimizer, scheduler, scaler, cpu, amp,
                                    torch.Generator().manual_seed(0))

    fp32 = build_optimizer(model, lr=1e-3, device=cpu)
    no_scaler = torch.amp.GradScaler("cpu", enabled=False)
    fp32_norm = train_step("off", fp32, build_scheduler(fp32, 10), no_scaler)["grad_norm"].item()
    model.load_state_dict(initial)
    stats = train_step()
    assert stats["grad_norm"].item() == pytest.approx(fp32_norm, rel=2e-2) and fp32_norm > 1.0
    assert seen["norm"] == pytest.approx(0.01, rel=1e-3)
    assert scaler.get_scale() == 2.0 ** 4 and {int(s["step"]) for s in optimizer.state.values()} == {1}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(p for p in model.parameters() if p.requires_grad)
    hook = first.register_hook(lambda g: g * float("inf"))
    lr = optimizer.param_groups[0]["lr"]
    stats = train_step()
    hook.remove()
    assert not math.isfinite(stats["grad_norm"].item()) and math.isfinite(stats["loss"].item())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {int(s["step"]) for s in optimizer.state.values()} == {1} and scaler.get_scale() == 2.0 ** 3
    assert optimizer.param_groups[0]["lr"] < lr


def test_resume_refuses_changes_and_evaluate_reproduces_the_final_eval(tmp_path):
    from m2f.evaluate import main as evaluate_main

    run = str(tmp_path / "run")
    train_mod.main(MICRO + ["--steps", "1", "--out", run])
    with pytest.raises(SystemExit, match="lr"):
        train_mod.main(["--out", run, "--resume", "--lr", "0.5"])
    metrics = evaluate_main(["--run", run, "--eval-images", "4", "--device", "cpu", "--batch-size", "2"])
    final = read_log(run)[-1]["eval"]
    assert metrics == pytest.approx(final, nan_ok=True)
    assert os.path.exists(os.path.join(run, "eval.json")) and os.path.exists(os.path.join(run, "predictions_val.png"))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    train_mod.atomic_save({"step": 1}, path)

    def torn_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        train_mod.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["step"] == 1


@pytest.mark.slow
def test_torchrun_two_ranks_match_single_process(tmp_path):
    """2 gloo ranks x 1 image == 1 process x 2 images: same loss, gradient norm and parameters.

    Whole-mask losses (no random points) and no-object weight 1, so the class loss is a plain
    mean: with the official 0.1 weight each rank normalises by its own weight sum, and DDP's
    average of per-rank means is (officially) not the global weighted mean.
    """
    seed = str(fresh_seed())
    common = ["--steps", "2", "--batch-size", "2", "--mask-loss", "full", "--log-every", "1", "--seed", seed,
              "--model", "no_object_weight=1.0", "--preset", "micro", "--device", "cpu", "--num-workers", "0",
              "--eval-images", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ddp_run, single_run = str(tmp_path / "ddp"), str(tmp_path / "single")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "m2f.train", "--out", ddp_run] + common,
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # one thread as the ranks run: other reduction orders can flip a near-tie in the matching
    # (equal losses, other gradients)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_mod.main(common + ["--out", single_run])
    finally:
        torch.set_num_threads(threads)

    ddp, single = read_log(ddp_run), read_log(single_run)
    # grad_norm and the weights: the random backbone's conv weight gradients are sums with heavy
    # cancellation, which batch-1 and batch-2 convolutions add in other orders (up to ~7e-4
    # apart per tensor; after two AdamW steps the weights ~2e-5 apart); a wrong normalisation
    # across ranks is off by a factor
    tolerance = {"loss": 1e-4, "loss_ce": 1e-4, "loss_mask": 1e-4, "loss_dice": 1e-4, "grad_norm": 2e-3}
    for d, s in zip(ddp[:2], single[:2]):
        assert d["step"] == s["step"]
        for key, rel in tolerance.items():
            assert d[key] == pytest.approx(s[key], rel=rel), f"step {d['step']} {key}: {d[key]} vs {s[key]}"
    assert rel_diff(final_state(ddp_run)["model"], final_state(single_run)["model"]) < 2e-4
    assert len(final_state(ddp_run)["rng"]) == 2  # both ranks' RNG streams are saved
    ddp_eval, single_eval = ddp[-1]["eval"], single[-1]["eval"]
    assert ddp_eval["pACC"] == pytest.approx(single_eval["pACC"], abs=0.5)  # metrics merged over both ranks


# each rank of torchrun_patched runs m2f.train with these patches; RANK_FILE gets what it saw
PATCHED_RANK = """
import os, sys, torch
import m2f.train as t
from m2f.backbone.resnet import FrozenBatchNorm2d

rank, out = int(os.environ["RANK"]), os.environ["RANK_FILE"] % int(os.environ["RANK"])
seen = {}
calibrate = t.calibrate_frozen_bn

def rank_dependent_calibration(module, *args, **kwargs):  # ranks whose statistics differ in the last bits
    calibrate(module, *args, **kwargs)
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_var.mul_(1 + 1e-4 * rank)
    with torch.no_grad():
        module(*args, **kwargs)  # as calibration's own forward: the layers' scale / bias caches hold these

train_step = t.train_step

def first_generator_state(*args, **kwargs):
    seen.setdefault("sampler", args[7].get_state().clone())  # the loss's points generator at the first step
    return train_step(*args, **kwargs)

evaluate = t.evaluate

def buffers_at_evaluation(model, *args, **kwargs):
    seen["buffers"] = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    seen["affine"] = {name: torch.cat([t.flatten() for t in m._affine(torch.float32)])  # what forward multiplies by
                      for name, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    torch.save(seen, out)
    return evaluate(model, *args, **kwargs)

t.calibrate_frozen_bn, t.train_step, t.evaluate = rank_dependent_calibration, first_generator_state, buffers_at_evaluation
t.main(sys.argv[1:])
"""


def torchrun_patched(tmp_path, args, nproc=2):
    """m2f.train under torchrun (gloo) with PATCHED_RANK -> what each rank saw."""
    script = tmp_path / "patched_rank.py"
    script.write_text(PATCHED_RANK)
    rank_file = str(tmp_path / f"rank%d_{len(list(tmp_path.glob('rank*')))}.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK_FILE=rank_file,
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(script)] + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(rank_file % r, weights_only=False) for r in range(nproc)]


@pytest.mark.slow
def test_torchrun_ranks_share_rank_0s_frozen_bn_statistics(tmp_path):
    """The frozen-BN statistics are calibrated on every rank; DDP with broadcast_buffers=False
    (detectron2's) does not sync buffers at construction: rank 0's must reach every rank, or
    ranks whose statistics differ slightly train and evaluate other models."""
    ranks = torchrun_patched(tmp_path, MICRO + ["--steps", "1", "--out", str(tmp_path / "run")])
    for what in ("buffers", "affine"):  # the statistics, and the scale / bias forward computes from them
        assert ranks[0][what].keys() == ranks[1][what].keys() and ranks[0][what], what
        for k, v in ranks[0][what].items():
            assert torch.equal(v, ranks[1][what][k]), (what, k)


@pytest.mark.slow
def test_torchrun_resume_with_more_ranks_gives_each_rank_its_own_random_points(tmp_path):
    """A 1-process checkpoint resumed by 2 ranks: rank 0 continues the saved streams, rank 1
    keeps its own (a copy of rank 0's would sample the same random points)."""
    run = str(tmp_path / "run")
    train_mod.main(MICRO + ["--steps", "2", "--ckpt-every", "1", "--keep-checkpoints", "2", "--out", run])
    step1 = os.path.join(run, "checkpoint_0000001.pt")
    saved = torch.load(step1, weights_only=False)["rng"]
    assert len(saved) == 1
    ranks = torchrun_patched(tmp_path, ["--resume", step1, "--out", str(tmp_path / "resumed"), "--device", "cpu",
                                        "--num-workers", "0"])
    assert torch.equal(ranks[0]["sampler"], saved[0]["sampler"])
    assert not torch.equal(ranks[1]["sampler"], saved[0]["sampler"])


def test_solver_follows_the_official_recipe():
    from m2f import build_model

    model = build_model("resnet18", num_classes=3, num_queries=4, backbone_width=8, hidden_dim=32, nheads=2,
                        dim_feedforward=32, dec_layers=1, enc_layers=1, enc_dim_feedforward=32)
    opt = build_optimizer(model)
    owner = {id(p): (f"{m_name}.{p_name}", m) for m_name, m in model.named_modules()
             for p_name, p in m.named_parameters(recurse=False)}
    no_decay_types = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.Embedding)
    seen_no_decay = set()
    for group in opt.param_groups:
        for p in group["params"]:
            name, module = owner[id(p)]
            assert group["lr"] == pytest.approx(1e-5 if name.startswith("backbone.") else 1e-4), name
            no_decay = isinstance(module, no_decay_types)
            if no_decay:
                seen_no_decay.add(type(module))
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert seen_no_decay == set(no_decay_types)  # the model has all three kinds
    assert isinstance(opt, torch.optim.AdamW)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}

    sched = build_scheduler(opt, max_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(max(sched.get_last_lr()))
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-4 * (1 - i / 10) ** 0.9 for i in range(10)])

    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    grads = [torch.randn(5) for _ in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    total = torch.cat(grads).norm()
    norm = clip_gradients(params, 0.01)
    assert norm == pytest.approx(total.item(), rel=1e-6)
    assert torch.cat([p.grad for p in params]).norm() == pytest.approx(0.01, rel=1e-4)  # one norm for all
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g * (0.01 / total), rtol=1e-4, atol=0)


def test_schedule_follows_the_datasets_official_config():
    """COCO configs: multi-step (detectron2's default scheduler); ADE20K configs: poly."""
    def schedule(*argv):
        return train_mod.resolve_config(train_mod.parse_args(list(argv)))["schedule"]

    assert schedule("--dataset", "coco_panoptic", "--preset", "official") == "step"
    assert schedule("--dataset", "ade20k") == "poly"
    assert schedule("--preset", "micro") == "poly"  # shapes
    assert schedule("--dataset", "coco_panoptic", "--schedule", "poly") == "poly"
    assert schedule("--dataset", "coco_panoptic", "--backbone", "mit_b0") == "poly"  # SegFormer's recipe


def test_official_preset_follows_the_datasets_official_config():
    """--preset official is the official config of the dataset and backbone: COCO panoptic (R50:
    1024 LSJ crops, 368,750 steps; Swin-L: 200 queries, 100 epochs), ADE20K semantic
    (Base-ADE20K-SemanticSegmentation.yaml: 512 crops, 160k steps, 100 queries; the Swin-B/L
    'res640' configs: 640 crops), SegFormer's ADE20K configs (512 crops; B5: 640); flags win."""
    def cfg(*argv):
        c = train_mod.resolve_config(train_mod.parse_args(["--preset", "official", *argv]))
        return c["image_size"], c["steps"], c["batch_size"], c["lr"], c["num_queries"]

    assert cfg("--dataset", "coco_panoptic") == (1024, 368_750, 16, 1e-4, 100)
    assert cfg("--dataset", "coco_panoptic", "--backbone", "swin_large") == (1024, 737_500, 16, 1e-4, 200)
    assert cfg("--dataset", "coco_panoptic", "--backbone", "swin_base") == (1024, 368_750, 16, 1e-4, 100)
    assert cfg("--dataset", "ade20k") == (512, 160_000, 16, 1e-4, 100)
    assert cfg("--dataset", "ade20k", "--backbone", "swin_t") == (512, 160_000, 16, 1e-4, 100)
    assert cfg("--dataset", "ade20k", "--backbone", "swin_base") == (640, 160_000, 16, 1e-4, 100)
    assert cfg("--dataset", "ade20k", "--backbone", "swin_l") == (640, 160_000, 16, 1e-4, 100)  # semantic: 100
    assert cfg("--dataset", "ade20k", "--image-size", "256", "--steps", "9", "--num-queries", "50") == \
        (256, 9, 16, 1e-4, 50)
    assert cfg("--dataset", "ade20k", "--backbone", "mit_b2") == (512, 160_000, 16, 6e-4, None)
    assert cfg("--dataset", "ade20k", "--backbone", "mit_b5") == (640, 160_000, 16, 6e-4, None)
    assert cfg("--dataset", "ade20k", "--backbone", "mit_b5", "--image-size", "512")[0] == 512



def test_a_configuration_without_a_schedule_resumes_with_poly(tmp_path):
    from m2f.checkpoint import TRAINING_KEYS

    cfg = train_mod.resolve_config(train_mod.parse_args(["--dataset", "coco_panoptic", "--out", str(tmp_path)]))
    del cfg["schedule"]
    path = str(tmp_path / "checkpoint.pt")
    torch.save({**{k: {} for k in TRAINING_KEYS}, "config": cfg, "step": 1}, path)
    env = train_mod.Env(0, 1, 0, torch.device("cpu"))
    _, ckpt = train_mod.find_checkpoint(path, env, "--resume")
    assert ckpt["config"]["schedule"] == "poly"


def test_official_preset_trains_in_fp16_and_every_evaluation_runs_in_float32(tmp_path, monkeypatch):
    """The official Mask2Former configs train with fp16 AMP (SegFormer's in fp32) and
    detectron2 tests in float32: m2f.train's evaluations and m2f.evaluate (unless --amp)
    run without autocast whatever the run trained with."""
    from m2f import evaluate as evaluate_mod

    def amp(*argv):
        return train_mod.resolve_config(train_mod.parse_args(list(argv)))["amp"]

    assert amp("--preset", "official", "--dataset", "coco_panoptic") == "fp16"
    assert amp("--preset", "official", "--dataset", "ade20k", "--backbone", "mit_b2") == "off"
    assert amp("--preset", "official", "--dataset", "coco_panoptic", "--amp", "bf16") == "bf16"
    assert amp("--preset", "tiny") == "off"
    seen = []
    real = evaluate_mod.evaluate

    def evaluate(*args, amp="off", **kwargs):
        seen.append(amp)
        return real(*args, amp=amp, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    monkeypatch.setattr(evaluate_mod, "evaluate", evaluate)
    run = str(tmp_path / "run")
    train_mod.main(["--preset", "micro", "--amp", "bf16", "--eval-images", "2", "--out", run])
    evaluate_mod.main(["--run", run, "--eval-images", "2"])
    evaluate_mod.main(["--run", run, "--eval-images", "2", "--amp", "bf16"])
    assert seen == ["off", "off", "bf16"]


def test_eval_protocol_is_official_with_the_official_preset_and_a_runtime_option(tmp_path):
    def protocol(*argv):
        return train_mod.resolve_config(train_mod.parse_args(list(argv)))["eval_protocol"]

    assert protocol("--preset", "official", "--dataset", "coco_panoptic") == "official"
    assert protocol("--preset", "tiny") == "fixed"
    assert protocol("--preset", "tiny", "--eval-protocol", "official") == "official"
    assert "eval_protocol" in train_mod.RUNTIME_KEYS  # a resumed run may evaluate either way
    cfg = train_mod.resolve_config(train_mod.parse_args(["--out", str(tmp_path)]))
    del cfg["eval_protocol"]  # a run from before the option was evaluated with the fixed protocol
    from m2f.checkpoint import TRAINING_KEYS

    torch.save({**{k: {} for k in TRAINING_KEYS}, "config": cfg, "step": 1}, str(tmp_path / "checkpoint.pt"))
    _, ckpt = train_mod.find_checkpoint(str(tmp_path / "checkpoint.pt"), train_mod.Env(0, 1, 0, torch.device("cpu")),
                                        "--resume")
    assert ckpt["config"]["eval_protocol"] == "fixed"


def test_a_run_evaluates_with_its_protocol_and_m2f_evaluate_follows_it(tmp_path, monkeypatch):
    """--eval-protocol official: the run's evaluation takes one image per forward (detectron2's
    test batch) from the official-protocol val split; m2f.evaluate --run takes the run's protocol."""
    from m2f import evaluate as evaluate_mod

    batches, protocols = [], []
    real_loader, real_build = train_mod.eval_loader, train_mod.build_dataset

    def eval_loader(dataset, batch_size, *args, **kwargs):
        batches.append(batch_size)
        return real_loader(dataset, batch_size, *args, **kwargs)

    def build_dataset(*args, **kwargs):
        protocols.append(kwargs.get("protocol", "fixed"))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(train_mod, "eval_loader", eval_loader)
    monkeypatch.setattr(train_mod, "build_dataset", build_dataset)
    run = str(tmp_path / "run")
    metrics = train_mod.main(["--preset", "micro", "--eval-images", "3", "--eval-protocol", "official", "--out", run])
    assert protocols == ["fixed", "official"] and batches == [1] and "PQ" in metrics
    out = evaluate_mod.main(["--run", run, "--eval-images", "3", "--out", str(tmp_path / "eval")])
    with open(tmp_path / "eval" / "eval.json") as f:
        assert json.load(f)["protocol"] == "official"
    assert out == pytest.approx(metrics)


@requires_gpu
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_gpu_fused_run_matches_reference(tmp_path, amp):
    """On the GPU the fused kernels (Triton) and the official path see the same model, data and
    random points: their first-step losses agree, and both keep training."""
    seed = fresh_seed()
    logs = {}
    for kernels in ("reference", "fused"):
        run = str(tmp_path / kernels)
        train_mod.main(["--preset", "micro", "--device", "cuda", "--steps", "5", "--batch-size", "4", "--amp", amp,
                        "--kernels", kernels, "--log-every", "1", "--seed", str(seed), "--eval-images", "8",
                        "--out", run])
        logs[kernels] = read_log(run)
    ref, fused = logs["reference"], logs["fused"]
    tol = 1e-3 if amp == "off" else 2e-2  # tf32 / bf16 dots
    assert fused[0]["loss"] == pytest.approx(ref[0]["loss"], rel=tol)
    assert all(math.isfinite(r["loss"]) for r in ref + fused if "loss" in r)
    assert fused[-1]["eval"].keys() == ref[-1]["eval"].keys()


def _per_parameter_layout(ckpt):
    """A grouped checkpoint's optimizer and schedule state in the official one-group-per-parameter
    layout (what the solver saved before it grouped parameters)."""
    from m2f.data import build_dataset
    from m2f.solver import param_groups, parameter_rules

    model = train_mod.build_model_from_config(ckpt["config"], build_dataset("shapes", None, "train", 64, 0).info)
    grouped = [id(p) for g in param_groups(model) for p in g["params"]]
    rules = parameter_rules(model)
    opt, sched = ckpt["optimizer"], ckpt["scheduler"]
    group_of = {id(p): opt["param_groups"][i] for i, g in enumerate(param_groups(model)) for p in g["params"]}
    lr_of = {id(p): i for i, g in enumerate(param_groups(model)) for p in g["params"]}
    state, groups = {}, []
    for i, (_, p, _, _) in enumerate(rules):
        if grouped.index(id(p)) in opt["state"]:
            state[i] = opt["state"][grouped.index(id(p))]
        groups.append({**{k: v for k, v in group_of[id(p)].items() if k != "params"}, "params": [i],
                       "foreach": None, "fused": None})
    per_group = {k: [sched[k][lr_of[id(p)]] for _, p, _, _ in rules] for k in ("base_lrs", "_last_lr", "lr_lambdas")}
    return {"state": state, "param_groups": groups}, {**sched, **per_group}


def test_resume_from_a_per_parameter_checkpoint(tmp_path, monkeypatch):
    """A checkpoint whose optimizer has one group per parameter resumes into the grouped
    optimizer and continues exactly as the uninterrupted run."""
    seed = fresh_seed()
    args = MICRO + ["--steps", "4", "--batch-size", "2", "--ckpt-every", "2", "--log-every", "1", "--seed", str(seed)]
    straight, old = str(tmp_path / "straight"), str(tmp_path / "old")
    train_mod.main(args + ["--out", straight])
    real_step, calls = train_mod.train_step, []

    def dying_step(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise Killed()
        return real_step(*a, **k)

    monkeypatch.setattr(train_mod, "train_step", dying_step)
    with pytest.raises(Killed):
        train_mod.main(args + ["--out", old])
    monkeypatch.setattr(train_mod, "train_step", real_step)
    ckpt = final_state(old)
    assert ckpt["step"] == 2 and len(ckpt["optimizer"]["param_groups"]) <= 4
    ckpt["optimizer"], ckpt["scheduler"] = _per_parameter_layout(ckpt)
    assert len(ckpt["optimizer"]["param_groups"]) > 50
    torch.save(ckpt, os.path.join(old, "checkpoint.pt"))
    train_mod.main(["--out", old, "--resume", "--device", "cpu"])
    a, b = final_state(straight), final_state(old)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"parameter {k} differs after resuming"
    assert [r.get("lr") for r in read_log(old)] == [r.get("lr") for r in read_log(straight)]

    ckpt["optimizer"]["param_groups"] = ckpt["optimizer"]["param_groups"][1:]  # neither layout
    torch.save(ckpt, os.path.join(old, "checkpoint.pt"))
    with pytest.raises(SystemExit, match="--resume: the saved optimizer state has"):
        train_mod.main(["--out", old, "--resume", "--device", "cpu"])


# ----------------------------------------------------------------------------- --compile, --cuda-graph

MICRO_MODEL = ["--model", "max_targets=8"]  # shapes images hold at most 7 targets


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal without a CUDA device")
def test_cuda_graph_without_cuda_is_a_one_line_error(tmp_path):
    run = str(tmp_path / "run")
    with pytest.raises(SystemExit, match="^--cuda-graph needs a CUDA device$"):
        train_mod.main(MICRO + MICRO_MODEL + ["--cuda-graph", "--out", run])
    assert not os.path.exists(run)  # refused before anything was written
    proc = subprocess.run([sys.executable, "-m", "m2f.train", "--preset", "micro", "--cuda-graph", "--out", run],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == ["--cuda-graph needs a CUDA device"], proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal without a CUDA device")
def test_resume_may_switch_the_step_options(tmp_path):
    """--compile and --cuda-graph say how a run computes its steps, not what: a resumed run may
    turn them on or off (--no-cuda-graph continues a graph run where there is no GPU)."""
    run = str(tmp_path / "run")
    train_mod.main(MICRO + MICRO_MODEL + ["--steps", "2", "--ckpt-every", "1", "--out", run])
    ckpt = final_state(run)
    ckpt["step"], ckpt["config"]["cuda_graph"] = 1, True  # as if saved by a --cuda-graph run
    torch.save(ckpt, os.path.join(run, "checkpoint.pt"))
    with pytest.raises(SystemExit, match="^--cuda-graph needs a CUDA device$"):
        train_mod.main(["--out", run, "--resume", "--device", "cpu"])
    train_mod.main(["--out", run, "--resume", "--device", "cpu", "--no-cuda-graph"])
    assert final_state(run)["step"] == 2 and final_state(run)["config"]["cuda_graph"] is False


@pytest.mark.parametrize("change, message", [
    ({"kernels": "reference"}, "--kernels fused --mask-loss point"),
    ({"mask_loss": "full"}, "--kernels fused --mask-loss point"),
    ({"model": {}}, "--model max_targets=N"),
    ({"amp": "fp16"}, "--amp bf16"),
    ({"world_size": 2}, "one process"),
])
def test_cuda_graph_refuses_what_cannot_be_captured(change, message):
    cfg = train_mod.resolve_config(train_mod.parse_args(["--preset", "micro", "--cuda-graph"] + MICRO_MODEL))
    train_mod.check_step_options(cfg, train_mod.Env(0, 1, 0, torch.device("cuda")))  # this one can be captured
    env = train_mod.Env(0, change.pop("world_size", 1), 0, torch.device("cuda"))
    with pytest.raises(SystemExit) as info:
        train_mod.check_step_options(dict(cfg, **change), env)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_too_many_targets_for_max_targets_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="more than max_targets=1; raise max_targets$"):
        train_mod.main(MICRO + ["--model", "max_targets=1", "--out", str(tmp_path / "run")])


def test_compile_trains_like_eager(tmp_path, monkeypatch):
    """--compile with padded targets: the same losses as the eager run. Inductor needs minutes
    of C++ builds on a CPU, so torch.compile runs with the 'aot_eager' backend here (AOTAutograd
    and the ops' fake implementations, as tests/test_compile_model.py); Inductor is the GPU test's."""
    real_compile, compiled = torch.compile, []

    def cpu_compile(model, **kwargs):
        compiled.append(model)
        return real_compile(model, **dict(kwargs, backend="aot_eager"))

    seed = str(fresh_seed())
    args = MICRO + MICRO_MODEL + ["--steps", "2", "--batch-size", "2", "--log-every", "1", "--seed", seed]
    train_mod.main(args + ["--out", str(tmp_path / "eager")])
    monkeypatch.setattr(torch, "compile", cpu_compile)
    torch._dynamo.reset()
    train_mod.main(args + ["--compile", "--out", str(tmp_path / "compiled")])
    assert len(compiled) == 1
    eager, comp = read_log(str(tmp_path / "eager")), read_log(str(tmp_path / "compiled"))
    for e, c in zip(eager[:2], comp[:2]):
        for key in ("loss", "loss_ce", "loss_mask", "loss_dice", "grad_norm"):
            assert c[key] == pytest.approx(e[key], rel=1e-4), f"step {e['step']} {key}: {c[key]} vs {e[key]}"


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_gpu_cuda_graph_run_matches_eager(tmp_path, monkeypatch, compile_):
    """--cuda-graph: 2 eager warm-up steps, a capture (replayed at once) and a pure replay give
    the eager run's losses (same model, data and random points: registered generators draw
    what the eager step draws)."""
    seed = str(fresh_seed())
    args = ["--preset", "micro", "--device", "cuda", "--steps", "4", "--batch-size", "4", "--log-every", "1",
            "--eval-images", "8", "--seed", seed] + MICRO_MODEL + (["--compile"] if compile_ else [])
    graphs, real_make = [], train_mod.make_graph_step
    monkeypatch.setattr(train_mod, "make_graph_step", lambda *a, **k: graphs.append(real_make(*a, **k)) or graphs[-1])
    train_mod.main(args + ["--out", str(tmp_path / "eager")])
    torch._dynamo.reset()
    train_mod.main(args + ["--cuda-graph", "--out", str(tmp_path / "graph")])
    (graph,) = graphs
    assert graph.captures == 1 and graph.replays == 2
    eager, replayed = read_log(str(tmp_path / "eager")), read_log(str(tmp_path / "graph"))
    for e, g in zip(eager[:4], replayed[:4]):
        for key in ("loss", "loss_ce", "loss_mask", "loss_dice", "grad_norm"):
            assert g[key] == pytest.approx(e[key], rel=1e-3), f"step {e['step']} {key}: {g[key]} vs {e[key]}"
    assert replayed[-1]["eval"].keys() == eager[-1]["eval"].keys()


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_gpu_step_has_no_host_sync(amp):
    """The eager fused step with padded targets and the replayed CUDA graph run under
    torch.cuda.set_sync_debug_mode('error'): any host sync raises. The warm-up and the
    capture run outside (the capture itself synchronises the device once)."""
    from m2f import build_model
    from m2f.data import build_dataset, collate
    from m2f.solver import build_optimizer, build_scheduler

    device = torch.device("cuda")
    dataset = build_dataset("shapes", None, "train", 64, 0)
    batches = [collate([dataset[(2 * i + j, 0)] for j in range(2)]) for i in range(4)]
    micro = train_mod.PRESETS["micro"]
    for graph_mode in (False, True):
        torch.manual_seed(0)
        model = build_model(micro["backbone"], num_classes=dataset.info.num_classes, num_queries=micro["num_queries"],
                            kernels="fused", max_targets=8, **micro["model"]).to(device).train()
        optimizer = build_optimizer(model, lr=1e-3, device=device, capturable=graph_mode)
        scheduler = build_scheduler(optimizer, 20)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        generator = torch.Generator(device).manual_seed(0)
        graph = None
        if graph_mode:
            graph = train_mod.make_graph_step(model, model, optimizer, scaler, device, amp, generator)

        def step(batch):
            return train_mod.train_step(model, batch, optimizer, scheduler, scaler, device, amp, generator, pad=True,
                                        graph=graph)

        for batch in batches[:3]:  # eager: one-time initialisation; graph: 2 warm-up steps and the capture
            step(batch)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            stats = [step(batch) for batch in batches]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert all(math.isfinite(s["loss"].item()) for s in stats)
        if graph_mode:
            assert graph.captures == 1 and graph.replays == 1 + len(batches)


def test_graph_step_needs_a_cuda_device():
    from m2f.graph_step import GraphStep

    with pytest.raises(ValueError, match="a CUDA graph needs a CUDA device, got cpu"):
        GraphStep(lambda: {}, "cpu")


@pytest.fixture
def simulated_cuda_graphs(monkeypatch):
    """A CPU stand-in for the CUDA graph machinery that m2f.graph_step uses: streams do nothing,
    a capture runs the step (a real one records it without running it, so the replay right
    after the capture is skipped) and later replays run it again into the static outputs.
    Yields the GraphSteps made; their device is the CPU."""
    import m2f.graph_step as graph_step

    made = []

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def __init__(self):
            self.replayed = False

        def register_generator_state(self, generator):
            pass

        def replay(self):
            if self.replayed:
                step = next(s for s in made if s._graph is self)
                for name, value in step.step_fn(*step._static).items():
                    step._outputs[name].copy_(value)
            self.replayed = True

    real_init = graph_step.GraphStep.__init__

    def init(self, step_fn, device, **kwargs):
        real_init(self, step_fn, "cuda", **kwargs)
        self.device = torch.device("cpu")
        made.append(self)

    monkeypatch.setattr(graph_step.GraphStep, "__init__", init)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    yield made


def test_graph_step_warms_up_captures_replays_and_recaptures(simulated_cuda_graphs):
    from m2f.graph_step import GraphCaptureError, GraphStep

    total = torch.zeros(())

    def step(x):
        total.add_(x.sum())
        return {"total": total * 1}

    graph = GraphStep(step, "cuda", warmup=2)
    got = [graph([torch.ones(2)])["total"].item() for _ in range(4)]
    assert got == [2, 4, 6, 8] and (graph.captures, graph.replays) == (1, 2)  # 2 warm-ups, capture, replay
    graph([torch.ones(3)])  # another shape: warm-up again
    assert graph.captures == 1 and not graph.captured
    for _ in range(2):
        graph([torch.ones(3)])
    assert graph.captures == 2
    graph([torch.ones(3)], key="new lr tensors")
    assert not graph.captured and total.item() == 8 + 4 * 3

    def fails_in_capture(x):
        if graph_calls:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")
        graph_calls.append(1)
        return {}

    graph_calls = []
    broken = GraphStep(fails_in_capture, "cuda", warmup=1)
    broken([torch.ones(1)])  # the warm-up step runs
    with pytest.raises(GraphCaptureError, match="operation not permitted when stream is capturing \\(a host sync"):
        broken([torch.ones(1)])


def test_cuda_graph_run_wiring_matches_eager_with_a_simulated_graph(tmp_path, monkeypatch, simulated_cuda_graphs):
    """The CLI's --cuda-graph path on the CPU with the simulated graph: host-padded static
    inputs, tensor lrs the schedule fills in place, 2 warm-up steps, a capture and replays
    give the eager run's losses and lrs. (The real capture is the GPU tests'.)"""
    from m2f.solver import param_groups

    def optimizer_with_tensor_lrs(model, lr, device, capturable):
        groups = param_groups(model, lr)
        for g in groups:
            g["lr"] = torch.tensor(g["lr"]) if capturable else g["lr"]
        return torch.optim.AdamW(groups, foreach=False)

    monkeypatch.setattr(train_mod, "build_optimizer", optimizer_with_tensor_lrs)
    monkeypatch.setattr(train_mod, "check_step_options", lambda cfg, env: None)
    args = MICRO + MICRO_MODEL + ["--steps", "5", "--batch-size", "2", "--log-every", "1", "--seed", str(fresh_seed())]
    train_mod.main(args + ["--out", str(tmp_path / "eager")])
    train_mod.main(args + ["--cuda-graph", "--out", str(tmp_path / "graph")])
    (graph,) = simulated_cuda_graphs
    assert (graph.captures, graph.replays) == (1, 3)
    eager, replayed = read_log(str(tmp_path / "eager")), read_log(str(tmp_path / "graph"))
    # the graph run pads every image to max_targets, the eager one to the batch's most: the
    # criterion sums over other padded slots (weight 0) in another order, so rounding differs
    for e, g in zip(eager[:5], replayed[:5]):
        assert g["lr"] == e["lr"]
        for key in ("loss", "loss_ce", "loss_mask", "loss_dice", "grad_norm"):
            assert g[key] == pytest.approx(e[key], rel=1e-4), f"step {e['step']} {key}: {g[key]} vs {e[key]}"

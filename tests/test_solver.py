"""m2f.solver: parameters grouped by (lr, weight decay) with the official per-parameter values,
the grouped AdamW step equal to the per-parameter one, far fewer ops per step, no host syncs
in the schedule and the clipping, and checkpoints of the per-parameter layout still resume."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from m2f import build_model
from m2f.checkpoint import OptimizerStateMismatchError, load_optimizer_state
from m2f.solver import (NO_DECAY_NAMES, NORM_TYPES, build_optimizer, build_scheduler, clip_gradients, current_lrs,
                        param_groups)
from bench.m2f_testing import TINY


def tiny_model() -> nn.Module:
    return build_model("resnet18", kernels="fused", **TINY)


def per_parameter_groups(model: nn.Module, lr=1e-4, weight_decay=0.05, backbone_multiplier=0.1):
    """The official rule as the solver applied it before grouping: one group per parameter."""
    groups, seen = [], set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            group = {"params": [p], "lr": lr, "weight_decay": weight_decay}
            if "backbone" in module_name:
                group["lr"] = lr * backbone_multiplier
            if isinstance(module, NORM_TYPES + (nn.Embedding,)) or name in NO_DECAY_NAMES:
                group["weight_decay"] = 0.0
            groups.append(group)
    return groups


def per_parameter_optimizer(model, **options):
    return torch.optim.AdamW(per_parameter_groups(model), lr=1e-4, weight_decay=0.05, **options)


def set_grads(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-2


# not kernels: profiler markers, and reads of a CPU scalar (the foreach and for-loop AdamW
# keep their step counts on the host and read each one; the fused one has none)
NOT_LAUNCHES = ("_record_function_enter_new", "_record_function_exit", "_local_scalar_dense")


class OpCounter(TorchDispatchMode):
    """Counts aten ops by name (views apart: they launch nothing on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops, self.views = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:
            self.views += 1
        else:
            name = func.overloadpacket.__name__
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def launches(self) -> int:
        """Non-view ops that would launch a kernel on a GPU."""
        return sum(n for name, n in self.ops.items() if name not in NOT_LAUNCHES)


def test_groups_are_few_and_keep_every_parameters_lr_and_weight_decay():
    model = tiny_model()
    groups = param_groups(model, lr=2e-4, weight_decay=0.03, backbone_multiplier=0.2)
    want = {id(g["params"][0]): (g["lr"], g["weight_decay"])
            for g in per_parameter_groups(model, lr=2e-4, weight_decay=0.03, backbone_multiplier=0.2)}
    assert len(want) > 100 and len(groups) <= 4
    got = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert got == want  # every trainable parameter once, with its official lr and weight decay
    assert len({(g["lr"], g["weight_decay"]) for g in groups}) == len(groups)
    assert all(g["initial_lr"] == g["lr"] and isinstance(g["lr"], float) for g in groups)
    opt = build_optimizer(model)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) <= 4
    assert all(g["fused"] and not g["capturable"] for g in opt.param_groups)  # the CPU has fused AdamW too


def test_capturable_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        build_optimizer(tiny_model(), capturable=True)


def test_grouped_step_equals_the_per_parameter_step():
    model = tiny_model()
    reference = copy.deepcopy(model)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt, ref_opt = build_optimizer(model), per_parameter_optimizer(reference)
    sched, ref_sched = build_scheduler(opt, max_steps=5), build_scheduler(ref_opt, max_steps=5)
    for step in range(3):
        for m, o, s in ((model, opt, sched), (reference, ref_opt, ref_sched)):
            set_grads(m, step)
            clip_gradients(m.parameters(), 0.01)
            o.step()
            s.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert not torch.equal(p, start[name]), name
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")
    assert max(current_lrs(sched)) == pytest.approx(max(ref_sched.get_last_lr()))


def test_an_optimizer_step_runs_far_fewer_ops():
    """Non-view aten ops of one (steady-state) AdamW step: on a GPU each is a kernel launch.
    Per-parameter groups batch nothing, foreach or not; grouped, foreach runs a few
    multi-tensor ops per group and fused (build_optimizer) two, without reading anything on
    the host."""
    counts, host_reads = {}, {}
    for name, make in (("per-parameter", per_parameter_optimizer),
                       ("per-parameter foreach", lambda m: per_parameter_optimizer(m, foreach=True)),
                       ("grouped foreach", lambda m: torch.optim.AdamW(param_groups(m), foreach=True)),
                       ("grouped fused", build_optimizer)):
        model = tiny_model()
        opt = make(model)
        set_grads(model, 0)
        opt.step()  # the first step creates the moments
        set_grads(model, 1)
        with OpCounter() as counter:
            opt.step()
        counts[name], host_reads[name] = counter.launches, counter.ops.get("_local_scalar_dense", 0)
    print(counts, host_reads)
    assert counts["grouped foreach"] * 5 <= counts["per-parameter foreach"] <= counts["per-parameter"], counts
    groups = len(param_groups(tiny_model()))
    assert counts["grouped fused"] <= 2 * groups and host_reads["grouped fused"] == 0, (counts, host_reads)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_schedule_and_clipping_do_not_sync():
    """The schedule fills tensor lrs in place with host-computed values, and the clipping
    never reads the norm: no aten._local_scalar_dense (``.item()``)."""
    model = tiny_model()
    groups = param_groups(model)
    lr_tensors = []
    for g in groups:
        g["lr"] = torch.tensor(g["lr"])
        lr_tensors.append(g["lr"])
    opt = torch.optim.AdamW(groups, foreach=False)
    sched = build_scheduler(opt, max_steps=10)
    set_grads(model, 0)
    with OpCounter() as counter:
        clip_gradients(model.parameters(), 0.01)
        sched.step()
        sched.step()
    assert "_local_scalar_dense" not in counter.ops, counter.ops
    assert [g["lr"] for g in opt.param_groups] == lr_tensors  # the same tensors (a captured step reads them)
    for g, lr in zip(opt.param_groups, current_lrs(sched)):
        assert g["lr"].item() == pytest.approx(lr, rel=1e-6)
        assert lr == pytest.approx(g["initial_lr"] * (1 - 2 / 10) ** 0.9)


def _trained(make_optimizer, steps=2):
    model = tiny_model()
    opt = make_optimizer(model)
    sched = build_scheduler(opt, max_steps=10)
    for step in range(steps):
        set_grads(model, step)
        opt.step()
        sched.step()
    return model, opt, sched


def test_a_per_parameter_checkpoint_resumes_into_the_grouped_optimizer():
    old_model, old_opt, old_sched = _trained(per_parameter_optimizer)
    saved_opt, saved_sched = copy.deepcopy(old_opt.state_dict()), copy.deepcopy(old_sched.state_dict())
    model = tiny_model()
    model.load_state_dict(old_model.state_dict())
    opt = build_optimizer(model)
    sched = build_scheduler(opt, max_steps=10)
    load_optimizer_state(opt, saved_opt, model, sched, saved_sched)
    assert len(opt.param_groups) <= 4 and sched.last_epoch == 2
    assert all(g["fused"] for g in opt.param_groups)  # this optimizer's implementation, not the file's
    for step in (2, 3):  # both continue identically
        for m, o, s in ((model, opt, sched), (old_model, old_opt, old_sched)):
            set_grads(m, step)
            o.step()
            s.step()
    for (name, p), q in zip(model.named_parameters(), old_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")
    old_lr = {id(p): g["lr"] for g in old_opt.param_groups for p in g["params"]}
    old_lr = {name: old_lr[id(p)] for name, p in old_model.named_parameters()}
    new_lr = {name: lr for g, lr in zip(opt.param_groups, current_lrs(sched)) for p in g["params"]
              for name, q in model.named_parameters() if q is p}
    assert new_lr == pytest.approx(old_lr)


def test_loading_keeps_tensor_lrs_and_refuses_other_layouts():
    _, old_opt, old_sched = _trained(build_optimizer)
    model = tiny_model()
    groups = param_groups(model)
    lr_tensors = []
    for g in groups:
        g["lr"] = torch.tensor(0.0)
        lr_tensors.append(g["lr"])
    opt = torch.optim.AdamW(groups, foreach=False)
    sched = build_scheduler(opt, max_steps=10)
    load_optimizer_state(opt, old_opt.state_dict(), model, sched, old_sched.state_dict())
    assert [g["lr"] for g in opt.param_groups] == lr_tensors
    assert [g["lr"].item() for g in opt.param_groups] == pytest.approx(old_sched.get_last_lr())
    assert not any(g["fused"] or g["foreach"] for g in opt.param_groups)

    bad = old_opt.state_dict()
    bad["param_groups"] = bad["param_groups"][:-1]
    with pytest.raises(OptimizerStateMismatchError) as info:
        load_optimizer_state(build_optimizer(model), bad, model)
    assert "parameter groups" in str(info.value) and "\n" not in str(info.value)


def test_step_schedule_is_the_official_coco_multi_step():
    """Base-COCO-*.yaml: detectron2's default WarmupMultiStepLR, lr x 0.1 at 327778 and
    355092 of 368750 steps (GAMMA 0.1; WARMUP_FACTOR 1.0 makes the warm-up the identity)."""
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = build_scheduler(opt, max_steps=368750, schedule="step")
    factor = sched.lr_lambdas[0]
    got = [factor(s) for s in (0, 10, 327777, 327778, 355091, 355092, 368749)]
    assert got == pytest.approx([1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    assert build_scheduler(opt, max_steps=1000, schedule="step").lr_lambdas[0].milestones == [889, 963]
    restored = build_scheduler(opt, max_steps=1000, schedule="step")
    restored.load_state_dict(sched.state_dict())  # the milestones are state: a resumed run keeps them
    assert restored.lr_lambdas[0].milestones == [327778, 355092]
    with pytest.raises(ValueError, match="schedule"):
        build_scheduler(opt, max_steps=10, schedule="cosine")

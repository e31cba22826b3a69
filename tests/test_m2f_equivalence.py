"""Reference vs fused Mask2Former on identical weights and inputs.

One model, one set of inputs, the same random points (``same_points``: the two criteria
draw in different orders): the run with ``kernels='reference'`` (the official code path)
and the run with ``kernels='fused'`` (m2f_kernels ops, static-shape criterion) must give
the same class logits, masks, weighted losses and parameter gradients. On the CPU the fused ops fall back to the reference backend (and, where the
Triton kernels exist, are also run through the Triton interpreter one op at a time);
on a GPU the same comparison runs at the standard full size. Inputs are fresh every
run; failure messages carry the seed.
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import m2f_kernels
from bench.measure import no_tf32
from m2f import build_model
from m2f.backbone import calibrate_frozen_bn
from bench.m2f_testing import TINY, jitter_deformable_init, random_images, random_targets
from ._same_points import same_points  # noqa: F401  (fixture)
from .conftest import (KERNEL_BACKENDS, ON_GPU, TF32_TOLERANCE, TOLERANCE, fresh_seed, rel_err, requires_gpu,
                       requires_triton)

FUSED_OPS = ("masked_attention", "ms_deform_attn", "uncertain_point_coords", "point_mask_loss", "pairwise_mask_cost",
             "linear_sum_assignment", "point_sample", "point_mask_logits")


def make_case(seed, device="cpu", backbone="resnet18", size=64, batch=2, mask_loss="point", targets=(1, 4), **cfg):
    """(model with calibrated frozen norms and generic deformable sampling points, images,
    targets), all drawn from ``seed``."""
    torch.manual_seed(seed)
    model = build_model(backbone, mask_loss=mask_loss, **{**TINY, **cfg}).to(device)
    jitter_deformable_init(model)
    num_classes = model.num_classes
    images = random_images(batch, size, size, device=device)
    tgts = random_targets(batch, num_classes, size, size, min_targets=targets[0], max_targets=targets[1], device=device)
    calibrate_frozen_bn(model, images)
    return model, images, tgts


def run(model, mode, images, targets, seed, autocast_dtype=None):
    """(weighted losses, parameter grads, eval outputs, matcher outputs) with ``kernels=mode``;
    random points from ``seed``."""
    model.set_kernels(mode)
    model.train()
    model.zero_grad(set_to_none=True)  # a parameter the backward misses stays None and fails below
    generator = torch.Generator(images.device).manual_seed(seed)
    ctx = (torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype
           else contextlib.nullcontext())
    matchings = []
    hook = model.criterion.matcher.register_forward_hook(lambda mod, args, out: matchings.append(out))
    try:
        with ctx:
            losses = model(images, targets, generator=generator)
            total = sum(losses.values())
    finally:
        hook.remove()
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{mode}: no gradient for {missing}"
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad(), ctx:
        out = model(images)
    return {k: v.detach() for k, v in losses.items()}, grads, out, matchings


def grad_errors(got, want):
    """{name: relative error}, with the denominator floored at 1e-6 of the largest gradient
    norm so tensors whose exact gradient vanishes compare in absolute terms."""
    floor = 1e-6 * max(g.double().norm().item() for g in want.values())
    errs = {}
    for name, w in want.items():
        g = got[name].double()
        if not torch.isfinite(g).all():
            errs[name] = float("inf")
        else:
            errs[name] = (g - w.double()).norm().item() / max(w.double().norm().item(), floor)
    return errs


def compare(ref, fused, tol, seed, label="", grad_tol=None):
    """Assert logits, masks, every loss and every gradient agree within ``tol`` (gradients within
    ``grad_tol``, default ``tol``); print the worst."""
    (ref_losses, ref_grads, ref_out, ref_match), (f_losses, f_grads, f_out, f_match) = ref, fused
    assert f_losses.keys() == ref_losses.keys()
    # a different Hungarian assignment (a near tie in the costs) changes the losses discretely
    differ = sum(any(not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])) for a, b in zip(m, n))
                 for m, n in zip(ref_match, f_match))
    label = f"{label} [{differ} of {len(ref_match)} matcher calls assigned differently]"
    errors = {f"out.{k}": rel_err(f_out[k], ref_out[k]) for k in ref_out}
    errors.update({f"loss.{k}": rel_err(f_losses[k], ref_losses[k]) for k in ref_losses})
    errors.update({f"grad.{k}": e for k, e in grad_errors(f_grads, ref_grads).items()})
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    print(f"\n{label} seed {seed}: worst relative errors " + ", ".join(f"{k}={v:.2e}" for k, v in worst))
    limit = {k: (grad_tol or tol) if k.startswith("grad.") else tol for k in errors}
    bad = {k: v for k, v in errors.items() if not v <= limit[k]}
    assert not bad, f"{label} seed {seed}: relative error over its limit for {sorted(bad.items(), key=lambda kv: -kv[1])[:10]}"


@pytest.mark.parametrize("mask_loss", ["point", "full"])
def test_reference_and_fused_agree_cpu(mask_loss, same_points):
    seed = fresh_seed()
    model, images, targets = make_case(seed, mask_loss=mask_loss)
    ref = run(model, "reference", images, targets, seed)
    fused = run(model, "fused", images, targets, seed)
    compare(ref, fused, TOLERANCE[torch.float32], seed, f"cpu {mask_loss}")


@pytest.mark.parametrize("mask_head", ["points", "logits"])
def test_fused_mode_calls_every_fused_op_and_reference_none(monkeypatch, mask_head):
    seed = fresh_seed()
    model, images, targets = make_case(seed, mask_head=mask_head)
    calls = dict.fromkeys(FUSED_OPS, 0)

    def counting(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in FUSED_OPS:
        monkeypatch.setattr(m2f_kernels, name, counting(name, getattr(m2f_kernels, name)))
    run(model, "reference", images, targets, seed)
    assert all(v == 0 for v in calls.values()), f"the reference path called m2f_kernels: {calls}"
    run(model, "fused", images, targets, seed)
    dec, enc, preds = TINY["dec_layers"], TINY["enc_layers"], TINY["dec_layers"] + 1
    # train + eval forward each run the decoder and encoder once
    assert calls["masked_attention"] == 2 * dec and calls["ms_deform_attn"] == 2 * enc, calls
    assert calls["linear_sum_assignment"] == 1, calls  # every prediction and image in one call
    if mask_head == "logits":
        assert calls["pairwise_mask_cost"] == preds * images.shape[0], calls
        assert calls["uncertain_point_coords"] == preds and calls["point_mask_loss"] == preds, calls
    else:  # mask-free, every prediction in one pass: the matcher samples the features per
        # prediction and the targets once (point_sample); the loss samples the targets once and
        # reads point logits twice (importance sampling, loss)
        assert calls["point_sample"] == preds + 2 and calls["point_mask_logits"] == 2, calls
        assert calls["pairwise_mask_cost"] == calls["uncertain_point_coords"] == calls["point_mask_loss"] == 0


def test_switching_keeps_parameters_and_keys():
    model = build_model("resnet18", kernels="fused", **TINY)
    keys = list(model.state_dict())
    assert model.kernels == "fused"
    model.set_kernels("reference")
    assert model.kernels == "reference" and list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="kernels must be one of"):
        model.set_kernels("triton")


@pytest.mark.parametrize("dtype, loss_tol, sign_tol", [(torch.bfloat16, 0.1, 0.1), (torch.float16, 0.05, 0.05)])
def test_half_autocast_fused_end_to_end_cpu(dtype, loss_tol, sign_tol):
    """Autocast runs end to end on the fused path and stays near fp32. Bounds are about 4x
    the worst seen over 30 seeds: half precision flips attention-mask thresholds, so a few
    query rows move a lot; the total loss and the mask signs are the robust measures."""
    seed = fresh_seed()
    check_autocast_near_fp32(*make_case(seed), seed, dtype, loss_tol, sign_tol)


def check_autocast_near_fp32(model, images, targets, seed, dtype, loss_tol, sign_tol):
    """The fused step under autocast ``dtype``: finite gradients, total loss and mask signs
    within the bounds of the fp32 run's."""
    ref_losses, _, ref_out, _ = run(model, "fused", images, targets, seed)
    losses, grads, out, _ = run(model, "fused", images, targets, seed, autocast_dtype=dtype)
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, f"seed {seed}: non-finite gradients under {dtype}: {bad[:5]}"
    assert out["pred_masks"].dtype == dtype and torch.isfinite(out["pred_logits"]).all()
    err = rel_err(sum(losses.values()).float(), sum(ref_losses.values()))
    flipped = ((out["pred_masks"].float() > 0) != (ref_out["pred_masks"] > 0)).float().mean().item()
    print(f"\n{dtype} autocast seed {seed}: total loss relative error vs fp32 {err:.2e}, "
          f"mask signs flipped {flipped:.2%}")
    assert err < loss_tol, f"seed {seed}: {dtype} total loss off by {err:.2e} from fp32"
    assert flipped < sign_tol, f"seed {seed}: {dtype} flips the sign of {flipped:.1%} of the mask logits"


def _implements(backend: str, op: str) -> bool:
    device = torch.device("cuda" if ON_GPU else "cpu")
    return m2f_kernels._dispatch.why_not(backend, op, device, torch.float32) is None


# the ops of the mask-logits criterion (mask_head='logits'); the rest run in the default one
LOGITS_HEAD_OPS = ("uncertain_point_coords", "point_mask_loss", "pairwise_mask_cost")
# the cuda backend on a GPU, or its kernels on the CPU (cuda-emulated, tests/cuda_emulation)
CUDA_BACKENDS = [p for p in KERNEL_BACKENDS if p.values[0] == "cuda"]


def _small_case(seed, mask_head="points"):
    device = "cuda" if ON_GPU else "cpu"
    # 64x64: smaller images leave 1x1 res5 maps whose calibrated norms are ill-conditioned
    return make_case(seed, device=device, size=64, batch=2, targets=(1, 2), num_queries=4, dec_layers=2,
                     enc_layers=1, num_points=16, mask_head=mask_head)


def _on_backend(monkeypatch, op, backend):
    """Route ``m2f_kernels.<op>`` to ``backend``; a call beyond the backend's declared limits
    runs on the default backend instead.
    Returns (the calls ``backend`` ran, the refusals' messages)."""
    calls, refused, real = [], [], getattr(m2f_kernels, op)

    def routed(*args, **kwargs):
        try:
            out = real(*args, **{**kwargs, "backend": backend})
        except m2f_kernels.BackendUnavailableError as e:
            refused.append(str(e))
            return real(*args, **kwargs)
        calls.append(1)
        return out
    monkeypatch.setattr(m2f_kernels, op, routed)
    return calls, refused


def _one_op_agrees(backend, op, monkeypatch):
    """``op`` alone on ``backend`` inside the tiny model, against the official path (same points)."""
    if not _implements(backend, op):
        pytest.skip(f"the {backend} backend does not implement {op}")
    seed = fresh_seed()
    model, images, targets = _small_case(seed, "logits" if op in LOGITS_HEAD_OPS else "points")
    ref = run(model, "reference", images, targets, seed)
    calls, refused = _on_backend(monkeypatch, op, backend)
    fused = run(model, "fused", images, targets, seed)
    if not calls and refused:
        pytest.skip(f"every {op} call of the fused model is beyond the backend's limits: {refused[0]}")
    assert calls, f"the fused model never called {op}"
    tol = TF32_TOLERANCE if ON_GPU else TOLERANCE[torch.float32]
    compare(ref, fused, tol, seed, f"{backend} {op}")


def _all_ops_agree(backend, monkeypatch, mask_head):
    """Every op ``backend`` implements on it at once (the others, and calls beyond its
    limits, on their default backend)."""
    seed = fresh_seed()
    model, images, targets = _small_case(seed, mask_head)
    ref = run(model, "reference", images, targets, seed)
    calls = {op: _on_backend(monkeypatch, op, backend)[0] for op in FUSED_OPS if _implements(backend, op)}
    fused = run(model, "fused", images, targets, seed)
    assert any(calls.values()), f"no op ran on {backend}"
    tol = TF32_TOLERANCE if ON_GPU else TOLERANCE[torch.float32]
    compare(ref, fused, tol, seed, f"{backend}, all ops, mask_head={mask_head}")


@requires_triton
@pytest.mark.parametrize("op", [op for op in FUSED_OPS if op != "uncertain_point_coords"])
def test_fused_with_one_triton_op_agrees(op, monkeypatch, same_points):
    """Each op the Triton backend implements, alone on Triton inside the tiny model."""
    _one_op_agrees("triton", op, monkeypatch)


@pytest.mark.parametrize("op", [op for op in FUSED_OPS if op != "uncertain_point_coords"])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_fused_with_one_cuda_op_agrees(backend, op, monkeypatch, same_points):
    """Each op the cuda backend implements, alone on it inside the tiny model."""
    _one_op_agrees(backend, op, monkeypatch)


@requires_triton
def test_fused_importance_sampling_on_triton_agrees(monkeypatch):
    """uncertain_point_coords picks the points, so it is compared inside the fused path (same
    draws in the same order) rather than against the official one."""
    seed = fresh_seed()
    model, images, targets = _small_case(seed, "logits")
    ref = run(model, "fused", images, targets, seed)
    calls, _ = _on_backend(monkeypatch, "uncertain_point_coords", "triton")
    fused = run(model, "fused", images, targets, seed)
    assert calls, "the fused model never called uncertain_point_coords"
    tol = TF32_TOLERANCE if ON_GPU else TOLERANCE[torch.float32]
    compare(ref, fused, tol, seed, "triton uncertain_point_coords")


@requires_triton
@pytest.mark.parametrize("mask_head", ["points"])  # the mask-logits ops: one at a time above
def test_fused_all_on_triton_agrees(same_points, monkeypatch, mask_head):
    """Every op the Triton backend implements on Triton at once (the solver, which it lacks,
    on its default backend)."""
    _all_ops_agree("triton", monkeypatch, mask_head)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_fused_all_on_cuda_agrees(backend, same_points, monkeypatch):
    """Every op the cuda backend implements on it at once (point_mask_logits, which it lacks,
    on its default backend)."""
    _all_ops_agree(backend, monkeypatch, "points")


# ----------------------------------------------------------------------------- GPU, full size
def _full_size_case(seed, backbone="resnet50"):
    """The docs/ops.md model shape: R50, batch 2, 1024x1024, 100 queries, 133 classes, 20-50 targets."""
    torch.manual_seed(seed)
    model = build_model(backbone, num_classes=133, num_queries=100).cuda()
    jitter_deformable_init(model)
    images = random_images(2, 1024, 1024, device="cuda")
    targets = random_targets(2, 133, 1024, 1024, min_targets=20, max_targets=50, device="cuda")
    calibrate_frozen_bn(model, images)
    return model, images, targets




@requires_gpu
def test_reference_and_fused_agree_full_size_gpu(same_points):
    seed = fresh_seed()
    model, images, targets = _full_size_case(seed)
    with no_tf32():
        ref = run(model, "reference", images, targets, seed)
        torch.cuda.empty_cache()
        fused = run(model, "fused", images, targets, seed)
    # Gradients get 5e-3: the decoder thresholds mask logits at 0 to build the next layer's
    # attention mask, so the model is discontinuous there; at 1024^2 (100 queries x up to
    # 16384 keys x 9 layers) fp32 reassociation can flip mask bits near 0 and move later
    # layers' gradients by O(1e-3). An H200 run measured 1.56e-3 on decoder FFN 7 (outputs
    # and losses within 1e-3, identical Hungarian matches), most likely from this; the cause
    # is not isolated on a GPU.
    compare(ref, fused, TF32_TOLERANCE, seed, "gpu full size R50 1024^2", grad_tol=5e-3)


@requires_gpu
@pytest.mark.parametrize("dtype, loss_tol", [(torch.bfloat16, 0.1), (torch.float16, 0.05)])
def test_autocast_fused_full_size_gpu(dtype, loss_tol):
    seed = fresh_seed()
    check_autocast_near_fp32(*_full_size_case(seed), seed, dtype, loss_tol, loss_tol)

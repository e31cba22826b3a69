"""torch.compile with the fused ops.

- The m2f model (kernels='fused') has no graph break inside the pixel decoder or the
  transformer decoder (``torch._dynamo.explain``), and its whole eval forward compiles
  with ``fullgraph=True``.
- Compiled results equal eager ones: eval outputs, and a training step's losses and
  parameter gradients; with padded targets the training forward and criterion (matcher,
  device-side assignment, mask-free losses) compile with ``fullgraph=True``.
- The ops' backward under compile with non-contiguous inputs (the decoder's strided
  head views): fake and real outputs must agree on strides.

CPU: the 'aot_eager' backend (AOTAutograd, fake tensors and the custom ops' fake
implementations, without Inductor's C++ build); on a GPU also Inductor.
"""
from __future__ import annotations

import pytest
import torch

import m2f_kernels
from .conftest import DEVICE, rel_err, requires_gpu

m2f = pytest.importorskip("m2f", reason="the reference Mask2Former package m2f is not importable")
from bench.m2f_testing import TINY, jitter_deformable_init, random_images, random_targets  # noqa: E402

CPU_BACKEND = "aot_eager"


def tiny_model(train: bool, **overrides):
    model = m2f.build_model("resnet18", kernels="fused", **dict(TINY, **overrides)).to(DEVICE)
    jitter_deformable_init(model)  # generic sampling points: unique location gradients
    return model.train(train)


def describe_breaks(explanation) -> str:
    lines = []
    for b in explanation.break_reasons:
        where = ", ".join(f"{f.filename}:{f.lineno}" for f in b.user_stack[-3:])
        lines.append(f"{b.reason.splitlines()[0]} at {where}")
    return "; ".join(lines)


def test_decoders_have_no_graph_breaks():
    """Pixel decoder + transformer decoder (the head), in training mode, as one graph."""
    model = tiny_model(train=True)
    features = model.backbone(model.preprocess(random_images(2, 64, 64, device=DEVICE)))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model.sem_seg_head)(features)
    assert explanation.graph_break_count == 0, describe_breaks(explanation)
    assert explanation.graph_count == 1


def _eval_outputs(model, images):
    with torch.no_grad():
        out = model(images)
    return out["pred_logits"], out["pred_masks"]


def test_compiled_eval_forward_matches_eager():
    seed = torch.seed()
    model = tiny_model(train=False)
    images = random_images(2, 64, 64, device=DEVICE)
    want = _eval_outputs(model, images)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=CPU_BACKEND, fullgraph=True)  # fullgraph: no break anywhere
    got = _eval_outputs(compiled, images)
    for name, g, w in zip(("pred_logits", "pred_masks"), got, want):
        assert rel_err(g, w) <= 1e-5, f"{name}: relative error {rel_err(g, w):.2e} (seed {seed})"


def _train_step(model, images, targets, seed, run=None):
    """(losses, {name: grad}) of one step of ``run`` (default: model itself) on model's weights."""
    model.zero_grad(set_to_none=True)
    losses = (model if run is None else run)(images, targets, generator=torch.Generator(DEVICE).manual_seed(seed))
    sum(losses.values()).backward()
    return ({k: v.detach() for k, v in losses.items()},
            {n: p.grad for n, p in model.named_parameters() if p.grad is not None})


def _assert_same_step(got, want, tol, what):
    (losses, grads), (ref_losses, ref_grads) = got, want
    assert losses.keys() == ref_losses.keys() and grads.keys() == ref_grads.keys(), what
    assert len(ref_grads) > 50, f"{what}: too few gradients to compare"
    for k in ref_losses:
        err = rel_err(losses[k], ref_losses[k])
        assert err <= tol, f"{what}: {k} {losses[k].item()} vs {ref_losses[k].item()}"
    scale = torch.stack([g.double().norm() for g in ref_grads.values()]).norm().item()
    for n, g in ref_grads.items():  # floor: analytically-zero gradients hold only rounding noise
        err = (grads[n].double() - g.double()).norm().item() / max(g.double().norm().item(), 1e-2 * scale)
        assert err <= tol and torch.isfinite(grads[n]).all(), f"{what}: gradient of {n} relative error {err:.2e}"


def test_compiled_training_step_matches_eager():
    # Uniform loss points only: importance sampling keeps the top-k of -|logit|, and compiled
    # and eager code round differently, so a near-tie can pick another point and move a loss
    # by ~1% (seen once in CI with 2 threads: loss_dice_1 off by 1.3%). The op itself is
    # compared across backends at op level.
    seed = torch.seed()
    model = tiny_model(train=True, importance_sample_ratio=0.0)
    images = random_images(2, 64, 64, device=DEVICE)
    targets = random_targets(2, TINY["num_classes"], 64, 64, device=DEVICE)
    want = _train_step(model, images, targets, seed % 2**31)
    torch._dynamo.reset()
    got = _train_step(model, images, targets, seed % 2**31, run=torch.compile(model, backend=CPU_BACKEND))
    _assert_same_step(got, want, 1e-4, f"compiled training step (seed {seed})")


# ----------------------------------------------------------------------------- op level
def _heads(x, heads):
    """[L, B, C] -> [B, heads, L, C/heads] strided view, as the decoder makes them."""
    return x.view(x.shape[0], x.shape[1], heads, -1).permute(1, 2, 0, 3)


def _masked_attention_case():
    x = torch.randn(5, 2, 16, device=DEVICE)
    mem = torch.randn(9, 2, 16, device=DEVICE)
    mask = torch.rand(2, 5, 9, device=DEVICE) < 0.4

    def fn(x, mem):
        out = m2f_kernels.masked_attention(_heads(x * 2, 2), _heads(mem + 1, 2), _heads(mem * 3, 2), mask)
        return out.permute(2, 0, 1, 3).reshape(5, 2, 16)  # back to [Q, B, C]

    return fn, (x, mem)


def _ms_deform_attn_case():
    shapes = torch.tensor([[4, 5], [2, 3]], device=DEVICE)
    starts = torch.tensor([0, 20], device=DEVICE)
    # flat leaves viewed in other layouts, then transposed: strided op inputs whose
    # gradients flow back through a view (which needs the strides the fake promised)
    value = torch.randn(2, 2 * 26 * 8, device=DEVICE)  # [B, H, S, D]
    loc = torch.rand(2, 3 * 2 * 3 * 2 * 2, device=DEVICE)  # [B, Lq, H, P, L, 2]
    logits = torch.randn(2, 3 * 2 * 3 * 2, device=DEVICE)  # [B, Lq, H, P, L]

    def fn(value, loc, logits):
        out = m2f_kernels.ms_deform_attn(
            (value * 2).view(2, 2, 26, 8).transpose(1, 2), shapes, starts,
            (loc * 0.9).view(2, 3, 2, 3, 2, 2).transpose(3, 4), (logits * 2).view(2, 3, 2, 3, 2).transpose(3, 4),
            softmax=True)
        return out.view(2, 3, 2, 8)

    return fn, (value, loc, logits)


def _point_loss_case():
    pred = torch.randn(2, 9 * 3 * 11, device=DEVICE)  # [B, H, Q, W], viewed then permuted
    target = torch.rand(3, 10, 12, device=DEVICE) < 0.5
    coords = torch.rand(3, 16, 2, device=DEVICE)
    index = (torch.tensor([0, 1, 1], device=DEVICE), torch.tensor([2, 0, 1], device=DEVICE))

    def fn(pred):
        p = (pred * 2).view(2, 9, 3, 11).permute(0, 2, 1, 3)
        sampled = m2f_kernels.point_sample(p, coords[:2].contiguous())
        bce, dice = m2f_kernels.point_mask_loss(p, target, coords, 3.0, pred_index=index)
        return sampled.sum() + bce + dice

    return fn, (pred,)


@pytest.mark.parametrize("case", [_masked_attention_case, _ms_deform_attn_case, _point_loss_case],
                         ids=["masked_attention", "ms_deform_attn", "point_loss"])
def test_compiled_backward_with_strided_inputs_matches_eager(case):
    seed = torch.seed()
    fn, inputs = case()
    grads = []
    for f in (fn, torch.compile(fn, backend=CPU_BACKEND, fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = f(*leaves)
        out.backward(torch.ones_like(out))
        grads.append([out.detach()] + [t.grad for t in leaves])
    for i, (g, w) in enumerate(zip(grads[1], grads[0])):
        what = "output" if i == 0 else f"gradient of input {i - 1}"
        assert rel_err(g, w) <= 1e-5, f"{what}: relative error {rel_err(g, w):.2e} (seed {seed})"


# ----------------------------------------------------------------------------- GPU: Inductor
@requires_gpu
def test_inductor_training_step_matches_eager_on_gpu():
    seed = torch.seed()
    model = tiny_model(train=True)
    images = random_images(2, 128, 128, device=DEVICE)
    targets = random_targets(2, TINY["num_classes"], 128, 128, device=DEVICE)
    want = _train_step(model, images, targets, seed % 2**31)
    torch._dynamo.reset()
    got = _train_step(model, images, targets, seed % 2**31, run=torch.compile(model))
    _assert_same_step(got, want, 1e-3, f"inductor training step (seed {seed})")
    model.eval()
    want = _eval_outputs(model, images)
    got = _eval_outputs(torch.compile(model, fullgraph=True), images)
    for name, g, w in zip(("pred_logits", "pred_masks"), got, want):
        assert rel_err(g, w) <= 1e-3, f"inductor eval {name}: {rel_err(g, w):.2e} (seed {seed})"


def test_static_training_step_compiles_in_one_graph():
    """The fused training forward and criterion with padded targets (static shapes, mask-free,
    the assignment solver on the device): torch.compile(fullgraph=True), equal to eager."""
    from m2f.targets import PaddedTargets

    seed = torch.seed() % 2**31
    model = tiny_model(train=True)
    images = random_images(2, 64, 64, device=DEVICE)
    padded = model.pad_targets(random_targets(2, TINY["num_classes"], 64, 64, device=DEVICE), (64, 64), 5)

    def step(images, labels, masks, num_targets):
        losses = model(images, PaddedTargets(labels, masks, num_targets))
        return torch.stack([losses[k] for k in sorted(losses)])

    def run(fn):
        torch.manual_seed(seed)  # no generator: the draws are traced into the one graph
        model.zero_grad(set_to_none=True)
        losses = fn(images, *padded)
        losses.sum().backward()
        return losses.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    want = run(step)
    torch._dynamo.reset()
    got = run(torch.compile(step, backend=CPU_BACKEND, fullgraph=True))
    assert rel_err(got[0], want[0]) <= 1e-4, f"losses (seed {seed})"
    for name, g in want[1].items():
        assert rel_err(got[1][name], g) <= 1e-3, f"gradient of {name} (seed {seed})"

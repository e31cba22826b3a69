"""``m2f_kernels.integrations.transformers`` against Hugging Face's own Mask2Former.

A random-init Mask2FormerForUniversalSegmentation (tiny Swin built from a local config,
no hub access) takes one training step with and without the patch, from the same
weights and the same RNG seed (so the matcher and the loss draw the same points):
outputs, loss and every parameter gradient must agree, for each switch alone and all
three together, and the fused ops must actually have run. Revert must give back HF's
classes and functions. On a GPU the comparison also runs at a realistic size.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from .conftest import rel_err, requires_gpu

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip(
    "transformers", reason="transformers is not importable (pip install transformers==5.17.0)")
hf = pytest.importorskip("transformers.models.mask2former.modeling_mask2former",
                         reason="this transformers has no Mask2Former")
pytest.importorskip("scipy", reason="HF's Mask2FormerLoss needs scipy")

from m2f_kernels.compat import ms_deform_attn_core_pytorch  # noqa: E402
from m2f_kernels.integrations import transformers as patch  # noqa: E402
from bench.hf_testing import (  # noqa: E402
    OpLog, generic_points, make_batch, make_config, module_restored, random_boxes, timed_fp32_steps, train_step,
)

SWITCH_CASES = [
    dict(ms_deform_attn=True, masked_attention=False, point_loss=False),
    dict(ms_deform_attn=False, masked_attention=True, point_loss=False),
    dict(ms_deform_attn=False, masked_attention=False, point_loss=True),
    dict(ms_deform_attn=True, masked_attention=True, point_loss=True),
]
# the m2f_kernels ops each switch must make the model call
SWITCH_OPS = {
    "ms_deform_attn": ("m2f_kernels::ms_deform_attn", "m2f_kernels::ms_deform_attn_backward"),
    "masked_attention": ("m2f_kernels::masked_attention", "m2f_kernels::masked_attention_backward"),
    "point_loss": ("m2f_kernels::pairwise_mask_cost", "m2f_kernels::uncertain_point_coords",
                   "m2f_kernels::point_mask_loss", "m2f_kernels::point_mask_loss_backward"),
}
PATCHED_NAMES = [n for s in patch.SWITCHES for n in patch._CLASSES[s]] + ["multi_scale_deformable_attention"]


# ----------------------------------------------------------------------------- helpers
def assert_same_step(got, want, tol: float, grad_tol: float, what: str) -> None:
    out, loss, grads, _ = got
    ref_out, ref_loss, ref_grads, _ = want
    for name in ("class_queries_logits", "masks_queries_logits"):
        err = rel_err(getattr(out, name), getattr(ref_out, name))
        assert err <= tol, f"{what}: {name} relative error {err:.2e}"
    try:
        assert rel_err(loss, ref_loss) <= tol, f"{what}: loss {loss.item()} vs HF {ref_loss.item()}"
        assert_same_grads(grads, ref_grads, grad_tol, what)
    except AssertionError as e:
        raise LossTieSuspected(str(e)) from None


class LossTieSuspected(AssertionError):
    """Outputs agree but the loss or the gradients do not."""


def assert_same_grads(grads, ref_grads, grad_tol: float, what: str) -> None:
    assert grads.keys() == ref_grads.keys(), f"{what}: parameters with gradients differ"
    assert len(ref_grads) > 50, f"{what}: too few gradients to compare"
    # analytically-zero gradients (biases before a norm) hold only rounding noise: measure
    # every parameter against its own norm, floored at 1% of the whole model's gradient
    scale = torch.stack([g.double().norm() for g in ref_grads.values()]).norm().item()
    worst = max(
        ((grads[n].double() - g.double()).norm().item() / max(g.double().norm().item(), 1e-2 * scale), n)
        if torch.isfinite(grads[n]).all() else (float("inf"), n)
        for n, g in ref_grads.items()
    )
    assert worst[0] <= grad_tol, f"{what}: gradient of {worst[1]} relative error {worst[0]:.2e}"



def assert_same_step_retrying_ties(step, tol: float, grad_tol: float, what: str) -> None:
    """``step(seed) -> (got, want)`` must give the same step, retried once with a fresh seed
    when only the loss / gradients differ.

    HF's loss is discontinuous in the model's outputs: its importance sampling keeps a
    top-k of -|logit| and its matcher solves an assignment, so outputs equal to ~1e-7 can
    pick another point or match at a near-tie (seen about once in 300 steps, e.g.
    masked_attention alone with seed 8801704798272019108: logits within 3e-7, loss 43.000
    vs 42.936). A wrong kernel fails the outputs check, or both seeds.
    """
    seeds = []
    for attempt in range(2):
        seeds.append(torch.seed())
        got, want = step(seeds[-1])
        try:
            assert_same_step(got, want, tol, grad_tol, f"{what} (seeds {seeds})")
            return got
        except LossTieSuspected:
            if attempt:
                raise

@pytest.fixture
def restore_module():
    """Whatever a test does to the modeling module, the next test sees HF's originals."""
    with module_restored(hf, PATCHED_NAMES, patch.revert_m2f_kernels_to_mask2former) as originals:
        yield originals


def tiny_model(seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    model = transformers.Mask2FormerForUniversalSegmentation(make_config()).train()
    generic_points(model)
    return model


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("switches", SWITCH_CASES, ids=lambda s: "+".join(k for k, v in s.items() if v))
def test_patched_model_matches_hf(switches):
    """model= patch: same outputs, loss and gradients as HF, and only the chosen ops run."""

    def step(seed):
        reference = tiny_model()
        model = copy.deepcopy(reference)
        before = {n: type(m) for n, m in model.named_modules()}
        assert patch.apply_m2f_kernels_to_mask2former(model=model, **switches) is model
        assert model.state_dict().keys() == reference.state_dict().keys()
        changed = {n for n, m in model.named_modules() if type(m) is not before[n]}
        expected = {n for n, m in model.named_modules() if any(
            isinstance(m, getattr(hf, c)) for s, on in switches.items() if on for c in patch._CLASSES[s])}
        if switches["masked_attention"]:
            expected |= {f"{n}.cross_attn" for n, m in model.named_modules()
                         if isinstance(m, hf.Mask2FormerMaskedAttentionDecoderLayer)}
        assert changed == expected and changed, f"patched modules {sorted(changed)}, expected {sorted(expected)}"
        batch = make_batch(model.config, 2, 64, "cpu")
        want = train_step(reference, batch, seed)
        return train_step(model, batch, seed, log=True), want

    got = assert_same_step_retrying_ties(step, 1e-5, 1e-4, f"switches {switches}")
    ran = got[3]
    for switch, on in switches.items():
        for op in SWITCH_OPS[switch]:
            assert (ran[op] > 0) == on, f"{op} ran {ran[op]} times with {switch}={on}"


def test_image_without_targets_matches_hf():
    def step(seed):
        reference = tiny_model()
        model = patch.apply_m2f_kernels_to_mask2former(model=copy.deepcopy(reference))
        batch = make_batch(model.config, 2, 64, "cpu")
        batch["mask_labels"][1] = batch["mask_labels"][1][:0]
        batch["class_labels"][1] = batch["class_labels"][1][:0]
        return train_step(model, batch, seed), train_step(reference, batch, seed)

    assert_same_step_retrying_ties(step, 1e-5, 1e-4, "an image without targets")


def _loss_inputs(batch=3, queries=20, size=16, num_classes=6):
    """Random mask/class logits and box targets for calling the criterion directly. The targets
    of an image have distinct classes: two of one class whose boxes no matcher point falls in
    have equal cost columns, an exact tie that scipy and the fused solver may break differently
    (both optimal)."""
    counts = torch.randint(2, num_classes + 1, (batch,)).tolist()
    masks = torch.randn(batch, queries, size, size) * 3
    classes = torch.randn(batch, queries, num_classes + 1)
    labels = [random_boxes(t, 4 * size, "cpu") for t in counts]  # targets at a finer resolution
    class_labels = [torch.randperm(num_classes)[:t] for t in counts]
    return masks, classes, labels, class_labels


def test_matcher_matches_hf():
    """Same seed, same points: the same assignment (random logits make it point-sensitive)."""
    seed = torch.seed()
    hf_matcher = hf.Mask2FormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64)
    fused = patch.apply_m2f_kernels_to_mask2former(model=copy.deepcopy(hf_matcher), ms_deform_attn=False,
                                                   masked_attention=False)
    masks, classes, labels, class_labels = _loss_inputs()
    results = []
    for matcher in (hf_matcher, fused):
        torch.manual_seed(seed)
        results.append(matcher(masks, classes, labels, class_labels))
    for (i, j), (wi, wj) in zip(*reversed(results)):
        assert torch.equal(i, wi) and torch.equal(j, wj), f"assignment differs (seed {seed})"


@pytest.mark.parametrize("num_masks", [torch.tensor(7.0), 7], ids=["tensor", "int"])
def test_loss_masks_matches_hf(num_masks):
    """The criterion's mask losses and their gradient, on given matches; num_masks as HF's
    forward passes it (a 0-dim tensor) or as its signature allows (a number)."""
    seed = torch.seed()
    hf_loss = hf.Mask2FormerLoss(make_config(), weight_dict={})
    fused = patch.apply_m2f_kernels_to_mask2former(model=copy.deepcopy(hf_loss), ms_deform_attn=False,
                                                   masked_attention=False)
    masks, _, labels, _ = _loss_inputs()
    indices = [(torch.randperm(20)[:len(t)], torch.randperm(len(t))) for t in labels]
    results = []
    for criterion in (hf_loss, fused):
        leaf = masks.clone().requires_grad_()
        torch.manual_seed(seed)
        losses = criterion.loss_masks(leaf, labels, indices, num_masks)
        (2 * losses["loss_mask"] + 3 * losses["loss_dice"]).backward()
        results.append((losses["loss_mask"], losses["loss_dice"], leaf.grad))
    for name, got, want in zip(("loss_mask", "loss_dice", "grad"), results[1], results[0]):
        assert rel_err(got, want) <= 1e-5, f"{name}: {rel_err(got, want):.2e} (seed {seed})"


def test_revert_model_restores_hf_classes():
    seed = torch.seed()
    reference = tiny_model()
    model = copy.deepcopy(reference)
    before = {n: type(m) for n, m in model.named_modules()}
    patch.apply_m2f_kernels_to_mask2former(model=model)
    patch.apply_m2f_kernels_to_mask2former(model=model)  # twice is the same as once
    patch.revert_m2f_kernels_to_mask2former(model=model, point_loss=False)
    assert isinstance(model.criterion, patch._FusedLoss), "revert undid a switch it was not asked to"
    patch.revert_m2f_kernels_to_mask2former(model=model)
    after = {n: type(m) for n, m in model.named_modules()}
    assert after == before
    batch = make_batch(model.config, 1, 64, "cpu")
    got, want = train_step(model, batch, seed), train_step(reference, batch, seed)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0].masks_queries_logits, want[0].masks_queries_logits), \
        f"reverted model differs from HF (seed {seed})"


def test_class_level_patch_and_revert(restore_module):
    """apply() without a model: models built afterwards are fused; revert() restores HF."""
    originals = restore_module
    reference = tiny_model(seed=1234)
    patch.apply_m2f_kernels_to_mask2former()
    for name in PATCHED_NAMES:
        assert getattr(hf, name) is not originals[name], f"{name} was not patched"
    assert hf.multi_scale_deformable_attention is ms_deform_attn_core_pytorch
    model = tiny_model(seed=1234)  # the same init draws as the unpatched build
    fused = {type(m).__name__ for m in model.modules() if isinstance(m, (patch._Fused, patch.FusedMultiheadAttention))}
    assert len(fused) == 6, f"fused classes in the model: {sorted(fused)}"

    def step(seed):
        batch = make_batch(model.config, 2, 64, "cpu")
        return train_step(model, batch, seed), train_step(reference, batch, seed)

    assert_same_step_retrying_ties(step, 1e-5, 1e-4, "class-level patch")

    patch.revert_m2f_kernels_to_mask2former()
    for name in PATCHED_NAMES:
        assert getattr(hf, name) is originals[name], f"{name} was not restored"
    fresh = tiny_model(seed=1234)
    assert not any(isinstance(m, (patch._Fused, patch.FusedMultiheadAttention)) for m in fresh.modules())
    patch.revert_m2f_kernels_to_mask2former(model=model)  # the one built while patched
    assert [type(m) for m in model.modules()] == [type(m) for m in fresh.modules()]


def test_attention_dropout_runs_hf_path():
    """config.dropout > 0: in training the cross-attention runs nn.MultiheadAttention's own
    forward (the op has no attention dropout), so a seeded step is HF's, dropout draws
    included; in eval it runs fused."""
    config = make_config()
    config.dropout = 0.1
    torch.manual_seed(0)
    reference = transformers.Mask2FormerForUniversalSegmentation(config).train()
    # HF reads config.dropout as the decoder's layer drop too, and a dropped layer other than
    # the last leaves the next one the previous level's mask: HF's own model raises then
    # (patched or not), in ~1 step of 5 here. The draws still happen, in both models alike.
    reference.model.transformer_module.decoder.layerdrop = 0.0
    generic_points(reference)
    model = patch.apply_m2f_kernels_to_mask2former(model=copy.deepcopy(reference))
    batch = make_batch(config, 2, 64, "cpu")

    def step(seed):
        return train_step(model, batch, seed, log=True), train_step(reference, batch, seed)

    ran = assert_same_step_retrying_ties(step, 1e-5, 1e-4, "attention dropout")[3]
    assert ran["m2f_kernels::masked_attention"] == 0 and ran["m2f_kernels::ms_deform_attn"] > 0, dict(ran)
    model.eval(), reference.eval()
    x = batch["pixel_values"]
    with torch.no_grad(), OpLog() as log:
        got = model(pixel_values=x)
    assert log.ops["m2f_kernels::masked_attention"] > 0
    with torch.no_grad():
        want = reference(pixel_values=x)
    assert rel_err(got.masks_queries_logits, want.masks_queries_logits) <= 1e-5


def test_patched_modules_pickle():
    """torch.save / torch.load of a patched module (as of HF's): the fused classes are found by
    name, also in a process that has not made them yet."""
    import io

    criterion = patch.apply_m2f_kernels_to_mask2former(
        model=hf.Mask2FormerLoss(make_config(), weight_dict={}), ms_deform_attn=False, masked_attention=False)
    buf = io.BytesIO()
    torch.save(criterion, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is type(criterion) and type(loaded.matcher) is type(criterion.matcher)
    assert torch.equal(loaded.empty_weight, criterion.empty_weight)
    fused = type(criterion)
    assert getattr(patch, fused.__name__) is fused
    saved = dict(patch._FUSED_CLASSES)
    try:
        patch._FUSED_CLASSES.clear()  # a fresh process: the class is made on lookup
        made = getattr(patch, fused.__name__)
        assert made is not fused and made.__name__ == fused.__name__ and made._m2f_base is hf.Mask2FormerLoss
        assert issubclass(made, patch._FusedLoss)
    finally:
        patch._FUSED_CLASSES.clear()
        patch._FUSED_CLASSES.update(saved)
    with pytest.raises(AttributeError):
        getattr(patch, "M2FKernelsNoSuchClass")


def test_module_function_matches_hf():
    """The swapped ``multi_scale_deformable_attention`` (and the official CPU core it is)."""
    seed = torch.seed()
    shapes = [(5, 6), (3, 3), (1, 2)]
    b, lq, h, d, p = 2, 7, 2, 4, 3
    s = sum(hh * ww for hh, ww in shapes)
    value = torch.randn(b, s, h, d, dtype=torch.float64, requires_grad=True)
    loc = (torch.rand(b, lq, h, len(shapes), p, 2, dtype=torch.float64) * 1.2 - 0.1).requires_grad_()
    weights = torch.rand(b, lq, h, len(shapes), p, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(b, lq, h * d, dtype=torch.float64)
    results = []
    for fn, spatial in ((hf.multi_scale_deformable_attention, shapes), (ms_deform_attn_core_pytorch, shapes),
                        (ms_deform_attn_core_pytorch, torch.tensor(shapes))):
        leaves = [t.detach().clone().requires_grad_() for t in (value, loc, weights)]
        out = fn(leaves[0], spatial, leaves[1], leaves[2])
        out.backward(grad)
        results.append([out] + [t.grad for t in leaves])
    for got in results[1:]:
        for name, a, w in zip(("output", "grad_value", "grad_loc", "grad_weights"), got, results[0]):
            assert rel_err(a, w) <= 1e-10, f"{name} (seed {seed})"


def test_output_attentions_falls_back_to_hf():
    """output_attentions=True needs the softmaxed weights: the fused module runs HF's path."""
    model = tiny_model()
    fused = copy.deepcopy(model)
    patch.apply_m2f_kernels_to_mask2former(model=fused, masked_attention=False, point_loss=False)
    model.eval(), fused.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(pixel_values=x, output_attentions=True)
        got = fused(pixel_values=x, output_attentions=True)
    assert len(got.attentions) > 0
    assert rel_err(got.masks_queries_logits, want.masks_queries_logits) <= 1e-5


def test_patched_model_compiles_in_one_graph():
    """torch.compile(fullgraph=True) of the patched model (eval) gives the eager result."""
    seed = torch.seed()
    model = patch.apply_m2f_kernels_to_mask2former(model=tiny_model()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(pixel_values=x)
        torch._dynamo.reset()
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(pixel_values=x)
    for name in ("class_queries_logits", "masks_queries_logits"):
        err = rel_err(getattr(got, name), getattr(want, name))
        assert err <= 1e-5, f"compiled {name}: relative error {err:.2e} (seed {seed})"


def test_unsupported_version_is_a_clear_error(restore_module, monkeypatch):
    monkeypatch.setattr(hf.Mask2FormerMaskPredictor, "forward", lambda self, outputs, pixel_embeddings: outputs)
    with pytest.raises(patch.UnsupportedTransformersError, match=r"tested with 5\.17\.0.*Mask2FormerMaskPredictor"):
        patch.apply_m2f_kernels_to_mask2former()
    monkeypatch.delattr(hf, "Mask2FormerHungarianMatcher")
    with pytest.raises(patch.UnsupportedTransformersError, match="Mask2FormerHungarianMatcher.forward is missing"):
        patch.apply_m2f_kernels_to_mask2former(masked_attention=False)
    for name in ("Mask2FormerLoss", "Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention"):
        assert getattr(hf, name) is restore_module[name], "a refused patch must change nothing"
    # the switches that do not need the changed symbols still apply
    patch.apply_m2f_kernels_to_mask2former(masked_attention=False, point_loss=False)
    assert hf.multi_scale_deformable_attention is ms_deform_attn_core_pytorch


def test_model_without_mask2former_modules():
    with pytest.raises(ValueError, match="none of the Mask2Former modules"):
        patch.apply_m2f_kernels_to_mask2former(model=torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- GPU, real size
@requires_gpu
def test_real_size_step_matches_hf_on_gpu():
    """Swin-T Mask2Former (official decoder sizes), 2 x 384^2, 12544 points, fp32 without
    tf32: one training step with and without the patch (default backends). Prints the
    step time and peak memory of both."""
    torch.manual_seed(0)
    config = make_config("real")
    reference = transformers.Mask2FormerForUniversalSegmentation(config).cuda().train()
    generic_points(reference)
    model = patch.apply_m2f_kernels_to_mask2former(model=copy.deepcopy(reference))
    batch = make_batch(config, 2, 384, "cuda")
    seed = torch.seed()
    results = timed_fp32_steps({"hf": reference, "m2f_kernels": model}, batch, seed,
                               "HF Mask2Former Swin-T 2x384^2 fp32 train step")
    # the decoder thresholds mask logits at 0, so fp32 reassociation can flip a few mask
    # bits and move later layers' gradients by O(1e-3) (as in test_m2f_equivalence)
    assert_same_step(results["m2f_kernels"], results["hf"], 1e-3, 5e-3, f"real size (seed {seed})")

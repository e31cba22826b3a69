"""``apply_m2f_kernels_to_eomt`` against Hugging Face's own EoMT.

A tiny random-init EomtForUniversalSegmentation (built from a local config, no hub access)
takes one training step with and without the patch, from the same weights and the same RNG
seed (so the matcher and the loss draw the same points): outputs, every loss term of every
prediction (the ``num_blocks`` intermediate ones and the final one) and every parameter
gradient must agree, for the patch of an instance (model=) and of the module (model=None).
The fused ops must have run, and HF's scipy solver and ``sample_point`` must not have.
Revert must give back HF's classes. On a GPU the comparison also runs at EoMT-S size.
"""
from __future__ import annotations

import collections
import copy
import os
import sys

import pytest
import torch

from .conftest import rel_err, requires_gpu

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip(
    "transformers", reason="transformers is not importable (pip install transformers==5.17.0)")
hf = pytest.importorskip("transformers.models.eomt.modeling_eomt", reason="this transformers has no EoMT")
pytest.importorskip("scipy", reason="HF's EomtLoss needs scipy")

from m2f_kernels.integrations import transformers as patch  # noqa: E402
from bench.hf_testing import (  # noqa: E402
    make_batch, make_config, make_eomt_config, module_restored, timed_fp32_steps, train_step,
)
from .test_integrations_transformers import LossTieSuspected, assert_same_step  # noqa: E402

PATCHED_NAMES = [n for s in patch.EOMT_SWITCHES for n in patch.EOMT.classes[s]]
FUSED_OPS = ("m2f_kernels::pairwise_mask_cost", "m2f_kernels::linear_sum_assignment",
             "m2f_kernels::uncertain_point_coords", "m2f_kernels::point_mask_loss",
             "m2f_kernels::point_mask_loss_backward")
HF_FUNCTIONS = ("linear_sum_assignment", "sample_point")  # what HF's matcher and loss call; the patch must not
TERMS = ("loss_mask", "loss_dice", "loss_cross_entropy")


# ----------------------------------------------------------------------------- helpers
def tiny_model(seed: int):
    torch.manual_seed(seed)
    return transformers.EomtForUniversalSegmentation(make_eomt_config()).train()


@pytest.fixture
def hf_calls(monkeypatch):
    """Counts the calls of HF's module functions in HF_FUNCTIONS (they stay HF's own)."""
    calls = collections.Counter()

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in HF_FUNCTIONS:
        monkeypatch.setattr(hf, name, counting(name, getattr(hf, name)))
    return calls


@pytest.fixture
def restore_module():
    """Whatever a test does to the modeling module, the next test sees HF's originals."""
    with module_restored(hf, PATCHED_NAMES, patch.revert_m2f_kernels_to_eomt) as originals:
        yield originals


def eomt_step(model, batch, seed: int, calls: collections.Counter):
    """train_step (with the op log) plus the criterion's loss terms of each prediction, taken
    before the model weights them in place, and the HF_FUNCTIONS calls the step made."""
    terms = []
    hook = model.criterion.register_forward_hook(
        lambda module, args, out: terms.append({k: v.detach().clone() for k, v in out.items()}))
    calls.clear()
    try:
        step = train_step(model, batch, seed, log=True)
    finally:
        hook.remove()
    return step, terms, dict(calls)


def assert_same_eomt_step(step, what: str, tol: float = 1e-5, grad_tol: float = 1e-4):
    """``step(seed) -> (got, want)``, each an :func:`eomt_step`: the same outputs (exactly:
    the patch leaves the forward alone), loss terms, loss and gradients; the fused ops ran in
    ``got`` and HF's functions in ``want`` only. Retried once with a fresh seed when only the
    loss or the gradients differ (HF's matcher and importance sampling have near-ties; see
    test_integrations_transformers.assert_same_step_retrying_ties)."""
    seeds = []
    for attempt in range(2):
        seeds.append(torch.seed())
        got, want = step(seeds[-1])
        label = f"{what} (seeds {seeds})"
        ops, calls, ref_ops, ref_calls = got[0][3], got[2], want[0][3], want[2]
        for op in FUSED_OPS:
            assert ops[op] > 0 and ref_ops[op] == 0, f"{label}: {op} ran {ops[op]} times, in HF's {ref_ops[op]}"
        assert not any(calls.values()), f"{label}: the patched step called HF's {calls}"
        assert all(ref_calls.get(name, 0) > 0 for name in HF_FUNCTIONS), f"{label}: HF's step called {ref_calls}"
        for name in ("class_queries_logits", "masks_queries_logits"):
            assert torch.equal(getattr(got[0][0], name), getattr(want[0][0], name)), f"{label}: {name} differs"
        assert len(got[1]) == len(want[1]) == make_eomt_config().num_blocks + 1, f"{label}: criterion calls"
        try:
            for i, (terms, ref) in enumerate(zip(got[1], want[1])):
                assert terms.keys() == ref.keys() == set(TERMS), f"{label}: loss terms {sorted(terms)}"
                for name in TERMS:
                    if rel_err(terms[name], ref[name]) > tol:
                        raise LossTieSuspected(f"{label}: prediction {i} {name} {terms[name].item()} "
                                               f"vs HF {ref[name].item()}")
            assert_same_step(got[0], want[0], tol, grad_tol, label)
            return
        except LossTieSuspected:
            if attempt:
                raise


# ----------------------------------------------------------------------------- tests
def test_patched_instance_matches_hf(hf_calls):
    """model= patch: the criterion and its matcher become the fused subclasses, nothing else."""

    def step(seed):
        reference = tiny_model(seed)
        model = copy.deepcopy(reference)
        before = {n: type(m) for n, m in model.named_modules()}
        assert patch.apply_m2f_kernels_to_eomt(model=model) is model
        assert model.state_dict().keys() == reference.state_dict().keys()
        changed = {n for n, m in model.named_modules() if type(m) is not before[n]}
        assert changed == {"criterion", "criterion.matcher"}, sorted(changed)
        assert isinstance(model.criterion, hf.EomtLoss) and isinstance(model.criterion, patch._FusedLoss)
        assert isinstance(model.criterion.matcher, hf.EomtHungarianMatcher)
        assert isinstance(model.criterion.matcher, patch._FusedHungarianMatcher)
        batch = make_batch(model.config, 2, 64, "cpu")
        want = eomt_step(reference, batch, seed, hf_calls)
        return eomt_step(model, batch, seed, hf_calls), want

    assert_same_eomt_step(step, "model= patch")


def test_patched_module_matches_hf(hf_calls, restore_module):
    """model=None patch: a model built afterwards (the same init draws) steps as HF's."""

    def step(seed):
        reference = tiny_model(seed)
        patch.apply_m2f_kernels_to_eomt()
        for name in PATCHED_NAMES:
            assert getattr(hf, name) is not restore_module[name], f"{name} was not patched"
        model = tiny_model(seed)
        patch.revert_m2f_kernels_to_eomt()  # models built while patched stay fused
        ref_state = reference.state_dict()
        assert all(torch.equal(t, ref_state[k]) for k, t in model.state_dict().items()), "the init differs"
        assert {n for n, m in model.named_modules() if isinstance(m, patch._Fused)} == {"criterion",
                                                                                     "criterion.matcher"}
        batch = make_batch(model.config, 2, 64, "cpu")
        want = eomt_step(reference, batch, seed, hf_calls)
        return eomt_step(model, batch, seed, hf_calls), want

    assert_same_eomt_step(step, "model=None patch")


def test_revert_restores_hf_classes(restore_module):
    model = tiny_model(0)
    before = {n: type(m) for n, m in model.named_modules()}
    patch.apply_m2f_kernels_to_eomt(model=model)
    patch.apply_m2f_kernels_to_eomt(model=model)  # twice is the same as once
    assert isinstance(model.criterion, patch._FusedLoss)
    assert patch.revert_m2f_kernels_to_eomt(model=model) is model
    assert {n: type(m) for n, m in model.named_modules()} == before

    patch.apply_m2f_kernels_to_eomt()
    patch.apply_m2f_kernels_to_eomt()
    built = tiny_model(0)
    assert isinstance(built.criterion.matcher, patch._FusedHungarianMatcher)
    patch.revert_m2f_kernels_to_eomt()
    for name in PATCHED_NAMES:
        assert getattr(hf, name) is restore_module[name], f"{name} was not restored"
    fresh = tiny_model(0)
    assert not any(isinstance(m, patch._Fused) for m in fresh.modules())
    patch.revert_m2f_kernels_to_eomt(model=built)  # the one built while patched
    assert [type(m) for m in built.modules()] == [type(m) for m in fresh.modules()]


def test_patched_model_pickles():
    """torch.save(model) / torch.load of a patched EoMT, as of HF's: the fused classes come back."""
    import io

    model = patch.apply_m2f_kernels_to_eomt(model=tiny_model(0))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    state = model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in loaded.state_dict().items())


def test_unsupported_version_is_a_clear_error(restore_module, monkeypatch):
    criterion = hf.EomtLoss(make_eomt_config(), weight_dict={})
    monkeypatch.setattr(hf.EomtLoss, "loss_masks", lambda self, masks_queries_logits, mask_labels, indices: None)
    for model in (None, criterion):
        with pytest.raises(patch.UnsupportedTransformersError,
                           match=r"cannot patch the EoMT of transformers .*tested with 5\.17\.0.*"
                                 r"EomtLoss\.loss_masks takes \('masks_queries_logits', 'mask_labels', 'indices'\)"):
            patch.apply_m2f_kernels_to_eomt(model=model)
    assert type(criterion) is hf.EomtLoss and type(criterion.matcher) is hf.EomtHungarianMatcher, \
        "a refused patch must change nothing"
    for name in PATCHED_NAMES:
        assert getattr(hf, name) is restore_module[name], "a refused patch must change nothing"
    monkeypatch.delattr(hf, "EomtHungarianMatcher")
    with pytest.raises(patch.UnsupportedTransformersError, match="EomtHungarianMatcher.forward is missing"):
        patch.apply_m2f_kernels_to_eomt()
    monkeypatch.setitem(sys.modules, "transformers.models.eomt.modeling_eomt", None)  # a transformers without EoMT
    with pytest.raises(patch.UnsupportedTransformersError, match="needs transformers with EoMT"):
        patch.apply_m2f_kernels_to_eomt()


def test_families_do_not_mix():
    """Each apply patches its own family's modules only (the classes are shared, the tables not)."""
    with pytest.raises(ValueError, match="none of the EoMT modules"):
        patch.apply_m2f_kernels_to_eomt(model=torch.nn.Linear(2, 2))
    m2f_loss = transformers.models.mask2former.modeling_mask2former.Mask2FormerLoss(make_config(), weight_dict={})
    with pytest.raises(ValueError, match="none of the EoMT modules"):
        patch.apply_m2f_kernels_to_eomt(model=m2f_loss)
    with pytest.raises(ValueError, match="none of the Mask2Former modules"):
        patch.apply_m2f_kernels_to_mask2former(model=hf.EomtLoss(make_eomt_config(), weight_dict={}))


# ----------------------------------------------------------------------------- GPU, real size
@requires_gpu
def test_real_size_step_matches_hf_on_gpu():
    """EoMT-S (ViT-S/16, 200 queries, 4 query blocks), 2 x 640^2, 12544 points, fp32 without
    tf32: one training step with and without the patch. Prints the step time and peak
    memory of both (EoMT-L: python -m bench.hf_mask2former --model eomt)."""
    torch.manual_seed(0)
    config = make_eomt_config("small")
    reference = transformers.EomtForUniversalSegmentation(config).cuda().train()
    model = patch.apply_m2f_kernels_to_eomt(model=copy.deepcopy(reference))
    batch = make_batch(config, 2, config.image_size, "cuda")
    seed = torch.seed()
    results = timed_fp32_steps({"hf": reference, "m2f_kernels": model}, batch, seed,
                               "HF EoMT-S 2x640^2 fp32 train step")
    # the forward is HF's in both; the loss's reassociation moves the gradients by rounding
    assert_same_step(results["m2f_kernels"], results["hf"], 1e-4, 5e-3, f"real size (seed {seed})")

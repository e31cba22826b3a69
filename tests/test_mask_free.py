"""Mask-free training (``mask_head='points'``): loss, matcher and attention masks from the mask
embeddings and the mask features, equal to the mask-logits path, and no [B, Q, H/4, W/4]
tensor anywhere in a training step."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import m2f_kernels
from m2f_kernels.reference import point_mask_logits as reference_point_mask_logits
from bench.m2f_testing import TINY, random_images, random_targets
from m2f import build_model
from m2f.targets import pad_targets

from ._same_points import same_points  # noqa: F401  (fixture)
from .conftest import INTERPRETING, ON_GPU, rel_err


def _criterion(mask_head):
    model = build_model("resnet18", kernels="fused", mask_head=mask_head, **TINY)
    return model.criterion


def _outputs(batch=2, queries=7, channels=6, size=8, aux=2, dtype=torch.float64):
    def prediction():
        return {"pred_logits": torch.randn(batch, queries, TINY["num_classes"] + 1, dtype=dtype),
                "mask_embed": torch.randn(batch, queries, channels, dtype=dtype)}

    out = prediction()
    out["mask_features"] = torch.randn(batch, channels, size, size, dtype=dtype)
    out["aux_outputs"] = [prediction() for _ in range(aux)]
    return out


def _as_logits(out):
    """The same predictions with their mask logits built (the mask-logits path's input)."""
    def masks(p):
        return {"pred_logits": p["pred_logits"],
                "pred_masks": torch.einsum("bqc,bchw->bqhw", p["mask_embed"], out["mask_features"])}

    return {**masks(out), "aux_outputs": [masks(a) for a in out["aux_outputs"]]}


def _leaves(out):
    leaves = {"features": out["mask_features"].clone().requires_grad_()}
    new = {"pred_logits": out["pred_logits"], "mask_embed": out["mask_embed"].clone().requires_grad_(),
           "mask_features": leaves["features"], "aux_outputs": []}
    leaves["embed"] = [new["mask_embed"]]
    for a in out["aux_outputs"]:
        new["aux_outputs"].append({"pred_logits": a["pred_logits"], "mask_embed": a["mask_embed"].clone().requires_grad_()})
        leaves["embed"].append(new["aux_outputs"][-1]["mask_embed"])
    return new, leaves


def test_losses_and_gradients_equal_the_mask_logits_path(same_points):
    seed = torch.seed()
    out = _outputs()
    targets = pad_targets(random_targets(2, TINY["num_classes"], 32, 32, max_targets=5), (32, 32), max_targets=6)
    results = {}
    for head in ("points", "logits"):
        new, leaves = _leaves(out)
        losses = _criterion(head)(new if head == "points" else _as_logits(new), targets)
        sum(losses.values()).backward()
        results[head] = losses, [leaves["features"].grad] + [e.grad for e in leaves["embed"]]
    (free, free_grads), (logits, logit_grads) = results["points"], results["logits"]
    assert free.keys() == logits.keys() and len(free) == 9
    for k in free:
        assert rel_err(free[k], logits[k]) < 1e-5, (k, seed)
    for g, w in zip(free_grads, logit_grads):
        assert rel_err(g, w) < 1e-5, seed


def test_matcher_costs_equal_the_mask_logits_path(same_points):
    seed = torch.seed()
    out = _outputs(aux=0)
    targets = pad_targets(random_targets(2, TINY["num_classes"], 32, 32, max_targets=5), (32, 32))
    matcher = _criterion("points").matcher
    free = matcher.cost_matrices([out], targets)
    logits = matcher.cost_matrices([_as_logits(out)], targets)
    assert rel_err(free, logits) < 1e-5, seed


def _decoder_attention_masks(model, images):
    """The attention masks each cross-attention layer receives (blocked = True)."""
    seen = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: seen.append(args[2].detach().clone()))
             for layer in model.sem_seg_head.predictor.transformer_cross_attention_layers]
    try:
        model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_attention_masks_equal_the_mask_logits_path():
    """Bits may differ only where the logit is within 1e-4 of 0 (sigmoid(x) < 0.5 vs x < 0)."""
    torch.manual_seed(0)
    model = build_model("resnet18", kernels="fused", **TINY).eval()
    images = random_images(2, 64, 64)
    with torch.no_grad():
        free = _decoder_attention_masks(model, images)
        model.sem_seg_head.predictor.mask_head = "logits"
        blocked = _decoder_attention_masks(model, images)
    assert len(free) == len(blocked) == TINY["dec_layers"]
    for logit, bits in zip(free, blocked):
        assert logit.is_floating_point() and bits.dtype == torch.bool
        differ = (logit < 0) != bits
        assert (logit[differ].abs() < 1e-4).all(), logit[differ]


class _Allocations(TorchDispatchMode):
    """Shapes of every tensor the ops of a region return."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.append((func.name(), tuple(t.shape)))
        return out


@pytest.mark.parametrize("mask_head", ["points", "logits"])
def test_training_never_builds_mask_logits(mask_head):
    """Forward and backward of a fused training step: no tensor of shape [..., Q, H/4, W/4] or
    of Q*(H/4)*(W/4) elements per image (the check must fire on the mask-logits path)."""
    queries, size, batch = 13, 96, 2
    torch.manual_seed(0)
    # 50 points: no point tensor's size is a multiple of Q*h*w by chance
    model = build_model("resnet18", kernels="fused", mask_head=mask_head,
                        **{**TINY, "num_queries": queries, "num_points": 50})
    images = random_images(batch, size, size)
    targets = random_targets(batch, model.num_classes, size, size)
    h = w = size // 4
    with _Allocations() as seen:
        sum(model(images, targets).values()).backward()
    bad = [(name, shape) for name, shape in seen.shapes
           if shape[-3:] == (queries, h, w) or any(torch.Size(shape).numel() == k * queries * h * w
                                                   for k in range(1, batch + 1))]
    if mask_head == "points":
        assert not bad, bad[:10]
    else:
        assert bad, "the watcher must see the mask logits of the mask-logits path"


def test_eval_still_returns_the_last_masks():
    torch.manual_seed(0)
    model = build_model("resnet18", kernels="fused", **TINY).eval()
    images = random_images(2, 64, 64)
    with torch.no_grad():
        free = model(images)
        model.sem_seg_head.predictor.mask_head = "logits"
        logits = model(images)
    assert free.keys() == logits.keys() == {"pred_logits", "pred_masks"}
    assert rel_err(free["pred_masks"], logits["pred_masks"]) < 1e-5
    assert rel_err(free["pred_logits"], logits["pred_logits"]) < 1e-4


@pytest.mark.parametrize("one_mask_chunks", [False, True])
def test_point_mask_logits_is_the_sampled_einsum(one_mask_chunks, monkeypatch):
    if one_mask_chunks:  # the reference's chunk loop, one matched mask at a time
        monkeypatch.setattr(reference_point_mask_logits, "_CHUNK_ELEMENTS", 1)
    seed = torch.seed()
    embed, features = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(2, 6, 7, 9, dtype=torch.float64)
    coords = torch.rand(4, 11, 2, dtype=torch.float64) * 1.2 - 0.1
    index = (torch.tensor([0, 1, 1, 0]), torch.tensor([3, 0, 3, 3]))
    masks = torch.einsum("bqc,bchw->bqhw", embed, features)[index]
    want = m2f_kernels.point_sample(masks[:, None], coords)[:, 0]
    assert rel_err(m2f_kernels.point_mask_logits(embed, features, coords, index), want) < 1e-12, seed
    leaves = (embed.requires_grad_(), features.requires_grad_())
    assert torch.autograd.gradcheck(lambda e, f: m2f_kernels.point_mask_logits(e, f, coords, index), leaves)


@pytest.mark.skipif(not (ON_GPU or INTERPRETING), reason="needs a device the triton backend runs on")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 40, 7, 9, 3, 70), (1, 1, 3, 1, 1, 1, 1), (2, 3, 16, 5, 4, 6, 33)])
def test_triton_point_mask_logits_matches_the_reference(dtype, shape):
    seed = torch.seed()
    b, q, c, h, w, n, p = shape
    device = "cuda" if ON_GPU else "cpu"
    embed = torch.randn(b, q, c, device=device, dtype=dtype)
    features = torch.randn(b, c, h, w, device=device, dtype=dtype)
    if c % 2 == 0:  # channels-last features read through their strides
        features = features.to(memory_format=torch.channels_last)
    coords = torch.rand(n, p, 2, device=device) * 1.2 - 0.1
    index = (torch.randint(0, b, (n,), device=device), torch.randint(0, q, (n,), device=device))
    grad = torch.randn(n, p, device=device, dtype=dtype)
    results = {}
    for backend in ("reference", "triton"):
        e, f = embed.clone().requires_grad_(), features.clone().requires_grad_()
        out = m2f_kernels.point_mask_logits(e, f, coords, index, backend=backend)
        out.backward(grad)
        results[backend] = (out, e.grad, f.grad)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, got, want in zip(("logits", "grad embed", "grad features"), results["triton"], results["reference"]):
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        assert rel_err(got, want) < tol, (name, seed)


@pytest.mark.slow
def test_triton_point_mask_logits_compiles_for_sm90_without_spills(tmp_path):
    """The kernels have run in the interpreter only: compile them for sm_90 as the mask-free
    criterion launches them (bench/tools/triton_aot_dump.py's point_mask_logits cases: fp32
    and bf16, contiguous and channels-last features, a partial channel block), no GPU needed."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "bench.tools.triton_aot_dump", "dump", str(tmp_path),
                          "--cases", "point_mask_logits", "--arch", "90"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    entries = json.loads((tmp_path / "index.json").read_text())["entries"]
    assert len(entries) == 10, [e.get("name") for e in entries]  # fwd + bwd of 5 launches
    for e in entries:
        res = e["resources"]
        if "regs" in res:  # cuobjdump ships with Triton's NVIDIA backend
            assert res["stack"] == 0 and res["local"] == 0, f"{e['name']} spills: {res}"

"""ONNX export: ``torch.onnx.export(..., dynamo=True)`` of models that call m2f_kernels ops.

During an ONNX export every op traces as its reference implementation (``Op.decomposed``),
so the graph holds standard ONNX operators only, and onnxruntime (CPU) must reproduce
PyTorch's outputs within 1e-4: the inference ops alone, the m2f model with
``kernels='fused'``, and HF's Mask2Former with the m2f_kernels patch. ``torch.export`` alone
keeps the custom ops (AOTInductor runs the kernels).
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

import m2f_kernels as mk
from m2f_kernels.nn.ms_deform_attn import level_index
from m2f_kernels.ops import _define

onnx = pytest.importorskip("onnx", reason="ONNX export tests need onnx (pip install -e '.[export]')")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (pip install -e '.[export]')")
pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript (pip install -e '.[export]')")

OPSET = 18  # the lowest opset the dynamo exporter writes; GridSample needs 16
TOLERANCE = 1e-4
LEVELS = ((6, 5), (3, 3))


class InferenceOps(torch.nn.Module):
    """Each op an exported inference graph may hold, in the forms models call them."""

    def forward(self, q, k, v, blocked, mask_logits, value, locations, weights, features, coords, pred, target):
        shapes, starts = level_index(LEVELS, value.device, {})
        return (
            mk.masked_attention(q, k, v, blocked),                      # bool [B, Q, N], shared by heads
            mk.masked_attention(q, k, v, mask_logits),                  # logits [B, H, Q, N]
            mk.ms_deform_attn(value, shapes, starts, locations, weights, softmax=True),
            mk.ms_deform_attn(value, shapes, starts, locations, weights.softmax(-1)),
            mk.point_sample(features, coords),
            *mk.pairwise_mask_cost(pred, target, coords[0]),
            *mk.point_mask_loss(pred, target, coords[:1].expand(pred.shape[0], -1, -1), 3.0),
        )


def inference_inputs():
    b, h, nq, n, d = 2, 2, 5, 17, 8
    s = sum(hh * ww for hh, ww in LEVELS)
    blocked = torch.rand(b, nq, n) > 0.5
    blocked[0, 0] = True  # a fully blocked row sees all keys
    return (
        torch.randn(b, h, nq, d), torch.randn(b, h, n, d), torch.randn(b, h, n, d), blocked,
        torch.randn(b, h, nq, n),
        torch.randn(b, s, h, d), torch.rand(b, 7, h, len(LEVELS), 3, 2), torch.randn(b, 7, h, len(LEVELS), 3),
        torch.randn(2, 3, 9, 11), torch.rand(2, 13, 2) * 1.2 - 0.1,  # some points outside the image
        torch.randn(4, 9, 11), (torch.rand(4, 9, 11) > 0.5).float(),
    )


def export_and_run(module: torch.nn.Module, args: tuple, path, optimize: bool = True) -> list:
    """Export ``module`` at ``args`` to ``path`` and run it with onnxruntime: its outputs.
    ``optimize=False`` skips onnxscript's graph optimisation (half the time of a model export)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, verbose=False,
                                    optimize=optimize)
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return session.run(None, feeds)


def assert_outputs_match(got: list, want, what: str) -> None:
    want = [w.detach().numpy() for w in want]
    assert len(got) == len(want), f"{what}: {len(got)} ONNX outputs, PyTorch has {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{what} output {i}: shape {g.shape} != {w.shape}"
        assert np.isfinite(g).all(), f"{what} output {i}: non-finite values"
        err = np.abs(g.astype(np.float64) - w).max() / max(1.0, np.abs(w).max())
        assert err <= TOLERANCE, f"{what} output {i}: max error {err:.2e} > {TOLERANCE:.0e}"


def graph_ops(path) -> set:
    """(domain, op_type) of every node, functions included."""
    model = onnx.load(str(path))
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return {(n.domain, n.op_type) for n in nodes}


@pytest.fixture
def decomposed_ops(monkeypatch):
    """The names of the ops that traced as their reference during the test."""
    names = []
    original = _define.Op.decomposed

    def decomposed(self, *args):
        names.append(self.name)
        return original(self, *args)

    monkeypatch.setattr(_define.Op, "decomposed", decomposed)
    return names


def test_inference_ops_export_as_standard_onnx(tmp_path, decomposed_ops):
    module, args = InferenceOps().eval(), inference_inputs()
    got = export_and_run(module, args, tmp_path / "ops.onnx")
    assert set(decomposed_ops) == {"masked_attention", "ms_deform_attn", "point_sample", "pairwise_mask_cost",
                                   "point_mask_loss"}
    ops = graph_ops(tmp_path / "ops.onnx")
    assert {d for d, _ in ops} == {""}, f"non-standard ONNX domains: {sorted(ops)}"
    assert ("", "GridSample") in ops
    with torch.no_grad():
        assert_outputs_match(got, module(*args), "inference ops")


def test_torch_export_keeps_the_custom_ops():
    """Only the ONNX exporter decomposes: an ExportedProgram (AOTInductor) calls the kernels."""
    program = torch.export.export(InferenceOps().eval(), inference_inputs())
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"m2f_kernels.masked_attention.default", "m2f_kernels.ms_deform_attn.default"} <= targets
    assert not any("grid_sampler" in t for t in targets)


@pytest.mark.slow
def test_m2f_model_exports(tmp_path, decomposed_ops):
    from bench.m2f_testing import TINY, jitter_deformable_init, random_images
    from m2f.build import build_model

    model = build_model("resnet50", kernels="fused", **{**TINY, "backbone_depths": (1, 1, 1, 1)}).eval()
    jitter_deformable_init(model)
    images = random_images(1, 64, 64)
    got = export_and_run(model, (images,), tmp_path / "m2f.onnx", optimize=False)
    assert {"masked_attention", "ms_deform_attn"} <= set(decomposed_ops)
    with torch.no_grad():
        out = model(images)
    assert_outputs_match(got, (out["pred_logits"], out["pred_masks"]), "m2f model")


@pytest.mark.slow
def test_patched_hf_mask2former_exports(tmp_path, decomposed_ops):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pytest.importorskip("transformers", reason="transformers is not importable")
    from bench.hf_testing import hf, make_config
    from m2f_kernels.integrations.transformers import apply_m2f_kernels_to_mask2former

    config = make_config("tiny")
    # HF's Swin with SDPA attention does not export (a view of its transposed output); eager does
    config.backbone_config._attn_implementation = "eager"
    model = apply_m2f_kernels_to_mask2former(model=hf.Mask2FormerForUniversalSegmentation(config).eval())
    # Random weights put the mask logits near 0 (median |logit| ~1e-4, the smallest ~1e-7), where
    # the attention masks' threshold flips on rounding, which ONNX Runtime does otherwise: scaled
    # 1e4-fold, no logit is that close to it.
    last = dict(model.model.transformer_module.decoder.mask_predictor.mask_embedder.named_modules())["2.0"]
    with torch.no_grad():
        last.weight.mul_(1e4)
        last.bias.mul_(1e4)

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            out = self.model(pixel_values=pixel_values)
            return out.class_queries_logits, out.masks_queries_logits

    wrapped, images = Logits(model), torch.randn(1, 3, 64, 64)
    got = export_and_run(wrapped, (images,), tmp_path / "hf.onnx", optimize=False)
    assert {"masked_attention", "ms_deform_attn"} <= set(decomposed_ops)
    with torch.no_grad():
        assert_outputs_match(got, wrapped(images), "HF Mask2Former")

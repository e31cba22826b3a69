"""Weights from local files: official Mask2Former checkpoints (detectron2 .pkl key
names) and pretrained backbones (torchvision ResNet, official Swin)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from m2f import (
    CheckpointMismatchError,
    build_model,
    load_official_checkpoint,
    save_official_checkpoint,
    to_official_state_dict,
)
from bench.m2f_testing import TINY, random_images

BN = ("weight", "bias", "running_mean", "running_var")
# Names as they appear in the official Mask2Former checkpoints (model zoo .pkl files).
OFFICIAL_HEAD_KEYS = [
    "sem_seg_head.pixel_decoder.input_proj.0.0.weight",
    "sem_seg_head.pixel_decoder.input_proj.2.1.bias",
    "sem_seg_head.pixel_decoder.transformer.level_embed",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.1.self_attn.attention_weights.bias",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.1.self_attn.value_proj.weight",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.1.self_attn.output_proj.bias",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.linear1.weight",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.norm2.bias",
    "sem_seg_head.pixel_decoder.mask_features.weight",
    "sem_seg_head.pixel_decoder.adapter_1.weight",
    "sem_seg_head.pixel_decoder.adapter_1.norm.weight",
    "sem_seg_head.pixel_decoder.layer_1.weight",
    "sem_seg_head.pixel_decoder.layer_1.norm.bias",
    "sem_seg_head.predictor.transformer_self_attention_layers.0.self_attn.in_proj_weight",
    "sem_seg_head.predictor.transformer_self_attention_layers.2.self_attn.out_proj.bias",
    "sem_seg_head.predictor.transformer_cross_attention_layers.1.multihead_attn.in_proj_bias",
    "sem_seg_head.predictor.transformer_cross_attention_layers.1.norm.weight",
    "sem_seg_head.predictor.transformer_ffn_layers.0.linear2.weight",
    "sem_seg_head.predictor.decoder_norm.weight",
    "sem_seg_head.predictor.query_feat.weight",
    "sem_seg_head.predictor.query_embed.weight",
    "sem_seg_head.predictor.level_embed.weight",
    "sem_seg_head.predictor.class_embed.bias",
    "sem_seg_head.predictor.mask_embed.layers.2.weight",
]
OFFICIAL_SWIN_KEYS = [
    "backbone.patch_embed.proj.weight",
    "backbone.patch_embed.norm.bias",
    "backbone.layers.0.blocks.0.attn.relative_position_bias_table",
    "backbone.layers.0.blocks.1.attn.relative_position_index",
    "backbone.layers.1.blocks.1.attn.qkv.weight",
    "backbone.layers.2.blocks.0.mlp.fc2.bias",
    "backbone.layers.0.downsample.reduction.weight",
    "backbone.layers.2.downsample.norm.weight",
    "backbone.norm0.weight",
    "backbone.norm3.bias",
]


def detectron2_resnet_keys(layers, bottleneck):
    """detectron2's ResNet state-dict names (basic stem, FrozenBN), written out independently."""
    keys = ["stem.conv1.weight"] + [f"stem.conv1.norm.{s}" for s in BN]
    for stage, n in enumerate(layers, start=2):
        for i in range(n):
            for c in range(1, (3 if bottleneck else 2) + 1):
                keys += [f"res{stage}.{i}.conv{c}.weight"] + [f"res{stage}.{i}.conv{c}.norm.{s}" for s in BN]
            if i == 0 and (bottleneck or stage > 2):
                keys += [f"res{stage}.{i}.shortcut.weight"] + [f"res{stage}.{i}.shortcut.norm.{s}" for s in BN]
    return keys


def torchvision_resnet_keys(layers, bottleneck):
    """torchvision's ResNet state-dict names, classifier and BN counters included."""
    bn = BN + ("num_batches_tracked",)
    keys = ["conv1.weight"] + [f"bn1.{s}" for s in bn]
    for stage, n in enumerate(layers, start=1):
        for i in range(n):
            for c in range(1, (3 if bottleneck else 2) + 1):
                keys += [f"layer{stage}.{i}.conv{c}.weight"] + [f"layer{stage}.{i}.bn{c}.{s}" for s in bn]
            if i == 0 and (bottleneck or stage > 1):
                keys += [f"layer{stage}.{i}.downsample.0.weight"] + [f"layer{stage}.{i}.downsample.1.{s}" for s in bn]
    return keys + ["fc.weight", "fc.bias"]


TINY_R50 = {**TINY, "backbone_width": 8, "backbone_depths": (1, 2, 1, 1)}
TINY_SWIN = {**TINY, "backbone_width": 32, "backbone_depths": (2, 2, 2, 2)}


def randomize(model):
    """Random values in every saved tensor (so a load that misses one shows)."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.01)
    return model


@pytest.mark.parametrize("backbone, cfg", [("resnet50", TINY_R50), ("resnet18", TINY), ("swin_tiny", TINY_SWIN)])
def test_official_checkpoint_round_trip(tmp_path, backbone, cfg):
    src = randomize(build_model(backbone, **cfg))
    path = str(tmp_path / "model_final.pkl")
    save_official_checkpoint(src, path)
    with open(path, "rb") as f:
        official = pickle.load(f)["model"]
    assert all(isinstance(v, np.ndarray) for v in official.values())
    names = set(official)
    assert set(OFFICIAL_HEAD_KEYS) <= names, sorted(set(OFFICIAL_HEAD_KEYS) - names)
    backbone_names = {k[len("backbone."):] for k in names if k.startswith("backbone.")}
    if backbone.startswith("resnet"):
        layers, bottleneck = (cfg.get("backbone_depths") or (2, 2, 2, 2)), backbone != "resnet18"
        assert backbone_names == set(detectron2_resnet_keys(layers, bottleneck))
    else:
        assert set(OFFICIAL_SWIN_KEYS) <= names, sorted(set(OFFICIAL_SWIN_KEYS) - names)
    # official files also carry the criterion's class weights
    official["criterion.empty_weight"] = np.ones(cfg["num_classes"] + 1, dtype=np.float32)
    with open(path, "wb") as f:
        pickle.dump({"model": official, "__author__": "test"}, f)

    dst = randomize(build_model(backbone, **cfg))
    load_official_checkpoint(dst, path)
    want, got = src.state_dict(), dst.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    images = random_images(1, 64, 64)
    src.eval(), dst.eval()
    with torch.no_grad():
        want_out, got_out = src(images)["pred_masks"], dst(images)["pred_masks"]
    assert torch.isfinite(want_out).all() and torch.equal(want_out, got_out)


def test_official_checkpoint_key_errors_list_every_key():
    model = build_model("resnet50", **TINY_R50)
    official = to_official_state_dict(model)
    del official["backbone.res3.0.shortcut.norm.running_var"]
    del official["sem_seg_head.predictor.query_embed.weight"]
    official["sem_seg_head.predictor.static_query.weight"] = np.zeros((8, 64), np.float32)
    official["backbone.fc.weight"] = np.zeros((10, 10), np.float32)
    official["sem_seg_head.predictor.class_embed.weight"] = np.zeros((134, 64), np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        load_official_checkpoint(model, official)
    message = str(info.value)
    for key in ("backbone.layer2.0.downsample.1.running_var", "sem_seg_head.predictor.query_embed.weight",
                "sem_seg_head.predictor.static_query.weight", "backbone.fc.weight",
                "sem_seg_head.predictor.class_embed.weight: file (134, 64) vs model (6, 64)"):
        assert key in message, f"{key!r} not in:\n{message}"
    assert "missing keys (2)" in message and "unexpected keys (2)" in message and "shape mismatches (1)" in message
    assert sorted(info.value.missing) == ["backbone.layer2.0.downsample.1.running_var",
                                          "sem_seg_head.predictor.query_embed.weight"]


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_resnet_weights_load_by_path(tmp_path, depth):
    cfg = TINY if depth == 18 else TINY_R50
    layers, bottleneck = cfg.get("backbone_depths") or (2, 2, 2, 2), depth != 18
    shapes = {k: tuple(v.shape) for k, v in build_model(f"resnet{depth}", **cfg).backbone.state_dict().items()}
    state = {}
    for k in torchvision_resnet_keys(layers, bottleneck):
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7)
        elif k.startswith("fc."):
            state[k] = torch.randn(10, 3) if k.endswith("weight") else torch.randn(10)
        else:
            state[k] = torch.rand(shapes[k]) + 0.5
    path = str(tmp_path / "resnet.pth")
    torch.save(state, path)
    model = build_model(f"resnet{depth}", backbone_weights=path, **cfg)
    loaded = model.backbone.state_dict()
    for k, v in loaded.items():
        assert torch.equal(v, state[k]), k

    del state["layer1.0.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match="layer1.0.conv1.weight"):
        build_model(f"resnet{depth}", backbone_weights=path, **cfg)


def test_swin_classification_weights_load(tmp_path):
    from m2f.checkpoint import load_backbone_weights

    src = randomize(build_model("swin_tiny", **TINY_SWIN)).backbone
    state = {k: v.numpy() for k, v in src.state_dict().items() if not k.startswith("norm") or k.startswith("norm.")}
    state.update({"head.weight": np.zeros((10, 256), np.float32), "head.bias": np.zeros(10, np.float32),
                  "norm.weight": np.ones(256, np.float32), "norm.bias": np.zeros(256, np.float32),
                  "layers.0.blocks.1.attn_mask": np.zeros((4, 49, 49), np.float32)})
    path = str(tmp_path / "swin_tiny_patch4_window7_224.pkl")
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "third_party", "matching_heuristics": True}, f)
    dst = build_model("swin_tiny", **TINY_SWIN).backbone
    norm0 = dst.norm0.weight.clone()
    report = load_backbone_weights(dst, path)
    assert report["ignored"] == sorted(["head.weight", "head.bias", "norm.weight", "norm.bias",
                                        "layers.0.blocks.1.attn_mask"])
    assert report["not_loaded"] == [f"norm{i}.{p}" for i in range(4) for p in ("bias", "weight")]
    assert torch.equal(dst.norm0.weight, norm0)
    for k, v in dst.state_dict().items():
        if not k.startswith("norm"):
            assert torch.equal(v, src.state_dict()[k]), k

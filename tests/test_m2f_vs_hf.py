"""The m2f model against transformers' Mask2Former port: the same tiny Swin configuration, the
m2f weights copied into the HF model under HF's names, the same image; the final class and
mask logits must agree (kernels='reference' and 'fused' on the m2f side), on square-crop
batches and on the evaluation's single images of any size. The ResNet backbone against HF's
ResNetBackbone at odd sizes."""
from __future__ import annotations

import os
import re

import pytest
import torch

import m2f_kernels
from m2f import build_model
from bench.m2f_testing import jitter_deformable_init, random_images
from .conftest import assert_close, requires_triton

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers is not importable")

# HF names -> m2f (official) names: Swin blocks, pixel-decoder encoder layers, transformer-decoder layers
_SWIN_BLOCK = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.o_proj": "attn.proj",
               "attention.relative_position_bias": "attn",  # .relative_position_bias_table
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_ENCODER_LAYER = {"self_attn_layer_norm": "norm1", "fc1": "linear1", "fc2": "linear2", "final_layer_norm": "norm2"}
_DECODER_LAYER = {"self_attn.out_proj": "transformer_self_attention_layers.{i}.self_attn.out_proj",
                  "self_attn_layer_norm": "transformer_self_attention_layers.{i}.norm",
                  "cross_attn": "transformer_cross_attention_layers.{i}.multihead_attn",
                  "cross_attn.out_proj": "transformer_cross_attention_layers.{i}.multihead_attn.out_proj",
                  "cross_attn_layer_norm": "transformer_cross_attention_layers.{i}.norm",
                  "fc1": "transformer_ffn_layers.{i}.linear1", "fc2": "transformer_ffn_layers.{i}.linear2",
                  "final_layer_norm": "transformer_ffn_layers.{i}.norm"}
_QKV = {"q": 0, "k": 1, "v": 2}

_BACKBONE = "model.pixel_level_module.encoder."
_PIXEL_DECODER = "model.pixel_level_module.decoder."
_PREDICTOR = "model.transformer_module."
# HF keys with no m2f counterpart: SwinModel's final norm (unused by SwinBackbone) and the
# criterion's class-weight buffer
HF_ONLY = re.compile(r"^model\.pixel_level_module\.encoder\.swin\.layernorm\.|^criterion\.empty_weight$")


def m2f_source(hf_key: str):
    """HF key -> (m2f key, chunk): the HF tensor is chunk ``chunk`` of 3 along dim 0 of the m2f
    tensor (q / k / v of a fused in-projection), or the whole tensor when chunk is None."""
    if hf_key.startswith(_BACKBONE):
        k = hf_key[len(_BACKBONE):]
        if m := re.fullmatch(r"swin\.embeddings\.patch_embeddings\.projection\.(\w+)", k):
            return f"backbone.patch_embed.proj.{m[1]}", None
        if m := re.fullmatch(r"swin\.embeddings\.norm\.(\w+)", k):
            return f"backbone.patch_embed.norm.{m[1]}", None
        if m := re.fullmatch(r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.([qkv])_proj\.(\w+)", k):
            return f"backbone.layers.{m[1]}.blocks.{m[2]}.attn.qkv.{m[4]}", _QKV[m[3]]
        if m := re.fullmatch(r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)\.(\w+)", k):
            return f"backbone.layers.{m[1]}.blocks.{m[2]}.{_SWIN_BLOCK[m[3]]}.{m[4]}", None
        if m := re.fullmatch(r"swin\.encoder\.layers\.(\d+)\.downsample\.(\w+)\.(\w+)", k):
            return f"backbone.layers.{m[1]}.downsample.{m[2]}.{m[3]}", None
        if m := re.fullmatch(r"hidden_states_norms\.stage(\d)\.(\w+)", k):  # per-output norms: stage1 = norm0
            return f"backbone.norm{int(m[1]) - 1}.{m[2]}", None
    elif hf_key.startswith(_PIXEL_DECODER):
        k, p = hf_key[len(_PIXEL_DECODER):], "sem_seg_head.pixel_decoder."
        if k == "level_embed":
            return p + "transformer.level_embed", None
        if m := re.fullmatch(r"input_projections\.(.+)", k):
            return p + f"input_proj.{m[1]}", None
        if m := re.fullmatch(r"encoder\.layers\.(\d+)\.(self_attn\..+)", k):
            return p + f"transformer.encoder.layers.{m[1]}.{m[2]}", None
        if m := re.fullmatch(r"encoder\.layers\.(\d+)\.(\w+)\.(\w+)", k):
            return p + f"transformer.encoder.layers.{m[1]}.{_ENCODER_LAYER[m[2]]}.{m[3]}", None
        if m := re.fullmatch(r"mask_projection\.(\w+)", k):
            return p + f"mask_features.{m[1]}", None
        # FPN convs: HF Sequential(conv, GroupNorm[, ReLU]), detectron2's Conv2d(norm=...)
        if m := re.fullmatch(r"(adapter_\d+|layer_\d+)\.0\.weight", k):
            return p + f"{m[1]}.weight", None
        if m := re.fullmatch(r"(adapter_\d+|layer_\d+)\.1\.(\w+)", k):
            return p + f"{m[1]}.norm.{m[2]}", None
    elif hf_key.startswith(_PREDICTOR):
        k, p = hf_key[len(_PREDICTOR):], "sem_seg_head.predictor."
        named = {"queries_embedder.weight": "query_embed.weight", "queries_features.weight": "query_feat.weight",
                 "level_embed.weight": "level_embed.weight", "decoder.layernorm.weight": "decoder_norm.weight",
                 "decoder.layernorm.bias": "decoder_norm.bias"}
        if k in named:
            return p + named[k], None
        if m := re.fullmatch(r"decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            return p + f"transformer_self_attention_layers.{m[1]}.self_attn.in_proj_{m[3]}", _QKV[m[2]]
        if m := re.fullmatch(r"decoder\.layers\.(\d+)\.(\w+(?:\.out_proj)?)\.(\w+)", k):
            return p + _DECODER_LAYER[m[2]].format(i=m[1]) + f".{m[3]}", None
        if m := re.fullmatch(r"decoder\.mask_predictor\.mask_embedder\.(\d)\.0\.(\w+)", k):
            return p + f"mask_embed.layers.{m[1]}.{m[2]}", None
    elif m := re.fullmatch(r"class_predictor\.(\w+)", hf_key):
        return f"sem_seg_head.predictor.class_embed.{m[1]}", None
    raise KeyError(f"no m2f counterpart for HF key {hf_key}")


def copy_into_hf(m2f_model, hf_model) -> None:
    """Load m2f's weights into ``hf_model``; every m2f parameter must be used, exactly once."""
    source = m2f_model.state_dict()
    state, used = {}, []
    for hf_key, target in hf_model.state_dict().items():
        if HF_ONLY.search(hf_key):
            state[hf_key] = target
            continue
        key, chunk = m2f_source(hf_key)
        value = source[key] if chunk is None else source[key].chunk(3, dim=0)[chunk]
        assert value.shape == target.shape, f"{hf_key} {tuple(target.shape)} <- {key} {tuple(value.shape)}"
        state[hf_key] = value.clone()
        used.append((key, chunk))
    assert len(used) == len(set(used)), "an m2f tensor is copied twice"
    # relative_position_index: a persistent buffer in m2f (as the official Swin), recomputed by HF
    params = {k for k in source if not k.endswith("relative_position_index")}
    assert {k for k, _ in used} == params, sorted(params ^ {k for k, _ in used})
    hf_model.load_state_dict(state, strict=True)


def tiny_pair(window: int = 3):
    """(m2f model, HF model) of one tiny Swin configuration, HF holding m2f's weights."""
    # window 3 at 96 x 128: every stage's windows are padded and stage 4 (3 x 4) is no larger
    # than a window, where the official Swin (and HF's SwinBackbone, always_partition=True)
    # keeps window and shift
    depths, heads, dec_layers = (2, 2, 2, 2), (1, 1, 2, 2), 3
    m2f_model = build_model(
        "swin_tiny", num_classes=4, num_queries=6, hidden_dim=32, nheads=2, dim_feedforward=64,
        dec_layers=dec_layers, enc_layers=2, enc_dim_feedforward=64, backbone_width=16,
        backbone_depths=depths, swin_num_heads=heads, swin_window_size=window, drop_path_rate=0.0).eval()
    swin = transformers.SwinConfig(
        image_size=128, patch_size=4, embed_dim=16, depths=list(depths), num_heads=list(heads), window_size=window,
        drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.Mask2FormerConfig(
        backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64,
        encoder_layers=2, num_attention_heads=2, dim_feedforward=64, num_queries=6, num_labels=4,
        # HF's decoder_layers is the official DEC_LAYERS: it counts the prediction on the learnable
        # queries too and builds decoder_layers - 1 layers; m2f's dec_layers counts the layers
        decoder_layers=dec_layers + 1)
    hf_model = transformers.Mask2FormerForUniversalSegmentation(config).eval()

    # generic weights: no norm left at 1 / 0, no bias at 0 (a swapped or missed tensor shows),
    # deformable sampling points off the pixel centres
    with torch.no_grad():
        for p in m2f_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    jitter_deformable_init(m2f_model)
    copy_into_hf(m2f_model, hf_model)
    return m2f_model, hf_model


@pytest.mark.parametrize("kernels", ["reference", "fused"])
def test_m2f_matches_hf_mask2former(kernels):
    torch.manual_seed(0)
    m2f_model, hf_model = tiny_pair()
    m2f_model.set_kernels(kernels)
    images = random_images(2, 96, 128)  # multiples of 32: no padding; H != W; Swin windows padded
    # HF's model takes normalised pixels (its image processor normalises)
    pixels = (images - m2f_model.pixel_mean) / m2f_model.pixel_std
    with torch.no_grad():
        ours = m2f_model(images)
        theirs = hf_model(pixel_values=pixels)
    assert ours["pred_masks"].shape == theirs.masks_queries_logits.shape == (2, 6, 24, 32)
    assert_close(ours["pred_logits"], theirs.class_queries_logits, 1e-4, "class logits")
    assert_close(ours["pred_masks"], theirs.masks_queries_logits, 1e-4, "mask logits")


# m2f.evaluate --protocol official: one image per forward at detectron2's test size, whose sides
# are no multiples of 32. The model normalises and zero-pads to 32 (detectron2's ImageList);
# HF's model pads nothing (its image processor resizes to multiples of 32 instead, a different
# image), so HF gets the normalised image zero-padded as the model pads it: like with like.
# 150 x 337 pads to 160 x 352: stage maps 40 x 88, 20 x 44, 10 x 22, 5 x 11 (odd at 1/32, as
# 800 x 1216's 25 x 38), none a multiple of a window of 3, 7 or 12 (the official Swin-T/S and
# Swin-B/L windows; at 7 and 12 stage 4 is smaller than a window). The sizes alternate on one
# model, so the caches keyed by size (position embeddings, reference points, level indices)
# serve each size its own tensors. 'fused-triton': the fused model with every op on the Triton
# kernels (level sizes and key counts no multiple of their blocks; one window: they see none).
@pytest.mark.parametrize("kernels, window", [
    *((kernels, window) for window in (3, 7, 12) for kernels in ("reference", "fused")),
    pytest.param("fused-triton", 7, marks=requires_triton)])
def test_m2f_matches_hf_mask2former_at_evaluation_sizes(kernels, window):
    torch.manual_seed(0)
    m2f_model, hf_model = tiny_pair(window)
    m2f_model.set_kernels(kernels.split("-")[0])
    backend = kernels.split("-")[1] if "-" in kernels else m2f_kernels.get_backend()
    for h, w in [(150, 337), (337, 150), (150, 337)]:
        images = random_images(1, h, w)
        padded = m2f_model.preprocess(images)
        assert padded.shape[-2:] == (-(-h // 32) * 32, -(-w // 32) * 32)
        assert torch.equal(padded[..., :h, :w], (images - m2f_model.pixel_mean) / m2f_model.pixel_std)
        assert not padded[..., h:, :].any() and not padded[..., w:].any()
        with torch.no_grad(), m2f_kernels.use_backend(backend):
            ours = m2f_model(images)
        with torch.no_grad():
            theirs = hf_model(pixel_values=padded)
        assert ours["pred_masks"].shape == theirs.masks_queries_logits.shape == (1, 6, *(s // 4 for s in padded.shape[-2:]))
        assert_close(ours["pred_logits"], theirs.class_queries_logits, 1e-4, f"class logits at {h} x {w}")
        assert_close(ours["pred_masks"], theirs.masks_queries_logits, 1e-4, f"mask logits at {h} x {w}")


def _hf_resnet_source(hf_key: str) -> str:
    """HF ResNetBackbone key -> m2f ResNet (torchvision) key."""
    if m := re.fullmatch(r"embedder\.embedder\.convolution\.weight", hf_key):
        return "conv1.weight"
    if m := re.fullmatch(r"embedder\.embedder\.normalization\.(\w+)", hf_key):
        return f"bn1.{m[1]}"
    if m := re.fullmatch(r"encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.(convolution|normalization)\.(\w+)", hf_key):
        return f"layer{int(m[1]) + 1}.{m[2]}.downsample.{int(m[3] == 'normalization')}.{m[4]}"
    if m := re.fullmatch(r"encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.(convolution|normalization)\.(\w+)", hf_key):
        return f"layer{int(m[1]) + 1}.{m[2]}.{'conv' if m[4] == 'convolution' else 'bn'}{int(m[3]) + 1}.{m[5]}"
    raise KeyError(f"no m2f counterpart for HF key {hf_key}")


# The ResNet backbone on sizes no multiple of 32 (every stride-2 convolution and the stem's max
# pool see odd sides), against HF's ResNetBackbone: torchvision's / detectron2's semantics
# (stride in the 3x3, padding k // 2, ceil-halved maps; the official configs' STRIDE_IN_1X1:
# False), frozen statistics in eval mode.
@pytest.mark.parametrize("depth, layer_type", [(18, "basic"), (50, "bottleneck")])
def test_resnet_backbone_matches_hf_at_odd_sizes(depth, layer_type):
    from m2f.backbone import ResNet

    torch.manual_seed(0)
    ours = ResNet(depth, width=8, layers=(1, 2, 1, 1)).eval()
    channels = [c for c, _ in ours.output_shape().values()]
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=channels, depths=[1, 2, 1, 1],
                                       layer_type=layer_type, out_features=["stage1", "stage2", "stage3", "stage4"])
    theirs = transformers.ResNetBackbone(config).eval()
    source, state = ours.state_dict(), {}
    with torch.no_grad():  # generic frozen statistics
        for k, v in source.items():
            v.copy_(torch.rand_like(v) + 0.5 if k.endswith("running_var") else v + torch.randn_like(v) * 0.1)
    for k, v in theirs.state_dict().items():
        state[k] = v if k.endswith("num_batches_tracked") else source[_hf_resnet_source(k)].clone()
    assert {_hf_resnet_source(k) for k in state if not k.endswith("num_batches_tracked")} == set(source)
    theirs.load_state_dict(state, strict=True)
    for h, w in [(75, 101), (101, 75)]:
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            a, b = ours(x), theirs(pixel_values=x).feature_maps
        sizes = [(h, w)]
        for _ in range(5):
            sizes.append(tuple(-(-s // 2) for s in sizes[-1]))
        for i, (name, f) in enumerate(a.items()):
            assert f.shape[-2:] == sizes[i + 2] == b[i].shape[-2:], (name, f.shape, b[i].shape)
            assert_close(f, b[i], 1e-5, f"{name} at {h} x {w}")

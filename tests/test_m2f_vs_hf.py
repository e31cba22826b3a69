"""The m2f model against transformers' Mask2Former port: the same tiny Swin configuration, the
m2f weights copied into the HF model under HF's names, the same image; the final class and
mask logits must agree (kernels='reference' and 'fused' on the m2f side)."""
from __future__ import annotations

import os
import re

import pytest
import torch

from m2f import build_model
from bench.m2f_testing import jitter_deformable_init, random_images
from .conftest import assert_close

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


def tiny_pair():
    """(m2f model, HF model) of one tiny Swin configuration, HF holding m2f's weights."""
    # window 3: every stage's windows are padded and stage 4 (3 x 4) is no larger than a window,
    # where the official Swin (and HF's SwinBackbone, always_partition=True) keeps window and shift
    window, depths, heads, dec_layers = 3, (2, 2, 2, 2), (1, 1, 2, 2), 3
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

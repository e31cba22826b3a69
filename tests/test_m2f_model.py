"""The reference Mask2Former: configurations, parameter counts, shapes, losses."""
from __future__ import annotations

import re

import pytest
import torch

from m2f import build_model
from bench.m2f_testing import TINY, random_images, random_targets

# Mask2Former paper (Tables 1-3): parameters of the standard models.
PAPER_PARAMS = [
    ("resnet50", 100, 44e6),
    ("resnet101", 100, 63e6),
    ("swin_tiny", 100, 47e6),
    ("swin_small", 100, 69e6),
    ("swin_base", 100, 107e6),
    ("swin_large", 200, 216e6),
]


@pytest.mark.parametrize("backbone, queries, expected", PAPER_PARAMS)
def test_parameter_count_matches_paper(backbone, queries, expected):
    with torch.device("meta"):  # no memory, no init cost
        model = build_model(backbone, num_classes=133)
    assert model.num_queries == queries
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - expected) <= 0.02 * expected, f"{backbone}: {count / 1e6:.2f}M vs paper {expected / 1e6:.0f}M"


def test_standard_structure():
    with torch.device("meta"):
        model = build_model("resnet50", num_classes=133)
    pd, dec = model.sem_seg_head.pixel_decoder, model.sem_seg_head.predictor
    layers = pd.transformer.encoder.layers
    assert len(layers) == 6 and layers[0].linear1.out_features == 1024
    attn = layers[0].self_attn
    assert (attn.d_model, attn.n_levels, attn.n_heads, attn.n_points) == (256, 3, 8, 4)
    assert pd.transformer_in_features == ["res3", "res4", "res5"] and pd.num_fpn_levels == 1
    assert [p[1].num_groups for p in pd.input_proj] == [32, 32, 32]
    assert dec.num_layers == 9 and dec.transformer_ffn_layers[0].linear1.out_features == 2048
    assert dec.query_feat.num_embeddings == 100 and dec.class_embed.out_features == 134
    crit = model.criterion
    assert (crit.num_points, crit.oversample_ratio, crit.importance_sample_ratio, crit.eos_coef) == (12544, 3.0, 0.75, 0.1)
    m = crit.matcher
    assert (m.cost_class, m.cost_mask, m.cost_dice, m.num_points) == (2.0, 5.0, 5.0, 12544)
    assert len(crit.weight_dict) == 3 * 10 and crit.weight_dict["loss_dice_8"] == 5.0


@pytest.mark.parametrize("backbone, cfg", [
    ("resnet18", {}),
    ("resnet50", {"backbone_width": 8, "backbone_depths": (1, 1, 1, 1)}),
    ("swin_tiny", {"backbone_width": 32, "backbone_depths": (2, 2, 2, 2)}),  # window 7: padded maps
])
def test_train_step_and_eval_shapes(backbone, cfg):
    """A training step gives finite weighted losses and gradients; eval returns padded-size /4 masks."""
    model = build_model(backbone, kernels="fused", **{**TINY, **cfg})
    h, w = 60, 70  # not multiples of 32: padded to 64 x 96
    images = random_images(2, h, w)
    targets = random_targets(2, model.num_classes, h, w)
    model.train()
    losses = model(images, targets)
    names = ["loss_ce", "loss_mask", "loss_dice"]
    assert sorted(losses) == sorted(names + [f"{n}_{i}" for i in range(TINY["dec_layers"]) for n in names])
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert out["pred_logits"].shape == (2, TINY["num_queries"], TINY["num_classes"] + 1)
    assert out["pred_masks"].shape == (2, TINY["num_queries"], 16, 24)


def test_losses_are_the_criterion_losses_times_the_official_weights():
    model = build_model("resnet18", **TINY)
    images = random_images(1, 64, 64)
    targets = random_targets(1, model.num_classes, 64, 64)
    model.train()
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    with torch.no_grad():
        weighted = model(images, targets, generator=torch.Generator().manual_seed(seed))
        outputs = model.sem_seg_head(model.backbone(model.preprocess(images)))
        raw = model.criterion(outputs, targets, torch.Generator().manual_seed(seed))
    for k, v in raw.items():
        weight = {"ce": 2.0, "mask": 5.0, "dice": 5.0}[k.split("_")[1]]
        torch.testing.assert_close(weighted[k], v * weight, msg=f"{k} (seed {seed})")


def test_targets_are_padded_with_the_image():
    model = build_model("resnet18", **TINY)
    masks = torch.ones(1, 60, 70, dtype=torch.bool)
    (t,) = model.prepare_targets([{"labels": torch.tensor([1]), "masks": masks}], (64, 96))
    assert t["masks"].shape == (1, 64, 96) and t["masks"].sum() == 60 * 70 and t["masks"][:, :60, :70].all()


def test_build_model_rejects_bad_arguments():
    with pytest.raises(TypeError, match="unknown overrides \\['hiden_dim'\\]"):
        build_model("resnet18", hiden_dim=32)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model("resnet34")
    with pytest.raises(ValueError, match="kernels must be one of"):
        build_model("resnet18", kernels="cuda")
    with pytest.raises(ValueError, match="mask_loss must be one of"):
        build_model("resnet18", mask_loss="dense")
    for key, value in (("max_targets", "abc"), ("dec_layers", 2.0), ("deep_supervision", 1), ("dropout", "0"),
                       ("backbone_depths", (1, "1")), ("pixel_mean", 1.0)):
        with pytest.raises(TypeError, match=f"build_model: override {key} must be .*, got {re.escape(repr(value))}"):
            build_model("resnet18", **{key: value})


def test_build_model_overrides_take_lists_for_sequences_and_ints_for_floats():
    """What a JSON config or ``--model KEY=VALUE`` gives: lists, ints where floats are meant."""
    model = build_model("resnet18", num_queries=4, backbone_width=8, backbone_depths=[1, 1, 1, 1], hidden_dim=32,
                        nheads=2, dim_feedforward=16, dec_layers=1, enc_layers=1, enc_dim_feedforward=16,
                        dropout=0, max_targets=None, pixel_mean=[0, 0, 0])
    assert model.pixel_mean.flatten().tolist() == [0.0, 0.0, 0.0]


def test_fused_model_under_inference_mode_then_training():
    """inference_mode tensors carry no version counter and cannot be saved for a backward:
    the fused model's cached level index must serve both."""
    torch.manual_seed(0)
    model = build_model("resnet18", kernels="fused", **TINY).eval()
    images = random_images(2, 64, 64)
    with torch.inference_mode():
        out = model(images)
    assert out["pred_masks"].shape[:2] == (2, TINY["num_queries"])
    model.train()
    sum(model(images, random_targets(2, model.num_classes, 64, 64)).values()).backward()


def _frozen_bn_formula(bn, x):
    """detectron2's FrozenBatchNorm2d.forward, computed afresh."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    bias = bn.bias - bn.running_mean * scale
    return x * scale.to(x.dtype).view(1, -1, 1, 1) + bias.to(x.dtype).view(1, -1, 1, 1)


def test_frozen_bn_reuses_its_scale_and_bias_until_a_buffer_changes(tmp_path):
    import copy

    from m2f.backbone import FrozenBatchNorm2d

    bn = FrozenBatchNorm2d(5)
    for name in ("weight", "bias", "running_mean"):
        getattr(bn, name).normal_()
    bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 5, 3, 4, requires_grad=True)

    def check(what, dtype=torch.float32):
        xd = x.detach().to(dtype).requires_grad_()
        got, want = bn(xd), _frozen_bn_formula(bn, xd)
        assert torch.equal(got, want), what
        g = torch.randn_like(got)
        assert torch.equal(torch.autograd.grad(got, xd, g)[0], torch.autograd.grad(want, xd, g)[0]), what

    check("first call")
    scale = bn._affine(torch.float32)[0]
    check("second call")
    assert bn._affine(torch.float32)[0] is scale
    check("bf16 input", torch.bfloat16)
    bn.running_mean.add_(1.0)  # in place: a new version
    check("running_mean changed in place")
    bn.load_state_dict({**bn.state_dict(), "weight": torch.full((5,), 3.0)})
    check("load_state_dict")
    for _ in range(3):  # a new tensor, whatever id() it gets
        bn.running_var = torch.rand(5) + 0.5
        check("running_var replaced")
    bn.double()
    check("module.double()", torch.float64)
    with torch.inference_mode():
        assert torch.equal(bn(x.detach().double()), _frozen_bn_formula(bn, x.detach().double()))
    check("training after inference_mode", torch.float64)  # no inference tensor saved for backward
    copied = copy.deepcopy(bn)
    copied.weight.mul_(2.0)
    check("a deep copy's change leaves the original", torch.float64)
    torch.save(bn, tmp_path / "bn.pt")
    loaded = torch.load(tmp_path / "bn.pt", weights_only=False)
    assert torch.equal(loaded(x.detach().double()), bn(x.detach().double()))


def test_position_embedding_and_reference_points_are_made_once_per_size():
    """The sine embedding and the encoder's reference points equal the official per-call
    computation (bitwise, every image of the batch) and are the same tensors on the next call."""
    import math

    from m2f.layers import PositionEmbeddingSine
    from m2f.pixel_decoder import MSDeformAttnTransformerEncoder

    pe = PositionEmbeddingSine(8, normalize=True)
    for b, h, w in ((2, 5, 7), (3, 4, 4), (2, 5, 7)):
        got = pe(torch.zeros(b, 3, h, w))
        y = torch.arange(1, h + 1, dtype=torch.float32).view(1, h, 1).expand(b, h, w)
        x = torch.arange(1, w + 1, dtype=torch.float32).view(1, 1, w).expand(b, h, w)
        y, x = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi, x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
        dim_t = 10000 ** (2 * torch.div(torch.arange(8, dtype=torch.float32), 2, rounding_mode="floor") / 8)
        px, py = x[..., None] / dim_t, y[..., None] / dim_t
        px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
        py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
        assert torch.equal(got, torch.cat((py, px), dim=3).permute(0, 3, 1, 2)), (b, h, w)
    assert pe(torch.zeros(1, 3, 5, 7)).data_ptr() == got.data_ptr()

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, src, pos, reference_points, *rest):
            seen.append(reference_points)
            return src

    encoder = MSDeformAttnTransformerEncoder(0)
    encoder.layers.append(Probe())
    src = torch.zeros(2, 3 * 4 + 2 * 2, 8)
    encoder(src, None, None, None, [(3, 4), (2, 2)])
    encoder(src, None, None, None, [(3, 4), (2, 2)])
    want = MSDeformAttnTransformerEncoder.get_reference_points([(3, 4), (2, 2)], 2, 2, "cpu")
    assert torch.equal(seen[0], want) and seen[1] is seen[0]


def test_fused_self_attention_forms_no_attention_weights(monkeypatch):
    """kernels='fused': the decoder's self-attention asks nn.MultiheadAttention for no weights
    (one scaled_dot_product_attention); its output equals the official call's."""
    import torch.nn.modules.activation as activation

    from m2f.transformer_decoder import SelfAttentionLayer

    asked = []
    real = activation.F.multi_head_attention_forward
    monkeypatch.setattr(activation.F, "multi_head_attention_forward",
                        lambda *a, **k: asked.append(k["need_weights"]) or real(*a, **k))
    layer = SelfAttentionLayer(32, 4)
    tgt, query_pos = torch.randn(7, 2, 32), torch.randn(7, 2, 32)
    official = layer(tgt, query_pos)
    layer.kernels = "fused"
    torch.testing.assert_close(layer(tgt, query_pos), official, rtol=1e-5, atol=1e-6)
    assert asked == [True, False]

"""SegFormer (m2f.segformer): the paper's parameter counts, shapes, the loss, official and HF
weights, and the training / evaluation CLIs with ``--model segformer`` on ``shapes``."""
from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import m2f.train as train_mod
from bench.m2f_testing import random_images, random_targets
from m2f import CheckpointMismatchError, build_segformer, load_segformer_weights
from m2f.segformer import PAPER_PARAMS_M, SEGFORMERS, VARIANTS, EfficientSelfAttention, count_parameters

from .conftest import rel_err
from ._rng import keep_global_rng  # noqa: F401  (autouse fixture)

# B0's layout at a fraction of its width and depth: a training step in a few ms on a CPU
SMALL = dict(embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1), decoder_dim=32)
SMALL_CLI = ["--model", "segformer", "--backbone", "mit_b0", "--model", "embed_dims=(16,32,40,64)",
             "--model", "depths=(1,1,1,1)", "--model", "decoder_dim=32"]


def small_model(num_classes: int = 5, **kw):
    torch.manual_seed(0)
    return build_segformer("mit_b0", num_classes, **{**SMALL, **kw})


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("variant", SEGFORMERS)
def test_parameter_counts_match_the_paper(variant):
    """Table 1 (ADE20K head, 150 classes), in millions. The encoders are within 3%; the
    decoders round to the table's one decimal (B0 0.433 -> 0.4, B1 0.564 -> 0.6: that
    rounding alone is up to 12%), the totals (the paper's 3.8 / 13.7 / 27.5 / 47.3 / 64.1 /
    84.7) within 3%."""
    with torch.device("meta"):
        model = build_segformer(variant, num_classes=150)
    encoder, decoder = (n / 1e6 for n in count_parameters(model))
    paper_encoder, paper_decoder = PAPER_PARAMS_M[variant]
    assert abs(encoder / paper_encoder - 1) < 0.03, f"{variant} encoder {encoder:.2f} M vs {paper_encoder}"
    assert round(decoder, 1) == paper_decoder or abs(decoder / paper_decoder - 1) < 0.03, \
        f"{variant} decoder {decoder:.3f} M vs {paper_decoder}"
    total = encoder + decoder
    assert abs(total / (paper_encoder + paper_decoder) - 1) < 0.03, f"{variant} total {total:.2f} M"
    v = VARIANTS[variant]
    assert model.decode_head.linear_fuse.conv.out_channels == (256 if variant in ("mit_b0", "mit_b1") else 768)
    assert [len(getattr(model.backbone, f"block{i}")) for i in range(1, 5)] == list(v.depths)
    assert [getattr(model.backbone, f"block{i}")[0].attn.sr_ratio for i in range(1, 5)] == [8, 4, 2, 1]


def test_unknown_variant_and_override_are_refused():
    with pytest.raises(ValueError, match="mit_b6"):
        build_segformer("mit_b6", 5)
    with pytest.raises(TypeError, match="hidden_dim"):
        build_segformer("mit_b0", 5, hidden_dim=3)


# ----------------------------------------------------------------------------- forward, loss


def test_forward_shapes_padding_and_no_position_encoding():
    model = small_model(num_classes=7).eval()
    images = random_images(2, 64, 96)
    with torch.no_grad():
        logits = model(images)["sem_seg_logits"]
        assert logits.shape == (2, 7, 16, 24)
        odd = model.semantic_logits(images[..., :50, :70])  # padded to 64 x 96 inside, cropped back
        assert odd.shape == (2, 7, 50, 70)
        full = model.semantic_logits(images)
    assert rel_err(odd, full[..., :50, :70]) > 0  # the zero padding is seen (no crop of the input)
    assert not any("pos" in name for name, _ in model.named_parameters())
    with pytest.raises(RuntimeError, match="eval mode"):
        model.train().semantic_logits(images)


def test_efficient_attention_is_the_official_formula():
    """SDPA over keys/values of the sr_ratio-reduced tokens = softmax(q k^T / sqrt(d)) v."""
    torch.manual_seed(1)
    attn = EfficientSelfAttention(40, num_heads=5, sr_ratio=2)
    b, h, w, c = 2, 6, 8, 40
    x = torch.randn(b, h * w, c)
    q = attn.q(x).reshape(b, h * w, 5, 8).permute(0, 2, 1, 3)
    r = attn.norm(attn.sr(x.permute(0, 2, 1).reshape(b, c, h, w)).reshape(b, c, -1).permute(0, 2, 1))
    k, v = attn.kv(r).reshape(b, -1, 2, 5, 8).permute(2, 0, 3, 1, 4)
    assert k.shape[2] == (h // 2) * (w // 2)
    ref = attn.proj(((q @ k.transpose(-2, -1)) * 8 ** -0.5).softmax(-1).matmul(v).transpose(1, 2).reshape(b, h * w, c))
    assert rel_err(attn(x, h, w), ref) < 1e-5


def test_loss_is_cross_entropy_with_ignore_and_trains_every_parameter():
    model = small_model().train()
    g = torch.Generator().manual_seed(0)
    images = random_images(2, 64, 64, generator=g)
    targets = random_targets(2, 5, 64, 64, generator=g)
    labels = model.semantic_targets(targets, 2, (64, 64), "cpu")
    assert (labels == 255).any() and (labels != 255).any()  # pixels in no ellipse are ignored
    torch.manual_seed(3)
    loss = model(images, targets)["loss_ce"]
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"
    # the same loss from the class map; mmseg's reduction: the mean over all pixels, ignored ones 0
    torch.manual_seed(3)
    assert torch.equal(model(images, labels)["loss_ce"], loss)
    model.decode_head.dropout.p = 0.0  # a deterministic training forward (BN on batch statistics)
    for m in model.backbone.modules():
        if hasattr(m, "drop_path_rate"):
            m.drop_path_rate = 0.0
    logits = model.decode_head(model.backbone(model.preprocess(images)))
    logits = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
    ce = F.cross_entropy(logits, labels, ignore_index=255, reduction="sum") / labels.numel()
    assert torch.allclose(model(images, labels)["loss_ce"], ce, rtol=1e-6)
    all_ignored = torch.full_like(labels, 255)
    assert model(images, all_ignored)["loss_ce"].item() == 0.0


# ----------------------------------------------------------------------------- weights


def test_official_checkpoint_round_trip_and_backbone_file(tmp_path):
    src = small_model()
    with torch.no_grad():
        src.decode_head.linear_fuse.bn.running_mean.normal_()
    state = dict(src.state_dict())
    names = set(state)
    for name in ("backbone.patch_embed1.proj.weight", "backbone.block1.0.attn.q.weight",
                 "backbone.block1.0.attn.kv.weight", "backbone.block1.0.attn.sr.weight",
                 "backbone.block1.0.mlp.dwconv.dwconv.weight", "backbone.norm4.weight",
                 "decode_head.linear_c4.proj.weight", "decode_head.linear_fuse.conv.weight",
                 "decode_head.linear_fuse.bn.running_var", "decode_head.linear_pred.weight"):
        assert name in names  # the NVlabs/SegFormer names, as they are in its checkpoints
    state["decode_head.conv_seg.weight"] = torch.zeros(5, 128, 1, 1)  # mmseg's unused head classifier
    path = tmp_path / "segformer.pth"
    torch.save({"meta": {}, "state_dict": state}, path)
    dst = build_segformer("mit_b0", 5, **SMALL, weights=str(path), drop_path_rate=0.1)
    images = random_images(1, 64, 64)
    with torch.no_grad():
        assert torch.equal(dst.eval()(images)["sem_seg_logits"], src.eval()(images)["sem_seg_logits"])

    # an ImageNet MiT file: bare names and a classifier; the decoder keeps its init
    mit = {k[len("backbone."):]: v for k, v in src.state_dict().items() if k.startswith("backbone.")}
    mit.update({"head.weight": torch.zeros(1000, 64), "head.bias": torch.zeros(1000)})
    fresh = small_model()
    head_before = {k: v.clone() for k, v in fresh.decode_head.state_dict().items()}
    info = load_segformer_weights(fresh, mit)
    assert info["loaded"] == "backbone" and info["ignored"] == ["head.bias", "head.weight"]
    assert all(torch.equal(v, src.backbone.state_dict()[k]) for k, v in fresh.backbone.state_dict().items())
    assert all(torch.equal(v, head_before[k]) for k, v in fresh.decode_head.state_dict().items())

    # another class count: the classifier is skipped on request, refused otherwise
    other = small_model(num_classes=9)
    with pytest.raises(CheckpointMismatchError, match=r"decode_head\.linear_pred\.weight: file \(5, 32, 1, 1\)"):
        load_segformer_weights(other, str(path))
    assert load_segformer_weights(other, str(path), ignore_classifier=True)["loaded"] == "model"


def test_mismatched_keys_are_named():
    model = small_model()
    state = dict(model.state_dict())
    del state["backbone.block2.0.attn.kv.weight"]
    state["backbone.block2.0.attn.k.weight"] = torch.zeros(32, 32)
    state["decode_head.linear_c1.proj.weight"] = torch.zeros(32, 17)
    with pytest.raises(CheckpointMismatchError) as exc:
        load_segformer_weights(model, state)
    msg = str(exc.value)
    assert "missing keys (1): backbone.block2.0.attn.kv.weight" in msg
    assert "unexpected keys (1): backbone.block2.0.attn.k.weight" in msg
    assert "decode_head.linear_c1.proj.weight: file (32, 17) vs model (32, 16)" in msg
    deeper = build_segformer("mit_b0", 5, **{**SMALL, "depths": (2, 1, 1, 1)})  # a B1 file into a B2 model
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(\d+\): backbone\.block1\.1\."):
        load_segformer_weights(deeper, model.state_dict())


def _hf_v4_name(key: str) -> str:
    """transformers >= 5's in-memory SegFormer names -> the names of its files (v4), the
    inverse of transformers' conversion mapping."""
    rules = [(r"stages\.(\d)\.patch_embeddings\.", r"encoder.patch_embeddings.\1."),
             (r"stages\.(\d)\.blocks\.", r"encoder.block.\1."), (r"stages\.(\d)\.layer_norm", r"encoder.layer_norm.\1"),
             (r"attention\.q_proj", "attention.self.query"), (r"attention\.k_proj", "attention.self.key"),
             (r"attention\.v_proj", "attention.self.value"),
             (r"attention\.sequence_reduction\.sequence_reduction", "attention.self.sr"),
             (r"attention\.sequence_reduction\.layer_norm", "attention.self.layer_norm"),
             (r"attention\.o_proj", "attention.output.dense"), (r"mlp\.fc1", "mlp.dense1"), (r"mlp\.fc2", "mlp.dense2"),
             (r"layernorm_before", "layer_norm_1"), (r"layernorm_after", "layer_norm_2"),
             (r"decode_head\.linear_projections", "decode_head.linear_c")]
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def test_hf_transformers_weights_give_the_same_logits():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.SegformerConfig(num_labels=5, depths=[1, 2, 1, 1], hidden_sizes=list(SMALL["embed_dims"]),
                                          num_attention_heads=[1, 2, 5, 8], decoder_hidden_size=32)
    hf = transformers.SegformerForSemanticSegmentation(config).eval()
    with torch.no_grad():
        hf.decode_head.batch_norm.running_mean.normal_()
        hf.decode_head.batch_norm.running_var.uniform_(0.5, 2.0)
    images = random_images(2, 64, 96)
    for names in ("v5", "v4"):
        model = build_segformer("mit_b0", 5, **{**SMALL, "depths": (1, 2, 1, 1)}).eval()
        state = hf.state_dict()
        if names == "v4" and any(k.startswith("segformer.stages.") for k in state):
            state = {_hf_v4_name(k): v for k, v in state.items()}
        assert load_segformer_weights(model, state) == {"format": "hf", "loaded": "model", "ignored": []}
        with torch.no_grad():
            ref = hf(pixel_values=model.preprocess(images)).logits
            out = model(images)["sem_seg_logits"]
        assert rel_err(out, ref) < 1e-5, names  # HF's stage norms use eps 1e-5, the official 1e-6


# ----------------------------------------------------------------------------- CLI


def _read_log(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


class Killed(BaseException):
    """Stands in for SIGKILL."""


def test_cli_trains_resumes_exactly_and_evaluates(tmp_path, monkeypatch, capsys):
    from m2f.evaluate import main as evaluate_main

    args = SMALL_CLI + ["--preset", "micro", "--device", "cpu", "--num-workers", "0", "--eval-images", "2",
                        "--steps", "4", "--batch-size", "2", "--ckpt-every", "2", "--log-every", "1"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    metrics = train_mod.main(args + ["--out", straight])
    assert set(metrics) == {"mIoU", "fwIoU", "mACC", "pACC"}
    cfg = json.load(open(os.path.join(straight, "config.json")))
    assert (cfg["arch"], cfg["backbone"], cfg["kernels"], cfg["num_queries"]) == ("segformer", "mit_b0", None, None)
    assert cfg["model"] == {"embed_dims": [16, 32, 40, 64], "depths": [1, 1, 1, 1], "decoder_dim": 32}
    records = _read_log(straight)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] == r["loss_ce"] for r in records if "loss" in r)
    assert "mIoU" in records[-1]["eval"] and "PQ" not in records[-1]["eval"]
    assert {"loss.png", "predictions_0000004.png"} <= set(os.listdir(os.path.join(straight, "plots")))

    real_step, calls = train_mod.train_step, []

    def dying_step(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # the checkpoint of step 2 exists
            raise Killed()
        return real_step(*a, **k)

    for name in ("save_predictions", "save_loss_curve"):  # drawn above; matplotlib takes seconds
        monkeypatch.setattr(train_mod, name, lambda *a, **k: None)
    monkeypatch.setattr("m2f.plots.save_predictions", lambda *a, **k: None)
    monkeypatch.setattr(train_mod, "train_step", dying_step)
    with pytest.raises(Killed):
        train_mod.main(args + ["--out", killed])
    monkeypatch.setattr(train_mod, "train_step", real_step)
    torch.manual_seed(123)
    train_mod.main(["--out", killed, "--resume", "--device", "cpu"])
    a = torch.load(os.path.join(straight, "checkpoint.pt"), weights_only=False)
    b = torch.load(os.path.join(killed, "checkpoint.pt"), weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resuming"
    assert [r.get("loss") for r in _read_log(killed)] == [r.get("loss") for r in records]

    capsys.readouterr()
    again = evaluate_main(["--run", straight, "--device", "cpu", "--eval-images", "2"])
    assert again == metrics
    assert f"mIoU {metrics['mIoU']:.1f}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "segformer", "--backbone", "resnet50"], "needs a MiT backbone"),
    (["--model", "mask2former", "--backbone", "mit_b0"], "use --model segformer"),
    (["--model", "segformer", "--kernels", "fused"], "--kernels: Mask2Former options"),
    (["--model", "segformer", "--model", "hidden_dim=3"], "hidden_dim=...: not a SegFormer option"),
    (["--model", "segfromer"], "--model expects KEY=VALUE"),
])
def test_cli_refusals_are_one_line(argv, message):
    with pytest.raises(SystemExit) as exc:
        train_mod.resolve_config(train_mod.parse_args(argv))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_cli_backbone_implies_segformer_and_weight_errors_are_one_line(tmp_path):
    cfg = train_mod.resolve_config(train_mod.parse_args(["--backbone", "mit_b2", "--preset", "official"]))
    assert (cfg["arch"], cfg["image_size"], cfg["steps"], cfg["lr"]) == ("segformer", 512, 160_000, 6e-4)
    assert cfg["out"] == os.path.join("runs", "shapes_official_mit_b2")
    assert "arch" not in train_mod.resolve_config(train_mod.parse_args(["--preset", "micro"]))  # Mask2Former as before
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"backbone.patch_embed1.proj.weight": torch.zeros(3)}}, bad)
    cfg = train_mod.resolve_config(train_mod.parse_args(SMALL_CLI + ["--weights", str(bad)]))
    from m2f.data.shapes import INFO

    with pytest.raises(SystemExit) as exc:
        train_mod.build_model_from_config(cfg, INFO)
    assert "missing keys" in str(exc.value) and "shape mismatches (1)" in str(exc.value)
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------- bench


def test_bench_counts_the_flops_of_a_real_forward_and_marks_gpu_columns_pending():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from bench.segformer_vs_mask2former import PENDING, count_gflops, markdown

    model = small_model().eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as real:
        model(random_images(1, 64, 64))
    assert count_gflops(model, 64) == real.get_total_flops() / 1e9 > 0
    row = {"model": "SegFormer B0", "kernels": None, "size": 512, "params_M": 3.75, "gflops": 16.8,
           "infer_img_s": None, "train_step_ms": None, "peak_gb_per_image": None, "miou_shapes": None}
    table = markdown([row], [512])
    assert table.count(PENDING) == 4 and "| SegFormer B0 | - | 3.8 | 16.8 |" in table


@pytest.mark.parametrize("argv, message", [(["--sizes", "0"], "argument --sizes: must be an integer >= 32"),
                                           (["--only", "mit_b1"], "argument --only: invalid choice: 'mit_b1'")])
def test_bench_refuses_bad_arguments_before_building_anything(capsys, argv, message):
    from bench.segformer_vs_mask2former import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err

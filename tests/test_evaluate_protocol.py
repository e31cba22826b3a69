"""m2f.evaluate --protocol official against a re-implementation of detectron2's test flow, and
--official-checkpoint (a detectron2 .pkl evaluated through the CLI), on tiny random models and
fake COCO panoptic / ADE20K folders whose images have different sizes and aspect ratios."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import m2f.data
from m2f import build_model, save_official_checkpoint
from m2f.data import build_dataset
from m2f.data.io import read_panoptic_png
from m2f.data.sample import semantic_from_panoptic
from m2f.evaluate import eval_loader, evaluate, instance_ground_truth, main
from m2f.inference import instance_inference, panoptic_inference, semantic_inference
from m2f.layers import PixelNormalizer
from m2f.metrics import MaskAP, PanopticQuality, SemanticIoU

from bench.data_testing import write_ade_fixture, write_coco_fixture
from ._rng import keep_global_rng  # noqa: F401  (autouse: the CLI seeds the global RNGs)
from .test_data import official_shortest_edge

TINY = dict(backbone_width=8, hidden_dim=32, nheads=2, dim_feedforward=32, dec_layers=2, enc_layers=1,
            enc_dim_feedforward=32)
QUERIES, IMAGE_SIZE = 8, 64
# landscape (the longest side capped on COCO), portrait (COCO: already at the test size),
# square, and a tall strip whose longest side is capped on both
VAL_SIZES = [(37, 90), (64, 48), (50, 50), (120, 25)]
COCO_TEST_SIZE = (48, 80)  # stands in for 800 / 1333: the same code path, CPU-sized
PIXEL_MEAN, PIXEL_STD = (123.675, 116.280, 103.530), (58.395, 57.120, 57.375)  # the official configs'
WRITERS = {"coco_panoptic": write_coco_fixture, "ade20k": write_ade_fixture}
# the fixtures' classes (contiguous ids: COCO person, car, sky; ADE20K labels 1, 3, 4) and their colours
PALETTE = {"coco_panoptic": {0: (220, 40, 40), 1: (40, 200, 60), 2: (60, 90, 230)},
           "ade20k": {0: (60, 90, 230), 2: (220, 40, 40), 3: (40, 200, 60)}}


@pytest.fixture
def small_coco_test_size(monkeypatch):
    real = m2f.data.official_test_size
    monkeypatch.setattr(m2f.data, "official_test_size",
                        lambda name, size: COCO_TEST_SIZE if name == "coco_panoptic" else real(name, size))
    return lambda name: COCO_TEST_SIZE if name == "coco_panoptic" else real(name, IMAGE_SIZE)


def tiny_model(num_classes: int, seed: int = 0) -> torch.nn.Module:
    """A random tiny Mask2Former whose class scores are confident (so panoptic inference keeps segments)."""
    torch.manual_seed(seed)
    model = build_model("resnet18", num_classes=num_classes, num_queries=QUERIES, kernels="reference", **TINY)
    with torch.no_grad():
        model.sem_seg_head.predictor.class_embed.weight.mul_(40.0)
        model.sem_seg_head.predictor.class_embed.bias.normal_(0.0, 3.0)
    return model.eval()


class ColourQueries(torch.nn.Module):
    """One query per palette class, sure of its class; its mask logits (at 1/4 of the input)
    say how near each pixel's colour is to the class colour, shifted by a random multiple of
    the input's mean (so the padding matters everywhere, as it does through a real backbone)."""

    def __init__(self, num_classes: int, palette, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        colours = torch.tensor(list(palette.values()), dtype=torch.float32)
        self.centres = (colours - torch.tensor(PIXEL_MEAN)) / torch.tensor(PIXEL_STD)
        self.logits = torch.zeros(len(palette), num_classes + 1)
        self.logits[torch.arange(len(palette)), list(palette)] = 8.0
        self.shift = torch.randn(len(palette), generator=gen)
        self.num_classes = num_classes

    def forward(self, x):
        x4 = F.avg_pool2d(x, 4)
        dist = ((x4[:, None] - self.centres[None, :, :, None, None]) ** 2).sum(2)
        masks = 2.0 * (1.5 - dist) + self.shift[None, :, None, None] * x.mean((1, 2, 3))[:, None, None, None] * 4
        return {"pred_logits": self.logits.expand(x.shape[0], -1, -1), "pred_masks": masks}


class ColourModel(PixelNormalizer):
    """Mask2Former's evaluation interface (normalise, zero-pad to 32, ``sem_seg_head(backbone(x))``)
    around :class:`ColourQueries`: predictions that follow the image, so every step of the
    protocol shows in the metrics."""

    def __init__(self, num_classes: int, palette):
        super().__init__()
        self._init_pixels(PIXEL_MEAN, PIXEL_STD, 32)
        self.backbone, self.sem_seg_head = torch.nn.Identity(), ColourQueries(num_classes, palette)

    def forward(self, images):
        return self.sem_seg_head(self.backbone(self.preprocess(images)))


def paint(name, root, num_classes):
    """Colour the fixture's val images by their ground-truth class (grey where unlabelled), with noise."""
    rng = np.random.default_rng(1)
    for index in range(len(VAL_SIZES)):
        path, sem, _, _ = ground_truth(name, root, index, num_classes)
        image = np.full((*sem.shape, 3), 128.0)
        for c, colour in PALETTE[name].items():
            image[sem.numpy() == c] = colour
        image = np.clip(image + rng.normal(0, 25, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(path)


def cli(name, root, pkl, out, *extra):
    return main(["--official-checkpoint", str(pkl), "--dataset", name, "--data-root", str(root),
                 "--backbone", "resnet18", "--num-queries", str(QUERIES), "--image-size", str(IMAGE_SIZE),
                 "--kernels", "reference", "--device", "cpu", "--out", str(out)]
                + [a for k, v in TINY.items() for a in ("--model", f"{k}={v}")] + list(extra))


# ----------------------------------------------------------------------------- detectron2's flow


def ground_truth(name, root, index, num_classes):
    """The original-resolution ground truth of val image ``index``, read from the files:
    (image path, sem_seg, pan_seg or None, segments or None)."""
    if name == "ade20k":
        stem = f"ADE_validation_{index:08d}"
        raw = torch.from_numpy(np.array(Image.open(root / "annotations" / "validation" / f"{stem}.png"))).long()
        sem = torch.where((raw == 0) | (raw > num_classes), torch.full_like(raw, 255), raw - 1)
        return root / "images" / "validation" / f"{stem}.jpg", sem, None, None
    data = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
    cats = {c["id"]: i for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    things = {cats[c["id"]] for c in data["categories"] if c["isthing"]}
    ann = data["annotations"][index]
    segments = [{"id": s["id"], "category_id": cats[s["category_id"]], "isthing": cats[s["category_id"]] in things,
                 "iscrowd": s["iscrowd"]} for s in ann["segments_info"]]
    pan = read_panoptic_png(root / "annotations" / "panoptic_val2017" / ann["file_name"])
    image = root / "val2017" / data["images"][index]["file_name"]
    return image, semantic_from_panoptic(pan, segments), pan, segments


@torch.no_grad()
def detectron2_flow(model, name, root, test_size, info, skip=()):
    """detectron2 + the official MaskFormer inference, step by step (``skip``: steps left out, to
    show that each one shows in the metrics) -> (metrics, per-image predictions)."""
    pq = PanopticQuality(info.num_classes, info.thing_ids) if info.panoptic else None
    sem_metric, ap = SemanticIoU(info.num_classes, info.ignore_label), MaskAP(info.num_classes) if pq else None
    preds = []
    for index in range(len(VAL_SIZES)):
        path, sem_gt, pan_gt, segments = ground_truth(name, root, index, info.num_classes)
        image = Image.open(path).convert("RGB")
        H, W = image.height, image.width
        h, w = official_shortest_edge(H, W, *test_size)  # ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)
        if "resize" in skip:
            h, w = H, W
        x = torch.from_numpy(np.array(image.resize((w, h), Image.BILINEAR))).permute(2, 0, 1).float()
        if "normalise" not in skip:
            x = (x - torch.tensor(PIXEL_MEAN)[:, None, None]) / torch.tensor(PIXEL_STD)[:, None, None]
        hp, wp = -(-h // 32) * 32, -(-w // 32) * 32  # ImageList.from_tensors: zeros, after normalising
        x = F.pad(x, (0, wp - w, 0, hp - h), value=128.0 if "zero pad" in skip else 0.0)
        out = model.sem_seg_head(model.backbone(x[None]))
        mask_cls = out["pred_logits"][0]
        masks = F.interpolate(out["pred_masks"], size=(hp, wp), mode="bilinear", align_corners=False)[0]

        def postprocess(t):  # sem_seg_postprocess: crop to the resized image, resize to the original
            if "crop" not in skip:
                t = t[:, :h, :w]
            return F.interpolate(t[None], size=(H, W), mode="bilinear", align_corners=False)[0]

        if info.panoptic:  # PANOPTIC_ON / INSTANCE_ON: the masks are post-processed first
            masks = postprocess(masks)
            sem = semantic_inference(mask_cls, masks).argmax(0)
            pan, pred_segments = panoptic_inference(mask_cls, masks, thing_ids=info.thing_ids)
            pq.update(pan, pred_segments, pan_gt, segments)
            inst = instance_inference(mask_cls, masks, thing_ids=info.thing_ids)
            gt_masks, gt_labels, gt_crowd = instance_ground_truth(pan_gt, segments)
            ap.update(inst["pred_masks"] > 0.5, inst["scores"], inst["pred_classes"], gt_masks, gt_labels, gt_crowd,
                      image_id=index)
            preds.append((sem, pan))
        else:  # SEMANTIC_ON only: the class scores are post-processed
            sem = (postprocess(masks) if "order" in skip else masks)
            sem = semantic_inference(mask_cls, sem)
            sem = (sem if "order" in skip else postprocess(sem)).argmax(0)
            preds.append((sem, None))
        sem_metric.update(sem, sem_gt)
    metrics = {}
    for metric in (pq, sem_metric, ap):
        if metric is not None:
            metrics.update(metric.compute())
    metrics.pop("IoU")
    return metrics, preds


def same(a, b):
    return a.keys() == b.keys() and all(a[k] == b[k] or (np.isnan(a[k]) and np.isnan(b[k])) for k in a)


@pytest.mark.parametrize("name", ["coco_panoptic", "ade20k"])
def test_official_protocol_is_detectron2s_flow(tmp_path, name, small_coco_test_size):
    root = tmp_path / "data"
    WRITERS[name](root, np.random.default_rng(0), n_images=(0, 0), val_sizes=VAL_SIZES)
    dataset = build_dataset(name, str(root), "val", IMAGE_SIZE, protocol="official")
    paint(name, root, dataset.info.num_classes)
    model = ColourModel(dataset.info.num_classes, PALETTE[name]).eval()
    want, want_preds = detectron2_flow(model, name, root, small_coco_test_size(name), dataset.info)
    assert want["mIoU"] > 50 and (name == "ade20k" or (want["PQ"] > 20 and want["AP"] > 10)), want

    got, examples = evaluate(model, eval_loader(dataset, 1), dataset.info, torch.device("cpu"))
    assert same(got, want), (got, want)
    for example, (sem, pan), (H, W) in zip(examples, want_preds, VAL_SIZES):
        assert example["image"].shape == (3, H, W) and torch.equal(example["pred_sem_seg"], sem)
        if pan is not None:
            assert torch.equal(example["pred_pan_seg"], pan)

    # the fixed protocol, and detectron2's flow without any one of its steps, give other numbers
    fixed_dataset = build_dataset(name, str(root), "val", IMAGE_SIZE)
    fixed, _ = evaluate(model, eval_loader(fixed_dataset, 8), dataset.info, torch.device("cpu"))
    assert fixed.keys() == want.keys() and not same(fixed, want)
    steps = ("resize", "normalise", "zero pad", "crop") + (() if dataset.info.panoptic else ("order",))
    for step in steps:
        metrics, _ = detectron2_flow(model, name, root, small_coco_test_size(name), dataset.info, skip=(step,))
        assert not same(metrics, want), step


@pytest.mark.parametrize("name", ["coco_panoptic", "ade20k"])
def test_official_checkpoint_through_the_cli(tmp_path, name, small_coco_test_size, monkeypatch):
    monkeypatch.setattr("m2f.plots.save_predictions", lambda *a, **k: None)  # matplotlib takes seconds
    root = tmp_path / "data"
    WRITERS[name](root, np.random.default_rng(0), n_images=(0, 0), val_sizes=VAL_SIZES)
    dataset = build_dataset(name, str(root), "val", IMAGE_SIZE, protocol="official")
    model = tiny_model(dataset.info.num_classes)
    pkl = tmp_path / "model_final.pkl"
    save_official_checkpoint(model, str(pkl))

    got = cli(name, root, pkl, tmp_path / "eval")
    direct, examples = evaluate(model, eval_loader(dataset, 1), dataset.info, torch.device("cpu"))
    want, want_preds = detectron2_flow(model, name, root, small_coco_test_size(name), dataset.info)
    assert same(got, direct) and same(direct, want), (got, direct, want)
    for example, (sem, pan) in zip(examples, want_preds):
        assert torch.equal(example["pred_sem_seg"], sem) and (pan is None or torch.equal(example["pred_pan_seg"], pan))
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert (saved["protocol"], saved["step"], saved["checkpoint"]) == ("official", None, str(pkl))
    assert same({k: saved[k] for k in want}, want)
    fixed = cli(name, root, pkl, tmp_path / "eval", "--protocol", "fixed")
    assert fixed.keys() == want.keys()
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["protocol"] == "fixed"


def test_segformer_follows_the_official_protocol(tmp_path):
    from m2f import build_segformer

    root = tmp_path / "data"
    write_ade_fixture(root, np.random.default_rng(0), n_images=(0, 0), val_sizes=VAL_SIZES)
    dataset = build_dataset("ade20k", str(root), "val", IMAGE_SIZE, protocol="official")
    paint("ade20k", root, 150)
    torch.manual_seed(0)
    model = build_segformer("mit_b0", num_classes=150, embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1),
                            decoder_dim=32).eval()
    metric = SemanticIoU(150)
    with torch.no_grad():
        for index in range(len(VAL_SIZES)):  # detectron2's flow around the per-pixel logits
            path, sem_gt, _, _ = ground_truth("ade20k", root, index, 150)
            image = Image.open(path).convert("RGB")
            H, W = image.height, image.width
            h, w = official_shortest_edge(H, W, IMAGE_SIZE, 4 * IMAGE_SIZE)
            x = torch.from_numpy(np.array(image.resize((w, h), Image.BILINEAR))).permute(2, 0, 1).float()
            x = (x - torch.tensor(PIXEL_MEAN)[:, None, None]) / torch.tensor(PIXEL_STD)[:, None, None]
            hp, wp = -(-h // 32) * 32, -(-w // 32) * 32
            logits = model.decode_head(model.backbone(F.pad(x, (0, wp - w, 0, hp - h))[None]))
            logits = F.interpolate(logits, size=(hp, wp), mode="bilinear", align_corners=False)[..., :h, :w]
            metric.update(F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)[0].argmax(0),
                          sem_gt)
    want = metric.compute()
    want.pop("IoU")
    got, examples = evaluate(model, eval_loader(dataset, 1), dataset.info, torch.device("cpu"))
    assert same(got, want) and [e["pred_sem_seg"].shape for e in examples] == VAL_SIZES
    fixed, _ = evaluate(model, eval_loader(build_dataset("ade20k", str(root), "val", IMAGE_SIZE), 8), dataset.info,
                        torch.device("cpu"))
    assert not same(fixed, want)


def test_official_test_sizes():
    assert m2f.data.official_test_size("coco_panoptic", 1024) == (800, 1333)
    assert m2f.data.official_test_size("ade20k", 512) == (512, 2048)
    assert m2f.data.official_test_size("ade20k", 640) == (640, 2560)  # the Swin-B/L res640 configs
    assert m2f.data.official_test_size("shapes", 64) is None


def test_official_protocol_on_shapes_keeps_the_generated_size(tmp_path, monkeypatch):
    """A run's checkpoint (here written by hand as m2f.train writes it) under --protocol official:
    shapes images keep their generated size; one image per forward."""
    from m2f.train import build_model_from_config, parse_args, resolve_config

    monkeypatch.setattr("m2f.plots.save_predictions", lambda *a, **k: None)
    cfg = resolve_config(parse_args(["--preset", "micro", "--kernels", "reference"]))
    dataset = build_dataset("shapes", None, "val", cfg["image_size"], length=3, protocol="official")
    torch.manual_seed(0)
    model = build_model_from_config(cfg, dataset.info).eval()
    official, examples = evaluate(model, eval_loader(dataset, 1), dataset.info, torch.device("cpu"))
    fixed, _ = evaluate(model, eval_loader(build_dataset("shapes", None, "val", cfg["image_size"], length=3), 1),
                        dataset.info, torch.device("cpu"))
    assert same(official, fixed) and examples[0]["pred_sem_seg"].shape == (cfg["image_size"],) * 2
    path = tmp_path / "checkpoint.pt"
    torch.save({"config": cfg, "step": 1, "model": model.state_dict()}, path)
    got = main(["--checkpoint", str(path), "--protocol", "official", "--eval-images", "3", "--device", "cpu"])
    assert same(got, official)
    assert json.loads((tmp_path / "eval.json").read_text())["protocol"] == "official"


def test_official_checkpoint_errors_are_one_line(tmp_path):
    root = tmp_path / "data"
    write_coco_fixture(root, np.random.default_rng(0), n_images=(0, 1))
    pkl = tmp_path / "model_final.pkl"
    save_official_checkpoint(tiny_model(3), str(pkl))
    other = tmp_path / "other.pkl"  # another architecture: a wider decoder, one decoder layer more
    save_official_checkpoint(build_model("resnet18", num_classes=3, num_queries=QUERIES,
                                         **dict(TINY, hidden_dim=64, dec_layers=3)), str(other))
    torn = tmp_path / "torn.pkl"
    torn.write_bytes(pickle.dumps({"model": {}})[:10])

    def refused(*argv, pkl=pkl, name="coco_panoptic", data=root):
        with pytest.raises(SystemExit) as info:
            argv = list(argv) + (["--data-root", str(data)] if data else [])
            main(["--official-checkpoint", str(pkl), "--dataset", name, "--device", "cpu"] + argv)
        message = str(info.value)
        assert message.startswith("m2f.evaluate: ") and "\n" not in message, message
        return message

    tiny = ["--backbone", "resnet18", "--num-queries", str(QUERIES)] + [a for k, v in TINY.items()
                                                                       for a in ("--model", f"{k}={v}")]
    assert refused(*tiny, pkl=tmp_path / "missing.pkl") == \
        f"m2f.evaluate: --official-checkpoint {tmp_path / 'missing.pkl'}: no such file"
    message = refused(*tiny, pkl=other)
    assert message.startswith(f"m2f.evaluate: --official-checkpoint {other}: official checkpoint does not match "
                              "the model; ") and "shape mismatches (" in message and "unexpected keys (" in message
    assert "file (64, 8, 1, 1) vs model (32, 8, 1, 1)" in message and message.endswith(
        "(another --dataset, --backbone, --num-queries or --model?)")
    assert "cannot read it (" in refused(*tiny, pkl=torn)
    assert "data root" in refused(*tiny, data=tmp_path / "nowhere") and "does not exist" in refused(
        *tiny, data=tmp_path / "nowhere")
    assert "needs a data root (--data-root)" in refused(*tiny, data=None)
    with pytest.raises(SystemExit, match="^m2f.evaluate: --official-checkpoint needs --dataset"):
        main(["--official-checkpoint", str(pkl), "--device", "cpu"])
    with pytest.raises(SystemExit, match="^m2f.evaluate: --dataset, --backbone: only with --official-checkpoint"):
        main(["--checkpoint", str(pkl), "--dataset", "ade20k", "--backbone", "resnet18"])
    with pytest.raises(SystemExit, match=r"cannot be read .* \(a detectron2 \.pkl\? use --official-checkpoint\)$"):
        main(["--checkpoint", str(pkl), "--device", "cpu"])
    assert "--protocol official runs one image per rank" in refused(*tiny, "--batch-size", "4")

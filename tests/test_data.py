"""Datasets, augmentations and samplers: the built-in shapes, COCO panoptic and ADE20K fixtures
built on the fly, and one training step on each real format."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from PIL import Image

from m2f.data import StreamSampler, build_dataset, collate
from m2f.data.io import id2rgb
from m2f.data.sample import DatasetInfo, finalize, semantic_from_panoptic
from m2f.data.shapes import INFO as SHAPES_INFO
from m2f.data import transforms
from m2f.data.transforms import LargeScaleJitter, ResizePad, SemanticCrop
from bench.data_testing import write_ade_fixture, write_coco_fixture

from ._rng import keep_global_rng  # noqa: F401  (autouse: the CLI seeds the global RNGs)


def check_panoptic_sample(s, info, size):
    assert s["image"].shape == (3, size, size) and s["image"].dtype == torch.uint8
    pan, sem, t = s["pan_seg"], s["sem_seg"], s["targets"]
    assert pan.shape == sem.shape == (size, size)
    present = set(torch.unique(pan).tolist()) - {0}
    assert {seg["id"] for seg in s["segments"]} == present  # exactly the segments in the map
    assert torch.equal(sem, semantic_from_panoptic(pan, s["segments"]))
    regular = [seg for seg in s["segments"] if not seg["iscrowd"]]
    present = t["masks"].flatten(1).any(1)  # a segment augmentation removed stays, with an empty mask
    assert t["labels"][present].tolist() == [seg["category_id"] for seg in regular]
    assert t["masks"].dtype == torch.bool and t["masks"].shape == (len(t["labels"]), size, size)
    assert torch.equal(t["masks"][present], pan[None] == torch.tensor([seg["id"] for seg in regular])[:, None, None])
    assert t["masks"].sum(0).max() <= 1  # segments never overlap
    for seg in s["segments"]:
        assert seg["isthing"] == (seg["category_id"] in info.thing_ids)


def test_shapes_is_panoptic_and_deterministic():
    size = 48
    ds = build_dataset("shapes", None, "train", size, seed=3)
    touching = 0
    for i in range(40):
        s = ds[i]
        check_panoptic_sample(s, SHAPES_INFO, size)
        assert (s["pan_seg"] > 0).all()  # shapes has no void
        assert (s["targets"]["masks"].sum(0) == 1).all()  # the targets tile the image
        things = [seg for seg in s["segments"] if seg["isthing"]]
        assert 1 <= len(things) <= 4
        for seg in things:
            m = s["pan_seg"] == seg["id"]
            touching += bool(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
    assert touching > 0
    a, b = ds[(7, 0)], build_dataset("shapes", None, "train", size, seed=3)[(7, 5)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["pan_seg"], b["pan_seg"])
    other = build_dataset("shapes", None, "train", size, seed=4)[7]
    val = build_dataset("shapes", None, "val", size, seed=3)[7]
    assert not torch.equal(a["image"], other["image"]) and not torch.equal(a["image"], val["image"])


def region_sample(h, w, rng):
    """A panoptic sample whose image colour is a function of the segment id (big rectangles)."""
    pan = torch.zeros(h, w, dtype=torch.int64)
    pan[: h // 2, : w // 3] = 1
    pan[: h // 2, w // 3:] = 2
    pan[h // 2:, : w // 2] = 3
    pan[h // 2:, w // 2:] = 4
    colors = torch.from_numpy(rng.integers(0, 256, (5, 3))).to(torch.uint8)
    segments = [{"id": i, "category_id": i - 1, "isthing": i <= 2, "iscrowd": 0} for i in range(1, 5)]
    return {"image": colors[pan].permute(2, 0, 1).contiguous(), "pan_seg": pan,
            "sem_seg": semantic_from_panoptic(pan, segments), "segments": segments}, colors


def interior(ids: torch.Tensor, r: int = 1) -> torch.Tensor:
    """Pixels whose (2r+1)^2 neighbourhood has one id (away from resampling blur), never within
    r of the border (a crop may cut right next to a boundary)."""
    p = torch.nn.functional.pad(ids[None, None].float(), (r, r, r, r), value=-1.0)
    nb = torch.nn.functional.unfold(p, 2 * r + 1)[0].view(-1, *ids.shape)
    return (nb == ids.float()).all(0)


@pytest.mark.parametrize("transform", ["lsj", "semantic", "resize_pad"])
def test_transforms_move_image_and_labels_together(transform):
    rng = np.random.default_rng()
    size, checked = 32, 0
    for trial in range(6):
        sample, colors = region_sample(int(rng.integers(20, 70)), int(rng.integers(20, 70)), rng)
        aug = {"lsj": LargeScaleJitter(size), "semantic": SemanticCrop(size, color_aug=False),
               "resize_pad": ResizePad(size)}[transform]
        out = aug(sample, rng)
        assert out["image"].shape == (3, size, size)
        pan, sem = out["pan_seg"], out["sem_seg"]
        assert pan.shape == sem.shape == (size, size)
        void = pan == 0
        assert (sem[void] == 255).all() and (sem[~void] == pan[~void] - 1).all()
        assert (out["image"][:, void] == 128).all()  # the padding
        keep = interior(pan, r=3) & ~void  # upscaling by up to ~3x blurs edges over ~3 pixels
        expected = colors[pan][keep].int()
        got = out["image"].permute(1, 2, 0)[keep].int()
        assert ((got - expected).abs() <= 2).all(), f"trial {trial}: image and labels disagree"
        checked += int(keep.sum())
    assert checked > 0


def test_lsj_scales_and_flips():
    rng = np.random.default_rng()
    sample, _ = region_sample(64, 64, rng)
    aug = LargeScaleJitter(64)
    fills, flips = [], 0
    for _ in range(40):
        out = aug(sample, rng)
        fills.append((out["pan_seg"] > 0).float().mean().item())
        flips += bool(out["pan_seg"][0, 0] == 2)  # top-left shows segment 2 only when flipped
    assert min(fills) < 0.5 and max(fills) == 1.0  # shrunk-and-padded and zoomed-in crops both occur
    assert 0 < flips < 40


def test_color_aug_is_pointwise_and_leaves_labels():
    rng = np.random.default_rng()
    sample, _ = region_sample(40, 40, rng)
    changed = 0
    for _ in range(10):
        seed = int(rng.integers(2**31))
        out = SemanticCrop(32, color_aug=True, flip=False)(sample, np.random.default_rng(seed))
        plain = SemanticCrop(32, color_aug=False, flip=False)(sample, np.random.default_rng(seed))
        assert torch.equal(out["pan_seg"], plain["pan_seg"])  # geometry is drawn before colour
        changed += int(not torch.equal(out["image"], plain["image"]))
        keep = interior(out["pan_seg"], r=2) & (out["pan_seg"] > 0)  # nearest labels may sit a source pixel off
        for i in torch.unique(out["pan_seg"][keep]).tolist():  # one colour in, one colour out
            region = out["image"].permute(1, 2, 0)[keep & (out["pan_seg"] == i)]
            assert (region == region[0]).all()
    assert changed > 0


# ----------------------------------------------------------------------------- the official mappers
# Oracles written from detectron2 / Mask2Former: numpy HWC arrays, uint8 images and RGB panoptic
# PNGs resized with PIL, float64 semantic maps with F.interpolate, the draws in the mappers' order.


def official_lsj(image, pan, segments, size, rng, min_scale=0.1, max_scale=2.0):
    """COCOPanopticNewBaselineDatasetMapper: RandomFlip, ResizeScale, FixedSizeCrop (pad 128 /
    255), then one target per non-crowd segment of the annotation."""
    image, png = image.permute(1, 2, 0).numpy(), id2rgb(pan.numpy())
    if rng.uniform(0, 1) < 0.5:
        image, png = image[:, ::-1], png[:, ::-1]
    H, W = image.shape[:2]
    s = size * rng.uniform(min_scale, max_scale)
    h, w = np.round(np.multiply((H, W), min(s / H, s / W))).astype(int)
    image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.BILINEAR))
    png = np.asarray(Image.fromarray(np.ascontiguousarray(png)).resize((w, h), Image.NEAREST))
    top, left = np.round(np.maximum(np.subtract((h, w), size), 0) * rng.uniform(0.0, 1.0)).astype(int)
    image, png = image[top:top + size, left:left + size], png[top:top + size, left:left + size]
    pad = ((0, size - image.shape[0]), (0, size - image.shape[1]), (0, 0))
    image, png = np.pad(image, pad, constant_values=128), np.pad(png, pad, constant_values=255)
    ids = torch.from_numpy(png.astype(np.int64) @ np.array([1, 256, 256 ** 2]))
    kept = [seg for seg in segments if not seg["iscrowd"]]
    masks = torch.stack([ids == seg["id"] for seg in kept]) if kept else torch.zeros(0, size, size, dtype=torch.bool)
    return torch.from_numpy(image).permute(2, 0, 1), [seg["category_id"] for seg in kept], masks


def official_shortest_edge(h, w, short, max_size):
    """ResizeShortestEdge.get_output_shape."""
    scale = short * 1.0 / min(h, w)
    newh, neww = (short * 1.0, scale * w) if h < w else (scale * h, short * 1.0)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def official_semantic(image, sem, size, rng):
    """MaskFormerSemanticDatasetMapper without colour: ResizeShortestEdge (choice), RandomCrop
    'absolute', RandomFlip, pad to ``size`` (128 / 255), one target per class present."""
    image, sem = image.permute(1, 2, 0).numpy(), sem.numpy().astype("double")
    short = [int(x * 0.1 * size) for x in range(5, 21)][rng.integers(16)]
    h, w = official_shortest_edge(*sem.shape, short, 4 * size)
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    sem = F.interpolate(torch.from_numpy(sem)[None, None], (h, w), mode="nearest")[0, 0].numpy()
    ch, cw = min(size, h), min(size, w)
    y0, x0 = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
    image, sem = image[y0:y0 + ch, x0:x0 + cw], sem[y0:y0 + ch, x0:x0 + cw]
    if rng.uniform(0, 1) < 0.5:
        image, sem = image[:, ::-1], sem[:, ::-1]
    image = F.pad(torch.from_numpy(image.copy()).permute(2, 0, 1), (0, size - cw, 0, size - ch), value=128)
    sem = F.pad(torch.from_numpy(sem.astype("long")), (0, size - cw, 0, size - ch), value=255)
    classes = np.unique(sem.numpy())
    classes = classes[classes != 255]
    return image, sem, classes.tolist(), [sem == c for c in classes]


def random_panoptic(rng, crowd_only=False):
    """A noisy image and a panoptic map of rectangles: stuff, things (large ids: all three PNG
    channels), one crowd, void; contiguous category ids."""
    H, W = int(rng.integers(16, 90)), int(rng.integers(16, 90))
    pan = torch.zeros(H, W, dtype=torch.int64)
    segments = []
    for k in range(int(rng.integers(1, 7))):
        seg_id = int(rng.integers(1, 256 ** 3 - 1))
        y, x = int(rng.integers(H)), int(rng.integers(W))
        pan[y:y + int(rng.integers(1, H)), x:x + int(rng.integers(1, W))] = seg_id
        segments.append({"id": seg_id, "category_id": int(rng.integers(5)), "isthing": False,
                         "iscrowd": int(crowd_only or k == 1)})
    image = torch.from_numpy(rng.integers(0, 256, (3, H, W), dtype=np.uint8))
    return image, pan, segments


def test_lsj_matches_the_official_mapper():
    info = DatasetInfo("rand", tuple("abcde"), frozenset(), panoptic=True)
    rng, size, empty = np.random.default_rng(), 32, 0
    for trial in range(40):
        image, pan, segments = random_panoptic(rng, crowd_only=trial % 10 == 0)
        seed = int(rng.integers(2**31))
        out = finalize(LargeScaleJitter(size)({"image": image, "pan_seg": pan, "segments": list(segments)},
                                              np.random.default_rng(seed)), info)
        want_image, want_labels, want_masks = official_lsj(image, pan, segments, size, np.random.default_rng(seed))
        assert torch.equal(out["image"], want_image), (trial, seed)
        assert out["targets"]["labels"].tolist() == want_labels, (trial, seed)
        assert torch.equal(out["targets"]["masks"], want_masks), (trial, seed)
        empty += int((~want_masks.flatten(1).any(1)).sum())
    assert empty > 0  # some targets were cropped or shrunk away: they stay, with empty masks


def test_lsj_crop_that_removes_every_segment_keeps_their_targets():
    info = DatasetInfo("rand", tuple("abcde"), frozenset(), panoptic=True)
    pan = torch.zeros(200, 200, dtype=torch.int64)
    pan[:20, :20], pan[20:40, :20] = 7, 9  # top left only
    segments = [{"id": 7, "category_id": 3, "isthing": True, "iscrowd": 0},
                {"id": 9, "category_id": 1, "isthing": True, "iscrowd": 1}]
    image = torch.zeros(3, 200, 200, dtype=torch.uint8)
    # draws: not flipped, zoomed in (scale > 1.9), the crop near the bottom right (u > 0.9)
    seed = next(s for s in range(100_000) if (lambda r: r.uniform(0, 1) >= 0.5 and r.uniform(0.1, 2.0) > 1.9
                                              and r.uniform(0, 1) > 0.9)(np.random.default_rng(s)))
    out = finalize(LargeScaleJitter(32)({"image": image, "pan_seg": pan, "segments": segments},
                                        np.random.default_rng(seed)), info)
    assert (out["pan_seg"] == 0).all() and out["segments"] == []
    assert out["targets"]["labels"].tolist() == [3] and not out["targets"]["masks"].any()  # the crowd is none


def test_semantic_crop_matches_the_official_mapper():
    rng, size = np.random.default_rng(), 32
    for trial in range(40):
        H, W = int(rng.integers(8, 120)), int(rng.integers(8, 120))
        image = torch.from_numpy(rng.integers(0, 256, (3, H, W), dtype=np.uint8))
        sem = torch.from_numpy(rng.choice([0, 1, 2, 3, 255], (H, W)))
        seed = int(rng.integers(2**31))
        out = SemanticCrop(size, color_aug=False)({"image": image, "sem_seg": sem}, np.random.default_rng(seed))
        out = finalize(out, DatasetInfo("rand", tuple("abcd"), frozenset(), panoptic=False))
        want_image, want_sem, want_labels, want_masks = official_semantic(image, sem, size, np.random.default_rng(seed))
        assert torch.equal(out["image"], want_image), (trial, seed)
        assert torch.equal(out["sem_seg"], want_sem), (trial, seed)
        assert out["targets"]["labels"].tolist() == want_labels
        assert torch.equal(out["targets"]["masks"], torch.stack(want_masks) if want_masks else
                           torch.zeros(0, size, size, dtype=torch.bool))


def test_shortest_edge_size_is_detectron2s():
    from m2f.data.transforms import shortest_edge_size

    # extreme aspect ratios where the long side is capped and detectron2's float steps round down
    for h, w, short, max_size in [(97, 512, 96, 256), (1536, 261, 44, 256), (2560, 210, 16, 128), (1792, 35, 28, 128)]:
        assert shortest_edge_size(h, w, short, max_size) == official_shortest_edge(h, w, short, max_size)
    rng = np.random.default_rng()
    for h, w, short in zip(rng.integers(1, 3000, 2000), rng.integers(1, 3000, 2000), rng.integers(16, 1025, 2000)):
        assert shortest_edge_size(int(h), int(w), int(short), 2048) == official_shortest_edge(h, w, short, 2048)


def test_official_test_resize_is_detectron2s_and_keeps_the_labels():
    from m2f.data.transforms import ResizeShortestEdge

    rng = np.random.default_rng()
    for H, W, short, max_size in [(37, 90, 48, 80), (64, 48, 48, 80), (120, 25, 64, 256), (480, 640, 800, 1333)]:
        image = torch.from_numpy(rng.integers(0, 256, (3, H, W), dtype=np.uint8))
        sem, pan = torch.from_numpy(rng.integers(0, 5, (H, W))), torch.from_numpy(rng.integers(0, 9, (H, W)))
        out = ResizeShortestEdge(short, max_size)({"image": image, "sem_seg": sem, "pan_seg": pan, "index": 0})
        h, w = official_shortest_edge(H, W, short, max_size)
        want = np.array(Image.fromarray(image.permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR))
        assert torch.equal(out["image"], torch.from_numpy(want).permute(2, 0, 1))
        assert out["sem_seg"] is sem and out["pan_seg"] is pan  # compared at the original resolution
        assert out["image_size"] == (h, w) and out["output_size"] == (H, W)
        semantic = {k: v for k, v in out.items() if k != "pan_seg"}
        batch = collate([finalize(semantic, DatasetInfo("x", ("a",) * 9, frozenset(), panoptic=False))])
        assert batch["image_sizes"] == [(h, w)] and batch["output_sizes"] == [(H, W)]


def official_color_aug(image, rng, brightness_delta=32, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue_delta=18):
    """ColorAugSSDTransform: every step returns uint8 (astype truncation after brightness and
    contrast); the HSV steps in float HSV (OpenCV's would quantize hue to 2 degrees)."""
    img = image.permute(1, 2, 0).numpy()

    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def hsv_step(x, channel, change):
        hsv = rgb_to_hsv(x / 255.0)
        hsv[..., channel] = change(hsv[..., channel])
        return np.round(hsv_to_rgb(hsv) * 255).astype(np.uint8)

    steps = {"contrast": lambda x: convert(x, alpha=rng.uniform(*contrast)),
             "saturation": lambda x: hsv_step(x, 1, lambda s: np.clip(s * rng.uniform(*saturation), 0, 1)),
             "hue": lambda x: hsv_step(x, 0, lambda h: (h + rng.integers(-hue_delta, hue_delta + 1) / 180) % 1)}
    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    order = ("contrast", "saturation", "hue") if rng.integers(2) else ("saturation", "hue", "contrast")
    for name in order:
        if rng.integers(2):
            img = steps[name](img)
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)


def test_color_aug_matches_the_official_steps():
    from m2f.data.transforms import color_aug_ssd

    rng = np.random.default_rng()
    image = torch.from_numpy(rng.integers(0, 256, (3, 24, 24), dtype=np.uint8))
    for _ in range(50):
        seed = int(rng.integers(2**31))
        out = color_aug_ssd(image, np.random.default_rng(seed))
        assert torch.equal(out, official_color_aug(image, np.random.default_rng(seed))), seed
    # brightness alone, +delta: truncated like astype(uint8)
    bright = next(s for s in range(100) if (lambda r: r.integers(2) and r.uniform(-32, 32) > 0.5
                                            and not any(r.integers(2) for _ in range(4)))(np.random.default_rng(s)))
    r = np.random.default_rng(bright)
    r.integers(2)
    delta = r.uniform(-32, 32)
    out = color_aug_ssd(image, np.random.default_rng(bright))
    assert torch.equal(out, (image.float() + delta).clamp(0, 255).floor().to(torch.uint8))


def test_stream_sampler_shards_the_single_process_batches():
    size, batch, world = 11, 6, 3
    single = list(itertools.islice(StreamSampler(size, seed=5), 5 * batch))
    ranks = [list(itertools.islice(StreamSampler(size, seed=5, rank=r, world_size=world), 5 * batch // world))
             for r in range(world)]
    local = batch // world
    for step in range(5):
        global_batch = sorted(single[step * batch:(step + 1) * batch])
        sharded = sorted(k for r in ranks for k in r[step * local:(step + 1) * local])
        assert sharded == global_batch
    resumed = list(itertools.islice(StreamSampler(size, seed=5, start=2 * batch), 3 * batch))
    assert resumed == single[2 * batch:]
    epoch0 = [i for i, e in single if e == 0]
    assert sorted(epoch0) == list(range(size))  # each epoch is a permutation


# ----------------------------------------------------------------------------- real formats


def test_coco_panoptic_fixture_loads(tmp_path):
    rng = np.random.default_rng()
    write_coco_fixture(tmp_path, rng)
    val = build_dataset("coco_panoptic", str(tmp_path), "val", 64, seed=0)
    assert val.info.class_names == ("person", "car", "sky") and val.info.thing_ids == {0, 1}
    s = val[0]
    check_panoptic_sample(s, val.info, 64)
    h, w = 64, 64  # ResizePad: the category layout survives (the fixture's halves / thirds)
    assert len(s["segments"]) == 4 and sum(seg["iscrowd"] for seg in s["segments"]) == 1
    assert sorted(s["targets"]["labels"].tolist()) == [0, 1, 2]  # the crowd is no target
    assert s["sem_seg"][1, 1] == 2  # sky on top
    crowd_id = next(seg["id"] for seg in s["segments"] if seg["iscrowd"])
    assert (s["sem_seg"][s["pan_seg"] == crowd_id] == 0).all()  # the crowd is "person" in sem_seg
    train = build_dataset("coco_panoptic", str(tmp_path), "train", 64, seed=0)
    for epoch in range(3):
        s = train[(1, epoch)]
        check_panoptic_sample(s, train.info, 64)
    assert torch.equal(train[(1, 2)]["image"], train[(1, 2)]["image"])  # augmentation is seeded
    assert h == w


def test_ade20k_fixture_loads(tmp_path):
    rng = np.random.default_rng()
    write_ade_fixture(tmp_path, rng)
    val = build_dataset("ade20k", str(tmp_path), "val", 64, seed=0)
    assert val.info.num_classes == 150 and not val.info.panoptic
    s = val[1]
    assert s["image"].shape == (3, 64, 64) and "pan_seg" not in s
    assert set(torch.unique(s["sem_seg"]).tolist()) <= {0, 2, 3, 255}
    assert s["sem_seg"][0, 5] == 255  # label 0 is ignored
    assert s["targets"]["labels"].tolist() == [0, 2, 3]
    assert torch.equal(s["targets"]["masks"], s["sem_seg"][None] == torch.tensor([0, 2, 3])[:, None, None])
    train = build_dataset("ade20k", str(tmp_path), "train", 32, seed=0)
    batch = collate([train[(i, 0)] for i in range(3)])
    assert batch["images"].shape == (3, 3, 32, 32) and batch["pan_seg"] is None


@pytest.mark.parametrize("name,writer", [("coco_panoptic", write_coco_fixture), ("ade20k", write_ade_fixture)])
def test_real_format_trains_one_step(tmp_path, name, writer):
    from m2f.train import main

    root = tmp_path / "data"
    writer(root, np.random.default_rng())
    metrics = main(["--dataset", name, "--data-root", str(root), "--steps", "1", "--batch-size", "2",
                    "--image-size", "64", "--kernels", "fused", "--out", str(tmp_path / "run"), "--device", "cpu",
                    "--num-workers", "0", "--preset", "micro"])
    log = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert np.isfinite(log[0]["loss"]) and log[0]["step"] == 1
    assert "mIoU" in metrics and (("PQ" in metrics) == (name == "coco_panoptic"))
    assert (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("orientation, method", [
    (1, None), (2, Image.Transpose.FLIP_LEFT_RIGHT), (3, Image.Transpose.ROTATE_180),
    (4, Image.Transpose.FLIP_TOP_BOTTOM), (5, Image.Transpose.TRANSPOSE), (6, Image.Transpose.ROTATE_270),
    (7, Image.Transpose.TRANSVERSE), (8, Image.Transpose.ROTATE_90)])
def test_files_are_read_upright_by_their_exif_orientation(tmp_path, orientation, method):
    """detectron2's read_image applies the EXIF orientation tag (its method table, here) to
    images and label maps alike."""
    from m2f.data.io import read_image, read_label_png, read_panoptic_png

    rng = np.random.default_rng(orientation)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    labels = rng.integers(0, 150, (5, 7), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(tmp_path / "image.png", exif=exif)
    Image.fromarray(labels).save(tmp_path / "labels.png", exif=exif)

    def upright(array):
        im = Image.fromarray(array)
        return np.array(im if method is None else im.transpose(method))

    want_rgb, want_labels = upright(rgb), upright(labels)
    assert np.array_equal(read_image(tmp_path / "image.png").permute(1, 2, 0).numpy(), want_rgb)
    assert np.array_equal(read_label_png(tmp_path / "labels.png").numpy(), want_labels)
    r, g, b = (want_rgb[..., i].astype(np.int64) for i in range(3))
    ids = r + 256 * g + 256 ** 2 * b
    assert np.array_equal(read_panoptic_png(tmp_path / "image.png").numpy(), ids)


def test_a_damaged_exif_block_is_read_as_stored(tmp_path, monkeypatch):
    from m2f.data import io

    Image.fromarray(np.zeros((2, 3, 3), dtype=np.uint8)).save(tmp_path / "image.png")

    def broken(self):
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    assert io.read_image(tmp_path / "image.png").shape == (3, 2, 3)


# ----------------------------------------------------------------------------- the fast path
# The implementations before the speed-up (bench.data_speed: ~3x faster COCO LSJ samples),
# kept as oracles: the panoptic label maps resized through RGB channels, and the targets,
# class map and present segments built with one comparison of the id map per segment.


def old_resize_nearest(label, h, w):
    ids = label.numpy()
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 256 ** 2], axis=-1).astype(np.uint8)
    rgb = np.array(Image.fromarray(rgb).resize((w, h), Image.NEAREST)).astype(np.int64)
    return torch.from_numpy(rgb[..., 0] + 256 * rgb[..., 1] + 256 ** 2 * rgb[..., 2]).to(label.dtype)


def old_finalize(sample, info):
    pan, segments = sample["pan_seg"], sample["segments"]
    kept = [s for s in segments if not s["iscrowd"]]
    ids = torch.tensor([s["id"] for s in kept], dtype=pan.dtype)
    masks = pan[None] == ids[:, None, None] if kept else pan.new_zeros((0, *pan.shape), dtype=torch.bool)
    sample["targets"] = {"labels": torch.tensor([s["category_id"] for s in kept], dtype=torch.int64), "masks": masks}
    present = set(torch.unique(pan).tolist())
    sample["segments"] = [s for s in segments if s["id"] in present]
    sem = torch.full_like(pan, info.ignore_label)
    for s in sample["segments"]:
        sem[pan == s["id"]] = s["category_id"]
    sample["sem_seg"] = sem
    return sample


def assert_samples_equal(got, want):
    assert got.keys() == want.keys()
    for key in ("image", "pan_seg", "sem_seg"):
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert got["segments"] == want["segments"]
    for key in ("labels", "masks"):
        t, w = got["targets"][key], want["targets"][key]
        assert t.dtype == w.dtype and t.shape == w.shape and torch.equal(t, w), key


def test_label_resize_is_the_rgb_pngs():
    rng = np.random.default_rng(0)
    for trial in range(30):
        _, pan, _ = random_panoptic(rng)
        if trial % 3 == 0:
            pan = pan % 256  # the uint8 path
        h, w = int(rng.integers(1, 200)), int(rng.integers(1, 200))
        assert torch.equal(transforms._resize_nearest(pan, h, w, "pil"), old_resize_nearest(pan, h, w)), trial


@pytest.mark.parametrize("pan,segments", [
    (torch.tensor([[0, 5, 5], [7, 7, 2 ** 24 + 3]]), [(5, 0), (2 ** 24 + 3, 1), (7, 0)]),  # an id past 2**24
    (torch.tensor([[-4, 5], [0, 9]]), [(-4, 0), (5, 1), (11, 0)]),  # negative, absent
    (torch.tensor([[3, 3], [4, 0]]), [(3, 0), (4, 1), (3, 1), (1_000, 0)]),  # one id twice: the later class
    (torch.tensor([[3, 3], [4, 0]]), []),
    (torch.zeros(0, 4, dtype=torch.int64), [(3, 0)]),
    (torch.arange(600).reshape(20, 30), [(i, i % 2) for i in range(0, 700, 2)]),  # > 255 segments
])
def test_finalize_is_the_per_segment_comparison(pan, segments):
    info = DatasetInfo("rand", tuple("ab"), frozenset(), panoptic=True)
    segments = [{"id": i, "category_id": c, "isthing": False, "iscrowd": int(k % 3 == 2)}
                for k, (i, c) in enumerate(segments)]
    got = finalize({"image": torch.zeros(3, *pan.shape, dtype=torch.uint8), "pan_seg": pan.clone(),
                    "segments": list(segments)}, info)
    want = old_finalize({"image": torch.zeros(3, *pan.shape, dtype=torch.uint8), "pan_seg": pan.clone(),
                         "segments": list(segments)}, info)
    assert_samples_equal(got, want)


def test_coco_samples_are_the_old_paths_bit_for_bit(tmp_path, monkeypatch):
    """COCO LSJ samples (many segments, 2**24 ids, crowd, void) for several seeds and epochs:
    equal to the old implementation's."""
    import m2f.data.coco_panoptic as coco

    write_coco_fixture(tmp_path, np.random.default_rng(0), n_images=(0, 3), val_sizes=[(90, 120), (120, 70), (64, 64)],
                       extra_things=25)
    for seed in range(3):
        ds = coco.COCOPanoptic(tmp_path, split="val", image_size=96, seed=seed, augment=True)
        for key in itertools.product(range(len(ds)), range(3)):
            got = ds[key]
            with monkeypatch.context() as m:
                m.setattr(transforms, "_resize_nearest", lambda label, h, w, method: old_resize_nearest(label, h, w))
                m.setattr(coco, "finalize", old_finalize)
                want = ds[key]
            assert_samples_equal(got, want)

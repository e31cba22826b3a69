"""Post-processing on hand-built predictions with known answers."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from m2f.inference import instance_inference, panoptic_inference, sem_seg_postprocess, semantic_inference

BIG = 20.0  # a mask logit whose sigmoid is 1 to float precision


def class_logits(probs):
    """[Q, K+1] logits whose softmax is ``probs`` (rows sum to 1)."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


def region(h, w, rows, cols):
    """[H, W] mask logits: +BIG inside rows x cols, -BIG elsewhere."""
    m = torch.full((h, w), -BIG)
    m[rows, cols] = BIG
    return m


def test_semantic_inference_is_probability_weighted_mask_sum():
    # query 0: class 1 (p 0.7) on the left half; query 1: class 2 (p 0.6) on the right half
    mask_cls = class_logits([[0.1, 0.7, 0.1, 0.1], [0.2, 0.1, 0.6, 0.1]])
    mask_pred = torch.stack([region(2, 4, slice(None), slice(0, 2)), region(2, 4, slice(None), slice(2, 4))])
    semseg = semantic_inference(mask_cls, mask_pred)
    assert semseg.shape == (3, 2, 4)
    expected_left = torch.tensor([0.1, 0.7, 0.1])
    expected_right = torch.tensor([0.2, 0.1, 0.6])
    torch.testing.assert_close(semseg[:, 0, 0], expected_left, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(semseg[:, 1, 3], expected_right, rtol=1e-5, atol=1e-6)
    assert semseg.argmax(0).tolist() == [[1, 1, 2, 2], [1, 1, 2, 2]]


def test_instance_inference_top_k_scores_and_thing_filter():
    # 3 queries, 2 classes: the 4 best (query, class) pairs are (0,0) .6, (1,1) .5, (2,0) .4, (1,0) .3
    mask_cls = class_logits([[0.6, 0.1, 0.3], [0.3, 0.5, 0.2], [0.4, 0.05, 0.55]])
    m0 = region(4, 4, slice(0, 2), slice(None))
    m1 = region(4, 4, slice(2, 4), slice(None))
    m2 = torch.full((4, 4), -BIG)
    m2[0, 0] = math.log(9.0)  # one pixel with probability 0.9
    mask_pred = torch.stack([m0, m1, m2])
    result = instance_inference(mask_cls, mask_pred, topk=4)
    order = result["scores"].argsort(descending=True)
    scores, classes = result["scores"][order], result["pred_classes"][order]
    masks = result["pred_masks"][order]
    # scores: class probability x mean mask probability inside the binary mask
    torch.testing.assert_close(scores, torch.tensor([0.6, 0.5, 0.4 * 0.9, 0.3]), rtol=1e-5, atol=1e-6)
    assert classes.tolist() == [0, 1, 0, 0]
    assert torch.equal(masks[0], (m0 > 0).float()) and torch.equal(masks[1], (m1 > 0).float())
    assert masks[2].sum() == 1 and torch.equal(masks[3], (m1 > 0).float())
    # panoptic models keep only thing classes
    things = instance_inference(mask_cls, mask_pred, topk=4, thing_ids={1})
    assert things["pred_classes"].tolist() == [1] and things["pred_masks"].shape == (1, 4, 4)


def test_panoptic_inference_segments():
    h, w = 4, 6
    num_classes = 3  # class 0 thing, classes 1 and 2 stuff
    queries = [
        ([0.95, 0.02, 0.02, 0.01], region(h, w, slice(0, 2), slice(0, 3))),  # thing, top-left
        ([0.01, 0.02, 0.95, 0.02], region(h, w, slice(2, 4), slice(0, 3))),  # stuff 2, bottom-left
        ([0.01, 0.02, 0.92, 0.05], region(h, w, slice(None), slice(5, 6))),  # stuff 2 again: merged
        ([0.50, 0.30, 0.10, 0.10], region(h, w, slice(None), slice(3, 5))),  # score 0.5 <= 0.8: dropped
        ([0.05, 0.05, 0.05, 0.85], region(h, w, slice(None), slice(3, 5))),  # no object: dropped
        ([0.90, 0.04, 0.03, 0.03], region(h, w, slice(0, 4), slice(0, 3))),  # thing mostly under queries 0/1
        ([0.02, 0.93, 0.03, 0.02], region(h, w, slice(0, 1), slice(3, 5))),  # stuff 1, top of the free band
    ]
    mask_cls = class_logits([p for p, _ in queries])
    mask_pred = torch.stack([m for _, m in queries])
    seg, info = panoptic_inference(mask_cls, mask_pred, thing_ids={0})
    assert seg.dtype == torch.int32 and seg.shape == (h, w)
    expected = torch.tensor([
        [1, 1, 1, 3, 3, 2],
        [1, 1, 1, 0, 0, 2],
        [2, 2, 2, 0, 0, 2],
        [2, 2, 2, 0, 0, 2],
    ], dtype=torch.int32)
    assert torch.equal(seg, expected), seg
    assert info == [
        {"id": 1, "isthing": True, "category_id": 0},
        {"id": 2, "isthing": False, "category_id": 2},
        {"id": 3, "isthing": False, "category_id": 1},
    ]


def test_panoptic_overlap_threshold():
    # query 1 (thing) keeps 3 of its 4 pixels: kept at threshold 0.7, dropped at the official 0.8
    mask_cls = class_logits([[0.97, 0.01, 0.02], [0.01, 0.9, 0.09]])
    mask_pred = torch.stack([region(1, 5, slice(None), slice(0, 2)), region(1, 5, slice(None), slice(1, 5))])
    seg, info = panoptic_inference(mask_cls, mask_pred, thing_ids={0, 1})
    assert seg.tolist() == [[1, 1, 0, 0, 0]] and [s["category_id"] for s in info] == [0]
    seg, info = panoptic_inference(mask_cls, mask_pred, thing_ids={0, 1}, overlap_threshold=0.7)
    assert seg.tolist() == [[1, 1, 2, 2, 2]] and [s["category_id"] for s in info] == [0, 1]


def test_panoptic_nothing_detected():
    seg, info = panoptic_inference(class_logits([[0.1, 0.1, 0.8]]), torch.zeros(1, 3, 3), thing_ids={0})
    assert info == [] and not seg.any()


def test_sem_seg_postprocess_crops_padding_then_resizes():
    result = torch.zeros(2, 8, 8)
    result[:, :6, :4] = 1.0  # the unpadded image is 6 x 4; the rest is padding
    out = sem_seg_postprocess(result, (6, 4), 12, 8)
    assert out.shape == (2, 12, 8) and torch.equal(out, torch.ones(2, 12, 8))


# ---------------------------------------------------------------------------------------------
# Independent oracles: the official MaskFormer post-processing written out pixel by pixel.

def oracle_panoptic(mask_cls, mask_pred, thing_ids, object_mask_threshold=0.8, overlap_threshold=0.8, seen=None):
    """Per query: best class over K+1 (softmax); keep it when not "no object" and its
    probability > object_mask_threshold. Each pixel goes to the first kept query with the
    largest probability * sigmoid(mask). In query order, a kept query's segment is the pixels it
    wins whose sigmoid >= 0.5; it is dropped when it wins no pixel, has no pixel >= 0.5, its
    segment is empty, or (pixels won) / (pixels >= 0.5) < overlap_threshold; the later queries
    of an already placed stuff class paint their segment with that class's id. ``seen`` counts
    the branches taken."""
    seen = {} if seen is None else seen
    probs = torch.softmax(mask_cls, -1).numpy()
    sig = mask_pred.sigmoid().numpy()
    num_classes = probs.shape[1] - 1
    kept = [q for q in range(probs.shape[0])
            if int(probs[q].argmax()) != num_classes and probs[q].max() > object_mask_threshold]
    h, w = sig.shape[1:]
    seg = np.zeros((h, w), np.int32)
    info = []
    if not kept:
        seen["nothing_kept"] = seen.get("nothing_kept", 0) + 1
        return seg, info
    values = np.stack([np.float32(probs[q].max()) * sig[q] for q in kept])
    winner = values.argmax(0)  # numpy: the first of equal maxima
    stuff_ids = {}
    for i, q in enumerate(kept):
        cls = int(probs[q].argmax())
        won, own = winner == i, sig[q] >= 0.5
        if won.sum() == 0 or own.sum() == 0 or (won & own).sum() == 0:
            continue
        if won.sum() / own.sum() < overlap_threshold:
            seen["overlap_drop"] = seen.get("overlap_drop", 0) + 1
            continue
        if cls not in thing_ids and cls in stuff_ids:
            seen["stuff_merge"] = seen.get("stuff_merge", 0) + 1
            seg[won & own] = stuff_ids[cls]
            continue
        new_id = len(info) + 1
        if cls not in thing_ids:
            stuff_ids[cls] = new_id
        seg[won & own] = new_id
        info.append({"id": new_id, "isthing": cls in thing_ids, "category_id": cls})
    return seg, info


def oracle_instances(mask_cls, mask_pred, topk, thing_ids=None):
    """The ``topk`` best (query, class) pairs over the Q x K class probabilities (no-object
    column dropped after the softmax); with ``thing_ids`` only thing classes survive (after the
    top-k). Mask = logit > 0; score = class probability * mean sigmoid over the mask.
    -> list of (class, score, mask) sorted by score."""
    probs = torch.softmax(mask_cls.double(), -1)[:, :-1].numpy()
    sig = mask_pred.double().sigmoid().numpy()
    pairs = sorted(((probs[q, c], q, c) for q in range(probs.shape[0]) for c in range(probs.shape[1])),
                   reverse=True)[:topk]
    out = []
    for p, q, c in pairs:
        if thing_ids is not None and c not in thing_ids:
            continue
        binary = mask_pred[q].numpy() > 0
        out.append((c, p * (sig[q] * binary).sum() / (binary.sum() + 1e-6), binary))
    return sorted(out, key=lambda t: -t[1])


def random_predictions(gen, num_queries, num_classes, h, w, confident=True):
    """Class logits with many confident queries (none unless ``confident``), repeated rows
    (exact score ties), classes repeated across queries; each mask a random rectangle of
    positive logits (ties on a grid of 0.5, some exactly 0) over a negative background."""
    mask_cls = torch.randn(num_queries, num_classes + 1, generator=gen)
    best = torch.randint(0, num_classes + 1, (num_queries,), generator=gen)
    boost = torch.rand(num_queries, generator=gen) * (8 if confident else 1)
    mask_cls[torch.arange(num_queries), best] += boost
    mask_cls[1] = mask_cls[0]  # two queries with the same class and score
    mask_cls[3] = mask_cls[2]
    mask_pred = torch.full((num_queries, h, w), -3.0)
    for q in range(num_queries):
        y0, x0 = torch.randint(0, h, (1,), generator=gen).item(), torch.randint(0, w, (1,), generator=gen).item()
        y1 = torch.randint(y0 + 1, h + 1, (1,), generator=gen).item()
        x1 = torch.randint(x0 + 1, w + 1, (1,), generator=gen).item()
        mask_pred[q, y0:y1, x0:x1] = torch.randint(1, 4, (1,), generator=gen).float()
    mask_pred += torch.randint(-2, 2, (num_queries, h, w), generator=gen).float() * 0.5  # logit 0 included
    mask_pred[1] = mask_pred[0]  # an exact duplicate: its twin wins every tie
    return mask_cls, mask_pred


def test_panoptic_inference_matches_oracle_on_random_predictions():
    gen = torch.Generator().manual_seed(0)
    seen = {}
    for trial in range(30):
        mask_cls, mask_pred = random_predictions(gen, 10, 4, 7, 9, confident=trial % 10 != 9)
        seg, info = panoptic_inference(mask_cls, mask_pred, thing_ids={0, 1})
        ref_seg, ref_info = oracle_panoptic(mask_cls, mask_pred, {0, 1}, seen=seen)
        assert np.array_equal(seg.numpy(), ref_seg), trial
        assert info == ref_info, trial
    assert sorted(seen) == ["nothing_kept", "overlap_drop", "stuff_merge"], seen


def test_instance_inference_matches_oracle_on_random_predictions():
    gen = torch.Generator().manual_seed(1)

    def key(item):  # equal scores (an empty mask scores 0) sorted by class and mask
        return -round(item[1], 5), item[0], item[2].tobytes()

    for trial in range(20):
        mask_cls = torch.randn(8, 6, generator=gen) * 2
        mask_pred = torch.randint(-6, 7, (8, 5, 7), generator=gen).float() * 0.5  # logit 0 included
        mask_pred[trial % 8] = -5.0  # an empty mask: score 0
        # topk 100 > Q * K = 40: every pair (the official topk raises there)
        for topk, thing_ids in ((10, None), (10, {0, 2, 3}), (40, {4}), (100, None), (100, {1, 3})):
            result = instance_inference(mask_cls, mask_pred, topk=topk, thing_ids=thing_ids)
            got = sorted(zip(result["pred_classes"].tolist(), result["scores"].tolist(),
                             result["pred_masks"].numpy().astype(bool)), key=key)
            ref = sorted(oracle_instances(mask_cls, mask_pred, topk, thing_ids), key=key)
            assert [c for c, _, _ in got] == [c for c, _, _ in ref]
            np.testing.assert_allclose([s for _, s, _ in got], [s for _, s, _ in ref], rtol=1e-5, atol=1e-7)
            assert all(np.array_equal(m, r) for (_, _, m), (_, _, r) in zip(got, ref))


def test_panoptic_all_below_threshold_or_no_object():
    mask_cls = class_logits([[0.8, 0.1, 0.1], [0.05, 0.05, 0.9]])  # 0.8 is not > 0.8; the other is no object
    seg, info = panoptic_inference(mask_cls, torch.full((2, 3, 4), BIG), thing_ids={0})
    assert info == [] and not seg.any()
    # kept queries whose masks are all below 0.5: no segment
    seg, info = panoptic_inference(class_logits([[0.9, 0.05, 0.05]]), torch.full((1, 3, 4), -1.0), thing_ids={0})
    assert info == [] and not seg.any()


class FixedPredictions(torch.nn.Module):
    """A model whose eval output is fixed: class logits [Q, K+1], mask logits [Q, H, W] at the input size."""

    size_divisibility = 16

    def __init__(self, mask_cls, mask_pred):
        super().__init__()
        self.mask_cls, self.mask_pred = mask_cls, mask_pred

    def forward(self, images):
        b = images.shape[0]
        return {"pred_logits": self.mask_cls.expand(b, -1, -1), "pred_masks": self.mask_pred.expand(b, -1, -1, -1)}


def test_evaluate_post_processes_the_image_without_its_padding():
    from m2f.data.sample import DatasetInfo, collate, finalize
    from m2f.data.transforms import ResizePad
    from m2f.evaluate import evaluate

    # an 8 x 16 image padded to 16 x 16: a thing (class 0) on the left half, stuff (class 1) on the right
    info = DatasetInfo("two", ("thing", "stuff"), frozenset({0}), panoptic=True)
    pan = torch.ones(8, 16, dtype=torch.int64)
    pan[:, 8:] = 2
    segments = [{"id": 1, "category_id": 0, "isthing": True, "iscrowd": 0},
                {"id": 2, "category_id": 1, "isthing": False, "iscrowd": 0}]
    sample = ResizePad(16)({"image": torch.zeros(3, 8, 16, dtype=torch.uint8), "pan_seg": pan,
                            "segments": segments, "index": 0})
    batch = collate([finalize(sample, info)])
    assert batch["images"].shape == (1, 3, 16, 16) and batch["image_sizes"] == [(8, 16)]
    # both masks spill into the padding, where the stuff query wins: with the padding, the thing
    # keeps 64 of its 128 pixels (< 0.8, dropped) and its instance mask is twice the object
    thing = region(16, 16, slice(None), slice(0, 8))
    stuff = region(16, 16, slice(None), slice(8, 16))
    stuff[8:] = BIG
    model = FixedPredictions(class_logits([[0.95, 0.03, 0.02], [0.01, 0.97, 0.02]]), torch.stack([thing, stuff]))
    metrics, examples = evaluate(model, [batch], info, torch.device("cpu"))
    assert all(abs(metrics[k] - 100) < 1e-6 for k in ("PQ", "AP", "mIoU")), metrics
    assert examples[0]["image"].shape == (3, 8, 16) and examples[0]["pred_pan_seg"].shape == (8, 16)

"""Post-processing on hand-built predictions with known answers."""
from __future__ import annotations

import math

import torch

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

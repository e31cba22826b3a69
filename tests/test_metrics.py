"""PQ / mIoU / mask AP against small cases computed by hand (panopticapi, detectron2, COCOeval rules),
and mask AP against pycocotools' COCOeval itself on random images.

Images are 1 x N rows so every pixel count is visible in the test. Random permutations of
the segment ids and of the order of the inputs check that nothing depends on them.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from m2f.metrics import MaskAP, PanopticQuality, SemanticIoU

from .conftest import fresh_seed


def row(*runs):
    """row((value, count), ...) -> int64 [1, N]: a 1-pixel-high map of runs."""
    return torch.tensor([[v for v, n in runs for _ in range(n)]], dtype=torch.int64)


def relabel(pan: torch.Tensor, segments, rng):
    """Give segments fresh random ids (void stays 0), to show results do not depend on ids."""
    ids = {s["id"]: int(i) for s, i in zip(segments, rng.choice(np.arange(1, 10_000), len(segments), replace=False))}
    out = pan.clone()
    for old, new in ids.items():
        out[pan == old] = new
    return out, [dict(s, id=ids[s["id"]]) for s in segments]


def seg(id, category, iscrowd=0):
    return {"id": id, "category_id": category, "iscrowd": iscrowd}


def pq_of(cases, num_classes, thing_ids, seed):
    rng = np.random.default_rng(seed)
    metric = PanopticQuality(num_classes, thing_ids)
    for pred, pred_segs, gt, gt_segs in cases:
        pred, pred_segs = relabel(pred, pred_segs, rng)
        gt, gt_segs = relabel(gt, gt_segs, rng)
        metric.update(pred, pred_segs, gt, gt_segs)
    return metric.compute()


@pytest.fixture(autouse=True)
def fresh_torch_rng():
    """Fresh torch draws (randperm, rand) every run, whatever seeded the global RNG before."""
    torch.manual_seed(fresh_seed())


@pytest.fixture
def seed():
    return fresh_seed()


def test_pq_matching_excludes_void_from_union(seed):
    # gt: thing A (cat 0) 10 px, stuff B (cat 1) 5 px, void 5 px
    gt = row((1, 10), (2, 5), (0, 5))
    # pred: cat 0 on 8 px of A; cat 1 on 2 px of A + 4 of B + 2 void; cat 2 on 1 px of B + 3 void
    pred = row((5, 8), (6, 6), (7, 1), (6, 2), (7, 3))
    res = pq_of([(pred, [seg(5, 0), seg(6, 1), seg(7, 2)], gt, [seg(1, 0), seg(2, 1)])], 3, {0}, seed)
    # A: IoU 8/10; B: 4 / (8 + 5 - 4 - 2 void) = 4/7 > 0.5 (4/9 if void counted);
    # the cat-2 segment is 3/4 void: ignored, not an FP
    assert res["PQ_th"] == pytest.approx(80.0)
    assert res["PQ_st"] == pytest.approx(400 / 7)
    assert res["PQ"] == pytest.approx((80.0 + 400 / 7) / 2)
    assert res["SQ"] == pytest.approx((80.0 + 400 / 7) / 2)
    assert res["RQ"] == pytest.approx(100.0)


def test_pq_counts_fp_fn_and_averages_categories(seed):
    gt = row((1, 10), (2, 5), (3, 5))  # cat 0, cat 0, cat 1
    pred = row((1, 9), (2, 6), (3, 5))  # cat 0 (IoU .9 with gt 1), cat 1, cat 0
    res = pq_of([(pred, [seg(1, 0), seg(2, 1), seg(3, 0)], gt, [seg(1, 0), seg(2, 0), seg(3, 1)])], 2, {0}, seed)
    # cat 0: tp 1 (IoU .9), fn 1, fp 1 -> PQ .45, SQ .9, RQ .5; cat 1: fp 1, fn 1 -> 0
    assert res["PQ_th"] == pytest.approx(45.0) and res["SQ_th"] == pytest.approx(90.0)
    assert res["RQ_th"] == pytest.approx(50.0)
    assert res["PQ_st"] == 0.0 and res["SQ_st"] == 0.0 and res["RQ_st"] == 0.0
    assert (res["PQ"], res["SQ"], res["RQ"]) == pytest.approx((22.5, 45.0, 25.0))


def test_pq_iou_must_exceed_half(seed):
    gt_segs = [seg(1, 0), seg(2, 1)]
    gt = row((1, 10), (2, 10))
    half = row((1, 5), (2, 15))  # cat 0 IoU 5/10 = .5: not a match
    above = row((1, 6), (2, 14))  # 6/10: a match
    res = pq_of([(half, [seg(1, 0), seg(2, 1)], gt, gt_segs)], 2, {0}, seed)
    assert res["PQ_th"] == 0.0 and res["RQ_th"] == 0.0
    res = pq_of([(above, [seg(1, 0), seg(2, 1)], gt, gt_segs)], 2, {0}, seed)
    assert res["PQ_th"] == pytest.approx(60.0)
    assert res["PQ_st"] == pytest.approx(100 * 10 / 14)


def test_pq_crowd_is_never_matched_and_excuses_false_positives(seed):
    gt = row((1, 10), (2, 10))  # crowd of cat 0, then a regular cat-0 instance
    pred = row((3, 6), (4, 6), (5, 8))  # inside the crowd; 4 px crowd + 2 px instance; cat 1
    res = pq_of([(pred, [seg(3, 0), seg(4, 0), seg(5, 1)], gt, [seg(1, 0, iscrowd=1), seg(2, 0)])], 2, {0}, seed)
    # cat 0: the instance is missed (fn 1, IoU 2/14); both cat-0 predictions lie > 50% on the crowd:
    # no fp. cat 1: one fp. Both categories count, with PQ 0.
    assert res["PQ"] == 0.0 and res["RQ"] == 0.0
    m = PanopticQuality(2, {0})
    m.update(pred, [seg(3, 0), seg(4, 0), seg(5, 1)], gt, [seg(1, 0, iscrowd=1), seg(2, 0)])
    np.testing.assert_array_equal(m.stats[:, :3], [[0, 0, 1], [0, 1, 0]])


def test_pq_accumulates_over_images(seed):
    a = (row((5, 8), (6, 6), (7, 1), (6, 2), (7, 3)), [seg(5, 0), seg(6, 1), seg(7, 2)], row((1, 10), (2, 5), (0, 5)),
         [seg(1, 0), seg(2, 1)])
    b = (row((1, 9), (2, 6), (3, 5)), [seg(1, 0), seg(2, 1), seg(3, 0)], row((1, 10), (2, 5), (3, 5)),
         [seg(1, 0), seg(2, 0), seg(3, 1)])
    res = pq_of([b, a] if seed % 2 else [a, b], 3, {0}, seed)
    # cat 0: tp 2 (IoU .8 + .9), fp 1, fn 1 -> 1.7 / 3; cat 1: tp 1 (4/7), fp 1, fn 1 -> (4/7) / 2
    assert res["PQ_th"] == pytest.approx(100 * 1.7 / 3)
    assert res["PQ_st"] == pytest.approx(100 * (4 / 7) / 2)
    assert res["SQ_th"] == pytest.approx(85.0)


# ----------------------------------------------------------------------------- PQ: panopticapi oracle


def panopticapi_pq(images, categories):
    """panopticapi's pq_compute_single_core and pq_average written out (ground-truth 'area' is
    the segment's pixel count, as in the COCO panoptic JSON): images = [(gt_pan, gt_segments,
    pred_pan, pred_segments)] numpy maps; categories = {id: isthing}. -> (results with nan where
    pq_average divides by n = 0, {category: [iou, tp, fp, fn]})."""
    offset, void = 256 * 256 * 256, 0
    stat = {c: [0.0, 0, 0, 0] for c in categories}
    for pan_gt, gt_info, pan_pred, pred_info in images:
        gt_segms = {el["id"]: dict(el, area=int((pan_gt == el["id"]).sum())) for el in gt_info}
        pred_segms = {el["id"]: dict(el) for el in pred_info}
        labels, counts = np.unique(pan_pred, return_counts=True)
        for label, count in zip(labels, counts):
            if label not in pred_segms:
                assert label == void
                continue
            pred_segms[label]["area"] = count
        assert all("area" in s for s in pred_segms.values())  # panopticapi: every JSON segment is in the PNG
        gt_pred_map = {}
        labels, counts = np.unique(pan_gt.astype(np.uint64) * offset + pan_pred.astype(np.uint64), return_counts=True)
        for label, intersection in zip(labels, counts):
            gt_pred_map[(int(label // offset), int(label % offset))] = intersection
        gt_matched, pred_matched = set(), set()
        for (gt_label, pred_label), intersection in gt_pred_map.items():
            if gt_label not in gt_segms or pred_label not in pred_segms or gt_segms[gt_label]["iscrowd"] == 1:
                continue
            if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
                continue
            union = (pred_segms[pred_label]["area"] + gt_segms[gt_label]["area"] - intersection
                     - gt_pred_map.get((void, pred_label), 0))
            iou = intersection / union
            if iou > 0.5:
                stat[gt_segms[gt_label]["category_id"]][0] += iou
                stat[gt_segms[gt_label]["category_id"]][1] += 1
                gt_matched.add(gt_label)
                pred_matched.add(pred_label)
        crowd_labels_dict = {}
        for gt_label, gt_info_ in gt_segms.items():
            if gt_label in gt_matched:
                continue
            if gt_info_["iscrowd"] == 1:
                crowd_labels_dict[gt_info_["category_id"]] = gt_label
                continue
            stat[gt_info_["category_id"]][3] += 1
        for pred_label, pred_info_ in pred_segms.items():
            if pred_label in pred_matched:
                continue
            intersection = gt_pred_map.get((void, pred_label), 0)
            if pred_info_["category_id"] in crowd_labels_dict:
                intersection += gt_pred_map.get((crowd_labels_dict[pred_info_["category_id"]], pred_label), 0)
            if intersection / pred_info_["area"] > 0.5:
                continue
            stat[pred_info_["category_id"]][2] += 1
    results = {}
    for suffix, isthing in (("", None), ("_th", True), ("_st", False)):
        pq = sq = rq = n = 0
        for label, cat_isthing in categories.items():
            if isthing is not None and isthing != cat_isthing:
                continue
            iou, tp, fp, fn = stat[label]
            if tp + fp + fn == 0:
                continue
            n += 1
            pq += iou / (tp + 0.5 * fp + 0.5 * fn)
            sq += iou / tp if tp != 0 else 0
            rq += tp / (tp + 0.5 * fp + 0.5 * fn)
        for key, total in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
            results[key + suffix] = 100 * total / n if n else float("nan")  # panopticapi: ZeroDivisionError
    return results, stat


def _random_rectangles(rng, n, h, w, void_fraction):
    """An [h, w] map of n overlapping rectangles with random distinct ids (0 = void), some
    pixels voided at random."""
    pan = np.zeros((h, w), np.int64)
    ids = rng.choice(np.arange(1, 5000), n, replace=False)
    for i in ids:
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        pan[y0: rng.integers(y0 + 1, h + 1), x0: rng.integers(x0 + 1, w + 1)] = i
    pan[rng.random((h, w)) < void_fraction] = 0
    return pan, [int(i) for i in ids if (pan == i).any()]


def _random_pq_case(rng, num_classes, h=6, w=7):
    """(gt_pan, gt_segments, pred_pan, pred_segments): ground truth with crowd regions and void
    (or none at all); predictions that copy it with holes and relabelled segments, plus
    spurious ones, or are unrelated."""
    gt, gt_ids = _random_rectangles(rng, rng.integers(0, 6), h, w, rng.choice([0.0, 0.2]))
    gt_segs = [seg(i, int(rng.integers(num_classes)), int(rng.random() < 0.3)) for i in gt_ids]
    if rng.random() < 0.6:
        pred = np.where(rng.random((h, w)) < 0.15, 0, gt)
        category = {s["id"]: s["category_id"] if rng.random() < 0.8 else int(rng.integers(num_classes))
                    for s in gt_segs}
        extra, extra_ids = _random_rectangles(rng, rng.integers(0, 3), h, w, 0.0)
        pred = np.where(extra > 0, extra + 10_000, pred)
        category.update({i + 10_000: int(rng.integers(num_classes)) for i in extra_ids})
    else:
        pred, pred_ids = _random_rectangles(rng, rng.integers(0, 6), h, w, 0.0)
        category = {i: int(rng.integers(num_classes)) for i in pred_ids}
    pred_segs = [{"id": i, "category_id": c} for i, c in category.items() if (pred == i).any()]
    return gt, gt_segs, pred, pred_segs


def test_pq_matches_panopticapi_oracle_on_random_images(seed):
    """Per-category tp / fp / fn / IoU sums and the averages equal panopticapi's algorithm on
    random images: crowd regions (of the prediction's category or another), void, predictions
    of another category, images without ground truth, categories absent everywhere, thing or
    stuff groups without any category (panopticapi divides by zero: nan)."""
    rng = np.random.default_rng(seed)
    for _ in range(60):
        num_classes = int(rng.integers(1, 6))
        things = set(rng.choice(num_classes, rng.integers(0, num_classes + 1), replace=False).tolist())
        cases = [_random_pq_case(rng, num_classes) for _ in range(rng.integers(1, 4))]
        want, stat = panopticapi_pq(cases, {c: c in things for c in range(num_classes)})
        metric = PanopticQuality(num_classes, things)
        for gt, gt_segs, pred, pred_segs in cases:
            metric.update(torch.from_numpy(pred), pred_segs, torch.from_numpy(gt), gt_segs)
        np.testing.assert_allclose(metric.stats, [[tp, fp, fn, iou] for iou, tp, fp, fn in stat.values()])
        assert metric.compute() == pytest.approx(want, nan_ok=True)


def test_miou_follows_detectron2():
    gt = torch.tensor([0, 0, 1, 1, 2, 255, 1])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 3])
    m = SemanticIoU(4)
    order = torch.randperm(len(gt))  # pixel order is irrelevant
    m.update(pred[order][:4], gt[order][:4])
    m.update(pred[order][4:], gt[order][4:])
    res = m.compute()
    # IoU: c0 1/3, c1 2/4, c2 0/1; c3 never in the ground truth -> left out; the ignore pixel
    # (predicted 2) counts nowhere
    assert res["mIoU"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 0) / 3)
    assert res["pACC"] == pytest.approx(50.0)
    assert res["mACC"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 0) / 3)
    assert res["fwIoU"] == pytest.approx(100 * (1 / 3 * 2 + 1 / 2 * 3) / 6)
    assert res["IoU"][:3] == pytest.approx([100 / 3, 50.0, 0.0]) and np.isnan(res["IoU"][3])


def detectron2_sem_seg(pairs, num_classes, ignore_label=255):
    """detectron2's SemSegEvaluator.process / evaluate written out (numpy's 0 / 0 = nan
    included) over (pred, gt) pairs -> {mIoU, fwIoU, mACC, pACC, IoU}."""
    conf = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for pred, gt in pairs:
        gt = gt.copy()
        gt[gt == ignore_label] = num_classes
        conf += np.bincount((num_classes + 1) * pred.reshape(-1) + gt.reshape(-1),
                            minlength=conf.size).reshape(conf.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc, iou = np.full(num_classes, np.nan), np.full(num_classes, np.nan)
        tp = conf.diagonal()[:-1].astype(float)
        pos_gt = np.sum(conf[:-1, :-1], axis=0).astype(float)
        class_weights = pos_gt / np.sum(pos_gt)
        pos_pred = np.sum(conf[:-1, :-1], axis=1).astype(float)
        acc_valid = pos_gt > 0
        acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
        union = pos_gt + pos_pred - tp
        iou_valid = np.logical_and(acc_valid, union > 0)
        iou[iou_valid] = tp[iou_valid] / union[iou_valid]
        macc = np.sum(acc[acc_valid]) / np.sum(acc_valid)
        miou = np.sum(iou[iou_valid]) / np.sum(iou_valid)
        fiou = np.sum(iou[iou_valid] * class_weights[iou_valid])
        pacc = np.sum(tp) / np.sum(pos_gt)
    return {"mIoU": 100 * miou, "fwIoU": 100 * fiou, "mACC": 100 * macc, "pACC": 100 * pacc, "IoU": list(100 * iou)}


def test_miou_matches_detectron2_oracle(seed):
    """SemanticIoU equals detectron2's SemSegEvaluator on random maps: classes never in the
    ground truth (left out; nan IoU), some only predicted, ignore pixels, and a run whose
    pixels are all ignored (detectron2: nan, fwIoU 0)."""
    rng = np.random.default_rng(seed)
    for trial in range(40):
        num_classes = int(rng.integers(1, 7))
        pairs = []
        for _ in range(rng.integers(1, 4)):
            n = int(rng.integers(1, 30))
            gt = rng.integers(0, max(1, num_classes - 2), n)  # the last classes never in the ground truth
            gt[rng.random(n) < (1.0 if trial % 10 == 0 else 0.3)] = 255
            pairs.append((rng.integers(0, num_classes, n), gt))
        metric = SemanticIoU(num_classes)
        for pred, gt in pairs:
            metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
        got, want = metric.compute(), detectron2_sem_seg(pairs, num_classes)
        assert got.pop("IoU") == pytest.approx(want.pop("IoU"), nan_ok=True)
        assert got == pytest.approx(want, nan_ok=True)


def masks(length, *spans):
    out = torch.zeros(len(spans), 1, length, dtype=torch.bool)
    for i, (a, b) in enumerate(spans):
        out[i, 0, a:b] = True
    return out


def ap_case_one():
    """cat 0: d1 (IoU 1 with g1), d2 (IoU 5/8 with g2), d3 (no overlap) -> AP at t <= .6 is 1,
    at t >= .65 precision is 1 up to recall .5, then 0: 51 of 101 recall points."""
    gt = masks(20, (0, 4), (10, 18))
    dt = masks(20, (0, 4), (10, 15), (19, 20))
    return dt, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.int64), gt, torch.zeros(2, dtype=torch.int64)


def test_mask_ap_single_category():
    dt, scores, labels, gt, gt_labels = ap_case_one()
    perm = torch.randperm(3)  # detection order is irrelevant (they are sorted by score)
    m = MaskAP(1)
    m.update(dt[perm], scores[perm], labels[perm], gt, gt_labels)
    res = m.compute()
    per_t = np.array([1.0] * 3 + [51 / 101] * 7)
    assert res["AP"] == pytest.approx(100 * per_t.mean())
    assert res["AP50"] == pytest.approx(100.0)
    assert res["AP75"] == pytest.approx(100 * 51 / 101)


def test_mask_ap_crowd_categories_and_images():
    m = MaskAP(3)
    dt, scores, labels, gt, gt_labels = ap_case_one()
    m.update(dt, scores, labels, gt, gt_labels)
    # image 2, cat 1: a crowd (0..10) and an instance (12..16); the top detection lies inside the
    # crowd (IoU vs crowd = inter / det area = 1): ignored, not a false positive -> AP 1
    m.update(masks(20, (2, 6), (12, 16)), torch.tensor([0.95, 0.6]), torch.tensor([1, 1]),
             masks(20, (0, 10), (12, 16)), torch.tensor([1, 1]), torch.tensor([True, False]))
    # image 3: a cat-2 detection, but cat 2 has no ground truth anywhere: left out of the mean
    m.update(masks(20, (0, 5)), torch.tensor([0.99]), torch.tensor([2]), masks(20), torch.zeros(0, dtype=torch.int64))
    res = m.compute()
    cat0 = np.array([1.0] * 3 + [51 / 101] * 7)
    assert res["AP"] == pytest.approx(100 * (cat0.mean() + 1.0) / 2)
    assert res["AP50"] == pytest.approx(100.0)


def test_mask_ap_without_crowd_flag_counts_the_false_positive():
    # the same image as above with the crowd region as a regular instance: the 0.95 detection
    # (IoU 4/10) is now a false positive ranked first -> precision 1/2 at every recall
    m = MaskAP(2)
    m.update(masks(20, (2, 6), (12, 16)), torch.tensor([0.95, 0.6]), torch.tensor([1, 1]),
             masks(20, (12, 16)), torch.tensor([1]))
    assert m.compute()["AP"] == pytest.approx(50.0)


def test_mask_ap_perfect_and_empty():
    rng = np.random.default_rng()
    gt = torch.from_numpy(rng.random((5, 8, 8)) > 0.5)
    labels = torch.from_numpy(rng.integers(0, 3, 5))
    m = MaskAP(3)
    m.update(gt, torch.rand(5), labels, gt, labels)
    assert m.compute()["AP"] == pytest.approx(100.0)
    assert np.isnan(MaskAP(3).compute()["AP"])


def _random_instances(rng, n, h, w, num_classes):
    """n random rectangle-union masks [n, h, w] bool and their classes [n]."""
    out = np.zeros((n, h, w), bool)
    for m in out:
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
            m[y: y + rng.integers(2, h // 2), x: x + rng.integers(2, w // 2)] = True
    return out, rng.integers(0, num_classes, n)


def test_mask_ap_matches_pycocotools_on_random_images(seed):
    """AP / AP50 / AP75 equal COCOeval('segm') (pycocotools, the official evaluator) on random
    images: jittered and spurious detections, wrong classes, crowd regions, distinct scores."""
    mask_util = pytest.importorskip("pycocotools.mask", reason="pycocotools is not installed")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(seed)
    num_classes, h, w = 3, 20, 24
    ours = MaskAP(num_classes)
    images, annotations, detections = [], [], []

    def rle(m):
        encoded = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        encoded["counts"] = encoded["counts"].decode()
        return encoded

    scores = iter(rng.permutation(10_000) / 10_000)  # distinct: COCOeval and MaskAP break ties alike
    for image_id in range(1, 17):
        gt, gt_labels = _random_instances(rng, rng.integers(0, 6), h, w, num_classes)
        crowd = rng.random(len(gt)) < 0.3
        kept = rng.random(len(gt)) < 0.8  # detected ground truth, jittered, sometimes mislabelled
        jittered = np.roll(gt[kept], rng.integers(-2, 3, 2), axis=(1, 2)) if kept.any() else gt[kept]
        spurious, spurious_labels = _random_instances(rng, rng.integers(0, 4), h, w, num_classes)
        dt = np.concatenate([jittered, spurious])
        dt_labels = np.concatenate([np.where(rng.random(kept.sum()) < 0.1, (gt_labels[kept] + 1) % num_classes,
                                             gt_labels[kept]), spurious_labels])
        dt_scores = np.array([next(scores) for _ in dt])
        ours.update(torch.from_numpy(dt), torch.from_numpy(dt_scores), torch.from_numpy(dt_labels),
                    torch.from_numpy(gt), torch.from_numpy(gt_labels), torch.from_numpy(crowd), image_id=image_id)
        images.append({"id": image_id, "height": h, "width": w})
        for m, c, is_crowd in zip(gt, gt_labels, crowd):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(c) + 1,
                                "segmentation": rle(m), "area": float(m.sum()), "iscrowd": int(is_crowd),
                                "bbox": list(mask_util.toBbox(rle(m)))})
        detections += [{"image_id": image_id, "category_id": int(c) + 1, "segmentation": rle(m), "score": float(s)}
                       for m, c, s in zip(dt, dt_labels, dt_scores)]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
    coco.createIndex()
    evaluator = COCOeval(coco, coco.loadRes(detections), "segm")
    evaluator.evaluate()
    evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # [T, R, K], area 'all', 100 detections

    def mean(p):
        return 100 * p[p > -1].mean() if (p > -1).any() else float("nan")

    want = {"AP": mean(precision), "AP50": mean(precision[0]), "AP75": mean(precision[5])}
    got = ours.compute()
    assert got == pytest.approx(want, nan_ok=True), (got, want)


# ----------------------------------------------------------------------------- several ranks


def _random_panoptic_image(rng, num_classes, h, w):
    """(pred_pan, pred_segments, scores, gt_pan, gt_segments) of one image: ground truth
    rectangles (some crowd), predicted as shifted copies (some mislabelled) plus spurious ones."""
    gt_masks, gt_labels = _random_instances(rng, rng.integers(1, 5), h, w, num_classes)
    spurious, spurious_labels = _random_instances(rng, rng.integers(0, 3), h, w, num_classes)
    shifted = np.roll(gt_masks, rng.integers(-1, 2, 2), axis=(1, 2))
    labels = np.where(rng.random(len(gt_labels)) < 0.2, (gt_labels + 1) % num_classes, gt_labels)

    def paint(masks, labels, crowd):
        pan = np.zeros((h, w), np.int64)
        for i, m in enumerate(masks):
            pan[m] = i + 1
        return torch.from_numpy(pan), [seg(i + 1, int(c), int(k)) for i, (c, k) in enumerate(zip(labels, crowd))
                                       if (pan == i + 1).any()]

    gt_pan, gt_segs = paint(gt_masks, gt_labels, rng.random(len(gt_labels)) < 0.2)
    pred_pan, pred_segs = paint(np.concatenate([shifted, spurious]), np.concatenate([labels, spurious_labels]),
                                np.zeros(len(labels) + len(spurious_labels)))
    return pred_pan, pred_segs, rng.random(len(pred_segs)), gt_pan, gt_segs


def _score(seed, images, num_classes=3, h=12, w=16):
    """PQ, mIoU and mask AP over ``images`` (indices into a seeded list), synced over the ranks."""
    rng = np.random.default_rng(seed)
    cases = [_random_panoptic_image(rng, num_classes, h, w) for _ in range(max(images, default=-1) + 1)]
    things = {0, 1}
    pq, sem, ap = PanopticQuality(num_classes, things), SemanticIoU(num_classes), MaskAP(num_classes)

    def category_map(pan, segments):
        out = torch.full_like(pan, 255)
        for s in segments:
            out[pan == s["id"]] = s["category_id"]
        return out

    for i in images:
        pred_pan, pred_segs, scores, gt_pan, gt_segs = cases[i]
        pq.update(pred_pan, pred_segs, gt_pan, gt_segs)
        sem.update(category_map(pred_pan, pred_segs).clamp(max=num_classes - 1), category_map(gt_pan, gt_segs))
        dt = [(s, x) for s, x in zip(pred_segs, scores) if s["category_id"] in things]
        gt = [s for s in gt_segs if s["category_id"] in things]
        ap.update(torch.stack([pred_pan == s["id"] for s, _ in dt]) if dt else torch.zeros(0, h, w, dtype=torch.bool),
                  torch.tensor([x for _, x in dt]), torch.tensor([s["category_id"] for s, _ in dt]),
                  torch.stack([gt_pan == s["id"] for s in gt]) if gt else torch.zeros(0, h, w, dtype=torch.bool),
                  torch.tensor([s["category_id"] for s in gt]), torch.tensor([bool(s["iscrowd"]) for s in gt]),
                  image_id=i)
    out = {}
    for metric in (pq, sem, ap):
        metric.sync()
        out.update(metric.compute())
    return out


def _score_on_rank(rank, world, init_file, seed, size, out):
    import torch.distributed as dist

    from m2f.data.sampler import ShardSampler

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_score(seed, list(ShardSampler(size, rank=rank, world_size=world))), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_score_each_image_once_and_merge_exactly(tmp_path, seed):
    """2 gloo ranks, 7 images (4 + 3, m2f.evaluate's ShardSampler): every image once, PQ's
    per-category sums, the IoU confusion matrix and AP's per-image detections merged, so
    both ranks report the single process's metrics (no padding image counted twice, as a
    DistributedSampler would)."""
    from m2f.data.sampler import ShardSampler

    size, world = 7, 2
    shards = [list(ShardSampler(size, rank=r, world_size=world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(size)) and [len(s) for s in shards] == [4, 3]
    for seed in range(seed, seed + 50):  # images that exercise the matching (some seeds give AP 0)
        single = _score(seed, range(size))
        if single["PQ"] > 0 and single["AP"] > 0:
            break
    else:
        pytest.fail("50 seeds without a matched thing: the random images do not exercise the matching")
    torch.multiprocessing.start_processes(_score_on_rank, (world, str(tmp_path / "pg"), seed, size,
                                                           str(tmp_path / "metrics")), nprocs=world,
                                          start_method="spawn")
    for rank in range(world):
        merged = torch.load(f"{tmp_path / 'metrics'}.{rank}", weights_only=False)
        assert merged.pop("IoU") == pytest.approx(single["IoU"], rel=1e-12, nan_ok=True), rank
        assert merged == pytest.approx({k: v for k, v in single.items() if k != "IoU"}, rel=1e-12, nan_ok=True), rank

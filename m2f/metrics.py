"""Segmentation metrics, following the reference implementations line by line.

- :class:`PanopticQuality`: PQ, SQ, RQ (all / things / stuff) as panopticapi's
  ``pq_compute``: a match is IoU > 0.5 with the same category, where the union leaves out
  the prediction's overlap with void; crowd ground truth is never matched and, with void,
  excuses a false positive that lies more than half on it.
- :class:`SemanticIoU`: mIoU, fwIoU, mACC, pACC as detectron2's ``SemSegEvaluator`` (a
  confusion matrix over non-ignored pixels; classes absent from the ground truth are left out).
- :class:`MaskAP`: COCO mask AP (``COCOeval`` with iouType='segm', area range 'all',
  100 detections per image and category, IoU thresholds .50:.05:.95, 101-point
  interpolated precision); AP, AP50, AP75. ``tests/test_metrics.py`` checks it against
  pycocotools' ``COCOeval`` on random images.

Results are percentages (x100) as detectron2 reports them. Each metric accumulates
per-image updates and :meth:`sync` merges the states of all torch.distributed ranks.
"""
from __future__ import annotations

from typing import Collection, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

VOID = 0
OFFSET = 256 * 256 * 256  # panopticapi: combines (gt id, pred id) into one integer


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(array: np.ndarray) -> np.ndarray:
    if not _distributed():
        return array
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(backend_device)
    dist.all_reduce(t)
    return t.cpu().numpy().astype(array.dtype)


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class PanopticQuality:
    """update(pred_pan, pred_segments, gt_pan, gt_segments) per image; compute() -> PQ dict.

    pred_pan / gt_pan: int [H, W] segment ids, 0 = void. pred_segments: list of
    dict(id, category_id); gt_segments: list of dict(id, category_id, iscrowd).
    Category ids are contiguous in [0, num_classes).
    """

    def __init__(self, num_classes: int, thing_ids: Collection[int]):
        self.num_classes = num_classes
        self.thing_ids = frozenset(int(t) for t in thing_ids)
        self.stats = np.zeros((num_classes, 4), np.float64)  # tp, fp, fn, sum of matched IoU

    def update(self, pred_pan, pred_segments: Sequence[Dict], gt_pan, gt_segments: Sequence[Dict]) -> None:
        pred_pan, gt_pan = _as_numpy(pred_pan).astype(np.int64), _as_numpy(gt_pan).astype(np.int64)
        ids, counts = np.unique(gt_pan * OFFSET + pred_pan, return_counts=True)
        overlap = {(int(i) // OFFSET, int(i) % OFFSET): int(c) for i, c in zip(ids, counts)}
        gt_area: Dict[int, int] = {}
        pred_area: Dict[int, int] = {}
        for (g, p), c in overlap.items():
            gt_area[g] = gt_area.get(g, 0) + c
            pred_area[p] = pred_area.get(p, 0) + c
        gt_segms = {int(s["id"]): s for s in gt_segments}
        # panopticapi requires every predicted segment to be in the PNG: empty ones are dropped
        pred_segms = {int(s["id"]): s for s in pred_segments if pred_area.get(int(s["id"]), 0) > 0}
        unknown = set(pred_area) - set(pred_segms) - {VOID}
        if unknown:
            raise ValueError(f"predicted segment ids {sorted(unknown)} are in the map but not in pred_segments")

        gt_matched, pred_matched = set(), set()
        for (g, p), inter in overlap.items():
            if g not in gt_segms or p not in pred_segms or gt_segms[g].get("iscrowd", 0):
                continue
            category = int(gt_segms[g]["category_id"])
            if category != int(pred_segms[p]["category_id"]):
                continue
            union = pred_area[p] + gt_area.get(g, 0) - inter - overlap.get((VOID, p), 0)
            iou = inter / union
            if iou > 0.5:
                self.stats[category, 0] += 1
                self.stats[category, 3] += iou
                gt_matched.add(g)
                pred_matched.add(p)

        crowd_by_category = {}
        for g, s in gt_segms.items():
            if g in gt_matched:
                continue
            if s.get("iscrowd", 0):
                crowd_by_category[int(s["category_id"])] = g
                continue
            self.stats[int(s["category_id"]), 2] += 1
        for p, s in pred_segms.items():
            if p in pred_matched:
                continue
            category = int(s["category_id"])
            ignored = overlap.get((VOID, p), 0)
            if category in crowd_by_category:
                ignored += overlap.get((crowd_by_category[category], p), 0)
            if ignored / pred_area[p] > 0.5:
                continue
            self.stats[category, 1] += 1

    def sync(self) -> None:
        self.stats = _all_reduce_sum(self.stats)

    def _average(self, classes: Collection[int]) -> Dict[str, float]:
        pq = sq = rq = 0.0
        n = 0
        for c in sorted(classes):
            tp, fp, fn, iou = self.stats[c]
            if tp + fp + fn == 0:
                continue
            n += 1
            pq += iou / (tp + 0.5 * fp + 0.5 * fn)
            sq += iou / tp if tp else 0.0
            rq += tp / (tp + 0.5 * fp + 0.5 * fn)
        if n == 0:  # no category with tp + fp + fn > 0: undefined (panopticapi divides by zero)
            return {"PQ": float("nan"), "SQ": float("nan"), "RQ": float("nan"), "n": 0}
        return {"PQ": 100 * pq / n, "SQ": 100 * sq / n, "RQ": 100 * rq / n, "n": n}

    def compute(self) -> Dict[str, float]:
        """{PQ, SQ, RQ, PQ_th, SQ_th, RQ_th, PQ_st, SQ_st, RQ_st} in percent; nan for a group
        without any category seen (in the ground truth or predicted)."""
        out = {}
        everything = range(self.num_classes)
        for suffix, classes in (("", everything), ("_th", self.thing_ids),
                                ("_st", [c for c in everything if c not in self.thing_ids])):
            res = self._average(classes)
            out.update({f"{k}{suffix}": res[k] for k in ("PQ", "SQ", "RQ")})
        return out


class SemanticIoU:
    """update(pred [H, W] class ids, gt [H, W] class ids with ``ignore_label``); compute() -> dict."""

    def __init__(self, num_classes: int, ignore_label: int = 255):
        self.num_classes, self.ignore_label = num_classes, ignore_label
        self.conf = np.zeros((num_classes + 1, num_classes + 1), np.int64)  # [pred, gt]; last = ignore

    def update(self, pred, gt) -> None:
        pred, gt = _as_numpy(pred).astype(np.int64).ravel(), _as_numpy(gt).astype(np.int64).ravel()
        gt = np.where(gt == self.ignore_label, self.num_classes, gt)
        k = self.num_classes + 1
        self.conf += np.bincount(k * pred + gt, minlength=k * k).reshape(k, k)

    def sync(self) -> None:
        self.conf = _all_reduce_sum(self.conf)

    def compute(self) -> Dict[str, float]:
        """{mIoU, fwIoU, mACC, pACC} in percent, and per-class ``IoU`` (nan where absent);
        without any labelled pixel mIoU, mACC and pACC are nan (detectron2's 0 / 0)."""
        conf = self.conf[:-1, :-1].astype(np.float64)
        tp = conf.diagonal()
        pos_gt, pos_pred = conf.sum(0), conf.sum(1)
        acc_valid = pos_gt > 0
        union = pos_gt + pos_pred - tp
        iou_valid = acc_valid & (union > 0)
        iou = np.full(self.num_classes, np.nan)
        iou[iou_valid] = tp[iou_valid] / union[iou_valid]
        acc = tp[acc_valid] / pos_gt[acc_valid]
        with np.errstate(divide="ignore", invalid="ignore"):  # no labelled pixel: nan as detectron2 (fwIoU 0)
            weights = pos_gt / pos_gt.sum()
            return {
                "mIoU": float(100 * iou[iou_valid].sum() / iou_valid.sum()),
                "fwIoU": float(100 * (iou[iou_valid] * weights[iou_valid]).sum()),
                "mACC": float(100 * acc.sum() / acc_valid.sum()),
                "pACC": float(100 * tp.sum() / pos_gt.sum()),
                "IoU": (100 * iou).tolist(),
            }


class MaskAP:
    """update(pred_masks [N, H, W] bool, scores [N], pred_labels [N], gt_masks [G, H, W] bool,
    gt_labels [G], gt_crowd [G] bool=None, image_id=None) per image; compute() -> {AP, AP50, AP75}."""

    def __init__(self, num_classes: int, iou_thresholds: Optional[Sequence[float]] = None, max_dets: int = 100):
        self.num_classes = num_classes
        self.iou_thresholds = np.linspace(0.5, 0.95, 10) if iou_thresholds is None else np.asarray(iou_thresholds)
        self.rec_thresholds = np.linspace(0.0, 1.0, 101)
        self.max_dets = max_dets
        # one record per (image, category) with detections or ground truth
        self.records: List[tuple] = []  # (image_id, category, scores [D], matched [T, D], ignored [T, D], npig)
        self._next_image = 0

    def update(self, pred_masks, scores, pred_labels, gt_masks, gt_labels, gt_crowd=None, image_id=None) -> None:
        if image_id is None:
            image_id, self._next_image = self._next_image, self._next_image + 1
        pred_masks = torch.as_tensor(pred_masks).bool().flatten(1).cpu()
        gt_masks = torch.as_tensor(gt_masks).bool().flatten(1).cpu()
        scores, pred_labels, gt_labels = (_as_numpy(x).reshape(-1) for x in (scores, pred_labels, gt_labels))
        gt_crowd = np.zeros(len(gt_labels), bool) if gt_crowd is None else _as_numpy(gt_crowd).astype(bool).reshape(-1)
        for c in sorted(set(pred_labels.tolist()) | set(gt_labels.tolist())):
            d = np.flatnonzero(pred_labels == c)
            d = d[np.argsort(-scores[d], kind="mergesort")][: self.max_dets]
            g = np.flatnonzero(gt_labels == c)
            g = g[np.argsort(gt_crowd[g], kind="mergesort")]  # non-ignored ground truth first
            matched, ignored = self._match(pred_masks[d], gt_masks[g], gt_crowd[g])
            self.records.append((image_id, int(c), scores[d].astype(np.float64), matched, ignored,
                                 int((~gt_crowd[g]).sum())))

    @staticmethod
    def _ious(dt: torch.Tensor, gt: torch.Tensor, crowd: np.ndarray) -> np.ndarray:
        """[D, G] mask IoU; against a crowd ground truth, intersection / detection area (pycocotools)."""
        if len(dt) == 0 or len(gt) == 0:
            return np.zeros((len(dt), len(gt)))
        dt, gt = dt.double(), gt.double()
        inter = dt @ gt.T
        area_d, area_g = dt.sum(1, keepdim=True), gt.sum(1)[None]
        union = torch.where(torch.as_tensor(crowd)[None], area_d.expand_as(inter), area_d + area_g - inter)
        return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter)).numpy()

    def _match(self, dt, gt, crowd):
        """COCOeval.evaluateImg's greedy matching -> (matched [T, D], ignored [T, D]) bool."""
        ious = self._ious(dt, gt, crowd)
        T, D, G = len(self.iou_thresholds), len(dt), len(gt)
        matched, ignored = np.zeros((T, D), bool), np.zeros((T, D), bool)
        for ti, t in enumerate(self.iou_thresholds):
            gt_taken = np.zeros(G, bool)
            for di in range(D):
                best, m = min(t, 1 - 1e-10), -1
                for gi in range(G):
                    if gt_taken[gi] and not crowd[gi]:
                        continue
                    if m > -1 and not crowd[m] and crowd[gi]:
                        break  # matched a regular ground truth; only ignored ones remain
                    if ious[di, gi] < best:
                        continue
                    best, m = ious[di, gi], gi
                if m == -1:
                    continue
                matched[ti, di], ignored[ti, di] = True, crowd[m]
                gt_taken[m] = True
        return matched, ignored

    def sync(self) -> None:
        if _distributed():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.records)
            self.records = [r for part in gathered for r in part]

    def compute(self) -> Dict[str, float]:
        """{AP, AP50, AP75} in percent (nan when no category has ground truth)."""
        T, R = len(self.iou_thresholds), len(self.rec_thresholds)
        precision = -np.ones((T, R, self.num_classes))
        by_category: Dict[int, list] = {}
        for rec in sorted(self.records, key=lambda r: (r[0], r[1])):  # image order: rank-independent
            by_category.setdefault(rec[1], []).append(rec)
        for c, recs in by_category.items():
            npig = sum(r[5] for r in recs)
            if npig == 0:
                continue
            scores = np.concatenate([r[2] for r in recs])
            order = np.argsort(-scores, kind="mergesort")
            matched = np.concatenate([r[3] for r in recs], axis=1)[:, order]
            ignored = np.concatenate([r[4] for r in recs], axis=1)[:, order]
            tps = np.cumsum(matched & ~ignored, axis=1).astype(np.float64)
            fps = np.cumsum(~matched & ~ignored, axis=1).astype(np.float64)
            for ti in range(T):
                tp, fp = tps[ti], fps[ti]
                rc = tp / npig
                pr = tp / (fp + tp + np.spacing(1))
                pr = np.maximum.accumulate(pr[::-1])[::-1]  # precision envelope
                q = np.zeros(R)
                inds = np.searchsorted(rc, self.rec_thresholds, side="left")
                valid = inds < len(pr)
                q[valid] = pr[inds[valid]]
                precision[ti, :, c] = q

        def mean(p):
            p = p[p > -1]
            return float(100 * p.mean()) if p.size else float("nan")

        def at(t):
            return mean(precision[np.flatnonzero(np.isclose(self.iou_thresholds, t))])

        return {"AP": mean(precision), "AP50": at(0.5), "AP75": at(0.75)}

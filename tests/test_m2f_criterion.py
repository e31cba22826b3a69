"""Matcher and criterion: known assignments, point vs full mask losses, num_masks."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from m2f.criterion import SetCriterion, average_num_masks
from m2f.matcher import HungarianMatcher
from bench.m2f_testing import random_targets, rel_error

from ._same_points import same_points  # noqa: F401  (fixture)

KERNELS = ["reference", "fused"]


def make_criterion(mask_loss="point", num_points=256, importance=0.75, num_classes=4, kernels="reference"):
    weights = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points, mask_loss)
    crit = SetCriterion(num_classes, matcher, weights, 0.1, num_points, 3.0, importance, mask_loss)
    crit.kernels = matcher.kernels = kernels
    return crit


def outputs_matching(targets, num_queries, num_classes, perms, size, noise=0.0):
    """Predictions where query perms[b][j] is target j of image b (class and mask), others no-object."""
    logits, masks = [], []
    for t, perm in zip(targets, perms):
        lg = torch.full((num_queries, num_classes + 1), -4.0)
        lg[:, num_classes] = 4.0
        mk = torch.full((num_queries, size, size), -6.0)
        for j, q in enumerate(perm):
            lg[q, t["labels"][j]], lg[q, num_classes] = 4.0, -4.0
            small = torch.nn.functional.interpolate(t["masks"][j][None, None].float(), size=(size, size),
                                                    mode="bilinear", align_corners=False)[0, 0]
            mk[q] = 12.0 * (small - 0.5)
        logits.append(lg)
        masks.append(mk + noise * torch.randn_like(mk))
    return {"pred_logits": torch.stack(logits), "pred_masks": torch.stack(masks)}


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("mask_loss", ["point", "full"])
def test_matcher_recovers_a_known_assignment(kernels, mask_loss):
    num_queries, num_classes = 7, 4
    targets = random_targets(2, num_classes, 32, 32, min_targets=2, max_targets=4)
    perms = [torch.randperm(num_queries)[: len(t["labels"])].tolist() for t in targets]
    outputs = outputs_matching(targets, num_queries, num_classes, perms, 8)
    crit = make_criterion(mask_loss, kernels=kernels)
    indices = crit.matcher(outputs, targets, torch.Generator().manual_seed(0))
    for (q, j), perm in zip(indices, perms):
        assert dict(zip(j.tolist(), q.tolist())) == dict(enumerate(perm))


@pytest.mark.parametrize("kernels", KERNELS)
def test_uniform_point_loss_estimates_the_full_mask_loss(kernels):
    """With importance ratio 0 the point losses are Monte-Carlo estimates of the whole-mask
    losses. Smooth soft targets and predictions at the target resolution: with binary
    targets the bilinearly sampled labels are soft along every edge (an entropy floor the
    full loss does not have), so the two modes legitimately differ there."""
    num_queries, num_classes, size = 6, 4, 64
    targets, outputs = [], {"pred_logits": [], "pred_masks": []}
    for _ in range(2):
        t = int(torch.randint(2, 4, (1,)))
        masks = F.interpolate(torch.rand(t, 1, 4, 4), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        targets.append({"labels": torch.randperm(num_classes)[:t], "masks": masks})
        queries = torch.randperm(num_queries)[:t]
        logits = torch.full((num_queries, num_classes + 1), -4.0)
        logits[:, num_classes] = 4.0
        logits[queries, targets[-1]["labels"]], logits[queries, num_classes] = 4.0, -4.0
        pred = torch.full((num_queries, size, size), -3.0)
        pred[queries] = torch.logit(masks.clamp(0.05, 0.95)) + 0.3 * torch.randn(t, size, size)
        outputs["pred_logits"].append(logits)
        outputs["pred_masks"].append(pred)
    outputs = {k: torch.stack(v) for k, v in outputs.items()}
    full = make_criterion("full", kernels=kernels)(outputs, targets)
    point = make_criterion("point", num_points=100_000, importance=0.0, kernels=kernels)(
        outputs, targets, torch.Generator().manual_seed(1))
    assert full.keys() == point.keys() == {"loss_ce", "loss_mask", "loss_dice"}
    assert rel_error(full["loss_ce"], point["loss_ce"]) < 1e-6  # the fused criterion sums in another order
    for k in ("loss_mask", "loss_dice"):
        assert rel_error(point[k], full[k]) < 2e-2, (k, point[k].item(), full[k].item())


def test_reference_and_fused_criterion_agree_with_an_empty_image(same_points):
    num_queries, num_classes = 5, 4
    targets = random_targets(3, num_classes, 32, 32, min_targets=1, max_targets=3)
    targets[1] = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 32, dtype=torch.bool)}
    outputs = {"pred_logits": torch.randn(3, num_queries, num_classes + 1),
               "pred_masks": torch.randn(3, num_queries, 8, 8), "aux_outputs": []}
    outputs["aux_outputs"].append({k: v.clone() for k, v in outputs.items() if k != "aux_outputs"})
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    results = {}
    for kernels in KERNELS:
        crit = make_criterion(kernels=kernels)
        pred = outputs["pred_masks"].clone().requires_grad_()
        losses = crit({**outputs, "pred_masks": pred}, targets, torch.Generator().manual_seed(seed))
        sum(losses.values()).backward()
        results[kernels] = losses, pred.grad
    (ref, ref_grad), (fused, fused_grad) = results["reference"], results["fused"]
    assert ref.keys() == fused.keys() and len(ref) == 6
    for k in ref:
        assert rel_error(fused[k], ref[k]) < 1e-5, (k, seed)
    assert rel_error(fused_grad, ref_grad) < 1e-5, seed
    assert not ref_grad[1].any(), "an image without targets must get no mask gradient"


def test_fused_criterion_under_fp16_autocast_keeps_float32_losses_and_loss_scaled_gradients(same_points):
    """Under float16 autocast the fused criterion's mask losses (point_mask_loss on the fp16
    mask logits) are the reference path's float32 values, not float16-rounded ones, and a
    loss scale times a weight above float16's range (GradScaler's 65536 times 5) still gives
    the reference path's finite gradient."""
    num_queries, num_classes = 5, 4
    targets = random_targets(2, num_classes, 32, 32, min_targets=1, max_targets=3)
    logits, masks = torch.randn(2, num_queries, num_classes + 1), torch.randn(2, num_queries, 8, 8)
    results = {}
    for kernels in KERNELS:
        pred = masks.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            losses = make_criterion(kernels=kernels)({"pred_logits": logits, "pred_masks": pred.half()}, targets)
        (65536.0 * 5.0 * (losses["loss_mask"] + losses["loss_dice"])).backward()
        results[kernels] = losses, pred.grad
    (ref, ref_grad), (fused, fused_grad) = results["reference"], results["fused"]
    for k in ("loss_mask", "loss_dice"):
        assert fused[k].dtype == torch.float32 and rel_error(fused[k], ref[k]) < 1e-5, (k, fused[k].item(), ref[k].item())
    assert torch.isfinite(ref_grad).all() and rel_error(fused_grad, ref_grad) < 1e-3


@pytest.mark.parametrize("oversample, importance", [(0.0, 0.0), (0.5, 0.75), (3.0, 1.5), (float("inf"), 0.75)])
def test_criterion_refuses_bad_sampling_ratios(oversample, importance):
    """The official sampling asserts oversample_ratio >= 1 and importance_sample_ratio in
    [0, 1]; the mask-free path ran (0, 0) silently and failed in topk otherwise: every path
    refuses them when the criterion is built."""
    matcher = HungarianMatcher(2.0, 5.0, 5.0, 16)
    with pytest.raises(ValueError, match="oversample_ratio must be a finite number >= 1 and importance_sample_ratio"):
        SetCriterion(4, matcher, {}, 0.1, 16, oversample, importance)


def test_pad_targets_keeps_every_images_mask_values():
    """The padded masks' dtype holds every image's values: soft float masks after a bool
    image stay soft (not cast to True), and an image without targets given as a float
    zeros((0, h, w)) (as detectron2's mappers make them) leaves the others' masks bool."""
    from m2f.targets import pad_targets

    bool_image = {"labels": torch.tensor([1]), "masks": torch.ones(1, 4, 4, dtype=torch.bool)}
    soft_image = {"labels": torch.tensor([2]), "masks": torch.full((1, 4, 4), 0.25)}
    empty_float = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 4, 4)}
    padded = pad_targets([bool_image, soft_image], (6, 6), max_targets=2)
    assert padded.masks.dtype == torch.float32 and padded.masks[1, 0, :4, :4].eq(0.25).all()
    assert padded.masks[0, 0, :4, :4].eq(1).all() and not padded.masks[:, 1].any()
    assert pad_targets([empty_float, bool_image], (4, 4)).masks.dtype == torch.bool
    with pytest.raises(ValueError, match="max_targets=0"):
        pad_targets([empty_float, bool_image], (4, 4), max_targets=0)


def test_no_targets_at_all_gives_zero_mask_losses():
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 16, 16, dtype=torch.bool)}] * 2
    outputs = {"pred_logits": torch.randn(2, 4, 5), "pred_masks": torch.randn(2, 4, 4, 4)}
    for kernels in KERNELS:
        losses = make_criterion(kernels=kernels)(outputs, targets)
        assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0 and torch.isfinite(losses["loss_ce"])


def test_num_masks_is_averaged_over_processes_and_clamped(tmp_path):
    assert average_num_masks(0, "cpu") == 1.0 and average_num_masks(7, "cpu") == 7.0
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        assert average_num_masks(5, "cpu") == 5.0 and average_num_masks(0, "cpu") == 1.0
    finally:
        dist.destroy_process_group()


def test_loss_dict_from_terms_weights_and_sums_its_stack():
    """LossDict.from_terms: the official keys as views of one stack; weighted() with one weight
    per term stays stacked, else (or without a weight) goes entry by entry; total_loss equals
    sum(values()) and its gradient reaches each term's vector."""
    from m2f.loss_dict import LossDict, total_loss

    ce, mask = torch.rand(3, requires_grad=True), torch.rand(3, requires_grad=True)
    losses = LossDict.from_terms(("loss_ce", "loss_mask"), (ce, mask))
    assert list(losses) == ["loss_ce", "loss_mask", "loss_ce_0", "loss_mask_0", "loss_ce_1", "loss_mask_1"]
    assert losses["loss_mask_1"].item() == mask[2].item()
    uniform = {"loss_ce": 2.0, "loss_ce_0": 2.0, "loss_ce_1": 2.0, "loss_mask": 5.0, "loss_mask_0": 5.0,
               "loss_mask_1": 5.0}
    for weights, stacked in ((uniform, True), ({**uniform, "loss_ce_1": 3.0}, False),
                             ({k: v for k, v in uniform.items() if k != "loss_mask_0"}, False),
                             ({k: v for k, v in uniform.items() if "mask" not in k}, True)):
        weighted = losses.weighted(weights)
        assert (weighted.stacked is not None) == stacked, weights
        assert set(weighted) == set(weights)
        for k, v in weighted.items():
            torch.testing.assert_close(v, losses[k] * weights[k])
        total = total_loss(weighted)
        torch.testing.assert_close(total, sum(weighted.values()))
        ce.grad = mask.grad = None
        total.backward()
        torch.testing.assert_close(ce.grad, torch.tensor([weights.get(k, 0.0) for k in ("loss_ce", "loss_ce_0", "loss_ce_1")]))
    assert total_loss({"a": torch.tensor(1.0), "b": torch.tensor(2.0)}).item() == 3.0
    mapped = torch.utils._pytree.tree_map(lambda t: t * 2, losses)  # a dict to pytree: entries are the leaves
    assert type(mapped) is LossDict and mapped.keys() == losses.keys() and mapped.stacked is None
    torch.testing.assert_close(total_loss(mapped), 2 * total_loss(losses))


def _official_criterion(outputs, targets, num_classes, eos_coef, num_points, oversample, importance, costs, generator):
    """Mask2Former's SetCriterion + HungarianMatcher written out from the paper's and the
    official code's description (no m2f code): the same random draws from ``generator`` in
    the official order (per prediction: one [1, P, 2] matcher draw per image, then the
    candidates and the random points of the importance sampling)."""
    from scipy.optimize import linear_sum_assignment

    def sample(x, coords):  # x [N, 1, H, W], coords [N, P, 2] in [0, 1] -> [N, P]
        return F.grid_sample(x, 2 * coords[:, :, None] - 1, align_corners=False)[:, 0, :, 0]

    cost_class, cost_mask, cost_dice = costs
    num_masks = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
    slots = max(len(t["labels"]) for t in targets)
    height, width = targets[0]["masks"].shape[-2:]
    stacked = torch.zeros(len(targets), slots, height, width)
    for b, t in enumerate(targets):
        stacked[b, : len(t["labels"])] = t["masks"].float()
    class_weight = torch.ones(num_classes + 1)
    class_weight[-1] = eos_coef
    losses = {}
    for n, pred in enumerate([outputs] + outputs["aux_outputs"]):
        logits, masks = pred["pred_logits"], pred["pred_masks"]
        pairs = []
        with torch.no_grad():
            for b, t in enumerate(targets):
                coords = torch.rand(1, num_points, 2, generator=generator)
                out = sample(masks[b][:, None], coords.expand(masks.shape[1], -1, -1))[:, None, :]  # [Q, 1, P]
                tgt = sample(t["masks"].float()[:, None], coords.expand(len(t["labels"]), -1, -1))[None]  # [1, T, P]
                bce = F.binary_cross_entropy_with_logits(out.expand(-1, tgt.shape[1], -1),
                                                         tgt.expand(out.shape[0], -1, -1), reduction="none").mean(-1)
                prob = out.sigmoid()
                dice = 1 - (2 * (prob * tgt).sum(-1) + 1) / (prob.sum(-1) + tgt.sum(-1) + 1)
                cost = cost_class * -logits[b].softmax(-1)[:, t["labels"]] + cost_mask * bce + cost_dice * dice
                rows, cols = linear_sum_assignment(cost.numpy())
                pairs += [(b, int(q), int(j)) for q, j in zip(rows, cols)]
        target_classes = torch.full(logits.shape[:2], num_classes, dtype=torch.int64)
        for b, q, j in pairs:
            target_classes[b, q] = targets[b]["labels"][j]
        weights = class_weight[target_classes]
        nll = -logits.log_softmax(-1).gather(-1, target_classes[..., None])[..., 0]
        loss_ce = (weights * nll).sum() / weights.sum()
        src = masks[[b for b, _, _ in pairs], [q for _, q, _ in pairs]][:, None]
        tgt_masks = stacked[[b for b, _, _ in pairs], [j for _, _, j in pairs]][:, None]
        with torch.no_grad():
            candidates = torch.rand(len(pairs), int(num_points * oversample), 2, generator=generator)
            uncertain = int(importance * num_points)
            chosen = (-sample(src, candidates).abs()).topk(uncertain, dim=1).indices
            coords = torch.cat([candidates.gather(1, chosen[..., None].expand(-1, -1, 2)),
                                torch.rand(len(pairs), num_points - uncertain, 2, generator=generator)], 1)
            labels = sample(tgt_masks, coords)
        point_logits = sample(src, coords)
        loss_mask = F.binary_cross_entropy_with_logits(point_logits, labels, reduction="none").mean(1).sum() / num_masks
        prob = point_logits.sigmoid()
        loss_dice = (1 - (2 * (prob * labels).sum(1) + 1) / (prob.sum(1) + labels.sum(1) + 1)).sum() / num_masks
        suffix = "" if n == 0 else f"_{n - 1}"
        losses.update({f"loss_ce{suffix}": loss_ce, f"loss_mask{suffix}": loss_mask, f"loss_dice{suffix}": loss_dice})
    return losses


@pytest.mark.parametrize("importance", [0.75, 0.0])
def test_reference_criterion_equals_the_official_algorithm(importance):
    """The reference criterion (matching, class and point mask losses of the final and the
    auxiliary predictions, their gradients) equals the official algorithm written out in the
    test, for the same generator: same points, same assignment, same numbers."""
    num_queries, num_classes, num_points = 6, 4, 48
    targets = random_targets(3, num_classes, 24, 20, min_targets=1, max_targets=4)
    targets[1] = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 24, 20, dtype=torch.bool)}
    # logits and mask logits of three predictions (final, two auxiliary)
    leaves = [torch.randn(3, num_queries, num_classes + 1) if i % 2 == 0 else torch.randn(3, num_queries, 6, 7)
              for i in range(6)]
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    results = []
    for official in (True, False):
        inputs = [t.clone().requires_grad_() for t in leaves]
        preds = [{"pred_logits": inputs[i], "pred_masks": inputs[i + 1]} for i in (0, 2, 4)]
        outputs = {**preds[0], "aux_outputs": preds[1:]}
        generator = torch.Generator().manual_seed(seed)
        if official:
            losses = _official_criterion(outputs, targets, num_classes, 0.1, num_points, 3.0, importance,
                                         (2.0, 5.0, 5.0), generator)
        else:
            losses = make_criterion(num_points=num_points, importance=importance)(outputs, targets, generator)
        sum(losses.values()).backward()
        results.append((losses, [t.grad for t in inputs]))
    (want, want_grads), (got, got_grads) = results
    assert got.keys() == want.keys() and len(got) == 9
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"{k} (seed {seed})")
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7, msg=f"gradient of input {i} (seed {seed})")


def test_build_criterion_is_the_models_criterion():
    from m2f import build_criterion, build_model, get_kernels

    overrides = dict(num_points=64, dec_layers=3, class_weight=3.0)
    model = build_model("resnet18", num_classes=7, kernels="fused", backbone_width=8, hidden_dim=32,
                        dim_feedforward=32, enc_layers=1, **overrides)
    alone = build_criterion(7, kernels="fused", **overrides)
    assert alone.weight_dict == model.criterion.weight_dict and len(alone.weight_dict) == 3 * 4
    assert (alone.num_points, alone.eos_coef, alone.matcher.cost_class) == (64, 0.1, 3.0)
    assert get_kernels(alone) == "fused" and get_kernels(build_criterion(7)) == "reference"
    with pytest.raises(TypeError, match="build_criterion got unknown overrides"):
        build_criterion(7, num_point=3)

"""Bad input: one case per class of mistake, each a ValueError/TypeError naming the argument."""
from __future__ import annotations

import re

import pytest
import torch

import m2f_kernels as mk


def _attention(**change):
    b, h, q, n, d = 2, 3, 4, 6, 8
    args = dict(q=torch.randn(b, h, q, d), k=torch.randn(b, h, n, d), v=torch.randn(b, h, n, d),
                mask=torch.rand(b, q, n) < 0.5)
    args.update(change)
    return lambda: mk.masked_attention(args["q"], args["k"], args["v"], args["mask"], **args.get("kw", {}))


def _deform(**change):
    shapes = torch.tensor([[3, 4], [2, 2]])
    args = dict(value=torch.randn(2, 16, 2, 4), spatial_shapes=shapes, level_start_index=torch.tensor([0, 12]),
                sampling_locations=torch.rand(2, 5, 2, 2, 3, 2), attention_weights=torch.rand(2, 5, 2, 2, 3))
    args.update(change)
    return lambda: mk.ms_deform_attn(args["value"], args["spatial_shapes"], args["level_start_index"],
                                     args["sampling_locations"], args["attention_weights"])


def _uncertain(**change):
    args = dict(logits=torch.randn(2, 5, 8, 8), kw=dict(pred_index=(torch.tensor([0, 1, 1]), torch.tensor([4, 0, 2]))))
    args.update(change)
    return lambda: mk.uncertain_point_coords(args["logits"], 6, **args["kw"])


def _loss(**change):
    args = dict(pred=torch.randn(3, 8, 8), target=torch.rand(3, 16, 16) > 0.5, coords=torch.rand(3, 10, 2),
                num_masks=3.0, kw={})
    args.update(change)
    return lambda: mk.point_mask_loss(args["pred"], args["target"], args["coords"], args["num_masks"], **args["kw"])


CASES = {
    # masked_attention
    "q rank": (_attention(q=torch.randn(2, 4, 8)), ValueError, "q"),
    "k batch": (_attention(k=torch.randn(1, 3, 6, 8)), ValueError, "k"),
    "k heads": (_attention(k=torch.randn(2, 2, 6, 8)), ValueError, "k"),
    "k head dim": (_attention(k=torch.randn(2, 3, 6, 4)), ValueError, "k"),
    "v keys": (_attention(v=torch.randn(2, 3, 5, 8)), ValueError, "v"),
    "q integer": (_attention(q=torch.randint(0, 3, (2, 3, 4, 8))), TypeError, "q"),
    "qkv dtypes differ": (_attention(k=torch.randn(2, 3, 6, 8, dtype=torch.float64)), TypeError, "k"),
    "mask int dtype": (_attention(mask=torch.zeros(2, 4, 6, dtype=torch.int32)), TypeError, "mask"),
    "mask shape": (_attention(mask=torch.rand(2, 4, 5) < 0.5), ValueError, "mask"),
    "mask device": (_attention(mask=(torch.rand(2, 4, 6) < 0.5).to("meta")), ValueError, "mask"),
    "no keys": (_attention(k=torch.randn(2, 3, 0, 8), v=torch.randn(2, 3, 0, 8),
                           mask=torch.zeros(2, 4, 0, dtype=torch.bool)), ValueError, "k"),
    "q not tensor": (_attention(q=[1.0]), TypeError, "q"),
    "zero head dim": (_attention(q=torch.randn(2, 3, 4, 0), k=torch.randn(2, 3, 6, 0)), ValueError, "q"),
    "scale bool": (_attention(kw=dict(scale=True)), TypeError, "scale"),
    "scale tensor": (_attention(kw=dict(scale=torch.tensor(0.5))), TypeError, "scale"),
    # ms_deform_attn
    "value rank": (_deform(value=torch.randn(2, 16, 8)), ValueError, "value"),
    "value integer": (_deform(value=torch.zeros(2, 16, 2, 4, dtype=torch.int64)), TypeError, "value"),
    "float spatial_shapes": (_deform(spatial_shapes=torch.tensor([[3.0, 4.0], [2.0, 2.0]])), TypeError,
                             "spatial_shapes"),
    "spatial_shapes columns": (_deform(spatial_shapes=torch.tensor([[3, 4, 1], [2, 2, 1]])), ValueError,
                               "spatial_shapes"),
    "level_start_index wrong": (_deform(level_start_index=torch.tensor([0, 11])), ValueError, "level_start_index"),
    "level_start_index length": (_deform(level_start_index=torch.tensor([0])), ValueError, "level_start_index"),
    "S mismatch": (_deform(value=torch.randn(2, 15, 2, 4)), ValueError, "value"),
    "locations batch": (_deform(sampling_locations=torch.rand(1, 5, 2, 2, 3, 2)), ValueError, "sampling_locations"),
    "locations heads": (_deform(sampling_locations=torch.rand(2, 5, 3, 2, 3, 2)), ValueError, "sampling_locations"),
    "locations levels": (_deform(sampling_locations=torch.rand(2, 5, 2, 3, 3, 2)), ValueError, "sampling_locations"),
    "locations last dim": (_deform(sampling_locations=torch.rand(2, 5, 2, 2, 3, 3)), ValueError,
                           "sampling_locations"),
    "weights shape": (_deform(attention_weights=torch.rand(2, 5, 2, 2, 4)), ValueError, "attention_weights"),
    "weights device": (_deform(attention_weights=torch.rand(2, 5, 2, 2, 3, device="meta")), ValueError,
                       "attention_weights"),
    "spatial_shapes device": (_deform(spatial_shapes=torch.tensor([[3, 4], [2, 2]], device="meta")), ValueError,
                              "spatial_shapes"),
    # point_sample
    "point_sample coords": (lambda: mk.point_sample(torch.randn(2, 1, 4, 4), torch.rand(2, 5, 3)), ValueError,
                            "coords"),
    "point_sample N": (lambda: mk.point_sample(torch.randn(2, 1, 4, 4), torch.rand(3, 5, 2)), ValueError, "coords"),
    "point_sample input rank": (lambda: mk.point_sample(torch.randn(2, 4, 4), torch.rand(2, 5, 2)), ValueError,
                                "input"),
    "point_sample empty map": (lambda: mk.point_sample(torch.randn(2, 1, 0, 4), torch.rand(2, 5, 2)), ValueError,
                               "input"),
    # uncertain_point_coords
    "logits empty map": (lambda: mk.uncertain_point_coords(torch.randn(2, 4, 0), 4), ValueError, "logits"),
    "num_points < 1": (lambda: mk.uncertain_point_coords(torch.randn(2, 4, 4), 0), ValueError, "num_points"),
    "num_points float": (lambda: mk.uncertain_point_coords(torch.randn(2, 4, 4), 3.5), TypeError, "num_points"),
    "oversample < 1": (lambda: mk.uncertain_point_coords(torch.randn(2, 4, 4), 4, 0.5), ValueError,
                       "oversample_ratio"),
    "oversample NaN": (lambda: mk.uncertain_point_coords(torch.randn(2, 4, 4), 4, float("nan")), ValueError,
                       "oversample_ratio"),
    "oversample inf": (lambda: mk.uncertain_point_coords(torch.randn(2, 4, 4), 4, float("inf")), ValueError,
                       "oversample_ratio"),
    "importance > 1": (lambda: mk.uncertain_point_coords(torch.randn(2, 4, 4), 4, 3.0, 1.5), ValueError,
                       "importance_sample_ratio"),
    "importance < 0": (lambda: mk.uncertain_point_coords(torch.randn(2, 4, 4), 4, 3.0, -0.1), ValueError,
                       "importance_sample_ratio"),
    "uncertain 4-D logits without index": (_uncertain(kw={}), ValueError, "pred_index"),
    "uncertain 5-D logits": (_uncertain(logits=torch.randn(2, 5, 1, 8, 8)), ValueError, "logits"),
    "uncertain index with 3-D logits": (_uncertain(logits=torch.randn(3, 8, 8)), ValueError, "pred_index"),
    "uncertain index length": (_uncertain(kw=dict(pred_index=(torch.tensor([0, 1]), torch.tensor([0, 1, 2])))),
                               ValueError, "pred_index"),
    "uncertain index float": (_uncertain(kw=dict(pred_index=(torch.zeros(3), torch.zeros(3)))), TypeError,
                              "pred_index"),
    "uncertain index not a pair": (_uncertain(kw=dict(pred_index=torch.zeros(2, 3, dtype=torch.long))), TypeError,
                                   "pred_index"),
    "uncertain index rank": (_uncertain(kw=dict(pred_index=(torch.zeros(3, 1, dtype=torch.long),) * 2)), ValueError,
                             "pred_index"),
    "uncertain index device": (_uncertain(kw=dict(pred_index=(torch.tensor([0, 1, 1]),
                                                              torch.tensor([4, 0, 2], device="meta")))),
                               ValueError, "pred_index"),
    # point_mask_loss
    "loss target dtype": (_loss(target=torch.zeros(3, 16, 16, dtype=torch.int32)), TypeError, "target"),
    "loss pred N": (_loss(pred=torch.randn(2, 8, 8)), ValueError, "pred"),
    "loss coords N": (_loss(coords=torch.rand(2, 10, 2)), ValueError, "coords"),
    "loss no points": (_loss(coords=torch.rand(3, 0, 2)), ValueError, "coords"),
    "loss num_masks": (_loss(num_masks=0.0), ValueError, "num_masks"),
    "loss num_masks 1-D tensor": (_loss(num_masks=torch.tensor([3.0])), TypeError, "num_masks"),
    "loss num_masks integer tensor": (_loss(num_masks=torch.tensor(3)), TypeError, "num_masks"),
    "4-D pred without index": (_loss(pred=torch.randn(2, 5, 8, 8)), ValueError, "pred_index"),
    "index length": (_loss(pred=torch.randn(2, 5, 8, 8), kw=dict(pred_index=(torch.tensor([0, 1]),
                                                                            torch.tensor([0, 1])))),
                     ValueError, "pred_index"),
    "index float": (_loss(pred=torch.randn(2, 5, 8, 8), kw=dict(pred_index=(torch.zeros(3), torch.zeros(3)))),
                    TypeError, "pred_index"),
    "index with 3-D pred": (_loss(kw=dict(pred_index=(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2])))),
                            ValueError, "pred_index"),
    "loss empty target map": (_loss(target=torch.zeros(3, 0, 16, dtype=torch.bool)), ValueError, "target"),
    "loss empty pred map": (_loss(pred=torch.randn(3, 8, 0)), ValueError, "pred"),
    # pairwise_mask_cost
    "cost coords rank": (lambda: mk.pairwise_mask_cost(torch.randn(4, 8, 8), torch.rand(2, 8, 8) > 0.5,
                                                       torch.rand(1, 5, 2)), ValueError, "coords"),
    "cost pred integer": (lambda: mk.pairwise_mask_cost(torch.zeros(4, 8, 8, dtype=torch.long),
                                                        torch.rand(2, 8, 8) > 0.5, torch.rand(5, 2)), TypeError, "pred"),
    "assignment cost 1-D": (lambda: mk.linear_sum_assignment(torch.rand(5)), ValueError, "cost"),
    "assignment cost integer": (lambda: mk.linear_sum_assignment(torch.ones(2, 3, 3, dtype=torch.long)), TypeError,
                                "cost"),
    "assignment cost NaN": (lambda: mk.linear_sum_assignment(torch.tensor([[0.0, float("nan")]])), ValueError,
                            "cost"),
    "assignment num_targets per matrix": (lambda: mk.linear_sum_assignment(torch.rand(2, 3, 3), torch.tensor([3])),
                                          ValueError, "num_targets"),
    "assignment num_targets float": (lambda: mk.linear_sum_assignment(torch.rand(2, 3, 3), torch.ones(2)),
                                     TypeError, "num_targets"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_names_the_argument(case):
    call, error, argument = CASES[case]
    with pytest.raises(error) as info:
        call()
    assert re.search(rf"\b{re.escape(argument)}\b", str(info.value)), f"message does not name {argument!r}: {info.value}"


def test_spatial_layout_is_read_once_per_pair_and_again_after_an_edit(monkeypatch):
    """A checked (spatial_shapes, level_start_index) pair is not read again (a host sync on
    the GPU), but an in-place edit, another start index or another S is checked anew."""
    shapes, starts = torch.tensor([[3, 4], [2, 2]]), torch.tensor([0, 12])
    value = torch.randn(2, 16, 2, 4)
    loc, weights = torch.rand(2, 5, 2, 2, 3, 2), torch.rand(2, 5, 2, 2, 3)
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or real_tolist(t))
    mk.ms_deform_attn(value, shapes, starts, loc, weights)
    first = len(reads)
    mk.ms_deform_attn(value, shapes, starts, loc, weights)
    assert first > 0 and len(reads) - first <= 1  # the reference backend's own read only
    shapes[0, 0] = 5  # in place: now inconsistent with starts and S
    with pytest.raises(ValueError, match="level_start_index"):
        mk.ms_deform_attn(value, shapes, starts, loc, weights)
    shapes[0, 0] = 3
    with pytest.raises(ValueError, match="level_start_index"):
        mk.ms_deform_attn(value, shapes, torch.tensor([0, 11]), loc, weights)
    with pytest.raises(ValueError, match="value"):
        mk.ms_deform_attn(torch.randn(2, 17, 2, 4), shapes, starts, loc, weights)


def test_a_new_level_start_index_is_checked_even_where_it_reuses_a_freed_ones_id():
    """A start index built per call is a new tensor that may take the id() of the last one
    (freed): it is checked all the same."""
    shapes, value = torch.tensor([[3, 4], [2, 2]]), torch.randn(1, 16, 2, 4)
    loc, weights = torch.rand(1, 3, 2, 2, 2, 2), torch.rand(1, 3, 2, 2, 2)

    def call(starts):
        return mk.ms_deform_attn(value, shapes, torch.tensor(starts), loc, weights, backend="reference")

    for _ in range(3):
        call([0, 12])
        with pytest.raises(ValueError, match="level_start_index"):
            call([0, 5])


@pytest.mark.parametrize("op", ["point_mask_loss", "uncertain_point_coords"])
def test_pred_index_out_of_range_is_an_error_naming_it(op):
    """A ValueError at once on the CPU (on a GPU: a device-side assert, as the check never syncs)."""
    pred, target, coords = torch.randn(2, 5, 8, 8), torch.rand(3, 16, 16) > 0.5, torch.rand(3, 10, 2)
    if op == "point_mask_loss":
        call = lambda index: mk.point_mask_loss(pred, target, coords, 3.0, pred_index=index)  # noqa: E731
    else:
        call = lambda index: mk.uncertain_point_coords(pred, 10, pred_index=index)  # noqa: E731
    with pytest.raises(ValueError, match=r"pred_index\[1\]"):
        call((torch.tensor([0, 1, 1]), torch.tensor([0, 5, 2])))
    with pytest.raises(ValueError, match=r"pred_index\[0\]"):
        call((torch.tensor([0, -1, 1]), torch.tensor([0, 1, 2])))
    with pytest.raises(ValueError, match=r"pred_index\[0\]"):
        call((torch.tensor([0, 2, 1], dtype=torch.int32), torch.tensor([0, 1, 2], dtype=torch.int32)))


def test_a_checked_index_is_checked_again_after_an_edit():
    pred, target, coords = torch.randn(2, 5, 8, 8), torch.rand(3, 16, 16) > 0.5, torch.rand(3, 10, 2)
    index = (torch.tensor([0, 1, 1]), torch.tensor([0, 4, 2]))
    mk.point_mask_loss(pred, target, coords, 3.0, pred_index=index)
    index[1][1] = 5  # in place: the cached check must not hide it
    with pytest.raises(ValueError, match=r"pred_index\[1\]"):
        mk.point_mask_loss(pred, target, coords, 3.0, pred_index=index)


_BAD_INDEX = {
    "missing": None,
    "not a pair": (torch.tensor([0, 1, 1]),),
    "float": (torch.zeros(3), torch.zeros(3)),
    "rank": (torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long)),
    "length": (torch.tensor([0, 1, 1]), torch.tensor([0, 1])),
}


@pytest.mark.parametrize("case", list(_BAD_INDEX))
def test_pred_index_errors_are_the_same_for_both_ops(case):
    """One validation helper: uncertain_point_coords rejects a bad pred_index exactly as
    point_mask_loss does (same type, same message up to the argument's name)."""
    pred, index = torch.randn(2, 5, 8, 8), _BAD_INDEX[case]
    target, coords = torch.rand(3, 16, 16) > 0.5, torch.rand(3, 10, 2)
    errors = []
    for call in (lambda: mk.point_mask_loss(pred, target, coords, 3.0, pred_index=index),
                 lambda: mk.uncertain_point_coords(pred, 10, pred_index=index)):
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        errors.append((type(info.value), str(info.value)))
    (loss_type, loss_msg), (unc_type, unc_msg) = errors
    assert loss_type is unc_type and "pred_index" in loss_msg
    normalised = loss_msg.replace("pred is", "logits is").replace("[B, Q, Hp, Wp]", "[B, Q, H, W]")
    assert unc_msg == normalised.replace("as target", "as pred_index[0]"), (loss_msg, unc_msg)

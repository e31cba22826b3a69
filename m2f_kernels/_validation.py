"""Input checks shared by the public ops. Each failure names the argument and what was expected.

Checks run once, in Python, before any kernel. They read shapes, dtypes and devices
only, except where noted (spatial_shapes / level_start_index values are small and
read on the host).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t, ndim: Optional[Sequence[int]] = None, shape_desc: str = "") -> None:
    """``t`` is a tensor with one of the ranks in ``ndim``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in ndim:
        want = " or ".join(f"{n}-D" for n in ndim)
        raise ValueError(f"{name} must be {want} {shape_desc}, got shape {tuple(t.shape)}")


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16 or float64), got {t.dtype}")


def check_same_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        got = ", ".join(f"{n}={t.dtype}" for n, t in zip(names, tensors))
        raise TypeError(f"{' and '.join(names)} must have the same dtype, got {got}")


def check_same_device(names: Sequence[str], tensors: Sequence[Optional[torch.Tensor]]) -> None:
    pairs = [(n, t) for n, t in zip(names, tensors) if t is not None]
    devices = {t.device for _, t in pairs}
    if len(devices) > 1:
        got = ", ".join(f"{n} on {t.device}" for n, t in pairs)
        raise ValueError(f"all tensors must be on one device, got {got}")


def check_dim(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name}.shape[{dim}] ({what}) must be {expected}, got shape {tuple(t.shape)}")


def check_spatial(name: str, t: torch.Tensor, shape_desc: str) -> None:
    """The last two dims (a map's H, W) are at least 1."""
    if t.shape[-1] < 1 or t.shape[-2] < 1:
        raise ValueError(f"{name} must have H, W >= 1 {shape_desc}, got shape {tuple(t.shape)}")


def check_coords(name: str, coords: torch.Tensor, ndim: int, shape_desc: str) -> None:
    check_tensor(name, coords, (ndim,), shape_desc)
    check_float(name, coords)
    if coords.shape[-1] != 2:
        raise ValueError(f"{name} must end in 2 (x, y) {shape_desc}, got shape {tuple(coords.shape)}")


# --- per-op checks --------------------------------------------------------------------------


def masked_attention(q, k, v, mask, scale) -> None:
    check_tensor("q", q, (4,), "[B, H, Q, D]")
    check_tensor("k", k, (4,), "[B, H, N, D]")
    check_tensor("v", v, (4,), "[B, H, N, Dv]")
    check_tensor("mask", mask, (3, 4), "[B, Q, N] or [B, H, Q, N]")
    check_float("q", q)
    if q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError(f"q and v need a head dim >= 1, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    check_same_dtype(("q", "k", "v"), (q, k, v))
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"mask must be bool (True = blocked) or floating mask logits, got {mask.dtype}")
    check_same_device(("q", "k", "v", "mask"), (q, k, v, mask))
    b, h, nq, d = q.shape
    n = k.shape[2]
    check_dim("k", k, 0, b, "batch, as q")
    check_dim("k", k, 1, h, "heads, as q")
    check_dim("k", k, 3, d, "head dim, as q")
    check_dim("v", v, 0, b, "batch, as q")
    check_dim("v", v, 1, h, "heads, as q")
    check_dim("v", v, 2, n, "keys, as k")
    if n < 1:
        raise ValueError(f"k must have at least one key (N >= 1), got shape {tuple(k.shape)}")
    expected = (b, nq, n) if mask.dim() == 3 else (b, h, nq, n)
    if tuple(mask.shape) != expected:
        form = "[B, Q, N]" if mask.dim() == 3 else "[B, H, Q, N]"
        raise ValueError(f"mask must be {form} = {expected} for these q, k, got shape {tuple(mask.shape)}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")


def spatial_layout(value, spatial_shapes, level_start_index) -> None:
    """value [B, S, H, D] against spatial_shapes [L, 2] and level_start_index [L] (host read)."""
    check_tensor("spatial_shapes", spatial_shapes, (2,), "[L, 2]")
    check_tensor("level_start_index", level_start_index, (1,), "[L]")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an integer tensor (int64 or int32), got {t.dtype}")
    if spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be [L, 2] (H_l, W_l), got shape {tuple(spatial_shapes.shape)}")
    num_levels = spatial_shapes.shape[0]
    if num_levels < 1:
        raise ValueError("spatial_shapes must describe at least one level")
    if level_start_index.shape[0] != num_levels:
        raise ValueError(
            f"level_start_index must have one entry per level ({num_levels}), got shape {tuple(level_start_index.shape)}"
        )
    if torch.compiler.is_compiling():
        return  # the value checks below read the tensors; eager calls make them
    # Reading CUDA tensors costs a host sync, so a pair already checked is not read again:
    # the stamp names the exact objects, their versions (in-place edits bump them) and S.
    # The pixel decoder passes one pair to all its layers: one check per forward, not six.
    stamp = (id(level_start_index), level_start_index._version, spatial_shapes._version, value.shape[1])
    if getattr(spatial_shapes, "_m2f_kernels_checked", None) == stamp:
        return
    shapes = spatial_shapes.tolist()
    if any(hh < 1 or ww < 1 for hh, ww in shapes):
        raise ValueError(f"spatial_shapes entries must be >= 1, got {shapes}")
    sizes = [hh * ww for hh, ww in shapes]
    starts = [sum(sizes[:i]) for i in range(num_levels)]
    if level_start_index.tolist() != starts:
        raise ValueError(
            f"level_start_index must be the running sum of H_l*W_l, {starts}, got {level_start_index.tolist()}"
        )
    if value.shape[1] != sum(sizes):
        raise ValueError(
            f"value.shape[1] (S) must equal sum of H_l*W_l over spatial_shapes = {sum(sizes)}, got shape {tuple(value.shape)}"
        )
    spatial_shapes._m2f_kernels_checked = stamp


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    check_tensor("value", value, (4,), "[B, S, H, D]")
    check_tensor("sampling_locations", sampling_locations, (6,), "[B, Lq, H, L, P, 2]")
    check_tensor("attention_weights", attention_weights, (5,), "[B, Lq, H, L, P]")
    check_float("value", value)
    check_float("sampling_locations", sampling_locations)
    check_float("attention_weights", attention_weights)
    check_same_device(("value", "sampling_locations", "attention_weights"),
                      (value, sampling_locations, attention_weights))
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if isinstance(t, torch.Tensor) and t.device not in (value.device, torch.device("cpu")):
            raise ValueError(f"{name} must be on the CPU or on value's device ({value.device}), got {t.device}")
    spatial_layout(value, spatial_shapes, level_start_index)
    b, _, h, _ = value.shape
    num_levels = spatial_shapes.shape[0]
    loc = sampling_locations
    if loc.shape[-1] != 2:
        raise ValueError(f"sampling_locations must end in 2 (x, y) [B, Lq, H, L, P, 2], got shape {tuple(loc.shape)}")
    check_dim("sampling_locations", loc, 0, b, "batch, as value")
    check_dim("sampling_locations", loc, 2, h, "heads, as value")
    check_dim("sampling_locations", loc, 3, num_levels, "levels, as spatial_shapes")
    if loc.shape[4] < 1:
        raise ValueError(f"sampling_locations must have at least one point per level, got shape {tuple(loc.shape)}")
    if tuple(attention_weights.shape) != tuple(loc.shape[:5]):
        raise ValueError(
            f"attention_weights must be [B, Lq, H, L, P] = {tuple(loc.shape[:5])} to match sampling_locations, "
            f"got shape {tuple(attention_weights.shape)}"
        )


def point_sample(input, coords) -> None:
    check_tensor("input", input, (4,), "[N, C, H, W]")
    check_float("input", input)
    check_spatial("input", input, "[N, C, H, W]")
    check_coords("coords", coords, 3, "[N, P, 2]")
    check_same_device(("input", "coords"), (input, coords))
    check_dim("coords", coords, 0, input.shape[0], "N, as input")


def check_pred_index(pred_name: str, pred: torch.Tensor, pred_index, form: str,
                     others: Sequence[tuple] = (), n: Optional[int] = None, n_what: str = "") -> int:
    """``pred`` is 3-D [N, ...] without ``pred_index``, or 4-D ``form`` ([B, Q, H, W]) with
    ``pred_index`` = (batch_index [N], query_index [N]) integer tensors whose values index
    its first two dims; ``pred``, the index tensors and ``others`` ((name, tensor) pairs) share
    one device. ``n`` is the number of matched masks when another argument fixes it
    (``n_what`` names it, "as target"); None: pred_index[0]'s length (4-D) or pred.shape[0].
    Returns N.
    """
    names, tensors = [name for name, _ in others], [t for _, t in others]
    if pred.dim() == 4:
        if pred_index is None:
            raise ValueError(f"pred_index=(batch_index, query_index) is required when {pred_name} is 4-D {form}")
        if not isinstance(pred_index, (tuple, list)) or len(pred_index) != 2:
            raise TypeError("pred_index must be a pair (batch_index, query_index) of int64 tensors")
        for name, idx in zip(("pred_index[0]", "pred_index[1]"), pred_index):
            check_tensor(name, idx, (1,), "[N]")
            if idx.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"{name} must be an integer tensor, got {idx.dtype}")
            if n is None:  # the first index tensor fixes N
                n, n_what = idx.shape[0], "as pred_index[0]"
            check_dim(name, idx, 0, n, f"matched masks, {n_what}")
        check_same_device((pred_name, *names, "pred_index[0]", "pred_index[1]"), (pred, *tensors, *pred_index))
        # index values: checked on the device without a host sync (a CUDA error on the next
        # sync, a RuntimeError at once on the CPU), so no kernel reads outside pred
        for name, idx, size in zip(("pred_index[0]", "pred_index[1]"), pred_index, pred.shape[:2]):
            if idx.numel():
                torch._assert_async(((idx >= 0) & (idx < size)).all(),
                                    f"{name} values must be in [0, {size}) ({pred_name} is {tuple(pred.shape)})")
        return n
    if pred_index is not None:
        raise ValueError(f"pred_index is only accepted with a 4-D {pred_name} {form}")
    if n is not None:
        check_dim(pred_name, pred, 0, n, f"matched masks, {n_what}")
    check_same_device((pred_name, *names), (pred, *tensors))
    return pred.shape[0]


def uncertain_point_coords(logits, num_points, oversample_ratio, importance_sample_ratio, pred_index=None) -> int:
    """Returns N, the number of masks to sample points for."""
    check_tensor("logits", logits, (3, 4), "[N, H, W] or [B, Q, H, W] with pred_index")
    check_float("logits", logits)
    check_spatial("logits", logits, "[N, H, W] or [B, Q, H, W]")
    if isinstance(num_points, bool) or not isinstance(num_points, int):
        raise TypeError(f"num_points must be an int, got {type(num_points).__name__}")
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if not isinstance(oversample_ratio, (int, float)) or oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be a number >= 1, got {oversample_ratio!r}")
    if not isinstance(importance_sample_ratio, (int, float)) or not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio!r}")
    return check_pred_index("logits", logits, pred_index, "[B, Q, H, W]")


def point_mask_loss(pred, target, coords, num_masks, pred_index) -> None:
    check_tensor("pred", pred, (3, 4), "[N, Hp, Wp] or [B, Q, Hp, Wp] with pred_index")
    check_float("pred", pred)
    check_spatial("pred", pred, "[N, Hp, Wp] or [B, Q, Hp, Wp]")
    check_tensor("target", target, (3,), "[N, Ht, Wt]")
    check_spatial("target", target, "[N, Ht, Wt]")
    if target.dtype not in (torch.bool, torch.uint8) and not target.is_floating_point():
        raise TypeError(f"target must be bool, uint8 or floating, got {target.dtype}")
    check_coords("coords", coords, 3, "[N, P, 2]")
    n = target.shape[0]
    check_pred_index("pred", pred, pred_index, "[B, Q, Hp, Wp]", (("target", target), ("coords", coords)),
                     n, "as target")
    check_dim("coords", coords, 0, n, "matched masks, as target")
    if coords.shape[1] < 1:
        raise ValueError(f"coords must hold at least one point per mask [N, P >= 1, 2], got shape {tuple(coords.shape)}")
    if isinstance(num_masks, torch.Tensor):
        raise TypeError("num_masks must be a Python number (call .item() once per step), got a tensor")
    if not isinstance(num_masks, (int, float)) or not num_masks > 0:
        raise ValueError(f"num_masks must be a number > 0, got {num_masks!r}")


def pairwise_mask_cost(pred, target, coords) -> None:
    check_tensor("pred", pred, (3,), "[Q, Hp, Wp]")
    check_float("pred", pred)
    check_spatial("pred", pred, "[Q, Hp, Wp]")
    check_tensor("target", target, (3,), "[T, Ht, Wt]")
    check_spatial("target", target, "[T, Ht, Wt]")
    if target.dtype not in (torch.bool, torch.uint8) and not target.is_floating_point():
        raise TypeError(f"target must be bool, uint8 or floating, got {target.dtype}")
    check_coords("coords", coords, 2, "[P, 2]")
    if coords.shape[0] < 1:
        raise ValueError(f"coords must hold at least one point [P >= 1, 2], got shape {tuple(coords.shape)}")
    check_same_device(("pred", "target", "coords"), (pred, target, coords))

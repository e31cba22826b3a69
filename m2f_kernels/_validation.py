"""Input checks the ops' own checks are built from. Each failure names the argument and
what was expected.

Each op checks its arguments in its module (``m2f_kernels/ops/<op>.py``), once, in Python,
before any kernel. Checks read shapes, dtypes and devices only, except where noted
(spatial_shapes / level_start_index values are small and read on the host).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _version(t: torch.Tensor) -> int:
    """The in-place edit counter (an inference tensor has none: it counts as unedited)."""
    return 0 if t.is_inference() else t._version


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


CHECK_FINITE_ENV = "M2F_KERNELS_CHECK_FINITE"


def check_finite(named: Sequence[tuple], allow_posinf: Sequence[str] = (), allow_inf: Sequence[str] = ()) -> None:
    """With ``M2F_KERNELS_CHECK_FINITE=1``: ``ValueError`` naming the first of ``named``
    ((name, value) pairs: floating tensors and Python floats are read, anything else is
    skipped) that holds NaN or an infinity (+inf allowed in the ``allow_posinf`` names, both
    infinities in the ``allow_inf`` names). One host sync per call, so opt-in; off (the
    default), the cost is one environment read. Eager calls only: under ``torch.compile``
    nothing is read."""
    if torch.compiler.is_compiling() or os.environ.get(CHECK_FINITE_ENV, "0") in ("", "0"):
        return
    names, flags = [], []
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            if name in allow_inf:
                bad = t.isnan()
            elif name in allow_posinf:
                bad = t.isnan() | (t == float("-inf"))
            else:
                bad = ~t.isfinite()
            names.append(name)
            flags.append(bad.any())
        elif isinstance(t, float) and not math.isfinite(t):
            names.append(name)
            flags.append(torch.tensor(True))
    if flags:
        device = flags[0].device
        for name, bad in zip(names, torch.stack([f.to(device) for f in flags]).tolist()):
            if bad:
                what = "NaN" if name in allow_inf else "NaN or -inf" if name in allow_posinf else "NaN or inf"
                raise ValueError(f"{name} holds {what} (the check of {CHECK_FINITE_ENV}=1)")


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
    # Both tensors carry the stamp: a new tensor may reuse the id() of a freed one, and it
    # has no stamp.
    stamp = (id(spatial_shapes), id(level_start_index), _version(spatial_shapes), _version(level_start_index),
             value.shape[1])
    if (getattr(spatial_shapes, "_m2f_kernels_checked", None) == stamp
            and getattr(level_start_index, "_m2f_kernels_checked", None) == stamp):
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
    spatial_shapes._m2f_kernels_checked = level_start_index._m2f_kernels_checked = stamp
    remember_level_shapes(spatial_shapes, shapes)


def remember_level_shapes(spatial_shapes: torch.Tensor, shapes) -> None:
    """Attach the [(H_l, W_l)] Python ints that ``spatial_shapes`` holds, for
    :func:`level_shapes`: read once by :func:`spatial_layout`, or given by whoever built the
    tensor from ints (under ``torch.export`` the tensor has no values to read)."""
    spatial_shapes._m2f_kernels_shapes = (_version(spatial_shapes), [(int(hh), int(ww)) for hh, ww in shapes])


def level_shapes(spatial_shapes: torch.Tensor) -> list:
    """[(H_l, W_l)] as Python ints: the list remembered for this tensor (unedited since),
    else read now (a host sync for a device tensor)."""
    known = getattr(spatial_shapes, "_m2f_kernels_shapes", None)
    if known is not None and known[0] == _version(spatial_shapes):
        return known[1]
    return [(int(hh), int(ww)) for hh, ww in spatial_shapes.tolist()]


def check_count_values(name: str, counts: torch.Tensor, limit: int, what: str) -> None:
    """``counts`` values in [0, limit], checked as :func:`_check_index_values` checks indices:
    ValueError at once on the CPU, a device-side assert on a GPU (no host sync)."""
    _check_index_values(name, counts, limit + 1, what, f"{name} values must be in [0, {limit}] {what}")


def _check_index_values(name: str, idx: torch.Tensor, size: int, what: str, message: Optional[str] = None) -> None:
    """``idx`` values in [0, size), checked on the device without a host sync, so no kernel
    reads out of bounds: on a GPU a bad value is a device-side assert (a CUDA error at the next
    sync), on the CPU a ValueError at once. A tensor checked against ``size`` is not checked
    again until it is edited in place (the criterion passes one index to two ops)."""
    if not idx.numel() or torch.compiler.is_compiling():
        return
    stamp = (_version(idx), size)
    if getattr(idx, "_m2f_kernels_checked", None) == stamp:
        return
    message = message or f"{name} values must be in [0, {size}) {what}"
    try:
        torch._assert_async(((idx >= 0) & (idx < size)).all(), message)
    except RuntimeError:  # raised at once only where the check ran synchronously (the CPU)
        raise ValueError(message) from None
    idx._m2f_kernels_checked = stamp


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
            raise TypeError("pred_index must be a pair (batch_index, query_index) of int64 or int32 tensors")
        for name, idx in zip(("pred_index[0]", "pred_index[1]"), pred_index):
            check_tensor(name, idx, (1,), "[N]")
            if idx.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"{name} must be an integer tensor, got {idx.dtype}")
            if n is None:  # the first index tensor fixes N
                n, n_what = idx.shape[0], "as pred_index[0]"
            check_dim(name, idx, 0, n, f"matched masks, {n_what}")
        check_same_device((pred_name, *names, "pred_index[0]", "pred_index[1]"), (pred, *tensors, *pred_index))
        for name, idx, size in zip(("pred_index[0]", "pred_index[1]"), pred_index, pred.shape[:2]):
            _check_index_values(name, idx, size, f"({pred_name} is {tuple(pred.shape)})")
        return n
    if pred_index is not None:
        raise ValueError(f"pred_index is only accepted with a 4-D {pred_name} {form}")
    if n is not None:
        check_dim(pred_name, pred, 0, n, f"matched masks, {n_what}")
    check_same_device((pred_name, *names), (pred, *tensors))
    return pred.shape[0]



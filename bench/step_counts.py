"""Counting what a training step costs the host: host syncs and device ops, on any device.

A GPU step is bound by launches and syncs long before its kernels (issue counts: ~7,400
device ops and ~50 syncs per fused step). Both can be counted on the CPU:

- :class:`HostSyncs` counts every operation that makes the host wait for the device on a GPU:
  the aten ops that read device data on the host (``_local_scalar_dense`` behind
  ``.item()`` / ``bool(t)``, ``nonzero``, ``unique``, ``masked_select``, boolean indexing,
  ``repeat_interleave`` with tensor repeats, device-to-host copies), plus the Python calls
  that do so without an aten op on a CPU tensor (``Tensor.item / tolist / numpy / cpu``) and
  calls of scipy's ``linear_sum_assignment``. On the CPU nothing actually waits; the count is
  what a GPU would pay.
- :class:`DeviceOps` counts non-view aten ops (what becomes a kernel launch on a GPU;
  views, metadata-only ops and profiler markers launch nothing). Custom ops count by the
  aten ops they run on this device (the reference backend on the CPU).

    with HostSyncs() as syncs, DeviceOps() as ops:
        step()
    print(syncs.total, syncs.where, ops.total)
"""
from __future__ import annotations

import collections
import contextlib
import traceback
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = {
    "aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_static", "aten::unique_consecutive",
    "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::masked_select", "aten::item",
}
# ops that sync only with some arguments
_BOOL_INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}
_PATCHED_METHODS = ("item", "tolist", "numpy", "cpu")


def _is_d2h_copy(name: str, args, kwargs) -> bool:
    if name not in ("aten::_to_copy", "aten::copy_"):
        return False
    if name == "aten::copy_":
        dst, src = args[0], args[1]
        return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst.device.type == "cpu"
    device = kwargs.get("device")
    return device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (indices or ()))


def _syncs(name: str, args, kwargs) -> bool:
    if name in _SYNC_OPS:
        return True
    if name in _BOOL_INDEX_OPS:
        return _has_bool_index(args)
    if name == "aten::repeat_interleave":
        return isinstance(args[0], torch.Tensor) and (len(args) < 2 or isinstance(args[1], torch.Tensor)) \
            and kwargs.get("output_size") is None
    return _is_d2h_copy(name, args, kwargs)


def _caller() -> str:
    """file:line of the first frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("step_counts.py"):
            parts = frame.filename.replace("\\", "/").split("/")
            return f"{'/'.join(parts[-2:])}:{frame.lineno}"
    return "?"


class HostSyncs(TorchDispatchMode):
    """Counts host syncs (see the module docstring); ``where`` maps 'what at file:line' -> count.

    :meth:`paused` excludes a region (e.g. a reference backend allowed to sync).
    """

    def __init__(self) -> None:
        super().__init__()
        self.where: collections.Counter = collections.Counter()
        self._paused = 0
        self._in_method = 0
        self._patches: list = []

    @property
    def total(self) -> int:
        return sum(self.where.values())

    def _record(self, what: str) -> None:
        if not self._paused:
            self.where[f"{what} at {_caller()}"] += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._in_method and _syncs(func._schema.name, args, kwargs):
            self._record(func._schema.name)
        return func(*args, **kwargs)

    def _patch_method(self, name: str) -> None:
        original = getattr(torch.Tensor, name)
        counter = self

        def patched(tensor, *args, **kwargs):
            counter._record(f"Tensor.{name}")
            counter._in_method += 1  # the aten ops behind it are this one sync
            try:
                return original(tensor, *args, **kwargs)
            finally:
                counter._in_method -= 1

        setattr(torch.Tensor, name, patched)
        self._patches.append((torch.Tensor, name, original))

    def _patch_scipy(self) -> None:
        try:
            import scipy.optimize as optimize
        except ImportError:
            return
        counter = self
        for module in _modules_holding(optimize.linear_sum_assignment):
            original = module.linear_sum_assignment

            def patched(*args, _original=original, **kwargs):
                counter._record("scipy linear_sum_assignment")
                return _original(*args, **kwargs)

            module.linear_sum_assignment = patched
            self._patches.append((module, "linear_sum_assignment", original))

    def __enter__(self):
        for name in _PATCHED_METHODS:
            self._patch_method(name)
        self._patch_scipy()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for owner, name, original in reversed(self._patches):
                setattr(owner, name, original)
            self._patches.clear()


def _modules_holding(fn) -> list:
    """The imported modules that hold ``fn`` under its name (``from x import fn`` copies it)."""
    import sys

    name = fn.__name__
    # the module dicts, not getattr: a lazy module (transformers) would import on a miss
    return [m for m in list(sys.modules.values()) if getattr(m, "__dict__", {}).get(name) is fn]


class DeviceOps(TorchDispatchMode):
    """Counts non-view aten ops (kernel launches on a GPU), by op name in ``ops``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _is_view(func):
            self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


# ops that allocate or relabel memory without a kernel
_METADATA_ONLY = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
                  "aten::new_empty_strided", "aten::detach", "aten::lift_fresh", "aten::_unsafe_view"}


def _is_view(func) -> bool:
    """No kernel: a view, a metadata-only op, or not an aten op (profiler markers)."""
    if func._schema.name in _METADATA_ONLY or not func._schema.name.startswith("aten::"):
        return True
    return torch.Tag.view_copy not in func.tags and any(
        r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)

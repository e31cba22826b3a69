"""How every Triton kernel of this backend gets its launch configuration.

One pattern for all ops:

- Each kernel family has a frozen dataclass of its tunables (tile sizes, warps, stages,
  ...): ``MaskedAttentionConfig``, ``PointConfig`` (point_sample, the uncertainty, the
  mask loss), ``PairwiseConfig`` (the matcher cost), ``MSDeformAttnConfig``. It lives in
  its op's module, next to the kernels that read it. Sizes that follow from the inputs
  alone (a head dim padded to a power of two) are not tunables: the launch derives them.
- Each op has one function ``<op>_config(...)`` that picks the config from the inputs'
  shapes, dtype and device. It is the only place the defaults live (they were measured
  on a GPU; the notes in bench/notes/ say how).
- Every backend entry point takes ``config=`` (keyword only): ``None`` (what the
  dispatcher passes) asks ``<op>_config``; a sweep or a test passes its own, and the
  launch uses it as is.

Any valid config gives the same result (up to the fp32 summation order where a config
regroups sums); it only changes the speed. The host helpers below are shared by the
choosers and launches: the integer ones avoid triton.cdiv / next_power_of_2, constexpr
functions whose Python call path costs microseconds on every launch.
"""
from __future__ import annotations

import functools
import os

import torch


def chosen(config, cls: type, choose, *inputs):
    """``config`` if given (checked to be a ``cls``), else ``choose(*inputs)``."""
    if config is None:
        return choose(*inputs)
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__} (or None), got {type(config).__name__}")
    return config


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on the CPU, in numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``. CPU tensors (the interpreter, and the
    ahead-of-time dumps of bench/tools/) get a small pretend GPU of 4, so CPU tests
    exercise the paths that split work over programs."""
    if device.type != "cuda" or interpreting():
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())

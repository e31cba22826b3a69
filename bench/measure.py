"""Measurement primitives: GPU timing on a virtual clock, peak memory, copy bandwidth, NVML.

Nothing here touches CUDA at import time; the GPU functions are only called on a GPU.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Optional

import torch


class VirtualClock:
    """A clock that moves only when a measured call advances it (seconds).

    pytest-benchmark times a call as ``timer()`` after minus ``timer()`` before. With
    :func:`gpu_clock` as its timer and a target that advances the clock by the CUDA-event
    time it measured, pytest-benchmark's statistics are statistics of GPU time.
    """

    def __init__(self) -> None:
        self._now = 0.0

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


GPU_CLOCK = VirtualClock()


def gpu_clock() -> float:
    """The suite's pytest-benchmark timer (``@pytest.mark.benchmark(timer=gpu_clock)``)."""
    return GPU_CLOCK()


class CudaEventTimer:
    """Times one call on the GPU in milliseconds.

    Before each call it overwrites a buffer larger than L2 (outside the timed region), so
    no call finds its inputs in cache; the flush also puts work in the stream ahead of
    the call, so its launches are queued before the GPU reaches them (as in
    ``triton.testing.do_bench``). Then CUDA events bracket the call and the end event is
    waited for.
    """

    def __init__(self, device: torch.device, flush_bytes: int = 256 << 20) -> None:
        self.device = torch.device(device)
        self._flush = torch.empty(flush_bytes, dtype=torch.int8, device=self.device) if flush_bytes else None
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self._flush is not None:
            self._flush.zero_()
        self._start.record()
        result = fn()
        self._end.record()
        self._end.synchronize()
        del result
        return self._start.elapsed_time(self._end)


class WallTimer:
    """Times one call by the wall clock (ms): the CPU stand-in used by the unit tests."""

    def __call__(self, fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


@contextlib.contextmanager
def no_tf32():
    """fp32 matmuls and convolutions without TF32 for the duration (exact comparisons)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def summarize(samples_ms: list) -> dict:
    """Median, min, mean, stdev, 20th/80th percentiles and count of timings in ms."""
    ordered = sorted(samples_ms)
    n = len(ordered)

    def pct(p: float) -> float:
        return ordered[min(n - 1, max(0, round(p * (n - 1))))]

    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "mean": statistics.fmean(ordered),
        "stdev": statistics.stdev(ordered) if n > 1 else 0.0,
        "p20": pct(0.2),
        "p80": pct(0.8),
        "rounds": n,
    }


def allocated(device: torch.device) -> Optional[int]:
    """Bytes the caching allocator has handed out on ``device`` (None off the GPU)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple:
    """Run ``fn`` once; return (its result, {'call_base_bytes', 'peak_bytes'} or None off the GPU).

    call_base is what was allocated when the call started (its inputs, and for a
    backward its saved forward state); peak is torch.cuda.max_memory_allocated during
    the call, outputs included.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return result, {"call_base_bytes": int(base), "peak_bytes": int(peak)}


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written, median of reps)."""
    device = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    timer = CudaEventTimer(device, flush_bytes=0) if device.type == "cuda" else WallTimer()
    times = [timer(lambda: dst.copy_(src)) for _ in range(reps)]
    del src, dst
    return 2 * nbytes / (statistics.median(times) / 1e3)


class Nvml:
    """The device-level view from NVML (nvidia-ml-py): used memory and clocks.

    Every method returns None (and ``error`` says why) when NVML cannot be used.
    """

    def __init__(self, device: torch.device) -> None:
        self.error: Optional[str] = None
        self._nv = None
        self._handle = None
        if torch.device(device).type != "cuda":
            self.error = f"NVML not used: {device} is not a CUDA device"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nv = pynvml
            self._handle = self._find_handle(pynvml, torch.device(device))
        except Exception as exc:  # no driver, no library, no device: report, do not fail
            self.error = f"NVML unavailable: {exc!r}"
            self._nv = None

    @staticmethod
    def _find_handle(nv, device: torch.device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:
            text = str(uuid)
            for candidate in (text, f"GPU-{text}"):
                try:
                    return nv.nvmlDeviceGetHandleByUUID(candidate)
                except Exception:
                    continue
        return nv.nvmlDeviceGetHandleByIndex(index)

    def info(self) -> Optional[dict]:
        """Static facts: driver, name, total memory, max SM clock, power limit."""
        if self._nv is None:
            return None
        nv, h = self._nv, self._handle
        return {
            "driver": _text(nv.nvmlSystemGetDriverVersion()),
            "name": _text(nv.nvmlDeviceGetName(h)),
            "memory_total_bytes": int(nv.nvmlDeviceGetMemoryInfo(h).total),
            "sm_clock_max_mhz": _try(lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)),
            "mem_clock_max_mhz": _try(lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM)),
            "power_limit_w": _try(lambda: nv.nvmlDeviceGetPowerManagementLimit(h) / 1000.0),
        }

    def snapshot(self) -> Optional[dict]:
        """Now: device memory used (all processes), SM and memory clocks, temperature, power."""
        if self._nv is None:
            return None
        nv, h = self._nv, self._handle
        return {
            "used_bytes": int(nv.nvmlDeviceGetMemoryInfo(h).used),
            "sm_clock_mhz": _try(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
            "mem_clock_mhz": _try(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)),
            "temperature_c": _try(lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            "power_w": _try(lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
        }


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _try(read: Callable[[], Any]):
    try:
        return read()
    except Exception:
        return None

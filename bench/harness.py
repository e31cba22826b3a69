"""The one harness behind every benchmark: cases, providers, and running a case.

A case is (op, provider, shape, dtype, mode). An op's benchmark file declares an
:class:`OpSpec` (the table): how to build inputs for a shape, which providers exist,
which shape/dtype/mode blocks to run, and the HBM floor of the op. A provider is a
function registered on the spec that takes built :class:`Inputs` and returns a
zero-argument closure computing the forward (or, for modes 'train' / 'infer', a whole
step); the
harness derives the fwd, bwd and fwd+bwd calls from it, rotates input sets, times,
measures memory, checks the output against a baseline provider and returns one JSON-able
record. Importable and runnable on the CPU (with :class:`measure.WallTimer`); the CUDA
timing functions are only called on a GPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import math
import random
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from . import measure

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GRAD_MODES = ("fwd", "bwd", "fwd+bwd")  # the harness derives these from a forward closure
STEP_MODES = ("train", "infer")  # the provider's closure is the whole step; run as is
MODES = GRAD_MODES + STEP_MODES
SCOPES = ("quick", "default", "full")
STATUSES = ("ok", "skipped", "oom", "error")

# Relative-error ceilings of the sanity check against the baseline provider (a timing of a
# wrong computation is worthless). Looser than the correctness suite's: peers (SDPA,
# FlexAttention, the original CUDA op) legitimately round differently.
CHECK_TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2, "fp16": 1e-2}


class CaseSkipped(Exception):
    """The case cannot run here; ``status`` is 'skipped' or 'oom' and the message says why."""

    def __init__(self, reason: str, status: str = "skipped") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Unavailable(CaseSkipped):
    """A provider cannot run here (not importable, backend not built, dtype unsupported...)."""


class CaseError(RuntimeError):
    """A case failed; the message is the formatted traceback of the original error."""


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _frozen(value):
    if isinstance(value, (tuple, list)):
        return tuple(_frozen(v) for v in value)
    return value


@dataclass(frozen=True)
class Case:
    """One benchmark case. ``shape`` is a tuple of (name, value) pairs (hashable)."""

    op: str
    provider: str
    shape: tuple
    dtype: str
    mode: str
    id_keys: Optional[tuple] = field(default=None, compare=False)

    @classmethod
    def make(cls, op: str, provider: str, shape: dict, dtype: str, mode: str,
             id_keys: Optional[Sequence[str]] = None) -> "Case":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        items = tuple((k, _frozen(v)) for k, v in shape.items())
        return cls(op, provider, items, dtype, mode, None if id_keys is None else tuple(id_keys))

    @property
    def params(self) -> dict:
        return dict(self.shape)

    @property
    def shape_json(self) -> dict:
        return {k: _jsonable(v) for k, v in self.shape}

    @property
    def shape_label(self) -> str:
        keys = self.id_keys if self.id_keys is not None else [k for k, _ in self.shape]
        params = self.params
        return "-".join(f"{k}{params[k]}" if not isinstance(params[k], str) else params[k] for k in keys)

    @property
    def id(self) -> str:
        """pytest id: provider-shape-dtype-mode."""
        return "-".join(p for p in (self.provider, self.shape_label, self.dtype, self.mode) if p)

    @property
    def group(self) -> str:
        """The pytest-benchmark group: providers of one (op, shape, dtype, mode) side by side."""
        return f"{self.op} {self.shape_label} {self.dtype} {self.mode}"

    @property
    def key(self) -> str:
        """Stable identity across result files (used by compare)."""
        return case_key(self.op, self.provider, self.shape_json, self.dtype, self.mode)


def case_key(op: str, provider: str, shape: dict, dtype: str, mode: str) -> str:
    return f"{op}|{provider}|{json.dumps(shape, sort_keys=True)}|{dtype}|{mode}"


@dataclass
class Inputs:
    """One input set: tensors by name, the names backward differentiates, and other facts."""

    tensors: dict
    grad: tuple = ()
    meta: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def grad_tensors(self) -> list:
        return [self.tensors[name] for name in self.grad]


@dataclass
class Provider:
    """An implementation of an op. ``build(inputs) -> closure`` runs outside the timed region.

    requires: () -> reason or None, a cheap import check made before inputs are built.
    dtypes: what it supports (other dtypes are listed as skipped cases with the reason).
    modes: the modes it is benchmarked in at all (no case is generated for the others).
    """

    name: str
    build: Callable[[Inputs], Callable[[], Any]]
    requires: Optional[Callable[[], Optional[str]]] = None
    dtypes: Optional[tuple] = None
    modes: Optional[tuple] = None
    note: str = ""

    def unavailable(self, case: Case) -> Optional[str]:
        if self.dtypes is not None and case.dtype not in self.dtypes:
            return f"{self.name} supports {', '.join(self.dtypes)} only"
        if self.modes is not None and case.mode not in self.modes:
            return f"{self.name} is benchmarked in {', '.join(self.modes)} only"
        return _requirement(self.requires) if self.requires is not None else None


@functools.lru_cache(maxsize=None)
def _requirement(requires: Callable[[], Optional[str]]) -> Optional[str]:
    return requires()


@dataclass(frozen=True)
class Block:
    """A grid of cases: every shape x dtype x mode, for the listed providers (None: all).

    scope: the smallest run scope that includes the block ('default' blocks also run in
    'full'; 'full' blocks only there). A 'quick' run keeps ``quick_shapes`` (default: the
    first shape; ``()`` leaves the block out) and the first dtype, all modes.
    """

    shapes: tuple
    dtypes: tuple
    modes: tuple
    providers: Optional[tuple] = None
    scope: str = "default"
    quick_shapes: Optional[tuple] = None

    def grid(self, scope: str) -> tuple:
        """(shapes, dtypes) this block runs in ``scope``."""
        if scope == "full":
            return self.shapes, self.dtypes
        if self.scope == "full":
            return (), ()
        if scope == "default":
            return self.shapes, self.dtypes
        shapes = self.quick_shapes if self.quick_shapes is not None else self.shapes[:1]
        return shapes, self.dtypes[:1]


@dataclass(frozen=True)
class Settings:
    """How long to measure. budget_ms: timed GPU time aimed at per case (sets the rounds)."""

    budget_ms: float = 100.0
    min_rounds: int = 5
    max_rounds: int = 30
    warmup_rounds: int = 2

    def rounds_for(self, estimate_ms: float) -> int:
        wanted = self.budget_ms / max(estimate_ms, 1e-3)
        return int(min(self.max_rounds, max(self.min_rounds, math.ceil(wanted))))


SETTINGS = {
    "quick": Settings(budget_ms=30.0, min_rounds=3, max_rounds=10, warmup_rounds=1),
    "default": Settings(),
    "full": Settings(budget_ms=400.0, min_rounds=10, max_rounds=100, warmup_rounds=3),
}


@dataclass
class OpSpec:
    """An op's benchmark table.

    make_inputs(shape: dict, dtype: torch.dtype, device) -> Inputs builds one fresh
    random input set. floor_bytes(inputs, mode) -> int is the HBM traffic the op cannot
    avoid (None: no floor). check_against: baseline providers, first available wins;
    check_tolerance: the relative error allowed per dtype (default CHECK_TOLERANCE).
    settings: overrides of :class:`Settings` fields for this op (e.g. fewer model steps).
    """

    name: str
    make_inputs: Callable[[dict, torch.dtype, torch.device], Inputs]
    blocks: list
    floor_bytes: Optional[Callable[[Inputs, str], int]] = None
    check_against: tuple = ()
    check_tolerance: Optional[dict] = None  # {dtype: tolerance} where CHECK_TOLERANCE is not the bar
    input_sets: int = 3
    flush_l2: bool = True
    id_keys: Optional[tuple] = None
    settings: dict = field(default_factory=dict)
    providers: dict = field(default_factory=dict)

    def provider(self, name: str, *, requires=None, dtypes=None, modes=None, note: str = ""):
        """Decorator registering ``build`` as provider ``name`` of this op."""

        def register(build):
            if name in self.providers:
                raise ValueError(f"{self.name}: provider {name!r} registered twice")
            doc = " ".join((build.__doc__ or "").split())
            self.providers[name] = Provider(name, build, requires, dtypes, modes, note or doc)
            return build

        return register

    def cases(self, scope: str = "default") -> list:
        """Every case of the table for ``scope`` ('quick', 'default' or 'full'), in run order."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        out = []
        for block in self.blocks:
            names = block.providers if block.providers is not None else tuple(self.providers)
            unknown = [n for n in names if n not in self.providers]
            if unknown:
                raise ValueError(f"{self.name}: block names unknown providers {unknown}")
            shapes, dtypes = block.grid(scope)
            for shape in shapes:
                for dtype in dtypes:
                    for mode in block.modes:
                        for name in names:
                            modes = self.providers[name].modes
                            if modes is None or mode in modes:  # else: not meant for it, not a limitation
                                out.append(Case.make(self.name, name, shape, dtype, mode, self.id_keys))
        return out

    def settings_for(self, scope: str) -> Settings:
        return dataclasses.replace(SETTINGS[scope], **self.settings)


# ----------------------------------------------------------------------------- helpers


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def compulsory_bytes(mode: str, reads: int, writes: int, grads: int) -> int:
    """HBM bytes an op must move: inputs read once, outputs written once.

    The backward reads the inputs and the output gradient and writes the input
    gradients; fwd+bwd is both.
    """
    fwd = reads + writes
    bwd = reads + writes + grads
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def flat_tensors(value) -> list:
    """Every tensor in a (nested) tensor / tuple / list / dict output, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flat_tensors(v)]
    return []


def returned_bytes(output, inputs: "Inputs") -> int:
    """Bytes of the tensors a call returns that it allocated: its outputs, or in backward
    modes the input gradients. Storages the inputs own (a view returned as is) and storages
    seen twice count nothing. Peak extra minus this is the call's work space, the memory
    every implementation could avoid (the returned tensors are the contract's)."""
    own = {t.untyped_storage().data_ptr() for t in flat_tensors(inputs.tensors)}
    seen, total = set(), 0
    for t in flat_tensors(output):
        ptr = t.untyped_storage().data_ptr()
        if ptr in own or ptr in seen:
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
    return total


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| over all floating tensors of two outputs; inf if out has NaN/inf."""
    outs = [t for t in flat_tensors(out) if t.is_floating_point()]
    refs = [t for t in flat_tensors(ref) if t.is_floating_point()]
    if [tuple(t.shape) for t in outs] != [tuple(t.shape) for t in refs]:
        raise ValueError(
            f"output shapes {[tuple(t.shape) for t in outs]} differ from the baseline's "
            f"{[tuple(t.shape) for t in refs]}"
        )
    o = torch.cat([t.detach().double().flatten() for t in outs])
    r = torch.cat([t.detach().double().flatten() for t in refs]).to(o.device)
    if not torch.isfinite(o).all():
        return math.inf
    denom = r.norm().item()
    num = (o - r).norm().item()
    return num / denom if denom > 0 else num


def m2f_op(name: str, backend: str) -> Callable:
    """``m2f_kernels.<name>`` with ``backend=`` bound.

    A backend that cannot run the call (not built, no GPU, a dtype it does not take) makes
    the op raise m2f_kernels.BackendUnavailableError on its first call, which happens
    before timing; it is turned into Unavailable so the case is skipped with the reason.
    """
    try:
        import m2f_kernels
    except ImportError as exc:
        raise Unavailable(f"m2f_kernels is not importable: {exc}") from None
    op = getattr(m2f_kernels, name, None)
    if op is None:
        raise Unavailable(f"m2f_kernels.{name} does not exist (the public op layer is missing)")
    unavailable = m2f_kernels.BackendUnavailableError

    def call(*args, **kwargs):
        try:
            return op(*args, backend=backend, **kwargs)
        except unavailable as exc:
            raise Unavailable(str(exc)) from None

    return call


def requires_module(module: str, hint: str) -> Callable[[], Optional[str]]:
    """A ``requires`` check: None if ``module`` imports, else why not."""

    def check() -> Optional[str]:
        try:
            __import__(module)
        except Exception as exc:  # ImportError, or a broken extension raising anything
            return f"{hint} ({type(exc).__name__}: {exc})"
        return None

    check.__name__ = f"requires_{module.replace('.', '_')}"
    return check


# ----------------------------------------------------------------------------- running


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def call():
        with torch.no_grad():
            return fn()

    return call


def _grad_outputs(out) -> tuple:
    """(outputs that need a gradient, matching random output gradients)."""
    outs = [t for t in flat_tensors(out) if t.requires_grad]
    if not outs:
        raise RuntimeError("the forward closure returned no tensor that requires grad")
    grads = [torch.ones_like(t) if t.dim() == 0 else torch.randn_like(t) for t in outs]
    return outs, grads


def make_call(provider: Provider, inputs: Inputs, mode: str) -> Callable[[], Any]:
    """The timed callable of ``mode`` on one input set (any forward it needs first runs here)."""
    forward = provider.build(inputs)
    if mode in STEP_MODES:
        return forward
    if mode == "fwd":
        return _no_grad(forward)
    wrt = inputs.grad_tensors()
    if not wrt:
        raise ValueError(f"mode {mode!r} needs Inputs.grad (what backward differentiates)")
    outs, grad_outs = _grad_outputs(forward())
    if mode == "bwd":
        return lambda: torch.autograd.grad(outs, wrt, grad_outs, retain_graph=True)
    del outs

    def forward_backward():
        new_outs = [t for t in flat_tensors(forward()) if t.requires_grad]
        return torch.autograd.grad(new_outs, wrt, grad_outs)

    return forward_backward


def run_rounds(target: Callable[[], None], rounds: int, warmup: int) -> None:
    """The plain runner: ``warmup`` untimed-by-contract rounds, then ``rounds``."""
    for _ in range(warmup + rounds):
        target()


def _check(spec: OpSpec, case: Case, inputs: Inputs, output) -> Optional[dict]:
    """Relative error of ``output`` against the first available baseline provider."""
    for name in spec.check_against:
        if name == case.provider:
            return None  # this provider is the baseline
        base = spec.providers[name]
        if base.unavailable(dataclasses.replace(case, provider=name)) is not None:
            continue
        try:
            reference = _no_grad(base.build(inputs))()
        except CaseSkipped:
            continue
        err = rel_err(output, reference)
        tol = (spec.check_tolerance or CHECK_TOLERANCE)[case.dtype]
        return {"against": name, "rel_err": err, "tolerance": tol, "ok": bool(err <= tol)}
    return None


def _mark_grad(inputs: Inputs) -> None:
    for t in inputs.grad_tensors():
        t.requires_grad_(True)


def run_case(spec: OpSpec, case: Case, device, *, settings: Optional[Settings] = None,
             runner: Callable = run_rounds, timer: Optional[Callable] = None,
             nvml: Optional[measure.Nvml] = None, copy_bandwidth: Optional[float] = None) -> dict:
    """Run one case and return its record (see bench/README.md for the fields).

    Raises CaseSkipped (status 'skipped' or 'oom', with the reason) when the case cannot
    run here, CaseError (carrying the original traceback as text) when it fails.
    ``runner(target, rounds, warmup)`` calls ``target`` warmup + rounds times
    (the suite passes pytest-benchmark's pedantic mode); each call times one round with
    ``timer`` (CUDA events on a GPU, wall clock elsewhere) and advances the GPU clock.
    """
    device = torch.device(device)
    provider = spec.providers[case.provider]
    reason = provider.unavailable(case)
    if reason is not None:
        raise Unavailable(reason)
    # Whatever goes wrong, the exception that leaves this function holds no frame of the
    # case: a traceback would keep its GPU tensors alive into the next cases.
    skipped = failure = None
    try:
        return _run_case(spec, case, provider, device, settings or spec.settings_for("default"),
                         runner, timer, nvml, copy_bandwidth)
    except CaseSkipped as exc:
        skipped = CaseSkipped(exc.reason, exc.status)
    except torch.cuda.OutOfMemoryError as exc:
        skipped = CaseSkipped(f"out of GPU memory: {str(exc).splitlines()[0] if str(exc) else 'OOM'}", "oom")
    except Exception:
        failure = CaseError(traceback.format_exc())
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    raise skipped if skipped is not None else failure


def _run_case(spec, case, provider, device, settings, runner, timer, nvml, copy_bandwidth) -> dict:
    if timer is None:  # made first, so its L2-flush buffer is not counted in the case's footprint
        timer = (measure.CudaEventTimer(device, flush_bytes=(256 << 20) if spec.flush_l2 else 0)
                 if device.type == "cuda" else measure.WallTimer())
    case_base = measure.allocated(device)
    dtype = DTYPES[case.dtype]
    sets, calls = [], []
    for i in range(spec.input_sets):
        with _seeded(_input_seed(case, i), device):  # every provider of the case: the same inputs
            inputs = spec.make_inputs(case.params, dtype, device)
            if case.mode in ("bwd", "fwd+bwd"):
                _mark_grad(inputs)
            sets.append(inputs)
            calls.append(make_call(provider, inputs, case.mode))

    first_output = calls[0]()  # the first call compiles / autotunes; never timed
    for call in calls[1:]:
        call()
    check = _check(spec, case, sets[0], first_output) if case.mode == "fwd" else None
    if case.mode == "train":
        _require_finite_loss(first_output)
    returned = returned_bytes(first_output, sets[0])
    del first_output

    # One untimed-for-the-statistics call gives the time estimate that sets the number of
    # rounds, and the peak memory.
    estimate_ms, memory = measure.peak_memory(lambda: timer(calls[0]), device)
    rounds = settings.rounds_for(estimate_ms)
    samples = []
    rotation = itertools.cycle(calls)

    def target() -> None:
        ms = timer(next(rotation))
        samples.append(ms)
        measure.GPU_CLOCK.advance(ms / 1e3)

    runner(target, rounds, settings.warmup_rounds)
    timed = samples[-rounds:] if len(samples) > rounds else samples
    if memory is not None:
        memory["case_base_bytes"] = int(case_base)
        memory["extra_bytes"] = memory["peak_bytes"] - memory["call_base_bytes"]
        memory["footprint_bytes"] = memory["peak_bytes"] - memory["case_base_bytes"]
        memory["returned_bytes"] = returned
        memory["work_bytes"] = memory["extra_bytes"] - returned
    time_ms = measure.summarize(timed)
    record = base_record(case, "ok")
    record.update({
        "time_ms": time_ms,
        "memory": memory,
        "floor": _floor(spec, sets[0], case.mode, copy_bandwidth, time_ms["median"]),
        "check": check,
        "nvml": nvml.snapshot() if nvml is not None else None,
        "metrics": dict(sets[0].meta.get("metrics", {})),
        "note": provider.note,
    })
    return record


def _require_finite_loss(output) -> None:
    """A training step whose loss is NaN / inf computes nothing worth timing: an error."""
    bad = [t for t in flat_tensors(output) if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"the training step's loss is not finite ({bad[0].detach().flatten()[:4].tolist()}): "
                         "its time would not be a result")


def _input_seed(case: Case, index: int) -> int:
    """The seed of input set ``index`` of ``case``: the same for every provider and mode of an
    (op, shape, dtype), and from run to run."""
    return zlib.crc32(f"{case.op}|{json.dumps(case.shape_json, sort_keys=True)}|{case.dtype}|{index}".encode())


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """torch's (CPU and ``device``'s) and Python's random state seeded for the block, then restored."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def _floor(spec: OpSpec, inputs: Inputs, mode: str, bandwidth: Optional[float], median_ms: float):
    if spec.floor_bytes is None or mode not in GRAD_MODES:
        return None
    bytes_ = int(spec.floor_bytes(inputs, mode))
    if not bandwidth:
        return {"bytes": bytes_, "ms": None, "share": None}
    floor_ms = bytes_ / bandwidth * 1e3
    return {"bytes": bytes_, "ms": floor_ms, "share": floor_ms / median_ms if median_ms > 0 else None}


def base_record(case: Case, status: str, reason: Optional[str] = None) -> dict:
    """The identity fields every record has; skipped/oom/error records are just this."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}")
    record = {
        "key": case.key, "op": case.op, "provider": case.provider, "shape": case.shape_json,
        "label": case.shape_label, "dtype": case.dtype, "mode": case.mode, "status": status,
    }
    if reason is not None:
        record["reason"] = reason
    return record


def describe(record: dict) -> str:
    """One line for the log: time, memory, floor, check."""
    case = f"{record['op']} {record['provider']} {_shape_text(record['shape'])} {record['dtype']} {record['mode']}"
    if record["status"] != "ok":
        return f"{case}: {record['status']} ({record.get('reason', '')})"
    t = record["time_ms"]
    parts = [f"{case}: {t['median']:.4g} ms median ({t['rounds']} rounds)"]
    mem = record.get("memory")
    if mem:
        parts.append(f"peak +{mem['extra_bytes'] / 2**20:.1f} MiB")
        if "work_bytes" in mem:
            parts.append(f"work space {mem['work_bytes'] / 2**20:.1f} MiB")
    floor = record.get("floor")
    if floor and floor.get("ms"):
        parts.append(f"HBM floor {floor['ms']:.4g} ms (kernel at {100 * floor['share']:.0f}% of the floor)")
    check = record.get("check")
    if check:
        parts.append(f"rel err {check['rel_err']:.1e} vs {check['against']}")
    return " | ".join(parts)


def _shape_text(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def summary_fields(record: dict) -> dict:
    """The flat numbers that go into pytest-benchmark's extra_info."""
    out = {"median_ms": record["time_ms"]["median"]}
    if record.get("memory"):
        out["peak_extra_bytes"] = record["memory"]["extra_bytes"]
        out["peak_bytes"] = record["memory"]["peak_bytes"]
        if "work_bytes" in record["memory"]:
            out["work_bytes"] = record["memory"]["work_bytes"]
    if record.get("floor") and record["floor"].get("ms"):
        out["floor_ms"] = record["floor"]["ms"]
        out["floor_share"] = record["floor"]["share"]
    if record.get("check"):
        out["check_rel_err"] = record["check"]["rel_err"]
    return out

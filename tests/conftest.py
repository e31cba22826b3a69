"""Shared test plumbing: error measure, tolerances, poisoning, per-test seeds, and which
backends can run here (skip marks, backend parameters). The per-op input builders live in
tests/_inputs.py."""
from __future__ import annotations

import contextlib
import importlib
import os
import random
import shutil
import sys

import pytest
import torch

# docs/ops.md numerics: relative error ||out - ref|| / ||ref||.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
TF32_TOLERANCE = 1e-3  # float32 through tensor-core (tf32) dots

# Under pytest-xdist (the README's `-n auto`) the workers share the cores: one thread each, and
# for the processes the tests start (torch's intra-op pool over small CPU tensors mostly spins:
# two workers of two threads took 1.6x the time of two of one on the 2-core CI machine).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

ON_GPU = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if ON_GPU else "cpu"


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


CUDA_EXTENSION_BUILT = _importable("m2f_kernels._C")
TRITON_INSTALLED = _importable("triton")
requires_cuda_backend = pytest.mark.skipif(
    not (CUDA_EXTENSION_BUILT and ON_GPU),
    reason="the cuda backend needs the built extension m2f_kernels._C and a CUDA GPU "
           f"(built: {CUDA_EXTENSION_BUILT}, GPU: {ON_GPU})",
)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf; an all-zero ref compares absolutely."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference shape {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / denom if denom > 0 else num


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a tensor that a call is about to overwrite with NaN (in place) and return it."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)


@contextlib.contextmanager
def poisoned_empty():
    """Inside: torch.empty hands out NaN (float) / -1 (int) filled memory, so outputs and
    scratch a kernel forgets to write show up in the comparison."""
    real = torch.empty
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", lambda *a, **k: poison(real(*a, **k)))
        yield


def poison_cuda_cache() -> None:
    """Fill freed blocks of the CUDA caching allocator with NaN, so tensors the extension
    allocates with at::empty (not reached by ``poisoned_empty``) most likely start as NaN:
    an element a kernel forgets to write shows up as non-finite. Best effort."""
    small = [torch.full((1 << 17,), float("nan"), device="cuda") for _ in range(64)]  # 512 KiB blocks
    large = torch.full((1 << 28,), float("nan"), device="cuda")  # 1 GiB, split for large tensors
    torch.cuda.synchronize()
    del small, large


@contextlib.contextmanager
def poisoned(backend: str):
    """Poisoned allocations for a call into ``backend``: torch.empty always, and the CUDA
    caching allocator's free blocks for the cuda backend."""
    if backend == "cuda" and ON_GPU:  # (emulated, at::empty comes NaN-filled already)
        poison_cuda_cache()
    with poisoned_empty():
        yield


def triton_runnable() -> bool:
    return TRITON_INSTALLED and (ON_GPU or INTERPRETING)


requires_triton = pytest.mark.skipif(
    not triton_runnable(),
    reason="the triton backend needs triton and a CUDA GPU, or TRITON_INTERPRET=1 on the CPU "
           f"(triton installed: {TRITON_INSTALLED})",
)
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (full-size check)")
# tests/cuda_emulation: the CUDA C++ kernels built with g++ against the CPU torch, on fibers;
# where a GPU is, the kernels themselves run instead.
CUDA_EMULATION_POSSIBLE = sys.platform == "linux" and shutil.which("g++") is not None and not ON_GPU
requires_cuda_emulation = pytest.mark.skipif(
    not CUDA_EMULATION_POSSIBLE, reason="the CUDA emulation needs Linux (ucontext fibers), g++ and no GPU")
EMULATION_ORDERS = ("ascending", "descending", "shuffled")


@pytest.fixture(params=EMULATION_ORDERS)
def emulation_order(request, seed):
    """Runs the test once per order of the emulated launches' threads and blocks (a kernel
    whose result changes with the order has a race on a GPU)."""
    from . import cuda_emulation

    with cuda_emulation.order(request.param, seed):
        yield request.param


# --- the backends under test -------------------------------------------------------------------
# Per-op tests run each non-reference backend against backend='reference', the spec. The
# cuda backend runs twice: on a GPU, and as "cuda-emulated" (its kernels on the CPU,
# tests/cuda_emulation) where none is; the cuda_emulated mark makes the fixture below
# route backend='cuda' to the emulation for the test.
BACKEND_MARKS = {"triton": requires_triton, "cuda": requires_cuda_backend}
EMULATED_MARKS = (requires_cuda_emulation, pytest.mark.cuda_emulated)


def _params(backend: str, values: tuple = (), name=None) -> list:
    params = [pytest.param(backend, *values, marks=BACKEND_MARKS.get(backend, ()),
                           id=name(backend) if name else None)]
    if backend == "cuda":
        params.append(pytest.param(backend, *values, marks=EMULATED_MARKS,
                                   id=name("cuda-emulated") if name else "cuda-emulated"))
    return params


KERNEL_BACKENDS = [p for backend in BACKEND_MARKS for p in _params(backend, name=lambda b: b)]
ALL_BACKENDS = [pytest.param("reference", id="reference"), *KERNEL_BACKENDS]


def per_backend(cases: dict, ids=None) -> list:
    """pytest params ``(backend, *case)`` from ``{backend: [case, ...]}`` (a case is a tuple,
    or one value), each with its backend's skip mark (cuda cases also as cuda-emulated);
    ``ids(backend, case)`` names one."""
    params = []
    for backend, backend_cases in cases.items():
        for case in backend_cases:
            values = case if isinstance(case, tuple) else (case,)
            params += _params(backend, values, (lambda b, c=case: ids(b, c)) if ids else None)
    return params


@pytest.fixture(autouse=True)
def _cuda_emulated_backend(request):
    """For a test marked cuda_emulated: backend='cuda' runs the emulated kernels, their
    threads and blocks in an order picked by the test's seed (over many runs every order
    meets every test; tests/test_cuda_emulated.py runs all three on purpose)."""
    if request.node.get_closest_marker("cuda_emulated") is None:
        yield
        return
    from . import cuda_emulation

    seed = request.getfixturevalue("seed")
    with cuda_emulation.as_cuda_backend(), cuda_emulation.order(EMULATION_ORDERS[seed % 3], seed):
        yield


def op_module(backend: str, family: str):
    """A backend's module for one op family (``m2f_kernels.<backend>.<family>``), imported on
    first use: the cuda one needs the built extension."""
    return importlib.import_module(f"m2f_kernels.{backend}.{family}")


def fresh_seed() -> int:
    """A new seed (M2F_TEST_SEED=<seed> if set, to replay a failure), printed."""
    value = int(os.environ.get("M2F_TEST_SEED") or random.SystemRandom().randrange(2**31))
    print(f"seed={value}")
    return value


@pytest.fixture
def seed() -> int:
    """A fresh seed for torch and ``random`` per test (torch's own start-up seed is fixed),
    printed so a failure can be replayed with M2F_TEST_SEED=<seed>."""
    value = fresh_seed()
    torch.manual_seed(value)
    random.seed(value)
    return value


# --- the Triton-versions subset ------------------------------------------------------------------
# .ci/run runs the whole suite under the pinned Triton (3.6.0, the GPU machine's), then these
# tests again under each other tested Triton version (`pytest -m triton_versions`, with
# TRITON_INTERPRET=1). Chosen so that, between them, they launch every Triton kernel forward and
# backward, every constexpr variant flag (split / multi-query-block / tile skipping / partial
# dq / weights / indexed / fixed point / dot precision ...) and every argument dtype the full
# suite launches (pred, q/k/v, mask and target dtypes; int32 and int64 indices), found by
# recording the interpreter's launches over the whole suite; about 20 s per version on the
# 2-core CI machine. Entries are node-id prefixes under tests/; under `-m triton_versions` an
# entry that matches no test is an error, so a renamed test cannot drop out silently.
TRITON_VERSIONS_SUBSET = (
    # masked_attention: bool and logits masks in every dtype, logits masks in another dtype
    # than q, the key-split forward with tile skipping, the multi-query-block backward
    "test_op_masked_attention.py::test_matches_reference[triton-",
    "test_op_masked_attention.py::test_logits_mask_dtypes[triton-",
    "test_op_masked_attention.py::TestTriton::test_tilings[split_skip-float32]",
    "test_op_masked_attention.py::TestTriton::test_tilings[multi_qb_skip-bfloat16]",
    # point_sample, uncertain_point_coords (int64 and int32 indices)
    "test_op_point_loss.py::test_point_sample[triton-",
    "test_op_point_loss.py::test_uncertain_point_coords_public_indexed[triton-",
    "test_op_point_loss.py::test_uncertain_point_coords_indexed_int32_index[triton]",
    # pairwise_mask_cost: every pred x target dtype, the tf32x3 config
    "test_op_point_loss.py::test_pairwise_mask_cost[triton-",
    "test_op_point_loss.py::TestTriton::test_pairwise_mask_cost_configs[tf32x3]",
    # point_mask_loss: plain and indexed, every target dtype, weights, int32 indices
    "test_op_point_loss.py::test_point_mask_loss_sizes[triton-one_mask-",
    "test_op_point_loss.py::test_point_mask_loss[triton-bfloat16-indexed-",
    "test_op_point_loss.py::test_point_mask_loss_int32_index[triton]",
    "test_point_mask_loss_weights.py::test_weights_in_16bit[triton-",
    # ms_deform_attn: weights and softmax, 16-bit inputs, the fixed-point backward
    "test_op_ms_deform_attn.py::test_matches_reference[triton-mixed_levels-float16-",
    "test_op_ms_deform_attn.py::test_matches_reference[triton-mixed_levels-bfloat16-weights]",
    "test_op_ms_deform_attn.py::test_nonfinite_input_reaches_grad_value[triton-grad_out_nan-True]",
    # point_mask_logits; point_sample of bool target masks inside the tiny model
    "test_mask_free.py::test_triton_point_mask_logits_matches_the_reference",
    "test_m2f_equivalence.py::test_fused_with_one_triton_op_agrees[point_sample]",
)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    """Mark the TRITON_VERSIONS_SUBSET tests ``triton_versions``. Under ``-m triton_versions``
    (the subset run): an entry whose file is gone, or whose collected file has no test it
    matches, is an error, and so is a run that could only skip them (no Triton that can run)."""
    unmatched = set(TRITON_VERSIONS_SUBSET)
    collected_files = set()
    for item in items:
        nodeid = item.nodeid.removeprefix("tests/")
        collected_files.add(nodeid.split("::")[0])
        hits = [prefix for prefix in TRITON_VERSIONS_SUBSET if nodeid.startswith(prefix)]
        if hits:
            item.add_marker(pytest.mark.triton_versions)
            unmatched.difference_update(hits)
    if (config.getoption("markexpr") or "").strip() != "triton_versions":
        return
    here = os.path.dirname(os.path.abspath(__file__))
    stale = sorted(entry for entry in unmatched if entry.split("::")[0] in collected_files
                   or not os.path.exists(os.path.join(here, entry.split("::")[0])))
    if stale:
        raise pytest.UsageError("TRITON_VERSIONS_SUBSET entries that match no test: " + ", ".join(stale))
    if not triton_runnable():
        raise pytest.UsageError("-m triton_versions needs triton and TRITON_INTERPRET=1 (or a CUDA GPU); "
                                f"triton installed: {TRITON_INSTALLED}")

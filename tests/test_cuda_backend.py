"""The ``cuda`` backend (CUDA C++ extension ``m2f_kernels._C``, issue 9) against the reference.

GPU-only except the first test: the kernels need a built extension and a CUDA GPU, and
those tests skip with the reason otherwise. On the CPU machine the dispatcher must say
that the cuda backend is not built. Inputs are fresh every run; failure messages carry
the seed that reproduces them.
"""
from __future__ import annotations

import pytest
import torch

import m2f_kernels
from m2f_kernels import _dispatch, reference
from .conftest import CUDA_EXTENSION_BUILT as BUILT, TOLERANCE, assert_close, requires_cuda_backend
from .test_ms_deform_attn_triton import (
    GRAD_NAMES, call_backend, check_deterministic_twice, check_int64_offsets, make_inputs, poisoned_empty, run_api,
    standard_inputs,
)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cuda_backend():
    import m2f_kernels.cuda

    return m2f_kernels.cuda


def check_against_reference(inputs, softmax, seed, deterministic=False):
    """cuda output and the three gradients (public op + autograd) vs the reference backend."""
    with poisoned_empty():
        got = run_api("cuda", *inputs, softmax, deterministic)
    want = run_api("reference", *inputs, softmax)
    for name, g, w in zip(("output",) + GRAD_NAMES, got, want):
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype} (seed {seed})"
        assert_close(g, w, TOLERANCE[w.dtype], f"{name} (seed {seed})")


# ----------------------------------------------------------------------------- CPU
@pytest.mark.skipif(BUILT, reason="the extension is built here; the GPU tests cover it")
def test_dispatcher_reports_cuda_backend_not_built():
    reason = _dispatch.backend_status("cuda", torch.device("cuda"))
    assert reason is not None and "not built" in reason, reason
    inputs = make_inputs([(3, 4)], b=1, lq=2, h=1, d=4, p=1)
    with pytest.raises(_dispatch.BackendUnavailableError, match="not built"):
        m2f_kernels.ms_deform_attn(*inputs[:5], backend="cuda")


# ----------------------------------------------------------------------------- GPU
@requires_cuda_backend
@pytest.mark.parametrize("op", list(_dispatch.BACKEND_FUNCTIONS))
def test_dispatcher_sees_every_op(op):
    assert _dispatch._why_not("cuda", op, torch.device("cuda"), torch.float32) is None


@requires_cuda_backend
def test_compiled_archs_cover_this_device():
    from m2f_kernels import _C

    major, minor = torch.cuda.get_device_capability()
    archs = _C.compiled_archs()
    assert f"sm_{major}{minor}" in archs.split(","), f"compiled for {archs}, device is sm_{major}{minor}"


@requires_cuda_backend
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
# d picks the channel vector width per lane: 8 (< a warp), 40 (two partial chunks),
# 96 (2 per lane), 256 (4 fp32 / 8 half per lane: 16-byte loads)
@pytest.mark.parametrize("d", [8, 40, 96, 256])
def test_matches_reference(d, dtype, softmax):
    seed = torch.seed()
    inputs = make_inputs([(9, 11), (4, 5), (1, 1)], b=2, lq=37, h=3, d=d, p=3, dtype=dtype, softmax=softmax)
    check_against_reference(inputs, softmax, seed)


@requires_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_locations_and_weights(dtype):
    seed = torch.seed()
    for softmax in (False, True):
        inputs = make_inputs([(6, 7), (3, 3)], b=2, lq=19, h=2, d=32, p=4, dtype=dtype,
                             aux_dtype=torch.float32, softmax=softmax)
        check_against_reference(inputs, softmax, seed)


@requires_cuda_backend
def test_many_levels_and_points():
    """L*P = 40 > 32: the softmax statistics and its backward loop over more than one warp's worth."""
    seed = torch.seed()
    hw = [(5, 6), (4, 4), (3, 2), (2, 2), (1, 3)]
    inputs = make_inputs(hw, b=1, lq=21, h=2, d=32, p=8, softmax=True)
    check_against_reference(inputs, True, seed)


@requires_cuda_backend
def test_non_contiguous_inputs():
    seed = torch.seed()
    value, shapes, starts, loc, weights, grad_out = make_inputs([(5, 6), (2, 3)], b=2, lq=11, h=2, d=32, p=2)
    nc = (value.transpose(0, 1).contiguous().transpose(0, 1), shapes, starts,
          loc.transpose(1, 2).contiguous().transpose(1, 2), weights.transpose(0, 1).contiguous().transpose(0, 1),
          grad_out.transpose(0, 1).contiguous().transpose(0, 1))
    assert not nc[0].is_contiguous() and not nc[3].is_contiguous()
    got = call_backend(cuda_backend(), nc, False)
    want = call_backend(reference, nc, False)
    for name, g, w in zip(("output",) + GRAD_NAMES, got, want):
        assert g.is_contiguous(), f"{name} is not contiguous"
        assert_close(g, w, TOLERANCE[w.dtype], f"{name} (seed {seed})")


@requires_cuda_backend
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_backward_is_bitwise_repeatable(dtype, softmax):
    seed = torch.seed()
    inputs = make_inputs([(7, 8), (3, 4), (1, 1)], b=2, lq=64, h=2, d=32, p=4, dtype=dtype, softmax=softmax)
    check_against_reference(inputs, softmax, seed, deterministic=True)
    first = run_api("cuda", *inputs, softmax, deterministic=True)
    second = run_api("cuda", *inputs, softmax, deterministic=True)
    for name, a, b in zip(("output",) + GRAD_NAMES, first, second):
        assert torch.equal(a, b), f"{name}: deterministic backward differs between two runs (seed {seed})"


@requires_cuda_backend
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("where", ["grad_out", "logits"])
def test_nonfinite_input_gives_nan_grad_value(where, deterministic):
    value, shapes, starts, loc, weights, grad_out = make_inputs([(4, 4)], b=1, lq=5, h=1, d=32, p=2, softmax=True)
    if where == "grad_out":
        grad_out[0, 0, 0] = float("inf")
    else:
        weights[0, 0, 0, 0, 0] = float("nan")
    _, grad_value, _, _ = call_backend(cuda_backend(), (value, shapes, starts, loc, weights, grad_out),
                                       True, deterministic)
    assert not torch.isfinite(grad_value).all()


@requires_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_standard_shape(dtype):
    seed = torch.seed()
    check_against_reference(standard_inputs(dtype), True, seed)


@requires_cuda_backend
def test_standard_shape_deterministic():
    seed = torch.seed()
    check_deterministic_twice(cuda_backend(), standard_inputs(torch.float32), True, seed)


@requires_cuda_backend
@pytest.mark.parametrize("deterministic", [False, True])
def test_int64_offsets(deterministic):
    check_int64_offsets(cuda_backend(), deterministic)

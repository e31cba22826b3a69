"""The ``cuda`` backend of masked attention (``csrc/masked_attention``) against the reference.

GPU-only: the kernels need the built extension m2f_kernels._C and a CUDA GPU; every test
skips with the reason otherwise. Inputs are fresh every run (the seed is printed). The
input builders and the comparison come from the Triton backend's tests.
"""
from __future__ import annotations

import random

import pytest
import torch

import m2f_kernels as mk
from m2f_kernels import _dispatch
from .conftest import TOLERANCE, poisoned_empty, requires_cuda_backend
from . import test_masked_attention_triton as triton_tests
from .test_masked_attention_triton import _seed, check, make_mask, make_qkv, standard_mask

pytestmark = requires_cuda_backend
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEV = "cuda"


def poison_cuda_cache():
    """Fill freed blocks of the CUDA caching allocator with NaN, so tensors the extension
    allocates with at::empty (not reached by ``poisoned_empty``) most likely start as NaN:
    an element a kernel forgets to write shows up as non-finite. Best effort."""
    small = [torch.full((1 << 17,), float("nan"), device=DEV) for _ in range(64)]  # 512 KiB blocks
    large = torch.full((1 << 28,), float("nan"), device=DEV)  # 1 GiB, split for large tensors
    torch.cuda.synchronize()
    del small, large


def cuda_result(q, k, v, mask, scale, grad_out):
    """(out, lse, dq, dk, dv) from the cuda backend: out and the gradients through the public
    op and its autograd, lse through the custom op the public function calls."""
    poison_cuda_cache()
    with poisoned_empty():
        out = mk.masked_attention(q, k, v, mask, scale=scale, backend="cuda")
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
        lse = torch.ops.m2f_kernels.masked_attention(q.detach(), k.detach(), v.detach(), mask, scale, "cuda")[1]
    return out.detach(), lse, dq, dk, dv


def assert_matches_reference(q, k, v, mask, scale=None, tol=None):
    triton_tests.assert_matches_reference(q, k, v, mask, scale, tol, result=cuda_result)


def test_dispatcher_sees_masked_attention():
    assert _dispatch._why_not("cuda", "masked_attention", torch.device(DEV), torch.float32) is None


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
@pytest.mark.parametrize("kind", ["bool", "logits"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, kind, per_head):
    _seed()
    B, H, D = 2, 3, 32
    Q, N = random.randint(2, 40), random.choice([33, 50, 77, 95])
    q, k, v = make_qkv(B, H, Q, N, D, dtype, device=DEV)
    assert_matches_reference(q, k, v, make_mask(B, H, Q, N, kind, per_head, dtype, device=DEV))


@pytest.mark.parametrize("Q,N,D", [(1, 1, 32), (1, 70, 16), (7, 1, 64), (5, 33, 128), (200, 40, 32),
                                   (6, 300, 16), (9, 64, 64), (3, 50, 8), (4, 45, 100), (17, 1000, 128)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edge_shapes(Q, N, D, dtype):
    """Q = 1 and 200, N = 1 (one key), N a multiple of the 32-key tile and not, D in
    {8, 16, 32, 64, 100, 128}."""
    _seed()
    q, k, v = make_qkv(2, 2, Q, N, D, dtype, device=DEV)
    assert_matches_reference(q, k, v, make_mask(2, 2, Q, N, "bool", Q % 2 == 0, device=DEV))


@pytest.mark.parametrize("D,Dv", [(16, 48), (32, 128), (128, 16)])
def test_value_dim_differs(D, Dv):
    _seed()
    B, H, Q, N = 1, 2, 8, 40
    q, k = make_qkv(B, H, Q, N, D, torch.float32, device=DEV)[:2]
    v = make_qkv(B, H, Q, N, Dv, torch.float32, device=DEV)[2]
    assert_matches_reference(q, k, v, make_mask(B, H, Q, N, "logits", True, device=DEV))


@pytest.mark.parametrize("visible", [0.0, 1.0], ids=["all_blocked", "all_visible"])
def test_all_blocked_equals_unmasked(visible):
    """Every row empty (all blocked) and every key visible both give plain attention."""
    _seed()
    B, H, Q, N, D = 1, 2, 9, 45, 16
    q, k, v = make_qkv(B, H, Q, N, D, torch.float32, device=DEV)
    mask = torch.full((B, Q, N), visible == 0.0, device=DEV)
    g = torch.randn(B, H, Q, D, device=DEV)
    got = cuda_result(q, k, v, mask, 0.25, g)
    expected = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.25)
    check(got[0], expected, TOLERANCE[torch.float32], "out")
    assert_matches_reference(q, k, v, mask, 0.25)


def test_one_visible_key_rows():
    """Rows with exactly one visible key (first, last, middle), next to an empty row."""
    _seed()
    B, H, Q, N, D = 1, 2, 4, 70, 32
    q, k, v = make_qkv(B, H, Q, N, D, torch.float32, device=DEV)
    mask = torch.ones(B, Q, N, dtype=torch.bool, device=DEV)
    mask[0, 0, 0] = mask[0, 1, N - 1] = mask[0, 2, 37] = False  # row 3 stays empty
    assert_matches_reference(q, k, v, mask)


@pytest.mark.parametrize("mask_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_logits_mask_dtypes(mask_dtype):
    """Logits in another dtype than q (read in their own dtype, never converted)."""
    _seed()
    B, H, Q, N, D = 2, 2, 13, 60, 32
    for dtype in (torch.float32, torch.float16):
        q, k, v = make_qkv(B, H, Q, N, D, dtype, device=DEV)
        assert_matches_reference(q, k, v, make_mask(B, H, Q, N, "logits", False, mask_dtype, device=DEV))


@pytest.mark.parametrize("layout", ["seq_first", "strided"])
def test_noncontiguous_inputs(layout):
    """q/k/v as strided views, a transposed mask, stride-0 (expanded) masks."""
    _seed()
    B, H, Q, N, D = 2, 2, 11, 40, 16
    q, k, v = make_qkv(B, H, Q, N, D, torch.float32, layout, device=DEV)
    assert not q.is_contiguous() and not k.is_contiguous()
    transposed = make_mask(B, 1, N, Q, "logits", False, device=DEV).transpose(1, 2)
    assert_matches_reference(q, k, v, transposed)
    one_row = make_mask(B, 1, 1, N, "bool", False, device=DEV).expand(B, Q, N)  # stride 0 along Q
    assert_matches_reference(q, k, v, one_row)
    heads_expanded = make_mask(B, 1, Q, N, "bool", False, device=DEV).unsqueeze(1).expand(B, H, Q, N)
    assert_matches_reference(q, k, v, heads_expanded)


def test_head_dim_above_limit_is_a_clear_error():
    import m2f_kernels.cuda as cuda_backend

    q = torch.randn(1, 1, 2, 160, device=DEV)
    mask = torch.zeros(1, 2, 3, dtype=torch.bool, device=DEV)
    with pytest.raises(ValueError, match="head dims"):
        cuda_backend.masked_attention_fwd(q, torch.randn(1, 1, 3, 160, device=DEV),
                                          torch.randn(1, 1, 3, 32, device=DEV), mask, 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_standard_shape(dtype):
    """Mask2Former R50 at 1024^2: B=2, H=8, D=32, Q=100, N=16384 (the largest level)."""
    _seed()
    B, H, Q, N, D = 2, 8, 100, 16384, 32
    q, k, v = make_qkv(B, H, Q, N, D, dtype, "seq_first", device=DEV)
    kind = "logits" if dtype == torch.float32 else "bool"
    assert_matches_reference(q, k, v, standard_mask(B, Q, N, kind, dtype, DEV))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_is_deterministic(dtype):
    """Two backward runs give bitwise equal gradients (no atomics)."""
    _seed()
    B, H, Q, N, D = 2, 4, 100, 4096, 32
    q, k, v = make_qkv(B, H, Q, N, D, dtype, device=DEV)
    mask = standard_mask(B, Q, N, "bool", dtype, DEV)
    g = torch.randn(B, H, Q, D, device=DEV, dtype=dtype)
    first = cuda_result(q, k, v, mask, D ** -0.5, g)
    second = cuda_result(q, k, v, mask, D ** -0.5, g)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two runs"

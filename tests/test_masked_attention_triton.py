"""The triton masked cross-attention (forward, lse, dq/dk/dv) against the reference backend,
and the drop-in layer ``m2f_kernels.nn.masked_attention.MaskedCrossAttention`` against an
nn.MultiheadAttention layer built like the official one.

CPU: TRITON_INTERPRET=1 and small shapes. GPU: the same tests, plus the standard
Mask2Former shapes of DESIGN.md.
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

import m2f_kernels as mk
from m2f_kernels import reference as ref
from .conftest import DEVICE, TF32_TOLERANCE, TOLERANCE, poisoned_empty, requires_gpu, requires_triton

pytestmark = [
    requires_triton,
    # the Triton interpreter's own range(<runtime int>) (numpy >= 1.25), not this code
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]
triton = pytest.importorskip("triton", reason="triton is not installed")
tri = pytest.importorskip("m2f_kernels.triton.masked_attention", reason="triton is not installed")
nnm = pytest.importorskip("m2f_kernels.nn.masked_attention")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _seed() -> int:
    """A fresh seed per test (torch's own start-up seed is fixed), printed for replay."""
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    print(f"seed={seed}")
    return seed


def check(out, expected, tol, what):
    """||out - expected|| / ||expected||, with the denominator floored at 1e-2 * sqrt(numel)
    (gradients that are analytically zero, e.g. dq with one key, are rounding noise of
    the dp - delta cancellation: they compare absolutely); NaN fails."""
    out64, exp64 = out.detach().double().cpu(), expected.detach().double().cpu()
    assert out64.shape == exp64.shape, f"{what}: shape {tuple(out64.shape)} != {tuple(exp64.shape)}"
    assert torch.isfinite(out64).all(), f"{what}: non-finite values"
    denom = max(exp64.norm().item(), 1e-2 * exp64.numel() ** 0.5)
    err = (out64 - exp64).norm().item() / denom
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def make_mask(B, H, Q, N, kind, per_head, dtype=torch.float32, visible=0.3, device=DEVICE):
    """[B, Q, N] or [B, H, Q, N] mask with, besides random rows (``visible`` of the keys
    visible), empty rows, rows with one visible key (anywhere, the last key included) and
    all-visible rows. kind 'bool' (True = blocked) or 'logits' (blocked where < 0, some
    exact zeros, which are visible)."""
    shape = (B, H, Q, N) if per_head else (B, Q, N)
    blocked = torch.rand(shape) >= visible
    rows = blocked.view(-1, Q, N)
    for r in range(rows.shape[0]):
        special = torch.randperm(Q)[: max(1, Q // 3)].tolist()
        for i, q in enumerate(special):
            if i % 3 == 0:
                rows[r, q] = True  # empty row: attends to all keys
            elif i % 3 == 1:
                rows[r, q] = True
                rows[r, q, N - 1 if i % 2 else random.randrange(N)] = False
            else:
                rows[r, q] = False
    if kind == "bool":
        return blocked.to(device)
    magnitude = torch.rand(shape) * 4 + 0.05
    logits = torch.where(blocked, -magnitude, magnitude)
    logits[(~blocked) & (torch.rand(shape) < 0.1)] = 0.0
    return logits.to(device=device, dtype=dtype)


def make_qkv(B, H, Q, N, D, dtype, layout="contiguous", device=DEVICE):
    """Leaf tensors and the [B, H, L, D] views given to the op.

    layout 'contiguous'; 'seq_first': views of [L, B, H*D] projections as the decoder
    makes them; 'strided': every other element of a wider last dim (stride 2 along D)."""
    def one(L):
        if layout == "seq_first":
            leaf = torch.randn(L, B, H * D, device=device, dtype=dtype).requires_grad_()
            return leaf, leaf.view(L, B, H, D).permute(1, 2, 0, 3)
        if layout == "strided":
            leaf = torch.randn(B, H, L, 2 * D, device=device, dtype=dtype).requires_grad_()
            return leaf, leaf[..., ::2]
        leaf = torch.randn(B, H, L, D, device=device, dtype=dtype).requires_grad_()
        return leaf, leaf
    return one(Q)[1], one(N)[1], one(N)[1]


def reference_result(q, k, v, mask, scale, grad_out):
    """(out, lse, dq, dk, dv) from the reference backend on float32 copies."""
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = mk.masked_attention(q32, k32, v32, mask, scale=scale, backend="reference")
    dq, dk, dv = torch.autograd.grad(out, (q32, k32, v32), grad_out.float())
    lse = ref.masked_attention_fwd(q32.detach(), k32.detach(), v32.detach(), mask, scale)[1]
    return out.detach(), lse, dq, dk, dv


def triton_result(q, k, v, mask, scale, grad_out):
    """(out, lse, dq, dk, dv) from the triton backend through the registered custom op and
    its autograd (the op behind m2f_kernels.masked_attention, which also returns lse), with
    every kernel allocation poisoned."""
    with poisoned_empty():
        out, lse = torch.ops.m2f_kernels.masked_attention(q, k, v, mask, scale, "triton")
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    return out.detach(), lse, dq, dk, dv


def assert_matches_reference(q, k, v, mask, scale=None, tol=None, result=triton_result):
    """``result(q, k, v, mask, scale, grad_out)`` -> (out, lse, dq, dk, dv) against the reference."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tol = TOLERANCE[q.dtype] if tol is None else tol
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), device=q.device, dtype=q.dtype)
    got = result(q, k, v, mask, scale, grad_out)
    want = reference_result(q, k, v, mask, scale, grad_out)
    assert got[0].dtype == q.dtype and got[1].dtype == torch.float32
    assert got[2].dtype == q.dtype and got[3].dtype == k.dtype and got[4].dtype == v.dtype
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        check(a, b, tol, name)


# --- against the reference -------------------------------------------------------------------


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
@pytest.mark.parametrize("kind", ["bool", "logits"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, kind, per_head):
    _seed()
    B, H, D = 2, 2, 32
    Q, N = random.randint(2, 40), random.choice([33, 50, 77, 95])
    q, k, v = make_qkv(B, H, Q, N, D, dtype)
    assert_matches_reference(q, k, v, make_mask(B, H, Q, N, kind, per_head, dtype))


@pytest.mark.parametrize("Q,N,D", [(1, 1, 32), (1, 70, 16), (7, 1, 64), (5, 33, 128), (130, 40, 32),
                                   (6, 300, 16)])
def test_edge_shapes(Q, N, D):
    """Q = 1, N = 1 (one key: dq = dk = 0), several D, Q over one query block (130), and
    N over several chunks of the backward's row-visibility pass (300)."""
    _seed()
    q, k, v = make_qkv(1, 2, Q, N, D, torch.float32)
    assert_matches_reference(q, k, v, make_mask(1, 2, Q, N, "bool", False))


def test_value_dim_differs():
    """v's head dim Dv (48) differs from q/k's D (16): out is [B, H, Q, Dv]."""
    _seed()
    B, H, Q, N = 1, 2, 8, 40
    q, k = make_qkv(B, H, Q, N, 16, torch.float32)[:2]
    v = make_qkv(B, H, Q, N, 48, torch.float32)[2]
    assert_matches_reference(q, k, v, make_mask(B, H, Q, N, "logits", True))


@pytest.mark.parametrize("visible", [0.0, 1.0], ids=["all_blocked", "all_visible"])
def test_all_blocked_equals_unmasked(visible):
    """Every row empty (all blocked) and every key visible both give plain attention."""
    _seed()
    B, H, Q, N, D = 1, 2, 9, 45, 16
    q, k, v = make_qkv(B, H, Q, N, D, torch.float32)
    mask = torch.full((B, Q, N), visible == 0.0, device=DEVICE)
    g = torch.randn(B, H, Q, D, device=DEVICE)
    got = triton_result(q, k, v, mask, 0.25, g)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.25)
    check(got[0], expected, TOLERANCE[torch.float32], "out")
    assert_matches_reference(q, k, v, mask, 0.25)


@pytest.mark.parametrize("layout", ["seq_first", "strided"])
def test_noncontiguous_inputs(layout):
    """q/k/v as strided views, a transposed mask, stride-0 (expanded) masks."""
    _seed()
    B, H, Q, N, D = 1, 2, 11, 40, 16
    q, k, v = make_qkv(B, H, Q, N, D, torch.float32, layout)
    assert not q.is_contiguous() and not k.is_contiguous()
    transposed = make_mask(B, 1, N, Q, "logits", False).transpose(1, 2)
    assert_matches_reference(q, k, v, transposed)
    one_row = make_mask(B, 1, 1, N, "bool", False).expand(B, Q, N)  # stride 0 along Q
    assert_matches_reference(q, k, v, one_row)
    heads_expanded = make_mask(B, 1, Q, N, "bool", False).unsqueeze(1).expand(B, H, Q, N)
    assert_matches_reference(q, k, v, heads_expanded)


CONFIGS = {
    # one query block, many key splits: the combine kernel (all-keys partials discarded)
    # and the backward's single-block path over several key chunks, whose dq partials the
    # last chunk program to arrive sums
    "split": tri.Config(block_q=64, block_n=16, kb_per_split=1),
    "split_skip": tri.Config(block_q=64, block_n=16, kb_per_split=3, skip_tiles=True),
    # several query blocks: the backward's multi-block path (dq read-modify-write)
    "multi_qb": tri.Config(block_q=16, block_n=32, kb_per_split=2),
    "multi_qb_skip": tri.Config(block_q=16, block_n=16, kb_per_split=100, skip_tiles=True),
    # one chunk, one query block: dq written directly, no partials
    "one_chunk": tri.Config(block_q=64, block_n=32, kb_per_split=100, num_stages=3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_configs(name, dtype):
    """Any tiling gives the reference result (the heuristic's choice cannot change it)."""
    _seed()
    cfg = CONFIGS[name]
    B, H, Q, N, D = 1, 2, 37, 83, 32
    q, k, v = make_qkv(B, H, Q, N, D, dtype)
    mask = make_mask(B, H, Q, N, "bool", name == "multi_qb", dtype)
    scale = D ** -0.5
    g = torch.randn(B, H, Q, D, device=DEVICE, dtype=dtype)
    with poisoned_empty():
        out, lse = tri.forward(q, k, v, mask, scale, cfg)
        dq, dk, dv = tri.backward(g, q, k, v, mask, out, lse, scale, cfg)
    want = reference_result(q, k, v, mask, scale, g)
    for what, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), want):
        check(a, b, TOLERANCE[dtype], what)


def test_invisible_key_tiles_are_skipped():
    """Key tiles that no query may see are never read: NaN keys/values there leave every
    output finite and exact, while the same call without skipping turns NaN."""
    _seed()
    B, H, Q, N, D = 1, 2, 12, 96, 16
    # one split: rows switch mode in tile 0
    cfg = tri.Config(block_q=16, block_n=16, kb_per_split=100, skip_tiles=True)
    q, k, v = (t.detach() for t in make_qkv(B, H, Q, N, D, torch.float32))
    mask = make_mask(B, H, Q, N, "bool", False, visible=0.5)
    mask[:, :, :16] = False  # tile 0 fully visible: no row is empty
    mask[:, :, 32:64] = True  # tiles 2 and 3 invisible to every query
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, 32:64], v_nan[:, :, 32:64] = float("nan"), float("nan")
    g = torch.randn(B, H, Q, D, device=DEVICE)
    out, lse = tri.forward(q, k_nan, v_nan, mask, 0.3, cfg)
    dq, dk, dv = tri.backward(g, q, k_nan, v_nan, mask, out, lse, 0.3, cfg)
    want = reference_result(q, k, v, mask, 0.3, g)
    for what, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), want):
        check(a, b, TOLERANCE[torch.float32], what)
    assert (dk[:, :, 32:64] == 0).all() and (dv[:, :, 32:64] == 0).all()
    out_all, _ = tri.forward(q, k_nan, v_nan, mask, 0.3, dataclasses.replace(cfg, skip_tiles=False))
    assert not torch.isfinite(out_all).all()


@pytest.mark.parametrize("kb_per_split", [1, 100], ids=["splits", "one_split"])
def test_skipping_keeps_tiles_empty_rows_need(kb_per_split):
    """Tiles that no row sees are still read for an empty row (it attends to all keys)."""
    _seed()
    B, H, Q, N, D = 1, 2, 9, 64, 16
    cfg = tri.Config(block_q=16, block_n=16, kb_per_split=kb_per_split, skip_tiles=True)
    q, k, v = (t.detach() for t in make_qkv(B, H, Q, N, D, torch.float32))
    mask = torch.ones(B, Q, N, dtype=torch.bool, device=DEVICE)
    mask[:, :, :16] = torch.rand(B, Q, 16, device=DEVICE) < 0.5  # keys only in tile 0...
    mask[:, :, 0] = False
    mask[:, Q // 2] = True  # ...and one empty row
    g = torch.randn(B, H, Q, D, device=DEVICE)
    out, lse = tri.forward(q, k, v, mask, 0.3, cfg)
    grads = tri.backward(g, q, k, v, mask, out, lse, 0.3, cfg)
    want = reference_result(q, k, v, mask, 0.3, g)
    for what, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), want):
        check(a, b, TOLERANCE[torch.float32], what)


def test_many_key_splits():
    """More key splits (19) than the combine merges at once (16): several merge rounds."""
    _seed()
    B, H, Q, N, D = 1, 2, 6, 300, 16
    cfg = tri.Config(block_q=16, block_n=16, kb_per_split=1)
    q, k, v = (t.detach() for t in make_qkv(B, H, Q, N, D, torch.float32))
    mask = make_mask(B, H, Q, N, "bool", False)
    with poisoned_empty():
        out, lse = tri.forward(q, k, v, mask, 0.25, cfg)
    want = reference_result(q, k, v, mask, 0.25, torch.zeros(B, H, Q, D, device=DEVICE))
    check(out, want[0], TOLERANCE[torch.float32], "out")
    check(lse, want[1], TOLERANCE[torch.float32], "lse")


# Plain TF32 (opt-in, never a default): dq = dS @ K follows the cancellation dP - delta,
# which amplifies TF32's 10-bit mantissa; the H200 run measured 1.9e-3 on dq at this shape,
# above DESIGN.md's 1e-3. The bound here documents what the option gives, not a spec.
OPT_IN_TF32_TOLERANCE = 5e-3


def test_tf32_config():
    """fp32 inputs with plain TF32 dots (the opt-in fast fp32 path) stay within the bound
    documented for it."""
    _seed()
    cfg = tri.Config(block_q=64, block_n=32, kb_per_split=1, fp32_dot="tf32")
    B, H, Q, N, D = 1, 2, 20, 70, 32
    q, k, v = (t.detach() for t in make_qkv(B, H, Q, N, D, torch.float32))
    mask = make_mask(B, H, Q, N, "bool", False)
    g = torch.randn(B, H, Q, D, device=DEVICE)
    with poisoned_empty():
        out, lse = tri.forward(q, k, v, mask, 0.2, cfg)
        grads = tri.backward(g, q, k, v, mask, out, lse, 0.2, cfg)
    want = reference_result(q, k, v, mask, 0.2, g)
    for what, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), want):
        check(a, b, OPT_IN_TF32_TOLERANCE if what == "dq" else TF32_TOLERANCE, what)


def test_backward_is_deterministic():
    """dq is summed over key chunks in chunk order by whichever program finishes last:
    two runs agree bit for bit."""
    _seed()
    cfg = tri.Config(block_q=32, block_n=16, kb_per_split=1)
    B, H, Q, N, D = 1, 2, 30, 100, 16
    q, k, v = (t.detach() for t in make_qkv(B, H, Q, N, D, torch.float32))
    mask = make_mask(B, H, Q, N, "bool", False)
    g = torch.randn(B, H, Q, D, device=DEVICE)
    out, lse = tri.forward(q, k, v, mask, 0.25, cfg)
    first = tri.backward(g, q, k, v, mask, out, lse, 0.25, cfg)
    second = tri.backward(g, q, k, v, mask, out, lse, 0.25, cfg)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def count_launches(monkeypatch):
    """List that collects the name of every Triton kernel launched from now on (compiled
    kernels and the interpreter's alike)."""
    launched = []
    kernel_type = type(tri._fwd_kernel)
    real = kernel_type.run

    def run(self, *args, **kwargs):
        launched.append(self.fn.__name__ if hasattr(self, "fn") else self.__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(kernel_type, "run", run)
    return launched


def test_launch_counts(monkeypatch):
    """The forward is the kernel plus the split combine; the backward is two launches (the
    row prologue and the main kernel, dq reduction included) whatever the chunking."""
    _seed()
    B, H, Q, N, D = 1, 2, 10, 50, 16
    q, k, v = (t.detach() for t in make_qkv(B, H, Q, N, D, torch.float32))
    mask = make_mask(B, H, Q, N, "bool", False)
    g = torch.randn(B, H, Q, D, device=DEVICE)
    for cfg in (tri.Config(block_q=16, block_n=16, kb_per_split=1),
                tri.Config(block_q=16, block_n=16, kb_per_split=100)):
        launched = count_launches(monkeypatch)
        out, lse = tri.forward(q, k, v, mask, 0.25, cfg)
        assert launched == (["_fwd_kernel"] if cfg.kb_per_split == 100 else ["_fwd_kernel", "_combine_kernel"])
        launched.clear()
        tri.backward(g, q, k, v, mask, out, lse, 0.25, cfg)
        assert launched == ["_bwd_prologue_kernel", "_bwd_kernel"]
        monkeypatch.undo()


def test_config_override(monkeypatch):
    """M2F_MA_CONFIG overrides the heuristic's rules per pass and dtype class; bad text
    fails with the field named."""
    parsed = tri.parse_rules_override("fwd:block_n=64,num_stages=4; bwd.fp32:fp32_dot=tf32,skip_tiles=1")
    assert parsed[("fwd", "fp32")] == parsed[("fwd", "16bit")] == {"block_n": 64, "num_stages": 4}
    assert parsed[("bwd", "fp32")] == {"fp32_dot": "tf32", "skip_tiles": True}
    assert ("bwd", "16bit") not in parsed
    for bad in ("fwd:blok_n=64", "mid:block_n=64", "bwd:fp32_dot=fp64", "fwd:block_n=big"):
        with pytest.raises(ValueError):
            tri.parse_rules_override(bad)
    q, k, v = (torch.empty(2, 8, s, 32, device=DEVICE) for s in (100, 16384, 16384))
    monkeypatch.setenv(tri.CONFIG_ENV, "fwd.fp32:block_n=16,num_warps=4,block_q_max=64")
    cfg = tri.fwd_config(q, k, v)
    assert (cfg.block_n, cfg.num_warps, cfg.block_q) == (16, 4, 64)
    assert tri.fwd_config(q.bfloat16(), k.bfloat16(), v.bfloat16()).block_n == tri.RULES[("fwd", "16bit")].block_n
    monkeypatch.delenv(tri.CONFIG_ENV)
    assert tri.fwd_config(q, k, v).block_n == tri.RULES[("fwd", "fp32")].block_n


def test_fp32_dots_follow_torch_matmul_precision(monkeypatch):
    """fp32 inputs take TF32 dots exactly when torch allows TF32 for fp32 matmuls; 16-bit
    inputs and an explicit M2F_MA_CONFIG are unaffected."""
    monkeypatch.delenv(tri.CONFIG_ENV, raising=False)
    q, k, v = (torch.empty(2, 8, s, 32, device=DEVICE) for s in (100, 1024, 1024))
    saved = torch.get_float32_matmul_precision()
    try:
        assert tri.fwd_config(q, k, v).fp32_dot == tri.bwd_config(q, k, v).fp32_dot == "tf32x3"
        for precision in ("high", "medium"):
            torch.set_float32_matmul_precision(precision)
            assert tri.fwd_config(q, k, v).fp32_dot == tri.bwd_config(q, k, v).fp32_dot == "tf32"
        assert tri.rules_for(True, fp32=False) == tri.RULES[("bwd", "16bit")]
        monkeypatch.setenv(tri.CONFIG_ENV, "bwd.fp32:fp32_dot=tf32x3")
        assert tri.bwd_config(q, k, v).fp32_dot == "tf32x3"
    finally:
        torch.set_float32_matmul_precision(saved)


def test_configs_from_override_match_reference(monkeypatch):
    """The op (autograd included) under an overridden configuration still matches."""
    _seed()
    monkeypatch.setenv(tri.CONFIG_ENV, "fwd:block_n=16,min_tiles=1,programs_per_sm=4;"
                                       "bwd:block_n=16,min_tiles=1,programs_per_sm=4,skip_tiles=1")
    B, H, Q, N, D = 1, 2, 19, 90, 16
    q, k, v = make_qkv(B, H, Q, N, D, torch.float32)
    assert tri.bwd_config(q, k, v).kb_per_split < triton.cdiv(N, 16)  # several chunks
    assert_matches_reference(q, k, v, make_mask(B, H, Q, N, "logits", False))


# --- full size (GPU) -------------------------------------------------------------------------


def standard_mask(B, Q, N, kind, dtype, device):
    """~30% visible keys, 5% empty rows, as in the benchmark."""
    blocked = torch.rand(B, Q, N, device=device) >= 0.3
    blocked[torch.rand(B, Q, device=device) < 0.05] = True
    if kind == "bool":
        return blocked
    magnitude = torch.rand(B, Q, N, device=device) * 4 + 0.05
    return torch.where(blocked, -magnitude, magnitude).to(dtype)


@requires_gpu
@pytest.mark.parametrize("N", [1024, 4096, 16384])
@pytest.mark.parametrize("Q", [100, 200])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_standard_shapes_gpu(dtype, Q, N):
    _seed()
    B, H, D = 2, 8, 32
    q, k, v = make_qkv(B, H, Q, N, D, dtype, "seq_first", device="cuda")
    kind = "logits" if N == 4096 else "bool"
    assert_matches_reference(q, k, v, standard_mask(B, Q, N, kind, dtype, "cuda"))


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_host_sync_gpu(dtype):
    """Forward and backward never synchronise with the host (CUDA sync debug mode errors)."""
    B, H, Q, N, D = 2, 8, 100, 4096, 32
    q, k, v = (t.detach() for t in make_qkv(B, H, Q, N, D, dtype, device="cuda"))
    mask = standard_mask(B, Q, N, "bool", dtype, "cuda")
    g = torch.randn(B, H, Q, D, device="cuda", dtype=dtype)
    tri.masked_attention_bwd(g, q, k, v, mask, *tri.masked_attention_fwd(q, k, v, mask, 0.2), 0.2)  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, lse = tri.masked_attention_fwd(q, k, v, mask, 0.2)
        tri.masked_attention_bwd(g, q, k, v, mask, out, lse, 0.2)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_gpu
def test_per_head_mask_gpu():
    _seed()
    B, H, Q, N, D = 2, 8, 200, 4096, 32
    q, k, v = make_qkv(B, H, Q, N, D, torch.bfloat16, device="cuda")
    mask = make_mask(B, H, Q, N, "bool", True, device="cuda")
    assert_matches_reference(q, k, v, mask)


# --- the drop-in layer -----------------------------------------------------------------------


class OfficialCrossAttentionLayer(torch.nn.Module):
    """Mask2Former's CrossAttentionLayer (nn.MultiheadAttention), as in the official code."""

    def __init__(self, d_model, nhead, normalize_before=False):
        super().__init__()
        self.multihead_attn = torch.nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.norm = torch.nn.LayerNorm(d_model)
        self.dropout = torch.nn.Dropout(0.0)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                torch.nn.init.xavier_uniform_(p)

    def forward(self, tgt, memory, memory_mask=None, memory_key_padding_mask=None, pos=None, query_pos=None):
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt2 = self.multihead_attn(query=x if query_pos is None else x + query_pos,
                                   key=memory if pos is None else memory + pos, value=memory,
                                   attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask)[0]
        tgt = tgt + self.dropout(tgt2)
        return tgt if self.normalize_before else self.norm(tgt)


def official_mask(blocked, heads):
    """The official decoder's [B*heads, Q, N] mask with its empty-row fix."""
    mask = blocked.unsqueeze(1).repeat(1, heads, 1, 1).flatten(0, 1)
    mask[torch.where(mask.sum(-1) == mask.shape[-1])] = False
    return mask


LAYER_CASES = [("reference", form, pre) for form in ("shared", "official", "logits") for pre in (False, True)]
LAYER_CASES += [("triton", "shared", False), ("triton", "official", True), ("triton", "logits", False)]


@pytest.mark.parametrize("backend,mask_form,normalize_before", LAYER_CASES)
def test_layer_matches_official(backend, mask_form, normalize_before):
    """Same weights (official state dict loaded strictly) -> same output and gradients."""
    _seed()
    C, heads, Q, N, B = 32, 4, 10, 37, 2
    official = OfficialCrossAttentionLayer(C, heads, normalize_before).to(DEVICE)
    layer = nnm.MaskedCrossAttention(C, heads, normalize_before=normalize_before, backend=backend).to(DEVICE)
    layer.load_state_dict(official.state_dict(), strict=True)
    tgt = torch.randn(Q, B, C, device=DEVICE, requires_grad=True)
    memory = torch.randn(N, B, C, device=DEVICE, requires_grad=True)
    pos, query_pos = torch.randn(N, B, C, device=DEVICE), torch.randn(Q, B, C, device=DEVICE)
    logits = make_mask(B, 1, Q, N, "logits", False)
    blocked = logits < 0
    mask = {"shared": blocked, "official": official_mask(blocked, heads), "logits": logits}[mask_form]

    g = torch.randn(Q, B, C, device=DEVICE)
    results = []
    for module, m in ((official, official_mask(blocked, heads)), (layer, mask)):
        out = module(tgt, memory, memory_mask=m, pos=pos, query_pos=query_pos)
        grads = torch.autograd.grad(out, [tgt, memory, *module.parameters()], g)
        results.append((out, *grads))
    names = ["out", "d_tgt", "d_memory"] + [n for n, _ in official.named_parameters()]
    for name, a, b in zip(names, results[1], results[0]):
        check(a, b, TOLERANCE[torch.float32], name)


def test_layer_without_mask_and_with_key_padding():
    """No memory_mask (stride-0 all-visible mask) and key_padding_mask as in MHA."""
    _seed()
    C, heads, Q, N, B = 32, 4, 6, 20, 2
    official = OfficialCrossAttentionLayer(C, heads).to(DEVICE)
    layer = nnm.MaskedCrossAttention(C, heads, backend="triton").to(DEVICE)
    layer.load_state_dict(official.state_dict())
    tgt, memory = torch.randn(Q, B, C, device=DEVICE), torch.randn(N, B, C, device=DEVICE)
    check(layer(tgt, memory), official(tgt, memory), TOLERANCE[torch.float32], "no mask")
    pad = torch.zeros(B, N, dtype=torch.bool, device=DEVICE)
    pad[0, -5:] = True
    check(layer(tgt, memory, memory_key_padding_mask=pad),
          official(tgt, memory, memory_key_padding_mask=pad), TOLERANCE[torch.float32], "key padding")

"""ms_deform_attn: each kernel backend (triton, cuda) against backend='reference' on fresh
random inputs (output and the three gradients), the reference against float64 loops, the
deterministic backward, and the drop-in ``MSDeformAttn`` / ``MSDeformAttnFunction`` against
the official Deformable DETR code.

CPU: the triton backend under TRITON_INTERPRET=1 on tiny shapes; the cuda tests skip (the
dispatcher must say the extension is not built). GPU: the same tests, plus full-size checks
at the docs/ops.md standard shape. Failure messages carry the seed that reproduces them.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import m2f_kernels as mk
from m2f_kernels import _dispatch
from m2f_kernels.nn.ms_deform_attn import MSDeformAttn, MSDeformAttnFunction, level_index
from m2f_kernels.reference import ms_deform_attn as reference
from ._inputs import (
    DEFORM_OUTPUTS, EXACT, FD_TOL, LOOP_LEVELS, LOW_PRECISION, OfficialMSDeformAttn, assert_deform_matches,
    assert_deterministic_twice, bilinear, deform_api, deform_direct, fd_grads, levels, loop_deform_inputs,
    make_deform_inputs, np64, official_core, smooth_coord, softmax, special_coords, special_points,
    standard_deform_inputs,
)
from .conftest import (
    ALL_BACKENDS, CUDA_EXTENSION_BUILT, DEVICE, KERNEL_BACKENDS, TOLERANCE, assert_close, op_module, per_backend,
    poisoned, requires_cuda_backend, requires_gpu,
)

pytestmark = pytest.mark.usefixtures("seed")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FAMILY = "ms_deform_attn"


def _dtype_id(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ============================================================================ against the reference
# Named shapes (levels (H_l, W_l), batch, queries, heads, head dim, points) and where the
# locations/weights live: 'value' in value's dtype, 'fp32' in float32, 'fp32_with_softmax'
# in float32 with the softmax and in value's dtype without.
SHAPES = {
    # mixed level shapes incl. 1x1, a single row and a single column
    "mixed_levels": dict(hw=[(5, 7), (3, 3), (1, 1), (1, 4), (6, 1)], b=2, lq=7, h=2, d=8, p=2),
    # d picks the cuda kernels' channel vector width per lane: 8 (< a warp), 40 (two partial
    # chunks), 96 (2 per lane), 256 (4 fp32 / 8 half per lane: 16-byte loads)
    **{f"d{d}": dict(hw=[(9, 11), (4, 5), (1, 1)], b=2, lq=37, h=3, d=d, p=3) for d in (8, 40, 96, 256)},
    "fp32_aux": dict(hw=[(6, 7), (3, 3)], b=2, lq=19, h=2, d=32, p=4),
}
MATCH_CASES = {
    "triton": [("mixed_levels", "fp32_with_softmax")],
    "cuda": [(f"d{d}", "value") for d in (8, 40, 96, 256)] + [("fp32_aux", "fp32")],
}


@pytest.mark.parametrize("softmax", [False, True], ids=["weights", "softmax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("backend,shape,aux", per_backend(MATCH_CASES, ids=lambda b, c: f"{b}-{c[0]}"))
def test_matches_reference(backend, shape, aux, dtype, softmax, seed):
    """Points outside the maps on every side; weights as given or softmax logits."""
    aux_dtype = {"value": dtype, "fp32": torch.float32,
                 "fp32_with_softmax": torch.float32 if softmax else dtype}[aux]
    dims = SHAPES[shape]
    inputs = make_deform_inputs(dims["hw"], b=dims["b"], lq=dims["lq"], h=dims["h"], d=dims["d"], p=dims["p"],
                                dtype=dtype, aux_dtype=aux_dtype, softmax=softmax)
    assert_deform_matches(backend, inputs, softmax, seed)


@pytest.mark.parametrize("d", [8, 16, 32, 64, 24])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_head_dims(backend, d, seed):
    inputs = make_deform_inputs([(4, 3), (2, 2)], b=1, lq=5, h=2, d=d, p=3, softmax=True)
    assert_deform_matches(backend, inputs, True, seed)


@pytest.mark.parametrize("hw", [[(1, 1)], [(5, 7), (1, 1)]], ids=["one_1x1_level", "two_levels"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_single_query_single_point(backend, hw, seed):
    assert_deform_matches(backend, make_deform_inputs(hw, b=2, lq=1, h=3, d=8, p=1), False, seed)


@pytest.mark.parametrize("softmax", [False, True], ids=["weights", "softmax"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_centres_borders_and_outside(backend, softmax, seed):
    hw = [(4, 8), (2, 1), (1, 1)]
    value, shapes, starts, loc, weights, grad_out = make_deform_inputs(hw, b=1, lq=16, h=2, d=8, p=3, softmax=softmax)
    n = loc[..., 0, 0].numel()
    for lvl, (hh, ww) in enumerate(hw):
        loc[:, :, :, lvl, :, 0] = special_coords(ww, n).view_as(loc[:, :, :, lvl, :, 0]).to(DEVICE)
        loc[:, :, :, lvl, :, 1] = special_coords(hh, n).view_as(loc[:, :, :, lvl, :, 1]).to(DEVICE)
    assert_deform_matches(backend, (value, shapes, starts, loc, weights, grad_out), softmax, seed)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_inputs(backend, seed):
    """Strided views of every tensor argument, including grad_out; both grad_value paths;
    the results come back contiguous."""
    value, shapes, starts, loc, weights, grad_out = make_deform_inputs([(5, 7), (3, 3), (1, 1)], b=2, lq=6, h=2,
                                                                       d=8, p=2)
    value = value.transpose(1, 2).contiguous().transpose(1, 2)  # [B, S, H, D] with H outermost
    loc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    weights = torch.cat([weights, weights], dim=-1)[..., ::2]
    grad_out = grad_out.transpose(0, 1).contiguous().transpose(0, 1)
    shapes = torch.stack([shapes, shapes], dim=0)[1]  # storage offset
    inputs = (value, shapes, starts, loc, weights, grad_out)
    assert not any(t.is_contiguous() for t in (value, loc, weights, grad_out))
    want = deform_direct(reference, inputs, False)
    for deterministic in (False, True):
        with poisoned(backend):
            got = deform_direct(op_module(backend, FAMILY), inputs, False, deterministic)
        for name, g, w in zip(DEFORM_OUTPUTS, got, want):
            assert g.is_contiguous(), f"{name} must be returned contiguous"
            assert_close(g, w, TOLERANCE[torch.float32], f"{name} deterministic={deterministic} (seed {seed})")


# ============================================================================ deterministic backward
# (dtype, softmax, locations/weights in fp32?, levels, queries, head dim, points): many
# queries on the same few pixels, the worst case for atomics.
DETERMINISTIC_CASES = {
    "triton": [(dtype, True, True, [(2, 2), (1, 1), (3, 1)], 40, 8, 2) for dtype in (torch.float32, torch.bfloat16)],
    "cuda": [(dtype, softmax, False, [(7, 8), (3, 4), (1, 1)], 64, 32, 4)
             for dtype in DTYPES for softmax in (False, True)],
}


@pytest.mark.parametrize("backend,dtype,softmax,fp32_aux,hw,lq,d,p", per_backend(
    DETERMINISTIC_CASES, ids=lambda b, c: f"{b}-{_dtype_id(c[0])}-{'softmax' if c[1] else 'weights'}"))
def test_deterministic_backward_is_bitwise_repeatable(backend, dtype, softmax, fp32_aux, hw, lq, d, p, seed):
    """Two deterministic backward runs are bitwise equal and match the reference, and
    torch.use_deterministic_algorithms selects the same path through the public op."""
    inputs = make_deform_inputs(hw, b=2, lq=lq, h=2, d=d, p=p, dtype=dtype,
                                aux_dtype=torch.float32 if fp32_aux else None, softmax=softmax)
    first = assert_deterministic_twice(op_module(backend, FAMILY), inputs, softmax, seed, poison_outputs=True)
    value, shapes, starts, loc, weights, grad_out = inputs
    value = value.detach().requires_grad_()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = mk.ms_deform_attn(value, shapes, starts, loc, weights, softmax=softmax, backend=backend)
        (third,) = torch.autograd.grad(out, value, grad_out)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(third, first[1]), f"use_deterministic_algorithms did not pick the fixed-point path (seed {seed})"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic_through_public_api(backend, seed):
    """deterministic=True on the public op: the reference result, bitwise repeatable."""
    inputs = make_deform_inputs([(3, 4), (1, 1)], b=1, lq=9, h=2, d=8, p=2, softmax=True)
    assert_deform_matches(backend, inputs, True, seed, deterministic=True)
    first = deform_api(backend, *inputs, True, deterministic=True)
    second = deform_api(backend, *inputs, True, deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second)), f"not bitwise repeatable (seed {seed})"


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # interpreter, NaN -> int
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("where", ["grad_out_nan", "grad_out_inf", "logits_nan"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nonfinite_input_reaches_grad_value(backend, where, deterministic):
    """A NaN or inf in grad_out or the weight logits must reach grad_value: the fixed-point
    path must not turn it into a number."""
    inputs = list(make_deform_inputs([(4, 4)], b=1, lq=5, h=1, d=32, p=2, softmax=True))
    inputs[3][0, 0] = 0.5  # query 0 samples the map's centre
    if where.startswith("grad_out"):
        inputs[5][0, 0, 0] = float(where[-3:])
    else:
        inputs[4][0, 0, 0, 0, 0] = float("nan")
    grad_value = deform_direct(op_module(backend, FAMILY), inputs, True, deterministic)[1]
    if where.endswith("nan"):
        assert grad_value.isnan().any(), f"NaN in {where} vanished from grad_value (deterministic={deterministic})"
    assert not torch.isfinite(grad_value).all(), f"{where} vanished from grad_value (deterministic={deterministic})"


# ============================================================================ full size (GPU)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_standard_shape_gpu(backend, dtype, seed):
    assert_deform_matches(backend, standard_deform_inputs(dtype), True, seed)


@requires_gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_standard_shape_deterministic_gpu(backend, seed):
    assert_deterministic_twice(op_module(backend, FAMILY), standard_deform_inputs(torch.float32), True, seed)


@requires_gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_int64_offsets_gpu(backend, deterministic, seed):
    """B*S*H*D > 2**31: batch 1's last level lies past element 2**31 of value (fp16, ~5.4 GB).

    Level 0 gets zero weight, so batch 1's results equal the reference run on the last
    level alone (a small problem that needs no int64 indexing itself).
    """
    hw = [(2048, 2048), (1024, 1024)]
    value, shapes, starts, loc, weights, grad_out = make_deform_inputs(hw, b=2, lq=64, h=8, d=32, p=2,
                                                                       dtype=torch.float16, aux_dtype=torch.float32)
    assert value.numel() > 2**31
    weights[:, :, :, 0] = 0.0
    got = deform_direct(op_module(backend, FAMILY), (value, shapes, starts, loc, weights, grad_out), False,
                        deterministic)
    s1 = int(starts[1])
    small = (value[1:, s1:], shapes[1:], starts[:1] * 0, loc[1:, :, :, 1:], weights[1:, :, :, 1:], grad_out[1:])
    want = deform_direct(reference, small, False)
    assert_close(got[0][1:], want[0], 1e-2, f"output (seed {seed})")
    assert_close(got[1][1:, s1:], want[1], 1e-2, f"grad_value (seed {seed})")
    assert got[1][1:, :s1].abs().max().item() == 0, f"grad_value of the zero-weight level (seed {seed})"
    assert_close(got[2][1:, :, :, 1:], want[2], 1e-4, f"grad_sampling_locations (seed {seed})")
    assert_close(got[3][1:, :, :, 1:], want[3], 1e-4, f"grad_attention_weights (seed {seed})")


# ============================================================================ cuda internals


@requires_cuda_backend
class TestCuda:
    def test_many_levels_and_points(self, seed):
        """L*P = 40 > 32: the cuda kernels' softmax statistics and its backward loop over more
        than one warp's worth."""
        hw = [(5, 6), (4, 4), (3, 2), (2, 2), (1, 3)]
        inputs = make_deform_inputs(hw, b=1, lq=21, h=2, d=32, p=8, softmax=True)
        assert_deform_matches("cuda", inputs, True, seed)


# ============================================================================ the cuda extension


@pytest.mark.skipif(CUDA_EXTENSION_BUILT, reason="the extension is built here; the GPU tests cover it")
def test_dispatcher_reports_cuda_backend_not_built():
    reason = _dispatch.backend_status("cuda", torch.device("cuda"))
    assert reason is not None and "not built" in reason, reason
    inputs = make_deform_inputs([(3, 4)], b=1, lq=2, h=1, d=4, p=1)
    with pytest.raises(mk.BackendUnavailableError, match="not built"):
        mk.ms_deform_attn(*inputs[:5], backend="cuda")


@requires_cuda_backend
def test_cuda_compiled_archs_cover_this_device():
    """The extension holds code for this GPU's architecture (all of its ops, not only this one)."""
    from m2f_kernels import _C

    major, minor = torch.cuda.get_device_capability()
    archs = _C.compiled_archs()
    assert f"sm_{major}{minor}" in archs.split(","), f"compiled for {archs}, device is sm_{major}{minor}"


# ============================================================================ reference vs loops


def loop_ms_deform_attn(value, hw, loc, weights, use_softmax: bool) -> np.ndarray:
    """value [B,S,H,D], loc [B,Lq,H,L,P,2], weights [B,Lq,H,L,P] numpy -> out [B,Lq,H*D]."""
    b_, _, h_, d = value.shape
    _, lq, _, nl, npt, _ = loc.shape
    out = np.zeros((b_, lq, h_ * d))
    for b, i, h in itertools.product(range(b_), range(lq), range(h_)):
        w = weights[b, i, h].reshape(-1)
        w = (softmax(w) if use_softmax else w).reshape(nl, npt)
        start = 0
        for lvl, (hh, ww) in enumerate(hw):
            img = value[b, start:start + hh * ww, h].reshape(hh, ww, d)
            for p in range(npt):
                out[b, i, h * d:(h + 1) * d] += w[lvl, p] * bilinear(img, *loc[b, i, h, lvl, p])
            start += hh * ww
    return out


LOOP_SHAPES = {"general": (2, 3, 2, 3, 2), "Lq=1": (2, 1, 2, 3, 2), "P=1": (1, 3, 2, 2, 1)}  # B, Lq, H, D, P


class TestReferenceMatchesLoops:
    """The reference backend (through the public op and its autograd) against float64 loops
    written from the op contract; gradients against central differences of the loops."""

    @pytest.mark.parametrize("softmax", [False, True], ids=["weights", "softmax"])
    @pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
    @pytest.mark.parametrize("shape", LOOP_SHAPES.values(), ids=LOOP_SHAPES.keys())
    def test_forward(self, shape, contiguous, softmax):
        b, lq, h, d, npt = shape
        value, shapes, starts, loc, weights = loop_deform_inputs(b, lq, h, d, npt, contiguous=contiguous)
        if softmax:
            weights = weights * 6 - 3
        out = mk.ms_deform_attn(value, shapes, starts, loc, weights, softmax=softmax, backend="reference")
        want = loop_ms_deform_attn(np64(value), LOOP_LEVELS, np64(loc), np64(weights), softmax)
        assert out.shape == (b, lq, h * d) and out.is_contiguous()
        assert_close(out, torch.from_numpy(want), EXACT)

    def test_special_points(self):
        """Points on pixel centres, borders and corners; beyond every side they read exactly 0."""
        b, h, d = 2, 2, 3
        per_level = [special_points(hh, ww) for hh, ww in LOOP_LEVELS]
        num_inside, num_outside = len(per_level[0][0]), len(per_level[0][1])
        lq = num_inside + num_outside
        value, shapes, starts, _, _ = loop_deform_inputs(b, lq, h, d, 1)
        loc = torch.empty(b, lq, h, len(LOOP_LEVELS), 1, 2, dtype=torch.float64)
        for lvl, (inside, outside) in enumerate(per_level):
            loc[:, :, :, lvl, 0] = torch.tensor(inside + outside, dtype=torch.float64)[None, :, None]
        weights = torch.rand(b, lq, h, len(LOOP_LEVELS), 1, dtype=torch.float64) + 0.5
        out = mk.ms_deform_attn(value, shapes, starts, loc, weights, backend="reference")
        want = loop_ms_deform_attn(np64(value), LOOP_LEVELS, np64(loc), np64(weights), False)
        assert_close(out, torch.from_numpy(want), EXACT)
        assert (out[:, num_inside:] == 0).all(), "points outside the map must read zeros"
        assert (out[:, :num_inside] != 0).all()

    @pytest.mark.parametrize("dtype", LOW_PRECISION, ids=_dtype_id)
    def test_forward_dtypes(self, dtype):
        value, shapes, starts, loc, weights = loop_deform_inputs(2, 3, 2, 3, 2, dtype=dtype)
        out = mk.ms_deform_attn(value, shapes, starts, loc, weights, backend="reference")
        want = loop_ms_deform_attn(np64(value), LOOP_LEVELS, np64(loc), np64(weights), False)
        assert out.dtype == dtype
        assert_close(out, torch.from_numpy(want), TOLERANCE[dtype])

    @pytest.mark.parametrize("softmax", [False, True], ids=["weights", "softmax"])
    def test_grad(self, softmax):
        b, lq, h, d, npt = 1, 2, 2, 2, 2
        value, shapes, starts, loc, weights = loop_deform_inputs(b, lq, h, d, npt)
        for lvl, (hh, ww) in enumerate(LOOP_LEVELS):  # away from the pixel-grid lines (kinks)
            for idx in itertools.product(range(b), range(lq), range(h), range(npt)):
                loc[idx[:3] + (lvl, idx[3])] = torch.tensor([smooth_coord(ww), smooth_coord(hh)])
        if softmax:
            weights = weights * 6 - 3
        for t in (value, loc, weights):
            t.requires_grad_()
        grad_out = torch.randn(b, lq, h * d, dtype=torch.float64)
        out = mk.ms_deform_attn(value, shapes, starts, loc, weights, softmax=softmax, backend="reference")
        got = torch.autograd.grad(out, (value, loc, weights), grad_out)

        vn, ln, wn, g = np64(value), np64(loc), np64(weights), np64(grad_out)
        want = fd_grads(lambda: float((loop_ms_deform_attn(vn, LOOP_LEVELS, ln, wn, softmax) * g).sum()),
                        [vn, ln, wn])
        for name, gt, wt in zip(("value", "sampling_locations", "attention_weights"), got, want):
            assert_close(gt, torch.from_numpy(wt), FD_TOL, f"grad {name}")

    def test_zero_size(self):
        h, d, npt = 2, 3, 2
        for b, lq in ((0, 3), (2, 0)):
            value, shapes, starts, loc, weights = loop_deform_inputs(b, lq, h, d, npt)
            for t in (value, loc, weights):
                t.requires_grad_()
            out = mk.ms_deform_attn(value, shapes, starts, loc, weights, backend="reference")
            assert out.shape == (b, lq, h * d)
            out.sum().backward()
            for t in (value, loc, weights):
                assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


# ============================================================================ the drop-in module
# against the official code (OfficialMSDeformAttn, official_core in tests/_inputs.py)

MODULE_CFG = dict(d_model=16, n_levels=3, n_heads=2, n_points=2)
MODULE_LEVELS = [(5, 7), (3, 3), (1, 1)]


def official_grid_init(n_heads, n_levels, n_points):
    """The official ``_reset_parameters`` sampling_offsets.bias."""
    thetas = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(n_heads, 1, 1, 2).repeat(1, n_levels, n_points, 1)
    for i in range(n_points):
        grid[:, :, i, :] *= i + 1
    return grid.view(-1)


def test_module_parameters_and_init_match_official():
    ours = MSDeformAttn(**MODULE_CFG)
    theirs = OfficialMSDeformAttn(**MODULE_CFG)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert torch.equal(ours.sampling_offsets.bias.detach(), official_grid_init(2, 3, 2))
    for t in (ours.sampling_offsets.weight, ours.attention_weights.weight, ours.attention_weights.bias,
              ours.value_proj.bias, ours.output_proj.bias):
        assert not t.detach().any()
    assert ours.value_proj.weight.detach().std() > 0 and ours.output_proj.weight.detach().std() > 0
    assert ours.im2col_step == theirs.im2col_step == 64
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_heads=4)
    with pytest.warns(UserWarning, match="power of 2"):
        MSDeformAttn(d_model=24, n_heads=2)  # 12 per head
    with pytest.raises(ValueError, match="2 or 4"):
        q = torch.zeros(1, 2, 16)
        ours(q, torch.zeros(1, 2, 3, 3), torch.zeros(1, 45, 16), *levels(*MODULE_LEVELS, device="cpu")[:2])
    # the official `assert sum(H_l*W_l) == Len_in` (AssertionError): a ValueError from the op here
    with pytest.raises(ValueError, match="sum of H_l"):
        ours(q, torch.zeros(1, 2, 3, 2), torch.zeros(1, 46, 16), *levels(*MODULE_LEVELS, device="cpu")[:2])


def _module_case(ref_dim, dtype):
    """(ours, official) with the same random weights, and random inputs incl. a padding mask:
    [.., 2] points with Len_q = Len_in (the encoder's self-attention), [.., 4] boxes with
    Len_q != Len_in (Deformable DETR's decoder cross-attention with box refinement)."""
    ours = MSDeformAttn(**MODULE_CFG).to(DEVICE, dtype)
    with torch.no_grad():
        for prm in ours.parameters():  # perturb the init so the zero-initialised parameters matter too
            prm.add_(torch.randn_like(prm) * 0.3)
    theirs = OfficialMSDeformAttn(**MODULE_CFG).to(DEVICE, dtype)
    theirs.load_state_dict(ours.state_dict())
    shapes, starts, s = levels(*MODULE_LEVELS)
    n, c = 2, MODULE_CFG["d_model"]
    lq = s if ref_dim == 2 else 7
    query = torch.randn(n, lq, c, device=DEVICE, dtype=dtype)
    ref = torch.rand(n, lq, MODULE_CFG["n_levels"], ref_dim, device=DEVICE, dtype=dtype)
    flat = torch.randn(n, s, c, device=DEVICE, dtype=dtype)
    mask = torch.rand(n, s, device=DEVICE) < 0.2
    return ours, theirs, (query, ref, flat, shapes, starts, mask)


@pytest.mark.parametrize("ref_dim", [2, 4])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_module_matches_official(backend, ref_dim, seed):
    dtype = torch.float64 if backend == "reference" else torch.float32
    ours, theirs, args = _module_case(ref_dim, dtype)
    leaves = [args[i].clone().requires_grad_() for i in range(3)]
    twins = [args[i].clone().requires_grad_() for i in range(3)]
    with mk.use_backend(backend):
        out = ours(*leaves, *args[3:])
    want = theirs(*twins, *args[3:])
    assert_close(out, want, TOLERANCE[dtype], f"output (seed {seed})")
    grad = torch.randn_like(want)
    out.backward(grad)
    want.backward(grad)
    for name, a, b in zip(("query", "reference_points", "input_flatten"), leaves, twins):
        assert_close(a.grad, b.grad, TOLERANCE[dtype], f"grad of {name} (seed {seed})")
    theirs_params = dict(theirs.named_parameters())
    for name, prm in ours.named_parameters():
        assert_close(prm.grad, theirs_params[name].grad, TOLERANCE[dtype], f"grad of {name} (seed {seed})")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_function_apply_matches_official_core(backend, seed):
    dtype = torch.float64 if backend == "reference" else torch.float32
    value, shapes, starts, loc, weights, _ = make_deform_inputs(MODULE_LEVELS, b=2, lq=5, h=2, d=8, p=2, dtype=dtype)
    with mk.use_backend(backend):
        out = MSDeformAttnFunction.apply(value, shapes, starts, loc, weights, 64)
    assert_close(out, official_core(value, shapes, loc, weights), TOLERANCE[dtype], f"output (seed {seed})")


def test_shape_cache_keeps_the_last_layouts_apart_from_inference_mode_and_graph_capture(monkeypatch):
    """``cached``: one build per key, inference-mode values apart, the least recently used key
    dropped past max_entries, nothing stored while a CUDA graph is captured; level_index
    through it returns the same tensors for the same layout."""
    from m2f_kernels.nn.shape_cache import cached

    builds = []

    def build(key):
        return lambda: builds.append(key) or torch.zeros(1)

    cache = {}
    first = cached(cache, "a", build("a"), max_entries=2)
    assert cached(cache, "a", build("a"), max_entries=2) is first and builds == ["a"]
    with torch.inference_mode():
        assert cached(cache, "a", build("a"), max_entries=2) is not first and builds == ["a", "a"]
    cached(cache, "a", build("a"), max_entries=2)  # "a" is now the most recently used
    cached(cache, "b", build("b"), max_entries=2)  # drops the inference-mode "a"
    assert cached(cache, "a", build("a"), max_entries=2) is first and builds == ["a", "a", "b"]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cached(cache, "c", build("c"), max_entries=2)
    assert cached(cache, "a", build("a"), max_entries=2) is first and len(cache) == 2 and builds[-1] == "c"
    monkeypatch.undo()

    levels = {}
    shapes, starts = level_index([(3, 4), (2, 2)], "cpu", levels)
    again = level_index(((3, 4), (2, 2)), torch.device("cpu"), levels)
    assert again[0] is shapes and again[1] is starts
    assert shapes.tolist() == [[3, 4], [2, 2]] and starts.tolist() == [0, 12]

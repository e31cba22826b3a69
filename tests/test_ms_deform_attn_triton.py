"""Triton multi-scale deformable attention (issue 4) against the reference backend,
and the drop-in ``MSDeformAttn`` / ``MSDeformAttnFunction`` against the official code.

On the CPU the kernels run under TRITON_INTERPRET=1 on tiny shapes; on a GPU the same
tests run there, plus full-size checks at the DESIGN.md standard shape. Inputs are
fresh every run; each failure message carries the seed that reproduces it.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import m2f_kernels
from .conftest import DEVICE, TOLERANCE, assert_close, poisoned_empty, requires_gpu, requires_triton
from m2f_kernels import reference
from m2f_kernels.nn.ms_deform_attn import MSDeformAttn, MSDeformAttnFunction

GRAD_NAMES = ("grad_value", "grad_sampling_locations", "grad_attention_weights")


# ----------------------------------------------------------------------------- helpers
def levels(*hw):
    """(spatial_shapes [L, 2], level_start_index [L], S) for level sizes (H_l, W_l)."""
    shapes = torch.tensor(hw, dtype=torch.int64, device=DEVICE)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return shapes, starts, int(sizes.sum())


def make_inputs(hw, b=2, lq=7, h=2, d=8, p=2, dtype=torch.float32, aux_dtype=None, softmax=False):
    """Random (value, shapes, starts, locations, weights, grad_out); points spill outside [0, 1]."""
    aux_dtype = aux_dtype or dtype
    shapes, starts, s = levels(*hw)
    n_levels = len(hw)
    value = torch.randn(b, s, h, d, device=DEVICE).to(dtype)
    loc = (torch.rand(b, lq, h, n_levels, p, 2, device=DEVICE) * 1.4 - 0.2).to(aux_dtype)
    logits = torch.randn(b, lq, h, n_levels, p, device=DEVICE)
    weights = logits if softmax else logits.flatten(-2).softmax(-1).view_as(logits)
    grad_out = torch.randn(b, lq, h * d, device=DEVICE).to(dtype)
    return value, shapes, starts, loc, weights.to(aux_dtype), grad_out


def run_api(backend, value, shapes, starts, loc, weights, grad_out, softmax, deterministic=False):
    """(out, grad_value, grad_loc, grad_weights) through the public op and autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, weights)]
    out = m2f_kernels.ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], softmax=softmax,
                                     deterministic=deterministic, backend=backend)
    out.backward(grad_out)
    return (out.detach(),) + tuple(t.grad for t in leaves)


def check_against_reference(inputs, softmax, seed, deterministic=False):
    """Triton output and the three gradients vs the reference backend, dtype and tolerance per tensor."""
    with poisoned_empty():
        got = run_api("triton", *inputs, softmax, deterministic)
    want = run_api("reference", *inputs, softmax)
    for name, g, w in zip(("output",) + GRAD_NAMES, got, want):
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype} (seed {seed})"
        assert_close(g, w, TOLERANCE[w.dtype], f"{name} (seed {seed})")


def call_backend(module, inputs, softmax, deterministic=False):
    """(out, grad_value, grad_loc, grad_weights) from a backend's fwd/bwd functions directly."""
    value, shapes, starts, loc, weights, grad_out = inputs
    out = module.ms_deform_attn_fwd(value, shapes, starts, loc, weights, softmax)
    grads = module.ms_deform_attn_bwd(grad_out, value, shapes, starts, loc, weights, softmax, deterministic)
    return (out,) + tuple(grads)


def check_deterministic_twice(module, inputs, softmax, seed, poison_outputs=False):
    """Two deterministic runs of ``module`` are bitwise equal and match the reference.
    Returns the first run's (out, grad_value, grad_loc, grad_weights)."""
    with poisoned_empty() if poison_outputs else contextlib.nullcontext():
        first = call_backend(module, inputs, softmax, deterministic=True)
        second = call_backend(module, inputs, softmax, deterministic=True)
    for name, a, b in zip(("output",) + GRAD_NAMES, first, second):
        assert torch.equal(a, b), f"{name}: deterministic backward differs between two runs (seed {seed})"
    want = call_backend(reference, inputs, softmax)
    for name, g, w in zip(("output",) + GRAD_NAMES, first, want):
        assert_close(g, w, TOLERANCE[w.dtype], f"{name} (seed {seed})")
    return first


def triton_backend():
    from m2f_kernels.triton import ms_deform_attn as module

    return module


# ----------------------------------------------------------------------------- kernel vs reference
@requires_triton
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(dtype, softmax):
    """Mixed level shapes incl. 1x1, a single row and a single column; points outside on every side."""
    seed = torch.seed()
    aux = torch.float32 if softmax else dtype  # locations/weights in fp32 or in value's dtype
    inputs = make_inputs([(5, 7), (3, 3), (1, 1), (1, 4), (6, 1)], dtype=dtype, aux_dtype=aux, softmax=softmax)
    check_against_reference(inputs, softmax, seed)


@requires_triton
@pytest.mark.parametrize("d", [8, 16, 32, 64, 24])
def test_head_dims(d):
    seed = torch.seed()
    check_against_reference(make_inputs([(4, 3), (2, 2)], b=1, lq=5, h=2, d=d, p=3, softmax=True), True, seed)


@requires_triton
@pytest.mark.parametrize("hw", [[(1, 1)], [(5, 7), (1, 1)]], ids=["one_1x1_level", "two_levels"])
def test_single_query_single_point(hw):
    seed = torch.seed()
    check_against_reference(make_inputs(hw, b=2, lq=1, h=3, d=8, p=1), False, seed)


def special_coords(size: int, n: int) -> torch.Tensor:
    """n coordinates along an axis of ``size`` pixels: exact pixel centres, borders, outside both sides.

    Power-of-two sizes keep the centres (i + 0.5) / size and loc * size - 0.5 exact in
    fp32, so both implementations pick the same corners where the bilinear kink is.
    """
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    special = torch.tensor([0.0, 1.0, -0.5 / size, 1 + 0.5 / size, -0.25, 1.25, -1e6, 1e6], dtype=torch.float64)
    pool = torch.cat([centres, special])
    return pool[torch.randint(len(pool), (n,))].float()


@requires_triton
@pytest.mark.parametrize("softmax", [False, True])
def test_centres_borders_and_outside(softmax):
    seed = torch.seed()
    hw = [(4, 8), (2, 1), (1, 1)]
    value, shapes, starts, loc, weights, grad_out = make_inputs(hw, b=1, lq=16, h=2, d=8, p=3, softmax=softmax)
    n = loc[..., 0, 0].numel()
    for lvl, (hh, ww) in enumerate(hw):
        loc[:, :, :, lvl, :, 0] = special_coords(ww, n).view_as(loc[:, :, :, lvl, :, 0]).to(DEVICE)
        loc[:, :, :, lvl, :, 1] = special_coords(hh, n).view_as(loc[:, :, :, lvl, :, 1]).to(DEVICE)
    check_against_reference((value, shapes, starts, loc, weights, grad_out), softmax, seed)


@requires_triton
def test_non_contiguous_inputs():
    """Strided views of every tensor argument, including grad_out; both grad_value paths."""
    seed = torch.seed()
    value, shapes, starts, loc, weights, grad_out = make_inputs([(5, 7), (3, 3), (1, 1)], b=2, lq=6, h=2, d=8, p=2)
    value = value.transpose(1, 2).contiguous().transpose(1, 2)  # [B, S, H, D] with H outermost
    loc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    weights = torch.cat([weights, weights], dim=-1)[..., ::2]
    grad_out = grad_out.transpose(0, 1).contiguous().transpose(0, 1)
    shapes = torch.stack([shapes, shapes], dim=0)[1]  # storage offset
    inputs = (value, shapes, starts, loc, weights, grad_out)
    assert not any(t.is_contiguous() for t in (value, loc, weights, grad_out))
    want = call_backend(reference, inputs, False)
    for deterministic in (False, True):
        with poisoned_empty():
            got = call_backend(triton_backend(), inputs, False, deterministic)
        for name, g, w in zip(("output",) + GRAD_NAMES, got, want):
            assert g.is_contiguous(), f"{name} must be returned contiguous"
            assert_close(g, w, TOLERANCE[torch.float32], f"{name} deterministic={deterministic} (seed {seed})")


# ----------------------------------------------------------------------------- deterministic backward
@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_backward_is_bitwise_repeatable(dtype):
    """Many queries hit the same few pixels (tiny levels), the worst case for atomics."""
    seed = torch.seed()
    inputs = make_inputs([(2, 2), (1, 1), (3, 1)], b=2, lq=40, h=2, d=8, p=2, dtype=dtype,
                         aux_dtype=torch.float32, softmax=True)
    first = check_deterministic_twice(triton_backend(), inputs, True, seed, poison_outputs=True)
    # torch.use_deterministic_algorithms selects the same path through the public op.
    value, shapes, starts, loc, weights, grad_out = inputs
    value = value.detach().requires_grad_()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = m2f_kernels.ms_deform_attn(value, shapes, starts, loc, weights, softmax=True, backend="triton")
        (third,) = torch.autograd.grad(out, value, grad_out)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(third, first[1]), f"use_deterministic_algorithms did not pick the fixed-point path (seed {seed})"


@requires_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # interpreter, NaN -> int
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("where", ["grad_out", "logits"])
def test_nonfinite_input_gives_nan_grad_value(where, deterministic):
    """A NaN must reach grad_value: the fixed-point path must not turn it into a number."""
    inputs = list(make_inputs([(3, 3)], b=1, lq=4, h=1, d=8, p=2, softmax=True))
    inputs[3][0, 0] = 0.5  # query 0 samples the map's centre
    if where == "grad_out":
        inputs[5][0, 0, 0] = float("nan")
    else:
        inputs[4][0, 0, 0, 0, 0] = float("nan")
    grad_value = call_backend(triton_backend(), inputs, True, deterministic)[1]
    assert grad_value.isnan().any(), f"NaN in {where} vanished from grad_value (deterministic={deterministic})"


@requires_triton
def test_deterministic_through_public_api():
    seed = torch.seed()
    inputs = make_inputs([(3, 4), (1, 1)], b=1, lq=9, h=2, d=8, p=2, softmax=True)
    check_against_reference(inputs, True, seed, deterministic=True)
    first = run_api("triton", *inputs, True, deterministic=True)
    second = run_api("triton", *inputs, True, deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second)), f"not bitwise repeatable (seed {seed})"


# ----------------------------------------------------------------------------- GPU, full size
STANDARD_LEVELS = [(128, 128), (64, 64), (32, 32)]  # Lq = S = 21504


def off_grid_lines(loc, shapes, margin=1e-3):
    """Move each point at least ``margin`` pixel away from its level's pixel-grid lines.

    Bilinear sampling has no derivative with respect to the location on a grid line; a
    point within rounding of one may floor to either cell, and the two correct kernels
    then give location gradients that differ by O(1) for that point. At the standard
    shape (~4M points) a few dozen such points are expected per run on random data
    (seen on the H200: 4e-4 to 8e-4 relative error in grad_sampling_locations), so the
    full-size comparison keeps points clear of the lines.
    """
    size = shapes.flip(-1).to(loc.dtype).view(1, 1, 1, -1, 1, 2)  # (W_l, H_l) per level
    pix = loc * size - 0.5
    cell = pix.floor()
    pix = cell + margin + (pix - cell) * (1 - 2 * margin)
    return (pix + 0.5) / size


def standard_inputs(dtype):
    shapes, starts, s = levels(*STANDARD_LEVELS)
    value, shapes, starts, loc, weights, grad_out = make_inputs(
        STANDARD_LEVELS, b=2, lq=s, h=8, d=32, p=4, dtype=dtype, aux_dtype=torch.float32, softmax=True)
    return value, shapes, starts, off_grid_lines(loc, shapes), weights, grad_out


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_standard_shape_gpu(dtype):
    seed = torch.seed()
    check_against_reference(standard_inputs(dtype), True, seed)


@requires_gpu
def test_standard_shape_deterministic_gpu():
    seed = torch.seed()
    check_deterministic_twice(triton_backend(), standard_inputs(torch.float32), True, seed)


def check_int64_offsets(backend, deterministic):
    """B*S*H*D > 2**31: batch 1's last level lies past element 2**31 of value (fp16, ~5.4 GB).

    Level 0 gets zero weight, so batch 1's results equal the reference run on the last
    level alone (a small problem that needs no int64 indexing itself).
    """
    seed = torch.seed()
    hw = [(2048, 2048), (1024, 1024)]
    value, shapes, starts, loc, weights, grad_out = make_inputs(hw, b=2, lq=64, h=8, d=32, p=2,
                                                                dtype=torch.float16, aux_dtype=torch.float32)
    assert value.numel() > 2**31
    weights[:, :, :, 0] = 0.0
    got = call_backend(backend, (value, shapes, starts, loc, weights, grad_out), False, deterministic)
    s1 = int(starts[1])
    small = (value[1:, s1:], shapes[1:], starts[:1] * 0, loc[1:, :, :, 1:], weights[1:, :, :, 1:], grad_out[1:])
    want = call_backend(reference, small, False)
    assert_close(got[0][1:], want[0], 1e-2, f"output (seed {seed})")
    assert_close(got[1][1:, s1:], want[1], 1e-2, f"grad_value (seed {seed})")
    assert got[1][1:, :s1].abs().max().item() == 0, f"grad_value of the zero-weight level (seed {seed})"
    assert_close(got[2][1:, :, :, 1:], want[2], 1e-4, f"grad_sampling_locations (seed {seed})")
    assert_close(got[3][1:, :, :, 1:], want[3], 1e-4, f"grad_attention_weights (seed {seed})")


@requires_gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_int64_offsets_gpu(deterministic):
    check_int64_offsets(triton_backend(), deterministic)


# ----------------------------------------------------------------------------- drop-in module
def official_core(value, value_spatial_shapes, sampling_locations, attention_weights):
    """Deformable DETR's ``ms_deform_attn_core_pytorch`` (the official CPU path), verbatim in logic."""
    n_, s_, m_, d_ = value.shape
    _, lq_, m_, l_, p_, _ = sampling_locations.shape
    hw = [tuple(x) for x in value_spatial_shapes.tolist()]
    value_list = value.split([h_ * w_ for h_, w_ in hw], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for lid_, (h_, w_) in enumerate(hw):
        value_l_ = value_list[lid_].flatten(2).transpose(1, 2).reshape(n_ * m_, d_, h_, w_)
        sampling_grid_l_ = sampling_grids[:, :, :, lid_].transpose(1, 2).flatten(0, 1)
        sampling_value_list.append(
            F.grid_sample(value_l_, sampling_grid_l_, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    attention_weights = attention_weights.transpose(1, 2).reshape(n_ * m_, 1, lq_, l_ * p_)
    output = (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights).sum(-1).view(n_, m_ * d_, lq_)
    return output.transpose(1, 2).contiguous()


class OfficialMSDeformAttn(torch.nn.Module):
    """The official module's forward on the pure PyTorch core (parameters loaded from ours)."""

    def __init__(self, d_model, n_levels, n_heads, n_points):
        super().__init__()
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = torch.nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = torch.nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = torch.nn.Linear(d_model, d_model)
        self.output_proj = torch.nn.Linear(d_model, d_model)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):
        n, len_q, _ = query.shape
        n, len_in, _ = input_flatten.shape
        assert (input_spatial_shapes[:, 0] * input_spatial_shapes[:, 1]).sum() == len_in
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], float(0))
        value = value.view(n, len_in, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(n, len_q, self.n_heads, self.n_levels, self.n_points, 2)
        attention_weights = self.attention_weights(query).view(n, len_q, self.n_heads, self.n_levels * self.n_points)
        attention_weights = F.softmax(attention_weights, -1).view(n, len_q, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            offset_normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            sampling_locations = reference_points[:, :, None, :, None, :] \
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
        else:
            sampling_locations = reference_points[:, :, None, :, None, :2] \
                + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
        output = official_core(value, input_spatial_shapes, sampling_locations, attention_weights)
        return self.output_proj(output)


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
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="2 or 4"):
        q = torch.zeros(1, 2, 16)
        ours(q, torch.zeros(1, 2, 3, 3), torch.zeros(1, 45, 16), *levels(*MODULE_LEVELS)[:2])


def _module_case(ref_dim, dtype):
    """(ours, official) with the same random weights, and random inputs incl. a padding mask."""
    ours = MSDeformAttn(**MODULE_CFG).to(DEVICE, dtype)
    with torch.no_grad():
        for prm in ours.parameters():  # perturb the init so the zero-initialised parameters matter too
            prm.add_(torch.randn_like(prm) * 0.3)
    theirs = OfficialMSDeformAttn(**MODULE_CFG).to(DEVICE, dtype)
    theirs.load_state_dict(ours.state_dict())
    shapes, starts, s = levels(*MODULE_LEVELS)
    n, c = 2, MODULE_CFG["d_model"]
    query = torch.randn(n, s, c, device=DEVICE, dtype=dtype)
    ref = torch.rand(n, s, MODULE_CFG["n_levels"], ref_dim, device=DEVICE, dtype=dtype)
    flat = torch.randn(n, s, c, device=DEVICE, dtype=dtype)
    mask = torch.rand(n, s, device=DEVICE) < 0.2
    return ours, theirs, (query, ref, flat, shapes, starts, mask)


@pytest.mark.parametrize("ref_dim", [2, 4])
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
def test_module_matches_official(backend, ref_dim):
    seed = torch.seed()
    dtype = torch.float64 if backend == "reference" else torch.float32
    ours, theirs, args = _module_case(ref_dim, dtype)
    leaves = [args[i].clone().requires_grad_() for i in range(3)]
    twins = [args[i].clone().requires_grad_() for i in range(3)]
    with m2f_kernels.use_backend(backend):
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


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
def test_function_apply_matches_official_core(backend):
    seed = torch.seed()
    dtype = torch.float64 if backend == "reference" else torch.float32
    value, shapes, starts, loc, weights, _ = make_inputs(MODULE_LEVELS, b=2, lq=5, h=2, d=8, p=2, dtype=dtype)
    with m2f_kernels.use_backend(backend):
        out = MSDeformAttnFunction.apply(value, shapes, starts, loc, weights, 64)
    assert_close(out, official_core(value, shapes, loc, weights), TOLERANCE[dtype], f"output (seed {seed})")

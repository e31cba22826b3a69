"""Drop-in compatibility: ``m2f_kernels.compat`` against the official deformable-attention
code, and the ops' autocast rules (``m2f_kernels.ops._autocast``).

The official module and its pure-PyTorch core are the verbatim-logic copies in
tests/_inputs.py. Autocast runs on DEVICE (CPU bf16 here; CUDA on a GPU).
"""
from __future__ import annotations

import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import m2f_kernels
import m2f_kernels.ops._autocast as autocast_rules
from m2f_kernels import compat
from m2f_kernels.nn import MSDeformAttn, MSDeformAttnFunction
from .conftest import DEVICE, TOLERANCE, assert_close, requires_triton
from ._inputs import OfficialMSDeformAttn, levels, official_core

LEVELS = [(6, 5), (3, 3), (2, 1)]
CFG = dict(d_model=16, n_levels=3, n_heads=2, n_points=3)
BACKENDS = ["reference", pytest.param("triton", marks=requires_triton)]


# ----------------------------------------------------------------------------- official API
def test_compat_reexports_the_drop_in_module():
    assert compat.MSDeformAttn is MSDeformAttn and compat.MSDeformAttnFunction is MSDeformAttnFunction
    assert set(compat.__all__) == {"MSDeformAttn", "MSDeformAttnFunction", "ms_deform_attn_core_pytorch"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_loads_official_state_dict_and_matches_official(backend):
    """A state dict saved from the official module loads strictly; output and gradients match."""
    seed = torch.seed()
    dtype = torch.float64 if backend == "reference" else torch.float32
    official = OfficialMSDeformAttn(**CFG).to(DEVICE, dtype)  # nn.Linear's random init: generic points
    buffer = io.BytesIO()
    torch.save(official.state_dict(), buffer)
    buffer.seek(0)
    ours = compat.MSDeformAttn(**CFG).to(DEVICE, dtype)
    ours.load_state_dict(torch.load(buffer), strict=True)

    shapes, starts, s = levels(*LEVELS)
    n = 2
    args = [torch.randn(n, s, CFG["d_model"], device=DEVICE, dtype=dtype),
            torch.rand(n, s, CFG["n_levels"], 2, device=DEVICE, dtype=dtype),
            torch.randn(n, s, CFG["d_model"], device=DEVICE, dtype=dtype)]
    padding = torch.rand(n, s, device=DEVICE) < 0.2
    mine = [a.clone().requires_grad_() for a in args]
    theirs = [a.clone().requires_grad_() for a in args]
    with m2f_kernels.use_backend(backend):
        out = ours(*mine, shapes, starts, padding)
    want = official(*theirs, shapes, starts, padding)
    tol = TOLERANCE[dtype]
    assert_close(out, want, tol, f"output (seed {seed})")
    grad = torch.randn_like(want)
    out.backward(grad)
    want.backward(grad)
    for name, a, b in zip(("query", "reference_points", "input_flatten"), mine, theirs):
        assert_close(a.grad, b.grad, tol, f"grad of {name} (seed {seed})")
    official_params = dict(official.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, official_params[name].grad, tol, f"grad of {name} (seed {seed})")


@pytest.mark.parametrize("shapes_as", ["tensor", "list"])
def test_core_pytorch_matches_official(shapes_as):
    seed = torch.seed()
    shapes, _, s = levels(*LEVELS)
    b, lq, h, d, p = 2, 5, 2, 4, 3
    value = torch.randn(b, s, h, d, device=DEVICE, dtype=torch.float64)
    loc = torch.rand(b, lq, h, len(LEVELS), p, 2, device=DEVICE, dtype=torch.float64) * 1.3 - 0.15
    weights = torch.rand(b, lq, h, len(LEVELS), p, device=DEVICE, dtype=torch.float64)
    spatial = shapes if shapes_as == "tensor" else [tuple(x) for x in shapes.tolist()]
    mine = [t.clone().requires_grad_() for t in (value, loc, weights)]
    theirs = [t.clone().requires_grad_() for t in (value, loc, weights)]
    with m2f_kernels.use_backend("reference"):
        out = compat.ms_deform_attn_core_pytorch(mine[0], spatial, mine[1], mine[2])
    want = official_core(theirs[0], shapes, theirs[1], theirs[2])
    assert_close(out, want, 1e-10, f"output (seed {seed})")
    grad = torch.randn_like(want)
    out.backward(grad)
    want.backward(grad)
    for name, a, w in zip(("value", "sampling_locations", "attention_weights"), mine, theirs):
        assert_close(a.grad, w.grad, 1e-10, f"grad of {name} (seed {seed})")


# ----------------------------------------------------------------------------- autocast
LOW = torch.bfloat16


def amp():
    return torch.autocast(DEVICE, dtype=LOW)


def test_autocast_kernels_are_registered():
    for name in autocast_rules.RULES:
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"m2f_kernels::{name}", key), f"{name} {key}"
    assert set(autocast_rules.RULES) == {
        "masked_attention", "ms_deform_attn", "point_sample", "uncertain_point_coords", "point_mask_loss",
        "pairwise_mask_cost", "linear_sum_assignment", "point_mask_logits"}


def _leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


def test_autocast_masked_attention_runs_in_the_autocast_dtype():
    seed = torch.seed()
    q = torch.randn(2, 2, 5, 8, device=DEVICE)
    k, v = torch.randn(2, 2, 7, 8, device=DEVICE), torch.randn(2, 2, 7, 8, device=DEVICE)
    mask = torch.rand(2, 5, 7, device=DEVICE) - 0.5  # floating logits: must not be cast
    mine, theirs = _leaves(q, k, v), _leaves(q, k, v)
    with amp():
        out = m2f_kernels.masked_attention(*mine, mask)
    want = m2f_kernels.masked_attention(*(t.to(LOW) for t in theirs), mask)
    assert out.dtype == LOW
    assert torch.equal(out, want), f"seed {seed}"
    grad = torch.randn_like(want)
    out.backward(grad)
    want.backward(grad)
    for a, w in zip(mine, theirs):
        assert a.grad.dtype == torch.float32 and torch.equal(a.grad, w.grad), f"seed {seed}"
    # float64 is never cast (autocast's own rule); outside autocast nothing is cast
    with amp():
        assert m2f_kernels.masked_attention(*(t.double() for t in (q, k, v)), mask, backend="reference").dtype \
            == torch.float64
    assert m2f_kernels.masked_attention(q, k, v, mask).dtype == torch.float32


def _deform_inputs():
    shapes, starts, s = levels(*LEVELS)
    value = torch.randn(2, s, 2, 8, device=DEVICE)
    loc = torch.rand(2, 6, 2, len(LEVELS), 3, 2, device=DEVICE) * 1.2 - 0.1
    logits = torch.randn(2, 6, 2, len(LEVELS), 3, device=DEVICE)
    return value, shapes, starts, loc, logits


def test_autocast_ms_deform_attn_keeps_locations_and_weights_fp32():
    """value in the autocast dtype; bf16 locations/weights (as a bf16 Linear gives) go back to fp32."""
    seed = torch.seed()
    value, shapes, starts, loc, logits = _deform_inputs()
    loc, logits = loc.to(LOW), logits.to(LOW)
    mine, theirs = _leaves(value, loc, logits), _leaves(value, loc, logits)
    with amp():
        out = m2f_kernels.ms_deform_attn(mine[0], shapes, starts, mine[1], mine[2], softmax=True)
    want = m2f_kernels.ms_deform_attn(theirs[0].to(LOW), shapes, starts, theirs[1].float(), theirs[2].float(),
                                      softmax=True)
    assert out.dtype == LOW
    assert torch.equal(out, want), f"seed {seed}"
    grad = torch.randn_like(want)
    out.backward(grad)
    want.backward(grad)
    for name, a, w in zip(("value", "loc", "weights"), mine, theirs):
        assert a.grad.dtype == w.grad.dtype
        assert_close(a.grad, w.grad, 1e-6, f"grad of {name} (seed {seed})")


def test_autocast_official_function_and_core_run_value_in_its_own_dtype():
    """The official autograd.Function has no autocast rule and its core's grid_sample casts
    nothing down: an fp32 call inside an autocast region stays fp32 (output and gradients)."""
    seed = torch.seed()
    value, shapes, starts, loc, logits = _deform_inputs()
    weights = logits.softmax(-1)
    calls = {"MSDeformAttnFunction.apply":
             lambda v, l, w: compat.MSDeformAttnFunction.apply(v, shapes, starts, l, w, 64),
             "ms_deform_attn_core_pytorch": lambda v, l, w: compat.ms_deform_attn_core_pytorch(v, shapes, l, w)}
    for name, call in calls.items():
        mine, theirs = _leaves(value, loc, weights), _leaves(value, loc, weights)
        with amp():
            out = call(*mine)
            want = official_core(theirs[0], shapes, *theirs[1:])
        assert out.dtype == want.dtype == torch.float32, name
        assert_close(out, want, TOLERANCE[torch.float32], f"{name} (seed {seed})")
        grad = torch.randn_like(want)
        out.backward(grad)
        want.backward(grad)
        for arg, a, w in zip(("value", "loc", "weights"), mine, theirs):
            assert a.grad.dtype == torch.float32, f"{name}: grad of {arg}"
            assert_close(a.grad, w.grad, TOLERANCE[torch.float32], f"{name}: grad of {arg} (seed {seed})")


class ArgDtypes(TorchDispatchMode):
    """Records the floating dtypes each m2f_kernels op receives below the autocast layer."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, name = func.name().partition("::")
        if namespace == "m2f_kernels" and name in autocast_rules.RULES:
            self.seen[name] = {arg.name: a.dtype for arg, a in zip(func._schema.arguments, args)
                               if isinstance(a, torch.Tensor) and a.is_floating_point()}
        return func(*args, **(kwargs or {}))


def test_autocast_casts_each_argument_as_its_rule_says():
    """fp32 where a rule may lower, bf16 where it may raise: every cast (or its absence) shows."""
    f32 = torch.float32
    value, shapes, starts, loc, logits = _deform_inputs()
    pred = torch.randn(2, 4, 9, 11, device=DEVICE, dtype=LOW)
    target = torch.rand(3, 13, 10, device=DEVICE) < 0.5
    coords = torch.rand(3, 20, 2, device=DEVICE, dtype=LOW)
    index = (torch.tensor([0, 1, 1], device=DEVICE), torch.tensor([3, 0, 2], device=DEVICE))
    qkv = [torch.randn(2, 2, 5, 8, device=DEVICE) for _ in range(3)]
    spy = ArgDtypes()
    with amp(), spy:
        m2f_kernels.masked_attention(*qkv, torch.randn(2, 5, 5, device=DEVICE))
        m2f_kernels.ms_deform_attn(value, shapes, starts, loc.to(LOW), logits.to(LOW))
        m2f_kernels.point_sample(pred, coords[:2])
        torch.ops.m2f_kernels.uncertain_point_coords(pred, coords, coords[:, :4], 8, *index, "reference")
        losses = m2f_kernels.point_mask_loss(pred, target, coords, 3.0, pred_index=index)
        m2f_kernels.pairwise_mask_cost(pred[1], target, coords[0])
    assert spy.seen == {
        "masked_attention": dict(q=LOW, k=LOW, v=LOW, mask=f32),
        "ms_deform_attn": dict(value=LOW, sampling_locations=f32, attention_weights=f32),
        "point_sample": dict(input=LOW, coords=f32),
        "uncertain_point_coords": dict(logits=LOW, candidates=f32, random=f32),
        "point_mask_loss": dict(pred=LOW, coords=f32),
        "pairwise_mask_cost": dict(pred=LOW, coords=f32),
    }
    assert all(loss.dtype == f32 for loss in losses), "point_mask_loss returns float32 losses under autocast"
    want = m2f_kernels.point_mask_loss(pred, target, coords.float(), 3.0, pred_index=index)
    assert all(torch.equal(a, w.float()) for a, w in zip(losses, want))


def test_autocast_point_mask_loss_gradient():
    seed = torch.seed()
    pred = torch.randn(2, 4, 9, 11, device=DEVICE, dtype=LOW)
    target = torch.rand(3, 13, 10, device=DEVICE) < 0.5
    coords = torch.rand(3, 20, 2, device=DEVICE)
    index = (torch.tensor([0, 1, 1], device=DEVICE), torch.tensor([3, 0, 2], device=DEVICE))
    mine, theirs = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    with amp():
        bce, dice = m2f_kernels.point_mask_loss(mine, target, coords, 3.0, pred_index=index)
    (2 * bce + 5 * dice).backward()
    want_bce, want_dice = m2f_kernels.point_mask_loss(theirs, target, coords, 3.0, pred_index=index)
    (2 * want_bce.float() + 5 * want_dice.float()).backward()
    assert mine.grad.dtype == LOW and torch.equal(mine.grad, theirs.grad), f"seed {seed}"


def test_autocast_under_torch_compile():
    """The autocast kernels trace: a compiled function gives the eager autocast result."""
    seed = torch.seed()
    value, shapes, starts, loc, logits = _deform_inputs()

    def fn(value, loc, logits):
        with amp():
            out = m2f_kernels.ms_deform_attn(value, shapes, starts, loc, logits, softmax=True)
            return torch.nn.functional.linear(out, torch.ones(3, out.shape[-1], device=out.device))

    want = fn(value, loc.to(LOW), logits.to(LOW))
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(value, loc.to(LOW), logits.to(LOW))
    assert got.dtype == want.dtype == LOW
    assert torch.equal(got, want), f"seed {seed}"

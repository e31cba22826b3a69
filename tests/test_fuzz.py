"""Seeded fuzz: every available kernel backend against the reference, per op and dtype.

Each case draws its shapes (ones, odd sizes, empty dims), layouts (non-contiguous views),
value regimes (ordinary, large, all zero) and, in about half the cases, NaN / +inf / -inf in
one floating argument (coordinates, maps, weights, logits, q / k / v, grad_out); the op
runs forward and backward on the backend and on the reference with CPU copies of the
inputs (the contract: docs/ops.md, "Non-finite values"), and the results agree as that
section states: NaN and ±inf where the contract has them (for ±inf in a map, weight or
logit: non-finite where it is), within the dtype's tolerance where finite; masked attention
with NaN / inf in q, k, v or grad_out: non-finite only where the dense reference is (±inf
in q or k: compared where both are finite); ms_deform_attn's deterministic grad_value: NaN
at least where the contract is non-finite. linear_sum_assignment has no triton backend: its
cases run on cuda only (the same targets matched, the same total cost; NaN, which the op
refuses on CPU tensors, becomes +inf there). Error denominators
are floored (masked attention: at the norm of the sums of |terms|, the scale of 16-bit
rounding in sums that cancel, e.g. dq with few keys). A call beyond a backend's declared
limits (BackendUnavailableError) is skipped for that backend. Where no GPU is, the cuda
backend's kernels run on the CPU as ``cuda-emulated`` (tests/cuda_emulation).

Counts: ``M2F_FUZZ_CASES`` cases per op and dtype (default ``CI_CASES``, sized for the
interpreter: ~30 s of CPU time for the file), and the GPU run, ``test_fuzz_gpu`` (marked gpu
and slow), ``M2F_FUZZ_GPU_CASES`` (default 1000) per op and dtype. ``M2F_FUZZ_SEED`` moves
the seeds; a failure names its case, and ``M2F_FUZZ_ONLY=<op>:<dtype>:<case>`` reruns just
that case.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from typing import Callable, Optional

import pytest
import torch

import m2f_kernels as mk
from . import cuda_emulation
from ._inputs import levels, make_mask, make_qkv, make_target, off_grid_lines
from .conftest import (CUDA_EMULATION_POSSIBLE, CUDA_EXTENSION_BUILT, DEVICE, ON_GPU, TOLERANCE, requires_gpu,
                       triton_runnable)

NAN, INF = float("nan"), float("inf")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SEED = int(os.environ.get("M2F_FUZZ_SEED", "19"))
GPU_CASES = int(os.environ.get("M2F_FUZZ_GPU_CASES", "1000"))
ONLY = os.environ.get("M2F_FUZZ_ONLY", "")

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    # numpy under TRITON_INTERPRET computing with NaN and inf
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def kernel_backends() -> list:
    """The kernel backends that can run here (the reference is the oracle); cuda-emulated:
    the cuda backend's kernels on the CPU (tests/cuda_emulation)."""
    names = []
    if triton_runnable():
        names.append("triton")
    if CUDA_EXTENSION_BUILT and ON_GPU:
        names.append("cuda")
    if CUDA_EMULATION_POSSIBLE:
        names.append("cuda-emulated")
    return names


@contextlib.contextmanager
def backend_name(backend: str):
    """Inside: the ``backend=`` name that runs ``backend`` (cuda-emulated runs as 'cuda')."""
    if backend == "cuda-emulated":
        with cuda_emulation.as_cuda_backend():
            yield "cuda"
    else:
        yield backend


# ============================================================================ a case


@dataclasses.dataclass
class Case:
    """One call: ``fn(args, backend)`` returns the outputs and gradients to compare (named
    ``names``); ``rules`` gives each its comparison ('exact', 'finite' or 'subset')."""

    desc: str
    fn: Callable
    args: dict
    names: tuple
    rules: dict = dataclasses.field(default_factory=dict)
    check: Optional[Callable] = None  # a custom comparison (got, want) instead of the rules
    floors: dict = dataclasses.field(default_factory=dict)  # name -> norm floor of the error's denominator


def _cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, (tuple, list)):
        return type(x)(_cpu(v) for v in x)
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    return x


def _grads(outs, leaves, grad_outs):
    loss = sum((o.float() * g.float()).sum() for o, g in zip(outs, grad_outs))
    if not loss.requires_grad:  # empty outputs
        return tuple(torch.zeros_like(t) for t in leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves))


def _leaf(t):
    """A tensor with t's values and layout that autograd differentiates against (a leaf, or
    a strided view of a wider leaf where t is one)."""
    copy = t.detach().clone()
    if copy.stride() == t.stride():
        return copy.requires_grad_()
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t.detach()
    return wide.requires_grad_()[..., ::2]


def compare(got, want, name, rule, tol=None, floor=0.0):
    """See the module docstring; 'subset': got is non-finite only where want is; 'superset':
    got is non-finite at least where want is; 'where_finite': no condition on non-finite
    values."""
    got, want = got.detach().cpu(), want.detach().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, the contract's {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, the contract's {want.dtype}"
    g, w = got.double(), want.double()
    if rule == "exact":
        checks = [("NaN", g.isnan(), w.isnan()), ("+inf", g.isposinf(), w.isposinf()),
                  ("-inf", g.isneginf(), w.isneginf())]
    elif rule == "where_finite":
        checks = []
    else:
        checks = [("non-finite", ~g.isfinite(), ~w.isfinite())]
    for what, a, b in checks:
        bad = {"subset": a & ~b, "superset": b & ~a}.get(rule, a != b)
        if bad.any():
            where = bad.nonzero()[:5].tolist()
            raise AssertionError(f"{name}: {what} differs from the contract at {where} "
                                 f"(got {g[bad][:5].tolist()}, contract {w[bad][:5].tolist()})")
    both = g.isfinite() & w.isfinite()
    if both.any():
        tol = TOLERANCE[want.dtype] if tol is None else tol
        denom = max(w[both].norm().item(), 1e-2 * both.sum().item() ** 0.5, floor)
        err = (g[both] - w[both]).norm().item() / denom
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e} where finite"


def run_case(case: Case, backend: str) -> None:
    got = case.fn(case.args, backend)
    want = case.fn(_cpu(case.args), "reference")
    if case.check is not None:
        case.check(got, want)
        return
    for name, g, w in zip(case.names, got, want):
        compare(g, w, name, case.rules.get(name, case.rules.get("*", "exact")), floor=case.floors.get(name, 0.0))


# ============================================================================ drawing inputs


def _size(rng, small=(1, 2, 3, 5), big=(7, 16, 17, 33)):
    return rng.choice(small) if rng.random() < 0.6 else rng.choice(big)


def _values(rng, shape, dtype, regime, scale=1.0):
    """Random values of ``regime``: 'normal', 'large' (|x| up to 1e3 in fp32, 30 in 16-bit)
    or 'zeros'."""
    if regime == "zeros":
        return torch.zeros(shape, device=DEVICE, dtype=dtype)
    x = torch.randn(shape, device=DEVICE) * scale
    if regime == "large":
        x = x * (1e3 if dtype == torch.float32 else 30.0)
    return x.to(dtype)


def _strided(rng, t):
    """Often a non-contiguous view with t's values (transposed storage or a slice of a wider one)."""
    if t.dim() == 0 or t.numel() == 0 or rng.random() < 0.5:
        return t
    if rng.random() < 0.5 and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _coords(rng, shape, sizes, centres=True):
    """[..., 2] points: uniform in [-0.1, 1.1], with some special ones per row (pixel centres
    and edges of the maps of ``sizes``, exact 0 and 1, far outside); float32.

    ``centres=False`` leaves out the pixel centres: for cases with a non-finite pixel or
    grad_out, as which neighbour of a centre gets the 0 weight (0 * inf) follows each
    backend's rounding of coord * size - 0.5 (docs/ops.md)."""
    c = torch.rand(*shape, 2, device=DEVICE) * 1.2 - 0.1
    flat = c.view(-1, 2)
    n = flat.shape[0]
    for _ in range(min(n, rng.randint(0, 6))):
        h, w = rng.choice(sizes)
        i = rng.randrange(n)
        kind = rng.randrange(4) if centres else rng.randrange(1, 4)
        if kind == 0:
            flat[i] = torch.tensor([(rng.randrange(w) + 0.5) / w, (rng.randrange(h) + 0.5) / h])
        elif kind == 1:
            flat[i] = torch.tensor([rng.randrange(w + 1) / w, rng.randrange(h + 1) / h])
        elif kind == 2:
            flat[i] = torch.tensor([rng.choice([0.0, 1.0]), rng.choice([0.0, 1.0])])
        else:
            flat[i] = torch.tensor([rng.choice([-1e30, 1e30, 1e4, -3.0]), rng.random()])
    return c


def _inject(rng, t, value, coords=False):
    """A copy of ``t`` with ``value`` at 1 to 3 random places (for coords: in x, y or both of a point)."""
    t = t.detach().contiguous().clone()
    if t.numel() == 0:
        return t
    for _ in range(rng.randint(1, 3)):
        if coords:
            flat = t.reshape(-1, 2)
            axes = rng.choice([[0], [1], [0, 1]])
            flat[rng.randrange(flat.shape[0]), axes] = value
            t = flat.view(t.shape)
        else:
            t.view(-1)[rng.randrange(t.numel())] = value
    return t


def _injection(rng, names):
    """(argument, value, value name) or None: about half the cases get one."""
    if rng.random() < 0.5:
        return None
    name = rng.choice(names)
    value_name = rng.choice(["nan", "+inf", "-inf"])
    return name, {"nan": NAN, "+inf": INF, "-inf": -INF}[value_name], value_name


def _regime(rng):
    return rng.choices(["normal", "large", "zeros"], [0.75, 0.15, 0.1])[0]


# ============================================================================ the ops


def point_sample_case(rng, dtype):
    n, c, h, w = rng.choice([0, 1, 2, 3]), rng.choice([1, 2, 3]), _size(rng), _size(rng)
    p = rng.choice([0, 1, 2, 7, 33, 300]) if n else 3
    regime = _regime(rng)
    inj = _injection(rng, ["input", "coords", "grad_out"])
    x = _strided(rng, _values(rng, (n, c, h, w), dtype, regime))
    coords = _strided(rng, _coords(rng, (n, p), [(h, w)], centres=not inj or inj[0] == "coords"))
    grad = _values(rng, (n, c, p), dtype, "normal")
    args = {"input": x, "coords": coords, "grad_out": grad}
    if inj:
        args[inj[0]] = _inject(rng, args[inj[0]], inj[1], coords=inj[0] == "coords")

    def fn(a, backend):
        x = _leaf(a["input"])
        out = mk.point_sample(x, a["coords"], backend=backend)
        return (out.detach(),) + tuple(_grads((out,), (x,), (a["grad_out"],)))

    rule = "finite" if inj and inj[0] != "coords" and inj[2] != "nan" else "exact"
    return Case(f"N={n} C={c} {h}x{w} P={p} {regime} {inj and inj[::2]}", fn, args, ("out", "grad_input"),
                {"*": rule})


def uncertain_point_coords_case(rng, dtype):
    n, h, w = rng.choice([0, 1, 3, 5]), _size(rng), _size(rng)
    points = rng.choice([1, 4, 20])
    s, k = rng.choice([1, 3]) * points, int(rng.choice([0.0, 0.5, 0.75, 1.0]) * points)
    regime = _regime(rng)
    indexed = rng.random() < 0.4 and n > 0
    if indexed:
        b, q = 2, 3
        logits = _strided(rng, _values(rng, (b, q, h, w), dtype, regime, scale=3.0))
        bidx = torch.randint(b, (n,), device=DEVICE)
        qidx = torch.randint(q, (n,), device=DEVICE)
    else:
        logits = _strided(rng, _values(rng, (n, h, w), dtype, regime, scale=3.0))
        bidx = qidx = None
    candidates = torch.rand(n, s, 2, device=DEVICE)
    uniform = torch.rand(n, points - k, 2, device=DEVICE)
    inj = _injection(rng, ["logits"])
    if inj:
        logits = _inject(rng, logits, inj[1])
    args = {"logits": logits, "candidates": candidates, "random": uniform, "bidx": bidx, "qidx": qidx}

    def fn(a, backend):
        return (torch.ops.m2f_kernels.uncertain_point_coords(a["logits"], a["candidates"], a["random"], k,
                                                             a["bidx"], a["qidx"], backend),)

    def check(got, want):
        got, want = got[0].cpu(), want[0]
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got[:, k:], want[:, k:]), "the random points follow unchanged"
        # the chosen candidates are a top-k of the contract's uncertainty (NaN ranks first):
        # the same NaN count, and finite uncertainties within float32 rounding of the top-k
        selected = logits.cpu() if bidx is None else logits.cpu()[bidx.cpu(), qidx.cpu()]
        u_all = -mk.point_sample(selected.unsqueeze(1).float(), candidates.cpu(), backend="reference")[:, 0].abs()
        for row in range(got.shape[0]):
            keys = {tuple(pt) for pt in candidates.cpu()[row].tolist()}
            chosen = got[row, :k].tolist()
            assert all(tuple(pt) in keys for pt in chosen), f"row {row}: a chosen point is not a candidate"
            assert len({tuple(pt) for pt in chosen}) == len(chosen), f"row {row}: a candidate chosen twice"
            u_got = -mk.point_sample(selected[row:row + 1].unsqueeze(1).float(), got[row:row + 1, :k],
                                     backend="reference")[0, 0].abs()
            u_want = -mk.point_sample(selected[row:row + 1].unsqueeze(1).float(), want[row:row + 1, :k],
                                      backend="reference")[0, 0].abs()
            assert u_got.isnan().sum() == u_want.isnan().sum(), f"row {row}: NaN uncertainties chosen"
            fg, fw = u_got[~u_got.isnan()].sort().values, u_want[~u_want.isnan()].sort().values
            scale = 1e-5 * (1.0 + u_all[row][u_all[row].isfinite()].abs().max().item() if u_all[row].isfinite().any()
                            else 1.0)
            finite = fg.isfinite() & fw.isfinite()
            assert torch.equal(fg.isfinite(), fw.isfinite()), f"row {row}: infinite uncertainties chosen"
            assert ((fg - fw)[finite].abs() <= scale).all(), f"row {row}: not the most uncertain candidates"

    return Case(f"N={n} {h}x{w} points={points} S={s} k={k} {regime} indexed={indexed} {inj and inj[::2]}", fn,
                args, ("points",), check=check)


def point_mask_loss_case(rng, dtype):
    n, p = rng.choice([0, 1, 2, 5]), rng.choice([1, 2, 9, 40])
    hp, wp, ht, wt = _size(rng), _size(rng), _size(rng), _size(rng)
    regime = _regime(rng)
    indexed = rng.random() < 0.4
    if indexed:
        b, q = 2, 4
        pred = _strided(rng, _values(rng, (b, q, hp, wp), dtype, regime, scale=3.0))
        pairs = torch.randint(b * q, (n,), device=DEVICE)  # repeats accumulate
        bidx, qidx = pairs // q, pairs % q
    else:
        pred = _strided(rng, _values(rng, (n, hp, wp), dtype, regime, scale=3.0))
        bidx = qidx = None
    kind = rng.choice(["bool", "uint8", "float32", "float16"])
    inj = _injection(rng, ["pred", "coords", "grad"] + (["target"] if kind.startswith("float") else []))
    target = make_target(kind, n, ht, wt, padded=rng.random() < 0.5)
    coords = _strided(rng, _coords(rng, (n, p), [(hp, wp), (ht, wt)], centres=not inj or inj[0] == "coords"))
    weight = torch.rand(n, device=DEVICE) if rng.random() < 0.3 else None
    num_masks = rng.choice([1.0, 2.5, float(max(n, 1))])
    gb, gd = torch.randn(2).tolist()
    args = {"pred": pred, "target": target, "coords": coords, "bidx": bidx, "qidx": qidx, "weight": weight,
            "grad": torch.tensor([gb, gd])}
    if inj:
        args[inj[0]] = _inject(rng, args[inj[0]], inj[1], coords=inj[0] == "coords")

    def fn(a, backend):
        pred = _leaf(a["pred"])
        index = None if a["bidx"] is None else (a["bidx"], a["qidx"])
        bce, dice = mk.point_mask_loss(pred, a["target"], a["coords"], num_masks, pred_index=index,
                                       mask_weight=a["weight"], backend=backend)
        g = a["grad"].to(bce.device)
        return (bce.detach(), dice.detach()) + tuple(_grads((bce, dice), (pred,), (g[0], g[1])))

    rule = "finite" if inj and inj[0] != "coords" and inj[2] != "nan" else "exact"
    return Case(f"N={n} P={p} pred {hp}x{wp} target {kind} {ht}x{wt} {regime} indexed={indexed} "
                f"weight={weight is not None} {inj and inj[::2]}", fn, args, ("loss_bce", "loss_dice", "grad_pred"),
                {"*": rule})


def pairwise_mask_cost_case(rng, dtype):
    q, t, p = rng.choice([0, 1, 3, 7, 70]), rng.choice([0, 1, 2, 5, 33]), rng.choice([1, 2, 17, 40])
    hp, wp, ht, wt = _size(rng), _size(rng), _size(rng), _size(rng)
    regime = _regime(rng)
    pred = _strided(rng, _values(rng, (q, hp, wp), dtype, regime, scale=3.0))
    kind = rng.choice(["bool", "uint8", "float32", "float16"])
    inj = _injection(rng, ["pred", "coords"] + (["target"] if kind.startswith("float") else []))
    target = make_target(kind, t, ht, wt, padded=rng.random() < 0.5)
    coords = _strided(rng, _coords(rng, (p,), [(hp, wp), (ht, wt)], centres=not inj or inj[0] == "coords"))
    args = {"pred": pred, "target": target, "coords": coords}
    if inj:
        args[inj[0]] = _inject(rng, args[inj[0]], inj[1], coords=inj[0] == "coords")

    def fn(a, backend):
        return mk.pairwise_mask_cost(a["pred"], a["target"], a["coords"], backend=backend)

    rule = "finite" if inj and inj[0] != "coords" and inj[2] != "nan" else "exact"
    return Case(f"Q={q} T={t} P={p} pred {hp}x{wp} target {kind} {ht}x{wt} {regime} {inj and inj[::2]}", fn, args,
                ("cost_bce", "cost_dice"), {"*": rule})


def ms_deform_attn_case(rng, dtype):
    hw = [(_size(rng, (1, 2, 3), (5, 8, 9)), _size(rng, (1, 2, 3), (5, 8, 9))) for _ in range(rng.choice([1, 2, 3]))]
    shapes, starts, s = levels(*hw)
    b, lq, h = rng.choice([0, 1, 2]), rng.choice([0, 1, 3, 17]), rng.choice([1, 2, 3])
    d, p = rng.choice([1, 3, 8, 24, 32]), rng.choice([1, 2, 4])
    softmax, deterministic = rng.random() < 0.5, rng.random() < 0.3
    regime = _regime(rng)
    aux = rng.choice([torch.float32, dtype])
    value = _strided(rng, _values(rng, (b, s, h, d), dtype, regime))
    loc = torch.rand(b, lq, h, len(hw), p, 2, device=DEVICE) * 1.4 - 0.2
    loc = off_grid_lines(loc, shapes)  # no location gradient on a pixel-grid line
    if rng.random() < 0.2:
        loc = loc.masked_fill(torch.rand(loc.shape, device=DEVICE) < 0.1, rng.choice([1e30, -1e30]))
    weights = torch.randn(b, lq, h, len(hw), p, device=DEVICE) * (4.0 if regime == "large" else 1.0)
    if not softmax:
        weights = weights.flatten(-2).softmax(-1).view_as(weights)
    loc, weights = _strided(rng, loc.to(aux)), _strided(rng, weights.to(aux))
    grad = _values(rng, (b, lq, h * d), dtype, "normal")
    inj = _injection(rng, ["value", "sampling_locations", "attention_weights", "grad_out"])
    args = {"value": value, "sampling_locations": loc, "attention_weights": weights, "grad_out": grad,
            "shapes": shapes, "starts": starts}
    if inj:
        args[inj[0]] = _inject(rng, args[inj[0]], inj[1], coords=inj[0] == "sampling_locations")

    def fn(a, backend):
        leaves = [_leaf(a[k]) for k in ("value", "sampling_locations", "attention_weights")]
        out = mk.ms_deform_attn(leaves[0], a["shapes"], a["starts"], leaves[1], leaves[2], softmax=softmax,
                                deterministic=deterministic, backend=backend)
        return (out.detach(),) + tuple(_grads((out,), leaves, (a["grad_out"],)))

    rule = "finite" if inj and inj[0] != "sampling_locations" and inj[2] != "nan" else "exact"
    rules = {"*": rule}
    if deterministic and inj and inj[0] in ("attention_weights", "grad_out"):
        # the int64 fixed-point sums cannot hold a non-finite contribution: all of
        # grad_value becomes NaN (docs/ops.md), a superset of the contract's
        rules["grad_value"] = "superset"
    return Case(f"levels={hw} B={b} Lq={lq} H={h} D={d} P={p} softmax={softmax} deterministic={deterministic} "
                f"aux={aux} {regime} {inj and inj[::2]}", fn, args,
                ("out", "grad_value", "grad_sampling_locations", "grad_attention_weights"), rules)


def masked_attention_case(rng, dtype):
    b, h, q, n = rng.choice([0, 1, 2]), rng.choice([1, 2, 3]), rng.choice([1, 2, 5, 17, 64]), rng.choice([1, 2, 7, 33, 65])
    d = rng.choice([4, 8, 16, 24, 32, 64])
    dv = d if rng.random() < 0.7 else rng.choice([8, 16, 40])
    layout = rng.choice(["contiguous", "seq_first", "strided"]) if d == dv else "contiguous"
    regime = _regime(rng)
    q_, k_, _ = make_qkv(b, h, q, n, d, dtype, layout=layout)
    v_ = torch.randn(b, h, n, dv, device=DEVICE).to(dtype)
    scale_up = {"normal": 1.0, "large": 8.0, "zeros": 0.0}[regime]
    q_, k_ = (q_ * scale_up).detach(), k_.detach()
    kind = rng.choice(["bool", "logits"])
    mask = make_mask(b, h, q, n, kind, per_head=rng.random() < 0.3, dtype=rng.choice([torch.float32, dtype]))
    grad = torch.randn(b, h, q, dv, device=DEVICE).to(dtype)
    inj = _injection(rng, ["q", "k", "v", "grad_out"] + (["mask"] if kind == "logits" else []))
    args = {"q": q_, "k": k_, "v": v_, "mask": mask, "grad_out": grad}
    if inj:
        args[inj[0]] = _inject(rng, args[inj[0]], inj[1])

    def fn(a, backend):
        leaves = [_leaf(a[k]) for k in ("q", "k", "v")]
        out = mk.masked_attention(*leaves, a["mask"], backend=backend)
        return (out.detach(),) + tuple(_grads((out,), leaves, (a["grad_out"],)))

    # NaN / inf in q, k, v or grad_out: the dense reference also spreads it through blocked
    # keys, which the kernels skip (docs/ops.md): the kernels' non-finite values are a subset.
    # ±inf in q or k: an infinite score, whose softmax the reference's logsumexp and the
    # kernels' online softmax make NaN in different places: compared where both are finite
    rule = "exact" if not inj or inj[0] == "mask" else "subset"
    if inj and inj[0] in ("q", "k") and inj[2] != "nan":
        rule = "where_finite"
    return Case(f"B={b} H={h} Q={q} N={n} D={d} Dv={dv} {layout} mask {kind} {mask.dtype} {tuple(mask.shape)} "
                f"{regime} {inj and inj[::2]}", fn, args, ("out", "dq", "dk", "dv"), {"*": rule},
                floors=_attention_floors(args))


def _attention_floors(a):
    """Norms of the sums of |terms| behind each output (fp64, non-finite inputs as 0): the
    scale of 16-bit rounding in sums that cancel, e.g. dq = scale * sum_j P_j (dP_j - delta) k_j
    with few keys."""
    q, k, v, g = (a[x].detach().cpu().double().nan_to_num(0.0, 0.0, 0.0) for x in ("q", "k", "v", "grad_out"))
    if q.numel() == 0 or v.numel() == 0:
        return {}
    from m2f_kernels.reference.masked_attention import blocked_keys

    scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(blocked_keys(a["mask"].cpu(), q.shape[1]), float("-inf"))
    p = scores.softmax(-1)
    dp = (g @ v.transpose(-1, -2)).abs() + (g * (p @ v)).sum(-1, keepdim=True).abs()
    return {"out": (p @ v.abs()).norm().item(), "dv": (p.transpose(-1, -2) @ g.abs()).norm().item(),
            "dq": (scale * (p * dp) @ k.abs()).norm().item(),
            "dk": (scale * (p * dp).transpose(-1, -2) @ q.abs()).norm().item()}


def linear_sum_assignment_case(rng, dtype):
    b, q, t = rng.choice([1, 2, 3]), rng.choice([0, 1, 2, 5, 9]), rng.choice([0, 1, 3, 7, 12])
    regime = _regime(rng)
    cost = _values(rng, (b, q, t), dtype, regime).abs()
    if rng.random() < 0.3:  # ties
        cost = cost.round()
    if rng.random() < 0.3:
        cost = cost.masked_fill(torch.rand(cost.shape, device=DEVICE) < 0.3, INF)
    num_targets = torch.randint(t + 1, (b,), device=DEVICE) if rng.random() < 0.5 else None
    inj = _injection(rng, ["cost"])
    if inj and inj[2] == "-inf":
        inj = None  # -inf is no cost
    args = {"cost": _inject(rng, cost, inj[1]) if inj else cost, "num_targets": num_targets}

    def fn(a, backend):
        c = a["cost"]
        if backend == "reference" or c.device.type == "cpu":  # NaN counts as +inf; the op refuses it on the CPU
            c = c.nan_to_num(nan=INF, posinf=INF)
        return (mk.linear_sum_assignment(c, a["num_targets"], backend=backend),)

    def check(got, want):
        got, want = got[0].cpu(), want[0]
        assert got.shape == want.shape and got.dtype == want.dtype == torch.int64
        assert torch.equal(got >= 0, want >= 0), "matched targets differ"
        c = args["cost"].cpu().double().nan_to_num(nan=INF, posinf=INF)
        for m in range(c.shape[0]):
            rows = got[m][got[m] >= 0]
            assert len(set(rows.tolist())) == len(rows), f"matrix {m}: a query matched twice"
            cols = (got[m] >= 0).nonzero().flatten()
            total = c[m, rows, cols].sum().item()
            expected = c[m, want[m][want[m] >= 0], cols].sum().item()
            assert total == expected or abs(total - expected) <= 1e-4 * max(1.0, abs(expected)), \
                f"matrix {m}: total cost {total} != {expected}"

    return Case(f"B={b} Q={q} T={t} {regime} num_targets={num_targets is not None} {inj and inj[::2]}", fn, args,
                ("matched",), check=check)


OPS = {
    "point_sample": point_sample_case,
    "uncertain_point_coords": uncertain_point_coords_case,
    "point_mask_loss": point_mask_loss_case,
    "pairwise_mask_cost": pairwise_mask_cost_case,
    "ms_deform_attn": ms_deform_attn_case,
    "masked_attention": masked_attention_case,
    "linear_sum_assignment": linear_sum_assignment_case,
}
NO_TRITON = {"linear_sum_assignment"}  # reference and cuda (and cuda-emulated) only
# CI subset per op and dtype: the file runs in ~45 s under TRITON_INTERPRET on 2 cores
CI_CASES = {"point_sample": 20, "uncertain_point_coords": 20, "point_mask_loss": 16, "pairwise_mask_cost": 16,
            "ms_deform_attn": 12, "masked_attention": 10, "linear_sum_assignment": 20}


def fuzz(op: str, dtype_name: str, count: int) -> None:
    backends = [b for b in kernel_backends() if not (b == "triton" and op in NO_TRITON)]
    if not backends:
        pytest.skip("no kernel backend can run here (triton needs a GPU or TRITON_INTERPRET=1)")
    only = ONLY.split(":") if ONLY else None
    if only and only[:2] != [op, dtype_name]:
        pytest.skip(f"M2F_FUZZ_ONLY={ONLY}")
    cases = [int(only[2])] if only else range(count)
    dtype = DTYPES[dtype_name]
    for i in cases:
        seed = SEED * 1_000_003 + list(OPS).index(op) * 10_007 + list(DTYPES).index(dtype_name) * 101 + i
        rng = random.Random(seed)
        torch.manual_seed(seed)
        case = OPS[op](rng, dtype)
        for backend in backends:
            try:
                with backend_name(backend) as name:
                    run_case(case, name)
            except mk.BackendUnavailableError:
                continue  # beyond a declared limit of this backend (e.g. cuda's mask_weight)
            except Exception as e:
                raise AssertionError(f"{op} {dtype_name} case {i} on {backend} ({case.desc}); replay with "
                                     f"M2F_FUZZ_SEED={SEED} M2F_FUZZ_ONLY={op}:{dtype_name}:{i}: {e}") from e


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("op", list(OPS))
def test_fuzz(op, dtype_name):
    fuzz(op, dtype_name, int(os.environ.get("M2F_FUZZ_CASES") or CI_CASES[op]))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("op", list(OPS))
def test_fuzz_gpu(op, dtype_name):
    """The full count (M2F_FUZZ_GPU_CASES, default 1000 per op and dtype) on a GPU."""
    fuzz(op, dtype_name, GPU_CASES)

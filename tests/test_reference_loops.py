"""The ``reference`` backend against independent float64 loops (plain Python/NumPy).

Every expected value here comes from loops written from the op contracts of DESIGN.md,
not from grid_sample or the reference's own tensor formulas: bilinear sampling by
hand (pixel coordinate = coord * size - 0.5, zero outside the map), softmax by hand,
BCE as max(x, 0) - x t + log(1 + exp(-|x|)), dice with +1 smoothing. Gradients are
checked against central finite differences of those loops (or, for the linear
point_sample, against its hand-written transpose). Shapes are tiny: the loops are slow.
All calls go through the public ops with ``backend="reference"``, so the autograd
registration is exercised as well.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import m2f_kernels as mk
from .conftest import TOLERANCE, assert_close

REF = "reference"
FD_TOL = 1e-6  # central differences in float64 (eps 1e-6): truncation ~1e-12, rounding ~1e-10
EXACT = TOLERANCE[torch.float64]
LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs every run; the seed is printed so a failure can be replayed."""
    print(f"torch seed {torch.seed()}")


# --- the independent oracle -----------------------------------------------------------------


def np64(t: torch.Tensor) -> np.ndarray:
    """A float64 NumPy copy (bool/uint8 targets become 0/1)."""
    return t.detach().to(torch.float64).cpu().numpy().copy()


def corner_weights(height: int, width: int, x: float, y: float) -> list[tuple[int, int, float]]:
    """(row, col, weight) of the in-map corners of a bilinear sample at (x, y) in [0, 1] coords."""
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    corners = []
    for row, wy in ((y0, 1.0 - fy), (y0 + 1, fy)):
        for col, wx in ((x0, 1.0 - fx), (x0 + 1, fx)):
            if 0 <= row < height and 0 <= col < width:
                corners.append((row, col, wy * wx))
    return corners


def bilinear(img: np.ndarray, x: float, y: float):
    """img [H, W, ...] sampled at (x, y); zero padding. Returns img's trailing shape."""
    acc = np.zeros(img.shape[2:])
    for row, col, w in corner_weights(img.shape[0], img.shape[1], x, y):
        acc = acc + w * img[row, col]
    return acc


def softmax(xs: np.ndarray) -> np.ndarray:
    m = max(xs)
    e = np.array([math.exp(x - m) for x in xs])
    return e / e.sum()


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce(x: float, t: float) -> float:
    return max(x, 0.0) - x * t + math.log1p(math.exp(-abs(x)))


def dice(s: list[float], t: list[float]) -> float:
    return 1.0 - (2.0 * sum(a * b for a, b in zip(s, t)) + 1.0) / (sum(s) + sum(t) + 1.0)


def fd_grads(loss, arrays: list[np.ndarray], eps: float = 1e-6) -> list[np.ndarray]:
    """Central differences of the scalar ``loss()`` w.r.t. each array (perturbed in place)."""
    grads = []
    for a in arrays:
        g = np.zeros_like(a)
        for i in range(a.size):
            old = a.flat[i]
            a.flat[i] = old + eps
            up = loss()
            a.flat[i] = old - eps
            down = loss()
            a.flat[i] = old
            g.flat[i] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


def special_points(height: int, width: int):
    """(inside, outside) lists of (x, y): pixel centres, borders, corners, half-pixel overhangs
    (partly inside: they read the border pixels) and points beyond every side (read zero)."""
    cx = lambda c: (c + 0.5) / width  # noqa: E731
    cy = lambda r: (r + 0.5) / height  # noqa: E731
    inside = [
        (cx(width - 1), cy(0)), (cx(0), cy(height - 1)), (cx(width // 2), cy(height // 2)),
        (0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0),
        (0.0, cy(0)), (1.0, cy(height - 1)), (cx(0), 0.0), (cx(width - 1), 1.0),
        (-0.25 / width, cy(0)), (1 + 0.25 / width, cy(0)), (cx(0), -0.25 / height), (cx(0), 1 + 0.25 / height),
    ]
    outside = [(-0.75, 0.5), (1.75, 0.5), (0.5, -0.75), (0.5, 1.75), (-0.75, -0.75), (1.75, 1.75), (-3.0, 4.0)]
    return inside, outside


def smooth_coord(size: int) -> float:
    """A coordinate (inside, partly or wholly outside) whose pixel coordinate is >= 0.05 away
    from every integer: bilinear sampling is differentiable there."""
    pixel = torch.randint(-2, size + 2, ()).item() + 0.05 + 0.9 * torch.rand(()).item()
    return (pixel + 0.5) / size


def test_oracle_bilinear():
    """The hand-written sampler itself: centres, borders, midpoints, outside."""
    img = np.arange(1.0, 7.0).reshape(2, 3)
    assert bilinear(img, 2.5 / 3, 0.25) == img[0, 2]
    assert bilinear(img, 0.0, 0.75) == 0.5 * img[1, 0]
    assert bilinear(img, 1.0, 1.0) == 0.25 * img[1, 2]
    assert math.isclose(bilinear(img, 1.0 / 3, 0.5), img.mean(axis=0)[:2].mean())
    assert bilinear(img, -0.2, 0.5) == 0.0 and bilinear(img, 0.5, 1.3) == 0.0


# --- masked_attention -----------------------------------------------------------------------


def attention_mask(b, h, nq, n, kind: str, per_head: bool, contiguous: bool = True):
    """A random mask with the edge rows in every (batch[, head]): row 0 all keys blocked,
    row 1 exactly one visible key, row 2 all visible. Per-head masks also get a row 3 that
    is empty in head 0 only. Logit masks hold exact zeros, which are visible."""
    shape = (b, h, nq, n) if per_head else (b, nq, n)
    blocked = torch.rand(shape) < 0.5
    rows = blocked.view(-1, nq, n)
    for r in rows:
        r[0] = True
        if nq > 1:
            r[1] = True
            r[1, torch.randint(n, ())] = False
        if nq > 2:
            r[2] = False
    if per_head and h > 1 and nq > 3:
        blocked[:, 0, 3] = True
        blocked[:, 1, 3, 0] = False
    if kind == "bool":
        mask = blocked
    else:
        magnitude = torch.rand(shape) + 0.05
        mask = torch.where(blocked, -magnitude, magnitude)
        mask[~blocked & (torch.rand(shape) < 0.3)] = 0.0  # sigmoid(0) = 0.5 is not < 0.5: visible
    if not contiguous:
        mask = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    return mask


def loop_blocked(mask: torch.Tensor, heads: int) -> np.ndarray:
    """bool [B, H, Q, N]: True where blocked (before the empty-row rule)."""
    m = mask.detach().cpu()
    is_bool = m.dtype == torch.bool
    m = m.numpy() if is_bool else np64(m)
    if m.ndim == 3:
        m = np.stack([m] * heads, axis=1)
    out = np.zeros(m.shape, dtype=bool)
    for idx in itertools.product(*map(range, m.shape)):
        out[idx] = bool(m[idx]) if is_bool else m[idx] < 0
    return out


def loop_attention(q, k, v, blocked, scale):
    """q [B,H,Q,D], k [B,H,N,D], v [B,H,N,Dv] numpy; returns (out [B,H,Q,Dv], lse [B,H,Q])."""
    b_, h_, nq, _ = q.shape
    n = k.shape[2]
    out = np.zeros((b_, h_, nq, v.shape[-1]))
    lse = np.zeros((b_, h_, nq))
    for b, h, i in itertools.product(range(b_), range(h_), range(nq)):
        visible = [j for j in range(n) if not blocked[b, h, i, j]] or list(range(n))  # empty-row rule
        scores = [scale * float(np.dot(q[b, h, i], k[b, h, j])) for j in visible]
        m = max(scores)
        lse[b, h, i] = m + math.log(sum(math.exp(s - m) for s in scores))
        for p, j in zip(softmax(scores), visible):
            out[b, h, i] += p * v[b, h, j]
    return out, lse


def attention_inputs(b, h, nq, n, d, dv, dtype=torch.float64, contiguous=True):
    if contiguous:
        return torch.randn(b, h, nq, d, dtype=dtype), torch.randn(b, h, n, d, dtype=dtype), \
            torch.randn(b, h, n, dv, dtype=dtype)
    q = torch.randn(b, nq, h, d, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, n, h, d, dtype=dtype).transpose(1, 2)
    v = torch.randn(b, h, dv, n, dtype=dtype).transpose(2, 3)
    return q, k, v


ATTN_SHAPES = {  # (B, H, Q, N, D, Dv)
    "general": (2, 2, 5, 7, 4, 3),
    "N=1": (1, 2, 3, 1, 4, 4),
    "Q=1": (2, 2, 1, 6, 3, 3),
}


@pytest.mark.parametrize("scale", [None, 0.37])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
@pytest.mark.parametrize("kind", ["bool", "logits"])
@pytest.mark.parametrize("shape", ATTN_SHAPES.values(), ids=ATTN_SHAPES.keys())
def test_masked_attention_forward(shape, kind, per_head, contiguous, scale):
    b, h, nq, n, d, dv = shape
    q, k, v = attention_inputs(b, h, nq, n, d, dv, contiguous=contiguous)
    mask = attention_mask(b, h, nq, n, kind, per_head, contiguous)
    used_scale = d ** -0.5 if scale is None else scale
    want, want_lse = loop_attention(np64(q), np64(k), np64(v), loop_blocked(mask, h), used_scale)

    out = mk.masked_attention(q, k, v, mask, scale=scale, backend=REF)
    assert out.shape == (b, h, nq, dv) and out.dtype == torch.float64
    assert_close(out, torch.from_numpy(want), EXACT)
    out_op, lse = torch.ops.m2f_kernels.masked_attention(q, k, v, mask, used_scale, REF)
    assert out_op.is_contiguous() and lse.is_contiguous()
    assert_close(lse, torch.from_numpy(want_lse), EXACT, "lse")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_masked_attention_forward_dtypes(dtype):
    b, h, nq, n, d, dv = ATTN_SHAPES["general"]
    q, k, v = attention_inputs(b, h, nq, n, d, dv, dtype=dtype)
    mask = attention_mask(b, h, nq, n, "logits", per_head=False)
    want, want_lse = loop_attention(np64(q), np64(k), np64(v), loop_blocked(mask, h), d ** -0.5)
    out, lse = torch.ops.m2f_kernels.masked_attention(q, k, v, mask, d ** -0.5, REF)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, torch.from_numpy(want), TOLERANCE[dtype])
    assert_close(lse, torch.from_numpy(want_lse), TOLERANCE[torch.float32], "lse")


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
@pytest.mark.parametrize("kind", ["bool", "logits"])
def test_masked_attention_grad(kind, per_head, contiguous):
    b, h, nq, n, d, dv = 1, 2, 5, 5, 3, 2
    q, k, v = (t.requires_grad_() for t in attention_inputs(b, h, nq, n, d, dv, contiguous=contiguous))
    mask = attention_mask(b, h, nq, n, kind, per_head)
    scale = 0.6
    grad_out = torch.randn(b, h, nq, dv, dtype=torch.float64)

    out = mk.masked_attention(q, k, v, mask, scale=scale, backend=REF)
    got = torch.autograd.grad(out, (q, k, v), grad_out)

    qn, kn, vn, g, blocked = np64(q), np64(k), np64(v), np64(grad_out), loop_blocked(mask, h)
    want = fd_grads(lambda: float((loop_attention(qn, kn, vn, blocked, scale)[0] * g).sum()), [qn, kn, vn])
    for name, gt, wt in zip("qkv", got, want):
        assert_close(gt, torch.from_numpy(wt), FD_TOL, f"d{name}")


def test_masked_attention_zero_size():
    h, d = 2, 4
    for b, nq in ((0, 3), (2, 0)):
        q, k, v = (t.requires_grad_() for t in attention_inputs(b, h, nq, 5, d, 3))
        mask = torch.zeros(b, nq, 5, dtype=torch.bool)
        out = mk.masked_attention(q, k, v, mask, backend=REF)
        assert out.shape == (b, h, nq, 3)
        out.sum().backward()
        for t in (q, k, v):
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


# --- ms_deform_attn -------------------------------------------------------------------------

LEVELS = [(2, 3), (1, 1), (1, 4), (3, 1)]  # a 1x1 level, a single row, a single column


def level_layout(levels):
    shapes = torch.tensor(levels, dtype=torch.int64)
    sizes = [hh * ww for hh, ww in levels]
    starts = torch.tensor([sum(sizes[:i]) for i in range(len(levels))], dtype=torch.int64)
    return shapes, starts, sum(sizes)


def loop_ms_deform_attn(value, levels, loc, weights, use_softmax: bool) -> np.ndarray:
    """value [B,S,H,D], loc [B,Lq,H,L,P,2], weights [B,Lq,H,L,P] numpy -> out [B,Lq,H*D]."""
    b_, _, h_, d = value.shape
    _, lq, _, nl, npt, _ = loc.shape
    out = np.zeros((b_, lq, h_ * d))
    for b, i, h in itertools.product(range(b_), range(lq), range(h_)):
        w = weights[b, i, h].reshape(-1)
        w = (softmax(w) if use_softmax else w).reshape(nl, npt)
        start = 0
        for lvl, (hh, ww) in enumerate(levels):
            img = value[b, start:start + hh * ww, h].reshape(hh, ww, d)
            for p in range(npt):
                out[b, i, h * d:(h + 1) * d] += w[lvl, p] * bilinear(img, *loc[b, i, h, lvl, p])
            start += hh * ww
    return out


def deform_inputs(b, lq, h, d, npt, levels=LEVELS, dtype=torch.float64, contiguous=True):
    """(value, shapes, starts, loc in [-0.2, 1.2], weights)."""
    shapes, starts, s = level_layout(levels)
    nl = len(levels)
    if contiguous:
        value = torch.randn(b, s, h, d, dtype=dtype)
        loc = torch.rand(b, lq, h, nl, npt, 2, dtype=dtype) * 1.4 - 0.2
        weights = torch.rand(b, lq, h, nl, npt, dtype=dtype)
    else:
        value = torch.randn(b, h, s, d, dtype=dtype).transpose(1, 2)
        loc = (torch.rand(b, lq, h, nl, npt, 4, dtype=dtype) * 1.4 - 0.2)[..., ::2]
        weights = torch.rand(b, h, lq, nl, npt, dtype=dtype).transpose(1, 2)
    return value, shapes, starts, loc, weights


DEFORM_SHAPES = {"general": (2, 3, 2, 3, 2), "Lq=1": (2, 1, 2, 3, 2), "P=1": (1, 3, 2, 2, 1)}  # B, Lq, H, D, P


@pytest.mark.parametrize("softmax", [False, True], ids=["weights", "softmax"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("shape", DEFORM_SHAPES.values(), ids=DEFORM_SHAPES.keys())
def test_ms_deform_attn_forward(shape, contiguous, softmax):
    b, lq, h, d, npt = shape
    value, shapes, starts, loc, weights = deform_inputs(b, lq, h, d, npt, contiguous=contiguous)
    if softmax:
        weights = weights * 6 - 3
    out = mk.ms_deform_attn(value, shapes, starts, loc, weights, softmax=softmax, backend=REF)
    want = loop_ms_deform_attn(np64(value), LEVELS, np64(loc), np64(weights), softmax)
    assert out.shape == (b, lq, h * d) and out.is_contiguous()
    assert_close(out, torch.from_numpy(want), EXACT)


def test_ms_deform_attn_special_points():
    """Points on pixel centres, borders and corners; beyond every side they read exactly 0."""
    b, h, d = 2, 2, 3
    per_level = [special_points(hh, ww) for hh, ww in LEVELS]
    num_inside, num_outside = len(per_level[0][0]), len(per_level[0][1])
    lq = num_inside + num_outside
    value, shapes, starts, _, _ = deform_inputs(b, lq, h, d, 1)
    loc = torch.empty(b, lq, h, len(LEVELS), 1, 2, dtype=torch.float64)
    for lvl, (inside, outside) in enumerate(per_level):
        loc[:, :, :, lvl, 0] = torch.tensor(inside + outside, dtype=torch.float64)[None, :, None]
    weights = torch.rand(b, lq, h, len(LEVELS), 1, dtype=torch.float64) + 0.5
    out = mk.ms_deform_attn(value, shapes, starts, loc, weights, backend=REF)
    want = loop_ms_deform_attn(np64(value), LEVELS, np64(loc), np64(weights), False)
    assert_close(out, torch.from_numpy(want), EXACT)
    assert (out[:, num_inside:] == 0).all(), "points outside the map must read zeros"
    assert (out[:, :num_inside] != 0).all()


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_ms_deform_attn_forward_dtypes(dtype):
    value, shapes, starts, loc, weights = deform_inputs(2, 3, 2, 3, 2, dtype=dtype)
    out = mk.ms_deform_attn(value, shapes, starts, loc, weights, backend=REF)
    want = loop_ms_deform_attn(np64(value), LEVELS, np64(loc), np64(weights), False)
    assert out.dtype == dtype
    assert_close(out, torch.from_numpy(want), TOLERANCE[dtype])


@pytest.mark.parametrize("softmax", [False, True], ids=["weights", "softmax"])
def test_ms_deform_attn_grad(softmax):
    b, lq, h, d, npt = 1, 2, 2, 2, 2
    value, shapes, starts, loc, weights = deform_inputs(b, lq, h, d, npt)
    for lvl, (hh, ww) in enumerate(LEVELS):  # away from the pixel-grid lines (kinks)
        for idx in itertools.product(range(b), range(lq), range(h), range(npt)):
            loc[idx[:3] + (lvl, idx[3])] = torch.tensor([smooth_coord(ww), smooth_coord(hh)])
    if softmax:
        weights = weights * 6 - 3
    for t in (value, loc, weights):
        t.requires_grad_()
    grad_out = torch.randn(b, lq, h * d, dtype=torch.float64)
    out = mk.ms_deform_attn(value, shapes, starts, loc, weights, softmax=softmax, backend=REF)
    got = torch.autograd.grad(out, (value, loc, weights), grad_out)

    vn, ln, wn, g = np64(value), np64(loc), np64(weights), np64(grad_out)
    want = fd_grads(lambda: float((loop_ms_deform_attn(vn, LEVELS, ln, wn, softmax) * g).sum()), [vn, ln, wn])
    for name, gt, wt in zip(("value", "sampling_locations", "attention_weights"), got, want):
        assert_close(gt, torch.from_numpy(wt), FD_TOL, f"grad {name}")


def test_ms_deform_attn_zero_size():
    h, d, npt = 2, 3, 2
    for b, lq in ((0, 3), (2, 0)):
        value, shapes, starts, loc, weights = deform_inputs(b, lq, h, d, npt)
        for t in (value, loc, weights):
            t.requires_grad_()
        out = mk.ms_deform_attn(value, shapes, starts, loc, weights, backend=REF)
        assert out.shape == (b, lq, h * d)
        out.sum().backward()
        for t in (value, loc, weights):
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


# --- point_sample ---------------------------------------------------------------------------


def loop_point_sample(inp: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """inp [N, C, H, W], coords [N, P, 2] -> [N, C, P]."""
    n_, c_, _, _ = inp.shape
    out = np.zeros((n_, c_, coords.shape[1]))
    for n, p in itertools.product(range(n_), range(coords.shape[1])):
        out[n, :, p] = bilinear(inp[n].transpose(1, 2, 0), *coords[n, p])
    return out


def loop_point_sample_transpose(grad_out: np.ndarray, shape, coords: np.ndarray) -> np.ndarray:
    """The adjoint of :func:`loop_point_sample`: scatter grad_out [N, C, P] onto [N, C, H, W]."""
    grad = np.zeros(shape)
    for n, p in itertools.product(range(shape[0]), range(coords.shape[1])):
        for row, col, w in corner_weights(shape[2], shape[3], *coords[n, p]):
            grad[n, :, row, col] += w * grad_out[n, :, p]
    return grad


def sample_coords(n: int, height: int, width: int, extra: int = 4, dtype=torch.float64):
    """[n, K + extra, 2]: the special points of an H x W map, then random ones in [-0.2, 1.2];
    also returns the point indices that lie wholly outside."""
    inside, outside = special_points(height, width)
    fixed = torch.tensor(inside + outside, dtype=dtype).expand(n, -1, -1)
    coords = torch.cat([fixed, torch.rand(n, extra, 2, dtype=dtype) * 1.4 - 0.2], dim=1)
    return coords, list(range(len(inside), len(inside) + len(outside)))


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_point_sample(contiguous):
    n, c, hh, ww = 2, 3, 3, 4
    inp = torch.randn(n, c, hh, ww, dtype=torch.float64)
    if not contiguous:
        inp = torch.randn(n, hh, ww, c, dtype=torch.float64).permute(0, 3, 1, 2)
    inp.requires_grad_()
    coords, outside = sample_coords(n, hh, ww)
    out = mk.point_sample(inp, coords, backend=REF)
    assert_close(out, torch.from_numpy(loop_point_sample(np64(inp), np64(coords))), EXACT)
    assert (out[:, :, outside] == 0).all()

    grad_out = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, inp, grad_out)
    want = loop_point_sample_transpose(np64(grad_out), inp.shape, np64(coords))
    assert_close(got, torch.from_numpy(want), EXACT, "grad input")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_point_sample_dtypes(dtype):
    inp = torch.randn(2, 3, 3, 4, dtype=dtype)
    coords, _ = sample_coords(2, 3, 4, dtype=torch.float32)
    out = mk.point_sample(inp, coords, backend=REF)
    assert out.dtype == dtype
    assert_close(out, torch.from_numpy(loop_point_sample(np64(inp), np64(coords))), TOLERANCE[dtype])


# --- uncertain_point_coords -----------------------------------------------------------------


def loop_uncertain(logits: np.ndarray, candidates: np.ndarray, random: np.ndarray, k: int) -> np.ndarray:
    """The k candidates with the smallest |sampled logit| (most uncertain first), then random."""
    rows = []
    for n in range(logits.shape[0]):
        certainty = [abs(float(bilinear(logits[n], *xy))) for xy in candidates[n]]
        order = sorted(range(len(certainty)), key=certainty.__getitem__)[:k]
        rows.append(np.concatenate([candidates[n, order], random[n]], axis=0))
    return np.stack(rows)


@pytest.mark.parametrize("indexed", [False, True], ids=["plain", "indexed"])
@pytest.mark.parametrize("num_uncertain", [1, 5, 12])
def test_uncertain_point_coords_op(num_uncertain, indexed):
    """indexed: logits [B, Q, H, W] with (batch, query) indices, repeated and out of order;
    the loop reads the same masks out of the numpy array."""
    candidates = torch.rand(3, 12, 2, dtype=torch.float64)
    random = torch.rand(3, 4, 2, dtype=torch.float64)
    if indexed:
        logits = torch.randn(2, 4, 5, 6, dtype=torch.float64)
        bi, qi = torch.tensor([1, 0, 1]), torch.tensor([3, 2, 3])
        out = torch.ops.m2f_kernels.uncertain_point_coords(logits, candidates, random, num_uncertain, bi, qi, REF)
        masks = np64(logits)[bi.numpy(), qi.numpy()]
    else:
        logits = torch.randn(3, 5, 6, dtype=torch.float64)
        out = torch.ops.m2f_kernels.uncertain_point_coords(logits, candidates, random, num_uncertain, None, None, REF)
        masks = np64(logits)
    want = loop_uncertain(masks, np64(candidates), np64(random), num_uncertain)
    assert out.shape == (3, num_uncertain + 4, 2)
    assert torch.equal(out, torch.from_numpy(want))


def fresh_generator_seed() -> int:
    return int(torch.randint(0, 2**62, ()))


def test_uncertain_point_coords_reproducible():
    logits = torch.randn(3, 8, 8)
    seed = fresh_generator_seed()
    draw = lambda s: mk.uncertain_point_coords(  # noqa: E731
        logits, 10, generator=torch.Generator().manual_seed(s), backend=REF)
    first = draw(seed)
    assert first.shape == (3, 10, 2) and first.dtype == torch.float32
    assert ((first >= 0) & (first <= 1)).all()
    assert torch.equal(first, draw(seed))
    assert not torch.equal(first, draw(seed + 1))


@pytest.mark.parametrize(
    "num_points, oversample, ratio, num_candidates, num_uncertain",
    [(10, 3.0, 0.75, 30, 7), (7, 3.0, 0.75, 21, 5), (3, 1.5, 0.5, 4, 1), (10, 2.5, 0.0, 25, 0),
     (10, 3.0, 1.0, 30, 10)],
)
def test_uncertain_point_coords_counts(num_points, oversample, ratio, num_candidates, num_uncertain):
    """int() rounding of the candidate and uncertain counts; the public API draws the
    candidates, then the random points, from ``generator`` in logits' float dtype."""
    logits = torch.randn(2, 5, 6, dtype=torch.float64)
    seed = fresh_generator_seed()
    out = mk.uncertain_point_coords(logits, num_points, oversample, ratio,
                                    generator=torch.Generator().manual_seed(seed), backend=REF)
    g = torch.Generator().manual_seed(seed)
    candidates = torch.rand(2, num_candidates, 2, generator=g, dtype=torch.float64)
    random = torch.rand(2, num_points - num_uncertain, 2, generator=g, dtype=torch.float64)
    want = loop_uncertain(np64(logits), np64(candidates), np64(random), num_uncertain)
    assert out.shape == (2, num_points, 2)
    assert torch.equal(out, torch.from_numpy(want))


# --- point_mask_loss ------------------------------------------------------------------------


def loop_point_losses(pred: np.ndarray, target: np.ndarray, coords: np.ndarray, num_masks: float):
    """pred [N, Hp, Wp], target [N, Ht, Wt], coords [N, P, 2] -> (loss_bce, loss_dice)."""
    total_bce = total_dice = 0.0
    for n in range(pred.shape[0]):
        xs = [float(bilinear(pred[n], *xy)) for xy in coords[n]]
        ts = [float(bilinear(target[n], *xy)) for xy in coords[n]]
        total_bce += sum(bce(x, t) for x, t in zip(xs, ts)) / len(xs)
        total_dice += dice([sigmoid(x) for x in xs], ts)
    return total_bce / num_masks, total_dice / num_masks


def make_target(n: int, height: int, width: int, kind: str) -> torch.Tensor:
    if kind == "float":
        return torch.rand(n, height, width)
    hard = torch.rand(n, height, width) < 0.5
    return hard if kind == "bool" else hard.to(torch.uint8)


def loss_coords(n: int, npt: int, hp: int, wp: int) -> torch.Tensor:
    """[n, npt, 2]: random points in [-0.1, 1.1], some replaced by special points of pred's map."""
    coords = torch.rand(n, npt, 2, dtype=torch.float64) * 1.2 - 0.1
    inside, outside = special_points(hp, wp)
    special = torch.tensor(inside + outside, dtype=torch.float64)
    pick = torch.rand(n, npt) < 0.3
    coords[pick] = special[torch.randint(len(special), (int(pick.sum()),))]
    return coords


LOSS_CASES = {  # N, P, (Hp, Wp), (Ht, Wt)
    "general": (3, 7, (3, 4), (5, 6)),
    "same_resolution": (2, 6, (4, 3), (4, 3)),
    "one_point": (3, 1, (3, 4), (2, 5)),
    "one_mask": (1, 6, (3, 4), (6, 5)),
}


@pytest.mark.parametrize("num_masks", [1, 2.5])
@pytest.mark.parametrize("target_kind", ["float", "bool", "uint8"])
@pytest.mark.parametrize("case", LOSS_CASES.values(), ids=LOSS_CASES.keys())
def test_point_mask_loss(case, target_kind, num_masks):
    n, npt, (hp, wp), (ht, wt) = case
    pred = torch.randn(n, hp, wp, dtype=torch.float64).mul_(2).requires_grad_()
    target = make_target(n, ht, wt, target_kind)
    coords = loss_coords(n, npt, hp, wp)
    loss_bce, loss_dice = mk.point_mask_loss(pred, target, coords, num_masks, backend=REF)
    assert loss_bce.shape == () and loss_bce.dtype == torch.float64
    pn, tn, cn = np64(pred), np64(target), np64(coords)
    want_bce, want_dice = loop_point_losses(pn, tn, cn, num_masks)
    assert_close(loss_bce, torch.tensor(want_bce, dtype=torch.float64), EXACT, "loss_bce")
    assert_close(loss_dice, torch.tensor(want_dice, dtype=torch.float64), EXACT, "loss_dice")

    a, b = torch.rand(2, dtype=torch.float64) + 0.5
    (got,) = torch.autograd.grad(a * loss_bce + b * loss_dice, pred)

    def loss():
        lb, ld = loop_point_losses(pn, tn, cn, num_masks)
        return float(a) * lb + float(b) * ld

    (want,) = fd_grads(loss, [pn])
    assert_close(got, torch.from_numpy(want), FD_TOL, "grad pred")


def test_point_mask_loss_num_masks_normalisation():
    pred = torch.randn(3, 4, 4, dtype=torch.float64)
    target, coords = make_target(3, 5, 5, "float"), loss_coords(3, 6, 4, 4)
    one = mk.point_mask_loss(pred, target, coords, 1, backend=REF)
    for num_masks in (0.5, 3, 7.25):
        scaled = mk.point_mask_loss(pred, target, coords, num_masks, backend=REF)
        for name, s, o in zip(("bce", "dice"), scaled, one):
            assert_close(s * num_masks, o, EXACT, f"loss_{name} * num_masks")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_point_mask_loss_dtypes(dtype):
    pred = torch.randn(3, 3, 4, dtype=dtype)
    target, coords = make_target(3, 5, 6, "float"), loss_coords(3, 7, 3, 4).float()
    losses = mk.point_mask_loss(pred, target, coords, 2.0, backend=REF)
    want = loop_point_losses(np64(pred), np64(target), np64(coords), 2.0)
    for name, got, w in zip(("bce", "dice"), losses, want):
        assert got.dtype == dtype
        assert_close(got, torch.tensor(w, dtype=torch.float64), TOLERANCE[dtype], f"loss_{name}")


def test_point_mask_loss_indexed():
    """pred [B, Q, Hp, Wp] + pred_index equals the gathered form; a mask matched twice
    gets both gradients; unmatched masks get zero."""
    nb, nq, hp, wp = 2, 3, 3, 4
    batch_index = torch.tensor([0, 1, 1, 0])
    query_index = torch.tensor([2, 0, 2, 2])  # (0, 2) twice
    n, npt = len(batch_index), 5
    pred = torch.randn(nb, nq, hp, wp, dtype=torch.float64).requires_grad_()
    target, coords = make_target(n, 5, 6, "bool"), loss_coords(n, npt, hp, wp)
    num_masks = 3.0
    indexed = mk.point_mask_loss(pred, target, coords, num_masks, pred_index=(batch_index, query_index),
                                 backend=REF)
    gathered = mk.point_mask_loss(pred[batch_index, query_index], target, coords, num_masks, backend=REF)
    gn, tn, cn = np64(pred[batch_index, query_index]), np64(target), np64(coords)
    want = loop_point_losses(gn, tn, cn, num_masks)
    for name, i, g, w in zip(("bce", "dice"), indexed, gathered, want):
        assert_close(i, torch.tensor(w, dtype=torch.float64), EXACT, f"loss_{name}")
        assert_close(i, g, EXACT, f"indexed vs gathered loss_{name}")

    (got,) = torch.autograd.grad(indexed[0] + 2 * indexed[1], pred)

    def loss():
        lb, ld = loop_point_losses(gn, tn, cn, num_masks)
        return lb + 2 * ld

    (want_sel,) = fd_grads(loss, [gn])
    want_grad = np.zeros(pred.shape)
    for row, (bi, qi) in enumerate(zip(batch_index.tolist(), query_index.tolist())):
        want_grad[bi, qi] += want_sel[row]
    assert_close(got, torch.from_numpy(want_grad), FD_TOL, "grad pred")
    assert not got[0, :2].any() and not got[1, 1:2].any()


def test_point_mask_loss_no_masks():
    """N = 0 matched masks: both losses are 0, the gradient is zero, no error."""
    target, coords = torch.zeros(0, 5, 6, dtype=torch.bool), torch.rand(0, 4, 2)
    flat = torch.randn(0, 3, 4).requires_grad_()
    stacked = torch.randn(2, 3, 3, 4).requires_grad_()
    empty_index = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    for pred, pred_index in ((flat, None), (stacked, empty_index)):
        losses = mk.point_mask_loss(pred, target, coords, 1.0, pred_index=pred_index, backend=REF)
        assert all(loss.shape == () and loss.item() == 0 for loss in losses)
        (grad,) = torch.autograd.grad(losses[0] + losses[1], pred)
        assert grad.shape == pred.shape and not grad.any()


# --- pairwise_mask_cost ---------------------------------------------------------------------


def loop_pairwise_costs(pred: np.ndarray, target: np.ndarray, coords: np.ndarray):
    """pred [Q, Hp, Wp], target [T, Ht, Wt], coords [P, 2] -> (cost_bce, cost_dice) [Q, T]."""
    xs = [[float(bilinear(m, *xy)) for xy in coords] for m in pred]
    ts = [[float(bilinear(m, *xy)) for xy in coords] for m in target]
    cost_bce = np.zeros((len(xs), len(ts)))
    cost_dice = np.zeros((len(xs), len(ts)))
    for i, j in itertools.product(range(len(xs)), range(len(ts))):
        cost_bce[i, j] = sum(bce(x, t) for x, t in zip(xs[i], ts[j])) / len(coords)
        cost_dice[i, j] = dice([sigmoid(x) for x in xs[i]], ts[j])
    return cost_bce, cost_dice


@pytest.mark.parametrize("target_hw", [(3, 5), (6, 4)], ids=["same_resolution", "other_resolution"])
@pytest.mark.parametrize("target_kind", ["float", "bool", "uint8"])
@pytest.mark.parametrize("dtype", (torch.float64,) + LOW_PRECISION, ids=str)
def test_pairwise_mask_cost(dtype, target_kind, target_hw):
    nq, nt, (hp, wp) = 4, 3, (3, 5)
    pred = (torch.randn(nq, hp, wp) * 2).to(dtype)
    target = make_target(nt, *target_hw, target_kind)
    coords = loss_coords(1, 9, hp, wp)[0].to(torch.float64 if dtype == torch.float64 else torch.float32)
    cost_bce, cost_dice = mk.pairwise_mask_cost(pred, target, coords, backend=REF)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    want_bce, want_dice = loop_pairwise_costs(np64(pred), np64(target), np64(coords))
    for name, got, want in (("cost_bce", cost_bce, want_bce), ("cost_dice", cost_dice, want_dice)):
        assert got.shape == (nq, nt) and got.dtype == out_dtype and got.is_contiguous()
        assert_close(got, torch.from_numpy(want), TOLERANCE[dtype], name)


@pytest.mark.parametrize("nq, nt", [(0, 3), (4, 0), (0, 0)])
def test_pairwise_mask_cost_empty(nq, nt):
    pred, target = torch.randn(nq, 3, 4, dtype=torch.float16), make_target(nt, 5, 5, "uint8")
    for cost in mk.pairwise_mask_cost(pred, target, torch.rand(6, 2), backend=REF):
        assert cost.shape == (nq, nt) and cost.dtype == torch.float32

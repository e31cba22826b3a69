"""NaN and infinite inputs (docs/ops.md, "Non-finite values"): every kernel backend gives
NaN and ±inf where the contract does, the contract being the reference backend on the CPU
(torch's CPU grid_sample for the sampling); mask logits in masked_attention; the opt-in
M2F_KERNELS_CHECK_FINITE=1 check; out-of-range counts as ValueError.

The contract is computed on CPU copies of the inputs: on a GPU the reference backend calls
torch's CUDA grid_sample, which samples 0 at a non-finite coordinate instead of NaN.
"""
from __future__ import annotations

import pytest
import torch

import m2f_kernels as mk
from .conftest import DEVICE, KERNEL_BACKENDS, TOLERANCE

NAN, INF = float("nan"), float("inf")
BAD = {"nan": NAN, "+inf": INF, "-inf": -INF}
BAD_IDS = list(BAD)

pytestmark = [
    pytest.mark.usefixtures("seed"),
    # the Triton interpreter's own range(<runtime int>) (numpy >= 1.25), not this code
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    # numpy under TRITON_INTERPRET computing with NaN and inf
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]


# ============================================================================ helpers


def _cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, (tuple, list)):
        return type(x)(_cpu(v) for v in x)
    return x


def run(op, backend, args, kwargs=None, grad_of=(), grad_out=None):
    """(outputs..., gradients...) of ``mk.<op>`` on ``backend``; ``grad_of`` names positions
    of ``args`` that get a gradient of sum(output_i * grad_out_i). For the reference
    (the contract) everything runs on CPU copies."""
    kwargs = dict(kwargs or {})
    if backend == "reference":
        args, kwargs = _cpu(args), _cpu(kwargs)
        grad_out = _cpu(grad_out)
    args = list(args)
    leaves = []
    for i in grad_of:
        args[i] = args[i].detach().clone().requires_grad_()
        leaves.append(args[i])
    out = getattr(mk, op)(*args, backend=backend, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = ()
    if leaves:
        grad_out = grad_out if grad_out is not None else tuple(torch.ones_like(o) for o in outs)
        loss = sum((o.float() * g.float()).sum() for o, g in zip(outs, grad_out))
        grads = torch.autograd.grad(loss, leaves)
    return tuple(o.detach() for o in outs) + tuple(grads)


def assert_matches(got, want, what, exact=True, tol=None):
    """``got`` has NaN, +inf and -inf exactly where ``want`` has (``exact``), or is non-finite
    exactly where it is (not ``exact``: ±inf inputs, where NaN and ±inf may swap), and is
    within the dtype's tolerance where both are finite."""
    got, want = got.detach().cpu(), want.detach().cpu()
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape} {got.dtype} vs {want.shape} {want.dtype}"
    g, w = got.double(), want.double()
    pairs = [("NaN", g.isnan(), w.isnan()), ("+inf", g.isposinf(), w.isposinf()), ("-inf", g.isneginf(), w.isneginf())]
    if not exact:
        pairs = [("non-finite", ~g.isfinite(), ~w.isfinite())]
    for name, a, b in pairs:
        assert torch.equal(a, b), (f"{what}: {name} at {a.nonzero().flatten().tolist()[:12]}, "
                                   f"the contract at {b.nonzero().flatten().tolist()[:12]}")
    both = g.isfinite() & w.isfinite()
    if both.any():
        tol = TOLERANCE[want.dtype] if tol is None else tol
        denom = max(w[both].norm().item(), 1e-2 * both.sum().item() ** 0.5)
        err = (g[both] - w[both]).norm().item() / denom
        assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e} where finite"


def assert_backend_matches(op, backend, args, kwargs=None, grad_of=(), grad_out=None, names=None, exact=True,
                           tol=None):
    got = run(op, backend, args, kwargs, grad_of, grad_out)
    want = run(op, "reference", args, kwargs, grad_of, grad_out)
    names = names or [f"{op}[{i}]" for i in range(len(want))]
    for g, w, name in zip(got, want, names):
        assert_matches(g, w, f"{name} ({backend})", exact=exact, tol=tol)
    return got, want


def put(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def levels(*hw):
    shapes = torch.tensor(hw, dtype=torch.int64, device=DEVICE)
    sizes = shapes.prod(1)
    return shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]), int(sizes.sum())


def deform_inputs(softmax, lq=5, p=2):
    shapes, starts, s = levels((4, 5), (2, 3))
    value = torch.randn(2, s, 2, 4, device=DEVICE)
    loc = torch.rand(2, lq, 2, 2, p, 2, device=DEVICE) * 1.2 - 0.1
    w = torch.randn(2, lq, 2, 2, p, device=DEVICE)
    if not softmax:
        w = w.flatten(-2).softmax(-1).view_as(w)
    return value, shapes, starts, loc, w, torch.randn(2, lq, 8, device=DEVICE)


DEFORM_NAMES = ("out", "grad_value", "grad_sampling_locations", "grad_attention_weights")

# ============================================================================ the contract


class TestContract:
    """What the reference backend (torch's CPU grid_sample) gives: the contract itself."""

    @pytest.mark.parametrize("bad", BAD_IDS)
    @pytest.mark.parametrize("axis", ["x", "y", "both"])
    def test_a_nonfinite_coordinate_samples_nan_and_scatters_nothing(self, bad, axis):
        x = torch.randn(1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
        coords = torch.tensor([[[0.3, 0.6], [0.7, 0.2]]], dtype=torch.float64)
        coords[0, 0, {"x": [0], "y": [1], "both": [0, 1]}[axis]] = BAD[bad]
        out = mk.point_sample(x, coords, backend="reference")
        assert out[0, :, 0].isnan().all() and out[0, :, 1].isfinite().all()
        (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
        (alone,) = torch.autograd.grad(mk.point_sample(x, coords[:, 1:], backend="reference").sum(), x)
        assert torch.equal(grad, alone), "the non-finite point adds nothing to grad input"

    @pytest.mark.parametrize("far", [1e30, -1e30, 3e9])
    def test_a_far_finite_coordinate_samples_zero(self, far):
        x = torch.randn(1, 2, 4, 5)
        out = mk.point_sample(x, torch.tensor([[[far, 0.5], [0.5, far]]]), backend="reference")
        assert torch.equal(out, torch.zeros_like(out))

    @pytest.mark.parametrize("bad", BAD_IDS)
    def test_location_gradient_of_a_nonfinite_component(self, bad):
        """grid_sample's grid gradient: 0 (times finite weight and grad_out) along the
        non-finite component, NaN along the other; the weight gradient is NaN."""
        value, shapes, starts, loc, w, g = (t.cpu() for t in deform_inputs(False))
        loc = put(loc, (0, 1, 0, 1, 0, 0), BAD[bad])
        out, gv, gl, gw = run("ms_deform_attn", "reference", (value, shapes, starts, loc, w),
                              grad_of=(0, 3, 4), grad_out=(g,))
        assert out.isnan().sum() == value.shape[-1] and out[0, 1, :4].isnan().all()
        assert gv.isfinite().all()
        assert gl[0, 1, 0, 1, 0, 0] == 0 and gl[0, 1, 0, 1, 0, 1].isnan()
        assert gl.isnan().sum() == 1 and gw.isnan().sum() == 1 and gw[0, 1, 0, 1, 0].isnan()

    def test_mask_logits_follow_the_official_sigmoid_rule(self):
        """The official decoder blocks where sigmoid(logit) < 0.5: NaN is not blocked, -inf
        is, +inf is not; the reference's logit < 0 gives the same mask."""
        b, h, q, n, d = 1, 2, 6, 9, 4
        logits = torch.randn(b, q, n) * 3
        logits[logits.abs() < 0.05] = 0.0
        logits[0, 0] = NAN  # a row of NaN: nothing blocked
        logits[0, 1, ::2], logits[0, 2, 1::3], logits[0, 3, :4] = NAN, INF, -INF
        q_, k, v = torch.randn(b, h, q, d), torch.randn(b, h, n, d), torch.randn(b, h, n, d)
        official = logits.sigmoid() < 0.5
        assert not official[0, 0].any() and not official[0, 1, ::2].any() and official[0, 3, :4].all()
        got = mk.masked_attention(q_, k, v, logits, backend="reference")
        want = mk.masked_attention(q_, k, v, official, backend="reference")
        assert torch.equal(got, want)

    def test_the_masked_attention_docstring_states_the_nan_rule(self):
        doc = " ".join(mk.masked_attention.__doc__.split())
        assert "NaN logit is not blocked" in doc


# ============================================================================ the kernels

COORD_CASES = [(bad, axis) for bad in BAD_IDS for axis in ("x", "y", "both")]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("bad,axis", COORD_CASES, ids=[f"{b}-{a}" for b, a in COORD_CASES])
class TestNonfiniteCoordinates:
    """A NaN or infinite coordinate samples NaN and scatters nothing, in every op that samples."""

    @staticmethod
    def _spoil(coords, bad, axis, rows):
        cols = {"x": [0], "y": [1], "both": [0, 1]}[axis]
        coords = coords.clone()
        for r in rows:
            coords[r + (cols,)] = BAD[bad]
        return coords

    def test_point_sample(self, backend, bad, axis):
        x = torch.randn(2, 3, 5, 6, device=DEVICE)
        coords = self._spoil(torch.rand(2, 7, 2, device=DEVICE) * 1.2 - 0.1, bad, axis, [(0, 2), (1, 0), (1, 6)])
        assert_backend_matches("point_sample", backend, (x, coords), grad_of=(0,),
                               grad_out=(torch.randn(2, 3, 7, device=DEVICE),), names=("out", "grad_input"))

    @pytest.mark.parametrize("form", ["plain", "indexed"])
    def test_point_mask_loss(self, backend, bad, axis, form):
        n, p = 3, 9
        coords = self._spoil(torch.rand(n, p, 2, device=DEVICE), bad, axis, [(1, 4)])
        target = torch.rand(n, 7, 8, device=DEVICE) > 0.5
        if form == "indexed":
            pred = torch.randn(2, 3, 5, 6, device=DEVICE)
            kwargs = {"pred_index": (torch.tensor([1, 0, 1], device=DEVICE), torch.tensor([2, 0, 0], device=DEVICE))}
        else:
            pred, kwargs = torch.randn(n, 5, 6, device=DEVICE), {}
        assert_backend_matches("point_mask_loss", backend, (pred, target, coords, 2.0), kwargs, grad_of=(0,),
                               grad_out=(torch.tensor(0.7), torch.tensor(-1.3)),
                               names=("loss_bce", "loss_dice", "grad_pred"))

    def test_pairwise_mask_cost(self, backend, bad, axis):
        pred, target = torch.randn(4, 5, 6, device=DEVICE), torch.rand(3, 7, 8, device=DEVICE) > 0.5
        coords = self._spoil(torch.rand(10, 2, device=DEVICE), bad, axis, [(3,)])
        assert_backend_matches("pairwise_mask_cost", backend, (pred, target, coords), names=("cost_bce", "cost_dice"))

    @pytest.mark.parametrize("softmax", [False, True], ids=["weights", "softmax"])
    def test_ms_deform_attn(self, backend, bad, axis, softmax):
        value, shapes, starts, loc, w, g = deform_inputs(softmax)
        cols = {"x": [0], "y": [1], "both": [0, 1]}[axis]
        loc = loc.clone()
        loc[0, 1, 0, 1, 0, cols] = BAD[bad]
        loc[1, 4, 1, 0, 1, cols] = BAD[bad]
        assert_backend_matches("ms_deform_attn", backend, (value, shapes, starts, loc, w), {"softmax": softmax},
                               grad_of=(0, 3, 4), grad_out=(g,), names=DEFORM_NAMES)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("bad", BAD_IDS)
class TestNonfiniteValues:
    """NaN and infinite map values, weights and logits."""

    def test_a_tap_outside_the_map_never_reads_it(self, backend, bad):
        """A non-finite border pixel reaches no point whose taps are outside the map (zero
        padding), whatever the kernel does to keep its loads in bounds."""
        h, w = 5, 6
        maps = put(torch.randn(3, h, w, device=DEVICE), (slice(None), 0, 0), BAD[bad])
        inside = torch.rand(2, 2, device=DEVICE) * 0.4 + torch.tensor([1.6 / w, 1.6 / h], device=DEVICE)
        outside = torch.tensor([[-0.2, -0.2], [-0.6 / w, 0.1], [0.1, -0.6 / h], [-1e3, -1e3]], device=DEVICE)
        coords = torch.cat([inside, outside])
        _, want = assert_backend_matches("point_sample", backend, (maps.unsqueeze(1), coords.expand(3, -1, -1)),
                                         grad_of=(0,), names=("out", "grad_input"))
        assert want[0].isfinite().all()
        _, want = assert_backend_matches("point_mask_loss", backend, (maps, maps > 0, coords.expand(3, -1, -1), 3.0),
                                         grad_of=(0,), names=("loss_bce", "loss_dice", "grad_pred"))
        assert all(t.isfinite().all() for t in want[:2])
        _, want = assert_backend_matches("pairwise_mask_cost", backend, (maps, maps[:2] > 0, coords),
                                         names=("cost_bce", "cost_dice"))
        assert all(t.isfinite().all() for t in want)

    @pytest.mark.parametrize("op", ["point_sample", "point_mask_loss", "pairwise_mask_cost", "ms_deform_attn"])
    def test_map_values(self, backend, bad, op):
        """A non-finite pixel reaches the samples whose taps cover it; NaN exactly where the
        contract has it, ±inf non-finite where the contract is (NaN and ±inf may swap)."""
        exact = bad == "nan"
        if op == "ms_deform_attn":
            value, shapes, starts, loc, w, g = deform_inputs(False, lq=9, p=3)
            value = put(put(value, (0, 7, 1, 2), BAD[bad]), (1, 21, 0, 0), BAD[bad])
            assert_backend_matches(op, backend, (value, shapes, starts, loc, w), grad_of=(0, 3, 4), grad_out=(g,),
                                   names=DEFORM_NAMES, exact=exact)
            return
        maps = torch.randn(4, 5, 6, device=DEVICE)
        maps = put(put(maps, (1, 2, 3), BAD[bad]), (3, 4, 5), BAD[bad])
        coords = torch.rand(4, 12, 2, device=DEVICE)
        if op == "point_sample":
            assert_backend_matches(op, backend, (maps.unsqueeze(1), coords), grad_of=(0,),
                                   grad_out=(torch.randn(4, 1, 12, device=DEVICE),), names=("out", "grad_input"),
                                   exact=exact)
        elif op == "point_mask_loss":
            target = put(torch.rand(4, 7, 8, device=DEVICE), (2, 3, 3), BAD[bad])
            assert_backend_matches(op, backend, (maps, target, coords, 4.0), grad_of=(0,),
                                   names=("loss_bce", "loss_dice", "grad_pred"), exact=exact)
        else:
            target = put(torch.rand(3, 7, 8, device=DEVICE), (2, 3, 3), BAD[bad])
            assert_backend_matches(op, backend, (maps, target, coords[0]), names=("cost_bce", "cost_dice"),
                                   exact=exact)

    @pytest.mark.parametrize("softmax", [False, True], ids=["weights", "softmax"])
    def test_ms_deform_attn_weights(self, backend, bad, softmax):
        value, shapes, starts, loc, w, g = deform_inputs(softmax)
        loc = put(loc, (0, 2, 1, 0, 1), torch.tensor([-0.7, 1.9]))  # this point lies outside its map
        w = put(put(w, (0, 2, 1, 0, 1), BAD[bad]), (1, 3, 0, 1, 0), BAD[bad])
        assert_backend_matches("ms_deform_attn", backend, (value, shapes, starts, loc, w), {"softmax": softmax},
                               grad_of=(0, 3, 4), grad_out=(g,), names=DEFORM_NAMES, exact=bad == "nan")

    def test_uncertain_point_coords_logits(self, backend, bad):
        """NaN and infinite logits: the same points as the reference (the draws do not depend
        on the backend; NaN uncertainty ranks first)."""
        logits = torch.randn(3, 6, 7, device=DEVICE) * 3
        logits = put(put(logits, (0, 2, 3), BAD[bad]), (2, slice(None), 0), BAD[bad])
        got = mk.uncertain_point_coords(logits, 20, generator=torch.Generator(DEVICE).manual_seed(5), backend=backend)
        want = mk.uncertain_point_coords(logits.cpu(), 20, generator=torch.Generator().manual_seed(5),
                                         backend="reference")
        if DEVICE == "cpu":  # the draws of one generator type: the same candidates
            k = int(0.75 * 20)
            # the candidates with NaN uncertainty come first, in the same set
            u_got = mk.point_sample(logits.unsqueeze(1).cpu(), got[:, :k].cpu(), backend="reference")[:, 0]
            u_want = mk.point_sample(logits.unsqueeze(1).cpu(), want[:, :k], backend="reference")[:, 0]
            assert torch.equal(u_got.isnan(), u_want.isnan())
            chosen_nan = u_want.isnan()
            assert sorted(got.cpu()[:, :k][chosen_nan].tolist()) == sorted(want[:, :k][chosen_nan].tolist())


@pytest.mark.parametrize("backend", [p for p in KERNEL_BACKENDS if p.values[0] == "triton"])
@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("where", ["coords", "mask_features", "mask_embed"])
def test_point_mask_logits_forward(backend, bad, where):
    """The logits at points are NaN / ±inf where the reference's are (their gradients are
    not pinned: docs/ops.md, "Non-finite values"). The cuda backend has no point_mask_logits."""
    embed, features = torch.randn(2, 3, 4, device=DEVICE), torch.randn(2, 4, 5, 6, device=DEVICE)
    coords = torch.rand(3, 7, 2, device=DEVICE)
    index = (torch.tensor([1, 0, 1], device=DEVICE), torch.tensor([2, 0, 0], device=DEVICE))
    if where == "coords":
        coords = put(coords, (1, 4, 0), BAD[bad])
    elif where == "mask_features":
        features = put(features, (1, 2, 3, 3), BAD[bad])
        coords = put(coords, (0, 0), torch.tensor([3.5 / 6, 3.5 / 5]))  # mask 0 (image 1) reads that pixel
    else:
        embed = put(embed, (1, 2, 1), BAD[bad])
    got = run("point_mask_logits", backend, (embed, features, coords, index))[0]
    want = run("point_mask_logits", "reference", (embed, features, coords, index))[0]
    assert (~want.isfinite()).any()
    assert_matches(got, want, "logits", exact=bad == "nan")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
class TestMaskedAttention:

    def test_nonfinite_mask_logits(self, backend):
        """NaN logits are not blocked, -inf are, +inf are not, as in the reference; a row of
        NaN attends to all keys; a row of -inf is empty, so it attends to all keys too."""
        b, h, q, n, d = 2, 2, 7, 21, 8
        logits = torch.randn(b, q, n, device=DEVICE) * 3
        logits[0, 0] = NAN
        logits[0, 1] = -INF
        logits[1, 2, ::2], logits[1, 3, 1::3], logits[1, 4, :5] = NAN, INF, -INF
        qkv = [torch.randn(b, h, length, d, device=DEVICE) for length in (q, n, n)]
        assert_backend_matches("masked_attention", backend, (*qkv, logits), grad_of=(0, 1, 2),
                               grad_out=(torch.randn(b, h, q, d, device=DEVICE),), names=("out", "dq", "dk", "dv"))

    def test_a_nan_query_row(self, backend):
        """A NaN in q makes its row's output NaN in every backend; the other rows, which the
        kernels never mix with it, stay finite and match."""
        b, h, q, n, d = 1, 2, 5, 19, 8
        mask = torch.rand(b, q, n, device=DEVICE) > 0.6
        qkv = [torch.randn(b, h, length, d, device=DEVICE) for length in (q, n, n)]
        qkv[0] = put(qkv[0], (0, 1, 3, 2), NAN)
        got = run("masked_attention", backend, (*qkv, mask))[0]
        want = run("masked_attention", "reference", (*qkv, mask))[0]
        assert_matches(got, want, "out")
        assert got[0, 1, 3].isnan().all() and got.isnan().sum() == d


# ============================================================================ M2F_KERNELS_CHECK_FINITE


def _op_calls():
    """(op name, argument names, a function of {name: override} making the call)."""
    d = DEVICE
    shapes, starts, s = levels((4, 5), (2, 3))

    def attention(o):
        q, k, v = (o.get(name, torch.randn(1, 2, length, 4, device=d)) for name, length in (("q", 3), ("k", 5), ("v", 5)))
        return mk.masked_attention(q, k, v, o.get("mask", torch.randn(1, 3, 5, device=d)), backend="reference")

    def deform(o):
        return mk.ms_deform_attn(o.get("value", torch.randn(1, s, 2, 4, device=d)), shapes, starts,
                                 o.get("sampling_locations", torch.rand(1, 3, 2, 2, 2, 2, device=d)),
                                 o.get("attention_weights", torch.rand(1, 3, 2, 2, 2, device=d)), backend="reference")

    def point_sample(o):
        return mk.point_sample(o.get("input", torch.randn(2, 1, 5, 6, device=d)), o.get("coords", torch.rand(2, 4, 2, device=d)),
                               backend="reference")

    def uncertain(o):
        return mk.uncertain_point_coords(o.get("logits", torch.randn(2, 5, 6, device=d)), 4, backend="reference")

    def loss(o):
        return mk.point_mask_loss(o.get("pred", torch.randn(2, 5, 6, device=d)), o.get("target", torch.rand(2, 5, 6, device=d)),
                                  o.get("coords", torch.rand(2, 4, 2, device=d)), o.get("num_masks", 2.0),
                                  mask_weight=o.get("mask_weight", torch.ones(2, device=d)), backend="reference")

    def cost(o):
        return mk.pairwise_mask_cost(o.get("pred", torch.randn(3, 5, 6, device=d)), o.get("target", torch.rand(2, 5, 6, device=d)),
                                     o.get("coords", torch.rand(4, 2, device=d)), backend="reference")

    def assignment(o):
        return mk.linear_sum_assignment(o.get("cost", torch.rand(2, 4, 3, device=d)), backend="reference")

    return [
        ("masked_attention", ("q", "k", "v", "mask"), attention),
        ("ms_deform_attn", ("value", "sampling_locations", "attention_weights"), deform),
        ("point_sample", ("input", "coords"), point_sample),
        ("uncertain_point_coords", ("logits",), uncertain),
        ("point_mask_loss", ("pred", "target", "coords", "num_masks", "mask_weight"), loss),
        ("pairwise_mask_cost", ("pred", "target", "coords"), cost),
        ("linear_sum_assignment", ("cost",), assignment),
    ]


CHECK_CASES = [(op, arg, fn) for op, args, fn in _op_calls() for arg in args]


def _spoiled(arg, fn, value):
    """The call with one NaN / inf put into ``arg`` (an argument of the default call)."""
    defaults = {}

    class Recorder(dict):
        def get(self, key, default=None):
            defaults[key] = default
            return default

    fn(Recorder())
    base = defaults[arg]
    if isinstance(base, float):
        return {arg: value}
    return {arg: put(base, tuple(0 for _ in base.shape), value)}


def _allowed(op, arg, value) -> bool:
    """+inf costs ("never match") and ±inf mask logits (blocked / visible) are defined inputs."""
    return ((op, arg) == ("linear_sum_assignment", "cost") and value == INF
            or (op, arg) == ("masked_attention", "mask") and value in (INF, -INF))


@pytest.mark.parametrize("op,arg,fn", CHECK_CASES, ids=[f"{op}-{arg}" for op, arg, _ in CHECK_CASES])
def test_check_finite_names_the_argument(op, arg, fn, monkeypatch):
    # without the check: a NaN (an inf where the op rejects NaN anyway) goes through
    unchecked = INF if (op, arg) in (("linear_sum_assignment", "cost"), ("point_mask_loss", "num_masks")) else NAN
    for setting in (None, "0"):
        if setting is None:
            monkeypatch.delenv("M2F_KERNELS_CHECK_FINITE", raising=False)
        else:
            monkeypatch.setenv("M2F_KERNELS_CHECK_FINITE", setting)
        fn(_spoiled(arg, fn, unchecked))
    monkeypatch.setenv("M2F_KERNELS_CHECK_FINITE", "1")
    fn({})  # finite inputs pass
    for value in (NAN, INF, -INF):
        if _allowed(op, arg, value):
            fn(_spoiled(arg, fn, value))
        else:
            with pytest.raises(ValueError, match=rf"^{arg} holds"):
                fn(_spoiled(arg, fn, value))


# ============================================================================ index-like arguments


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU an out-of-range value is a device-side assert")
@pytest.mark.parametrize("counts", [[3, 4], [-1, 2]])
def test_num_targets_out_of_range_is_a_value_error(counts):
    with pytest.raises(ValueError, match=r"num_targets values must be in \[0, 3\]"):
        mk.linear_sum_assignment(torch.rand(2, 4, 3), torch.tensor(counts), backend="reference")

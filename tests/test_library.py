"""torch.library integration of every op: gradcheck (float64), opcheck, torch.compile(fullgraph)."""
from __future__ import annotations

import contextlib

import pytest
import torch

import m2f_kernels as mk

F64 = torch.float64
SHAPES = torch.tensor([[3, 4], [2, 2], [1, 1]])
STARTS = torch.tensor([0, 12, 16])
S = 17


def _attention_inputs(per_head=False, logits=False):
    b, h, q, n, d = 2, 3, 5, 7, 4
    qkv = [torch.randn(b, h, length, d, dtype=F64, requires_grad=True) for length in (q, n, n)]
    shape = (b, h, q, n) if per_head else (b, q, n)
    mask = torch.randn(shape, dtype=F64) if logits else torch.rand(shape) < 0.6
    if logits:
        mask[0, ..., 0, :] = -1.0  # an empty row exercises the all-keys rule
    else:
        mask[0, ..., 0, :] = True
    return qkv, mask


def _deform_inputs():
    b, lq, h, d, levels, p = 2, 3, 2, 4, 3, 2
    value = torch.randn(b, S, h, d, dtype=F64, requires_grad=True)
    loc = (torch.rand(b, lq, h, levels, p, 2, dtype=F64) * 1.2 - 0.1).requires_grad_()
    weights = torch.rand(b, lq, h, levels, p, dtype=F64, requires_grad=True)
    return value, loc, weights


def _loss_inputs():
    pred = torch.randn(2, 4, 6, 5, dtype=F64, requires_grad=True)
    target = torch.rand(3, 9, 8) > 0.5
    coords = torch.rand(3, 11, 2, dtype=F64)
    index = (torch.tensor([0, 1, 1]), torch.tensor([2, 0, 3]))
    return pred, target, coords, index


# --- gradcheck ------------------------------------------------------------------------------


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("logits", [False, True])
def test_gradcheck_masked_attention(per_head, logits):
    (q, k, v), mask = _attention_inputs(per_head, logits)
    assert torch.autograd.gradcheck(lambda q, k, v: mk.masked_attention(q, k, v, mask, backend="reference"), (q, k, v))


@pytest.mark.parametrize("softmax", [False, True])
def test_gradcheck_ms_deform_attn(softmax):
    value, loc, weights = _deform_inputs()
    fn = lambda v, l, w: mk.ms_deform_attn(v, SHAPES, STARTS, l, w, softmax=softmax, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (value, loc, weights))


def test_gradcheck_point_sample():
    x = torch.randn(3, 2, 5, 6, dtype=F64, requires_grad=True)
    coords = torch.rand(3, 7, 2, dtype=F64) * 1.2 - 0.1
    assert torch.autograd.gradcheck(lambda x: mk.point_sample(x, coords, backend="reference"), (x,))


@pytest.mark.parametrize("indexed", [False, True])
def test_gradcheck_point_mask_loss(indexed):
    pred, target, coords, index = _loss_inputs()
    if indexed:
        fn = lambda p: mk.point_mask_loss(p, target, coords, 2.5, pred_index=index, backend="reference")  # noqa: E731
    else:
        pred = pred[index].detach().requires_grad_()
        fn = lambda p: mk.point_mask_loss(p, target.double(), coords, 2.5, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pred,))


def test_non_differentiable_inputs_raise():
    coords = torch.rand(3, 7, 2, dtype=F64, requires_grad=True)
    out = mk.point_sample(torch.randn(3, 2, 5, 6, dtype=F64, requires_grad=True), coords)
    with pytest.raises(RuntimeError, match="not in coords"):
        out.sum().backward()
    logits = torch.randn(3, 8, 8, requires_grad=True)
    cost, _ = mk.pairwise_mask_cost(logits, torch.rand(2, 8, 8) > 0.5, torch.rand(5, 2))
    assert not cost.requires_grad  # the public function detaches: the matcher has no gradient
    cost, _ = torch.ops.m2f_kernels.pairwise_mask_cost(logits, torch.rand(2, 8, 8) > 0.5, torch.rand(5, 2), "reference")
    with pytest.raises(RuntimeError, match="not differentiable"):
        cost.sum().backward()


# --- opcheck --------------------------------------------------------------------------------


def _opcheck_cases():
    (q, k, v), mask = _attention_inputs()
    value, loc, weights = _deform_inputs()
    pred, target, coords, (bi, qi) = _loss_inputs()
    x = torch.randn(3, 2, 5, 6, dtype=F64, requires_grad=True)
    ops = torch.ops.m2f_kernels
    return {
        "masked_attention": (ops.masked_attention.default, (q, k, v, mask, 0.3, "reference")),
        "ms_deform_attn": (ops.ms_deform_attn.default, (value, SHAPES, STARTS, loc, weights, True, False, "reference")),
        "point_sample": (ops.point_sample.default, (x, coords, "reference")),
        "uncertain_point_coords": (ops.uncertain_point_coords.default,
                                   (torch.randn(3, 8, 8), torch.rand(3, 30, 2), torch.rand(3, 3, 2), 7, None, None,
                                    "reference")),
        "uncertain_point_coords_indexed": (ops.uncertain_point_coords.default,
                                           (pred.detach(), torch.rand(3, 30, 2, dtype=F64),
                                            torch.rand(3, 3, 2, dtype=F64), 7, bi, qi, "reference")),
        "point_mask_loss": (ops.point_mask_loss.default, (pred, target, coords, 2.5, bi, qi, None, "reference")),
        "point_mask_loss_3d": (ops.point_mask_loss.default,
                               (pred[bi, qi].detach().requires_grad_(), target, coords, 2.5, None, None, None,
                                "reference")),
        "pairwise_mask_cost": (ops.pairwise_mask_cost.default, (pred[0].detach(), target, coords[0], "reference")),
        "point_mask_logits": (ops.point_mask_logits.default,
                              (torch.randn(2, 4, 3, dtype=F64, requires_grad=True),
                               torch.randn(2, 3, 5, 6, dtype=F64, requires_grad=True), coords, bi, qi, "reference")),
        "linear_sum_assignment": (ops.linear_sum_assignment.default,
                                  (torch.rand(2, 5, 4), torch.tensor([4, 2]), "reference")),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


# --- torch.compile --------------------------------------------------------------------------


def test_compile_fullgraph_all_ops():
    (q, k, v), mask = _attention_inputs()
    value, loc, weights = _deform_inputs()
    pred, target, coords, index = _loss_inputs()

    def step(q, k, v, value, loc, weights, pred):
        a = mk.masked_attention(q, k, v, mask)
        b = mk.ms_deform_attn(value, SHAPES, STARTS, loc, weights, softmax=True)
        c = mk.point_sample(pred[0].unsqueeze(1), coords[:1].expand(4, -1, -1))
        bce, dice = mk.point_mask_loss(pred, target, coords, 3.0, pred_index=index)
        cost_bce, cost_dice = mk.pairwise_mask_cost(pred[0], target, coords[0])
        points = mk.uncertain_point_coords(pred[1], 5)
        indexed_points = mk.uncertain_point_coords(pred, 6, pred_index=index)
        matched = mk.linear_sum_assignment(cost_bce.unsqueeze(0), num_targets)
        loss = a.sum() + b.sum() + c.sum() + bce + dice + cost_bce.sum() + cost_dice.sum()
        return loss, points, indexed_points, matched

    num_targets = torch.tensor([2])
    args = (q, k, v, value, loc, weights, pred)
    eager, eager_points, eager_indexed, eager_matched = step(*args)
    torch._dynamo.reset()
    compiled, compiled_points, compiled_indexed, compiled_matched = torch.compile(step, fullgraph=True)(*args)
    torch.testing.assert_close(compiled, eager)
    assert torch.equal(compiled_matched, eager_matched)
    assert compiled_points.shape == eager_points.shape == (4, 5, 2)
    assert compiled_indexed.shape == eager_indexed.shape == (3, 6, 2)
    grads = torch.autograd.grad(compiled, (q, value, pred))
    eager_grads = torch.autograd.grad(step(*args)[0], (q, value, pred))
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


# --- eager fast path ------------------------------------------------------------------------


def _differentiable_calls():
    """name -> (fn(*leaves) -> outputs, leaves): each public op with autograd, float64."""
    (q, k, v), mask = _attention_inputs(logits=True)
    value, loc, weights = _deform_inputs()
    pred, target, coords, index = _loss_inputs()
    x = torch.randn(3, 2, 5, 6, dtype=F64, requires_grad=True)
    return {
        "masked_attention": (lambda q, k, v: (mk.masked_attention(q, k, v, mask),), (q, k, v)),
        "ms_deform_attn": (lambda v, l, w: (mk.ms_deform_attn(v, SHAPES, STARTS, l, w, softmax=True),),
                           (value, loc, weights)),
        "point_sample": (lambda x: (mk.point_sample(x, coords),), (x,)),
        "point_mask_loss": (lambda p: mk.point_mask_loss(p, target, coords, 2.5, pred_index=index), (pred,)),
    }


@pytest.fixture
def custom_op_path(monkeypatch):
    """Every public call goes through the torch.library custom op, as under torch.compile."""
    from m2f_kernels.ops import _define

    monkeypatch.setattr(_define, "FAST_EAGER", False)


def _outputs_and_grads(fn, leaves):
    outs = fn(*leaves)
    total = sum((o * torch.randn_like(o, generator=torch.Generator().manual_seed(i))).sum() for i, o in enumerate(outs))
    return outs, torch.autograd.grad(total, leaves), [o.grad_fn.name() for o in outs]


def test_backend_choice_is_marked_constant_as_dynamo_marks_it():
    """The op layer marks its backend choice constant for dynamo by hand (importing
    torch._dynamo for its decorator costs ~1 s of ``import m2f_kernels``): the marker must be
    the one torch._dynamo.assume_constant_result sets in this torch."""
    from m2f_kernels.ops import _define

    def probe():
        return None

    torch._dynamo.assume_constant_result(probe)
    assert vars(probe), "assume_constant_result no longer marks the function: update _define._choose"
    for name, value in vars(probe).items():
        assert getattr(_define._choose, name, None) == value, name


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast_bf16"])
@pytest.mark.parametrize("name", list(_differentiable_calls()))
def test_eager_fast_path_equals_custom_op(name, autocast, monkeypatch):
    """Plain eager calls take the autograd.Function; it must give the custom op's outputs and
    gradients bit for bit (same backend functions, same autocast casts), and the custom op
    must still be reachable."""
    from m2f_kernels.ops import _define

    fn, leaves = _differentiable_calls()[name]
    if autocast:  # float32 leaves, so that the autocast rules have something to cast
        leaves = tuple(x.detach().float().requires_grad_() for x in leaves)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        fast, fast_grads, fast_nodes = _outputs_and_grads(fn, leaves)
    monkeypatch.setattr(_define, "FAST_EAGER", False)
    with context:
        slow, slow_grads, slow_nodes = _outputs_and_grads(fn, leaves)
    assert any(n.endswith("EagerBackward") for n in fast_nodes), fast_nodes
    assert not any(n.endswith("EagerBackward") for n in slow_nodes), slow_nodes
    for a, b in zip(fast + fast_grads, slow + slow_grads):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_eager_fast_path_only_in_plain_eager_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from m2f_kernels.ops._define import eager_fast_path

    t = torch.randn(2, 3)
    assert eager_fast_path(t, torch.nn.Parameter(t))
    with torch.device("cpu"):  # a torch function mode
        assert not eager_fast_path(t)
    with FakeTensorMode():  # a dispatch mode (export, meta tracing)
        assert not eager_fast_path(t)
    seen = []
    torch.vmap(lambda x: seen.append(eager_fast_path(x)) or x)(t)
    torch.compile(lambda x: seen.append(eager_fast_path(x)) or x, backend="eager")(t)
    assert seen == [False, False]


def test_custom_op_path_gradcheck(custom_op_path):
    """The gradchecks above run the fast path; the custom op's registered autograd gets its own."""
    for name, (fn, leaves) in _differentiable_calls().items():
        assert torch.autograd.gradcheck(lambda *xs: fn(*xs)[0], leaves), name


@pytest.mark.parametrize("fast", [True, False], ids=["eager_function", "custom_op"])
@pytest.mark.parametrize("name", list(_differentiable_calls()))
def test_double_backward_raises(name, fast, monkeypatch):
    """The backwards have no derivative of their own: a second derivative (a gradient penalty
    through create_graph=True) raises on both paths instead of being wrong or silently 0."""
    from m2f_kernels.ops import _define

    monkeypatch.setattr(_define, "FAST_EAGER", fast)
    fn, leaves = _differentiable_calls()[name]
    outs = fn(*leaves)
    total = sum(o.sum() for o in outs)
    grads = torch.autograd.grad(total, leaves, create_graph=True)
    torch.autograd.grad(total, leaves, retain_graph=True)  # first order: fine
    penalty = total + sum((g ** 2).sum() for g in grads)
    with pytest.raises(RuntimeError, match="second derivative|no autograd formula"):
        penalty.backward()


def test_every_op_runs_on_meta_tensors():
    """Plain eager calls on meta tensors (shape inference, a model built on the meta device)
    take the custom op's fakes: shapes and dtypes, no data, gradients included."""
    meta = torch.device("meta")
    q = torch.randn(2, 3, 5, 4, device=meta, requires_grad=True)
    value = torch.randn(2, S, 2, 4, device=meta, requires_grad=True)
    loc, weights = torch.rand(2, 3, 2, 3, 2, 2, device=meta), torch.rand(2, 3, 2, 3, 2, device=meta)
    pred = torch.randn(2, 4, 6, 5, device=meta, requires_grad=True)
    target, coords = torch.rand(3, 9, 8, device=meta) > 0.5, torch.rand(3, 11, 2, device=meta)
    index = (torch.tensor([0, 1, 1], device=meta), torch.tensor([2, 0, 3], device=meta))
    out = mk.masked_attention(q, q, q, torch.rand(2, 5, 5, device=meta) < 0.5)
    assert out.shape == q.shape and torch.autograd.grad(out.sum(), q)[0].shape == q.shape
    out = mk.ms_deform_attn(value, SHAPES, STARTS, loc, weights)
    assert out.shape == (2, 3, 8) and torch.autograd.grad(out.sum(), value)[0].shape == value.shape
    assert mk.point_sample(pred[0].unsqueeze(1), coords[:1].expand(4, -1, -1)).shape == (4, 1, 11)
    bce, dice = mk.point_mask_loss(pred, target, coords, 3.0, pred_index=index)
    assert bce.shape == dice.shape == () and torch.autograd.grad(bce + dice, pred)[0].shape == pred.shape
    assert mk.uncertain_point_coords(pred, 7, pred_index=index).shape == (3, 7, 2)
    cost, _ = mk.pairwise_mask_cost(pred[0], target, coords[0])
    assert cost.shape == (4, 3) and cost.device == meta
    assert mk.linear_sum_assignment(cost).shape == (3,)
    embed, features = torch.randn(2, 4, 3, device=meta), torch.randn(2, 3, 5, 6, device=meta)
    assert mk.point_mask_logits(embed, features, coords, index).shape == (3, 11)

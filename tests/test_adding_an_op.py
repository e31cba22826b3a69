"""docs/adding-an-op.md, executed: a toy seventh op declared the way the guide says.

The guide's three files are stood in for by this test: the reference implementation is a
module installed as ``m2f_kernels.reference.scaled_square`` (where dispatch looks for it),
the declaration and public function are written here. Everything else (custom op, fakes,
autograd, eager path, autocast, dispatch, info) must come from the declaration alone.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

import m2f_kernels
from m2f_kernels import _dispatch
from m2f_kernels.ops import _autocast, _define
from m2f_kernels.ops._autocast import FP32
from m2f_kernels.ops._define import Backward, define_op, implementation

NAME = "scaled_square_toy"
MODULE = "scaled_square_toy"


def _reference_module() -> types.ModuleType:
    """What m2f_kernels/reference/scaled_square_toy.py would hold."""
    module = types.ModuleType(f"m2f_kernels.reference.{MODULE}")

    def scaled_square_fwd(x, scale):
        return scale * x * x

    def scaled_square_bwd(grad_out, x, scale):
        return 2 * scale * x * grad_out

    module.scaled_square_fwd, module.scaled_square_bwd = scaled_square_fwd, scaled_square_bwd
    return module


@pytest.fixture(scope="module")
def toy_op():
    """Declares the toy op once (torch.library registrations live as long as the process)
    and takes it out of the package's registries afterwards, so other tests see the package's ops only."""
    sys.modules[f"m2f_kernels.reference.{MODULE}"] = _reference_module()

    # --- the guide's m2f_kernels/ops/scaled_square_toy.py ---
    def _forward(x: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
        return implementation(backend, NAME, "fwd")(x, scale)

    def _backward(grad_out: torch.Tensor, x: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
        return implementation(backend, NAME, "bwd")(grad_out, x, scale)

    op = define_op(
        NAME, _forward, lambda x, scale, backend: torch.empty_like(x),
        module=MODULE, functions={"fwd": "scaled_square_fwd", "bwd": "scaled_square_bwd"},
        backward=Backward(_backward, lambda g, x, scale, backend: torch.empty_like(x),
                          args=lambda grads, inputs, _: (grads[0], inputs.x, inputs.scale),
                          differentiable=("x",)),
        autocast={"x": FP32},
    )

    def scaled_square(x: torch.Tensor, scale: float = 1.0, *, backend=None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        return op(x, float(scale), backend=backend)
    # --------------------------------------------------------

    yield scaled_square
    for registry in (_dispatch.OPS, _define.OPS, _autocast.RULES):
        registry.pop(NAME, None)
    sys.modules.pop(f"m2f_kernels.reference.{MODULE}", None)


def test_forward_and_gradient(toy_op):
    x = torch.randn(5, 3, requires_grad=True)
    out = toy_op(x, 3.0)
    assert torch.allclose(out, 3 * x.detach() ** 2)
    out.sum().backward()
    assert torch.allclose(x.grad, 6 * x.detach())


def test_custom_op_passes_opcheck(toy_op):
    x = torch.randn(4, 2, requires_grad=True)
    torch.library.opcheck(getattr(torch.ops.m2f_kernels, NAME).default, (x, 2.0, "reference"))


def test_eager_path_equals_custom_op(toy_op, monkeypatch):
    x = torch.randn(6, requires_grad=True)
    fast = torch.autograd.grad(toy_op(x, 1.5).sum(), x)[0]
    monkeypatch.setattr(_define, "FAST_EAGER", False)
    slow = torch.autograd.grad(toy_op(x, 1.5).sum(), x)[0]
    assert torch.equal(fast, slow)


def test_compiles_fullgraph(toy_op):
    x = torch.randn(7)
    got = torch.compile(lambda t: toy_op(t, 2.0) + 1, backend="aot_eager", fullgraph=True)(x)
    assert torch.allclose(got, 2 * x * x + 1)


def test_autocast_rule_applies(toy_op):
    x = torch.randn(3, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert toy_op(x).dtype == torch.float32


def test_dispatch_and_info_know_it(toy_op):
    assert _dispatch.resolve(NAME, torch.device("cpu"), torch.float32, "auto") == "reference"
    reason = _dispatch.why_not("triton", NAME, torch.device("cuda"), torch.float32)
    assert reason is not None  # no GPU here, or no triton module for the toy op
    from m2f_kernels.info import report

    assert any(line.startswith(NAME + " ") for line in report().splitlines())


def test_a_second_declaration_of_the_name_is_refused(toy_op):
    with pytest.raises(RuntimeError, match="registered twice"):
        _dispatch.register(_dispatch.OpDispatch(NAME, MODULE, {"fwd": "scaled_square_fwd"}))


def test_declaration_mistakes_are_named():
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x

    with pytest.raises(ValueError, match="backend"):
        define_op("toy_without_backend_arg", forward, forward, module="x", functions={"fwd": "f"}, no_grad="x")
    with pytest.raises(ValueError, match="exactly one"):
        define_op("toy_without_grad_rule", forward, forward, module="x", functions={"fwd": "f"})
    assert "toy_without_backend_arg" not in m2f_kernels._dispatch.OPS

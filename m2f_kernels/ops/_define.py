"""One declaration per op: :func:`define_op` builds everything an op needs from it.

An op module (``m2f_kernels/ops/<op>.py``) writes the op's forward body (its annotations
are the custom op's schema), a fake, and, when it has a gradient, a :class:`Backward`.
``define_op`` then registers

- the custom op ``m2f_kernels::<name>`` (and ``m2f_kernels::<name>_backward``) with fakes,
  so opcheck, torch.compile, export, fake tensors, modes and functorch work;
- its autograd (``register_autograd``), and the same autograd as a plain
  ``torch.autograd.Function`` for the eager fast path (no dispatcher: less host time);
- its autocast rule (``AutocastCPU`` / ``AutocastCUDA`` kernels, :mod:`._autocast`);
- its dispatch facts (which module of each backend implements it, the measured 'auto'
  order; :mod:`m2f_kernels._dispatch`).

Calling the returned :class:`Op` with the custom op's arguments (``backend=`` as a keyword)
chooses the backend and runs the op; under ``torch.onnx.export`` it traces the op's
reference instead (:meth:`Op.decomposed`: standard ONNX operators, no custom op). ``docs/adding-an-op.md`` walks through a new op.
"""
from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from .. import _dispatch
from . import _autocast


@dataclasses.dataclass(frozen=True)
class Backward:
    """An op's gradient, computed by a second custom op ``<name>_backward``.

    Args:
        impl: the backward op's body, annotated like the forward (its last argument is
            ``backend: str``); it returns the gradients of ``differentiable``, in order.
        fake: its fake implementation (same arguments).
        args: ``args(grads, inputs, outputs)`` -> ``impl``'s arguments without ``backend``:
            ``grads`` the output gradients (a tuple, one per output), ``inputs`` a namespace
            of the forward's arguments by name, ``outputs`` the forward's outputs (a tuple;
            only with ``save_outputs``).
        differentiable: the forward arguments ``impl`` returns gradients for, in order; the
            others get None.
        refuse_grad: floating arguments that have no gradient by contract: asking for one
            raises (silently returning None would look like a zero gradient).
        save_outputs: keep the forward's outputs for ``args``.
        non_differentiable_outputs: indices of outputs marked non-differentiable.
    """
    impl: Callable
    fake: Callable
    args: Callable
    differentiable: Sequence[str]
    refuse_grad: Sequence[str] = ()
    save_outputs: bool = False
    non_differentiable_outputs: Sequence[int] = ()


class Op:
    """A declared op. ``op(*args, backend=None)`` runs it: ``args`` are the custom op's
    arguments without ``backend``, already validated by the public function."""

    def __init__(self, name: str, custom_op, forward: Callable, eager: Callable, argnames: Tuple[str, ...],
                 dispatch_arg: int):
        self.name = name
        self.custom_op = custom_op
        self._forward = forward
        self._eager = eager
        self.argnames = argnames
        self._dispatch_arg = dispatch_arg
        # {backend: its Limit or None}, filled by _choose for every candidate it returns: read
        # here rather than through dispatch so that torch.compile traces no module lookup
        self.limits: Dict[str, Optional[_dispatch.Limit]] = {}

    def choose_backend(self, args: tuple, backend: Optional[str]) -> str:
        """The concrete backend for these arguments (``backend`` None: the current default).

        Under torch.compile the candidates are fixed once, at trace time, and baked into
        the graph: a later set_backend() does not retrace an already compiled function.
        """
        tensor = args[self._dispatch_arg]
        # a bool / integer input (masks read as bytes) takes the float32 kernels' backends
        dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
        chosen = _choose(self.name, backend, str(tensor.device), str(dtype).replace("torch.", ""))
        reasons = []
        for candidate in chosen:
            limit = self.limits.get(candidate)
            reason = None if limit is None else _dispatch.limit_reason(candidate, self.name, args, limit)
            if reason is None:
                return candidate
            reasons.append(reason)
        raise _dispatch.BackendUnavailableError(f"m2f_kernels.{self.name}: {'; '.join(reasons)}")

    def __call__(self, *args, backend: Optional[str] = None):
        args = (*args, self.choose_backend(args, backend))
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not eager_fast_path(*tensors):
            if torch.onnx.is_in_onnx_export():
                return self.decomposed(*args[:-1])
            return self.custom_op(*args)
        device_type = tensors[0].device.type
        if not torch.is_autocast_enabled(device_type):
            return self._eager(*args)
        args = _autocast.cast_args(self.name, args, device_type)
        with torch.autocast(device_type, enabled=False):
            out = self._eager(*args)
        return _autocast.cast_outputs(self.name, out, device_type)

    def decomposed(self, *args):
        """The op as standard torch ops: its forward body on the reference backend, called
        directly, so that a tracer records the reference's aten ops instead of the custom op.

        ``torch.onnx.export`` gets this (ONNX has no kernel of ours); ``torch.export`` and
        torch.compile keep the custom op.
        """
        return self._forward(*args, "reference")


OPS: Dict[str, Op] = {}


def define_op(name: str, forward: Callable, fake: Callable, *, module: str, functions: Dict[str, str],
              backward: Optional[Backward] = None, no_grad: str = "", autocast: Optional[Dict[str, str]] = None,
              fp32_outputs: bool = False, dispatch_arg: int = 0,
              auto_order_cuda: Optional[Dict[str, Tuple[str, ...]]] = None) -> Op:
    """Declare op ``name`` and register everything it needs (see the module docstring).

    Args:
        forward: the op's body, annotated (the schema), last argument ``backend: str``; it
            calls ``implementation(backend, name, kind)`` (empty inputs handled here, so
            the backends never see them).
        fake: the fake implementation (same arguments).
        module, functions: the op's module in each backend package and the function names
            it must export there, by kind ({'fwd': 'x_fwd', 'bwd': 'x_bwd'}).
        backward: the gradient; without it the op is not differentiable and ``no_grad``
            completes "m2f_kernels.<name> is not differentiable with respect to ...".
        autocast: {argument: ``_autocast.LOW`` | ``_autocast.FP32``}; ``fp32_outputs``:
            floating outputs are widened to float32 under autocast (losses).
        dispatch_arg: the argument whose device and dtype choose the backend.
        auto_order_cuda: the measured 'auto' order where it is not triton first.
    """
    if (backward is None) == (not no_grad):
        raise ValueError(f"{name}: give exactly one of backward= and no_grad=")
    argnames = tuple(inspect.signature(forward).parameters)
    if argnames[-1] != "backend":
        raise ValueError(f"{name}: the forward's last argument must be 'backend: str'")
    qualname = f"m2f_kernels::{name}"
    custom = torch.library.custom_op(qualname, forward, mutates_args=())
    custom.register_fake(fake)
    if backward is None:
        torch.library.register_autograd(qualname, _refuse_backward(name, no_grad),
                                        setup_context=lambda ctx, inputs, output: None)
        eager = forward
    else:
        backward_op = torch.library.custom_op(f"{qualname}_backward", backward.impl, mutates_args=())
        backward_op.register_fake(backward.fake)
        setup = _setup_context(argnames, backward)
        torch.library.register_autograd(qualname, _autograd_backward(name, argnames, backward, backward_op),
                                        setup_context=setup)
        eager = _eager_function(name, forward, setup, _autograd_backward(name, argnames, backward, backward.impl))
    _autocast.register(name, custom, autocast or {}, fp32_outputs)
    _dispatch.register(_dispatch.OpDispatch(name, module, dict(functions), dict(auto_order_cuda or {})))
    op = OPS[name] = Op(name, custom, forward, eager, argnames[:-1], dispatch_arg)
    return op


def implementation(backend: str, op: str, kind: str):
    """The backend's function of ``kind`` for ``op`` (a forward body's call)."""
    return _dispatch.implementation(backend, op, kind)


# --- backend choice ---------------------------------------------------------------------------

def _choose(op: str, backend: Optional[str], device: str, dtype: str) -> tuple:
    chosen = _dispatch.candidates(op, torch.device(device), getattr(torch, dtype), backend)
    limits = OPS[op].limits
    for candidate in chosen:
        if candidate not in limits:
            limits[candidate] = _dispatch.limits(candidate, op)
    return chosen


# What torch._dynamo.assume_constant_result does (dynamo marks its own functions so too),
# without importing torch._dynamo here: that import is ~1 s, most of `import m2f_kernels`.
_choose._dynamo_marked_constant = True


# --- the eager fast path ----------------------------------------------------------------------

FAST_EAGER = True
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def eager_fast_path(*tensors: torch.Tensor) -> bool:
    """True where a plain ``torch.autograd.Function`` may stand in for an op's custom op.

    The custom op (dispatcher, ``register_autograd``) is what torch.compile, export, fake
    tensors, dispatch and function modes and functorch transforms need. In plain eager mode
    it is pure host cost: on the H200 host one masked-attention forward+backward spent
    ~1.1 ms in the op layer against ~0.36 ms in the backend and ~0.3 ms of GPU time
    (bench/notes/masked_attention.md), so eager calls take the Function, which runs the same
    backend functions. ``FAST_EAGER = False`` turns it off.
    """
    if not FAST_EAGER or torch.compiler.is_compiling():
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active()):
        return False
    # meta tensors (shape inference) take the custom op, whose fakes are its meta kernels
    return all(type(t) in _PLAIN_TENSORS and not t.is_meta for t in tensors)


def _eager_function(name: str, forward: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """``apply`` of an autograd.Function whose forward and backward call the op's bodies
    directly, with the custom op's ``setup_context``.

    The context is set up inside ``forward`` (the pre-2.0 style): a separate
    ``setup_context`` staticmethod makes every ``apply`` bind its arguments through
    ``inspect.signature`` (~45 us per call).
    """

    def forward_with_ctx(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    cls_name = "".join(part.title() for part in name.split("_")) + "Eager"
    function = type(cls_name, (torch.autograd.Function,), {
        "forward": staticmethod(forward_with_ctx), "backward": staticmethod(_first_order_only(name, backward)),
    })
    return function.apply


def _first_order_only(name: str, backward: Callable) -> Callable:
    """``backward`` run without recording a graph; under ``create_graph`` its gradients lead to a
    node that raises when backpropagated through, as the custom op's ``<name>_backward`` does.

    The backward bodies are not differentiable (the outputs they are given are constants to
    them, the kernels record nothing), so a second derivative through them would be wrong or
    silently missing. ``torch.autograd.function.once_differentiable`` looks only at the output
    gradients; here the saved inputs count too (``grad(out.sum(), q, create_graph=True)``).
    """
    message = (f"m2f_kernels.{name} has no second derivative (its backward is not differentiable)").encode()

    def first_order_backward(ctx, *grads):
        with torch.no_grad():
            result = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return result
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in (*grads, *ctx.saved_tensors)):
            return result
        error = torch._C._functions.DelayedError(message, len(result))
        return error(*[None if g is None else g.detach().requires_grad_() for g in result])

    return first_order_backward


# --- autograd from a Backward -----------------------------------------------------------------

def _setup_context(argnames: Tuple[str, ...], backward: Backward) -> Callable:
    tensor_slots = None  # the positions of tensor (or optional tensor) arguments, fixed per op

    def setup_context(ctx, inputs, output):
        nonlocal tensor_slots
        if tensor_slots is None:
            tensor_slots = tuple(i for i, a in enumerate(inputs) if a is None or isinstance(a, torch.Tensor))
        outputs = output if isinstance(output, tuple) else (output,)
        saved = [inputs[i] for i in tensor_slots]
        if backward.save_outputs:
            saved.extend(outputs)
        ctx.save_for_backward(*saved)
        ctx.others = tuple(a for i, a in enumerate(inputs) if i not in tensor_slots)
        ctx.tensor_slots = tensor_slots
        for i in backward.non_differentiable_outputs:
            ctx.mark_non_differentiable(outputs[i])

    return setup_context


def _autograd_backward(name: str, argnames: Tuple[str, ...], backward: Backward, impl: Callable) -> Callable:
    index = {a: i for i, a in enumerate(argnames)}
    grad_slots = tuple(index[a] for a in backward.differentiable)
    refused = tuple((index[a], a) for a in backward.refuse_grad)
    n_inputs = len(argnames)

    def autograd_backward(ctx, *grads):
        for i, argname in refused:
            if ctx.needs_input_grad[i]:
                raise RuntimeError(f"m2f_kernels.{name} is differentiable in {', '.join(backward.differentiable)} "
                                   f"only, not in {argname}")
        saved = ctx.saved_tensors
        n_tensors = len(ctx.tensor_slots)
        values, others = [None] * n_inputs, iter(ctx.others)
        for slot, tensor in zip(ctx.tensor_slots, saved[:n_tensors]):
            values[slot] = tensor
        for i in range(n_inputs):
            if i not in ctx.tensor_slots:
                values[i] = next(others)
        inputs = types.SimpleNamespace(**dict(zip(argnames, values)))
        result = impl(*backward.args(grads, inputs, saved[n_tensors:]), inputs.backend)
        result = result if isinstance(result, tuple) else (result,)
        out = [None] * n_inputs
        for slot, grad in zip(grad_slots, result):
            out[slot] = grad
        return tuple(out)

    return autograd_backward


def _refuse_backward(name: str, what: str) -> Callable:
    def backward(ctx, *grads):
        raise RuntimeError(f"m2f_kernels.{name} is not differentiable with respect to {what}")

    return backward


def accumulate_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other input accumulates (and returns stats) in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32

"""Plumbing shared by the op modules."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _dispatch


@torch._dynamo.assume_constant_result
def _choose(op: str, backend: Optional[str], device: str, dtype: str) -> str:
    return _dispatch.resolve(op, torch.device(device), getattr(torch, dtype), backend)


def choose_backend(op: str, tensor: torch.Tensor, backend: Optional[str]) -> str:
    """The concrete backend for ``op`` on ``tensor``'s device and dtype.

    Under torch.compile the choice is made once, at trace time, and baked into the
    graph: a later set_backend() does not retrace an already compiled function.
    """
    return _choose(op, backend, str(tensor.device), str(tensor.dtype).replace("torch.", ""))


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
    return all(type(t) in _PLAIN_TENSORS for t in tensors)


def call_op(name: str, eager, custom_op, *args):
    """Run op ``name`` on ``args``, the custom op's positional arguments.

    On the eager fast path ``eager(*args)`` runs (an autograd.Function's ``apply``, or the
    backend call itself for an op without gradient), with the op's autocast rules applied
    as the custom op's autocast kernel applies them; elsewhere ``custom_op(*args)``.
    """
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not eager_fast_path(*tensors):
        return custom_op(*args)
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return eager(*args)
    from . import _autocast  # not at import time: it needs the registered ops

    args = _autocast.cast_args(name, args, device_type)
    with torch.autocast(device_type, enabled=False):
        out = eager(*args)
    return _autocast.cast_outputs(name, out, device_type)


FAST_EAGER = True
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def eager_function(name: str, forward, setup_context, backward) -> type:
    """The eager fast path of an op: an autograd.Function whose forward and backward call
    the backend directly, with the same ``setup_context`` as the custom op's autograd.

    The context is set up inside ``forward`` (the pre-2.0 style): a separate
    ``setup_context`` staticmethod makes every ``apply`` bind its arguments through
    ``inspect.signature`` (~45 us per call).
    """

    def forward_with_ctx(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward_with_ctx), "backward": staticmethod(backward),
    })


def accumulate_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other input accumulates (and returns stats) in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def not_differentiable(op: str, what: str):
    """An autograd backward for an op (or inputs) that has no gradient."""

    def backward(ctx, *grads):
        raise RuntimeError(f"m2f_kernels.{op} is not differentiable with respect to {what}")

    return backward

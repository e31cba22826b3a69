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


def accumulate_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other input accumulates (and returns stats) in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def not_differentiable(op: str, what: str):
    """An autograd backward for an op (or inputs) that has no gradient."""

    def backward(ctx, *grads):
        raise RuntimeError(f"m2f_kernels.{op} is not differentiable with respect to {what}")

    return backward

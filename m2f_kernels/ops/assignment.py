"""``m2f_kernels.linear_sum_assignment``: the op's declaration, checks and public function."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validation import check_count_values, check_finite, check_float, check_same_device, check_tensor
from ._define import define_op, implementation

OP = "linear_sum_assignment"


def _forward(cost: Tensor, num_targets: Tensor, backend: str) -> Tensor:
    """[B, T] int64: the query matched to each target, -1 for padding / unmatched."""
    if cost.numel() == 0:
        return torch.full((cost.shape[0], cost.shape[2]), -1, dtype=torch.int64, device=cost.device)
    return implementation(backend, OP, "fwd")(cost, num_targets)


def _fake(cost, num_targets, backend):
    return cost.new_empty(cost.shape[0], cost.shape[2], dtype=torch.int64)


LINEAR_SUM_ASSIGNMENT = define_op(
    OP, _forward, _fake,
    module="assignment", functions={"fwd": "linear_sum_assignment"},
    no_grad="the cost (an assignment is piecewise constant in it)",
)


def linear_sum_assignment(cost: Tensor, num_targets: Optional[Tensor] = None, *,
                          backend: Optional[str] = None) -> Tensor:
    """Minimum-cost assignment of queries to targets for a batch of cost matrices, in one call.

    The Hungarian matcher's solver (scipy.optimize.linear_sum_assignment's optimum) for
    every prediction and image of a training step at once, on the cost's device, with a
    static output shape: no host sync on a GPU (the cuda backend, or the reference
    backend's fixed-length loops).

    Args:
        cost: [B, Q, T] floating cost matrices (queries x targets), or [Q, T] for one.
        num_targets: [B] integer, the valid target columns of each matrix (the rest is
            padding and never read); None: all T.
        backend: 'auto', 'reference' or 'cuda'; None uses the current default.
    Returns:
        [B, T] (or [T]) int64 on cost's device: the query matched to each target; -1 for
        padding columns and, when a matrix has more valid targets than queries, for the
        targets left unmatched. Matched queries are distinct within a matrix and their total
        cost is minimal (ties may pick another optimum than scipy). +inf marks a pair not to
        match unless unavoidable; NaN counts as +inf. A CPU cost with NaN raises
        ValueError (checking a GPU cost would cost a host sync). Not differentiable.
    """
    check_tensor("cost", cost, (2, 3), "[B, Q, T] or [Q, T]")
    check_float("cost", cost)
    single = cost.dim() == 2
    if single:
        cost = cost.unsqueeze(0)
    if num_targets is None:
        num_targets = torch.full((cost.shape[0],), cost.shape[2], dtype=torch.int64, device=cost.device)
    else:
        check_tensor("num_targets", num_targets, (1,) if not single else (0, 1), "[B]")
        if num_targets.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"num_targets must be an integer tensor, got {num_targets.dtype}")
        check_same_device(("cost", "num_targets"), (cost, num_targets))
        num_targets = num_targets.reshape(-1).to(torch.int64)
        if num_targets.shape[0] != cost.shape[0]:
            raise ValueError(f"num_targets must hold one count per matrix ({cost.shape[0]}), "
                             f"got shape {tuple(num_targets.shape)}")
        check_count_values("num_targets", num_targets, cost.shape[2], f"(cost is {tuple(cost.shape)})")
    if cost.device.type == "cpu" and not torch.compiler.is_compiling() and torch.isnan(cost).any():
        raise ValueError("cost holds NaN (use +inf for a pair that must not be matched)")
    check_finite((("cost", cost),), allow_posinf=("cost",))
    out = LINEAR_SUM_ASSIGNMENT(cost.detach(), num_targets, backend=backend)
    return out[0] if single else out

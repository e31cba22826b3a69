"""Batched linear sum assignment through the CUDA extension (``csrc/assignment``).

One kernel launch, one thread block per cost matrix, no host sync. The contract is the
reference's (``m2f_kernels.reference.assignment``): cost [B, Q, T] fp32/fp64/fp16/bf16,
num_targets [B] integer on cost's device -> [B, T] int64, the query matched to each target,
-1 on padding and unmatched targets; ±inf and NaN as the reference treats them. This
module hands the op a contiguous cost (a copy only when it is not) and int64 counts.
"""
from __future__ import annotations

import torch


def linear_sum_assignment(cost: torch.Tensor, num_targets: torch.Tensor) -> torch.Tensor:
    """cost [B, Q, T], num_targets [B] -> [B, T] int64 on cost's device."""
    if cost.device.type != "cuda":
        raise RuntimeError(f"linear_sum_assignment: the cuda backend needs CUDA tensors, got {cost.device}")
    if num_targets.device != cost.device:
        raise RuntimeError(f"linear_sum_assignment: num_targets is on {num_targets.device}, expected {cost.device}")
    return torch.ops.m2f_kernels_C.linear_sum_assignment(cost.contiguous(), num_targets.to(torch.int64).contiguous())

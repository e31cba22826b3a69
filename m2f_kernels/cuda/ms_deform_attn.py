"""MSDeformAttn through the CUDA extension (``csrc/ms_deform_attn``).

Shapes (docs/ops.md): value [B, S, H, D]; spatial_shapes [L, 2] int64 (H_l, W_l);
level_start_index [L] int64; sampling_locations [B, Lq, H, L, P, 2] as (x, y) in
[0, 1]; attention_weights [B, Lq, H, L, P] (logits over the L*P entries when
``softmax``); out [B, Lq, H*D].

The kernels take contiguous tensors on one device, with locations and weights in
float32 or value's dtype; this module arranges that.
"""
from __future__ import annotations

import torch


def _aux(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Locations / weights as the kernels read them: float32 or value's dtype, contiguous."""
    if t.dtype not in (torch.float32, value.dtype):
        t = t.float()
    return t.contiguous()


def _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    dev = value.device
    return (
        value.contiguous(),
        spatial_shapes.to(device=dev, dtype=torch.int64).contiguous(),
        level_start_index.to(device=dev, dtype=torch.int64).contiguous(),
        _aux(sampling_locations, value),
        _aux(attention_weights, value),
    )


def ms_deform_attn_fwd(value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights, softmax: bool = False):
    """out [B, Lq, H*D] in value.dtype (fp32 accumulation)."""
    args = _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return torch.ops.m2f_kernels_C.ms_deform_attn_fwd(*args, bool(softmax))


def ms_deform_attn_bwd(grad_out, value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights, softmax: bool = False, deterministic: bool = False):
    """(grad_value, grad_sampling_locations, grad_attention_weights), contiguous, in the inputs' dtypes.

    With ``softmax`` the weight gradient is with respect to the logits; ``deterministic``
    accumulates grad_value in int64 fixed point, so it is bitwise repeatable.
    """
    args = _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    grad_out = grad_out.to(value.dtype).contiguous()
    grad_value, grad_loc, grad_w = torch.ops.m2f_kernels_C.ms_deform_attn_bwd(
        grad_out, *args, bool(softmax), bool(deterministic))
    # the kernels answer in the dtypes they read; the contract is the caller's dtypes
    return grad_value, grad_loc.to(sampling_locations.dtype), grad_w.to(attention_weights.dtype)

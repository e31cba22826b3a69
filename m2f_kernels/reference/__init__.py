"""The ``reference`` backend: plain PyTorch, any device, every dtype. It is the spec."""
from .masked_attention import masked_attention_bwd, masked_attention_fwd
from .ms_deform_attn import ms_deform_attn_bwd, ms_deform_attn_fwd
from .point_loss import (
    pairwise_mask_cost,
    point_mask_loss_bwd,
    point_mask_loss_fwd,
    point_sample_bwd,
    point_sample_fwd,
    uncertain_point_coords,
)

__all__ = [
    "masked_attention_fwd", "masked_attention_bwd",
    "ms_deform_attn_fwd", "ms_deform_attn_bwd",
    "point_sample_fwd", "point_sample_bwd", "uncertain_point_coords",
    "point_mask_loss_fwd", "point_mask_loss_bwd", "pairwise_mask_cost",
]


def device_unavailable_reason(device):
    return None

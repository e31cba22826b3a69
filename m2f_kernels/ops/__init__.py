"""Public ops: torch.library custom ops (namespace ``m2f_kernels``) with autograd and dispatch."""
from .masked_attention import masked_attention
from .ms_deform_attn import ms_deform_attn
from .point_loss import pairwise_mask_cost, point_mask_loss, point_sample, uncertain_point_coords
from . import _autocast  # noqa: F401,E402  (registers the ops' autocast rules)

__all__ = [
    "masked_attention", "ms_deform_attn", "point_sample", "uncertain_point_coords",
    "point_mask_loss", "pairwise_mask_cost",
]

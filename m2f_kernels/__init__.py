"""m2f_kernels: fused GPU kernels for Mask2Former's three hotspots, as autograd ops.

    import m2f_kernels
    out = m2f_kernels.masked_attention(q, k, v, mask)            # decoder cross-attention
    out = m2f_kernels.ms_deform_attn(value, shapes, starts, loc, w)  # pixel decoder
    bce, dice = m2f_kernels.point_mask_loss(pred, target, coords, num_masks)
    matched = m2f_kernels.linear_sum_assignment(cost, num_targets)  # the matcher's solver

Every op takes ``backend=`` ('auto', 'reference', 'triton', 'cuda'); see
:func:`set_backend`, :func:`use_backend` and the ``M2F_KERNELS_BACKEND`` variable.
"""
from ._dispatch import BACKENDS, BackendUnavailableError, get_backend, set_backend, use_backend
from .ops.assignment import linear_sum_assignment
from .ops.masked_attention import masked_attention
from .ops.ms_deform_attn import ms_deform_attn
from .ops.point_loss import pairwise_mask_cost, point_mask_loss, point_sample, uncertain_point_coords
from .ops.point_mask_logits import point_mask_logits

__version__ = "0.1.0"

__all__ = [
    "masked_attention", "ms_deform_attn", "point_sample", "uncertain_point_coords",
    "point_mask_loss", "pairwise_mask_cost", "linear_sum_assignment", "point_mask_logits",
    "set_backend", "get_backend", "use_backend", "BackendUnavailableError", "BACKENDS",
]

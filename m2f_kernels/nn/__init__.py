"""Drop-in modules with the official Mask2Former / Deformable DETR signatures and state_dict keys."""
from .ms_deform_attn import MSDeformAttn, MSDeformAttnFunction

__all__ = ["MSDeformAttn", "MSDeformAttnFunction"]

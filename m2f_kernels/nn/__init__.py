"""Drop-in modules with the official Mask2Former / Deformable DETR signatures and state_dict keys."""
from .masked_attention import MaskedCrossAttention, MaskedMultiheadAttention
from .ms_deform_attn import MSDeformAttn, MSDeformAttnFunction

__all__ = ["MaskedCrossAttention", "MaskedMultiheadAttention", "MSDeformAttn", "MSDeformAttnFunction"]

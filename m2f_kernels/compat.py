"""The official Deformable DETR / Mask2Former deformable-attention API, on m2f_kernels.

The official repositories build a CUDA extension, ``MultiScaleDeformableAttention``,
behind ``ops/functions`` (``MSDeformAttnFunction``, ``ms_deform_attn_core_pytorch``) and
``ops/modules`` (``MSDeformAttn``). This module offers the same three names with the same
signatures and state_dict keys, so the official code runs without building anything::

    # mask2former/modeling/pixel_decoder/msdeformattn.py
    from m2f_kernels.compat import MSDeformAttn      # was: from .ops.modules import MSDeformAttn

- :class:`MSDeformAttn`: the module (constructor, parameters, init and forward of the
  official one; official checkpoints load unchanged).
- :class:`MSDeformAttnFunction`: ``apply(value, spatial_shapes, level_start_index,
  sampling_locations, attention_weights, im2col_step)``.
- :func:`ms_deform_attn_core_pytorch`: the official CPU-path signature (no
  level_start_index; shapes as a tensor or a list of (H, W)).
All three run through :func:`m2f_kernels.ms_deform_attn` (any backend, with autograd).
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch import Tensor

from .nn.ms_deform_attn import MSDeformAttn, MSDeformAttnFunction

__all__ = ["MSDeformAttn", "MSDeformAttnFunction", "ms_deform_attn_core_pytorch"]


def ms_deform_attn_core_pytorch(value: Tensor, value_spatial_shapes: Union[Tensor, Sequence[Tuple[int, int]]],
                                sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """The official ``ms_deform_attn_core_pytorch`` signature (also Hugging Face's
    ``multi_scale_deformable_attention``), computed by :func:`m2f_kernels.ms_deform_attn`.

    Args:
        value: [B, S, H, D].
        value_spatial_shapes: [L, 2] integer tensor or a list of L (H_l, W_l) pairs.
        sampling_locations: [B, Lq, H, L, P, 2], (x, y) in [0, 1].
        attention_weights: [B, Lq, H, L, P], already normalised.
    Returns:
        [B, Lq, H*D] in value's dtype; under autocast value runs in its own dtype, as
        :class:`MSDeformAttnFunction` (the official core's grid_sample casts nothing to the
        autocast dtype).
    """
    shapes = torch.as_tensor(value_spatial_shapes, dtype=torch.int64, device=value.device)
    level_start_index = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    return MSDeformAttnFunction.apply(value, shapes, level_start_index, sampling_locations, attention_weights, 64)

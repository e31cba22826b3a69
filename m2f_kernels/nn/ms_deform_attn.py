"""Drop-in replacements for Deformable DETR's ``MSDeformAttn`` module and ``MSDeformAttnFunction``.

Same constructor, parameter names, initialisation and forward as the module that
Mask2Former vendors (``modeling/pixel_decoder/ops/modules/ms_deform_attn.py``), so
official checkpoints load unchanged. The core runs through
:func:`m2f_kernels.ms_deform_attn` (any backend) with the attention softmax fused
into the op, so the normalised weights are never materialised.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn.init import constant_, xavier_uniform_

from .._validation import remember_level_shapes
from ..ops.ms_deform_attn import ms_deform_attn
from .shape_cache import cached


def _is_power_of_2(n: int) -> bool:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"invalid input for _is_power_of_2: {n} (type: {type(n)})")
    return (n & (n - 1) == 0) and n != 0


class MSDeformAttnFunction:
    """The official autograd function's interface on top of :func:`m2f_kernels.ms_deform_attn`.

    ``apply(value [B, S, H, D], spatial_shapes [L, 2], level_start_index [L],
    sampling_locations [B, Lq, H, L, P, 2], attention_weights [B, Lq, H, L, P],
    im2col_step) -> [B, Lq, H*D]``; attention_weights are already normalised (no
    softmax). ``im2col_step`` is accepted and ignored: the kernels need no batch chunking.

    Under autocast every tensor runs in its own dtype (output in value's), as in the official
    ``autograd.Function``, which has no autocast rule: an fp32 call inside an autocast region
    stays fp32 (:func:`m2f_kernels.ms_deform_attn` itself casts value to the autocast dtype).
    """

    @staticmethod
    def apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
        device_type = value.device.type
        if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                      attention_weights)
        return ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al., Deformable DETR), official interface.

    Args:
        d_model: hidden dimension.
        n_levels: number of feature levels.
        n_heads: number of attention heads (d_model must be divisible by it).
        n_points: sampling points per attention head per feature level.

    Deliberate differences from the official module: the softmax of the attention weights
    runs inside the op (in float32, whatever the logits' dtype); a layout that does not add
    up (sum of H_l*W_l != Len_in, a wrong level_start_index) raises ``ValueError`` from the
    op where the official ``assert`` raises ``AssertionError``; spatial_shapes may stay on
    the CPU; fp16 / bf16 run (the official CUDA op takes float32 and float64 only).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, but got {d_model} and {n_heads}")
        _d_per_head = d_model // n_heads
        if not _is_power_of_2(_d_per_head):
            warnings.warn(
                "You'd better set d_model in MSDeformAttn to make the dimension of each attention head "
                "a power of 2 which is more efficient in our kernels."
            )
        self.im2col_step = 64  # the official module's value, kept for parity; unused
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        constant_(self.sampling_offsets.weight.data, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (
            (grid_init / grid_init.abs().max(-1, keepdim=True)[0])
            .view(self.n_heads, 1, 1, 2)
            .repeat(1, self.n_levels, self.n_points, 1)
        )
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias = nn.Parameter(grid_init.view(-1))
        constant_(self.attention_weights.weight.data, 0.0)
        constant_(self.attention_weights.bias.data, 0.0)
        xavier_uniform_(self.value_proj.weight.data)
        constant_(self.value_proj.bias.data, 0.0)
        xavier_uniform_(self.output_proj.weight.data)
        constant_(self.output_proj.bias.data, 0.0)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):
        """
        Args:
            query: [N, Len_q, C].
            reference_points: [N, Len_q, n_levels, 2] in [0, 1] (top-left (0, 0),
                bottom-right (1, 1), padded area included), or [N, Len_q, n_levels, 4]
                adding (w, h) for reference boxes.
            input_flatten: [N, sum_l H_l*W_l, C].
            input_spatial_shapes: [n_levels, 2] (H_l, W_l).
            input_level_start_index: [n_levels], the running sum of H_l*W_l.
            input_padding_mask: [N, sum_l H_l*W_l], True for padding elements.

        Returns:
            [N, Len_q, C].
        """
        n, len_q, _ = query.shape
        n, len_in, _ = input_flatten.shape

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], float(0))
        value = value.view(n, len_in, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(
            n, len_q, self.n_heads, self.n_levels, self.n_points, 2
        )
        # Logits; the op applies the softmax over the n_levels * n_points entries.
        attention_logits = self.attention_weights(query).view(n, len_q, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            offset_normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            # spatial shapes may stay on the CPU (the op reads them there without a sync)
            offset_normalizer = offset_normalizer.to(sampling_offsets.device, non_blocking=True)
            sampling_locations = (
                reference_points[:, :, None, :, None, :]
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"Last dim of reference_points must be 2 or 4, but get {reference_points.shape[-1]} instead."
            )
        output = self._attend(value, input_spatial_shapes, input_level_start_index, sampling_locations,
                              attention_logits)
        return self.output_proj(output)

    def _attend(self, value, spatial_shapes, level_start_index, sampling_locations, attention_logits):
        """The core: [B, Lq, H*D] from value [B, S, H, D] and the logits [B, Lq, H, L, P]
        (softmax fused into the op). Subclasses may swap the implementation here."""
        return ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_logits,
                              softmax=True)


def level_index(shapes, device, cache: dict) -> tuple:
    """(spatial_shapes [L, 2], level_start_index [L]) int64 on ``device`` for the level sizes
    ``shapes`` [(H_l, W_l)], built once per layout into ``cache`` (:func:`.shape_cache.cached`) and reused: the op checks a
    pair it has seen without reading it again (a host sync on the GPU), and a CUDA graph
    replays with the same tensors. Under torch.compile they are traced into the graph."""
    shapes = tuple((int(h), int(w)) for h, w in shapes)
    sizes = [h * w for h, w in shapes]

    def build():
        spatial_shapes = torch.tensor(shapes, dtype=torch.int64).to(device)
        if not torch.compiler.is_dynamo_compiling():  # torch.compile keeps the ops, which read no ints
            remember_level_shapes(spatial_shapes, shapes)
        return spatial_shapes, torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], dtype=torch.int64).to(device)

    return cached(cache, (shapes, str(device)), build)

"""Triton point-sampled mask loss ops: point_sample, importance sampling, mask loss, matcher cost.

The backend module of these ops (``m2f_kernels.triton.point_loss``); each op's kernels,
launch config and launch live in their own file:

- ``_point_sample``: ``point_sample_fwd(input [N, C, H, W], coords [N, P, 2]) -> [N, C, P]``,
  ``point_sample_bwd``, and ``uncertain_point_coords(logits [N, H, W], candidates [N, S, 2],
  random [N, R, 2], k)`` (logits may be [B, Q, H, W] + (batch, query) index [N]); also the
  sampling helpers the other kernels share;
- ``_point_mask_loss``: ``point_mask_loss_fwd/bwd``: pred [N, Hp, Wp], or [B, Q, Hp, Wp] +
  (batch, query) index [N]; target [N, Ht, Wt] bool/uint8/float; coords [N, P, 2];
- ``_pairwise_mask_cost``: ``pairwise_mask_cost(pred [Q, Hp, Wp], target [T, Ht, Wt], coords [P, 2])``.

Every op samples maps bilinearly with zero padding in the ``grid_sample(align_corners=False)``
convention (pixel = coord * size - 0.5), computes in fp32 and returns contiguous tensors
(contract: ``m2f_kernels.reference.point_loss``). Bool targets are read as bytes; no
full-resolution map is ever converted or gathered.

Launch configs follow ``_launch``: ``PointConfig`` (point_sample, the uncertainty, the
loss) and ``PairwiseConfig`` (the matcher), picked by ``point_sample_config``,
``point_mask_loss_config`` and ``pairwise_mask_cost_config`` from the defaults
``POINT_CONFIG``, ``LOSS_CONFIG`` and ``PAIRWISE_CONFIGS``; every entry point takes
``config=`` to override them (bench/sweep_point_loss.py).
"""
from __future__ import annotations

from ._pairwise_mask_cost import (  # noqa: F401
    PAIRWISE_CONFIGS, PairwiseConfig, pairwise_mask_cost, pairwise_mask_cost_config, pairwise_smem_bytes,
    pairwise_split,
)
from ._point_mask_loss import (  # noqa: F401
    LOSS_CONFIG, point_mask_loss_bwd, point_mask_loss_config, point_mask_loss_fwd,
)
from ._point_sample import (  # noqa: F401
    POINT_CONFIG, PointConfig, point_sample_bwd, point_sample_config, point_sample_fwd, uncertain_point_coords,
)

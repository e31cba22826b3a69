"""The official point-sampling helpers (detectron2 PointRend), used by the reference path, and
``sample_masks``, the fused criterion's sampling of the target masks.

A ``generator`` argument is added to the random draws so the fused path (which draws in
the same order through m2f_kernels.uncertain_point_coords) can see identical points.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

import m2f_kernels
from m2f_kernels.ops.point_loss import _rand


def uniform(*shape: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``torch.rand(*shape)`` from ``generator`` (None: the device's default generator).

    torch.compile cannot trace a generator argument: a compiled step with a generator draws
    outside the graph (a graph break, the same numbers as eager); without one the draw is
    traced, so a whole step compiles with ``fullgraph=True``."""
    return _rand(shape, device, None, generator)


def point_sample(input: torch.Tensor, point_coords: torch.Tensor, **kwargs) -> torch.Tensor:
    """grid_sample at (x, y) in [0, 1]: input [N, C, H, W], point_coords [N, P, 2] -> [N, C, P]."""
    add_dim = point_coords.dim() == 3
    if add_dim:
        point_coords = point_coords.unsqueeze(2)
    output = F.grid_sample(input, 2.0 * point_coords - 1.0, **kwargs)
    return output.squeeze(3) if add_dim else output


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """-|logit|: the most uncertain locations score highest."""
    return -torch.abs(logits)


def get_uncertain_point_coords_with_randomness(
    coarse_logits: torch.Tensor,
    uncertainty_func: Callable[[torch.Tensor], torch.Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """coarse_logits [N, 1, H, W] -> [N, num_points, 2]: the most uncertain of
    ``num_points * oversample_ratio`` uniform candidates, then uniform random points."""
    assert oversample_ratio >= 1
    assert 0 <= importance_sample_ratio <= 1
    num_boxes = coarse_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    device = coarse_logits.device
    point_coords = torch.rand(num_boxes, num_sampled, 2, device=device, generator=generator)
    point_logits = point_sample(coarse_logits, point_coords, align_corners=False)
    point_uncertainties = uncertainty_func(point_logits)
    num_uncertain_points = int(importance_sample_ratio * num_points)
    num_random_points = num_points - num_uncertain_points
    idx = torch.topk(point_uncertainties[:, 0, :], k=num_uncertain_points, dim=1)[1]
    shift = num_sampled * torch.arange(num_boxes, dtype=torch.long, device=device)
    idx = idx + shift[:, None]
    point_coords = point_coords.view(-1, 2)[idx.view(-1), :].view(num_boxes, num_uncertain_points, 2)
    if num_random_points > 0:
        point_coords = torch.cat(
            [point_coords, torch.rand(num_boxes, num_random_points, 2, device=device, generator=generator)], dim=1
        )
    return point_coords


def sample_masks(masks: torch.Tensor, point_coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of masks (bool or floating) [B, T, H, W] at (x, y) in [0, 1]:
    point_coords [B, P, 2] (shared by an image's masks) or [B, T, P, 2] -> [B, T, P] float32.

    ``m2f_kernels.point_sample`` (the ``point_sample`` convention); a bool mask is read as
    bytes, never copied to float at full resolution.
    """
    b, t, h, w = masks.shape
    if point_coords.dim() == 3:
        return m2f_kernels.point_sample(masks, point_coords).float()
    p = point_coords.shape[2]
    samples = m2f_kernels.point_sample(masks.reshape(b * t, 1, h, w), point_coords.reshape(b * t, p, 2))
    return samples.view(b, t, p).float()

"""Helpers shared by the reference implementations."""
from __future__ import annotations

import torch

# grid_sample's integer codes (aten.grid_sampler_2d): bilinear, zeros, align_corners=False.
BILINEAR, ZEROS = 0, 0


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else computes in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def grid_from_coords(coords: torch.Tensor) -> torch.Tensor:
    """(x, y) in [0, 1] -> grid_sample's [-1, 1] grid (align_corners=False convention)."""
    return 2.0 * coords - 1.0


def grid_sample(input: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear, zero padding, align_corners=False: the sampling of every op here.

    A NaN / ±inf coordinate samples NaN (docs/ops.md, "Non-finite values"): torch's CPU
    grid_sample does so; its CUDA one treats the point as outside (0), so there the NaN is
    put back."""
    out = torch.nn.functional.grid_sample(
        input, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    if input.device.type == "cpu":
        return out
    finite = torch.isfinite(grid).all(-1)  # [N, Hg, Wg]
    return torch.where(finite[:, None], out, float("nan"))


def grid_sample_backward(grad_out, input, grid, need_input: bool, need_grid: bool):
    """(grad_input or None, grad_grid or None) of :func:`grid_sample`."""
    gi, gg = torch.ops.aten.grid_sampler_2d_backward(
        grad_out, input, grid, BILINEAR, ZEROS, False, [need_input, need_grid]
    )
    return (gi if need_input else None), (gg if need_grid else None)

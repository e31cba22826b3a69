"""Synthetic inputs with the structure of real Mask2Former tensors.

Uniform noise would flatter or punish kernels unrealistically (no spatial coherence in
masks, random gathers in deformable attention), so masks are blobs and sampling
locations sit near their query's pixel, as in a trained model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def grid_hw(n: int) -> tuple:
    """(H, W) of a pixel grid with n pixels: square when n is a square, else one row."""
    side = math.isqrt(n)
    return (side, side) if side * side == n else (1, n)


def blob_masks(rows: int, n: int, visible: float, empty: float, device) -> torch.Tensor:
    """Bool [rows, n], True = blocked: spatially coherent visible blobs on the grid_hw(n) grid.

    Each row leaves round(visible * n) keys visible (smooth noise thresholded at its own
    quantile), and round(empty * rows) rows block every key (the empty-row case).
    """
    h, w = grid_hw(n)
    noise = torch.rand(rows, 1, 6, 6, device=device)
    noise = F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False).reshape(rows, n)
    noise = noise + 1e-4 * torch.rand_like(noise)  # break ties so the quantile is exact
    num_blocked = min(n, max(0, round((1.0 - visible) * n)))
    if num_blocked == 0:
        blocked = torch.zeros(rows, n, dtype=torch.bool, device=device)
    else:
        threshold = noise.kthvalue(num_blocked, dim=1, keepdim=True).values
        blocked = noise <= threshold
    num_empty = round(empty * rows)
    if num_empty:
        blocked[torch.randperm(rows, device=device)[:num_empty]] = True
    return blocked


def box_masks(count: int, height: int, width: int, device, min_area: float = 0.005,
              max_area: float = 0.3) -> torch.Tensor:
    """Bool [count, height, width]: one random axis-aligned box per mask (instance-like targets)."""
    area = torch.empty(count, device=device).uniform_(min_area, max_area)
    aspect = torch.empty(count, device=device).uniform_(-1.0, 1.0).exp()
    bh = (area / aspect).sqrt().clamp(max=1.0)
    bw = (area * aspect).sqrt().clamp(max=1.0)
    y0 = torch.rand(count, device=device) * (1 - bh)
    x0 = torch.rand(count, device=device) * (1 - bw)
    ys = (torch.arange(height, device=device) + 0.5) / height
    xs = (torch.arange(width, device=device) + 0.5) / width
    in_y = (ys[None, :] >= y0[:, None]) & (ys[None, :] < (y0 + bh)[:, None])
    in_x = (xs[None, :] >= x0[:, None]) & (xs[None, :] < (x0 + bw)[:, None])
    return in_y[:, :, None] & in_x[:, None, :]


def pixel_centres(levels, device) -> torch.Tensor:
    """[S, 2] normalised (x, y) centres of every pixel of every level, level after level."""
    points = []
    for h, w in levels:
        ys, xs = torch.meshgrid(
            (torch.arange(h, device=device) + 0.5) / h, (torch.arange(w, device=device) + 0.5) / w,
            indexing="ij",
        )
        points.append(torch.stack([xs, ys], dim=-1).reshape(-1, 2))
    return torch.cat(points)


def deformable_locations(batch: int, levels, heads: int, points: int, device) -> torch.Tensor:
    """float32 [B, Lq, H, L, P, 2] sampling locations of the encoder's self-attention (Lq = S).

    Reference point = the query's pixel centre; offsets in pixels of each level with a
    spread growing with the point index (the official offset initialisation is a ring of
    radius p + 1 per head), so a few land outside [0, 1] near the borders.
    """
    ref = pixel_centres(levels, device)  # [Lq, 2]
    num_levels = len(levels)
    size = torch.tensor([[w, h] for h, w in levels], dtype=torch.float32, device=device)  # [L, 2] (x, y)
    spread = torch.arange(1, points + 1, dtype=torch.float32, device=device).view(points, 1)
    offsets = torch.randn(batch, ref.shape[0], heads, num_levels, points, 2, device=device) * spread
    return ref[None, :, None, None, None, :] + offsets / size[:, None, :]

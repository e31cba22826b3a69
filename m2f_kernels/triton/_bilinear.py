"""Bilinear-sampling setup shared by the Triton kernels (point_loss, ms_deform_attn).

Both sample in the ``grid_sample(align_corners=False)`` convention with zero padding:
pixel = coord * size - 0.5. What they do with the taps differs (point_loss: int64
indices clamped into the map, validity folded into the weights; ms_deform_attn: int32
corners, validity as load masks), so only the shared first step lives here.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bilinear_cell(cx, cy, H, W):
    """(px, py, x0, y0): pixel coordinates of points (cx, cy) on an H x W map and their
    floors, all fp32; the bilinear weights of the taps x0 + 1, y0 + 1 are px - x0, py - y0.

    H and W are ints of any width. The pixel coordinates are clamped to [-2, size + 1]
    first, so a far-away point cannot overflow the caller's int conversion of (x0, y0);
    both of its taps along that axis stay outside the map.
    """
    wf = tl.cast(W, tl.float32)
    hf = tl.cast(H, tl.float32)
    px = cx * wf - 0.5
    py = cy * hf - 0.5
    px = tl.minimum(tl.maximum(px, -2.0), wf + 1.0)
    py = tl.minimum(tl.maximum(py, -2.0), hf + 1.0)
    return px, py, tl.floor(px), tl.floor(py)

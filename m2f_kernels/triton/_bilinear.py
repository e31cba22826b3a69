"""Bilinear-sampling setup shared by the Triton kernels (point_loss, ms_deform_attn).

Both sample in the ``grid_sample(align_corners=False)`` convention with zero padding:
pixel = coord * size - 0.5, with grid_sample's arithmetic for non-finite coordinates
(docs/ops.md, "Non-finite values"): the bilinear weights come from x - floor(x), NaN for a
NaN or infinite x, and a tap outside the map reads 0 (a masked load, never a clamped
index), so such a point samples NaN and scatters nothing. What the kernels do with the
taps differs (point_loss: int64 offsets; ms_deform_attn: pixel indices along S), so only
the shared first step lives here.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bilinear_cell(cx, cy, H, W):
    """(fx, fy, x0, y0, vx0, vx1, vy0, vy1) of points (cx, cy) on an H x W map.

    fx, fy: fp32 offsets of the pixel coordinates from their floors, in [0, 1), NaN when the
    coordinate is NaN or infinite; the bilinear weights of columns x0, x0 + 1 are 1 - fx,
    fx, of rows y0, y0 + 1 are 1 - fy, fy. x0, y0: the floors as fp32, clamped to
    [-2, size + 1], so a far-away point cannot overflow the caller's int conversion (both of
    its taps along that axis stay outside the map). vx0, vx1, vy0, vy1: whether column x0,
    x0 + 1 / row y0, y0 + 1 lies inside the map; float compares, so False for a NaN floor
    (under TRITON_INTERPRET the clamp keeps NaN; on a GPU it maps NaN to -2).
    H and W are ints of any width.
    """
    wf = tl.cast(W, tl.float32)
    hf = tl.cast(H, tl.float32)
    px = cx * wf - 0.5
    py = cy * hf - 0.5
    x0 = tl.floor(px)
    y0 = tl.floor(py)
    fx = px - x0
    fy = py - y0
    x0 = tl.minimum(tl.maximum(x0, -2.0), wf + 1.0)
    y0 = tl.minimum(tl.maximum(y0, -2.0), hf + 1.0)
    vx0 = (x0 >= 0.0) & (x0 < wf)
    vx1 = (x0 >= -1.0) & (x0 < wf - 1.0)
    vy0 = (y0 >= 0.0) & (y0 < hf)
    vy1 = (y0 >= -1.0) & (y0 < hf - 1.0)
    return fx, fy, x0, y0, vx0, vx1, vy0, vy1

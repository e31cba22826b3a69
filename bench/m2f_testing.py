"""Helpers for the m2f model's tests and benchmarks: tiny configurations, random images and
targets, a relative error, generic deformable sampling points. Not installed (the repo's
``bench`` package); import it from the repo root as ``bench.m2f_testing``."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

# A Mask2Former small enough to train a step on one CPU core in well under a second;
# conv_dim 64 so every GroupNorm group holds 2 channels (with 1, biases before it get no gradient).
TINY = dict(
    num_classes=5, num_queries=8, hidden_dim=64, nheads=4, dim_feedforward=64, dec_layers=3,
    enc_layers=2, enc_dim_feedforward=64, num_points=64, backbone_width=16,
)


def random_images(batch: int, height: int, width: int, *, device=None,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[B, 3, H, W] float in 0..255 (what the model's pixel normalisation expects)."""
    return torch.rand(batch, 3, height, width, device=device, generator=generator) * 255


def random_targets(batch: int, num_classes: int, height: int, width: int, *, min_targets: int = 1,
                   max_targets: int = 4, device=None, generator: Optional[torch.Generator] = None) -> List[Dict]:
    """Per image dict(labels int64 [T], masks bool [T, H, W]) of random ellipses, T in [min, max]."""
    targets = []
    ys = torch.arange(height, device=device, dtype=torch.float32).view(1, -1, 1) + 0.5
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, -1) + 0.5
    for _ in range(batch):
        t = int(torch.randint(min_targets, max_targets + 1, (1,), generator=generator))
        params = torch.rand(t, 4, generator=generator).to(device)
        cy, cx = params[:, 0:1, None] * height, params[:, 1:2, None] * width
        ry = (0.1 + 0.4 * params[:, 2:3, None]) * height
        rx = (0.1 + 0.4 * params[:, 3:4, None]) * width
        masks = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1
        labels = torch.randint(0, num_classes, (t,), generator=generator).to(device)
        targets.append({"labels": labels, "masks": masks})
    return targets


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf if either holds a NaN/inf."""
    out, ref = out.detach().double(), ref.detach().double()
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


@torch.no_grad()
def jitter_deformable_init(model: torch.nn.Module, std: float = 0.02) -> None:
    """Add N(0, std) noise to every MSDeformAttn's ``sampling_offsets`` and
    ``attention_weights`` weights.

    At the official init both weights are zero, so every sampling point sits exactly on a
    pixel centre, where bilinear sampling has no derivative with respect to the location
    (left and right derivatives differ) and two correct kernels can return different
    one-sided gradients. A trained model's points are generic; this makes a random model's
    points generic too.
    """
    from m2f.ms_deform_attn import MSDeformAttn

    for m in model.modules():
        if isinstance(m, MSDeformAttn):
            m.sampling_offsets.weight.add_(torch.randn_like(m.sampling_offsets.weight) * std)
            m.attention_weights.weight.add_(torch.randn_like(m.attention_weights.weight) * std)

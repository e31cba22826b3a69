"""Make the official and the static (fused) criterion sample the same points.

The two paths draw their random points in different orders (the static one draws every
matcher point first), so a seeded run gives different points. To compare their losses and
gradients for the same points and assignment, the ``same_points`` fixture replaces

- the matcher's draws by one fixed set of points (every image, every prediction);
- the loss's importance sampling (``SetCriterion.sample_points``, both paths) by points that
  are a fixed function of the matched (image, query) pair, whichever order it comes in
  (the same for every prediction).
"""
from __future__ import annotations

import pytest
import torch

from m2f.criterion import SetCriterion
from m2f.matcher import HungarianMatcher


def _points_of(batch_index: torch.Tensor, query_index: torch.Tensor, num_points: int) -> torch.Tensor:
    """[N, num_points, 2] in [0, 1), a fixed function of each (image, query) pair."""
    seed = (batch_index.double() * 1000.0 + query_index.double() + 1.0)[:, None]
    k = torch.arange(num_points, dtype=torch.float64, device=batch_index.device)[None, :]
    x = torch.frac(torch.sin(seed * 12.9898 + k * 78.233).abs() * 43758.5453)
    y = torch.frac(torch.sin(seed * 39.3467 + k * 11.135).abs() * 24634.6345)
    return torch.stack((x, y), -1).float()


@pytest.fixture
def same_points(monkeypatch):
    def draw_points(self, images, device, generator=None):
        fixed = torch.rand(self.num_points, 2, generator=torch.Generator().manual_seed(1234)).to(device)
        return fixed.expand(images, -1, -1)

    def sample_points(self, outputs, index, generator=None):
        # the mask-free criterion numbers queries across predictions (l * Q + q)
        return _points_of(index[0], index[1] % outputs.get("queries_per_prediction", 2**62), self.num_points)

    monkeypatch.setattr(HungarianMatcher, "draw_points", draw_points)
    monkeypatch.setattr(SetCriterion, "sample_points", sample_points)

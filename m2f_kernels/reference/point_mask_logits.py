"""Reference ``point_mask_logits``: mask logits at points without building the masks. It is the spec.

Mask2Former's mask logits are ``einsum('bqc,bchw->bqhw', mask_embed, mask_features)``;
bilinear sampling is linear, so the logit of matched mask n = (b, q) at point p is

    logits[n, p] = sum_c mask_embed[b, q, c] * bilinear(mask_features[b, c], coords[n, p])

(``grid_sample(align_corners=False)`` convention, zero padding), computed here without the
[B, Q, H, W] logits and without keeping the [N, C, P] sampled features: the masks are
processed in chunks, and the backward recomputes each chunk's samples.
"""
from __future__ import annotations

import torch

from ._common import compute_dtype, grid_from_coords, grid_sample, grid_sample_backward

_CHUNK_ELEMENTS = 1 << 24  # sampled values (masks x channels x points) held at once


def _chunks(n: int, c: int, p: int):
    size = max(1, _CHUNK_ELEMENTS // max(1, c * p))
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def _sampled(features, coords, ct):
    """features [n, C, H, W], coords [n, P, 2] -> ([n, C, P] samples, the grid) in ``ct``."""
    grid = grid_from_coords(coords.to(ct)).unsqueeze(2)
    return grid_sample(features.to(ct), grid).squeeze(3), grid


def _logits(embed, features, coords, ct):
    """embed [n, C], features [n, C, H, W], coords [n, P, 2] -> [n, P] in ``ct``."""
    return torch.einsum("nc,ncp->np", embed.to(ct), _sampled(features, coords, ct)[0])


def point_mask_logits_fwd(mask_embed, mask_features, coords, batch_index, query_index):
    """[N, P] in mask_embed.dtype."""
    ct = compute_dtype(mask_embed)
    n, p = coords.shape[:2]
    out = torch.empty((n, p), dtype=ct, device=mask_embed.device)
    for i, j in _chunks(n, mask_features.shape[1], p):
        b = batch_index[i:j]
        out[i:j] = _logits(mask_embed[b, query_index[i:j]], mask_features[b], coords[i:j], ct)
    return out.to(mask_embed.dtype)


def point_mask_logits_bwd(grad_out, mask_embed, mask_features, coords, batch_index, query_index):
    """(grad_mask_embed [B, Q, C], grad_mask_features [B, C, H, W]) in the inputs' dtypes."""
    ct = compute_dtype(mask_embed)
    grad_embed = torch.zeros(mask_embed.shape, dtype=ct, device=mask_embed.device)
    grad_features = torch.zeros(mask_features.shape, dtype=ct, device=mask_features.device)
    n, p = coords.shape[:2]
    for i, j in _chunks(n, mask_features.shape[1], p):
        b, q = batch_index[i:j], query_index[i:j]
        features = mask_features[b].to(ct)
        sampled, grid = _sampled(features, coords[i:j], ct)  # recomputed: [n, C, P]
        g = grad_out[i:j].to(ct)
        grad_embed.index_put_((b, q), torch.einsum("np,ncp->nc", g, sampled), accumulate=True)
        g_sampled = torch.einsum("np,nc->ncp", g, mask_embed[b, q].to(ct)).unsqueeze(3)
        g_features, _ = grid_sample_backward(g_sampled, features, grid, True, False)
        grad_features.index_add_(0, b, g_features)
    return grad_embed.to(mask_embed.dtype), grad_features.to(mask_features.dtype)

"""Reference ``point_mask_logits``: mask logits at points without the [B, Q, H, W] logits. It is the spec.

Mask2Former's mask logits are ``einsum('bqc,bchw->bqhw', mask_embed, mask_features)``;
bilinear sampling is linear, so the logit of matched mask n = (b, q) at point p is

    logits[n, p] = sum_c mask_embed[b, q, c] * bilinear(mask_features[b, c], coords[n, p])
                 = bilinear(sum_c mask_embed[b, q, c] * mask_features[b, c], coords[n, p])

(``grid_sample(align_corners=False)`` convention, zero padding). Here the second form: the
matched masks are processed in chunks, each chunk's logit maps [n, H, W] built and sampled
(one channel instead of C per point: on the CPU several times fewer operations than
sampling the features at the points, for any size up to 1024^2 images). Only matched masks
are built, never all Q, and the chunks bound the memory; the Triton kernel samples the
features and never builds a map.
"""
from __future__ import annotations

import torch

from ._common import compute_dtype, grid_from_coords, grid_sample, grid_sample_backward

_CHUNK_ELEMENTS = 1 << 24  # gathered feature values (masks x channels x pixels) held at once


def _chunks(n: int, c: int, hw: int):
    size = max(1, _CHUNK_ELEMENTS // max(1, c * hw))
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def _grid(coords, ct):
    """coords [n, P, 2] -> grid_sample's grid [n, P, 1, 2] in ``ct``."""
    return grid_from_coords(coords.to(ct)).unsqueeze(2)


def _maps(embed, features):
    """embed [n, C], features [n, C, H, W] -> the logit maps [n, 1, H, W]."""
    return torch.einsum("nc,nchw->nhw", embed, features).unsqueeze(1)


def point_mask_logits_fwd(mask_embed, mask_features, coords, batch_index, query_index):
    """[N, P] in mask_embed.dtype."""
    ct = compute_dtype(mask_embed)
    n, p = coords.shape[:2]
    c, h, w = mask_features.shape[1:]
    out = torch.empty((n, p), dtype=ct, device=mask_embed.device)
    for i, j in _chunks(n, c, h * w):
        b = batch_index[i:j]
        maps = _maps(mask_embed[b, query_index[i:j]].to(ct), mask_features[b].to(ct))
        out[i:j] = grid_sample(maps, _grid(coords[i:j], ct))[:, 0, :, 0]
    return out.to(mask_embed.dtype)


def point_mask_logits_bwd(grad_out, mask_embed, mask_features, coords, batch_index, query_index):
    """(grad_mask_embed [B, Q, C], grad_mask_features [B, C, H, W]) in the inputs' dtypes."""
    ct = compute_dtype(mask_embed)
    grad_embed = torch.zeros(mask_embed.shape, dtype=ct, device=mask_embed.device)
    grad_features = torch.zeros(mask_features.shape, dtype=ct, device=mask_features.device)
    n = coords.shape[0]
    c, h, w = mask_features.shape[1:]
    for i, j in _chunks(n, c, h * w):
        b, q = batch_index[i:j], query_index[i:j]
        features, embed = mask_features[b].to(ct), mask_embed[b, q].to(ct)
        g = grad_out[i:j].to(ct)[:, None, :, None]  # [n, 1, P, 1]
        # d(logits)/d(maps): the sampling's transpose, one channel (the maps' values are not read)
        g_maps, _ = grid_sample_backward(g, features.new_zeros(j - i, 1, h, w), _grid(coords[i:j], ct), True, False)
        g_maps = g_maps[:, 0]  # [n, H, W]
        grad_embed.index_put_((b, q), torch.einsum("nhw,nchw->nc", g_maps, features), accumulate=True)
        grad_features.index_add_(0, b, torch.einsum("nc,nhw->nchw", embed, g_maps))
    return grad_embed.to(mask_embed.dtype), grad_features.to(mask_features.dtype)

"""Reference masked cross-attention: the official Mask2Former semantics in plain PyTorch.

Materialises the [B, H, Q, N] scores; it is the spec, not the fast path.
"""
from __future__ import annotations

import torch

from ._common import compute_dtype


def blocked_keys(mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Bool [B, H or 1, Q, N]: True where a key is blocked after the empty-row rule.

    mask: [B, Q, N] or [B, H, Q, N]; bool (True = blocked) or float logits (blocked
    where logit < 0). A row whose keys are all blocked attends to all keys instead
    (the official decoder's ``attn_mask[where(all blocked)] = False``).
    """
    blocked = mask if mask.dtype == torch.bool else mask < 0
    if blocked.dim() == 3:
        blocked = blocked.unsqueeze(1)
    empty = blocked.all(dim=-1, keepdim=True)
    return blocked & ~empty


def _probabilities(q, k, mask, scale, lse=None):
    ct = compute_dtype(q)
    scores = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    scores = scores.masked_fill(blocked_keys(mask, q.shape[1]), float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.to(ct).unsqueeze(-1)), lse


def masked_attention_fwd(q, k, v, mask, scale: float):
    """out [B, H, Q, Dv] in q.dtype, lse [B, H, Q] float32 (log-sum-exp of scaled scores)."""
    ct = compute_dtype(q)
    probs, lse = _probabilities(q, k, mask, scale)
    out = torch.matmul(probs, v.to(ct))
    lse_dtype = torch.float64 if ct == torch.float64 else torch.float32
    return out.to(q.dtype).contiguous(), lse.to(lse_dtype).contiguous()


def masked_attention_bwd(grad_out, q, k, v, mask, out, lse, scale: float):
    """(dq, dk, dv), each shaped and typed like its input."""
    ct = compute_dtype(q)
    probs, _ = _probabilities(q, k, mask, scale, lse)
    g = grad_out.to(ct)
    dv = torch.matmul(probs.transpose(-1, -2), g)
    dp = torch.matmul(g, v.to(ct).transpose(-1, -2))
    delta = (g * out.to(ct)).sum(-1, keepdim=True)
    ds = probs * (dp - delta) * scale
    dq = torch.matmul(ds, k.to(ct))
    dk = torch.matmul(ds.transpose(-1, -2), q.to(ct))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

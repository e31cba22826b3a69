"""Drop-in masked cross-attention layer for the Mask2Former transformer decoder.

:class:`MaskedCrossAttention` has the official ``CrossAttentionLayer`` constructor, call
signature (sequence-first tensors) and parameter names (``multihead_attn.in_proj_weight``,
``multihead_attn.in_proj_bias``, ``multihead_attn.out_proj.*``, ``norm.*``), so official
state dicts load unchanged. The attention itself runs through
:func:`m2f_kernels.masked_attention` on strided views of the projections: no per-head
mask repeat, no [B*heads, Q, N] score tensor, and the official empty-row fix
(a query whose keys are all blocked attends to all keys) happens inside the op.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import m2f_kernels


def multihead_masked_attention(query: Tensor, key: Tensor, value: Tensor, in_proj_weight: Tensor,
                               in_proj_bias: Tensor, out_proj_weight: Tensor, out_proj_bias: Tensor,
                               num_heads: int, mask: Tensor, backend: Optional[str] = None) -> Tensor:
    """``nn.MultiheadAttention``'s projections (packed in_proj, sequence-first) around
    :func:`m2f_kernels.masked_attention`.

    query [Q, B, C], key/value [N, B, C]; mask [B, Q, N] or [B, heads, Q, N] as the op takes
    it. Returns [Q, B, C]. The heads are strided views of the projections (no copies).
    """
    w_q, w_k, w_v = in_proj_weight.chunk(3)
    b_q, b_k, b_v = in_proj_bias.chunk(3)

    def heads(x: Tensor) -> Tensor:  # [L, B, C] -> [B, heads, L, C / heads] (sizes spelt out: L or B may be 0)
        return x.view(x.shape[0], x.shape[1], num_heads, x.shape[2] // num_heads).permute(1, 2, 0, 3)

    q = heads(F.linear(query, w_q, b_q))
    out = m2f_kernels.masked_attention(q, heads(F.linear(key, w_k, b_k)), heads(F.linear(value, w_v, b_v)),
                                       mask, scale=q.shape[-1] ** -0.5, backend=backend)
    out = out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], out.shape[1] * out.shape[3])
    return F.linear(out, out_proj_weight, out_proj_bias)


class MaskedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters and projections (batch_first=False, equal q/k/v
    dims, with bias) around the fused masked attention.

    forward(query [Q, B, C], key [N, B, C], value [N, B, C], attn_mask=None,
    key_padding_mask=None) -> (out [Q, B, C], None), like ``nn.MultiheadAttention`` with
    ``need_weights=False``. ``attn_mask``: bool [B*heads, Q, N] (the official form,
    True = blocked), or [Q, N] / [B, Q, N] / [B, heads, Q, N] bool or floating mask logits
    (blocked where < 0; unlike nn.MultiheadAttention, a floating mask is not an additive
    bias).
    ``key_padding_mask``: bool [B, N], True = padding, merged into the mask.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0,
                 backend: Optional[str] = None):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.backend = backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:  # as nn.MultiheadAttention
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.constant_(self.in_proj_bias, 0.0)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None):
        if self.dropout > 0 and self.training:
            raise NotImplementedError(
                "attention-probability dropout is not fused (Mask2Former uses dropout=0.0)")
        mask = op_mask(attn_mask, key_padding_mask, query.shape[1], self.num_heads, query.shape[0], key.shape[0],
                       query.device)
        out = multihead_masked_attention(query, key, value, self.in_proj_weight, self.in_proj_bias,
                                         self.out_proj.weight, self.out_proj.bias, self.num_heads, mask,
                                         backend=self.backend)
        return out, None


def op_mask(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], batch: int, heads: int,
            nq: int, nk: int, device) -> Tensor:
    """The op's mask ([B, Q, N] or [B, heads, Q, N]) from nn.MultiheadAttention-style masks.

    The official [B*heads, Q, N] form becomes a free [B, heads, Q, N] view; no mask at all
    becomes a stride-0 all-visible bool view (nothing is allocated at size Q*N).
    """
    if attn_mask is None:
        mask = torch.zeros((), dtype=torch.bool, device=device).expand(batch, nq, nk)
    elif attn_mask.dim() == 2:  # [Q, N], shared by the batch
        mask = attn_mask.expand(batch, nq, nk)
    elif attn_mask.dim() == 3 and attn_mask.shape[0] == batch * heads and heads > 1:
        mask = attn_mask.view(batch, heads, nq, nk)
    else:
        mask = attn_mask
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:  # a floating one would read as logits, not as a bias
            raise TypeError(f"key_padding_mask must be bool [B, N] (True = padding), got {key_padding_mask.dtype}")
        blocked = mask if mask.dtype == torch.bool else mask < 0
        pad = key_padding_mask.view(batch, *([1] * (mask.dim() - 2)), nk)
        mask = pad.expand(mask.shape) if attn_mask is None else blocked | pad
    return mask


class MaskedCrossAttention(nn.Module):
    """The official Mask2Former ``CrossAttentionLayer`` on the fused masked attention.

    forward(tgt [Q, B, C], memory [N, B, C], memory_mask=None, memory_key_padding_mask=None,
    pos [N, B, C] = None, query_pos [Q, B, C] = None) -> [Q, B, C]: attention of
    tgt (+ query_pos) over memory (+ pos for the keys), then dropout, residual and LayerNorm
    (post-norm; pre-norm when ``normalize_before``). Masks as in
    :class:`MaskedMultiheadAttention`. ``backend`` is passed to the op (None: the current
    default backend).
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, activation: str = "relu",
                 normalize_before: bool = False, backend: Optional[str] = None):
        super().__init__()
        self.multihead_attn = MaskedMultiheadAttention(d_model, nhead, dropout=dropout, backend=backend)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = activation  # unused, as in the official layer
        self.normalize_before = normalize_before
        for p in self.parameters():  # the official _reset_parameters
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    @staticmethod
    def with_pos_embed(tensor: Tensor, pos: Optional[Tensor]) -> Tensor:
        return tensor if pos is None else tensor + pos

    def forward(self, tgt: Tensor, memory: Tensor, memory_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, pos: Optional[Tensor] = None,
                query_pos: Optional[Tensor] = None) -> Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        attended = self.multihead_attn(
            self.with_pos_embed(x, query_pos), self.with_pos_embed(memory, pos), memory,
            attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask)[0]
        tgt = tgt + self.dropout(attended)
        return tgt if self.normalize_before else self.norm(tgt)

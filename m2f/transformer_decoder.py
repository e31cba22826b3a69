"""Mask2Former's multi-scale masked transformer decoder (``MultiScaleMaskedTransformerDecoder``).

Learnable query features and positions; per layer: masked cross-attention to one level
(round robin 1/32, 1/16, 1/8) -> self-attention -> FFN, post-norm; class and mask
predictions after the query init and after every layer. The attention mask of the next
layer is the current mask prediction, bilinearly resized to that layer's level,
blocked where sigmoid < 0.5.

:class:`CrossAttentionLayer` holds the kernels switch: ``'reference'`` runs
``nn.MultiheadAttention`` with the bool mask repeated per head and the official
empty-row fix; ``'fused'`` runs ``m2f_kernels.masked_attention`` on the same projections
with the [B, Q, N] mask (the kernel applies the empty-row rule).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from m2f_kernels.nn.masked_attention import multihead_masked_attention

from .kernels import KernelSwitch
from .layers import MLP, Conv2d, PositionEmbeddingSine, c2_xavier_fill


def _xavier_reset(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(KernelSwitch, nn.Module):
    """The queries' self-attention (official parameters ``self_attn.*``, ``norm``). The
    official call also returns head-averaged attention weights, which nobody reads: fused,
    the layer asks for none, so the attention runs as one scaled_dot_product_attention."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_reset(self)

    def forward(self, tgt, query_pos: Optional[torch.Tensor] = None):
        """tgt, query_pos: [Q, B, C]."""
        x = self.norm(tgt) if self.normalize_before else tgt
        q = k = x if query_pos is None else x + query_pos
        tgt = tgt + self.dropout(self.self_attn(q, k, value=x, need_weights=not self.fused)[0])
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(KernelSwitch, nn.Module):
    """Masked cross-attention with the official parameters (``multihead_attn.*``, ``norm``)."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_reset(self)

    def forward(self, tgt, memory, memory_mask: torch.Tensor, pos=None, query_pos=None):
        """tgt [Q, B, C], memory [N, B, C], memory_mask bool [B, Q, N] (True = blocked)."""
        x = self.norm(tgt) if self.normalize_before else tgt
        query = x if query_pos is None else x + query_pos
        key = memory if pos is None else memory + pos
        tgt = tgt + self.dropout(self.attend(query, key, memory, memory_mask))
        return tgt if self.normalize_before else self.norm(tgt)

    def attend(self, query, key, value, blocked):
        """Multi-head attention of query [Q, B, C] over key/value [N, B, C] -> [Q, B, C]."""
        mha = self.multihead_attn
        if not self.fused:
            # the official [B*h, Q, N] mask with its empty-row fix
            mask = blocked.unsqueeze(1).repeat(1, mha.num_heads, 1, 1).flatten(0, 1)
            mask[torch.where(mask.sum(-1) == mask.shape[-1])] = False
            return mha(query, key, value, attn_mask=mask, key_padding_mask=None)[0]
        if mha.dropout > 0 and self.training:
            raise NotImplementedError("the fused masked attention has no attention dropout")
        return multihead_masked_attention(query, key, value, mha.in_proj_weight, mha.in_proj_bias,
                                          mha.out_proj.weight, mha.out_proj.bias, mha.num_heads, blocked)


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0,
                 normalize_before: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        _xavier_reset(self)

    def forward(self, tgt):
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt = tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return tgt if self.normalize_before else self.norm(tgt)


MASK_HEADS = ("points", "logits")


class MultiScaleMaskedTransformerDecoder(KernelSwitch, nn.Module):
    """forward(x: 3 features [B, C, H_l, W_l] (1/32, 1/16, 1/8), mask_features [B, mask_dim, H/4, W/4])
    -> {"pred_logits" [B, Q, K+1], "pred_masks" [B, Q, H/4, W/4], "aux_outputs": [dec_layers dicts]}.

    Mask-free (``mask_head='points'`` with ``kernels='fused'``): no prediction builds its
    [B, Q, H/4, W/4] mask logits. Each prediction carries ``"mask_embed"`` [B, Q, mask_dim]
    instead (the output holds the shared ``"mask_features"``), which the criterion samples
    at points (``m2f_kernels.point_mask_logits``); the attention masks come from the mask
    features resized once per level, einsum(embed, resize(F)) = resize(einsum(embed, F))
    (bilinear resizing is linear), as logits (blocked where < 0, i.e. sigmoid < 0.5). In eval
    mode the last prediction's ``"pred_masks"`` is built as usual.

    Args:
        dec_layers: transformer layers (9 in the official configs, whose DEC_LAYERS = 10
            counts the prediction on the learnable queries too).
        mask_head: 'points' (mask-free with the fused kernels) or 'logits' (always build
            the mask logits, as the official code).
    """

    num_feature_levels = 3

    def __init__(self, in_channels: int, *, num_classes: int, hidden_dim: int = 256, num_queries: int = 100,
                 nheads: int = 8, dim_feedforward: int = 2048, dec_layers: int = 9, pre_norm: bool = False,
                 mask_dim: int = 256, enforce_input_project: bool = False, mask_head: str = "points"):
        super().__init__()
        if mask_head not in MASK_HEADS:
            raise ValueError(f"mask_head must be one of {MASK_HEADS}, got {mask_head!r}")
        self.mask_head = mask_head
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, 0.0, pre_norm) for _ in range(dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, 0.0, pre_norm) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, 0.0, pre_norm) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                self.input_proj.append(Conv2d(in_channels, hidden_dim, kernel_size=1))
                c2_xavier_fill(self.input_proj[-1])
            else:
                self.input_proj.append(nn.Sequential())
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, x: List[torch.Tensor], mask_features: torch.Tensor) -> Dict:
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(x)}")
        src, pos, size_list = [], [], []
        for i in range(self.num_feature_levels):
            size_list.append(x[i].shape[-2:])
            pos.append(self.pe_layer(x[i]).flatten(2).permute(2, 0, 1))  # [HW, B, C]
            src.append((self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        bs = src[0].shape[1]
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)

        if self.mask_free:
            level_features = [F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)
                              for size in size_list]

            def heads(output, level):
                return self.forward_embed_heads(output, level_features[level])
        else:
            def heads(output, level):
                return self.forward_prediction_heads(output, mask_features, size_list[level])

        classes, masks = [], []  # masks: mask logits, or mask embeddings when mask-free
        outputs_class, outputs_mask, attn_mask = heads(output, 0)
        classes.append(outputs_class)
        masks.append(outputs_mask)
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            output = self._layer(i, output, src[level], attn_mask, pos[level], query_embed)
            outputs_class, outputs_mask, attn_mask = heads(output, (i + 1) % self.num_feature_levels)
            classes.append(outputs_class)
            masks.append(outputs_mask)
        key = "mask_embed" if self.mask_free else "pred_masks"
        out = {"pred_logits": classes[-1], key: masks[-1],
               "aux_outputs": [{"pred_logits": c, key: m} for c, m in zip(classes[:-1], masks[:-1])]}
        if self.mask_free:
            out["mask_features"] = mask_features
            if not self.training:
                out["pred_masks"] = torch.einsum("bqc,bchw->bqhw", masks[-1], mask_features)
        return out

    @property
    def mask_free(self) -> bool:
        return self.fused and self.mask_head == "points"

    def _layer(self, i, output, src, attn_mask, pos, query_embed):
        output = self.transformer_cross_attention_layers[i](output, src, attn_mask, pos=pos, query_pos=query_embed)
        output = self.transformer_self_attention_layers[i](output, query_pos=query_embed)
        return self.transformer_ffn_layers[i](output)

    def _heads(self, output):
        """output [Q, B, C] -> (class logits [B, Q, K+1], mask embeddings [B, Q, mask_dim])."""
        decoder_output = self.decoder_norm(output).transpose(0, 1)
        return self.class_embed(decoder_output), self.mask_embed(decoder_output)

    def forward_embed_heads(self, output, level_features):
        """-> (class logits [B, Q, K+1], mask embeddings [B, Q, mask_dim], attention-mask logits
        [B, Q, h*w] at ``level_features``' size, blocked where < 0)."""
        outputs_class, mask_embed = self._heads(output)
        attn_logits = torch.einsum("bqc,bchw->bqhw", mask_embed, level_features).flatten(2).detach()
        return outputs_class, mask_embed, attn_logits

    def forward_prediction_heads(self, output, mask_features, attn_mask_target_size):
        """-> (class logits [B, Q, K+1], mask logits [B, Q, H/4, W/4], blocked [B, Q, h*w] bool)."""
        outputs_class, mask_embed = self._heads(output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        attn_mask = F.interpolate(outputs_mask, size=attn_mask_target_size, mode="bilinear", align_corners=False)
        blocked = (attn_mask.sigmoid().flatten(2) < 0.5).detach()
        return outputs_class, outputs_mask, blocked

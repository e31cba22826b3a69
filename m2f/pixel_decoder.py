"""The official MSDeformAttn pixel decoder (Mask2Former's ``MSDeformAttnPixelDecoder``).

res3..res5 go through 1x1 input projections with GroupNorm(32), get sine position plus
level embeddings and pass through a deformable-attention encoder; res2 is then fused in
FPN style (lateral 1x1 + bilinear upsample + 3x3 output conv) and a 1x1 conv makes the
mask features.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from m2f_kernels.nn.ms_deform_attn import level_index
from m2f_kernels.nn.shape_cache import cached

from .kernels import KernelSwitch
from .layers import Conv2d, PositionEmbeddingSine, c2_xavier_fill
from .ms_deform_attn import MSDeformAttn


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Deformable self-attention -> add & norm -> FFN -> add & norm (post-norm)."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class MSDeformAttnTransformerEncoder(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(MSDeformAttnTransformerEncoderLayer(**layer_kwargs) for _ in range(num_layers))
        self._reference_points: dict = {}

    @staticmethod
    def get_reference_points(spatial_shapes: Sequence[Tuple[int, int]], batch: int, num_levels: int, device):
        """[B, S, L, 2]: every pixel centre, normalised, repeated for each level (no padding;
        an expanded view of one [S, 2] tensor)."""
        refs = []
        for hh, ww in spatial_shapes:
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, hh - 0.5, hh, dtype=torch.float32, device=device),
                torch.linspace(0.5, ww - 0.5, ww, dtype=torch.float32, device=device),
                indexing="ij",
            )
            refs.append(torch.stack((ref_x.reshape(-1) / ww, ref_y.reshape(-1) / hh), -1))
        ref = torch.cat(refs, 0)
        return ref[None, :, None].expand(batch, -1, num_levels, -1)

    def forward(self, src, spatial_shapes, level_start_index, pos, shapes_list):
        shapes = tuple(tuple(hw) for hw in shapes_list)
        reference_points = cached(self._reference_points, (shapes, src.shape[0], str(src.device)),
                                  lambda: self.get_reference_points(shapes, src.shape[0], len(shapes), src.device))
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index)
        return src


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, dim_feedforward=1024, dropout=0.1,
                 num_feature_levels=4, enc_n_points=4):
        super().__init__()
        self.encoder = MSDeformAttnTransformerEncoder(
            num_encoder_layers, d_model=d_model, d_ffn=dim_feedforward, dropout=dropout,
            n_levels=num_feature_levels, n_heads=nhead, n_points=enc_n_points,
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)
        self._level_cache: Dict = {}

    def forward(self, srcs: List[torch.Tensor], pos_embeds: List[torch.Tensor]):
        """srcs/pos_embeds: per level [B, C, H_l, W_l] -> (memory [B, S, C], shapes list)."""
        shapes = [tuple(x.shape[-2:]) for x in srcs]
        src_flatten = torch.cat([x.flatten(2).transpose(1, 2) for x in srcs], 1)
        pos_flatten = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1) for lvl, p in enumerate(pos_embeds)], 1
        )
        spatial_shapes, level_start_index = level_index(shapes, src_flatten.device, self._level_cache)
        memory = self.encoder(src_flatten, spatial_shapes, level_start_index, pos_flatten, shapes)
        return memory, shapes


class MSDeformAttnPixelDecoder(KernelSwitch, nn.Module):
    """forward_features(features {res2..res5}) -> (mask_features [B, mask_dim, H/4, W/4],
    encoder output at the coarsest level, [3 multi-scale features, 1/32 -> 1/8]).

    Args:
        input_shape: {name: (channels, stride)} of the backbone features.
        conv_dim, mask_dim: 256 in the official configs.
        norm: 'GN' (official) or '' for the FPN convs.
        fp32: run the decoder in float32 under autocast, as the official code does
            (``@autocast(enabled=False)``). None (default) means: only with
            ``kernels='reference'``; the fused kernels take half precision.
    """

    def __init__(self, input_shape: Dict[str, Tuple[int, int]], *, conv_dim: int = 256, mask_dim: int = 256,
                 norm: str = "GN", transformer_dropout: float = 0.0, transformer_nheads: int = 8,
                 transformer_dim_feedforward: int = 1024, transformer_enc_layers: int = 6,
                 transformer_n_points: int = 4,
                 transformer_in_features: Sequence[str] = ("res3", "res4", "res5"),
                 common_stride: int = 4, fp32: Optional[bool] = None):
        super().__init__()
        self.fp32 = fp32
        ordered = sorted(input_shape.items(), key=lambda kv: kv[1][1])
        self.in_features = [k for k, _ in ordered]
        self.feature_channels = [c for _, (c, _) in ordered]
        t_ordered = [(k, v) for k, v in ordered if k in transformer_in_features]
        self.transformer_in_features = [k for k, _ in t_ordered]
        self.transformer_num_feature_levels = len(t_ordered)
        # from low resolution to high resolution (res5 -> res3)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for _, (c, _) in t_ordered[::-1]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim, nhead=transformer_nheads, num_encoder_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward, dropout=transformer_dropout,
            num_feature_levels=self.transformer_num_feature_levels, enc_n_points=transformer_n_points,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)
        self.maskformer_num_feature_levels = 3  # always use 3 scales
        min_stride = min(s for _, (_, s) in t_ordered)
        self.num_fpn_levels = int(math.log2(min_stride) - math.log2(common_stride))
        lateral, output = [], []
        use_bias = norm == ""
        for idx, cin in enumerate(self.feature_channels[:self.num_fpn_levels]):
            lat = Conv2d(cin, conv_dim, kernel_size=1, bias=use_bias, norm=_norm(norm, conv_dim))
            out = Conv2d(conv_dim, conv_dim, kernel_size=3, padding=1, bias=use_bias,
                         norm=_norm(norm, conv_dim), activation=F.relu)
            c2_xavier_fill(lat)
            c2_xavier_fill(out)
            self.add_module(f"adapter_{idx + 1}", lat)
            self.add_module(f"layer_{idx + 1}", out)
            lateral.append(lat)
            output.append(out)
        # top-down order, low to high resolution (plain lists: registered above by name)
        self.lateral_convs = lateral[::-1]
        self.output_convs = output[::-1]

    def _force_fp32(self) -> bool:
        return (not self.fused) if self.fp32 is None else self.fp32

    def forward_features(self, features: Dict[str, torch.Tensor]):
        if self._force_fp32():
            device_type = next(iter(features.values())).device.type
            with torch.autocast(device_type=device_type, enabled=False):
                return self._forward({k: v.float() for k, v in features.items()})
        return self._forward(features)

    def _forward(self, features: Dict[str, torch.Tensor]):
        srcs, pos = [], []
        for idx, f in enumerate(self.transformer_in_features[::-1]):
            x = features[f]
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))
        y, shapes = self.transformer(srcs, pos)
        bs = y.shape[0]
        out = [z.transpose(1, 2).reshape(bs, -1, hh, ww)
               for z, (hh, ww) in zip(y.split([hh * ww for hh, ww in shapes], dim=1), shapes)]
        for idx, f in enumerate(self.in_features[:self.num_fpn_levels][::-1]):
            cur_fpn = self.lateral_convs[idx](features[f])
            y = cur_fpn + F.interpolate(out[-1], size=cur_fpn.shape[-2:], mode="bilinear", align_corners=False)
            out.append(self.output_convs[idx](y))
        multi_scale_features = out[:self.maskformer_num_feature_levels]
        return self.mask_features(out[-1]), out[0], multi_scale_features


def _norm(norm: str, channels: int) -> Optional[nn.Module]:
    if norm == "":
        return None
    if norm == "GN":
        return nn.GroupNorm(32, channels)
    raise ValueError(f"pixel decoder norm must be 'GN' or '', got {norm!r}")

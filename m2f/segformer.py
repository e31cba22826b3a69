"""SegFormer (Xie et al. 2021): the Mix Transformer encoders MiT-B0..B5 and the all-MLP decoder.

    from m2f import build_segformer
    model = build_segformer("mit_b2", num_classes=150)           # the paper's B2 (ADE20K head)
    model.train(); losses = model(images, targets)                # {"loss_ce": ...}
    model.eval();  logits = model(images)["sem_seg_logits"]       # [B, K, H'/4, W'/4]
    model.semantic_logits(images)                                  # [B, K, H, W], eval mode

* Encoder: four stages of overlapping patch embeddings (7x7 stride 4, then 3x3 stride 2;
  a conv and a LayerNorm), transformer blocks of efficient self-attention (keys and values
  from a ``sr_ratio`` x ``sr_ratio`` strided conv of the tokens, then LayerNorm; the
  attention is ``F.scaled_dot_product_attention``) and Mix-FFN (Linear, 3x3 depthwise
  conv, GELU, Linear), a LayerNorm after each stage; no positional encoding. Stochastic
  depth rises linearly to ``drop_path_rate`` (0.1) over all blocks.
* Decoder: one Linear per stage to ``decoder_dim`` (256 for B0/B1, 768 for B2-B5),
  bilinear upsampling to stride 4, concatenation, 1x1 conv + BatchNorm + ReLU, Dropout2d
  0.1, 1x1 conv to the classes.
* Training: logits bilinearly upsampled to the padded input, cross-entropy with
  ``ignore_index`` (255, the datasets' ignore label) averaged over all pixels, ignored ones
  counting zero (mmseg's ``CrossEntropyLoss``, which the official code trains with); no
  auxiliary losses. ``targets`` is an int64 [B, H, W] class map, or the per-image
  ``dict(labels, masks)`` of ``m2f.data`` (pixels in no mask are ignored).
* Input: ``[B, 3, H, W]`` float RGB in 0..255, normalised with the ImageNet mean/std (as
  the official configs) and zero-padded on the right/bottom to ``size_divisibility`` (32:
  every stage then has a whole number of tokens and the reductions fit).

Parameter names are the official ones (NVlabs/SegFormer, mmseg 0.x), so an official
checkpoint loads as it is; :func:`load_segformer_weights` also reads the ImageNet MiT
backbones and HF transformers checkpoints through :data:`HF_KEY_TABLE`. Nothing is
downloaded.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone.swin import drop_path
from .build import checked_overrides
from .layers import PixelNormalizer

IGNORE_INDEX = 255


@dataclass(frozen=True)
class MiTVariant:
    """One row of the paper's Table 6 (encoder) with its decoder width."""

    embed_dims: Tuple[int, int, int, int]
    depths: Tuple[int, int, int, int]
    decoder_dim: int
    num_heads: Tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: Tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4


VARIANTS: Dict[str, MiTVariant] = {
    "mit_b0": MiTVariant((32, 64, 160, 256), (2, 2, 2, 2), 256),
    "mit_b1": MiTVariant((64, 128, 320, 512), (2, 2, 2, 2), 256),
    "mit_b2": MiTVariant((64, 128, 320, 512), (3, 4, 6, 3), 768),
    "mit_b3": MiTVariant((64, 128, 320, 512), (3, 4, 18, 3), 768),
    "mit_b4": MiTVariant((64, 128, 320, 512), (3, 8, 27, 3), 768),
    "mit_b5": MiTVariant((64, 128, 320, 512), (3, 6, 40, 3), 768),
}
# The paper's Table 1: parameters in millions, (encoder, decoder), ADE20K head (150 classes).
PAPER_PARAMS_M: Dict[str, Tuple[float, float]] = {
    "mit_b0": (3.4, 0.4), "mit_b1": (13.1, 0.6), "mit_b2": (24.2, 3.3),
    "mit_b3": (44.0, 3.3), "mit_b4": (60.8, 3.3), "mit_b5": (81.4, 3.3),
}
SEGFORMERS = tuple(VARIANTS)


# ----------------------------------------------------------------------------- encoder


class OverlapPatchEmbed(nn.Module):
    """Conv (kernel ``patch_size``, stride ``stride``, padding ``patch_size // 2``), then
    LayerNorm over channels: [B, C, H, W] -> tokens [B, H'W', D], H', W'."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor):
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from the tokens reduced by a
    ``sr_ratio`` x ``sr_ratio`` conv of stride ``sr_ratio`` (and a LayerNorm): N queries
    attend to N / sr_ratio^2 keys. ``kv`` holds the key then the value projection."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.sr_ratio = num_heads, sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x).view(b, n, heads, c // heads).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
            x = self.norm(x)
        k, v = self.kv(x).view(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    """3x3 depthwise conv over the token grid (Mix-FFN's positional cue)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6, as the official MiT)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: int, drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, dim * mlp_ratio)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x), h, w), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x), h, w), self.drop_path_rate, self.training)


class MixVisionTransformer(nn.Module):
    """MiT encoder: forward(x [B, 3, H, W]) -> four maps [B, C_i, H / 2^(i+2), W / 2^(i+2)].

    Modules ``patch_embed{1..4}``, ``block{1..4}`` and ``norm{1..4}`` as the official code
    (no classification head)."""

    def __init__(self, embed_dims: Sequence[int], depths: Sequence[int], num_heads: Sequence[int],
                 sr_ratios: Sequence[int], mlp_ratio: int = 4, drop_path_rate: float = 0.1, in_chans: int = 3):
        super().__init__()
        self.embed_dims, self.depths = tuple(embed_dims), tuple(depths)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        for i in range(4):
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(
                in_chans if i == 0 else embed_dims[i - 1], embed_dims[i], 7 if i == 0 else 3, 4 if i == 0 else 2))
            first = sum(depths[:i])
            setattr(self, f"block{i + 1}", nn.ModuleList(
                Block(embed_dims[i], num_heads[i], sr_ratios[i], mlp_ratio, rates[first + j]) for j in range(depths[i])))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=1e-6))
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        b = x.shape[0]
        outs = []
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x = blk(x, h, w)
            x = getattr(self, f"norm{i}")(x)
            x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


def _init_weights(m: nn.Module) -> None:
    """The official MiT init: trunc-normal(0.02) Linear weights, He-normal (fan-out) convs,
    zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- decoder


class MLP(nn.Module):
    """[B, C, H, W] -> tokens [B, HW, D] (one Linear)."""

    def __init__(self, input_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(2).transpose(1, 2))


class ConvBNReLU(nn.Module):
    """mmcv's ConvModule(kernel 1, BN): ``conv`` (no bias), ``bn``, ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class SegFormerHead(nn.Module):
    """The all-MLP decoder: forward(four maps) -> logits [B, num_classes, H/4, W/4]."""

    def __init__(self, in_channels: Sequence[int], embed_dim: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        for i, c in enumerate(in_channels):
            setattr(self, f"linear_c{i + 1}", MLP(c, embed_dim))
        self.linear_fuse = ConvBNReLU(4 * embed_dim, embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)
        self.num_classes = num_classes

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        b = features[0].shape[0]
        maps = []
        for i in (4, 3, 2, 1):  # the official concatenation order: c4, c3, c2, c1
            f = features[i - 1]
            x = getattr(self, f"linear_c{i}")(f).transpose(1, 2).reshape(b, -1, *f.shape[-2:])
            if i > 1:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            maps.append(x)
        return self.linear_pred(self.dropout(self.linear_fuse(torch.cat(maps, dim=1))))


# ----------------------------------------------------------------------------- model


class SegFormer(PixelNormalizer):
    """Normalise, pad, MiT encoder (``backbone``), all-MLP decoder (``decode_head``);
    cross-entropy in training. See the module docstring for inputs and outputs."""

    task = "semantic"  # m2f.evaluate evaluates it per pixel (argmax of the logits)

    def __init__(self, backbone: MixVisionTransformer, decode_head: SegFormerHead, *, size_divisibility: int = 32,
                 pixel_mean: Sequence[float] = (123.675, 116.280, 103.530),
                 pixel_std: Sequence[float] = (58.395, 57.120, 57.375), ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.ignore_index = ignore_index
        self._init_pixels(pixel_mean, pixel_std, size_divisibility)

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    def forward(self, images: torch.Tensor, targets=None, *, generator: Optional[torch.Generator] = None):
        """Training: ``{"loss_ce": scalar}``; eval: ``{"sem_seg_logits": [B, K, H'/4, W'/4]}``
        (H', W' the padded size). ``generator`` is accepted for the training loop's call and unused."""
        x = self.preprocess(images)
        logits = self.decode_head(self.backbone(x))
        if not self.training:
            return {"sem_seg_logits": logits}
        if targets is None:
            raise ValueError("training mode needs targets: int64 [B, H, W] class maps or a list of "
                             "dict(labels=[T], masks=[T, H, W])")
        labels = self.semantic_targets(targets, images.shape[0], x.shape[-2:], logits.device)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index, reduction="none")
        return {"loss_ce": loss.mean()}

    @torch.no_grad()
    def semantic_logits(self, images: torch.Tensor) -> torch.Tensor:
        """[B, K, H, W] class scores at the input size (bilinear, the padding cropped)."""
        if self.training:
            raise RuntimeError("semantic_logits runs in eval mode (model.eval())")
        h, w = images.shape[-2:]
        logits = self(images)["sem_seg_logits"]
        padded = (logits.shape[-2] * 4, logits.shape[-1] * 4)
        return F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)[..., :h, :w]

    def semantic_targets(self, targets, batch: int, padded_size, device) -> torch.Tensor:
        """int64 [B, H', W'] class map padded with ``ignore_index`` from a [B, H, W] tensor or
        per-image dict(labels [T], masks bool [T, H, W]) (later masks win; uncovered = ignore)."""
        h_pad, w_pad = padded_size
        if isinstance(targets, torch.Tensor):
            if targets.dim() != 3 or targets.shape[0] != batch:
                raise ValueError(f"class-map targets must be [B={batch}, H, W], got {tuple(targets.shape)}")
            maps = targets.to(device=device, dtype=torch.int64)
        else:
            if len(targets) != batch:
                raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
            maps = []
            for t in targets:
                masks, labels = t["masks"].to(device), t["labels"].to(device=device, dtype=torch.int64)
                sem = torch.full(masks.shape[-2:], self.ignore_index, dtype=torch.int64, device=device)
                if masks.shape[0]:
                    covered = masks.any(0)
                    # the last mask containing each pixel: argmax over the reversed mask stack
                    last = masks.shape[0] - 1 - masks.flip(0).to(torch.uint8).argmax(0)
                    sem = torch.where(covered, labels[last], sem)
                maps.append(sem)
            maps = torch.stack(maps)
        h, w = maps.shape[-2:]
        if h > h_pad or w > w_pad:
            raise ValueError(f"targets of {h}x{w} are larger than the padded image {h_pad}x{w_pad}")
        return F.pad(maps, (0, w_pad - w, 0, h_pad - h), value=self.ignore_index)


@dataclass
class SegFormerOverrides:
    """Everything ``build_segformer`` accepts besides the variant and class count (the
    official defaults; None: the variant's value)."""

    embed_dims: Optional[Sequence[int]] = None
    depths: Optional[Sequence[int]] = None
    num_heads: Optional[Sequence[int]] = None
    sr_ratios: Optional[Sequence[int]] = None
    mlp_ratio: Optional[int] = None
    decoder_dim: Optional[int] = None
    drop_path_rate: float = 0.1
    dropout: float = 0.1
    size_divisibility: int = 32
    pixel_mean: Tuple[float, ...] = (123.675, 116.280, 103.530)
    pixel_std: Tuple[float, ...] = (58.395, 57.120, 57.375)
    ignore_index: int = IGNORE_INDEX
    weights: Optional[str] = None  # local file: MiT backbone or whole SegFormer (load_segformer_weights)


def build_segformer(variant: str = "mit_b0", num_classes: int = 150, **overrides) -> SegFormer:
    """A SegFormer with the paper's configuration of ``variant`` ('mit_b0' .. 'mit_b5').

    Args:
        variant: the MiT encoder; B0/B1 get a 256-wide decoder, B2-B5 768.
        num_classes: K (150 for ADE20K); the logits have no extra "void" class.
        **overrides: fields of :class:`SegFormerOverrides`, e.g. ``depths=(1, 1, 1, 1)`` for
            tests, ``weights=<path>`` to load official weights (see :func:`load_segformer_weights`).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown SegFormer variant {variant!r}; choose one of {SEGFORMERS}")
    cfg = checked_overrides(SegFormerOverrides, overrides, "build_segformer")
    v = VARIANTS[variant]
    embed_dims = tuple(cfg.embed_dims or v.embed_dims)
    backbone = MixVisionTransformer(embed_dims, tuple(cfg.depths or v.depths), tuple(cfg.num_heads or v.num_heads),
                                    tuple(cfg.sr_ratios or v.sr_ratios), cfg.mlp_ratio or v.mlp_ratio,
                                    cfg.drop_path_rate)
    head = SegFormerHead(embed_dims, cfg.decoder_dim or v.decoder_dim, num_classes, cfg.dropout)
    model = SegFormer(backbone, head, size_divisibility=cfg.size_divisibility, pixel_mean=cfg.pixel_mean,
                      pixel_std=cfg.pixel_std, ignore_index=cfg.ignore_index)
    if cfg.weights is not None:
        load_segformer_weights(model, cfg.weights)
    return model


def count_parameters(model: SegFormer) -> Tuple[int, int]:
    """(encoder, decoder) parameter counts (trainable tensors; BN running stats excluded)."""
    return (sum(p.numel() for p in model.backbone.parameters()),
            sum(p.numel() for p in model.decode_head.parameters()))


# ----------------------------------------------------------------------------- weights

# HF transformers SegformerForSemanticSegmentation / SegformerModel names -> the official
# ones used here. Files on disk (transformers 4 and the hub) use the first column's "v4"
# names, transformers >= 5 renames them in memory ("v5"); both are read. The official
# ``attn.kv`` is HF's key and value projections stacked (key first). Stage i / block j are
# 0-based in HF and 1-based here (``block{i+1}.{j}``, ``norm{i+1}``, ``linear_c{i+1}``).
HF_KEY_TABLE: Tuple[Tuple[str, str], ...] = (
    # v4 (files)                                       official
    (r"encoder\.patch_embeddings\.(\d)\.proj\.", "backbone.patch_embed{i}.proj."),
    (r"encoder\.patch_embeddings\.(\d)\.layer_norm\.", "backbone.patch_embed{i}.norm."),
    (r"encoder\.block\.(\d)\.(\d+)\.layer_norm_1\.", "backbone.block{i}.{j}.norm1."),
    (r"encoder\.block\.(\d)\.(\d+)\.attention\.self\.query\.", "backbone.block{i}.{j}.attn.q."),
    (r"encoder\.block\.(\d)\.(\d+)\.attention\.self\.key\.", "backbone.block{i}.{j}.attn.kv[k]."),
    (r"encoder\.block\.(\d)\.(\d+)\.attention\.self\.value\.", "backbone.block{i}.{j}.attn.kv[v]."),
    (r"encoder\.block\.(\d)\.(\d+)\.attention\.self\.sr\.", "backbone.block{i}.{j}.attn.sr."),
    (r"encoder\.block\.(\d)\.(\d+)\.attention\.self\.layer_norm\.", "backbone.block{i}.{j}.attn.norm."),
    (r"encoder\.block\.(\d)\.(\d+)\.attention\.output\.dense\.", "backbone.block{i}.{j}.attn.proj."),
    (r"encoder\.block\.(\d)\.(\d+)\.layer_norm_2\.", "backbone.block{i}.{j}.norm2."),
    (r"encoder\.block\.(\d)\.(\d+)\.mlp\.dense1\.", "backbone.block{i}.{j}.mlp.fc1."),
    (r"encoder\.block\.(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.", "backbone.block{i}.{j}.mlp.dwconv.dwconv."),
    (r"encoder\.block\.(\d)\.(\d+)\.mlp\.dense2\.", "backbone.block{i}.{j}.mlp.fc2."),
    (r"encoder\.layer_norm\.(\d)\.", "backbone.norm{i}."),
    (r"decode_head\.linear_c\.(\d)\.proj\.", "decode_head.linear_c{i}.proj."),
    # v5 (transformers >= 5 in memory)
    (r"stages\.(\d)\.patch_embeddings\.proj\.", "backbone.patch_embed{i}.proj."),
    (r"stages\.(\d)\.patch_embeddings\.layer_norm\.", "backbone.patch_embed{i}.norm."),
    (r"stages\.(\d)\.blocks\.(\d+)\.layernorm_before\.", "backbone.block{i}.{j}.norm1."),
    (r"stages\.(\d)\.blocks\.(\d+)\.attention\.q_proj\.", "backbone.block{i}.{j}.attn.q."),
    (r"stages\.(\d)\.blocks\.(\d+)\.attention\.k_proj\.", "backbone.block{i}.{j}.attn.kv[k]."),
    (r"stages\.(\d)\.blocks\.(\d+)\.attention\.v_proj\.", "backbone.block{i}.{j}.attn.kv[v]."),
    (r"stages\.(\d)\.blocks\.(\d+)\.attention\.sequence_reduction\.sequence_reduction\.",
     "backbone.block{i}.{j}.attn.sr."),
    (r"stages\.(\d)\.blocks\.(\d+)\.attention\.sequence_reduction\.layer_norm\.", "backbone.block{i}.{j}.attn.norm."),
    (r"stages\.(\d)\.blocks\.(\d+)\.attention\.o_proj\.", "backbone.block{i}.{j}.attn.proj."),
    (r"stages\.(\d)\.blocks\.(\d+)\.layernorm_after\.", "backbone.block{i}.{j}.norm2."),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.fc1\.", "backbone.block{i}.{j}.mlp.fc1."),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.dwconv\.dwconv\.", "backbone.block{i}.{j}.mlp.dwconv.dwconv."),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.fc2\.", "backbone.block{i}.{j}.mlp.fc2."),
    (r"stages\.(\d)\.layer_norm\.", "backbone.norm{i}."),
    (r"decode_head\.linear_projections\.(\d)\.proj\.", "decode_head.linear_c{i}.proj."),
    # both
    (r"decode_head\.linear_fuse\.", "decode_head.linear_fuse.conv."),
    (r"decode_head\.batch_norm\.", "decode_head.linear_fuse.bn."),
    (r"decode_head\.classifier\.", "decode_head.linear_pred."),
)
_HF_RULES = [(re.compile("^" + src), dst) for src, dst in HF_KEY_TABLE]

# entries of official files that are not SegFormer weights here: the ImageNet classifier of
# MiT / HF classification files, and mmseg's BaseDecodeHead.conv_seg, which SegFormerHead
# creates but never uses (its own classifier is linear_pred)
_IGNORED = re.compile(r"^(head|classifier)\.|^decode_head\.conv_seg\.")


def _hf_to_official(key: str) -> str:
    for pattern, dst in _HF_RULES:
        m = pattern.match(key)
        if m:
            groups = m.groups()
            name = dst.format(i=int(groups[0]) + 1 if groups else "", j=groups[1] if len(groups) > 1 else "")
            return name + key[m.end():]
    return key


def official_state_dict(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], str]:
    """Any supported file's {name: tensor} -> (official names, format): 'official' (NVlabs
    mmseg names: ``backbone.*`` / ``decode_head.*``, or the bare MiT ImageNet names, which
    get ``backbone.``) or 'hf'. HF's key / value projections are stacked into ``attn.kv``."""
    keys = list(state)
    hf = any(k.startswith(("segformer.", "encoder.", "stages.", "decode_head.linear_c.", "decode_head.classifier.",
                           "decode_head.linear_projections.", "decode_head.batch_norm.")) for k in keys)
    out: Dict[str, torch.Tensor] = {}
    if not hf:
        for k, v in state.items():
            bare = k.startswith(("patch_embed", "block", "norm")) and not k.startswith("backbone.")
            out["backbone." + k if bare else k] = v
        return out, "official"
    halves: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        name = _hf_to_official(k[len("segformer."):] if k.startswith("segformer.") else k)
        m = re.match(r"^(.*)\.kv\[([kv])\]\.(\w+)$", name)
        if m:
            halves.setdefault(f"{m[1]}.kv.{m[3]}", {})[m[2]] = v
        else:
            out[name] = v
    for name, parts in halves.items():
        if set(parts) == {"k", "v"}:
            out[name] = torch.cat([parts["k"], parts["v"]], 0)
        else:  # one half only: report it under its own name
            out.update({name.replace(".kv.", f".kv[{h}]."): t for h, t in parts.items()})
    return out, "hf"


def load_segformer_weights(model: SegFormer, path_or_state: Union[str, Mapping[str, torch.Tensor]], *,
                           ignore_classifier: bool = False) -> Dict[str, object]:
    """Load official weights from a local file (or a state dict) into ``model``.

    Accepted: NVlabs/SegFormer checkpoints (``segformer.b*.pth``: ``state_dict`` with
    ``backbone.patch_embed1.proj.weight``, ``backbone.block1.0.attn.q.weight``,
    ``decode_head.linear_c4.proj.weight``, ``decode_head.linear_fuse.conv.weight``, ...),
    the ImageNet MiT backbones (``mit_b*.pth``: ``patch_embed1...``, ``head.*`` ignored),
    and HF transformers files (``pytorch_model.bin`` / ``model.safetensors`` of
    SegformerForSemanticSegmentation, SegformerModel or SegformerForImageClassification;
    :data:`HF_KEY_TABLE`). A file without ``decode_head`` weights loads the encoder only
    (the decoder keeps its initialisation). ``ignore_classifier`` skips
    ``decode_head.linear_pred`` (fine-tuning on other classes). Any other missing,
    unexpected or mis-shaped key raises ``m2f.CheckpointMismatchError`` naming each one
    (under the official names). Returns {"format", "loaded": 'model' | 'backbone', "ignored"}.
    """
    from .checkpoint import _check_keys

    if isinstance(path_or_state, (str, bytes)) or hasattr(path_or_state, "__fspath__"):
        state = read_segformer_file(str(path_or_state))
    else:
        state = dict(path_or_state)
    state, fmt = official_state_dict(state)
    ignored = sorted(k for k in state if _IGNORED.search(k))
    if ignore_classifier:
        ignored += sorted(k for k in state if k.startswith("decode_head.linear_pred."))
    state = {k: v for k, v in state.items() if k not in set(ignored)}
    expected = model.state_dict()
    whole = any(k.startswith("decode_head.") for k in state)
    if not whole:
        expected = {k: v for k, v in expected.items() if k.startswith("backbone.")}
    elif ignore_classifier:
        expected = {k: v for k, v in expected.items() if not k.startswith("decode_head.linear_pred.")}
    _check_keys(f"SegFormer weights ({fmt} names)", state, expected)
    model.load_state_dict(state, strict=False)
    return {"format": fmt, "loaded": "model" if whole else "backbone", "ignored": ignored}


def read_segformer_file(path: str) -> Dict[str, torch.Tensor]:
    """{name: tensor} of a ``torch.save`` file (a "state_dict" or "model" wrapper removed)
    or a ``.safetensors`` file."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    from .checkpoint import read_weights

    return read_weights(path)


__all__ = ["build_segformer", "SegFormer", "SegFormerOverrides", "VARIANTS", "SEGFORMERS", "PAPER_PARAMS_M",
           "HF_KEY_TABLE", "load_segformer_weights", "official_state_dict", "count_parameters"]

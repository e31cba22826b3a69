"""The official Mask2Former optimisation recipe.

- AdamW, base lr 1e-4, weight decay 0.05; parameters of modules named ``backbone`` get
  lr x 0.1 (BACKBONE_MULTIPLIER); normalisation layers and embeddings get no weight decay
  (WEIGHT_DECAY_NORM = WEIGHT_DECAY_EMBED = 0), as do Swin's position tables.
- Poly decay ``lr * (1 - step / max_steps) ** 0.9`` (detectron2 WarmupPolyLR, no warmup).
- Gradient clipping of the whole model's gradient norm at 0.01 (CLIP_TYPE 'full_model'),
  before each optimiser step.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch
import torch.nn as nn

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
              nn.modules.instancenorm._InstanceNorm)
NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


def param_groups(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.05,
                 backbone_multiplier: float = 0.1) -> List[Dict]:
    """One group per parameter (as the official ``build_optimizer``), deduplicated."""
    groups, seen = [], set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            group = {"params": [p], "lr": lr, "weight_decay": weight_decay}
            if "backbone" in module_name:
                group["lr"] = lr * backbone_multiplier
            if isinstance(module, NORM_TYPES + (nn.Embedding,)) or name in NO_DECAY_NAMES:
                group["weight_decay"] = 0.0
            groups.append(group)
    return groups


def build_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.05,
                    backbone_multiplier: float = 0.1) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, lr, weight_decay, backbone_multiplier), lr=lr,
                             weight_decay=weight_decay)


class PolyLambda:
    """``(1 - step / max_steps) ** power`` (0 after max_steps); a class so it pickles."""

    def __init__(self, max_steps: int, power: float = 0.9):
        self.max_steps, self.power = max_steps, power

    def __call__(self, step: int) -> float:
        return max(0.0, 1.0 - step / self.max_steps) ** self.power


def build_scheduler(optimizer: torch.optim.Optimizer, max_steps: int,
                    power: float = 0.9) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, PolyLambda(max_steps, power))


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float = 0.01) -> torch.Tensor:
    """Clip the norm of all gradients together (``clip_grad_norm_``, 2-norm) and return the
    norm before clipping (the official FullModelGradientClippingOptimizer)."""
    return torch.nn.utils.clip_grad_norm_(list(params), max_norm, norm_type=2.0)

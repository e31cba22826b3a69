"""The official Mask2Former optimisation recipe, with parameters grouped for batched updates.

- AdamW, base lr 1e-4, weight decay 0.05; parameters of modules named ``backbone`` get
  lr x 0.1 (BACKBONE_MULTIPLIER); normalisation layers and embeddings get no weight decay
  (WEIGHT_DECAY_NORM = WEIGHT_DECAY_EMBED = 0), as do Swin's position tables.
- The schedule of the official config of the dataset: COCO (Base-COCO-*.yaml) sets no
  LR_SCHEDULER_NAME, so detectron2's default WarmupMultiStepLR applies: lr x 0.1 at steps
  327778 and 355092 of 368750 (``schedule='step'``, the steps scaled to ``max_steps``);
  ADE20K, Cityscapes and Mapillary Vistas use WarmupPolyLR, ``lr * (1 - step / max_steps) ** 0.9``
  (``schedule='poly'``). Their warm-up (WARMUP_FACTOR 1.0) is the identity, so there is none.
- Gradient clipping of the whole model's gradient norm at 0.01 (CLIP_TYPE 'full_model'),
  before each optimiser step.

The official ``build_optimizer`` makes one parameter group per parameter; here parameters
that share (lr, weight decay) share a group (3-4 groups), with the same per-parameter
values, so AdamW's fused (or foreach) implementation updates a whole group in a few launches.
``parameter_rules`` is the per-parameter rule in the official traversal order (checkpoints
of the per-parameter layout are regrouped with it: ``m2f.checkpoint.load_optimizer_state``).

Nothing here synchronises with the device in a training step: the schedule writes Python
floats (or fills lr tensors in place, for a CUDA-graph-captured step), the clipping uses
``clip_grad_norm_`` without its finiteness check.
"""
from __future__ import annotations

import bisect
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
              nn.modules.instancenorm._InstanceNorm)
NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


def parameter_rules(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.05,
                    backbone_multiplier: float = 0.1) -> List[Tuple[str, nn.Parameter, float, float]]:
    """(name, parameter, lr, weight decay) of every trainable parameter, deduplicated, in the
    official order (``named_modules``, then each module's own parameters)."""
    rules, seen = [], set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            p_lr = lr * backbone_multiplier if "backbone" in module_name else lr
            no_decay = isinstance(module, NORM_TYPES + (nn.Embedding,)) or name in NO_DECAY_NAMES
            rules.append((f"{module_name}.{name}" if module_name else name, p, p_lr, 0.0 if no_decay else weight_decay))
    return rules


def param_groups(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.05,
                 backbone_multiplier: float = 0.1) -> List[Dict]:
    """One group per distinct (lr, weight decay), in order of first appearance; each group
    keeps its parameters in the official order and carries ``initial_lr`` (a float, the
    schedule's base)."""
    groups: Dict[Tuple[float, float], Dict] = {}
    for _, p, p_lr, p_wd in parameter_rules(model, lr, weight_decay, backbone_multiplier):
        group = groups.setdefault((p_lr, p_wd), {"params": [], "lr": p_lr, "initial_lr": p_lr, "weight_decay": p_wd})
        group["params"].append(p)
    return list(groups.values())


# devices with fused AdamW kernels (one launch per group and dtype, step counts read on the
# device); elsewhere the foreach implementation, which reads each step count on the host
FUSED_DEVICES = ("cuda", "cpu", "xpu", "mps")


def build_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.05,
                    backbone_multiplier: float = 0.1, device: Optional[Union[str, torch.device]] = None,
                    capturable: bool = False) -> torch.optim.AdamW:
    """AdamW over ``param_groups``: ``fused=True`` on CUDA (and the CPU, where the fused
    kernel also spares the per-parameter host reads of the step counts), ``foreach=True``
    on devices without fused kernels.

    ``capturable=True`` (CUDA only) is for a step captured in a CUDA graph: each group's lr
    is a 0-dim float32 device tensor that the schedule fills in place between replays (a
    Python float would be frozen into the graph). ``device`` defaults to the parameters'.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    groups = param_groups(model, lr, weight_decay, backbone_multiplier)
    if capturable:
        if device.type != "cuda":
            raise ValueError(f"a capturable optimizer needs CUDA parameters, got device {device}")
        for group in groups:
            group["lr"] = torch.tensor(group["lr"], dtype=torch.float32, device=device)
    options = {"fused": True} if device.type in FUSED_DEVICES else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, capturable=capturable, **options)


SCHEDULES = ("poly", "step")
# Base-COCO-*.yaml: SOLVER.MAX_ITER and SOLVER.STEPS (GAMMA 0.1, detectron2's default)
OFFICIAL_MAX_ITER = 368750
OFFICIAL_STEPS = (327778, 355092)


class PolyLambda:
    """``(1 - step / max_steps) ** power`` (0 after max_steps); a class so it pickles."""

    def __init__(self, max_steps: int, power: float = 0.9):
        self.max_steps, self.power = max_steps, power

    def __call__(self, step: int) -> float:
        return max(0.0, 1.0 - step / self.max_steps) ** self.power


class StepLambda:
    """``gamma ** (milestones reached)``: detectron2's MultiStepParamScheduler. The milestones
    default to the official COCO steps scaled to ``max_steps`` (327778 and 355092 for
    368750 steps); a class so it pickles."""

    def __init__(self, max_steps: int, milestones: Optional[Sequence[int]] = None, gamma: float = 0.1):
        if milestones is None:
            milestones = [round(s * max_steps / OFFICIAL_MAX_ITER) for s in OFFICIAL_STEPS]
        self.max_steps, self.milestones, self.gamma = max_steps, list(milestones), gamma

    def __call__(self, step: int) -> float:
        return self.gamma ** bisect.bisect_right(self.milestones, step)


def build_scheduler(optimizer: torch.optim.Optimizer, max_steps: int, power: float = 0.9,
                    schedule: str = "poly") -> torch.optim.lr_scheduler.LambdaLR:
    """The poly (``power``) or the step schedule (see the module docstring). Its base lrs are
    the groups' float ``initial_lr``, so each step computes the new lr on the host and writes
    it as a float, or with ``fill_`` into a tensor lr (no host sync either way)."""
    if schedule == "poly":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, PolyLambda(max_steps, power))
    if schedule == "step":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, StepLambda(max_steps))
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def current_lrs(scheduler: torch.optim.lr_scheduler.LambdaLR) -> List[float]:
    """The lr of each group as Python floats, computed on the host (``get_last_lr`` returns
    copies of tensor lrs, which would need a sync to read)."""
    return [float(base) * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float = 0.01) -> torch.Tensor:
    """Clip the norm of all gradients together (``clip_grad_norm_``, 2-norm) and return the
    norm before clipping (the official FullModelGradientClippingOptimizer). Foreach kernels
    where the device has them (one norm and one scale launch per device and dtype), and no
    finiteness check, which would read the norm on the host."""
    return torch.nn.utils.clip_grad_norm_(list(params), max_norm, norm_type=2.0, error_if_nonfinite=False,
                                          foreach=None)

"""The ``kernels`` switch: which implementation runs the three hotspot ops.

``'reference'`` is the official Mask2Former code path (nn.MultiheadAttention with a bool
mask repeated per head, grid_sample MSDeformAttn core, grid_sample/einsum criterion);
``'fused'`` calls the public m2f_kernels ops (backend chosen by m2f_kernels' dispatch,
'auto' unless a ``use_backend`` scope or ``set_backend`` says otherwise).

Every layer that owns a hotspot derives from :class:`KernelSwitch`; its ``kernels``
attribute selects only the core op, so both paths share every parameter and
state_dict key. :func:`set_kernels` flips a whole model.
"""
from __future__ import annotations

import torch.nn as nn

KERNELS = ("reference", "fused")


def check_kernels(mode: str) -> str:
    if mode not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {mode!r}")
    return mode


class KernelSwitch:
    """Mixin for modules whose core op has a reference and a fused implementation."""

    kernels: str = "reference"

    @property
    def fused(self) -> bool:
        return self.kernels == "fused"


def set_kernels(module: nn.Module, mode: str) -> nn.Module:
    """Set ``kernels`` on every :class:`KernelSwitch` in ``module`` (itself included)."""
    check_kernels(mode)
    for m in module.modules():
        if isinstance(m, KernelSwitch):
            m.kernels = mode
    return module


def get_kernels(module: nn.Module) -> str:
    """The mode of ``module``'s switches; raises if they disagree."""
    modes = {m.kernels for m in module.modules() if isinstance(m, KernelSwitch)}
    if len(modes) != 1:
        raise ValueError(f"the model's kernel switches disagree or are absent: {sorted(modes)}")
    return modes.pop()

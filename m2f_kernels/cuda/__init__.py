"""The ``cuda`` backend: CUDA C++ kernels compiled into ``m2f_kernels._C`` (issue 9).

Importing this module fails with ImportError until the extension is built, which
the dispatcher reports as "not built". Each op's Python wrappers live in their own
module; this package exports the functions the dispatcher looks for (see
``m2f_kernels._dispatch.BACKEND_FUNCTIONS``); an op without them is reported as not
implemented yet.
"""
from __future__ import annotations

import importlib

import torch

# ModuleNotFoundError until setup.py has built it (a CUDA torch and nvcc at install time).
# Importing it registers the torch.ops.m2f_kernels_C operators.
_C = importlib.import_module("m2f_kernels._C")

from .ms_deform_attn import ms_deform_attn_bwd, ms_deform_attn_fwd  # noqa: E402
from .masked_attention import masked_attention_bwd, masked_attention_fwd  # noqa: E402
from .point_loss import (  # noqa: E402
    pairwise_mask_cost, point_mask_loss_bwd, point_mask_loss_fwd, point_sample_bwd, point_sample_fwd,
    uncertain_point_coords,
)


def device_unavailable_reason(device) -> "str | None":
    dev_type = "cpu" if device is None else torch.device(device).type
    if dev_type != "cuda":
        return f"tensors are on {dev_type}; the CUDA kernels need CUDA tensors"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    return None

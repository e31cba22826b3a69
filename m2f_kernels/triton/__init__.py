"""The ``triton`` backend: fused Triton kernels (CUDA GPUs; the CPU under TRITON_INTERPRET=1).

Each op's kernels live in their own module; this package exports the functions the
dispatcher looks for (see ``m2f_kernels._dispatch.BACKEND_FUNCTIONS``). An op whose
module is not here yet is reported by the dispatcher as not implemented.
"""
from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (ImportError here means: backend unavailable)


def device_unavailable_reason(device) -> "str | None":
    """None if Triton kernels can run on tensors of ``device``, else why not."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    dev_type = "cpu" if device is None else torch.device(device).type
    if dev_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        return None
    if dev_type == "cpu" and interpreting:
        return None
    if dev_type == "cpu":
        return "tensors are on the CPU (Triton needs a CUDA GPU, or TRITON_INTERPRET=1 for tests)"
    return f"tensors are on {dev_type}, which Triton does not support here"


def _export(module_name: str, names: tuple) -> None:
    """Re-export ``names`` from ``.<module_name>`` if that module exists yet."""
    import importlib

    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{module_name}":
            raise
        return
    for name in names:
        globals()[name] = getattr(module, name)


_export("masked_attention", ("masked_attention_fwd", "masked_attention_bwd"))
_export("ms_deform_attn", ("ms_deform_attn_fwd", "ms_deform_attn_bwd"))
_export("point_loss", (
    "point_sample_fwd", "point_sample_bwd", "uncertain_point_coords",
    "point_mask_loss_fwd", "point_mask_loss_bwd", "pairwise_mask_cost",
))

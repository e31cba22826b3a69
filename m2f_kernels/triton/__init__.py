"""The ``triton`` backend: fused Triton kernels (CUDA GPUs; the CPU under TRITON_INTERPRET=1).

Each op family's kernels live in their own module (``m2f_kernels.triton.<op module>``),
which exports the functions the op's declaration names; the dispatcher imports it on first
use (see ``m2f_kernels._dispatch``).
"""
from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (ImportError here means: backend unavailable)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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

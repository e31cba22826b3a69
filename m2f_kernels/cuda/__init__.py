"""The ``cuda`` backend: CUDA C++ kernels compiled into ``m2f_kernels._C``.

Importing this package fails with ImportError until the extension is built, which the
dispatcher reports as "not built". Each op family's Python wrappers live in their own
module (``m2f_kernels.cuda.<op module>``), which exports the functions the op's
declaration names and its ``LIMITS`` (see ``m2f_kernels._dispatch``).
"""
from __future__ import annotations

import importlib

import torch

# ModuleNotFoundError until setup.py has built it (a CUDA torch and nvcc at install time).
# Importing it registers the torch.ops.m2f_kernels_C operators.
_C = importlib.import_module("m2f_kernels._C")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def device_unavailable_reason(device) -> "str | None":
    dev_type = "cpu" if device is None else torch.device(device).type
    if dev_type != "cuda":
        return f"tensors are on {dev_type}; the CUDA kernels need CUDA tensors"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    return None

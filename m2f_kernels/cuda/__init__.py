"""The ``cuda`` backend: CUDA C++ kernels compiled into ``m2f_kernels._C`` (issue 9).

Importing this module fails with ImportError until the extension is built, which
the dispatcher reports as "not built".
"""
from __future__ import annotations

import importlib

import torch

# ModuleNotFoundError until setup.py has built it (a CUDA torch and nvcc at install time)
_C = importlib.import_module("m2f_kernels._C")


def device_unavailable_reason(device) -> "str | None":
    dev_type = "cpu" if device is None else torch.device(device).type
    if dev_type != "cuda":
        return f"tensors are on {dev_type}; the CUDA kernels need CUDA tensors"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    return None

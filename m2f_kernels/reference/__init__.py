"""The ``reference`` backend: plain PyTorch, any device, every floating dtype. It is the spec.

One module per op family (``masked_attention``, ``ms_deform_attn``, ``point_loss``), each
exporting the functions its ops' declarations name (see ``m2f_kernels._dispatch``).
"""
import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def device_unavailable_reason(device):
    return None

"""Multi-scale deformable attention: the pixel decoder's encoder op, providers side by side.

Inputs as in the encoder's self-attention (every pixel of every level is a query, Lq = S):
value [B, S, H, D] in the case dtype; sampling locations [B, Lq, H, L, P, 2] float32 near
each query's pixel (see bench.data.deformable_locations); attention weights
[B, Lq, H, L, P] float32, softmax-normalised over L*P. Locations and weights stay float32
in bf16 cases, as they come out of the official module under autocast.
"""
from __future__ import annotations

import torch

from bench import harness
from bench.data import deformable_locations
from bench.harness import Block, Inputs, OpSpec

SETTINGS = (
    # COCO LSJ 1024^2, batch 2: levels 1/8, 1/16, 1/32 of the input.
    {"setting": "coco1024", "B": 2, "levels": ((128, 128), (64, 64), (32, 32)), "H": 8, "D": 32, "P": 4},
    # ADE20K 512^2 semantic, batch 16.
    {"setting": "ade512", "B": 16, "levels": ((64, 64), (32, 32), (16, 16)), "H": 8, "D": 32, "P": 4},
)
IM2COL_STEP = 128  # Mask2Former's value for the original CUDA op


def make_inputs(shape: dict, dtype: torch.dtype, device) -> Inputs:
    b, h, d, p = (shape[k] for k in ("B", "H", "D", "P"))
    levels = [tuple(hw) for hw in shape["levels"]]
    sizes = [hh * ww for hh, ww in levels]
    s = sum(sizes)
    spatial_shapes = torch.tensor(levels, dtype=torch.int64, device=device)
    level_start_index = torch.tensor([0] + sizes[:-1], dtype=torch.int64, device=device).cumsum(0)
    logits = torch.randn(b, s, h, len(levels) * p, device=device)
    tensors = {
        "value": torch.randn(b, s, h, d, device=device, dtype=dtype),
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": deformable_locations(b, levels, h, p, device),
        "attention_weights": logits.softmax(-1).view(b, s, h, len(levels), p),
    }
    return Inputs(tensors, grad=("value", "sampling_locations", "attention_weights"))


def floor_bytes(inputs: Inputs, mode: str) -> int:
    """Read value, locations and weights once; write out [B, Lq, H*D]; backward writes their grads."""
    value, loc, w = (inputs[n] for n in ("value", "sampling_locations", "attention_weights"))
    b, lq = loc.shape[:2]
    out = b * lq * value.shape[2] * value.shape[3] * value.element_size()
    grads = harness.nbytes(value, loc, w)
    return harness.compulsory_bytes(mode, grads, out, grads)


TABLE = OpSpec(
    name="ms_deform_attn",
    make_inputs=make_inputs,
    blocks=[Block(SETTINGS, ("fp32", "bf16"), ("fwd", "bwd", "fwd+bwd"))],
    floor_bytes=floor_bytes,
    check_against=("reference",),
    input_sets=2,
    id_keys=("setting",),
)

_ARGS = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")


def _m2f(backend: str, deterministic: bool = False):
    def build(inputs: Inputs):
        args = [inputs[n] for n in _ARGS]
        op = harness.m2f_op("ms_deform_attn", backend)
        return lambda: op(*args, deterministic=deterministic)

    build.__doc__ = f"m2f_kernels.ms_deform_attn(backend='{backend}', deterministic={deterministic})"
    return build


TABLE.provider("reference", note="m2f_kernels.ms_deform_attn(backend='reference'): grid_sample per level")(
    _m2f("reference"))
TABLE.provider("triton")(_m2f("triton"))
TABLE.provider("triton-deterministic", modes=("bwd", "fwd+bwd"))(_m2f("triton", deterministic=True))
TABLE.provider("cuda")(_m2f("cuda"))


def _original_function():
    """The official MSDeformAttnFunction around the vendored extension (Deformable DETR / Mask2Former)."""
    import MultiScaleDeformableAttention as MSDA
    from torch.autograd.function import once_differentiable

    class MSDeformAttnFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, shapes, starts, locations, weights, im2col_step):
            ctx.im2col_step = im2col_step
            out = MSDA.ms_deform_attn_forward(value, shapes, starts, locations, weights, im2col_step)
            ctx.save_for_backward(value, shapes, starts, locations, weights)
            return out

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_output):
            value, shapes, starts, locations, weights = ctx.saved_tensors
            gv, gl, gw = MSDA.ms_deform_attn_backward(
                value, shapes, starts, locations, weights, grad_output.contiguous(), ctx.im2col_step)
            return gv, None, None, gl, gw, None

    return MSDeformAttnFunction


@TABLE.provider(
    "original",
    requires=harness.requires_module(
        "MultiScaleDeformableAttention",
        "the original CUDA op is not installed (build Mask2Former's ops/ or install an ms-deform-attn wheel)"),
    dtypes=("fp32",),
)
def original(inputs: Inputs):
    """The original Deformable-DETR CUDA op (module MultiScaleDeformableAttention), im2col_step 128."""
    function = _original_function()
    args = [inputs[n] for n in _ARGS]
    return lambda: function.apply(*args, IM2COL_STEP)


@TABLE.provider(
    "dcnv4",
    requires=harness.requires_module("DCNv4", "DCNv4 (flash deformable attention) is not installed"),
)
def dcnv4(inputs: Inputs):
    """DCNv4's FlashDeformAttnFunction: locations and weight logits concatenated per head
    (its layout), softmax fused in the kernel; log(weights) are passed as the logits."""
    from DCNv4.functions import FlashDeformAttnFunction

    value, shapes, starts, loc, w = (inputs[n] for n in _ARGS)
    b, lq, h, l, p, _ = loc.shape

    def run():
        loc_attn = torch.cat([loc.reshape(b, lq, h, l * p * 2), w.log().reshape(b, lq, h, l * p)], dim=-1)
        out = FlashDeformAttnFunction.apply(value, shapes, starts, loc_attn.to(value.dtype), 64, p)
        return out.view(b, lq, -1)

    return run


def test_ms_deform_attn(case, bench_run):
    bench_run(TABLE, case)

"""Multi-scale deformable attention: the pixel decoder's encoder op, providers side by side.

Inputs as in the encoder's self-attention (every pixel of every level is a query, Lq = S):
value [B, S, H, D] in the case dtype; sampling locations [B, Lq, H, L, P, 2] float32 near
each query's pixel (see bench.data.deformable_locations); attention weights
[B, Lq, H, L, P] float32, softmax-normalised over L*P. Locations and weights stay float32
in bf16 cases, as they come out of the official module under autocast.

Providers: the m2f_kernels backends (``reference``, ``triton``, ``cuda``, and the
deterministic backward of the last two), and the peers ``original`` (Deformable-DETR's op
as transformers 4.46.3 shipped it), ``dcnv4`` (DCNv4's FlashDeformAttn) and ``mmcv``, built
from their upstream archives by ``python -m bench.peers build`` (bench/peers.py) and skipped
with that command as the reason until then. The peers take locations and weights in the
value's dtype and none keeps bf16 accurate, so bf16 cases run them in fp16: locations in
fp16 alone move the output by about 1%, 2% and 4% at 512^2, 1024^2 and 2048^2 (the
reference with fp16-rounded locations, measured on the CPU), so at 2048^2 their forward
check (3e-2 in bf16) is expected to fail: the numbers are recorded all the same. In
backward modes each peer's gradients are compared with the reference's on the same
inputs (``metrics.grad_check`` of the record: relative error per input).
"""
from __future__ import annotations

import torch

from bench import harness, peers
from bench.data import deformable_locations
from bench.harness import Block, Inputs, OpSpec

SETTINGS = (
    # COCO LSJ 1024^2, batch 2: levels 1/8, 1/16, 1/32 of the input.
    {"setting": "coco1024", "B": 2, "levels": ((128, 128), (64, 64), (32, 32)), "H": 8, "D": 32, "P": 4},
    # ADE20K 512^2 semantic, batch 16.
    {"setting": "ade512", "B": 16, "levels": ((64, 64), (32, 32), (16, 16)), "H": 8, "D": 32, "P": 4},
    # 2048^2, batch 1: four times the queries of one 1024^2 image.
    {"setting": "hires2048", "B": 1, "levels": ((256, 256), (128, 128), (64, 64)), "H": 8, "D": 32, "P": 4},
)


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
TABLE.provider("cuda-deterministic", modes=("bwd", "fwd+bwd"))(_m2f("cuda", deterministic=True))


def _grad_check(name: str, inputs: Inputs, run) -> dict:
    """Relative error of the peer's gradients against the reference's on the same inputs
    (the harness checks forward outputs only). DCNv4 differentiates its weight logits: its
    weight gradient is compared with the reference's taken through the softmax."""
    wrt = inputs.grad_tensors()
    reference = TABLE.providers["reference"].build(inputs)()
    grad_out = torch.randn_like(reference)
    ref = torch.autograd.grad(reference, wrt, grad_out)
    out = run()
    got = torch.autograd.grad(out, wrt, grad_out.to(out.dtype))
    if name == "dcnv4":
        w, g = inputs["attention_weights"], ref[2].float()
        ref = ref[:2] + ((w * (g - (w * g).sum((-2, -1), keepdim=True))),)
    errors = {n: harness.rel_err(a, b) for n, a, b in zip(inputs.grad, got, ref)}
    return {"against": "reference", **errors}


def _peer(name: str):
    """A peer built by bench/peers.py, called through bench.peers.load(name).bind: the inputs
    are converted to the peer's layout and dtype once, outside the timed call."""
    spec = peers.PEERS[name]

    def build(inputs: Inputs):
        if inputs["value"].device.type != "cuda":
            raise harness.Unavailable(f"{spec.what} runs on CUDA only")
        op = peers.load(name)
        args = [inputs[n] for n in _ARGS]
        dtype, _ = op.peer_dtype(args[0].dtype)
        run = op.bind(*args)
        metrics = inputs.meta.setdefault("metrics", {})
        metrics["peer_dtype"] = str(dtype).replace("torch.", "")
        if any(t.requires_grad for t in inputs.grad_tensors()):
            metrics["grad_check"] = _grad_check(name, inputs, run)
        return run

    dtypes = ", ".join(f"{d} runs in {peer}" + (f" ({why})" if why else "")
                       for d, (peer, why) in spec.dtypes.items() if d != peer)
    build.__doc__ = (f"{spec.what} built from {spec.archive} by python -m bench.peers; "
                     f"inputs converted to its layout and dtype outside the timed call; {dtypes}")
    return build


def _peer_requires(name: str):
    def requires():
        return peers.unavailable(name)

    requires.__name__ = f"requires_peer_{name}"
    return requires


for _name in peers.PEERS:
    TABLE.provider(_name, requires=_peer_requires(_name))(_peer(_name))


def test_ms_deform_attn(case, bench_run):
    bench_run(TABLE, case)

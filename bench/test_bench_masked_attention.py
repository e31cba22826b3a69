"""Masked cross-attention: the Mask2Former decoder's attention, providers side by side.

Inputs: q [B, H, Q, D], k/v [B, H, N, D], mask bool [B, Q, N] (True = blocked, shared by
heads) with ~30% of keys visible in coherent blobs and 5% of rows fully blocked (the
empty-row rule applies). Every provider computes the same function; each applies the
empty-row rule inside its timed call unless its name says otherwise.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from bench import harness
from bench.data import blob_masks
from bench.harness import Block, Inputs, OpSpec

SHAPES = tuple(
    {"B": 2, "H": 8, "D": 32, "Q": q, "N": n, "visible": 0.3, "empty": 0.05}
    for q in (100, 200)
    for n in (1024, 4096, 16384)
)
BIG = tuple(s for s in SHAPES if s["N"] == 16384)
SMALL = tuple(s for s in SHAPES if s["N"] != 16384)
CORE = ("reference", "official", "sdpa", "triton", "cuda")
FLEX = ("flex", "flex+block_mask")


def make_inputs(shape: dict, dtype: torch.dtype, device) -> Inputs:
    b, h, d, q, n = (shape[k] for k in ("B", "H", "D", "Q", "N"))
    mask = blob_masks(b * q, n, shape["visible"], shape["empty"], device).view(b, q, n)
    tensors = {
        "q": torch.randn(b, h, q, d, device=device, dtype=dtype),
        "k": torch.randn(b, h, n, d, device=device, dtype=dtype),
        "v": torch.randn(b, h, n, d, device=device, dtype=dtype),
        "mask": mask,
    }
    return Inputs(tensors, grad=("q", "k", "v"), meta={"scale": d**-0.5})


def floor_bytes(inputs: Inputs, mode: str) -> int:
    """Read q, k, v and the mask once; write out (shaped like q); backward writes dq, dk, dv."""
    q, k, v, mask = (inputs[n] for n in ("q", "k", "v", "mask"))
    return harness.compulsory_bytes(mode, harness.nbytes(q, k, v, mask), harness.nbytes(q), harness.nbytes(q, k, v))


TABLE = OpSpec(
    name="masked_attention",
    make_inputs=make_inputs,
    blocks=[
        Block(SHAPES, ("fp32", "bf16"), ("fwd", "fwd+bwd"), providers=CORE, quick_shapes=BIG[:1]),
        # FlexAttention compiles per shape and dtype: the default run keeps it to N=16384,
        # the headline shape; --benchmark-scope=full adds the smaller N.
        Block(BIG, ("fp32", "bf16"), ("fwd", "fwd+bwd"), providers=FLEX),
        Block(SMALL, ("fp32", "bf16"), ("fwd", "fwd+bwd"), providers=FLEX, scope="full"),
    ],
    floor_bytes=floor_bytes,
    check_against=("reference", "official"),
    id_keys=("Q", "N"),
)


def _visible(mask: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, Q, N], True = may attend, after the empty-row rule (SDPA's convention)."""
    blocked = mask.unsqueeze(1)
    return ~blocked | blocked.all(dim=-1, keepdim=True)


def _m2f(backend: str):
    def build(inputs: Inputs):
        q, k, v, mask = (inputs[n] for n in ("q", "k", "v", "mask"))
        op = harness.m2f_op("masked_attention", backend)
        scale = inputs.meta["scale"]
        return lambda: op(q, k, v, mask, scale=scale)

    build.__doc__ = f"m2f_kernels.masked_attention(backend='{backend}')"
    return build


for _backend in ("reference", "triton", "cuda"):
    TABLE.provider(_backend)(_m2f(_backend))


@TABLE.provider("official")
def official(inputs: Inputs):
    """The official path: the predictor's per-head repeated bool mask [B*H, Q, N] with its
    empty-row fix, then nn.MultiheadAttention's need_weights=True internals (bool mask ->
    additive float mask, baddbmm, softmax, bmm, head-averaged weights), projections excluded."""
    q, k, v, mask = (inputs[n] for n in ("q", "k", "v", "mask"))
    b, h, nq, d = q.shape
    n = k.shape[2]
    scale = inputs.meta["scale"]

    def run():
        attn_mask = mask.unsqueeze(1).repeat(1, h, 1, 1).flatten(0, 1)
        attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
        additive = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(attn_mask, float("-inf"))
        weights = torch.baddbmm(additive, q.reshape(b * h, nq, d) * scale, k.reshape(b * h, n, d).transpose(1, 2))
        weights = torch.softmax(weights, dim=-1)
        out = torch.bmm(weights, v.reshape(b * h, n, d))
        weights.view(b, h, nq, n).mean(dim=1)  # need_weights=True returns the head average
        return out.view(b, h, nq, d)

    return run


@TABLE.provider("sdpa")
def sdpa(inputs: Inputs):
    """F.scaled_dot_product_attention with the bool mask broadcast over heads [B, 1, Q, N]."""
    q, k, v, mask = (inputs[n] for n in ("q", "k", "v", "mask"))
    scale = inputs.meta["scale"]
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=_visible(mask), scale=scale)


def _flex_requires():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError as exc:
        return f"FlexAttention is not in this torch ({torch.__version__}): {exc}"
    return None


_COMPILED = {}


def _flex_functions():
    """(compiled flex_attention, create_block_mask taking a bool-tensor mask) - built once."""
    if not _COMPILED:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # One compiled graph per (shape, dtype, grad mode): lift dynamo's recompile cap
        # so later cases are not silently run by the eager fallback.
        config = torch._dynamo.config
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), 256))
        compile_kw = {"_compile": True} if "_compile" in inspect.signature(create_block_mask).parameters else {}

        def block_mask(visible: torch.Tensor):
            b, _, nq, n = visible.shape
            table = visible[:, 0]

            def mask_mod(bi, hi, qi, ki):
                return table[bi, qi, ki]

            return create_block_mask(mask_mod, b, None, nq, n, device=visible.device, **compile_kw)

        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
        _COMPILED["block_mask"] = block_mask
    return _COMPILED["flex"], _COMPILED["block_mask"]


@TABLE.provider("flex", requires=_flex_requires)
def flex(inputs: Inputs):
    """torch.compile(flex_attention) with a mask_mod reading the mask tensor; the BlockMask
    (and the empty-row rule) is built outside the timed call."""
    q, k, v, mask = (inputs[n] for n in ("q", "k", "v", "mask"))
    attention, block_mask = _flex_functions()
    prebuilt = block_mask(_visible(mask))
    scale = inputs.meta["scale"]
    return lambda: attention(q, k, v, block_mask=prebuilt, scale=scale)


@TABLE.provider("flex+block_mask", requires=_flex_requires)
def flex_with_mask(inputs: Inputs):
    """FlexAttention timed with the empty-row rule and create_block_mask inside the call."""
    q, k, v, mask = (inputs[n] for n in ("q", "k", "v", "mask"))
    attention, block_mask = _flex_functions()
    scale = inputs.meta["scale"]
    return lambda: attention(q, k, v, block_mask=block_mask(_visible(mask)), scale=scale)


def test_masked_attention(case, bench_run):
    bench_run(TABLE, case)

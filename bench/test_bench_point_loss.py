"""The criterion's mask part for one training step: reference backend vs fused kernels.

One step of the official SetCriterion with point-sampled losses, mask terms only, over
all 10 predictions (query init + 9 decoder layers): for each prediction
- part 'matcher': the Hungarian matcher's pairwise BCE and dice costs of every query
  against every target of each image on P shared random points (the assignment itself
  runs on the CPU in scipy and is excluded: the matched indices are fixed inputs);
- part 'loss': importance sampling of the matched masks (3P uniform candidates, the 75%
  most uncertain kept, 25% uniform) and BCE + dice on those points;
- part 'criterion': both, in the official order.
pred [B, Q, 256, 256] per prediction in the case dtype; targets bool [B*T, 1024, 1024]
(T per image, random boxes). Random points come from a generator seeded per input set,
so every provider samples the same points.
"""
from __future__ import annotations

import random

import torch

from bench import harness
from bench.data import box_masks
from bench.harness import Block, Inputs, OpSpec

BASE = {"B": 2, "Q": 100, "pred": 256, "T": 30, "target": 1024, "P": 12544, "layers": 10}
OVERSAMPLE, IMPORTANCE = 3.0, 0.75


def _shape(part: str) -> dict:
    return {"part": part, **BASE}


def make_inputs(shape: dict, dtype: torch.dtype, device) -> Inputs:
    b, q, hp, t, ht = (shape[k] for k in ("B", "Q", "pred", "T", "target"))
    preds = {f"pred{i}": 3.0 * torch.randn(b, q, hp, hp, device=device, dtype=dtype) for i in range(shape["layers"])}
    tensors = {
        **preds,
        "targets": box_masks(b * t, ht, ht, device),
        "batch_index": torch.arange(b, device=device).repeat_interleave(t),
        "query_index": torch.stack([torch.randperm(q, device=device)[:t] for _ in range(b)]).flatten(),
    }
    meta = {"seed": random.getrandbits(62), **shape}
    return Inputs(tensors, grad=tuple(preds), meta=meta)


def _sampled(masks: int, pixels: int, points: int, elem: int) -> int:
    """Bytes to read ``points`` bilinear samples (4 corners) of each mask, at most the whole mask."""
    return masks * min(pixels, 4 * points) * elem


def floor_bytes(inputs: Inputs, mode: str) -> int:
    """A gather-bound op: the floor counts each sampled corner read once (bool targets: 1 byte),
    the [Q, T] cost matrices written, and the dense pred gradient written in backward."""
    m = inputs.meta
    pred = inputs["pred0"]
    e = pred.element_size()
    n, pix_t = inputs["targets"].shape[0], m["target"] ** 2
    b, q, pix_p, p, layers = m["B"], m["Q"], m["pred"] ** 2, m["P"], m["layers"]
    matcher = _sampled(b * q, pix_p, p, e) + _sampled(n, pix_t, p, 1) + 2 * q * n * 4
    loss_fwd = _sampled(n, pix_p, OVERSAMPLE * p, e) + _sampled(n, pix_p, p, e) + _sampled(n, pix_t, p, 1)
    loss_bwd = _sampled(n, pix_p, p, e) + _sampled(n, pix_t, p, 1) + b * q * pix_p * e
    loss = loss_fwd + (loss_bwd if mode != "fwd" else 0)
    per_layer = {"matcher": matcher, "loss": loss, "criterion": matcher + loss}[m["part"]]
    return int(layers * per_layer)


TABLE = OpSpec(
    name="point_loss",
    make_inputs=make_inputs,
    blocks=[
        Block((_shape("matcher"),), ("fp32", "bf16"), ("fwd",)),
        Block((_shape("loss"),), ("fp32", "bf16"), ("fwd", "fwd+bwd")),
        Block((_shape("criterion"),), ("fp32", "bf16"), ("fwd+bwd",)),
    ],
    floor_bytes=floor_bytes,
    check_against=("reference",),
    input_sets=2,
    id_keys=("part",),
)


def _m2f(backend: str):
    def build(inputs: Inputs):
        m = inputs.meta
        preds = [inputs[f"pred{i}"] for i in range(m["layers"])]
        targets, bi, qi = inputs["targets"], inputs["batch_index"], inputs["query_index"]
        t, p = m["T"], m["P"]
        cost = harness.m2f_op("pairwise_mask_cost", backend)
        sample = harness.m2f_op("uncertain_point_coords", backend)
        point_loss = harness.m2f_op("point_mask_loss", backend)
        generator = torch.Generator(device=targets.device)
        num_masks = float(targets.shape[0])

        def matcher(pred):
            costs = []
            for b in range(m["B"]):
                coords = torch.rand(p, 2, device=pred.device, generator=generator)
                costs += cost(pred[b], targets[b * t:(b + 1) * t], coords)
            return costs

        def loss(pred):
            with torch.no_grad():
                coords = sample(pred.detach(), p, OVERSAMPLE, IMPORTANCE, generator=generator, pred_index=(bi, qi))
            bce, dice = point_loss(pred, targets, coords, num_masks, pred_index=(bi, qi))
            return bce + dice

        def run():
            generator.manual_seed(m["seed"])
            out = []
            for pred in preds:
                if m["part"] in ("matcher", "criterion"):
                    with torch.no_grad():
                        out += matcher(pred.detach())
                if m["part"] in ("loss", "criterion"):
                    out.append(loss(pred))
            if m["part"] == "matcher":
                return out
            return torch.stack([o for o in out if o.dim() == 0]).sum()

        return run

    build.__doc__ = f"m2f_kernels pairwise_mask_cost / uncertain_point_coords / point_mask_loss (backend='{backend}')"
    return build


for _backend in ("reference", "triton", "cuda"):
    TABLE.provider(_backend)(_m2f(_backend))


def test_point_loss(case, bench_run):
    bench_run(TABLE, case)

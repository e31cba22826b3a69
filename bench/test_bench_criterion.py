"""One training step's criterion from the decoder's outputs: mask logits built vs mask-free.

The whole ``SetCriterion`` (matcher, class loss, point-sampled mask losses) over all 10
predictions (query init + 9 decoder layers) of Mask2Former at 1024² batch 2, forward and
backward, starting from what the decoder hands it: class logits [L, B, Q, K+1], mask
embeddings [L, B, Q, C] and the mask features [B, C, 256, 256] (C = 256, Q = 100,
K = 133), with 30 box targets per image at 1024² (bool, padded to 30 slots). Gradients
flow to the class logits, the embeddings and the features. bf16: those inputs in bf16 and
the criterion under autocast, as in the model's step.

- ``logits-reference``: the official path. Each prediction's mask logits
  [B, Q, 256, 256] = einsum(embedding, features), as the official decoder builds them;
  then the official criterion (scipy matcher, per-image losses).
- ``logits-fused``: the same mask logits, then the fused static criterion (device
  solver, point ops reading the logits in place): what ``mask_head='logits'`` trains with.
- ``mask-free``: no mask logits: the fused criterion reads logits at points from the
  embeddings and the features (``point_mask_logits``): ``mask_head='points'``, the default.

The mask-free path draws its random points in another order than the logits path, so
their losses differ by the sampling noise: the harness's fwd check against
``logits-fused`` allows 5% (a gross-error check; tests/test_mask_free.py shows the two
equal to 1e-5 on the same points). The official path is not checked (fwd+bwd only). The
table's comparison is ``mask-free`` against ``logits-fused``: peak memory (the [B, Q, 256, 256]
logits of every prediction and their dense gradients are what it removes) and time.
"""
from __future__ import annotations

import contextlib
import random

import torch

from bench.data import box_masks
from bench.harness import Block, Inputs, OpSpec, Unavailable

STANDARD = {"B": 2, "Q": 100, "C": 256, "mask": 256, "T": 30, "target": 1024, "P": 12544, "layers": 10, "K": 133}
PROVIDERS = ("logits-reference", "logits-fused", "mask-free")


def make_inputs(shape: dict, dtype: torch.dtype, device) -> Inputs:
    from m2f.targets import PaddedTargets

    b, q, c, hm, t, ht, layers, k = (shape[n] for n in ("B", "Q", "C", "mask", "T", "target", "layers", "K"))
    tensors = {
        "pred_logits": torch.randn(layers, b, q, k + 1, device=device, dtype=dtype),
        # embeddings and features scaled so the logits spread over a few units, as trained ones do
        "mask_embed": torch.randn(layers, b, q, c, device=device, dtype=dtype) / c ** 0.5,
        "mask_features": 3.0 * torch.randn(b, c, hm, hm, device=device, dtype=dtype),
    }
    targets = PaddedTargets(labels=torch.randint(0, k, (b, t), device=device),
                            masks=box_masks(b * t, ht, ht, device).view(b, t, ht, ht),
                            num_targets=torch.full((b,), t, dtype=torch.int64, device=device))
    meta = {"seed": random.getrandbits(62), "targets": targets, **shape}
    return Inputs(tensors, grad=tuple(tensors), meta=meta)


TABLE = OpSpec(
    name="criterion",
    make_inputs=make_inputs,
    blocks=[Block((STANDARD,), ("bf16", "fp32"), ("fwd+bwd", "fwd"))],
    check_against=("logits-fused",),
    check_tolerance={"fp32": 5e-2, "bf16": 5e-2},  # other random points: a gross-error check only
    input_sets=2,
    id_keys=(),
)


def _provider(kernels: str, mask_free: bool):
    def build(inputs: Inputs):
        try:
            from m2f import build_criterion
            from m2f.loss_dict import total_loss
        except ImportError as exc:
            raise Unavailable(f"the model is not available: {exc}") from None
        m = inputs.meta
        criterion = build_criterion(m["K"], kernels=kernels, num_points=m["P"], dec_layers=m["layers"] - 1)
        criterion = criterion.to(inputs["pred_logits"].device)
        logits, embed, features = inputs["pred_logits"], inputs["mask_embed"], inputs["mask_features"]
        generator = torch.Generator(device=features.device)

        def prediction(i: int) -> dict:
            if mask_free:
                return {"pred_logits": logits[i], "mask_embed": embed[i]}
            return {"pred_logits": logits[i], "pred_masks": torch.einsum("bqc,bchw->bqhw", embed[i], features)}

        autocast = (torch.autocast(features.device.type, dtype=features.dtype) if features.dtype != torch.float32
                    else contextlib.nullcontext())  # 16-bit: as in the model's step

        def run():
            generator.manual_seed(m["seed"])
            with autocast:
                outputs = {**prediction(m["layers"] - 1),
                           "aux_outputs": [prediction(i) for i in range(m["layers"] - 1)]}
                if mask_free:
                    outputs["mask_features"] = features
                return total_loss(criterion(outputs, m["targets"], generator).weighted(criterion.weight_dict))

        return run

    build.__doc__ = (f"SetCriterion kernels={kernels!r}, "
                     + ("mask-free (point_mask_logits)" if mask_free else "mask logits built by einsum"))
    return build


TABLE.provider("logits-reference", modes=("fwd+bwd",))(_provider("reference", mask_free=False))
TABLE.provider("logits-fused")(_provider("fused", mask_free=False))
TABLE.provider("mask-free")(_provider("fused", mask_free=True))


def test_criterion(case, bench_run):
    bench_run(TABLE, case)

"""Mask2Former training step and inference: the paper's 3x memory claim and beyond.

Training step = zero_grad, forward, criterion, backward, AdamW step (lr 1e-4, weight
decay 0.05 as in the official configs), on random images with T box-shaped instance
masks per image at the input resolution, for
  (a) 'a-full-reference':  whole-mask matching and losses, reference kernels,
  (b) 'b-point-reference': point-sampled, reference kernels (the official code path),
  (c) 'c-point-fused':     point-sampled, fused kernels.
dtype 'bf16' means torch.autocast(bfloat16) around forward + loss (parameters and
optimizer state stay float32); 'fp32' is plain float32. Peak memory: the step's
max_memory_allocated above what was allocated before the case (so it includes the
model, gradients, optimizer state, inputs and activations), reported per image.
Inference: model.eval() under torch.inference_mode on one image, 'reference' vs 'fused'.
The model comes from m2f.build_model; without it every case skips.
"""
from __future__ import annotations

import contextlib

import torch

from bench.data import box_masks
from bench.harness import Block, Inputs, OpSpec, Unavailable

NUM_CLASSES = 133  # COCO panoptic
R50 = {"backbone": "resnet50", "queries": 100, "image": 1024, "T": 30}
SWIN_L = {"backbone": "swin_large", "queries": 200, "image": 1024, "T": 30}
TRAIN = ("a-full-reference", "b-point-reference", "c-point-fused")
INFER = ("reference", "fused")


def make_inputs(shape: dict, dtype: torch.dtype, device) -> Inputs:
    b, size, t = shape["batch"], shape["image"], shape["T"]
    images = 255.0 * torch.rand(b, 3, size, size, device=device)  # RGB 0..255, as the model expects
    targets = [
        {"labels": torch.randint(0, NUM_CLASSES, (t,), device=device), "masks": box_masks(t, size, size, device)}
        for _ in range(b)
    ]
    tensors = {"images": images}
    for i, target in enumerate(targets):
        tensors[f"labels{i}"], tensors[f"masks{i}"] = target["labels"], target["masks"]
    return Inputs(tensors, meta={"targets": targets, "dtype": dtype, **shape})


def _requires_m2f():
    try:
        from m2f import build_model  # noqa: F401
    except ImportError as exc:
        return f"the model is not available: from m2f import build_model failed ({exc})"
    return None


def _autocast(dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def _build_model(meta: dict, kernels: str, mask_loss: str, device):
    from m2f import build_model

    overrides = dict(meta.get("overrides", ()))  # small configurations for the CPU tests
    try:
        model = build_model(backbone=meta["backbone"], num_classes=NUM_CLASSES, num_queries=meta["queries"],
                            kernels=kernels, mask_loss=mask_loss, **overrides)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise Unavailable(f"build_model(backbone={meta['backbone']!r}, ...) failed: {exc}") from None
    return model.to(device)


def _train(kernels: str, mask_loss: str):
    def build(inputs: Inputs):
        meta = inputs.meta
        images = inputs["images"]
        model = _build_model(meta, kernels, mask_loss, images.device)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        meta["metrics"] = {"parameters": sum(p.numel() for p in model.parameters())}

        def step():
            optimizer.zero_grad(set_to_none=True)
            with _autocast(meta["dtype"]):
                losses = model(images, meta["targets"])
                loss = sum(losses.values())
            loss.backward()
            optimizer.step()
            return loss.detach()

        return step

    build.__doc__ = f"training step, kernels={kernels!r}, mask_loss={mask_loss!r}"
    return build


def _infer(kernels: str):
    def build(inputs: Inputs):
        meta = inputs.meta
        images = inputs["images"]
        model = _build_model(meta, kernels, "point", images.device)
        model.eval()

        def run():
            with torch.inference_mode(), _autocast(meta["dtype"]):
                return model(images)

        return run

    build.__doc__ = f"inference, kernels={kernels!r}"
    return build


TABLE = OpSpec(
    name="model",
    make_inputs=make_inputs,
    blocks=[
        Block(({**R50, "batch": 2},), ("bf16", "fp32"), ("train",), providers=TRAIN),
        Block(({**R50, "batch": 1},), ("bf16", "fp32"), ("infer",), providers=INFER),
        Block(({**SWIN_L, "batch": 2},), ("bf16",), ("train",), providers=TRAIN, quick_shapes=()),
        Block(({**SWIN_L, "batch": 1},), ("bf16",), ("infer",), providers=INFER, scope="full"),
        Block(({**SWIN_L, "batch": 2},), ("fp32",), ("train",), providers=TRAIN, scope="full"),
    ],
    input_sets=1,
    flush_l2=False,  # a step is far larger than L2
    id_keys=("backbone", "batch"),
    # the first (untimed) step has warmed up everything; 3 timed steps after the estimate
    settings={"min_rounds": 3, "max_rounds": 5, "warmup_rounds": 0, "budget_ms": 1.0},
)

for _name, _kernels, _loss in zip(TRAIN, ("reference", "reference", "fused"), ("full", "point", "point")):
    TABLE.provider(_name, requires=_requires_m2f, modes=("train",))(_train(_kernels, _loss))
for _kernels in INFER:
    TABLE.provider(_kernels, requires=_requires_m2f, modes=("infer",))(_infer(_kernels))


def test_model(case, bench_run):
    bench_run(TABLE, case)

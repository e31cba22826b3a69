"""Mask2Former training step and inference: the paper's 3x memory claim and beyond.

Training step = zero_grad, forward, criterion, backward, AdamW step (lr 1e-4, weight
decay 0.05 as in the official configs), on random images with T box-shaped instance
masks per image at the input resolution, for
  (a) 'a-full-reference':  whole-mask matching and losses, reference kernels,
  (b) 'b-point-reference': point-sampled, reference kernels (the official code path),
  (c) 'c-point-fused':     point-sampled, fused kernels, mask logits built (mask_head='logits'),
  (d) 'd-point-mask-free': point-sampled, fused kernels, mask-free (mask_head='points'), eager,
  (e) 'e-mask-free-compiled':   (d) under torch.compile (model and loss),
  (f) 'f-mask-free-cuda-graph': (d) captured once in a CUDA graph and replayed
      (m2f.graph_step.GraphStep; targets padded to T slots): its eager warm-up steps and
      the capture run untimed, every timed step is a replay (with GraphStep's copy of the
      inputs into its static buffers), and its peak memory is the capture's (a replay
      allocates nothing: the activations live in the graph's private pool).
Every provider steps the project's AdamW (m2f.solver.build_optimizer: a few parameter
groups, fused on CUDA; capturable, with tensor lrs, for (f)), so the rows differ in the
model and criterion path only. (e) and (f) get their targets padded once outside the
timed step; (a)-(d) pad them inside it, as the eager training loop does.
dtype 'bf16' means torch.autocast(bfloat16) around forward + loss (parameters and
optimizer state stay float32); 'fp32' is plain float32 under torch's default precision
flags (cuDNN convolutions may use TF32; env.tf32_* records them). With kernels='reference'
(a, b and the reference inference) the pixel decoder runs in float32 under autocast, as
the official code does; the fused paths let it follow autocast. Peak memory: the step's
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
from m2f.loss_dict import total_loss

NUM_CLASSES = 133  # COCO panoptic
R50 = {"backbone": "resnet50", "queries": 100, "image": 1024, "T": 30}
SWIN_L = {"backbone": "swin_large", "queries": 200, "image": 1024, "T": 30}
TRAIN = ("a-full-reference", "b-point-reference", "c-point-fused", "d-point-mask-free", "e-mask-free-compiled",
         "f-mask-free-cuda-graph")
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


def _build_model(meta: dict, kernels: str, mask_loss: str, device, mask_head: str = "points"):
    from m2f import build_model

    overrides = dict(meta.get("overrides", ()))  # small configurations for the CPU tests
    overrides.setdefault("mask_head", mask_head)
    try:
        model = build_model(backbone=meta["backbone"], num_classes=NUM_CLASSES, num_queries=meta["queries"],
                            kernels=kernels, mask_loss=mask_loss, **overrides)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise Unavailable(f"build_model(backbone={meta['backbone']!r}, ...) failed: {exc}") from None
    return model.to(device)


def _require_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        raise Unavailable(f"{what} needs a CUDA device")


def _train(kernels: str, mask_loss: str, mask_head: str = "points", run: str = "eager"):
    def build(inputs: Inputs):
        from m2f.solver import build_optimizer

        meta = inputs.meta
        images = inputs["images"]
        if run == "cuda-graph":
            _require_cuda(images.device, "a CUDA graph")
        model = _build_model(meta, kernels, mask_loss, images.device, mask_head)
        model.train()
        optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05, capturable=run == "cuda-graph")
        meta["metrics"] = {"parameters": sum(p.numel() for p in model.parameters())}
        forward = torch.compile(model) if run == "compiled" else model
        targets = meta["targets"]
        if run != "eager":  # the same shapes every step
            targets = model.pad_targets(targets, model.preprocess(images[:1]).shape[-2:], meta["T"])

        def step_fn(images, *target_tensors):
            optimizer.zero_grad(set_to_none=False)
            with _autocast(meta["dtype"]):
                losses = forward(images, type(targets)(*target_tensors) if target_tensors else targets)
                loss = total_loss(losses)
            loss.backward()
            optimizer.step()
            return {"loss": loss.detach()}

        if run != "cuda-graph":
            return lambda: step_fn(images)["loss"]
        from m2f.graph_step import GraphStep

        graph = GraphStep(step_fn, images.device)
        static = (images, *targets)
        # All but the last of its eager warm-up steps run here, so the harness's first
        # (untimed) call is the last warm-up, its estimate call (where peak memory is
        # measured) the capture (a replay allocates nothing: its peak would leave out the
        # graph's pool) and every timed call a replay.
        for _ in range(graph.warmup - 1):
            graph(static)
        return lambda: graph(static)["loss"]

    build.__doc__ = f"training step, kernels={kernels!r}, mask_loss={mask_loss!r}, mask_head={mask_head!r}, {run}"
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

_TRAIN_PATHS = {  # provider -> (kernels, mask_loss, mask_head, run)
    "a-full-reference": ("reference", "full", "logits", "eager"),
    "b-point-reference": ("reference", "point", "logits", "eager"),
    "c-point-fused": ("fused", "point", "logits", "eager"),
    "d-point-mask-free": ("fused", "point", "points", "eager"),
    "e-mask-free-compiled": ("fused", "point", "points", "compiled"),
    "f-mask-free-cuda-graph": ("fused", "point", "points", "cuda-graph"),
}
for _name in TRAIN:
    TABLE.provider(_name, requires=_requires_m2f, modes=("train",))(_train(*_TRAIN_PATHS[_name]))
for _kernels in INFER:
    TABLE.provider(_kernels, requires=_requires_m2f, modes=("infer",))(_infer(_kernels))


def test_model(case, bench_run):
    bench_run(TABLE, case)

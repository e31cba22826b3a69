"""Mask2Former or SegFormer: parameters, GFLOPs, speed, training memory and mIoU side by side.

    python -m bench.segformer_vs_mask2former                   # parameters and GFLOPs (any machine);
                                                               # GPU columns "pending (no GPU)" without CUDA
    python -m bench.segformer_vs_mask2former --train-steps 1500    # on a GPU: everything, mIoU included
    python -m bench.segformer_vs_mask2former --only mit_b0 --sizes 512 --gflops-only   # a subset

Models (semantic segmentation, ADE20K heads: 150 classes): Mask2Former R50, Swin-T and Swin-L
(100 queries, as the official ADE20K semantic configs; ``kernels='reference'`` and
``'fused'``) and SegFormer B0, B2, B5; at 512² and 1024² inputs.

* parameters: every trainable tensor of the model, in millions.
* GFLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one image's inference forward
  (``model.eval()``, up to the network outputs at stride 4: Mask2Former's class and mask
  logits, SegFormer's logits; no post-processing), 2 FLOPs per multiply-add (the papers'
  "GFLOPs" count multiply-adds: halve these to compare), attention through the math path
  so its matmuls count. Counted on the CPU with the counted ops (convolutions, matmuls)
  replaced by zero tensors of their output shape (:class:`ShapeOnlyHeavyOps`): the count is
  exact (no matmul shape depends on data at inference) and takes seconds. The fused
  Mask2Former does the same arithmetic; its m2f_kernels ops are opaque to the counter, so its
  row repeats the reference count.
* GPU columns (CUDA only): inference images/s (batch 1, bf16 autocast, no_grad, CUDA-event
  mean over ``--iters`` after warm-up), training step ms (batch 2, bf16 autocast, forward +
  loss + backward + AdamW, 20 random box targets per image) and peak memory per image of that
  step (``max_memory_allocated`` above the memory before the model was built: weights,
  gradients, optimizer state, activations), in GB.
* mIoU (``--train-steps N``, any device, meant for a GPU): ``python -m m2f.train`` for N
  steps on ``shapes`` at 128², batch 16, lr 5e-4 (the ``small`` preset's schedule), each model
  at its official size from scratch, kernels fused; the final evaluation's mIoU on the 100
  validation images.

Results go to ``bench/results/segformer-vs-mask2former-<device>-<date>.json`` (``--out``)
and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from m2f.cli_args import at_least

REPO_ROOT = Path(__file__).resolve().parent.parent
NUM_CLASSES = 150  # ADE20K
MODELS = [  # (name, architecture, backbone, kernels)
    ("Mask2Former R50", "mask2former", "resnet50", "reference"),
    ("Mask2Former R50", "mask2former", "resnet50", "fused"),
    ("Mask2Former Swin-T", "mask2former", "swin_tiny", "reference"),
    ("Mask2Former Swin-T", "mask2former", "swin_tiny", "fused"),
    ("Mask2Former Swin-L", "mask2former", "swin_large", "reference"),
    ("Mask2Former Swin-L", "mask2former", "swin_large", "fused"),
    ("SegFormer B0", "segformer", "mit_b0", None),
    ("SegFormer B2", "segformer", "mit_b2", None),
    ("SegFormer B5", "segformer", "mit_b5", None),
]
SIZES = (512, 1024)
PENDING = "pending (no GPU)"
TRAIN_TARGETS = 20


def build(arch: str, backbone: str, kernels: Optional[str]) -> torch.nn.Module:
    if arch == "segformer":
        from m2f import build_segformer

        return build_segformer(backbone, NUM_CLASSES)
    from m2f import build_model

    return build_model(backbone, num_classes=NUM_CLASSES, num_queries=100, kernels=kernels)


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class ShapeOnlyHeavyOps(TorchDispatchMode):
    """Every op FlopCounterMode counts (convolutions, matmuls, attention) returns zeros of its
    output shape, taken from the op's meta kernel, instead of computing; everything else
    runs. Enter it outside the FlopCounterMode, which then sees and counts each op first."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket not in flop_registry:
            return func(*args, **kwargs)
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        to_meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t  # noqa: E731
        out = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
        return tree_map(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).zero_()
                        if isinstance(t, torch.Tensor) else t, out)


def count_gflops(model: torch.nn.Module, size: int) -> float:
    """Inference GFLOPs of one ``size``² image (see the module docstring)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    images = torch.rand(1, 3, size, size) * 255
    model.eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), ShapeOnlyHeavyOps():
        with FlopCounterMode(display=False) as counter:
            model(images)
    return counter.get_total_flops() / 1e9


# ----------------------------------------------------------------------------- GPU


def _targets(batch: int, size: int, device) -> List[Dict]:
    from bench.data import box_masks

    return [{"labels": torch.randint(0, NUM_CLASSES, (TRAIN_TARGETS,), device=device),
             "masks": box_masks(TRAIN_TARGETS, size, size, device)} for _ in range(batch)]


def _cuda_ms(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def gpu_measure(arch: str, backbone: str, kernels: Optional[str], size: int, iters: int) -> Dict:
    """{infer_img_s, train_step_ms, peak_gb_per_image} on the current CUDA device; an
    out-of-memory case gives 'oom' for what it could not measure."""
    device = torch.device("cuda")
    out: Dict = {}
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    model = build(arch, backbone, kernels).to(device)
    try:
        model.eval()
        image = torch.rand(1, 3, size, size, device=device) * 255

        def infer():
            with torch.no_grad(), autocast():
                model(image)

        out["infer_img_s"] = 1000.0 / _cuda_ms(infer, iters, warmup=3)
    except torch.cuda.OutOfMemoryError:
        out["infer_img_s"] = "oom"
    try:
        model.train()
        batch = 2
        images = torch.rand(batch, 3, size, size, device=device) * 255
        targets = _targets(batch, size, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = sum(model(images, targets).values())
            loss.backward()
            optimizer.step()

        step()  # the optimizer state exists from here on
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        out["train_step_ms"] = _cuda_ms(step, max(3, iters // 2), warmup=1)
        out["peak_gb_per_image"] = (torch.cuda.max_memory_allocated(device) - base) / batch / 2 ** 30
    except torch.cuda.OutOfMemoryError:
        out.setdefault("train_step_ms", "oom")
        out["peak_gb_per_image"] = "oom"
    del model
    torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- mIoU on shapes

M2F_OFFICIAL_SIZES = ["hidden_dim=256", "nheads=8", "dim_feedforward=2048", "dec_layers=9", "enc_layers=6",
                      "enc_dim_feedforward=1024", "num_points=12544"]


def train_miou(arch: str, backbone: str, steps: int, device: str, out_dir: str, image_size: int = 128,
               batch_size: int = 16) -> float:
    """mIoU of a ``steps``-step ``m2f.train`` run on shapes (see the module docstring)."""
    from m2f.train import main as train_main

    args = ["--preset", "small", "--steps", str(steps), "--image-size", str(image_size), "--batch-size",
            str(batch_size), "--lr", "5e-4", "--device", device, "--backbone", backbone, "--out", out_dir]
    if arch == "segformer":
        args += ["--model", "segformer"]
    else:
        args += ["--kernels", "fused", "--num-queries", "100"] + [a for m in M2F_OFFICIAL_SIZES for a in ("--model", m)]
    return float(train_main(args)["mIoU"])


# ----------------------------------------------------------------------------- report


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return PENDING
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}"


def markdown(rows: List[Dict], sizes) -> str:
    """One line per model (and kernels), the sizes side by side."""
    head = ["model", "kernels", "params (M)"]
    for key, label in (("gflops", "GFLOPs"), ("infer_img_s", "infer img/s"), ("train_step_ms", "train step ms"),
                       ("peak_gb_per_image", "train GB/img")):
        head += [f"{label} {s}²" for s in sizes]
    head.append("mIoU shapes")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    by_model: Dict[tuple, Dict[int, Dict]] = {}
    for r in rows:
        by_model.setdefault((r["model"], r["kernels"]), {})[r["size"]] = r
    for (name, kernels), per_size in by_model.items():
        first = next(iter(per_size.values()))
        cells = [name, kernels or "-", _fmt(first["params_M"])]
        for key, digits in (("gflops", 1), ("infer_img_s", 1), ("train_step_ms", 1), ("peak_gb_per_image", 2)):
            cells += [_fmt(per_size[s].get(key), digits) if s in per_size else "-" for s in sizes]
        cells.append(_fmt(first.get("miou_shapes"), 1))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(prog="python -m bench.segformer_vs_mask2former", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=at_least(32), nargs="+", default=list(SIZES), help="square image sizes")
    p.add_argument("--only", nargs="+", metavar="BACKBONE", choices=sorted({m[2] for m in MODELS}),
                   help="these backbones only (e.g. resnet50 mit_b0)")
    p.add_argument("--gflops-only", action="store_true", help="parameters and GFLOPs; no GPU measurement")
    p.add_argument("--iters", type=at_least(1), default=10, help="timed inference iterations (training: half)")
    p.add_argument("--train-steps", type=at_least(0), default=0, help="mIoU after this many steps on shapes (0: pending)")
    p.add_argument("--train-device", help="device of the mIoU runs (default: cuda when available)")
    p.add_argument("--out", help="JSON path (default: bench/results/segformer-vs-mask2former-<device>-<date>.json)")
    args = p.parse_args(argv)

    from bench.results import environment, slug

    on_gpu = torch.cuda.is_available() and not args.gflops_only
    env = environment(torch.device("cuda" if on_gpu else "cpu"))
    models = [m for m in MODELS if not args.only or m[2] in args.only]
    rows: List[Dict] = []
    miou: Dict[str, Optional[float]] = {}
    torch.manual_seed(0)
    for name, arch, backbone, kernels in models:
        counted = {}
        if kernels != "fused":  # the fused model repeats its reference model's count
            model = build(arch, backbone, kernels)
            n_params = parameters(model)
            for size in args.sizes:
                t0 = time.perf_counter()
                counted[size] = count_gflops(model, size)
                print(f"{name} {size}²: {n_params / 1e6:.1f} M parameters, {counted[size]:.1f} GFLOPs "
                      f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
            del model
            reference_counts = counted
        else:
            counted = reference_counts
        if args.train_steps and backbone not in miou:  # one run per backbone (Mask2Former: fused)
            with tempfile.TemporaryDirectory() as tmp:
                device = args.train_device or ("cuda" if torch.cuda.is_available() else "cpu")
                miou[backbone] = train_miou(arch, backbone, args.train_steps, device, tmp)
        for size in args.sizes:
            row = {"model": name, "arch": arch, "backbone": backbone, "kernels": kernels, "size": size,
                   "params_M": n_params / 1e6, "gflops": counted[size], "infer_img_s": None, "train_step_ms": None,
                   "peak_gb_per_image": None, "miou_shapes": miou.get(backbone)}
            if on_gpu:
                row.update(gpu_measure(arch, backbone, kernels, size, args.iters))
            rows.append(row)
    result = {
        "benchmark": "segformer_vs_mask2former",
        "env": env,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"num_classes": NUM_CLASSES, "m2f_queries": 100, "gflops": "FlopCounterMode, 2 per multiply-add, "
                     "batch 1 inference forward, shape-only counted ops on the CPU",
                     "train_steps": args.train_steps, "gpu": on_gpu},
        "rows": rows,
    }
    out = args.out or str(REPO_ROOT / "bench" / "results" / (
        f"segformer-vs-mask2former-{slug('cpu' if not on_gpu else env['device'])}-{_dt.date.today():%Y-%m-%d}.json"))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(markdown(rows, args.sizes))
    print(f"\nwritten: {os.path.relpath(out)}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

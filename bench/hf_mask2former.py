"""HF transformers' Mask2Former (or EoMT) with and without m2f_kernels: equality, step time, peak memory.

    python -m bench.hf_mask2former                                  # Swin-S, 2 x 512^2, CUDA
    python -m bench.hf_mask2former --model eomt                     # EoMT-L, 2 x 640^2, CUDA
    python -m bench.hf_mask2former --size tiny --device cpu --steps 1 --dtype fp32   # smoke run

A random-init ``Mask2FormerForUniversalSegmentation`` (no hub download) is built from a
local config: ``--size real`` is facebook/mask2former-swin-small-coco-instance (Swin-S
backbone, hidden 256, 100 queries, 6 encoder and 10 decoder layers, 12544 training points,
80 classes), ``--size tiny`` the tiny model of the integration tests (bench/hf_testing.py).
The batch is ``--batch`` images of random pixels with ``--masks`` random box instance
masks each. ``--model eomt`` runs ``EomtForUniversalSegmentation`` instead, patched by
``apply_m2f_kernels_to_eomt`` (its matcher and mask losses): ``--size real`` has the sizes
of tue-mps/coco_panoptic_eomt_large_640 (ViT-L/16 at 640^2, 200 queries, 4 query blocks,
12544 training points, 133 classes), ``--size tiny`` is the EoMT tests' model (64^2); the
image size is the config's.

1. Equality (fp32, tf32 off): one seeded forward + backward of HF's model and of a deep
   copy patched by ``apply_m2f_kernels_to_mask2former(model=...)`` (or ``_eomt``), both seeded alike so
   that the matcher and the loss sample the same points (the patch draws them as HF
   does). Reports relative errors ||got - hf|| / ||hf|| of the loss, the class and mask
   logits and the parameter gradients (all of them together, and the worst parameter
   measured as in the tests: against its own gradient norm floored at 1% of the whole
   model's, since analytically-zero gradients hold only rounding noise).
2. Training step (zero_grad, forward with loss, backward, AdamW step), for HF and the
   patched model, per dtype (``bf16``: forward + loss under torch.autocast(bfloat16),
   parameters and optimizer state float32): median of ``--steps`` steps after
   ``--warmup`` warm-ups, CUDA events on the GPU (wall clock on the CPU), and the peak
   of torch.cuda.max_memory_allocated during the timed steps above what was allocated
   before the model was put on the device (so: weights, gradients, AdamW state, the
   step's activations; the shared input batch excluded). ``--budget-s`` caps the timed
   steps (at least one each) so a run stays short.

Writes ``hf-<model>-<device>-<date>.json`` and ``.md`` to ``--out``. The commit is
``M2F_BENCH_COMMIT`` if set, else ``git rev-parse HEAD``; rewritten after each case, so an
interrupted run keeps the cases it finished. Exit status 2 when
transformers (with the model), scipy or the requested device is missing.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import gc
import importlib
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

import torch

from . import measure
from .data import box_masks
from .harness import rel_err
from .results import REPO_ROOT, atomic_write, environment, result_path

SCHEMA = "m2f-bench-hf-mask2former/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_IMAGE = {"real": 512, "tiny": 128}  # Mask2Former; EoMT's is its config's
DEFAULT_MASKS = {"real": 20, "tiny": 3}
LR, WEIGHT_DECAY = 1e-4, 0.05  # the official Mask2Former AdamW settings


class Model(NamedTuple):
    """A ``--model``: the HF family, where it lives, its patch and what the results record."""
    name: str
    module: str  # the transformers modeling module
    cls: str  # the model class (in transformers)
    apply: str  # the patch function in m2f_kernels.integrations.transformers
    ops: Tuple[str, ...]  # the m2f_kernels ops the patch runs (their backends are recorded)
    layers: Tuple[str, ...]  # the config's layer counts recorded


MODELS = {
    "mask2former": Model("Mask2Former", "transformers.models.mask2former.modeling_mask2former",
                         "Mask2FormerForUniversalSegmentation", "apply_m2f_kernels_to_mask2former",
                         ("ms_deform_attn", "masked_attention", "pairwise_mask_cost", "point_mask_loss"),
                         ("decoder_layers", "encoder_layers")),
    "eomt": Model("EoMT", "transformers.models.eomt.modeling_eomt", "EomtForUniversalSegmentation",
                  "apply_m2f_kernels_to_eomt", ("pairwise_mask_cost", "point_mask_loss"),
                  ("num_hidden_layers", "num_blocks")),
}


def missing_requirements(model: str = "mask2former") -> Optional[str]:
    """Why the HF model cannot run here (transformers, its ``model``, scipy), or None."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name, hint = MODELS[model].name, "pip install transformers==5.17.0"
    for module, hint in (("transformers", hint),
                         (MODELS[model].module, f"this transformers has no {name}; {hint}"),
                         ("scipy", f"HF's {name} loss needs scipy: pip install scipy")):
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a transformers broken against this torch
            return f"cannot import {module} ({type(exc).__name__}: {exc}); {hint}"
    return None


MODEL_DESCRIPTIONS = {
    ("mask2former", "real"): "facebook/mask2former-swin-small-coco-instance config, random init",
    ("mask2former", "tiny"): "tests' tiny Mask2Former, random init",
    ("eomt", "real"): "tue-mps/coco_panoptic_eomt_large_640 sizes, random init",
    ("eomt", "tiny"): "tests' tiny EoMT, random init",
}


def _helpers():
    """The shared HF model helpers (config, deformable-point perturbation, seeded step)."""
    from bench import hf_testing

    return hf_testing


def make_config(size: str, model: str = "mask2former"):
    """Mask2FormerConfig: 'real' = facebook/mask2former-swin-small-coco-instance, 'tiny' = the
    tests'; for ``model='eomt'`` an EomtConfig (bench/hf_testing.py's)."""
    if model == "eomt":
        return _helpers().make_eomt_config(size)
    if size == "tiny":
        return _helpers().make_config("tiny")
    import transformers

    swin = transformers.SwinConfig(
        image_size=224, patch_size=4, embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7,
        mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.3, use_absolute_embeddings=False,
        out_features=["stage1", "stage2", "stage3", "stage4"])
    return transformers.Mask2FormerConfig(
        backbone_config=swin, feature_size=256, mask_feature_size=256, hidden_dim=256, encoder_feedforward_dim=1024,
        dim_feedforward=2048, encoder_layers=6, decoder_layers=10, num_attention_heads=8, dropout=0.0,
        num_queries=100, train_num_points=12544, oversample_ratio=3.0, importance_sample_ratio=0.75,
        no_object_weight=0.1, class_weight=2.0, mask_weight=5.0, dice_weight=5.0, common_stride=4,
        use_auxiliary_loss=True, num_labels=80)


def build_model(config, seed: int, model: str = "mask2former"):
    """The random-init model (train mode, CPU), deformable sampling points off pixel centres."""
    import transformers

    torch.manual_seed(seed)
    built = getattr(transformers, MODELS[model].cls)(config).train()
    _helpers().generic_points(built)  # Mask2Former's deformable attention; nothing in EoMT
    return built


def make_batch(config, batch: int, size: int, masks: int, device, seed: int) -> dict:
    """pixel_values [B, 3, size, size]; per image ``masks`` box masks (float) and class labels."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return dict(
            pixel_values=torch.randn(batch, 3, size, size).to(device),
            mask_labels=[box_masks(masks, size, size, "cpu").float().to(device) for _ in range(batch)],
            class_labels=[torch.randint(0, config.num_labels, (masks,)).to(device) for _ in range(batch)],
        )
    finally:
        torch.random.set_rng_state(gen_state)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _on_device(base, device, patched: bool):
    from m2f_kernels.integrations import transformers as integration

    model = copy.deepcopy(base).to(device).train()
    if patched:  # the patch function of base's model class
        apply = next(getattr(integration, m.apply) for m in MODELS.values() if m.cls == type(base).__name__)
        apply(model=model)
    return model




# ----------------------------------------------------------------------------- equality
def equality(base, batch: dict, device: torch.device, seed: int) -> dict:
    """One seeded fp32 forward + backward of HF and of the patched copy; relative errors."""
    step = _helpers().train_step
    runs = {}
    with measure.no_tf32():
        for name, patched in (("hf", False), ("m2f_kernels", True)):
            model = _on_device(base, device, patched)
            out, loss, grads, _ = step(model, batch, seed)
            _sync(device)
            runs[name] = {
                "loss": loss.detach().cpu(),
                "class_queries_logits": out.class_queries_logits.detach().cpu(),
                "masks_queries_logits": out.masks_queries_logits.detach().cpu(),
                "grads": {n: g.detach().cpu() for n, g in grads.items()},
            }
            del model, out, loss, grads
            _free(device)
            print(f"  equality: {name} step done", flush=True)
    got, want = runs["m2f_kernels"], runs["hf"]
    result = {name: rel_err(got[name], want[name])
              for name in ("loss", "class_queries_logits", "masks_queries_logits")}
    result["loss_hf"] = want["loss"].item()
    result["loss_m2f_kernels"] = got["loss"].item()
    names = sorted(want["grads"])
    result["grad_params"] = len(names)
    result["grad_params_match"] = sorted(got["grads"]) == names
    common = [n for n in names if n in got["grads"]]
    result["grads_overall"] = rel_err([got["grads"][n] for n in common], [want["grads"][n] for n in common])
    scale = math.sqrt(sum(want["grads"][n].double().norm().item() ** 2 for n in common))
    worst = (0.0, None, 0.0)
    for n in common:
        g, w = got["grads"][n].double(), want["grads"][n].double()
        diff = (g - w).norm().item() if torch.isfinite(g).all() else math.inf
        floored = diff / max(w.norm().item(), 1e-2 * scale) if scale > 0 else diff
        if floored > worst[0] or worst[1] is None:
            worst = (floored, n, diff / w.norm().item() if w.norm().item() > 0 else diff)
    result["grads_worst_param"] = worst[1]
    result["grads_worst"] = worst[0]  # against max(its own norm, 1% of the model's)
    result["grads_worst_unfloored"] = worst[2]
    return result


# ----------------------------------------------------------------------------- timing
def time_steps(base, batch: dict, device: torch.device, patched: bool, dtype: str, steps: int, warmup: int,
               seed: int, deadline: float) -> dict:
    """Median step time and peak memory of the full training step (see the module doc)."""
    _free(device)
    start_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    model = _on_device(base, device, patched)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    timer = measure.CudaEventTimer(device, flush_bytes=0) if device.type == "cuda" else measure.WallTimer()
    torch.manual_seed(seed)
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps):
        if i > 0 and time.perf_counter() > deadline:
            print(f"  time budget reached: {i} of {steps} timed steps", flush=True)
            break
        times.append(timer(step))
    _sync(device)
    record = {"status": "ok", "time_ms": measure.summarize(times),
              "loss_last": losses[-1].float().item(),
              "loss_finite": all(torch.isfinite(x).item() for x in losses)}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - start_bytes
        record.update(peak_bytes=int(peak), peak_mib=peak / 2**20)
    return record  # the model and optimizer go with this frame; the next case frees the cache


# ----------------------------------------------------------------------------- report
def _fmt(x, spec=".3g"):
    return "-" if x is None else (f"{x:{spec}}" if isinstance(x, (int, float)) else str(x))


def markdown(data: dict) -> str:
    env, cfg = data["env"], data["config"]
    lines = [
        f"# HF {cfg.get('family', 'Mask2Former')} with m2f_kernels: {env['device']}",
        "",
        f"- created {data['created']}, commit `{env.get('commit')}`"
        + (" (dirty tree)" if env.get("dirty") else ""),
        f"- torch {env['torch']}, triton {env.get('triton')}, transformers {env.get('transformers')}, "
        f"CUDA {env.get('cuda')}, tf32 matmul {env.get('tf32_matmul')} / cudnn {env.get('tf32_cudnn')} (timing)",
        f"- model: {cfg['model']}, {cfg['parameters'] / 1e6:.1f} M parameters; batch {cfg['batch']} x 3 x "
        f"{cfg['image_size']}^2, {cfg['masks_per_image']} box masks per image, {cfg['train_num_points']} points",
        f"- m2f_kernels backends: {env.get('m2f_kernels_backends')}",
        "",
    ]
    eq = data.get("equality")
    if eq is not None:
        lines += ["## Equality (one fp32 step, tf32 off, same weights, batch and points)", ""]
        if "error" in eq:
            lines += [f"error: {eq['error']}", ""]
        else:
            lines += [
                "| quantity | rel. error vs HF |", "| --- | --- |",
                f"| loss ({eq['loss_hf']:.6g} HF) | {_fmt(eq['loss'], '.2e')} |",
                f"| class_queries_logits | {_fmt(eq['class_queries_logits'], '.2e')} |",
                f"| masks_queries_logits | {_fmt(eq['masks_queries_logits'], '.2e')} |",
                f"| all {eq['grad_params']} parameter gradients (one L2) | {_fmt(eq['grads_overall'], '.2e')} |",
                f"| worst parameter gradient (`{eq['grads_worst_param']}`, floored norm) | "
                f"{_fmt(eq['grads_worst'], '.2e')} (unfloored {_fmt(eq['grads_worst_unfloored'], '.2e')}) |",
                "",
            ]
    lines += ["## Training step (zero_grad, forward + loss, backward, AdamW)", "",
              f"Median of the timed steps after {cfg['warmup']} warm-ups "
              f"({'CUDA events' if cfg['device'] == 'cuda' else 'wall clock'}); peak memory above the "
              "allocation before the model was put on the device.", "",
              "| dtype | model | median ms | min ms | p80 ms | steps | peak MiB | speedup | memory ratio |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    by_key = {(r["dtype"], r["model"]): r for r in data["results"]}
    for r in data["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['dtype']} | {r['model']} | {r['status']}: {r.get('reason', '')} | | | | | | |")
            continue
        t = r["time_ms"]
        ref = by_key.get((r["dtype"], "hf"))
        speed = mem = None
        if ref is not None and ref["status"] == "ok":
            speed = ref["time_ms"]["median"] / t["median"]
            if r.get("peak_bytes") and ref.get("peak_bytes"):
                mem = ref["peak_bytes"] / r["peak_bytes"]
        lines.append(f"| {r['dtype']} | {r['model']} | {t['median']:.1f} | {t['min']:.1f} | {t['p80']:.1f} | "
                     f"{t['rounds']} | {_fmt(r.get('peak_mib'), '.0f')} | "
                     f"{_fmt(speed, '.2f') + 'x' if speed else '-'} | {_fmt(mem, '.2f') + 'x' if mem else '-'} |")
    lines += ["", "speedup = HF median / this median; memory ratio = HF peak / this peak.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.hf_mask2former", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=tuple(MODELS), default="mask2former")
    p.add_argument("--size", choices=("real", "tiny"), default="real")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    p.add_argument("--steps", type=int, default=10, help="timed steps per case (after the warm-ups)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", choices=("fp32", "bf16", "all"), default="all")
    p.add_argument("--image-size", type=int, default=None,
                   help="default: 512 real, 128 tiny (Mask2Former); EoMT's config's (640 real, 64 tiny), no other")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--masks", type=int, default=None, help="instance masks per image (default: 20 real, 3 tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=100.0,
                   help="stop adding timed steps (at least one per case) once the run is this old")
    p.add_argument("--no-equality", action="store_true", help="skip the equality step")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        p.error("--steps and --batch must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    t0 = time.perf_counter()
    args = parse_args(argv)
    reason = missing_requirements(args.model)
    if reason is not None:
        print(f"bench.hf_mask2former: cannot run: {reason}", flush=True)
        return 2
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        print("bench.hf_mask2former: cannot run: --device cuda but torch.cuda.is_available() is False", flush=True)
        return 2
    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    import transformers

    family = MODELS[args.model]
    config = make_config(args.size, args.model)
    size = args.image_size or (config.image_size if args.model == "eomt" else DEFAULT_IMAGE[args.size])
    if args.model == "eomt" and size != config.image_size:
        print(f"bench.hf_mask2former: cannot run: EoMT's position embeddings fix the image size at "
              f"{config.image_size}, not {size}", flush=True)
        return 2
    masks = args.masks or DEFAULT_MASKS[args.size]
    dtypes = list(DTYPES) if args.dtype == "all" else [args.dtype]
    deadline = t0 + args.budget_s

    env = environment(device, transformers=transformers.__version__,
                      scipy=importlib.import_module("scipy").__version__)
    try:
        from m2f_kernels._dispatch import resolve

        env["m2f_kernels_backends"] = {
            d: {op: resolve(op, device, DTYPES[d]) for op in family.ops}
            for d in dtypes}
    except Exception as exc:  # informative only
        env["m2f_kernels_backends"] = f"unknown ({type(exc).__name__}: {exc})"

    print(f"[hf_mask2former] {env['device']}: torch {env['torch']}, transformers {env['transformers']}, "
          f"triton {env['triton']}; building the {args.size} {family.name} model", flush=True)
    base = build_model(config, args.seed, args.model)
    batch = make_batch(config, args.batch, size, masks, device, args.seed + 1)
    data = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "env": env,
        "config": {
            "model": MODEL_DESCRIPTIONS[args.model, args.size], "family": family.name,
            "size": args.size, "device": device.type, "batch": args.batch, "image_size": size,
            "masks_per_image": masks, "train_num_points": config.train_num_points,
            "num_queries": config.num_queries, "num_labels": config.num_labels,
            **{k: getattr(config, k) for k in family.layers},
            "parameters": sum(p.numel() for p in base.parameters()),
            "steps": args.steps, "warmup": args.warmup, "dtypes": dtypes, "seed": args.seed,
            "optimizer": {"name": "AdamW", "lr": LR, "weight_decay": WEIGHT_DECAY},
            "budget_s": args.budget_s,
        },
        "equality": None,
        "results": [],
    }
    path = result_path(args.out, f"hf-{args.model}-{env['device']}", "default")

    def save() -> str:
        """Write what is measured so far (a Ctrl-C or a time limit keeps the finished cases)."""
        data["elapsed_s"] = time.perf_counter() - t0
        text = markdown(data)
        atomic_write(path, json.dumps(data, indent=1, allow_nan=True) + "\n")
        atomic_write(path.with_suffix(".md"), text)
        return text

    print(f"[hf_mask2former] {data['config']['parameters'] / 1e6:.1f} M parameters, batch {args.batch} x "
          f"{size}^2, {masks} masks/image ({time.perf_counter() - t0:.1f} s)", flush=True)

    if not args.no_equality:
        print("[hf_mask2former] equality (fp32, tf32 off)", flush=True)
        try:
            data["equality"] = equality(base, batch, device, args.seed + 2)
        except Exception as exc:
            traceback.print_exc()
            data["equality"] = {"error": f"{type(exc).__name__}: {exc}"}
            _free(device)
        print(f"  {data['equality']} ({time.perf_counter() - t0:.1f} s)", flush=True)
        save()

    cases = [(dtype, model_name, patched) for dtype in dtypes
             for model_name, patched in (("hf", False), ("m2f_kernels", True))]
    for i, (dtype, model_name, patched) in enumerate(cases):
        now = time.perf_counter()
        case_deadline = now + max(0.0, deadline - now) / (len(cases) - i)  # the time left, shared fairly
        print(f"[hf_mask2former] train step {dtype} {model_name}: {args.warmup} warm-ups + {args.steps} steps",
              flush=True)
        record = {"model": model_name, "dtype": dtype}
        try:
            record.update(time_steps(base, batch, device, patched, dtype, args.steps, args.warmup,
                                     args.seed + 3, case_deadline))
        except torch.cuda.OutOfMemoryError as exc:
            record.update(status="oom", reason=str(exc).splitlines()[0])
            _free(device)
        except Exception as exc:
            traceback.print_exc()
            record.update(status="error", reason=f"{type(exc).__name__}: {exc}")
            _free(device)
        data["results"].append(record)
        save()
        t = record.get("time_ms")
        print(f"  {record['status']}" + (f": median {t['median']:.1f} ms over {t['rounds']}, peak "
                                         f"{_fmt(record.get('peak_mib'), '.0f')} MiB" if t else
                                         f": {record.get('reason')}")
              + f" ({time.perf_counter() - t0:.1f} s)", flush=True)

    text = save()
    print("\n" + text, flush=True)
    print(f"[hf_mask2former] wrote {path} and {path.with_suffix('.md').name} ({data['elapsed_s']:.1f} s)",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

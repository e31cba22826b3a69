"""Sweep the Triton point-loss launch configs at the standard shape (issue 5); GPU only.

    python bench/sweep_point_loss.py            # all parts, fp32 (+ bf16 for the matcher)
    python bench/sweep_point_loss.py --parts matcher --dtypes fp32,bf16,fp16

One prediction of the standard shape (docs/ops.md): B=2, Q=100, pred 256x256, T=30 bool
targets per image at 1024x1024, P=12544; the matcher runs once per image (2 calls), the
importance sampling and the loss on the 60 matched masks. Each row times one candidate
config of m2f_kernels.triton.point_loss (the backend functions, no op layer), plus the
reference backend and torch.topk alone for scale. Columns:

- ``gpu ms``: triton.testing.do_bench median, L2 flushed before each call; when the host
  cannot enqueue the launches within the flush's ~0.1 ms, this includes host time.
- ``graph ms``: the same call captured in a CUDA graph, replayed (median): kernels only,
  warm L2; the host overhead is what separates it from ``gpu ms``.
- ``host us``: CPU time to enqueue one call (no synchronisation).

Candidates whose shared-memory estimate exceeds this device's limit are listed as skipped.
The first triton row of each part is the current default (each backend entry point takes
the candidate as ``config=``); copy a faster config into POINT_CONFIG / LOSS_CONFIG /
PAIRWISE_CONFIGS (m2f_kernels/triton/_point_sample.py, _point_mask_loss.py,
_pairwise_mask_cost.py). About 25 kernel compilations, then ~40
timed rows: under a minute on an H100; --quick times the defaults and the reference only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
import triton.testing  # noqa: E402

from m2f_kernels.reference import point_loss as ref  # noqa: E402
from m2f_kernels.triton import point_loss as tri  # noqa: E402

B, Q, HP, T, HT, P = 2, 100, 256, 30, 1024, 12544
OVERSAMPLE, IMPORTANCE = 3, 0.75
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

PW = tri.PairwiseConfig
# (label, config); the first is the default; other dtypes than fp32 try the first three.
PAIRWISE_CANDIDATES = [
    ("64x32x16 w8 n256", PW(64, 32, 16, 256, 8)),
    ("32x32x16 w4 n384", PW(32, 32, 16, 384, 4)),
    ("128x32x16 w8 n128", PW(128, 32, 16, 128, 8)),
    ("64x32x16 w8 n512", PW(64, 32, 16, 512, 8)),
    ("16x32x16 w4 n1024", PW(16, 32, 16, 1024, 4)),
    ("64x32x16 w8 n256 tf32x3", PW(64, 32, 16, 256, 8, precision="tf32x3")),
]
# The first GPU run's config (fp32 targets ran out of shared memory; bool targets fit, with
# 2.6 KB/thread of register spills): --with-old adds it (a slow compile).
OLD_PAIRWISE = ("old 64x32x64 w8 s3", PW(64, 32, 64, 256, 8, num_stages=3))
PC = tri.PointConfig
POINT_CANDIDATES = [
    ("256 w4", PC(256, 4)),
    ("128 w4", PC(128, 4)),
    ("512 w4", PC(512, 4)),
    ("512 w8", PC(512, 8)),
]


def make_inputs(dtype, device):
    """The standard shape, one prediction: dict of tensors."""
    pred = (3.0 * torch.randn(B, Q, HP, HP, device=device)).to(dtype)
    # blobby masks (upsampled low-resolution noise), as bool
    low = torch.randn(B * T, 1, 16, 16, device=device)
    target = torch.nn.functional.interpolate(low, size=(HT, HT), mode="bilinear")[:, 0] > 0.3
    bidx = torch.arange(B, device=device).repeat_interleave(T)
    qidx = torch.cat([torch.randperm(Q, device=device)[:T] for _ in range(B)])
    k = int(IMPORTANCE * P)
    return {
        "pred": pred,
        "target": target,
        "bidx": bidx,
        "qidx": qidx,
        "matcher_coords": torch.rand(B, P, 2, device=device),
        "candidates": torch.rand(B * T, OVERSAMPLE * P, 2, device=device),
        "random": torch.rand(B * T, P - k, 2, device=device),
        "k": k,
        "coords": torch.rand(B * T, P, 2, device=device),
        "ones": torch.ones((), device=device, dtype=dtype),
    }


def matcher_call(x, config):
    def run():
        for b in range(B):
            tgt = x["target"][b * T:(b + 1) * T]
            if config is None:
                ref.pairwise_mask_cost(x["pred"][b], tgt, x["matcher_coords"][b])
            else:
                tri.pairwise_mask_cost(x["pred"][b], tgt, x["matcher_coords"][b], config=config)
    return run


def sampling_call(x, config):
    """The matched masks read through (bidx, qidx), as the criterion calls it (the reference gathers them)."""
    args = (x["pred"], x["candidates"], x["random"], x["k"], x["bidx"], x["qidx"])
    if config is None:
        return lambda: ref.uncertain_point_coords(*args)
    return lambda: tri.uncertain_point_coords(*args, config=config)


def topk_call(x, sorted_):
    u = torch.rand(B * T, OVERSAMPLE * P, device=x["pred"].device)
    return lambda: torch.topk(u, x["k"], dim=1, sorted=sorted_)


def loss_call(x, config):
    args = (x["pred"], x["target"], x["coords"], float(B * T), x["bidx"], x["qidx"])
    one = x["ones"]
    if config is None:
        return lambda: (ref.point_mask_loss_fwd(*args), ref.point_mask_loss_bwd(one, one, *args))

    def run():
        tri.point_mask_loss_fwd(*args, config=config)
        tri.point_mask_loss_bwd(one, one, *args, config=config)
    return run


def graph_ms(fn, replays: int = 20) -> float:
    """Median time of fn captured in a CUDA graph (kernels only)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_us(fn, calls: int = 10) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def measure(fn) -> tuple:
    fn()  # compile
    torch.cuda.synchronize()
    gpu = triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")
    try:
        graph = graph_ms(fn)
    except Exception as exc:  # capture can fail (e.g. a library op that syncs): report, go on
        graph = float("nan")
        print(f"    (graph capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
    return gpu, graph, host_us(fn)


def smem_limit() -> int:
    props = torch.cuda.get_device_properties(0)
    return getattr(props, "shared_memory_per_block_optin", 101376)


def rows_for(part, x, quick, with_old):
    """(label, callable or skip reason) rows of one part."""
    if part == "matcher":
        yield "reference", matcher_call(x, None)
        fp32 = x["pred"].dtype == torch.float32
        candidates = PAIRWISE_CANDIDATES[:1 if quick else (None if fp32 else 3)]
        limit = smem_limit()
        for label, cfg in candidates + ([OLD_PAIRWISE] if with_old else []):
            need = tri.pairwise_smem_bytes(cfg, x["pred"].element_size(), 1)
            if need > limit:
                yield label, f"skipped: shared memory estimate {need} > {limit}"
            else:
                yield label, matcher_call(x, cfg)
    elif part == "sampling":
        yield "reference", sampling_call(x, None)
        yield "torch.topk sorted", topk_call(x, True)
        yield "torch.topk unsorted", topk_call(x, False)
        for label, cfg in POINT_CANDIDATES[:1 if quick else None]:
            yield label, sampling_call(x, cfg)
    elif part == "loss":
        yield "reference", loss_call(x, None)
        for label, cfg in POINT_CANDIDATES[:1 if quick else None]:
            yield label, loss_call(x, cfg)


PARTS = {
    "matcher": "pairwise_mask_cost, 2 images",
    "sampling": "uncertain_point_coords, 60 masks",
    "loss": "point_mask_loss fwd+bwd, 60 masks",
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="matcher,sampling,loss")
    parser.add_argument("--dtypes", default=None,
                        help="comma list of fp32,bf16,fp16 (default: fp32 everywhere, bf16 too for the matcher)")
    parser.add_argument("--quick", action="store_true", help="defaults and reference only")
    parser.add_argument("--with-old", action="store_true", help="add the first GPU run's matcher config")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("sweep_point_loss: needs a CUDA GPU")
    t_start = time.time()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.multi_processor_count} SMs, shared memory limit {smem_limit()} B; "
          f"torch {torch.__version__}, triton {triton.__version__}")
    print(f"# one prediction: B={B} Q={Q} pred {HP}^2, T={T} bool targets at {HT}^2, P={P}; a step is 10 of these")
    print(f"{'part':<9} {'dtype':<5} {'config':<26} {'gpu ms':>8} {'graph ms':>9} {'host us':>8}")
    inputs = {}
    for part in args.parts.split(","):
        dtypes = args.dtypes.split(",") if args.dtypes else (["fp32", "bf16"] if part == "matcher" else ["fp32"])
        for name in dtypes:
            if name not in inputs:
                inputs[name] = make_inputs(DTYPES[name], "cuda")
            for label, call in rows_for(part, inputs[name], args.quick, args.with_old):
                if isinstance(call, str):
                    print(f"{part:<9} {name:<5} {label:<26} {call}")
                    continue
                try:
                    gpu, graph, host = measure(call)
                except Exception as exc:
                    print(f"{part:<9} {name:<5} {label:<26} FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                    continue
                print(f"{part:<9} {name:<5} {label:<26} {gpu:8.3f} {graph:9.3f} {host:8.0f}", flush=True)
    print(f"# parts: {'; '.join(f'{k}: {v}' for k, v in PARTS.items())}. Sweep took {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()

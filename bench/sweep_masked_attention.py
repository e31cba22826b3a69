"""Sweep the Triton masked attention's launch rules on the standard shapes (GPU only).

    python bench/sweep_masked_attention.py            # ~1 min on an H100 (mostly compiling)
    python bench/sweep_masked_attention.py --quick    # defaults only, no candidates

Prints, with device and versions:
1. every standard shape (B=2, H=8, D=32, Q 100/200, N 1024/4096/16384, fp32/bf16, blob
   masks with 30% visible keys and 5% empty rows, as bench/) with the current rules:
   raw backend forward, backward and both (triton.testing.do_bench median, L2 flushed, the
   host enqueueing like the benchmark's); the same calls replayed from a CUDA graph (GPU
   time alone, no host); the public op forward+backward through autograd; SDPA
   forward+backward; host microseconds per call (enqueue only);
2. at N=16384, candidate rule sets per pass and dtype class (see CANDIDATES), each timed
   and checked against the default's result, and the best per (pass, class) as an
   ``M2F_MA_CONFIG`` string: re-run the benchmark with it exported, then copy it into
   ``RULES`` in m2f_kernels/triton/masked_attention.py;
3. a torch.profiler breakdown (CPU ops, GPU kernels) of one public forward+backward, to
   show where fixed costs outside the kernels go.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

import m2f_kernels  # noqa: E402
import m2f_kernels.triton.masked_attention as tri  # noqa: E402
from bench.data import blob_masks  # noqa: E402

B, H, D = 2, 8, 32
QS, NS = (100, 200), (1024, 4096, 16384)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SWEEP_N = 16384

# MaskedAttentionRules overrides per (pass, dtype class); "default" is the rules in force. Variants that
# only change programs_per_sm cost no compilation (the split size is a runtime argument).
CANDIDATES = {
    ("fwd", "16bit"): {
        "block_n=64": {"block_n": 64},
        "stages=4": {"num_stages": 4},
        "stages=2": {"num_stages": 2},
        "block_q=64,w4": {"block_q_max": 64, "programs_per_sm": 4},
        "block_q=256": {"block_q_max": 256, "programs_per_sm": 1},
        "ppsm=1": {"programs_per_sm": 1},
        "ppsm=4": {"programs_per_sm": 4},
        "skip": {"skip_tiles": True},
    },
    ("fwd", "fp32"): {
        "stages=2": {"num_stages": 2},
        "block_q=64,w4": {"block_q_max": 64, "programs_per_sm": 3},
        "block_n=16,ppsm=2": {"block_n": 16, "programs_per_sm": 2},
        "ppsm=2": {"programs_per_sm": 2},
        "skip": {"skip_tiles": True},
    },
    ("bwd", "16bit"): {
        "block_n=64": {"block_n": 64},
        "block_n=16": {"block_n": 16},
        "stages=2": {"num_stages": 2},
        "block_q=128": {"block_q_max": 128},
        "ppsm=2": {"programs_per_sm": 2},
        "min_tiles=16": {"min_tiles": 16},
        "skip": {"skip_tiles": True},
    },
    ("bwd", "fp32"): {
        "stages=2": {"num_stages": 2},
        "block_q=64": {"block_q_max": 64},
        "ppsm=2": {"programs_per_sm": 2},
        "skip": {"skip_tiles": True},
        "tf32 (less accurate)": {"fp32_dot": "tf32", "block_n": 32},
    },
}


def rules(pass_: str, cls: str, overrides: dict) -> tri.MaskedAttentionRules:
    return dataclasses.replace(tri.rules_for(pass_ == "bwd", cls == "fp32"), **overrides)


def make_inputs(dtype, Q, N, device="cuda"):
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype) for L in (Q, N, N))
    mask = blob_masks(B * Q, N, 0.3, 0.05, device).view(B, Q, N)
    return q, k, v, mask, torch.randn(B, H, Q, D, device=device, dtype=dtype)


def bench(fn) -> float:
    return do_bench(fn, warmup=5, rep=25, return_mode="median")


def bench_graph(fn) -> float:
    try:
        return do_bench_cudagraph(fn, rep=20, return_mode="median")
    except Exception:  # capture refused (should not happen: no syncs, no host reads)
        return float("nan")


def host_us(fn, calls: int = 20) -> float:
    """Host microseconds per call, enqueue only (the GPU catches up afterwards)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@contextlib.contextmanager
def compile_in_parallel(workers: int):
    """Kernel launches inside only compile them, on a thread pool (Triton's async compile)."""
    from triton.runtime import _async_compile
    from triton.runtime.jit import JITFunction

    real = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        return real(self, *args, grid=grid, warmup=True, **kwargs)

    JITFunction.run = run
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            with _async_compile.AsyncCompileMode(pool, ignore_errors=True):
                yield
    finally:
        JITFunction.run = real


def geomean(xs):
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def section_defaults(cases, scale):
    print("\n## 1. Standard shapes, current rules (ms; do_bench median, L2 flushed)\n")
    print("| Q | N | dtype | fwd | bwd | fwd+bwd | fwd graph | bwd graph | op fwd+bwd | sdpa fwd+bwd "
          "| host us fwd / bwd / op | fwd cfg | bwd cfg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (Q, N, name), (q, k, v, mask, g) in cases.items():
        fcfg, bcfg = tri.masked_attention_config(q, k, v, False), tri.masked_attention_config(q, k, v, True)
        out, lse = tri.masked_attention_fwd(q, k, v, mask, scale, config=fcfg)
        fwd = lambda: tri.masked_attention_fwd(q, k, v, mask, scale, config=fcfg)  # noqa: E731
        bwd = lambda: tri.masked_attention_bwd(g, q, k, v, mask, out, lse, scale, config=bcfg)  # noqa: E731

        def both():
            o, l_ = tri.masked_attention_fwd(q, k, v, mask, scale, config=fcfg)
            return tri.masked_attention_bwd(g, q, k, v, mask, o, l_, scale, config=bcfg)

        ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))

        def op():
            o = m2f_kernels.masked_attention(ql, kl, vl, mask, scale=scale, backend="triton")
            return torch.autograd.grad(o, (ql, kl, vl), g)

        visible = ~mask.unsqueeze(1) | mask.unsqueeze(1).all(-1, keepdim=True)

        def sdpa():
            o = F.scaled_dot_product_attention(ql, kl, vl, attn_mask=visible, scale=scale)
            return torch.autograd.grad(o, (ql, kl, vl), g)

        t = [bench(fn) for fn in (fwd, bwd, both)]
        graph = [bench_graph(fn) for fn in (fwd, bwd)]
        t_op, t_sdpa = bench(op), bench(sdpa)
        hosts = "/".join(f"{host_us(fn):.0f}" for fn in (fwd, bwd, op))
        cfg_text = lambda c: f"{c.block_q}x{c.block_n} kb{c.kb_per_split} w{c.num_warps} s{c.num_stages}"  # noqa: E731
        print(f"| {Q} | {N} | {name} | {t[0]:.4f} | {t[1]:.4f} | {t[2]:.4f} | {graph[0]:.4f} | {graph[1]:.4f} "
              f"| {t_op:.4f} | {t_sdpa:.4f} | {hosts} | {cfg_text(fcfg)} | {cfg_text(bcfg)} |", flush=True)


def section_candidates(cases, scale, deadline):
    print(f"\n## 2. Candidate rules at N={SWEEP_N} (ms; median; err = rel. error vs the default's result)\n")
    best = {}
    for (pass_, cls), variants in CANDIDATES.items():
        shapes = [(key, t) for key, t in cases.items() if key[1] == SWEEP_N and (key[2] == "fp32") == (cls == "fp32")]
        print(f"### {pass_} {cls}\n")
        print("| candidate | " + " | ".join(f"Q{key[0]}" for key, _ in shapes) + " | speedup (geomean) | max err |")
        print("|---|" + "---|" * (len(shapes) + 2))
        base_times, base_results, rows = {}, {}, []
        for label, overrides in [("default", {})] + list(variants.items()):
            if time.time() > deadline:
                print(f"| {label} | time budget spent, not run |")
                continue
            times, errs = [], []
            for key, (q, k, v, mask, g) in shapes:
                cfg = tri.masked_attention_config(q, k, v, pass_ == "bwd", rules(pass_, cls, overrides))
                try:
                    if pass_ == "fwd":
                        fn = lambda: tri.masked_attention_fwd(q, k, v, mask, scale, config=cfg)  # noqa: E731
                    else:
                        out, lse = tri.masked_attention_fwd(q, k, v, mask, scale)
                        fn = lambda: tri.masked_attention_bwd(  # noqa: E731
                            g, q, k, v, mask, out, lse, scale, config=cfg)
                    result = fn()
                    times.append(bench(fn))
                except Exception as exc:  # e.g. out of shared memory for this tiling
                    times.append(float("nan"))
                    print(f"<!-- {label} Q{key[0]}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} -->")
                    continue
                if label == "default":
                    base_times[key], base_results[key] = times[-1], result
                else:
                    errs.append(max(rel_err(a, b) for a, b in zip(result, base_results[key])))
            speed = geomean([base_times.get(key, float("nan")) / t for (key, _), t in zip(shapes, times)])
            rows.append((label, overrides, speed))
            print(f"| {label} | " + " | ".join(f"{t:.4f}" for t in times)
                  + f" | {speed:.2f}x | {max(errs) if errs else 0:.1e} |", flush=True)
        eligible = [r for r in rows if "less accurate" not in r[0] and math.isfinite(r[2])]
        best[(pass_, cls)] = max(eligible, key=lambda r: r[2]) if eligible else ("default", {}, 1.0)
        print()
    groups = []
    for (pass_, cls), (label, overrides, speed) in best.items():
        print(f"best {pass_} {cls}: {label} ({speed:.2f}x)")
        if overrides:
            groups.append(f"{pass_}.{cls}:" + ",".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                                                       for k, v in overrides.items()))
    print(f"\nsuggested: export {tri.CONFIG_ENV}=\"{';'.join(groups)}\"")


def section_profile(scale):
    from torch.profiler import ProfilerActivity, profile

    for N, name in ((1024, "bf16"), (SWEEP_N, "bf16")):
        q, k, v, mask, g = make_inputs(DTYPES[name], 100, N)
        ql, kl, vl = (t.requires_grad_() for t in (q, k, v))

        def op():
            o = m2f_kernels.masked_attention(ql, kl, vl, mask, scale=scale, backend="triton")
            return torch.autograd.grad(o, (ql, kl, vl), g)

        for _ in range(3):
            op()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                op()
            torch.cuda.synchronize()
        print(f"\n## 3. Profile: 5 x public op forward+backward, Q100 N{N} {name}\n")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="defaults only, no candidates")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--budget-s", type=float, default=55.0, help="stop starting candidates after this")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    start = time.time()
    props = torch.cuda.get_device_properties(0)
    print(f"# masked attention sweep: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"triton {triton.__version__}, {tri.CONFIG_ENV}={os.environ.get(tri.CONFIG_ENV, '')!r}")
    scale = D ** -0.5
    cases = {(Q, N, name): make_inputs(dtype, Q, N) for name, dtype in DTYPES.items() for Q in QS for N in NS}

    # Compile every kernel variant the run needs up front, in parallel.
    with compile_in_parallel(os.cpu_count() or 4):
        for (Q, N, name), (q, k, v, mask, g) in cases.items():
            cls = "fp32" if name == "fp32" else "16bit"
            sweep = not args.quick and N == SWEEP_N
            for pass_ in ("fwd", "bwd"):
                for overrides in [{}] + (list(CANDIDATES[(pass_, cls)].values()) if sweep else []):
                    fwd_rules = rules("fwd", cls, overrides if pass_ == "fwd" else {})
                    fcfg = tri.masked_attention_config(q, k, v, False, fwd_rules)
                    out, lse = tri.masked_attention_fwd(q, k, v, mask, scale, config=fcfg)
                    if pass_ == "bwd":
                        bcfg = tri.masked_attention_config(q, k, v, True, rules("bwd", cls, overrides))
                        tri.masked_attention_bwd(g, q, k, v, mask, out, lse, scale, config=bcfg)
    print(f"(compiled in {time.time() - start:.1f} s)")

    section_defaults(cases, scale)
    if not args.quick:
        section_candidates(cases, scale, start + args.budget_s)
    if not args.no_profile:
        section_profile(scale)
    print(f"\n(total {time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()

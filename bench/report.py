"""Turn a result JSON into markdown (full summary, README tables) and bar charts (PNG).

    python -m bench.report bench/results/<device>-<date>.json [--out DIR] [--no-charts]

writes ``<stem>.md`` and ``<stem>-<op>-time.png`` / ``-memory.png`` into DIR (default:
beside the JSON) and prints the README results tables to stdout.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Optional

# Speedups are reported against the first of these present in a case's group: the
# official code path where the table has it, else the reference backend.
BASELINES = ("official", "original", "reference")
# ops whose speedups are against another provider (the one their comparison is about)
OP_BASELINES = {"criterion": ("logits-fused",), "assignment": ("scipy",)}
# The model cases (bench/test_bench_model.py): the paper's claim is a/b.
TRAIN_CONFIGS = ("a-full-reference", "b-point-reference", "c-point-fused")  # the 3x table's rows
MASK_FREE, COMPILED, CUDA_GRAPH = "d-point-mask-free", "e-mask-free-compiled", "f-mask-free-cuda-graph"
PAPER_MEMORY_RATIO = 3.0  # Table 5 of arXiv 2112.01527: 18 GB -> 6 GB per image
MiB, GB = 2.0**20, 1e9


# ----------------------------------------------------------------------------- grouping


def _ok(data: dict, op: Optional[str] = None) -> list:
    return [r for r in data["cases"] if r["status"] == "ok" and (op is None or r["op"] == op)]


def _all(data: dict, op: str) -> list:
    """Every record of ``op``, whatever its status: the tables show a case that did not run
    as its status (skipped / oom / error), never as a blank or a zero."""
    return [r for r in data["cases"] if r["op"] == op]


def _ok_median(r: Optional[dict]) -> Optional[float]:
    return r["time_ms"]["median"] if r is not None and r["status"] == "ok" else None


def ops_in(data: dict) -> list:
    """Ops with at least one record, in first-seen order, model last."""
    ops = list(OrderedDict.fromkeys(r["op"] for r in data["cases"]))
    return [o for o in ops if o != "model"] + (["model"] if "model" in ops else [])


def shape_label(shape: dict, varying: list) -> str:
    return " ".join(f"{k}={_fmt_value(shape[k])}" for k in varying if k in shape) or "-"


def _fmt_value(v) -> str:
    if isinstance(v, list):
        return "x".join(_fmt_value(x) for x in v) if all(not isinstance(x, list) for x in v) else \
            ",".join(_fmt_value(x) for x in v)
    return str(v)


def varying_keys(records: list) -> list:
    """Shape keys whose value differs between records (the rest go in the heading)."""
    keys = list(OrderedDict.fromkeys(k for r in records for k in r["shape"]))
    return [k for k in keys if len({repr(r["shape"].get(k)) for r in records}) > 1]


def groups(records: list) -> "OrderedDict":
    """(shape label, dtype, mode) -> {provider: record}, in run order.

    The label is the record's own (the table's id keys) where it has one, else the shape
    keys that vary between the records.
    """
    varying = varying_keys(records)
    out: OrderedDict = OrderedDict()
    for r in records:
        label = r.get("label") or shape_label(r["shape"], varying)
        out.setdefault((label, r["dtype"], r["mode"]), OrderedDict())[r["provider"]] = r
    return out


def baselines(op: str) -> tuple:
    return OP_BASELINES.get(op, BASELINES)


def baseline_of(group: dict, op: str = "") -> Optional[str]:
    return next((b for b in baselines(op) if b in group), None)


def constant_shape(records: list) -> str:
    varying = set(varying_keys(records))
    shape = records[0]["shape"] if records else {}
    return ", ".join(f"{k}={_fmt_value(v)}" for k, v in shape.items() if k not in varying)


# ----------------------------------------------------------------------------- formatting


def _ms(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.4g}" if v < 100 else f"{v:.1f}"


def _mib(b: Optional[int]) -> str:
    return "-" if b is None else f"{b / MiB:.1f}"


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def _table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _env_table(data: dict) -> str:
    env = data["env"]
    commit = env.get("commit") or "none (uncommitted tree)"
    if env.get("dirty"):
        commit += " (+ uncommitted changes)"
    bw = env.get("copy_bandwidth_bytes_per_s")
    rows = [
        ("device", env.get("device")),
        ("torch / triton / CUDA", f"{env.get('torch')} / {env.get('triton')} / {env.get('cuda')}"),
        ("commit", commit),
        ("created", data.get("created")),
        ("scope", data.get("scope")),
        ("copy bandwidth", f"{bw / 1e12:.2f} TB/s (device-to-device copy, read + write)" if bw else "-"),
        ("TF32 matmul / cuDNN", f"{env.get('tf32_matmul')} / {env.get('tf32_cudnn')}"),
    ]
    nv = env.get("nvml") or {}
    if nv:
        rows.append(("driver / max SM clock", f"{nv.get('driver')} / {nv.get('sm_clock_max_mhz')} MHz"))
    return _table(["", ""], rows)


def op_section(data: dict, op: str) -> str:
    """Full per-case table of one op: time, speedup, memory, floor, check."""
    records = _ok(data, op)
    if not records:
        return ""
    rows = []
    for (label, dtype, mode), group in groups(records).items():
        base = baseline_of(group, op)
        for name, r in group.items():
            floor = r.get("floor") or {}
            check = r.get("check")
            rows.append([
                label, dtype, mode, name, _ms(r["time_ms"]["median"]),
                f"{_ratio(group[base]['time_ms']['median'], r['time_ms']['median'])} vs {base}" if base else "-",
                _mib((r.get("memory") or {}).get("extra_bytes")),
                _mib((r.get("memory") or {}).get("work_bytes")),
                _ms(floor.get("ms")),
                f"{100 * floor['share']:.0f}%" if floor.get("share") else "-",
                "-" if not check else f"{check['rel_err']:.1e}" + ("" if check["ok"] else " FAIL"),
            ])
    header = ["shape", "dtype", "mode", "provider", "median ms", "speedup",
              "peak extra MiB", "work MiB", "HBM floor ms", "% of floor", "rel err"]
    note = (f"{constant_shape(records)}. Speedup: the baseline's median over this one, baseline = the "
            f"first present of {', '.join(baselines(op))}. Peak extra: peak allocated above the call's inputs, "
            f"returned tensors included; work: peak extra minus the returned tensors (outputs, or the input "
            f"gradients in backward modes). rel err: forward output against the check's baseline "
            f"({', '.join(sorted({r['check']['against'] for r in records if r.get('check')})) or 'none here'}). "
            f"Cases that did not run are under 'Not run'.")
    return f"## {op}\n\n{note}\n\n" + _table(header, rows) + "\n"


def model_label(shape: dict) -> str:
    """'resnet50 Q100 1024px batch 2' from a model case's shape."""
    return (f"{shape.get('backbone')} Q{shape.get('queries')} {shape.get('image')}px "
            f"batch {shape.get('batch')}")


def model_groups(records: list) -> "OrderedDict":
    """(model label, dtype) -> {provider: record}, in run order."""
    out: OrderedDict = OrderedDict()
    for r in records:
        out.setdefault((model_label(r["shape"]), r["dtype"]), OrderedDict())[r["provider"]] = r
    return out


def model_rows(data: dict) -> tuple:
    """(train rows, ratio rows, inference rows) of the model cases."""
    records = _all(data, "model")
    train = [r for r in records if r["mode"] == "train"]
    infer = [r for r in records if r["mode"] == "infer"]
    train_rows, ratio_rows, infer_rows = [], [], []
    for (label, dtype), group in model_groups(train).items():
        mem, step = {}, {}
        for name, r in group.items():
            if r["status"] != "ok":
                train_rows.append([label, dtype, name, r["status"], r["status"]])
                continue
            batch = r["shape"].get("batch", 1)
            foot = (r.get("memory") or {}).get("footprint_bytes")
            mem[name] = foot / batch / GB if foot is not None else None
            step[name] = r["time_ms"]["median"]
            train_rows.append([label, dtype, name, _ms(step[name]), "-" if mem[name] is None else f"{mem[name]:.2f}"])
        a, b, c = TRAIN_CONFIGS
        d = MASK_FREE
        ratio_rows.append([
            label, dtype,
            _ratio(mem.get(a), mem.get(b)), f"{PAPER_MEMORY_RATIO:.0f}x",
            _ratio(mem.get(b), mem.get(c)), _ratio(mem.get(a), mem.get(c)), _ratio(mem.get(a), mem.get(d)),
            _ratio(step.get(a), step.get(b)), _ratio(step.get(b), step.get(c)), _ratio(step.get(a), step.get(c)),
            _ratio(step.get(b), step.get(d)), _ratio(step.get(b), step.get(COMPILED)),
            _ratio(step.get(b), step.get(CUDA_GRAPH)), _ratio(step.get(d), step.get(CUDA_GRAPH)),
        ])
    for (label, dtype), group in model_groups(infer).items():
        ref = _ok_median(group.get("reference"))
        for name, r in group.items():
            if r["status"] != "ok":
                infer_rows.append([label, dtype, name, r["status"], "-"])
                continue
            batch = r["shape"].get("batch", 1)
            infer_rows.append([label, dtype, name, _ms(r["time_ms"]["median"] / batch),
                               _ratio(ref, r["time_ms"]["median"])])
    return train_rows, ratio_rows, infer_rows


def model_section(data: dict, heading: str = "## {}") -> str:
    train_rows, ratio_rows, infer_rows = model_rows(data)
    if not (train_rows or infer_rows):
        return ""
    parts = [heading.format("Mask2Former training step and inference (the 3x claim)") + "\n",
             "Configs: (a) whole-mask matching and losses, reference kernels; (b) point-sampled, "
             "reference kernels (the official code path); (c) point-sampled, fused kernels; (d) "
             "point + mask-free (fused, no mask logits built); (e) (d) compiled; (f) (d) as one "
             "CUDA graph. "
             "Memory is the peak allocated during one step above what was allocated before the "
             "case (model, optimizer state, inputs and activations), divided by the batch.\n"]
    if train_rows:
        parts.append(_table(["model", "dtype", "config", "step ms", "peak GB / image"], train_rows))
        parts.append("\n" + _table(
            ["model", "dtype", "memory a/b", "paper a/b", "memory b/c", "memory a/c", "memory a/d",
             "time a/b", "time b/c", "time a/c", "time b/d", "time b/e", "time b/f", "time d/f"], ratio_rows))
    if infer_rows:
        parts.append("\nInference latency per image:\n\n" + _table(
            ["model", "dtype", "kernels", "ms / image", "speedup vs reference"], infer_rows))
    return "\n".join(parts) + "\n"


def skipped_section(data: dict) -> str:
    rows = [[r["op"], r["provider"], r.get("label") or shape_label(r["shape"], list(r["shape"])), r["dtype"], r["mode"],
             r["status"], r.get("reason", "").replace("|", "/").replace("\n", " ")[:300]]
            for r in data["cases"] if r["status"] != "ok"]
    if not rows:
        return ""
    return "## Not run\n\n" + _table(["op", "provider", "shape", "dtype", "mode", "status", "reason"], rows) + "\n"


def markdown(data: dict) -> str:
    """The full summary of one run."""
    parts = [
        f"# Benchmark results: {data['env'].get('device')}\n",
        _env_table(data) + "\n",
        f"Times: medians of {data['env'].get('timer', 'CUDA events')} timings of one call each (L2 flushed "
        "before every op call, not before a model step, which is far larger than L2; several input sets in "
        "rotation; warm-up, compilation and CUDA-graph capture excluded). Peak extra: "
        "torch.cuda.max_memory_allocated during the call minus what was allocated when it "
        "started (its inputs; for bwd also the saved forward). HBM floor: bytes the op must "
        "move / measured copy bandwidth; % of floor = floor / measured time.\n",
    ]
    parts += [op_section(data, op) for op in ops_in(data) if op != "model"]
    parts += [model_section(data), skipped_section(data)]
    return "\n".join(p for p in parts if p)


def readme_tables(data: dict) -> str:
    """Compact tables for the README: per op, providers side by side (ms; peak extra MiB)."""
    env = data["env"]
    parts = [f"Measured on {env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}, "
             f"CUDA {env.get('cuda')}, commit {env.get('commit') or 'uncommitted'}"
             f"{' + uncommitted changes' if env.get('dirty') else ''} ({data.get('created')}).\n"]
    for op in ops_in(data):
        records = _all(data, op)
        if op == "model" or not records:
            continue
        grouped = groups(records)
        providers = list(OrderedDict.fromkeys(r["provider"] for r in records))
        rows = []
        for (label, dtype, mode), group in grouped.items():
            floor = next((r["floor"]["ms"] for r in group.values() if (r.get("floor") or {}).get("ms")), None)
            cells = []
            for p in providers:
                r = group.get(p)
                if r is None:
                    cells.append("-")
                    continue
                if r["status"] != "ok":
                    cells.append(r["status"])
                    continue
                mem = (r.get("memory") or {}).get("extra_bytes")
                failed = r.get("check") is not None and not r["check"]["ok"]
                cells.append(_ms(r["time_ms"]["median"]) + ("" if mem is None else f" ({_mib(mem)})")
                             + (" FAIL" if failed else ""))
            rows.append([label, dtype, mode] + cells + [_ms(floor)])
        parts.append(f"**{op}** ({constant_shape(records)}): median ms (peak extra MiB); FAIL: the output "
                     f"failed the check against the baseline; skipped / oom / error: not run (the reason "
                     f"is in the run's summary)\n\n"
                     + _table(["shape", "dtype", "mode"] + providers + ["HBM floor ms"], rows) + "\n")
    parts.append(model_section(data, heading="**{}**"))
    return "\n".join(parts)


# ----------------------------------------------------------------------------- charts


def charts(data: dict, out_dir, prefix: str) -> list:
    """Bar charts (PNG) of time and memory per provider for each op; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for op in ops_in(data):
        records = _all(data, op)
        if not _ok(data, op):
            continue
        grouped = groups(records)
        labels = [f"{model_label(next(iter(g.values()))['shape']) if op == 'model' else label}\n{dtype} {mode}"
                  for (label, dtype, mode), g in grouped.items()]
        providers = list(OrderedDict.fromkeys(r["provider"] for r in records))
        metrics = [("time", "median ms", lambda r: r["time_ms"]["median"])]
        if op == "model":
            metrics.append(("memory", "peak GB per image", _per_image_gb))
        else:
            metrics.append(("memory", "peak extra MiB", lambda r: (r.get("memory") or {}).get("extra_bytes", 0) / MiB
                            if r.get("memory") else None))
        for name, ylabel, value in metrics:
            fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) * max(1, len(providers)) / 3), 4.5))
            width = 0.8 / max(1, len(providers))
            for i, p in enumerate(providers):
                xs = [x + i * width for x in range(len(labels))]
                ys, notes = [], []
                for g in grouped.values():  # no bar (not a zero one) where there is no number
                    r = g.get(p)
                    y = value(r) if r is not None and r["status"] == "ok" else None
                    ys.append(math.nan if y is None else y)
                    notes.append(None if r is None or y is not None else
                                 r["status"] if r["status"] != "ok" else "n/a")
                ax.bar(xs, ys, width, label=p)
                for x, note in zip(xs, notes):
                    if note:
                        ax.text(x, 0.01, note, transform=ax.get_xaxis_transform(), rotation=90,
                                ha="center", va="bottom", fontsize=6)
            ax.set_xticks([x + width * (len(providers) - 1) / 2 for x in range(len(labels))])
            ax.set_xticklabels(labels, fontsize=7, rotation=45, ha="right")
            ax.set_ylabel(ylabel)
            if name == "time" and op != "model":
                ax.set_yscale("log")
            ax.set_title(f"{op}: {ylabel} ({data['env'].get('device')})", fontsize=9)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / f"{prefix}-{op}-{name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def _per_image_gb(r: dict) -> Optional[float]:
    foot = (r.get("memory") or {}).get("footprint_bytes")
    return None if foot is None else foot / r["shape"].get("batch", 1) / GB


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    from .results import load

    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    parser.add_argument("result", help="a bench/results/*.json file")
    parser.add_argument("--out", help="output directory (default: beside the JSON)")
    parser.add_argument("--no-charts", action="store_true", help="markdown only")
    args = parser.parse_args(argv)
    path = Path(args.result)
    try:
        data = load(path)
    except (OSError, ValueError) as e:  # no file, not JSON, or not of the schema (one problem a line)
        parser.error(str(e).replace(":\n  ", ": ").replace("\n  ", "; "))
    out = Path(args.out) if args.out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{path.stem}.md").write_text(markdown(data))
    written = [out / f"{path.stem}.md"]
    if not args.no_charts:
        written += charts(data, out, path.stem)
    print(readme_tables(data))
    print("\nwrote: " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # `python bench/report.py`: make `bench` importable
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from bench.report import main as _main

        sys.exit(_main())
    sys.exit(main())

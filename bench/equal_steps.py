"""Training variants compared at equal steps over seeds: does a change keep the model's quality?

    python -m bench.equal_steps mask-logits mask-free                   # the mask-free head
    python -m bench.equal_steps reference cuda-graph --train-args="--preset small --amp bf16"   # the CUDA graph (GPU)
    python -m bench.equal_steps reference mine="--kernels fused --model dec_layers=6" --seeds 0 1

Each variant (a name of :data:`VARIANTS` or ``NAME="m2f.train flags"``) trains once per
seed with ``python -m m2f.train`` (a child process each; default: the built-in ``shapes``
data, ``--preset tiny``), all with the same ``--train-args``, steps and evaluation points.
The first variant is the baseline. For each variant the final ``--metric`` (default PQ)
over the seeds gives mean / min / max, and the verdict against the baseline's seeds:
``within`` its spread, ``above`` or ``below`` it (the variant's mean against the
baseline's min and max).

Writes ``<device>-<date>-equal-steps.json``, ``.md`` and ``.png`` (the metric against step,
one line per seed, and the final values) to ``--out`` (default bench/results), rewritten
after every run. The runs themselves go to ``--runs`` (default runs/equal_steps/<variant>/
seed<S>; checkpoints there are kept to one per run): a run folder that already holds a
checkpoint of the same flags is resumed, so rerunning an interrupted command (Ctrl-C or
SIGTERM: the run in progress checkpoints first) continues where it stopped and a finished
run is read back, not trained again; a folder of other flags is refused before anything runs. A failed run is recorded with the last line it printed and the others go on.
Exit status: 0 when every run finished, 1 when one failed, 130 on Ctrl-C, 2 on bad
arguments.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .results import REPO_ROOT, atomic_write, environment, result_path

SCHEMA = "m2f-equal-steps/1"
METRICS = ("PQ", "mIoU", "AP")
# m2f.train flags of the named variants (more flags for all of them: --train-args)
VARIANTS: Dict[str, List[str]] = {
    "reference": ["--kernels", "reference"],  # the official path: per-image scipy matcher, mask logits
    "fused": ["--kernels", "fused"],  # the fused defaults: device solver, static criterion, mask-free head
    "mask-free": ["--kernels", "fused", "--model", "mask_head=points"],
    "mask-logits": ["--kernels", "fused", "--model", "mask_head=logits"],
    "compiled": ["--kernels", "fused", "--compile"],
    # the whole step as one CUDA graph (GPU): max_targets holds every segment of a shapes image
    "cuda-graph": ["--kernels", "fused", "--cuda-graph", "--model", "max_targets=8"],
}
# flags the tool sets itself for every run
COMMAND_FILE = "equal_steps.json"  # a run folder's training flags, to resume only the same run
OWN_FLAGS = ("--seed", "--out", "--steps", "--eval-every", "--resume", "--keep-checkpoints", "--device")


class ArgumentError(Exception):
    """A bad argument: one line, exit status 2."""


# ----------------------------------------------------------------------------- arguments

def parse_variant(text: str) -> tuple:
    """``NAME`` (one of VARIANTS) or ``NAME=FLAGS`` -> (name, [m2f.train flags])."""
    name, sep, flags = text.partition("=")
    name = name.strip()
    if not name or "/" in name or name.startswith("."):
        raise ArgumentError(f"variant {text!r}: a name (letters, digits, '-'), optionally =\"m2f.train flags\"")
    if not sep:
        if name not in VARIANTS:
            raise ArgumentError(f"unknown variant {name!r}: one of {', '.join(VARIANTS)}, or NAME=\"m2f.train flags\"")
        return name, list(VARIANTS[name])
    try:
        return name, _checked_flags(shlex.split(flags), f"variant {name!r}")
    except ValueError as e:
        raise ArgumentError(f"variant {name!r}: {e}") from None


def _checked_flags(flags: List[str], what: str) -> List[str]:
    for flag in flags:
        if flag.split("=", 1)[0] in OWN_FLAGS:
            raise ArgumentError(f"{what}: {flag.split('=', 1)[0]} is set by bench.equal_steps "
                                f"(its own --seeds / --steps / --eval-every / --runs / --device)")
    return flags


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.equal_steps", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", metavar="VARIANT",
                   help=f"the baseline first; a name ({', '.join(VARIANTS)}) or NAME=\"m2f.train flags\"")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: 0 1 2")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps of every run (default: the preset's)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate every N steps for the curves (default: 5 points if --steps is given, "
                        "else at the end only)")
    p.add_argument("--train-args", default="--preset tiny",
                   help="m2f.train flags of every run (default: \"--preset tiny\")")
    p.add_argument("--metric", choices=METRICS, default="PQ", help="the compared metric (default: PQ)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--runs", default="runs/equal_steps", help="the run folders' parent (default: runs/equal_steps)")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"), help="result folder (default: bench/results)")
    args = p.parse_args(argv)
    try:
        args.variants = [parse_variant(v) for v in args.variants]
        names = [n for n, _ in args.variants]
        if len(set(names)) != len(names):
            raise ArgumentError(f"variant names repeat: {' '.join(names)}")
        try:
            args.train_args = _checked_flags(shlex.split(args.train_args), "--train-args")
        except ValueError as e:
            raise ArgumentError(f"--train-args: {e}") from None
        if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
            raise ArgumentError(f"--seeds: distinct non-negative integers, got {args.seeds}")
        if args.steps is not None and args.steps < 1:
            raise ArgumentError(f"--steps: at least 1, got {args.steps}")
        if args.eval_every is not None and args.eval_every < 0:
            raise ArgumentError(f"--eval-every: at least 0, got {args.eval_every}")
        if args.eval_every is None and args.steps is not None:
            args.eval_every = max(1, args.steps // 5)
        if args.device is None:
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        elif torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
            raise ArgumentError(f"--device {args.device}: no CUDA GPU here (torch.cuda.is_available() is False)")
        args.runs = os.path.abspath(args.runs)
    except ArgumentError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    return args


# ----------------------------------------------------------------------------- one run

def run_folder(runs: str, variant: str, seed: int) -> str:
    return os.path.join(runs, variant, f"seed{seed}")


def run_flags(flags: Sequence[str], common: Sequence[str], seed: int, out: str, steps: Optional[int]) -> List[str]:
    """The m2f.train flags that define one run (what a resumed run must have been started with)."""
    return [*common, *flags, "--seed", str(seed), "--out", out] + (["--steps", str(steps)] if steps else [])


def check_run_folder(out: str, run: List[str]) -> bool:
    """True where ``out`` holds a checkpoint of the run ``run`` (resume it), False where it
    holds none (start it); a run of other flags is an ArgumentError."""
    from m2f.checkpoint import checkpoint_files

    if not checkpoint_files(out):
        return False
    saved = None
    if os.path.exists(os.path.join(out, COMMAND_FILE)):
        with open(os.path.join(out, COMMAND_FILE)) as f:
            saved = json.load(f).get("flags")
    if saved != run:
        raise ArgumentError(f"{out} holds a run of other flags ({shlex.join(saved) if saved else 'unknown'}): "
                            f"delete it or choose another --runs")
    return True


def train_command(run: List[str], out: str, resume: bool, args) -> List[str]:
    """The m2f.train command: ``run``'s flags for a new run (recorded in ``out``), or
    ``--resume`` (m2f.train takes the rest from the checkpoint)."""
    own = ["--device", args.device, "--keep-checkpoints", "1"]
    if args.eval_every is not None:
        own += ["--eval-every", str(args.eval_every)]
    if resume:
        return [sys.executable, "-m", "m2f.train", "--out", out, "--resume", *own]
    os.makedirs(out, exist_ok=True)
    atomic_write(Path(out) / COMMAND_FILE, json.dumps({"flags": run}) + "\n")
    return [sys.executable, "-m", "m2f.train", *run, *own]


def is_complete(out: str) -> bool:
    run = read_run(out)
    return bool(run["curve"]) and run["steps"] is not None and run["curve"][-1][0] >= run["steps"]


def read_run(out: str) -> dict:
    """What a run folder's metrics.jsonl says: evaluations by step, last logged speed, steps."""
    from m2f.plots import read_log

    log = os.path.join(out, "metrics.jsonl")
    records = read_log(log) if os.path.exists(log) else []
    evals = [(r["step"], r["eval"]) for r in records if "eval" in r]
    speeds = [r["it_s"] for r in records if "it_s" in r]
    config = {}
    if os.path.exists(os.path.join(out, "config.json")):
        with open(os.path.join(out, "config.json")) as f:
            config = json.load(f)
    return {"curve": evals, "it_s": speeds[-1] if speeds else None, "steps": config.get("steps")}


def last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def train_once(cmd: List[str], out: str) -> dict:
    """Run one training to its end (its output to ``out``/equal_steps.log) -> its record.

    The child runs in its own session, so a terminal's Ctrl-C reaches this process only:
    on KeyboardInterrupt the child gets one SIGINT (m2f.train finishes the step and writes
    a checkpoint), is waited for, and the interrupt is raised again."""
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "equal_steps.log")
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = child.wait()
        except KeyboardInterrupt:
            stop_child(child)
            raise
    record = {"out": out, "command": cmd[1:], "wall_s": round(time.perf_counter() - start, 1), **read_run(out)}
    final = record["curve"][-1] if record["curve"] else None
    if code == 0 and final is not None and (record["steps"] is None or final[0] >= record["steps"]):
        record.update(status="ok", final=final[1])
    else:
        record.update(status="failed", final=None,
                      error=f"exit status {code}: {last_line(log_path) or '(no output)'}")
    return record


def stop_child(child: subprocess.Popen, grace_s: float = 120.0) -> None:
    """SIGINT (a checkpoint, then exit), SIGTERM after ``grace_s``, SIGKILL 30 s later; a
    second Ctrl-C meanwhile is passed on (m2f.train then stops at once)."""
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 30.0), (signal.SIGKILL, None)):
        child.send_signal(sig)
        while True:
            try:
                child.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                break
            except KeyboardInterrupt:
                child.send_signal(signal.SIGINT)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


# ----------------------------------------------------------------------------- summary

def summarize(values: Sequence[float]) -> Optional[dict]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return {"n": len(values), "mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def verdict(variant: Optional[dict], baseline: Optional[dict]) -> Optional[str]:
    """'within' / 'above' / 'below' the baseline's seed spread (the variant's mean against
    the baseline's min and max), None without both."""
    if variant is None or baseline is None:
        return None
    if variant["mean"] < baseline["min"]:
        return "below"
    return "above" if variant["mean"] > baseline["max"] else "within"


def finish(data: dict) -> dict:
    """Fill in each variant's summary and verdict from its runs (in place)."""
    metric = data["settings"]["metric"]
    variants = data["variants"]
    for v in variants.values():
        v["summary"] = summarize([r["final"].get(metric) for r in v["runs"].values() if r.get("final")])
    base = variants[data["settings"]["baseline"]]["summary"]
    for name, v in variants.items():
        v["verdict"] = None if name == data["settings"]["baseline"] else verdict(v["summary"], base)
    return data


def markdown(data: dict) -> str:
    s, env, metric = data["settings"], data["env"], data["settings"]["metric"]
    lines = [f"# {metric} at equal steps: {', '.join(data['variants'])}", "",
             f"{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env.get('commit')}"
             + (" + uncommitted changes" if env.get("dirty") else "") + f", {data['created']}", "",
             f"Every run: `python -m m2f.train {shlex.join(s['train_args'])}` + the variant's flags, "
             f"seeds {', '.join(map(str, s['seeds']))}, "
             + (f"{s['steps']} steps" if s["steps"] is not None else "the preset's steps")
             + (f", evaluated every {s['eval_every']}" if s['eval_every'] else "") + ". "
             f"Baseline: `{s['baseline']}`; verdict: the variant's mean against the baseline's seed range.", "",
             f"| variant | flags | {metric} per seed | mean | min - max | vs baseline | it/s (mean) | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, v in data["variants"].items():
        per_seed = []
        for seed in s["seeds"]:
            r = v["runs"].get(str(seed))
            if r is None:
                per_seed.append(f"{seed}: not run")
            elif r.get("final"):
                per_seed.append(f"{seed}: {r['final'].get(metric, float('nan')):.1f}")
            else:
                per_seed.append(f"{seed}: {r['status']}")
        sm = v["summary"]
        speeds = [r["it_s"] for r in v["runs"].values() if r.get("it_s")]
        walls = [r["wall_s"] for r in v["runs"].values() if r.get("wall_s") is not None]
        spread = f"{sm['mean']:.1f} | {sm['min']:.1f} - {sm['max']:.1f}" if sm else "- | -"
        against = v["verdict"] or ("baseline" if name == s["baseline"] else "-")
        speed = f"{sum(speeds) / len(speeds):.2f}" if speeds else "-"
        lines.append(f"| {name} | `{shlex.join(v['flags'])}` | {', '.join(per_seed)} | {spread} | {against} "
                     f"| {speed} | {sum(walls):.0f} |")
    failed = [(n, seed, r["error"]) for n, v in data["variants"].items() for seed, r in v["runs"].items()
              if r.get("error")]
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- {n} seed {seed}: {err}" for n, seed, err in failed]
    return "\n".join(lines) + "\n"


def plot(data: dict, png: Path) -> None:
    """The metric against step (a line per run) and the final values per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = data["settings"]["metric"]
    fig, (curve_ax, final_ax) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, v) in enumerate(data["variants"].items()):
        color = colors[i % len(colors)]
        for j, r in enumerate(v["runs"].values()):
            points = [(step, m[metric]) for step, m in r.get("curve", []) if metric in m]
            if points:
                curve_ax.plot(*zip(*points), color=color, marker="o", ms=3, alpha=0.8, label=name if j == 0 else None)
        finals = [r["final"][metric] for r in v["runs"].values() if r.get("final") and metric in r["final"]]
        final_ax.scatter([i] * len(finals), finals, color=color, zorder=3)
        if v["summary"]:
            final_ax.hlines(v["summary"]["mean"], i - 0.25, i + 0.25, color=color, lw=2)
    base = data["variants"][data["settings"]["baseline"]]["summary"]
    if base:
        final_ax.axhspan(base["min"], base["max"], color="0.85", zorder=0, label="baseline seed range")
        final_ax.legend(loc="lower right")
    curve_ax.set(xlabel="step", ylabel=metric, title=f"{metric} during training")
    curve_ax.grid(alpha=0.3)
    if curve_ax.get_legend_handles_labels()[0]:
        curve_ax.legend()
    final_ax.set(xticks=range(len(data["variants"])), xticklabels=list(data["variants"]), ylabel=metric,
                 title=f"final {metric} per seed (bar: mean)")
    final_ax.grid(alpha=0.3, axis="y")
    s = data["settings"]
    fig.suptitle(f"{data['env']['device']}: m2f.train {' '.join(s['train_args'])}"
                 + (f", {s['steps']} steps" if s["steps"] else "") + f", seeds {', '.join(map(str, s['seeds']))}",
                 fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write(data: dict, path: Path) -> None:
    finish(data)
    atomic_write(path, json.dumps(data, indent=1) + "\n")
    atomic_write(path.with_suffix(".md"), markdown(data))
    plot(data, path.with_suffix(".png"))


# ----------------------------------------------------------------------------- the command

def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    path = result_path(Path(args.out), env["device"], "equal-steps")
    data = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "env": env,
        "settings": {"seeds": args.seeds, "steps": args.steps, "eval_every": args.eval_every,
                     "train_args": args.train_args, "metric": args.metric, "baseline": args.variants[0][0],
                     "runs": args.runs},
        "variants": {name: {"flags": flags, "runs": {}} for name, flags in args.variants},
    }
    plan = []  # seeds outermost: an early stop still compares the variants
    try:
        for seed in args.seeds:
            for name, flags in args.variants:
                out = run_folder(args.runs, name, seed)
                run = run_flags(flags, args.train_args, seed, out, args.steps)
                plan.append((name, seed, out, run, check_run_folder(out, run)))
    except ArgumentError as e:
        print(f"bench.equal_steps: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"bench.equal_steps: {len(plan)} runs ({len(args.variants)} variants x {len(args.seeds)} seeds) on "
          f"{env['device']}; results: {path.with_suffix('')}.json/.md/.png", flush=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # `timeout` / a scheduler stops us like Ctrl-C
    try:
        for i, (name, seed, out, run, resume) in enumerate(plan, 1):
            state = "" if not resume else " (finished before)" if is_complete(out) else " (resuming)"
            print(f"[{i}/{len(plan)}] {name} seed {seed}{state} ...", end=" ", flush=True)
            record = train_once(train_command(run, out, resume, args), out)
            data["variants"][name]["runs"][str(seed)] = record
            write(data, path)
            if record["final"]:
                print(f"{args.metric} {record['final'].get(args.metric, float('nan')):.1f} "
                      f"({record['wall_s']:.0f} s)", flush=True)
            else:
                print(f"failed: {record['error']} (log: {out}/equal_steps.log)", flush=True)
    except KeyboardInterrupt:
        write(data, path)
        print(f"\nbench.equal_steps: interrupted; finished runs are in {path}; the same command resumes",
              file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(markdown(data), flush=True)
    failed = any(r["status"] != "ok" for v in data["variants"].values() for r in v["runs"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

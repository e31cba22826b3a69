"""Result files: the run's environment, the JSON schema, and writing/loading/validating.

A result file is ``bench/results/<device>-<date>[-<scope>][-<n>].json``::

    {"schema": "m2f-bench/1", "created": ISO time, "scope": "quick|default|full",
     "env": {device, torch, triton, cuda, commit, ...},
     "cases": [record, ...]}          # records from bench.harness.run_case / base_record

with a markdown summary of the same name (``.md``) beside it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from .harness import MODES, STATUSES

SCHEMA = "m2f-bench/1"
REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_REQUIRED = ("device", "torch", "triton", "cuda", "commit", "python")


def git_commit(root: Path = REPO_ROOT) -> dict:
    """{'commit': sha or None, 'dirty': bool or None} of the working tree (read-only git calls).

    The environment variable M2F_BENCH_COMMIT, where set, names the commit instead: a GPU
    machine is given a copy of the files whose .git may be missing or stale (naming an
    older commit than the files it runs).
    """
    if os.environ.get("M2F_BENCH_COMMIT"):
        return {"commit": os.environ["M2F_BENCH_COMMIT"], "dirty": None}

    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if sha is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": sha, "dirty": None if status is None else bool(status)}


def environment(device: torch.device, **extra) -> dict:
    """Everything a number depends on: device, versions, commit, precision flags."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "argv": sys.argv[1:],
        **git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_total_bytes": props.total_memory,
        })
    env.update(extra)
    return env


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def result_path(directory: Path, device: str, scope: str, when: Optional[_dt.datetime] = None) -> Path:
    """A new ``<device>-<date>[-<scope>].json`` path in ``directory`` (``-2``, ``-3``... if taken)."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    stem = f"{slug(device)}-{when:%Y-%m-%d}" + ("" if scope == "default" else f"-{scope}")
    path = Path(directory) / f"{stem}.json"
    n = 2
    while path.exists() or path.with_suffix(".md").exists():
        path = Path(directory) / f"{stem}-{n}.json"
        n += 1
    return path


class Results:
    """The run's collector: records in run order, written after every case.

    Writing after every case means a run cut short still leaves every finished number.
    """

    def __init__(self, env: dict, scope: str, path: Path) -> None:
        self.data = {
            "schema": SCHEMA,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "scope": scope,
            "env": env,
            "cases": [],
        }
        self.path = Path(path)

    def add(self, record: dict) -> None:
        self.data["cases"].append(record)
        self.write()

    def write(self) -> None:
        from .report import markdown  # report imports matplotlib lazily; this stays light

        write_json(self.data, self.path)
        atomic_write(self.path.with_suffix(".md"), markdown(self.data))


def atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(data: dict, path: Path) -> None:
    problems = validate(data)
    if problems:
        raise ValueError("result data does not match the schema:\n  " + "\n  ".join(problems))
    atomic_write(path, json.dumps(data, indent=1, allow_nan=True) + "\n")


def load(path) -> dict:
    """Read and validate a result file (ValueError listing every problem)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from e
    problems = validate(data)
    if problems:
        raise ValueError(f"{path} does not match schema {SCHEMA}:\n  " + "\n  ".join(problems))
    return data


def validate(data) -> list:
    """Every way ``data`` departs from the schema (empty list: valid)."""
    problems = []
    if not isinstance(data, dict):
        return ["top level is not an object"]
    if data.get("schema") != SCHEMA:
        problems.append(f"schema is {data.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("created", "scope"):
        if not isinstance(data.get(key), str):
            problems.append(f"{key!r} missing or not a string")
    env = data.get("env")
    if not isinstance(env, dict):
        problems.append("'env' missing or not an object")
    else:
        problems += [f"env.{k} missing" for k in ENV_REQUIRED if k not in env]
    cases = data.get("cases")
    if not isinstance(cases, list):
        return problems + ["'cases' missing or not a list"]
    for i, record in enumerate(cases):
        problems += [f"cases[{i}]: {p}" for p in _validate_record(record)]
    return problems


def _validate_record(r) -> list:
    if not isinstance(r, dict):
        return ["not an object"]
    problems = []
    for key in ("key", "op", "provider", "label", "dtype", "mode", "status"):
        if not isinstance(r.get(key), str):
            problems.append(f"{key!r} missing or not a string")
    if not isinstance(r.get("shape"), dict):
        problems.append("'shape' missing or not an object")
    if r.get("mode") not in MODES:
        problems.append(f"mode {r.get('mode')!r} not in {MODES}")
    status = r.get("status")
    if status not in STATUSES:
        problems.append(f"status {status!r} not in {STATUSES}")
    elif status != "ok":
        if not isinstance(r.get("reason"), str):
            problems.append(f"a {status} record needs a 'reason' string")
        return problems
    t = r.get("time_ms")
    if not isinstance(t, dict):
        return problems + ["an ok record needs 'time_ms'"]
    for key in ("median", "min", "mean", "stdev", "p20", "p80"):
        if not isinstance(t.get(key), (int, float)):
            problems.append(f"time_ms.{key} missing or not a number")
    if not isinstance(t.get("rounds"), int) or t.get("rounds", 0) < 1:
        problems.append("time_ms.rounds must be a positive integer")
    mem = r.get("memory")
    if mem is not None:
        for key in ("case_base_bytes", "call_base_bytes", "peak_bytes", "extra_bytes", "footprint_bytes"):
            if not isinstance(mem.get(key), int):
                problems.append(f"memory.{key} missing or not an integer")
        for key in ("returned_bytes", "work_bytes"):  # optional: results before they were recorded lack them
            if key in mem and not isinstance(mem[key], int):
                problems.append(f"memory.{key} not an integer")
    floor = r.get("floor")
    if floor is not None and not isinstance(floor.get("bytes"), int):
        problems.append("floor.bytes missing or not an integer")
    check = r.get("check")
    if check is not None:
        for key in ("against", "rel_err", "tolerance", "ok"):
            if key not in check:
                problems.append(f"check.{key} missing")
    for key in ("nvml", "metrics"):
        if key not in r:
            problems.append(f"{key!r} missing (may be null / empty)")
    return problems

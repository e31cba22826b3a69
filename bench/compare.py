"""Compare two result files (before / after a change) case by case.

    python -m bench.compare OLD.json NEW.json [--op OP] [--provider NAME]

Prints, for every case measured in both, the old and new median time, the speedup
old/new (> 1: the new run is faster), the peak-memory ratio new/old, and per
(op, provider) the geometric mean speedup. Cases in only one file are listed, and so are
cases in both that did not run ok in one or both (``ok -> oom``; skipped in both: not listed).
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Optional


def _index(data: dict) -> "OrderedDict":
    return OrderedDict((r["key"], r) for r in data["cases"] if r["status"] == "ok")


def _peak(r: dict) -> Optional[int]:
    mem = r.get("memory") or {}
    return mem.get("footprint_bytes") if r["op"] == "model" else mem.get("extra_bytes")


def compare(old: dict, new: dict, op: Optional[str] = None, provider: Optional[str] = None) -> dict:
    """{'rows': [...], 'only_old': [keys], 'only_new': [keys], 'status_changed': [(key, old status,
    new status)], 'geomean': {(op, provider): x}}."""
    a, b = _index(old), _index(new)
    old_all = {r["key"]: r for r in old["cases"]}
    new_all = {r["key"]: r for r in new["cases"]}

    def wanted(r: dict) -> bool:
        return (op is None or r["op"] == op) and (provider is None or r["provider"] == provider)

    rows, logs = [], OrderedDict()
    for key, r_old in a.items():
        r_new = b.get(key)
        if r_new is None or not wanted(r_old):
            continue
        t_old, t_new = r_old["time_ms"]["median"], r_new["time_ms"]["median"]
        m_old, m_new = _peak(r_old), _peak(r_new)
        speedup = t_old / t_new if t_new > 0 else math.inf
        rows.append({
            "key": key, "op": r_old["op"], "provider": r_old["provider"],
            "label": r_old.get("label") or ",".join(f"{k}={v}" for k, v in r_old["shape"].items()),
            "dtype": r_old["dtype"], "mode": r_old["mode"], "old_ms": t_old, "new_ms": t_new,
            "speedup": speedup,
            "memory_ratio": (m_new / m_old) if m_old and m_new is not None else None,
        })
        if 0 < speedup < math.inf:
            logs.setdefault((r_old["op"], r_old["provider"]), []).append(math.log(speedup))
    return {
        "rows": rows,
        "only_old": [k for k, r in old_all.items() if k not in new_all and wanted(r)],
        "only_new": [k for k, r in new_all.items() if k not in old_all and wanted(r)],
        "status_changed": [(k, r["status"], new_all[k]["status"]) for k, r in old_all.items()
                           if k in new_all and wanted(r)
                           and (r["status"], new_all[k]["status"]) not in (("ok", "ok"), ("skipped", "skipped"))],
        "geomean": {k: math.exp(sum(v) / len(v)) for k, v in logs.items()},
    }


def format_comparison(result: dict) -> str:
    lines = [f"{'op':<18} {'provider':<20} {'shape':<24} {'dtype':<5} {'mode':<8} "
             f"{'old ms':>9} {'new ms':>9} {'speedup':>8} {'mem new/old':>11}"]
    for r in result["rows"]:
        mem = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
        lines.append(f"{r['op']:<18} {r['provider']:<20} {r['label'][:24]:<24} {r['dtype']:<5} {r['mode']:<8} "
                     f"{r['old_ms']:>9.4g} {r['new_ms']:>9.4g} {r['speedup']:>7.2f}x {mem:>11}")
    if result["geomean"]:
        lines.append("\ngeometric mean speedup (old/new):")
        lines += [f"  {op} {prov}: {g:.2f}x" for (op, prov), g in result["geomean"].items()]
    for name in ("only_old", "only_new"):
        if result[name]:
            lines.append(f"\n{len(result[name])} case(s) {name.replace('_', ' in ')}:")
            lines += [f"  {k}" for k in result[name]]
    if result.get("status_changed"):
        lines.append(f"\n{len(result['status_changed'])} case(s) not ok in one or both runs (not compared):")
        lines += [f"  {k}: {s_old} -> {s_new}" for k, s_old, s_new in result["status_changed"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    from .results import load

    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--op")
    parser.add_argument("--provider")
    args = parser.parse_args(argv)
    result = compare(load(args.old), load(args.new), op=args.op, provider=args.provider)
    print(format_comparison(result))
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # `python bench/compare.py`
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from bench.compare import main as _main

        sys.exit(_main())
    sys.exit(main())

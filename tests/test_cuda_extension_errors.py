"""Every raw extension op turns a failed ``TORCH_CHECK`` into a Python RuntimeError.

On the GPU image an exception thrown inside m2f_kernels._C once killed the process with
SIGSEGV instead (bench/notes/cuda.md). So the calls run in a child process: one child runs
the cases in order; a case that kills it is reported with its exit status, the child's
stderr (faulthandler's trace, the libstdc++ / libgcc_s the process loaded) and, where gdb
exists, the native backtrace of that case alone under ``gdb -batch -ex run -ex bt``; the
cases after it run in a fresh child. ``aten.mm`` is the control: torch's own check.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import requires_cuda_backend

pytestmark = requires_cuda_backend

# "namespace.op" -> (arguments, built with z(*shape, dtype=float32) on the GPU; a fragment of
# the expected message). Each input trips one TORCH_CHECK of the op's launch code in csrc/.
CASES = {
    "aten.mm": ("z(2, 3), z(2, 3)", "cannot be multiplied"),
    "m2f_kernels_C.masked_attention_fwd": (
        "z(1, 1, 2, 160), z(1, 1, 3, 160), z(1, 1, 3, 32), z(1, 2, 3, dtype=torch.uint8), 0.1", "head dims"),
    "m2f_kernels_C.masked_attention_bwd": (
        "z(1, 1, 2, 32), z(1, 1, 2, 160), z(1, 1, 3, 160), z(1, 1, 3, 32), z(1, 2, 3, dtype=torch.uint8), "
        "z(1, 1, 2, 32), z(1, 1, 2), 0.1", "head dims"),
    "m2f_kernels_C.ms_deform_attn_fwd": (
        "z(1, 4, 2, 8, dtype=torch.float64), z(1, 2, dtype=torch.int64), z(1, dtype=torch.int64), "
        "z(1, 3, 2, 1, 4, 2), z(1, 3, 2, 1, 4)", "value must be float32, float16 or bfloat16"),
    "m2f_kernels_C.ms_deform_attn_bwd": (
        "z(1, 3, 15), z(1, 4, 2, 8), z(1, 2, dtype=torch.int64), z(1, dtype=torch.int64), "
        "z(1, 3, 2, 1, 4, 2), z(1, 3, 2, 1, 4)", "grad_out must be contiguous [B, Lq, H*D]"),
    "m2f_kernels_C.point_sample_fwd": ("z(1, 1, 4, 4, dtype=torch.int32), z(1, 5, 2)", "input must be float32"),
    "m2f_kernels_C.point_sample_bwd": ("z(1, 1, 5), z(1, 4, 4), z(1, 5, 2)", "input must be [N, C, H, W]"),
    "m2f_kernels_C.uncertain_point_coords": ("z(1, 4, 4), z(1, 6, 2), z(1, 2, 2), 7",
                                             "num_uncertain must be in [0, S = 6], got 7"),
    "m2f_kernels_C.point_mask_loss_fwd": ("z(2, 4, 4), z(2, 4), z(2, 5, 2), 2.0, None, None, None",
                                          "target must be [N, Ht, Wt]"),
    "m2f_kernels_C.point_mask_loss_bwd": ("z(2), z(), z(2, 4, 4), z(2, 4, 4), z(2, 5, 2), 2.0, None, None, None",
                                          "grad_bce and grad_dice must be scalars"),
    "m2f_kernels_C.pairwise_mask_cost": ("z(3, 4, 4), z(2, 4, 4), z(5, 3)", "coords must be [P, 2]"),
}

CHILD = """\
import faulthandler, json, os, sys
faulthandler.enable()
import torch
import m2f_kernels._C  # registers torch.ops.m2f_kernels_C
with open("/proc/self/maps") as maps:
    libs = sorted({line.split()[-1] for line in maps if "libstdc++" in line or "libgcc_s" in line})
print("runtime libraries:", *libs, "TORCH_SHOW_CPP_STACKTRACES=" + os.environ.get("TORCH_SHOW_CPP_STACKTRACES", ""),
      file=sys.stderr, flush=True)

def z(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype, device="cuda")

for name, args, fragment in json.loads(os.environ["M2F_ERROR_CASES"]):
    namespace, op = name.split(".")
    try:
        getattr(getattr(torch.ops, namespace), op)(*eval(f"({args},)"))
        outcome = "returned without raising"
    except RuntimeError as e:
        outcome = "OK" if fragment in str(e) else f"RuntimeError without {fragment!r}: {e}"
    print("RESULT", name, json.dumps(outcome), flush=True)
"""
ROOT = Path(__file__).resolve().parents[1]


def _run(command, cases, timeout):
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "M2F_ERROR_CASES": json.dumps(cases), "DEBUGINFOD_URLS": "", "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _tail(text, lines=60):
    return "\n".join(text.splitlines()[-lines:])


def _gdb_backtrace(script, case):
    """The top of the native backtrace where ``case`` alone kills the child under gdb."""
    gdb = _run(["gdb", "-batch", "-ex", "run", "-ex", "bt", "--args", sys.executable, str(script)], [case], 600)
    lines = gdb.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if "received signal" in line), 0)
    return "\n".join(lines[start:start + 40]) or _tail(gdb.stderr)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """name -> "OK" or what went wrong, from as few child processes (CUDA start-ups) as possible."""
    script = tmp_path_factory.mktemp("extension_errors") / "child.py"
    script.write_text(CHILD)
    todo, found = [[name, *case] for name, case in CASES.items()], {}
    while todo:
        child = _run([sys.executable, str(script)], todo, timeout=300)
        for line in child.stdout.splitlines():
            if line.startswith("RESULT "):
                _, name, outcome = line.split(" ", 2)
                found[name] = json.loads(outcome)
        todo = [case for case in todo if case[0] not in found]
        if not todo:
            break
        died = todo.pop(0)  # the child ended (crashed) while calling this one
        report = f"the child process died (exit status {child.returncode}) in this call; stderr:\n{_tail(child.stderr)}"
        if child.returncode < 0 and shutil.which("gdb"):  # killed by a signal
            report += f"\n--- gdb -batch -ex run -ex bt (this case alone):\n{_gdb_backtrace(script, died)}"
        found[died[0]] = report
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_failed_check_raises_runtime_error(outcomes, name):
    assert outcomes[name] == "OK", f"{name}: {outcomes[name]}"

"""Backend selection: per call, set_backend, the context manager, the environment variable."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import m2f_kernels as mk
from m2f_kernels import _dispatch

from .conftest import INTERPRETING, ON_GPU


@pytest.fixture(autouse=True)
def _clean_default():
    mk.set_backend(None)
    yield
    mk.set_backend(None)


def test_auto_on_cpu_is_reference():
    assert _dispatch.resolve("masked_attention", torch.device("cpu"), torch.float32, "auto") == "reference"


def test_precedence_call_over_scope_over_default(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    assert mk.get_backend() == "triton"
    mk.set_backend("reference")
    assert mk.get_backend() == "reference"
    with mk.use_backend("cuda"):
        assert mk.get_backend() == "cuda"
        with mk.use_backend("auto"):
            assert mk.get_backend() == "auto"
        assert mk.get_backend() == "cuda"
        # the call's argument wins over every default
        assert _dispatch.resolve("point_sample", torch.device("cpu"), torch.float32, "reference") == "reference"
    assert mk.get_backend() == "reference"
    mk.set_backend(None)
    assert mk.get_backend() == "triton"


def test_unknown_backend_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        mk.set_backend("fast")
    with pytest.raises(ValueError, match="backend"):
        mk.point_sample(torch.randn(1, 1, 2, 2), torch.rand(1, 3, 2), backend="fast")
    monkeypatch.setenv(_dispatch.ENV_VAR, "nope")
    with pytest.raises(ValueError, match=_dispatch.ENV_VAR):
        mk.get_backend()


def test_cuda_backend_unbuilt_says_so():
    with pytest.raises(mk.BackendUnavailableError, match="not built|cannot run"):
        mk.point_sample(torch.randn(1, 1, 2, 2), torch.rand(1, 3, 2), backend="cuda")


@pytest.mark.skipif(ON_GPU or INTERPRETING, reason="checks the CPU refusal of the triton backend")
def test_triton_on_cpu_says_why():
    with pytest.raises(mk.BackendUnavailableError, match="CPU"):
        with mk.use_backend("triton"):
            mk.point_sample(torch.randn(1, 1, 2, 2), torch.rand(1, 3, 2))


@pytest.mark.skipif(not (ON_GPU or INTERPRETING), reason="needs a device the triton backend runs on")
def test_triton_refuses_float64_with_reason():
    device = "cuda" if ON_GPU else "cpu"
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64, device=device)
    with pytest.raises(mk.BackendUnavailableError, match="float64"):
        mk.point_sample(x, torch.rand(1, 3, 2, dtype=torch.float64, device=device), backend="triton")


def test_env_var_is_honoured_in_a_fresh_process():
    code = "import m2f_kernels as mk; print(mk.get_backend())"
    env = dict(os.environ, **{_dispatch.ENV_VAR: "reference"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


def test_info_table_is_truthful():
    from m2f_kernels.info import report

    text = report()
    assert f"torch       {torch.__version__}" in text
    for op in _dispatch.OPS:
        row = next(line for line in text.splitlines() if line.startswith(op + " "))
        expected = _dispatch.resolve(op, torch.device("cuda" if ON_GPU else "cpu"), torch.float32, "auto")
        assert row.split()[1] == expected
    assert "m2f_kernels._C: not built" in text or "m2f_kernels._C: built" in text


def test_info_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "m2f_kernels.info"], capture_output=True, text=True, check=True)
    assert "masked_attention" in out.stdout and "reference" in out.stdout


def test_auto_order_table():
    """'auto' follows the measured table: cuda first only where it measured faster, and every
    order ends on the reference backend, so 'auto' always has something to run."""
    from m2f_kernels._dispatch import OPS, auto_order

    assert all(cls in ("fp32", "16bit") for op in OPS.values() for cls in op.auto_order_cuda)
    assert auto_order("point_mask_loss", torch.float32)[0] == "cuda"
    assert auto_order("point_mask_loss", torch.bfloat16)[0] == "triton"
    assert auto_order("masked_attention", torch.float32)[0] == "triton"
    for op in OPS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            order = auto_order(op, dtype)
            assert sorted(order) == ["cuda", "reference", "triton"] and order[-1] == "reference"

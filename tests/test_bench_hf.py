"""bench/hf_mask2former.py on the CPU: the tiny HF Mask2Former, one step of each kind.

Checks the wiring (result files and their fields) and that the equality numbers the
script reports are at the level of tests/test_integrations_transformers.py; the real
size runs on a GPU (python -m bench.hf_mask2former).
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not importable (pip install transformers==5.17.0)")
pytest.importorskip("transformers.models.mask2former.modeling_mask2former",
                    reason="this transformers has no Mask2Former")
pytest.importorskip("scipy", reason="HF's Mask2FormerLoss needs scipy")

from bench import hf_mask2former  # noqa: E402


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_cpu_run(tmp_path, one_thread, capsys):
    rc = hf_mask2former.main(["--size", "tiny", "--device", "cpu", "--steps", "1", "--dtype", "fp32",
                              "--out", str(tmp_path)])
    assert rc == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("hf-mask2former-") and files[0].endswith(".json"), files
    data = json.loads((tmp_path / files[0]).read_text())
    assert (tmp_path / files[1]).read_text().startswith("# HF Mask2Former with m2f_kernels")

    assert data["schema"] == hf_mask2former.SCHEMA
    for key in ("device", "torch", "triton", "transformers", "commit"):
        assert key in data["env"], key
    config = data["config"]
    assert config["size"] == "tiny" and config["image_size"] == 128 and config["dtypes"] == ["fp32"]

    eq = data["equality"]
    assert "error" not in eq, eq
    assert eq["grad_params_match"] and eq["grad_params"] > 50
    for key in ("loss", "class_queries_logits", "masks_queries_logits", "grads_overall", "grads_worst"):
        assert 0 <= eq[key] < 1e-4, f"{key}: {eq[key]}"
    assert isinstance(eq["grads_worst_param"], str)

    assert [(r["model"], r["dtype"]) for r in data["results"]] == [("hf", "fp32"), ("m2f_kernels", "fp32")]
    for r in data["results"]:
        assert r["status"] == "ok", r
        assert r["time_ms"]["rounds"] == 1 and r["time_ms"]["median"] > 0
        assert r["loss_finite"]
    assert "| fp32 | m2f_kernels |" in capsys.readouterr().out


def test_missing_transformers_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    assert hf_mask2former.main(["--size", "tiny", "--device", "cpu"]) == 2
    out = capsys.readouterr().out
    assert "cannot run: cannot import transformers" in out and len(out.strip().splitlines()) == 1, out

"""bench/hf_mask2former.py on the CPU: the tiny HF Mask2Former (and EoMT), one step of each kind.

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


def test_tiny_cpu_run_eomt(tmp_path, one_thread):
    """--model eomt: the tests' tiny EoMT, patched by apply_m2f_kernels_to_eomt."""
    pytest.importorskip("transformers.models.eomt.modeling_eomt", reason="this transformers has no EoMT")
    rc = hf_mask2former.main(["--model", "eomt", "--size", "tiny", "--device", "cpu", "--steps", "1",
                              "--warmup", "0", "--dtype", "fp32", "--out", str(tmp_path)])
    assert rc == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("hf-eomt-cpu-") and files[0].endswith(".json"), files
    assert (tmp_path / files[1]).read_text().startswith("# HF EoMT with m2f_kernels")
    data = json.loads((tmp_path / files[0]).read_text())
    config = data["config"]
    assert config["family"] == "EoMT" and config["image_size"] == 64 and config["num_blocks"] == 2, config
    assert set(data["env"]["m2f_kernels_backends"]["fp32"]) == {"pairwise_mask_cost", "point_mask_loss"}
    eq = data["equality"]
    assert "error" not in eq, eq
    assert eq["grad_params_match"] and eq["grad_params"] > 50
    for key in ("loss", "grads_overall", "grads_worst"):
        assert 0 <= eq[key] < 1e-4, f"{key}: {eq[key]}"
    for key in ("class_queries_logits", "masks_queries_logits"):  # the patch leaves EoMT's forward alone
        assert eq[key] == 0, f"{key}: {eq[key]}"
    assert [(r["model"], r["status"]) for r in data["results"]] == [("hf", "ok"), ("m2f_kernels", "ok")]
    assert hf_mask2former.main(["--model", "eomt", "--size", "tiny", "--device", "cpu", "--image-size", "128",
                                "--out", str(tmp_path)]) == 2


def test_an_interrupted_run_keeps_the_cases_it_finished(tmp_path, one_thread, monkeypatch):
    real, calls = hf_mask2former.time_steps, []

    def time_steps(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_mask2former, "time_steps", time_steps)
    with pytest.raises(KeyboardInterrupt):
        hf_mask2former.main(["--size", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--dtype", "fp32",
                             "--no-equality", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("*.json")
    data = json.loads(path.read_text())
    assert [(r["model"], r["status"]) for r in data["results"]] == [("hf", "ok")]
    assert "| fp32 | hf |" in path.with_suffix(".md").read_text()

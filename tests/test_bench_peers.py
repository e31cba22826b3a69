"""bench/peers.py on the CPU: archives, patch steps, status and skip reasons, the command
line, and the layout / dtype adapters of every peer against stand-in extensions that
compute the reference op (the real peers are CUDA-only and built at bench time)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `bench` is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

import m2f_kernels  # noqa: E402
from bench import harness, peers  # noqa: E402
from bench.test_bench_ms_deform_attn import TABLE, _grad_check  # noqa: E402

THC = peers.THC_INCLUDE


def _tarball(path: Path, files: dict) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _fake_original(tmp_path: Path, dispatch: str = "value.type()", thc: bool = True) -> Path:
    """A tiny archive laid out like the transformers kernels tarball (not its code)."""
    root = "transformers-9.9/transformers/kernels/deformable_detr/"
    files = {name: f"// {name}\n" for name in peers.PEERS["original"].files}
    files["cuda/ms_deform_im2col_cuda.cuh"] = f"#pragma once\n{THC if thc else ''}\nint im2col;\n"
    files["cuda/ms_deform_attn_cuda.cu"] = "".join(
        f"AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16, {dispatch}, \"{k}\", ([&] {{ run(); }}));\n"
        for k in ("forward", "backward"))
    files["README"] = "not extracted\n"
    return _tarball(tmp_path / "transformers-kernels.tar.gz", {root + k: v for k, v in files.items()})


# ----------------------------------------------------------------------------- archives and patches


def test_unpack_applies_the_patch_steps(tmp_path):
    archive = _fake_original(tmp_path)
    peer, src, applied = peers.unpack(archive, tmp_path / "out")
    assert peer.name == "original" and src == tmp_path / "out" / "original" / "src"
    assert sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()) == sorted(peer.files)
    assert [(p.file, n) for p, n in applied] == [("cuda/ms_deform_im2col_cuda.cuh", 1),
                                                 ("cuda/ms_deform_attn_cuda.cu", 2)]
    im2col = (src / "cuda/ms_deform_im2col_cuda.cuh").read_text()
    assert THC not in im2col and peers.ATEN_ATOMIC in im2col and "int im2col;" in im2col
    cu = (src / "cuda/ms_deform_attn_cuda.cu").read_text()
    assert "value.type()" not in cu and cu.count(", value.scalar_type(), ") == 2
    # an already patched tree is left as is
    assert [n for _, n in ((p, p.apply(src)) for p in peer.patches)] == [0, 0]


def test_unpack_refuses_a_changed_upstream(tmp_path):
    archive = _fake_original(tmp_path, dispatch="value.dtype()")
    with pytest.raises(peers.PeerError, match="does not apply.*value.type"):
        peers.unpack(archive, tmp_path / "out")
    broken = _tarball(tmp_path / "partial.tar.gz",
                      {"x/deformable_detr/cuda/ms_deform_attn_cuda.cu": "", "x/deformable_detr/vision.cpp": ""})
    with pytest.raises(peers.PeerError, match="needs x/deformable_detr/ms_deform_attn.h, which the archive lacks"):
        peers.unpack(broken, tmp_path / "out")
    unknown = _tarball(tmp_path / "other.tar.gz", {"pkg/setup.py": ""})
    with pytest.raises(peers.PeerError, match="holds none of the peers"):
        peers.identify(unknown)


def test_unpack_writes_the_mmcv_binding(tmp_path):
    spec = peers.PEERS["mmcv"]
    files = {f"mmcv-9.9/mmcv/ops/csrc/{name}": f"{THC}\n" if name in (p.file for p in spec.patches) else ""
             for name in spec.files}
    peer, src, applied = peers.unpack(_tarball(tmp_path / "mmcv.tar.gz", files), tmp_path / "out")
    assert peer.name == "mmcv" and all(n == 1 for _, n in applied)
    binding = (src / "m2f_peer_mmcv_binding.cpp").read_text()
    assert "ms_deform_attn_cuda_backward" in binding and "PYBIND11_MODULE" in binding
    assert all(THC not in (src / f).read_text() for f in spec.files)


# ----------------------------------------------------------------------------- status and skip reasons


def test_status_and_reason_of_an_unbuilt_peer(tmp_path):
    assert peers.peer_status("dcnv4", tmp_path)["state"] == "not built"
    reason = peers.unavailable("original", tmp_path)
    assert reason.startswith("the original CUDA op is not installed; original is not built: "
                             "python -m bench.peers build ")
    assert reason.endswith(f"--out {tmp_path}")
    with pytest.raises(harness.Unavailable, match="dcnv4 is not built: python -m bench.peers build .*DCNv4"):
        peers.load("dcnv4", tmp_path)


def test_status_of_failed_and_running_builds(tmp_path):
    base = tmp_path / "mmcv"
    base.mkdir()
    # a build process that is gone without a result
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (base / "build.log").write_text("nvcc ...\nerror: something\n")
    (base / "started.json").write_text(json.dumps({"peer": "mmcv", "pid": int(done.stdout), "log": "L"}))
    status = peers.peer_status("mmcv", tmp_path)
    assert status["state"] == "failed" and "ended without a result" in status["error"]
    assert status["log_tail"].endswith("error: something")
    # a running one (this process stands in for it)
    (base / "started.json").write_text(json.dumps({"peer": "mmcv", "pid": os.getpid(), "log": "L"}))
    assert peers.peer_status("mmcv", tmp_path)["state"] == "building"
    assert "mmcv is still building" in peers.unavailable("mmcv", tmp_path)
    # the child's final word wins
    (base / "status.json").write_text(json.dumps({"peer": "mmcv", "state": "failed", "log": "L",
                                                  "error": "x.h:10:10: fatal error: cusparse.h: No such file"}))
    reason = peers.unavailable("mmcv", tmp_path)
    assert "mmcv failed to build (x.h:10:10: fatal error: cusparse.h: No such file; log L): python -m" in reason


def test_a_failed_patch_is_a_failed_build_without_compiling(tmp_path):
    archive = _fake_original(tmp_path, thc=False)
    (tmp_path / "out" / "original").mkdir(parents=True)
    status = peers.start_build(archive, tmp_path / "out", "9.0")
    assert status["state"] == "failed" and "pid" not in status
    assert "ms_deform_im2col_cuda.cuh does not apply" in status["error"]
    assert peers.peer_status("original", tmp_path / "out")["state"] == "failed"


def test_bench_providers_skip_with_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setenv("M2F_PEERS_DIR", str(tmp_path))
    for name in peers.PEERS:
        reason = TABLE.providers[name].requires()  # (Provider.unavailable caches it per process)
        assert f"{name} is not built: python -m bench.peers build" in reason
    assert {"original", "dcnv4", "mmcv", "cuda-deterministic"} <= set(TABLE.providers)


def test_command_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), M2F_PEERS_DIR=str(tmp_path), M2F_PEER_ARCHIVES=str(tmp_path))
    run = lambda *a: subprocess.run([sys.executable, "-m", "bench.peers", *a], cwd=ROOT, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    done = run("--help")
    assert done.returncode == 0 and "build" in done.stdout and "status" in done.stdout
    done = run("build", "--help")
    assert done.returncode == 0 and "--background" in done.stdout and "--arch" in done.stdout
    done = run("status")
    assert done.returncode == 0 and done.stdout.count("not built") == 3
    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive")
    done = run("build", str(tmp_path / "junk.tar.gz"))
    assert done.returncode == 2 and "not a tar or zip archive" in done.stderr


# ----------------------------------------------------------------------------- adapters


def _reference(value, shapes, starts, loc, w):
    return m2f_kernels.ms_deform_attn(value, shapes, starts, loc, w, backend="reference")


def _ref_grads(value, shapes, starts, loc, w, grad):
    with torch.enable_grad():
        leaves = [t.detach().float().requires_grad_() for t in (value, loc, w)]
        out = _reference(leaves[0], shapes, starts, leaves[1], leaves[2])
        return torch.autograd.grad(out, leaves, grad.float())


def _same_dtype(*tensors):
    assert len({t.dtype for t in tensors}) == 1 and all(t.is_contiguous() for t in tensors)
    return tensors[0].dtype


class _OriginalLike:
    """Stands in for the original op's extension: its signature, computed by the reference."""

    def __init__(self):
        self.dtypes = []

    def ms_deform_attn_forward(self, value, shapes, starts, loc, w, step):
        self.dtypes.append(_same_dtype(value, loc, w))
        return _reference(value.float(), shapes, starts, loc.float(), w.float()).to(value.dtype)

    def ms_deform_attn_backward(self, value, shapes, starts, loc, w, grad, step):
        return [g.to(value.dtype) for g in _ref_grads(value, shapes, starts, loc, w, grad)]


class _MmcvLike(_OriginalLike):
    def ms_deform_attn_backward(self, value, shapes, starts, loc, w, grad, gv, gl, gw, step):
        for out, g in zip((gv, gl, gw), _ref_grads(value, shapes, starts, loc, w, grad)):
            out.add_(g.to(out.dtype))


class _DCNv4Like:
    """Stands in for DCNv4's extension: [B, Q, H, L*K*3] locations then logits, softmax inside."""

    def __init__(self):
        self.dtypes = []

    @staticmethod
    def _split(loc_attn, shapes, k):
        b, q, h, _ = loc_attn.shape
        levels = shapes.shape[0]
        loc = loc_attn[..., : levels * k * 2].reshape(b, q, h, levels, k, 2)
        w = loc_attn[..., levels * k * 2:].softmax(-1).reshape(b, q, h, levels, k)
        return loc, w

    def flash_deform_attn_forward(self, value, shapes, starts, loc_attn, step, k, d_stride, threads):
        self.dtypes.append(_same_dtype(value, loc_attn))
        assert (d_stride, threads) == (8, 64)
        loc, w = self._split(loc_attn.float(), shapes, k)
        return _reference(value.float(), shapes, starts, loc, w).to(value.dtype)

    def flash_deform_attn_backward(self, value, shapes, starts, loc_attn, grad, step, k, d_stride, threads):
        assert (d_stride, threads) == (1, 256)
        with torch.enable_grad():
            v = value.detach().float().requires_grad_()
            la = loc_attn.detach().float().requires_grad_()
            out = _reference(v, shapes, starts, *self._split(la, shapes, k))
            gv, gla = torch.autograd.grad(out, (v, la), grad.float())
        return [gv.to(value.dtype), gla.to(value.dtype)]


def _ops():
    launch = (lambda b, q, g, c: (8, 64), lambda b, q, g, c: (1, 256))
    return {"original": peers.OriginalOp(peers.PEERS["original"], _OriginalLike()),
            "mmcv": peers.MmcvOp(peers.PEERS["mmcv"], _MmcvLike()),
            "dcnv4": peers.DCNv4Op(peers.PEERS["dcnv4"], _DCNv4Like(), launch=launch)}


SMALL = {"setting": "small", "B": 2, "levels": ((6, 5), (3, 2)), "H": 2, "D": 8, "P": 4}
NAMES = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")


@pytest.mark.parametrize("name", ["original", "mmcv", "dcnv4"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_adapters_match_the_reference(name, dtype):
    torch.manual_seed(0)
    op = _ops()[name]
    inputs = TABLE.make_inputs(SMALL, harness.DTYPES[dtype], "cpu")
    args = [inputs[n] for n in NAMES]
    for t in inputs.grad_tensors():
        t.requires_grad_(True)
    value, w = args[0], args[4]
    peer_dtype = torch.float32 if dtype == "fp32" else torch.float16
    assert op.peer_dtype(value.dtype)[0] == peer_dtype
    tol = 1e-5 if dtype == "fp32" else 2e-2
    ref = _reference(*args)
    grad = torch.randn_like(ref, dtype=torch.float32)
    ref_grads = torch.autograd.grad(ref, inputs.grad_tensors(), grad.to(ref.dtype))

    dropin = op(*args)
    assert dropin.dtype == value.dtype and dropin.shape == ref.shape
    assert harness.rel_err(dropin, ref) < tol
    got = torch.autograd.grad(dropin, inputs.grad_tensors(), grad.to(dropin.dtype))
    assert [g.dtype for g in got] == [t.dtype for t in inputs.grad_tensors()]
    gw_ref = ref_grads[2].float()
    if name == "dcnv4":  # the drop-in's weight gradient: the reference's up to a constant per (query, head)
        gw_ref = gw_ref - (w.detach() * gw_ref).sum((-2, -1), keepdim=True)
    for g, r in zip(got, ref_grads[:2] + (gw_ref,)):
        assert harness.rel_err(g, r) < tol

    run = op.bind(*args)
    bound = run()
    assert bound.dtype == peer_dtype and harness.rel_err(bound, ref) < tol
    assert set(op.ext.dtypes) == {peer_dtype}
    check = _grad_check(name, inputs, run)  # the bench's gradient check (DCNv4: logit gradients)
    assert check["against"] == "reference" and max(check[n] for n in inputs.grad) < tol, check

"""The CUDA C++ kernels of ``csrc/`` built for the CPU, to run them where no GPU is.

``load()`` compiles every ``csrc`` translation unit with g++ against the installed (CPU)
torch, with ``include/m2f_cuda_emulation.h`` force-included (CUDA's keywords, thread
indices, ``__syncthreads``, warp collectives and atomics on fibers: its header comment says
what is emulated and what is not) and ``include/c10/cuda/`` standing in for torch's CUDA
headers, then loads the library. The operators register as ``torch.ops.m2f_kernels_emu.*``
(the ``m2f_kernels_C`` schemas, CPU tensors), so they never shadow a real extension.

The sources are rewritten on the way (in the build folder, never in ``csrc``):
``kernel<<<grid, block, shared, stream>>>(args)`` becomes a call of ``m2f_emu::launch``,
``extern __shared__ T name[];`` a pointer to the launch's dynamic shared memory,
``__shared__ T name[n];`` a reference to an array the runtime keeps per declaration and
poisons before each block, and the CUDA registration a CPU one under the emulation
namespace. The build is cached in
``build/cuda_emulation/<hash of sources, flags and torch>`` (~35 s on an idle two-core
machine the first time; the four newest builds are kept) and guarded by a file lock, so
parallel test workers build it once.

``as_cuda_backend()`` puts the emulated kernels behind ``backend='cuda'`` for CPU tensors:
the cuda backend's own Python wrappers (``m2f_kernels/cuda``, read with the library's
namespace and the CPU as their device) replace the package for the duration, so the op
tests run the whole path: public op, autograd, dispatch, wrappers, C++ launch code,
kernels. ``tests/conftest.py`` does it for the ``cuda-emulated`` test parameters.

``M2F_CUDA_EMULATION_SANITIZE=address`` builds it under AddressSanitizer (a separate cache
entry), the CPU's memcheck: ``scripts/cuda_emulation_memcheck.sh`` runs the tests with it.

``python -m tests.cuda_emulation`` builds it and prints the library's path.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
WRAPPERS = ROOT / "m2f_kernels" / "cuda"
HERE = Path(__file__).resolve().parent
INCLUDE = HERE / "include"
BUILD_ROOT = ROOT / "build" / "cuda_emulation"
NAMESPACE = "m2f_kernels_emu"
SANITIZE_ENV = "M2F_CUDA_EMULATION_SANITIZE"
# The orders a block's threads (between synchronisation points) and a grid's blocks run in.
ORDERS = {"ascending": 0, "descending": 1, "shuffled": 2}

_LAUNCH = re.compile(
    r"(?P<kernel>[A-Za-z_]\w*(?:<(?:[^;<>]|<[^;<>]*>)*>)?)\s*<<<(?P<config>.*?)>>>\s*\(\s*(?P<close>\))?",
    re.DOTALL)
_DYNAMIC_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(?P<type>[\w:]+(?:\s+[\w:]+)*?)\s+(?P<name>\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(
    r"__shared__\s+(?:__align__\(\d+\)\s+)?(?P<type>[\w:]+(?:\s+[\w:]+)*?)\s+(?P<name>\w+)"
    r"(?P<dims>(?:\s*\[[^\]]+\])+)\s*;")


def _launch(m: re.Match) -> str:
    head = f"::m2f_emu::launch(::m2f_emu::LaunchConfig({m['config']}), &{m['kernel']}"
    return head + (")" if m["close"] else ", ")


def _static_shared(m: re.Match) -> str:
    """``__shared__ T name[a][b];`` -> a reference to the block's array (poisoned per block)."""
    t, name, dims = m["type"], m["name"], m["dims"].replace(" ", "")
    tag = f"m2f_emu_shared_{name}"
    return (f"static char {tag}; {t} (&{name}){dims} = *reinterpret_cast<{t}(*){dims}>("
            f"::m2f_emu::static_shared(&{tag}, sizeof({t}{dims})));")


def rewrite(text: str) -> str:
    """One csrc file as the emulation compiles it (launches, dynamic shared memory, registration)."""
    text = _LAUNCH.sub(_launch, text)
    text = _DYNAMIC_SHARED.sub(
        lambda m: f"{m['type']}* {m['name']} = reinterpret_cast<{m['type']}*>(::m2f_emu::dynamic_shared());", text)
    text = _STATIC_SHARED.sub(_static_shared, text)
    if "__shared__" in text:
        raise RuntimeError("cuda emulation: a __shared__ declaration the rewrite does not know: "
                           + text[text.index("__shared__"):][:80])
    text = text.replace("m2f_kernels_C", NAMESPACE)
    return re.sub(rf"TORCH_LIBRARY_IMPL\(\s*{NAMESPACE}\s*,\s*CUDA\s*,", f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU,", text)


def _sources() -> list[Path]:
    return sorted(p for p in CSRC.rglob("*") if p.suffix in (".cu", ".cuh", ".h", ".cpp"))


def _flags() -> list[str]:
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-std=c++17", "-O2", "-fPIC", "-g0", "-Wno-unknown-pragmas", "-Wno-c++20-extensions",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-include", "m2f_cuda_emulation.h", f"-I{INCLUDE}"]
    if os.environ.get(SANITIZE_ENV) == "address":
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
    return flags + [f"-I{p}" for p in cpp_extension.include_paths()]


def _key(flags: list[str]) -> str:
    h = hashlib.sha256()
    for path in _sources() + sorted(HERE.rglob("*.h")) + [HERE / "emulation_ops.cpp", Path(__file__)]:
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def _compile(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuda emulation: compiling failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")


def build(verbose: bool = False) -> Path:
    """Compile (or find in the cache) the emulated library; returns the .so path."""
    from torch.utils import cpp_extension

    flags = _flags()
    out_dir = BUILD_ROOT / _key(flags)
    library = out_dir / "libm2f_kernels_emu.so"
    BUILD_ROOT.mkdir(parents=True, exist_ok=True)
    with open(BUILD_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.exists():
            return library
        work = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(work, ignore_errors=True)
        src_dir = work / "csrc"
        units = []
        for path in _sources():
            rel = path.relative_to(CSRC)
            dest = src_dir / (rel.with_suffix(".cpp") if path.suffix == ".cu" else rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(rewrite(path.read_text()))
            if dest.suffix == ".cpp":
                units.append(dest)
        controls = work / "emulation_ops.cpp"
        controls.write_text(rewrite((HERE / "emulation_ops.cpp").read_text()))
        units.append(controls)
        commands = [["g++", *flags, f"-I{src_dir}", "-c", str(u), "-o", str(work / f"{u.stem}.o")] for u in units]
        if verbose:
            print(f"cuda emulation: compiling {len(units)} files into {out_dir}", flush=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            list(pool.map(_compile, commands))
        libs = cpp_extension.library_paths()
        _compile(["g++", "-shared", *[f for f in flags if f.startswith("-fsanitize")],
                  "-o", str(work / library.name), *[str(work / f"{u.stem}.o") for u in units],
                  *[f"-L{p}" for p in libs], *[f"-Wl,-rpath,{p}" for p in libs], "-lc10", "-ltorch_cpu"])
        shutil.rmtree(out_dir, ignore_errors=True)
        work.rename(out_dir)
        _prune(keep=out_dir)
        return library


def _prune(keep: Path, builds: int = 4, grace_s: float = 3600.0) -> None:
    """Delete all but the ``builds`` newest cached builds, sparing any built in the last
    ``grace_s`` (another process may be about to load it; a loaded library stays usable)."""
    done = [d for d in BUILD_ROOT.iterdir() if d.is_dir() and not d.name.endswith(".tmp") and d != keep]
    now = time.time()
    for old in sorted(done, key=lambda d: d.stat().st_mtime, reverse=True)[builds - 1:]:
        if now - old.stat().st_mtime > grace_s:
            shutil.rmtree(old, ignore_errors=True)


@functools.cache
def load(verbose: bool = False):
    """Build if needed, load (once per process), and return ``torch.ops.m2f_kernels_emu``."""
    torch.ops.load_library(str(build(verbose)))
    return getattr(torch.ops, NAMESPACE)


@contextlib.contextmanager
def order(name: str, seed: int = 0):
    """Inside: launches run their threads and blocks in order ``name`` (a key of ORDERS;
    'shuffled' draws from ``seed``); ascending again afterwards."""
    ops = load()
    ops.emulation_set_order(ORDERS[name], seed)
    try:
        yield
    finally:
        ops.emulation_set_order(ORDERS["ascending"], 0)


# How the cuda backend's Python side is read for the emulation: each rewrite must match
# (a wrapper that changes its device check or op calls fails here, loudly).
_PACKAGE_REWRITES = (('_C = importlib.import_module("m2f_kernels._C")', "_C = None"),
                     ('if dev_type != "cuda":', 'if dev_type != "cpu":'),
                     ("if not torch.cuda.is_available():", "if False:"))
_MODULE_REWRITES = (("torch.ops.m2f_kernels_C.", "_emulated_ops."),
                    ('.device.type != "cuda"', '.device.type != "cpu"'))


@contextlib.contextmanager
def filled_allocations():
    """Inside: CPU ``torch.empty`` / ``at::empty`` hand out NaN-filled memory (integers: the
    largest value), as torch does under deterministic algorithms (only inside: an op whose
    ``deterministic=None`` follows that flag must not see it)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved[2]


class _FilledOps:
    """The emulated ops, each call with its allocations filled (the outputs a kernel leaves
    unwritten show up as NaN)."""

    def __getattr__(self, name: str):
        op = getattr(load(), name)

        def call(*args):
            with filled_allocations():
                return op(*args)
        return call


def _module_from(path: Path, name: str, rewrites, package: bool = False) -> types.ModuleType:
    source = path.read_text()
    for old, new in rewrites:
        if old in source:
            source = source.replace(old, new)
        elif package or old.startswith("torch.ops"):
            raise RuntimeError(f"cuda emulation: {path} no longer contains {old!r}; update tests/cuda_emulation")
    module = types.ModuleType(name)
    module._emulated_ops = _FilledOps()
    module.__file__ = str(path)
    module.__package__ = name if package else name.rpartition(".")[0]
    if package:
        module.__path__ = []  # a package whose other submodules do not exist
    sys.modules[name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


@contextlib.contextmanager
def as_cuda_backend():
    """Inside: ``backend='cuda'`` runs the emulated kernels on CPU tensors (their
    allocations NaN-filled: ``filled_allocations``)."""
    from m2f_kernels import _dispatch

    load()
    saved = {name: mod for name, mod in sys.modules.items()
             if name == "m2f_kernels.cuda" or name.startswith("m2f_kernels.cuda.")}

    def forget():
        for cache in (_dispatch._op_modules, _dispatch._functions):
            for key in [k for k in cache if k[0] == "cuda"]:
                del cache[key]

    forget()
    try:
        package = _module_from(WRAPPERS / "__init__.py", "m2f_kernels.cuda", _PACKAGE_REWRITES, package=True)
        for path in sorted(WRAPPERS.glob("*.py")):
            if path.name != "__init__.py":
                setattr(package, path.stem, _module_from(path, f"m2f_kernels.cuda.{path.stem}", _MODULE_REWRITES))
        yield
    finally:
        for name in [n for n in sys.modules if n == "m2f_kernels.cuda" or n.startswith("m2f_kernels.cuda.")]:
            del sys.modules[name]
        sys.modules.update(saved)
        forget()

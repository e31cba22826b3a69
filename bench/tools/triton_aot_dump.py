"""Compile Triton kernels ahead of time (no GPU needed) and dump their PTX, SASS and resources.

Use it to answer "did my change alter the compiled code?": dump before, dump after, diff.

    python -m bench.tools.triton_aot_dump dump OUT_DIR [--cases NAME_OR_MODULE:FUNC ...] [--arch 90 80] [-j 2]
    python -m bench.tools.triton_aot_dump diff BEFORE_DIR AFTER_DIR

How a kernel's signature is found: a *case* is a function that calls the real Python
launch wrappers (``ms_deform_attn_fwd(...)`` and so on) with CPU tensors of the shapes and
dtypes to cover. While it runs, ``JITFunction.run`` is replaced by a recorder, so nothing is
launched: every ``kernel[grid](...)`` call is turned into the exact compile request the GPU
launch would make (Triton's own binder: pointer dtypes, ints specialised to constexpr 1 /
``tt.divisibility`` 16 / i32 or i64, the constexprs and the launch options), for each
``--arch``. The outputs of the wrappers are garbage (empty tensors); only the launches
matter. Name launches with ``with tag("fp32-softmax"): ...`` inside a case; a dump entry
is ``<kernel>.<tag>.sm<arch>``.

Per entry, dump writes ``.ptx``, ``.sass`` (bundled cuobjdump) and a line in ``index.json``
with the compile request and resources: registers, stack (spill) and local bytes from
``cuobjdump -res-usage``, and Triton's shared-memory bytes. ``diff`` compares two dumps:
PTX after dropping debug info (``.loc``/``.file`` lines, ``.section .debug_*`` blocks,
comments); when that differs, whether the PTX is the same instructions in another order
(register numbers ignored) and whether the SASS (addresses and encodings dropped) is
identical; plus the resource deltas. Unified diffs of what differs go to ``AFTER_DIR/diff/``.

Built-in cases: ``masked_attention``, ``ms_deform_attn``, ``point_loss`` and
``point_mask_logits`` (the standard Mask2Former shapes, every kernel of the module, fp32
and bf16, every constexpr branch the launch wrappers can take) and ``edge`` (odd shapes:
1-pixel maps, D = 24, fp16); all five by default. Add your own with ``--cases
my.module:my_cases``. The launch wrappers run on CPU tensors, so launch choices that
depend on the GPU (masked attention's SM count) take their CPU values. The kernels come from the checkout the tool sits in (its repo root goes first
on sys.path; index.json records the files), so a baseline of a commit without uncommitted
changes needs no stash (the cases call only the backend entry points, so today's tool can
dump an older checkout):

    mkdir /tmp/base && git archive BASE | tar -x -C /tmp/base && cp -r bench/tools /tmp/base/bench/
    (cd /tmp/base && python -m bench.tools.triton_aot_dump dump /tmp/before)
    python -m bench.tools.triton_aot_dump dump /tmp/after
    python -m bench.tools.triton_aot_dump diff /tmp/before /tmp/after

From Python (the repo root on sys.path): ``import bench.tools.triton_aot_dump as aot`` and
``aot.compile_launches(cases, archs, kernels=...)`` returns the index.json entries without
writing files (tests/test_op_point_loss.py checks the matcher's resources this way).

Runs with TRITON_INTERPRET unset (it is removed from the environment when the module is
imported); a few minutes for the default cases on 2 CPU cores. Triton's cache is used as usual.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import difflib
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # must happen before any @triton.jit runs

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/tools/ -> the repo
sys.path.insert(0, ROOT)

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

# ----------------------------------------------------------------------------- capture

_TAG = ["untagged"]


@contextlib.contextmanager
def tag(name: str):
    """Name the launches made inside the block (the middle part of the dump entry's name)."""
    old, _TAG[0] = _TAG[0], name
    try:
        yield
    finally:
        _TAG[0] = old


def _compile_request(kernel, args, kwargs, arch):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run builds them."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def capture(cases, archs):
    """Run the case functions with launches recorded instead of run: a list of entries."""
    entries, seen = [], set()
    per_name = collections.Counter()

    def record(self, *args, grid, warmup, **kwargs):
        for arch in archs:
            sig, constexprs, attrs, options = _compile_request(self, args, kwargs, arch)
            key = (self.fn.__module__, self.fn.__name__, _TAG[0], arch, repr(sig), repr(sorted(constexprs.items())),
                   repr(sorted(attrs.items())), repr(sorted(options.items())))
            if key in seen:
                continue
            seen.add(key)
            base = f"{self.fn.__name__}.{_TAG[0]}"
            per_name[(base, arch)] += 1
            n = per_name[(base, arch)]
            name = base if n == 1 else f"{base}-{n}"
            entries.append({"name": name, "arch": arch, "kernel": self, "signature": sig, "constexprs": constexprs,
                            "attrs": attrs, "options": options})
        return None

    saved = JITFunction.run
    JITFunction.run = record
    try:
        with torch.no_grad():
            for case in cases:
                case()
    finally:
        JITFunction.run = saved
    return entries


# ----------------------------------------------------------------------------- compile

_ENTRIES: list = []  # what the forked compile workers read
_OUT = [None]
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _tool(name, *args):
    path = os.path.join(BIN, name)
    if not os.path.exists(path):
        return ""
    return subprocess.run([path, *args], capture_output=True, text=True, check=True).stdout


def compile_entry(e, out=None):
    """Compile one captured launch ``e`` (an entry of :func:`capture`) and read its resources:
    the index.json entry. With ``out``, its ``.ptx`` and ``.sass`` are written there too."""
    t0 = time.time()
    src = ASTSource(fn=e["kernel"], signature=e["signature"], constexprs=e["constexprs"], attrs=e["attrs"])
    compiled = triton.compile(src, target=GPUTarget("cuda", e["arch"], 32), options=e["options"])
    usage = sass = ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = _tool("cuobjdump", "-res-usage", f.name)
        if out:
            sass = _tool("cuobjdump", "-sass", f.name)
    if out:
        stem = os.path.join(out, f"{e['name']}.sm{e['arch']}")
        with open(stem + ".ptx", "w") as f:
            f.write(compiled.asm["ptx"])
        with open(stem + ".sass", "w") as f:
            f.write(sass)
    m = _RES.search(usage)
    res = dict(zip(("regs", "stack", "cubin_shared", "local"), map(int, m.groups()))) if m else {}
    res["shared"] = compiled.metadata.shared
    return {
        "name": e["name"], "arch": e["arch"], "kernel": f"{e['kernel'].fn.__module__}.{e['kernel'].fn.__name__}",
        "signature": e["signature"], "constexprs": {str(k): v for k, v in e["constexprs"].items()},
        "attrs": {str(k): v for k, v in e["attrs"].items()},
        "options": {k: e["options"][k] for k in ("num_warps", "num_stages", "num_ctas", "maxnreg")},
        "resources": res, "compile_s": round(time.time() - t0, 1),
    }


def _compile_one(i):
    return compile_entry(_ENTRIES[i], _OUT[0])


def compile_entries(entries, jobs=1, out=None):
    """:func:`compile_entry` for every entry, ``jobs`` processes (fork) in parallel."""
    _ENTRIES[:] = entries
    _OUT[0] = out
    try:
        if jobs > 1 and len(entries) > 1:
            with multiprocessing.get_context("fork").Pool(min(jobs, len(entries))) as pool:
                return pool.map(_compile_one, range(len(entries)), chunksize=1)
        return [_compile_one(i) for i in range(len(entries))]
    finally:
        _ENTRIES[:] = []


def compile_launches(cases, archs, kernels=None, jobs=1):
    """The compile requests of the launches the case functions make (see :func:`capture`),
    compiled for each arch without a GPU: their index.json entries, resources included
    (``regs``, ``stack``, ``local`` from cuobjdump where Triton bundles it, ``shared`` always).
    ``kernels``: keep only the launches of kernels with these function names.

    Call it in a process where TRITON_INTERPRET was never set (importing this module
    removes it, so import it before anything defines a kernel): under the interpreter
    kernels are not JITFunctions and nothing is recorded."""
    entries = capture(cases, archs)
    if kernels is not None:
        entries = [e for e in entries if e["kernel"].fn.__name__ in kernels]
    return compile_entries(entries, jobs)


def dump(out, cases, archs, jobs):
    os.makedirs(out, exist_ok=True)
    entries = capture(cases, archs)
    print(f"{len(entries)} compiles ({len({e['name'] for e in entries})} kernels x {len(archs)} archs)", flush=True)
    results = compile_entries(entries, jobs, out)
    sources = sorted({e["kernel"].fn.__module__ for e in entries})
    sources = {mod: sys.modules[mod].__file__ for mod in sources}
    print("kernel sources:", ", ".join(sources.values()))
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump({"triton": triton.__version__, "sources": sources, "entries": results}, f, indent=1, default=repr)
    for r in results:
        print(f"{r['name']}.sm{r['arch']}: {_fmt_res(r['resources'])} ({r['compile_s']} s)")


def _fmt_res(r):
    return f"regs {r.get('regs', '?')}, stack {r.get('stack', '?')} B, local {r.get('local', '?')} B, shared {r['shared']} B"


# ----------------------------------------------------------------------------- diff


def normalize_ptx(text):
    """PTX without debug info and comments: the lines that make up the code."""
    lines, in_debug, depth = [], False, 0
    for line in text.splitlines():
        s = re.sub(r"\s*//.*$", "", line.strip())
        if in_debug:  # inside a .section .debug_* { ... } block
            depth += s.count("{") - s.count("}")
            in_debug = depth > 0 or "}" not in s
            continue
        if s.startswith(".section") and ".debug" in s:
            depth = s.count("{") - s.count("}")
            in_debug = depth > 0 or "{" not in s  # "{" may open on the next line
            continue
        if not s or s.startswith((".loc", ".file")) or re.fullmatch(r"\$L__tmp\d+:", s):
            continue
        lines.append(s)
    return lines


def _canon(line):
    return re.sub(r"%[a-z]+\d+", "%R", line)


def normalize_sass(text):
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s*(.*?)\s*;?\s*(/\*.*)?$", line)
        if m and m.group(1):
            out.append(m.group(1).rstrip(" ;"))
    return out


def diff(before, after):
    with open(os.path.join(before, "index.json")) as f:
        a = {(r["name"], r["arch"]): r for r in json.load(f)["entries"]}
    with open(os.path.join(after, "index.json")) as f:
        b = {(r["name"], r["arch"]): r for r in json.load(f)["entries"]}
    ddir = os.path.join(after, "diff")
    os.makedirs(ddir, exist_ok=True)
    counts = collections.Counter()
    for key in sorted(a.keys() | b.keys()):
        name = f"{key[0]}.sm{key[1]}"
        if key not in a or key not in b:
            print(f"{name}: only in {'after' if key in b else 'before'}")
            counts["missing"] += 1
            continue
        if a[key]["signature"] != b[key]["signature"] or a[key]["constexprs"] != b[key]["constexprs"]:
            print(f"{name}: NOTE the compile request differs (signature or constexprs)")
        texts = {}
        for side, d in (("before", before), ("after", after)):
            for ext in ("ptx", "sass"):
                with open(os.path.join(d, f"{name}.{ext}")) as f:
                    texts[side, ext] = f.read()
        pa, pb = normalize_ptx(texts["before", "ptx"]), normalize_ptx(texts["after", "ptx"])
        sa, sb = normalize_sass(texts["before", "sass"]), normalize_sass(texts["after", "sass"])
        ra, rb = a[key]["resources"], b[key]["resources"]
        res = _fmt_res(rb) if ra == rb else f"{_fmt_res(ra)} -> {_fmt_res(rb)}"
        if pa == pb:
            verdict = "PTX identical"
            counts["identical"] += 1
        else:
            changed = sum(1 for t in difflib.ndiff(pa, pb) if t[:1] in "+-")
            same_set = sorted(map(_canon, pa)) == sorted(map(_canon, pb))
            verdict = (f"PTX DIFFERS ({changed} lines +/-, {len(pa)} -> {len(pb)} lines; "
                       f"{'same instructions reordered' if same_set else 'different instructions'}); "
                       f"SASS {'identical' if sa == sb else 'DIFFERS'}")
            counts["differs"] += 1
            with open(os.path.join(ddir, f"{name}.ptx.diff"), "w") as f:
                f.writelines(difflib.unified_diff([x + "\n" for x in pa], [x + "\n" for x in pb], "before", "after"))
            if sa != sb:
                with open(os.path.join(ddir, f"{name}.sass.diff"), "w") as f:
                    f.writelines(difflib.unified_diff([x + "\n" for x in sa], [x + "\n" for x in sb], "before", "after"))
        print(f"{name}: {verdict}; {res}")
    print(dict(counts))
    return 0 if counts["differs"] == counts["missing"] == 0 else 1


# ----------------------------------------------------------------------------- built-in cases


def masked_attention_cases():
    """B=2, H=8, D=32, Q=100, N=16384 (bf16 also Q=200): fp32 and bf16 with bool [B, Q, N]
    masks and [B, H, Q, N] logits; fp32 with TF32 dots; tile skipping (via M2F_MA_CONFIG);
    B*H=2 (forward key split + combine, backward dq chunks); fp16 with D=128 (wide heads).
    CPU tensors: the launch choices see 4 SMs (see m2f_kernels.triton.masked_attention)."""
    from m2f_kernels.triton import masked_attention as ma

    def run(name, dtype, b=2, h=8, q_len=100, n=16384, d=32, mask_kind="bool"):
        q = torch.empty(b, h, q_len, d, dtype=dtype)
        k, v = torch.empty(b, h, n, d, dtype=dtype), torch.empty(b, h, n, d, dtype=dtype)
        if mask_kind == "bool":
            mask = torch.empty(b, q_len, n, dtype=torch.bool)
        else:
            mask = torch.empty(b, h, q_len, n, dtype=dtype)
        with tag(name):
            out, lse = ma.masked_attention_fwd(q, k, v, mask, d ** -0.5)
            ma.masked_attention_bwd(torch.empty_like(out), q, k, v, mask, out, lse, d ** -0.5)

    for dtype in (torch.float32, torch.bfloat16):
        dt = str(dtype).split(".")[-1]
        run(f"{dt}-bool", dtype)
        run(f"{dt}-logits", dtype, mask_kind="logits")
        run(f"{dt}-bool-split", dtype, b=1, h=2, q_len=16, n=4096)
    run("bfloat16-bool-q200", torch.bfloat16, q_len=200)
    run("float16-bool-d128", torch.float16, n=1024, d=128)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        run("float32-bool-tf32", torch.float32)
    finally:
        torch.set_float32_matmul_precision(saved)
    env = os.environ.get("M2F_MA_CONFIG")
    os.environ["M2F_MA_CONFIG"] = "fwd:skip_tiles=1;bwd:skip_tiles=1"
    try:
        run("float32-bool-skip", torch.float32)
        run("bfloat16-bool-split-skip", torch.bfloat16, b=1, h=2, q_len=16, n=4096)
    finally:
        if env is None:
            del os.environ["M2F_MA_CONFIG"]
        else:
            os.environ["M2F_MA_CONFIG"] = env


def ms_deform_attn_cases():
    """Standard shape: B=2, Lq=S=21504, H=8, D=32, levels 128^2/64^2/32^2, P=4; fp32 locations/weights."""
    from m2f_kernels.triton import ms_deform_attn as m

    levels = [(128, 128), (64, 64), (32, 32)]
    b, h, d, p = 2, 8, 32, 4
    shapes = torch.tensor(levels, dtype=torch.int64)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    s = lq = int(areas.sum())
    for dtype in (torch.float32, torch.bfloat16):
        dt = str(dtype).split(".")[-1]
        value = torch.zeros(b, s, h, d, dtype=dtype)
        loc = torch.full((b, lq, h, len(levels), p, 2), 0.5)
        weights = torch.full((b, lq, h, len(levels), p), 1.0 / (len(levels) * p))
        grad_out = torch.zeros(b, lq, h * d, dtype=dtype)
        for softmax in (False, True):
            sm = "softmax" if softmax else "plain"
            with tag(f"{dt}-{sm}"):
                m.ms_deform_attn_fwd(value, shapes, starts, loc, weights, softmax=softmax)
            for det in (False, True):
                with tag(f"{dt}-{sm}-{'fixedpoint' if det else 'atomic'}"):
                    m.ms_deform_attn_bwd(grad_out, value, shapes, starts, loc, weights, softmax=softmax,
                                         deterministic=det)


def point_loss_cases():
    """Standard shapes: pred [2, 100, 256, 256], 30 matches per image (N=60), bool targets
    [60, 1024, 1024] (pairwise: [30, 1024, 1024]), P=12544 points, 3P candidates."""
    from m2f_kernels.triton import point_loss as pl

    b, q, hp, ht, p = 2, 100, 256, 1024, 12544
    n = 60
    coords = torch.full((n, p, 2), 0.5)
    bidx = torch.arange(n) // 30
    qidx = torch.arange(n) % q
    targets = {"bool": torch.zeros(n, ht, ht, dtype=torch.bool), "fp32target": torch.zeros(n, ht, ht)}
    for dtype in (torch.float32, torch.bfloat16):
        dt = str(dtype).split(".")[-1]
        pred = torch.zeros(b, q, hp, hp, dtype=dtype)
        plain = torch.zeros(n, hp, hp, dtype=dtype)
        with tag(dt):
            pl.point_sample_fwd(plain.unsqueeze(1), coords)
            pl.point_sample_bwd(torch.zeros(n, 1, p, dtype=dtype), plain.unsqueeze(1), coords)
        candidates, uniform = torch.full((n, 3 * p, 2), 0.5), torch.full((n, p // 4, 2), 0.5)
        with tag(f"{dt}-uncertainty"):
            pl.uncertain_point_coords(plain, candidates, uniform, 3 * p // 4)
        with tag(f"{dt}-uncertainty-indexed"):
            pl.uncertain_point_coords(pred, candidates, uniform, 3 * p // 4, bidx, qidx)
        for tname, target in targets.items():
            if tname != "bool" and dtype != torch.float32:
                continue
            for indexed in (True, False):
                with tag(f"{dt}-{tname}-{'indexed' if indexed else 'plain'}"):
                    if indexed:
                        pl.point_mask_loss_fwd(pred, target, coords, 60.0, bidx, qidx)
                        pl.point_mask_loss_bwd(torch.ones((), dtype=dtype), torch.ones((), dtype=dtype), pred,
                                               target, coords, 60.0, bidx, qidx)
                    else:
                        pl.point_mask_loss_fwd(plain, target, coords, 60.0)
                        pl.point_mask_loss_bwd(torch.ones((), dtype=dtype), torch.ones((), dtype=dtype), plain,
                                               target, coords, 60.0)
        with tag(f"{dt}-bool"):
            pl.pairwise_mask_cost(torch.zeros(q, hp, hp, dtype=dtype), targets["bool"][:30], coords[0])


def point_mask_logits_cases():
    """The mask-free criterion's call: embeddings [2, 100, 256] of 10 predictions side by
    side ([2, 1000, 256]), features [2, 256, 256, 256] (contiguous and channels-last), 600
    matched masks x P=12544 points; fp32 and bf16; and C=24 (a partial channel block)."""
    from m2f_kernels.triton import point_mask_logits as pml

    n, p = 600, 12544
    coords = torch.full((n, p, 2), 0.5)
    bidx, qidx = torch.arange(n) // 300, torch.arange(n) % 1000
    for dtype in (torch.float32, torch.bfloat16):
        dt = str(dtype).split(".")[-1]
        embed = torch.zeros(2, 1000, 256, dtype=dtype)
        for layout in ("contiguous", "channels_last"):
            features = torch.zeros(2, 256, 256, 256, dtype=dtype)
            if layout == "channels_last":
                features = features.to(memory_format=torch.channels_last)
            with tag(f"{dt}-{layout}"):
                pml.point_mask_logits_fwd(embed, features, coords, bidx, qidx)
                pml.point_mask_logits_bwd(torch.zeros(n, p, dtype=dtype), embed, features, coords, bidx, qidx)
    with tag("edge-c24"):
        embed, features = torch.zeros(2, 10, 24, dtype=torch.float16), torch.zeros(2, 24, 5, 7, dtype=torch.float16)
        coords, index = torch.zeros(3, 53, 2), torch.tensor([0, 1, 1])
        pml.point_mask_logits_fwd(embed, features, coords, index, index)
        pml.point_mask_logits_bwd(torch.zeros(3, 53, dtype=torch.float16), embed, features, coords, index, index)


def edge_cases():
    """Odd shapes: 1-pixel-wide maps (H or W == 1 is specialised to constexpr 1), D not a
    power of two, sizes not multiples of 16, half locations/weights, fp16, uint8 targets."""
    from m2f_kernels.triton import ms_deform_attn as m
    from m2f_kernels.triton import point_loss as pl

    levels = [(5, 7), (1, 4), (6, 1)]
    shapes = torch.tensor(levels, dtype=torch.int64)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    b, lq, h, d, p = 2, 37, 3, 24, 3
    for dtype in (torch.float16, torch.bfloat16):
        dt = str(dtype).split(".")[-1]
        value = torch.zeros(b, int(areas.sum()), h, d, dtype=dtype)
        loc = torch.zeros(b, lq, h, len(levels), p, 2, dtype=dtype)
        weights = torch.zeros(b, lq, h, len(levels), p, dtype=dtype)
        with tag(f"edge-{dt}"):
            m.ms_deform_attn_fwd(value, shapes, starts, loc, weights, softmax=True)
            m.ms_deform_attn_bwd(torch.zeros(b, lq, h * d, dtype=dtype), value, shapes, starts, loc, weights,
                                 softmax=True, deterministic=True)
    n, pts = 3, 53
    coords = torch.zeros(n, pts, 2)
    for (hp, wp), (ht, wt) in (((1, 1), (1, 7)), ((5, 1), (9, 6))):
        with tag(f"edge-{hp}x{wp}-{ht}x{wt}"):
            pl.point_sample_fwd(torch.zeros(n, 2, hp, wp, dtype=torch.float16), coords)
            pl.point_sample_bwd(torch.zeros(n, 2, pts), torch.zeros(n, 2, hp, wp), coords)
            pred = torch.zeros(2, 4, hp, wp)
            target = torch.zeros(n, ht, wt, dtype=torch.uint8)
            bidx, qidx = torch.tensor([0, 1, 1]), torch.tensor([3, 0, 2])
            pl.point_mask_loss_fwd(pred, target, coords, 3.0, bidx, qidx)
            pl.point_mask_loss_bwd(torch.ones(()), torch.ones(()), pred, target, coords, 3.0, bidx, qidx)
            pl.pairwise_mask_cost(torch.zeros(5, hp, wp), target, coords[0])
        with tag(f"edge-{hp}x{wp}-uncertainty-indexed"):
            pl.uncertain_point_coords(torch.zeros(2, 4, hp, wp, dtype=torch.float16), coords, coords[:, :5], 7,
                                      torch.tensor([0, 1, 1], dtype=torch.int32), torch.tensor([3, 0, 2]))


CASES = {"masked_attention": masked_attention_cases, "ms_deform_attn": ms_deform_attn_cases,
         "point_loss": point_loss_cases, "point_mask_logits": point_mask_logits_cases, "edge": edge_cases}


def _resolve(spec):
    if spec in CASES:
        return CASES[spec]
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="compile every launch of the cases and write PTX/SASS/resources")
    d.add_argument("out")
    d.add_argument("--cases", nargs="+", default=list(CASES), help="built-in names or module:function")
    d.add_argument("--arch", nargs="+", type=int, default=[90, 80], help="compute capabilities (90 = sm_90a)")
    d.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    c = sub.add_parser("diff", help="compare two dumps (exit status 1 if any PTX differs)")
    c.add_argument("before")
    c.add_argument("after")
    args = ap.parse_args(argv)
    if args.cmd == "dump":
        dump(args.out, [_resolve(s) for s in args.cases], args.arch, args.jobs)
        return 0
    return diff(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())

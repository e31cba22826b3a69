#!/usr/bin/env bash
# SASS and resource usage of every CUDA kernel, per kernel and architecture, no GPU needed.
#
#   bash bench/tools/cuda_sass_dump.sh OUT          compile csrc/**/*.cu exactly as the CI check
#                                                   (scripts/cuda_compile_check.sh, sm_80 + sm_90) and
#                                                   write OUT/<sm_XX>/<object>/<kernel>.sass, OUT/summary.tsv
#   bash bench/tools/cuda_sass_dump.sh --diff A B   compare two such dumps kernel by kernel
#
# For refactors that must not change the generated code: dump before, dump after, --diff.
# Kernel names are the mangled names with the anonymous namespace's per-file hash removed;
# the .sass files keep the instruction addresses and encodings, so "identical" means the
# same instructions, bit for bit. summary.tsv has per kernel: registers, stack, local
# memory (spills land in STACK / LOCAL and show as LDL / STL), static shared memory and the
# instruction count. cuobjdump comes from CUDA_HOME, else from triton's bundled copy.
# Usage: in the project's Python environment. Exit status: non-zero on a failed compile, or
# with --diff when any kernel differs or is missing on one side.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python}"

if [ "${1:-}" = "--diff" ]; then
  [ $# -eq 3 ] || { echo "usage: $0 --diff BEFORE AFTER" >&2; exit 2; }
  exec "$PYTHON" - "$2" "$3" <<'PY'
import difflib, os, re, sys

before, after = sys.argv[1], sys.argv[2]

def kernels(d):
    out = {}
    for arch in sorted(os.listdir(d)):
        if not arch.startswith("sm_"):
            continue
        for obj in sorted(os.listdir(os.path.join(d, arch))):
            for f in sorted(os.listdir(os.path.join(d, arch, obj))):
                out[(arch, obj, f)] = os.path.join(d, arch, obj, f)
    return out

def summary(d):
    rows = {}
    with open(os.path.join(d, "summary.tsv")) as fh:
        head = fh.readline().rstrip("\n").split("\t")
        for line in fh:
            r = dict(zip(head, line.rstrip("\n").split("\t")))
            rows[(r["arch"], r["object"], r["kernel"])] = r
    return rows

def insns(path):  # instruction text only: no addresses, no encodings
    res = []
    for line in open(path):
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s*(.*?)\s*;?\s*(/\*.*\*/)?\s*$", line)
        if m:
            res.append(m.group(1))
    return res

A, B = kernels(before), kernels(after)
SA, SB = summary(before), summary(after)
status = 0
counts = {}
for key in sorted(set(A) | set(B)):
    arch, obj, f = key
    k = f[:-len(".sass")]
    name = SA.get((arch, obj, k), SB.get((arch, obj, k), {})).get("demangled", k)
    if key not in A or key not in B:
        verdict = "only-before" if key in A else "only-after"
        status = 1
    elif open(A[key]).read() == open(B[key]).read():
        verdict = "identical"
    elif insns(A[key]) == insns(B[key]):
        verdict = "identical-insns"  # same instructions, other addresses / encodings
    else:
        ia, ib = insns(A[key]), insns(B[key])
        changed = sum(1 for l in difflib.unified_diff(ia, ib, lineterm="", n=0) if l[:1] in "+-") - 2
        verdict = f"DIFFERS({len(ia)}->{len(ib)} insns, {changed} +/- lines)"
        status = 1
    counts[verdict.split("(")[0]] = counts.get(verdict.split("(")[0], 0) + 1
    ra, rb = SA.get((arch, obj, k), {}), SB.get((arch, obj, k), {})
    res = " ".join(f"{c}:{ra.get(c, '-')}->{rb.get(c, '-')}" if ra.get(c) != rb.get(c) else f"{c}:{ra.get(c, '-')}"
                   for c in ("REG", "STACK", "LOCAL", "SHARED", "LDL_STL"))
    print(f"{verdict:16s} {arch} {name}  [{res}]")
print("total:", ", ".join(f"{n} {v}" for v, n in sorted(counts.items())))
sys.exit(status)
PY
fi

[ $# -eq 1 ] || { echo "usage: $0 OUT | $0 --diff BEFORE AFTER" >&2; exit 2; }
OUT="$1"
CUOBJDUMP="${CUOBJDUMP:-}"
if [ -z "$CUOBJDUMP" ]; then
  for c in "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump" "$(command -v cuobjdump || true)" \
           "$("$PYTHON" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null)"; do
    if [ -n "$c" ] && [ -x "$c" ]; then CUOBJDUMP="$c"; break; fi
  done
fi
if [ -z "$CUOBJDUMP" ]; then
  echo "cuda_sass_dump: cuobjdump not found (set CUOBJDUMP)" >&2
  exit 2
fi

rm -rf "$OUT"
mkdir -p "$OUT/obj"
CUDA_CHECK_OBJ_DIR="$OUT/obj" bash "$ROOT/scripts/cuda_compile_check.sh" | tee "$OUT/compile_check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "cuda_sass_dump: compile failed" >&2; exit 1; }

for o in "$OUT"/obj/*.o; do
  for arch in sm_80 sm_90; do
    "$CUOBJDUMP" -sass -arch "$arch" "$o" > "$OUT/obj/$(basename "$o").$arch.sass" 2> /dev/null || exit 1
    "$CUOBJDUMP" -res-usage -arch "$arch" "$o" > "$OUT/obj/$(basename "$o").$arch.res" 2> /dev/null || exit 1
  done
done

"$PYTHON" - "$OUT" <<'PY'
import glob, os, re, subprocess, sys

out = sys.argv[1]
# The anonymous namespace's mangled name carries a per-file hash: <len>_GLOBAL__N__<hash>_<n>_<file>_cu_<hash>.
ANON = re.compile(r"\d+_GLOBAL__N__[0-9a-f]{8}_\d+_\w+?_cu_[0-9a-f]{8}")

def norm(s):  # the standard mangling of an anonymous namespace, the same in every file
    return ANON.sub("12_GLOBAL__N_1", s)

def demangle(name):
    try:
        return subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
    except OSError:
        return name

rows = []
for sass in sorted(glob.glob(os.path.join(out, "obj", "*.o.sm_*.sass"))):
    obj, arch = re.match(r"(.*)\.o\.(sm_\d+)\.sass$", os.path.basename(sass)).groups()
    res = {}
    cur = None
    for line in open(sass[: -len(".sass")] + ".res"):
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            cur = norm(m.group(1))
        elif cur and "REG:" in line:
            res[cur] = dict(kv.split(":", 1) for kv in line.split())
            cur = None
    funcs = {}
    cur = None
    for line in open(sass):
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = norm(m.group(1))
            funcs[cur] = []
        elif cur is not None and line.strip() and not line.startswith("Fatbin") and "=====" not in line:
            funcs[cur].append(norm(line.rstrip()))
    d = os.path.join(out, arch, obj)
    os.makedirs(d, exist_ok=True)
    for name, lines in funcs.items():
        with open(os.path.join(d, name + ".sass"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
        ins = [l for l in lines if re.match(r"\s*/\*[0-9a-f]{4,}\*/", l)]
        spill = sum(1 for l in ins if re.search(r"\b(LDL|STL)\b", l))
        r = res.get(name, {})
        rows.append([arch, obj, name, demangle(name).replace("(anonymous namespace)::", ""), r.get("REG", "?"), r.get("STACK", "?"),
                     r.get("LOCAL", "?"), r.get("SHARED", "?"), str(len(ins)), str(spill)])
with open(os.path.join(out, "summary.tsv"), "w") as fh:
    fh.write("arch\tobject\tkernel\tdemangled\tREG\tSTACK\tLOCAL\tSHARED\tinsns\tLDL_STL\n")
    for r in rows:
        fh.write("\t".join(r) + "\n")
print(f"cuda_sass_dump: {len(rows)} kernels (sm_80 + sm_90) -> {out}/summary.tsv")
PY

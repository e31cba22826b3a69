#!/usr/bin/env bash
# Compile-only check of the CUDA extension sources, no GPU needed (a CI step).
#
# Every csrc/**/*.cu goes through this machine's nvcc for sm_80 and sm_90 with the flags
# torch's extension build uses; csrc/**/*.cpp goes through the host compiler with
# -fsyntax-only. One line per file; exit status non-zero if any file fails.
# Usage: scripts/cuda_compile_check.sh   (in the project's Python environment)
# CUDA_CHECK_OBJ_DIR=DIR keeps the objects there (<file>.cu.o), e.g. for bench/tools/cuda_sass_dump.sh.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")}"
CXX="${CXX:-g++}"
PYTHON="${PYTHON:-python}"
if [ ! -x "$NVCC" ]; then
  echo "cuda_compile_check: nvcc not found (set NVCC or CUDA_HOME)" >&2
  exit 2
fi

# torch's include dirs, C++ ABI flag and the Python include dir, one per line.
mapfile -t TORCH_INFO < <("$PYTHON" - <<'PY'
import sysconfig
import torch
from torch.utils.cpp_extension import include_paths
print(" ".join("-I" + p for p in include_paths()))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(sysconfig.get_paths()["include"])
PY
)
if [ "${#TORCH_INFO[@]}" -ne 3 ]; then
  echo "cuda_compile_check: could not query torch for include paths" >&2
  exit 2
fi
read -r -a TORCH_INCLUDES <<< "${TORCH_INFO[0]}"
COMMON=(-std=c++17 "-D_GLIBCXX_USE_CXX11_ABI=${TORCH_INFO[1]}" -DTORCH_EXTENSION_NAME=_C
        -DTORCH_API_INCLUDE_EXTENSION_H "${TORCH_INCLUDES[@]}" "-I${TORCH_INFO[2]}" "-I$ROOT/csrc")
# A CPU-only torch wheel ships c10/cuda headers without the generated
# cuda_cmake_macros.h (it only sets the Windows DLL export macro): skip it there.
if [ ! -f "${TORCH_INCLUDES[0]#-I}/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  COMMON+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi
# The nvcc flags of torch.utils.cpp_extension's CUDA build.
NVCC_FLAGS=(-O3 --use_fast_math --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__
            -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
            -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
            --compiler-options -fPIC)

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
OBJ_DIR="${CUDA_CHECK_OBJ_DIR:-$TMP}"
mkdir -p "$OBJ_DIR"
# Files compile side by side, one job per core (CUDA_CHECK_JOBS): each nvcc job is
# single-threaded and the files are independent; the lines print in file order at the end.
JOBS="${CUDA_CHECK_JOBS:-$(nproc)}"
count=0
check() {  # check N LABEL FILE COMMAND...: run COMMAND, leave its one line (and log on failure) in $TMP/N.out
  local n="$1" label="$2" file="$3"; shift 3
  local start=$SECONDS
  if "$@" > "$TMP/$n.log" 2>&1; then
    echo "ok    $label ${file#"$ROOT"/} ($((SECONDS - start)) s)" > "$TMP/$n.out"
  else
    { echo "FAIL  $label ${file#"$ROOT"/} ($((SECONDS - start)) s)"; cat "$TMP/$n.log"; } > "$TMP/$n.out"
    touch "$TMP/$n.failed"
  fi
}
launch() {  # launch LABEL FILE COMMAND...: check in the background, at most JOBS at once
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  count=$((count + 1))
  check "$count" "$@" &
}

shopt -s globstar nullglob
for f in "$ROOT"/csrc/**/*.cu; do
  launch "nvcc sm_80,sm_90" "$f" "$NVCC" "${COMMON[@]}" "${NVCC_FLAGS[@]}" -c "$f" -o "$OBJ_DIR/$(basename "$f").o"
done
for f in "$ROOT"/csrc/**/*.cpp; do
  launch "$CXX -fsyntax-only" "$f" "$CXX" "${COMMON[@]}" -fPIC -fsyntax-only "$f"
done
wait
for n in $(seq 1 "$count"); do cat "$TMP/$n.out"; done
failed=("$TMP"/*.failed)
[ "${#failed[@]}" -eq 0 ]

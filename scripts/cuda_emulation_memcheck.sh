#!/usr/bin/env bash
# The CPU's memcheck of the CUDA kernels: the cuda-emulated tests (tests/cuda_emulation) with
# the emulated library built under AddressSanitizer, which reports any read or write of a
# kernel outside a tensor, outside its shared memory or outside its own stack, with the
# csrc line (a heap-buffer-overflow report names the kernel and the allocation). No GPU
# needed; ~5 min on two cores (the tests run serially: one report per process).
# Usage: scripts/cuda_emulation_memcheck.sh [pytest -k expression, default "emulated"]
# (in the project's Python environment). Exit status non-zero on a report or a failing test.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
FILTER="${1:-emulated}"
LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT
# The Python process is not built with the sanitizer: its runtime goes first, and libstdc++
# with it so that its __cxa_throw interceptor finds the real one (TORCH_CHECK throws).
PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"
cd "$ROOT"
M2F_CUDA_EMULATION_SANITIZE=address ASAN_OPTIONS="detect_leaks=0:log_path=$LOGS/asan" LD_PRELOAD="$PRELOAD" \
  TRITON_INTERPRET=1 "$PYTHON" -m pytest tests -q -p no:cacheprovider -k "$FILTER"
status=$?
# every process logs the sanitizer's swapcontext warning; errors are the reports
if grep -l "ERROR: AddressSanitizer" "$LOGS"/asan.* >/dev/null 2>&1; then
  grep -h -A12 "ERROR: AddressSanitizer" "$LOGS"/asan.*
  echo "cuda_emulation_memcheck: AddressSanitizer reported errors (above)" >&2
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "cuda_emulation_memcheck: pytest exited with $status (a sanitizer abort ends the process)" >&2
  exit "$status"
fi
echo "cuda_emulation_memcheck: no AddressSanitizer report over the tests matching -k '$FILTER'"

#!/usr/bin/env bash
# One GPU session in one call: install, info, the GPU test suite, the benchmark suite.
# Usage (on the GPU machine, repo root):  bash scripts/device_check.sh [tests] [bench] [bench-quick]
# Everything is logged under $OUT (default ./device-out); results JSON/markdown land in
# bench/results/ and are copied to $OUT. TEST_PATHS / TEST_FILTER / BENCH_FILTER narrow a run. Each stage has its own time limit so one slow
# stage cannot eat the others.
set -uo pipefail
OUT=${OUT:-$PWD/device-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 M2F_BENCH_COMMIT=${M2F_BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
stages=${*:-tests bench}
TEST_LIMIT=${TEST_LIMIT:-240} BENCH_LIMIT=${BENCH_LIMIT:-330}

[ -n "${SKIP_INSTALL:-}" ] || python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 \
  || { tail -20 "$OUT/install.log"; exit 1; }
python3 -m m2f_kernels.info | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv | tee -a "$OUT/info.txt"

workers=$(python3 -c "import importlib.util as u; print(8 if u.find_spec('xdist') else 0)")
for stage in $stages; do
  case $stage in
    tests)
      echo "== GPU tests (limit ${TEST_LIMIT}s, xdist workers: $workers)"
      xdist=(); [ "$workers" -gt 0 ] && xdist=(-n "$workers")
      # shellcheck disable=SC2086
      timeout "$TEST_LIMIT" python3 -m pytest ${TEST_PATHS:-tests} -q -p no:cacheprovider "${xdist[@]}" \
        --durations=15 -k "${TEST_FILTER:-}" 2>&1 | tee "$OUT/tests.log" | tail -40
      ;;
    bench|bench-quick)
      extra=(); [ "$stage" = bench-quick ] && extra=(--benchmark-quick)
      echo "== benchmarks $stage (limit ${BENCH_LIMIT}s)"
      timeout "$BENCH_LIMIT" python3 -m pytest bench -q -p no:cacheprovider --benchmark "${extra[@]}" \
        -k "${BENCH_FILTER:-}" 2>&1 | tee "$OUT/bench.log" | tail -60
      ls -t bench/results/*.json 2>/dev/null | head -1 | while read -r f; do
        cp "$f" "${f%.json}.md" "$OUT/" 2>/dev/null  # report and charts are made off the device
      done
      ;;
  esac
done
echo "== done"

#!/usr/bin/env bash
# A whole GPU check in one call: install, info, then the named stages in order
# (bench/README.md, "Running on a GPU machine").
# Usage (on the GPU machine, repo root):  bash scripts/device_check.sh STAGE...
#
# Stages (default: tests bench):
#   peers        start building the peer MSDeformAttn kernels (python -m bench.peers) in the
#                background from the archives in PEER_ARCHIVES (default: build/peer-archives/,
#                ../shared/peers/); bench and bench-quick wait for them (PEERS_WAIT_LIMIT)
#   build-cuda   start building m2f_kernels._C in the background (nice'd; bench, sweeps, hf,
#                train-start, equal-steps, cuda-tests and toolchain wait for it: the cuda backend
#                is then built and the compile takes no CPU from what is timed)
#   tests        the GPU test suite (pytest tests, xdist when present)
#   bench        the benchmark suite, default scope (BENCH_FILTER narrows it: -k)
#   bench-quick  the same at --benchmark-quick
#   sweeps       the masked-attention and point-loss sweeps at --quick (defaults, host vs GPU time)
#   hf           python -m bench.hf_mask2former (HF Mask2Former, then HF EoMT, with/without the patch)
#   train-start  start the fused and the reference `--preset small` training runs in the
#                background (TRAIN_STEPS, TRAIN_ARGS, TRAIN_LIMIT); `train-wait` waits for them
#   equal-steps  python -m bench.equal_steps: shapes training of EQUAL_STEPS_VARIANTS (default: reference
#                cuda-graph) over 3 seeds at equal steps (EQUAL_STEPS_ARGS, EQUAL_STEPS_LIMIT)
#   cuda-tests   the cuda backend's tests, then compute-sanitizer memcheck + racecheck on a subset
#                (SANITIZER_FILTER / SANITIZER_LIMIT; RACECHECK_FILTER / RACECHECK_LIMIT override them;
#                SANITIZERS="" runs none)
#   toolchain    what built and what loads the extension (compiler versions, libstdc++ / libgcc_s,
#                unwind tables): the record for a TORCH_CHECK that crashes instead of raising
#   collect      pack runs/ (without checkpoints), logs and new bench results into $OUT
# Every stage has its own time limit (*_LIMIT seconds) so one slow stage cannot eat the others.
# Everything is logged under $OUT (default ./device-out).
set -uo pipefail
OUT=${OUT:-$PWD/device-out}; mkdir -p "$OUT"
LOGS=$PWD/device-logs; mkdir -p "$LOGS"; touch "$LOGS/.start"  # collect packs bench results newer than this
export PYTHONUNBUFFERED=1 M2F_BENCH_COMMIT=${M2F_BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
stages=${*:-tests bench}
TEST_LIMIT=${TEST_LIMIT:-240} BENCH_LIMIT=${BENCH_LIMIT:-330} HF_LIMIT=${HF_LIMIT:-150}
TRAIN_LIMIT=${TRAIN_LIMIT:-300} CUDA_TEST_LIMIT=${CUDA_TEST_LIMIT:-120} SANITIZER_LIMIT=${SANITIZER_LIMIT:-60}
PEERS_WAIT_LIMIT=${PEERS_WAIT_LIMIT:-600} EQUAL_STEPS_LIMIT=${EQUAL_STEPS_LIMIT:-240}
CUDA_TESTS="tests/test_op_*.py tests/test_cuda_extension_errors.py"
T0=$SECONDS
stamp() { echo "== [$((SECONDS - T0)) s] $*"; }

[ -n "${SKIP_INSTALL:-}" ] || M2F_KERNELS_SKIP_CUDA_BUILD=1 python3 -m pip install -q --no-build-isolation --no-deps -e . \
  > "$LOGS/install.log" 2>&1 || { tail -20 "$LOGS/install.log"; exit 1; }
python3 -m m2f_kernels.info > "$LOGS/info.txt" 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv >> "$LOGS/info.txt"
cat "$LOGS/info.txt"
BUILD_PID=""
TRAIN_PIDS=()
PEERS_STARTED=""

wait_build() {
  [ -n "$BUILD_PID" ] || return 0
  stamp "waiting for the CUDA build"
  wait "$BUILD_PID"; echo "build exit: $?"; BUILD_PID=""
  tail -5 "$LOGS/build-cuda.log"
}

wait_peers() {
  [ -n "$PEERS_STARTED" ] || return 0
  stamp "waiting for the peer builds"
  python3 -m bench.peers wait --timeout "$PEERS_WAIT_LIMIT" > "$LOGS/peers-status.txt" 2>&1
  echo "peers wait exit: $? (1 = a build failed, 124 = time limit)"; cat "$LOGS/peers-status.txt"
  for log in build/peers/*/build.log; do [ -f "$log" ] && cp "$log" "$LOGS/peer-$(basename "$(dirname "$log")").log"; done
  PEERS_STARTED=""
}

workers=$(python3 -c "import importlib.util as u; print(8 if u.find_spec('xdist') else 0)")
for stage in $stages; do
  stamp "$stage"
  case $stage in
    peers)
      # shellcheck disable=SC2086
      TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} python3 -m bench.peers build --background --nice 5 \
        ${PEER_ARCHIVES:-} > "$LOGS/peers.log" 2>&1
      cat "$LOGS/peers.log"; PEERS_STARTED=1
      ;;
    build-cuda)
      # sm_90 only here: the one arch this machine runs, half the compile time
      ( export M2F_KERNELS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-6}
        nice -n 19 python3 setup.py build_ext --inplace ) > "$LOGS/build-cuda.log" 2>&1 &
      BUILD_PID=$!
      ;;
    tests)
      xdist=(); [ "$workers" -gt 0 ] && xdist=(-n "$workers")
      # shellcheck disable=SC2086
      # SIGINT at the limit: pytest still prints its summary of failures
      timeout -s INT -k 15 "$TEST_LIMIT" python3 -m pytest ${TEST_PATHS:-tests} -q -rfE -p no:cacheprovider \
        "${xdist[@]}" --durations=15 -k "${TEST_FILTER:-}" > "$LOGS/tests.log" 2>&1
      tail -25 "$LOGS/tests.log"
      ;;
    bench|bench-quick)
      wait_build; wait_peers
      extra=(); [ "$stage" = bench-quick ] && extra=(--benchmark-quick)
      timeout "$BENCH_LIMIT" python3 -m pytest bench -q -p no:cacheprovider --benchmark "${extra[@]}" \
        -k "${BENCH_FILTER:-}" > "$LOGS/bench-$((SECONDS - T0)).log" 2>&1
      ls -t "$LOGS"/bench-*.log | head -1 | xargs tail -8
      ;;
    sweeps)
      wait_build
      timeout 60 python3 bench/sweep_masked_attention.py --quick > "$LOGS/sweep-masked-attention.txt" 2>&1
      sed -n '/^## 1/,/^## 3/p' "$LOGS/sweep-masked-attention.txt" | head -20
      timeout 60 python3 bench/sweep_point_loss.py --quick > "$LOGS/sweep-point-loss.txt" 2>&1
      tail -20 "$LOGS/sweep-point-loss.txt"
      ;;
    hf)
      wait_build
      for model in mask2former eomt; do
        timeout "$HF_LIMIT" python3 -m bench.hf_mask2former --model "$model" --size real --device cuda \
          --out bench/results > "$LOGS/hf-$model.log" 2>&1
        tail -30 "$LOGS/hf-$model.log"
      done
      ;;
    train-start)
      wait_build
      for kernels in fused reference; do
        timeout "$TRAIN_LIMIT" python3 -m m2f.train --preset small --kernels "$kernels" ${TRAIN_STEPS:+--steps "$TRAIN_STEPS"} \
          --out "runs/shapes_small_$kernels" ${TRAIN_ARGS:-} > "$LOGS/train-$kernels.log" 2>&1 &
        TRAIN_PIDS+=($!)
      done
      ;;
    train-wait)
      for pid in "${TRAIN_PIDS[@]}"; do wait "$pid"; echo "train exit: $?"; done
      TRAIN_PIDS=()
      for kernels in fused reference; do
        echo "-- $kernels"; tr '\r' '\n' < "$LOGS/train-$kernels.log" | grep -v '^\s*$' | tail -6
      done
      ;;
    equal-steps)
      wait_build
      # SIGINT at the limit: the run in progress checkpoints, the finished ones are written
      # shellcheck disable=SC2086
      timeout -s INT -k 150 "$EQUAL_STEPS_LIMIT" python3 -m bench.equal_steps ${EQUAL_STEPS_VARIANTS:-reference cuda-graph} \
        ${EQUAL_STEPS_ARGS:---steps 300 --train-args=--preset=tiny} > "$LOGS/equal-steps.log" 2>&1
      echo "equal-steps exit: $? (1 = a run failed, 130 = time limit)"; tail -12 "$LOGS/equal-steps.log"
      ;;
    cuda-tests)
      wait_build
      # the cuda cases of the per-op tests (ids and classes name the backend) and the extension's error paths
      timeout -s INT -k 15 "$CUDA_TEST_LIMIT" python3 -m pytest ${CUDA_TEST_PATHS:-$CUDA_TESTS} -k cuda -q -rfE \
        -p no:cacheprovider --durations=8 > "$LOGS/cuda-tests.log" 2>&1
      tail -25 "$LOGS/cuda-tests.log"
      sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
      if [ -n "$sanitizer" ]; then
        for tool in ${SANITIZERS-memcheck racecheck}; do
          stamp "compute-sanitizer $tool"
          filter=${SANITIZER_FILTER:-float32 and not standard and not int64}; limit=$SANITIZER_LIMIT
          [ "$tool" = racecheck ] && filter=${RACECHECK_FILTER:-$filter} limit=${RACECHECK_LIMIT:-$limit}
          timeout "$limit" "$sanitizer" --tool "$tool" --error-exitcode 99 \
            python3 -m pytest $CUDA_TESTS -q -p no:cacheprovider -x \
            -k "cuda and ($filter)" > "$LOGS/sanitizer-$tool.log" 2>&1
          echo "$tool exit: $? (99 = errors found, 124 = time limit)"
          grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$LOGS/sanitizer-$tool.log" | tail -3
        done
      else
        echo "compute-sanitizer not found"
      fi
      ;;
    toolchain)
      wait_build
      so=$(ls m2f_kernels/_C*.so 2>/dev/null | head -1)
      { for cc in /opt/gcc/bin/g++ /usr/bin/g++ "${CXX:-}"; do [ -x "$cc" ] && "$cc" --version | head -1; done
        env | grep -E '^(CC|CXX|LD_LIBRARY_PATH|CUDAHOSTCXX)=' ; grep -m1 -- '-ccbin' "$LOGS/build-cuda.log" | grep -o -- '-ccbin [^ ]*'
        if [ -n "$so" ]; then ldd "$so" | grep -E 'stdc|gcc_s|c10'; readelf -lW "$so" | grep -E 'EH_FRAME|GNU_STACK'
          readelf -V "$so" | grep -oE 'GLIBCXX_[0-9.]+|CXXABI_[0-9.]+' | sort -uV | tail -3; fi
        python3 -c "import torch; print('torch', torch.__version__, torch.__config__.show().splitlines()[1:3])"
      } > "$LOGS/toolchain.txt" 2>&1
      cat "$LOGS/toolchain.txt"
      ;;
    collect)
      find runs -name '*.pt' -delete 2>/dev/null
      tar czf "$OUT/results.tar.gz" device-logs $(ls -d runs 2>/dev/null) \
        $(find bench/results -type f -newer "$LOGS/.start") 2>/dev/null
      ls -la "$OUT"
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
stamp "done"

#!/usr/bin/env bash
# The GPU check of blobbench, run in one go on an offline GPU machine (../shared/device/README.md):
# install the carried wheels, build against the machine's torch, run the CUDA tests,
# compute-sanitizer, and the GPU benchmark. Everything lands in $OUT; a summary prints last.
#   usage (repo root): OUT=/some/dir bash benchmarks/gpu/device_check.sh
# STEPS picks the steps after the build (default: all), e.g. STEPS="tests sanitizer" for a first
# call and STEPS="profile bench command" for a second one when one call's 600 s would not do.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*"; }
STEPS=${STEPS:-"tests sanitizer profile bench command"}
want() { [[ " $STEPS " == *" $1 "* ]]; }
status=0

log "wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || { echo "wheel install failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"

log "build"
export MAX_JOBS=16
timeout 300 python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
python3 -c "import blobbench; assert blobbench.has_cuda_kernels(), 'no CUDA kernels'; print('CUDA kernels registered')"

if want tests; then
log "tests"
# The op tests (CPU and CUDA); the benchmark-command, training and README tests are CPU-side
# and slow, so they are left to CI unless PYTEST_ARGS says otherwise.
DEFAULT_TESTS="-q tests --ignore=tests/test_bench.py --ignore=tests/test_train.py --ignore=tests/test_readme.py"
timeout 150 python3 -m pytest -p no:cacheprovider ${PYTEST_ARGS:-$DEFAULT_TESTS} \
  > "$OUT/pytest.log" 2>&1; rc=$?
grep -v "^  File" "$OUT/pytest.log" | grep -E "PASSED|FAILED|ERROR|SKIPPED|Fatal|passed|failed|::" | tail -25; [ $rc -eq 0 ] || status=1
fi

if want sanitizer; then
log "compute-sanitizer"
for tool in ${SANITIZERS-memcheck racecheck}; do
  timeout 80 compute-sanitizer --tool $tool --error-exitcode 9 python3 benchmarks/gpu/sanitize_cases.py \
    > "$OUT/sanitizer_$tool.log" 2>&1; rc=$?
  echo "$tool exit $rc: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$tool.log" | tail -1)"
  [ $rc -eq 0 ] || status=1
done
fi

if want profile; then
log "profiler: kernels per call, kernel time, wall time (fused with max_label vs MONAI)"
timeout 180 python3 benchmarks/gpu/profile_calls.py --out "$OUT/profile_calls.json" \
  > "$OUT/profile_calls.log" 2>&1 || { echo "profile_calls: exit $?"; status=1; }
grep -v "^    " "$OUT/profile_calls.log" | tail -6
fi

if want bench; then
log "benchmark"
timeout 150 python3 benchmarks/gpu/gpu_bench.py --out "$OUT/gpu_bench.json" --reps 30 --naive-budget 12 > "$OUT/bench.log" 2>&1 || status=1
tail -8 "$OUT/bench.log"
fi

if want command; then
log "blobbench command on CUDA (profiles ms, shanel; instance sweep)"
# --name: a plain folder (links do not come back from the device machine); one re-measurement.
timeout 180 python3 -m blobbench --devices cuda --profiles ms,shanel --batch paper --sweep instances --reps 20 \
  --remeasure 1 --out "$OUT/blobbench-cuda" --name cuda > "$OUT/blobbench-cuda.log" 2>&1 \
  || { echo "blobbench command: exit $?"; status=1; }
tail -12 "$OUT/blobbench-cuda.log"
fi
log "done (status $status)"
exit $status

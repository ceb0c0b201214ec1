#!/usr/bin/env bash
# blobbench's GPU check: ONE call of at most 7 minutes on a fresh offline GPU machine
# (../shared/device/README.md), the build included. From the repository root, with `.whl` carried
# (`bash benchmarks/gpu/fetch_wheels.sh`: cc3d, monai, scipy, tqdm):
#
#   COMMIT=<git rev-parse HEAD> OUT=/some/dir bash benchmarks/gpu/device_check.sh
#   DRY_RUN=1 OUT=/some/dir bash benchmarks/gpu/device_check.sh      # the CPU dry run (CI)
#
# Steps, each under its own `timeout`:
#   env                 GPU, driver, Python, torch, commit
#   wheels | build      the carried wheels into /tmp/site, the extension built against the
#                       machine's torch (MAX_JOBS=16), in parallel
#   then in parallel (none of them times anything):
#   imports             what the steps import, with versions (a package missing from .whl fails
#                       this step by name; the others still run)
#   tests-default       pytest -m cuda (CI runs the others)
#   tests-all           the same with BLOBBENCH_CUDA_PATHS=all (every opt-in CUDA path)
#   memcheck-a/b, racecheck-a/b, initcheck-a/b
#                       compute-sanitizer over benchmarks/gpu/sanitize_cases.py, its
#                       BLOBBENCH_CUDA_PATHS settings in two halves (a: default, all, vector_loads,
#                       coop_forward; b: the other paths alone), PYTORCH_NO_CUDA_MEMORY_CACHING=1
#                       (racecheck only instruments blobbench's kernels: kns=blob)
#   prepare             the synthetic batches generated into the cache for the two steps below
#   then one after the other, alone on the GPU:
#   profile             benchmarks/gpu/profile_calls.py: launches, kernel and wall us per call and
#                       per forward path, the accumulate's bandwidth against a device copy
#   command             python -m blobbench --devices cuda (ms and shanel paper batches) without
#                       the naive loops, the float64 check and the host cost proxy; its
#                       result.json rewritten after every measurement
# Everything lands in ONE archive, $OUT/device_check.tar.gz, beside $OUT/summary.md
# (benchmarks/gpu/summarize.py), both written by an EXIT trap, so a failed or timed-out step
# still returns its logs. The exit status is 1 when any step failed.
#
# DRY_RUN=1: every step on the CPU at tiny sizes, no wheels, no build (the installed extension),
# no compute-sanitizer (the sanitizer cases run plain on the CPU instead), same archive and summary.
# DEVICE_CHECK_STEPS: the steps (or groups: tests, sanitizer) to run, e.g. "env profile"; default all.
# DEVICE_CHECK_FAIL: steps that fail on purpose (exit 97 without running), to test the failure path.
# DEVICE_CHECK_TIMEOUT_SCALE: multiplies every timeout (default 1; 3 with DRY_RUN).
# PYTHON: the interpreter (default python3).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 2
DRY=${DRY_RUN:-0}
[ "$DRY" = 0 ] || DRY=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
STEPS=${DEVICE_CHECK_STEPS:-all}
FAIL=${DEVICE_CHECK_FAIL:-}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX")
LOGS=$WORK/device_check
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # the scripts under benchmarks/gpu import this checkout
: > "$LOGS/steps.tsv"
T_START=$(date +%s)

# Timeouts (s). The real run's critical path: env 15 + build 170 (wheels 60 beside it) + the
# parallel phase 80 + profile 55, then the command gets what is left until T_DEADLINE (380 s
# after the start, at least 60 s), so the check ends within 420 s (its 5 s kill-after, at most
# 20 s for the summary and the packing included) unless the steps before it ran past ~320 s.
# Expected: about 280 s for the steps before the command, which then has ~100 s. (The
# command measures each (profile, impl) in a fresh process forked from a server: the dry run's
# 6 of them took 24 s on the 2-core machine, the first 11 s of it the server's imports; the real
# run has 12, on CUDA.)
# The build: 16 jobs, each source file on its own core, so the slowest file sets it. On the 2-core
# development machine (torch 2.11 headers, sm_90) blob_loss_kernel.cu takes 267 s of CPU,
# forward_fast.cu 247 s, dice_ce_kernel.cu 229 s; abcb130's only CUDA file took 247 s there and
# its whole build 130 s on the H200, so about 140 s is expected here.
T_ENV=15 T_WHEELS=60 T_BUILD=170 T_PARALLEL=80 T_PROFILE=55 T_DEADLINE=380 T_COMMAND_MIN=60
# The dry run has no call limit to keep, and a shared CI machine can be slow: its timeouts are 3x.
SCALE=${DEVICE_CHECK_TIMEOUT_SCALE:-$([ "$DRY" = 1 ] && echo 3 || echo 1)}

say() { echo "== $(date +%T) $*" | tee -a "$LOGS/device_check.log"; }

want() {  # want STEP [GROUP]: the step is selected
  [ "$STEPS" = all ] && return 0
  local s
  for s in $STEPS; do [ "$s" = "$1" ] || [ "$s" = "${2:-}" ] && return 0; done
  return 1
}

record() {  # record NAME RC SECONDS TIMEOUT NOTE
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >> "$LOGS/steps.tsv"
}

step() {  # step NAME TIMEOUT CMD...: run CMD under timeout, its output in LOGS/NAME.log
  local name=$1 t=$(( $2 * SCALE )) rc t0 dt
  shift 2
  t0=$(date +%s.%N)
  say "$name: start (timeout ${t} s)"
  if [[ ",$FAIL," == *",$name,"* ]]; then
    echo "forced failure (DEVICE_CHECK_FAIL=$FAIL)" > "$LOGS/$name.log"
    rc=97
  else
    timeout -k 5 "$t" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
  fi
  dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  local note=""
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && note="timed out after ${t} s"
  [ $rc -eq 97 ] && note="forced failure"
  record "$name" "$rc" "$dt" "$t" "$note"
  say "$name: exit $rc in ${dt} s${note:+ ($note)}"
  tail -n 4 "$LOGS/$name.log" | sed 's/^/   | /'
  return $rc
}

skip() {  # skip NAME WHY: a step that could not run (counts as failed)
  record "$1" skipped 0 0 "$2"
  say "$1: SKIPPED ($2)"
}

finish() {
  local rc=$? status=0 elapsed
  trap - EXIT INT TERM
  elapsed=$(( $(date +%s) - T_START ))
  echo "$elapsed" > "$LOGS/elapsed_s"
  echo "$DRY" > "$LOGS/dry_run"
  # any step not 0 fails the check (skipped ones included), and so does an interrupted script
  if awk -F'\t' '$2 != "0" { bad = 1 } END { exit bad ? 0 : 1 }' "$LOGS/steps.tsv"; then status=1; fi
  [ $rc -ne 0 ] && status=1
  [ -s "$LOGS/steps.tsv" ] || status=1
  if ! timeout 20 "$PY" benchmarks/gpu/summarize.py "$LOGS" --status "$status" > "$OUT/summary.md" \
      2> "$LOGS/summarize.err"; then
    status=1
    { echo "# blobbench GPU check: FAILED (summarize.py failed: see summarize.err in the archive)"
      echo; echo '```'; cat "$LOGS/steps.tsv"; tail -n 20 "$LOGS/summarize.err"; echo '```'; } > "$OUT/summary.md"
  fi
  cp "$OUT/summary.md" "$LOGS/summary.md"
  # at most 16 MiB a file comes back: cut any log over 4 MB to its first and last MB
  find "$LOGS" -type f -size +4M -name '*.log' | while read -r f; do
    { head -c 1000000 "$f"; printf '\n[... cut: %s bytes in all ...]\n' "$(stat -c %s "$f")"; tail -c 1000000 "$f"; } \
      > "$f.cut" && mv "$f.cut" "$f"
  done
  tar -czf "$OUT/device_check.tar.gz" -C "$WORK" device_check || status=1
  echo; cat "$OUT/summary.md"; echo
  say "done in ${elapsed} s: status $status; $OUT/summary.md, $OUT/device_check.tar.gz"
  rm -rf "$WORK"
  exit $status
}
trap finish EXIT
trap 'say "interrupted"; exit 130' INT TERM

say "blobbench GPU check in $ROOT (DRY_RUN=$DRY), archive and summary to $OUT"

# ---- env
env_info() {
  if [ "$DRY" = 1 ]; then echo "gpu: none (DRY_RUN, CPU)"; else
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | sed 's/^/gpu: /'
  fi
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo "${COMMIT:-unknown}")"
  git status --porcelain 2>/dev/null | grep -v '^??' | sed 's/^/modified: /' | head -20
  "$PY" -c "import platform; from importlib.metadata import version; print('python:', platform.python_version()); print('torch:', version('torch')); print('setuptools:', version('setuptools'), '(the build reads pyproject.toml: >= 77 for its SPDX license)')"
  echo "compute-sanitizer: $(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || echo 'not found')"
  echo "cpus: $(nproc)"
}
export -f env_info
export DRY PY
if want env; then
  step env "$T_ENV" bash -c env_info
fi

# ---- wheels and build
if [ "$DRY" = 1 ]; then
  if want build; then
    step build 60 "$PY" -c "import blobbench; print('DRY_RUN: no wheels, no build; the installed extension:', blobbench.__file__, 'CUDA kernels:', blobbench.has_cuda_kernels())"
  fi
else
  if want wheels && ! ls .whl/*.whl > /dev/null 2>&1; then
    record wheels 0 0 0 "no .whl folder: the packages installed on the machine are used"
    say "wheels: none in .whl/, the packages installed on the machine are used"
  elif want wheels; then
    step wheels "$T_WHEELS" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl &
    pid_wheels=$!
  fi
  if want build; then
    step build "$T_BUILD" bash -c "MAX_JOBS=16 '$PY' -m pip install --no-build-isolation --no-deps -e . && \
      '$PY' -c \"import blobbench; assert blobbench.has_cuda_kernels(), 'no CUDA kernels'; print('CUDA kernels registered')\"" &
    pid_build=$!
  fi
  [ -n "${pid_wheels:-}" ] && { wait "$pid_wheels" || true; }
  [ -n "${pid_build:-}" ] && { wait "$pid_build" || true; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if awk -F'\t' '($1 == "build" || $1 == "wheels") && $2 != "0" { bad = 1 } END { exit bad ? 0 : 1 }' "$LOGS/steps.tsv"; then
  for s in imports tests-default tests-all sanitizer prepare profile command; do
    want "$s" "${s%%-*}" && skip "$s" "the build or the wheels failed"
  done
  exit 1
fi

# ---- the parallel phase: tests, sanitizers, data (nothing here is timed); a few CPU threads each
# (ten processes on 16 cores, five on the dry run's two)
pids=()
OMP_BEFORE=${OMP_NUM_THREADS-unset}
export OMP_NUM_THREADS=$([ "$DRY" = 1 ] && echo 1 || echo 2)
# what the steps import (benchmarks/gpu/fetch_wheels.sh carries what the machine lacks): a missing
# package fails this step by name instead of surfacing as skipped or failed tests
if want imports; then
  step imports "$T_PARALLEL" "$PY" -c "import importlib, sys
missing = []
for name in ('blobbench', 'torch', 'numpy', 'pytest', 'cc3d', 'monai', 'scipy.ndimage', 'tqdm'):
    try:
        mod = importlib.import_module(name)
    except Exception as e:
        missing.append(name)
        print(name, 'MISSING:', type(e).__name__, e)
    else:
        root = sys.modules[name.split('.')[0]]
        print(name, getattr(root, '__version__', '?'), getattr(root, '__file__', ''))
sys.exit(f'missing: {missing} (bash benchmarks/gpu/fetch_wheels.sh puts their wheels in .whl)' if missing else 0)" &
  pids+=($!)
fi
if want tests-default tests; then
  step tests-default "$T_PARALLEL" env -u BLOBBENCH_CUDA_PATHS "$PY" -m pytest -p no:cacheprovider -m cuda -q -rfE \
    --junitxml="$LOGS/tests-default.xml" tests &
  pids+=($!)
fi
if want tests-all tests; then
  step tests-all "$T_PARALLEL" env BLOBBENCH_CUDA_PATHS=all "$PY" -m pytest -p no:cacheprovider -m cuda -q -rfE \
    --junitxml="$LOGS/tests-all.xml" tests &
  pids+=($!)
fi
if want sanitizer; then
  if [ "$DRY" = 1 ]; then
    say "compute-sanitizer: SKIPPED (DRY_RUN); the sanitizer cases run plain on the CPU instead"
    step sanitize-cpu "$T_PARALLEL" "$PY" benchmarks/gpu/sanitize_cases.py --device cpu --settings default,all &
    pids+=($!)
  else
    SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    HALF_A=default,all,vector_loads,coop_forward
    HALF_B=split_forward,fused_dice_ce,softmax_inf,parallel_finalize
    for tool in memcheck racecheck initcheck; do
      filter=()
      [ $tool = racecheck ] && filter=(--kernel-name kns=blob)
      for half in a b; do
        settings=$HALF_A
        [ $half = b ] && settings=$HALF_B
        step "$tool-$half" "$T_PARALLEL" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool $tool --error-exitcode 9 \
          --print-limit 200 --show-backtrace device "${filter[@]}" \
          "$PY" benchmarks/gpu/sanitize_cases.py --settings "$settings" &
        pids+=($!)
      done
    done
  fi
fi
if want prepare; then
  small=()
  [ "$DRY" = 1 ] && small=(--small)
  step prepare "$T_PARALLEL" "$PY" benchmarks/gpu/profile_calls.py --prepare "${small[@]}" &
  pids+=($!)
fi
for p in "${pids[@]}"; do wait "$p" || true; done
if [ "$OMP_BEFORE" = unset ]; then unset OMP_NUM_THREADS; else export OMP_NUM_THREADS=$OMP_BEFORE; fi

# ---- timed steps, alone on the device
if want profile; then
  if [ "$DRY" = 1 ]; then
    step profile "$T_PROFILE" "$PY" benchmarks/gpu/profile_calls.py --device cpu --small --out "$LOGS/profile_calls.json"
  else
    step profile "$T_PROFILE" "$PY" benchmarks/gpu/profile_calls.py --out "$LOGS/profile_calls.json"
  fi
fi
if want command; then
  IMPLS=fused,fused_tversky,fused_dice_ce,vectorized,monai_dice,monai_dice_ce  # the dry run's too: no typo waits for a GPU
  # --name: a plain folder (links do not come back from the device machine); no re-measurement
  if [ "$DRY" = 1 ]; then  # a tiny label file instead of the profiles: each measurement is a fresh process
    "$PY" -c "import numpy as np, sys; a = np.zeros((8, 32, 32), np.uint8)
for i in range(6): a[1 + i % 5:3 + i % 5, 5 * i:5 * i + 3, 2 + 4 * i:6 + 4 * i] = 1
np.save(sys.argv[1], a)" "$WORK/tiny_labels.npy"
    args=(--devices cpu --profiles none --labels "$WORK/tiny_labels.npy" --labels-profile shanel --crops 1
          --impls "$IMPLS" --reps 2)
  else
    args=(--devices cuda --profiles ms,shanel --batch paper --impls "$IMPLS" --reps 20)
  fi
  # step multiplies by SCALE: the deadline is divided by it first, so it holds at any scale (the
  # dry run, SCALE 3 and no call limit, gets the minimum: 180 s)
  T_COMMAND=$T_COMMAND_MIN
  if [ "$DRY" = 0 ]; then
    T_COMMAND=$(( (T_DEADLINE - ($(date +%s) - T_START)) / SCALE ))
    [ "$T_COMMAND" -ge "$T_COMMAND_MIN" ] || T_COMMAND=$T_COMMAND_MIN
  fi
  step command "$T_COMMAND" "$PY" -m blobbench "${args[@]}" --sweep none --no-check --no-proxy --no-plots \
    --remeasure 0 --out "$LOGS/command" --name run
fi
exit 0

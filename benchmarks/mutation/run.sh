#!/usr/bin/env bash
# Mutation testing of the Python package (issue 23); not run by CI (hours on 2 cores).
#
#   bash benchmarks/mutation/run.sh                  # every module in scope, report to $OUT
#   bash benchmarks/mutation/run.sh "blobbench.metrics.*"     # some modules (mutant name globs)
#
# mutmut 3 (pip install mutmut==3.8.1; configuration: pyproject.toml [tool.mutmut]) runs in a
# detached git worktree at HEAD ($WT), never in this checkout: it writes the mutated copy under
# $WT/mutants. The worktree gets this checkout's tests and its built extension (blobbench/_C*.so:
# build it first). Two workers at nice 10, one thread each. The run uses every 8th seed of the
# large seed sweeps (benchmarks/mutation/pytest_plugin.py); the survivors are then rerun with
# every seed. Results are kept in $WT/mutants: a second run only runs mutants of changed code
# or new tests. The report (benchmarks/mutation/report.py) goes to $OUT.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WT=${WT:-${TMPDIR:-/tmp}/blobbench-mutation}
OUT=${OUT:-$REPO/benchmarks/results/mutation-$(date +%F)}
JOBS=${JOBS:-2}
SCOPE=("blobbench.losses.*" "blobbench.metrics.*" "blobbench.instances.*" "blobbench._ops.*"
       "blobbench.closed_form.*" "blobbench.reference.*" "blobbench.stats.*" "blobbench.transforms.*"
       "blobbench.bench.bench.x__check_worker*" "blobbench.bench.bench.x_loss_fn*"
       "blobbench.bench.compare.*" "blobbench.bench.noise.*" "blobbench.cc_losses.*" "blobbench.voronoi.*")
[ $# -gt 0 ] && SCOPE=("$@")
[ -e "$WT/.git" ] || git -C "$REPO" worktree add --detach "$WT" HEAD
git -C "$WT" checkout -q --detach "$(git -C "$REPO" rev-parse HEAD)"
cp "$REPO"/blobbench/_C*.so "$WT/blobbench/"
cp -r "$REPO/tests/." "$WT/tests/"
cp -r "$REPO/benchmarks/mutation/." "$WT/benchmarks/mutation/"
cp "$REPO/pyproject.toml" "$REPO/README.md" "$WT/"
cd "$WT"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
start=$(date +%s); load0=$(cut -d' ' -f1-3 /proc/loadavg)
nice -n 10 mutmut run --max-children "$JOBS" "${SCOPE[@]}" | tr '\r' '\n' | grep -v '^[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]' || true
mapfile -t survivors < <(mutmut results 2>/dev/null | awk -F': ' '$2 == "survived" {gsub(/^ +/, "", $1); print $1}')
if [ ${#survivors[@]} -gt 0 ]; then
  echo "rerunning ${#survivors[@]} survivors with every seed"
  BLOBBENCH_MUTATION_THIN=1 nice -n 10 mutmut run --max-children "$JOBS" "${survivors[@]}" \
    | tr '\r' '\n' | grep -v '^[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]' || true
fi
end=$(date +%s)
pats=(); for s in "${SCOPE[@]}"; do pats+=(--pattern "$s"); done
python "$REPO/benchmarks/mutation/report.py" "$WT" --out "$OUT" "${pats[@]}" \
  --header "Command: \`bash benchmarks/mutation/run.sh\` at $(git rev-parse --short HEAD) (mutmut $(mutmut --version | awk '{print $NF}'), $JOBS workers, nice 10, one thread each); $(( (end - start) / 60 )) min $(( (end - start) % 60 )) s; load average before $load0, after $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) CPUs)."

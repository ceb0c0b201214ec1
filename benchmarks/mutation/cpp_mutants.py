"""Hand-made mutants of the C++ kernels, each of which the test suite must catch (issue 23).

    python benchmarks/mutation/cpp_mutants.py --out benchmarks/results/mutation-2026-12-01

For each mutant of :data:`MUTANTS` (a wrong gradient coefficient, a wrong sum, a wrong masking
branch, off-by-ones in the label range) the script patches a copy of the sources in a temporary
git worktree (detached at this checkout's HEAD; the checkout itself is never touched), builds the
extension CPU-only there (``USE_CUDA=0 python setup.py build_ext --inplace``; ninja rebuilds only
what the patched file reaches), runs the tests that concern the mutant (pytest -x) and requires
them to fail. The source is restored after each mutant. An unmutated build and test run comes
first: the selected tests must pass on it, or no verdict means anything.

Writes ``cpp_mutants.json`` and ``cpp_mutants.md`` (per mutant: caught or not, the first failing
test, build and test seconds) to ``--out``; exit status 0 only when every mutant was caught.
Everything runs at ``nice -n 10`` and, with ``--max-load`` (default 6), waits before each build
until the 1-minute load average is under it. A first build takes minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Mutant:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


ORACLE = ("tests/test_dice.py::test_fused_cpu_matches_naive_monai_loop",)
GRAD = ("tests/test_dice.py::test_fused_cpu_matches_naive_monai_loop", "tests/test_dice.py::test_gradcheck_float64")
LABELS = ("tests/test_edge_cases.py", "tests/test_errors.py")

MUTANTS = [
    Mutant("grad_coefficient", "wrong gradient coefficient: dL/dp of a target voxel -1/den instead of -2/den "
           "(the loss is unchanged)", "csrc/blob_loss_math.h",
           "    r.d_target = -2.0 / den;", "    r.d_target = -1.0 / den;", GRAD),
    Mutant("sum_of_p", "wrong sum: a mixed block adds sum p^2 to the label's sum p (runs of equal labels)",
           "csrc/cpu/kernels_impl.h", "        e[0] += s;\n", "        e[0] += q;\n", ORACLE),
    Mutant("masking_branch", "wrong masking branch: official masking adds the masked voxels' mass 0.5 for "
           "activation \"none\" too (the published code masks sigmoid logits only)", "csrc/blob_loss_math.h",
           "  if (prm.masking != kOfficial || prm.activation != kSigmoid) return 0.0;",
           "  if (prm.masking != kOfficial) return 0.0;", ORACLE),
    Mutant("label_range_check", "off-by-one in the label range: an id equal to max_label is refused",
           "csrc/common/glue.cpp", "max_label < 0 || hi <= max_label", "max_label < 0 || hi < max_label",
           LABELS),
    Mutant("label_table_size", "off-by-one in the label range: the dense table has max_id entries, not max_id + 1",
           "csrc/common/glue.cpp", "  r.bound = max_id + 1;", "  r.bound = max_id;",
           LABELS),
]


def load1() -> float:
    return os.getloadavg()[0]


def wait_for_load(max_load: float, log) -> float:
    """Waits until the 1-minute load average is under ``max_load``; returns the seconds waited."""
    t0 = time.time()
    while max_load > 0 and load1() >= max_load:
        log(f"  load {load1():.1f} >= {max_load}: waiting")
        time.sleep(30)
    return time.time() - t0


def nice(cmd):
    return ["nice", "-n", "10"] + list(cmd)


def build(wt: Path, log) -> tuple[bool, float, str]:
    env = dict(os.environ, USE_CUDA="0", MAX_JOBS="2")
    t0 = time.time()
    p = subprocess.run(nice([sys.executable, "setup.py", "build_ext", "--inplace"]), cwd=wt, env=env,
                       capture_output=True, text=True)
    dt = time.time() - t0
    log(f"  build: rc {p.returncode}, {dt:.0f} s")
    return p.returncode == 0, dt, (p.stdout + p.stderr)[-3000:]


def run_tests(wt: Path, tests, log) -> tuple[int, float, str, str]:
    """(pytest's exit status, seconds, the first failing test id or '', output tail)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(wt))
    t0 = time.time()
    p = subprocess.run(nice([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]),
                       cwd=wt, env=env, capture_output=True, text=True)
    dt = time.time() - t0
    out = p.stdout + p.stderr
    m = re.search(r"^FAILED (\S+)", out, flags=re.M)
    log(f"  tests: rc {p.returncode}, {dt:.0f} s" + (f", first failure {m.group(1)}" if m else ""))
    return p.returncode, dt, m.group(1) if m else "", out[-2000:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for cpp_mutants.json / .md")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="the worktree to build in (default: a new one under the temp folder, removed after)")
    ap.add_argument("--only", default="", help="comma-separated mutant names (default: all)")
    ap.add_argument("--max-load", type=float, default=6.0, help="wait before a build while the load is above")
    ap.add_argument("--dry-run", action="store_true",
                    help="only check that each patch applies once to this checkout's sources and that its tests "
                         "collect; no worktree, no build")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # run the cleanup (worktree removal)

    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    chosen = [m for m in MUTANTS if not args.only or m.name in args.only.split(",")]
    if args.dry_run:
        bad = 0
        for m in chosen:
            n = (REPO / m.path).read_text().count(m.old)
            p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                *m.tests], cwd=REPO, capture_output=True, text=True)
            tail = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-200:]
            ok = n == 1 and p.returncode == 0
            bad += not ok
            log(f"{m.name}: the patch applies {n} time(s) to {m.path}; tests: {tail}")
        return 1 if bad else 0
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    own = args.workdir is None
    wt = Path(tempfile.mkdtemp(prefix="blobbench-cpp-mutants-")) / "wt" if own else args.workdir
    if not (wt / ".git").exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(wt), head], cwd=REPO, check=True,
                       capture_output=True)
    # the tests of this checkout (they may be newer than HEAD's), the sources of HEAD
    shutil.copytree(REPO / "tests", wt / "tests", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    t_start = time.time()
    load_before = os.getloadavg()
    results = {"head": head, "workdir": str(wt), "load_at_start": load_before, "mutants": []}
    try:
        log(f"unmutated build at {head[:10]} in {wt}")
        waited = wait_for_load(args.max_load, log)
        ok, build_s, tail = build(wt, log)
        if not ok:
            log(tail)
            return 2
        results["first_build_s"], results["first_build_waited_s"] = build_s, waited
        results["clean_tests"] = []
        for tests in dict.fromkeys(m.tests for m in chosen):
            rc, test_s, first, tail = run_tests(wt, tests, log)
            results["clean_tests"].append({"tests": list(tests), "rc": rc, "seconds": round(test_s, 1)})
            if rc != 0:
                log("the unmutated build fails the selected tests: no verdict possible\n" + tail)
                return 2
        for m in chosen:
            log(f"mutant {m.name}: {m.what}")
            src = wt / m.path
            text = src.read_text()
            if text.count(m.old) != 1:
                raise SystemExit(f"{m.name}: the text to mutate occurs {text.count(m.old)} times in {m.path}")
            src.write_text(text.replace(m.old, m.new))
            try:
                waited = wait_for_load(args.max_load, log)
                ok, build_s, btail = build(wt, log)
                row = {"name": m.name, "what": m.what, "file": m.path, "old": m.old.strip(), "new": m.new.strip(),
                       "tests": list(m.tests), "build_s": round(build_s, 1), "waited_s": round(waited, 1)}
                if not ok:
                    row.update(status="build failed", build_tail=btail)
                else:
                    rc, test_s, first, ttail = run_tests(wt, m.tests, log)
                    row.update(test_s=round(test_s, 1), pytest_rc=rc, first_failure=first,
                               status="caught" if rc == 1 else "SURVIVED" if rc == 0 else f"error (pytest rc {rc})")
                    if rc not in (0, 1):
                        row["tail"] = ttail
                results["mutants"].append(row)
                log(f"  -> {row['status']}")
            finally:
                src.write_text(text)
    finally:
        results["total_s"] = round(time.time() - t_start, 1)
        results["load_at_end"] = os.getloadavg()
        if own:
            subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=REPO, capture_output=True)
            shutil.rmtree(wt.parent, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpp_mutants.json").write_text(json.dumps(results, indent=1) + "\n")
    caught = sum(r["status"] == "caught" for r in results["mutants"])
    md = [f"# C++ hand-made mutants ({caught} of {len(results['mutants'])} caught)", "",
          f"`python benchmarks/mutation/cpp_mutants.py --out {args.out}` at {head[:10]}, CPU-only build "
          f"(USE_CUDA=0, ninja, MAX_JOBS=2, nice -n 10). First (full) build {results['first_build_s']:.0f} s; "
          f"unmutated test runs {sum(c['seconds'] for c in results['clean_tests']):.0f} s; "
          f"total {results['total_s']:.0f} s; "
          f"load average at start {load_before[0]:.1f} / {load_before[1]:.1f} / {load_before[2]:.1f}, at end "
          f"{results['load_at_end'][0]:.1f}.", "",
          "| mutant | change | file | build s | tests s | verdict | first failing test |",
          "| --- | --- | --- | ---: | ---: | --- | --- |"]
    for r in results["mutants"]:
        md.append(f"| {r['name']} | {r['what']}: `{r['old']}` -> `{r['new']}` | {r['file']} | {r['build_s']:.0f} | "
                  f"{r.get('test_s', 0):.0f} | {r['status']} | {r.get('first_failure', '')} |")
    (args.out / "cpp_mutants.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if caught == len(results["mutants"]) else 1


if __name__ == "__main__":
    sys.exit(main())

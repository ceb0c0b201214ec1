"""``blobbench ab BASE``: the base revision and the working tree measured interleaved in one run.

The drift-free regression gate for a shared machine (issue 22). ``compare OLD NEW`` judges two
runs made at different times and cancels the machine's drift between them by a baseline (MONAI)
measured in the same run; what the two runs' conditions do to ours and to MONAI differently is
left. Here nothing is left between "before" and "after":

1. **base**: ``BASE`` (any git revision) is exported with ``git archive`` into a cache folder
   (``$BLOBBENCH_CACHE/ab/<commit>``, default ``~/.cache/blobbench/ab/<commit>``) and its extension
   built there CPU-only (``USE_CUDA=0 python setup.py build_ext --inplace``; a few minutes of the
   CPUs, once per commit). When BASE's C++ sources and build script (``csrc/``, ``setup.py``)
   are those of the working tree, the working tree's built extension is copied instead (the same
   sources, compiler and torch give the same binary), unless ``--rebuild``. The copy is the
   extension the working tree runs, so a stale in-place build is measured on both sides alike.
2. **two long-lived workers** (two builds of the ``blob`` op namespace cannot share one process),
   base and head, each importing blobbench from its own tree, one thread each
   (:mod:`blobbench.bench.ab_worker`), load the same cases (``--cpu N`` pins both to one CPU).
3. **repetitions alternate between them**, call by call: for every case and op, pair ``r`` is
   (base, head) for even ``r`` and (head, base) for odd ``r`` (ABBA: neither side always runs
   second), and the cases and ops rotate within a round; each call is timed by its thread's CPU
   time (``time.thread_time``: waiting for a CPU is not counted). A pair's two calls run a few
   milliseconds apart, so whatever the machine does for longer than that hits both alike.
4. **the statistic** is per pair: ``d = log(head / base)``. The change is ``exp(median d)`` with a
   95 % bootstrap interval of the median (``boot`` resamples, fixed seed); the one-sided Wilcoxon
   signed-rank p-value too. A **regression** is a change above ``factor`` (default x1.10) whose
   interval lies wholly above 1 and whose Wilcoxon p is below ``alpha`` (default 0.01: a handful
   of pairs, whose bootstrap interval is degenerate, can never pass it; 2 pairs both slower gave
   an interval [1.002, 1.866] in a pilot); an **improvement** the mirror image. A change of
   exactly the factor is not above it.
5. **memory**: the allocator bytes of one call (torch.profiler's allocation events), base and
   head; growth beyond ``mem_threshold`` (10 %) **and** ``mem_floor_bytes`` (1 MB) is a
   regression (both conditions, as in ``compare``).

Exit status 1 on a regression or an error of the head, 0 otherwise; the base failing to build or
to import is exit status 2 (nothing was judged). ``$BLOBBENCH_PLANT_SLOWDOWN`` (test only) plants
its slowdown in the **head** worker only.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["DEFAULT_AB_FACTOR", "DEFAULT_AB_ALPHA", "AB_IMPLS", "wilcoxon_greater", "paired_test", "judge_time",
           "judge_memory", "prepare_base", "build_files_equal", "head_extension", "Side", "WorkerError", "run_ab",
           "format_ab", "main_ab", "BaseError"]

DEFAULT_AB_FACTOR = 1.10
DEFAULT_AB_ALPHA = 0.01
AB_IMPLS = ("fused", "fused_tversky", "fused_dice_ce")
BUILD_FILES = ("csrc", "setup.py")
READY = ".blobbench-ab-ready"


class BaseError(RuntimeError):
    """The base revision could not be exported, built or imported."""


# ----------------------------------------------------------------------------- the statistic

def wilcoxon_greater(d: list[float]) -> float:
    """One-sided p-value of the Wilcoxon signed-rank test that the paired differences ``d`` tend
    to be positive (normal approximation, zeros dropped, ties given their mean rank, tie-corrected
    variance, continuity correction); 1.0 with fewer than 2 non-zero differences."""
    nz = [x for x in d if x != 0]
    n = len(nz)
    if n < 2:
        return 1.0
    order = sorted(range(n), key=lambda i: abs(nz[i]))
    ranks = [0.0] * n
    ties = 0.0
    i = 0
    while i < n:
        j = i
        while j < n and abs(nz[order[j]]) == abs(nz[order[i]]):
            j += 1
        for k in range(i, j):
            ranks[order[k]] = (i + j + 1) / 2
        t = j - i
        ties += t ** 3 - t
        i = j
    w = sum(r for r, x in zip(ranks, nz) if x > 0)
    mean = n * (n + 1) / 4
    var = n * (n + 1) * (2 * n + 1) / 24 - ties / 48
    if var <= 0:
        return 1.0
    z = (w - mean - 0.5) / math.sqrt(var)
    return 0.5 * math.erfc(z / math.sqrt(2))


def paired_test(base: list[float], head: list[float], boot: int = 2000, seed: int = 0) -> dict:
    """The paired statistic of ``base`` and ``head`` times (same length, pair i measured
    back to back): ``ratio`` = exp(median of log(head / base)), its 95 % bootstrap interval
    ``lo``, ``hi`` (the pairs resampled; a fixed seed: the same samples give the same interval)
    and the one-sided Wilcoxon signed-rank p-values ``p_slower`` and ``p_faster``."""
    if len(base) != len(head) or not base:
        raise ValueError(f"paired_test needs as many base as head times (>= 1), got {len(base)} and {len(head)}")
    if min(base) <= 0 or min(head) <= 0:
        raise ValueError("paired_test needs positive times")
    d = [math.log(h / b) for b, h in zip(base, head)]
    med = statistics.median(d)
    rng = random.Random(seed)
    ms = sorted(statistics.median(rng.choices(d, k=len(d))) for _ in range(boot))
    return {"log_ratio": med, "ratio": math.exp(med), "lo": math.exp(ms[int(0.025 * boot)]),
            "hi": math.exp(ms[int(0.975 * boot) - 1]), "log_lo": ms[int(0.025 * boot)],
            "log_hi": ms[int(0.975 * boot) - 1], "p_slower": wilcoxon_greater(d),
            "p_faster": wilcoxon_greater([-x for x in d]), "pairs": len(d)}


def judge_time(t: dict, factor: float = DEFAULT_AB_FACTOR, alpha: float = DEFAULT_AB_ALPHA) -> str:
    """``regression``: the change is above ``factor`` (strictly), its interval wholly above 1 and
    the Wilcoxon p (``p_slower``) below ``alpha``; ``improvement``: the mirror image (below
    1 / factor, interval wholly below 1, ``p_faster`` < alpha); else ``""``. Compared on the log
    scale, so that a change of exactly ``factor`` is not above it."""
    lf = math.log(factor)
    if t["log_ratio"] > lf and t["log_lo"] > 0 and t["p_slower"] < alpha:
        return "regression"
    if t["log_ratio"] < -lf and t["log_hi"] < 0 and t["p_faster"] < alpha:
        return "improvement"
    return ""


def judge_memory(base_bytes: int, head_bytes: int, threshold: float = 0.10, floor: int = 2**20) -> str:
    """``regression`` when head allocates more than base by over ``threshold`` of base AND over
    ``floor`` bytes; ``improvement`` the mirror image; else ``""``."""
    grow = head_bytes - base_bytes
    limit = max(threshold * max(base_bytes, 0), floor)
    if grow > limit:
        return "regression"
    if -grow > limit:
        return "improvement"
    return ""


# ----------------------------------------------------------------------------- the base tree

def _git(repo, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, **kw)


def cache_root() -> Path:
    return Path(os.environ.get("BLOBBENCH_CACHE", Path.home() / ".cache" / "blobbench")) / "ab"


def head_extension(root: Path) -> Path | None:
    """The working tree's built extension (``blobbench/_C*.so`` in the tree), None if not built."""
    found = sorted((root / "blobbench").glob("_C*.so"))
    return found[0] if found else None


def build_files_equal(repo: Path, commit: str) -> bool:
    """Whether the working tree's C++ sources and build files are those of ``commit`` (tracked
    files compared with it, and no untracked, non-ignored file under them)."""
    diff = _git(repo, "diff", "--quiet", commit, "--", *BUILD_FILES)
    if diff.returncode not in (0, 1):
        raise BaseError(f"git diff {commit} failed: {diff.stderr.strip()}")
    extra = _git(repo, "ls-files", "--others", "--exclude-standard", "--", *BUILD_FILES)
    return diff.returncode == 0 and not extra.stdout.strip()


def prepare_base(rev: str, repo: Path, cache: Path | None = None, rebuild: bool = False, log=print) -> dict:
    """The base tree of revision ``rev`` of ``repo``, exported and built (or taken from the cache).

    Returns ``{"tree", "commit", "extension": "cached" | "copied from the working tree" |
    "built", "build_s"}``. Raises :class:`BaseError` (with the build log's tail) when ``rev`` is
    not a commit or the build fails."""
    r = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if r.returncode != 0:
        raise BaseError(f"BASE {rev!r} is not a commit of {repo}")
    commit = r.stdout.strip()
    tree = (cache or cache_root()) / commit
    ready = tree / READY
    if ready.is_file() and not rebuild:
        return {"tree": str(tree), "commit": commit, "extension": json.loads(ready.read_text()).get("extension",
                                                                                                     "cached")
                + " (cached)", "build_s": 0.0}
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    t0 = time.perf_counter()
    arch = subprocess.run(f"git -C '{repo}' archive --format=tar {commit} | tar -x -C '{tree}'", shell=True,
                          capture_output=True, text=True)
    if arch.returncode != 0:
        raise BaseError(f"git archive {commit} failed: {arch.stderr.strip()}")
    ext = head_extension(repo)
    if not rebuild and ext is not None and build_files_equal(repo, commit):
        shutil.copy2(ext, tree / "blobbench" / ext.name)
        how = "copied from the working tree (the same csrc/ and setup.py)"
        log(f"blobbench ab: base {commit[:10]}: C++ sources and build files equal the working tree's: its "
            f"extension copied")
    else:
        how = "built CPU-only (USE_CUDA=0)"
        log(f"blobbench ab: building base {commit[:10]} CPU-only in {tree} (log: build.log; a few minutes)")
        env = dict(os.environ, USE_CUDA="0")
        with open(tree / "build.log", "w") as fh:
            b = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                               stdout=fh, stderr=subprocess.STDOUT)
        if b.returncode != 0:
            tail = (tree / "build.log").read_text()[-2000:]
            raise BaseError(f"building base {commit[:10]} failed (exit {b.returncode}); {tree}/build.log ends:\n{tail}")
    took = time.perf_counter() - t0
    ready.write_text(json.dumps({"commit": commit, "extension": how, "build_s": took}))
    return {"tree": str(tree), "commit": commit, "extension": how, "build_s": took}


# ----------------------------------------------------------------------------- the workers

class Side:
    """A worker process (:mod:`blobbench.bench.ab_worker`) importing blobbench from ``tree``."""

    def __init__(self, name: str, tree, log_path, plant: dict | None = None, threads: int = 1, cpu: int | None = None):
        self.name = name
        worker = Path(__file__).with_name("ab_worker.py")
        env = {k: v for k, v in os.environ.items() if k not in ("BLOBBENCH_PLANT_SLOWDOWN", "PYTHONPATH")}
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), KINETO_LOG_LEVEL="6")
        self.log = open(log_path, "w")
        # run by path from the tree's folder, so that neither this checkout nor the script's folder is on sys.path
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"import runpy; runpy.run_path({str(worker)!r}, run_name='__main__')"],
            cwd=str(tree), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            bufsize=1)
        self.send({"cmd": "init", "tree": str(tree), "threads": threads, "plant": plant or {}, "cpu": cpu})
        self.info = None   # the init's answer: read by :meth:`started` (both sides start at once)

    def started(self) -> dict:
        self.info = self.answer()
        return self.info

    def send(self, msg: dict) -> None:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def ask(self, msg: dict) -> dict:
        self.send(msg)
        return self.answer()

    def answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.flush()
            raise WorkerError(self.name, f"the worker died (exit code {self.proc.returncode}); see {self.log.name}", "")
        ans = json.loads(line)
        if not ans.get("ok"):
            raise WorkerError(self.name, ans.get("error", "?"), ans.get("traceback", ""))
        return ans

    def close(self):
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            self.log.close()


class WorkerError(RuntimeError):
    def __init__(self, side, error, tb):
        super().__init__(f"{side}: {error}")
        self.side, self.error, self.tb = side, error, tb


def run_ab(base_tree, head_tree, cases: list[tuple[str, str]], impls, reps: int, workdir, plant: dict | None = None,
           factor: float = DEFAULT_AB_FACTOR, mem_threshold: float = 0.10, mem_floor_bytes: int = 2**20,
           progress=None, cpu: int | None = None, alpha: float = DEFAULT_AB_ALPHA) -> dict:
    """Measure ``impls`` on ``cases`` ((name, path of the saved tensors), or a function returning
    them, called once both workers are starting, so that their start-up overlaps it) in the two trees,
    ``reps`` ABBA pairs each, and judge them (see the module doc). ``plant``: the head's planted
    slowdown (test only); ``cpu``: pin both workers to this CPU (None: no pinning)."""
    workdir = Path(workdir)
    sides = {}
    rows = {}
    failed = {}
    try:
        sides["base"] = Side("base", base_tree, workdir / "base-worker.log", cpu=cpu)
        sides["head"] = Side("head", head_tree, workdir / "head-worker.log", plant=plant, cpu=cpu)
        if callable(cases):
            cases = cases()
        rows = {(c, i): {"case": c, "impl": i, "base": [], "head": [], "first": []} for c, _ in cases for i in impls}
        for s in sides.values():
            s.started()
        for c, path in cases:
            for s in ("base", "head"):
                for i in impls:   # one at a time, so that an op the base lacks fails only its own rows
                    if (c, i) in failed:
                        continue
                    try:
                        sides[s].ask({"cmd": "load", "case": c, "path": str(path), "impls": [i]})
                    except WorkerError as e:
                        failed[(c, i)] = {"side": s, "error": e.error, "traceback": e.tb}
        keys = [k for k in rows if k not in failed]
        for r in range(reps):
            k0 = r % max(len(keys), 1)
            for key in keys[k0:] + keys[:k0]:
                order = ("base", "head") if r % 2 == 0 else ("head", "base")
                rows[key]["first"].append(order[0])
                for s in order:
                    rows[key][s].append(sides[s].ask({"cmd": "time", "case": key[0], "impl": key[1]})["t"])
            if progress:
                progress(r + 1, reps)
        for key in keys:
            for s in ("base", "head"):
                rows[key][f"{s}_alloc"] = sides[s].ask({"cmd": "memory", "case": key[0], "impl": key[1]})
        info = {s: sides[s].info for s in sides}
    finally:
        for s in sides.values():
            s.close()
    out = []
    for key, row in rows.items():
        if key in failed:
            row |= {"status": f"error in {failed[key]['side']}"} | failed[key]
            row["verdict"] = "regression" if failed[key]["side"] == "head" else ""
            row["why"] = [f"{failed[key]['side']}: {failed[key]['error']}"]
            out.append(row)
            continue
        t = paired_test(row["base"], row["head"])
        tv = judge_time(t, factor, alpha)
        pb, ph = row["base_alloc"]["alloc_peak_bytes"], row["head_alloc"]["alloc_peak_bytes"]
        mv = judge_memory(pb, ph, mem_threshold, mem_floor_bytes)
        why = []
        if tv == "regression":
            why.append(f"time x{t['ratio']:.3f} [{t['lo']:.3f}, {t['hi']:.3f}], p={t['p_slower']:.2g}")
        if mv == "regression":
            why.append(f"memory +{(ph - pb) / 2**20:.2f} MB (x{ph / pb if pb else math.inf:.2f}, allocator bytes)")
        row.update(status="ok", time=t, time_verdict=tv, memory_verdict=mv,
                   base_median_s=statistics.median(row["base"]),
                   head_median_s=statistics.median(row["head"]), base_alloc_peak_bytes=pb, head_alloc_peak_bytes=ph,
                   why=why, verdict="regression" if why else ("improvement" if "improvement" in (tv, mv) else ""))
        out.append(row)
    return {"rows": out, "regressions": [r for r in out if r["verdict"] == "regression"], "factor": factor,
            "alpha": alpha,
            "mem_threshold": mem_threshold, "mem_floor_bytes": mem_floor_bytes, "reps": reps, "workers": info,
            "plant": plant or {}}


def format_ab(res: dict) -> str:
    run = res["run"]
    lines = [f"blobbench ab: BASE {run['base_rev']} ({run['base_commit'][:10]}, extension {run['base_extension']})",
             f"              HEAD {run['head_rev']} ({run['head_tree']})",
             f"machine: {run['machine']}; load {run['load_before']} -> {run['load_after']}; "
             f"{res['reps']} ABBA pairs per row, one thread each"
             + (f", both on CPU {run['cpu']}" if run.get("cpu") is not None else "") + ", thread CPU time"]
    if res["plant"]:
        lines.append(f"WARNING: HEAD ran with a PLANTED SLOWDOWN {res['plant']} ($BLOBBENCH_PLANT_SLOWDOWN, test only)")
    lines.append(f"time: HEAD/BASE = exp(median of the per-pair log(head/base)), [95% bootstrap interval], "
                 f"p: one-sided Wilcoxon signed-rank; regression: > x{res['factor']:.2f}, the interval above 1 and "
                 f"p < {res['alpha']:g}. "
                 f"memory: allocator bytes of one call; regression: +{res['mem_threshold']:.0%} and > "
                 f"{res['mem_floor_bytes'] / 2**20:g} MB")
    lines.append(f"  {'case':10s} {'implementation':14s} {'BASE ms':>8s} {'HEAD ms':>8s} {'time HEAD/BASE':>24s} "
                 f"{'p':>8s} {'memory':>8s}  verdict")
    for r in res["rows"]:
        if r["status"] != "ok":
            lines.append(f"  {r['case']:10s} {r['impl']:14s} {'-':>8s} {'-':>8s} {r['status']:>24s} {'-':>8s} "
                         f"{'-':>8s}  "
                         + ("REGRESSION: " if r["verdict"] == "regression" else "not judged: ") + "; ".join(r["why"]))
            continue
        t = r["time"]
        mem = r["head_alloc_peak_bytes"] / r["base_alloc_peak_bytes"] if r["base_alloc_peak_bytes"] else math.nan
        v = r["verdict"].upper() if r["verdict"] == "regression" else r["verdict"]
        lines.append(f"  {r['case']:10s} {r['impl']:14s} {r['base_median_s'] * 1e3:8.3g} "
                     f"{r['head_median_s'] * 1e3:8.3g} "
                     f"{'x%.3f [%.3f, %.3f]' % (t['ratio'], t['lo'], t['hi']):>24s} {t['p_slower']:8.2g} "
                     f"{'x%.2f' % mem:>8s}  {v}" + (": " + "; ".join(r["why"]) if r["why"] else ""))
    n = len(res["regressions"])
    lines.append(f"{n} regression{'' if n == 1 else 's'}" + (": " + ", ".join(
        f"{r['case']}/{r['impl']}" for r in res["regressions"]) if n else ""))
    return "\n".join(lines) + "\n"


def main_ab(argv) -> int:
    """``blobbench ab BASE [options]``: exit 0 no regression, 1 a regression, 2 usage or base failure."""
    import argparse

    from .bench import planted
    from .noise import load
    from .runs import git_revision

    ap = argparse.ArgumentParser(prog="blobbench ab", description=__doc__.split("\n\n")[0] + "\n\n"
                                 + "\n\n".join(__doc__.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", metavar="BASE", help="the base revision (a commit, branch or tag of this checkout)")
    ap.add_argument("--profiles", default="ms,shanel", help="profiles measured (default ms,shanel: the gate's)")
    ap.add_argument("--impls", default=",".join(AB_IMPLS), help=f"ops measured (default {','.join(AB_IMPLS)})")
    ap.add_argument("--batch", type=int, default=2, help="crops per profile batch (default 2, as --gate)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=30, help="ABBA pairs per (profile, op) (default 30)")
    ap.add_argument("--factor", type=float, default=DEFAULT_AB_FACTOR,
                    help=f"a time change above this with its 95%% interval above 1 is a regression "
                         f"(default {DEFAULT_AB_FACTOR:g})")
    ap.add_argument("--alpha", type=float, default=DEFAULT_AB_ALPHA,
                    help=f"the Wilcoxon p a time regression must pass below (default {DEFAULT_AB_ALPHA:g})")
    ap.add_argument("--memory-threshold", type=float, default=0.10)
    ap.add_argument("--memory-floor", type=float, default=1.0, help="MB of growth ignored (default 1)")
    ap.add_argument("--cpu", default="none",
                    help="pin both workers to this one CPU (a number, or auto: the last CPU this process may use; "
                         "default none: no pinning, which on a loaded machine gives the workers both CPUs: a pinned "
                         "run took 160-170 s at load 7-9 on 2 CPUs, unpinned ones 45-60 s)")
    ap.add_argument("--rebuild", action="store_true", help="build the base's extension even when cached or copyable")
    ap.add_argument("--base-tree", default=None,
                    help="an existing tree with its extension built to use as the base instead of BASE's export "
                         "(BASE is then only its label)")
    ap.add_argument("--head-tree", default=None,
                    help="the tree measured as HEAD, its extension built (default: this checkout, the working tree)")
    ap.add_argument("--out", default=os.path.join("blobbench-results", "ab"),
                    help="folder for the run's folder (ab.txt, ab.json, the workers' logs)")
    args = ap.parse_args(argv)
    impls = [i for i in args.impls.split(",") if i]
    if (args.reps < 2 or args.factor <= 1 or args.memory_threshold <= 0 or args.memory_floor < 0 or args.batch < 1
            or not 0 < args.alpha < 1):
        ap.error("--reps must be >= 2, --factor > 1, 0 < --alpha < 1, --memory-threshold > 0, --memory-floor >= 0, "
                 "--batch >= 1")
    bad = [i for i in impls if i not in AB_IMPLS]
    if bad or not impls:
        ap.error(f"--impls: {','.join(bad) or 'none given'}; choose from {', '.join(AB_IMPLS)}")
    from .synthetic import PROFILES

    profiles = [p for p in args.profiles.split(",") if p]
    for p in profiles:
        if p not in PROFILES:
            ap.error(f"--profiles: unknown profile {p!r}; choose from {', '.join(PROFILES)}")
    try:
        plant = planted()
    except ValueError as e:
        ap.error(str(e))
    if args.cpu == "auto":
        cpu = max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    elif args.cpu == "none":
        cpu = None
    else:
        try:
            cpu = int(args.cpu)
        except ValueError:
            ap.error(f"--cpu: a CPU number, auto or none, got {args.cpu!r}")
        if hasattr(os, "sched_getaffinity") and cpu not in os.sched_getaffinity(0):
            ap.error(f"--cpu {cpu}: not one of this process's CPUs {sorted(os.sched_getaffinity(0))}")
    root = Path(__file__).resolve().parents[2]
    head_tree = Path(args.head_tree).resolve() if args.head_tree else root
    try:
        if args.base_tree:
            base = {"tree": str(Path(args.base_tree).resolve()), "commit": args.base,
                    "extension": "given (--base-tree)",
                    "build_s": 0.0}
        else:
            base = prepare_base(args.base, root, rebuild=args.rebuild)
    except BaseError as e:
        print(f"blobbench ab: {e}", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    head_rev = git_revision(root) if args.head_tree is None else f"tree {head_tree}"
    out = Path(args.out) / f"{stamp}-{base['commit'][:10]}-vs-{head_rev.split('/')[-1]}"
    n = 2
    while out.exists():
        out = out.with_name(out.name.split("~")[0] + f"~{n}")
        n += 1
    out.mkdir(parents=True)
    from . import bench

    load_before = load()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="blobbench-ab-") as work:
        print(f"blobbench ab: {len(profiles)} profiles x {len(impls)} ops x {args.reps} ABBA pairs, base "
              f"{base['tree']}" + (f"; PLANTED SLOWDOWN in HEAD {plant}" if plant else ""), flush=True)
        try:
            res = run_ab(base["tree"], head_tree,
                         lambda: [(p, bench.profile_case(p, args.batch, args.seed, work).path) for p in profiles],
                         impls, args.reps, out, plant=plant, factor=args.factor,
                         mem_threshold=args.memory_threshold, mem_floor_bytes=int(args.memory_floor * 2**20),
                         cpu=cpu, alpha=args.alpha)
        except WorkerError as e:   # the base failing judges nothing (2); the head failing is a regression (1)
            print(f"blobbench ab: {e}\n{e.tb}", file=sys.stderr)
            return 2 if e.side == "base" else 1
    import platform

    res["run"] = {"base_rev": args.base, "base_commit": base["commit"], "base_tree": base["tree"],
                  "base_extension": base["extension"], "base_build_s": base["build_s"],
                  "head_rev": head_rev, "head_tree": str(head_tree), "load_before": load_before,
                  "load_after": load(), "cpus": os.cpu_count(),
                  "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.node()}",
                  "command": "blobbench ab " + " ".join(argv), "elapsed_s": time.perf_counter() - t0,
                  "planted": plant, "cpu": cpu}
    text = format_ab(res)
    print(text, end="")
    (out / "ab.txt").write_text(text)
    (out / "ab.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {out}/ab.txt, ab.json in {res['run']['elapsed_s']:.0f} s")
    return 1 if res["regressions"] else 0

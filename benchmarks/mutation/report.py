"""The mutation report of a mutmut run (benchmarks/mutation/run.sh writes it; issue 23).

    python benchmarks/mutation/report.py WORKTREE --out DIR [--pattern GLOB ...]

Reads mutmut's results (``mutants/**/*.py.meta`` in the worktree of the run), keeps the mutants
whose names match the patterns (the modules in scope), and writes ``DIR/report.md`` and
``DIR/results.json``: counts by status, the score, and every mutant not killed with its diff and,
where ``benchmarks/mutation/equivalent.json`` explains it, why it is equivalent.

Score = killed / all mutants in scope, where killed counts mutmut's "killed" and "timeout" (a
mutant that makes the tests hang is caught); "survived", "no tests" (no test calls the mutated
function) and "suspicious" are not killed. Equivalent mutants are listed, and a second score
leaves them out of the denominator.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import random
import subprocess
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", 37: "caught by type check", None: "not checked",
          -11: "segfault", -9: "segfault"}
CAUGHT = {"killed", "timeout", "caught by type check", "segfault"}


def _module(name: str) -> str:
    return name.split(".x_")[0].split(".xǁ")[0]


def load(worktree: Path) -> dict[str, str]:
    out = {}
    for meta in sorted((worktree / "mutants").rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        for name, code in data.get("exit_code_by_key", {}).items():
            out[name] = STATUS.get(code, "suspicious")
    return out


def show(worktree: Path, name: str) -> str:
    p = subprocess.run(["mutmut", "show", name], cwd=worktree, capture_output=True, text=True)
    return p.stdout.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("worktree", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pattern", action="append", default=[], help="mutant name globs in scope (default: all)")
    ap.add_argument("--header", default="", help="text put above the tables (command, duration, load)")
    ap.add_argument("--sample", type=float, default=0.0,
                    help="print a seeded random sample of this fraction of the mutants in scope (per module) "
                         "and exit; with --names, report on the mutants listed in that file only")
    ap.add_argument("--names", type=Path, default=None, help="a file of mutant names (one a line): the scope")
    args = ap.parse_args(argv)

    results = load(args.worktree)
    scope = {k: v for k, v in results.items() if not args.pattern or any(fnmatch.fnmatch(k, p) for p in args.pattern)}
    if args.sample:
        rng = random.Random(20261201)
        modules = {}
        for k in sorted(scope):
            modules.setdefault(_module(k), []).append(k)
        for names in modules.values():
            print("\n".join(sorted(rng.sample(names, max(1, round(args.sample * len(names)))))))
        return 0
    if args.names:
        listed = set(args.names.read_text().split())
        scope = {k: v for k, v in scope.items() if k in listed}
    eq_path = HERE / "equivalent.json"
    equivalent = json.loads(eq_path.read_text()) if eq_path.exists() else {}
    counts = Counter(scope.values())
    total = len(scope)
    killed = sum(n for s, n in counts.items() if s in CAUGHT)
    not_killed = sorted(k for k, v in scope.items() if v not in CAUGHT)
    eq = [k for k in not_killed if k in equivalent]
    unexplained = [k for k in not_killed if k not in equivalent]
    by_module = {}
    for k, v in scope.items():
        mod = _module(k)
        c = by_module.setdefault(mod, Counter())
        c["total"] += 1
        c["killed" if v in CAUGHT else "not killed"] += 1
    score = killed / total if total else float("nan")
    score_eq = killed / (total - len(eq)) if total - len(eq) else float("nan")

    md = ["# Mutation report", ""]
    if args.header:
        md += [args.header, ""]
    md += [f"**Score: {killed} of {total} mutants killed = {100 * score:.1f} %**; leaving out the {len(eq)} "
           f"equivalent mutants: {killed} of {total - len(eq)} = {100 * score_eq:.1f} %. Not killed and not "
           f"explained as equivalent: {len(unexplained)}.", "",
           "| status | mutants |", "| --- | ---: |"]
    md += [f"| {s} | {n} |" for s, n in counts.most_common()]
    md += ["", "| module | mutants | killed | not killed | score |", "| --- | ---: | ---: | ---: | ---: |"]
    for mod, c in sorted(by_module.items()):
        md.append(f"| {mod} | {c['total']} | {c['killed']} | {c['not killed']} | "
                  f"{100 * c['killed'] / c['total']:.1f} % |")
    if not_killed:
        md += ["", "## Mutants not killed", ""]
        for k in not_killed:
            md += [f"### {k} ({scope[k]})", ""]
            if k in equivalent:
                md += [f"Equivalent: {equivalent[k]}", ""]
            else:
                md += ["**Not explained.**", ""]
            md += ["```diff", show(args.worktree, k), "```", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text("\n".join(md) + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"score": score, "score_without_equivalent": score_eq, "total": total, "killed": killed,
         "counts": dict(counts), "equivalent": {k: equivalent[k] for k in eq}, "unexplained": unexplained,
         "status": scope}, indent=1, sort_keys=True) + "\n")
    print("\n".join(md[: md.index("## Mutants not killed") if "## Mutants not killed" in md else len(md)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

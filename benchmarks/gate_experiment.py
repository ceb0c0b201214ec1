"""The regression gate's false-alarm and detection rates, measured (issue 22).

Runs ``blobbench --gate`` again and again on this checkout and judges pairs of back-to-back runs
with ``blobbench compare``'s logic (:func:`blobbench.bench.compare.compare_runs`, defaults). Each
round runs three gate runs one after the other, ``plain 1, plain 2, planted``:

- **identical** pair (plain 1 -> plain 2): the same code twice; the gate must pass (exit 0);
- **planted** pair (plain 2 -> planted): the same code with a planted slowdown
  (``BLOBBENCH_PLANT_SLOWDOWN=fused=1.3,fused_dice_ce=1.3,fused_tversky=2``: each timed
  repetition of those ops busy-waits (factor - 1) x its own time inside the timed region). The
  **1.3x** target counts the pairs in which every 1.3x-planted row (blob.dice and blob.dice_ce,
  profiles ms and shanel: 4 rows) is flagged as a regression; the **2x** target the pairs in which
  both 2x-planted rows (blob.tversky, ms and shanel) are. One planted run carries both factors on
  different ops, so that 20 pairs of each kind take 60 runs, not 80.

Whatever else runs on the machine meanwhile is the condition measured: the load averages are
recorded.

    python benchmarks/gate_experiment.py --rounds 20 [--deadline 17:25] [--runs /tmp/gate-runs]

**A/B mode** (``--ab``): the same targets for ``blobbench ab BASE``, base and head measured
interleaved in one run. Each round runs three ``blobbench ab`` runs, the kinds rotating from round
to round (round 1: identical, 1.3x, 2x; round 2: 1.3x, 2x, identical; ...) so that the load hits
every kind alike:

- **identical**: BASE (the commit checked out when the experiment starts, exported by
  ``blobbench ab`` into its cache) against a second export of the same commit (``--head-tree``: the
  working tree is shared with other agents, who may edit it meanwhile); both with the working
  tree's extension (the C++ sources equal the commit's); exit 0 wanted;
- **1.3x** / **2x**: the same, the head worker with ``BLOBBENCH_PLANT_SLOWDOWN=fused=1.3`` (or
  ``=2``): each timed repetition of ``blob.dice`` (``fused``) in the head busy-waits (F - 1) x its
  own time inside the timed region. A pair is **caught** when every planted row (``fused`` on
  each profile) is flagged as a regression; a flag on another row of a planted pair is counted as
  a false alarm of that row.

    python benchmarks/gate_experiment.py --ab --rounds 20 --deadline 21:45 -- --profiles ms,shanel

Writes ``benchmarks/results/gate-ab-<machine>-<date>/`` (``gate_ab_experiment.json``, ``.md``,
``command.txt``), rewritten after every run.

Writes ``benchmarks/results/gate-<machine>-<date>/``: ``gate_experiment.json`` (every pair: its
runs, outcome, regressions, the fused rows' changes; the load), ``gate_experiment.md`` (a table
and the per-target counts) and ``command.txt``; rewritten after every round, so a stopped
experiment keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # run as a script from a checkout: blobbench is the checkout's
    sys.path.insert(0, str(ROOT))
TARGETS = {"identical": ("pass", 19), "1.3x": ("flag", 19), "2x": ("flag", 20)}
PLANT = {"fused": 1.3, "fused_dice_ce": 1.3, "fused_tversky": 2.0}
PLANT_SPEC = ",".join(f"{k}={v:g}" for k, v in PLANT.items())


def run_gate(runs: Path, name: str, plant: str, extra: list[str]) -> tuple[Path, float, list]:
    env = dict(os.environ)
    env.pop("BLOBBENCH_PLANT_SLOWDOWN", None)
    if plant:
        env["BLOBBENCH_PLANT_SLOWDOWN"] = plant
    cmd = [sys.executable, "-m", "blobbench", "--gate", "--out", str(runs), "--name", name] + extra
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    out = runs / name
    if not (out / "result.json").is_file():   # the folder got a -2 suffix
        out = sorted(runs.glob(name + "*"), key=lambda q: q.stat().st_mtime)[-1]
    return out, took, list(os.getloadavg())


def judge(old: Path, new: Path) -> dict:
    from blobbench.bench.compare import compare_runs

    a = json.loads((old / "result.json").read_text())
    b = json.loads((new / "result.json").read_text())
    cmp = compare_runs(a, b)
    fused = {f"{r['case']}/{r['impl']}": {"change": round(r["time_ratio"], 4), "lo": round(r["time_lo"], 4),
                                          "hi": round(r["time_hi"], 4), "p": r["time_p"],
                                          "memory_ratio": r.get("memory_ratio"), "verdict": r["verdict"]}
             for r in cmp["rows"] if r.get("gated") and "time_ratio" in r}
    base = {f"{r['case']}/{r['impl']}": round(r["abs_time_ratio"], 4) for r in cmp["rows"]
            if not r.get("gated") and "abs_time_ratio" in r}
    return {"old": old.name, "new": new.name, "exit": 1 if cmp["regressions"] else 0,
            "regressions": [f"{r['case']}/{r['impl']}: {'; '.join(r['why'])}" for r in cmp["regressions"]],
            "ours": fused, "baselines_abs_time_ratio": base,
            "load_old": a["run"].get("load_before"), "load_new": b["run"].get("load_before"),
            "elapsed_s": [a.get("elapsed_s"), b.get("elapsed_s")]}


def detected(p: dict, factor: float) -> tuple[bool, int, int]:
    """Whether every row planted with ``factor`` is flagged in the planted pair ``p``; flagged, rows."""
    rows = [r for k, r in p["ours"].items() if PLANT.get(k.split("/")[1]) == factor]
    hit = sum(r["verdict"] == "regression" for r in rows)
    return bool(rows) and hit == len(rows), hit, len(rows)


def summarize(pairs: list[dict]) -> dict:
    out = {}
    for target, (want, need) in TARGETS.items():
        if target == "identical":
            ps = [p for p in pairs if p["target"] == "identical"]
            good = sum(1 for p in ps if p["exit"] == 0)
            extra = {}
        else:
            ps = [p for p in pairs if p["target"] == "planted"]
            res = [detected(p, 1.3 if target == "1.3x" else 2.0) for p in ps]
            good = sum(d for d, _, _ in res)
            extra = {"rows_flagged": sum(h for _, h, _ in res), "rows": sum(n for _, _, n in res),
                     "pairs_any_flagged": sum(h > 0 for _, h, _ in res)}
        out[target] = {"pairs": len(ps), "as_wanted": good, "want": want, "need_of_20": need,
                       "met": len(ps) >= 20 and good >= need} | extra
    return out


def write(dest: Path, meta: dict, pairs: list[dict]) -> None:
    summary = summarize(pairs)
    loads = [p["load_new"][0] for p in pairs if p.get("load_new")] + [p["load_old"][0] for p in pairs
                                                                        if p.get("load_old")]
    doc = meta | {"summary": summary, "pairs": pairs,
                  "load_1min": {"min": min(loads), "max": max(loads), "mean": sum(loads) / len(loads)} if loads
                  else None}
    (dest / "gate_experiment.json").write_text(json.dumps(doc, indent=1))
    lines = [f"# Regression gate experiment, {meta['machine']}, {meta['date']}", "",
             f"Command: `{meta['command']}` (each run: `{meta['run_command']}`), at {meta['revision']}; "
             f"{meta['rounds_done']} of {meta['rounds_asked']} rounds done"
             + (f" (stopped at the deadline {meta['deadline']})" if meta["rounds_done"] < meta["rounds_asked"] else "")
             + ".", "",
             f"Load average (1 min) before the runs: {doc['load_1min']['min']:.2f}-{doc['load_1min']['max']:.2f}, "
             f"mean {doc['load_1min']['mean']:.2f} on {os.cpu_count()} CPUs (other agents building and testing)."
             if loads else "", "",
             "| target | pairs | as wanted | needed (of 20) | met |", "| --- | --- | --- | --- | --- |"]
    for t, s in summary.items():
        what = "exit 0" if s["want"] == "pass" else f"every {t}-planted row flagged"
        lines.append(f"| {t} ({what}) | {s['pairs']} | {s['as_wanted']} | {s['need_of_20']} | "
                     f"{'yes' if s['met'] else 'no'} |")
    for t in ("1.3x", "2x"):
        s = summary[t]
        if s.get("rows"):
            lines.append(f"\n{t}: {s['rows_flagged']} of {s['rows']} planted rows flagged; pairs with at least one "
                         f"flagged: {s['pairs_any_flagged']} of {s['pairs']}.")
    lines += ["", "Per pair: the change of each fused op relative to its baseline (NEW/OLD of ours / MONAI, "
                  "measured interleaved), `*` where flagged.", "",
              "| round | pair | exit | ms/fused | ms/fused_tversky | ms/fused_dice_ce | shanel/fused | "
              "shanel/fused_tversky | shanel/fused_dice_ce | MONAI DiceLoss ms, own NEW/OLD | load |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in pairs:
        cells = []
        for k in ("ms/fused", "ms/fused_tversky", "ms/fused_dice_ce", "shanel/fused", "shanel/fused_tversky",
                  "shanel/fused_dice_ce"):
            r = p["ours"].get(k)
            cells.append("-" if r is None else f"{r['change']:.2f}" + ("*" if r["verdict"] == "regression" else ""))
        b = p["baselines_abs_time_ratio"].get("ms/monai_dice")
        lines.append(f"| {p['round']} | {p['target']} | {p['exit']} | " + " | ".join(cells)
                     + f" | {'-' if b is None else f'{b:.2f}'} | {p['load_new'][0] if p.get('load_new') else '-'} |")
    (dest / "gate_experiment.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- A/B mode

AB_KINDS = {"identical": "", "1.3x": "fused=1.3", "2x": "fused=2"}
AB_PLANTED = "fused"


def export_tree(commit: str, dest: Path) -> Path:
    """``commit`` exported into ``dest`` with the working tree's extension (its C++ sources must be
    the commit's: checked)."""
    from blobbench.bench.ab import build_files_equal, head_extension

    if not build_files_equal(ROOT, commit):
        raise SystemExit(f"the working tree's csrc/ or setup.py differ from {commit}: its extension is not "
                         "the commit's")
    if not (dest / "blobbench").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(f"git -C '{ROOT}' archive --format=tar {commit} | tar -x -C '{dest}'", shell=True, check=True)
    ext = head_extension(ROOT)
    import shutil

    shutil.copy2(ext, dest / "blobbench" / ext.name)
    return dest


def run_ab(runs: Path, commit: str, head_tree: Path, kind: str, extra: list[str]) -> dict:
    env = dict(os.environ)
    env.pop("BLOBBENCH_PLANT_SLOWDOWN", None)
    if AB_KINDS[kind]:
        env["BLOBBENCH_PLANT_SLOWDOWN"] = AB_KINDS[kind]
    cmd = [sys.executable, "-m", "blobbench", "ab", commit, "--head-tree", str(head_tree), "--out", str(runs)] + extra
    before = sorted(runs.glob("*/ab.json"))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    took = time.perf_counter() - t0
    new = sorted(set(runs.glob("*/ab.json")) - set(before))
    if p.returncode not in (0, 1) or len(new) != 1:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    res = json.loads(new[0].read_text())
    rows = {f"{r['case']}/{r['impl']}": {"change": round(r["time"]["ratio"], 4), "lo": round(r["time"]["lo"], 4),
                                         "hi": round(r["time"]["hi"], 4), "p": r["time"]["p_slower"],
                                         "memory_ratio": r["head_alloc_peak_bytes"] / r["base_alloc_peak_bytes"],
                                         "verdict": r["verdict"]} if r["status"] == "ok" else
            {"status": r["status"], "verdict": r["verdict"]} for r in res["rows"]}
    planted = [k for k in rows if kind != "identical" and k.split("/")[1] == AB_PLANTED]
    others = [k for k in rows if k not in planted]
    return {"kind": kind, "exit": p.returncode, "run": new[0].parent.name, "took_s": round(took, 1),
            "load_before": res["run"]["load_before"], "load_after": res["run"]["load_after"],
            "regressions": [f"{r['case']}/{r['impl']}: {'; '.join(r['why'])}" for r in res["regressions"]],
            "rows": rows, "planted_rows": planted,
            "caught": bool(planted) and all(rows[k]["verdict"] == "regression" for k in planted),
            "false_alarm_rows": [k for k in others if rows[k]["verdict"] == "regression"]}


def ab_summary(pairs: list[dict]) -> dict:
    out = {}
    for kind, need in (("identical", 19), ("1.3x", 19), ("2x", 20)):
        ps = [p for p in pairs if p["kind"] == kind]
        good = sum(p["exit"] == 0 for p in ps) if kind == "identical" else sum(p["caught"] for p in ps)
        out[kind] = {"pairs": len(ps), "as_wanted": good, "need_of_20": need, "met": len(ps) >= 20 and good >= need,
                     "want": "exit 0" if kind == "identical" else f"every {AB_PLANTED} row flagged"}
        if kind != "identical":
            out[kind] |= {"rows_flagged": sum(sum(p["rows"][k]["verdict"] == "regression" for k in p["planted_rows"])
                                              for p in ps),
                          "rows": sum(len(p["planted_rows"]) for p in ps)}
    rows = [(p, k) for p in pairs for k in p["rows"] if k not in p["planted_rows"]]
    out["unplanted_rows"] = {"rows": len(rows), "flagged": sum(k in p["false_alarm_rows"] for p, k in rows)}
    return out


def ab_write(dest: Path, meta: dict, pairs: list[dict]) -> None:
    summary = ab_summary(pairs)
    loads = [p["load_before"][0] for p in pairs if p.get("load_before")]
    doc = meta | {"summary": summary, "pairs": pairs, "load_1min": {
        "min": min(loads), "max": max(loads), "mean": sum(loads) / len(loads)} if loads else None}
    (dest / "gate_ab_experiment.json").write_text(json.dumps(doc, indent=1))
    lines = [f"# A/B regression gate experiment, {meta['machine']}, {meta['date']}", "",
             f"Command: `{meta['command']}` (each run: `{meta['run_command']}`), harness at {meta['revision']}, "
             f"BASE and HEAD both {meta['commit'][:10]} (HEAD a second export, `--head-tree`); "
             f"{meta['rounds_done']} of {meta['rounds_asked']} rounds done"
             + (f" (stopped at the deadline {meta['deadline']})" if meta["rounds_done"] < meta["rounds_asked"] else "")
             + f"; started {meta['started']}, last run finished {meta.get('finished', '-')}.", ""]
    if loads:
        lines += [f"Load average (1 min) before each run: {min(loads):.2f}-{max(loads):.2f}, mean "
                  f"{sum(loads) / len(loads):.2f} on {os.cpu_count()} CPUs (other agents building, testing, "
                  f"training meanwhile).", ""]
    lines += ["| target | pairs | as wanted | needed (of 20) | met |", "| --- | --- | --- | --- | --- |"]
    for t in ("identical", "1.3x", "2x"):
        s = summary[t]
        lines.append(f"| {t} ({s['want']}) | {s['pairs']} | {s['as_wanted']} | {s['need_of_20']} | "
                     f"{'yes' if s['met'] else 'no'} |")
    u = summary["unplanted_rows"]
    lines += ["", f"Rows without a plant (all rows of identical pairs, the other ops of planted pairs): "
                  f"{u['flagged']} of {u['rows']} flagged.", "",
              "Per pair: HEAD/BASE of each row (exp of the median per-pair log ratio), `*` where flagged.", ""]
    keys = sorted({k for p in pairs for k in p["rows"]}, key=lambda k: (k.split("/")[0], k))
    lines += ["| round | kind | exit | " + " | ".join(keys) + " | load | s |",
              "| --- | --- | --- | " + " | ".join("---" for _ in keys) + " | --- | --- |"]
    for p in pairs:
        cells = []
        for k in keys:
            r = p["rows"].get(k)
            cells.append("-" if r is None else (r.get("status", "") if "change" not in r else
                                                f"{r['change']:.3f}" + ("*" if r["verdict"] == "regression" else "")))
        lines.append(f"| {p['round']} | {p['kind']} | {p['exit']} | " + " | ".join(cells)
                     + f" | {p['load_before'][0] if p.get('load_before') else '-'} | {p['took_s']:.0f} |")
    (dest / "gate_ab_experiment.md").write_text("\n".join(lines) + "\n")


def main_ab(args, argv) -> int:
    import blobbench.bench.runs as runs_mod

    today = dt.date.today().isoformat()
    machine = f"cpu-{os.cpu_count()}core"
    dest = Path(args.out or ROOT / "benchmarks" / "results" / f"gate-ab-{machine}-{today}")
    dest.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    head_tree = export_tree(commit, runs / f"head-tree-{commit[:10]}")
    command = "python benchmarks/gate_experiment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (dest / "command.txt").write_text(command + "\n")
    meta = {"machine": f"{machine} ({platform.processor() or platform.machine()}, {platform.node()})",
            "date": today, "command": command, "commit": commit,
            "run_command": f"blobbench ab {commit[:10]} --head-tree <export of {commit[:10]}> " + " ".join(args.extra),
            "revision": runs_mod.git_revision(ROOT), "rounds_asked": args.rounds, "rounds_done": 0,
            "deadline": args.deadline, "started": time.strftime("%H:%M:%S"),
            "plant": {k: v and f"BLOBBENCH_PLANT_SLOWDOWN={v} in the head worker only: each timed repetition of "
                      "blob.dice busy-waits (F-1) x its own time inside the timed region" for k, v in AB_KINDS.items()}}
    deadline = None
    if args.deadline:
        h, m = map(int, args.deadline.split(":"))
        deadline = dt.datetime.now().replace(hour=h, minute=m, second=0, microsecond=0)
    pairs = []
    kinds = list(AB_KINDS)
    for i in range(1, args.rounds + 1):
        order = kinds[(i - 1) % 3:] + kinds[:(i - 1) % 3]
        for kind in order:
            if deadline and dt.datetime.now() >= deadline:
                break
            pairs.append({"round": i} | run_ab(runs, commit, head_tree, kind, args.extra))
            p = pairs[-1]
            print(f"round {i} {kind}: exit {p['exit']} caught {p['caught']} false {p['false_alarm_rows']} "
                  f"{p['took_s']:.0f} s load {p['load_before']}", flush=True)
            meta["finished"] = time.strftime("%H:%M:%S")
            meta["rounds_done"] = i if kind == order[-1] else i - 1
            ab_write(dest, meta, pairs)
        else:
            continue
        break
    print(json.dumps(ab_summary(pairs), indent=1))
    print(f"wrote {dest}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ab", action="store_true", help="measure 'blobbench ab' instead of --gate + compare")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--runs", default="/tmp/blobbench-gate-runs", help="where the runs' folders go")
    ap.add_argument("--deadline", default=None, help="HH:MM (local): start no round after it")
    ap.add_argument("--out", default=None, help="result folder (default benchmarks/results/gate-<machine>-<date>)")
    ap.add_argument("extra", nargs="*", help="more options for each blobbench --gate (or ab) run (after --)")
    args = ap.parse_args(argv)
    if args.ab:
        return main_ab(args, argv)
    import blobbench.bench.runs as runs_mod

    today = dt.date.today().isoformat()
    machine = f"cpu-{os.cpu_count()}core"
    dest = Path(args.out or ROOT / "benchmarks" / "results" / f"gate-{machine}-{today}")
    dest.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/gate_experiment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (dest / "command.txt").write_text(command + "\n")
    meta = {"machine": f"{machine} ({platform.processor() or platform.machine()}, {platform.node()})",
            "date": today, "command": command, "run_command": "blobbench --gate " + " ".join(args.extra),
            "revision": runs_mod.git_revision(ROOT), "rounds_asked": args.rounds, "rounds_done": 0,
            "deadline": args.deadline, "started": time.strftime("%H:%M:%S"),
            "plant": f"BLOBBENCH_PLANT_SLOWDOWN={PLANT_SPEC}: busy-wait (F-1) x the call's time inside each timed "
                     "repetition of those fused ops"}
    deadline = None
    if args.deadline:
        h, m = map(int, args.deadline.split(":"))
        deadline = dt.datetime.now().replace(hour=h, minute=m, second=0, microsecond=0)
    pairs = []
    stamp = time.strftime("%H%M%S")
    for i in range(1, args.rounds + 1):
        if deadline and dt.datetime.now() >= deadline:
            break
        r = {}
        for kind, plant in (("p1", ""), ("p2", ""), ("planted", PLANT_SPEC)):
            r[kind], took, _ = run_gate(runs, f"{stamp}-r{i:02d}-{kind}", plant, args.extra)
            print(f"round {i} {kind}: {took:.0f} s, load {os.getloadavg()[0]:.2f}", flush=True)
        for target, old, new in (("identical", "p1", "p2"), ("planted", "p2", "planted")):
            pairs.append({"round": i, "target": target} | judge(r[old], r[new]))
            print(f"  {target}: exit {pairs[-1]['exit']} {pairs[-1]['regressions']}", flush=True)
        meta["rounds_done"] = i
        meta["finished"] = time.strftime("%H:%M:%S")
        write(dest, meta, pairs)
    print(json.dumps(summarize(pairs), indent=1))
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

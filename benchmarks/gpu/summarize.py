"""summary.md of a GPU check (benchmarks/gpu/device_check.sh) from its folder of logs.

Standard library only, so that it runs even when the build failed:

    python3 benchmarks/gpu/summarize.py LOGS_DIR [--status N] > summary.md

Sections: the machine (GPU, torch, commit), the steps (exit status, seconds, timeout), the CUDA
tests' counts per BLOBBENCH_CUDA_PATHS setting, compute-sanitizer's findings per tool and
setting, the per-call table of profile_calls.py and the benchmark command's headline.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

SANITIZER_TOOLS = ("memcheck", "racecheck", "initcheck")
NOT_ERRORS = ("COMPUTE-SANITIZER", "ERROR SUMMARY", "RACECHECK SUMMARY", "LEAK SUMMARY", "Target application")


def _read(path, default=""):
    try:
        with open(path, errors="replace") as fh:
            return fh.read()
    except OSError:
        return default


def _fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def steps(logs):
    rows = []
    for line in _read(os.path.join(logs, "steps.tsv")).splitlines():
        parts = line.split("\t")
        if len(parts) >= 4:
            rows.append({"name": parts[0], "rc": parts[1], "seconds": parts[2], "timeout": parts[3],
                         "note": parts[4] if len(parts) > 4 else ""})
    return rows


def env(logs):
    info = {}
    for line in _read(os.path.join(logs, "env.log")).splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info.setdefault(k.strip(), v.strip())
    return info


def pytest_counts(logs, name):
    """Counts of one pytest step from its JUnit XML, else from the log's last summary line."""
    xml = os.path.join(logs, f"{name}.xml")
    failed_names = []
    if os.path.exists(xml):
        try:
            root = ET.parse(xml).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            c = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            for tc in suite.iter("testcase"):
                if tc.find("failure") is not None or tc.find("error") is not None:
                    failed_names.append(f"{tc.get('classname', '')}::{tc.get('name', '')}")
            c["passed"] = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
            return c, failed_names, "junit"
        except (ET.ParseError, AttributeError, ValueError):
            pass
    log = _read(os.path.join(logs, f"{name}.log"))
    c = {"passed": 0, "failures": 0, "errors": 0, "skipped": 0}
    key = {"passed": "passed", "failed": "failures", "error": "errors", "errors": "errors", "skipped": "skipped"}
    lines = [ln for ln in log.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b", ln)]
    if lines:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", lines[-1]):
            c[key[what]] += int(n)
    failed_names = re.findall(r"^(?:FAILED|ERROR) (\S+)", log, flags=re.M)
    return c, failed_names, "log" if lines else "none"


def sanitizer(logs):
    """{(tool, setting): {"errors": n, "first": [...], "cases": n, "complete": bool}} and the
    summary line of every log."""
    per, summaries = {}, {}
    for fname in sorted(os.listdir(logs)):
        m = re.match(r"(memcheck|racecheck|initcheck)-(\w+)\.log$", fname)
        if not m:
            continue
        tool = m.group(1)
        setting, case = "(start-up)", None
        for line in _read(os.path.join(logs, fname)).splitlines():
            if line.startswith("=== setting "):
                setting = line.split()[2]
                per.setdefault((tool, setting), {"errors": 0, "first": [], "cases": 0, "complete": False})
            elif line.startswith("=== end setting "):
                per[(tool, setting)]["complete"] = True
            elif line.startswith("--- case "):
                case = line[len("--- case "):]
                per.setdefault((tool, setting), {"errors": 0, "first": [], "cases": 0, "complete": False})
                per[(tool, setting)]["cases"] += 1
            elif line.startswith("CASE FAILED"):
                d = per.setdefault((tool, setting), {"errors": 0, "first": [], "cases": 0, "complete": False})
                d.setdefault("failed", []).append(line[len("CASE FAILED "):])
            elif re.match(r"^========= \S", line):
                text = line[len("========= "):]
                if text.startswith(NOT_ERRORS):
                    if "SUMMARY" in text:
                        summaries[fname] = text
                    continue
                d = per.setdefault((tool, setting), {"errors": 0, "first": [], "cases": 0, "complete": False})
                d["errors"] += 1
                if len(d["first"]) < 3:
                    d["first"].append(f"{text} (case: {case})")
    return per, summaries


def target_rows(prof):
    """The issue's GPU targets per forward path: at the MS and SHANEL batches <= 150 us wall,
    <= 0.2x MONAI DiceLoss, <= 4 launches; the accumulate at >= 70 % of the copy's bandwidth on the
    large plane. Only on CUDA (kernel times present)."""
    out = []
    for r in prof.get("rows", []):
        if r.get("loss") != "blob_dice" or r.get("kernel_us") is None:
            continue
        checks = []
        if r["case"] in ("ms", "shanel"):
            checks += [("wall <= 150 us", r.get("wall_us"), lambda v: v <= 150, 1),
                       ("<= 0.2x MONAI DiceLoss", r.get("wall_over_monai_dice"), lambda v: v <= 0.2, 2),
                       ("<= 4 launches", r.get("launches"), lambda v: v <= 4, 1)]
        elif r["case"].startswith("plane"):
            checks += [("accumulate >= 0.7 of copy bw", r.get("acc_frac_copy"), lambda v: v >= 0.7, 2)]
        for what, v, ok, nd in checks:
            out.append([r["case"], r["path"], what, _fmt(v, nd), "-" if v is None else ("yes" if ok(v) else "NO")])
    return out


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs")
    ap.add_argument("--status", type=int, default=None, help="the check's exit status")
    args = ap.parse_args(argv)
    logs = args.logs
    dry = _read(os.path.join(logs, "dry_run")).strip() == "1"
    info, rows = env(logs), steps(logs)
    failed = [r["name"] for r in rows if r["rc"] != "0"]
    status = args.status if args.status is not None else (1 if failed else 0)
    p = print
    title = "blobbench GPU check" + (" (DRY_RUN: CPU, tiny sizes, no build, no sanitizer)" if dry else "")
    p(f"# {title}: {'PASSED' if status == 0 else 'FAILED'}")
    p()
    p(f"status {status}" + (f"; failed steps: {', '.join(failed)}" if failed else "; every step passed")
      + f"; {_read(os.path.join(logs, 'elapsed_s')).strip() or '?'} s in all")
    p()
    p(f"- GPU: {info.get('gpu', 'unknown')}")
    p(f"- torch {info.get('torch', '?')}, Python {info.get('python', '?')}, {info.get('cpus', '?')} CPUs")
    p(f"- commit {info.get('commit', 'unknown')}"
      + (" (with uncommitted changes)" if "modified" in info else ""))
    p(f"- compute-sanitizer: {info.get('compute-sanitizer', '?')}")
    p()
    p("## Steps")
    p()
    p(table(["step", "exit", "seconds", "timeout (s)", "note"],
            [[r["name"], r["rc"], r["seconds"], r["timeout"], r["note"]] for r in rows]))
    p()

    p("## CUDA tests (pytest -m cuda)")
    p()
    trs, fails = [], []
    for name, setting in (("tests-default", "default"), ("tests-all", "BLOBBENCH_CUDA_PATHS=all")):
        if not any(r["name"] == name for r in rows):
            continue
        c, names, src = pytest_counts(logs, name)
        rc = next(r["rc"] for r in rows if r["name"] == name)
        trs.append([f"tests ({setting})", c["passed"], c["failures"], c["errors"], c["skipped"], rc, src])
        fails += [f"{setting}: {n}" for n in names]
    if trs:
        p(table(["run", "passed", "failed", "errors", "skipped", "exit", "counted from"], trs))
        if fails:
            p()
            p("Failed:")
            for f in fails[:40]:
                p(f"- {f}")
    else:
        p("(not run)")
    p()

    p("## compute-sanitizer")
    p()
    per, summaries = sanitizer(logs)
    if dry:
        p("Skipped (DRY_RUN): the sanitizer cases ran plain on the CPU (step sanitize-cpu).")
        last = [ln for ln in _read(os.path.join(logs, "sanitize-cpu.log")).splitlines() if ln.strip()]
        if last:
            p(f"Its last line: `{last[-1]}`")
    elif per or summaries:
        srs = []
        for (tool, setting), d in sorted(per.items(), key=lambda kv: SANITIZER_TOOLS.index(kv[0][0])):
            srs.append([tool, setting, d["errors"], d["cases"], "yes" if d["complete"] else "NO",
                        "; ".join(d.get("failed", [])[:2]) or "-"])
        p(table(["tool", "setting", "errors reported", "cases", "completed", "failed cases"], srs))
        p()
        for fname, s in summaries.items():
            p(f"- {fname}: {s}")
        firsts = [(k, d["first"]) for k, d in per.items() if d["first"]]
        if firsts:
            p()
            p("First reports:")
            for (tool, setting), fl in firsts:
                for f in fl:
                    p(f"- {tool} / {setting}: {f}")
    else:
        p("(not run)")
    p()

    p("## Per call (benchmarks/gpu/profile_calls.py)")
    p()
    prof = None
    try:
        with open(os.path.join(logs, "profile_calls.json")) as fh:
            prof = json.load(fh)
    except (OSError, ValueError):
        p("(no profile_calls.json)")
    if prof:
        p(f"Device {prof.get('device')}, torch {prof.get('torch')}, {prof.get('calls')} calls per measurement; "
          "fwd+bwd with max_label, x.grad = None before each call. acc/copy: the accumulate kernel's read "
          "bandwidth (8 B/voxel) over a device copy's (read + write) in the same run; floor: 20 B/voxel at "
          "that copy bandwidth, over the kernel time and the wall time of a call (1 = at the floor).")
        p()
        for case, meta in prof.get("cases", {}).items():
            bw = meta.get("copy_bw_GBps")
            p(f"- {case}: {'x'.join(map(str, meta.get('shape', [])))}, copy {_fmt(meta.get('copy_us'))} us"
              + (f" ({bw:.0f} GB/s read + write), floor {meta.get('floor_us', 0):.1f} us" if bw else ""))
        p()
        prs = []
        for r in prof.get("rows", []):
            ratio = r.get("wall_over_monai_dice_ce", r.get("wall_over_monai_dice"))
            prs.append([r["case"], r["loss"], r["path"], _fmt(r.get("launches")), _fmt(r.get("kernel_us")),
                        _fmt(r.get("wall_us")), _fmt(r.get("accumulate_us")), _fmt(r.get("acc_frac_copy"), 2),
                        _fmt(r.get("floor_frac_kernel"), 2), _fmt(r.get("floor_frac_wall"), 2), _fmt(ratio, 2)])
        p(table(["case", "loss", "path", "launches", "kernel us", "wall us", "accumulate us", "acc/copy bw",
                 "floor/kernel", "floor/wall", "wall / MONAI"], prs))
        p()
        p("wall / MONAI: blob Dice over MONAI DiceLoss, blob Dice+CE over MONAI DiceCELoss.")
        acc = {}
        for r in prof.get("rows", []):
            if r.get("accumulate_kernel"):
                acc.setdefault(r["path"], set()).add(r["accumulate_kernel"])
        if acc:
            p()
            p("Accumulate kernel (the longest kernel of a forward) per path:")
            for path, names in acc.items():
                p(f"- {path}: " + "; ".join(f"`{n}`" for n in sorted(names)))
        targets = target_rows(prof)
        if targets:
            p()
            p("Targets of issue 10 (blob Dice fwd+bwd with max_label):")
            p()
            p(table(["case", "path", "target", "measured", "met"], targets))
    p()

    p("## Benchmark command")
    p()
    res = None
    for cand in ("command/run/result.json", "command/latest/result.json"):
        try:
            with open(os.path.join(logs, cand)) as fh:
                res = json.load(fh)
            break
        except (OSError, ValueError):
            continue
    if res is None:
        p("(no result.json)")
    else:
        run = res.get("run", {})
        partial = res.get("partial")
        p(f"`{run.get('command', 'blobbench')}`, {res.get('machine', {}).get('summary', '')}"
          + (f"; PARTIAL: {partial.get('done')} of {partial.get('of')} measurements" if partial else ""))
        p()
        crs = []
        monai = {(m["case"], m["device"]): m for m in res.get("measurements", []) if m.get("impl") == "monai_dice"}
        for m in res.get("measurements", []):
            if m.get("status") == "ok":
                med = m.get("median_s", 0) * 1e3
                lo, hi = m.get("min_s", 0) * 1e3, m.get("max_s", 0) * 1e3
                base = monai.get((m["case"], m["device"]))
                ratio = (m["median_s"] / base["median_s"]) if base and base.get("status") == "ok" else None
                crs.append([m["case"], m["impl"], m["device"], f"{med:.3f}", f"{lo:.3f}-{hi:.3f}",
                            _fmt(m.get("peak_bytes", 0) / 2**20 if m.get("peak_bytes") is not None else None),
                            _fmt(ratio, 2), "ok"])
            else:
                crs.append([m.get("case"), m.get("impl"), m.get("device"), "-", "-", "-", "-",
                            f"{m.get('status')}: {str(m.get('error', ''))[:80]}"])
        p(table(["case", "impl", "device", "median ms", "min-max ms", "peak MB", "/ MONAI DiceLoss", "status"], crs))
    p()
    p("Logs, JSON and the command's result.json are in device_check.tar.gz beside this file.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``blobbench compare OLD NEW``: two runs side by side, regressions flagged, exit code 1 on one.

Gated are our implementations (fused, fused_tversky, fused_dice_ce, vectorized); the baselines
(MONAI's losses, the paper's loop with them) no commit of ours changes are reported, never gated:
when they move, the machine moved.

- **time** of ours is judged *relative to its baseline measured in the same run* (fused and
  fused_tversky / MONAI DiceLoss, fused_dice_ce / MONAI DiceCELoss): per repetition, the log of
  ours / baseline (paired repetition by repetition when the run measured them interleaved in one
  process, as ``blobbench --gate`` does; against the baseline's median otherwise). The change is
  NEW / OLD of that ratio (a ratio of ratios: drift of the machine between the runs divides out),
  with a 95 % bootstrap interval. A **regression** is a change above ``factor`` (default 1.15)
  that is also statistically clear: a one-sided Mann-Whitney U test of NEW's per-repetition
  log-ratios against OLD's, p < ``alpha`` (default 0.01). An improvement is the mirror image.
  Without the baseline in both runs, ours is judged on its absolute time by the same rule (said
  in the row: machine drift is then not cancelled).
- **memory** of ours: the bytes the CPU allocator hands out during one call (``alloc_peak_bytes``,
  counted from torch.profiler's allocation events; on CUDA ``max_memory_allocated``): the same
  for the same code, so growth beyond ``mem_threshold`` of OLD and ``mem_floor_bytes`` is a
  regression. Peak RSS is reported, never gated (glibc's page reuse moves it by itself).
- **status**: ours ok in OLD but over budget, out of memory or an error in NEW is a regression;
  any implementation failing with an error is one too.
- the **host cost proxy** (when both runs have it): NEW / OLD of its ratio, same rule as time on
  its per-repetition ratios.

Cases in only one run are listed, not judged. Runs from different machines are compared but the
table says so first. A run with a planted slowdown (``$BLOBBENCH_PLANT_SLOWDOWN``, test only) is
named in a warning.
"""
from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

from .bench import BASELINE_OF, OURS
from .noise import busy_warning, summarize_times
from .runs import resolve_result

__all__ = ["load_run", "compare_runs", "format_compare", "plot_compare", "mann_whitney_greater",
           "relative_samples", "change_test", "DEFAULT_FACTOR", "DEFAULT_ALPHA"]

DEFAULT_FACTOR = 1.15
DEFAULT_ALPHA = 0.01


def load_run(path) -> tuple[dict, Path]:
    p = resolve_result(path)
    with open(p) as fh:
        return json.load(fh), p


def _stats(m):
    if m.get("times_s"):
        return summarize_times(m["times_s"])
    return {k: m.get(k, m.get("median_s")) for k in ("median_s", "q1_s", "q3_s")}


def _times(m) -> list[float]:
    return list(m.get("times_s") or [m[k] for k in ("q1_s", "median_s", "q3_s") if k in m] or [m["median_s"]])


def relative_samples(ours: dict, base: dict | None) -> list[float]:
    """Per repetition, log(ours / baseline) of one run: paired repetition by repetition when the
    two were measured interleaved in one process (``"interleaved"``), else against the baseline's
    median. Without a baseline, log of ours' own times."""
    to = _times(ours)
    if base is None:
        return [math.log(t) for t in to]
    tb = _times(base)
    if base["impl"] in (ours.get("interleaved") or ()) and len(tb) == len(to):
        return [math.log(a / b) for a, b in zip(to, tb)]
    mb = statistics.median(tb)
    return [math.log(a / mb) for a in to]


def mann_whitney_greater(old: list[float], new: list[float]) -> float:
    """One-sided p-value of the Mann-Whitney U test that ``new`` tends to be larger than ``old``
    (normal approximation with continuity correction and the tie correction); 1.0 when either has
    fewer than 2 values."""
    n1, n2 = len(old), len(new)
    if n1 < 2 or n2 < 2:
        return 1.0
    u = sum(1.0 if b > a else 0.5 if b == a else 0.0 for a in old for b in new)
    allv = sorted(old + new)
    ties, i = 0.0, 0
    while i < len(allv):
        j = i
        while j < len(allv) and allv[j] == allv[i]:
            j += 1
        t = j - i
        ties += t ** 3 - t
        i = j
    n = n1 + n2
    var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if var <= 0:
        return 1.0
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(var)
    return 0.5 * math.erfc(z / math.sqrt(2))


def change_test(old: list[float], new: list[float], boot: int = 2000, seed: int = 0) -> dict:
    """NEW / OLD of log-samples: ``ratio`` = exp(median(new) - median(old)), its 95 % bootstrap
    interval ``lo``, ``hi`` (both samples resampled, a fixed seed: the same inputs give the same
    interval), and the one-sided Mann-Whitney p-values ``p_slower`` (new larger) and ``p_faster``."""
    d = statistics.median(new) - statistics.median(old)
    rng = random.Random(seed)
    ds = sorted(statistics.median(rng.choices(new, k=len(new))) - statistics.median(rng.choices(old, k=len(old)))
                for _ in range(boot))
    return {"ratio": math.exp(d), "lo": math.exp(ds[int(0.025 * boot)]), "hi": math.exp(ds[int(0.975 * boot) - 1]),
            "p_slower": mann_whitney_greater(old, new), "p_faster": mann_whitney_greater(new, old),
            "n_old": len(old), "n_new": len(new)}


def _judge(t: dict, factor: float, alpha: float) -> str:
    if t["ratio"] > factor and t["p_slower"] < alpha:
        return "regression"
    if t["ratio"] < 1 / factor and t["p_faster"] < alpha:
        return "improvement"
    return ""


def _ok(m):
    return m is not None and m.get("status") == "ok"


def compare_runs(old: dict, new: dict, threshold: float = DEFAULT_FACTOR - 1, mem_threshold: float = 0.10,
                 mem_floor_bytes: int = 2**20, alpha: float = DEFAULT_ALPHA) -> dict:
    """The comparison of two results (see the module doc): ``rows``, ``regressions``, notes.
    ``threshold``: the factor minus 1 (0.15: a change above x1.15 may be a regression)."""
    factor = 1 + threshold
    key = lambda m: (m["case"], m["impl"], m["device"])  # noqa: E731
    om = {key(m): m for m in old["measurements"]}
    nm = {key(m): m for m in new["measurements"]}
    rows = []
    for k in [k for k in nm if k in om]:
        o, n = om[k], nm[k]
        case, impl, dev = k
        ours = impl in OURS
        row = {"case": case, "impl": impl, "device": dev, "old_status": o["status"], "new_status": n["status"],
               "verdict": "", "why": [], "gated": ours}
        if o["status"] == "ok" and n["status"] == "ok":
            so, sn = _stats(o), _stats(n)
            row.update(old_median_s=so["median_s"], new_median_s=sn["median_s"])
            b = BASELINE_OF.get(impl) if ours else None
            bo, bn = om.get((case, b, dev)), nm.get((case, b, dev))
            if b and _ok(bo) and _ok(bn):
                t = change_test(relative_samples(o, bo), relative_samples(n, bn))
                row["time_basis"] = f"/ {b}" + (" (paired)" if b in (n.get("interleaved") or ()) else "")
            else:
                t = change_test(relative_samples(o, None), relative_samples(n, None))
                row["time_basis"] = "absolute" + (" (no baseline in both runs: drift not cancelled)" if ours else "")
            v = _judge(t, factor, alpha)
            if o.get("clock", "wall") != n.get("clock", "wall"):   # CPU time against wall time: not comparable
                row["time_basis"] += f" (clocks differ: {o.get('clock', 'wall')} -> {n.get('clock', 'wall')})"
                v = ""
            row.update(time_ratio=t["ratio"], time_lo=t["lo"], time_hi=t["hi"], time_p=t["p_slower"],
                       time_p_faster=t["p_faster"], abs_time_ratio=sn["median_s"] / so["median_s"],
                       time_verdict=v if ours else "")
            if ours and v == "regression":
                row["why"].append(f"time x{t['ratio']:.2f} [{t['lo']:.2f}, {t['hi']:.2f}] {row['time_basis']}, "
                                  f"p={t['p_slower']:.2g}")
            if o.get("noisy") or n.get("noisy"):
                row["noisy"] = True
            if "alloc_peak_bytes" in o and "alloc_peak_bytes" in n:
                po, pn, what = o["alloc_peak_bytes"], n["alloc_peak_bytes"], "allocator"
            elif "peak_bytes" in o and "peak_bytes" in n:
                po, pn, what = o["peak_bytes"], n["peak_bytes"], "rss" if dev == "cpu" else "allocator"
            else:
                po = pn = what = None
            if what:
                row.update(old_peak_bytes=po, new_peak_bytes=pn, memory_basis=what,
                           memory_ratio=pn / po if po > 0 else (1.0 if pn == po else math.inf))
                if "peak_bytes" in o and "peak_bytes" in n and what == "allocator" and dev == "cpu":
                    row["rss_ratio"] = n["peak_bytes"] / o["peak_bytes"] if o["peak_bytes"] > 0 else None
                grow = pn - po
                mv = ""
                if grow > max(mem_threshold * max(po, 0), mem_floor_bytes):
                    mv = "regression"
                elif -grow > max(mem_threshold * max(po, 0), mem_floor_bytes):
                    mv = "improvement"
                row["memory_verdict"] = mv if ours and what == "allocator" else ""
                if row["memory_verdict"] == "regression":
                    row["why"].append(f"memory +{grow / 2**20:.1f} MB (x{row['memory_ratio']:.2f}, allocator bytes)")
        elif o["status"] == "ok":
            if ours or n["status"] == "error":
                row["why"].append(f"status ok -> {n['status']}")
        elif n["status"] == "ok":
            row["verdict"] = "improvement"
        if row["why"]:
            row["verdict"] = "regression"
        elif not row["verdict"] and "improvement" in (row.get("time_verdict"), row.get("memory_verdict")):
            row["verdict"] = "improvement"
        rows.append(row)
    out = {"rows": rows, "threshold": threshold, "factor": factor, "alpha": alpha, "mem_threshold": mem_threshold,
           "mem_floor_bytes": mem_floor_bytes,
           "only_old": [list(k) for k in om if k not in nm], "only_new": [list(k) for k in nm if k not in om],
           "old_machine": old.get("machine", {}).get("summary", "?"),
           "new_machine": new.get("machine", {}).get("summary", "?")}
    out["same_machine"] = out["old_machine"] == out["new_machine"]
    out["busy"] = {
        k: busy_warning(r.get("run") or {}, (r.get("machine") or {}).get("threads") or 0)
        for k, r in (("OLD", old), ("NEW", new))
    }
    out["planted"] = {k: (r.get("run") or {}).get("planted_slowdown", 1.0) or 1.0
                      for k, r in (("OLD", old), ("NEW", new))}
    po, pn = old.get("host_proxy") or {}, new.get("host_proxy") or {}
    if po.get("status") == "ok" and pn.get("status") == "ok":
        so = [math.log(r) for r in po.get("ratios") or [po["ratio_q1"], po["ratio"], po["ratio_q3"]]]
        sn = [math.log(r) for r in pn.get("ratios") or [pn["ratio_q1"], pn["ratio"], pn["ratio_q3"]]]
        t = change_test(so, sn)
        v = _judge(t, factor, alpha)
        out["host_proxy"] = {"old": po["ratio"], "new": pn["ratio"], "ratio": t["ratio"], "lo": t["lo"],
                             "hi": t["hi"], "p": t["p_slower"], "verdict": v}
    out["regressions"] = [r for r in rows if r["verdict"] == "regression"]
    if out.get("host_proxy", {}).get("verdict") == "regression":
        out["regressions"].append({"case": "host cost proxy", "impl": "fused", "device": "cpu",
                                   "why": [f"proxy x{out['host_proxy']['ratio']:.2f}"]})
    return out


def format_compare(cmp: dict, old_name: str, new_name: str) -> str:
    lines = [f"blobbench compare: OLD {old_name}", f"                   NEW {new_name}"]
    if cmp["same_machine"]:
        lines.append(f"machine: {cmp['new_machine']}")
    else:
        lines += ["WARNING: different machines; the ratios compare the machines as well as the code",
                  f"  OLD: {cmp['old_machine']}", f"  NEW: {cmp['new_machine']}"]
    for k, w in cmp.get("busy", {}).items():
        if w:
            lines.append(f"{k}: {w}")
    for k, f in cmp.get("planted", {}).items():
        if f and f > 1:
            lines.append(f"WARNING: {k} ran with a PLANTED SLOWDOWN x{f:g} of the fused ops ($BLOBBENCH_PLANT_SLOWDOWN, "
                         "test only): its times are not the code's")
    lines.append(f"time: NEW/OLD of ours / its baseline measured in the same run (a ratio of ratios: machine drift "
                 f"divides out), [95% bootstrap interval], p: one-sided Mann-Whitney; regression: > "
                 f"x{cmp.get('factor', 1 + cmp['threshold']):.2f} and p < {cmp.get('alpha', DEFAULT_ALPHA):g}. "
                 f"memory: allocator bytes of one call; regression: +{cmp['mem_threshold']:.0%} and > "
                 f"{cmp['mem_floor_bytes'] / 2**20:g} MB. Baselines (MONAI, the loop): their own NEW/OLD, not gated")
    lines.append(f"  {'case':12s} {'implementation':14s} {'device':7s} {'OLD ms':>9s} {'NEW ms':>9s} "
                 f"{'time NEW/OLD':>24s} {'p':>8s} {'memory NEW/OLD':>15s}  verdict")
    for r in cmp["rows"]:
        p = "-"
        if "time_ratio" in r:
            t = f"x{r['time_ratio']:.2f} [{r['time_lo']:.2f}, {r['time_hi']:.2f}]"
            om, nm = f"{r['old_median_s'] * 1e3:.3g}", f"{r['new_median_s'] * 1e3:.3g}"
            p = f"{r['time_p']:.2g}" if r.get("gated", True) else "-"
        else:
            t, om, nm = f"{r['old_status']} -> {r['new_status']}", "-", "-"
        mem = "-"
        if "memory_ratio" in r:
            mem = f"x{r['memory_ratio']:.2f}" + (" rss" if r.get("memory_basis") == "rss" else "")
        verdict = r["verdict"].upper() if r["verdict"] == "regression" else r["verdict"]
        if r["why"]:
            verdict += ": " + "; ".join(r["why"])
        if not r.get("gated", True):
            verdict += ("; " if verdict else "") + "baseline, not gated"
        elif r.get("time_basis", "").startswith("absolute"):
            verdict += ("; " if verdict else "") + "absolute time: drift not cancelled"
        if r.get("noisy"):
            verdict += " (noisy)"
        lines.append(f"  {r['case']:12s} {r['impl']:14s} {r['device']:7s} {om:>9s} {nm:>9s} {t:>24s} {p:>8s} "
                     f"{mem:>15s}  {verdict}")
    hp = cmp.get("host_proxy")
    if hp:
        lines.append(f"host cost proxy: {hp['old']:.2f}x -> {hp['new']:.2f}x, NEW/OLD x{hp['ratio']:.2f} "
                     f"[{hp['lo']:.2f}, {hp['hi']:.2f}] p={hp.get('p', 1):.2g} "
                     f"{hp['verdict'].upper() if hp['verdict'] == 'regression' else hp['verdict']}")
    for what, keys in (("only in OLD", cmp["only_old"]), ("only in NEW", cmp["only_new"])):
        if keys:
            lines.append(f"{what} (not compared): " + ", ".join("/".join(k) for k in keys))
    n = len(cmp["regressions"])
    lines.append(f"{n} regression{'' if n == 1 else 's'}" + (": " + ", ".join(
        f"{r['case']}/{r['impl']}/{r['device']}" for r in cmp["regressions"]) if n else ""))
    return "\n".join(lines) + "\n"


def plot_compare(cmp: dict, path, old_name: str, new_name: str) -> str:
    """NEW/OLD per (case, implementation, device), time (with its interval) and memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = [r for r in cmp["rows"] if "time_ratio" in r]
    labels = [f"{r['case']} {r['impl']} {r['device']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, max(3.0, 0.32 * len(rows) + 1.8)), sharey=True)
    colors = {"regression": "tab:red", "improvement": "tab:green", "": "tab:gray"}
    for ax, what in zip(axes, ("time", "memory")):
        thr = cmp["threshold"] if what == "time" else cmp["mem_threshold"]  # the factor - 1
        ax.axvspan(1 / (1 + thr), 1 + thr, color="0.92", zorder=0, label=f"within ±{thr:.0%}")
        ax.axvline(1, color="k", lw=0.8)
        for y, r in enumerate(rows):
            if what == "time":
                x, lo, hi, v = r["time_ratio"], r["time_lo"], r["time_hi"], r["time_verdict"]
                ax.errorbar(x, y, xerr=[[x - lo], [hi - x]], fmt="o", color=colors[v], capsize=3,
                            mfc="none" if r.get("noisy") else colors[v])
            elif "memory_ratio" in r and math.isfinite(r["memory_ratio"]) and r["memory_ratio"] > 0:
                ax.plot(r["memory_ratio"], y, "s", color=colors[r.get("memory_verdict", "")])
        ax.set_xscale("log")
        xs = [v for r in rows for v in ((r["time_lo"], r["time_hi"]) if what == "time" else (r.get("memory_ratio"),))
              if v is not None and math.isfinite(v) and v > 0] + [1 / (1 + thr), 1 + thr]
        lim = max(max(xs), 1 / min(xs)) * 1.25           # symmetric about 1 on the log axis
        if lim > 20:
            ticks = [10.0 ** k for k in range(-6, 7) if 1 / lim <= 10.0 ** k <= lim]
        elif lim > 1.6:
            ticks = [t for t in (1 / 16, 1 / 8, 0.25, 0.5, 2 / 3, 1.0, 1.5, 2.0, 4.0, 8.0, 16.0) if 1 / lim <= t <= lim]
        else:
            ticks = [1 / (1 + thr), 1.0, 1 + thr]
        ax.set_xticks(ticks)
        ax.set_xlim(1 / lim, lim)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{'median time' if what == 'time' else 'peak memory'}: NEW / OLD (log scale)"
                      + (" of ours / its baseline — bars: 95% bootstrap interval; open: noisy" if what == "time" else ""))
        ax.grid(True, axis="x", which="both", alpha=0.3)
        ax.set_title("time" if what == "time" else "peak memory above the inputs", fontsize=10)
    axes[0].set_yticks(range(len(rows)))
    axes[0].set_yticklabels(labels, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].legend(fontsize=8, loc="lower right")
    n = len(cmp["regressions"])
    fig.suptitle(f"blobbench compare: NEW / OLD per case, implementation and device; red: regression ({n}), "
                 f"green: improvement\nOLD {old_name}\nNEW {new_name}\n"
                 + (f"machine: {cmp['new_machine']}" if cmp["same_machine"] else
                    f"different machines: OLD {cmp['old_machine']}; NEW {cmp['new_machine']}"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)

"""``blobbench compare OLD NEW``: two runs side by side, regressions flagged, exit code 1 on one.

For every (case, implementation, device) measured in both runs:

- time: NEW / OLD of the medians, with the interval ``[NEW q1 / OLD q3, NEW q3 / OLD q1]`` from
  the repetitions' quartiles (the ratio's range when both runs sit anywhere in their middle
  halves). A **regression** is a ratio above ``1 + threshold`` whose whole interval lies above 1
  (slower beyond the noise); an improvement is the mirror image.
- peak memory: NEW / OLD; a regression is growth by more than ``mem_threshold`` of OLD and more
  than ``mem_floor_bytes``.
- status: ok in OLD but over budget, out of memory or an error in NEW is a regression.
- the host cost proxy (when both runs have it): NEW / OLD of its ratio, same rule as time.

Cases in only one run are listed, not judged. Runs from different machines are compared but the
table says so first: their ratios compare the machines as much as the commits.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .noise import busy_warning, summarize_times
from .runs import resolve_result

__all__ = ["load_run", "compare_runs", "format_compare", "plot_compare"]


def load_run(path) -> tuple[dict, Path]:
    p = resolve_result(path)
    with open(p) as fh:
        return json.load(fh), p


def _stats(m):
    if m.get("times_s"):
        return summarize_times(m["times_s"])
    return {k: m.get(k, m.get("median_s")) for k in ("median_s", "q1_s", "q3_s")}


def _judge(ratio, lo, hi, threshold):
    if ratio > 1 + threshold and lo > 1:
        return "regression"
    if ratio < 1 / (1 + threshold) and hi < 1:
        return "improvement"
    return ""


def compare_runs(old: dict, new: dict, threshold: float = 0.10, mem_threshold: float = 0.10,
                 mem_floor_bytes: int = 2**20) -> dict:
    """The comparison of two results (see the module doc): ``rows``, ``regressions``, notes."""
    key = lambda m: (m["case"], m["impl"], m["device"])  # noqa: E731
    om = {key(m): m for m in old["measurements"]}
    nm = {key(m): m for m in new["measurements"]}
    rows = []
    for k in [k for k in nm if k in om]:
        o, n = om[k], nm[k]
        row = {"case": k[0], "impl": k[1], "device": k[2], "old_status": o["status"], "new_status": n["status"],
               "verdict": "", "why": []}
        if o["status"] == "ok" and n["status"] == "ok":
            so, sn = _stats(o), _stats(n)
            r = sn["median_s"] / so["median_s"]
            lo, hi = sn["q1_s"] / so["q3_s"], sn["q3_s"] / so["q1_s"]
            row.update(old_median_s=so["median_s"], new_median_s=sn["median_s"], time_ratio=r,
                       time_lo=lo, time_hi=hi, time_verdict=_judge(r, lo, hi, threshold))
            if row["time_verdict"] == "regression":
                row["why"].append(f"time x{r:.2f} [{lo:.2f}, {hi:.2f}]")
            if o.get("noisy") or n.get("noisy"):
                row["noisy"] = True
            if "peak_bytes" in o and "peak_bytes" in n:
                po, pn = o["peak_bytes"], n["peak_bytes"]
                row.update(old_peak_bytes=po, new_peak_bytes=pn,
                           memory_ratio=pn / po if po > 0 else (1.0 if pn == po else math.inf))
                grow = pn - po
                if grow > max(mem_threshold * max(po, 0), mem_floor_bytes):
                    row["memory_verdict"] = "regression"
                    row["why"].append(f"memory +{grow / 2**20:.1f} MB (x{row['memory_ratio']:.2f})")
                elif -grow > max(mem_threshold * max(po, 0), mem_floor_bytes):
                    row["memory_verdict"] = "improvement"
                else:
                    row["memory_verdict"] = ""
        elif o["status"] == "ok":
            row["why"].append(f"status ok -> {n['status']}")
        elif n["status"] == "ok":
            row["verdict"] = "improvement"
        if row["why"]:
            row["verdict"] = "regression"
        elif not row["verdict"] and "improvement" in (row.get("time_verdict"), row.get("memory_verdict")):
            row["verdict"] = "improvement"
        rows.append(row)
    out = {"rows": rows, "threshold": threshold, "mem_threshold": mem_threshold, "mem_floor_bytes": mem_floor_bytes,
           "only_old": [list(k) for k in om if k not in nm], "only_new": [list(k) for k in nm if k not in om],
           "old_machine": old.get("machine", {}).get("summary", "?"),
           "new_machine": new.get("machine", {}).get("summary", "?")}
    out["same_machine"] = out["old_machine"] == out["new_machine"]
    out["busy"] = {
        k: busy_warning(r.get("run") or {}, (r.get("machine") or {}).get("threads") or 0)
        for k, r in (("OLD", old), ("NEW", new))
    }
    po, pn = old.get("host_proxy") or {}, new.get("host_proxy") or {}
    if po.get("status") == "ok" and pn.get("status") == "ok":
        r = pn["ratio"] / po["ratio"]
        lo, hi = pn["ratio_q1"] / po["ratio_q3"], pn["ratio_q3"] / po["ratio_q1"]
        v = _judge(r, lo, hi, threshold)
        out["host_proxy"] = {"old": po["ratio"], "new": pn["ratio"], "ratio": r, "lo": lo, "hi": hi, "verdict": v}
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
    lines.append(f"NEW/OLD of median time [interval from the quartiles: NEW q1/OLD q3, NEW q3/OLD q1] and of peak "
                 f"memory; regression: time > x{1 + cmp['threshold']:.2f} with the interval above 1, memory "
                 f"+{cmp['mem_threshold']:.0%} and > {cmp['mem_floor_bytes'] / 2**20:g} MB, or a status lost")
    lines.append(f"  {'case':12s} {'implementation':14s} {'device':7s} {'OLD ms':>9s} {'NEW ms':>9s} "
                 f"{'time NEW/OLD':>24s} {'memory NEW/OLD':>15s}  verdict")
    for r in cmp["rows"]:
        if "time_ratio" in r:
            t = f"x{r['time_ratio']:.2f} [{r['time_lo']:.2f}, {r['time_hi']:.2f}]"
            om, nm = f"{r['old_median_s'] * 1e3:.3g}", f"{r['new_median_s'] * 1e3:.3g}"
        else:
            t, om, nm = f"{r['old_status']} -> {r['new_status']}", "-", "-"
        mem = f"x{r['memory_ratio']:.2f}" if "memory_ratio" in r else "-"
        verdict = r["verdict"].upper() if r["verdict"] == "regression" else r["verdict"]
        if r["why"]:
            verdict += ": " + "; ".join(r["why"])
        if r.get("noisy"):
            verdict += " (noisy)"
        lines.append(f"  {r['case']:12s} {r['impl']:14s} {r['device']:7s} {om:>9s} {nm:>9s} {t:>24s} {mem:>15s}  "
                     f"{verdict}")
    hp = cmp.get("host_proxy")
    if hp:
        lines.append(f"host cost proxy: {hp['old']:.2f}x -> {hp['new']:.2f}x, NEW/OLD x{hp['ratio']:.2f} "
                     f"[{hp['lo']:.2f}, {hp['hi']:.2f}] "
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
        thr = cmp["threshold"] if what == "time" else cmp["mem_threshold"]
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
                      + (" — bars: quartile interval; open: flagged noisy" if what == "time" else ""))
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

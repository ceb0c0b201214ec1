"""Tables, ratios, plots and README blocks of a ``blobbench`` run (its JSON result)."""
from __future__ import annotations

import math
import os
import re

from .bench import IMPLEMENTATIONS, LOSSES
from .noise import DEFAULT_FACTOR, DEFAULT_THRESHOLD, busy_warning, noise_reasons, summarize_times

__all__ = ["ratios", "all_ratios", "time_ratio", "RATIO_BASE", "print_report", "plot_report", "noise_flags",
           "readme_block", "update_readme"]


def _by(results, case, device):
    return {r["impl"]: r for r in results if r["case"] == case and r["device"] == device}


#: implementation -> the fused op its "time/fused" and "mem/fused" columns are against (default
#: ``fused``, blob Dice): the Dice+CE ones against ``fused_dice_ce``, the CC ones against
#: ``fused_cc_dice_ce`` (MONAI DiceCELoss stays with blob Dice+CE).
RATIO_BASE = {impl: LOSSES["dice_ce"][1] for impl in LOSSES["dice_ce"] if impl} | {
    impl: LOSSES["cc_dice_ce"][1] for impl in ("naive_cc_dice_ce", "vectorized_cc_dice_ce", "fused_cc_dice_ce")}
#: the fused op of each block of a case's table -> the title of the block
_BLOCK_TITLE = {"fused_dice_ce": "blob Dice+CE", "fused_cc_dice_ce": "CC-DiceCE (Voronoi regions)"}

#: loss -> the implementations its headline ratios put against the fused op.
_RATIO_OTHERS = {"dice": ("naive", "vectorized", "monai_dice"), "dice_ce": ("naive_dice_ce", "monai_dice_ce"),
                 "cc_dice_ce": ("naive_cc_dice_ce", "vectorized_cc_dice_ce", "monai_dice_ce")}


def _q(r, k):
    """Quartile ``k`` (``q1_s``/``q3_s``) of a measurement; from its times, or its median when neither
    is recorded (an older result)."""
    if k in r:
        return r[k]
    return summarize_times(r["times_s"])[k] if r.get("times_s") else r["median_s"]


def time_ratio(a: dict, b: dict) -> tuple[float, float, float]:
    """a / b of the median times with the interval ``[a q1 / b q3, a q3 / b q1]`` from the
    repetitions' quartiles (as ``blobbench compare``): the ratio's range when both sit anywhere in
    their middle halves."""
    return (a["median_s"] / b["median_s"], _q(a, "q1_s") / _q(b, "q3_s"), _q(a, "q3_s") / _q(b, "q1_s"))


def ratios(result: dict, loss: str = "dice") -> list[dict]:
    """Headline ratios per (profile or file case, device): a loss's fused op against the others
    (``loss``: ``dice``, blob.dice against the loop, the vectorized reference and MONAI DiceLoss;
    ``dice_ce``, blob.dice_ce against the loop with MONAI DiceCELoss per blob and MONAI DiceCELoss).

    ``speedup_vs_X`` = median time of X / median time of fused (> 1: fused is faster), with
    ``speedup_vs_X_interval`` from the quartiles (:func:`time_ratio`); ``time_over_monai`` (and its
    ``_interval``) / ``memory_over_monai`` = fused / MONAI's loss without instances (< 1: fused is
    cheaper); ``memory_over_naive`` = fused / the loop's peak memory.
    """
    naive, fused, monai = LOSSES[loss]
    out = []
    for case in result["cases"]:
        if case["kind"] not in ("profile", "file"):
            continue
        for device in result["settings"]["devices"]:
            m = _by(result["measurements"], case["name"], device)
            f = m.get(fused)
            if not f or f["status"] != "ok":
                continue
            row = {"case": case["name"], "device": device, "fused_median_s": f["median_s"]}
            for other in _RATIO_OTHERS.get(loss) or [i for i in (naive, monai) if i]:
                o = m.get(other)
                if o is None:
                    continue
                if o["status"] == "ok":
                    r, lo, hi = time_ratio(o, f)
                    row[f"speedup_vs_{other}"] = r
                    row[f"speedup_vs_{other}_interval"] = [lo, hi]
                else:
                    row[f"speedup_vs_{other}"] = o["status"]
            # CC rows: memory from the allocator's bytes (CPU), where recorded. Runs before bench.prepare
            # trimmed the heap (the committed cpu-2core-2026-12-01-cc among them) measured the loss
            # inside the regions' leftover resident pages, so their process peak says nothing.
            key = "alloc_peak_bytes" if loss == "cc_dice_ce" and "alloc_peak_bytes" in f else "peak_bytes"
            if key == "alloc_peak_bytes":
                row["memory_method"] = "allocator bytes"
            mo = m.get(monai)
            if mo and mo["status"] == "ok":
                r, lo, hi = time_ratio(f, mo)
                row["time_over_monai"] = r
                row["time_over_monai_interval"] = [lo, hi]
                if key in mo:
                    row["memory_over_monai"] = f[key] / max(mo[key], 1)
            mn = m.get(naive)
            if mn and mn["status"] == "ok" and key in mn:
                row["memory_over_naive"] = f[key] / max(mn[key], 1)
            row["loss"] = loss
            out.append(row)
    return out


def all_ratios(result: dict) -> list[dict]:
    """:func:`ratios` of blob Dice, blob Dice+CE, then CC-DiceCE (each row says its ``loss``)."""
    return ratios(result, "dice") + ratios(result, "dice_ce") + ratios(result, "cc_dice_ce")


def _cell(r, noisy=False):
    if r is None:
        return "-"
    if r["status"] != "ok":
        return {"over budget": "over budget", "out of memory": "out of mem."}.get(r["status"], r["status"])
    ms = r["median_s"] * 1e3
    return (f"{ms:.3g}" if ms < 100 else f"{ms:.0f}") + ("!" if noisy else "")


def _rel_iqr(r):
    if r.get("rel_iqr") is not None or not r.get("times_s"):
        return r.get("rel_iqr")
    return summarize_times(r["times_s"])["rel_iqr"]


def noise_flags(result: dict) -> tuple[dict, bool]:
    """``(case, impl, device) -> reasons`` of the noisy measurements, and whether they come from the
    run itself (True) or were computed afterwards with the default thresholds, for a result from
    before the noise checks (False: flagged, not re-measured)."""
    meas = result["measurements"]
    key = lambda m: (m["case"], m["impl"], m["device"])  # noqa: E731
    if all("noisy" in m for m in meas):
        return {key(m): m["noisy"] for m in meas if m["noisy"]}, True
    withspread = [m | {"rel_iqr": _rel_iqr(m)} if m["status"] == "ok" else m for m in meas]
    flags = noise_reasons(withspread, result["cases"], DEFAULT_THRESHOLD, DEFAULT_FACTOR)
    return {key(meas[i]): reasons for i, reasons in flags.items()}, False


def _mb(r):
    if r is None or r["status"] != "ok" or "peak_bytes" not in r:
        return "-"
    return f"{r['peak_bytes'] / 2**20:.1f}"


def host_proxy_line(proxy) -> str:
    """The report's line for the host cost proxy (issue 10), '' when the run has none."""
    if not proxy:
        return ""
    if proxy.get("status") != "ok":
        return f"host cost proxy: {proxy.get('status')} {proxy.get('error', '')}"
    return (f"host cost proxy (CPU, {proxy['threads']} thread, {'x'.join(map(str, proxy['shape']))} float32; "
            f"blob_dice(max_label=2) fwd+bwd / x.sum().backward()): {proxy['ratio']:.2f}x "
            f"[IQR {proxy['ratio_q1']:.2f}-{proxy['ratio_q3']:.2f}, min-max {proxy['ratio_min']:.2f}-"
            f"{proxy['ratio_max']:.2f}] ({proxy['fused_median_s'] * 1e6:.1f} us against "
            f"{proxy['sum_backward_median_s'] * 1e6:.1f} us; medians of {proxy['reps']} interleaved reps of "
            f"{proxy['inner']} calls; target: at most 2x)"
            + (f" ! noisy: {'; '.join(proxy['noisy'])}" if proxy.get("noisy") else "")
            + (f" (measured {len(proxy['attempts']) + 1} times)" if proxy.get("attempts") else ""))


def _load(v):
    return "/".join(f"{x:.2f}" for x in v) if v else "n/a"


def print_report(result: dict, file=None) -> None:
    """The terminal report: one block per case, the sweeps as tables, the proxy, then the ratios."""
    p = lambda *a: print(*a, file=file)  # noqa: E731
    meas = result["measurements"]
    devices = result["settings"]["devices"]
    checks = result.get("checks", {})
    flags, live = noise_flags(result)
    run = result.get("run", {})
    p("")
    p("=" * 100)
    p(f"blobbench report: {result['machine']['summary']}")
    if run:
        p(f"run {run.get('id')} (revision {run.get('revision')}, started {run.get('started_utc')}); machine load "
          f"(1/5/15 min averages, {run.get('cpus')} CPUs) before {_load(run.get('load_before'))}, after "
          f"{_load(run.get('load_after'))}")
        busy = busy_warning(run, result.get("machine", {}).get("threads") or 0)
        if busy:
            p(busy)
    p(f"fwd+bwd, float32 logits, int32 labels; median of up to {result['settings']['reps']} reps "
      f"[min, max], spread = IQR/median; peak = memory above the inputs during one fwd+bwd "
      f"({result['machine'].get('memory_method', 'method not recorded')})")
    p("=" * 100)
    for case in result["cases"]:
        if case["kind"] not in ("profile", "file"):
            continue
        p(f"\n{case['name']}  {'x'.join(map(str, case['shape']))}  instances per crop {case['blobs']}"
          + (f"  ({case['meta'].get('description') or case['meta'].get('file')})" if case["meta"] else ""))
        chk = checks.get(case["name"])
        if chk:
            if chk.get("status") == "ok":
                for key, c in chk["checks"].items():
                    p(f"  check {key:13s} fused (float32) vs naive loop (float64): loss rel. diff "
                      f"{c['loss_rel_diff']:.1e}, grad max abs diff {c['grad_max_abs_diff']:.1e} "
                      f"(max |grad| {c['grad_max_abs']:.1e})")
            else:
                p(f"  check: {chk.get('status')} {chk.get('error', '')}")
        p(f"  {'implementation':42s} {'device':7s} {'median ms':>10s} {'[min, max] ms':>20s} {'spread':>7s} "
          f"{'peak MB':>9s} {'time/fused':>11s} {'mem/fused':>10s}")
        notes = []
        for device in devices:
            m = _by(meas, case["name"], device)
            # blob Dice and Tversky rows first (ratios against blob.dice), then blob Dice+CE (against
            # blob.dice_ce), then CC-DiceCE (against blob.cc_dice_ce), each under a line that says so
            blocks = ["fused", *_BLOCK_TITLE]
            order = sorted(m, key=lambda i: blocks.index(RATIO_BASE.get(i, "fused")))
            for k, impl in enumerate(order):
                r = m[impl]
                base = RATIO_BASE.get(impl, "fused")
                if base != "fused" and (k == 0 or RATIO_BASE.get(order[k - 1], "fused") != base):
                    p(f"  -- {_BLOCK_TITLE[base]} ({device}): time/fused and mem/fused against {IMPLEMENTATIONS[base]}")
                f = m.get(base)
                noisy = flags.get((case["name"], impl, device))
                if r["status"] == "ok":
                    spread = f"[{r['min_s'] * 1e3:.3g}, {r['max_s'] * 1e3:.3g}]"
                    ri = _rel_iqr(r)
                    rel = "-" if ri is None else f"{ri:.2f}"
                    tr = (f"{r['median_s'] / f['median_s']:.2f}x" if f and f["status"] == "ok" else "-")
                    mr = (f"{r['peak_bytes'] / max(f['peak_bytes'], 1):.2f}x"
                          if f and f["status"] == "ok" else "-")
                else:
                    spread, rel, tr, mr = r.get("error", "")[:20], "-", "-", "-"
                p(f"  {IMPLEMENTATIONS[impl]:42s} {device:7s} {_cell(r, bool(noisy)):>10s} {spread:>20s} {rel:>7s} "
                  f"{_mb(r):>9s} {tr:>11s} {mr:>10s}")
                if noisy:
                    notes.append(f"  ! {impl} {device}: {'; '.join(noisy)}")
                if r.get("attempts"):
                    notes.append(f"    {impl} {device} measured {len(r['attempts']) + 1} times; earlier medians "
                                 + ", ".join(f"{a['median_s'] * 1e3:.3g} ms" for a in r["attempts"] if "median_s" in a))
        for n in notes:
            p(n)
    for kind, label in (("instances", "instances per crop"), ("volume", "volume")):
        cases = [c for c in result["cases"] if c["kind"] == kind]
        if not cases:
            continue
        for device in devices:
            impls = sorted({r["impl"] for r in meas if r["kind"] == kind and r["device"] == device},
                           key=list(IMPLEMENTATIONS).index)
            if not impls:
                continue
            first = cases[0]
            fixed = (f"crop {'x'.join(map(str, first['meta']['crop']))}" if kind == "instances"
                     else f"{first['meta']['instances']} instances")
            p(f"\nsweep over {label} ({fixed}, {device}): median ms / peak MB  (! = noisy)")
            p(f"  {label:>20s} " + " ".join(f"{i:>24s}" for i in impls))
            notes = []
            for c in cases:
                m = _by(meas, c["name"], device)
                cells = []
                for i in impls:
                    noisy = flags.get((c["name"], i, device))
                    cells.append(f"{_cell(m.get(i), bool(noisy)):>11s} / {_mb(m.get(i)):>9s}")
                    if noisy:
                        notes.append(f"  ! {c['name']} {i}: {'; '.join(noisy)}")
                p(f"  {c['name']:>20s} " + " ".join(f"{x:>24s}" for x in cells))
            for n in notes:
                p(n)
    n_flag = len(flags)
    n_again = sum(1 for m in meas if m.get("attempts"))
    if live:
        p(f"\nnoise: {n_again} measurement(s) measured again; {n_flag} still noisy after "
          f"{result['settings'].get('remeasure', 0)} round(s) (threshold IQR/median "
          f"{result['settings'].get('noise_threshold', DEFAULT_THRESHOLD):g}, sweep neighbours "
          f"x{result['settings'].get('outlier_factor', DEFAULT_FACTOR):g}), marked !")
    else:
        p(f"\nnoise: {n_flag} measurement(s) flagged afterwards (IQR/median > {DEFAULT_THRESHOLD:g} or sweep "
          f"neighbours x{DEFAULT_FACTOR:g}), marked !; this run predates re-measurement")
    proxy_line = host_proxy_line(result.get("host_proxy"))
    if proxy_line:
        p("\n" + proxy_line)
    rows = ratios(result)
    ce_rows = ratios(result, "dice_ce")
    if rows:
        p("\nheadline ratios (fused op against the others; speedup = their time / fused time; they depend on "
          "the machine)")
        p(f"  {'case':12s} {'device':7s} {'fused ms':>9s} {'vs naive':>12s} {'vs vectorized':>14s} "
          f"{'fused/MONAI time':>17s} {'fused/MONAI memory':>19s}")
        for r in rows:
            def sp(key, r=r):
                v = r.get(key)
                return "-" if v is None else (f"{v:.1f}x" if isinstance(v, float) else v)
            p(f"  {r['case']:12s} {r['device']:7s} {r['fused_median_s'] * 1e3:9.3g} {sp('speedup_vs_naive'):>12s} "
              f"{sp('speedup_vs_vectorized'):>14s} {r.get('time_over_monai', float('nan')):17.2f} "
              f"{r.get('memory_over_monai', float('nan')):19.2f}")
    if ce_rows:
        p("\nheadline ratios, blob Dice+CE (fused blob.dice_ce against the loop with MONAI DiceCELoss per blob and "
          "plain MONAI DiceCELoss; [interval]: the ratio's range from the repetitions' quartiles, numerator q1 / "
          "denominator q3 to numerator q3 / denominator q1)")
        p(f"  {'case':12s} {'device':7s} {'fused ms':>9s} {'vs naive loop':>22s} {'fused/MONAI time':>22s} "
          f"{'fused/MONAI memory':>19s} {'fused/naive memory':>19s}")
        for r in ce_rows:
            p(f"  {r['case']:12s} {r['device']:7s} {r['fused_median_s'] * 1e3:9.3g} "
              f"{_with_interval(r, 'speedup_vs_naive_dice_ce', 'x'):>22s} {_with_interval(r, 'time_over_monai'):>22s} "
              f"{_f2(r.get('memory_over_monai')):>19s} {_f3(r.get('memory_over_naive')):>19s}")
    cc_rows = ratios(result, "cc_dice_ce")
    if cc_rows:
        p("\nheadline ratios, CC-DiceCE (fused blob.cc_dice_ce against the loop with MONAI DiceCELoss per Voronoi "
          "region, the vectorized index_add reference and plain MONAI DiceCELoss; regions computed beforehand)")
        p(f"  {'case':12s} {'device':7s} {'fused ms':>9s} {'vs naive loop':>22s} {'vs vectorized':>22s} "
          f"{'fused/MONAI time':>22s} {'fused/MONAI memory':>19s}")
        for r in cc_rows:
            p(f"  {r['case']:12s} {r['device']:7s} {r['fused_median_s'] * 1e3:9.3g} "
              f"{_with_interval(r, 'speedup_vs_naive_cc_dice_ce', 'x'):>22s} "
              f"{_with_interval(r, 'speedup_vs_vectorized_cc_dice_ce', 'x'):>22s} "
              f"{_with_interval(r, 'time_over_monai'):>22s} {_f2(r.get('memory_over_monai')):>19s}")
    p("")


def _with_interval(row, key, unit=""):
    """``1.2x [1.1, 1.3]`` of a ratio and its interval, the status for a failed measurement, ``-``."""
    v = row.get(key)
    if v is None or isinstance(v, str):
        return "-" if v is None else v
    lo, hi = row.get(f"{key}_interval", (v, v))
    d = 1 if unit and v >= 10 else 2
    return f"{v:.{d}f}{unit} [{lo:.{d}f}, {hi:.{d}f}]"


def _f3(v):
    return "-" if v is None else f"{v:.3f}"


_STYLE = {"naive": ("tab:red", "o"), "vectorized": ("tab:orange", "s"), "fused": ("tab:blue", "^"),
          "monai_dice": ("tab:gray", "D"), "naive_tversky": ("tab:pink", "o"),
          "fused_tversky": ("tab:cyan", "v"), "naive_dice_ce": ("tab:brown", "o"),
          "fused_dice_ce": ("tab:green", "P"), "monai_dice_ce": ("tab:olive", "X"),
          "naive_cc_dice_ce": ("darkred", "h"), "vectorized_cc_dice_ce": ("gold", "p"),
          "fused_cc_dice_ce": ("tab:purple", "*")}


def _decade_below(values):
    """The base of log-scale bars: the power of ten at or below a tenth of the smallest value, so
    that the shortest bar spans at least a decade (ratios are read on the axis, not as lengths)."""
    v = min(x for x in values if x > 0)
    return 10 ** math.floor(math.log10(v) - 1)


def _impls_drawn(meas, kinds):
    return [i for i in IMPLEMENTATIONS if any(r["impl"] == i for r in meas if r["kind"] in kinds)]


def plot_report(result: dict, outdir) -> list[str]:
    """PNG plots: the sweeps (time with min-max whiskers and peak memory against the swept
    quantity, log-log) and the profiles (time and peak memory per implementation, bars with
    min-max whiskers). Noisy measurements are ringed in red. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    written = []
    meas = result["measurements"]
    machine = result["machine"]["summary"]
    run = result.get("run", {}).get("id")
    footer = machine + (f"; run {run}" if run else "")
    flags, live = noise_flags(result)
    noisy_label = "noisy (stayed noisy after re-measuring)" if live else "noisy (flagged afterwards)"
    devices = result["settings"]["devices"]
    for kind, xlabel, what, fname in (("instances", "instances per crop (N)", "the instance count",
                                       "sweep_instances.png"),
                                      ("volume", "voxels per crop (V)", "the volume", "sweep_volume.png")):
        cases = {c["name"]: c for c in result["cases"] if c["kind"] == kind}
        if not cases:
            continue
        first = next(iter(cases.values()))
        fixed = (f"fixed crop {'x'.join(map(str, first['meta']['crop']))}" if kind == "instances"
                 else f"fixed {first['meta']['instances']} instances per crop")
        fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
        any_noisy = False
        for ax, key, ylabel in ((axes[0], "median_s", "forward + backward time [ms], median, whiskers min-max"),
                                (axes[1], "peak_bytes", "peak memory above the inputs [MB]")):
            scale = 1e3 if key == "median_s" else 1 / 2**20
            for impl in IMPLEMENTATIONS:
                for device in devices:
                    rs = [r for r in meas if r["kind"] == kind and r["impl"] == impl and r["device"] == device]
                    if not rs:
                        continue
                    color, marker = _STYLE[impl]
                    ok = sorted((cases[r["case"]]["sweep_x"], r) for r in rs
                                if r["status"] == "ok" and r.get(key, 0) > 0)
                    ls = "-" if device == "cpu" else "--"
                    label = f"{IMPLEMENTATIONS[impl]} ({device})"
                    if ok:
                        xs = [x for x, _ in ok]
                        ys = [r[key] * scale for _, r in ok]
                        if key == "median_s":
                            lo = [max(y - r["min_s"] * scale, 0) for y, (_, r) in zip(ys, ok)]
                            hi = [max(r["max_s"] * scale - y, 0) for y, (_, r) in zip(ys, ok)]
                            ax.errorbar(xs, ys, yerr=[lo, hi], fmt=ls, color=color, marker=marker, capsize=3,
                                        label=label)
                        else:
                            ax.plot(xs, ys, ls, color=color, marker=marker, label=label)
                        bad = [(x, y) for x, y, (_, r) in zip(xs, ys, ok)
                               if key == "median_s" and flags.get((r["case"], impl, device))]
                        if bad:
                            any_noisy = True
                            ax.plot(*zip(*bad), "o", ms=13, mfc="none", mec="red", mew=1.8)
                    for r in rs:
                        if key == "peak_bytes" and r["status"] == "ok" and r.get(key, 1) <= 0:
                            ax.annotate("0 MB", (cases[r["case"]]["sweep_x"], 0.01), xycoords=("data", "axes fraction"),
                                        ha="center", va="bottom", fontsize=7, color=color)
                        if r["status"] != "ok":
                            x = cases[r["case"]]["sweep_x"]
                            ax.axvline(x, color=color, alpha=0.25, lw=6)
                            ax.annotate(r["status"], (x, 0.97), xycoords=("data", "axes fraction"), rotation=90,
                                        va="top", ha="center", fontsize=8, color=color)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel + " (log)")
            ax.grid(True, which="both", alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        if any_noisy:
            handles.append(Line2D([], [], ls="", marker="o", ms=11, mfc="none", mec="red", mew=1.8))
            labels.append(noisy_label)
        axes[0].legend(handles, labels, fontsize=8, loc="upper left")
        fig.suptitle(f"Forward + backward time and peak memory against {what} ({fixed}), per implementation\n"
                     f"{footer}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(str(outdir), fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    cases = [c for c in result["cases"] if c["kind"] in ("profile", "file")]
    if cases:
        impls = _impls_drawn(meas, ("profile", "file"))
        combos = [(i, d) for i in impls for d in devices
                  if any(r["impl"] == i and r["device"] == d for r in meas if r["kind"] in ("profile", "file"))]
        fig, axes = plt.subplots(2, 1, figsize=(max(9, 1.9 * len(cases) + 3), 10), sharex=True)
        width = 0.8 / max(len(combos), 1)
        any_noisy = False
        for ax, key, ylabel in ((axes[0], "median_s", "forward + backward time [ms]"),
                                (axes[1], "peak_bytes", "peak memory above the inputs [MB]")):
            scale = 1e3 if key == "median_s" else 1 / 2**20
            vals = [r[key] * scale for r in meas if r["kind"] in ("profile", "file") and r["status"] == "ok"
                    and r.get(key, 0) > 0]
            if key == "median_s":
                vals += [r["min_s"] * scale for r in meas if r["kind"] in ("profile", "file") and r["status"] == "ok"]
            base = _decade_below(vals) if vals else 1.0
            for j, (impl, device) in enumerate(combos):
                for ci, c in enumerate(cases):
                    r = _by(meas, c["name"], device).get(impl)
                    x = ci + (j - (len(combos) - 1) / 2) * width
                    color = _STYLE[impl][0]
                    if r and r["status"] == "ok" and r.get(key, 0) > 0:
                        y = r[key] * scale
                        kw = {}
                        if key == "median_s":
                            kw = dict(yerr=[[y - r["min_s"] * scale], [r["max_s"] * scale - y]], capsize=2,
                                      error_kw={"elinewidth": 1})
                        ax.bar(x, y - base, width, bottom=base, color=color, alpha=1.0 if device == "cpu" else 0.55,
                               hatch=None if device == "cpu" else "//", **kw,
                               label=f"{IMPLEMENTATIONS[impl]} ({device})" if ci == 0 and key == "median_s" else None)
                        top = r["max_s"] * scale if key == "median_s" else y
                        ax.annotate(f"{y:.3g}" if y < 100 else f"{y:.0f}", (x, top), xytext=(0, 3),
                                    textcoords="offset points", ha="center", va="bottom", fontsize=7, rotation=90)
                        if flags.get((c["name"], impl, device)) and key == "median_s":
                            any_noisy = True
                            ax.plot(x, y, "o", ms=11, mfc="none", mec="red", mew=1.8)
                    elif r:
                        ax.annotate(r["status"], (x, 0.02), xycoords=("data", "axes fraction"), rotation=90,
                                    fontsize=7, ha="center", va="bottom", color=color)
            ax.set_yscale("log")
            ax.set_ylim(base, max(vals) * 8 if vals else 10)
            ax.set_ylabel(f"{ylabel}\n(log scale; bars start at {base:g})")
            ax.grid(True, axis="y", which="both", alpha=0.3)
        axes[1].set_xticks(range(len(cases)))
        axes[1].set_xticklabels(
            [f"{c['name']}\n{'x'.join(map(str, c['shape']))}\n~{round(sum(c['blobs']) / max(len(c['blobs']), 1))} "
             f"inst./crop" for c in cases], fontsize=8)
        handles, labels = axes[0].get_legend_handles_labels()
        if any_noisy:
            handles.append(Line2D([], [], ls="", marker="o", ms=11, mfc="none", mec="red", mew=1.8))
            labels.append(noisy_label)
        fig.legend(handles, labels, fontsize=8, ncol=3, loc="lower center")
        names = ", ".join(IMPLEMENTATIONS[i] for i in impls)
        fig.suptitle(f"Forward + backward time (median, whiskers min-max) and peak memory per case\n"
                     f"{names}\n{footer}", fontsize=9)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        path = os.path.join(str(outdir), "profiles.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------- README blocks

_BEGIN = "<!-- blobbench report {run} -->"
_END = "<!-- /blobbench report -->"


def _x(v, digits=0):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.{digits}f}x"


def _f2(v):
    return "-" if v is None else f"{v:.2f}"


def readme_block(result: dict, run_dir) -> str:
    """The README's text for one committed run, generated from its result.json (never by hand):
    the machine, the headline ratios with their dependence on the machine said, the figures."""
    run_dir = os.path.normpath(str(run_dir))
    m = result["machine"]
    run = result.get("run", {})
    s = result["settings"]
    when = run.get("started_utc", "")[:10]
    flags, _ = noise_flags(result)
    lines = [
        f"Machine: **{m['summary']}**; run `{run.get('id', os.path.basename(run_dir))}`"
        + (f" ({when})" if when else "") + f", {len(s.get('profiles', []))} profiles of "
        f"{s.get('batch') or 'the paper'} crops, medians of up to {s['reps']} repetitions. Generated by "
        f"`blobbench report {run_dir} --readme README.md` from "
        f"[`result.json`]({run_dir}/result.json); full table in [`report.txt`]({run_dir}/report.txt).",
        "",
        "These ratios are this machine's and this run's: they change with the CPU or GPU, the core count, the "
        "torch and MONAI versions and the load of the machine, so expect other numbers on yours. Compare runs "
        "of one machine with `blobbench compare`.",
        "",
        "| case | device | instances/crop | fused ms [min-max] | vs naive loop | vs vectorized | fused / MONAI "
        "DiceLoss time | fused / MONAI peak memory |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    cases = {c["name"]: c for c in result["cases"]}
    for r in ratios(result):
        f = _by(result["measurements"], r["case"], r["device"])["fused"]
        c = cases[r["case"]]
        blobs = sorted(set(c["blobs"]))
        inst = f"{blobs[0]}" if len(blobs) == 1 else f"{blobs[0]}-{blobs[-1]}"
        noisy = " (noisy)" if flags.get((r["case"], "fused", r["device"])) else ""
        lines.append(
            f"| {r['case']} {'x'.join(map(str, c['shape']))} | {r['device']} | {inst} | "
            f"{r['fused_median_s'] * 1e3:.3g} [{f['min_s'] * 1e3:.3g}-{f['max_s'] * 1e3:.3g}]{noisy} | "
            f"{_x(r.get('speedup_vs_naive'))} | {_x(r.get('speedup_vs_vectorized'), 1)} | "
            f"{_f2(r.get('time_over_monai'))} | {_f2(r.get('memory_over_monai'))} |")
    ce_rows = ratios(result, "dice_ce")
    if ce_rows:
        lines += [
            "",
            "Blob Dice+CE (`blob_dice_ce`) against the paper's loop with MONAI DiceCELoss per blob and plain MONAI "
            "DiceCELoss; [interval] from the repetitions' quartiles:",
            "",
            "| case | device | fused ms [min-max] | vs naive loop | fused / MONAI DiceCELoss time | fused / MONAI "
            "peak memory | fused / naive peak memory |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in ce_rows:
            f = _by(result["measurements"], r["case"], r["device"])["fused_dice_ce"]
            noisy = " (noisy)" if flags.get((r["case"], "fused_dice_ce", r["device"])) else ""
            lines.append(
                f"| {r['case']} {'x'.join(map(str, cases[r['case']]['shape']))} | {r['device']} | "
                f"{r['fused_median_s'] * 1e3:.3g} [{f['min_s'] * 1e3:.3g}-{f['max_s'] * 1e3:.3g}]{noisy} | "
                f"{_with_interval(r, 'speedup_vs_naive_dice_ce', 'x')} | {_with_interval(r, 'time_over_monai')} | "
                f"{_f2(r.get('memory_over_monai'))} | {_f3(r.get('memory_over_naive'))} |")
    cc_rows = ratios(result, "cc_dice_ce")
    if cc_rows:
        lines += [
            "",
            "CC-DiceCE (`cc_dice_ce`, Voronoi regions computed beforehand, as a data pipeline does) against the loop "
            "with MONAI DiceCELoss per region, the vectorized (index_add) CC reference and plain MONAI DiceCELoss; "
            "[interval] from the repetitions' quartiles; memory ratios from the allocator's peak bytes (the "
            "regions' computation in the measuring process hides the loss in the process's peak RSS):",
            "",
            "| case | device | fused ms [min-max] | vs naive loop | vs vectorized | fused / MONAI DiceCELoss time | "
            "fused / MONAI peak memory | fused / naive peak memory |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in cc_rows:
            f = _by(result["measurements"], r["case"], r["device"])["fused_cc_dice_ce"]
            noisy = " (noisy)" if flags.get((r["case"], "fused_cc_dice_ce", r["device"])) else ""
            lines.append(
                f"| {r['case']} {'x'.join(map(str, cases[r['case']]['shape']))} | {r['device']} | "
                f"{r['fused_median_s'] * 1e3:.3g} [{f['min_s'] * 1e3:.3g}-{f['max_s'] * 1e3:.3g}]{noisy} | "
                f"{_with_interval(r, 'speedup_vs_naive_cc_dice_ce', 'x')} | "
                f"{_with_interval(r, 'speedup_vs_vectorized_cc_dice_ce', 'x')} | {_with_interval(r, 'time_over_monai')} | "
                f"{_f2(r.get('memory_over_monai'))} | {_f3(r.get('memory_over_naive'))} |")
    proxy = host_proxy_line(result.get("host_proxy"))
    if proxy:
        lines += ["", proxy[0].upper() + proxy[1:] + "."]
    busy = busy_warning(run, result.get("machine", {}).get("threads") or 0)
    if busy:
        lines += ["", busy + "."]
    lines += ["", f"{len(flags)} measurement(s) of this run are flagged noisy (marked in `report.txt` and ringed in "
                  "the plots)." if flags else "No measurement of this run is flagged noisy."]
    figs = [f for f in ("profiles.png", "sweep_instances.png", "sweep_volume.png")
            if os.path.exists(os.path.join(run_dir, f))]
    if figs:
        lines.append("")
        for f in figs:
            lines.append(f"![{f[:-4].replace('_', ' ')}]({run_dir}/{f})")
    return "\n".join(lines) + "\n"


def update_readme(readme, result: dict, run_dir, write: bool = True) -> bool:
    """Replace the block between ``<!-- blobbench report RUN_DIR -->`` and the next
    ``<!-- /blobbench report -->`` in ``readme`` by :func:`readme_block`. Returns whether the text
    changed (written only when ``write``). Raises ValueError when the markers are missing."""
    run_dir = os.path.normpath(str(run_dir))
    with open(readme) as fh:
        text = fh.read()
    begin = _BEGIN.format(run=run_dir)
    pat = re.compile(re.escape(begin) + r"\n(.*?)" + re.escape(_END), re.S)
    mt = pat.search(text)
    if not mt:
        raise ValueError(f"{readme}: no block '{begin}' ... '{_END}'")
    new = text[:mt.start(1)] + readme_block(result, run_dir) + text[mt.end(1):]
    if new != text and write:
        with open(readme, "w") as fh:
            fh.write(new)
    return new != text

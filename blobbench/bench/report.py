"""Tables, ratios and plots of a ``blobbench`` run (its JSON result)."""
from __future__ import annotations

from .bench import IMPLEMENTATIONS

__all__ = ["ratios", "print_report", "plot_report"]


def _by(results, case, device):
    return {r["impl"]: r for r in results if r["case"] == case and r["device"] == device}


def ratios(result: dict) -> list[dict]:
    """Headline ratios per (profile or file case, device): the fused op against the others.

    ``speedup_vs_X`` = median time of X / median time of fused (> 1: fused is faster);
    ``time_over_monai`` / ``memory_over_monai`` = fused / MONAI DiceLoss (< 1: fused is cheaper).
    """
    out = []
    for case in result["cases"]:
        if case["kind"] not in ("profile", "file"):
            continue
        for device in result["settings"]["devices"]:
            m = _by(result["measurements"], case["name"], device)
            f = m.get("fused")
            if not f or f["status"] != "ok":
                continue
            row = {"case": case["name"], "device": device, "fused_median_s": f["median_s"]}
            for other in ("naive", "vectorized", "monai_dice"):
                o = m.get(other)
                if o is None:
                    continue
                row[f"speedup_vs_{other}"] = o["median_s"] / f["median_s"] if o["status"] == "ok" else o["status"]
            mo = m.get("monai_dice")
            if mo and mo["status"] == "ok":
                row["time_over_monai"] = f["median_s"] / mo["median_s"]
                row["memory_over_monai"] = f["peak_bytes"] / max(mo["peak_bytes"], 1)
            out.append(row)
    return out


def _cell(r):
    if r is None:
        return "-"
    if r["status"] != "ok":
        return {"over budget": "over budget", "out of memory": "out of mem."}.get(r["status"], r["status"])
    ms = r["median_s"] * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


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
            f"{proxy['inner']} calls)")


def print_report(result: dict, file=None) -> None:
    """The terminal report: one block per case, the sweeps as tables, then the ratios."""
    p = lambda *a: print(*a, file=file)  # noqa: E731
    meas = result["measurements"]
    devices = result["settings"]["devices"]
    checks = result.get("checks", {})
    p("")
    p("=" * 100)
    p(f"blobbench report: {result['machine']['summary']}")
    p(f"fwd+bwd, float32 logits, int32 labels; median of up to {result['settings']['reps']} reps "
      f"[min, max]; peak = memory above the inputs during one fwd+bwd ({result['machine']['memory_method']})")
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
        p(f"  {'implementation':42s} {'device':6s} {'median ms':>10s} {'[min, max] ms':>20s} "
          f"{'peak MB':>9s} {'time/fused':>11s} {'mem/fused':>10s}")
        for device in devices:
            m = _by(meas, case["name"], device)
            f = m.get("fused")
            for impl, r in m.items():
                if r["status"] == "ok":
                    spread = f"[{r['min_s'] * 1e3:.3g}, {r['max_s'] * 1e3:.3g}]"
                    tr = (f"{r['median_s'] / f['median_s']:.2f}x" if f and f["status"] == "ok" else "-")
                    mr = (f"{r['peak_bytes'] / max(f['peak_bytes'], 1):.2f}x"
                          if f and f["status"] == "ok" else "-")
                else:
                    spread, tr, mr = r.get("error", "")[:20], "-", "-"
                p(f"  {IMPLEMENTATIONS[impl]:42s} {device:6s} {_cell(r):>10s} {spread:>20s} "
                  f"{_mb(r):>9s} {tr:>11s} {mr:>10s}")
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
            p(f"\nsweep over {label} ({fixed}, {device}): median ms / peak MB")
            p(f"  {label:>20s} " + " ".join(f"{i:>24s}" for i in impls))
            for c in cases:
                m = _by(meas, c["name"], device)
                cells = [f"{_cell(m.get(i)):>11s} / {_mb(m.get(i)):>9s}" for i in impls]
                p(f"  {c['name']:>20s} " + " ".join(f"{x:>24s}" for x in cells))
    proxy_line = host_proxy_line(result.get("host_proxy"))
    if proxy_line:
        p("\n" + proxy_line)
    rows = ratios(result)
    if rows:
        p("\nheadline ratios (fused op against the others; speedup = their time / fused time)")
        p(f"  {'case':12s} {'device':6s} {'fused ms':>9s} {'vs naive':>12s} {'vs vectorized':>14s} "
          f"{'fused/MONAI time':>17s} {'fused/MONAI memory':>19s}")
        for r in rows:
            def sp(key):
                v = r.get(key)
                return "-" if v is None else (f"{v:.1f}x" if isinstance(v, float) else v)
            p(f"  {r['case']:12s} {r['device']:6s} {r['fused_median_s'] * 1e3:9.3g} {sp('speedup_vs_naive'):>12s} "
              f"{sp('speedup_vs_vectorized'):>14s} {r.get('time_over_monai', float('nan')):17.2f} "
              f"{r.get('memory_over_monai', float('nan')):19.2f}")
    p("")


_STYLE = {"naive": ("tab:red", "o"), "vectorized": ("tab:orange", "s"), "fused": ("tab:blue", "^"),
          "monai_dice": ("tab:gray", "D"), "naive_tversky": ("tab:pink", "o"),
          "fused_tversky": ("tab:cyan", "v")}


def plot_report(result: dict, outdir) -> list[str]:
    """PNG plots of the sweeps (time and peak memory against the swept quantity, log-log) and of
    the profiles (time per implementation). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    meas = result["measurements"]
    machine = result["machine"]["summary"]
    for kind, xlabel, fname in (("instances", "instances per crop (N)", "sweep_instances.png"),
                                ("volume", "voxels per crop (V)", "sweep_volume.png")):
        cases = {c["name"]: c for c in result["cases"] if c["kind"] == kind}
        if not cases:
            continue
        first = next(iter(cases.values()))
        fixed = (f"fixed crop {'x'.join(map(str, first['meta']['crop']))}" if kind == "instances"
                 else f"fixed {first['meta']['instances']} instances per crop")
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for ax, key, ylabel in ((axes[0], "median_s", "forward + backward time [ms]"),
                                (axes[1], "peak_bytes", "peak memory above inputs [MB]")):
            scale = 1e3 if key == "median_s" else 1 / 2**20
            for impl in IMPLEMENTATIONS:
                for device in result["settings"]["devices"]:
                    rs = [r for r in meas if r["kind"] == kind and r["impl"] == impl and r["device"] == device]
                    if not rs:
                        continue
                    color, marker = _STYLE[impl]
                    ok = [(cases[r["case"]]["sweep_x"], r[key] * scale) for r in rs
                          if r["status"] == "ok" and r.get(key, 0) > 0]
                    ls = "-" if device == "cpu" else "--"
                    label = f"{IMPLEMENTATIONS[impl]} ({device})"
                    if ok:
                        xs, ys = zip(*sorted(ok))
                        ax.plot(xs, ys, ls, color=color, marker=marker, label=label)
                    failed = [(cases[r["case"]]["sweep_x"], r["status"]) for r in rs if r["status"] != "ok"]
                    for x, status in failed:
                        ax.axvline(x, color=color, alpha=0.25, lw=6)
                        ax.annotate(status, (x, 0.97), xycoords=("data", "axes fraction"), rotation=90,
                                    va="top", ha="center", fontsize=8, color=color)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8, loc="upper left")
        fig.suptitle(f"blob Dice, fwd+bwd, {fixed}: time and memory against {xlabel.split(' (')[0]}\n{machine}",
                     fontsize=10)
        fig.tight_layout()
        path = f"{outdir}/{fname}"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    cases = [c for c in result["cases"] if c["kind"] in ("profile", "file")]
    if cases:
        impls = [i for i in IMPLEMENTATIONS if any(r["impl"] == i for r in meas if r["kind"] in ("profile", "file"))]
        combos = [(i, d) for i in impls for d in result["settings"]["devices"]
                  if any(r["impl"] == i and r["device"] == d for r in meas)]
        fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cases) + 3), 5.8))
        width = 0.8 / max(len(combos), 1)
        for j, (impl, device) in enumerate(combos):
            for ci, c in enumerate(cases):
                r = _by(meas, c["name"], device).get(impl)
                x = ci + (j - (len(combos) - 1) / 2) * width
                color = _STYLE[impl][0]
                if r and r["status"] == "ok":
                    ax.bar(x, r["median_s"] * 1e3, width, color=color, alpha=1.0 if device == "cpu" else 0.55,
                           hatch=None if device == "cpu" else "//",
                           label=f"{IMPLEMENTATIONS[impl]} ({device})" if ci == 0 else None)
                elif r:
                    ax.annotate(r["status"], (x, 0.02), xycoords=("data", "axes fraction"), rotation=90,
                                fontsize=7, ha="center", color=color)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{c['name']}\n{'x'.join(map(str, c['shape']))}\n~{round(sum(c['blobs']) / max(len(c['blobs']), 1))} inst./crop"
                            for c in cases], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("forward + backward time [ms] (log)")
        ax.set_title(f"blob Dice per dataset profile (synthetic, paper-shaped)\n{machine}", fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        fig.legend(fontsize=8, ncol=3, loc="lower center")
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        path = f"{outdir}/profiles.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written

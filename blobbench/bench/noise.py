"""Noise you can see: the spread of each measurement, outliers in the sweeps, re-measurement.

A measurement is *noisy* when

- its spread, the interquartile range of its repetitions over their median (``rel_iqr``), passes
  ``threshold`` (needs at least 3 repetitions), or
- it is an interior point of a sweep (instances or volume, same implementation and device) whose
  median lies outside ``[min(neighbours) / factor, max(neighbours) * factor]``: a spike (another
  process) or a dip that the smooth O(N·V) / O(V) curves cannot produce, or
- its median is ``factor`` off what the same implementation took when it was measured again
  *interleaved* with the other implementations of its case (one process, repetitions alternating:
  ``reference``), after the case's common drift is taken out (the median over its implementations
  of measured / interleaved): a whole measurement that was slow in every repetition (another
  process for its whole duration), which no spread shows.

:func:`remeasure_noisy` measures the noisy ones again (up to ``retries`` times, each a fresh
process) and keeps the attempt with the lowest median (interference from other processes only
ever adds time), the other attempts recorded under ``"attempts"``. Those still noisy after the
last retry carry their reasons under ``"noisy"`` (an empty list: not noisy), which the table, the
JSON and the plots show.
"""
from __future__ import annotations

import os
import statistics

__all__ = ["DEFAULT_THRESHOLD", "DEFAULT_FACTOR", "summarize_times", "load", "noise_reasons", "interleaved_reasons",
           "remeasure_noisy", "remeasure_proxy", "busy_warning"]

DEFAULT_THRESHOLD = 0.25   # IQR / median
DEFAULT_FACTOR = 1.5       # sweep neighbours


def summarize_times(times) -> dict:
    """Median, extremes, quartiles and ``rel_iqr`` (None below 3 repetitions) of repetition times."""
    times = list(times)
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"reps": len(times), "median_s": med, "min_s": min(times), "max_s": max(times), "q1_s": q[0],
            "q3_s": q[2], "rel_iqr": (q[2] - q[0]) / med if len(times) >= 3 and med > 0 else None}


def load() -> list[float] | None:
    """The machine's load averages (1, 5, 15 minutes), None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _spread_reason(m, threshold):
    r = m.get("rel_iqr")
    if m.get("status") == "ok" and r is not None and r > threshold:
        return f"spread IQR/median {r:.2f} > {threshold:g}"
    return None


def interleaved_reasons(measurements: list[dict], reference: dict, factor: float = DEFAULT_FACTOR
                        ) -> dict[int, list[str]]:
    """Index -> reason, for the measurements whose median is ``factor`` off their interleaved
    re-measurement ``reference[(case, impl, device)]`` (a median in seconds), relative to the
    case's drift (the median, over the case's implementations, of measured / interleaved)."""
    out: dict[int, list[str]] = {}
    by_case: dict[tuple, list[tuple[int, float]]] = {}
    for i, m in enumerate(measurements):
        ref = reference.get((m["case"], m["impl"], m["device"]))
        if m.get("status") == "ok" and ref:
            by_case.setdefault((m["case"], m["device"]), []).append((i, m["median_s"] / ref))
    for items in by_case.values():
        if len(items) < 2:
            continue
        drift = statistics.median(r for _, r in items)
        for i, r in items:
            if r > drift * factor or r < drift / factor:
                m = measurements[i]
                ref = reference[(m["case"], m["impl"], m["device"])]
                out[i] = [f"median {m['median_s'] * 1e3:.3g} ms is x{r / drift:.2f} what it took interleaved with the "
                          f"case's other implementations ({ref * 1e3:.3g} ms, case drift x{drift:.2f})"]
    return out


def noise_reasons(measurements: list[dict], cases: list[dict], threshold: float = DEFAULT_THRESHOLD,
                  factor: float = DEFAULT_FACTOR, reference: dict | None = None) -> dict[int, list[str]]:
    """Index in ``measurements`` -> why it is noisy, for the noisy ones (see the module doc);
    ``reference``: the interleaved re-measurements, see :func:`interleaved_reasons`."""
    out: dict[int, list[str]] = {}
    for i, reasons in interleaved_reasons(measurements, reference or {}, factor).items():
        out.setdefault(i, []).extend(reasons)
    for i, m in enumerate(measurements):
        reason = _spread_reason(m, threshold)
        if reason:
            out.setdefault(i, []).append(reason)
    sweep_x = {c["name"]: c["sweep_x"] for c in cases if c["kind"] in ("instances", "volume")}
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(measurements):
        if m["case"] in sweep_x and m.get("status") == "ok":
            groups.setdefault((m["kind"], m["impl"], m["device"]), []).append(i)
    for idx in groups.values():
        idx.sort(key=lambda i: sweep_x[measurements[i]["case"]])
        for a, i, b in zip(idx, idx[1:], idx[2:]):
            lo = min(measurements[a]["median_s"], measurements[b]["median_s"])
            hi = max(measurements[a]["median_s"], measurements[b]["median_s"])
            t = measurements[i]["median_s"]
            if t > hi * factor or t < lo / factor:
                out.setdefault(i, []).append(
                    f"median {t * 1e3:.3g} ms outside its sweep neighbours' {lo * 1e3:.3g}-{hi * 1e3:.3g} ms "
                    f"(x{factor:g})")
    return out


def _attempt(m: dict, reasons) -> dict:
    keys = ("status", "median_s", "min_s", "max_s", "rel_iqr", "reps", "peak_bytes", "load")
    return {k: m[k] for k in keys if k in m} | {"reasons": list(reasons)}


def remeasure_noisy(measurements: list[dict], cases: list[dict], measure, *, threshold: float = DEFAULT_THRESHOLD,
                    factor: float = DEFAULT_FACTOR, retries: int = 2, progress=None,
                    reference: dict | None = None) -> list[dict]:
    """Measure the noisy measurements again, up to ``retries`` rounds; flag those that stay noisy.

    ``measure(case_name, impl, device) -> measurement dict``. Returns the new list (same order);
    every measurement gets ``"noisy"`` (list of reasons, empty when clean) and, when re-measured,
    ``"attempts"`` (the attempts not kept, each with why it was measured again or set aside).
    """
    ms = [dict(m) for m in measurements]
    for _ in range(retries):
        flagged = noise_reasons(ms, cases, threshold, factor, reference)
        if not flagged:
            break
        for i, reasons in flagged.items():
            old = ms[i]
            if progress:
                progress(old, reasons)
            new = dict(measure(old["case"], old["impl"], old["device"]))
            history = old.pop("attempts", [])
            status = new.get("status")
            if status == "ok":      # the faster of the two: interference only adds time
                keep, other = (new, old) if new["median_s"] < old["median_s"] else (old, new)
            elif status in ("over budget", "out of memory"):
                keep, other = old, new
            else:                   # an error on re-measurement is reported, never hidden behind the old value
                keep, other = new, old
            other_reasons = reasons if other is old else [f"re-measured ({status})"]
            keep["attempts"] = history + [_attempt(other, other_reasons)]
            ms[i] = keep
    final = noise_reasons(ms, cases, threshold, factor, reference)
    for i, m in enumerate(ms):
        m["noisy"] = final.get(i, [])
    return ms


def remeasure_proxy(measure, *, threshold: float = DEFAULT_THRESHOLD, retries: int = 2, progress=None) -> dict:
    """The host cost proxy (``measure() -> dict`` with ``ratio`` and ``rel_iqr``), measured again
    while its spread passes ``threshold`` (up to ``retries`` times). Kept: the steadiest attempt
    (lowest ``rel_iqr``: interference moves a ratio either way), the others under ``"attempts"``;
    ``"noisy"`` lists why it is still noisy (empty: not)."""
    proxy = dict(measure())
    attempts = []
    for _ in range(retries):
        if proxy.get("status") != "ok" or proxy["rel_iqr"] <= threshold:
            break
        if progress:
            progress({"case": "host cost proxy", "impl": "fused", "device": "cpu"},
                     [f"spread IQR/median {proxy['rel_iqr']:.2f} > {threshold:g}"])
        new = dict(measure())
        if new.get("status") != "ok":   # an error is reported, never hidden behind the old value
            attempts.append(_proxy_attempt(proxy))
            proxy = new
            break
        keep, other = (new, proxy) if new["rel_iqr"] < proxy["rel_iqr"] else (proxy, new)
        attempts.append(_proxy_attempt(other))
        proxy = keep
    if attempts:
        proxy["attempts"] = attempts
    if proxy.get("status") == "ok":
        proxy["noisy"] = ([f"spread IQR/median {proxy['rel_iqr']:.2f} > {threshold:g}"]
                          if proxy["rel_iqr"] > threshold else [])
    return proxy


def _proxy_attempt(p: dict) -> dict:
    return {k: p[k] for k in ("status", "ratio", "rel_iqr", "ratio_q1", "ratio_q3") if k in p}


def busy_warning(run: dict, own_threads: int = 0) -> str:
    """A warning when other work competed for the CPUs, else ''.

    Other work means a 1-minute load over half the CPUs before the run, or after it once the
    run's own ``own_threads`` (its benchmark threads, which load the machine for the whole run)
    are taken off: without that every run of a small machine would call the machine busy.
    """
    cpus = run.get("cpus") or 0
    before = (run.get("load_before") or [None])[0]
    after = (run.get("load_after") or [None])[0]
    others = [v for v in (before, None if after is None else after - min(own_threads, cpus)) if v is not None]
    if cpus and others and max(others) > 0.5 * cpus:
        return (f"WARNING: the machine was busy (1-minute load of other work up to {max(others):.2f} on {cpus} "
                f"CPUs): it competed for the CPUs, so timings are slower and noisier than the code's own")
    return ""

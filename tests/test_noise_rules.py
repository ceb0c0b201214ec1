"""Issue 23: the noise rules at their edges (noise.py): the spread, the sweep neighbours, the
interleaved reference, what re-measurement keeps and records, the host proxy's retries, the
busy-machine warning. Expected values by hand from the rules in noise.py's module doc (quartiles by
the definition of statistics.quantiles' default "exclusive" method: the p-quantile at position
p * (n + 1)). No timing, no benchmark runs."""
import pytest

from blobbench.bench import noise
from blobbench.bench.noise import (busy_warning, interleaved_reasons, noise_reasons, remeasure_noisy, remeasure_proxy,
                                   summarize_times)


# ----------------------------------------------------------------------------- spread

def test_summarize_times_by_hand():
    # 5 values: q1 at position 1.5 (1 + 0.5 * (2 - 1)), q3 at 4.5 (4 + 0.5 * (100 - 4))
    s = summarize_times([3.0, 100.0, 1.0, 4.0, 2.0])
    assert s == {"reps": 5, "median_s": 3.0, "min_s": 1.0, "max_s": 100.0, "q1_s": 1.5, "q3_s": 52.0,
                 "rel_iqr": pytest.approx((52.0 - 1.5) / 3.0)}
    # 3 values: the quartiles at positions 1 and 3, the extremes
    assert summarize_times([2.0, 1.0, 3.0]) == {"reps": 3, "median_s": 2.0, "min_s": 1.0, "max_s": 3.0,
                                                "q1_s": 1.0, "q3_s": 3.0, "rel_iqr": 1.0}
    # 2 values: quartiles at positions 0.75 and 2.25 (extrapolated on the line through the two), no
    # spread reported
    s = summarize_times(iter([1.0, 2.0]))
    assert (s["reps"], s["median_s"], s["q1_s"], s["q3_s"], s["rel_iqr"]) == (2, 1.5, 0.75, 2.25, None)
    # 1 value: every statistic is that value
    assert summarize_times([0.5]) == {"reps": 1, "median_s": 0.5, "min_s": 0.5, "max_s": 0.5, "q1_s": 0.5,
                                      "q3_s": 0.5, "rel_iqr": None}
    # a zero median: no relative spread
    assert summarize_times([0.0, 0.0, 0.0])["rel_iqr"] is None


def test_load(monkeypatch):
    monkeypatch.setattr(noise.os, "getloadavg", lambda: (1.234, 0.5, 3.0))
    assert noise.load() == [1.23, 0.5, 3.0]

    def fail():
        raise OSError("no load average here")

    monkeypatch.setattr(noise.os, "getloadavg", fail)
    assert noise.load() is None
    monkeypatch.delattr(noise.os, "getloadavg")
    assert noise.load() is None


def _m(case, median, impl="fused", device="cpu", kind="instances", rel_iqr=0.0, status="ok", **extra):
    return {"case": case, "kind": kind, "impl": impl, "device": device, "status": status, "median_s": median,
            "rel_iqr": rel_iqr} | extra


def test_spread_at_the_threshold_is_not_noisy():
    cases = []
    ms = [_m("a", 1.0, kind="profile", rel_iqr=0.25), _m("b", 1.0, kind="profile", rel_iqr=0.2501),
          _m("c", 1.0, kind="profile", rel_iqr=None), _m("d", 1.0, kind="profile", rel_iqr=9.0, status="error")]
    assert noise_reasons(ms, cases) == {1: ["spread IQR/median 0.25 > 0.25"]}
    assert noise_reasons(ms, cases, threshold=0.1) == {0: ["spread IQR/median 0.25 > 0.1"],
                                                       1: ["spread IQR/median 0.25 > 0.1"]}


# ----------------------------------------------------------------------------- sweep neighbours

def _sweep_cases(xs, kind="instances"):
    return [{"name": f"N={x}", "kind": kind, "sweep_x": x} for x in xs]


def test_sweep_neighbours_at_the_factor():
    cases = _sweep_cases([1, 4, 16])
    # neighbours 1.5 s and 2 s: the middle one may lie in [1.5 / 1.5, 2 * 1.5] = [1, 3]
    for mid, flagged in ((3.0, False), (3.0001, True), (1.0, False), (0.9999, True), (2.0, False)):
        ms = [_m("N=1", 1.5), _m("N=4", mid), _m("N=16", 2.0)]
        assert bool(noise_reasons(ms, cases)) == flagged, mid
    ms = [_m("N=1", 1.5), _m("N=4", 3.5), _m("N=16", 2.0)]
    assert noise_reasons(ms, cases) == {1: ["median 3.5e+03 ms outside its sweep neighbours' 1.5e+03-2e+03 ms (x1.5)"]}
    # the neighbours in either order; the caller's factor
    ms = [_m("N=1", 2.0), _m("N=4", 1.2), _m("N=16", 1.5)]          # over 1.5 / 1.5, under 1.5 / 1.2
    assert noise_reasons(ms, cases) == {}
    assert noise_reasons(ms, cases, factor=1.2) == {
        1: ["median 1.2e+03 ms outside its sweep neighbours' 1.5e+03-2e+03 ms (x1.2)"]}
    # three significant digits of each median in ms
    ms = [_m("N=1", 1e-3), _m("N=4", 5e-3), _m("N=16", 1.2349e-3)]
    assert noise_reasons(ms, cases) == {1: ["median 5 ms outside its sweep neighbours' 1-1.23 ms (x1.5)"]}
    ms = [_m("N=1", 1.2349e-3), _m("N=4", 0.5e-3), _m("N=16", 2.4651e-3)]
    assert noise_reasons(ms, cases) == {1: ["median 0.5 ms outside its sweep neighbours' 1.23-2.47 ms (x1.5)"]}


def test_sweeps_are_ordered_by_their_x_and_grouped_by_implementation_and_device():
    cases = _sweep_cases([16, 1, 4])                      # listed out of order
    # in x order N=1, 4, 16: 1, 5, 1.1 -> N=4 is the spike, although it is listed last
    ms = [_m("N=16", 1.1), _m("N=1", 1.0), _m("N=4", 5.0)]
    assert list(noise_reasons(ms, cases)) == [2]
    # the same medians split over two implementations or devices: no group of three
    for key in ("impl", "device"):
        ms = [_m("N=16", 1.1), _m("N=1", 1.0), _m("N=4", 5.0, **{key: "other"})]
        assert noise_reasons(ms, cases) == {}
    # a failed point is no neighbour: N=1 and N=16 alone are no sweep
    ms = [_m("N=16", 1.1), _m("N=1", 1.0), _m("N=4", 5.0, status="error")]
    assert noise_reasons(ms, cases) == {}
    # volume sweeps too; profiles are no sweep
    assert list(noise_reasons([_m("N=16", 1.1, kind="volume"), _m("N=1", 1.0, kind="volume"),
                               _m("N=4", 5.0, kind="volume")], _sweep_cases([16, 1, 4], "volume"))) == [2]
    assert noise_reasons(ms[:2] + [_m("N=4", 5.0)], _sweep_cases([16, 1, 4], "profile")) == {}


def test_reasons_come_interleaved_then_spread_then_sweep():
    cases = _sweep_cases([1, 4, 16])
    # N=4: fused x4.5 its interleaved time, the others x1 (the drift): fused is off
    ms = [_m("N=1", 1.0), _m("N=4", 9.0, rel_iqr=0.5), _m("N=16", 1.0),
          _m("N=4", 9.0, impl="monai_dice"), _m("N=4", 9.0, impl="vectorized")]
    reference = {("N=4", "fused", "cpu"): 2.0, ("N=4", "monai_dice", "cpu"): 9.0, ("N=4", "vectorized", "cpu"): 9.0}
    reasons = noise_reasons(ms, cases, reference=reference)
    assert list(reasons) == [1] and len(reasons[1]) == 3
    assert "interleaved" in reasons[1][0] and reasons[1][1].startswith("spread") and "sweep" in reasons[1][2]


# ----------------------------------------------------------------------------- interleaved reference

def test_interleaved_reasons_by_hand():
    # measured / interleaved: a 1.0, b 2.0, c 4.0 -> drift (their median) 2.0; a is x0.5, c x2
    ms = [_m("p", 1e-3, impl="a", kind="profile"), _m("p", 2e-3, impl="b", kind="profile"),
          _m("p", 4e-3, impl="c", kind="profile")]
    ref = {("p", "a", "cpu"): 1e-3, ("p", "b", "cpu"): 1e-3, ("p", "c", "cpu"): 1e-3}
    assert interleaved_reasons(ms, ref) == {
        0: ["median 1 ms is x0.50 what it took interleaved with the case's other implementations (1 ms, case drift "
            "x2.00)"],
        2: ["median 4 ms is x2.00 what it took interleaved with the case's other implementations (1 ms, case drift "
            "x2.00)"]}
    # a factor of 2.5 lets both through; exactly the factor is not off
    assert interleaved_reasons(ms, ref, factor=2.5) == {}
    assert interleaved_reasons(ms, ref, factor=2.0) == {}
    assert list(interleaved_reasons(ms, ref, factor=1.99)) == [0, 2]
    # three significant digits of the medians in ms; a at x1 its interleaved time, b and c at x3
    ms = [_m("p", 1.2349e-3, impl="a", kind="profile"), _m("p", 9e-3, impl="b", kind="profile"),
          _m("p", 9e-3, impl="c", kind="profile")]
    ref = {("p", "a", "cpu"): 1.2349e-3, ("p", "b", "cpu"): 3e-3, ("p", "c", "cpu"): 3e-3}
    assert interleaved_reasons(ms, ref) == {
        0: ["median 1.23 ms is x0.33 what it took interleaved with the case's other implementations (1.23 ms, case "
            "drift x3.00)"]}


def test_interleaved_reasons_need_two_ok_measurements_with_a_reference_per_case_and_device():
    ms = [_m("p", 1e-3, impl="a", kind="profile"), _m("p", 4e-3, impl="c", kind="profile")]
    ref = {("p", "a", "cpu"): 1e-3, ("p", "c", "cpu"): 1e-3}
    # two: drift = (1 + 4) / 2 = 2.5, both within x1.5? 1 / 2.5 = 0.4 and 4 / 2.5 = 1.6: both off
    assert list(interleaved_reasons(ms, ref)) == [0, 1]
    assert interleaved_reasons(ms[:1], ref) == {}                                   # one alone: no drift
    assert interleaved_reasons(ms, {("p", "a", "cpu"): 1e-3}) == {}                 # no reference for c
    assert interleaved_reasons(ms, {("p", "a", "cpu"): 1e-3, ("p", "c", "cpu"): 0.0}) == {}   # a zero reference
    assert interleaved_reasons([ms[0], dict(ms[1], status="error")], ref) == {}
    assert interleaved_reasons([ms[0], dict(ms[1], device="cuda")],
                               ref | {("p", "c", "cuda"): 1e-3}) == {}     # other device: other group
    assert interleaved_reasons([ms[0], dict(ms[1], case="q")], ref | {("q", "c", "cpu"): 1e-3}) == {}


# ----------------------------------------------------------------------------- re-measurement

def _noisy(case="p", median=1e-3, **extra):
    """A profile measurement with a spread of 0.5 (noisy at the default threshold)."""
    return _m(case, median, kind="profile", rel_iqr=0.5, times_s=[median] * 3, min_s=median, max_s=median, reps=3,
              peak_bytes=7, load=[0.1, 0.2, 0.3], alloc_peak_bytes=5, **extra)


def test_remeasure_keeps_the_faster_and_records_the_other():
    calls, progress = [], []

    def measure(case, impl, device):
        calls.append((case, impl, device))
        return _m(case, 0.5e-3, impl=impl, device=device, kind="profile", rel_iqr=0.01)

    out = remeasure_noisy([_noisy(device="cuda")], [], measure, progress=lambda m, r: progress.append((m["case"], r)))
    assert calls == [("p", "fused", "cuda")]
    assert progress == [("p", ["spread IQR/median 0.50 > 0.25"])]
    assert out[0]["median_s"] == 0.5e-3 and out[0]["noisy"] == []
    # the attempt set aside: its recorded keys only, and why it was measured again
    assert out[0]["attempts"] == [{"status": "ok", "median_s": 1e-3, "min_s": 1e-3, "max_s": 1e-3, "rel_iqr": 0.5,
                                   "reps": 3, "peak_bytes": 7, "load": [0.1, 0.2, 0.3],
                                   "reasons": ["spread IQR/median 0.50 > 0.25"]}]


def test_remeasure_sets_a_slower_attempt_aside_and_retries():
    seq = iter([_m("p", 2e-3, kind="profile", rel_iqr=0.01), _m("p", 3e-3, kind="profile", rel_iqr=0.01)])
    out = remeasure_noisy([_noisy()], [], lambda *a: next(seq), retries=2)
    # both re-measurements slower: the first measurement is kept, still noisy, and both are recorded
    assert out[0]["median_s"] == 1e-3 and out[0]["noisy"] == ["spread IQR/median 0.50 > 0.25"]
    assert [(a["median_s"], a["reasons"]) for a in out[0]["attempts"]] == [(2e-3, ["re-measured (ok)"]),
                                                                          (3e-3, ["re-measured (ok)"])]
    # an equally fast one is set aside too (the first is kept)
    out = remeasure_noisy([_noisy()], [], lambda *a: _m("p", 1e-3, kind="profile", rel_iqr=0.0), retries=1)
    assert out[0]["rel_iqr"] == 0.5 and out[0]["attempts"][0]["rel_iqr"] == 0.0


@pytest.mark.parametrize("status", ["over budget", "out of memory"])
def test_remeasure_over_budget_keeps_the_first(status):
    out = remeasure_noisy([_noisy()], [], lambda *a: {"status": status, "reps": 0}, retries=1)
    assert out[0]["status"] == "ok" and out[0]["median_s"] == 1e-3
    assert out[0]["attempts"] == [{"status": status, "reps": 0, "reasons": [f"re-measured ({status})"]}]


def test_remeasure_error_replaces_the_first():
    out = remeasure_noisy([_noisy()], [], lambda c, i, d: {"case": c, "kind": "profile", "impl": i, "device": d,
                                                      "status": "error", "error": "boom"}, retries=2)
    # an error is never hidden behind the old value; an error is not noisy, so no second round
    assert out[0]["status"] == "error" and out[0]["error"] == "boom" and out[0]["noisy"] == []
    assert len(out[0]["attempts"]) == 1 and out[0]["attempts"][0]["median_s"] == 1e-3
    assert out[0]["attempts"][0]["reasons"] == ["spread IQR/median 0.50 > 0.25"]


def test_remeasure_rounds_and_inputs():
    ms = [_noisy(), _m("q", 1e-3, kind="profile", rel_iqr=0.1)]
    out = remeasure_noisy(ms, [], lambda *a: pytest.fail("measured"), retries=0)
    assert out[0]["noisy"] == ["spread IQR/median 0.50 > 0.25"] and out[1]["noisy"] == []
    assert "attempts" not in out[0] and "noisy" not in ms[0]            # the input list is left as it was
    # threshold and factor are the caller's
    out = remeasure_noisy(ms, [], lambda *a: pytest.fail("measured"), threshold=0.6)
    assert out[0]["noisy"] == []
    out = remeasure_noisy(ms, [], lambda *a: pytest.fail("measured"), threshold=0.05, retries=0)
    assert [m["noisy"] != [] for m in out] == [True, True]
    # three rounds, each still noisy and slower: three attempts
    calls = []
    out = remeasure_noisy([_noisy()], [], lambda *a: calls.append(1) or _noisy(median=2e-3), retries=3)
    assert len(calls) == 3 and len(out[0]["attempts"]) == 3


def test_remeasure_uses_the_interleaved_reference():
    ms = [_m("p", 1e-3, impl="a", kind="profile"), _m("p", 1e-3, impl="b", kind="profile"),
          _m("p", 9e-3, impl="c", kind="profile")]
    ref = {("p", i, "cpu"): 1e-3 for i in "abc"}
    calls = []

    def measure(case, impl, device):
        calls.append(impl)
        return _m(case, 1.1e-3, impl=impl, kind="profile")

    out = remeasure_noisy(ms, [], measure, reference=ref, factor=2.0)
    assert calls == ["c"] and out[2]["median_s"] == 1.1e-3 and [m["noisy"] for m in out] == [[], [], []]
    assert remeasure_noisy(ms, [], measure, reference=ref, factor=10.0)[2]["noisy"] == []
    assert calls == ["c"]


# ----------------------------------------------------------------------------- the host proxy

def _p(rel_iqr, ratio=2.0, status="ok", **extra):
    return {"status": status, "ratio": ratio, "rel_iqr": rel_iqr, "ratio_q1": ratio * 0.9, "ratio_q3": ratio * 1.1,
            "ratios": [ratio] * 3} | extra


def test_proxy_steady_at_once_is_measured_once():
    calls = []
    p = remeasure_proxy(lambda: calls.append(1) or _p(0.25), progress=lambda *a: pytest.fail("progress"))
    assert calls == [1] and p["noisy"] == [] and "attempts" not in p      # at the threshold: steady


def test_proxy_keeps_the_steadiest_and_says_why():
    seq, progress = iter([_p(0.4, ratio=3.0), _p(0.3, ratio=2.5), _p(0.35, ratio=2.2)]), []
    p = remeasure_proxy(lambda: next(seq), retries=2, progress=lambda m, r: progress.append((m, r)))
    assert p["ratio"] == 2.5 and p["rel_iqr"] == 0.3
    assert p["noisy"] == ["spread IQR/median 0.30 > 0.25"]
    assert p["attempts"] == [{"status": "ok", "ratio": 3.0, "rel_iqr": 0.4, "ratio_q1": 3.0 * 0.9,
                              "ratio_q3": 3.0 * 1.1},
                             {"status": "ok", "ratio": 2.2, "rel_iqr": 0.35, "ratio_q1": 2.2 * 0.9,
                              "ratio_q3": 2.2 * 1.1}]
    assert progress == [({"case": "host cost proxy", "impl": "fused", "device": "cpu"},
                         ["spread IQR/median 0.40 > 0.25"]),
                        ({"case": "host cost proxy", "impl": "fused", "device": "cpu"},
                         ["spread IQR/median 0.30 > 0.25"])]
    # the caller's threshold and retries
    seq = iter([_p(0.4), _p(0.3)])
    p = remeasure_proxy(lambda: next(seq), threshold=0.5)
    assert p["rel_iqr"] == 0.4 and p["noisy"] == [] and "attempts" not in p
    seq = iter([_p(0.4, ratio=3.0), _p(0.5, ratio=2.0)])
    p = remeasure_proxy(lambda: next(seq), retries=1)
    assert p["ratio"] == 3.0 and [a["ratio"] for a in p["attempts"]] == [2.0]
    assert p["noisy"] == ["spread IQR/median 0.40 > 0.25"]
    # an equally steady one is set aside
    seq = iter([_p(0.4, ratio=3.0), _p(0.4, ratio=2.0)])
    assert remeasure_proxy(lambda: next(seq), retries=1)["ratio"] == 3.0


def test_proxy_error_is_reported_not_hidden():
    seq = iter([_p(0.4, ratio=3.0), {"status": "error", "error": "boom"}])
    p = remeasure_proxy(lambda: next(seq), retries=2)
    assert p == {"status": "error", "error": "boom",
                 "attempts": [{"status": "ok", "ratio": 3.0, "rel_iqr": 0.4, "ratio_q1": 3.0 * 0.9,
                               "ratio_q3": 3.0 * 1.1}]}
    # failed at once: returned as it is, measured once
    calls = []
    assert remeasure_proxy(lambda: calls.append(1) or {"status": "error"}) == {"status": "error"} and calls == [1]


# ----------------------------------------------------------------------------- the busy machine

def test_busy_warning_at_its_edges():
    run = {"cpus": 4, "load_before": [2.0, 9.0, 9.0], "load_after": [2.0, 9.0, 9.0]}
    assert busy_warning(run) == ""                                              # exactly half the CPUs
    assert busy_warning(dict(run, load_before=[2.01, 0.0, 0.0])) == (
        "WARNING: the machine was busy (1-minute load of other work up to 2.01 on 4 CPUs): it competed for the "
        "CPUs, so timings are slower and noisier than the code's own")
    # after the run, its own threads are taken off, at most as many as the CPUs
    after = {"cpus": 4, "load_before": None, "load_after": [5.0, 0.0, 0.0]}
    assert "up to 5.00 on 4 CPUs" in busy_warning(after)
    assert "up to 4.00 on 4 CPUs" in busy_warning(after, own_threads=1)
    assert busy_warning(after, own_threads=3) == ""                             # 2.0: half
    assert "up to 2.10 on 4 CPUs" in busy_warning(dict(after, load_after=[6.1]), own_threads=8)   # 6.1 - 4
    # the larger of before and after
    assert "up to 3.00" in busy_warning({"cpus": 4, "load_before": [3.0], "load_after": [2.5]})
    assert "up to 3.00" in busy_warning({"cpus": 4, "load_before": [2.5], "load_after": [3.0]})
    # nothing known: no warning
    assert busy_warning({"cpus": 4}) == "" and busy_warning({"load_before": [99.0]}) == ""
    assert busy_warning({"cpus": None, "load_after": [99.0]}) == ""

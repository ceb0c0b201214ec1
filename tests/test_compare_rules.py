"""Issue 23: ``blobbench compare``'s rules at their edges, its table and its plot (compare.py).

Every expected value is derived by hand from the rule in compare.py's module doc (or, for the
Mann-Whitney p-values, from scipy.stats.mannwhitneyu), never taken from the code's output. The runs
are handwritten: constant or hand-chosen repetition times, so medians, ratios and bootstrap
intervals are known exactly. No benchmark runs, no extension builds: each test is milliseconds
(the plot tests a second at most).
"""
import json
import math
import struct

import pytest

from blobbench.bench import compare as C
from blobbench.bench.compare import (change_test, compare_runs, format_compare, load_run, mann_whitney_greater,
                                     plot_compare, relative_samples)

MB = 2**20


def _m(case, impl, times=None, device="cpu", status="ok", **extra):
    m = {"case": case, "kind": "profile", "impl": impl, "device": device, "status": status}
    if times is not None:
        m["times_s"] = list(times)
    return m | extra


def _run(*measurements, machine="m1", **extra):
    machine = machine if isinstance(machine, dict) else {"summary": machine}
    return {"machine": machine, "measurements": list(measurements)} | extra


def _row(cmp, case="c", impl="fused", device="cpu"):
    (row,) = [r for r in cmp["rows"] if (r["case"], r["impl"], r["device"]) == (case, impl, device)]
    return row


def _p_greater(x, y):
    """scipy's one-sided p that ``x`` tends to be larger than ``y`` (normal approximation with the
    continuity and tie corrections: the method compare.py documents). Imported here, not at the
    top: the GPU check collects every test module on a machine that may lack scipy, and one
    collection error fails the whole run."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(x, y, alternative="greater", method="asymptotic", use_continuity=True).pvalue)


# ----------------------------------------------------------------------------- the statistics

@pytest.mark.parametrize("old, new", [
    ([1.0, 2.0, 2.0, 3.0, 5.0], [2.0, 3.0, 3.0, 4.0, 6.0, 7.0]),            # ties inside and across the samples
    ([0.0, 1.0], [2.0, 3.0]),                                               # the smallest samples tested
    ([1.0, 1.0, 1.0, 2.0, 2.0, 9.0], [1.0, 2.0, 2.0, 2.0, 3.0]),            # three tie groups
    ([5.0, 6.0, 7.0, 8.0], [1.0, 2.0, 3.0]),                                # new smaller: p near 1
])
def test_mann_whitney_matches_scipy(old, new):
    assert mann_whitney_greater(old, new) == pytest.approx(_p_greater(new, old), rel=1e-12)
    assert mann_whitney_greater(new, old) == pytest.approx(_p_greater(old, new), rel=1e-12)


def test_mann_whitney_without_evidence_is_1():
    for old, new in (([1.0], [2.0, 3.0]), ([1.0, 2.0], [3.0]), ([], [1.0, 2.0])):
        assert mann_whitney_greater(old, new) == 1.0
    # every value tied: the variance is 0, there is no evidence either way
    assert mann_whitney_greater([2.0, 2.0], [2.0, 2.0, 2.0]) == 1.0


def test_change_test_ratio_and_interval_of_constant_samples():
    # constant samples: every bootstrap draw has the same medians, the interval is the ratio itself
    t = change_test([math.log(2.0)] * 4, [math.log(3.0)] * 5)
    assert t["ratio"] == pytest.approx(1.5) and t["lo"] == pytest.approx(1.5) and t["hi"] == pytest.approx(1.5)
    assert (t["n_old"], t["n_new"]) == (4, 5)
    assert t["p_slower"] == pytest.approx(_p_greater([3.0] * 5, [2.0] * 4), rel=1e-12)
    assert t["p_faster"] == pytest.approx(_p_greater([2.0] * 4, [3.0] * 5), rel=1e-12)


def test_change_test_ratio_is_of_the_medians():
    # median of log [2, 4, 6, 8] is (log 4 + log 6) / 2; of log [1, 2, 3]: log 2 -> sqrt(24) / 2
    t = change_test([math.log(x) for x in (1.0, 2.0, 3.0)], [math.log(x) for x in (2.0, 4.0, 6.0, 8.0)])
    assert t["ratio"] == pytest.approx(math.sqrt(6.0))
    assert t["lo"] <= t["ratio"] <= t["hi"] and t["lo"] < t["hi"]


class _ScriptedRandom:
    """Stands in for random.Random in change_test: the i-th draw of NEW is a sample whose median is
    the i-th of ``medians``; every draw of OLD is OLD itself. Records the seed and the draw sizes."""

    def __init__(self, medians):
        self.medians, self.calls, self.seed = list(medians), [], None

    def __call__(self, seed):
        self.seed = seed
        return self

    def choices(self, population, k):
        self.calls.append(k)
        if len(self.calls) % 2:         # NEW is drawn first in each round
            return [self.medians[len(self.calls) // 2]] * k
        return list(population)


def test_change_test_interval_is_the_2_5_and_97_5_percent_points(monkeypatch):
    # 40 bootstrap differences 0.00, 0.01, ..., 0.39 in a scrambled order: a 95 % percentile interval
    # leaves 2.5 % of the 40 (one draw) below lo and one above hi: lo = exp(0.01), hi = exp(0.38)
    diffs = [((7 * i) % 40) / 100 for i in range(40)]
    assert sorted(diffs) == [i / 100 for i in range(40)]
    fake = _ScriptedRandom(diffs)
    monkeypatch.setattr(C.random, "Random", fake)
    t = change_test([0.0, 0.0, 0.0], [0.5, 0.6], boot=40, seed=7)
    assert fake.seed == 7 and fake.calls == [2, 3] * 40
    assert t["lo"] == pytest.approx(math.exp(0.01)) and t["hi"] == pytest.approx(math.exp(0.38))
    assert t["ratio"] == pytest.approx(math.exp(0.55))
    # 2000 draws (the default): 50 below lo, 50 above hi
    diffs = [((7 * i) % 2000) / 1000 for i in range(2000)]
    fake = _ScriptedRandom(diffs)
    monkeypatch.setattr(C.random, "Random", fake)
    t = change_test([0.0, 0.0], [1.0, 1.0])
    assert fake.seed == 0 and len(fake.calls) == 4000
    assert t["lo"] == pytest.approx(math.exp(0.050)) and t["hi"] == pytest.approx(math.exp(1.949))


def test_change_test_is_seeded():
    old, new = [0.0, 0.1, 0.3, 0.2, 0.05], [0.2, 0.5, 0.1, 0.4, 0.3]
    a, b = change_test(old, new), change_test(list(old), list(new))
    assert (a["lo"], a["hi"]) == (b["lo"], b["hi"])
    others = {(change_test(old, new, seed=s)["lo"], change_test(old, new, seed=s)["hi"]) for s in range(1, 6)}
    assert len(others | {(a["lo"], a["hi"])}) > 1          # the seed is used


def test_relative_samples_without_times_and_unequal_pairs():
    # no repetition times: the quartiles and the median stand in, or the median alone
    assert relative_samples({"impl": "fused", "q1_s": 1.0, "median_s": 2.0, "q3_s": 4.0}, None) == pytest.approx(
        [0.0, math.log(2.0), math.log(4.0)])
    assert relative_samples({"impl": "fused", "median_s": 3.0}, None) == pytest.approx([math.log(3.0)])
    # interleaved, but a repetition count that differs: against the baseline's median (3.0)
    ours = {"impl": "fused", "times_s": [1.0, 2.0, 4.0], "interleaved": ["monai_dice", "fused"]}
    assert relative_samples(ours, {"impl": "monai_dice", "times_s": [2.0, 4.0]}) == pytest.approx(
        [math.log(1 / 3), math.log(2 / 3), math.log(4 / 3)])
    # the baseline's median from its quartiles when it has no times
    assert relative_samples({"impl": "fused", "times_s": [2.0]}, {"impl": "monai_dice", "q1_s": 1.0,
                                                                  "median_s": 4.0, "q3_s": 9.0}) == pytest.approx(
        [math.log(0.5)])


# ----------------------------------------------------------------------------- the time rule

def test_judge_at_its_edges():
    f, a = 1.15, 0.01
    t = {"ratio": 1.15, "p_slower": 0.0, "p_faster": 1.0}
    assert C._judge(t, f, a) == ""                                   # at the factor: not above it
    assert C._judge(t | {"ratio": 1.1501}, f, a) == "regression"
    assert C._judge(t | {"ratio": 2.0, "p_slower": 0.01}, f, a) == ""       # p at alpha: not below it
    assert C._judge(t | {"ratio": 2.0, "p_slower": 0.0099}, f, a) == "regression"
    t = {"ratio": 1 / 1.15, "p_slower": 1.0, "p_faster": 0.0}
    assert C._judge(t, f, a) == ""                                   # at 1 / factor: not below it
    assert C._judge(t | {"ratio": 0.86}, f, a) == "improvement"
    assert C._judge(t | {"ratio": 0.5, "p_faster": 0.01}, f, a) == ""
    assert C._judge(t | {"ratio": 0.5, "p_faster": 0.0099}, f, a) == "improvement"
    # the slower p never makes an improvement, the faster p never a regression
    assert C._judge({"ratio": 2.0, "p_slower": 0.5, "p_faster": 0.0}, f, a) == ""
    assert C._judge({"ratio": 0.5, "p_slower": 0.0, "p_faster": 0.5}, f, a) == ""


def test_a_ratio_above_the_threshold_whose_interval_straddles_1_is_no_regression():
    # median 3 -> 3.9: x1.30, but the spread of 1..5 leaves it well within chance
    old = [1.0, 2.0, 3.0, 4.0, 5.0]
    new = [1.3 * x for x in old]
    cmp = compare_runs(_run(_m("c", "fused", old)), _run(_m("c", "fused", new)))
    row = _row(cmp)
    assert row["time_ratio"] == pytest.approx(1.3) and row["abs_time_ratio"] == pytest.approx(1.3)
    assert row["time_lo"] < 1.0 < row["time_hi"]                     # the situation tested
    assert row["time_p"] == pytest.approx(_p_greater(new, old), rel=1e-9) and row["time_p"] > 0.01
    assert row["time_verdict"] == "" and row["verdict"] == "" and not cmp["regressions"]


def test_the_same_ratio_with_a_tight_spread_is_a_regression_with_its_why():
    old, new = [2e-3] * 6, [3e-3] * 6                                # x1.50, no spread: interval [1.50, 1.50]
    cmp = compare_runs(_run(_m("c", "fused", old)), _run(_m("c", "fused", new)))
    row = _row(cmp)
    p = _p_greater(new, old)
    assert p < 0.01 and row["time_p"] == pytest.approx(p, rel=1e-9)
    assert row["time_p_faster"] == pytest.approx(_p_greater(old, new), rel=1e-9)
    assert row["time_basis"] == "absolute (no baseline in both runs: drift not cancelled)"
    assert row["why"] == [f"time x1.50 [1.50, 1.50] absolute (no baseline in both runs: drift not cancelled), "
                          f"p={p:.2g}"]
    assert row["verdict"] == row["time_verdict"] == "regression"
    assert row["old_median_s"] == pytest.approx(2e-3) and row["new_median_s"] == pytest.approx(3e-3)
    assert [r["impl"] for r in cmp["regressions"]] == ["fused"]
    # alpha and threshold are the caller's: p is not below 1e-4, x1.50 is not above x1.6
    assert not compare_runs(_run(_m("c", "fused", old)), _run(_m("c", "fused", new)), alpha=1e-4)["regressions"]
    assert not compare_runs(_run(_m("c", "fused", old)), _run(_m("c", "fused", new)), threshold=0.6)["regressions"]


def test_ours_is_judged_relative_to_its_baseline_in_the_same_run():
    # the machine 2x slower in NEW: MONAI 10 -> 20 ms, fused 4 -> 8 ms: fused / MONAI unchanged
    old = _run(_m("c", "fused", [4e-3] * 5), _m("c", "monai_dice", [10e-3] * 5))
    new = _run(_m("c", "fused", [8e-3] * 5), _m("c", "monai_dice", [20e-3] * 5))
    cmp = compare_runs(old, new)
    row = _row(cmp)
    assert row["time_basis"] == "/ monai_dice" and row["time_ratio"] == pytest.approx(1.0)
    assert row["abs_time_ratio"] == pytest.approx(2.0) and row["verdict"] == ""
    base = _row(cmp, impl="monai_dice")       # the baseline moved x2, clearly: reported, never gated
    assert not base["gated"] and base["time_ratio"] == pytest.approx(2.0) and base["time_p"] < 0.01
    assert base["time_verdict"] == "" and base["verdict"] == "" and base["time_basis"] == "absolute"
    assert not cmp["regressions"]
    # fused 4 -> 8 ms while MONAI stays: x2 of ours, a regression; "(paired)" when NEW interleaved them
    new = _run(_m("c", "fused", [8e-3] * 5, interleaved=["monai_dice", "fused"]), _m("c", "monai_dice", [10e-3] * 5))
    row = _row(compare_runs(old, new))
    assert row["time_basis"] == "/ monai_dice (paired)" and row["time_ratio"] == pytest.approx(2.0)
    assert row["verdict"] == "regression"
    # the baseline failed in NEW: ours falls back to its absolute time (x2 here: a regression)
    new = _run(_m("c", "fused", [8e-3] * 5), _m("c", "monai_dice", status="error"))
    row = _row(compare_runs(old, new))
    assert row["time_basis"].startswith("absolute (no baseline") and row["time_ratio"] == pytest.approx(2.0)


@pytest.mark.parametrize("clocks", [("wall", "thread"), ("thread", "wall"), (None, "thread"), ("thread", None)])
def test_clocks_that_differ_are_never_judged(clocks):
    o, n = clocks
    old = _m("c", "fused", [1e-3] * 5, **({"clock": o} if o else {}))
    new = _m("c", "fused", [3e-3] * 5, **({"clock": n} if n else {}))   # x3, clear
    row = _row(compare_runs(_run(old), _run(new)))
    assert row["time_basis"].endswith(f" (clocks differ: {o or 'wall'} -> {n or 'wall'})")
    assert row["time_ratio"] == pytest.approx(3.0) and row["time_verdict"] == "" and row["verdict"] == ""
    # the same clock on both sides (named or by default): judged
    same = _row(compare_runs(_run(dict(old, clock="thread")), _run(dict(new, clock="thread"))))
    assert "clocks differ" not in same["time_basis"] and same["verdict"] == "regression"


def test_noisy_on_either_side_marks_the_row():
    for o, n in ((["spread IQR/median 0.40 > 0.25"], []), ([], ["spread IQR/median 0.40 > 0.25"])):
        old, new = _m("c", "fused", [1e-3] * 3, noisy=o), _m("c", "fused", [1e-3] * 3, noisy=n)
        row = _row(compare_runs(_run(old), _run(new)))
        assert row["noisy"] is True
    row = _row(compare_runs(_run(_m("c", "fused", [1e-3] * 3, noisy=[])), _run(_m("c", "fused", [1e-3] * 3))))
    assert "noisy" not in row


def test_stats_without_repetition_times():
    # result files without times_s: the median (and the quartiles) stand in
    old = _m("c", "naive", median_s=2.0, q1_s=1.9, q3_s=2.1)
    new = _m("c", "naive", median_s=3.0)
    row = _row(compare_runs(_run(old), _run(new)), impl="naive")
    assert row["old_median_s"] == 2.0 and row["new_median_s"] == 3.0 and row["abs_time_ratio"] == 1.5


# ----------------------------------------------------------------------------- the memory rule

def _mem(o_bytes, n_bytes, key="alloc_peak_bytes", impl="fused", device="cpu", **kw):
    old = _m("c", impl, [1e-3] * 3, device=device, **{key: o_bytes})
    new = _m("c", impl, [1e-3] * 3, device=device, **{key: n_bytes})
    return _row(compare_runs(_run(old), _run(new), **kw), impl=impl, device=device)


def test_memory_growth_above_the_floor_but_under_the_relative_threshold_is_no_regression():
    row = _mem(100 * MB, 105 * MB)        # +5 MB: over the 1 MB floor, under 10 % of 100 MB
    assert row["memory_verdict"] == "" and row["verdict"] == "" and row["memory_ratio"] == pytest.approx(1.05)
    assert row["memory_basis"] == "allocator" and (row["old_peak_bytes"], row["new_peak_bytes"]) == (100 * MB, 105 * MB)


def test_memory_growth_above_the_relative_threshold_but_under_the_floor_is_no_regression():
    row = _mem(2 * MB, 2 * MB + MB // 2)  # +25 %, but +0.5 MB: under the 1 MB floor
    assert row["memory_verdict"] == "" and row["verdict"] == ""


def test_memory_growth_above_both_is_a_regression_with_its_why():
    row = _mem(2 * MB, 3 * MB + MB // 2)  # +1.5 MB, x1.75
    assert row["memory_verdict"] == "regression" and row["verdict"] == "regression"
    assert row["why"] == ["memory +1.5 MB (x1.75, allocator bytes)"]


def test_memory_rule_at_the_floor_and_at_the_threshold():
    # 5 MB -> 6 MB: growth exactly the floor (10 % of 5 MB is below it): not above it
    assert _mem(5 * MB, 6 * MB)["memory_verdict"] == ""
    assert _mem(5 * MB, 6 * MB + 1)["memory_verdict"] == "regression"
    # 20 MB -> 22 MB: growth exactly 10 % (over the floor): not above it; 1 byte more is
    assert _mem(20 * MB, 22 * MB)["memory_verdict"] == ""
    assert _mem(20 * MB, 22 * MB + 1)["memory_verdict"] == "regression"
    # the caller's threshold and floor
    assert _mem(20 * MB, 22 * MB + 1, mem_threshold=0.2)["memory_verdict"] == ""
    # +300 kB of 2 MB: over 10 %, under the default floor; over a floor of 256 kB
    assert _mem(2 * MB, 2 * MB + 300 * 1024)["memory_verdict"] == ""
    assert _mem(2 * MB, 2 * MB + 300 * 1024, mem_floor_bytes=2**18)["memory_verdict"] == "regression"


def test_memory_shrinking_is_the_mirror_image():
    row = _mem(6 * MB + 1, 5 * MB)        # -1 MB - 1 byte: past the floor, and 10 % of 6 MB is less
    assert row["memory_verdict"] == "improvement" and row["verdict"] == "improvement" and row["why"] == []
    assert _mem(6 * MB, 5 * MB)["memory_verdict"] == ""                     # exactly the floor
    assert _mem(100 * MB, 95 * MB)["memory_verdict"] == ""                  # under 10 %


def test_memory_ratio_from_zero_bytes():
    row = _mem(0, 0)
    assert row["memory_ratio"] == 1.0 and row["memory_verdict"] == ""
    row = _mem(0, 3 * MB)
    assert row["memory_ratio"] == math.inf and row["memory_verdict"] == "regression"


def test_memory_of_a_baseline_is_reported_not_gated():
    row = _mem(2 * MB, 20 * MB, impl="monai_dice")
    assert row["memory_ratio"] == pytest.approx(10.0) and row["memory_verdict"] == "" and row["verdict"] == ""


def test_memory_basis_per_device():
    # peak RSS only, on the CPU: reported with its basis, never gated (glibc moves it by itself)
    row = _mem(2 * MB, 20 * MB, key="peak_bytes")
    assert row["memory_basis"] == "rss" and row["memory_ratio"] == pytest.approx(10.0)
    assert row["memory_verdict"] == "" and row["verdict"] == "" and "rss_ratio" not in row
    # peak_bytes on CUDA is max_memory_allocated: the allocator's, gated
    row = _mem(2 * MB, 20 * MB, key="peak_bytes", device="cuda")
    assert row["memory_basis"] == "allocator" and row["memory_verdict"] == "regression"
    assert row["why"] == ["memory +18.0 MB (x10.00, allocator bytes)"] and "rss_ratio" not in row


def test_allocator_bytes_win_over_rss_and_rss_is_reported_beside_them():
    old = _m("c", "fused", [1e-3] * 3, alloc_peak_bytes=4 * MB, peak_bytes=50 * MB)
    new = _m("c", "fused", [1e-3] * 3, alloc_peak_bytes=4 * MB, peak_bytes=100 * MB)
    row = _row(compare_runs(_run(old), _run(new)))
    assert row["memory_basis"] == "allocator" and row["memory_ratio"] == 1.0 and row["rss_ratio"] == 2.0
    assert row["verdict"] == ""
    row = _row(compare_runs(_run(dict(old, peak_bytes=0)), _run(new)))
    assert row["rss_ratio"] is None
    # on CUDA there is no RSS beside the allocator's bytes
    cuda = _row(compare_runs(_run(dict(old, device="cuda")), _run(dict(new, device="cuda"))), device="cuda")
    assert "rss_ratio" not in cuda
    # allocator bytes in one run only: both runs' RSS is the common basis
    row = _row(compare_runs(_run(old), _run({k: v for k, v in new.items() if k != "alloc_peak_bytes"})))
    assert row["memory_basis"] == "rss" and row["memory_ratio"] == 2.0 and "rss_ratio" not in row
    # no basis common to both runs: no memory columns at all
    row = _row(compare_runs(_run({k: v for k, v in old.items() if k != "peak_bytes"}),
                            _run({k: v for k, v in new.items() if k != "alloc_peak_bytes"})))
    assert not {"memory_ratio", "memory_basis", "memory_verdict", "old_peak_bytes"} & set(row)


# ----------------------------------------------------------------------------- status, keys, machines, proxy

@pytest.mark.parametrize("impl, old_status, new_status, verdict, why", [
    ("fused", "ok", "out of memory", "regression", ["status ok -> out of memory"]),
    ("fused", "ok", "over budget", "regression", ["status ok -> over budget"]),
    ("monai_dice", "ok", "over budget", "", []),
    ("monai_dice", "ok", "out of memory", "", []),
    ("monai_dice", "ok", "error", "regression", ["status ok -> error"]),
    ("naive", "over budget", "ok", "improvement", []),
    ("fused", "error", "ok", "improvement", []),
    ("fused", "error", "error", "", []),
])
def test_status_changes(impl, old_status, new_status, verdict, why):
    t = [1e-3] * 3
    old = _m("c", impl, t if old_status == "ok" else None, status=old_status)
    new = _m("c", impl, t if new_status == "ok" else None, status=new_status)
    cmp = compare_runs(_run(old), _run(new))
    row = _row(cmp, impl=impl)
    assert (row["old_status"], row["new_status"], row["verdict"], row["why"]) == (old_status, new_status, verdict, why)
    assert "time_ratio" not in row and row["gated"] == (impl in ("fused",))
    assert [r["impl"] for r in cmp["regressions"]] == ([impl] if verdict == "regression" else [])


def test_cases_in_one_run_only_and_machines():
    a, b, c = _m("a", "fused", [1e-3] * 3), _m("b", "fused", [1e-3] * 3), _m("c", "fused", [1e-3] * 3, device="cuda")
    cmp = compare_runs(_run(a, b, machine="A"), _run(b, c, machine="B"))
    assert [(r["case"], r["impl"], r["device"]) for r in cmp["rows"]] == [("b", "fused", "cpu")]
    assert cmp["only_old"] == [["a", "fused", "cpu"]] and cmp["only_new"] == [["c", "fused", "cuda"]]
    assert (cmp["old_machine"], cmp["new_machine"], cmp["same_machine"]) == ("A", "B", False)
    # a run without a machine record is "?" on that side
    cmp = compare_runs({"measurements": [b]}, _run(b, machine="B"))
    assert (cmp["old_machine"], cmp["new_machine"], cmp["same_machine"]) == ("?", "B", False)
    cmp = compare_runs(_run(b, machine="B"), {"measurements": [b], "machine": {}})
    assert (cmp["old_machine"], cmp["new_machine"], cmp["same_machine"]) == ("B", "?", False)
    cmp = compare_runs(_run(b), _run(b), threshold=0.2, mem_threshold=0.3, mem_floor_bytes=7, alpha=0.05)
    assert cmp["same_machine"] and (cmp["threshold"], cmp["factor"], cmp["mem_threshold"], cmp["mem_floor_bytes"],
                                    cmp["alpha"]) == (0.2, 1.2, 0.3, 7, 0.05)
    assert cmp["only_old"] == cmp["only_new"] == []


def test_busy_and_planted_runs_are_recorded():
    b = _m("b", "fused", [1e-3] * 3)
    busy = {"cpus": 2, "load_before": [0.1, 0.1, 0.1], "load_after": [2.5, 1.0, 1.0]}
    # after the run, load 2.5 of which its own 1 thread: 1.5 of other work, over half of 2 CPUs
    cmp = compare_runs(_run(b, run=busy, machine={"summary": "m", "threads": 1}),
                       _run(b, run=dict(busy, planted_slowdown=1.3), machine={"summary": "m", "threads": 2}))
    assert "busy" in cmp["busy"]["OLD"] and "up to 1.50 on 2 CPUs" in cmp["busy"]["OLD"]
    assert cmp["busy"]["NEW"] == ""                  # 2.5 - its own 2 threads: 0.5, not over half
    assert cmp["planted"] == {"OLD": 1.0, "NEW": 1.3}
    cmp = compare_runs(_run(b, run={"planted_slowdown": None}), _run(b))
    assert cmp["planted"] == {"OLD": 1.0, "NEW": 1.0} and cmp["busy"] == {"OLD": "", "NEW": ""}


def _proxy(ratios, status="ok", with_list=True):
    s = sorted(ratios)
    p = {"status": status, "ratio": s[len(s) // 2], "ratio_q1": s[0], "ratio_q3": s[-1]}
    return p | ({"ratios": list(ratios)} if with_list else {})


def test_host_proxy_rule():
    old = [2.0, 2.02, 1.98, 2.01, 1.99, 2.0, 2.0]
    worse = [2 * r for r in old]
    cmp = compare_runs(_run(host_proxy=_proxy(old)), _run(host_proxy=_proxy(worse)))
    hp = cmp["host_proxy"]
    p = _p_greater(worse, old)
    assert (hp["old"], hp["new"], hp["verdict"]) == (2.0, 4.0, "regression") and p < 0.01
    assert hp["ratio"] == pytest.approx(2.0) and hp["p"] == pytest.approx(p, rel=1e-9)
    assert hp["lo"] <= 2.0 <= hp["hi"]
    assert cmp["regressions"] == [{"case": "host cost proxy", "impl": "fused", "device": "cpu",
                                   "why": ["proxy x2.00"]}]
    # no per-repetition ratios: its quartiles and median stand in (3 against 3: no clear change)
    cmp = compare_runs(_run(host_proxy=_proxy([1.9, 2.0, 2.1], with_list=False)),
                       _run(host_proxy=_proxy([3.8, 4.0, 4.2], with_list=False)))
    hp = cmp["host_proxy"]
    assert hp["ratio"] == pytest.approx(2.0) and hp["p"] == pytest.approx(_p_greater([3.8, 4, 4.2], [1.9, 2, 2.1]))
    assert hp["verdict"] == "" and cmp["regressions"] == []
    # faster: an improvement, not a regression
    cmp = compare_runs(_run(host_proxy=_proxy(worse)), _run(host_proxy=_proxy(old)))
    assert cmp["host_proxy"]["verdict"] == "improvement" and cmp["regressions"] == []
    # the alpha of the caller applies to the proxy too
    cmp = compare_runs(_run(host_proxy=_proxy(old)), _run(host_proxy=_proxy(worse)), alpha=p / 2)
    assert cmp["host_proxy"]["verdict"] == "" and cmp["regressions"] == []
    # a proxy that failed, or is missing, on either side: not compared
    for po, pn in ((_proxy(old, status="error"), _proxy(worse)), (_proxy(old), None), (None, _proxy(worse))):
        assert "host_proxy" not in compare_runs(_run(host_proxy=po), _run(host_proxy=pn))


def test_load_run(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "result.json").write_text(json.dumps({"measurements": [], "x": 1}))
    data, path = load_run(tmp_path / "r")
    assert data == {"measurements": [], "x": 1} and path == tmp_path / "r" / "result.json"


# ----------------------------------------------------------------------------- the table users read

def _cmp_for_table():
    rows = [
        {"case": "ms", "impl": "fused", "device": "cpu", "old_status": "ok", "new_status": "ok", "gated": True,
         "verdict": "regression", "why": ["time x1.50", "memory +2.0 MB"], "time_ratio": 1.5, "time_lo": 1.4,
         "time_hi": 1.6, "time_p": 0.00123, "old_median_s": 0.002, "new_median_s": 0.003, "time_basis": "/ monai_dice",
         "memory_ratio": 1.2, "memory_basis": "allocator"},
        {"case": "ms", "impl": "monai_dice", "device": "cpu", "old_status": "ok", "new_status": "ok", "gated": False,
         "verdict": "", "why": [], "time_ratio": 0.9, "time_lo": 0.85, "time_hi": 0.95, "time_p": 0.5,
         "old_median_s": 0.0105, "new_median_s": 0.00945, "time_basis": "absolute", "memory_ratio": 2.0,
         "memory_basis": "rss"},
        {"case": "shanel", "impl": "fused", "device": "cuda", "old_status": "ok", "new_status": "error",
         "gated": True, "verdict": "regression", "why": ["status ok -> error"]},
        {"case": "big", "impl": "vectorized", "device": "cpu", "old_status": "ok", "new_status": "ok", "gated": True,
         "verdict": "improvement", "why": [], "time_ratio": 0.5, "time_lo": 0.45, "time_hi": 0.55, "time_p": 1.0,
         "old_median_s": 123.4, "new_median_s": 61.7, "time_basis": "absolute (no baseline in both runs: ...)",
         "noisy": True},
    ]
    return {"rows": rows, "threshold": 0.15, "factor": 1.15, "alpha": 0.01, "mem_threshold": 0.1,
            "mem_floor_bytes": 2**20, "only_old": [["a", "naive", "cpu"], ["b", "fused", "cuda"]], "only_new": [],
            "old_machine": "box A", "new_machine": "box B", "same_machine": False,
            "busy": {"OLD": "", "NEW": "WARNING: busy"}, "planted": {"OLD": 1.0, "NEW": 1.3},
            "host_proxy": {"old": 2.0, "new": 4.0, "ratio": 2.0, "lo": 1.9, "hi": 2.1, "p": 0.0004,
                           "verdict": "regression"},
            "regressions": [rows[0], rows[2], {"case": "host cost proxy", "impl": "fused", "device": "cpu"}]}


def test_table_text():
    lines = format_compare(_cmp_for_table(), "runs/old", "runs/new").split("\n")
    assert lines[:9] == [
        "blobbench compare: OLD runs/old",
        "                   NEW runs/new",
        "WARNING: different machines; the ratios compare the machines as well as the code",
        "  OLD: box A",
        "  NEW: box B",
        "NEW: WARNING: busy",
        "WARNING: NEW ran with a PLANTED SLOWDOWN x1.3 of the fused ops ($BLOBBENCH_PLANT_SLOWDOWN, test only): "
        "its times are not the code's",
        "time: NEW/OLD of ours / its baseline measured in the same run (a ratio of ratios: machine drift divides "
        "out), [95% bootstrap interval], p: one-sided Mann-Whitney; regression: > x1.15 and p < 0.01. memory: "
        "allocator bytes of one call; regression: +10% and > 1 MB. Baselines (MONAI, the loop): their own NEW/OLD, "
        "not gated",
        "  case         implementation device     OLD ms    NEW ms             time NEW/OLD        p "
        " memory NEW/OLD  verdict",
    ]
    assert lines[9:] == [
        "  ms           fused          cpu             2         3       x1.50 [1.40, 1.60]   0.0012"
        "           x1.20  REGRESSION: time x1.50; memory +2.0 MB",
        "  ms           monai_dice     cpu          10.5      9.45       x0.90 [0.85, 0.95]        -"
        "       x2.00 rss  baseline, not gated",
        "  shanel       fused          cuda            -         -              ok -> error        -"
        "               -  REGRESSION: status ok -> error",
        "  big          vectorized     cpu      1.23e+05  6.17e+04       x0.50 [0.45, 0.55]        1"
        "               -  improvement; absolute time: drift not cancelled (noisy)",
        "host cost proxy: 2.00x -> 4.00x, NEW/OLD x2.00 [1.90, 2.10] p=0.0004 REGRESSION",
        "only in OLD (not compared): a/naive/cpu, b/fused/cuda",
        "3 regressions: ms/fused/cpu, shanel/fused/cuda, host cost proxy/fused/cpu",
        "",
    ]


def test_table_text_same_machine_no_regression():
    cmp = {"rows": [{"case": "ms", "impl": "fused", "device": "cpu", "old_status": "ok", "new_status": "ok",
                     "verdict": "", "why": [], "time_ratio": 1.0, "time_lo": 0.99, "time_hi": 1.01, "time_p": 0.4,
                     "old_median_s": 0.002, "new_median_s": 0.002, "time_basis": "/ monai_dice"}],
           "threshold": 0.2, "mem_threshold": 0.05, "mem_floor_bytes": 2**19, "only_old": [],
           "only_new": [["n", "fused", "cpu"]], "old_machine": "box", "new_machine": "box", "same_machine": True,
           "planted": {"OLD": None, "NEW": 1.0}, "regressions": []}
    text = format_compare(cmp, "a", "b")
    lines = text.split("\n")
    assert lines[2] == "machine: box" and "WARNING" not in text and "host cost proxy" not in text
    # no "factor"/"alpha" recorded: the factor is 1 + threshold, alpha the default
    assert "regression: > x1.20 and p < 0.01. memory: allocator bytes of one call; regression: +5% and > 0.5 MB." \
        in lines[3]
    assert lines[5] == ("  ms           fused          cpu             2         2       x1.00 [0.99, 1.01]      0.4"
                        "               -  ")
    assert lines[6:] == ["only in NEW (not compared): n/fused/cpu", "0 regressions", ""]
    cmp["regressions"] = [{"case": "ms", "impl": "fused", "device": "cpu"}]
    cmp["host_proxy"] = {"old": 2.0, "new": 2.1, "ratio": 1.05, "lo": 0.9, "hi": 1.2, "verdict": ""}
    lines = format_compare(cmp, "a", "b").split("\n")
    # a proxy without its p shows p=1
    assert lines[-4:] == ["host cost proxy: 2.00x -> 2.10x, NEW/OLD x1.05 [0.90, 1.20] p=1 ",
                          "only in NEW (not compared): n/fused/cpu", "1 regression: ms/fused/cpu", ""]


# ----------------------------------------------------------------------------- the plot

@pytest.fixture
def captured(monkeypatch):
    """The figure plot_compare saves, kept open for inspection."""
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    figs = []
    save = matplotlib.figure.Figure.savefig

    def savefig(self, *a, **kw):
        figs.append((self, kw))
        return save(self, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return figs


def _png_size(path):
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _cmp_for_plot():
    rows = [
        {"case": "ms", "impl": "fused", "device": "cpu", "time_ratio": 1.5, "time_lo": 1.2, "time_hi": 1.8,
         "time_verdict": "regression", "memory_ratio": 1.2, "memory_verdict": "regression"},
        {"case": "ms", "impl": "monai_dice", "device": "cpu", "time_ratio": 0.8, "time_lo": 0.7, "time_hi": 0.9,
         "time_verdict": "", "memory_ratio": 1.0, "noisy": True},
        {"case": "big", "impl": "fused", "device": "cuda", "time_ratio": 0.9, "time_lo": 0.8, "time_hi": 1.0,
         "time_verdict": "improvement", "memory_ratio": math.inf, "memory_verdict": ""},
        {"case": "shanel", "impl": "fused", "device": "cpu", "old_status": "ok", "new_status": "error"},
    ]
    return {"rows": rows, "threshold": 0.15, "mem_threshold": 0.1, "regressions": [rows[0], rows[3]],
            "same_machine": True, "old_machine": "box", "new_machine": "box"}


def test_plot_content(tmp_path, captured):
    import matplotlib.colors as mcolors

    path = tmp_path / "cmp.png"
    assert plot_compare(_cmp_for_plot(), path, "runs/old", "runs/new") == str(path)
    # 13 x max(3, 0.32 * 3 rows + 1.8) inches at 110 dpi
    assert _png_size(path) == (1430, 330)
    (fig, kw), = captured
    t_ax, m_ax = fig.axes
    red, green, gray = (mcolors.to_rgba(c) for c in ("tab:red", "tab:green", "tab:gray"))

    # both axes: log scale, symmetric about 1, the band within the threshold, the line at 1
    assert t_ax.get_xscale() == m_ax.get_xscale() == "log"
    # time: the interval ends 0.7 .. 1.8 and 1/1.15 .. 1.15: lim = max(1.8, 1 / 0.7) * 1.25 = 2.25
    assert t_ax.get_xlim() == pytest.approx((1 / 2.25, 2.25))
    assert list(t_ax.get_xticks()) == pytest.approx([0.5, 2 / 3, 1.0, 1.5, 2.0])
    # memory: 1.2, 1.0 (inf left out) and 1/1.1 .. 1.1: lim = 1.2 * 1.25 = 1.5, ticks at the band and 1
    assert m_ax.get_xlim() == pytest.approx((1 / 1.5, 1.5))
    assert list(m_ax.get_xticks()) == pytest.approx([1 / 1.1, 1.0, 1.1])
    for ax, thr in ((t_ax, 0.15), (m_ax, 0.1)):
        (band,) = ax.patches
        xs = band.get_xy()[:, 0] if hasattr(band, "get_xy") and not hasattr(band, "get_width") else \
            [band.get_x(), band.get_x() + band.get_width()]
        assert min(xs) == pytest.approx(1 / (1 + thr)) and max(xs) == pytest.approx(1 + thr)
        assert mcolors.to_rgba(band.get_facecolor()) == pytest.approx(mcolors.to_rgba("0.92"))
        assert band.get_label() == f"within ±{round(thr * 100)}%"
        vlines = [ln for ln in ax.lines if list(ln.get_xdata()) == [1, 1]]
        assert len(vlines) == 1 and mcolors.to_rgba(vlines[0].get_color()) == (0, 0, 0, 1)
        assert ax.xaxis.get_major_formatter()(0.6666666, 0) == "0.667"
        assert ax.xaxis.get_minor_formatter()(0.3, 0) == ""

    # time: one point per row with a result, at (ratio, row), with its interval, coloured by verdict;
    # open (no face colour) when noisy
    points = [c for c in t_ax.containers]
    assert len(points) == 3
    for y, (c, x, lo, hi, color, face) in enumerate(zip(points, (1.5, 0.8, 0.9), (1.2, 0.7, 0.8), (1.8, 0.9, 1.0),
                                                        (red, gray, green), (red, "none", green))):
        line = c.lines[0]
        assert list(line.get_xdata()) == pytest.approx([x]) and list(line.get_ydata()) == [y]
        assert mcolors.to_rgba(line.get_color()) == color
        assert line.get_markerfacecolor() == face if face == "none" else \
            mcolors.to_rgba(line.get_markerfacecolor()) == face
        assert len(c.lines[1]) == 2                      # the interval's caps
        segs = c.lines[2][0].get_segments()
        assert [s[0] for s in segs[0]] == pytest.approx([lo, hi]) and [s[1] for s in segs[0]] == [y, y]
    # memory: squares, the infinite ratio left out
    squares = [ln for ln in m_ax.lines if ln.get_marker() == "s"]
    assert [(list(s.get_xdata()), list(s.get_ydata())) for s in squares] == [([1.2], [0]), ([1.0], [1])]
    assert [mcolors.to_rgba(s.get_color()) for s in squares] == [red, gray]

    # labels, titles, legend, the row names top to bottom
    assert t_ax.get_xlabel() == ("median time: NEW / OLD (log scale) of ours / its baseline — bars: 95% bootstrap "
                                 "interval; open: noisy")
    assert m_ax.get_xlabel() == "peak memory: NEW / OLD (log scale)"
    assert (t_ax.get_title(), m_ax.get_title()) == ("time", "peak memory above the inputs")
    assert t_ax.title.get_fontsize() == 10
    assert [t.get_text() for t in t_ax.get_yticklabels()] == ["ms fused cpu", "ms monai_dice cpu", "big fused cuda"]
    assert list(t_ax.get_yticks()) == [0, 1, 2] and t_ax.yaxis_inverted()
    assert t_ax.get_legend() is not None and [t.get_text() for t in t_ax.get_legend().get_texts()] == ["within ±15%"]
    assert m_ax.get_legend() is None
    assert fig._suptitle.get_text() == ("blobbench compare: NEW / OLD per case, implementation and device; red: "
                                        "regression (2), green: improvement\nOLD runs/old\nNEW runs/new\nmachine: box")
    assert fig._suptitle.get_fontsize() == 9 and t_ax.get_legend().get_texts()[0].get_fontsize() == 8
    assert {t.get_fontsize() for t in t_ax.get_yticklabels()} == {8}
    assert kw.get("dpi") == 110


def test_plot_axes_for_large_ratios_and_other_machines(tmp_path, captured):
    cmp = _cmp_for_plot()
    cmp["rows"][0] |= {"time_ratio": 40.0, "time_lo": 30.0, "time_hi": 50.0, "memory_ratio": 0.01}
    cmp["rows"][1] |= {"memory_ratio": 0.0}          # no place on a log axis: left out
    cmp |= {"same_machine": False, "old_machine": "A", "new_machine": "B"}
    plot_compare(cmp, tmp_path / "c.png", "o", "n")
    (fig, _), = captured
    t_ax, m_ax = fig.axes
    # time: lim = 50 * 1.25 = 62.5 > 20: decade ticks inside [1/62.5, 62.5]
    assert t_ax.get_xlim() == pytest.approx((1 / 62.5, 62.5))
    assert list(t_ax.get_xticks()) == pytest.approx([0.1, 1.0, 10.0])
    # memory: 1/0.01 * 1.25 = 125
    assert m_ax.get_xlim() == pytest.approx((1 / 125, 125))
    assert list(m_ax.get_xticks()) == pytest.approx([0.01, 0.1, 1.0, 10.0, 100.0])
    assert [list(ln.get_xdata()) for ln in m_ax.lines if ln.get_marker() == "s"] == [[0.01]]
    assert fig._suptitle.get_text().endswith("\nOLD o\nNEW n\ndifferent machines: OLD A; NEW B")


@pytest.mark.parametrize("hi, ticks", [
    # lim = 14.4 * 1.25 = 18: every tick of the list from 1/16 to 16, symmetric about 1
    (14.4, [1 / 16, 1 / 8, 0.25, 0.5, 2 / 3, 1.0, 1.5, 2.0, 4.0, 8.0, 16.0]),
    # lim = 1e8 * 1.25: the decades from 1e-6 to 1e6, symmetric about 1
    (1e8, [10.0 ** k for k in range(-6, 7)]),
])
def test_plot_ticks_are_symmetric_about_1(tmp_path, captured, hi, ticks):
    cmp = _cmp_for_plot()
    cmp["rows"][0] |= {"time_ratio": hi / 2, "time_lo": 1.0, "time_hi": hi}
    plot_compare(cmp, tmp_path / "c.png", "o", "n")
    (fig, _), = captured
    got = list(fig.axes[0].get_xticks())
    assert got == pytest.approx(ticks)
    assert sorted(1 / t for t in got) == pytest.approx(got)


def test_plot_of_many_rows_grows_in_height(tmp_path, captured):
    cmp = _cmp_for_plot()
    cmp["rows"] = [dict(cmp["rows"][1], case=f"c{i}") for i in range(10)]
    plot_compare(cmp, tmp_path / "c.png", "o", "n")
    # 0.32 * 10 + 1.8 = 5 inches at 110 dpi
    assert _png_size(tmp_path / "c.png") == (1430, 550)

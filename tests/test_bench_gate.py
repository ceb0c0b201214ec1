"""Issue 22: the regression gate. ``blobbench compare`` judges ours relative to a baseline measured
in the same run (a ratio of ratios), with a factor and a Mann-Whitney p-value; memory by the
allocator's bytes; whole-measurement outliers re-measured against an interleaved measurement;
a planted slowdown for the gate's experiment, recorded in result.json."""
import json
import math
import random

import numpy as np
import pytest
import torch

import blobbench
from blobbench.bench import bench
from blobbench.bench.cli import main
from blobbench.bench.compare import change_test, compare_runs, mann_whitney_greater, relative_samples
from blobbench.bench.noise import interleaved_reasons, remeasure_noisy, summarize_times
from blobbench.bench.report import ratios
from blobbench.bench.synthetic import grid_instances


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOBBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BLOBBENCH_PLANT_SLOWDOWN", raising=False)


# ----------------------------------------------------------------------------- synthetic runs

MEDIANS_MS = {("ms", "fused"): 20.0, ("ms", "fused_dice_ce"): 45.0, ("ms", "monai_dice"): 30.0,
              ("ms", "monai_dice_ce"): 60.0, ("shanel", "fused"): 8.0, ("shanel", "monai_dice"): 12.0}
GROUPS = {"ms": [["monai_dice", "fused"], ["monai_dice_ce", "fused_dice_ce"]], "shanel": [["monai_dice", "fused"]]}


def _run(seed, drift=1.0, ours=1.0, only=None, noise=0.04, reps=20, paired=True, rounds_drift=0.0, alloc=None):
    """A gate-like result: every group's repetitions interleaved (paired), per-repetition times
    with log-normal noise, a common factor ``drift`` (the machine), an extra factor ``ours`` on the
    fused ops (all of them, or the (case, impl) in ``only``), and, with ``rounds_drift``, a
    slow wander of the machine over the repetitions that hits every implementation of a round alike."""
    rng = random.Random(seed)
    wander = [math.exp(rounds_drift * math.sin(r / 3.0 + seed)) for r in range(reps)]
    ms = []
    for case, groups in GROUPS.items():
        for g in groups:
            for impl in g:
                f = drift * (ours if impl.startswith("fused") and (only is None or (case, impl) in only) else 1.0)
                times = [MEDIANS_MS[(case, impl)] / 1e3 * f * wander[r] * math.exp(rng.gauss(0, noise))
                         for r in range(reps)]
                m = {"case": case, "kind": "profile", "impl": impl, "device": "cpu", "status": "ok",
                     "times_s": times, **summarize_times(times), "peak_bytes": 50 * 2**20 + rng.randrange(2**24),
                     "alloc_peak_bytes": (alloc or {}).get((case, impl), 10 * 2**20)}
                if paired:
                    m["interleaved"] = g
                ms.append(m)
    return {"machine": {"summary": "test machine"}, "settings": {"devices": ["cpu"]}, "run": {},
            "cases": [{"name": c, "kind": "profile", "shape": [1, 1, 8, 8, 8], "blobs": [3], "meta": {}}
                      for c in GROUPS], "measurements": ms, "checks": {}, "host_proxy": None}


def _flagged(cmp):
    return sorted((r["case"], r["impl"]) for r in cmp["regressions"])


def test_identical_samples_are_no_regression():
    run = _run(0)
    cmp = compare_runs(run, json.loads(json.dumps(run)))
    assert not cmp["regressions"]
    row = next(r for r in cmp["rows"] if (r["case"], r["impl"]) == ("ms", "fused"))
    assert row["time_ratio"] == pytest.approx(1.0) and row["time_lo"] <= 1.0 <= row["time_hi"]
    assert row["time_basis"] == "/ monai_dice (paired)" and row["memory_ratio"] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_fresh_noise_on_the_same_code_is_no_regression(seed):
    assert not compare_runs(_run(seed), _run(100 + seed))["regressions"]


@pytest.mark.parametrize("drift", [0.7, 1.3, 1.6])
def test_drift_that_moves_baselines_and_ours_together_is_no_regression(drift):
    old, new = _run(1), _run(2, drift=drift, rounds_drift=0.2)
    cmp = compare_runs(old, new)
    assert not cmp["regressions"]
    # the old absolute rule would have cried wolf: every row moved by the drift
    for r in cmp["rows"]:
        assert abs(math.log(r["abs_time_ratio"] / drift)) < 0.1
        if r["gated"]:
            assert abs(math.log(r["time_ratio"])) < 0.1
    # the baselines moved, and are reported, never gated
    base = [r for r in cmp["rows"] if r["impl"].startswith("monai")]
    assert base and all(not r["gated"] and r["verdict"] == "" for r in base)


def test_drift_without_pairing_is_cancelled_too():
    old, new = _run(3, paired=False), _run(4, drift=1.4, paired=False)
    cmp = compare_runs(old, new)
    assert not cmp["regressions"]
    assert all(r["time_basis"] in ("/ monai_dice", "/ monai_dice_ce") for r in cmp["rows"] if r["gated"])


@pytest.mark.parametrize("drift", [1.0, 0.8, 1.25])
def test_a_1_3x_slowdown_of_ours_only_is_a_regression(drift):
    old, new = _run(5), _run(6, drift=drift, ours=1.3, only={("ms", "fused")})
    cmp = compare_runs(old, new)
    assert _flagged(cmp) == [("ms", "fused")]
    row = cmp["regressions"][0]
    assert 1.2 < row["time_ratio"] < 1.4 and row["time_lo"] > 1.0 and row["time_p"] < 0.01
    assert "time x1.3" in row["why"][0]


def test_a_change_below_the_factor_is_not_flagged_however_clear():
    old, new = _run(7, noise=0.005), _run(8, ours=1.08, noise=0.005)
    cmp = compare_runs(old, new)
    rows = [r for r in cmp["rows"] if r["gated"]]
    assert not cmp["regressions"] and all(r["time_p"] < 1e-4 for r in rows)   # clear, but small
    assert _flagged(compare_runs(old, new, threshold=0.05))                  # a lower factor flags it


def test_a_large_change_that_the_noise_explains_is_not_flagged():
    old = _run(9, noise=0.6, reps=4)
    new = _run(10, noise=0.6, reps=4, ours=1.2)
    for r in compare_runs(old, new)["rows"]:
        if r["verdict"] == "regression":   # flagged only when the test is clear too
            assert r["time_p"] < 0.01


def test_an_improvement_is_reported_not_a_regression():
    cmp = compare_runs(_run(11), _run(12, ours=0.6))
    assert not cmp["regressions"]
    assert all(r["verdict"] == "improvement" for r in cmp["rows"] if r["gated"])


def test_mann_whitney_one_sided():
    a = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert mann_whitney_greater(a, [x + 10 for x in a]) < 0.01
    assert mann_whitney_greater([x + 10 for x in a], a) > 0.99
    assert 0.3 < mann_whitney_greater(a, list(a)) < 0.7
    assert mann_whitney_greater([1.0], [2.0]) == 1.0
    t = change_test([0.0] * 3 + [0.01] * 3, [math.log(2)] * 3 + [math.log(2) + 0.01] * 3)
    assert t["ratio"] == pytest.approx(2.0, rel=0.01) and t["lo"] > 1.9 and t["p_slower"] < 0.01


def test_relative_samples_pair_by_repetition_when_interleaved():
    o = {"impl": "fused", "times_s": [1.0, 2.0, 4.0], "interleaved": ["monai_dice", "fused"]}
    b = {"impl": "monai_dice", "times_s": [2.0, 4.0, 8.0]}
    assert relative_samples(o, b) == pytest.approx([math.log(0.5)] * 3)       # each round's drift cancels
    o.pop("interleaved")
    assert relative_samples(o, b) == pytest.approx([math.log(x / 4.0) for x in (1.0, 2.0, 4.0)])


# ----------------------------------------------------------------------------- memory and status

def test_memory_gates_allocator_bytes_of_ours_only():
    old = _run(13)
    # peak RSS differs in every synthetic run (as glibc makes it): never a regression by itself
    assert not compare_runs(old, _run(14))["regressions"]
    grown = _run(14, alloc={("ms", "fused"): 20 * 2**20, ("ms", "monai_dice"): 40 * 2**20})
    cmp = compare_runs(old, grown)
    assert _flagged(cmp) == [("ms", "fused")] and "allocator bytes" in cmp["regressions"][0]["why"][0]
    monai = next(r for r in cmp["rows"] if (r["case"], r["impl"]) == ("ms", "monai_dice"))
    assert monai["memory_ratio"] == 4.0 and monai["verdict"] == ""


def test_status_lost_by_ours_is_a_regression_by_a_baseline_only_on_error():
    old = _run(15)
    for impl, status, flagged in (("fused", "out of memory", True), ("monai_dice", "over budget", False),
                                  ("monai_dice", "error", True)):
        new = _run(16)
        for m in new["measurements"]:
            if (m["case"], m["impl"]) == ("shanel", impl):
                m["status"] = status
        assert bool(compare_runs(old, new)["regressions"]) == flagged, (impl, status)


def test_planted_runs_are_named_in_the_comparison(tmp_path, capsys):
    old, new = _run(17), _run(18, ours=1.3)
    new["run"]["planted_slowdown"] = 1.3
    for name, r in (("old", old), ("new", new)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps(r))
    assert main(["compare", str(tmp_path / "old"), str(tmp_path / "new"), "--no-plots",
                 "--out", str(tmp_path / "c")]) == 1
    out = capsys.readouterr().out
    assert "NEW ran with a PLANTED SLOWDOWN x1.3" in out and "baseline, not gated" in out


# ----------------------------------------------------------------------------- whole-measurement outliers

def _meas(case, impl, median_ms):
    times = [median_ms / 1e3 * f for f in (0.99, 1.0, 1.01)]
    return {"case": case, "kind": "profile", "impl": impl, "device": "cpu", "status": "ok", "times_s": times,
            "peak_bytes": 2**20, **summarize_times(times)}


def test_a_whole_measurement_outlier_is_caught_remeasured_and_kept_out_of_the_headline():
    # MONAI DiceLoss slow in every repetition (tight spread): 80 ms where it takes 14 ms
    ms = [_meas("ms", "fused", 7.0), _meas("ms", "vectorized", 40.0), _meas("ms", "monai_dice", 80.0)]
    cases = [{"name": "ms", "kind": "profile", "sweep_x": 0, "shape": [1, 1, 8, 8, 8], "blobs": [3], "meta": {}}]
    # interleaved in one process, the machine 10 % slower at the time: a common drift, not an outlier
    reference = {("ms", "fused", "cpu"): 7.7e-3, ("ms", "vectorized", "cpu"): 44e-3, ("ms", "monai_dice", "cpu"): 15.4e-3}
    reasons = interleaved_reasons(ms, reference)
    assert list(reasons) == [2] and "interleaved" in reasons[2][0]
    assert not interleaved_reasons(ms[:2], reference)                        # the others are fine
    calls = []

    def measure(case, impl, device):
        calls.append(impl)
        return _meas(case, impl, 14.0)

    out = remeasure_noisy(ms, cases, measure, reference=reference)
    assert calls == ["monai_dice"]
    assert out[2]["median_s"] == pytest.approx(14e-3) and out[2]["noisy"] == []
    assert out[2]["attempts"][0]["median_s"] == pytest.approx(80e-3)
    result = {"cases": cases, "settings": {"devices": ["cpu"]}, "measurements": out}
    row = ratios(result, "dice")[0]
    assert row["time_over_monai"] == pytest.approx(0.5)                     # not 7 / 80


# ----------------------------------------------------------------------------- the engine

def test_allocator_bytes_count_what_the_call_allocates():
    n = 1 << 16
    x = torch.randn(n, requires_grad=True)
    inst = torch.zeros(n, dtype=torch.int32)
    got = bench.allocator_memory(lambda a, i: a.sigmoid().sum(), x, inst)
    # sigmoid's output (n floats), saved for the backward, and the gradient (n floats) live together
    assert 2 * 4 * n <= got["alloc_peak_bytes"] < 2 * 4 * n + 4096
    twice = bench.allocator_memory(lambda a, i: (a.sigmoid() * a.sigmoid()).sum(), x, inst)
    assert twice["alloc_peak_bytes"] > got["alloc_peak_bytes"] + 4 * n       # more saved, more counted
    assert got["alloc_total_bytes"] >= got["alloc_peak_bytes"] and got["alloc_count"] >= 2


def test_fused_memory_is_identical_across_runs(tmp_path):
    """Allocator bytes of the fused ops: the same in two separate measurement processes."""
    runner = bench.Runner(threads=1, reps=2, max_case_s=5.0, time_budget_s=60.0, mem_budget_bytes=0)
    inst = torch.from_numpy(grid_instances((16, 32, 32), 6, seed=3))[None, None]
    case = bench._save_case(bench.Case("tiny", "profile", (), []), torch.randn(inst.shape), inst, str(tmp_path))
    runs = [runner.measure_group(case, ["monai_dice", "fused", "fused_dice_ce"], "cpu") for _ in range(2)]
    for a, b in zip(*runs):
        assert a["status"] == "ok" and b["status"] == "ok", (a.get("error"), b.get("error"))
        assert a["interleaved"] == ["monai_dice", "fused", "fused_dice_ce"] and len(a["times_s"]) == 2
        if a["impl"].startswith("fused"):
            assert a["alloc_peak_bytes"] == b["alloc_peak_bytes"] > 4 * inst.numel()   # the gradient at least
            assert a["alloc_total_bytes"] == b["alloc_total_bytes"]
    one = runner.measure(case, "fused", "cpu")
    assert one["alloc_peak_bytes"] == runs[0][1]["alloc_peak_bytes"]           # and in a single measurement


def test_planted_slowdown_switch(monkeypatch):
    assert bench.planted_slowdown() == 1.0
    monkeypatch.setenv("BLOBBENCH_PLANT_SLOWDOWN", "1.3")
    assert bench.planted_slowdown() == 1.3
    for bad in ("0.5", "x", "nan", "inf"):
        monkeypatch.setenv("BLOBBENCH_PLANT_SLOWDOWN", bad)
        with pytest.raises(ValueError, match="BLOBBENCH_PLANT_SLOWDOWN"):
            bench.planted_slowdown()


def test_bad_planted_slowdown_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("BLOBBENCH_PLANT_SLOWDOWN", "fast")
    with pytest.raises(SystemExit) as e:
        main(["--gate", "--out", "nowhere"])
    assert e.value.code == 2 and "BLOBBENCH_PLANT_SLOWDOWN" in capsys.readouterr().err


def test_gate_run_records_a_planted_slowdown(tmp_path, monkeypatch, capsys):
    np.save(tmp_path / "tiny.npy", (grid_instances((8, 24, 24), 5, seed=1) > 0).astype(np.uint8))
    argv = ["--gate", "--profiles", "none", "--labels", str(tmp_path / "tiny.npy"), "--labels-profile", "shanel",
            "--crops", "1", "--reps", "3", "--out", str(tmp_path / "runs")]
    assert main(argv + ["--name", "plain"]) == 0
    monkeypatch.setenv("BLOBBENCH_PLANT_SLOWDOWN", "2")
    assert main(argv + ["--name", "planted"]) == 0
    assert "PLANTED SLOWDOWN x2" in capsys.readouterr().out
    plain = json.load(open(tmp_path / "runs" / "plain" / "result.json"))
    planted = json.load(open(tmp_path / "runs" / "planted" / "result.json"))
    assert plain["run"]["planted_slowdown"] == 1.0 and plain["run"]["gate"]
    assert planted["run"]["planted_slowdown"] == 2.0
    impls = {m["impl"]: m for m in planted["measurements"]}
    assert set(impls) == {"monai_dice", "fused", "fused_tversky", "monai_dice_ce", "fused_dice_ce"}
    assert impls["fused"]["planted_slowdown"] == 2.0 and "planted_slowdown" not in impls["monai_dice"]
    assert impls["fused"]["interleaved"] == ["monai_dice", "fused", "fused_tversky", "monai_dice_ce", "fused_dice_ce"]
    assert plain["settings"]["threads"] == 1 and plain["settings"]["reps"] == 3
    for m in plain["measurements"]:
        assert m["alloc_peak_bytes"] == impls[m["impl"]]["alloc_peak_bytes"]   # planting changes no memory
    assert blobbench.has_cuda_kernels() in (True, False)

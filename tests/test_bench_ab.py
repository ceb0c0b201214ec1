"""Issue 22: ``blobbench ab BASE``, the A/B gate: base and head measured interleaved in one run by
two workers, judged on the per-pair log ratios head/base. The statistic is held to planted
synthetic samples (no clock involved); the workers and the base export are checked for what they
do, never for how fast."""
import json
import math
import random
import subprocess
from pathlib import Path

import pytest
import torch

from blobbench.bench import ab
from blobbench.bench.ab import (DEFAULT_AB_FACTOR, BaseError, WorkerError, judge_memory, judge_time, paired_test,
                                prepare_base, run_ab, wilcoxon_greater)
from blobbench.bench.cli import main
from blobbench.bench.synthetic import grid_instances

ROOT = Path(__file__).resolve().parents[1]


def _pairs(seed, n=30, head=1.0, noise=0.05, drift=None, base_ms=10.0):
    """``n`` (base, head) pairs: log-normal noise per call, a factor ``head`` on head only and a
    machine factor ``drift(r)`` that hits both calls of pair r alike (they run milliseconds apart)."""
    rng = random.Random(seed)
    b, h = [], []
    for r in range(n):
        m = drift(r) if drift else 1.0
        b.append(base_ms / 1e3 * m * math.exp(rng.gauss(0, noise)))
        h.append(base_ms / 1e3 * m * head * math.exp(rng.gauss(0, noise)))
    return b, h


def _verdict(b, h, **kw):
    return judge_time(paired_test(b, h), **kw)


# ----------------------------------------------------------------------------- the statistic

def test_identical_samples_are_no_regression():
    b, _ = _pairs(0)
    t = paired_test(b, list(b))
    assert t["ratio"] == 1.0 and t["lo"] == 1.0 == t["hi"] and t["p_slower"] == 1.0
    assert judge_time(t) == ""


@pytest.mark.parametrize("seed", range(8))
def test_fresh_noise_on_the_same_code_is_no_regression(seed):
    b, h = _pairs(seed, noise=0.08)
    assert _verdict(b, h) == ""


@pytest.mark.parametrize("drift", [
    lambda r: 2.0 if r >= 15 else 1.0,                  # the machine halves its speed half-way through
    lambda r: math.exp(0.8 * math.sin(r / 2.0)),          # a wander of x0.45-2.2
    lambda r: 1.0 + r / 10,                               # a steady slow-down to x3.9
])
def test_drift_that_moves_base_and_head_together_is_no_regression(drift):
    b, h = _pairs(1, drift=drift)
    t = paired_test(b, h)
    assert judge_time(t) == "" and abs(math.log(t["ratio"])) < 0.05
    assert max(b) / min(b) > 1.9                      # while each side alone moved by about 2x or more


@pytest.mark.parametrize("drift", [None, lambda r: 2.0 if r % 7 < 3 else 1.0])
def test_a_1_3x_slowdown_of_head_only_is_a_regression(drift):
    b, h = _pairs(2, head=1.3, drift=drift)
    t = paired_test(b, h)
    assert judge_time(t) == "regression"
    assert 1.2 < t["ratio"] < 1.4 and t["lo"] > 1.0 and t["p_slower"] < 1e-4


def test_an_improvement_is_the_mirror_image():
    b, h = _pairs(3, head=0.7)
    assert _verdict(b, h) == "improvement"
    assert _verdict(h, b) == "regression"


def test_a_ratio_above_the_factor_whose_interval_straddles_1_is_not_flagged():
    # 16 pairs at +0.2 (x1.22), 14 at -0.6: median x1.22, but resampled the median often falls on -0.6
    d = [0.2] * 16 + [-0.6] * 14
    b = [0.01] * len(d)
    h = [0.01 * math.exp(x) for x in d]
    t = paired_test(b, h)
    assert t["ratio"] > DEFAULT_AB_FACTOR and t["lo"] < 1.0 < t["hi"]
    assert judge_time(t) == ""


def test_the_factor_exactly_is_not_above_it():
    b = [1.0] * 30
    t = paired_test(b, [1.1] * 30)
    assert t["lo"] > 1.0 and t["p_slower"] < 1e-4                           # clear, and exactly x1.1
    assert judge_time(t, factor=1.1) == ""
    assert judge_time(paired_test(b, [1.1000001] * 30), factor=1.1) == "regression"
    assert judge_time(paired_test([1.1] * 30, b), factor=1.1) == ""          # nor its mirror image


def test_a_handful_of_pairs_is_never_a_regression():
    # the pilot's false alarm: 2 pairs, both slower; their bootstrap interval is degenerate
    t = paired_test([5.83e-3, 6.0e-3], [8.3e-3, 8.0e-3])
    assert t["lo"] > 1.0 and t["ratio"] > 1.3 and t["p_slower"] > 0.01
    assert judge_time(t) == ""


def test_wilcoxon_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(4)
    for shift in (0.0, 0.1, -0.05, 0.3):
        d = [round(rng.gauss(shift, 0.2), 2) for _ in range(25)]   # rounded: ties included
        d = [x for x in d if x != 0]
        want = stats.wilcoxon(d, alternative="greater", method="approx", correction=True).pvalue
        assert wilcoxon_greater(d) == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_paired_test_rejects_unpaired_or_bad_samples():
    with pytest.raises(ValueError, match="as many base as head"):
        paired_test([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="positive"):
        paired_test([1.0, 0.0], [1.0, 1.0])


def test_paired_interval_is_reproducible():
    b, h = _pairs(5, head=1.05)
    assert paired_test(b, h) == paired_test(b, h)


# ----------------------------------------------------------------------------- memory

MB = 2**20


def test_memory_growth_above_the_floor_but_under_the_relative_threshold_is_not_flagged():
    assert judge_memory(100 * MB, 105 * MB) == ""           # +5 MB, but +5 %


def test_memory_growth_above_the_relative_threshold_but_under_the_floor_is_not_flagged():
    assert judge_memory(2 * MB, 2 * MB + MB // 2) == ""      # +25 %, but 0.5 MB


def test_memory_growth_above_both_is_flagged_and_the_edges_are_not():
    assert judge_memory(10 * MB, 12 * MB) == "regression"
    assert judge_memory(12 * MB, 10 * MB) == "improvement"
    assert judge_memory(10 * MB, 11 * MB) == ""              # +1 MB = the floor, +10 % = the threshold
    assert judge_memory(20 * MB, 22 * MB) == ""              # +10 % exactly
    assert judge_memory(20 * MB, 22 * MB + 1) == "regression"
    assert judge_memory(0, 0) == ""


# ----------------------------------------------------------------------------- workers and the base tree

@pytest.fixture
def tiny_case(tmp_path):
    inst = torch.from_numpy(grid_instances((8, 16, 16), 4, seed=1))[None, None]
    path = tmp_path / "tiny.pt"
    torch.save((torch.randn(inst.shape), inst), path)
    return [("tiny", str(path))]


def test_run_ab_alternates_two_workers_and_plants_in_head_only(tmp_path, tiny_case):
    res = run_ab(ROOT, ROOT, tiny_case, ["fused", "fused_dice_ce"], reps=4, workdir=tmp_path,
                 plant={"fused": 1.5}, cpu=None)
    assert res["plant"] == {"fused": 1.5} and res["factor"] == DEFAULT_AB_FACTOR
    for s in ("base", "head"):
        assert res["workers"][s]["blobbench"] == str(ROOT / "blobbench" / "__init__.py")
        assert res["workers"][s]["threads"] == 1
    assert [r["impl"] for r in res["rows"]] == ["fused", "fused_dice_ce"]
    for r in res["rows"]:
        assert r["status"] == "ok" and len(r["base"]) == len(r["head"]) == 4
        assert r["first"] == ["base", "head", "base", "head"]                 # ABBA: who ran first, per pair
        assert r["time"]["pairs"] == 4
        # the same code in two processes allocates the same bytes
        assert r["base_alloc_peak_bytes"] == r["head_alloc_peak_bytes"] > 4 * 8 * 16 * 16
        assert r["memory_verdict"] == ""
        assert r["verdict"] == ""                                            # 4 pairs: never a regression


def test_an_op_the_base_lacks_fails_its_rows_only(tmp_path, tiny_case):
    fake = tmp_path / "old"
    (fake / "blobbench").mkdir(parents=True)
    # an "old revision" that has blob_dice (a stand-in) and no blob_tversky
    (fake / "blobbench" / "__init__.py").write_text("def blob_dice(x, inst):\n    return x.sigmoid().mean()\n")
    res = run_ab(fake, ROOT, tiny_case, ["fused", "fused_tversky"], reps=2, workdir=tmp_path, cpu=None)
    rows = {r["impl"]: r for r in res["rows"]}
    assert rows["fused"]["status"] == "ok"
    assert rows["fused_tversky"]["status"] == "error in base" and rows["fused_tversky"]["verdict"] == ""
    assert "no blob_tversky" in rows["fused_tversky"]["why"][0] and not res["regressions"]


def test_a_tree_without_blobbench_is_a_clear_worker_error(tmp_path, tiny_case):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WorkerError) as e:
        run_ab(tmp_path / "empty", ROOT, tiny_case, ["fused"], reps=2, workdir=tmp_path, cpu=None)
    assert e.value.side == "base" and "blobbench" in str(e.value)


def test_prepare_base_exports_the_commit_and_copies_an_identical_build(tmp_path):
    ext = ab.head_extension(ROOT)
    if ext is None:
        pytest.skip("the working tree's extension is not built in place")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0 or not ab.build_files_equal(ROOT, head.stdout.strip()):
        pytest.skip("not a git checkout, or csrc/ and setup.py differ from HEAD here: the copy does not apply")
    got = prepare_base("HEAD", ROOT, cache=tmp_path, log=lambda *a: None)
    tree = Path(got["tree"])
    assert got["commit"] == head.stdout.strip() and tree == tmp_path / got["commit"]
    assert got["extension"].startswith("copied from the working tree")
    assert (tree / "blobbench" / ext.name).read_bytes() == ext.read_bytes()
    shown = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:blobbench/losses.py"], capture_output=True,
                           text=True).stdout
    assert (tree / "blobbench" / "losses.py").read_text() == shown            # the commit's, not the tree's
    again = prepare_base(got["commit"], ROOT, cache=tmp_path, log=lambda *a: None)
    assert again["extension"].endswith("(cached)") and again["tree"] == got["tree"]


def test_prepare_base_names_a_bad_revision(tmp_path):
    with pytest.raises(BaseError, match="not a commit"):
        prepare_base("no-such-revision-xyz", ROOT, cache=tmp_path)


@pytest.mark.parametrize("bad, what", [(["--impls", "naive"], "--impls"), (["--factor", "1"], "--factor"),
                                       (["--reps", "1"], "--reps"), (["--profiles", "nope"], "--profiles"),
                                       (["--alpha", "2"], "--alpha"), (["--cpu", "x"], "--cpu")])
def test_bad_ab_arguments_are_usage_errors(bad, what, capsys):
    with pytest.raises(SystemExit) as e:
        main(["ab", "HEAD"] + bad)
    assert e.value.code == 2 and what in capsys.readouterr().err


def test_a_bad_base_revision_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BLOBBENCH_CACHE", str(tmp_path))
    assert main(["ab", "no-such-revision-xyz", "--out", str(tmp_path / "out")]) == 2
    assert "not a commit" in capsys.readouterr().err


def test_ab_result_is_json(tmp_path, tiny_case):
    res = run_ab(ROOT, ROOT, tiny_case, ["fused"], reps=2, workdir=tmp_path, cpu=None)
    json.dumps(res)

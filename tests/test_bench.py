"""The benchmark machinery: synthetic data, label files, budgets, the command and its report."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from bench_helpers import ROOT, asv_suite

import blobbench
from blobbench.bench import bench
from blobbench.bench.cli import main
from blobbench.bench.labelfiles import crops_from_labels, load_label_volume
from blobbench.bench.synthetic import PROFILES, grid_instances, profile_batch, synthetic_instances


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOBBENCH_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("n", [0, 1, 7, 64, 500])
def test_grid_instances_exact_count(n):
    a = grid_instances((16, 48, 48), n, seed=3)
    assert a.dtype == np.int32 and a.shape == (16, 48, 48)
    assert set(np.unique(a)) == set(range(n + 1))  # ids 1..n, each present


def test_generators_are_deterministic_and_cached(tmp_path):
    a = grid_instances((16, 32, 32), 20, seed=1)
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 1
    np.testing.assert_array_equal(a, grid_instances((16, 32, 32), 20, seed=1))        # from the cache
    np.testing.assert_array_equal(a, grid_instances((16, 32, 32), 20, seed=1, cache=False))  # regenerated
    assert not np.array_equal(a, grid_instances((16, 32, 32), 20, seed=2))
    b = synthetic_instances((16, 32, 32), 10, seed=0)
    np.testing.assert_array_equal(b, synthetic_instances((16, 32, 32), 10, seed=0, cache=False))


def test_grid_instances_too_many():
    with pytest.raises(ValueError, match="do not fit"):
        grid_instances((4, 4, 4), 50, seed=0)


def test_profile_sizes_are_heavy_tailed():
    _, inst = profile_batch("shanel", seed=0, batch=1)
    sizes = np.bincount(inst.numpy().ravel())[1:]
    sizes = sizes[sizes > 0]
    assert len(sizes) > 100
    # many tiny blobs, a few large ones
    assert np.median(sizes) < 60 and sizes.max() > 20 * np.median(sizes)


def test_label_files(tmp_path):
    vol = np.zeros((20, 40, 40), dtype=np.uint8)
    vol[2:5, 3:9, 3:9] = 1
    vol[10:14, 20:30, 20:25] = 2          # a second class counts as foreground too
    vol[15:17, 35:38, 1:3] = 1
    np.save(tmp_path / "a.npy", vol)
    np.savez(tmp_path / "b.npz", label=vol, image=vol.astype(float))
    np.savez(tmp_path / "c.npz", image=vol, other=vol)
    for f in ("a.npy", "b.npz"):
        np.testing.assert_array_equal(load_label_volume(tmp_path / f), vol)
    with pytest.raises(ValueError, match="key"):
        load_label_volume(tmp_path / "c.npz")
    np.testing.assert_array_equal(load_label_volume(tmp_path / "c.npz", key="other"), vol)
    np.save(tmp_path / "f.npy", vol.astype(float) + 0.5)
    with pytest.raises(ValueError, match="integers"):
        load_label_volume(tmp_path / "f.npy")
    with pytest.raises(ValueError, match="must be"):
        load_label_volume(tmp_path / "x.txt")
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "d.nii.gz"))
    np.testing.assert_array_equal(load_label_volume(tmp_path / "d.nii.gz"), vol)

    crops = crops_from_labels(vol, (8, 16, 16), 4, seed=0)
    assert crops.shape == (4, 1, 8, 16, 16) and crops.dtype == torch.int32
    assert all(int(c.max()) > 0 for c in crops)  # centred on foreground
    big = crops_from_labels(vol, (64, 64, 64), 1, seed=0)
    assert big.shape == (1, 1, 20, 40, 40) and int(big.max()) == 3  # clipped to the volume, cc3d ids


def _runner(**kw):
    args = dict(threads=1, reps=2, max_case_s=1.0, time_budget_s=60.0, mem_budget_bytes=0)
    args.update(kw)
    return bench.Runner(**args)


def test_runner_measures_and_checks(tmp_path):
    case = bench.instances_case(8, (8, 32, 32), 0, str(tmp_path))
    runner = _runner()
    r = runner.measure(case, "fused", "cpu")
    assert r["status"] == "ok", r
    assert r["reps"] == 2 and r["min_s"] <= r["median_s"] <= r["max_s"]
    assert r["peak_bytes"] >= 0
    r = runner.measure(case, "fused_dice_ce", "cpu")
    assert r["status"] == "ok" and r["reps"] == 2 and r["peak_bytes"] >= 0, r
    chk = runner.check(case, ["cpu"], ["dice", "tversky", "dice_ce"])
    assert chk["status"] == "ok", chk
    assert set(chk["checks"]) == {"dice/cpu", "tversky/cpu", "dice_ce/cpu"}
    assert chk["checks"]["dice/cpu"]["loss_rel_diff"] < 1e-5
    assert chk["checks"]["tversky/cpu"]["loss_rel_diff"] < 1e-5
    assert chk["checks"]["dice_ce/cpu"]["loss_rel_diff"] < 1e-5
    assert chk["checks"]["dice_ce/cpu"]["grad_max_abs_diff"] < 1e-4 * chk["checks"]["dice_ce/cpu"]["grad_max_abs"]


def test_runner_budgets(tmp_path):
    case = bench.instances_case(300, (16, 96, 96), 0, str(tmp_path))
    # 300 masked copies of the volume in the autograd graph: far more than 16 MB.
    r = _runner(mem_budget_bytes=16 * 2**20).measure(case, "naive", "cpu")
    assert r["status"] == "out of memory", r
    r = _runner(time_budget_s=0.05).measure(case, "naive", "cpu")
    assert r["status"] == "over budget", r
    r = _runner(mem_budget_bytes=16 * 2**20).measure(case, "fused", "cpu")
    assert r["status"] == "ok", r


def test_naive_memory_grows_with_instances(tmp_path):
    """The measurement sees the naive loop's per-instance copies and the fused op's lack of them."""
    runner = _runner(reps=1)
    few, many = (bench.instances_case(n, (16, 64, 64), 0, str(tmp_path)) for n in (2, 64))
    naive = [runner.measure(c, "naive", "cpu")["peak_bytes"] for c in (few, many)]
    fused = [runner.measure(c, "fused", "cpu")["peak_bytes"] for c in (few, many)]
    voxel_bytes = 16 * 64 * 64 * 4
    assert naive[1] > naive[0] + 20 * voxel_bytes
    assert fused[1] < fused[0] + 2 * voxel_bytes


def test_command_quick_with_label_file(tmp_path, capsys):
    vol = grid_instances((40, 64, 64), 12, seed=5) > 0
    np.save(tmp_path / "mine.npy", vol.astype(np.uint8))
    out = tmp_path / "out"
    main(["--quick", "--labels", str(tmp_path / "mine.npy"), "--labels-profile", "shanel", "--crops", "2",
          "--impls", "fused,vectorized,monai_dice", "--out", str(out)])
    text = capsys.readouterr().out
    assert "headline ratios" in text and "mine.npy" in text
    assert "host cost proxy (CPU, 1 thread, 1x1x4x4x4 float32" in text
    res = json.load(open(out / "latest" / "result.json"))
    assert [c["name"] for c in res["cases"]] == ["ms", "mine.npy"]
    assert res["cases"][1]["shape"] == [2, 1, 32, 64, 64]  # shanel crop clipped to the file's volume
    assert all(m["status"] == "ok" for m in res["measurements"])
    assert len(res["measurements"]) == 2 * 3
    assert res["checks"]["mine.npy"]["status"] == "ok"
    proxy = res["host_proxy"]
    assert proxy["status"] == "ok" and proxy["threads"] == 1 and proxy["ratio"] > 0
    assert proxy["ratio_min"] <= proxy["ratio_q1"] <= proxy["ratio_q3"] <= proxy["ratio_max"]
    assert {"speedup_vs_vectorized", "time_over_monai", "memory_over_monai"} <= set(res["ratios"][0])
    if pytest.importorskip("matplotlib"):
        assert (out / "latest" / "profiles.png").stat().st_size > 10_000


def test_command_dice_ce_rows(tmp_path, capsys):
    """The default implementations include blob Dice+CE: the fused op, the loop with MONAI DiceCELoss
    per blob and plain MONAI DiceCELoss are checked, measured and reported side by side."""
    from blobbench.bench.cli import DEFAULT_IMPLS

    assert {"naive_dice_ce", "fused_dice_ce", "monai_dice_ce"} <= set(DEFAULT_IMPLS)
    np.save(tmp_path / "few.npy", (grid_instances((8, 32, 32), 6, seed=2) > 0).astype(np.uint8))
    out = tmp_path / "out"
    rc = main(["--profiles", "none", "--labels", str(tmp_path / "few.npy"), "--labels-profile", "shanel",
               "--crops", "2", "--sweep", "none", "--reps", "3", "--no-proxy", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    res = json.load(open(out / "latest" / "result.json"))
    assert {m["impl"] for m in res["measurements"]} == set(DEFAULT_IMPLS)
    assert all(m["status"] == "ok" for m in res["measurements"])
    chk = res["checks"]["few.npy"]
    assert chk["status"] == "ok" and set(chk["checks"]) == {"dice/cpu", "tversky/cpu", "dice_ce/cpu", "cc_dice_ce/cpu"}
    assert chk["checks"]["dice_ce/cpu"]["crops"] == 2 and chk["checks"]["dice_ce/cpu"]["loss_rel_diff"] < 1e-5
    # CC-DiceCE: the fused op against the loop over Voronoi regions, per crop
    assert chk["checks"]["cc_dice_ce/cpu"]["crops"] == 2 and chk["checks"]["cc_dice_ce/cpu"]["loss_rel_diff"] < 1e-5
    assert "check dice_ce/cpu" in text
    by_loss = {r["loss"]: r for r in res["ratios"]}
    ce = by_loss["dice_ce"]
    assert by_loss["dice"]["case"] == ce["case"] == "few.npy"
    assert {"speedup_vs_naive_dice_ce", "speedup_vs_monai_dice_ce", "time_over_monai", "memory_over_monai",
            "memory_over_naive", "time_over_monai_interval", "speedup_vs_naive_dice_ce_interval"} <= set(ce)
    m = {x["impl"]: x for x in res["measurements"]}
    assert ce["time_over_monai"] == pytest.approx(m["fused_dice_ce"]["median_s"] / m["monai_dice_ce"]["median_s"])
    lo, hi = ce["time_over_monai_interval"]
    assert lo <= ce["time_over_monai"] <= hi
    assert ce["memory_over_naive"] == pytest.approx(
        m["fused_dice_ce"]["peak_bytes"] / max(m["naive_dice_ce"]["peak_bytes"], 1))
    # the table: the Dice+CE rows under their own line, ratios against blob.dice_ce; the headline table
    assert "-- blob Dice+CE (cpu): time/fused and mem/fused against fused blob.dice_ce" in text
    rows = {line.split("  cpu ")[0].strip(): line for line in text.splitlines() if "  cpu " in line}
    for impl in ("naive_dice_ce", "fused_dice_ce", "monai_dice_ce"):
        assert bench.IMPLEMENTATIONS[impl] in rows
    assert rows["fused blob.dice_ce"].split()[-2:] == ["1.00x", "1.00x"]
    assert "headline ratios, blob Dice+CE" in text
    assert any(line.strip().startswith("few.npy") and "[" in line for line in
               text.split("headline ratios, blob Dice+CE")[1].splitlines())


def test_report_dice_ce_without_dice(tmp_path):
    """Only the Dice+CE implementations: no blob Dice headline, the Dice+CE one, the README block's table."""
    from blobbench.bench.noise import summarize_times
    from blobbench.bench.report import print_report, ratios, readme_block

    def m(impl, ms, peak_mb):
        t = [ms / 1e3 * f for f in (0.9, 1.0, 1.0, 1.1)]
        return {"case": "ms", "kind": "profile", "impl": impl, "device": "cpu", "status": "ok", "times_s": t,
                "peak_bytes": int(peak_mb * 2**20), **summarize_times(t)}

    res = {"machine": {"summary": "test"}, "settings": {"devices": ["cpu"], "reps": 4, "profiles": ["ms"]},
           "cases": [{"name": "ms", "kind": "profile", "shape": [1, 1, 8, 8, 8], "blobs": [3], "meta": {}}],
           "measurements": [m("fused_dice_ce", 2.0, 10), m("monai_dice_ce", 8.0, 40),
                            {"case": "ms", "kind": "profile", "impl": "naive_dice_ce", "device": "cpu",
                             "status": "over budget", "error": "over budget"}],
           "checks": {}}
    assert ratios(res) == []
    (row,) = ratios(res, "dice_ce")
    assert row["time_over_monai"] == pytest.approx(0.25) and row["memory_over_monai"] == pytest.approx(0.25)
    lo, hi = row["time_over_monai_interval"]
    assert lo < 0.25 < hi
    assert row["speedup_vs_naive_dice_ce"] == "over budget" and "memory_over_naive" not in row
    import io

    buf = io.StringIO()
    print_report(res, file=buf)
    text = buf.getvalue()
    assert "headline ratios (fused op" not in text and "headline ratios, blob Dice+CE" in text
    assert "over budget" in text.split("headline ratios, blob Dice+CE")[1]
    block = readme_block(res, tmp_path)
    assert "| ms 1x1x8x8x8 | cpu | 2 [" in block and "| over budget | 0.25 [" in block


def test_report_cc_rows_have_their_own_block_and_ratios(tmp_path):
    # CC-DiceCE rows: ratios against blob.cc_dice_ce (not blob.dice or blob.dice_ce), their own block
    # in the table, headline ratios and README table; planted medians, so every ratio is known.
    from blobbench.bench.noise import summarize_times
    from blobbench.bench.report import print_report, ratios, readme_block

    def m(impl, ms, peak_mb):
        t = [ms / 1e3 * f for f in (0.9, 1.0, 1.0, 1.1)]
        return {"case": "ms", "kind": "profile", "impl": impl, "device": "cpu", "status": "ok", "times_s": t,
                "peak_bytes": int(peak_mb * 2**20), **summarize_times(t)}

    res = {"machine": {"summary": "test"}, "settings": {"devices": ["cpu"], "reps": 4, "profiles": ["ms"]},
           "cases": [{"name": "ms", "kind": "profile", "shape": [1, 1, 8, 8, 8], "blobs": [3], "meta": {}}],
           "measurements": [m("fused", 1.0, 5), m("fused_dice_ce", 2.0, 10), m("monai_dice_ce", 8.0, 40),
                            m("fused_cc_dice_ce", 4.0, 20), m("vectorized_cc_dice_ce", 6.0, 30),
                            m("naive_cc_dice_ce", 400.0, 800)],
           "checks": {}}
    (row,) = ratios(res, "cc_dice_ce")
    assert row["fused_median_s"] == pytest.approx(4e-3)
    assert row["speedup_vs_naive_cc_dice_ce"] == pytest.approx(100.0)
    assert row["speedup_vs_vectorized_cc_dice_ce"] == pytest.approx(1.5)
    assert row["time_over_monai"] == pytest.approx(0.5) and row["memory_over_monai"] == pytest.approx(0.5)
    assert row["memory_over_naive"] == pytest.approx(20 / 800)
    (ce,) = ratios(res, "dice_ce")
    assert ce["time_over_monai"] == pytest.approx(0.25)   # MONAI DiceCELoss stays against blob.dice_ce
    import io

    buf = io.StringIO()
    print_report(res, file=buf)
    text = buf.getvalue()
    table = text.split("headline ratios")[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("  ")]
    cc_head = next(i for i, ln in enumerate(lines) if ln.startswith("  -- CC-DiceCE"))
    ce_head = next(i for i, ln in enumerate(lines) if ln.startswith("  -- blob Dice+CE"))
    assert ce_head < cc_head
    cc_rows = [ln for ln in lines[cc_head + 1:] if not ln.startswith("  --")]
    by_name = {ln[2:44].strip(): ln for ln in cc_rows}
    assert set(by_name) == {"naive loop (MONAI DiceCELoss per region)", "vectorized CC-DiceCE (index_add)",
                            "fused blob.cc_dice_ce"}
    # time/fused against blob.cc_dice_ce
    assert "100.00x" in by_name["naive loop (MONAI DiceCELoss per region)"]
    assert "1.50x" in by_name["vectorized CC-DiceCE (index_add)"] and "1.00x" in by_name["fused blob.cc_dice_ce"]
    assert "headline ratios, CC-DiceCE" in text
    block = readme_block(res, tmp_path)
    assert "CC-DiceCE (`cc_dice_ce`" in block and "| ms 1x1x8x8x8 | cpu | 4 [" in block and "| 1.50x [" in block


def test_command_sweep_plots(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    main(["--profiles", "none", "--sweep-instances", "1,8", "--sweep-crop", "8,32,32", "--sweep-edges", "16,24",
          "--sweep-count", "3", "--impls", "fused,naive", "--reps", "1", "--out", str(out)])
    res = json.load(open(out / "latest" / "result.json"))
    assert [c["sweep_x"] for c in res["cases"]] == [1, 8, 16 ** 3, 24 ** 3]
    assert {(m["case"], m["impl"]) for m in res["measurements"]} == {
        (c, i) for c in ("N=1", "N=8", "16^3", "24^3") for i in ("fused", "naive")}
    for f in ("sweep_instances.png", "sweep_volume.png"):
        assert (out / "latest" / f).stat().st_size > 10_000


@pytest.mark.parametrize("argv, msg", [
    (["--profiles", "nope"], "unknown profile"),
    (["--impls", "fast"], "unknown implementation"),
    (["--batch", "zero"], "--batch"),
    (["--reps", "0"], "--reps"),
    (["--labels", "/does/not/exist.npy"], "not found"),
    (["--devices", "tpu"], "--devices"),
])
def test_command_errors(argv, msg, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert msg in capsys.readouterr().err


def test_host_cost_proxy_structure():
    """The proxy's bookkeeping (no timing is asserted): interleaved reps, spread, threads restored."""
    before = torch.get_num_threads()
    p = bench.host_cost_proxy(reps=4, inner=2, threads=1)
    assert torch.get_num_threads() == before
    assert len(p["ratios"]) == 4 and p["reps"] == 4 and p["inner"] == 2 and p["threads"] == 1
    assert p["fused_median_s"] > 0 and p["sum_backward_median_s"] > 0
    assert p["ratio"] == pytest.approx(p["fused_median_s"] / p["sum_backward_median_s"])
    assert p["ratio_min"] == min(p["ratios"]) and p["ratio_max"] == max(p["ratios"])


def test_asv_host_cost_proxy_runs():
    suite = asv_suite()

    s = suite.HostCostProxy()
    s.setup()
    try:
        assert torch.get_num_threads() == 1
        s.time_blob_dice_forward_backward()
        assert s.x.grad is not None
        s.time_sum_backward()
    finally:
        s.teardown()


def test_asv_generous_max_label_runs():
    """The bookkeeping of the generous-max_label ratio (no timing is asserted)."""
    s = asv_suite().GenerousMaxLabel()
    s.setup()
    assert s.exact == 20 and s.inst.shape == (2, 1, 32, 64, 64) and int((s.inst[1] > 0).sum()) > 0
    s.time_generous_max_label()
    assert s.x.grad is not None and torch.isfinite(s.x.grad).all()
    s.time_exact_max_label()
    assert s.track_ratio(reps=2) > 0


def test_asv_discovery_imports_every_benchmark_module():
    """asv imports every module of the benchmarks/ package tree, the way ``asv check`` does, in
    CI's environment, which has none of the mutation tools (mutmut): CI failed at c579123 when
    ``benchmarks/mutation/pytest_plugin.py`` imported mutmut at module level."""
    code = (
        "import sys; sys.modules['mutmut'] = None\n"  # an import of mutmut raises ImportError
        "from asv_runner.discovery import disc_benchmarks\n"
        "names = [b.name for b in disc_benchmarks('benchmarks')]\n"
        "assert any('HostCostProxy' in n for n in names), names\n"
        "print(len(names))\n"
    )
    pytest.importorskip("asv_runner")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) > 5


def test_impls_agree_on_a_profile():
    x, inst = profile_batch("ms", seed=1, batch=1)
    ref = bench.loss_fn("naive")(x.double(), inst)
    # float32 accumulation: the fused op in double per block, the vectorized one in index_add
    for impl, tol in (("fused", 1e-6), ("vectorized", 1e-4)):
        assert abs(bench.loss_fn(impl)(x, inst).item() - ref.item()) < tol * abs(ref.item())
    ref_ce = bench.loss_fn("naive_dice_ce")(x.double(), inst)
    assert torch.equal(bench.loss_fn("fused_dice_ce")(x, inst), blobbench.blob_dice_ce(x, inst))
    assert abs(bench.loss_fn("fused_dice_ce")(x, inst).item() - ref_ce.item()) < 1e-6 * abs(ref_ce.item())
    assert torch.equal(ref_ce, blobbench.naive_blob_dice_ce(x.double(), inst))
    from monai.losses import DiceCELoss

    target = (inst > 0).float()
    assert torch.equal(bench.loss_fn("monai_dice_ce")(x, inst), DiceCELoss(sigmoid=True)(x, target))
    # the CC rows: the fused op and the index_add baseline against the MONAI loop per region,
    # each given the regions that its own wrapper computes from the instance map
    regions = blobbench.voronoi_regions(inst)
    ref_cc = blobbench.naive_cc_dice_ce(x.double(), inst, regions)
    for impl, tol in (("fused_cc_dice_ce", 1e-6), ("vectorized_cc_dice_ce", 1e-4)):
        got = bench.loss_fn(impl)(x, inst)
        assert abs(got.item() - ref_cc.item()) < tol * abs(ref_cc.item()), impl
    assert torch.equal(bench.loss_fn("fused_cc_dice_ce")(x, inst), blobbench.cc_dice_ce(x, inst, regions))
    assert set(bench.LOSSES) == {"dice", "tversky", "dice_ce", "cc_dice_ce"}
    assert all(i in bench.IMPLEMENTATIONS for impls in bench.LOSSES.values() for i in impls if i)
    assert set(PROFILES) == {"ms", "lits", "disco", "shanel", "deepmact"}
    assert blobbench.has_cuda_kernels() in (True, False)

"""The benchmark machinery: synthetic data, label files, budgets, the command and its report."""
import json
import os

import numpy as np
import pytest
import torch
from bench_helpers import asv_suite

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
    chk = runner.check(case, ["cpu"], ["dice", "tversky"])
    assert chk["status"] == "ok", chk
    assert chk["checks"]["dice/cpu"]["loss_rel_diff"] < 1e-5
    assert chk["checks"]["tversky/cpu"]["loss_rel_diff"] < 1e-5


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


def test_impls_agree_on_a_profile():
    x, inst = profile_batch("ms", seed=1, batch=1)
    ref = bench.loss_fn("naive")(x.double(), inst)
    # float32 accumulation: the fused op in double per block, the vectorized one in index_add
    for impl, tol in (("fused", 1e-6), ("vectorized", 1e-4)):
        assert abs(bench.loss_fn(impl)(x, inst).item() - ref.item()) < tol * abs(ref.item())
    assert set(PROFILES) == {"ms", "lits", "disco", "shanel", "deepmact"}
    assert blobbench.has_cuda_kernels() in (True, False)

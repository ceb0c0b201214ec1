"""The GPU check (benchmarks/gpu/device_check.sh) cannot rot between GPU runs: its CPU dry run packs
an archive and a summary, a failing step fails it and still packs; its parts (the list of CUDA
paths, the summary's parsing of sanitizer logs, the command's result written as it goes)."""
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU))

import cuda_paths  # noqa: E402
import summarize  # noqa: E402


def _check(tmp_path, **env):
    e = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path / "out"), PYTHON=sys.executable, TMPDIR=str(tmp_path), **env)
    e.pop("BLOBBENCH_CUDA_PATHS", None)
    r = subprocess.run(["bash", str(GPU / "device_check.sh")], cwd=ROOT, env=e, capture_output=True, text=True,
                       timeout=600)
    return r, tmp_path / "out"


def _steps(archive):
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        steps = tar.extractfile("device_check/steps.tsv").read().decode()
    return names, {line.split("\t")[0]: line.split("\t")[1] for line in steps.splitlines()}


def test_dry_run_packs_one_archive_and_a_summary(tmp_path):
    r, out = _check(tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["device_check.tar.gz", "summary.md"]
    names, steps = _steps(out / "device_check.tar.gz")
    assert set(steps) == {"env", "build", "imports", "tests-default", "tests-all", "sanitize-cpu", "prepare", "profile",
                          "command"}
    assert set(steps.values()) == {"0"}
    for f in ("summary.md", "profile_calls.json", "command/run/result.json", "tests-default.xml", "tests-all.xml",
              "sanitize-cpu.log", "env.log", "imports.log"):
        assert f"device_check/{f}" in names
    with tarfile.open(out / "device_check.tar.gz") as tar:
        prof = json.load(tar.extractfile("device_check/profile_calls.json"))
        res = json.load(tar.extractfile("device_check/command/run/result.json"))
    # every forward path at every case, and Dice+CE beside MONAI at ms and shanel
    rows = {(r["case"], r["loss"], r["path"]) for r in prof["rows"]}
    for case in prof["cases"]:
        assert {(case, "blob_dice", s) for s in cuda_paths.forward_settings()} <= rows
        assert (case, "monai_dice", "-") in rows
    for case in ("ms", "shanel"):
        assert {(case, "blob_dice_ce", "default"), (case, "blob_dice_ce", "fused_dice_ce"),
                (case, "monai_dice_ce", "-")} <= rows
    assert "partial" not in res and {m["status"] for m in res["measurements"]} == {"ok"}
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# blobbench GPU check (DRY_RUN") and "PASSED" in summary.splitlines()[0]
    assert "compute-sanitizer" in summary and "Skipped (DRY_RUN)" in summary
    assert re.search(r"\| tests \(default\) \| \d+ \| 0 \| 0 \|", summary)
    assert "| ms | blob_dice | coop_forward |" in summary


def test_a_failing_step_fails_the_check_and_still_packs(tmp_path):
    r, out = _check(tmp_path, DEVICE_CHECK_STEPS="env profile", DEVICE_CHECK_FAIL="profile")
    assert r.returncode == 1
    names, steps = _steps(out / "device_check.tar.gz")
    assert steps == {"env": "0", "profile": "97"}
    summary = (out / "summary.md").read_text()
    assert "FAILED" in summary.splitlines()[0] and "failed steps: profile" in summary


# What the GPU machine lacks (../shared/device/README.md: it has torch, numpy, pytest,
# pytest-benchmark, ninja, pybind11 and setuptools; benchmarks/gpu/fetch_wheels.sh carries
# connected-components-3d, monai, scipy and tqdm). scipy is blocked too: ../shared's own
# fetch-wheels.sh does not carry it.
NOT_ON_THE_GPU_MACHINE = ("scipy", "matplotlib", "nibabel", "nnunetv2", "asv", "asv_runner", "expecttest",
                          "ccmetrics", "mutmut", "hypothesis", "torchvision")


def test_cuda_tests_collect_with_only_the_gpu_machines_packages():
    """The check runs ``pytest -m cuda tests`` there: one test module that imports a package the
    machine lacks at its top is a collection error, and that fails every CUDA test of the run."""
    code = (
        "import sys, pytest\n"
        f"for name in {NOT_ON_THE_GPU_MACHINE!r}:\n"
        "    sys.modules[name] = None  # import name: ImportError\n"
        "sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', '-m', 'cuda', 'tests']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]  # 2: a collection error, 5: nothing selected
    assert re.search(r"test_cuda\.py::", r.stdout), r.stdout[-2000:]


def test_cuda_path_names_are_the_extensions():
    src = (ROOT / "csrc" / "common" / "cuda_paths.cpp").read_text()
    block = re.search(r"kCudaPathNames\[\] = \{(.*?)\};", src, flags=re.S).group(1)
    assert tuple(re.findall(r'"(\w+)"', block)) == cuda_paths.CUDA_PATHS
    assert set(cuda_paths.FORWARD_PATHS) <= set(cuda_paths.CUDA_PATHS)


def test_cuda_paths_switch_is_seen_by_the_extension(monkeypatch):
    torch = pytest.importorskip("torch")
    import blobbench  # noqa: F401

    monkeypatch.delenv(cuda_paths.VAR, raising=False)
    assert cuda_paths.enabled() == []
    with cuda_paths.cuda_paths("all"):  # every path but the forced fallback split_forward
        assert cuda_paths.enabled() == [p for p in cuda_paths.CUDA_PATHS if p != "split_forward"]
        with cuda_paths.cuda_paths("default"):
            assert cuda_paths.enabled() == []
    with cuda_paths.cuda_paths("coop_forward"):
        assert torch.ops.blob._cuda_path_enabled("coop_forward")
        assert not torch.ops.blob._cuda_path_enabled("vector_loads")
    assert cuda_paths.VAR not in os.environ


MEMCHECK_LOG = """\
========= COMPUTE-SANITIZER
=== setting default (opt-in paths on: none)
--- case dice sigmoid
--- case dice softmax
=== end setting default: 2 cases in 1.0 s
=== setting all (opt-in paths on: vector_loads, coop_forward)
--- case dice sigmoid
========= Invalid __global__ read of size 16 bytes
=========     at void blob::accumulate_vec_kernel<float, int>(...)+0x1a0
=========     by thread (3,0,0) in block (0,0,0)
--- case dice softmax
========= Invalid __global__ read of size 16 bytes
=========     at void blob::accumulate_vec_kernel<float, int>(...)+0x1a0
CASE FAILED all / dice softmax: RuntimeError: CUDA error: unspecified launch failure
========= ERROR SUMMARY: 2 errors
"""


def test_summary_attributes_sanitizer_reports_to_settings(tmp_path, capsys):
    (tmp_path / "memcheck-a.log").write_text(MEMCHECK_LOG)
    (tmp_path / "steps.tsv").write_text("env\t0\t1.0\t20\t\nmemcheck-a\t9\t12.0\t85\t\n")
    (tmp_path / "env.log").write_text("gpu: NVIDIA H200, 143771 MiB\ncommit: abc\n")
    assert summarize.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "FAILED" in text.splitlines()[0] and "failed steps: memcheck-a" in text
    assert "| memcheck | default | 0 | 2 | yes | - |" in text
    assert "| memcheck | all | 2 | 2 | NO | all / dice softmax: RuntimeError" in text
    assert "Invalid __global__ read of size 16 bytes (case: dice sigmoid)" in text
    assert "memcheck-a.log: ERROR SUMMARY: 2 errors" in text


def test_pytest_counts_from_the_log_when_no_xml(tmp_path):
    (tmp_path / "tests-all.log").write_text("..F\nFAILED tests/test_cuda.py::test_x - assert 0\n"
                                            "1 failed, 2 passed, 3 skipped, 900 deselected in 9.1s\n")
    counts, failed, src = summarize.pytest_counts(str(tmp_path), "tests-all")
    assert counts == {"passed": 2, "failures": 1, "errors": 0, "skipped": 3} and src == "log"
    assert failed == ["tests/test_cuda.py::test_x"]


def test_command_writes_its_result_as_it_goes(tmp_path, monkeypatch):
    """result.json holds every measurement done so far while the run goes on (a run stopped by a
    timeout keeps them), and the whole run when it ends."""
    from blobbench.bench import bench
    from blobbench.bench.cli import main
    from blobbench.bench.noise import summarize_times
    from blobbench.bench.synthetic import grid_instances

    monkeypatch.setenv("BLOBBENCH_CACHE", str(tmp_path / "cache"))
    np.save(tmp_path / "tiny.npy", (grid_instances((8, 24, 24), 5, seed=1) > 0).astype(np.uint8))
    run = tmp_path / "runs" / "r"
    seen = []

    def measure(self, case, impl, device):
        if run.joinpath("result.json").exists():
            seen.append(json.loads(run.joinpath("result.json").read_text()))
        if impl == "vectorized" and os.environ.get("STOP"):
            raise KeyboardInterrupt  # as a timeout would stop the command
        times = [1e-3, 1.1e-3, 1.2e-3]
        return {"case": case.name, "kind": case.kind, "impl": impl, "device": device, "status": "ok",
                "times_s": times, "peak_bytes": 1, **summarize_times(times)}

    monkeypatch.setattr(bench.Runner, "measure", measure)
    argv = ["--profiles", "none", "--labels", str(tmp_path / "tiny.npy"), "--labels-profile", "shanel", "--crops", "1",
            "--sweep", "none", "--impls", "fused,monai_dice,vectorized", "--devices", "cpu", "--reps", "3",
            "--no-plots", "--no-check", "--no-proxy", "--remeasure", "0", "--out", str(tmp_path / "runs"),
            "--name", "r"]
    assert main(argv) == 0
    assert [s["partial"] for s in seen] == [{"done": 1, "of": 3}, {"done": 2, "of": 3}]
    assert [[m["impl"] for m in s["measurements"]] for s in seen] == [["fused"], ["fused", "monai_dice"]]
    final = json.loads(run.joinpath("result.json").read_text())
    assert "partial" not in final and len(final["measurements"]) == 3 and "ratios" in final
    # stopped before its end: the measurements done are on disk
    monkeypatch.setenv("STOP", "1")
    with pytest.raises(KeyboardInterrupt):
        main(argv[:-1] + ["s"])
    stopped = json.loads((tmp_path / "runs" / "s" / "result.json").read_text())
    assert stopped["partial"] == {"done": 2, "of": 3}
    assert [m["impl"] for m in stopped["measurements"]] == ["fused", "monai_dice"]


def test_summary_judges_the_gpu_targets():
    rows = [{"case": "ms", "loss": "blob_dice", "path": "default", "kernel_us": 80.0, "wall_us": 120.0,
             "wall_over_monai_dice": 0.3, "launches": 5.0},
            {"case": "plane_256x512x512_2000", "loss": "blob_dice", "path": "all", "kernel_us": 800.0,
             "wall_us": 900.0, "acc_frac_copy": 0.75, "launches": 3.0},
            {"case": "ms", "loss": "blob_dice", "path": "default", "kernel_us": None, "wall_us": 9.0}]  # CPU
    got = {(r[1], r[2]): r[4] for r in summarize.target_rows({"rows": rows})}
    assert got == {("default", "wall <= 150 us"): "yes", ("default", "<= 0.2x MONAI DiceLoss"): "NO",
                   ("default", "<= 4 launches"): "NO", ("all", "accumulate >= 0.7 of copy bw"): "yes"}

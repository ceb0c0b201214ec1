"""Devices in the benchmark suite: normalisation, CUDA budgets and memory accounting (CUDA calls
faked on the CPU), errors that fail the run, and the command's CUDA path on a GPU."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from bench_helpers import asv_suite
from conftest import HAVE_CUDA
from torch.cuda._utils import _get_device_index

import blobbench
from blobbench.bench import bench, cli
from blobbench.bench.cli import main
from blobbench.bench.synthetic import grid_instances


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOBBENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two CUDA devices, the current one is 1, CUDA kernels built (only the queries are faked)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(blobbench, "has_cuda_kernels", lambda: True)


class FakeAllocator:
    """Stands in for the CUDA allocator's API, with torch's own device-index check."""

    def __init__(self, allocated=1000, peak=5000, total=100_000):
        self.allocated, self.peak, self.total = allocated, peak, total
        self.calls = []

    def install(self, monkeypatch):
        def reset_peak_memory_stats(device=None):
            self.calls.append(("reset", _get_device_index(device)))

        def memory_allocated(device=None):
            self.calls.append(("allocated", _get_device_index(device)))
            return self.allocated

        def max_memory_allocated(device=None):
            self.calls.append(("max", _get_device_index(device)))
            return self.peak

        def get_device_properties(device):
            self.calls.append(("properties", _get_device_index(device)))
            return type("Props", (), {"total_memory": self.total})()

        def set_per_process_memory_fraction(fraction, device=None):
            # torch's checks, in torch's order: an index is required, the fraction is a float in 0..1
            index = _get_device_index(device)
            if not isinstance(fraction, float) or not 0 <= fraction <= 1:
                raise ValueError(f"Invalid fraction value: {fraction}")
            self.calls.append(("fraction", index, fraction))

        for name, fn in list(locals().items()):
            if callable(fn) and name != "self":
                monkeypatch.setattr(torch.cuda, name, fn)
        return self


def test_normalize_cpu_and_bad_names():
    assert bench.normalize_device("cpu") == "cpu"
    assert bench.normalize_device(torch.device("cpu")) == "cpu"
    for bad in ("tpu", "gpu", "cuda:x", ""):
        with pytest.raises(ValueError):
            bench.normalize_device(bad)


@pytest.mark.skipif(HAVE_CUDA, reason="checks the message without a GPU")
def test_normalize_cuda_without_gpu():
    with pytest.raises(ValueError, match="no CUDA device|without the CUDA kernels"):
        bench.normalize_device("cuda")


def test_normalize_cuda_gets_an_index(fake_gpus):
    assert bench.normalize_device("cuda") == "cuda:1"          # the current device
    assert bench.normalize_device("cuda:0") == "cuda:0"
    assert bench.normalize_device(torch.device("cuda", 1)) == "cuda:1"
    with pytest.raises(ValueError, match="2 CUDA devices"):
        bench.normalize_device("cuda:2")
    assert bench.normalize_devices(["cuda", "cpu", "cuda:1", "cuda:0"]) == ["cuda:1", "cpu", "cuda:0"]


def test_normalize_cuda_needs_the_kernels(fake_gpus, monkeypatch):
    monkeypatch.setattr(blobbench, "has_cuda_kernels", lambda: False)
    with pytest.raises(ValueError, match="without the CUDA kernels"):
        bench.normalize_device("cuda:0")


def test_the_bug_the_normalisation_removes(monkeypatch):
    """torch rejects a bare ``cuda`` for the memory fraction: the engine never passes one."""
    alloc = FakeAllocator().install(monkeypatch)
    with pytest.raises(ValueError, match="specified index"):
        torch.cuda.set_per_process_memory_fraction(0.5, torch.device("cuda"))
    with pytest.raises(ValueError, match="indexed device"):
        bench.cuda_memory_begin(torch.device("cuda"), 2**20)
    assert not [c for c in alloc.calls if c[0] == "fraction"]


def test_cuda_budget_and_memory_accounting(monkeypatch):
    alloc = FakeAllocator(allocated=1000, peak=5000, total=100_000).install(monkeypatch)
    dev = torch.device("cuda:1")
    base = bench.cuda_memory_begin(dev, 9000)
    assert base == 1000
    # reset first, then the base, then the cap: base + budget out of the device's total
    assert alloc.calls == [("reset", 1), ("allocated", 1), ("properties", 1), ("fraction", 1, 0.1)]
    assert bench.cuda_memory_peak(dev, base) == 4000
    alloc.calls.clear()
    bench.cuda_memory_begin(dev, 0)                       # no budget: no cap
    assert [c[0] for c in alloc.calls] == ["reset", "allocated"]
    alloc.calls.clear()
    bench.cuda_memory_begin(dev, 10**9)                   # a budget past the device: fraction 1
    assert alloc.calls[-1] == ("fraction", 1, 1.0)
    assert bench.cuda_budget_fraction(0, 50, 100) == 0.5 and isinstance(bench.cuda_budget_fraction(0, 1, 3), float)


def test_worker_memory_accounting_dispatch(monkeypatch):
    """The worker's accounting goes to the CUDA allocator for a CUDA device (faked here), with its index."""
    alloc = FakeAllocator(allocated=2000, peak=12_000, total=1_000_000).install(monkeypatch)
    dev = torch.device("cuda:1")
    base = bench.memory_begin(dev, 98_000)
    assert base == 2000 and ("fraction", 1, 0.1) in alloc.calls
    assert bench.memory_peak(dev, base) == 10_000


def test_cpu_memory_accounting_sees_an_allocation():
    # In a fresh process, as the benchmark's workers measure. In this long-lived test process the
    # pages of freed tensors may stay resident (an earlier test may have raised glibc's trim and
    # mmap thresholds, as the workers do), so a new 64 MB tensor could reuse them without raising
    # the RSS, and the check would depend on the order of the tests.
    code = (
        "import torch\n"
        "from blobbench.bench import bench\n"
        "base = bench.memory_begin(torch.device('cpu'), 0)\n"
        "x = torch.ones(64 * 2**20 // 4)  # 64 MB, touched\n"
        "print(bench.memory_peak(torch.device('cpu'), base))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out.split()[-1]) >= 60 * 2**20


def test_command_normalises_devices(fake_gpus):
    ap = cli.build_parser()
    args = ap.parse_args(["--devices", "cuda,cpu,cuda:1"])
    cli._validate(args, ap)
    assert args.devices == ["cuda:1", "cpu"]
    args = ap.parse_args(["--devices", "cuda:7"])
    with pytest.raises(SystemExit) as e:
        cli._validate(args, ap)
    assert e.value.code == 2


def test_command_rejects_cuda_without_gpu(capsys):
    if HAVE_CUDA:
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as e:
        main(["--quick", "--devices", "cuda:0"])
    assert e.value.code == 2 and "--devices" in capsys.readouterr().err


def test_asv_suite_devices(fake_gpus, monkeypatch):
    suite = asv_suite()

    assert suite._device("cuda") == "cuda:1" and suite._device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NotImplementedError):              # asv's "skipped"
        suite._device("cuda:0")


def test_asv_suite_runs_on_cpu():
    suite = asv_suite()

    s = suite.InstanceScaling()
    s.setup(16, "fused", "cpu")
    s.time_forward_backward(16, "fused", "cpu")
    assert s.x.grad is not None and torch.isfinite(s.x.grad).all()
    # blob Dice+CE next to the Dice implementations in the profile suites (time, peakmem, CUDA memory)
    assert {"fused_dice_ce", "naive_dice_ce", "monai_dice_ce"} <= set(suite.ProfileSuite.params[1])
    assert suite.CudaMemory.params[1] == suite.ProfileSuite.params[1]
    p = suite.ProfileSuite()
    p.setup("shanel", "fused_dice_ce", "cpu")
    p.time_forward_backward("shanel", "fused_dice_ce", "cpu")
    p.peakmem_forward_backward("shanel", "fused_dice_ce", "cpu")
    assert p.x.grad is not None and torch.isfinite(p.x.grad).all()


def test_worker_error_carries_the_traceback(tmp_path):
    case = bench.instances_case(4, (8, 16, 16), 0, str(tmp_path))
    case.path = str(tmp_path / "missing.pt")
    r = bench.Runner(threads=1, reps=1, max_case_s=1.0, time_budget_s=60.0, mem_budget_bytes=0).measure(
        case, "fused", "cpu")
    assert r["status"] == "error"
    assert r["error"].startswith("FileNotFoundError")
    assert "Traceback (most recent call last)" in r["traceback"] and "torch.load" in r["traceback"]


def _tiny_label_file(tmp_path):
    np.save(tmp_path / "tiny.npy", (grid_instances((8, 24, 24), 5, seed=1) > 0).astype(np.uint8))
    return str(tmp_path / "tiny.npy")


def _argv(tmp_path, *extra, check=False, out="out"):
    """A tiny run on a label file; later options in ``extra`` override earlier ones."""
    return ["--profiles", "none", "--labels", _tiny_label_file(tmp_path), "--labels-profile", "shanel",
            "--crops", "1", "--sweep", "none", "--impls", "fused,vectorized", "--reps", "2", "--no-plots",
            "--out", str(tmp_path / out)] + ([] if check else ["--no-check"]) + list(extra)


def test_an_error_fails_the_command(tmp_path, monkeypatch, capsys):
    real = bench.Runner.measure

    def measure(self, case, impl, device):
        if impl == "vectorized":
            return {"case": case.name, "kind": case.kind, "impl": impl, "device": device, "status": "error",
                    "error": "RuntimeError: planted", "traceback": "Traceback (most recent call last):\n  planted\n"}
        return real(self, case, impl, device)

    monkeypatch.setattr(bench.Runner, "measure", measure)
    assert main(_argv(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "tiny.npy / vectorized / cpu" in err and "Traceback (most recent call last):\n  planted" in err


def test_over_budget_and_oom_are_results(tmp_path, monkeypatch, capsys):
    def measure(self, case, impl, device):
        status = {"fused": "over budget", "vectorized": "out of memory"}[impl]
        return {"case": case.name, "kind": case.kind, "impl": impl, "device": device, "status": status,
                "error": status}

    monkeypatch.setattr(bench.Runner, "measure", measure)
    assert main(_argv(tmp_path)) == 0
    assert "ERROR" not in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device and a CUDA build of blobbench")
def test_command_on_cuda(tmp_path):
    """The command's CUDA path end to end on a tiny case: bare ``cuda`` with a memory budget."""
    rc = main(_argv(tmp_path, "--devices", "cuda", "--memory-budget", "1", "--impls",
                    "fused,vectorized,naive,monai_dice,fused_dice_ce,naive_dice_ce,monai_dice_ce", "--sweep",
                    "instances", "--sweep-instances", "1,8", "--sweep-crop", "8,32,32", check=True))
    assert rc == 0
    res = json.load(open(tmp_path / "out" / "latest" / "result.json"))
    dev = f"cuda:{torch.cuda.current_device()}"
    assert res["settings"]["devices"] == [dev]
    assert res["measurements"] and all(m["status"] == "ok" and m["device"] == dev for m in res["measurements"])
    naive = [m for m in res["measurements"] if m["impl"] == "naive"]
    assert naive and all(m["peak_bytes"] > 0 for m in naive)
    assert res["checks"]["tiny.npy"]["checks"][f"dice/{dev}"]["loss_rel_diff"] < 1e-5
    assert res["checks"]["tiny.npy"]["checks"][f"dice_ce/{dev}"]["loss_rel_diff"] < 1e-5
    assert {m["impl"] for m in res["measurements"] if m["kind"] == "file"} >= {"fused_dice_ce", "naive_dice_ce",
                                                                               "monai_dice_ce"}
    assert [r["loss"] for r in res["ratios"]] == ["dice", "dice_ce"]
    assert main(_argv(tmp_path, "--devices", f"cpu,{dev}", out="out2")) == 0


def test_a_dead_worker_is_named():
    assert "SIGKILL" in bench._death(-9) and "out-of-memory killer" in bench._death(-9)
    assert "SIGSEGV" in bench._death(-11) and "exit code 3" in bench._death(3)


def test_check_goes_crop_by_crop(tmp_path):
    vol = (grid_instances((8, 24, 24), 6, seed=2) > 0).astype(np.uint8)
    np.save(tmp_path / "v.npy", vol)
    case = bench.file_case(tmp_path / "v.npy", "shanel", 3, 0, str(tmp_path))
    assert case.shape[0] == 3
    chk = bench.Runner(threads=1, reps=1, max_case_s=1.0, time_budget_s=60.0, mem_budget_bytes=0).check(
        case, ["cpu"], ["dice", "tversky"])
    assert chk["status"] == "ok", chk
    for key in ("dice/cpu", "tversky/cpu"):
        assert chk["checks"][key]["crops"] == 3 and chk["checks"][key]["loss_rel_diff"] < 1e-5


def test_train_device_is_normalised(fake_gpus, monkeypatch):
    """blobbench train takes cuda:N too, normalised before the run (the run itself is faked here)."""
    from blobbench.bench import train

    seen = {}
    monkeypatch.setattr(train, "compare", lambda losses, seeds, cfg, out, progress: seen.update(device=cfg.device))
    assert main(["train", "--device", "cuda", "--iterations", "1", "--quiet"]) == 0
    assert seen["device"] == "cuda:1"
    with pytest.raises(SystemExit) as e:
        main(["train", "--device", "cuda:5"])
    assert e.value.code == 2

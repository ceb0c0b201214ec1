"""Issue 14: noise made visible and re-measured, run folders, ``blobbench compare``, plots and
README blocks from committed results, the command line's fixes. No timing is asserted: the
measurements here are planted."""
import json
import os
import pathlib

import numpy as np
import pytest

from blobbench.bench import cli
from blobbench.bench.cli import main
from blobbench.bench.compare import compare_runs
from blobbench.bench.noise import noise_reasons, remeasure_noisy, remeasure_proxy, summarize_times
from blobbench.bench.report import _decade_below, plot_report, readme_block, update_readme
from blobbench.bench.runs import new_run_dir, resolve_result, update_latest
from blobbench.bench.synthetic import grid_instances

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOBBENCH_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- planted measurements

def _m(case, impl, times, device="cpu", kind="instances", peak=2**20):
    return {"case": case, "kind": kind, "impl": impl, "device": device, "status": "ok", "times_s": list(times),
            "peak_bytes": peak, "alloc_peak_bytes": peak, **summarize_times(times)}


def _sweep(values_ms, impl="fused", spread=0.02):
    """A sweep N=1, 4, 16, ... with the given medians (ms) and a small spread."""
    cases = [{"name": f"N={4 ** k}", "kind": "instances", "sweep_x": 4 ** k, "shape": [1, 1, 8, 8, 8],
              "blobs": [4 ** k], "meta": {"crop": [8, 8, 8]}} for k in range(len(values_ms))]
    ms = [_m(c["name"], impl, [v / 1e3 * f for f in (1 - spread, 1, 1 + spread)])
          for c, v in zip(cases, values_ms)]
    return cases, ms


def test_summarize_times():
    s = summarize_times([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median_s"] == 3.0 and s["min_s"] == 1.0 and s["max_s"] == 100.0 and s["reps"] == 5
    assert s["rel_iqr"] == pytest.approx((s["q3_s"] - s["q1_s"]) / 3.0)
    assert summarize_times([1.0, 2.0])["rel_iqr"] is None      # too few repetitions for a spread


def test_noise_reasons_spread_and_sweep_outlier():
    cases, ms = _sweep([1.0, 1.1, 1.0, 24.6, 1.2])               # the N=1000 spike, planted at N=64
    flags = noise_reasons(ms, cases)
    assert list(flags) == [3] and "outside its sweep neighbours" in flags[3][0]
    cases, ms = _sweep([9.0, 93.7, 52.7, 170.0])                 # the naive loop's N=4 slower than N=16:
    assert list(noise_reasons(ms, cases)) == [1, 2]              # from neighbours alone either may be off
    cases, ms = _sweep([1.0, 8.0, 64.0, 512.0])                  # steep but smooth growth is no outlier
    assert noise_reasons(ms, cases) == {}
    ms[2] = _m("N=16", "fused", [0.04, 0.064, 0.1])              # wide spread
    flags = noise_reasons(ms, cases, threshold=0.25)
    assert list(flags) == [2] and flags[2][0].startswith("spread IQR/median")
    assert noise_reasons(ms, cases, threshold=10.0) == {}


def test_remeasure_fixes_a_planted_outlier():
    cases, ms = _sweep([1.0, 1.1, 1.0, 24.6, 1.2])
    calls = []

    def measure(case, impl, device):
        calls.append((case, impl, device))
        return _m(case, impl, [0.00098, 0.001, 0.00102])

    out = remeasure_noisy(ms, cases, measure, retries=2)
    assert calls == [("N=64", "fused", "cpu")]                   # only the outlier, once (then it is clean)
    assert out[3]["median_s"] == pytest.approx(0.001) and out[3]["noisy"] == []
    assert out[3]["attempts"][0]["median_s"] == pytest.approx(0.0246)
    assert "outside its sweep neighbours" in out[3]["attempts"][0]["reasons"][0]
    assert all(m["noisy"] == [] for m in out) and "attempts" not in out[0]


def test_remeasure_flags_what_stays_noisy():
    cases, ms = _sweep([1.0, 1.1, 1.0, 24.6, 1.2])
    calls = []

    def measure(case, impl, device):
        calls.append(case)
        return _m(case, impl, [0.0240, 0.0250, 0.0255])          # the interference persists

    out = remeasure_noisy(ms, cases, measure, retries=2)
    assert calls == ["N=64", "N=64"]
    assert out[3]["noisy"] and "outside its sweep neighbours" in out[3]["noisy"][0]
    assert len(out[3]["attempts"]) == 2
    # kept: the fastest attempt (interference only adds time)
    assert out[3]["median_s"] == pytest.approx(min([0.0246, 0.025]))


def test_remeasure_keeps_the_faster_attempt():
    cases, ms = _sweep([1.0, 1.1, 1.0])
    ms[1] = _m("N=4", "fused", [0.020, 0.024, 0.040])             # noisy spread, slow
    out = remeasure_noisy(ms, cases, lambda c, i, d: _m(c, i, [0.00108, 0.0011, 0.00112]), retries=2)
    assert out[1]["median_s"] == pytest.approx(0.0011) and out[1]["noisy"] == []
    assert out[1]["attempts"][0]["median_s"] == pytest.approx(0.024)
    # a slower re-measurement is set aside, the noisy one stays flagged
    ms[1] = _m("N=4", "fused", [0.0008, 0.001, 0.0016])
    out = remeasure_noisy(ms, cases, lambda c, i, d: _m(c, i, [0.0049, 0.005, 0.0051]), retries=1)
    assert out[1]["median_s"] == pytest.approx(0.001) and out[1]["noisy"][0].startswith("spread")
    assert out[1]["attempts"][0]["median_s"] == pytest.approx(0.005)


def test_remeasure_surfaces_an_error():
    cases, ms = _sweep([1.0, 1.1, 1.0, 24.6, 1.2])
    err = {"case": "N=64", "kind": "instances", "impl": "fused", "device": "cpu", "status": "error",
           "error": "RuntimeError: boom", "traceback": "Traceback ..."}
    out = remeasure_noisy(ms, cases, lambda c, i, d: dict(err), retries=2)
    assert out[3]["status"] == "error" and out[3]["attempts"][0]["median_s"] == pytest.approx(0.0246)
    assert cli.run_errors({"measurements": out, "checks": {}})


def test_clean_runs_are_not_remeasured():
    cases, ms = _sweep([1.0, 2.0, 4.0, 8.0])
    out = remeasure_noisy(ms, cases, lambda *a: pytest.fail("measured again"), retries=2)
    assert all(m["noisy"] == [] for m in out)


def test_proxy_remeasured_while_noisy():
    seq = iter([{"status": "ok", "ratio": 3.4, "rel_iqr": 0.8}, {"status": "ok", "ratio": 1.9, "rel_iqr": 0.05},
                {"status": "ok", "ratio": 9.9, "rel_iqr": 0.9}])
    p = remeasure_proxy(lambda: next(seq), threshold=0.25, retries=2)
    assert p["ratio"] == 1.9 and p["noisy"] == [] and [a["ratio"] for a in p["attempts"]] == [3.4]
    seq = iter([{"status": "ok", "ratio": 3.4, "rel_iqr": 0.8}, {"status": "ok", "ratio": 2.0, "rel_iqr": 0.9},
                {"status": "ok", "ratio": 2.5, "rel_iqr": 0.5}])
    p = remeasure_proxy(lambda: next(seq), threshold=0.25, retries=2)
    assert p["ratio"] == 2.5 and p["noisy"] and len(p["attempts"]) == 2
    seq = iter([{"status": "ok", "ratio": 3.4, "rel_iqr": 0.8}, {"status": "error", "error": "boom"}])
    p = remeasure_proxy(lambda: next(seq), threshold=0.25, retries=2)
    assert p["status"] == "error" and cli.run_errors({"measurements": [], "host_proxy": p})


# ----------------------------------------------------------------------------- run folders

def test_run_folders_never_overwrite(tmp_path):
    a = new_run_dir(tmp_path, "run")
    b = new_run_dir(tmp_path, "run")
    assert a.name == "run" and b.name == "run-2" and a.is_dir() and b.is_dir()
    (a / "result.json").write_text("{}")
    update_latest(tmp_path, a)
    assert resolve_result(tmp_path) == tmp_path / "latest" / "result.json"
    assert os.path.realpath(tmp_path / "latest") == str(a.resolve())
    (b / "result.json").write_text("{}")
    update_latest(tmp_path, b)
    assert os.path.realpath(tmp_path / "latest") == str(b.resolve())
    assert resolve_result(b) == b / "result.json" and resolve_result(b / "result.json") == b / "result.json"
    with pytest.raises(FileNotFoundError):
        resolve_result(tmp_path / "nothing")


def _tiny_argv(tmp_path, *extra):
    np.save(tmp_path / "tiny.npy", (grid_instances((8, 24, 24), 5, seed=1) > 0).astype(np.uint8))
    return ["--profiles", "none", "--labels", str(tmp_path / "tiny.npy"), "--labels-profile", "shanel",
            "--crops", "1", "--sweep", "none", "--impls", "fused", "--reps", "3", "--no-plots", "--no-check",
            "--no-proxy", "--out", str(tmp_path / "runs"), *extra]


def test_command_writes_a_new_run_folder_each_time(tmp_path, capsys):
    assert main(_tiny_argv(tmp_path)) == 0
    assert main(_tiny_argv(tmp_path)) == 0
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    assert len(runs) == 2 and all((p / "result.json").is_file() for p in runs)
    latest = json.load(open(tmp_path / "runs" / "latest" / "result.json"))
    first = json.load(open(runs[0] / "result.json"))
    assert latest["run"]["id"] != first["run"]["id"]
    assert os.path.realpath(tmp_path / "runs" / "latest") in {str(p.resolve()) for p in runs}
    run = latest["run"]
    assert run["revision"] and run["cpus"] >= 1
    assert run["load_before"] is None or len(run["load_before"]) == 3
    assert "load_after" in run
    m = latest["measurements"][0]
    assert {"rel_iqr", "noisy", "load", "q1_s", "q3_s"} <= set(m)
    text = capsys.readouterr().out
    assert "machine load" in text and "noise:" in text
    # a name of one's own, never reused
    assert main(_tiny_argv(tmp_path, "--name", "mine")) == 0
    assert main(_tiny_argv(tmp_path, "--name", "mine")) == 0
    assert (tmp_path / "runs" / "mine" / "result.json").is_file()
    assert (tmp_path / "runs" / "mine-2" / "result.json").is_file()


# ----------------------------------------------------------------------------- compare

def _result(times_ms, peak_mb=None, machine="test machine", proxy=None):
    """A result.json with profile cases; ``times_ms[(case, impl)]`` = median (ms) or a status."""
    peak_mb = peak_mb or {}
    cases = sorted({c for c, _ in times_ms})
    ms = []
    for (c, impl), t in times_ms.items():
        if isinstance(t, str):
            ms.append({"case": c, "kind": "profile", "impl": impl, "device": "cpu", "status": t})
        else:
            ms.append(_m(c, impl, [t / 1e3 * f for f in (0.98, 0.99, 1.0, 1.01, 1.02)], kind="profile",
                         peak=int(peak_mb.get((c, impl), 10) * 2**20)))
    return {"machine": {"summary": machine}, "settings": {"devices": ["cpu"], "reps": 5},
            "cases": [{"name": c, "kind": "profile", "shape": [1, 1, 8, 8, 8], "blobs": [3], "meta": {}}
                      for c in cases],
            "measurements": ms, "checks": {}, "host_proxy": proxy}


BASE = {("ms", "fused"): 2.0, ("ms", "monai_dice"): 5.0, ("shanel", "fused"): 2.1, ("shanel", "naive"): 900.0}


def _write(tmp_path, name, result):
    d = tmp_path / name
    d.mkdir()
    (d / "result.json").write_text(json.dumps(result))
    return d


def test_compare_without_regression_exits_0(tmp_path, capsys):
    old = _write(tmp_path, "old", _result(BASE))
    new = _write(tmp_path, "new", _result({k: v * 1.03 for k, v in BASE.items()}))   # within the noise
    assert main(["compare", str(old), str(new), "--out", str(tmp_path / "cmp")]) == 0
    text = capsys.readouterr().out
    assert "0 regressions" in text and "REGRESSION" not in text
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    cmp = json.load(open(tmp_path / "cmp" / "compare.json"))
    assert len(cmp["rows"]) == 4 and cmp["same_machine"]


def test_compare_with_planted_regression_exits_1(tmp_path, capsys):
    slow = dict(BASE)
    slow[("ms", "fused")] = 3.0                                  # 1.5x slower, far outside the quartiles
    old = _write(tmp_path, "old", _result(BASE))
    new = _write(tmp_path, "new", _result(slow))
    assert main(["compare", str(old / "result.json"), str(new), "--out", str(tmp_path / "cmp")]) == 1
    text = capsys.readouterr().out
    assert "1 regression: ms/fused/cpu" in text and "REGRESSION: time x1.50" in text
    # the same ratio within a wide threshold is no regression
    assert main(["compare", str(old), str(new), "--threshold", "0.6", "--no-plots",
                 "--out", str(tmp_path / "cmp2")]) == 0


def test_compare_memory_status_and_proxy(tmp_path):
    proxy = {"status": "ok", "ratio": 2.0, "ratio_q1": 1.95, "ratio_q3": 2.05,
             "ratios": [2.0 * f for f in (0.97, 0.98, 0.99, 1.0, 1.01, 1.02, 1.03)]}
    old = _result(BASE, proxy=proxy)
    cmp = compare_runs(old, _result(BASE, peak_mb={("ms", "fused"): 30, ("ms", "monai_dice"): 30}, proxy=proxy))
    assert [(r["case"], r["impl"]) for r in cmp["regressions"]] == [("ms", "fused")]   # MONAI's: not gated
    assert "memory +20.0 MB" in cmp["regressions"][0]["why"][0]
    lost = dict(BASE)
    lost[("shanel", "fused")] = "out of memory"
    lost[("shanel", "naive")] = "over budget"                      # a baseline's budget: not ours
    cmp = compare_runs(old, _result(lost, proxy=proxy))
    assert [r["why"] for r in cmp["regressions"]] == [["status ok -> out of memory"]]
    worse = proxy | {"ratio": 4.0, "ratio_q1": 3.9, "ratio_q3": 4.1, "ratios": [2 * r for r in proxy["ratios"]]}
    cmp = compare_runs(old, _result(BASE, proxy=worse))
    assert cmp["regressions"] and cmp["regressions"][0]["case"] == "host cost proxy"
    faster = {k: v / 2 for k, v in BASE.items()}
    cmp = compare_runs(old, _result(faster))
    # ms/fused relative to MONAI DiceLoss: unchanged (the machine got faster); shanel/fused has no
    # baseline there, so its absolute time is judged: an improvement
    verdicts = {(r["case"], r["impl"]): r["verdict"] for r in cmp["rows"]}
    assert not cmp["regressions"] and verdicts == {("ms", "fused"): "", ("ms", "monai_dice"): "",
                                                   ("shanel", "fused"): "improvement", ("shanel", "naive"): ""}


def test_compare_says_when_machines_differ(tmp_path, capsys):
    old = _write(tmp_path, "old", _result(BASE, machine="A"))
    new = _write(tmp_path, "new", _result(BASE, machine="B"))
    assert main(["compare", str(old), str(new), "--no-plots", "--out", str(tmp_path / "c")]) == 0
    assert "different machines" in capsys.readouterr().out


def test_compare_bad_path_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", str(tmp_path / "nope"), str(tmp_path / "nope2")])
    assert e.value.code == 2 and "no result.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------- plots and README

def test_busy_machine_is_said():
    from blobbench.bench.report import busy_warning

    assert "busy" in busy_warning({"cpus": 2, "load_before": [0.2, 0.1, 0.1], "load_after": [3.5, 2.0, 1.0]})
    assert busy_warning({"cpus": 2, "load_before": [0.2, 0.1, 0.1], "load_after": [0.9, 0.5, 0.3]}) == ""
    assert busy_warning({"cpus": 2, "load_before": None, "load_after": None}) == ""
    # The run's own benchmark threads load the machine for the whole run: not other work.
    own = {"cpus": 2, "load_before": [0.5, 2.0, 2.5], "load_after": [1.85, 2.0, 2.4]}
    assert busy_warning(own, own_threads=2) == ""
    assert "busy" in busy_warning(dict(own, load_after=[3.6, 2.0, 2.4]), own_threads=2)
    assert "busy" in busy_warning(dict(own, load_before=[1.5, 1.0, 1.0]), own_threads=2)


def test_bar_base_is_a_decade_below():
    assert _decade_below([2.4, 425.0]) == pytest.approx(0.1)
    assert _decade_below([0.9, 3.0]) == pytest.approx(0.01)


def test_plots_mark_noise(tmp_path):
    pytest.importorskip("matplotlib")
    cases, ms = _sweep([1.0, 1.1, 1.0, 24.6, 1.2])
    for m in ms:
        m["noisy"] = []
    ms[3]["noisy"] = ["planted"]
    res = {"machine": {"summary": "test"}, "settings": {"devices": ["cpu"], "reps": 3}, "cases": cases,
           "measurements": ms}
    written = plot_report(res, tmp_path)
    assert [os.path.basename(p) for p in written] == ["sweep_instances.png"]


def test_readme_blocks_are_generated_from_committed_results():
    """Every results block in the README is what `blobbench report RUN --readme README.md` gives."""
    text = (ROOT / "README.md").read_text()
    import re

    runs = re.findall(r"<!-- blobbench report (\S+) -->", text)
    assert runs, "the README has no generated results block"
    for run in runs:
        res = json.load(open(ROOT / run / "result.json"))
        cwd = os.getcwd()
        os.chdir(ROOT)  # the block's links are relative to the repository root
        try:
            assert not update_readme("README.md", res, run, write=False), \
                f"README block of {run} is stale: run `blobbench report {run} --readme README.md`"
            block = readme_block(res, run)
        finally:
            os.chdir(cwd)
        assert "machine" in block.lower() and "change with the CPU" in block


def test_report_check_mode(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "result.json").write_text(json.dumps(_result(BASE)))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n<!-- blobbench report {run} -->\nold text\n<!-- /blobbench report -->\nend\n")
    assert main(["report", str(run), "--readme", str(readme), "--check"]) == 1
    assert main(["report", str(run), "--readme", str(readme), "--no-plots"]) == 0
    assert main(["report", str(run), "--readme", str(readme), "--check"]) == 0
    body = readme.read_text()
    assert body.startswith("intro\n") and body.endswith("<!-- /blobbench report -->\nend\n")
    assert "| ms 1x1x8x8x8 | cpu |" in body and "old text" not in body


# ----------------------------------------------------------------------------- the command line

def test_help_is_plain_text(capsys):
    for argv in (["--help"], ["train", "--help"], ["compare", "--help"], ["report", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "``" not in out and ":func:" not in out and ":class:" not in out and ":mod:" not in out, argv
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert "blobbench train" in usage and "blobbench compare OLD NEW" in usage and "blobbench report" in usage


def test_train_options_have_help():
    ap = cli.build_train_parser()
    for action in ap._actions:
        assert action.help, f"{action.option_strings} has no help"


@pytest.mark.parametrize("argv, msg", [
    (["--quick", "--reps", "0"], "--reps must be >= 1"),
    (["--sweep-instances", "1,a"], "expected comma-separated integers, got 'a'"),
    (["--sweep-crop", "8,x,8"], "expected comma-separated integers"),
    (["--remeasure", "-1"], "--remeasure"),
    (["--outlier-factor", "1"], "--outlier-factor"),
    (["--sweep-edges", "0,32"], "--sweep-edges"),
    (["--sweep-instances", "-1"], "--sweep-instances"),
    (["--crops", "0"], "--crops"),
    (["--name", "a/b"], "--name"),
    (["--name", "latest"], "--name"),
])
def test_command_line_fixes(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and "invalid parse value" not in err


def test_quick_keeps_explicit_reps():
    ap = cli.build_parser()
    args = ap.parse_args(["--quick", "--reps", "5"])
    cli._validate(args, ap)
    assert args.reps == 5 and args.sweep == "none"
    args = ap.parse_args(["--quick"])
    cli._validate(args, ap)
    assert args.reps == 3


# ----------------------------------------------------------------------------- label files (issue 11 item 11)

def _label_error(tmp_path, capsys, filename, *extra):
    with pytest.raises(SystemExit) as e:
        main(["--quick", "--labels", str(tmp_path / filename), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]                          # argparse: usage, then the one line


def test_label_file_errors_are_one_line_and_exit_2(tmp_path, capsys):
    vol = (grid_instances((8, 24, 24), 5, seed=1) > 0).astype(np.uint8)
    np.savez(tmp_path / "two.npz", image=vol, mask=vol)
    line = _label_error(tmp_path, capsys, "two.npz")
    assert "holds arrays ['image', 'mask']" in line and "--labels-key" in line
    np.save(tmp_path / "float.npy", vol.astype(np.float32) * 0.5)
    assert "label values must be integers" in _label_error(tmp_path, capsys, "float.npy")
    assert "label file not found" in _label_error(tmp_path, capsys, "missing.npy")
    np.save(tmp_path / "zero.npy", np.zeros((8, 24, 24), np.uint8))
    assert "no foreground voxels" in _label_error(tmp_path, capsys, "zero.npy")
    (tmp_path / "broken.npy").write_bytes(b"not an array")
    assert "broken.npy" in _label_error(tmp_path, capsys, "broken.npy")
    (tmp_path / "labels.txt").write_text("1 2 3")
    assert "must be .nii" in _label_error(tmp_path, capsys, "labels.txt")
    assert "no array 'nope'" in _label_error(tmp_path, capsys, "two.npz", "--labels-key", "nope")


def test_label_file_with_key_and_integer_floats_runs(tmp_path):
    vol = (grid_instances((8, 24, 24), 5, seed=1) > 0).astype(np.uint8)
    np.savez(tmp_path / "two.npz", image=vol * 7, mask=vol)
    np.save(tmp_path / "f.npy", vol.astype(np.float32))         # float storage, integer values: accepted
    for f, extra in (("two.npz", ["--labels-key", "mask"]), ("f.npy", [])):
        assert main(["--profiles", "none", "--labels", str(tmp_path / f), "--labels-profile", "shanel", "--crops",
                     "1", "--impls", "fused", "--reps", "3", "--no-plots", "--no-check", "--no-proxy",
                     "--out", str(tmp_path / "o"), *extra]) == 0

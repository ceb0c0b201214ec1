"""The ``blobbench`` command: benchmark blob Dice implementations side by side, compare runs.

The help text of the parser is :data:`DESCRIPTION` (plain text, no markup).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time

import torch

from .noise import DEFAULT_FACTOR, DEFAULT_THRESHOLD

DEFAULT_PROFILES = ("ms", "lits", "disco", "shanel", "deepmact")
DEFAULT_IMPLS = ("naive", "vectorized", "fused", "fused_tversky", "monai_dice", "naive_dice_ce", "fused_dice_ce",
                 "monai_dice_ce", "naive_cc_dice_ce", "vectorized_cc_dice_ce", "fused_cc_dice_ce")
DEFAULT_SWEEP_N = (1, 4, 16, 64, 256, 1000, 2000)
DEFAULT_SWEEP_EDGES = (32, 64, 128, 256)
GATE_PROFILES = ("ms", "shanel")
GATE_REPS = 30

USAGE = """blobbench [bench] [options]                 benchmark (below)
       blobbench train [options]                   train with dice / blob dice (blobbench train --help)
       blobbench quality [options]                 3D loss quality by lesion size (blobbench quality --help)
       blobbench compare OLD NEW [options]         two runs side by side (blobbench compare --help)
       blobbench ab BASE [options]                 BASE and the working tree measured interleaved (blobbench ab --help)
       blobbench report RUN [options]              redraw a run's report and plots (blobbench report --help)"""

DESCRIPTION = """\
Benchmark blob Dice implementations side by side. The default run is the project's main job (a few
minutes on a 2-core CPU):

1. for each dataset profile (synthetic, paper-shaped: ms, lits, disco, shanel, deepmact) or each
   label file given with --labels: check the fused ops against the paper's loop (float64) and print
   the largest differences, then time forward + backward of the naive loop, the vectorized
   reference, the fused ops (CPU, and CUDA where present) and plain MONAI DiceLoss, with peak
   memory, each in a fresh process; the same for blob Dice+CE: the fused op against the loop with
   MONAI DiceCELoss per blob and plain MONAI DiceCELoss;
2. sweep the instance count (1 ... 2000 in a fixed crop) and the volume (32^3 ... 256^3 with a
   fixed count), so that O(N*V) against O(V) shows;
3. measure again what was noisy (spread over --noise-threshold, or a sweep point far off its
   neighbours) and flag what stays noisy;
4. print a table and write result.json, report.txt and PNG plots to a new folder under --out
   (OUT/<time>-<git revision>-<machine>/, OUT/latest points at it).

The naive loop gets a time and a memory budget (--time-budget, --memory-budget); a case that
exceeds them is recorded as "over budget" or "out of memory". A measurement that fails with an
error prints its traceback and the command exits with status 1.
"""


def _csv(kind):
    """An argparse type: a comma-separated list of ``kind``, with a message that names the item."""
    what = {int: "integers", float: "numbers", str: "names"}[kind]

    def parse(s):
        items = [x.strip() for x in s.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {s!r}")
        out = []
        for x in items:
            try:
                out.append(kind(x))
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {x!r} in {s!r}") from None
        return out
    parse.__name__ = f"comma-separated {what}"
    return parse


def plain_text(doc: str) -> str:
    """A docstring as plain text for --help: reST roles and double backticks removed."""
    import re

    doc = re.sub(r":(?:func|class|mod|data|meth|attr):`~?([^`]+)`", r"\1", doc or "")
    return doc.replace("``", "")


def _machine(devices):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import blobbench

    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "blobbench": blobbench.__version__, "cuda_kernels": blobbench.has_cuda_kernels(),
            "memory_method": ("CPU: peak RSS (VmHWM) of a fresh process, reset after warm-up"
                              if os.path.exists("/proc/self/clear_refs") else "CPU: ru_maxrss growth")
            + "; CPU allocator bytes of one call (torch.profiler allocation events: alloc_peak_bytes)"}
    summary = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"
    cuda = [d for d in devices if d.startswith("cuda")]
    if cuda:
        info["gpus"] = {d: torch.cuda.get_device_name(torch.device(d)) for d in cuda}
        info["gpu"] = ", ".join(sorted(set(info["gpus"].values())))
        info["memory_method"] += "; CUDA: max_memory_allocated above the inputs"
        summary += f", {info['gpu']}"
    info["summary"] = summary
    return info


def build_parser():
    ap = argparse.ArgumentParser(prog="blobbench", usage=USAGE, description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", type=_csv(str), default=list(DEFAULT_PROFILES),
                    help="dataset profiles, comma separated (default: all five; 'none' for none)")
    ap.add_argument("--batch", default="2",
                    help="crops per profile batch: a number, or 'paper' for the paper's crops x batch "
                         "(8, 4, 12, 18, 8); default 2")
    ap.add_argument("--labels", nargs="+", default=[], metavar="FILE",
                    help="your own label files (.nii/.nii.gz/.npy/.npz); each is labelled with cc3d and "
                         "cropped as --labels-profile says")
    ap.add_argument("--labels-profile", default="ms", help="crop size and crops per file for --labels (default ms)")
    ap.add_argument("--labels-key", default=None,
                    help="array name inside .npz label files (needed when one holds several arrays and none is "
                         "called 'label')")
    ap.add_argument("--crops", type=int, default=None, help="crops per label file (default: the profile's)")
    ap.add_argument("--sweep", choices=("both", "instances", "volume", "none"), default="both",
                    help="which sweeps to run (default both)")
    ap.add_argument("--sweep-instances", type=_csv(int), default=list(DEFAULT_SWEEP_N),
                    help="instance counts of the instance sweep (default 1,4,16,64,256,1000,2000)")
    ap.add_argument("--sweep-crop", type=_csv(int), default=[32, 128, 128],
                    help="crop of the instance sweep, D,H,W (default 32,128,128)")
    ap.add_argument("--sweep-edges", type=_csv(int), default=list(DEFAULT_SWEEP_EDGES),
                    help="cube edges of the volume sweep (default 32,64,128,256)")
    ap.add_argument("--sweep-count", type=int, default=25, help="instances in the volume sweep (default 25)")
    ap.add_argument("--impls", type=_csv(str), default=list(DEFAULT_IMPLS),
                    help="implementations for the profiles: naive, vectorized, fused, fused_tversky, "
                         "naive_tversky, monai_dice, naive_dice_ce, fused_dice_ce, monai_dice_ce, naive_cc_dice_ce, "
                         "vectorized_cc_dice_ce, fused_cc_dice_ce (default: "
                         "all but naive_tversky); the sweeps use the Dice ones among them (naive, vectorized, "
                         "fused, monai_dice)")
    ap.add_argument("--devices", type=_csv(str), default=None,
                    help="cpu, cuda (the current GPU) and/or cuda:N, comma separated (default: cpu, plus cuda "
                         "when a GPU and the CUDA kernels are present)")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed repetitions per measurement, at most (default 10; 3 with --quick)")
    ap.add_argument("--max-case-seconds", type=float, default=2.0,
                    help="use fewer repetitions (at least 3) when they would take longer (default 2)")
    ap.add_argument("--time-budget", type=float, default=10.0,
                    help="seconds one forward+backward may take before it is stopped as 'over budget' (default 10)")
    ap.add_argument("--memory-budget", type=float, default=4.0,
                    help="GB of peak memory above the inputs before 'out of memory' (default 4; 0 = no limit)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    ap.add_argument("--out", default="blobbench-results",
                    help="parent folder of the run folders (default ./blobbench-results): each run writes "
                         "OUT/<UTC time>-<git revision>-<machine>/ and points OUT/latest at it")
    ap.add_argument("--name", default=None,
                    help="the run folder's name instead of <time>-<revision>-<machine> (an existing one is "
                         "never reused: -2, -3 ... are appended)")
    ap.add_argument("--noise-threshold", type=float, default=DEFAULT_THRESHOLD,
                    help=f"a measurement whose IQR/median passes this is measured again, and flagged if it stays "
                         f"noisy (default {DEFAULT_THRESHOLD:g})")
    ap.add_argument("--outlier-factor", type=float, default=DEFAULT_FACTOR,
                    help=f"a sweep point whose median is this factor above (or below) both its neighbours is "
                         f"measured again, and flagged if it stays off (default {DEFAULT_FACTOR:g})")
    ap.add_argument("--remeasure", type=int, default=2,
                    help="rounds of re-measurement of the noisy measurements (default 2; 0: flag only)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--no-check", action="store_true", help="skip the check against the naive loop")
    ap.add_argument("--no-proxy", action="store_true",
                    help="skip the host cost proxy (fused fwd+bwd on 64 voxels / x.sum().backward(), CPU, one thread)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: profile ms with 1 crop, 3 repetitions, no sweeps (options given explicitly "
                         "still apply)")
    ap.add_argument("--gate", action="store_true",
                    help="the regression gate's run (under a minute on 2 cores; compare two with 'blobbench "
                         "compare'): profiles ms and shanel, the fused ops and MONAI's DiceLoss / DiceCELoss "
                         "measured in one process per case with their repetitions interleaved, 30 repetitions, "
                         "one thread timed by its CPU time (time.thread_time: waiting for a CPU is not counted), "
                         "no sweeps, check, proxy or plots (options given explicitly still apply)")
    return ap


def _load_labels(path, key, ap):
    """A label file for --labels, or one clear line and exit status 2 (argparse's error)."""
    import numpy as np

    from .labelfiles import load_label_volume

    if not os.path.exists(path):
        ap.error(f"label file not found: {path}")
    if os.path.isdir(path):
        ap.error(f"--labels {path}: a folder, not a label file")
    try:
        vol = load_label_volume(path, key)
    except Exception as e:  # noqa: BLE001 - any failure to read is the user's file: one line, exit 2
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        ap.error(f"--labels {msg}" if msg.startswith(str(path)) else f"--labels {path}: {msg}")
    if not np.any(vol):
        ap.error(f"--labels {path}: no foreground voxels (every label is 0): nothing to benchmark")
    return vol


def _validate(args, ap):
    from .bench import IMPLEMENTATIONS
    from .synthetic import PROFILES

    if args.reps is not None and args.reps < 1:
        ap.error("--reps must be >= 1")
    from .bench import planted_slowdown

    try:
        planted_slowdown()
    except ValueError as e:
        ap.error(str(e))
    if args.remeasure < 0 or args.noise_threshold <= 0 or args.outlier_factor <= 1:
        ap.error("--remeasure must be >= 0, --noise-threshold > 0 and --outlier-factor > 1")
    if args.gate:
        from .bench import GATE_GROUPS

        args.profiles = list(GATE_PROFILES) if args.profiles == list(DEFAULT_PROFILES) else args.profiles
        args.impls = [i for g in GATE_GROUPS for i in g] if args.impls == list(DEFAULT_IMPLS) else args.impls
        args.reps = GATE_REPS if args.reps is None else args.reps
        args.threads = 1 if args.threads is None else args.threads
        args.sweep = "none"
        args.no_check = args.no_proxy = args.no_plots = True
    if args.quick:
        args.profiles = ["ms"] if args.profiles == list(DEFAULT_PROFILES) else args.profiles
        args.batch = "1" if args.batch == "2" else args.batch
        args.reps = 3 if args.reps is None else args.reps
        args.sweep = "none"
    args.reps = 10 if args.reps is None else args.reps
    if args.profiles == ["none"]:
        args.profiles = []
    for p in args.profiles + [args.labels_profile]:
        if p not in PROFILES:
            ap.error(f"unknown profile {p!r}; choose from {', '.join(PROFILES)}")
    for i in args.impls:
        if i not in IMPLEMENTATIONS:
            ap.error(f"unknown implementation {i!r}; choose from {', '.join(IMPLEMENTATIONS)}")
    if args.batch != "paper":
        try:
            args.batch = int(args.batch)
        except ValueError:
            ap.error(f"--batch must be a number or 'paper', got {args.batch!r}")
        if args.batch < 1:
            ap.error("--batch must be >= 1")
    else:
        args.batch = None
    if args.time_budget <= 0 or args.memory_budget < 0:
        ap.error("--time-budget must be > 0 and --memory-budget >= 0")
    if len(args.sweep_crop) != 3:
        ap.error("--sweep-crop needs three numbers D,H,W")
    if min(args.sweep_crop) < 1 or (args.sweep_edges and min(args.sweep_edges) < 1):
        ap.error("--sweep-crop and --sweep-edges must be >= 1")
    if (args.sweep_instances and min(args.sweep_instances) < 0) or args.sweep_count < 0:
        ap.error("--sweep-instances and --sweep-count must be >= 0")
    if (args.crops is not None and args.crops < 1) or (args.threads is not None and args.threads < 1):
        ap.error("--crops and --threads must be >= 1")
    if args.max_case_seconds <= 0:
        ap.error("--max-case-seconds must be > 0")
    if args.name is not None and (not args.name.strip() or os.sep in args.name or args.name in (".", "..", "latest")
                                  or (os.altsep and os.altsep in args.name)):
        ap.error(f"--name must be a plain folder name (not 'latest'), got {args.name!r}")
    import blobbench

    from .bench import normalize_devices

    gpu = torch.cuda.is_available() and blobbench.has_cuda_kernels()
    if args.devices is None:
        args.devices = ["cpu"] + (["cuda"] if gpu else [])
    try:
        args.devices = normalize_devices(args.devices)  # cuda -> cuda:N, once, for every CUDA call
    except ValueError as e:
        ap.error(f"--devices: {e}")
    args.label_volumes = {}
    for f in args.labels:
        args.label_volumes[f] = _load_labels(f, args.labels_key, ap)


def run_bench(args) -> dict:
    from tqdm.auto import tqdm

    from . import bench
    from .noise import load, remeasure_noisy, remeasure_proxy
    from .report import all_ratios
    from .runs import git_revision, machine_slug, new_run_dir, run_id, update_latest

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = _machine(args.devices)
    revision = git_revision()
    name = args.name or run_id(revision, machine_slug(machine.get("gpu")))
    out = new_run_dir(args.out, name)
    print(f"blobbench: {machine['summary']}; CUDA kernels {'built' if machine['cuda_kernels'] else 'not built'}; "
          f"writing {out}", flush=True)
    if bench.planted():
        print(f"blobbench: PLANTED SLOWDOWN x{bench.planted_slowdown():g} of the fused ops "
              f"({', '.join(f'{k} x{v:g}' for k, v in bench.planted().items())}; ${bench.PLANT_ENV}, test only): "
              "these timings are not the code's", flush=True)
    runner = bench.Runner(threads=torch.get_num_threads(), reps=args.reps, max_case_s=args.max_case_seconds,
                          time_budget_s=args.time_budget, mem_budget_bytes=int(args.memory_budget * 2**30))
    load_before = load()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="blobbench-") as work:
        cases = []
        with tqdm(total=len(args.profiles) + len(args.labels), desc="preparing inputs", unit="case",
                  file=sys.stderr, leave=False) as bar:
            for p in args.profiles:
                cases.append(bench.profile_case(p, args.batch, args.seed, work))
                bar.update()
            for f in args.labels:
                cases.append(bench.file_case(f, args.labels_profile, args.crops, args.seed, work, args.labels_key,
                                             volume=getattr(args, "label_volumes", {}).get(f)))
                bar.update()
            if args.sweep in ("both", "instances"):
                cases += [bench.instances_case(n, tuple(args.sweep_crop), args.seed, work)
                          for n in args.sweep_instances]
            if args.sweep in ("both", "volume"):
                cases += [bench.volume_case(e, args.sweep_count, args.seed, work) for e in args.sweep_edges]
        losses = [loss for loss, (_, fused, _) in bench.LOSSES.items() if fused in args.impls]
        tasks = []
        for c in cases:
            impls = args.impls if c.kind in ("profile", "file") else [i for i in args.impls if i in bench.SWEEP_IMPLS]
            if c.kind in ("profile", "file") and not args.no_check and losses:
                tasks.append(("check", c, None, None))
            tasks += [("measure", c, impl, dev) for impl in impls for dev in args.devices]
        if args.gate:   # one process per (case, group, device), the group's repetitions interleaved
            groups = [[i for i in g if i in args.impls] for g in bench.GATE_GROUPS]
            groups = [g for g in groups if g] + [[i] for i in args.impls if not any(i in g for g in groups)]
            tasks = [t for t in tasks if t[0] == "check"] + [
                ("group", c, g, dev) for c in cases for g in groups for dev in args.devices]
        measurements, checks = [], {}
        done = []

        def partial():  # result.json while the run goes on, so a run that is stopped keeps what it measured
            done.append(1)
            return {"run": {"id": out.name, "revision": revision, "load_before": load_before, "cpus": os.cpu_count(),
                            "command": "blobbench " + " ".join(getattr(args, "argv", []))},
                    "machine": machine, "settings": {k: v for k, v in vars(args).items()
                                                     if k not in ("out", "argv", "label_volumes")},
                    "cases": [c.to_json() for c in cases], "checks": checks, "measurements": measurements,
                    "host_proxy": None, "elapsed_s": time.perf_counter() - t_start,
                    "partial": {"done": len(done), "of": len(tasks)}}
        with tqdm(tasks, desc="measuring", unit="run", file=sys.stderr) as bar:
            for what, c, impl, dev in bar:
                bar.set_postfix_str(f"{c.name} {impl if isinstance(impl, str) else '+'.join(impl or ['check'])} "
                                    f"{dev or ''}".strip())
                if what == "check":
                    checks[c.name] = runner.check(c, args.devices, losses)
                elif what == "group":
                    measurements += runner.measure_group(c, impl, dev, clock="thread")
                else:
                    measurements.append(runner.measure(c, impl, dev))
                save_partial(partial(), out)
        by_name = {c.name: c for c in cases}
        reference = {}
        if not args.gate and args.remeasure:
            # Whole-measurement outliers: each profile case's implementations (but the slow loops) once
            # more in one process, repetitions interleaved; a measurement far off it is measured again.
            cheap = [i for i in args.impls if not i.startswith("naive")]
            for c in cases:
                if c.kind in ("profile", "file") and len(cheap) > 1:
                    for dev in args.devices:
                        for m in runner.measure_group(c, cheap, dev, reps=3, allocator=False):
                            if m["status"] == "ok":
                                reference[(m["case"], m["impl"], m["device"])] = m["median_s"]

        def again(m, reasons):
            print(f"measuring again: {m['case']} {m['impl']} {m['device']} ({'; '.join(reasons)})", file=sys.stderr)

        measurements = remeasure_noisy(
            measurements, [c.to_json() for c in cases],
            lambda case, impl, dev: runner.measure(by_name[case], impl, dev),
            threshold=args.noise_threshold, factor=args.outlier_factor,
            retries=0 if args.gate else args.remeasure, progress=again, reference=reference)
        proxy = None
        if not args.no_proxy:
            proxy = remeasure_proxy(runner.proxy, threshold=args.noise_threshold, retries=args.remeasure,
                                    progress=again)
    result = {
        "run": {"id": out.name, "revision": revision, "started_utc": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - (time.perf_counter() - t_start))),
                "load_before": load_before, "load_after": load(), "cpus": os.cpu_count(),
                "command": "blobbench " + " ".join(getattr(args, "argv", [])),
                "planted_slowdown": max(runner.plant.values(), default=1.0), "planted": runner.plant,
                "gate": bool(args.gate)},
        "machine": machine,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "argv", "label_volumes")}
        | {"devices": args.devices},
        "cases": [c.to_json() for c in cases],
        "checks": checks,
        "measurements": measurements,
        "host_proxy": proxy,
        "elapsed_s": time.perf_counter() - t_start,
    }
    result["ratios"] = all_ratios(result)
    if os.path.exists(os.path.join(out, "result.json")):
        os.remove(os.path.join(out, "result.json"))  # the partial one: write_run writes the whole run
    written = write_run(result, out, plots=not args.no_plots)
    latest = update_latest(args.out, out)
    print(f"wrote {', '.join(written)} in {result['elapsed_s']:.0f} s; {latest} -> {out.name}")
    failed = [c for c, chk in checks.items() if chk.get("status") not in ("ok", "error")]
    if failed:
        print(f"WARNING: the check against the naive loop did not complete for {failed} (over budget or out of "
              "memory)")
    result["out"] = str(out)
    return result


def save_partial(result: dict, out) -> None:
    """``out/result.json`` of a run still going (with ``"partial": {"done", "of"}``), replaced atomically."""
    path = os.path.join(str(out), "result.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(path + ".tmp", path)


def write_run(result: dict, out, plots: bool = True, echo: bool = True) -> list[str]:
    """result.json (unless it is there already), report.txt and the plots of ``result`` in ``out``."""
    from .report import plot_report, print_report

    out = str(out)
    written = []
    path = os.path.join(out, "result.json")
    if not os.path.exists(path):
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)
        written.append(path)
    buf = io.StringIO()
    print_report(result, file=buf)
    text = buf.getvalue()
    if echo:
        print(text)
    with open(os.path.join(out, "report.txt"), "w") as fh:
        fh.write(text)
    written.append(os.path.join(out, "report.txt"))
    if plots:
        try:
            written += plot_report(result, out)
        except ImportError:
            print("matplotlib is not installed: no plots (pip install 'blobbench[bench]')")
    return written


def run_errors(result: dict) -> list[str]:
    """One text per measurement or check of ``result`` that failed with an error (not "over budget"
    or "out of memory", which are results), with the worker's whole traceback."""
    out = []
    for m in result["measurements"]:
        if m["status"] not in ("ok", "over budget", "out of memory"):
            out.append(f"measurement {m['case']} / {m['impl']} / {m['device']}: {m['status']}: "
                       f"{m.get('error', '')}\n{m.get('traceback', '(no traceback)')}")
    proxy = result.get("host_proxy")
    if proxy and proxy.get("status") not in ("ok", "over budget", "out of memory"):
        out.append(f"host cost proxy: {proxy.get('status')}: {proxy.get('error', '')}\n"
                   f"{proxy.get('traceback', '(no traceback)')}")
    for name, chk in result.get("checks", {}).items():
        if chk.get("status") not in ("ok", "over budget", "out of memory"):
            out.append(f"check {name}: {chk.get('status')}: {chk.get('error', '')}\n"
                       f"{chk.get('traceback', '(no traceback)')}")
    return out


def report_errors(result: dict, file=None) -> int:
    """Print every error of a run in full (stderr); the exit code: 1 if there was one, else 0."""
    errors = run_errors(result)
    file = file or sys.stderr
    for e in errors:
        print(f"\nERROR in {e}", file=file)
    if errors:
        print(f"\nblobbench: {len(errors)} measurement(s) or check(s) failed with an error (above); the results "
              "written are incomplete", file=file)
    return 1 if errors else 0


def build_train_parser():
    from .train import LOSSES, TrainConfig
    from .train import __doc__ as train_doc

    d = TrainConfig()
    ap = argparse.ArgumentParser(prog="blobbench train", description=plain_text(train_doc),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", action="store_true",
                    help="the comparison: every loss (dice, blob_dice, tversky, blob_tversky) with seeds 0,1,2 "
                         "(unless --loss / --seeds say otherwise)")
    ap.add_argument("--loss", type=_csv(str), default=None,
                    help=f"loss or losses, comma separated, from {', '.join(LOSSES)} (default blob_dice)")
    ap.add_argument("--seeds", type=_csv(int), default=None, help="seeds, comma separated (default 0)")
    ap.add_argument("--iterations", type=int, default=d.iterations,
                    help=f"training steps per run (default {d.iterations})")
    ap.add_argument("--batch", type=int, default=d.batch, help=f"crops per step (default {d.batch})")
    ap.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    ap.add_argument("--dims", type=int, choices=(2, 3), default=d.dims, help="2D or 3D data (default 2)")
    ap.add_argument("--image-size", type=int, default=d.image_size, help=f"image edge (default {d.image_size})")
    ap.add_argument("--crop", type=int, default=d.crop, help=f"crop / sliding-window edge (default {d.crop})")
    ap.add_argument("--train-images", type=int, default=d.train_images,
                    help=f"synthetic training images, cropped at random each step (default {d.train_images})")
    ap.add_argument("--test-images", type=int, default=d.test_images,
                    help=f"synthetic test images, segmented whole and scored (default {d.test_images})")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--device", default=None,
                    help="cpu, cuda (the current GPU) or cuda:N (default: cuda when a GPU and the CUDA kernels "
                         "are present)")
    ap.add_argument("--out", default="blobbench-train", help="output folder (default ./blobbench-train)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def main_train(argv):
    from .train import LOSSES, TrainConfig, compare

    ap = build_train_parser()
    args = ap.parse_args(argv)
    losses = args.loss or (list(LOSSES) if args.compare else ["blob_dice"])
    seeds = args.seeds or ([0, 1, 2] if args.compare else [0])
    for loss in losses:
        if loss not in LOSSES:
            ap.error(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
    if args.iterations < 1 or args.batch < 1:
        ap.error("--iterations and --batch must be >= 1")
    if args.train_images < 1 or args.test_images < 1:
        ap.error("--train-images and --test-images must be >= 1")
    if args.crop > args.image_size:
        ap.error("--crop must not exceed --image-size")
    if args.threads:
        torch.set_num_threads(args.threads)
    import blobbench

    gpu = torch.cuda.is_available() and blobbench.has_cuda_kernels()
    from .bench import normalize_device

    try:
        device = normalize_device(args.device or ("cuda" if gpu else "cpu"))
    except ValueError as e:
        ap.error(f"--device: {e}")
    cfg = TrainConfig(device=device, dims=args.dims, image_size=args.image_size, crop=args.crop,
                      iterations=args.iterations,
                      batch=args.batch, lr=args.lr, train_images=args.train_images, test_images=args.test_images,
                      threads=args.threads)
    print(f"blobbench train: losses {losses}, seeds {seeds}, {cfg.iterations} iterations of batch {cfg.batch}, "
          f"{cfg.dims}D {cfg.image_size}^{cfg.dims} images, crops {cfg.crop}^{cfg.dims}, "
          f"{device}, {torch.get_num_threads()} threads", flush=True)
    compare(losses, seeds, cfg, args.out, progress=not args.quiet)
    print(f"wrote {args.out}/train_summary.json, table.md, figure.png, checkpoints/")
    return 0


def build_quality_parser():
    from .quality import QUICK, QualityConfig
    from .quality import __doc__ as quality_doc

    d = QualityConfig()
    ap = argparse.ArgumentParser(prog="blobbench quality", description=plain_text(quality_doc),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"a few-minute version (plumbing and a first look, not an answer): {QUICK}; options "
                         "given explicitly still apply")
    ap.add_argument("--loss", type=_csv(str), default=None,
                    help=f"losses, comma separated (default {','.join(d.losses)}; dice_ce, the baseline of the "
                         "paired differences, is added if missing): dice = MONAI DiceLoss, dice_ce = MONAI "
                         "DiceCELoss, blob_dice = blobbench.BlobDiceLoss, blob_dice_ce = blobbench.BlobDiceCELoss "
                         "(alpha 2, beta 1), cc_dice_ce = blobbench.cc_dice_ce (needs scipy); all with a sigmoid")
    ap.add_argument("--seeds", type=_csv(int), default=None,
                    help=f"seeds, comma separated (default {','.join(map(str, d.seeds))})")
    ap.add_argument("--iterations", type=int, default=None, help=f"training steps per run (default {d.iterations})")
    ap.add_argument("--batch", type=int, default=None, help=f"crops per step (default {d.batch})")
    ap.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default {d.lr})")
    ap.add_argument("--size", type=int, default=None, help=f"volume edge (default {d.size})")
    ap.add_argument("--crop", type=int, default=None, help=f"training crop edge (default {d.crop})")
    ap.add_argument("--features", type=_csv(int), default=None,
                    help=f"MONAI UNet channels per level, at least two (default {','.join(map(str, d.features))}); "
                         "--crop and --size must be multiples of 2 ** (levels - 1)")
    ap.add_argument("--train-volumes", type=int, default=None,
                    help=f"training volumes per seed (default {d.train_volumes})")
    ap.add_argument("--test-volumes", type=int, default=None, help=f"test volumes (default {d.test_volumes})")
    ap.add_argument("--n-boot", type=int, default=None, help=f"bootstrap resamples (default {d.n_boot})")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--device", default=None,
                    help="cpu, cuda or cuda:N (default: cuda when a GPU and the CUDA kernels are present)")
    ap.add_argument("--out", default="blobbench-quality", help="output folder (default ./blobbench-quality)")
    ap.add_argument("--quiet", action="store_true", help="no step progress (the per-run line stays)")
    ap.add_argument("--redraw", action="store_true",
                    help="no training: recompute the statistics, table.md and the figure from --out's "
                         "train_summary.json (the bootstrap is seeded: the same numbers)")
    return ap


def main_quality(argv):
    from dataclasses import replace

    from .quality import BASELINE, QUICK, QualityConfig, available_losses, run_quality

    ap = build_quality_parser()
    args = ap.parse_args(argv)
    if args.redraw:
        from .quality import resummarize

        try:
            resummarize(args.out)
        except (OSError, ValueError, KeyError) as e:
            ap.error(f"--redraw: cannot read {args.out}/train_summary.json: {e}")
        return 0
    cfg = QualityConfig(**(QUICK if args.quick else {}))
    given = {k: getattr(args, k) for k in ("iterations", "batch", "lr", "size", "crop", "train_volumes",
                                           "test_volumes", "n_boot") if getattr(args, k) is not None}
    for k, v in given.items():
        if v <= 0:
            ap.error(f"--{k.replace('_', '-')} must be > 0, got {v}")
    if args.loss:
        for loss in args.loss:
            if loss not in available_losses():
                ap.error(f"unknown loss {loss!r}; choose from {', '.join(available_losses())}")
        if len(set(args.loss)) != len(args.loss):
            ap.error("--loss must not repeat a loss")
        given["losses"] = tuple(args.loss) if BASELINE in args.loss else (BASELINE, *args.loss)
    else:  # cc_dice_ce needs scipy (blobbench[instances]); without it the others run
        given["losses"] = tuple(x for x in cfg.losses if x in available_losses())
    if args.seeds:
        if len(set(args.seeds)) != len(args.seeds):
            ap.error("--seeds must not repeat a seed")
        given["seeds"] = tuple(args.seeds)
    if args.features:
        if len(args.features) < 2 or min(args.features) <= 0:
            ap.error(f"--features must be at least two positive channel counts (UNet levels), got {args.features}")
        given["features"] = tuple(args.features)
    if args.threads is not None and args.threads <= 0:
        ap.error(f"--threads must be > 0, got {args.threads}")
    cfg = replace(cfg, **given)
    if cfg.crop > cfg.size:
        ap.error(f"--crop ({cfg.crop}) must not exceed --size ({cfg.size})")
    div = 2 ** (len(cfg.features) - 1)  # the UNet halves each level: its input edge must divide
    for name, v in (("crop", cfg.crop), ("size", cfg.size)):
        if v % div:
            ap.error(f"--{name} ({v}) must be a multiple of {div} (2 ** (levels - 1) for --features "
                     f"{','.join(map(str, cfg.features))})")
    if args.threads:
        torch.set_num_threads(args.threads)
    import blobbench

    from .bench import normalize_device

    gpu = torch.cuda.is_available() and blobbench.has_cuda_kernels()
    try:
        device = normalize_device(args.device or ("cuda" if gpu else "cpu"))
    except ValueError as e:
        ap.error(f"--device: {e}")
    cfg = replace(cfg, device=device, threads=args.threads)
    n = len(cfg.losses) * len(cfg.seeds)
    print(f"blobbench quality: {n} runs ({', '.join(cfg.losses)} x seeds {list(cfg.seeds)}), {cfg.iterations} steps "
          f"of {cfg.batch} crops {cfg.crop}^3, volumes {cfg.size}^3, {device}, {torch.get_num_threads()} threads",
          flush=True)
    run_quality(cfg, args.out, progress=not args.quiet)
    print(f"wrote {args.out}/train_summary.json, table.md, sensitivity_by_size.png")
    return 0


def build_compare_parser():
    from .compare import DEFAULT_ALPHA
    from .compare import DEFAULT_FACTOR as DEFAULT_GATE_FACTOR
    from .compare import __doc__ as compare_doc

    ap = argparse.ArgumentParser(prog="blobbench compare", description=plain_text(compare_doc),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", metavar="OLD", help="the baseline: a result.json, a run folder, or a folder with 'latest'")
    ap.add_argument("new", metavar="NEW", help="the run to judge, same forms")
    ap.add_argument("--threshold", type=float, default=DEFAULT_GATE_FACTOR - 1,
                    help=f"a time change of ours (relative to its baseline) beyond 1 + this, with p < --alpha, is a "
                         f"regression (default {DEFAULT_GATE_FACTOR - 1:.2f})")
    ap.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                    help=f"the Mann-Whitney p-value a time regression must pass below (default {DEFAULT_ALPHA:g})")
    ap.add_argument("--memory-threshold", type=float, default=0.10,
                    help="allocator-byte growth of ours beyond this fraction (and over --memory-floor MB) is a "
                         "regression (default 0.10)")
    ap.add_argument("--memory-floor", type=float, default=1.0, help="MB of growth ignored (default 1)")
    ap.add_argument("--out", default=os.path.join("blobbench-results", "compare"),
                    help="folder for compare.txt, compare.json and compare.png (default ./blobbench-results/compare)")
    ap.add_argument("--no-plots", action="store_true", help="skip compare.png")
    return ap


def main_compare(argv):
    """Exit status 0: no regression; 1: at least one; 2: bad arguments or unreadable results."""
    from .compare import compare_runs, format_compare, load_run, plot_compare

    ap = build_compare_parser()
    args = ap.parse_args(argv)
    if args.threshold <= 0 or args.memory_threshold <= 0 or args.memory_floor < 0 or not 0 < args.alpha < 1:
        ap.error("--threshold and --memory-threshold must be > 0, --memory-floor >= 0, 0 < --alpha < 1")
    runs = []
    for p in (args.old, args.new):
        try:
            runs.append(load_run(p))
        except (OSError, ValueError) as e:
            ap.error(str(e))
    (old, old_path), (new, new_path) = runs
    cmp = compare_runs(old, new, args.threshold, args.memory_threshold, int(args.memory_floor * 2**20), args.alpha)
    names = [r.get("run", {}).get("id") or str(p) for r, p in runs]
    full = [n if n == str(p) else f"{n} ({p})" for n, p in zip(names, (old_path, new_path))]
    text = format_compare(cmp, *full)
    print(text, end="")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compare.txt"), "w") as fh:
        fh.write(text)
    with open(os.path.join(args.out, "compare.json"), "w") as fh:
        json.dump(cmp | {"old": str(old_path), "new": str(new_path)}, fh, indent=1)
    if not args.no_plots and cmp["rows"]:
        try:
            plot_compare(cmp, os.path.join(args.out, "compare.png"), names[0], names[1])
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'blobbench[bench]')")
    print(f"wrote {args.out}/compare.txt, compare.json" + ("" if args.no_plots else ", compare.png"))
    return 1 if cmp["regressions"] else 0


def build_report_parser():
    ap = argparse.ArgumentParser(
        prog="blobbench report",
        description="Print a run's report again and redraw its plots from its result.json (into the run's "
                    "folder); with --readme, regenerate the README block of that run (between the markers "
                    "<!-- blobbench report RUN --> and <!-- /blobbench report -->).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", metavar="RUN", help="a run folder, a result.json, or a folder with 'latest'")
    ap.add_argument("--readme", metavar="FILE", default=None, help="rewrite RUN's block in this markdown file")
    ap.add_argument("--check", action="store_true",
                    help="with --readme: change nothing, exit 1 if the block differs from what RUN gives")
    ap.add_argument("--no-plots", action="store_true", help="do not redraw the plots")
    return ap


def main_report(argv):
    from .compare import load_run
    from .report import update_readme

    ap = build_report_parser()
    args = ap.parse_args(argv)
    try:
        result, path = load_run(args.run)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    if args.readme:
        try:
            changed = update_readme(args.readme, result, path.parent, write=not args.check)
        except (OSError, ValueError) as e:
            ap.error(str(e))
        if args.check:
            print(f"{args.readme}: the block of {path.parent} is {'out of date' if changed else 'current'}")
            return 1 if changed else 0
        print(f"{args.readme}: {'updated' if changed else 'already current'} from {path}")
    if not args.check:
        written = write_run(result, path.parent, plots=not args.no_plots, echo=not args.readme)
        print(f"wrote {', '.join(written)}")
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return main_train(argv[1:])
    if argv and argv[0] == "quality":
        return main_quality(argv[1:])
    if argv and argv[0] == "compare":
        return main_compare(argv[1:])
    if argv and argv[0] == "ab":
        from .ab import main_ab

        return main_ab(argv[1:])
    if argv and argv[0] == "report":
        return main_report(argv[1:])
    if argv and argv[0] == "bench":
        argv = argv[1:]
    ap = build_parser()
    args = ap.parse_args(argv)
    _validate(args, ap)
    args.argv = argv
    result = run_bench(args)
    return report_errors(result)


if __name__ == "__main__":
    sys.exit(main())

"""``blobbench`` / ``python -m blobbench``: benchmark blob Dice implementations side by side.

The default run is the project's main job (a few minutes on a 2-core CPU):

1. for each dataset profile (synthetic, paper-shaped: ms, lits, disco, shanel, deepmact) or each
   label file given with --labels: check the fused ops against the paper's loop (float64) and
   print the largest differences, then time forward + backward of the naive loop, the
   vectorized reference, the fused ops (CPU, and CUDA where present) and plain MONAI DiceLoss,
   with peak memory, each in a fresh process;
2. sweep the instance count (1 ... 2000 in a fixed crop) and the volume (32^3 ... 256^3 with a
   fixed count), so that O(N*V) against O(V) shows;
3. print a table and write result.json, report.txt and PNG plots to --out.

The naive loop gets a time and a memory budget (--time-budget, --memory-budget); a case that
exceeds them is recorded as "over budget" or "out of memory".

``blobbench train`` (see ``blobbench train --help``) trains a small MONAI network with dice,
blob dice, tversky or blob tversky on synthetic instance-imbalanced data and compares them.
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

DEFAULT_PROFILES = ("ms", "lits", "disco", "shanel", "deepmact")
DEFAULT_IMPLS = ("naive", "vectorized", "fused", "fused_tversky", "monai_dice")
DEFAULT_SWEEP_N = (1, 4, 16, 64, 256, 1000, 2000)
DEFAULT_SWEEP_EDGES = (32, 64, 128, 256)


def _csv(kind):
    def parse(s):
        items = [x.strip() for x in s.split(",") if x.strip()]
        return [kind(x) for x in items]
    return parse


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
                              if os.path.exists("/proc/self/clear_refs") else "CPU: ru_maxrss growth")}
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
    ap = argparse.ArgumentParser(prog="blobbench", description=__doc__,
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
    ap.add_argument("--labels-key", default=None, help="array name inside .npz label files")
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
                         "naive_tversky, monai_dice (default: all but naive_tversky); the sweeps use the "
                         "Dice ones among them")
    ap.add_argument("--devices", type=_csv(str), default=None,
                    help="cpu, cuda (the current GPU) and/or cuda:N, comma separated (default: cpu, plus cuda "
                         "when a GPU and the CUDA kernels are present)")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions per measurement, at most (default 10)")
    ap.add_argument("--max-case-seconds", type=float, default=2.0,
                    help="use fewer repetitions (at least 3) when they would take longer (default 2)")
    ap.add_argument("--time-budget", type=float, default=10.0,
                    help="seconds one forward+backward may take before it is stopped as 'over budget' (default 10)")
    ap.add_argument("--memory-budget", type=float, default=4.0,
                    help="GB of peak memory above the inputs before 'out of memory' (default 4; 0 = no limit)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    ap.add_argument("--out", default="blobbench-results", help="output folder (default ./blobbench-results)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--no-check", action="store_true", help="skip the check against the naive loop")
    ap.add_argument("--no-proxy", action="store_true",
                    help="skip the host cost proxy (fused fwd+bwd on 64 voxels / x.sum().backward(), CPU, one thread)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: profile ms with 1 crop, 1 repetition, no sweeps (other options still apply)")
    return ap


def _validate(args, ap):
    from .bench import IMPLEMENTATIONS
    from .synthetic import PROFILES

    if args.quick:
        args.profiles = ["ms"] if args.profiles == list(DEFAULT_PROFILES) else args.profiles
        args.batch = "1" if args.batch == "2" else args.batch
        args.reps = 1
        args.sweep = "none"
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
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    if args.time_budget <= 0 or args.memory_budget < 0:
        ap.error("--time-budget must be > 0 and --memory-budget >= 0")
    if len(args.sweep_crop) != 3:
        ap.error("--sweep-crop needs three numbers D,H,W")
    for f in args.labels:
        if not os.path.exists(f):
            ap.error(f"label file not found: {f}")
    import blobbench

    from .bench import normalize_devices

    gpu = torch.cuda.is_available() and blobbench.has_cuda_kernels()
    if args.devices is None:
        args.devices = ["cpu"] + (["cuda"] if gpu else [])
    try:
        args.devices = normalize_devices(args.devices)  # cuda -> cuda:N, once, for every CUDA call
    except ValueError as e:
        ap.error(f"--devices: {e}")


def run_bench(args) -> dict:
    from tqdm.auto import tqdm

    from . import bench
    from .report import plot_report, print_report, ratios

    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    machine = _machine(args.devices)
    print(f"blobbench: {machine['summary']}; CUDA kernels {'built' if machine['cuda_kernels'] else 'not built'}",
          flush=True)
    runner = bench.Runner(threads=torch.get_num_threads(), reps=args.reps, max_case_s=args.max_case_seconds,
                          time_budget_s=args.time_budget, mem_budget_bytes=int(args.memory_budget * 2**30))
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="blobbench-") as work:
        cases = []
        with tqdm(total=len(args.profiles) + len(args.labels), desc="preparing inputs", unit="case",
                  file=sys.stderr, leave=False) as bar:
            for p in args.profiles:
                cases.append(bench.profile_case(p, args.batch, args.seed, work))
                bar.update()
            for f in args.labels:
                cases.append(bench.file_case(f, args.labels_profile, args.crops, args.seed, work, args.labels_key))
                bar.update()
            if args.sweep in ("both", "instances"):
                cases += [bench.instances_case(n, tuple(args.sweep_crop), args.seed, work)
                          for n in args.sweep_instances]
            if args.sweep in ("both", "volume"):
                cases += [bench.volume_case(e, args.sweep_count, args.seed, work) for e in args.sweep_edges]
        losses = [loss for loss, impl in (("dice", "fused"), ("tversky", "fused_tversky")) if impl in args.impls]
        tasks = []
        for c in cases:
            impls = args.impls if c.kind in ("profile", "file") else [i for i in args.impls if i in bench.SWEEP_IMPLS]
            if c.kind in ("profile", "file") and not args.no_check and losses:
                tasks.append(("check", c, None, None))
            tasks += [("measure", c, impl, dev) for impl in impls for dev in args.devices]
        measurements, checks = [], {}
        with tqdm(tasks, desc="measuring", unit="run", file=sys.stderr) as bar:
            for what, c, impl, dev in bar:
                bar.set_postfix_str(f"{c.name} {impl or 'check'} {dev or ''}".strip())
                if what == "check":
                    checks[c.name] = runner.check(c, args.devices, losses)
                else:
                    measurements.append(runner.measure(c, impl, dev))
        proxy = None if args.no_proxy else runner.proxy()
    result = {
        "machine": machine,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)} | {"devices": args.devices},
        "cases": [c.to_json() for c in cases],
        "checks": checks,
        "measurements": measurements,
        "host_proxy": proxy,
        "elapsed_s": time.perf_counter() - t_start,
    }
    result["ratios"] = ratios(result)
    with open(os.path.join(args.out, "result.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    buf = io.StringIO()
    print_report(result, file=buf)
    text = buf.getvalue()
    print(text)
    with open(os.path.join(args.out, "report.txt"), "w") as fh:
        fh.write(text)
    written = [os.path.join(args.out, "result.json"), os.path.join(args.out, "report.txt")]
    if not args.no_plots:
        try:
            written += plot_report(result, args.out)
        except ImportError:
            print("matplotlib is not installed: no plots (pip install 'blobbench[bench]')")
    print(f"wrote {', '.join(written)} in {result['elapsed_s']:.0f} s")
    failed = [c for c, chk in checks.items() if chk.get("status") not in ("ok", "error")]
    if failed:
        print(f"WARNING: the check against the naive loop did not complete for {failed} (over budget or out of "
              "memory)")
    return result


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
    from .train import LOSSES, TrainConfig, __doc__ as train_doc

    d = TrainConfig()
    ap = argparse.ArgumentParser(prog="blobbench train", description=train_doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", action="store_true",
                    help="the comparison: every loss (dice, blob_dice, tversky, blob_tversky) with seeds 0,1,2 "
                         "(unless --loss / --seeds say otherwise)")
    ap.add_argument("--loss", type=_csv(str), default=None,
                    help=f"loss or losses, comma separated, from {', '.join(LOSSES)} (default blob_dice)")
    ap.add_argument("--seeds", type=_csv(int), default=None, help="seeds, comma separated (default 0)")
    ap.add_argument("--iterations", type=int, default=d.iterations, help=f"training steps per run (default {d.iterations})")
    ap.add_argument("--batch", type=int, default=d.batch, help=f"crops per step (default {d.batch})")
    ap.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    ap.add_argument("--dims", type=int, choices=(2, 3), default=d.dims, help="2D or 3D data (default 2)")
    ap.add_argument("--image-size", type=int, default=d.image_size, help=f"image edge (default {d.image_size})")
    ap.add_argument("--crop", type=int, default=d.crop, help=f"crop / sliding-window edge (default {d.crop})")
    ap.add_argument("--train-images", type=int, default=d.train_images)
    ap.add_argument("--test-images", type=int, default=d.test_images)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--device", default=None,
                    help="cpu or cuda (default: cuda when a GPU and the CUDA kernels are present)")
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
    if args.crop > args.image_size:
        ap.error("--crop must not exceed --image-size")
    if args.threads:
        torch.set_num_threads(args.threads)
    import blobbench

    gpu = torch.cuda.is_available() and blobbench.has_cuda_kernels()
    device = args.device or ("cuda" if gpu else "cpu")
    if device not in ("cpu", "cuda") or (device == "cuda" and not gpu):
        ap.error(f"--device must be cpu, or cuda with a GPU and the CUDA kernels; got {device!r}")
    cfg = TrainConfig(device=device, dims=args.dims, image_size=args.image_size, crop=args.crop, iterations=args.iterations,
                      batch=args.batch, lr=args.lr, train_images=args.train_images, test_images=args.test_images,
                      threads=args.threads)
    print(f"blobbench train: losses {losses}, seeds {seeds}, {cfg.iterations} iterations of batch {cfg.batch}, "
          f"{cfg.dims}D {cfg.image_size}^{cfg.dims} images, crops {cfg.crop}^{cfg.dims}, "
          f"{device}, {torch.get_num_threads()} threads", flush=True)
    compare(losses, seeds, cfg, args.out, progress=not args.quiet)
    print(f"wrote {args.out}/train_summary.json, table.md, figure.png, checkpoints/")
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return main_train(argv[1:])
    if argv and argv[0] == "bench":
        argv = argv[1:]
    ap = build_parser()
    args = ap.parse_args(argv)
    _validate(args, ap)
    result = run_bench(args)
    return report_errors(result)


if __name__ == "__main__":
    sys.exit(main())

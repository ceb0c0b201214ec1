"""CPU benchmark of blob Dice fwd+bwd: fused op vs naive loop vs vectorized vs MONAI DiceLoss.

Side by side in one run on the paper-shaped synthetic batches of the foundation issue; times
are medians (with min and max), memory is the peak RSS growth of one fwd+bwd in a fresh
subprocess (so every allocation is seen). Prints a table with ratios and writes JSON.

    python benchmarks/cpu_bench.py --out benchmarks/results/cpu_bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

CASES = {  # name: (profile, batch)
    "ms_2x1x32x192x192": ("ms", 2),
    "shanel_2x1x32x128x128": ("shanel", 2),
}
IMPLS = ("fused", "vectorized", "monai_dice", "naive")


def _fn(impl):
    import blobbench
    from monai.losses import DiceLoss

    dice = DiceLoss(sigmoid=True)
    return {
        "fused": lambda x, i: blobbench.blob_dice(x, i),
        "vectorized": lambda x, i: blobbench.vectorized_blob_loss(x, i),
        "monai_dice": lambda x, i: dice(x, (i > 0).float()),
        "naive": lambda x, i: blobbench.naive_blob_dice(x, i),
    }[impl]


def _inputs(case):
    from blobbench.synthetic import profile_batch

    profile, batch = CASES[case]
    return profile_batch(profile, seed=0, batch=batch)


def peak_rss_child(case, impl):
    """Run in a fresh process: peak RSS growth (bytes) of one fwd+bwd after the inputs exist."""
    x, inst = _inputs(case)
    fn = _fn(impl)
    x.requires_grad_(True)
    # Reset the peak-RSS mark (Linux: VmHWM) after the inputs exist, then read it after one call.
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _vm("VmRSS")
    fn(x, inst).backward()
    print(json.dumps({"peak_extra_bytes": _vm("VmHWM") - before}))


def _vm(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def time_impl(fn, x, inst, reps):
    xg = x.detach().clone().requires_grad_(True)
    fn(xg, inst).backward()  # warm-up
    times = []
    for _ in range(reps):
        xg.grad = None
        t0 = time.perf_counter()
        fn(xg, inst).backward()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "reps": reps}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--naive-reps", type=int, default=3)
    ap.add_argument("--out", default="cpu_bench.json")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        return peak_rss_child(*args._child)

    import blobbench

    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "cases": []}
    for case in CASES:
        x, inst = _inputs(case)
        blobs = [int(inst[b].max()) for b in range(inst.shape[0])]
        ref = blobbench.naive_blob_dice(x.double(), inst)
        got = blobbench.blob_dice(x, inst)
        entry = {"case": case, "shape": list(x.shape), "blobs_per_crop": blobs,
                 "loss_rel_err_vs_naive_float64": abs(got.item() - ref.item()) / abs(ref.item()),
                 "impls": {}}
        for impl in IMPLS:
            r = time_impl(_fn(impl), x, inst, args.naive_reps if impl == "naive" else args.reps)
            out = subprocess.run([sys.executable, __file__, "--_child", case, impl],
                                 capture_output=True, text=True, check=True)
            r.update(json.loads(out.stdout.strip().splitlines()[-1]))
            entry["impls"][impl] = r
            print(f"{case:24s} {impl:11s} {r['median_s'] * 1e3:10.2f} ms "
                  f"[{r['min_s'] * 1e3:.2f}, {r['max_s'] * 1e3:.2f}]  peak +{r['peak_extra_bytes'] / 2**20:.1f} MB",
                  flush=True)
        f = entry["impls"]["fused"]
        for other in ("naive", "vectorized", "monai_dice"):
            entry[f"speedup_vs_{other}"] = entry["impls"][other]["median_s"] / f["median_s"]
        entry["time_ratio_fused_over_monai"] = f["median_s"] / entry["impls"]["monai_dice"]["median_s"]
        entry["memory_ratio_fused_over_monai"] = f["peak_extra_bytes"] / max(entry["impls"]["monai_dice"]["peak_extra_bytes"], 1)
        result["cases"].append(entry)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print("\ncase                      blobs/crop  vs naive  vs vectorized  fused/MONAI time  fused/MONAI memory  loss rel err")
    for e in result["cases"]:
        print(f"{e['case']:25s} {str(e['blobs_per_crop']):11s} {e['speedup_vs_naive']:8.0f}x "
              f"{e['speedup_vs_vectorized']:12.2f}x {e['time_ratio_fused_over_monai']:16.2f} "
              f"{e['memory_ratio_fused_over_monai']:19.2f} {e['loss_rel_err_vs_naive_float64']:12.1e}")


if __name__ == "__main__":
    main()

"""GPU benchmark of blob Dice: fused op vs vectorized scatter_add vs naive loop vs MONAI DiceLoss.

Times fwd+bwd with CUDA events (median of repetitions after warm-up), measures peak CUDA memory
above the inputs, and the device's copy bandwidth in the same run; the fused op's achieved
fraction of it counts 20 bytes per voxel (float32 logits and int32 labels: forward reads 8,
backward reads 8 and writes 4). Writes JSON.

    python benchmarks/gpu/gpu_bench.py --out results.json [--profiles ms shanel] [--reps 20]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import blobbench
from blobbench.bench.synthetic import PROFILES, profile_batch


def copy_bandwidth(nbytes=2 << 30, reps=20):
    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    t = statistics.median(times)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / t  # bytes read + written per second


def time_fwd_bwd(fn, x, instances, reps, budget_s):
    """Median seconds and peak extra CUDA bytes of loss = fn(x, instances); loss.backward()."""
    xg = x.detach().clone().requires_grad_(True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(xg, instances).backward()  # warm-up (and compile/caching)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    if first > budget_s:
        return {"status": "over budget", "first_s": first}
    reps = max(1, min(reps, int(budget_s / max(first, 1e-6))))
    xg.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        xg.grad = None
        start.record()
        fn(xg, instances).backward()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    peak = torch.cuda.max_memory_allocated() - base
    return {"status": "ok", "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "reps": reps, "peak_extra_bytes": int(peak)}


def time_graph(x, instances, max_label, reps=50):
    """Median seconds of fused fwd+bwd replayed from a CUDA graph (max_label: no sync), i.e.
    the kernels without Python, autograd and launch overhead."""
    static_x = x.detach().clone().requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            torch.autograd.grad(blobbench.blob_dice(static_x, instances, max_label=max_label), static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = blobbench.blob_dice(static_x, instances, max_label=max_label)
        torch.autograd.grad(loss, static_x)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profiles", nargs="+", default=["ms", "shanel"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--naive-budget", type=float, default=20.0, help="seconds for the naive loop per case")
    ap.add_argument("--out", default="gpu_bench.json")
    args = ap.parse_args(argv)

    from monai.losses import DiceLoss

    props = torch.cuda.get_device_properties(0)
    result = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
              "cuda": torch.version.cuda, "cases": []}
    bw = copy_bandwidth()
    result["copy_bandwidth_Bps"] = bw
    print(f"device {props.name}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    dice = DiceLoss(sigmoid=True)
    for name in args.profiles:
        p = PROFILES[name]
        x, instances = profile_batch(p, seed=0, device="cuda")
        max_label = int(instances.max())
        n_blobs = [int(instances[b].max()) for b in range(instances.shape[0])]
        voxels = x.numel()
        # correctness first: fused vs the naive loop on this very batch (float64 oracle)
        ref = blobbench.naive_blob_dice(x.double(), instances)
        got = blobbench.blob_dice(x, instances)
        rel = abs(got.item() - ref.item()) / abs(ref.item())
        impls = {
            "fused": lambda t, i: blobbench.blob_dice(t, i),
            "fused_max_label": lambda t, i, m=max_label: blobbench.blob_dice(t, i, max_label=m),
            "vectorized": lambda t, i: blobbench.vectorized_blob_loss(t, i),
            "monai_dice": lambda t, i: dice(t, (i > 0).float()),
            "naive": lambda t, i: blobbench.naive_blob_dice(t, i),
        }
        case = {"profile": name, "shape": list(x.shape), "voxels": voxels,
                "blobs_per_crop": n_blobs, "max_label": max_label, "loss_rel_err_vs_naive": rel,
                "impls": {}}
        for impl, fn in impls.items():
            r = time_fwd_bwd(fn, x, instances, args.reps if impl != "naive" else 3,
                             args.naive_budget if impl == "naive" else 60.0)
            case["impls"][impl] = r
            print(f"  {name:8s} {impl:16s} {r}", flush=True)
        try:
            tg = time_graph(x, instances, max_label)
            case["fused_graph_median_s"] = tg
            case["fused_graph_fraction_of_copy"] = 20 * voxels / tg / bw
            print(f"  {name:8s} fused (CUDA graph) {tg * 1e3:.3f} ms, "
                  f"{100 * case['fused_graph_fraction_of_copy']:.1f}% of copy bandwidth", flush=True)
        except Exception as exc:  # recorded, not fatal
            case["fused_graph_error"] = repr(exc)
            print(f"  graph timing failed: {exc!r}", flush=True)
        f = case["impls"]["fused"]
        if f["status"] == "ok":
            case["fused_bandwidth_Bps"] = 20 * voxels / f["median_s"]
            case["fused_fraction_of_copy"] = case["fused_bandwidth_Bps"] / bw
            fm = case["impls"]["fused_max_label"]
            case["fused_max_label_fraction_of_copy"] = 20 * voxels / fm["median_s"] / bw
            for other in ("vectorized", "monai_dice", "naive"):
                o = case["impls"][other]
                if o["status"] == "ok":
                    case[f"speedup_vs_{other}"] = o["median_s"] / f["median_s"]
            case["fused_peak_extra_bytes_over_grad"] = f["peak_extra_bytes"] - 4 * voxels
        result["cases"].append(case)
        del x, instances
        torch.cuda.empty_cache()
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(
        "\nprofile   shape                    fused ms  %copy  graph ms  %copy  vs vectorized  vs MONAI  vs naive"
        "  fused extra MB"
    )
    for c in result["cases"]:
        f = c["impls"]["fused"]
        print(f"{c['profile']:9s} {str(c['shape']):24s} {f['median_s'] * 1e3:8.3f} "
              f"{100 * c.get('fused_fraction_of_copy', float('nan')):5.1f}% "
              f"{c.get('fused_graph_median_s', float('nan')) * 1e3:8.3f} "
              f"{100 * c.get('fused_graph_fraction_of_copy', float('nan')):5.1f}% "
              f"{c.get('speedup_vs_vectorized', float('nan')):12.1f}x "
              f"{1 / c.get('speedup_vs_monai_dice', float('nan')):7.2f}x "
              f"{c.get('speedup_vs_naive', float('nan')):8.0f}x "
              f"{c.get('fused_peak_extra_bytes_over_grad', 0) / 2**20:10.2f}")


if __name__ == "__main__":
    main()

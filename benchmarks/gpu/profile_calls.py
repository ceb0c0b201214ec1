"""Where a GPU call's time goes: kernels per call, kernel time and wall time (torch.profiler).

For each profile's paper batch (float32 logits, int32 labels, the seeded synthetic batches of
``benchmarks/results/h200-2026-11-26``) and one 1x1x256x512x512 plane with 2000 blobs, profiles
``--calls`` forward + backward calls of the fused blob Dice (with ``max_label``, the sync-free
path) and of MONAI DiceLoss under ``torch.profiler`` with CUDA activity, and reports per call:
kernel launches, summed kernel time, the names of the kernels, and the wall time measured
around the calls (synchronised). The issue's targets: at most 4 launches per forward + backward
and <= 150 us wall per call at the MS and SHANEL paper batches. At those two batches it also
profiles blob Dice+CE (``blob_dice_ce`` with ``max_label``; on CUDA a composite of the Dice
kernels and PyTorch ops) against MONAI DiceCELoss (issue 13).

    python benchmarks/gpu/profile_calls.py --out profile_calls.json
"""
from __future__ import annotations

import argparse
import collections
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

import blobbench
from blobbench.bench.synthetic import PROFILES, grid_instances, logits_like, profile_batch


def _cases(device, small):
    for name in ("ms", "shanel"):
        x, inst = profile_batch(PROFILES[name], seed=0, device=device, batch=1 if small else None)
        yield name, x.float(), inst.int()
    if small:
        return
    inst = torch.from_numpy(grid_instances((256, 512, 512), 2000, 0)).view(1, 1, 256, 512, 512)
    x = logits_like(inst, seed=0)
    yield "plane_256x512x512_2000", x.float().to(device), inst.int().to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profile(fn, x, inst, calls):
    for _ in range(5):  # warm-up: caches, allocator, lazy init
        fn(x, inst).backward()
    _sync(x.device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x, inst).backward()
    _sync(x.device)
    wall = (time.perf_counter() - t0) / calls
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn(x, inst).backward()
        _sync(x.device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names = collections.Counter(e.name for e in kernels)
    total_us = sum(e.device_time for e in kernels)
    return {
        "wall_us_per_call": wall * 1e6,
        "kernels_per_call": len(kernels) / calls,
        "kernel_us_per_call": total_us / calls,
        "kernels": {k[:120]: v / calls for k, v in names.most_common()},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--out", default="profile_calls.json")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    ap.add_argument("--small", action="store_true", help="one crop per profile, no large plane")
    args = ap.parse_args(argv)
    from monai.losses import DiceCELoss, DiceLoss

    device = torch.device(args.device)
    dice = DiceLoss(sigmoid=True)
    dice_ce = DiceCELoss(sigmoid=True)
    name_of = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = {"device": name_of, "torch": torch.__version__, "cases": {}}
    for name, x, inst in _cases(device, args.small):
        x.requires_grad_(True)
        max_label = int(inst.max())
        target = (inst > 0).float()
        res = {
            "shape": list(x.shape),
            "fused_max_label": _profile(
                lambda t, i, m=max_label: blobbench.blob_dice(t, i, max_label=m), x, inst,
                args.calls),
            "monai_dice": _profile(lambda t, i, g=target: dice(t, g), x, inst, args.calls),
        }
        res["wall_ratio_fused_over_monai"] = (res["fused_max_label"]["wall_us_per_call"]
                                              / res["monai_dice"]["wall_us_per_call"])
        out["cases"][name] = res
        f, m = res["fused_max_label"], res["monai_dice"]
        print(f"{name:24s} fused: {f['wall_us_per_call']:8.1f} us wall, "
              f"{f['kernel_us_per_call']:7.1f} us kernels, {f['kernels_per_call']:4.1f} launches | "
              f"MONAI: {m['wall_us_per_call']:8.1f} us wall, {m['kernels_per_call']:4.1f} launches"
              f" | fused/MONAI {res['wall_ratio_fused_over_monai']:.2f}", flush=True)
        for k, v in f["kernels"].items():
            print(f"    {v:4.1f} x {k}")
        if name in ("ms", "shanel"):
            res["fused_dice_ce_max_label"] = _profile(
                lambda t, i, m=max_label: blobbench.blob_dice_ce(t, i, max_label=m), x, inst, args.calls
            )
            res["monai_dice_ce"] = _profile(lambda t, i, g=target: dice_ce(t, g), x, inst, args.calls)
            f, m = res["fused_dice_ce_max_label"], res["monai_dice_ce"]
            res["wall_ratio_fused_dice_ce_over_monai"] = f["wall_us_per_call"] / m["wall_us_per_call"]
            print(
                f"{name + ' Dice+CE':24s} fused: {f['wall_us_per_call']:8.1f} us wall, "
                f"{f['kernel_us_per_call']:7.1f} us kernels, {f['kernels_per_call']:4.1f} launches | "
                f"MONAI: {m['wall_us_per_call']:8.1f} us wall, {m['kernels_per_call']:4.1f} launches"
                f" | fused/MONAI {res['wall_ratio_fused_dice_ce_over_monai']:.2f}",
                flush=True,
            )
        del x, inst
        if device.type == "cuda":
            torch.cuda.empty_cache()
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()

"""Where a GPU call's time goes, per CUDA forward path: launches, kernel time, wall time, bandwidth.

Cases: the MS and SHANEL paper batches (``profile_batch``: 8x1x32x192x192 and 18x1x32x128x128,
seed 0) and one 1x1x256x512x512 plane with 2000 blobs; float32 logits, int32 labels. For each
case and each forward path (``BLOBBENCH_CUDA_PATHS`` unset, each of vector_loads, coop_forward,
split_forward alone, all), blob Dice with ``max_label`` (the sync-free path), forward + backward
with ``x.grad = None`` before every call (so no gradient-accumulation kernel is counted):

- wall: microseconds per call, back-to-back calls synchronised at the ends (median of 3 rounds);
- launches and kernel time per call: every device activity (kernels, memsets, copies) under
  ``torch.profiler`` with CUDA activity, with the kernels' names;
- the accumulate kernel: the longest kernel of a forward alone (its name is recorded), its read
  bandwidth (8 bytes per voxel) against a device copy of the same bytes in the same run
  (``y.copy_(x)``, whose bandwidth counts the bytes read and written): ``acc_frac_copy``;
- the floor: 20 bytes per voxel (forward reads 8, backward reads 8 and writes 4) at the copy's
  bandwidth, as a fraction of the kernel time and of the wall time of a call (1 = at the floor).

At MS and SHANEL also blob Dice+CE with ``max_label`` (the default composite, and the
fused_dice_ce path) against MONAI DiceCELoss, and MONAI DiceLoss (the baseline of blob Dice) at
every case. The issue's targets: at the MS batch <= 150 us wall and <= 0.2x MONAI DiceLoss, <= 4
launches; the accumulate at >= 70 % of the copy's bandwidth on large planes.

Writes ``--out`` (JSON) after every row, so a timeout keeps what was measured.

    python benchmarks/gpu/profile_calls.py --out profile_calls.json
    python benchmarks/gpu/profile_calls.py --device cpu --small --out p.json   # the CPU dry run
    python benchmarks/gpu/profile_calls.py --prepare     # generate the cases into the cache only
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blobbench  # noqa: E402
from blobbench.bench.synthetic import PROFILES, grid_instances, logits_like, profile_batch  # noqa: E402
from cuda_paths import cuda_paths, enabled, forward_settings  # noqa: E402

FLOOR_BYTES = 20  # per voxel, float32 logits and int32 labels: forward reads 8, backward reads 8 and writes 4
READ_BYTES = 8    # per voxel, the accumulate pass


def _plane(small):
    shape, n = ((16, 64, 64), 20) if small else ((256, 512, 512), 2000)
    return f"plane_{'x'.join(map(str, shape))}_{n}", shape, n


def prepare(small):
    """Generate (and cache on disk) every case's labels, as the cases below will ask for them."""
    for name in ("ms", "shanel"):
        profile_batch(PROFILES[name], seed=0, batch=1 if small else None)
    _, shape, n = _plane(small)
    grid_instances(shape, n, 0)


def _cases(device, small):
    for name in ("ms", "shanel"):
        x, inst = profile_batch(PROFILES[name], seed=0, batch=1 if small else None)
        if small:  # a corner of one crop: the dry run exercises the code, not the sizes
            x, inst = x[..., :8, :64, :64].contiguous(), inst[..., :8, :64, :64].contiguous()
        yield name, x.float().to(device), inst.int().to(device)
    name, shape, n = _plane(small)
    inst = torch.from_numpy(grid_instances(shape, n, 0)).view(1, 1, *shape)
    yield name, logits_like(inst, seed=0).float().to(device), inst.int().to(device)


class Timer:
    def __init__(self, device, calls, rounds, warmup=3):
        self.device, self.calls, self.rounds, self.warmup = device, calls, rounds, warmup
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def profiled(self, body, n):
        """Device activities of ``n`` calls of ``body``: (events, {name: [us, ...]})."""
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.sync()
        with profile(activities=acts) as prof:
            for _ in range(n):
                body()
            self.sync()
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        times = collections.defaultdict(list)
        for e in events:
            times[e.name].append(e.time_range.elapsed_us())
        return events, times

    def wall_us(self, body):
        per = []
        for _ in range(self.rounds):
            self.sync()
            t0 = time.perf_counter()
            for _ in range(self.calls):
                body()
            self.sync()
            per.append((time.perf_counter() - t0) / self.calls * 1e6)
        return statistics.median(per)

    def call(self, fn, x, inst, forward_only=False):
        def body():
            x.grad = None
            loss = fn(x, inst)
            if not forward_only:
                loss.backward()
        return body

    def measure(self, fn, x, inst, accumulate=False):
        body = self.call(fn, x, inst)
        for _ in range(self.warmup):  # caches, allocator, lazy kernel loading
            body()
        wall = self.wall_us(body)
        events, times = self.profiled(body, self.calls)
        row = {
            "wall_us": wall,
            "launches": len(events) / self.calls,
            "kernel_us": sum(e.time_range.elapsed_us() for e in events) / self.calls if self.cuda else None,
            "kernels": {k[:160]: len(v) / self.calls for k, v in sorted(times.items(), key=lambda kv: -sum(kv[1]))},
        }
        if accumulate and self.cuda:
            _, fwd = self.profiled(self.call(fn, x, inst, forward_only=True), self.calls)
            if fwd:  # the longest kernel of the forward reads the voxels
                name, us = max(((k, statistics.median(v)) for k, v in fwd.items()), key=lambda kv: kv[1])
                row.update(accumulate_kernel=name[:160], accumulate_us=us)
        x.grad = None
        return row

    def copy_us(self, nbytes):
        """Median device time of ``y.copy_(x)`` over ``nbytes`` (None on the CPU)."""
        if not self.cuda:
            return None
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=self.device).normal_()
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        _, times = self.profiled(lambda: dst.copy_(src), self.calls)
        del src, dst
        us = [t for v in times.values() for t in v]
        return statistics.median(us) if us else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=None, help="calls per measurement (default 30; 2 with --small)")
    ap.add_argument("--out", default="profile_calls.json")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    ap.add_argument("--small", action="store_true", help="one crop per profile and a 16x64x64 plane")
    ap.add_argument("--prepare", action="store_true", help="only generate the cases into the cache")
    args = ap.parse_args(argv)
    if args.prepare:
        t0 = time.perf_counter()
        prepare(args.small)
        print(f"cases generated (cache {os.environ.get('BLOBBENCH_CACHE', '~/.cache/blobbench')}) in "
              f"{time.perf_counter() - t0:.1f} s")
        return 0
    from monai.losses import DiceCELoss, DiceLoss

    device = torch.device(args.device)
    calls = args.calls or (2 if args.small else 30)
    timer = Timer(device, calls, rounds=1 if args.small else 3, warmup=1 if args.small else 3)
    monai_dice, monai_dice_ce = DiceLoss(sigmoid=True), DiceCELoss(sigmoid=True)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "calls": calls, "cases": {}, "rows": [],
           "definitions": {"acc_frac_copy": "accumulate read bandwidth (8 B/voxel / accumulate_us) over the "
                                            "copy's (2 x bytes / copy_us: read + write)",
                           "floor_us": "20 B/voxel at the copy's bandwidth",
                           "floor_frac_kernel": "floor_us / kernel_us", "floor_frac_wall": "floor_us / wall_us"}}

    def save():
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(out, fh, indent=1)
        os.replace(tmp, args.out)

    for case, x, inst in _cases(device, args.small):
        V = x.numel()
        x.requires_grad_(True)
        max_label = int(inst.max())
        target = (inst > 0).float()
        copy_us = timer.copy_us(READ_BYTES * V)
        meta = {"shape": list(x.shape), "voxels": V, "max_label": max_label, "copy_us": copy_us}
        if copy_us:
            copy_bw = 2 * READ_BYTES * V / (copy_us * 1e-6)
            meta.update(copy_bw_GBps=copy_bw / 1e9, floor_us=FLOOR_BYTES * V / copy_bw * 1e6)
        out["cases"][case] = meta
        print(f"{case}: {meta['shape']}, max_label {max_label}, copy of {READ_BYTES * V / 1e6:.0f} MB: "
              f"{copy_us if copy_us is None else round(copy_us, 1)} us", flush=True)

        def add(loss, path, fn, accumulate=False, setting="default"):
            with cuda_paths(setting):
                on = enabled()
                row = {"case": case, "loss": loss, "path": path, "paths_on": on,
                       **timer.measure(fn, x, inst, accumulate)}
            if "accumulate_us" in row and copy_us:
                row["acc_frac_copy"] = copy_us / (2 * row["accumulate_us"])
            if meta.get("floor_us") and loss.startswith("blob"):
                row["floor_frac_kernel"] = meta["floor_us"] / row["kernel_us"] if row["kernel_us"] else None
                row["floor_frac_wall"] = meta["floor_us"] / row["wall_us"]
            out["rows"].append(row)
            save()
            k = "-" if row["kernel_us"] is None else f"{row['kernel_us']:.1f}"
            acc = f", accumulate {row['accumulate_us']:.1f} us = {row['acc_frac_copy']:.2f} of copy bw" \
                if "acc_frac_copy" in row else ""
            print(f"  {loss:12s} {path:14s} {row['wall_us']:9.1f} us wall, {k} us kernels, "
                  f"{row['launches']:.1f} launches{acc}", flush=True)
            return row

        dice_rows = {}
        for setting in forward_settings():
            dice_rows[setting] = add("blob_dice", setting,
                                     lambda t, i, m=max_label: blobbench.blob_dice(t, i, max_label=m),
                                     accumulate=True, setting=setting)
        base = add("monai_dice", "-", lambda t, i, g=target: monai_dice(t, g))
        for r in dice_rows.values():
            r["wall_over_monai_dice"] = r["wall_us"] / base["wall_us"]
        if case in ("ms", "shanel"):
            ce_base = add("monai_dice_ce", "-", lambda t, i, g=target: monai_dice_ce(t, g))
            for setting in ("default", "fused_dice_ce"):
                r = add("blob_dice_ce", setting,
                        lambda t, i, m=max_label: blobbench.blob_dice_ce(t, i, max_label=m), setting=setting)
                r["wall_over_monai_dice_ce"] = r["wall_us"] / ce_base["wall_us"]
                r["wall_over_monai_dice"] = r["wall_us"] / base["wall_us"]
        save()
        del x, inst, target
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

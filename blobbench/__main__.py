"""``blobbench`` / ``python -m blobbench``: a quick side-by-side run of blob Dice implementations.

Checks the fused op against the paper's loop (MONAI DiceLoss per instance, float64) on a seeded
MS-shaped synthetic batch, then times fwd+bwd of the naive loop, the vectorized reference, the
fused op (CPU, and CUDA where present) and plain MONAI DiceLoss, and prints a table. The full
benchmark suite (profiles, sweeps, plots, asv) is tracked in the issues.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time(fn, x, inst, reps, sync):
    xg = x.detach().clone().requires_grad_(True)
    fn(xg, inst).backward()
    times = []
    for _ in range(reps):
        xg.grad = None
        sync()
        t0 = time.perf_counter()
        fn(xg, inst).backward()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="blobbench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="ms", help="synthetic profile (ms, lits, disco, shanel, deepmact)")
    ap.add_argument("--batch", type=int, default=2, help="crops in the batch (default 2)")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions (naive loop: 3)")
    args = ap.parse_args(argv)

    import blobbench
    from blobbench.synthetic import PROFILES, profile_batch
    from monai.losses import DiceLoss

    p = PROFILES[args.profile]
    print(f"blobbench {blobbench.__version__}: torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"CUDA kernels {'built' if blobbench.has_cuda_kernels() else 'not built'}")
    x, inst = profile_batch(p, seed=0, batch=args.batch)
    blobs = [int(inst[b].max()) for b in range(inst.shape[0])]
    print(f"profile {p.name}: input {tuple(x.shape)}, blobs per crop {blobs}")
    ref = blobbench.naive_blob_dice(x.double(), inst)
    got = blobbench.blob_dice(x, inst)
    print(f"fused vs naive loop (float64): loss {got.item():.7f} vs {ref.item():.7f}, "
          f"rel. diff {abs(got.item() - ref.item()) / abs(ref.item()):.1e}")
    dice = DiceLoss(sigmoid=True)
    impls = [("naive loop (MONAI DiceLoss per blob)", lambda a, b: blobbench.naive_blob_dice(a, b), "cpu", 3),
             ("vectorized (index_add)", lambda a, b: blobbench.vectorized_blob_loss(a, b), "cpu", args.reps),
             ("fused blob.dice", lambda a, b: blobbench.blob_dice(a, b), "cpu", args.reps),
             ("MONAI DiceLoss (no instances)", lambda a, b: dice(a, (b > 0).float()), "cpu", args.reps)]
    if torch.cuda.is_available() and blobbench.has_cuda_kernels():
        impls.append(("fused blob.dice (CUDA)", lambda a, b: blobbench.blob_dice(a, b), "cuda", args.reps))
        impls.append(("MONAI DiceLoss (CUDA)", lambda a, b: dice(a, (b > 0).float()), "cuda", args.reps))
    rows = []
    for name, fn, dev, reps in impls:
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        med, lo, hi = _time(fn, x.to(dev), inst.to(dev), reps, sync)
        rows.append((name, dev, med, lo, hi))
        print(f"  timed {name} ({dev})", flush=True)
    fused = next(r[2] for r in rows if r[0] == "fused blob.dice")
    print(f"\n{'implementation':40s} {'device':6s} {'median ms':>10s} {'min':>9s} {'max':>9s} {'time / fused CPU':>17s}")
    for name, dev, med, lo, hi in rows:
        print(f"{name:40s} {dev:6s} {med * 1e3:10.2f} {lo * 1e3:9.2f} {hi * 1e3:9.2f} {med / fused:16.2f}x")


if __name__ == "__main__":
    main()

"""Small calls of every CUDA path, for compute-sanitizer (memcheck, racecheck, initcheck).

Runs the cases below, forward and backward, once per setting of ``BLOBBENCH_CUDA_PATHS`` (the
default path, ``all``, then each opt-in path alone; the C++ reads the variable on every call), and
prints ``=== setting NAME`` before a setting and ``--- case NAME`` before each case, so that the
sanitizer's reports, printed as the kernels finish, can be attributed (benchmarks/gpu/summarize.py
does). Cases: Dice, Tversky and Dice+CE with every activation, masking and label dtype; float16,
bfloat16 and float64; 1-3 spatial dims with odd sizes (partial tiles) and an input whose storage
is not 16-byte aligned; ``label_stats`` and ``instance_stats``; per-plane compaction (large sparse
ids); ``max_label=10**6``; softmax with ``max_label=0``; ids above ``max_label`` and
probabilities outside [0, 1] (NaN on CUDA, an error on the CPU); ``-inf`` logits under softmax;
a label range beyond shared memory (the atomics path) with and without
``torch.use_deterministic_algorithms``; a forward without autograd. Sizes are tiny: racecheck
instruments every shared-memory access.

A case that raises where it should not, or gives a non-finite loss where a finite one is due (NaN
where NaN is due), is reported and makes the exit status 1 after all cases ran. The largest
difference of each setting's losses from the default path's is printed (information: the tests
hold the paths to the CPU).

    compute-sanitizer --tool memcheck python benchmarks/gpu/sanitize_cases.py
    python benchmarks/gpu/sanitize_cases.py --device cpu --settings default   # the CPU dry run
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blobbench  # noqa: E402
from cuda_paths import all_settings, cuda_paths, enabled  # noqa: E402

SHAPE = (2, 2, 3, 17, 33)  # 1683 voxels per plane: partial tiles, no multiple of 4


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def ids(shape, hi, frac=0.3, dtype=torch.int32, seed=0, lo=1):
    """Ids in [lo, hi] on a ``frac`` of the voxels, else 0 (CPU, seeded)."""
    g = _gen(seed)
    lab = torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int64)
    keep = torch.rand(shape, generator=g) < frac
    return (lab * keep).to(dtype)


def logits(shape, dtype=torch.float32, seed=1):
    return (2 * torch.randn(shape, generator=_gen(seed))).to(dtype)


def cases():
    """(name, fn, inputs, kwargs, expect) with inputs on the CPU; expect "finite" or "nan" (CUDA;
    the CPU raises instead)."""
    dice, tversky, dice_ce = blobbench.blob_dice, blobbench.blob_tversky, blobbench.blob_dice_ce
    x, lab = logits(SHAPE), ids(SHAPE, 6)
    x3, lab3 = logits((2, 3) + SHAPE[2:]), ids((2, 3) + SHAPE[2:], 6)
    probs = torch.rand(SHAPE, generator=_gen(2))
    out = [
        ("dice sigmoid", dice, (x, lab), {}, "finite"),
        ("dice sigmoid max_label", dice, (x, lab), {"max_label": 6}, "finite"),
        ("dice softmax", dice, (x3, lab3), {"activation": "softmax"}, "finite"),
        ("dice softmax max_label", dice, (x3, lab3), {"activation": "softmax", "max_label": 6}, "finite"),
        ("dice none", dice, (probs, lab), {"activation": "none"}, "finite"),
        ("dice squared official", dice, (x, lab), {"squared_pred": True, "masking": "official"}, "finite"),
        ("tversky uint8 official", tversky, (x, lab.to(torch.uint8)), {"masking": "official"}, "finite"),
        ("tversky softmax int16", tversky, (x3, lab3.to(torch.int16)), {"activation": "softmax"}, "finite"),
        ("dice_ce paper max_label", dice_ce, (x, lab), {"max_label": 6}, "finite"),
        ("dice_ce official int64", dice_ce, (x, lab.long()), {"masking": "official"}, "finite"),
        ("dice_ce none", dice_ce, (probs, lab), {"activation": "none", "squared_pred": True}, "finite"),
    ]
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        n = str(dt).split(".")[1]
        out += [(f"dice {n}", dice, (x.to(dt), lab), {"max_label": 6}, "finite"),
                (f"dice softmax {n}", dice, (x3.to(dt), lab3), {"activation": "softmax"}, "finite"),
                (f"dice_ce {n}", dice_ce, (x.to(dt), lab), {}, "finite")]
    # odd layouts: 2 and 1 spatial dims, one voxel, storage 4 bytes past a 16-byte boundary
    s2, s1 = (2, 2, 37, 41), (1, 2, 999)
    out += [("dice 2d", dice, (logits(s2), ids(s2, 9)), {"spatial_dims": 2}, "finite"),
            ("dice_ce 1d", dice_ce, (logits(s1), ids(s1, 9)), {"max_label": 9, "spatial_dims": 1}, "finite"),
            ("dice one voxel", dice, (logits((1, 1, 1, 1, 1)), torch.ones((1, 1, 1, 1, 1), dtype=torch.int32)),
             {}, "finite")]
    out += [("dice misaligned", dice, (x, lab), {"max_label": 6, "_offset": 1}, "finite"),
            ("dice_ce misaligned", dice_ce, (x, lab), {"_offset": 1}, "finite"),
            ("dice softmax misaligned", dice, (x3, lab3), {"activation": "softmax", "_offset": 3}, "finite")]
    # label ranges: sparse large ids (per-plane compaction), a generous max_label, beyond shared memory
    sparse = ids(SHAPE, 2**40, frac=0.2, dtype=torch.int64, seed=3, lo=2**39)
    big = ids(SHAPE, 9000, frac=0.5, seed=4)
    small = (1, 2) + SHAPE[2:]
    out += [("dice compaction", dice, (x, sparse), {}, "finite"),
            ("tversky compaction", tversky, (x, sparse), {}, "finite"),
            ("dice_ce compaction", dice_ce, (x, sparse), {}, "finite"),
            ("dice max_label=10**6", dice, (logits(small), ids(small, 40)), {"max_label": 10**6}, "finite"),
            ("dice_ce max_label=10**6", dice_ce, (logits(small), ids(small, 40)), {"max_label": 10**6}, "finite"),
            ("dice atomics", dice, (x, big), {}, "finite"),
            ("dice atomics max_label", dice, (x, big), {"max_label": 9000}, "finite"),
            ("dice softmax atomics", dice, (x3, ids(x3.shape, 9000, 0.5, seed=5)), {"activation": "softmax"}, "finite"),
            ("dice_ce atomics", dice_ce, (x, big), {}, "finite")]
    # softmax with max_label = 0 (no instances: finite; an id 1 in channel 1: NaN), bad inputs
    two = (2, 2) + SHAPE[2:]
    one_id = torch.zeros(two, dtype=torch.int32)
    one_id[0, 1, 1, 2, 3] = 1
    bad_p = probs.clone()
    bad_p[0, 0, 0, 0, 0] = 1.5
    neg_inf = x3.clone()
    neg_inf[:, 1, 0] = -math.inf
    out += [("softmax max_label=0", dice, (logits(two), torch.zeros(two, dtype=torch.int32)),
             {"activation": "softmax", "max_label": 0}, "finite"),
            ("softmax max_label=0 with id 1", dice, (logits(two), one_id), {"activation": "softmax", "max_label": 0},
             "nan"),
            ("dice id above max_label", dice, (x, lab), {"max_label": 3}, "nan"),
            ("dice_ce probability 1.5", dice_ce, (bad_p, lab), {"activation": "none", "max_label": 6}, "nan"),
            ("dice softmax -inf logits", dice, (neg_inf, lab3), {"activation": "softmax", "max_label": 6}, "any")]
    return out


def stats_cases(device):
    """label_stats / instance_stats (no backward)."""
    x, lab = logits(SHAPE).to(device), ids(SHAPE, 6).to(device)
    sparse = ids(SHAPE, 2**40, frac=0.2, dtype=torch.int64, seed=3, lo=2**39).to(device)
    torch.ops.blob.label_stats(x, lab)
    torch.ops.blob.label_stats(x, lab, max_label=6, squared_pred=True)
    torch.ops.blob.label_stats(x, sparse)
    st = blobbench.instance_stats(x, lab, max_label=6)
    return st.dice.float().nansum()


def _at_offset(t, device, offset):
    """``t`` on ``device`` in a buffer ``offset`` elements past its start (not 16-byte aligned)."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=device)
    buf[offset:].copy_(t.reshape(-1))
    return buf[offset:].view(t.shape)


def run_case(fn, inputs, kw, device, deterministic=False, grad=True):
    kw = dict(kw)
    offset = kw.pop("_offset", 0)
    if offset:  # made on the device: a copy to the device would be aligned again
        x, lab = (_at_offset(t, device, offset) for t in inputs)
        assert x.data_ptr() % 16 and lab.data_ptr() % 16
    else:
        x, lab = (t.to(device) for t in inputs)
    x = x.detach().requires_grad_(grad)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        if grad:
            loss = fn(x, lab, **kw)
            loss.backward()
            val = float(loss.detach().float())
            finite_grad = bool(torch.isfinite(x.grad).all())
        else:
            with torch.no_grad():
                val = float(fn(x, lab, **kw).float())
            finite_grad = True
    finally:
        torch.use_deterministic_algorithms(prev)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return val, finite_grad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (the dry run)")
    ap.add_argument("--settings", default=",".join(all_settings()),
                    help="BLOBBENCH_CUDA_PATHS settings, comma separated ('default': unset; default: "
                         + ",".join(all_settings()) + ")")
    ap.add_argument("--timings", action="store_true", help="print each case's seconds")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    failures, values = [], {}
    t_start = time.perf_counter()
    case_list = cases()
    for setting in args.settings.split(","):
        t0 = time.perf_counter()
        with cuda_paths(setting):
            print(f"=== setting {setting} (opt-in paths on: {', '.join(enabled()) or 'none'})", flush=True)
            runs = [(name, fn, inp, kw, expect, False, True) for name, fn, inp, kw, expect in case_list]
            # the deterministic per-warp rows of a label range beyond shared memory, a forward without autograd
            runs += [(name + " deterministic", fn, inp, kw, expect, True, True)
                     for name, fn, inp, kw, expect in case_list if "atomics" in name or name == "dice sigmoid"]
            no_grad = ("dice sigmoid max_label", "dice_ce atomics")
            runs += [(name + " no grad", fn, inp, kw, expect, False, False)
                     for name, fn, inp, kw, expect in case_list if name in no_grad]
            for name, fn, inp, kw, expect, det, grad in runs:
                print(f"--- case {name}", flush=True)
                t_case = time.perf_counter()
                try:
                    val, finite_grad = run_case(fn, inp, kw, device, det, grad)
                    if args.timings:
                        print(f"    {time.perf_counter() - t_case:.3f} s", flush=True)
                except (RuntimeError, ValueError) as e:
                    if expect == "nan" and device.type == "cpu":
                        continue  # the CPU raises where CUDA flags NaN
                    failures.append(f"{setting} / {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    print(f"CASE FAILED {failures[-1]}", flush=True)
                    continue
                ok = {"finite": math.isfinite(val) and finite_grad, "nan": math.isnan(val), "any": True}[expect]
                if expect == "nan" and device.type == "cpu":
                    ok = False  # the CPU must raise
                if not ok:
                    failures.append(f"{setting} / {name}: loss {val} (expected {expect}"
                                    f"{'' if finite_grad else ', gradient not finite'})")
                    print(f"CASE FAILED {failures[-1]}", flush=True)
                values.setdefault(name, {})[setting] = val
            print("--- case label_stats / instance_stats", flush=True)
            try:
                stats_cases(device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except (RuntimeError, ValueError) as e:
                failures.append(f"{setting} / label_stats: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                print(f"CASE FAILED {failures[-1]}", flush=True)
        print(f"=== end setting {setting}: {len(runs) + 1} cases in {time.perf_counter() - t0:.1f} s", flush=True)
    for setting in args.settings.split(","):
        if setting == "default":
            continue
        diffs = [abs(v[setting] - v["default"]) / max(abs(v["default"]), 1e-30) for v in values.values()
                 if setting in v and "default" in v and math.isfinite(v["default"]) and math.isfinite(v[setting])]
        if diffs:
            print(f"largest relative loss difference, {setting} vs default: {max(diffs):.3g} ({len(diffs)} cases)")
    print(f"sanitize cases ran on {device} in {time.perf_counter() - t_start:.1f} s: "
          f"{len(failures)} failed" + "".join(f"\n  {f}" for f in failures), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

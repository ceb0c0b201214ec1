"""What a generous ``max_label`` costs on the CPU, as docs/design.md 5.2 reports it: asv's
``GenerousMaxLabel.track_ratio`` (the ratio of the medians of 21 interleaved forward + backward
pairs, ``max_label=10**6`` / the exact bound, on a 2x1x32x64x64 float32 batch with 39 blobs) nine
times, and once with 400 pairs, at 1 and 2 threads. Target: at most 1.25 (issue 19).

    python benchmarks/generous_max_label.py [--runs 9] [--pairs 400]

Run it on a quiet machine; it prints the machine and its load before and after.
"""

import argparse
import os
import platform
import statistics


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=9, help="track_ratio repetitions (21 pairs each)")
    ap.add_argument("--pairs", type=int, default=400, help="pairs of the one long run")
    args = ap.parse_args(argv)

    import torch

    from benchmark_blob import GenerousMaxLabel

    import blobbench

    print(f"blobbench {blobbench.__file__}; torch {torch.__version__}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; load {os.getloadavg()}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        s = GenerousMaxLabel()
        s.setup()
        runs = [s.track_ratio() for _ in range(args.runs)]
        long_run = s.track_ratio(reps=args.pairs)
        print(f"threads {threads}: track_ratio x{args.runs} median {statistics.median(runs):.3f} "
              f"[min {min(runs):.3f}, max {max(runs):.3f}]; {args.pairs} pairs {long_run:.3f}", flush=True)
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()

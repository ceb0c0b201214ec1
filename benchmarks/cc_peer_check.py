"""Peer check of blobbench.cc_metrics (issue 20): per-component Dice against MONAI's
``DiceMetric(per_component=True)`` and ``ccmetrics``' ``CCDiceMetric`` on the binary, batch-1 cases
they support, and a list of the semantic differences with figures.

    python benchmarks/cc_peer_check.py [--cases 40] [--size 24]

Each case: a random 3D ground truth (a few boxes and single voxels), labelled with cc3d
(26-connectivity, the peers' connectivity), and a prediction that perturbs it (voxels flipped,
a blob removed, a false-positive blob added). Prints, per peer, how many cases agree exactly and the
largest difference.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import blobbench


def make_case(rng, size):
    gt = np.zeros((size,) * 3, dtype=bool)
    for _ in range(int(rng.integers(1, 7))):
        lo = rng.integers(0, size - 2, 3)
        ext = rng.integers(1, max(2, size // 4), 3)
        gt[tuple(slice(a, min(size, a + e)) for a, e in zip(lo, ext))] = True
    gt |= rng.random(gt.shape) < 0.002
    pred = gt ^ (rng.random(gt.shape) < 0.02)
    if rng.random() < 0.5:
        lo = rng.integers(0, size - 3, 3)
        pred[lo[0] : lo[0] + 3, lo[1] : lo[1] + 3, lo[2] : lo[2] + 3] = True
    return gt, pred


def onehot(mask):
    m = torch.from_numpy(mask)[None, None]
    return torch.cat([~m, m], 1).float()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--size", type=int, default=24)
    args = parser.parse_args()
    grad = torch.is_grad_enabled()
    import CCMetrics  # noqa: F401  (its import turns autograd off for the whole process)

    torch.set_grad_enabled(grad)
    from CCMetrics import CCDiceMetric as PeerCCDice
    from monai.metrics import DiceMetric

    rng = np.random.default_rng(0)
    worst = {"monai": 0.0, "ccmetrics": 0.0}
    exact = {"monai": 0, "ccmetrics": 0}
    components = 0
    for _ in range(args.cases):
        gt, pred = make_case(rng, args.size)
        inst = blobbench.label_instances(gt[None, None])
        ours = blobbench.cc_metrics(torch.from_numpy(pred)[None, None], inst)
        components += ours["dice"].numel()
        monai = DiceMetric(per_component=True, include_background=False)(onehot(pred), onehot(gt))
        d = abs(float(monai.reshape(-1)[0]) - float(ours["dice"].mean()))
        worst["monai"], exact["monai"] = max(worst["monai"], d), exact["monai"] + (d == 0)
        peer = PeerCCDice()
        peer(onehot(pred).numpy(), onehot(gt).numpy())
        theirs = peer.cc_aggregate(mode="overall").reshape(-1).double()
        # ccmetrics orders its components by scipy's labels: compare the sorted values
        d = float((theirs.sort().values - ours["dice"].sort().values).abs().max())
        worst["ccmetrics"], exact["ccmetrics"] = max(worst["ccmetrics"], d), exact["ccmetrics"] + (d == 0)
    print(f"{args.cases} cases of {args.size}^3 voxels, {components} components")
    for name in worst:
        print(f"{name}: {exact[name]} of {args.cases} cases bit-identical, largest difference {worst[name]:.3g}")

    # Semantic differences, one figure each.
    empty = np.zeros((8, 8, 8), dtype=bool)
    spot = empty.copy()
    spot[2, 2, 2] = True
    inst = blobbench.label_instances(empty[None, None])
    print("ground truth without components, empty prediction:")
    print("  ours:", blobbench.cc_metrics(torch.from_numpy(empty)[None, None], inst)["dice"].tolist())
    print("  MONAI (default ignore_empty=True):", DiceMetric(per_component=True)(onehot(empty), onehot(empty)).item())
    m = DiceMetric(per_component=True, ignore_empty=False)
    print("  MONAI (ignore_empty=False), empty / one predicted voxel:", m(onehot(empty), onehot(empty)).item(), "/",
          m(onehot(spot), onehot(empty)).item())
    peer = PeerCCDice()
    peer(onehot(empty).numpy(), onehot(empty).numpy())
    peer(onehot(spot).numpy(), onehot(empty).numpy())
    print("  ccmetrics, empty / one predicted voxel:", peer.cc_aggregate(mode="overall").tolist())
    # Two touching instances with different ids: the peers see one component.
    gt = np.zeros((1, 1, 8, 8, 8), dtype=np.int32)
    gt[0, 0, 2:4, 2:4, 2:4], gt[0, 0, 2:4, 4:6, 2:4] = 1, 2
    pred = gt > 0
    pred[0, 0, 2:4, 4:6, 2:4] = False
    ours = blobbench.cc_metrics(torch.from_numpy(pred), torch.from_numpy(gt))["dice"]
    monai = DiceMetric(per_component=True, include_background=False)(onehot(pred[0, 0]), onehot(gt[0, 0] > 0))
    print("two touching instances (ids 1 and 2), only the first predicted:")
    print("  ours, per instance:", ours.tolist(), "mean", float(ours.mean()))
    print("  MONAI (relabels the union: one component):", monai.item())


if __name__ == "__main__":
    main()

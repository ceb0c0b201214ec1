"""cc_metrics and CCDiceMetric: per-component (Voronoi) Dice against a loop over components and
against MONAI's DiceMetric(per_component=True) and ccmetrics on the binary, batch-1 cases they
support (benchmarks/cc_peer_check.py prints the figures)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("scipy.ndimage")

from blobbench import CCDiceMetric, cc_metrics, label_instances, voronoi_regions  # noqa: E402
from conftest import devices  # noqa: E402
from helpers import random_instances  # noqa: E402


def loop_dice(pred, inst, regions):
    """Per (b, c, id): Dice on the region's voxels, one mask per component."""
    out = {}
    for b in range(inst.shape[0]):
        for c in range(inst.shape[1]):
            for k in torch.unique(regions[b, c]).tolist():
                if k == 0:
                    continue
                r = regions[b, c] == k
                p, t = pred[b, c][r] != 0, inst[b, c][r] > 0
                out[(b, c, k)] = 2 * (p & t).sum().item() / (p.sum().item() + t.sum().item())
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", [(2, 3, 30), (3, 2, 9, 11), (2, 2, 6, 7, 5)])
def test_against_a_loop_over_components(seed, shape):
    rng = np.random.default_rng(seed)
    inst = random_instances(rng, shape, 4, empty_prob=0.3)
    pred = torch.from_numpy(rng.random(shape) < 0.3) | ((inst > 0) & torch.from_numpy(rng.random(shape) < 0.7))
    regions = voronoi_regions(inst, spatial_dims=len(shape) - 2)
    m = cc_metrics(pred, inst, regions, spatial_dims=len(shape) - 2)
    expected = loop_dice(pred, inst, regions)
    keys = list(zip(m["b"].tolist(), m["c"].tolist(), m["id"].tolist()))
    assert keys == sorted(expected)  # one entry per component, ordered by (b, c, id)
    np.testing.assert_allclose(m["dice"].numpy(), [expected[k] for k in keys], rtol=1e-15, atol=0)
    assert torch.equal(m["tp"] + m["fn"], torch.tensor([int(((regions[k[:2]] == k[2]) & (inst[k[:2]] > 0)).sum())
                                                        for k in keys]))
    # the regions computed here, and an integer prediction, give the same
    m2 = cc_metrics(pred.to(torch.uint8) * 3, inst, spatial_dims=len(shape) - 2)
    assert torch.equal(m2["dice"], m["dice"]) and torch.equal(m2["voxels"], m["voxels"])


def test_planes_without_instances_have_no_entry():
    inst = torch.zeros(2, 1, 5, 5, dtype=torch.int32)
    inst[1, 0, 2, 2] = 4
    m = cc_metrics(torch.ones_like(inst, dtype=torch.bool), inst, spatial_dims=2)
    assert m["b"].tolist() == [1] and m["id"].tolist() == [4]
    assert m["dice"].tolist() == [2 / 26]  # region = whole plane: tp 1, fp 24
    assert m["voxels"].tolist() == [25]


def _onehot(mask):
    m = torch.as_tensor(mask)[None, None]
    return torch.cat([~m, m], 1).float()


def _binary_cases(ndim, n, seed=0):
    rng = np.random.default_rng(seed)
    size = (14, 15, 13)[:ndim] if ndim == 3 else (21, 23)
    for _ in range(n):
        gt = np.zeros(size, dtype=bool)
        for _ in range(int(rng.integers(1, 5))):
            lo = [int(rng.integers(0, s - 2)) for s in size]
            gt[tuple(slice(a, a + int(rng.integers(1, 5))) for a in lo)] = True
        gt |= rng.random(size) < 0.004
        pred = gt ^ (rng.random(size) < 0.05)
        yield gt, pred


@pytest.mark.parametrize("ndim", [2, 3])
def test_equals_monai_per_component_dice(ndim):
    monai = pytest.importorskip("monai.metrics")
    metric = monai.DiceMetric(per_component=True, include_background=False)
    for gt, pred in _binary_cases(ndim, 6, seed=ndim):
        inst = label_instances(gt[None, None], spatial_dims=ndim)  # 26 / 8-connected, as MONAI
        ours = cc_metrics(torch.from_numpy(pred)[None, None], inst, spatial_dims=ndim)["dice"]
        with pytest.warns(UserWarning, match="Voronoi computation is running on CPU"):
            theirs = metric(_onehot(pred), _onehot(gt))
        # MONAI's per-case value is the mean over components, computed in float32
        torch.testing.assert_close(theirs.reshape(()).double(), ours.mean(), rtol=0, atol=1e-7)


@pytest.fixture(scope="module")
def ccmetrics():
    grad = torch.is_grad_enabled()
    try:
        mod = pytest.importorskip("CCMetrics")
    finally:
        torch.set_grad_enabled(grad)  # importing CCMetrics turns autograd off for the process
    return mod


def test_equals_ccmetrics_per_component_dice(ccmetrics):
    n = 0
    for gt, pred in _binary_cases(3, 6, seed=5):
        inst = label_instances(gt[None, None])
        ours = cc_metrics(torch.from_numpy(pred)[None, None], inst)
        peer = ccmetrics.CCDiceMetric()
        peer(_onehot(pred).numpy(), _onehot(gt).numpy())
        theirs = peer.cc_aggregate(mode="overall").reshape(-1).double()
        # ccmetrics orders components by scipy's labels, ours by cc3d's ids: the same components
        assert torch.equal(theirs.sort().values, ours["dice"].sort().values)
        n += theirs.numel()
    assert n > 10


def test_cumulative_metric():
    rng = np.random.default_rng(9)
    batches = []
    for _ in range(2):
        inst = random_instances(rng, (2, 2, 6, 7, 8), 3, empty_prob=0.3)
        logits = torch.from_numpy(rng.normal(0, 1, inst.shape)) + 2 * (inst > 0)
        batches.append((logits, inst))
    metric = CCDiceMetric(sigmoid=True)
    per_call = [metric(x, i) for x, i in batches]
    dice = torch.cat([m["dice"] for m in per_call])
    torch.testing.assert_close(metric.aggregate(), dice.mean(), rtol=0, atol=0)
    allm = metric.aggregate("none")
    assert torch.equal(allm["dice"], dice)
    assert allm["b"].tolist() == per_call[0]["b"].tolist() + (per_call[1]["b"] + 2).tolist()
    case_means = []
    for m_, off in zip(per_call, (0, 2)):
        for b in range(2):
            for c in range(2):
                sel = (m_["b"] == b) & (m_["c"] == c)
                if sel.any():
                    case_means.append(m_["dice"][sel].mean())
    torch.testing.assert_close(metric.aggregate("mean_case"), torch.stack(case_means).mean(), rtol=1e-15, atol=0)
    # a threshold on probabilities, no sigmoid
    probs = torch.sigmoid(batches[0][0])
    m = CCDiceMetric(threshold=0.7)(probs, batches[0][1])
    torch.testing.assert_close(m["dice"], cc_metrics(probs > 0.7, batches[0][1])["dice"], rtol=0, atol=0)
    metric.reset()
    with pytest.raises(RuntimeError, match="before any call"):
        metric.aggregate()
    with pytest.raises(ValueError, match="reduction must be"):
        CCDiceMetric(reduction="sum")


def test_bad_inputs():
    inst = torch.zeros(1, 1, 4, 5, 6, dtype=torch.int32)
    inst[0, 0, 1, 1, 1] = 2
    pred = inst > 0
    with pytest.raises(TypeError, match="threshold first"):
        cc_metrics(pred.float(), inst)
    with pytest.raises(ValueError, match="same shape"):
        cc_metrics(pred[:, :, :2], inst)
    with pytest.raises(TypeError, match="integer ids"):
        cc_metrics(pred, inst.float())
    with pytest.raises(ValueError, match="ambiguous"):
        cc_metrics(pred[0], inst[0])
    regions = voronoi_regions(inst)
    cropped = inst.clone()
    cropped[0, 0, 1, 1, 1] = 0
    cropped[0, 0, 3, 3, 3] = 5  # another instance, and region 2 without its instance
    with pytest.raises(ValueError, match="`regions` must give every instance voxel its own id"):
        cc_metrics(pred, cropped, regions)
    with pytest.raises(ValueError, match="`regions` holds region id 2 in plane \\(b = 0, c = 0\\)"):
        cc_metrics(pred, torch.zeros_like(inst), regions)
    neg = inst.clone()
    neg[0, 0, 0, 0, 0] = -1
    with pytest.raises(ValueError, match=">= 0"):
        cc_metrics(pred, neg)


@devices
def test_on_each_device(device):
    rng = np.random.default_rng(21)
    inst = random_instances(rng, (2, 2, 6, 7, 8), 3, empty_prob=0.2)
    pred = torch.from_numpy(rng.random(inst.shape) < 0.4)
    expected = cc_metrics(pred, inst)
    got = cc_metrics(pred.to(device), inst.to(device))
    assert got["dice"].device.type == device
    for k in expected:
        assert torch.equal(got[k].cpu(), expected[k]), k

"""Per-instance statistics, detection metrics, the LabelInstancesd transform, crop safety."""

import cc3d
import numpy as np
import pytest
import torch
from conftest import devices
from helpers import random_case

import blobbench
from blobbench import BlobMetrics, LabelInstancesd, blob_metrics, detection_counts, instance_stats
from blobbench.bench.synthetic import grid_instances

# ----------------------------------------------------------------------------- instance_stats


def _stats_oracle(x, instances, activation, masking, squared_pred, smooth_nr, smooth_dr):
    """Loop over instances as the paper's code does: size, mass, and 1 - MONAI DiceLoss on the
    output masked for that instance (paper: p * mask; official: the masked logits x * mask, then
    the activation, so a masked voxel is p = 0.5 under a sigmoid and p = 0 without one)."""
    from monai.losses import DiceLoss

    act = {"sigmoid": torch.sigmoid, "none": lambda t: t, "softmax": lambda t: torch.softmax(t, 1)}[activation]
    p = act(x.double())
    dice_loss = DiceLoss(reduction="none", squared_pred=squared_pred, smooth_nr=smooth_nr, smooth_dr=smooth_dr)
    out = {}
    B, C = x.shape[:2]
    for b in range(B):
        for c in range(C):
            if activation == "softmax" and c == 0:
                continue
            lab, pc = instances[b, c].long(), p[b, c]
            for k in torch.unique(lab).tolist():
                if k == 0:
                    continue
                own = lab == k
                mask = (lab == 0) | own
                masked = pc * mask if masking == "paper" else act(x[b, c].double() * mask)
                d = 1 - dice_loss(masked[None, None], own[None, None].double()).item()
                out[(b, c, k)] = (own.sum().item(), pc[own].sum().item(), d)
    return out


@devices
@pytest.mark.parametrize("seed", range(40))
def test_instance_stats_against_loop(seed, device):
    x, instances, _, _, options = random_case(seed)
    got = instance_stats(x.to(device), instances.to(device), **options)
    ref = _stats_oracle(x, instances, **options)
    ids = got.ids.cpu().tolist()  # [b][c][column]
    assert got.ids.shape == got.size.shape
    present = got.present.cpu()
    assert int(present.sum()) == len(ref)
    for (b, c, k), (size, mass, dice) in ref.items():
        col = ids[b][c].index(k)
        assert present[b, c, col]
        assert got.size[b, c, col].item() == size
        assert got.mass[b, c, col].item() == pytest.approx(mass, rel=1e-10, abs=1e-10)
        assert got.dice[b, c, col].item() == pytest.approx(dice, rel=1e-9, abs=1e-12)
    assert torch.isnan(got.dice.cpu()[~present]).all()


@devices
def test_instance_stats_float32_and_max_label(device):
    x, instances, _, _, options = random_case(3)
    ref = instance_stats(x.to(device), instances.to(device), **options)
    got = instance_stats(x.float().to(device), instances.to(device), max_label=int(instances.max()) + 5, **options)
    K = ref.size.shape[-1]
    torch.testing.assert_close(got.size[..., :K], ref.size)
    torch.testing.assert_close(got.dice[..., :K], ref.dice, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert not got.present[..., K:].any()


def test_instance_stats_errors_and_opcheck():
    x, inst = torch.randn(1, 1, 4, 4), torch.zeros(1, 1, 4, 4, dtype=torch.int32)
    inst[0, 0, 1, 1] = 2
    with pytest.raises(ValueError, match="max_label"):
        instance_stats(x, inst, max_label=1)
    with pytest.raises(ValueError, match="instances"):
        instance_stats(x, -inst)
    with pytest.raises((ValueError, RuntimeError), match="masking"):
        instance_stats(x, inst, masking="nope")
    for seed in (1, 4):
        x, instances, _, _, options = random_case(seed)
        torch.library.opcheck(
            torch.ops.blob.label_stats.default,
            (x.float(), instances),
            dict(activation=options["activation"], squared_pred=options["squared_pred"]),
        )


def test_instance_stats_no_grad_needed():
    x = torch.randn(1, 1, 6, 6, requires_grad=True)
    inst = torch.zeros(1, 1, 6, 6, dtype=torch.uint8)
    inst[0, 0, :2, :2] = 1
    s = instance_stats(x, inst)
    assert not s.dice.requires_grad and s.present[0, 0, 1]


# ----------------------------------------------------------------------------- metrics


def _metrics_loop(pred, gt):
    """Straightforward per-blob loop with cc3d (3D numpy arrays, one plane)."""
    pl, gl = cc3d.connected_components(pred), cc3d.connected_components(gt)
    tp = sum(1 for k in range(1, pl.max() + 1) if (gt[pl == k]).any())
    fp = pl.max() - tp
    fn = sum(1 for k in range(1, gl.max() + 1) if not (pred[gl == k]).any())
    inter, P, G = (pred & gt).sum(), pred.sum(), gt.sum()
    r = lambda n, d: n / d if d else 1.0  # noqa: E731
    sens, prec = r(tp, tp + fn), r(tp, tp + fp)  # paper section 2.5
    return {
        "f1": 2 * sens * prec / (sens + prec) if sens + prec else 0.0,
        "sensitivity": sens,
        "precision": prec,
        "dice": r(2 * inter, P + G),
        "volumetric_sensitivity": r(inter, G),
        "volumetric_precision": r(inter, P),
    }


def test_metrics_hand_made():
    gt = torch.zeros(1, 1, 10, 10, 10, dtype=torch.bool)
    pred = torch.zeros_like(gt)
    gt[0, 0, 1:3, 1:3, 1:3] = True  # blob A (8 voxels): hit by one predicted voxel
    gt[0, 0, 6:8, 6:8, 6:8] = True  # blob B (8 voxels): missed
    pred[0, 0, 1, 1, 1] = True  # TP
    pred[0, 0, 5, 0:3, 8] = True  # FP (3 voxels, no overlap)
    c = detection_counts(pred, gt)
    assert (c["tp"].item(), c["fp"].item(), c["fn"].item()) == (1, 1, 1)
    m = blob_metrics(pred, gt)
    assert m["f1"].item() == pytest.approx(2 / 4)
    assert m["sensitivity"].item() == pytest.approx(1 / 2)
    assert m["precision"].item() == pytest.approx(1 / 2)
    assert m["dice"].item() == pytest.approx(2 * 1 / (4 + 16))
    assert m["volumetric_sensitivity"].item() == pytest.approx(1 / 16)
    assert m["volumetric_precision"].item() == pytest.approx(1 / 4)


def test_metrics_one_prediction_over_two_blobs():
    gt = torch.zeros(1, 1, 1, 12, dtype=torch.bool)
    gt[0, 0, 0, 1:3] = True
    gt[0, 0, 0, 5:7] = True
    pred = torch.zeros_like(gt)
    pred[0, 0, 0, 1:7] = True  # one predicted blob covering both
    c = detection_counts(pred, gt, spatial_dims=2)
    assert (c["tp"].item(), c["fp"].item(), c["fn"].item(), c["n_gt"].item()) == (1, 0, 0, 2)
    m = blob_metrics(pred, gt, spatial_dims=2)
    # a merge: one TP, nothing missed, nothing false
    assert (m["sensitivity"].item(), m["precision"].item(), m["f1"].item()) == (1.0, 1.0, 1.0)


def test_metrics_split_counts_both_pieces():
    # One true blob, predicted as two disconnected pieces that both lie on it: TP counts
    # predicted blobs (paper section 2.5), so TP = 2, FN = 0, FP = 0 and S = P = F1 = 1.
    gt = torch.zeros(1, 1, 6, 6, 6, dtype=torch.bool)
    gt[0, 0, 1:5, 1:5, 1:5] = True
    pred = torch.zeros_like(gt)
    pred[0, 0, 1, 1, 1:5] = True
    pred[0, 0, 4, 4, 1:5] = True
    c = detection_counts(pred, gt)
    assert {k: c[k].item() for k in ("tp", "fp", "fn", "n_pred", "n_gt", "gt_detected")} == {
        "tp": 2,
        "fp": 0,
        "fn": 0,
        "n_pred": 2,
        "n_gt": 1,
        "gt_detected": 1,
    }
    m = blob_metrics(pred, gt)
    assert (m["sensitivity"].item(), m["precision"].item(), m["f1"].item()) == (1.0, 1.0, 1.0)


def test_metrics_sensitivity_is_tp_over_tp_plus_fn():
    # Where splits make TP differ from the number of detected true blobs, S = TP / (TP + FN),
    # not detected / n_gt, and F1 is the harmonic mean of the reported S and P.
    gt = torch.zeros(1, 1, 8, 8, 8, dtype=torch.bool)
    gt[0, 0, 0:3, 0:3, 0:3] = True  # A: split into two predicted pieces
    gt[0, 0, 5:8, 5:8, 5:8] = True  # B: missed
    pred = torch.zeros_like(gt)
    pred[0, 0, 0, 0, 0:3] = True
    pred[0, 0, 2, 2, 0:3] = True
    pred[0, 0, 0, 7, 0] = True  # a false positive
    c = detection_counts(pred, gt)
    assert (c["tp"].item(), c["fp"].item(), c["fn"].item(), c["gt_detected"].item()) == (2, 1, 1, 1)
    m = blob_metrics(pred, gt)
    s, p = 2 / 3, 2 / 3
    assert m["sensitivity"].item() == pytest.approx(s) and m["precision"].item() == pytest.approx(p)
    assert m["f1"].item() == pytest.approx(2 * s * p / (s + p))
    assert m["f1"].item() == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # = 2TP / (2TP + FP + FN)


@pytest.mark.parametrize("seed", range(12))
def test_metrics_against_loop(seed):
    rng = np.random.default_rng(seed)
    shape = (2, 2, 12, 20, 20) if seed % 3 else (2, 1, 1, 40, 40)  # 3D, and 2D as D = 1
    gt = rng.random(shape) < rng.uniform(0.01, 0.1)
    pred = (gt & (rng.random(shape) < 0.7)) | (rng.random(shape) < rng.uniform(0.0, 0.05))
    spatial2d = shape[2] == 1
    t_pred, t_gt = torch.from_numpy(pred), torch.from_numpy(gt)
    if spatial2d:
        t_pred, t_gt = t_pred[:, :, 0], t_gt[:, :, 0]
    got = blob_metrics(t_pred, t_gt, spatial_dims=2 if spatial2d else 3)
    for b in range(shape[0]):
        for c in range(shape[1]):
            p, g = pred[b, c], gt[b, c]
            if spatial2d:
                # cc3d labels a 2D image with 8-connectivity, as label_instances does in 2D
                p, g = p[0], g[0]
            ref = _metrics_loop(p, g)
            for k, v in ref.items():
                assert got[k][b, c].item() == pytest.approx(v), (k, b, c)


def test_metrics_edge_cases():
    empty = torch.zeros(1, 1, 8, 8, 8, dtype=torch.bool)
    some = empty.clone()
    some[0, 0, 2:4, 2:4, 2:4] = True
    m = blob_metrics(empty, empty)  # nothing to find, nothing found
    assert all(v.item() == 1.0 for v in m.values())
    m = blob_metrics(empty, some)  # no predicted instances
    assert (m["f1"].item(), m["sensitivity"].item(), m["dice"].item()) == (0.0, 0.0, 0.0)
    assert m["precision"].item() == 1.0  # no prediction was wrong
    m = blob_metrics(some, empty)  # no ground-truth instances
    assert (m["f1"].item(), m["precision"].item(), m["sensitivity"].item()) == (0.0, 0.0, 1.0)
    giant = torch.ones(1, 1, 16, 16, 16, dtype=torch.bool)
    m = blob_metrics(giant, giant)
    assert m["f1"].item() == 1.0 and m["dice"].item() == 1.0
    tiny = torch.from_numpy(grid_instances((16, 96, 96), 3000, seed=0) > 0)[None, None]
    half = tiny.clone()
    half[..., 48:] = False
    c = detection_counts(half, tiny)
    assert c["n_gt"].item() == 3000 and c["fp"].item() == 0
    assert c["tp"].item() + c["fn"].item() == 3000 and 1000 < c["tp"].item() < 2000


def test_metrics_instance_maps_and_errors():
    gt = torch.zeros(1, 1, 6, 6, dtype=torch.int32)
    gt[0, 0, 0, 0] = 7
    gt[0, 0, 0, 1] = 9  # touching, but different ids: two instances
    pred = gt > 0
    c = detection_counts(pred, gt, spatial_dims=2)
    assert (c["n_gt"].item(), c["n_pred"].item(), c["tp"].item()) == (2, 1, 1)
    with pytest.raises(TypeError, match="threshold"):
        blob_metrics(torch.rand(1, 1, 6, 6), gt, spatial_dims=2)
    with pytest.raises(ValueError, match="same shape"):
        blob_metrics(pred[..., :3], gt, spatial_dims=2)


def test_blob_metrics_class():
    metric = BlobMetrics(sigmoid=True, spatial_dims=2)
    gt = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    gt[:, 0, 1:3, 1:3] = True
    logits = torch.full((2, 1, 8, 8), -5.0)
    logits[0, 0, 1:3, 1:3] = 5.0  # case 0 perfect, case 1 empty prediction
    metric(logits, gt)
    metric(logits[:1], gt[:1])
    agg = metric.aggregate()
    assert agg["f1"].item() == pytest.approx(2 / 3)
    assert metric.aggregate("none")["f1"].shape == (3, 1)
    metric.reset()
    with pytest.raises(RuntimeError, match="before any call"):
        metric.aggregate()


# ----------------------------------------------------------------------------- transform


def test_label_instances_d():
    from monai.data import MetaTensor

    label = np.zeros((1, 10, 12, 12), dtype=np.uint8)
    label[0, 1:3, 1:3, 1:3] = 1
    label[0, 5:8, 5:8, 5:8] = 2
    label[0, 3, 3, 3] = 1  # touches blob 1 diagonally only
    d = LabelInstancesd("label")({"label": MetaTensor(torch.from_numpy(label), affine=torch.eye(4) * 2)})
    inst = d["label_instances"]
    assert isinstance(inst, MetaTensor) and inst.dtype == torch.uint8
    assert torch.equal(inst.affine, torch.eye(4, dtype=inst.affine.dtype) * 2)
    assert int(inst.max()) == 2
    d6 = LabelInstancesd("label", connectivity=6, dtype="int32")({"label": label})
    assert d6["label_instances"].dtype == torch.int32 and int(d6["label_instances"].max()) == 3
    dc = LabelInstancesd("label", num_classes=3)({"label": label})["label_instances"]
    assert dc.shape == (3, 10, 12, 12) and int(dc[0].max()) == 0
    assert int(dc[1].max()) == 1 and int(dc[2].max()) == 1
    many = grid_instances((16, 96, 96), 3000, seed=0)[None]
    assert LabelInstancesd("l")({"l": many})["l_instances"].dtype == torch.int16
    with pytest.raises(ValueError, match="do not fit"):
        LabelInstancesd("l", dtype="uint8")({"l": many})
    with pytest.raises(ValueError, match="dtype"):
        LabelInstancesd("l", dtype="float32")
    with pytest.raises(ValueError, match="channel-first"):
        LabelInstancesd("l")({"l": np.zeros((1, 1, 2, 2, 2, 2))})


def _crop(t, lo, size):
    return t[(...,) + tuple(slice(a, a + s) for a, s in zip(lo, size))]


def test_crop_after_labelling():
    """Cropping a labelled volume gives the loss of relabelling the crop unless a blob is cut
    into pieces that are disconnected inside the crop (they keep one id: one instance term)."""
    rng = np.random.default_rng(0)
    vol = grid_instances((32, 64, 64), 40, seed=2)[None, None] > 0
    pre = torch.from_numpy(cc3d.connected_components(vol[0, 0]).astype(np.int32))[None, None]
    x = torch.randn(1, 1, 32, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    same = differ = 0
    for _ in range(30):
        size = (16, 32, 32)
        lo = [int(rng.integers(0, s - c + 1)) for s, c in zip(vol.shape[2:], size)]
        crop_pre = _crop(pre, lo, size)
        relabelled = blobbench.label_instances(crop_pre > 0)
        cut = sum(
            int(cc3d.connected_components((crop_pre[0, 0] == k).numpy()).max()) > 1
            for k in torch.unique(crop_pre).tolist()
            if k
        )
        a = blobbench.blob_dice(_crop(x, lo, size), crop_pre)
        b = blobbench.blob_dice(_crop(x, lo, size), relabelled)
        if cut == 0:
            assert a.item() == pytest.approx(b.item(), rel=1e-12)
            same += 1
        else:
            differ += 1
    assert same > 5
    # A blob cut in two by the crop: one term with the pre-labelled ids, two when relabelled.
    u = np.zeros((1, 1, 8, 8, 8), dtype=bool)
    u[0, 0, 2:6, 0, 2:6] = True
    u[0, 0, 2, 0:4, 2] = True
    u[0, 0, 5, 0:4, 5] = True  # a U: connected through row 0 only
    pre_u = blobbench.label_instances(u)
    crop = pre_u[..., 1:, :]  # cuts row 0 away: two pieces, one id
    assert int(crop.max()) == 1 and int(blobbench.label_instances(crop > 0).max()) == 2
    xc = torch.randn(crop.shape, dtype=torch.float64)
    assert blobbench.blob_dice(xc, crop).item() != pytest.approx(
        blobbench.blob_dice(xc, blobbench.label_instances(crop > 0)).item(), rel=1e-6
    )


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and blobbench.has_cuda_kernels()),
    reason="needs a CUDA device and a CUDA build of blobbench",
)
def test_instance_stats_cuda_out_of_range_is_nan():
    """Sync-free on CUDA: an id above max_label cannot raise, so the statistics become NaN."""
    x = torch.randn(1, 1, 8, 8, device="cuda")
    inst = torch.zeros(1, 1, 8, 8, dtype=torch.int32, device="cuda")
    inst[0, 0, 2, 2] = 9
    s = instance_stats(x, inst, max_label=3)
    assert torch.isnan(s.size).all() and torch.isnan(s.mass).all()

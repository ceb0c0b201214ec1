"""The thresholds of the metrics at their boundaries: a probability (or a logit, or a floating
ground truth) exactly at the threshold is background; the next float above it is foreground.

The expected counts come from the layout drawn here (two separate blobs in the prediction, one
in the truth), not from the code under test.
"""

import pytest
import torch

from blobbench import BlobMetrics, detection_counts

SHAPE = (1, 1, 1, 4, 8)


def _truth():
    y = torch.zeros(SHAPE, dtype=torch.bool)
    y[..., 1:3, 1:3] = True  # one blob on the left
    return y


def _prediction(left: float, right: float, dtype=torch.float32):
    """Two separate 2x2 squares: one on the truth (value ``left``), one away from it (``right``)."""
    p = torch.zeros(SHAPE, dtype=dtype)
    p[..., 1:3, 1:3] = left
    p[..., 1:3, 5:7] = right
    return p


def _above(t: float, dtype=torch.float32) -> float:
    return float(torch.nextafter(torch.tensor(t, dtype=dtype), torch.tensor(2.0, dtype=dtype)))


@pytest.mark.parametrize("threshold", [0.5, 0.25, 0.75])
def test_probability_at_the_threshold_is_background(threshold):
    m = BlobMetrics(threshold)(_prediction(threshold, threshold), _truth())
    # nothing predicted: one missed blob, no false positive
    assert m["sensitivity"].item() == 0.0 and m["precision"].item() == 1.0 and m["f1"].item() == 0.0
    assert m["dice"].item() == 0.0


@pytest.mark.parametrize("threshold", [0.5, 0.25, 0.75])
def test_probability_just_above_the_threshold_is_foreground(threshold):
    above = _above(threshold)
    m = BlobMetrics(threshold)(_prediction(above, above), _truth())
    # both squares predicted: one true positive, one false positive
    assert m["sensitivity"].item() == 1.0 and m["precision"].item() == 0.5
    assert m["f1"].item() == pytest.approx(2 / 3, rel=1e-15)
    assert m["dice"].item() == pytest.approx(2 * 4 / (8 + 4), rel=1e-15)


def test_one_side_above_and_one_at_the_threshold():
    m = BlobMetrics(0.5)(_prediction(_above(0.5), 0.5), _truth())
    assert m["sensitivity"].item() == 1.0 and m["precision"].item() == 1.0 and m["dice"].item() == 1.0
    m = BlobMetrics(0.5)(_prediction(0.5, _above(0.5)), _truth())
    assert m["sensitivity"].item() == 0.0 and m["precision"].item() == 0.0 and m["f1"].item() == 0.0


def test_logit_zero_is_background_with_sigmoid():
    """With sigmoid=True the threshold applies to sigmoid(logit): logit 0 is p = 0.5, at the
    default threshold; a logit of 1e-6 is above it (sigmoid rounds logits under ~1e-7 back to
    exactly 0.5 in float32)."""
    tiny = 1e-6
    assert torch.sigmoid(torch.tensor(tiny)).item() > 0.5
    m = BlobMetrics(sigmoid=True)(_prediction(0.0, 0.0), _truth())
    assert m["sensitivity"].item() == 0.0
    m = BlobMetrics(sigmoid=True)(_prediction(tiny, -tiny), _truth())
    assert m["sensitivity"].item() == 1.0 and m["precision"].item() == 1.0
    # without sigmoid the same values are probabilities: both just above 0, under 0.5
    m = BlobMetrics()(_prediction(tiny, tiny), _truth())
    assert m["sensitivity"].item() == 0.0


def test_floating_ground_truth_at_one_half_is_background():
    pred = _prediction(1.0, 0.0) > 0.5
    y = _prediction(0.5, 0.0)
    m = BlobMetrics()(pred, y)  # the truth is empty: the predicted blob is a false positive
    assert m["precision"].item() == 0.0 and m["sensitivity"].item() == 1.0
    m = BlobMetrics()(pred, _prediction(_above(0.5), 0.0))
    assert m["precision"].item() == 1.0 and m["sensitivity"].item() == 1.0 and m["dice"].item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_threshold_boundary_in_every_float_dtype(dtype):
    for t in (0.5, 0.25):
        at = BlobMetrics(t)(_prediction(t, 0.0, dtype), _truth())
        above = BlobMetrics(t)(_prediction(_above(t, dtype), 0.0, dtype), _truth())
        assert at["sensitivity"].item() == 0.0 and above["sensitivity"].item() == 1.0


def test_single_voxel_blobs_count_at_the_boundary_of_the_ratios():
    """Denominators of exactly 1 (one blob, one voxel): the ratios' ``den > 0`` branch, not the
    empty value, and no clamping of a denominator of 1."""
    y = torch.zeros(SHAPE, dtype=torch.bool)
    y[..., 0, 0] = True
    pred = torch.zeros(SHAPE, dtype=torch.bool)
    pred[..., 3, 7] = True
    c = detection_counts(pred, y)
    assert {k: int(v) for k, v in c.items()} == dict(tp=0, fp=1, fn=1, gt_detected=0, n_pred=1, n_gt=1, inter=0,
                                                     pred_voxels=1, gt_voxels=1)
    m = BlobMetrics()(pred, y)
    assert m["sensitivity"].item() == 0.0 and m["precision"].item() == 0.0 and m["f1"].item() == 0.0
    assert m["volumetric_sensitivity"].item() == 0.0 and m["volumetric_precision"].item() == 0.0
    m = BlobMetrics()(y, y)
    assert all(m[k].item() == 1.0 for k in m)


def test_aggregate_reductions_over_cases_and_channels():
    """mean: over every (case, channel); mean_batch: per channel over the cases; none: the
    (N, C) table. Three cases of two channels, each channel's blob found or missed as drawn here."""
    found = {(0, 0): True, (0, 1): False, (1, 0): True, (1, 1): True, (2, 0): False, (2, 1): False}
    metric = BlobMetrics(spatial_dims=3)
    for case in range(3):
        y = torch.zeros(1, 2, 1, 4, 4, dtype=torch.bool)
        y[..., 1:3, 1:3] = True
        pred = torch.zeros_like(y)
        for c in range(2):
            pred[0, c] = y[0, c] if found[case, c] else False
        metric(pred, y)
    want = torch.tensor([[float(found[n, c]) for c in range(2)] for n in range(3)], dtype=torch.float64)
    assert torch.equal(metric.aggregate("none")["sensitivity"], want)
    assert torch.equal(metric.aggregate("mean_batch")["sensitivity"], torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    assert metric.aggregate("mean")["sensitivity"].item() == pytest.approx(0.5, rel=1e-15)
    assert metric.aggregate()["sensitivity"].item() == pytest.approx(0.5, rel=1e-15)  # the default
    by_default = BlobMetrics(reduction="mean_batch", spatial_dims=3)
    by_default._buffer = metric._buffer
    assert torch.equal(by_default.aggregate()["sensitivity"], torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))


@pytest.mark.parametrize("name", ["y_pred", "y"])
def test_detection_counts_names_the_floating_argument(name):
    mask = _truth()
    args = {"y_pred": mask, "y": mask}
    args[name] = mask.float()
    with pytest.raises(TypeError, match=rf"^{name} must be a bool mask or an integer instance map, got torch.float32"):
        detection_counts(args["y_pred"], args["y"])
    args[name] = -mask.long()
    with pytest.raises(ValueError, match=rf"^{name} must be >= 0 \(0 = background\)$"):
        detection_counts(args["y_pred"], args["y"])

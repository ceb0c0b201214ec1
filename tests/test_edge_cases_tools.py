"""Edge cases of the instance tools: a volume is never misread without a word (issue 11, item 8).

The tools take ``(B, C, *spatial)``. A 5-D tensor is unambiguous; a 3-D or 4-D one may be a
single volume missing its batch or channel dims, so the caller must confirm the layout
(``spatial_dims`` or a connectivity of that dimensionality) or get an error naming the layout.
"""

import cc3d
import numpy as np
import pytest
import torch

import blobbench
from blobbench import BlobMetrics, LabelInstancesd, blob_metrics, detection_counts, label_instances


def _two_blob_volume(seed=0):
    """(16, 32, 32) bool volume with 2 blobs, each spanning several slices."""
    rng = np.random.default_rng(seed)
    vol = np.zeros((16, 32, 32), dtype=bool)
    a, b = rng.integers(2, 5, size=3), rng.integers(9, 12, size=3)
    vol[a[0] : a[0] + 6, a[1] : a[1] + 6, a[2] : a[2] + 6] = True
    vol[b[0] : b[0] + 4, 20:26, 20:26] = True
    assert cc3d.connected_components(vol).max() == 2
    return torch.from_numpy(vol)


def test_label_instances_refuses_a_bare_3d_volume():
    vol = _two_blob_volume()
    with pytest.raises(ValueError, match=r"\(16, 32, 32\) is ambiguous.*\(B, C, \*spatial\).*spatial_dims=1"):
        label_instances(vol)
    # As a batch of one volume: the two blobs, as cc3d labels the volume.
    inst = label_instances(vol[None, None])
    assert inst.shape == (1, 1, 16, 32, 32) and int(inst.max()) == 2
    assert torch.equal(inst[0, 0].long(), torch.from_numpy(cc3d.connected_components(vol.numpy()).astype(np.int64)))


def test_label_instances_refuses_a_volume_with_one_leading_dim():
    vol = _two_blob_volume(1)[None]  # (1, 16, 32, 32): 2D slices, or one 3D volume?
    with pytest.raises(ValueError, match=r"\(1, 16, 32, 32\) is ambiguous.*\(B, C, D, H, W\)"):
        label_instances(vol)
    with pytest.raises(ValueError, match=r"connectivity must be one of \(4, 8\) for 2D mask \(B, C, H, W\), got 26"):
        label_instances(vol, connectivity=26)
    with pytest.raises(ValueError, match=r"2 spatial dim\(s\).*not spatial_dims=3"):
        label_instances(vol, spatial_dims=3)
    # Confirmed as 16 channels of 2D images: each slice is labelled on its own.
    per_slice = label_instances(vol, spatial_dims=2)
    expected = [int(cc3d.connected_components(vol[0, c].numpy()).max()) for c in range(16)]
    assert [int(per_slice[0, c].max()) for c in range(16)] == expected
    assert torch.equal(per_slice, label_instances(vol, connectivity=8))


def test_label_instances_lines_need_confirmation():
    lines = torch.zeros(2, 3, 10, dtype=torch.bool)
    lines[0, 1, 2:4] = True
    lines[0, 1, 6:9] = True
    with pytest.raises(ValueError, match="ambiguous"):
        label_instances(lines)
    assert int(label_instances(lines, spatial_dims=1)[0, 1].max()) == 2


@pytest.mark.parametrize("bad", [0, 4, True, 2.0])
def test_spatial_dims_must_be_1_2_or_3(bad):
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3"):
        label_instances(torch.zeros(1, 1, 4, 4, dtype=torch.bool), spatial_dims=bad)
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3"):
        BlobMetrics(spatial_dims=bad)


def test_five_d_volumes_need_nothing_and_a_wrong_spatial_dims_raises():
    vol = _two_blob_volume(2)[None, None]
    assert int(label_instances(vol).max()) == 2
    assert int(label_instances(vol, spatial_dims=3).max()) == 2
    with pytest.raises(ValueError, match=r"3 spatial dim\(s\).*not spatial_dims=2"):
        label_instances(vol, spatial_dims=2)


@pytest.mark.parametrize("fn", [blob_metrics, detection_counts])
def test_metrics_refuse_a_bare_volume(fn):
    m = _two_blob_volume(3)
    with pytest.raises(ValueError, match=rf"{fn.__name__}: y of shape \(16, 32, 32\) is ambiguous"):
        fn(m, m)
    # Integer instance maps are read per (b, c) too: the same rule.
    with pytest.raises(ValueError, match="ambiguous"):
        fn(m[None].long(), m[None].long())
    c = detection_counts(m[None, None], m[None, None])
    assert (c["n_gt"].item(), c["tp"].item(), c["fp"].item(), c["fn"].item()) == (2, 2, 0, 0)
    assert detection_counts(m[None], m[None], spatial_dims=2)["n_gt"].shape == (1, 16)


def test_blob_metrics_class_refuses_a_bare_volume():
    m = _two_blob_volume(4)
    with pytest.raises(ValueError, match=r"BlobMetrics: y of shape \(1, 16, 32, 32\) is ambiguous"):
        BlobMetrics()(m[None].float(), m[None])
    metric = BlobMetrics(spatial_dims=3)
    metric(m[None, None].float(), m[None, None])
    assert metric.aggregate()["f1"].item() == 1.0


def test_label_instances_d_reads_channel_first_2d_and_3d():
    img = np.zeros((1, 12, 12), dtype=np.uint8)  # (C, H, W)
    img[0, 1:3, 1:3] = 1
    img[0, 6:9, 6:9] = 1
    out = LabelInstancesd("l")({"l": img})["l_instances"]
    assert out.shape == (1, 12, 12) and int(out.max()) == 2
    vol = _two_blob_volume(5)[None].to(torch.uint8)  # (C, D, H, W)
    assert int(LabelInstancesd("l")({"l": vol})["l_instances"].max()) == 2


def test_error_names_the_function():
    with pytest.raises(ValueError, match="^label_instances: "):
        blobbench.label_instances(torch.zeros(3, 4, 5, dtype=torch.bool))

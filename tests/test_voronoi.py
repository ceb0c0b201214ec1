"""voronoi_regions and VoronoiRegionsd against a brute-force nearest-instance search."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

pytest.importorskip("scipy.ndimage")

from blobbench import voronoi_regions  # noqa: E402
from conftest import devices  # noqa: E402
from helpers import random_instances  # noqa: E402


def brute_force_distances(plane: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel: the squared distance to each instance id present, ``(V, n_ids)``, and the ids."""
    spacing = np.ones(plane.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    coords = np.stack(np.meshgrid(*[np.arange(s) for s in plane.shape], indexing="ij"), -1).reshape(-1, plane.ndim)
    coords = coords * spacing
    ids = np.unique(plane[plane > 0])
    d2 = np.full((coords.shape[0], ids.size), np.inf)
    flat = plane.reshape(-1)
    for j, k in enumerate(ids):
        seeds = coords[flat == k]
        d2[:, j] = ((coords[:, None, :] - seeds[None, :, :]) ** 2).sum(-1).min(1)
    return d2, ids


def check_against_brute_force(inst: torch.Tensor, regions: torch.Tensor, spacing) -> int:
    """Every voxel's region is an instance at the smallest distance; unique nearest: that one.
    Returns how many voxels had a tie."""
    ties = 0
    for b, c in itertools.product(range(inst.shape[0]), range(inst.shape[1])):
        plane, reg = inst[b, c].numpy(), regions[b, c].numpy().reshape(-1)
        if not (plane > 0).any():
            assert (reg == 0).all()
            continue
        d2, ids = brute_force_distances(plane, spacing)
        best = d2.min(1)
        chosen = np.searchsorted(ids, reg)
        assert (ids[chosen] == reg).all(), "a region id that is no instance of the plane"
        chosen_d2 = d2[np.arange(d2.shape[0]), chosen]
        np.testing.assert_allclose(chosen_d2, best, rtol=1e-12, atol=1e-12)
        tied = (d2 <= best[:, None] * (1 + 1e-12) + 1e-12).sum(1) > 1
        ties += int(tied.sum())
        unique_nearest = ids[d2.argmin(1)]
        np.testing.assert_array_equal(reg[~tied], unique_nearest[~tied])
        flat = plane.reshape(-1)
        np.testing.assert_array_equal(reg[flat > 0], flat[flat > 0])  # instance voxels keep their id
    return ties


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "shape, spacing",
    [
        ((2, 2, 40), None),
        ((2, 2, 9, 11), None),
        ((2, 1, 10, 7), (2.5, 1.0)),
        ((1, 2, 6, 7, 8), None),
        ((2, 1, 5, 7, 6), (3.0, 1.0, 0.7)),
    ],
)
def test_nearest_instance_against_brute_force(seed, shape, spacing):
    rng = np.random.default_rng(seed)
    inst = random_instances(rng, shape, 4, empty_prob=0.25)
    # Single-voxel seeds too, so that many voxels are far from every instance.
    extra = torch.from_numpy(rng.random(shape) < 0.01) & (inst == 0)
    inst = torch.where(extra, torch.as_tensor(97, dtype=inst.dtype), inst)
    regions = voronoi_regions(inst, spacing, spatial_dims=len(shape) - 2)
    assert regions.dtype == inst.dtype and regions.shape == inst.shape
    check_against_brute_force(inst, regions, spacing)


def test_spacing_changes_the_nearest_instance():
    # Seeds at (0, 0) and (4, 4) on a 5x5 image, voxel (0, 4): equidistant without spacing; with
    # rows 3x the columns' size, (0, 0) is 4 away and (4, 4) is 12 away.
    inst = torch.zeros(1, 1, 5, 5, dtype=torch.int64)
    inst[0, 0, 0, 0], inst[0, 0, 4, 4] = 1, 2
    r = voronoi_regions(inst, (3.0, 1.0))
    assert r[0, 0, 0, 4] == 1 and r[0, 0, 4, 0] == 2
    r = voronoi_regions(inst, (1.0, 3.0))
    assert r[0, 0, 0, 4] == 2 and r[0, 0, 4, 0] == 1


def test_ties_are_deterministic_and_go_to_a_nearest_instance():
    inst = torch.zeros(2, 1, 8, 8, dtype=torch.int32)
    inst[:, 0, 1, 1], inst[:, 0, 1, 5], inst[:, 0, 5, 1], inst[:, 0, 5, 5] = 4, 3, 2, 1
    first = voronoi_regions(inst, spatial_dims=2)
    for _ in range(3):
        assert torch.equal(voronoi_regions(inst, spatial_dims=2), first)
    assert torch.equal(first[0], first[1])  # the same plane gives the same regions
    assert check_against_brute_force(inst, first, None) > 0  # there were ties to break


def test_empty_and_full_planes():
    inst = torch.zeros(2, 2, 4, 5, 6, dtype=torch.uint8)
    inst[0, 1] = 7
    inst[1, 0, 2, 2, 2] = 3
    r = voronoi_regions(inst)
    assert (r[0, 0] == 0).all() and (r[1, 1] == 0).all()  # planes without instances
    assert (r[0, 1] == 7).all()  # a plane that is all instance keeps it
    assert (r[1, 0] == 3).all()  # one instance claims its whole plane


def test_numpy_input_and_dtypes():
    rng = np.random.default_rng(5)
    inst = random_instances(rng, (1, 2, 6, 7), 3, dtype=torch.int16)
    r = voronoi_regions(inst.numpy(), spatial_dims=2)
    assert isinstance(r, torch.Tensor) and r.dtype == torch.int16
    assert torch.equal(r, voronoi_regions(inst.long(), spatial_dims=2).to(torch.int16))


def test_same_partition_as_monai_per_component():
    """MONAI's per-component Dice (and ccmetrics) relabel the mask with scipy (26-connectivity)
    and run the same feature transform: the partitions agree with ours on cc3d's labels."""
    utils = pytest.importorskip("monai.metrics.utils")
    if not hasattr(utils, "compute_voronoi_regions_fast"):
        pytest.skip("MONAI without per-component Dice")
    from blobbench import label_instances

    rng = np.random.default_rng(11)
    mask = rng.random((1, 1, 12, 13, 14)) < 0.01
    mask[0, 0, 2:4, 2:5, 3:6] = True
    inst = label_instances(mask)
    ours = voronoi_regions(inst)[0, 0].numpy()
    with pytest.warns(UserWarning, match="Voronoi computation is running on CPU"):
        theirs = utils.compute_voronoi_regions_fast(torch.from_numpy(mask[0, 0])).numpy()
    flat = inst[0, 0].numpy().reshape(-1)
    mapping = dict(zip(theirs.reshape(-1)[flat > 0].tolist(), flat[flat > 0].tolist()))
    assert len(mapping) == len(np.unique(flat[flat > 0]))
    np.testing.assert_array_equal(np.vectorize(mapping.get)(theirs), ours)


def test_bad_inputs():
    inst = torch.zeros(1, 1, 4, 4, 4, dtype=torch.int32)
    with pytest.raises(TypeError, match="integer ids"):
        voronoi_regions(inst.float())
    with pytest.raises(TypeError, match="integer ids"):
        voronoi_regions(inst.bool())
    with pytest.raises(TypeError, match="torch.Tensor or a numpy array"):
        voronoi_regions([[1, 2]])
    bad = inst.clone()
    bad[0, 0, 0, 0, 0] = -2
    with pytest.raises(ValueError, match=">= 0"):
        voronoi_regions(bad)
    with pytest.raises(ValueError, match="ambiguous"):
        voronoi_regions(inst[0])  # (1, 4, 4, 4): 2-D images or a volume?
    with pytest.raises(ValueError, match="one value per spatial dim"):
        voronoi_regions(inst, (1.0, 2.0))
    with pytest.raises(ValueError, match="positive"):
        voronoi_regions(inst, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="spacing must be"):
        voronoi_regions(inst, "big")
    with pytest.raises(ValueError, match="shape"):
        voronoi_regions(inst[0, 0, 0, 0])


def test_spacing_confirms_the_layout():
    inst = torch.zeros(2, 3, 4, 5, dtype=torch.int32)
    inst[0, 1, 1, 1] = 1
    assert torch.equal(voronoi_regions(inst, (1.0, 1.0)), voronoi_regions(inst, spatial_dims=2))


def test_voronoi_regionsd():
    transforms = pytest.importorskip("blobbench.transforms")
    MetaTensor = pytest.importorskip("monai.data").MetaTensor
    rng = np.random.default_rng(3)
    inst = random_instances(rng, (1, 2, 6, 7, 8), 3, empty_prob=0.0)[0]
    label = MetaTensor(inst, affine=torch.diag(torch.tensor([3.0, 1.0, 1.0, 1.0])))
    d = transforms.VoronoiRegionsd("inst")({"inst": label, "other": 1})
    assert set(d) == {"inst", "other", "inst_regions"}
    out = d["inst_regions"]
    assert isinstance(out, MetaTensor) and out.dtype == inst.dtype
    assert torch.equal(out.as_tensor(), voronoi_regions(inst[None])[0])
    assert torch.equal(out.affine, label.affine)
    # spacing="pixdim" reads the MetaTensor's voxel size (3, 1, 1)
    d = transforms.VoronoiRegionsd("inst", spacing="pixdim", postfix="_r")({"inst": label})
    assert torch.equal(d["inst_r"].as_tensor(), voronoi_regions(inst[None], (3.0, 1.0, 1.0))[0])
    # a plain array, 2-D
    d = transforms.VoronoiRegionsd("x")({"x": inst[:, 0].numpy()})
    assert torch.equal(d["x_regions"], voronoi_regions(inst[None, :, 0], spatial_dims=2)[0])
    with pytest.raises(ValueError, match="MetaTensor"):
        transforms.VoronoiRegionsd("x", spacing="pixdim")({"x": inst})
    with pytest.raises(ValueError, match="channel-first"):
        transforms.VoronoiRegionsd("x")({"x": inst[0, 0, 0, 0]})
    with pytest.raises(ValueError, match="spacing must be"):
        transforms.VoronoiRegionsd("x", spacing="mm")


@devices
def test_on_each_device(device):
    rng = np.random.default_rng(8)
    inst = random_instances(rng, (2, 2, 5, 6, 7), 3)
    r = voronoi_regions(inst.to(device))
    assert r.device.type == device and torch.equal(r.cpu(), voronoi_regions(inst))

"""The CC losses' other paths and their messages (issue 23: survivors of the mutation sample of
cc_losses.py and voronoi.py).

What tests/test_cc_losses.py leaves open: the scatter baseline (``vectorized_cc_loss``) with
sparse huge ids (compacted) and its own error messages, the ``regions=None`` path's own checks
(the fused operators check only given regions), ``torch.compile`` of ``cc_dice`` with non-default
options, the modules' ``activation`` and ``squared_pred``, and the complete text of the messages
(the argument, what was expected, what was found, the plane). Expected values come from the MONAI
loop (``naive_cc_dice`` / ``naive_cc_dice_ce``) on the compact ids, or are written by hand.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("scipy.ndimage")

from blobbench import CCDiceCELoss, CCDiceLoss, cc_dice, cc_dice_ce, voronoi_regions  # noqa: E402
from blobbench.reference import naive_cc_dice, naive_cc_dice_ce, vectorized_cc_loss  # noqa: E402
from conftest import devices  # noqa: E402
from helpers import random_instances  # noqa: E402

SHAPE = (2, 2, 5, 6, 7)


def case(seed, *, activation="sigmoid", shape=SHAPE, empty_prob=0.3):
    rng = np.random.default_rng(seed)
    inst = random_instances(rng, shape, 4, empty_prob=empty_prob)
    if activation == "none":
        x = torch.from_numpy(rng.uniform(0.02, 0.98, shape))
    else:
        x = torch.from_numpy(rng.normal(0, 2, shape))
    return x, inst, voronoi_regions(inst)


def full_planes(seed):
    """Every plane holds at least two instances (no plane without instances)."""
    x, inst, regions = case(seed, empty_prob=0.0)
    inst[:, :, 0, 0, 0] = 61
    inst[:, :, -1, -1, -1] = 62
    return x, inst, voronoi_regions(inst)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


@pytest.mark.parametrize("loss", ["dice", "dice_ce"])
def test_scatter_baseline_compacts_sparse_huge_ids(loss):
    """Ids far above the voxel count are compacted; the loss is that of the compact ids."""
    x, inst, regions = case(31)
    big = torch.where(inst > 0, inst.long() * 1_000_000_007, 0)
    big_regions = voronoi_regions(big)
    assert int(big_regions.max()) > 4 * big.numel()  # the compacting branch is taken
    naive = naive_cc_dice if loss == "dice" else naive_cc_dice_ce
    close(vectorized_cc_loss(x, big, big_regions, 0.5, 2.0, loss=loss), naive(x, inst, regions, 0.5, 2.0))


@devices
def test_scatter_baseline_on_each_device(device):
    """The index_add baseline runs on any device (its tables and checks on the input's device),
    with compact and with sparse huge ids, against the loop on the CPU."""
    x, inst, regions = case(39)
    expected = naive_cc_dice_ce(x, inst, regions, 0.5, 2.0)
    big = torch.where(inst > 0, inst.long() * 1_000_000_007, 0)
    for ids, reg in ((inst, regions), (big, voronoi_regions(big))):
        got = vectorized_cc_loss(x.to(device), ids.to(device), reg.to(device), 0.5, 2.0, loss="dice_ce")
        assert got.device.type == device
        close(got.cpu(), expected)


def test_scatter_baseline_names_itself_and_the_plane_in_its_errors():
    x, inst, regions = full_planes(32)
    # an instance cropped away in plane (1, 1): its region remains without it
    k = int(inst[1, 1].max())
    cropped = inst.clone()
    cropped[1, 1][inst[1, 1] == k] = 0
    message = (
        f"vectorized_cc_loss: `regions` holds region id {k} in plane (b = 1, c = 1) where `instances` has no voxel "
        "with that id (each region must contain its instance; compute the regions with "
        "blobbench.voronoi_regions(instances), on the patch, after any crop)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        vectorized_cc_loss(x, cropped, regions)
    # the same with sparse huge ids (the compacted table names the id, not its column)
    big, big_regions = cropped.long() * 1_000_000_007, regions.long() * 1_000_000_007
    with pytest.raises(ValueError, match=re.escape(f"region id {k * 1_000_000_007} in plane (b = 1, c = 1) ")):
        vectorized_cc_loss(x, big, big_regions)
    # region 0 in plane (1, 0), which has instances
    holes = regions.clone()
    holes[1, 0][inst[1, 0] == 0] = 0
    message = "vectorized_cc_loss: `regions` holds 0 (no region) in plane (b = 1, c = 0), which has instances"
    with pytest.raises(ValueError, match=re.escape(message)):
        vectorized_cc_loss(x, inst, holes)
    # an instance voxel outside its region, in plane (1, 1)
    moved = regions.clone()
    moved[1, 1][inst[1, 1] == k] = k + 100
    message = (
        "vectorized_cc_loss: `regions` must give every instance voxel its own id (an instance voxel is its own "
        "nearest instance), found a difference in plane (b = 1, c = 1)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        vectorized_cc_loss(x, inst, moved)
    message = "vectorized_cc_loss: `input` must be a float16, bfloat16, float32 or float64 tensor, got torch.int64"
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        vectorized_cc_loss(x.long(), inst, regions)


def test_regions_tensor_message_names_the_type_given():
    x, inst, regions = case(33)
    with pytest.raises(TypeError, match=r"^cc_dice: `regions` must be a tensor \(or None\), got ndarray$"):
        cc_dice(x, inst, regions.numpy())
    with pytest.raises(TypeError, match=r"^vectorized_cc_loss: `regions` must be a tensor \(or None\), got list$"):
        vectorized_cc_loss(x, inst, regions.tolist())


@pytest.mark.parametrize("path", ["regions=None", "vectorized"])
def test_own_checks_of_the_python_paths(path):
    """The fused operators check given regions themselves; the regions=None path and the scatter
    baseline check the inputs in Python, with the same messages."""
    x, inst, regions = case(34)
    if path == "regions=None":
        run = lambda x, inst, loss="dice", **kw: (cc_dice if loss == "dice" else cc_dice_ce)(x, inst, **kw)
        name, ce_name = "cc_dice", "cc_dice_ce"
    else:
        run = lambda x, inst, loss="dice", **kw: vectorized_cc_loss(x, inst, None, loss=loss, **kw)
        name = ce_name = "vectorized_cc_loss"
    message = (
        f'{ce_name}: activation="softmax" is not supported: CC Dice+CE takes one binary cross-entropy per channel '
        "and region (sigmoid or none), as blob_dice_ce; use cc_dice with softmax"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        run(x, inst, "dice_ce", activation="softmax")
    # one channel, five voxels along the first spatial dim: the message gives C = 1
    message = f'{name}: activation="softmax" needs at least 2 channels (channel 0 is the background class), got C = 1'
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        run(x[:, :1], inst[:, :1], activation="softmax")
    with pytest.raises(ValueError, match=f"^{ce_name}: `lambda_dice` and `lambda_ce` must be >= 0, got 1.0 and -0.5$"):
        run(x, inst, "dice_ce", lambda_ce=-0.5)


@pytest.mark.parametrize("path", ["regions=None", "vectorized"])
def test_lambda_dice_below_one_and_dice_on_values_outside_0_1(path):
    """lambda_dice = 0.5 is valid; with activation="none" only the cross-entropy needs [0, 1]:
    CC-Dice takes any values (MONAI's DiceLoss does)."""
    x, inst, regions = case(35, activation="none")
    wide = x * 3 - 1  # in (-0.94, 1.94)
    assert bool(((wide < 0) | (wide > 1)).any())
    if path == "regions=None":
        dice = cc_dice(wide, inst, activation="none")
        dice_ce = cc_dice_ce(x, inst, activation="none", lambda_dice=0.5)
    else:
        dice = vectorized_cc_loss(wide, inst, None, activation="none")
        dice_ce = vectorized_cc_loss(x, inst, None, loss="dice_ce", activation="none", lambda_dice=0.5)
    close(dice, naive_cc_dice(wide, inst, regions, activation="none"))
    close(dice_ce, naive_cc_dice_ce(x, inst, regions, activation="none", lambda_dice=0.5))


def test_softmax_regions_none_does_not_read_channel_0():
    """With softmax, channel 0's instances are not read: negative ids there are no error, and
    its regions (computed or not) change nothing."""
    x, inst, regions = case(36, shape=(2, 3, 5, 6, 7))
    noisy = inst.clone()
    noisy[:, 0] = 0
    noisy[:, 0, 0, 0, 0] = -4
    noisy[:, 0, 1:3, 1:3, 1:3] = 9
    expected = naive_cc_dice(x, inst, regions, activation="softmax")
    close(cc_dice(x, noisy, activation="softmax"), expected)
    close(vectorized_cc_loss(x, noisy, None, activation="softmax"), expected)
    # given regions: channel 0's are not checked against its instances (here they do not fit them)
    junk = regions.clone()
    junk[:, 0] = 0
    close(vectorized_cc_loss(x, noisy, junk, activation="softmax"), expected)


@pytest.mark.parametrize("loss", ["dice", "dice_ce"])
def test_compiled_equals_eager_and_the_loop_with_options(loss):
    """torch.compile (Dynamo, eager backend) goes through the private forward ops with their own
    argument order: every option differs from its default. fullgraph=True: with a graph break
    Dynamo would run the function eagerly, where the eager path hides a broken compiled one."""
    x, inst, regions = case(37, activation="none")
    kw = dict(activation="none", squared_pred=True, smooth_nr=0.25, smooth_dr=2.0)
    if loss == "dice":
        fn, expected = cc_dice, naive_cc_dice(x, inst, regions, 0.5, 2.0, **kw)
    else:
        kw.update(lambda_dice=0.3, lambda_ce=1.7)
        fn, expected = cc_dice_ce, naive_cc_dice_ce(x, inst, regions, 0.5, 2.0, **kw)
    eager = fn(x, inst, regions, 0.5, 2.0, **kw)
    compiled = torch.compile(fn, backend="eager", fullgraph=True)(x, inst, regions, 0.5, 2.0, **kw)
    close(eager, expected)
    close(compiled, expected)


def test_modules_pass_activation_and_squared_pred():
    x, inst, regions = case(38, activation="none")
    close(CCDiceLoss(activation="none")(x, inst, regions), naive_cc_dice(x, inst, regions, activation="none"))
    close(
        CCDiceCELoss(squared_pred=True, activation="none")(x, inst, regions),
        naive_cc_dice_ce(x, inst, regions, activation="none", squared_pred=True),
    )


def test_voronoi_messages_name_what_was_given():
    message = "voronoi_regions: instances must be a torch.Tensor or a numpy array, got list"
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        voronoi_regions([[1, 2]])
    # a spacing of 3 values reads a 4-D input as 3 spatial dims (then refused), not as ambiguous
    inst = torch.zeros(1, 4, 4, 4, dtype=torch.int32)
    inst[0, 1, 1, 1] = 1
    message = "has 2 spatial dim(s) in the expected (B, C, *spatial) layout, not spatial_dims=3"
    with pytest.raises(ValueError, match=re.escape(message)):
        voronoi_regions(inst, (1.0, 2.0, 1.0))

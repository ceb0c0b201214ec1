"""CC-Dice and CC-DiceCE (docs/design.md, section 9) against the loop with MONAI's losses.

The oracle is ``naive_cc_dice`` / ``naive_cc_dice_ce``: for each plane and region, MONAI's
``DiceLoss`` / ``DiceCELoss`` on the region's voxels. The scatter reference
(``vectorized_cc_loss``), the functions ``cc_dice`` / ``cc_dice_ce`` and the modules are held to it
in float64, loss and gradient, on seeded random inputs for every option.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("scipy.ndimage")

import blobbench  # noqa: E402
from blobbench import CCDiceCELoss, CCDiceLoss, cc_dice, cc_dice_ce, voronoi_regions  # noqa: E402
from blobbench.reference import naive_cc_dice, naive_cc_dice_ce, vectorized_cc_loss  # noqa: E402
from conftest import devices  # noqa: E402
from helpers import random_instances  # noqa: E402

SHAPES = {1: (2, 2, 23), 2: (3, 2, 9, 10), 3: (2, 2, 5, 6, 7)}


def make_case(seed, ndim, activation, C=None, empty_prob=0.3):
    rng = np.random.default_rng(seed)
    B, C0, *spatial = SHAPES[ndim]
    C = C or (3 if activation == "softmax" else C0)
    shape = (B, C, *spatial)
    inst = random_instances(rng, shape, 4, empty_prob=empty_prob)
    inst[0, -1] = 0  # at least one plane without instances
    if activation == "none":
        x = torch.from_numpy(rng.uniform(0.02, 0.98, shape))
    else:
        x = torch.from_numpy(rng.normal(0, 2, shape))
    return x.requires_grad_(), inst, voronoi_regions(inst, spatial_dims=ndim)


def loss_and_grad(fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, *args, **kwargs)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)


DICE_OPTIONS = [
    dict(),
    dict(squared_pred=True),
    dict(smooth_nr=0.5, smooth_dr=2.0),
    dict(smooth_nr=0.0, smooth_dr=1e-3, squared_pred=True),
]
CE_OPTIONS = DICE_OPTIONS + [dict(lambda_dice=0.3, lambda_ce=1.7), dict(lambda_dice=0.0), dict(lambda_ce=0.0)]
WEIGHTS = [(1.0, 1.0), (2.0, 1.0), (0.0, 1.0), (0.7, 0.0)]


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "none"])
@pytest.mark.parametrize("opt", range(len(DICE_OPTIONS)))
def test_cc_dice_scatter_and_function_match_the_loop(ndim, activation, opt):
    options = DICE_OPTIONS[opt]
    alpha, beta = WEIGHTS[(opt + ndim) % len(WEIGHTS)]
    x, inst, regions = make_case(100 * ndim + opt, ndim, activation)
    kw = dict(activation=activation, **options)
    expected = loss_and_grad(naive_cc_dice, x, inst, regions, alpha, beta, **kw)
    assert_same(loss_and_grad(vectorized_cc_loss, x, inst, regions, alpha, beta, loss="dice", **kw), expected)
    assert_same(loss_and_grad(cc_dice, x, inst, regions, alpha, beta, spatial_dims=ndim, **kw), expected)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("activation", ["sigmoid", "none"])
@pytest.mark.parametrize("opt", range(len(CE_OPTIONS)))
def test_cc_dice_ce_scatter_and_function_match_the_loop(ndim, activation, opt):
    options = CE_OPTIONS[opt]
    alpha, beta = WEIGHTS[(opt + ndim) % len(WEIGHTS)]
    x, inst, regions = make_case(200 * ndim + opt, ndim, activation)
    kw = dict(activation=activation, **options)
    expected = loss_and_grad(naive_cc_dice_ce, x, inst, regions, alpha, beta, **kw)
    assert_same(loss_and_grad(vectorized_cc_loss, x, inst, regions, alpha, beta, loss="dice_ce", **kw), expected)
    assert_same(loss_and_grad(cc_dice_ce, x, inst, regions, alpha, beta, spatial_dims=ndim, **kw), expected)


def test_defaults_are_one_and_one():
    x, inst, regions = make_case(7, 3, "sigmoid")
    ref = naive_cc_dice_ce(x, inst, regions, 1.0, 1.0)
    torch.testing.assert_close(cc_dice_ce(x, inst, regions), ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(CCDiceCELoss()(x, inst, regions), ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(cc_dice(x, inst, regions), naive_cc_dice(x, inst, regions, 1.0, 1.0), rtol=1e-10, atol=0)


def test_regions_none_computes_the_voronoi_regions():
    x, inst, regions = make_case(8, 3, "sigmoid")
    torch.testing.assert_close(cc_dice_ce(x, inst), cc_dice_ce(x, inst, regions), rtol=0, atol=0)
    # softmax: channel 0's instances are not read, so garbage there changes nothing
    x, inst, regions = make_case(9, 2, "softmax")
    noisy = inst.clone()
    noisy[:, 0] = 5
    a = cc_dice(x, noisy, activation="softmax", spatial_dims=2)
    torch.testing.assert_close(a, naive_cc_dice(x, inst, regions, activation="softmax"), rtol=1e-10, atol=0)
    # ... nor are its regions, given (ids of another channel, negative ids: never read)
    junk = regions.clone()
    junk[:, 0] = torch.arange(junk[:, 0].numel()).view_as(junk[:, 0]) % 7
    noisy[:, 0, 0] = -4
    c = cc_dice(x, noisy, junk, activation="softmax", spatial_dims=2)
    torch.testing.assert_close(c, a, rtol=0, atol=0)
    # spacing reaches voronoi_regions
    spaced = voronoi_regions(inst, (4.0, 1.0))
    b = cc_dice(x, inst, activation="softmax", spacing=(4.0, 1.0), spatial_dims=2)
    torch.testing.assert_close(b, naive_cc_dice(x, inst, spaced, activation="softmax"), rtol=1e-10, atol=0)


def test_no_instances_gives_the_global_term_with_zero_cc_gradient():
    x = torch.randn(2, 1, 6, 7, dtype=torch.float64, requires_grad=True)
    inst = torch.zeros(2, 1, 6, 7, dtype=torch.int32)
    expected = loss_and_grad(naive_cc_dice_ce, x, inst, None, 1.0, 1.0)
    got = loss_and_grad(cc_dice_ce, x, inst, spatial_dims=2)
    assert_same(got, expected)
    # beta alone: the CC term is 0 with zero gradient
    loss, g = loss_and_grad(cc_dice_ce, x, inst, alpha=0.0, beta=1.0, spatial_dims=2)
    assert loss == 0 and (g == 0).all()


def test_one_instance_per_plane_is_the_global_term():
    """An independent check of the reduction: with one instance its region is the whole plane, so
    its term equals the plane's global Dice (MONAI DiceLoss with batch=False, per plane)."""
    from monai.losses import DiceLoss

    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.normal(0, 2, (3, 2, 5, 6, 7)))
    inst = torch.zeros(x.shape, dtype=torch.int64)
    inst[:, :, 1:3, 2:4, 1:5] = 9
    per_plane = DiceLoss(sigmoid=True, reduction="none")(x, (inst > 0).double())
    torch.testing.assert_close(cc_dice(x, inst, alpha=0.0, beta=1.0), per_plane.mean(), rtol=1e-12, atol=0)


def test_modules_and_monai_names():
    x, inst, regions = make_case(12, 3, "sigmoid")
    torch.testing.assert_close(
        CCDiceLoss(2.0, 0.5, squared_pred=True)(x, inst, regions),
        naive_cc_dice(x, inst, regions, 2.0, 0.5, squared_pred=True),
        rtol=1e-10,
        atol=0,
    )
    torch.testing.assert_close(
        CCDiceCELoss(lambda_dice=0.5, lambda_ce=2.0, sigmoid=True)(x, inst, regions),
        naive_cc_dice_ce(x, inst, regions, lambda_dice=0.5, lambda_ce=2.0),
        rtol=1e-10,
        atol=0,
    )
    # include_background=False drops channel 0 of input, instances and regions
    torch.testing.assert_close(
        CCDiceLoss(include_background=False)(x, inst, regions),
        naive_cc_dice(x[:, 1:], inst[:, 1:], regions[:, 1:]),
        rtol=1e-10,
        atol=0,
    )
    x, inst, regions = make_case(13, 2, "softmax")
    torch.testing.assert_close(
        CCDiceLoss(softmax=True, spatial_dims=2)(x, inst, regions),
        naive_cc_dice(x, inst, regions, activation="softmax"),
        rtol=1e-10,
        atol=0,
    )
    assert "alpha=1.0" in repr(CCDiceCELoss())
    with pytest.raises(ValueError, match="CCDiceCELoss: softmax is not supported"):
        CCDiceCELoss(softmax=True)
    with pytest.raises(ValueError, match="to_onehot_y"):
        CCDiceLoss(to_onehot_y=True)
    with pytest.raises(ValueError, match="reduction must be 'mean'"):
        CCDiceLoss(reduction="sum")
    with pytest.raises(ValueError, match="lambda_dice and lambda_ce must be >= 0"):
        CCDiceCELoss(lambda_ce=-1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_returns_float32(dtype):
    x, inst, regions = make_case(14, 3, "sigmoid")
    loss = cc_dice_ce(x.detach().to(dtype), inst, regions)
    assert loss.dtype == torch.float32
    # the same input values in float64: only the float32 sums differ
    ref = naive_cc_dice_ce(x.detach().to(dtype).double(), inst, regions)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)


def test_gradcheck():
    x, inst, regions = make_case(15, 2, "sigmoid")
    assert torch.autograd.gradcheck(lambda t: cc_dice_ce(t, inst, regions, 0.5, 1.5, spatial_dims=2), (x,))
    assert torch.autograd.gradcheck(lambda t: cc_dice(t, inst, regions, squared_pred=True, spatial_dims=2), (x,))


def test_sparse_large_ids_are_compacted():
    x, inst, regions = make_case(16, 3, "sigmoid")
    big = torch.where(inst > 0, inst.long() * 1_000_000_007, 0)
    torch.testing.assert_close(
        cc_dice_ce(x, big, voronoi_regions(big)), naive_cc_dice_ce(x, inst, regions), rtol=1e-10, atol=0
    )


def test_bad_regions():
    x, inst, regions = make_case(17, 3, "sigmoid", empty_prob=0.0)
    with pytest.raises(ValueError, match="`regions` must have the shape of `instances`"):
        cc_dice(x, inst, regions[:, :1])
    with pytest.raises(TypeError, match="`regions` must have the dtype of `instances`"):
        cc_dice(x, inst, regions.long())
    with pytest.raises(TypeError, match="`regions` must be a tensor"):
        cc_dice(x, inst, regions.numpy())
    with pytest.raises(ValueError, match="`regions` and `instances` must be on the same device"):
        cc_dice(x, inst, regions.to("meta"))
    neg = regions.clone()
    neg[0, 0, 0, 0, 0] = -1
    with pytest.raises(ValueError, match="`regions` must be >= 0"):
        cc_dice(x, inst, neg)
    moved = regions.clone()
    k = int(inst[0, 0].max())
    moved[0, 0][inst[0, 0] == k] = k + 1
    with pytest.raises(ValueError, match="must give every instance voxel its own id"):
        cc_dice(x, inst, moved)
    # an instance cropped away: its region remains, without an instance
    cropped = inst.clone()
    cropped[0, 0][inst[0, 0] == k] = 0
    message = f"`regions` holds region id {k} in plane \\(b = 0, c = 0\\) where `instances` has no voxel"
    with pytest.raises(ValueError, match=message):
        cc_dice_ce(x, cropped, regions)
    holes = regions.clone()
    holes[0, 0][inst[0, 0] == 0] = 0
    with pytest.raises(ValueError, match="holds 0 \\(no region\\) in plane \\(b = 0, c = 0\\), which has instances"):
        cc_dice(x, inst, holes)
    with pytest.raises(ValueError, match="holds an id above max_label"):
        cc_dice(x, inst, regions, max_label=1)


def test_bad_inputs():
    x, inst, regions = make_case(18, 3, "sigmoid")
    with pytest.raises(TypeError, match="cc_dice: `input` must be a float16"):
        cc_dice(x.long(), inst, regions)
    with pytest.raises(TypeError, match="cc_dice: `instances` must hold integer instance ids"):
        cc_dice(x, inst.float(), regions)
    with pytest.raises(ValueError, match="`instances` must have the shape of `input`"):
        cc_dice(x, inst[:1], regions[:1])
    neg = inst.clone()
    neg[0, 0, 0, 0, 0] = -3
    with pytest.raises(ValueError, match="found a negative id \\(the smallest is -3\\)"):
        cc_dice(x, neg, regions)
    with pytest.raises(ValueError, match="cc_dice_ce: activation=\"softmax\" is not supported"):
        cc_dice_ce(x, inst, regions, activation="softmax")
    with pytest.raises(ValueError, match="`activation` must be one of"):
        cc_dice(x, inst, regions, activation="relu")
    with pytest.raises(ValueError, match="needs at least 2 channels"):
        cc_dice(x[:, :1], inst[:, :1], regions[:, :1], activation="softmax")
    with pytest.raises(ValueError, match="an empty batch has no loss"):
        cc_dice(x[:0], inst[:0], regions[:0])
    with pytest.raises(ValueError, match="spatial_dims=2 to confirm"):
        cc_dice(x[:, :, 0], inst[:, :, 0], regions[:, :, 0])
    with pytest.raises(ValueError, match="`lambda_dice` and `lambda_ce` must be >= 0"):
        cc_dice_ce(x, inst, regions, lambda_dice=-1.0)
    with pytest.raises(ValueError, match="max_label must be None or an int >= 0"):
        cc_dice(x, inst, regions, max_label=-2)
    with pytest.raises(ValueError, match="must hold probabilities in \\[0, 1\\]"):
        cc_dice_ce(x.detach() * 5, inst, regions, activation="none")


@pytest.mark.skipif(not hasattr(torch.ops.blob, "cc_dice"), reason="the fused CC operators are not built yet")
@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "none"])
def test_fused_operator_matches_the_loop(activation):
    x, inst, regions = make_case(19, 3, activation)
    kw = dict(activation=activation, squared_pred=True)
    expected = loss_and_grad(naive_cc_dice, x, inst, regions, 0.5, 2.0, **kw)
    assert_same(loss_and_grad(torch.ops.blob.cc_dice, x, inst, regions, 0.5, 2.0, **kw), expected)
    if activation != "softmax":
        expected = loss_and_grad(naive_cc_dice_ce, x, inst, regions, 0.5, 2.0, lambda_ce=0.4, **kw)
        got = loss_and_grad(torch.ops.blob.cc_dice_ce, x, inst, regions, 0.5, 2.0, lambda_ce=0.4, **kw)
        assert_same(got, expected)


def test_exported():
    for name in ("cc_dice", "cc_dice_ce", "CCDiceLoss", "CCDiceCELoss", "voronoi_regions", "naive_cc_dice"):
        assert name in blobbench.__all__ and getattr(blobbench, name) is not None


@devices
def test_on_each_device_against_the_loop_on_the_cpu(device):
    """The PyTorch path runs on any device; on CUDA the regions (regions=None) come from the CPU."""
    for activation in ("sigmoid", "none"):
        x, inst, regions = make_case(20, 3, activation)
        expected = loss_and_grad(naive_cc_dice_ce, x, inst, regions, 0.5, 2.0, activation=activation)
        xd, instd = x.detach().to(device), inst.to(device)
        loss, grad = loss_and_grad(cc_dice_ce, xd, instd, None, 0.5, 2.0, activation=activation)
        assert loss.device.type == grad.device.type == device
        assert_same((loss.cpu(), grad.cpu()), expected)
    x, inst, regions = make_case(21, 2, "softmax")
    expected = loss_and_grad(naive_cc_dice, x, inst, regions, activation="softmax")
    kw = dict(activation="softmax", spatial_dims=2)
    got = loss_and_grad(cc_dice, x.detach().to(device), inst.to(device), regions.to(device), **kw)
    assert_same(tuple(t.cpu() for t in got), expected)


def test_torch_compile_traces_the_scatter_path():
    """torch.compile (Dynamo, eager backend: no code generation) runs the PyTorch path, with graph
    breaks at its syncs; the fused operator brings fullgraph compilation."""
    x, inst, regions = make_case(22, 3, "sigmoid")
    compiled = torch.compile(cc_dice_ce, backend="eager")
    expected = loss_and_grad(naive_cc_dice_ce, x, inst, regions, 1.0, 1.0, squared_pred=True)
    assert_same(loss_and_grad(compiled, x, inst, regions, squared_pred=True), expected)

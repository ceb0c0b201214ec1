"""The component-wise (Voronoi) operators blob::cc_dice / blob::cc_dice_ce (issue 20).

The oracle is a loop in this file: for every (b, c) plane and every region k of it, MONAI's
``DiceLoss`` (``DiceCELoss(sigmoid=True)`` for cc_dice_ce with logits, ``DiceLoss`` +
``binary_cross_entropy`` on probabilities) on the voxels of region k, autograd for the gradient.
The regions are each voxel's nearest instance voxel of its plane by brute force (torch.cdist),
independent of blobbench.voronoi_regions; the operator accepts any valid partition.
Both paths run on the CPU: the fused kernels and the ATen composite that CUDA runs
(BLOBBENCH_CC=composite).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import devices
from helpers import LABEL_DTYPES, loss_and_grad, random_instances, rel_err
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import blobbench  # noqa: F401  (registers the operators)

monai_losses = pytest.importorskip("monai.losses")

TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4)}


def nearest_regions(instances: torch.Tensor) -> torch.Tensor:
    """Each voxel's nearest instance voxel's id in its (b, c) plane (0 in planes without any)."""
    out = torch.zeros_like(instances)
    spatial = instances.shape[2:]
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in spatial], indexing="ij"), -1)
    coords = coords.reshape(-1, len(spatial)).double()
    for b in range(instances.shape[0]):
        for c in range(instances.shape[1]):
            ids = instances[b, c].reshape(-1)
            fg = ids > 0
            if not fg.any():
                continue
            nearest = torch.cdist(coords, coords[fg]).argmin(1)
            out[b, c] = ids[fg][nearest].view(spatial)
    return out


def loop_cc(
    x,
    instances,
    regions,
    alpha=1.0,
    beta=1.0,
    *,
    ce=False,
    activation="sigmoid",
    squared_pred=False,
    smooth_nr=1e-5,
    smooth_dr=1e-5,
    lambda_dice=1.0,
    lambda_ce=1.0,
):
    """alpha * global + beta * cc with MONAI's losses, one plane and one region at a time."""
    dice_args = dict(squared_pred=squared_pred, smooth_nr=smooth_nr, smooth_dr=smooth_dr)
    dice = monai_losses.DiceLoss(include_background=True, **dice_args)
    dice_ce = monai_losses.DiceCELoss(sigmoid=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce, **dice_args)
    if activation == "sigmoid":
        p = x.sigmoid()
    elif activation == "softmax":
        p = x.softmax(1)
    else:
        p = x
    t = (instances > 0).to(x.dtype)
    if activation == "softmax":
        t = t.clone()
        t[:, 0] = (instances[:, 1:] == 0).all(1).to(x.dtype)

    def criterion(xs, ps, ts):
        xs, ps, ts = xs.view(1, 1, -1), ps.view(1, 1, -1), ts.view(1, 1, -1)
        if not ce:
            return dice(ps, ts)
        if activation == "sigmoid":
            return dice_ce(xs, ts)
        return lambda_dice * dice(ps, ts) + lambda_ce * F.binary_cross_entropy(ps, ts)

    B, C = x.shape[:2]
    global_terms = [criterion(x[b, c], p[b, c], t[b, c]) for b in range(B) for c in range(C)]
    global_loss = sum(global_terms) / len(global_terms)
    elements = []
    for b in range(B):
        planes = []
        for c in range(1 if activation == "softmax" else 0, C):
            if not (instances[b, c] > 0).any():
                continue
            reg = regions[b, c]
            terms = [criterion(x[b, c][reg == k], p[b, c][reg == k], t[b, c][reg == k]) for k in torch.unique(reg)]
            planes.append(sum(terms) / len(terms))
        if planes:
            elements.append(sum(planes) / len(planes))
    cc_loss = sum(elements) / len(elements) if elements else x.sum() * 0.0
    return alpha * global_loss + beta * cc_loss


def cc_case(seed, ce):
    """Seeded random inputs and options: 1-3 spatial dims, B, C, activation, label dtype,
    smoothing, weights; some planes without instances."""
    rng = np.random.default_rng(seed)
    ndim = int(rng.choice([1, 2, 3], p=[0.15, 0.4, 0.45]))
    spatial = {1: [int(rng.integers(8, 30))], 2: [int(rng.integers(4, 12)) for _ in range(2)]}.get(
        ndim, [int(rng.integers(3, 7)) for _ in range(3)]
    )
    activations = ["sigmoid", "none"] if ce else ["sigmoid", "softmax", "none"]
    activation = str(rng.choice(activations))
    C = int(rng.integers(2, 4)) if activation == "softmax" else int(rng.integers(1, 3))
    B = int(rng.integers(1, 4))
    dtype = LABEL_DTYPES[int(rng.integers(0, 4))]
    instances = random_instances(rng, [B, C, *spatial], 4, empty_prob=0.2, dtype=dtype)
    x = torch.from_numpy(rng.normal(0.0, 2.0, instances.shape))
    if activation == "none":
        x = torch.sigmoid(x)
    options = dict(
        activation=activation,
        squared_pred=bool(rng.integers(0, 2)),
        smooth_nr=float(rng.choice([1e-5, 0.0, 1.0])),
        smooth_dr=float(rng.choice([1e-5, 1.0])),
    )
    if ce:
        options["lambda_dice"] = float(rng.choice([1.0, 0.5, 0.0]))
        options["lambda_ce"] = float(rng.choice([1.0, 2.0, 0.3]))
    alpha, beta = float(rng.choice([1.0, 2.0, 0.0])), float(rng.choice([1.0, 0.5]))
    return x, instances, nearest_regions(instances), alpha, beta, options


def op_of(ce):
    return torch.ops.blob.cc_dice_ce if ce else torch.ops.blob.cc_dice


@pytest.fixture(params=["fused", "composite"])
def path(request, monkeypatch):
    """The fused CPU kernels, and the ATen composite that CUDA runs, here on the CPU."""
    if request.param == "composite":
        monkeypatch.setenv("BLOBBENCH_CC", "composite")
    else:
        monkeypatch.delenv("BLOBBENCH_CC", raising=False)
    return request.param


@pytest.mark.parametrize("ce", [False, True], ids=["dice", "dice_ce"])
@pytest.mark.parametrize("seed", range(24))
def test_matches_the_loop(seed, ce, path):
    x, instances, regions, alpha, beta, options = cc_case(seed, ce)
    want = loss_and_grad(loop_cc, x, instances, regions, alpha, beta, ce=ce, **options)
    dtype = torch.float64 if seed % 2 else torch.float32
    got = loss_and_grad(op_of(ce), x.to(dtype), instances, regions, alpha, beta, **options)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    tol_loss, tol_grad = TOL[dtype]
    assert rel_err(got[0], want[0]) <= tol_loss, (got[0].item(), want[0].item())
    assert rel_err(got[1], want[1]) <= tol_grad


@pytest.mark.parametrize("ce", [False, True], ids=["dice", "dice_ce"])
@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "none"])
@pytest.mark.parametrize("squared_pred", [False, True])
@pytest.mark.parametrize("spatial", [(7, 9), (4, 5, 6)], ids=["2d", "3d"])
def test_every_option_2d_3d_float64(ce, activation, squared_pred, spatial, path):
    if ce and activation == "softmax":
        pytest.skip("cc_dice_ce refuses softmax (test_errors)")
    rng = np.random.default_rng(len(spatial) * 7 + squared_pred)
    C = 3 if activation == "softmax" else 2
    instances = random_instances(rng, [2, C, *spatial], 5, empty_prob=0.25)
    x = torch.randn(instances.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    if activation == "none":
        x = x.sigmoid()
    options = dict(activation=activation, squared_pred=squared_pred, smooth_nr=0.5, smooth_dr=0.25)
    if ce:
        options.update(lambda_dice=0.7, lambda_ce=1.3)
    regions = nearest_regions(instances)
    want = loss_and_grad(loop_cc, x, instances, regions, 1.5, 0.8, ce=ce, **options)
    got = loss_and_grad(op_of(ce), x, instances, regions, 1.5, 0.8, **options)
    assert rel_err(got[0], want[0]) <= 1e-10 and rel_err(got[1], want[1]) <= 1e-10


@pytest.mark.parametrize("ce", [False, True], ids=["dice", "dice_ce"])
def test_empty_planes_and_an_empty_batch(ce, path):
    x = torch.randn(3, 2, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    instances = torch.zeros(x.shape, dtype=torch.int64)
    # no instance at all: the CC term is 0 with zero gradient, the global term stays
    want = loss_and_grad(loop_cc, x, instances, instances, 1.0, 1.0, ce=ce)
    got = loss_and_grad(op_of(ce), x, instances, instances)
    assert rel_err(got[0], want[0]) <= 1e-12 and rel_err(got[1], want[1]) <= 1e-12
    only_cc = loss_and_grad(op_of(ce), x, instances, instances, 0.0, 1.0)
    assert only_cc[0].item() == 0.0 and not only_cc[1].any()
    # one plane of one batch element with instances: the others are skipped by the CC term
    instances[1, 1, 2:4, 1:3] = 7
    instances[1, 1, 5, 6] = 2
    regions = nearest_regions(instances)
    want = loss_and_grad(loop_cc, x, instances, regions, 0.0, 1.0, ce=ce)
    got = loss_and_grad(op_of(ce), x, instances, regions, 0.0, 1.0)
    assert rel_err(got[0], want[0]) <= 1e-12 and rel_err(got[1], want[1]) <= 1e-12
    assert not got[1][0].any() and not got[1][2].any() and not got[1][1, 0].any()


@pytest.mark.parametrize("ce", [False, True], ids=["dice", "dice_ce"])
def test_the_global_term_is_the_blob_ops_one(ce):
    x, instances, regions, _, _, options = cc_case(5, ce)
    options = {k: v for k, v in options.items() if k != "activation"}
    blob = torch.ops.blob.dice_ce if ce else torch.ops.blob.dice
    want = loss_and_grad(blob, x, instances, 1.0, 0.0, **options)
    got = loss_and_grad(op_of(ce), x, instances, regions, 1.0, 0.0, **options)
    assert rel_err(got[0], want[0]) <= 1e-12 and rel_err(got[1], want[1]) <= 1e-12


@pytest.mark.parametrize("ce", [False, True], ids=["dice", "dice_ce"])
def test_label_ranges_agree(ce, path):
    """max_label exact, generous (the CPU sizes its tables by the ids present), and sparse large
    ids (compacted per plane): the same loss and gradient; the table keeps max_label's size."""
    rng = np.random.default_rng(11)
    instances = random_instances(rng, [2, 2, 6, 8, 8], 5, empty_prob=0.2)
    regions = nearest_regions(instances)
    x = torch.randn(instances.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = loss_and_grad(loop_cc, x, instances, regions, ce=ce)
    fwd = torch.ops.blob._cc_dice_ce_forward if ce else torch.ops.blob._cc_dice_forward
    lambdas = (1.0, 1.0) if ce else ()
    for max_label in (-1, int(instances.max()), 5000):
        got = loss_and_grad(op_of(ce), x, instances, regions, max_label=max_label)
        assert rel_err(got[0], want[0]) <= 1e-12 and rel_err(got[1], want[1]) <= 1e-12, max_label
        if max_label >= 0:
            _, coef, ids = fwd(x, instances, regions, 1.0, 1.0, *lambdas, "sigmoid", False, 1e-5, 1e-5, max_label)
            assert coef.shape[2] == max_label + 1 and ids.shape == (2, 2, 0)
    big_i, big_r = instances * 1_000_003, regions * 1_000_003  # beyond the dense limit: compacted
    got = loss_and_grad(op_of(ce), x, big_i, big_r)
    assert rel_err(got[0], want[0]) <= 1e-12 and rel_err(got[1], want[1]) <= 1e-12
    _, coef, ids = fwd(x, big_i, big_r, 1.0, 1.0, *lambdas, "sigmoid", False, 1e-5, 1e-5, -1)
    assert ids.shape == coef.shape[:3] and ids.dtype == big_i.dtype


def test_fused_and_composite_agree_on_the_tables(monkeypatch):
    for ce in (False, True):
        x, instances, regions, alpha, beta, options = cc_case(7, ce)
        fwd = torch.ops.blob._cc_dice_ce_forward if ce else torch.ops.blob._cc_dice_forward
        lambdas = (options.pop("lambda_dice"), options.pop("lambda_ce")) if ce else ()
        args = (x, instances, regions, alpha, beta, *lambdas, *options.values(), -1)
        monkeypatch.delenv("BLOBBENCH_CC", raising=False)
        fused = fwd(*args)
        monkeypatch.setenv("BLOBBENCH_CC", "composite")
        composite = fwd(*args)
        assert rel_err(fused[0], composite[0]) <= 1e-12 and rel_err(fused[1], composite[1]) <= 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_inputs_give_a_float32_loss(dtype, tol, path):
    x, instances, regions, alpha, beta, options = cc_case(4, True)
    want = loss_and_grad(loop_cc, x, instances, regions, alpha, beta, ce=True, **options)
    got = loss_and_grad(torch.ops.blob.cc_dice_ce, x.to(dtype), instances, regions, alpha, beta, **options)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    assert rel_err(got[0], want[0]) <= tol and rel_err(got[1], want[1]) <= 2 * tol


@pytest.mark.parametrize("ce", [False, True], ids=["dice", "dice_ce"])
def test_gradcheck_float64(ce, path):
    for seed in (1, 2, 6):
        x, instances, regions, alpha, beta, options = cc_case(seed, ce)
        x = x[:2, :, ...].contiguous()
        instances, regions = instances[:2].contiguous(), regions[:2].contiguous()
        assert torch.autograd.gradcheck(
            lambda t, i=instances, r=regions: op_of(ce)(t, i, r, alpha, beta, **options),
            (x.requires_grad_(True),),
            eps=1e-6,
            atol=1e-8,
        )


@devices
@pytest.mark.parametrize("ce", [False, True], ids=["dice", "dice_ce"])
def test_opcheck(device, ce):
    x, instances, regions, alpha, beta, options = cc_case(3, ce)
    x = x.float().to(device).requires_grad_(True)
    instances, regions = instances.to(device), regions.to(device)
    lambdas = (options["lambda_dice"], options["lambda_ce"]) if ce else ()
    fwd_op = torch.ops.blob._cc_dice_ce_forward if ce else torch.ops.blob._cc_dice_forward
    bwd_op = torch.ops.blob._cc_dice_ce_backward if ce else torch.ops.blob._cc_dice_backward
    rest = (options["activation"], options["squared_pred"], options["smooth_nr"], options["smooth_dr"])
    fwd = (x, instances, regions, alpha, beta, *lambdas, *rest)
    for max_label in (-1, int(instances.max()) + 3):
        torch.library.opcheck(fwd_op.default, fwd + (max_label,))
        torch.library.opcheck(
            op_of(ce).default, (x, instances, regions, alpha, beta), dict(options, max_label=max_label)
        )
    _, coef, ids = fwd_op(*fwd, -1)
    torch.library.opcheck(
        bwd_op.default,
        (torch.tensor(1.5, device=device), x.detach(), instances, regions, coef, ids, rest[0], rest[1]),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize("ce", [False, True], ids=["dice", "dice_ce"])
@pytest.mark.parametrize("max_label", [None, 40])
def test_torch_compile_fullgraph_equals_eager(ce, max_label):
    """Under torch.compile the private forward op (its table's size exposed, dynamic without
    max_label) with the autograd of blobbench/_ops.py; the public op with a max_label."""
    torch._dynamo.reset()
    rng = np.random.default_rng(2)
    instances = random_instances(rng, (2, 2, 5, 9, 9), 5, empty_prob=0.2)
    regions = nearest_regions(instances)
    x = torch.randn(instances.shape, generator=torch.Generator().manual_seed(2))
    lambdas = (0.5, 1.5) if ce else ()
    fwd = torch.ops.blob._cc_dice_ce_forward.default if ce else torch.ops.blob._cc_dice_forward.default
    ml = -1 if max_label is None else max_label

    def private(t, i, r):
        return fwd(t, i, r, 1.0, 2.0, *lambdas, "sigmoid", False, 1e-5, 1e-5, ml)[0]

    eager = loss_and_grad(private, x, instances, regions)
    comp = loss_and_grad(torch.compile(private, fullgraph=True), x, instances, regions)
    assert rel_err(comp[0], eager[0]) <= 1e-6 and rel_err(comp[1], eager[1]) <= 1e-6
    if max_label is not None:
        kw = dict(lambda_dice=0.5, lambda_ce=1.5) if ce else {}

        def public(t, i, r):
            return op_of(ce)(t, i, r, 1.0, 2.0, max_label=max_label, **kw)

        comp = loss_and_grad(torch.compile(public, fullgraph=True), x, instances, regions)
        assert rel_err(comp[0], eager[0]) <= 1e-6 and rel_err(comp[1], eager[1]) <= 1e-6


def test_double_backward_raises():
    x, instances, regions, *_ = cc_case(2, False)
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(torch.ops.blob.cc_dice(x, instances, regions), x, create_graph=True)
    with pytest.raises(RuntimeError, match="blob.cc_dice: double backward is not supported"):
        g.sum().backward()


# ---- bad inputs ---------------------------------------------------------------------------------


def _small():
    x = torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    instances = torch.zeros(x.shape, dtype=torch.int64)
    instances[0, 0, 1:3, 1:3] = 4
    instances[0, 0, 4:6, 4:6] = 9
    instances[1, 1, 0, 0] = 1
    return x, instances, nearest_regions(instances)


@pytest.mark.parametrize("ce", [False, True], ids=["dice", "dice_ce"])
@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda i, r: (i, r[:, :1]), ValueError, r"`regions` must have the shape of `instances` \(B, C, \*spatial\), got regions \(2, 1, 6, 6\) and instances \(2, 2, 6, 6\)"),
        (lambda i, r: (i, r.int()), TypeError, r"`regions` must have the dtype of `instances`, got regions Int and instances Long"),
        (lambda i, r: (i, r.to("meta")), ValueError, r"`regions` and `instances` must be on the same device, got regions on meta and instances on cpu"),
    ],
    ids=["shape", "dtype", "device"],
)
def test_regions_metadata_errors_and_their_fake_twins(ce, change, error, match):
    x, instances, regions = _small()
    instances, regions = change(instances, regions)
    name = "cc_dice_ce" if ce else "cc_dice"
    with pytest.raises(error, match=rf"^blob\.{name}: {match}$"):
        op_of(ce)(x, instances, regions)
    if regions.device.type == "meta":
        return
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        with pytest.raises(error, match=rf"^blob\.{name}: {match}$"):
            op_of(ce)(mode.from_tensor(x), mode.from_tensor(instances), mode.from_tensor(regions))


def _set(t, index, value):
    t = t.clone()
    t[index] = value
    return t


@pytest.mark.parametrize("ce", [False, True], ids=["dice", "dice_ce"])
@pytest.mark.parametrize(
    "change,match",
    [
        (
            lambda i, r: (i, _set(r, (0, 0, 0, 5), 0)),
            r"`regions` holds 0 \(no region\) in plane \(b = 0, c = 0\), which has instances",
        ),
        (
            lambda i, r: (i, _set(r, (1, 0, 3, 3), 5)),
            r"`regions` holds region id 5 in plane \(b = 1, c = 0\) where `instances` has no voxel with that id",
        ),
        (
            lambda i, r: (i, _set(r, (0, 0, 1, 1), 9)),
            r"`regions` must give every instance voxel its own id .*found instances = 4 but regions = 9 at \(0, 0, 1, 1\)",
        ),
        (
            lambda i, r: (i, _set(r, (0, 1, 2, 2), -3)),
            r"`regions` must be >= 0 \(0 = background\), found a negative id \(the smallest is -3\)",
        ),
        (
            lambda i, r: (_set(i, (1, 0, 2, 2), -2), r),
            r"`instances` must be >= 0 \(0 = background\), found a negative id \(the smallest is -2\)",
        ),
    ],
    ids=["zero-region", "region-without-instance", "instance-in-other-region", "negative-region", "negative-instance"],
)
@pytest.mark.parametrize("max_label", [-1, 12])
def test_bad_region_maps_raise_naming_the_argument(ce, change, match, max_label, path):
    x, instances, regions = _small()
    instances, regions = change(instances, regions)
    name = "cc_dice_ce" if ce else "cc_dice"
    with pytest.raises(ValueError, match=rf"^blob\.{name}: {match}"):
        op_of(ce)(x, instances, regions, max_label=max_label)


def test_region_id_above_max_label_and_the_compacted_path(path):
    x, instances, regions = _small()
    with pytest.raises(
        ValueError,
        match=r"^blob\.cc_dice: `regions` holds an id above max_label \(the largest is 9, max_label = 5\)$",
    ):
        torch.ops.blob.cc_dice(x, instances, regions, max_label=5)
    big_i, big_r = instances * 1_000_003, regions * 1_000_003
    with pytest.raises(ValueError, match=r"found instances = 4000012 but regions = 9000027 at \(0, 0, 1, 1\)"):
        torch.ops.blob.cc_dice(x, big_i, _set(big_r, (0, 0, 1, 1), 9_000_027))
    with pytest.raises(ValueError, match=r"`regions` holds region id 5000015 in plane \(b = 1, c = 0\)"):
        torch.ops.blob.cc_dice(x, big_i, _set(big_r, (1, 0, 3, 3), 5_000_015))


@pytest.mark.parametrize(
    "op,kwargs,match",
    [
        ("cc_dice_ce", dict(activation="softmax"), r'blob.cc_dice_ce: activation="softmax" is not supported'),
        ("cc_dice_ce", dict(lambda_ce=-1.0), r"blob.cc_dice_ce: `lambda_dice` and `lambda_ce` must be >= 0, got 1.000000 and -1.000000"),
        ("cc_dice", dict(activation="relu"), r'blob.cc_dice: `activation` must be one of "sigmoid", "softmax" or "none"'),
        ("cc_dice", dict(max_label=-2), r"blob.cc_dice: `max_label` must be -1 \(find it\) or an upper bound"),
    ],
)
def test_option_errors_and_their_fake_twins(op, kwargs, match):
    x, instances, regions = _small()
    with pytest.raises(ValueError, match=match):
        getattr(torch.ops.blob, op)(x, instances, regions, **kwargs)
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        with pytest.raises(ValueError, match=match):
            getattr(torch.ops.blob, op)(mode.from_tensor(x), mode.from_tensor(instances), mode.from_tensor(regions), **kwargs)


def test_probabilities_outside_0_1_raise(path):
    x, instances, regions = _small()
    with pytest.raises(ValueError, match=r'blob.cc_dice_ce: with activation="none" `input` must hold probabilities in \[0, 1\]'):
        torch.ops.blob.cc_dice_ce(x, instances, regions, activation="none")


def test_nan_input_gives_a_nan_loss(path):
    x, instances, regions = _small()
    x[0, 0, 0, 0] = float("nan")
    assert torch.isnan(torch.ops.blob.cc_dice(x, instances, regions))
    assert torch.isnan(torch.ops.blob.cc_dice_ce(x, instances, regions))

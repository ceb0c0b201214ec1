"""Blob Dice+CE (issue 13): the fused operator against the paper's loop with MONAI's DiceCELoss.

The oracle is ``naive_blob_dice_ce`` (blobbench/reference.py): the loop, with MONAI's
``DiceCELoss(sigmoid=True)`` as the criterion of the global term and of official masking, and
Dice + ``binary_cross_entropy`` on the masked probabilities for paper masking.
"""

import itertools

import numpy as np
import pytest
import torch
from conftest import HAVE_CUDA, devices
from helpers import loss_and_grad, random_case, random_instances, rel_err, with_spatial_dims
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import blobbench
from blobbench import BlobDiceCELoss, naive_blob_dice_ce

blob_dice_ce = with_spatial_dims(blobbench.blob_dice_ce)

# The tolerances: float64 to 1e-9, float32 to 1e-4 (relative, against the float64 loop).
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4)}
N_CASES = 120


def dice_ce_case(seed):
    """random_case's inputs and options, with softmax (refused here) turned into sigmoid and the
    lambdas drawn too."""
    x, instances, alpha, beta, options = random_case(seed)
    if options["activation"] == "softmax":
        options["activation"] = "sigmoid"
    rng = np.random.default_rng(10_000 + seed)
    options["lambda_dice"] = float(rng.choice([1.0, 0.5, 0.0]))
    options["lambda_ce"] = float(rng.choice([1.0, 2.0, 0.3]))
    return x, instances, alpha, beta, options


@pytest.fixture(params=["fused", "composite"])
def path(request, monkeypatch):
    """The fused CPU kernels, and the composite (Dice kernels + ATen cross-entropy + host
    finalisation) that devices without fused Dice+CE kernels run, here on the CPU."""
    if request.param == "composite":
        monkeypatch.setenv("BLOBBENCH_DICE_CE", "composite")
    else:
        monkeypatch.delenv("BLOBBENCH_DICE_CE", raising=False)
    return request.param


@pytest.mark.parametrize("seed", range(N_CASES))
def test_matches_naive_loop_with_monai_dice_ce(seed, path):
    x, instances, alpha, beta, options = dice_ce_case(seed)
    want_loss, want_grad = loss_and_grad(naive_blob_dice_ce, x.double(), instances, alpha, beta, **options)
    dtype = torch.float64 if seed % 2 else torch.float32
    loss, grad = loss_and_grad(blob_dice_ce, x.to(dtype), instances, alpha, beta, **options)
    assert loss.dtype == dtype and grad.dtype == dtype
    tol_loss, tol_grad = TOL[dtype]
    assert rel_err(loss, want_loss) <= tol_loss, (loss.item(), want_loss.item())
    assert rel_err(grad, want_grad) <= tol_grad


@pytest.mark.parametrize(
    "masking,activation,squared_pred",
    list(itertools.product(["paper", "official"], ["sigmoid", "none"], [False, True])),
)
def test_every_option_at_float64(masking, activation, squared_pred, path):
    rng = np.random.default_rng(3)
    instances = random_instances(rng, (3, 2, 5, 7, 6), 5, empty_prob=0.2)
    x = torch.randn(instances.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    if activation == "none":
        x = torch.sigmoid(x)
    opts = dict(masking=masking, activation=activation, squared_pred=squared_pred, lambda_dice=0.7, lambda_ce=1.3)
    want = loss_and_grad(naive_blob_dice_ce, x, instances, 2.0, 1.0, **opts)
    got = loss_and_grad(blob_dice_ce, x, instances, 2.0, 1.0, **opts)
    assert rel_err(got[0], want[0]) <= 1e-9 and rel_err(got[1], want[1]) <= 1e-9


def test_saturated_logits_follow_torchs_clamps(path):
    # Logits whose sigmoid is exactly 0 or 1 in float64: binary_cross_entropy clamps its logs at
    # -100 (paper masking), BCEWithLogits stays exact (global term, official masking), and the
    # gradient follows torch's (p - y) / max(p (1 - p), eps).
    values = torch.tensor([-200.0, -50.0, -3.0, 0.0, 3.0, 50.0, 200.0], dtype=torch.float64)
    x = values[torch.randint(0, 7, (2, 1, 4, 5, 6), generator=torch.Generator().manual_seed(5))]
    instances = torch.zeros(x.shape, dtype=torch.int64)
    instances[0, 0, :2, :2, :3] = 1
    instances[0, 0, 2:, 3:, 2:] = 2
    instances[1, 0, 1:3, 1:4, 1:5] = 7
    for masking in ("paper", "official"):
        want = loss_and_grad(naive_blob_dice_ce, x, instances, masking=masking)
        got = loss_and_grad(blob_dice_ce, x, instances, masking=masking)
        assert torch.isfinite(want[0]) and rel_err(got[0], want[0]) <= 1e-12
        assert rel_err(got[1], want[1]) <= 1e-12


def test_saturated_logits_in_float32_follow_torchs_float32(path):
    # The float32 kernels (polynomial exp and log) against the loop run in float32, where torch's
    # sigmoid saturates to exactly 0 or 1 and binary_cross_entropy's clamp decides the value.
    values = torch.tensor([-200.0, -50.0, -20.0, -3.0, 0.0, 3.0, 20.0, 50.0, 200.0])
    x = values[torch.randint(0, 9, (2, 1, 4, 5, 6), generator=torch.Generator().manual_seed(6))]
    instances = torch.zeros(x.shape, dtype=torch.int32)
    instances[0, 0, :2, :2, :3] = 1
    instances[1, 0, 1:3, 1:4, 1:5] = 3
    for masking in ("paper", "official"):
        want = loss_and_grad(naive_blob_dice_ce, x, instances, masking=masking)
        got = loss_and_grad(blob_dice_ce, x, instances, masking=masking)
        assert rel_err(got[0], want[0]) <= 1e-5 and rel_err(got[1], want[1]) <= 1e-5


def test_lambda_dice_only_is_blob_dice_and_lambda_ce_adds_a_bce(path):
    x, instances, alpha, beta, options = dice_ce_case(4)
    options.update(lambda_dice=1.0, lambda_ce=0.0)
    dice_options = {k: v for k, v in options.items() if not k.startswith("lambda")}
    dice = with_spatial_dims(blobbench.blob_dice)(x, instances, alpha, beta, **dice_options)
    assert rel_err(blob_dice_ce(x, instances, alpha, beta, **options), dice) <= 1e-12
    # The global term alone (beta = 0) with lambda_dice = 0 is torch's BCE with logits, mean over
    # all voxels and channels: no MONAI involved.
    x = torch.randn(3, 2, 5, 6, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    inst = random_instances(np.random.default_rng(4), x.shape, 4)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, (inst > 0).double())
    got = blob_dice_ce(x, inst, 0.7, 0.0, lambda_dice=0.0, lambda_ce=1.0)
    assert rel_err(got, 0.7 * bce) <= 1e-12


@pytest.mark.parametrize("logit", [-8.0, -12.0, -16.0])
@pytest.mark.parametrize("case", ["none", "paper"])
def test_confident_background_in_float32(logit, case, path):
    # The BCE of a background voxel with a small p is log1p(-p) (as torch computes it), not
    # log(1 - p), which loses p's low bits in float32: one confident blob, confident background.
    inst = torch.zeros(2, 1, 24, 24, dtype=torch.int64)
    inst[0, 0, 5:9, 5:9] = 1
    inst[1, 0, 12:15, 3:8] = 2
    noise = torch.rand(inst.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = torch.where(inst > 0, 2.0, logit) + noise  # the blobs unsaturated: float32 p near 1 is coarse
    opts = dict(lambda_dice=0.0) if case == "paper" else dict(activation="none", lambda_dice=0.0)
    if case == "none":
        x = torch.sigmoid(x)
    for alpha, beta in ((2.0, 1.0), (0.0, 1.0)):
        want = loss_and_grad(naive_blob_dice_ce, x, inst, alpha, beta, **opts)
        got = loss_and_grad(blob_dice_ce, x.float(), inst, alpha, beta, **opts)
        assert rel_err(got[0], want[0]) <= 1e-4 and rel_err(got[1], want[1]) <= 1e-4


def test_probabilities_outside_0_1_raise_on_the_cpu(path):
    inst = torch.zeros(1, 1, 8, 8, dtype=torch.int64)
    inst[0, 0, 2:4, 2:4] = 1
    for bad in (1.5, -0.25):
        p = torch.full((1, 1, 8, 8), 0.2)
        p[0, 0, 0, 0] = bad
        with pytest.raises(
            ValueError, match=r'blob.dice_ce: with activation="none" `input` must hold probabilities in \[0, 1\]'
        ):
            blobbench.blob_dice_ce(p, inst, activation="none", spatial_dims=2)
    # NaN is not out of range: it propagates, as everywhere (no hidden check)
    p = torch.full((1, 1, 8, 8), 0.2)
    p[0, 0, 0, 0] = float("nan")
    assert torch.isnan(blobbench.blob_dice_ce(p, inst, activation="none", spatial_dims=2))


def test_compacted_and_bounded_label_ranges(path):
    rng = np.random.default_rng(8)
    instances = random_instances(rng, (2, 2, 6, 9, 9), 6, sparse_ids=True, dtype=torch.int64, empty_prob=0.0)
    x = torch.randn(instances.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    want = loss_and_grad(naive_blob_dice_ce, x, instances)
    for max_label in (None, int(instances.max()), 2**62):
        got = loss_and_grad(blob_dice_ce, x, instances, max_label=max_label)
        assert rel_err(got[0], want[0]) <= 1e-9 and rel_err(got[1], want[1]) <= 1e-9
    small = instances.clamp(max=5)
    want = loss_and_grad(naive_blob_dice_ce, x, small)
    got = loss_and_grad(blob_dice_ce, x, small, max_label=5)
    assert rel_err(got[0], want[0]) <= 1e-9 and rel_err(got[1], want[1]) <= 1e-9


def test_fused_and_composite_agree_on_the_coefficient_table(monkeypatch):
    x, instances, alpha, beta, options = dice_ce_case(6)
    args = (
        x,
        instances,
        alpha,
        beta,
        options["lambda_dice"],
        options["lambda_ce"],
        options["activation"],
        options["masking"],
        options["squared_pred"],
        options["smooth_nr"],
        options["smooth_dr"],
        -1,
    )
    fused = torch.ops.blob._dice_ce_forward(*args)
    monkeypatch.setenv("BLOBBENCH_DICE_CE", "composite")
    composite = torch.ops.blob._dice_ce_forward(*args)
    assert fused[1].shape[-1] == 4
    for a, b in zip(fused, composite):
        assert a.shape == b.shape
    assert rel_err(fused[0], composite[0]) <= 1e-12 and rel_err(fused[1], composite[1]) <= 1e-12


@devices
def test_gradcheck_float64(device, path):
    if device == "cuda" and path == "composite":
        pytest.skip("CUDA always runs the composite")
    for seed in (1, 2, 5, 8):
        x, instances, alpha, beta, options = dice_ce_case(seed)
        x = x.to(device).requires_grad_(True)
        inst = instances.to(device)
        assert torch.autograd.gradcheck(
            lambda t, inst=inst, a=alpha, b=beta, o=options: blob_dice_ce(t, inst, a, b, **o),
            (x,),
            eps=1e-6,
            atol=1e-8,
        )


@devices
def test_opcheck(device):
    for seed in (1, 4):
        x, instances, alpha, beta, options = dice_ce_case(seed)
        x = x.float().to(device).requires_grad_(True)
        inst = instances.to(device)
        fwd = (
            x,
            inst,
            alpha,
            beta,
            options["lambda_dice"],
            options["lambda_ce"],
            options["activation"],
            options["masking"],
            options["squared_pred"],
            options["smooth_nr"],
            options["smooth_dr"],
        )
        for max_label in (-1, int(instances.max()) + 3):
            torch.library.opcheck(torch.ops.blob._dice_ce_forward.default, fwd + (max_label,))
            torch.library.opcheck(
                torch.ops.blob.dice_ce.default, (x, inst, alpha, beta), dict(options, max_label=max_label)
            )
        _, coef, ids = torch.ops.blob._dice_ce_forward(*fwd, -1)
        torch.library.opcheck(
            torch.ops.blob._dice_ce_backward.default,
            (
                torch.tensor(1.5, device=device),
                x.detach(),
                inst,
                coef,
                ids,
                options["activation"],
                options["squared_pred"],
            ),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )


@devices
@pytest.mark.parametrize("max_label", [None, 40])
def test_torch_compile_fullgraph_equals_eager(device, max_label):
    torch._dynamo.reset()
    rng = np.random.default_rng(2)
    instances = random_instances(rng, (2, 1, 6, 16, 16), 6, empty_prob=0.0).to(device)
    x = torch.randn(instances.shape, generator=torch.Generator().manual_seed(2)).to(device)
    module = BlobDiceCELoss(max_label=max_label, lambda_ce=0.5)
    eager = loss_and_grad(module, x, instances)
    comp = loss_and_grad(torch.compile(module, fullgraph=True), x, instances)
    assert rel_err(comp[0], eager[0]) <= 1e-6 and rel_err(comp[1], eager[1]) <= 1e-6


@devices
@pytest.mark.parametrize("seed", range(0, N_CASES, 10))
def test_device_matches_cpu_and_naive_loop(device, seed):
    x, instances, alpha, beta, options = dice_ce_case(seed)
    want_loss, want_grad = loss_and_grad(naive_blob_dice_ce, x.double(), instances, alpha, beta, **options)
    for dtype in (torch.float32, torch.float64):
        loss, grad = loss_and_grad(blob_dice_ce, x.to(device, dtype), instances.to(device), alpha, beta, **options)
        assert loss.device.type == device
        tol_loss, tol_grad = TOL[dtype]
        assert rel_err(loss, want_loss) <= tol_loss and rel_err(grad, want_grad) <= tol_grad


@devices
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_inputs_give_a_float32_loss(device, dtype, tol, path):
    x, instances, alpha, beta, options = dice_ce_case(3)
    want_loss, want_grad = loss_and_grad(naive_blob_dice_ce, x.double(), instances, alpha, beta, **options)
    loss, grad = loss_and_grad(blob_dice_ce, x.to(device, dtype), instances.to(device), alpha, beta, **options)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert rel_err(loss, want_loss) <= tol and rel_err(grad, want_grad) <= 2 * tol


@devices
def test_id_above_max_label(device):
    x, instances, *_ = dice_ce_case(2)
    instances = instances.to(device)
    instances.view(-1)[0] = 50
    x = x.to(device)
    if device == "cpu":
        largest = int(instances.max())  # at least the 50 set above
        with pytest.raises(
            ValueError,
            match=rf"^blob\.dice_ce: `instances` holds an id above max_label \(the largest is {largest}, max_label = 10\)$",
        ):
            blobbench.blob_dice_ce(x, instances, max_label=10, spatial_dims=x.dim() - 2)
    else:  # no sync to raise: NaN, loss and gradient
        x.requires_grad_(True)
        loss = blobbench.blob_dice_ce(x, instances, max_label=10, spatial_dims=x.dim() - 2)
        loss.backward()
        assert torch.isnan(loss) and torch.isnan(x.grad).all()
    p = torch.sigmoid(x.detach())
    p.view(-1)[1] = 1.5
    if device == "cuda":  # probabilities outside [0, 1]: NaN on CUDA (the CPU raises, above)
        assert torch.isnan(
            blobbench.blob_dice_ce(p, instances.clamp(max=10), activation="none", spatial_dims=x.dim() - 2)
        )


def _small():
    x = torch.randn(2, 1, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    inst = torch.zeros(x.shape, dtype=torch.int64)
    inst[0, 0, 1:3, 1:3, 1:3] = 1
    return x, inst


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(activation="softmax"), r'blob.dice_ce: activation="softmax" is not supported'),
        (dict(lambda_ce=-1.0), r"blob.dice_ce: `lambda_dice` and `lambda_ce` must be >= 0, got 1.000000 and -1.000000"),
        (dict(masking="exact"), r'blob.dice_ce: `masking` must be "paper" or "official", got "exact"'),
        (dict(activation="relu"), r'blob.dice_ce: `activation` must be one of "sigmoid", "softmax" or "none"'),
    ],
)
def test_errors_and_their_fake_kernel_twins(kwargs, match):
    x, inst = _small()
    x2, inst2 = torch.cat([x, x], 1), torch.cat([inst, inst], 1)
    with pytest.raises(ValueError, match=match):
        torch.ops.blob.dice_ce(x2, inst2, **kwargs)
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        with pytest.raises(ValueError, match=match):
            torch.ops.blob.dice_ce(mode.from_tensor(x2), mode.from_tensor(inst2), **kwargs)


def test_module_monai_arguments_and_errors():
    x, inst = _small()
    got = BlobDiceCELoss(sigmoid=True, lambda_dice=0.5, lambda_ce=2.0)(x, inst)
    assert torch.equal(got, blobbench.blob_dice_ce(x, inst, lambda_dice=0.5, lambda_ce=2.0))
    p = torch.sigmoid(x)
    assert torch.equal(BlobDiceCELoss(sigmoid=False)(p, inst), blobbench.blob_dice_ce(p, inst, activation="none"))
    x2, inst2 = torch.cat([x, x], 1), torch.cat([inst, inst * 2], 1)
    assert torch.equal(BlobDiceCELoss(include_background=False)(x2, inst2), blobbench.blob_dice_ce(x, inst * 2))
    with pytest.raises(ValueError, match="BlobDiceCELoss: softmax is not supported"):
        BlobDiceCELoss(softmax=True)
    with pytest.raises(ValueError, match="BlobDiceCELoss: reduction must be 'mean'"):
        BlobDiceCELoss(reduction="sum")
    with pytest.raises(ValueError, match="BlobDiceCELoss: lambda_dice and lambda_ce must be >= 0"):
        BlobDiceCELoss(lambda_dice=-0.1)
    assert "lambda_ce=1.0" in repr(BlobDiceCELoss())


def test_python_defaults_are_the_schema_defaults():
    import inspect

    params = inspect.signature(blobbench.blob_dice_ce).parameters
    schema = {
        a.name: a.default_value for a in torch.ops.blob.dice_ce.default._schema.arguments if a.has_default_value()
    }
    assert set(schema) >= {"lambda_dice", "lambda_ce", "max_label"}
    for name, default in schema.items():
        py = params[name].default
        assert (-1 if name == "max_label" and py is None else py) == default, name


def test_double_backward_raises():
    x, inst = _small()
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(blobbench.blob_dice_ce(x, inst), x, create_graph=True)
    with pytest.raises(RuntimeError, match="blob.dice_ce: double backward is not supported"):
        g.sum().backward()


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device and a CUDA build of blobbench")
@pytest.mark.parametrize("masking", ["paper", "official"])
def test_cuda_max_label_means_no_host_sync(masking):
    # The CUDA composite finalises on the device (ATen ops on the tables): no sync with max_label.
    rng = np.random.default_rng(1)
    instances = random_instances(rng, (2, 2, 8, 32, 32), 12, empty_prob=0.0).cuda()
    x = torch.randn(instances.shape, generator=torch.Generator().manual_seed(1)).cuda().requires_grad_(True)
    max_label = int(instances.max())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = blobbench.blob_dice_ce(x, instances, masking=masking, max_label=max_label)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = loss_and_grad(naive_blob_dice_ce, x.detach().double().cpu(), instances.cpu(), masking=masking)
    assert rel_err(loss, want[0]) <= 1e-4 and rel_err(x.grad, want[1]) <= 1e-4

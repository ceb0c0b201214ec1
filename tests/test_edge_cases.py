"""Edge cases of the operators: every input gets a right answer or a clear error (issue 11).

In the style of pytorch_scatter's ``test_zero_tensors``: each case is small and says what it
checks. Answers are compared with the paper's loop (MONAI) or with the same loss on relabelled
ids; errors must name the op and the argument.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import devices
from helpers import loss_and_grad, random_instances, rel_err
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import blobbench
from blobbench import blob_dice, blob_tversky, naive_blob_dice

INT64_MAX = 2**63 - 1


def _case(device="cpu", shape=(2, 1, 4, 8, 8), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    lab = torch.zeros(shape, dtype=torch.int64)
    lab[0, :, 1:3, 1:4, 1:4] = 1
    lab[0, :, 2:4, 5:8, 5:8] = 2
    lab[-1, :, 0:2, 0:2, 0:3] = 3
    return x.to(device), lab.to(device)


def _fwd(x, lab, max_label=-1, activation="sigmoid"):
    return torch.ops.blob._dice_forward(x, lab, 2.0, 1.0, activation, "paper", False, 1e-5, 1e-5, max_label)


# ---- 1. the backward ops validate what they read ------------------------------------------


def _backward_args(device="cpu"):
    x, lab = _case(device)
    _, coef, ids = _fwd(x, lab)
    return dict(grad=torch.tensor(1.0, device=device), input=x, instances=lab, coef=coef, label_ids=ids)


BAD_BACKWARD = {
    # the case: a 4-element view of a larger buffer handed as `instances`
    "instances view of a larger buffer": (
        lambda a: dict(a, instances=torch.zeros(65536, dtype=torch.int64)[:4].view(1, 1, 2, 2)),
        ValueError,
        r"`instances` must have the shape of `input`",
    ),
    "float instances": (
        lambda a: dict(a, instances=a["instances"].float()),
        TypeError,
        r"`instances` must hold integer instance ids",
    ),
    "label_ids of another dtype": (
        lambda a: dict(a, label_ids=a["label_ids"].int()),
        ValueError,
        r"`label_ids` must be the \(B, C, K\)",
    ),
    "label_ids of another layout": (
        lambda a: dict(a, label_ids=a["instances"].new_empty(0)),
        ValueError,
        r"`label_ids` must be the \(B, C, K\)",
    ),
    "coef of another batch": (
        lambda a: dict(a, coef=a["coef"][:1]),
        ValueError,
        r"`coef` must be the \(B, C, K, 2\) float64 table",
    ),
    "coef in float32": (
        lambda a: dict(a, coef=a["coef"].float()),
        ValueError,
        r"`coef` must be the \(B, C, K, 2\) float64 table",
    ),
    "grad not a scalar": (
        lambda a: dict(a, grad=torch.ones(2, dtype=torch.float64)),
        ValueError,
        r"`grad` must be a floating scalar",
    ),
    "empty input": (
        lambda a: dict(a, input=a["input"][:0], instances=a["instances"][:0]),
        ValueError,
        r"`input` must not be empty",
    ),
}


def _call_backward(op, a):
    if op == "dice":
        return torch.ops.blob._dice_backward(
            a["grad"], a["input"], a["instances"], a["coef"], a["label_ids"], "sigmoid", False
        )
    return torch.ops.blob._tversky_backward(a["grad"], a["input"], a["instances"], a["coef"], a["label_ids"], "sigmoid")


@pytest.mark.parametrize("op", ["dice", "tversky"])
@pytest.mark.parametrize("case", list(BAD_BACKWARD))
def test_backward_ops_validate_every_argument(op, case):
    bad, exc, match = BAD_BACKWARD[case]
    args = bad(_backward_args())
    with pytest.raises(exc, match=rf"blob\.{op} \(backward\): " + match):
        _call_backward(op, args)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and blobbench.has_cuda_kernels()),
    reason="needs a CUDA device and a CUDA build of blobbench",
)
@pytest.mark.cuda
def test_backward_ops_reject_tensors_on_other_devices():
    a = _backward_args("cuda")
    for key in ("instances", "coef", "label_ids", "grad"):
        with pytest.raises(ValueError, match=r"device"):
            _call_backward("dice", dict(a, **{key: a[key].cpu()}))


# ---- 1 and 9. the fake kernels enforce the same rules as the C++ checks -------------------

BAD_FORWARD = {
    "float instances": lambda x, lab: (x, lab.float(), {}),
    "integer input": lambda x, lab: (x.int(), lab, {}),
    "too few dims": lambda x, lab: (x[:, :, 0, 0, 0], lab[:, :, 0, 0, 0], {}),
    "shape mismatch": lambda x, lab: (x, lab[:, :, :3], {}),
    "empty batch": lambda x, lab: (x[:0], lab[:0], {}),
    "empty spatial dim": lambda x, lab: (x[:, :, :0], lab[:, :, :0], {}),
    "softmax with one channel": lambda x, lab: (x, lab, dict(activation="softmax")),
    "official masking with softmax": lambda x, lab: (
        torch.cat([x, x], 1),
        torch.cat([lab, lab], 1),
        dict(activation="softmax", masking="official"),
    ),
    "unknown activation": lambda x, lab: (x, lab, dict(activation="relu")),
    "unknown masking": lambda x, lab: (x, lab, dict(masking="exact")),
    "max_label below -1": lambda x, lab: (x, lab, dict(max_label=-2)),
}


def _error_of(fn):
    try:
        fn()
    except (TypeError, ValueError, RuntimeError) as e:
        return type(e), str(e).split("\n")[0]
    return None


@pytest.mark.parametrize("op", ["dice", "tversky", "dice_ce", "label_stats"])
@pytest.mark.parametrize("case", list(BAD_FORWARD))
def test_fake_kernels_raise_what_the_kernels_raise(op, case):
    x, lab = _case(dtype=torch.float32)
    x, lab, kw = BAD_FORWARD[case](x, lab)
    if op == "label_stats" and "masking" in kw:
        pytest.skip("label_stats has no masking")
    call = {
        "dice": lambda a, b: torch.ops.blob.dice(a, b, **kw),
        "tversky": lambda a, b: torch.ops.blob.tversky(a, b, **kw),
        "dice_ce": lambda a, b: torch.ops.blob.dice_ce(a, b, **kw),
        "label_stats": lambda a, b: torch.ops.blob.label_stats(a, b, **kw),
    }[op]
    real = _error_of(lambda: call(x, lab))
    assert real is not None, "the kernel accepted a bad input"
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fx, flab = mode.from_tensor(x), mode.from_tensor(lab)
        fake = _error_of(lambda: call(fx, flab))
    assert fake == real


def test_empty_batch_fails_when_traced_not_at_run_time():
    # The C++ checks reject B = 0; the fakes must too, so a compiled graph cannot trace and
    # then fail at run time.
    x, lab = _case()
    with pytest.raises(
        (ValueError, torch._dynamo.exc.TorchRuntimeError), match=r"blob\.dice: `input` must not be empty"
    ):
        torch.compile(lambda a, b: blob_dice(a, b, max_label=3), fullgraph=True)(x[:0], lab[:0])


# ---- 2. int64 limits ------------------------------------------------------------------------


@devices
def test_largest_int64_id_is_an_ordinary_sparse_id(device):
    x, lab = _case(device)
    huge = lab.clone()
    huge[lab == 3] = INT64_MAX
    want = loss_and_grad(blob_dice, x, lab)
    got = loss_and_grad(blob_dice, x, huge)
    assert rel_err(got[0], want[0]) <= 1e-14 and rel_err(got[1], want[1]) <= 1e-12


@devices
def test_largest_int64_max_label_with_small_ids(device):
    x, lab = _case(device)
    want = loss_and_grad(blob_dice, x, lab)
    got = loss_and_grad(blob_dice, x, lab, max_label=INT64_MAX)
    assert rel_err(got[0], want[0]) <= 1e-14 and rel_err(got[1], want[1]) <= 1e-12


def test_max_label_zero_rejects_id_one():
    x, lab = _case()
    with pytest.raises(
        ValueError,
        match=r"^blob\.dice: `instances` holds an id above max_label \(the largest is 1, max_label = 0\)$",
    ):
        blob_dice(x, lab.clamp(max=1), max_label=0)
    # and with only background it is a valid bound
    assert torch.isfinite(blob_dice(x, torch.zeros_like(lab), max_label=0))


# ---- 3. a generous max_label keeps the dense table (no compaction, no sync) -----------------


@devices
def test_generous_max_label_stays_dense_and_exact(device):
    rng = np.random.default_rng(3)
    lab = random_instances(rng, (2, 1, 16, 16, 16), 40, empty_prob=0.0, dtype=torch.int64).to(device)
    x = torch.randn(lab.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device)
    _, coef, ids = _fwd(x, lab, max_label=10**6)
    assert ids.shape == (2, 1, 0), "a caller-bounded table under the budget must not compact"
    assert coef.shape[2] == 10**6 + 1
    want = loss_and_grad(blob_dice, x, lab)
    got = loss_and_grad(blob_dice, x, lab, max_label=10**6)
    # On CUDA the large table takes the atomics path: another summation order, float64 rounding.
    assert rel_err(got[0], want[0]) <= 1e-12 and rel_err(got[1], want[1]) <= 1e-10


@devices
def test_max_label_beyond_the_table_budget_compacts(device):
    x, lab = _case(device)
    _, coef, ids = _fwd(x, lab, max_label=10**12)
    if device == "cpu":  # a sync costs nothing: the ids present decide, as without max_label
        assert ids.shape == (2, 1, 0) and coef.shape[2] == int(lab.max()) + 1
    else:
        assert ids.shape[2] == coef.shape[2] > 0  # compacted: documented to sync
    assert rel_err(blob_dice(x, lab, max_label=10**12), blob_dice(x, lab)) <= 1e-12


def _generous_case(activation):
    rng = np.random.default_rng(7)
    C = 3 if activation == "softmax" else 2
    lab = random_instances(rng, (2, C, 6, 12, 12), 8, empty_prob=0.0, dtype=torch.int32)
    x = torch.randn(lab.shape, generator=torch.Generator().manual_seed(7))
    if activation == "none":
        x = x.sigmoid()
    read = lab[:, 1:] if activation == "softmax" else lab
    return x, lab, int(read.max())


# max_label=10**6: a dense table the CPU sizes by the ids present; 10**12: beyond the budget.
@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "none"])
@pytest.mark.parametrize("generous", [10**6, 10**12])
def test_generous_max_label_gives_the_exact_bits_on_cpu(activation, generous):
    x, lab, exact = _generous_case(activation)
    losses = [(blob_dice, {}), (blob_tversky, {})]
    if activation != "softmax":
        losses.append((blobbench.blob_dice_ce, dict(lambda_ce=0.7)))
    for fn, opts in losses:
        opts = dict(opts, activation=activation, spatial_dims=3)
        want = loss_and_grad(fn, x, lab, max_label=exact, **opts)
        got = loss_and_grad(fn, x, lab, max_label=generous, **opts)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), fn.__name__
    if activation == "sigmoid":
        oracle = loss_and_grad(naive_blob_dice, x.double(), lab)
        got = loss_and_grad(blob_dice, x.double(), lab, max_label=generous, spatial_dims=3)
        assert rel_err(got[0], oracle[0]) <= 1e-10 and rel_err(got[1], oracle[1]) <= 1e-8


def test_generous_max_label_keeps_the_table_sizes_on_cpu():
    """The tables keep max_label's size (what the fake kernels promise torch.compile); the rows of
    ids above every id present are zero."""
    x, lab, exact = _generous_case("sigmoid")
    _, coef, ids = _fwd(x, lab, max_label=10**6)
    _, want, _ = _fwd(x, lab, max_label=exact)
    assert coef.shape == (2, 2, 10**6 + 1, 2) and ids.shape == (2, 2, 0)
    assert torch.equal(coef[:, :, : exact + 1], want) and not coef[:, :, exact + 1 :].any()
    stats, _ = torch.ops.blob.label_stats(x, lab, max_label=10**6)
    want, _ = torch.ops.blob.label_stats(x, lab, max_label=exact)
    assert stats.shape == (2, 2, 10**6 + 1, 3)
    assert torch.equal(stats[:, :, : exact + 1], want) and not stats[:, :, exact + 1 :].any()


# ---- 4. compaction is per (b, c) plane ----------------------------------------------------------


def test_compaction_sizes_tables_per_plane():
    B, per_plane = 8, 50
    rng = np.random.default_rng(4)
    lab = torch.zeros(B, 1, 8, 32, 32, dtype=torch.int64)
    for b in range(B):  # disjoint sparse id sets: the whole batch holds B * per_plane ids
        ids = rng.choice(10**9, size=per_plane, replace=False) + 1 + b * 10**9
        flat = lab[b, 0].view(-1)
        flat[rng.choice(flat.numel(), size=per_plane, replace=False)] = torch.from_numpy(ids)
    x = torch.randn(lab.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, coef, ids = _fwd(x, lab)
    assert coef.shape[2] == per_plane + 1  # not B * per_plane + 1
    assert ids.shape == (B, 1, per_plane + 1)
    # the same loss as with the ids renumbered 1..n per plane
    dense = torch.zeros_like(lab)
    for b in range(B):
        _, inv = torch.unique(lab[b], return_inverse=True)
        dense[b] = inv
    want = loss_and_grad(blob_dice, x, dense)
    got = loss_and_grad(blob_dice, x, lab)
    assert rel_err(got[0], want[0]) <= 1e-14 and rel_err(got[1], want[1]) <= 1e-12


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_per_plane_compaction_matches_the_loop(activation):
    rng = np.random.default_rng(11)
    lab = random_instances(rng, (3, 2, 5, 9, 9), 5, sparse_ids=True, empty_prob=0.2, dtype=torch.int64)
    lab = lab * 1_000_003  # far above any dense table
    x = torch.randn(lab.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    want = loss_and_grad(naive_blob_dice, x, lab, 2.0, 1.0, activation=activation)
    got = loss_and_grad(blob_dice, x, lab, activation=activation)
    assert rel_err(got[0], want[0]) <= 1e-10 and rel_err(got[1], want[1]) <= 1e-8


# ---- 5. the CPU scratch is bounded whatever the thread count --------------------------------

_SCRATCH_PROBE = textwrap.dedent("""
    import resource, sys, torch, blobbench
    torch.set_num_threads(int(sys.argv[1]))
    V, K = 1 << 21, 1 << 20
    x = torch.randn(1, 1, V)
    lab = torch.randint(0, K, (1, 1, V), generator=torch.Generator().manual_seed(0))
    blobbench.blob_dice(x[..., :4096], lab[..., :4096], max_label=K - 1, spatial_dims=1)
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = hwm()
    blobbench.blob_dice(x, lab, max_label=K - 1, spatial_dims=1)
    print(hwm() - before)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_cpu_scratch_does_not_grow_with_threads():
    # One plane with a dense table of 2^20 labels (25 MB of sums, 17 MB of coefficients). Before
    # the bound, each of 8 workers allocated its own 25 MB table (~200 MB of scratch).
    def peak(threads):
        out = subprocess.run(
            [sys.executable, "-c", _SCRATCH_PROBE, str(threads)], capture_output=True, text=True, check=True
        )
        return int(out.stdout.strip().splitlines()[-1])

    table = (1 << 20) * 3 * 8
    grown = peak(8) - peak(1)
    assert grown <= (32 << 20) + table // 2, f"scratch grew by {grown / 2**20:.0f} MB with 8 threads"


# ---- 6. double backward raises instead of returning silence ----------------------------------


@devices
@pytest.mark.parametrize("loss_fn", [blob_dice, blob_tversky])
def test_double_backward_raises(device, loss_fn):
    x, lab = _case(device)
    x.requires_grad_(True)
    loss = loss_fn(x, lab) + (x**3).sum()  # another term keeps the graph connected
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    name = "dice" if loss_fn is blob_dice else "tversky"
    with pytest.raises(RuntimeError, match=rf"blob\.{name}: double backward is not supported"):
        (g * torch.randn_like(g)).sum().backward()


@devices
def test_first_order_gradient_under_create_graph_is_still_right(device):
    x, lab = _case(device)
    want = loss_and_grad(naive_blob_dice, x.cpu(), lab.cpu(), 2.0, 1.0)
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(blob_dice(xx, lab), xx, create_graph=True)
    assert rel_err(g, want[1]) <= 1e-10


# ---- 12. error messages name the op ------------------------------------------------------------


@pytest.mark.parametrize("loss_fn,name", [(blob_dice, "dice"), (blob_tversky, "tversky")])
def test_range_errors_name_the_op(loss_fn, name):
    x, lab = _case()
    lab[0, 0, 0, 0, 0] = 9
    with pytest.raises(ValueError, match=rf"^blob\.{name}: `instances` holds an id above max_label \(the largest is 9, max_label = 5\)$"):
        loss_fn(x, lab, max_label=5)


def test_label_stats_errors_name_label_stats():
    x, lab = _case()
    with pytest.raises(ValueError, match=r"^blob\.label_stats: `instances` holds an id above max_label \(the largest is 3, max_label = 1\)$"):
        torch.ops.blob.label_stats(x, lab, max_label=1)


def test_tversky_backward_names_itself():
    a = _backward_args()
    _, coef, ids = torch.ops.blob._tversky_forward(
        a["input"], a["instances"], 2.0, 1.0, "sigmoid", "paper", 0.3, 0.7, 1e-5, 1e-5, -1
    )
    bad = a["instances"].clone()
    bad[0, 0, 0, 0, 0] = 40
    with pytest.raises(
        ValueError,
        match=r"^blob\.tversky \(backward\): `instances` holds an id "
        r"outside the coefficient table",
    ):
        torch.ops.blob._tversky_backward(a["grad"], a["input"], bad, coef, ids, "sigmoid")


# ---- 8. a volume is never misread without a word ---------------------------------------------


@pytest.mark.parametrize("loss_fn", [blob_dice, blob_tversky])
def test_a_volume_without_its_channel_dim_is_refused(loss_fn):
    x, lab = _case()  # (B, 1, D, H, W)
    with pytest.raises(
        ValueError,
        match=r"4-D input \(2, 4, 8, 8\) is read as \(B, C, \*spatial\) "
        r"with 2 spatial dims and C = 4 channels: pass spatial_dims=2",
    ):
        loss_fn(x[:, 0], lab[:, 0])
    with pytest.raises(
        ValueError,
        match=r"spatial_dims=3 expects input of shape \(B, C, \*spatial\) "
        r"with 5 dims, got \(2, 4, 8, 8\)",
    ):
        loss_fn(x[:, 0], lab[:, 0], spatial_dims=3)


def test_spatial_dims_confirms_a_2d_layout():
    x, lab = _case()
    x2, lab2 = x[:, :, 0], lab[:, :, 0]  # (B, 1, H, W)
    got = blob_dice(x2, lab2, spatial_dims=2)
    assert torch.equal(got, torch.ops.blob.dice(x2, lab2))
    assert torch.equal(blobbench.BlobDiceLoss(spatial_dims=2)(x2, lab2), got)
    with pytest.raises(ValueError, match=r"BlobDiceLoss: spatial_dims must be 1, 2 or 3, got 4"):
        blobbench.BlobDiceLoss(spatial_dims=4)
    with pytest.raises(ValueError, match=r"blob_dice: spatial_dims must be 1, 2 or 3, got True"):
        blob_dice(x2, lab2, spatial_dims=True)


# ---- the autograd registration leaves the other modes alone ------------------------------------


@devices
def test_inference_mode_and_no_grad_give_the_same_loss(device):
    x, lab = _case(device)
    with torch.inference_mode():
        inference = blob_dice(x, lab)  # the Autograd key is skipped: the device kernel directly
    with torch.no_grad():
        no_grad = blob_dice(x.clone().requires_grad_(True), lab)
    eager = blob_dice(x, lab)
    assert not no_grad.requires_grad
    assert torch.equal(inference, eager) and torch.equal(no_grad, eager)


# ---- issue 10 item 2: no Python between the user's call and the kernels ------------------------


@pytest.mark.parametrize("loss_fn", [blob_dice, blob_tversky])
def test_backward_runs_no_python(loss_fn):
    # The autograd node is C++ (not a Python autograd.Function), and the engine's backward pass
    # through it enters no Python function at all.
    import sys

    x, lab = _case()
    x.requires_grad_(True)
    loss = loss_fn(x, lab, max_label=3)
    assert not isinstance(loss.grad_fn, torch.autograd.function.BackwardCFunction)
    assert loss.grad_fn.name().startswith("torch::autograd::CppNode<blob::")
    run_backward = torch.autograd.Variable._execution_engine.run_backward
    seed = torch.ones_like(loss)
    calls = []

    def profiler(frame, event, arg):
        if event == "call":
            calls.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    sys.setprofile(profiler)
    try:
        run_backward((loss,), (seed,), False, False, (), True, True)
    finally:
        sys.setprofile(None)
    assert calls == [], calls
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---- issue 19 item 4: the backward's strides are the fake kernel's -------------------------------


@pytest.mark.parametrize("loss", ["dice", "tversky", "dice_ce"])
def test_channels_last_3d_input_compiles_and_matches_eager_and_the_loop(loss):
    """The backward ops return a gradient with the input's strides, as their fake kernels say, so
    torch.compile's stride checks hold for a channels_last_3d input."""
    torch._dynamo.reset()
    rng = np.random.default_rng(5)
    lab = random_instances(rng, (2, 3, 4, 6, 5), 4, empty_prob=0.0, dtype=torch.int64)
    base = torch.randn(lab.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = base.to(memory_format=torch.channels_last_3d)
    assert not x.is_contiguous()
    fn, naive, backward, extra = {
        "dice": (blob_dice, naive_blob_dice, torch.ops.blob._dice_backward, (False,)),
        "tversky": (blob_tversky, blobbench.naive_blob_tversky, torch.ops.blob._tversky_backward, ()),
        "dice_ce": (blobbench.blob_dice_ce, blobbench.naive_blob_dice_ce, torch.ops.blob._dice_ce_backward, (False,)),
    }[loss]
    eager = loss_and_grad(fn, x, lab)
    compiled = loss_and_grad(torch.compile(fn, fullgraph=True), x, lab)
    oracle = loss_and_grad(naive, base, lab)
    assert rel_err(compiled[0], eager[0]) <= 1e-12 and rel_err(compiled[1], eager[1]) <= 1e-12
    assert rel_err(eager[0], oracle[0]) <= 1e-10 and rel_err(eager[1], oracle[1]) <= 1e-8
    # the backward op itself, eager: the input's strides, the same values as a contiguous input
    forward = getattr(torch.ops.blob, f"_{loss}_forward")
    args = {
        "dice": (2.0, 1.0, "sigmoid", "paper", False, 1e-5, 1e-5, -1),
        "tversky": (2.0, 1.0, "sigmoid", "paper", 0.3, 0.7, 1e-5, 1e-5, -1),
        "dice_ce": (2.0, 1.0, 1.0, 1.0, "sigmoid", "paper", False, 1e-5, 1e-5, -1),
    }[loss]
    _, coef, ids = forward(x, lab, *args)
    one = torch.tensor(1.0, dtype=torch.float64)
    grad = backward(one, x, lab, coef, ids, "sigmoid", *extra)
    assert grad.stride() == x.stride()
    assert torch.equal(grad, backward(one, base, lab, coef, ids, "sigmoid", *extra))

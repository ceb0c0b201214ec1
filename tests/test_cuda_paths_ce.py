"""Issue 19 (items 2 to 4): the opt-in CUDA paths softmax_inf, parallel_finalize and
fused_dice_ce (BLOBBENCH_CUDA_PATHS), and the row budget of the deterministic accumulate.

The CUDA tests run wherever a GPU is (marked `cuda`); the CPU tests check what the CPU can: the
CPU kernel's softmax with -inf logits and the row-budget arithmetic (blob._warp_row_plan).
"""

import numpy as np
import pytest
import torch
from conftest import HAVE_CUDA
from helpers import loss_and_grad, random_instances, rel_err

import blobbench
from blobbench import naive_blob_dice, naive_blob_dice_ce

INF = float("inf")


def on_cuda(fn):
    """Marks a test `cuda` and skips it without a GPU (as tests/test_cuda.py)."""
    fn = pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device and a CUDA build of blobbench")(fn)
    return pytest.mark.cuda(fn)


def _paths(monkeypatch, names):
    if names:
        monkeypatch.setenv("BLOBBENCH_CUDA_PATHS", names)
    else:
        monkeypatch.delenv("BLOBBENCH_CUDA_PATHS", raising=False)


def _kernels(fn, *args, **kwargs):
    """fn's result and the names of the CUDA kernels it launched, in launch order
    (torch.profiler); the names are the demangled ones, template arguments included."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    assert names, "the profiler recorded no CUDA kernel"
    return out, names


def _launches(names, kernel):
    return sum(kernel in n for n in names)


# the kernels of dice_ce_kernel.cu: the fused Dice+CE accumulate and backward, and the parallel
# finalisation (used by fused_dice_ce and parallel_finalize)
CE_KERNELS = ("accumulate_ce_kernel", "reduce_rows_ce_kernel", "backward_ce_kernel")
FINALIZE_KERNELS = (
    "chunk_totals_kernel",
    "plane_totals_kernel",
    "chunk_blob_kernel",
    "plane_result_kernel",
    "combine_planes_kernel",
    "label_coef_kernel",
)


def _none_of(names, kernels):
    return not any(k in n for n in names for k in kernels)


# ---- softmax with -inf logits (softmax_inf) ---------------------------------------------------


def _inf_case(seed=0, shape=(2, 4, 6, 10, 10)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    # -inf in channel 0 (first in the online softmax, where the default CUDA update gave NaN), in
    # channels 0 and 1 together, and in a later channel; at least one finite logit everywhere
    x[:, 0, 1] = -INF
    x[:, 0, 2, :5] = -INF
    x[:, 1, 2, :5] = -INF
    x[:, 3, 3] = -INF
    x[0, :3, 4, 2] = -INF
    rng = np.random.default_rng(seed)
    instances = random_instances(rng, shape, 5, empty_prob=0.0)
    return x, instances


def _softmax_oracle(x, instances, **options):
    # the paper's loop with MONAI's DiceLoss(softmax=True): torch.softmax, which gives p = 0 for a
    # -inf logit
    return loss_and_grad(
        lambda t, i: naive_blob_dice(t, i, activation="softmax", **options), x.double(), instances
    )


@pytest.mark.parametrize("squared_pred", [False, True])
def test_cpu_softmax_with_minus_inf_logits_matches_naive_loop(squared_pred):
    x, instances = _inf_case(1)
    want = _softmax_oracle(x, instances, squared_pred=squared_pred)
    assert torch.isfinite(want[0]) and torch.isfinite(want[1]).all()
    for dtype, (tl, tg) in ((torch.float64, (1e-10, 1e-8)), (torch.float32, (1e-5, 1e-4))):
        got = loss_and_grad(
            blobbench.blob_dice, x.to(dtype), instances, activation="softmax", squared_pred=squared_pred,
            spatial_dims=3,
        )
        assert rel_err(got[0], want[0]) <= tl and rel_err(got[1], want[1]) <= tg


def test_cpu_softmax_position_of_only_minus_inf_gives_nan_as_torch():
    x, instances = _inf_case(2)
    x[1, :, 0, 0, 0] = -INF  # torch.softmax of all -inf is NaN
    assert torch.isnan(torch.softmax(x[1, :, 0, 0, 0], 0)).all()
    loss = blobbench.blob_dice(x, instances, activation="softmax", spatial_dims=3)
    assert torch.isnan(loss)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("max_label", [None, "given"])
@on_cuda
def test_cuda_softmax_inf_matches_naive_loop(monkeypatch, dtype, max_label):
    _paths(monkeypatch, "softmax_inf")
    assert torch.ops.blob._cuda_path_enabled("softmax_inf")
    x, instances = _inf_case(3)
    want = _softmax_oracle(x.to(dtype).double(), instances)  # the logits as rounded to dtype
    ml = int(instances.max()) if max_label else None
    got = loss_and_grad(
        blobbench.blob_dice, x.to(dtype).cuda(), instances.cuda(), activation="softmax", max_label=ml,
        spatial_dims=3,
    )
    tl, tg = {torch.float64: (1e-10, 1e-8), torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-2)}[dtype]
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
    assert rel_err(got[0], want[0]) <= tl and rel_err(got[1].double(), want[1]) <= tg
    # finite logits: the same bits as the default path (same update, exp(0) = 1)
    xf = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).cuda()
    args = (blobbench.blob_dice, xf, instances.cuda())
    on, k_on = _kernels(loss_and_grad, *args, activation="softmax", spatial_dims=3)
    _paths(monkeypatch, None)
    off, k_off = _kernels(loss_and_grad, *args, activation="softmax", spatial_dims=3)
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])
    # the INF instantiations ran: they differ from the default ones in the last template argument
    # (INF) only, so one name each, not the default's
    for kernel in ("accumulate_softmax_kernel", "backward_softmax_kernel"):
        s_on = {n for n in k_on if kernel in n}
        s_off = {n for n in k_off if kernel in n}
        assert len(s_on) == 1 and len(s_off) == 1 and s_on != s_off, (s_on, s_off)
    # neither run touches the kernels of the other opt-in paths
    assert _none_of(k_on, CE_KERNELS + FINALIZE_KERNELS) and _none_of(k_off, CE_KERNELS + FINALIZE_KERNELS)


@on_cuda
def test_cuda_softmax_inf_keeps_the_default_launch_geometry(monkeypatch):
    # B = 1 and 1.5 M voxels: the blocks per plane are those that fill the device (not the
    # 768 tiles of the volume), which depend on the resident blocks per SM. The INF kernel has
    # fewer (more registers); its launch takes the default kernel's, so finite logits give the
    # same bits as the default path.
    shape = (1, 3, 96, 128, 128)
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(shape, generator=gen).cuda()
    ids = torch.randint(1, 40, shape, generator=gen, dtype=torch.int32)
    instances = torch.where(torch.rand(shape, generator=gen) < 0.02, ids, 0).cuda()
    _paths(monkeypatch, "softmax_inf")
    on = loss_and_grad(blobbench.blob_dice, x, instances, activation="softmax", spatial_dims=3)
    _paths(monkeypatch, None)
    off = loss_and_grad(blobbench.blob_dice, x, instances, activation="softmax", spatial_dims=3)
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])


@pytest.mark.parametrize("case", ["all_minus_inf", "plus_inf"])
@on_cuda
def test_cuda_softmax_inf_gives_nan_where_torch_softmax_does(monkeypatch, case):
    _paths(monkeypatch, "softmax_inf")
    x, instances = _inf_case(5)
    x[1, :, 0, 0, 0] = -INF if case == "all_minus_inf" else 0.0
    if case == "plus_inf":
        x[1, 2, 0, 0, 0] = INF
    assert torch.isnan(torch.softmax(x[1, :, 0, 0, 0], 0)).any()
    loss = blobbench.blob_dice(x.float().cuda(), instances.cuda(), activation="softmax", spatial_dims=3)
    assert torch.isnan(loss)


# ---- the row budget of the deterministic accumulate (plan_warp_rows) --------------------------

MiB = 1 << 20


def _plan(planes, row_bytes, warps, blocks, budget):
    return tuple(torch.ops.blob._warp_row_plan(planes, row_bytes, warps, blocks, budget))


def test_warp_row_plan_examples():
    # 4 planes of 1000-byte rows, 10 blocks of 8 warps: 320 kB, under 1 MB: unchanged
    assert _plan(4, 1000, 8, 10, 10**6) == (10, 4)
    # 40 blocks would need 1.28 MB: as many blocks as fit, 1e6 // (4 * 1000 * 8) = 31
    assert _plan(4, 1000, 8, 40, 10**6) == (31, 4)
    # 64 planes of K = 100,000 float32 labels (1.2 MB rows): one block per plane is 614 MB;
    # 256 MiB // (8 * 1.2 MB) = 27 planes per launch (before issue 19: all 64 in one launch)
    assert _plan(64, 100_000 * 3 * 4, 8, 100, 256 * MiB) == (1, 27)
    # near the dense limit, K = 3.3 M float32 labels: one plane's 8 rows (317 MB) alone exceed the
    # budget, so each plane runs alone (the one case left above the budget)
    assert _plan(2, 3_300_000 * 3 * 4, 8, 1, 256 * MiB) == (1, 1)


def test_warp_row_plan_keeps_the_budget():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        planes = int(rng.integers(1, 70000))
        row_bytes = int(rng.integers(1, 10**8))
        warps = int(rng.choice([1, 4, 8]))
        blocks = int(rng.integers(1, 5000))
        budget = int(rng.integers(1, 2**31))
        b, n = _plan(planes, row_bytes, warps, blocks, budget)
        assert 1 <= b <= blocks and 1 <= n <= planes
        if warps * row_bytes <= budget:  # one block of one plane fits: every launch fits
            assert b * warps * n * row_bytes <= budget
        if n < planes:  # chunked: one block per plane, as many planes as fit
            assert b == 1 and (n + 1) * warps * row_bytes > budget
        else:  # one launch: the most blocks that fit, up to those wanted
            assert b == blocks or (b + 1) * warps * planes * row_bytes > budget
        if blocks * warps * planes * row_bytes <= budget:  # fits as asked: unchanged
            assert (b, n) == (blocks, planes)


def test_warp_row_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="must be > 0"):
        _plan(0, 1, 8, 1, 1)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@on_cuda
def test_cuda_deterministic_rows_in_chunks_of_planes(monkeypatch, dtype, activation):
    # 20000 labels: the warp tables do not fit in shared memory; under deterministic algorithms
    # the accumulate uses per-warp rows in global memory. A small test-only budget
    # (BLOBBENCH_WARP_ROWS_BUDGET) forces one block per plane, first with all 5 planes in one
    # launch, then in chunks of 2 and of 1: the same bits (same kernel, same order per plane).
    # Sigmoid: 5 planes (B * C, C = 1); softmax: 5 planes (B) of C = 3 channels each, a row holds
    # C * K labels and a chunk starts p0 * C * V voxels in.
    softmax = activation == "softmax"
    shape, K = ((5, 3, 8, 32, 32) if softmax else (5, 1, 8, 64, 64)), 20000
    planes, row_labels = 5, (3 if softmax else 1) * K
    kernel = "accumulate_softmax_kernel" if softmax else "accumulate_elementwise_kernel"
    gen = torch.Generator().manual_seed(7)
    instances = torch.zeros(shape, dtype=torch.int32)
    flat = instances.view(-1)
    pos = torch.randperm(flat.numel(), generator=gen)[:30000]
    flat[pos] = torch.randint(1, K, (30000,), generator=gen, dtype=torch.int32)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    opts = dict(activation=activation, max_label=K - 1, spatial_dims=3)
    want = loss_and_grad(blobbench.blob_dice, x, instances, **opts)
    row = row_labels * 3 * (8 if dtype == torch.float64 else 4)
    one_block = 8 * row  # bytes of one block of one plane
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    results = []
    try:
        for budget, per_launch in ((planes * one_block, planes), (2 * one_block + 1, 2), (one_block, 1)):
            # the plan's planes per launch do not depend on the blocks wanted (1 or many)
            assert _plan(planes, row, 8, 1000, budget) == (1, per_launch)
            assert _plan(planes, row, 8, 1, budget) == (1, per_launch)
            monkeypatch.setenv("BLOBBENCH_WARP_ROWS_BUDGET", str(budget))
            got, names = _kernels(
                loss_and_grad, blobbench.blob_dice, x.to(dtype).cuda(), instances.cuda(), **opts
            )
            # one accumulate launch per chunk of planes (the forward's only accumulate pass)
            assert _launches(names, kernel) == -(-planes // per_launch), names
            results.append(got)
    finally:
        torch.use_deterministic_algorithms(prev)
    for r in results[1:]:
        assert torch.equal(r[0], results[0][0]) and torch.equal(r[1], results[0][1])
    tl, tg = (1e-10, 1e-8) if dtype == torch.float64 else (1e-5, 1e-4)
    assert rel_err(results[0][0], want[0]) <= tl and rel_err(results[0][1], want[1]) <= tg


@pytest.mark.parametrize("value", ["abc", "0", "-5", "12x", " "])
@on_cuda
def test_cuda_malformed_warp_rows_budget_raises(monkeypatch, value):
    # the budget is read only where the per-warp rows are used (CUDA, deterministic, K beyond
    # shared memory)
    monkeypatch.setenv("BLOBBENCH_WARP_ROWS_BUDGET", value)
    shape = (1, 1, 4, 16, 16)
    instances = torch.zeros(shape, dtype=torch.int32)
    instances[0, 0, 0, 0, :4] = torch.tensor([1, 2, 19999, 3], dtype=torch.int32)
    x = torch.randn(shape).cuda()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(ValueError, match="BLOBBENCH_WARP_ROWS_BUDGET: expected a positive number"):
            blobbench.blob_dice(x, instances.cuda(), max_label=19999, spatial_dims=3)
    finally:
        torch.use_deterministic_algorithms(prev)


# ---- parallel_finalize ------------------------------------------------------------------------


def _wide_case(seed, shape, blobs, max_id):
    """Instances with ids spread over [1, max_id] (many chunks of the parallel finalisation)."""
    rng = np.random.default_rng(seed)
    instances = random_instances(rng, shape, blobs, empty_prob=0.2)
    remap = torch.from_numpy(rng.choice(np.arange(1, max_id + 1), size=int(instances.max()) + 1, replace=False))
    remap[0] = 0
    instances = remap[instances.long()].to(torch.int32)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x, instances


FINALIZE_CASES = [
    # (loss, activation, masking, squared_pred)
    ("dice", "sigmoid", "paper", False),
    ("dice", "sigmoid", "official", True),
    ("dice", "softmax", "paper", False),
    ("dice", "none", "official", False),
    ("tversky", "sigmoid", "official", False),
    ("tversky", "softmax", "paper", False),
]


def _loss_fn(loss, activation, masking, squared_pred):
    def fn(t, inst, **kw):
        opts = dict(activation=activation, masking=masking, spatial_dims=3, **kw)
        if loss == "dice":
            return blobbench.blob_dice(t, inst, squared_pred=squared_pred, **opts)
        return blobbench.blob_tversky(t, inst, **opts)

    return fn


@pytest.mark.parametrize("case", FINALIZE_CASES)
@pytest.mark.parametrize("max_label", [10**6, 37])
@on_cuda
def test_cuda_parallel_finalize_matches_default_path_and_cpu(monkeypatch, case, max_label):
    loss, activation, masking, squared = case
    fn = _loss_fn(*case)
    # a dense table of 10**6 + 1 labels needs few planes (kDenseTableBudget): 3 planes of 6 chunks
    shape = (1, 3, 4, 24, 24) if max_label == 10**6 else (3, 3, 4, 24, 24)
    x, instances = _wide_case(11, shape, 6, min(max_label, 10**6))
    if activation == "none":
        x = torch.sigmoid(x)
    want = loss_and_grad(fn, x, instances, max_label=max_label)  # CPU, float64
    xc, ic = x.cuda(), instances.cuda()
    _paths(monkeypatch, None)
    default, k_default = _kernels(loss_and_grad, fn, xc, ic, max_label=max_label)
    _paths(monkeypatch, "parallel_finalize")
    got, k_got = _kernels(loss_and_grad, fn, xc, ic, max_label=max_label)
    # the path ran: its kernels instead of the default finalisation, and nothing of fused_dice_ce
    assert _launches(k_default, "plane_summary_kernel") == 1 and _none_of(k_default, FINALIZE_KERNELS)
    assert all(_launches(k_got, k) == 1 for k in FINALIZE_KERNELS), k_got
    assert _launches(k_got, "plane_summary_kernel") == 0
    assert _none_of(k_default, CE_KERNELS) and _none_of(k_got, CE_KERNELS)
    again = loss_and_grad(fn, xc, ic, max_label=max_label)
    assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])  # bitwise run to run
    # the same sums, finalised in another order: float64 rounding only
    assert rel_err(got[0], default[0]) <= 1e-12 and rel_err(got[1], default[1]) <= 1e-10
    assert rel_err(got[0], want[0]) <= 1e-10 and rel_err(got[1], want[1]) <= 1e-8
    got32 = loss_and_grad(fn, xc.float(), ic, max_label=max_label)
    assert rel_err(got32[0], want[0]) <= 1e-5 and rel_err(got32[1], want[1]) <= 1e-4


@on_cuda
def test_cuda_parallel_finalize_without_sync_and_nan_for_bad_ids(monkeypatch):
    _paths(monkeypatch, "parallel_finalize")
    x, instances = _wide_case(12, (2, 2, 4, 32, 32), 8, 10**6)
    x = x.float().cuda().requires_grad_(True)
    instances = instances.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = blobbench.blob_dice(x, instances, max_label=10**6, spatial_dims=3)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # an id above max_label: NaN loss and gradient, as on the default path
    bad = instances.clone()
    bad[1, 0, 0, 0, 0] = 10**6 + 1
    loss, grad = loss_and_grad(blobbench.blob_dice, x.detach(), bad, max_label=10**6, spatial_dims=3)
    assert torch.isnan(loss) and torch.isnan(grad).all()


# ---- fused_dice_ce ----------------------------------------------------------------------------


def _ce_case(seed):
    """helpers.random_case with softmax (refused by Dice+CE) turned into sigmoid, lambdas drawn."""
    from helpers import random_case

    x, instances, alpha, beta, options = random_case(seed)
    if options["activation"] == "softmax":
        options["activation"] = "sigmoid"
    rng = np.random.default_rng(10_000 + seed)
    options["lambda_dice"] = float(rng.choice([1.0, 0.5, 0.0]))
    options["lambda_ce"] = float(rng.choice([1.0, 2.0, 0.3]))
    return x, instances, alpha, beta, options


def _dice_ce(t, inst, *args, **kw):
    return blobbench.blob_dice_ce(t, inst, *args, spatial_dims=t.dim() - 2, **kw)


def _fused_on(monkeypatch):
    _paths(monkeypatch, "fused_dice_ce")
    monkeypatch.delenv("BLOBBENCH_DICE_CE", raising=False)
    assert torch.ops.blob._cuda_path_enabled("fused_dice_ce")


@pytest.mark.parametrize("seed", range(40))
@on_cuda
def test_cuda_fused_dice_ce_matches_naive_loop_cpu_and_composite(monkeypatch, seed):
    x, instances, alpha, beta, options = _ce_case(seed)
    want = loss_and_grad(naive_blob_dice_ce, x.double(), instances, alpha, beta, **options)
    cpu = loss_and_grad(_dice_ce, x.double(), instances, alpha, beta, **options)
    xc, ic = x.double().cuda(), instances.cuda()
    _paths(monkeypatch, None)
    composite, k_composite = _kernels(loss_and_grad, _dice_ce, xc, ic, alpha, beta, **options)
    _fused_on(monkeypatch)
    got, k_got = _kernels(loss_and_grad, _dice_ce, xc, ic, alpha, beta, **options)
    # the fused path ran (and the composite, the default, uses none of its kernels)
    assert _none_of(k_composite, CE_KERNELS + FINALIZE_KERNELS)
    assert _launches(k_composite, "plane_summary_kernel") == 1
    for kernel in ("accumulate_ce_kernel", "chunk_totals_kernel", "backward_ce_kernel"):
        assert _launches(k_got, kernel) >= 1, (kernel, k_got)
    assert _launches(k_got, "plane_summary_kernel") == 0
    assert _none_of(k_got, ("accumulate_elementwise_kernel", "backward_elementwise_kernel"))
    again = loss_and_grad(_dice_ce, xc, ic, alpha, beta, **options)
    assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])
    assert rel_err(got[0], want[0]) <= 1e-9 and rel_err(got[1], want[1]) <= 1e-9
    assert rel_err(got[0], cpu[0]) <= 1e-12 and rel_err(got[1], cpu[1]) <= 1e-10
    assert rel_err(got[0], composite[0]) <= 1e-12 and rel_err(got[1], composite[1]) <= 1e-10
    got32 = loss_and_grad(_dice_ce, xc.float(), ic, alpha, beta, **options)
    assert got32[0].dtype == torch.float32 and got32[1].dtype == torch.float32
    assert rel_err(got32[0], want[0]) <= 1e-4 and rel_err(got32[1], want[1]) <= 1e-4


@on_cuda
def test_cuda_fused_dice_ce_coefficient_table_matches_cpu(monkeypatch):
    _fused_on(monkeypatch)
    for seed in (6, 7, 9):
        x, instances, alpha, beta, o = _ce_case(seed)
        args = (alpha, beta, o["lambda_dice"], o["lambda_ce"], o["activation"], o["masking"],
                o["squared_pred"], o["smooth_nr"], o["smooth_dr"], -1)
        cpu = torch.ops.blob._dice_ce_forward(x, instances, *args)
        got = torch.ops.blob._dice_ce_forward(x.cuda(), instances.cuda(), *args)
        assert got[1].shape == cpu[1].shape and got[1].shape[-1] == 4
        assert rel_err(got[0], cpu[0]) <= 1e-12 and rel_err(got[1], cpu[1]) <= 1e-12


@pytest.mark.parametrize("activation,masking", [("sigmoid", "paper"), ("sigmoid", "official"), ("none", "paper")])
@pytest.mark.parametrize("deterministic", [False, True])
@on_cuda
def test_cuda_fused_dice_ce_large_label_ranges(monkeypatch, activation, masking, deterministic):
    # 20000 ids: 8 warp tables of 20000 x 5 sums do not fit in shared memory (per-warp rows in
    # deterministic mode, else double atomics); max_label = 10**6: a dense table of 10**6 + 1
    # labels (the parallel finalisation over 245 chunks per plane; dense for at most 3 planes).
    _fused_on(monkeypatch)
    shape = (1, 2, 8, 64, 64)
    gen = torch.Generator().manual_seed(13)
    instances = torch.zeros(shape, dtype=torch.int32)
    flat = instances.view(-1)
    pos = torch.randperm(flat.numel(), generator=gen)[:40000]
    flat[pos] = torch.randint(1, 20000, (40000,), generator=gen, dtype=torch.int32)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if activation == "none":
        x = torch.sigmoid(x)
    opts = dict(activation=activation, masking=masking)
    want = loss_and_grad(_dice_ce, x, instances, **opts)  # CPU fused, float64
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        for max_label in (None, 10**6):
            got = loss_and_grad(_dice_ce, x.cuda(), instances.cuda(), max_label=max_label, **opts)
            got32 = loss_and_grad(_dice_ce, x.float().cuda(), instances.cuda(), max_label=max_label, **opts)
            assert rel_err(got[0], want[0]) <= 1e-10 and rel_err(got[1], want[1]) <= 1e-8
            assert rel_err(got32[0], want[0]) <= 1e-4 and rel_err(got32[1], want[1]) <= 1e-4
            if deterministic:
                again = loss_and_grad(_dice_ce, x.float().cuda(), instances.cuda(), max_label=max_label, **opts)
                assert torch.equal(got32[0], again[0]) and torch.equal(got32[1], again[1])
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("activation,masking", [("sigmoid", "paper"), ("sigmoid", "official"), ("none", "official")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@on_cuda
def test_cuda_fused_dice_ce_without_sync(monkeypatch, activation, masking, dtype):
    _fused_on(monkeypatch)
    rng = np.random.default_rng(1)
    instances = random_instances(rng, (2, 2, 8, 32, 32), 12, empty_prob=0.0).cuda()
    x = torch.randn(instances.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if activation == "none":
        x = torch.sigmoid(x)
    xc = x.to(dtype).cuda().requires_grad_(True)
    max_label = int(instances.max())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = blobbench.blob_dice_ce(xc, instances, activation=activation, masking=masking, max_label=max_label)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = loss_and_grad(
        naive_blob_dice_ce, x.to(dtype).double(), instances.cpu(), activation=activation, masking=masking
    )
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert loss.dtype == torch.float32 and xc.grad.dtype == dtype
    assert rel_err(loss, want[0]) <= 1e-4 and rel_err(xc.grad, want[1]) <= tol


@on_cuda
def test_cuda_fused_dice_ce_nan_for_bad_input(monkeypatch):
    _fused_on(monkeypatch)
    rng = np.random.default_rng(2)
    instances = random_instances(rng, (2, 1, 4, 16, 16), 5, empty_prob=0.0)
    x = torch.randn(instances.shape, generator=torch.Generator().manual_seed(2))
    bad = instances.clone()
    bad[0, 0, 0, 0, 0] = int(instances.max()) + 1
    loss, grad = loss_and_grad(_dice_ce, x.cuda(), bad.cuda(), max_label=int(instances.max()))
    assert torch.isnan(loss) and torch.isnan(grad).all()
    p = torch.sigmoid(x)
    p[0, 0, 1, 1, 1] = 1.5  # activation none: probabilities outside [0, 1]
    loss, grad = loss_and_grad(_dice_ce, p.cuda(), instances.cuda(), activation="none")
    assert torch.isnan(loss) and torch.isnan(grad).all()


@on_cuda
def test_cuda_fused_dice_ce_env_switches(monkeypatch):
    # fused only with the path on and BLOBBENCH_DICE_CE != composite; the same loss either way
    x, instances, alpha, beta, options = _ce_case(3)
    xc, ic = x.cuda(), instances.cuda()
    _fused_on(monkeypatch)
    fused, k_fused = _kernels(loss_and_grad, _dice_ce, xc, ic, alpha, beta, **options)
    monkeypatch.setenv("BLOBBENCH_DICE_CE", "composite")
    composite, k_composite = _kernels(loss_and_grad, _dice_ce, xc, ic, alpha, beta, **options)
    assert _launches(k_fused, "accumulate_ce_kernel") >= 1 and _launches(k_fused, "backward_ce_kernel") == 1
    assert _none_of(k_composite, CE_KERNELS + FINALIZE_KERNELS)
    assert rel_err(fused[0], composite[0]) <= 1e-12 and rel_err(fused[1], composite[1]) <= 1e-10

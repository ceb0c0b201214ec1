"""Issue 19 (items 2 to 4): the opt-in CUDA path softmax_inf (BLOBBENCH_CUDA_PATHS), and the row
budget of the deterministic accumulate.

The CUDA tests run wherever a GPU is (marked `cuda`); the CPU tests check what the CPU can: the
CPU kernel's softmax with -inf logits and the row-budget arithmetic (blob._warp_row_plan).
"""

import numpy as np
import pytest
import torch
from conftest import HAVE_CUDA
from helpers import loss_and_grad, random_instances, rel_err

import blobbench
from blobbench import naive_blob_dice

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
    want = _softmax_oracle(x, instances)
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
    on = loss_and_grad(blobbench.blob_dice, xf, instances.cuda(), activation="softmax", spatial_dims=3)
    _paths(monkeypatch, None)
    off = loss_and_grad(blobbench.blob_dice, xf, instances.cuda(), activation="softmax", spatial_dims=3)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@on_cuda
def test_cuda_deterministic_rows_in_chunks_of_planes(monkeypatch, dtype):
    # 20000 labels: the warp tables do not fit in shared memory; under deterministic algorithms
    # the accumulate uses per-warp rows in global memory. A small test-only budget
    # (BLOBBENCH_WARP_ROWS_BUDGET) forces one block per plane, first with all 5 planes in one
    # launch, then in chunks of 2 and of 1: the same bits (same kernel, same order per plane).
    shape, K = (5, 1, 8, 64, 64), 20000
    gen = torch.Generator().manual_seed(7)
    instances = torch.zeros(shape, dtype=torch.int32)
    flat = instances.view(-1)
    pos = torch.randperm(flat.numel(), generator=gen)[:30000]
    flat[pos] = torch.randint(1, K, (30000,), generator=gen, dtype=torch.int32)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    want = loss_and_grad(blobbench.blob_dice, x, instances, max_label=K - 1, spatial_dims=3)
    row = K * 3 * (8 if dtype == torch.float64 else 4)
    one_block = 8 * row  # bytes of one block of one plane
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    results = []
    try:
        for budget, per_launch in ((5 * one_block, 5), (2 * one_block + 1, 2), (one_block, 1)):
            assert _plan(5, row, 8, 1000, budget) == (1, per_launch)
            monkeypatch.setenv("BLOBBENCH_WARP_ROWS_BUDGET", str(budget))
            results.append(
                loss_and_grad(blobbench.blob_dice, x.to(dtype).cuda(), instances.cuda(), max_label=K - 1,
                              spatial_dims=3)
            )
    finally:
        torch.use_deterministic_algorithms(prev)
    for r in results[1:]:
        assert torch.equal(r[0], results[0][0]) and torch.equal(r[1], results[0][1])
    tl, tg = (1e-10, 1e-8) if dtype == torch.float64 else (1e-5, 1e-4)
    assert rel_err(results[0][0], want[0]) <= tl and rel_err(results[0][1], want[1]) <= tg

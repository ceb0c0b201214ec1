"""The opt-in CUDA forward paths (BLOBBENCH_CUDA_PATHS = vector_loads, coop_forward,
split_forward; docs/design.md 5.3): loss and gradient against the CPU operator and the default
CUDA path, the kernels each setting runs (profiler), their fallbacks (BLOBBENCH_CUDA_COOP, tests
only), several tiles per warp (BLOBBENCH_CUDA_BLOCKS_PER_PLANE), NaN for ids out of range, no
host sync, launches per forward and backward, more planes than resident blocks, exact counts in
one block, determinism."""

import json
import os
import re
import tempfile

import numpy as np
import pytest
import torch
from conftest import HAVE_CUDA
from helpers import loss_and_grad, random_instances, rel_err

from blobbench import blob_dice, blob_dice_ce, blob_tversky

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device and a CUDA build of blobbench"),
]

PATHS = ["vector_loads", "coop_forward", "split_forward", "vector_loads,coop_forward"]
# (loss, gradient) tolerances as in tests/test_cuda.py and tests/test_dice.py; float16 against
# the same half values in float64 (the loss is float32, the gradient float16).
TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-10, 1e-8), torch.float16: (1e-5, 4e-3)}
LOSSES = {
    "dice": (blob_dice, {}),
    "dice_official_squared": (blob_dice, {"masking": "official", "squared_pred": True}),
    "tversky": (blob_tversky, {}),
}


def _use(monkeypatch, paths):
    if paths:
        monkeypatch.setenv("BLOBBENCH_CUDA_PATHS", paths)
    else:
        monkeypatch.delenv("BLOBBENCH_CUDA_PATHS", raising=False)


def _case(seed, shape, dtype, label_dtype=torch.int32, activation="sigmoid", blobs=12):
    rng = np.random.default_rng(seed)
    instances = random_instances(rng, shape, blobs, empty_prob=0.1, dtype=label_dtype)
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    x = logits.sigmoid() if activation == "none" else logits
    return x.to(dtype), instances


def _cuda(monkeypatch, paths, fn, x, instances, **kwargs):
    _use(monkeypatch, paths)
    return loss_and_grad(fn, x.cuda(), instances.cuda(), **kwargs)


def _check(got, want, dtype):
    tol_loss, tol_grad = TOL[dtype]
    assert rel_err(got[0], want[0]) <= tol_loss
    assert rel_err(got[1], want[1]) <= tol_grad


def _kernels(fn):
    """The CUDA kernels fn() launched, as (full name, grid) pairs, from the profiler's trace."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return [(e["name"], tuple(e.get("args", {}).get("grid", ()))) for e in events if e.get("cat") == "kernel"]


def _names(kernels):
    """The base names (e.g. accumulate_fast_kernel) of _kernels' list."""
    found = (re.search(r"(\w+_kernel)\s*[<(]", name) for name, _ in kernels)
    return {m.group(1) for m in found if m}


def _vector_body(kernels):
    """Whether an opt-in kernel ran its vector body (template argument VEC = true)."""
    return any(re.search(r"(accumulate_fast|forward_coop)_kernel<[^>]*\btrue>", name) for name, _ in kernels)


# What each setting must run (present) and must not (absent) for a sigmoid Dice forward.
KERNELS = {
    "vector_loads": ({"accumulate_fast_kernel", "reduce_fast_kernel"}, {"forward_coop_kernel"}),
    "coop_forward": ({"forward_coop_kernel"}, {"accumulate_fast_kernel", "plane_summary_kernel"}),
    "vector_loads,coop_forward": ({"forward_coop_kernel"}, {"accumulate_fast_kernel", "plane_summary_kernel"}),
    "split_forward": (
        {"accumulate_fast_kernel", "finalize_coop_kernel"},
        {"forward_coop_kernel", "reduce_fast_kernel"},
    ),
    "split_forward,coop_forward": (
        {"accumulate_fast_kernel", "finalize_coop_kernel"},
        {"forward_coop_kernel", "reduce_fast_kernel"},
    ),
}


@pytest.mark.parametrize("paths", sorted(KERNELS))
@pytest.mark.parametrize("with_max_label", [False, True])
def test_each_setting_runs_its_kernels(monkeypatch, paths, with_max_label):
    x, instances = _case(10, (2, 2, 8, 16, 16), torch.float32)  # V = 2048
    x, instances = x.cuda(), instances.cuda()
    kwargs = {"max_label": int(instances.max())} if with_max_label else {}
    _use(monkeypatch, None)
    default = _kernels(lambda: blob_dice(x, instances, **kwargs))
    assert "accumulate_elementwise_kernel" in _names(default)
    assert not _names(default) & {"accumulate_fast_kernel", "forward_coop_kernel", "finalize_coop_kernel"}
    _use(monkeypatch, paths)
    got = _kernels(lambda: blob_dice(x, instances, **kwargs))
    present, absent = KERNELS[paths]
    assert present <= _names(got), _names(got)
    assert not (absent | {"accumulate_elementwise_kernel"}) & _names(got), _names(got)
    assert _vector_body(got) == ("vector_loads" in paths)


@pytest.mark.parametrize("paths", PATHS)
@pytest.mark.parametrize("activation", ["sigmoid", "none", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64])
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("with_max_label", [False, True])
def test_matches_cpu_and_default_path(monkeypatch, paths, activation, dtype, label_dtype, loss, with_max_label):
    fn, options = LOSSES[loss]
    if activation == "softmax":  # official masking is not defined for softmax (the default path runs)
        options = {k: v for k, v in options.items() if k != "masking"}
    x, instances = _case(1, (2, 3, 6, 20, 24), dtype, label_dtype, activation)  # V = 2880
    kwargs = dict(activation=activation, **options)
    if with_max_label:
        kwargs["max_label"] = int(instances.max()) + 2
    want = loss_and_grad(fn, x.double() if dtype == torch.float16 else x, instances, **kwargs)
    default = _cuda(monkeypatch, None, fn, x, instances, **kwargs)
    got = _cuda(monkeypatch, paths, fn, x, instances, **kwargs)
    assert got[0].dtype == default[0].dtype and got[1].dtype == dtype
    _check(got, want, dtype)
    _check(got, default, dtype)


@pytest.mark.parametrize("paths", PATHS)
@pytest.mark.parametrize("blocks", ["1", "3"])
@pytest.mark.parametrize("activation", ["sigmoid", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_matches_cpu_with_several_tiles_per_warp(monkeypatch, paths, blocks, activation, dtype, loss):
    # V = 12800 = 6.25 block steps of 2048 voxels: with 1 or 3 blocks per plane every warp loops
    # over several tiles (the prefetch of the next tile, the partial last one).
    fn, options = LOSSES[loss]
    x, instances = _case(11, (2, 2, 8, 40, 40), dtype, activation=activation, blobs=20)
    kwargs = dict(activation=activation, max_label=int(instances.max()), **options)
    want = loss_and_grad(fn, x.double() if dtype == torch.float16 else x, instances, **kwargs)
    default = _cuda(monkeypatch, None, fn, x, instances, **kwargs)
    monkeypatch.setenv("BLOBBENCH_CUDA_BLOCKS_PER_PLANE", blocks)
    got = _cuda(monkeypatch, paths, fn, x, instances, **kwargs)
    _check(got, want, dtype)
    _check(got, default, dtype)
    kernels = _kernels(lambda: fn(x.cuda(), instances.cuda(), **kwargs))
    ran = "forward_coop_kernel" if "coop_forward" in paths else "accumulate_fast_kernel"
    if paths == "split_forward":
        ran = "accumulate_fast_kernel"
    grids = [grid for name, grid in kernels if ran in name]
    assert grids and all(grid[:2] == (int(blocks), 4) for grid in grids), kernels


@pytest.mark.parametrize("paths", ["coop_forward", "vector_loads,coop_forward", "split_forward"])
@pytest.mark.parametrize("coop", ["off", "refused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fallbacks_without_cooperative_launch(monkeypatch, paths, coop, dtype):
    # BLOBBENCH_CUDA_COOP (tests only): "off" reports no cooperative launch, "refused" refuses
    # each one (the retry in two launches). Either way: accumulate, plain reduce, default
    # finalisation.
    x, instances = _case(12, (2, 3, 8, 20, 24), dtype)
    kwargs = {"max_label": int(instances.max())}
    want = loss_and_grad(blob_dice, x, instances, **kwargs)
    monkeypatch.setenv("BLOBBENCH_CUDA_COOP", coop)
    got = _cuda(monkeypatch, paths, blob_dice, x, instances, **kwargs)
    _check(got, want, dtype)
    names = _names(_kernels(lambda: blob_dice(x.cuda(), instances.cuda(), **kwargs)))
    assert {"accumulate_fast_kernel", "reduce_fast_kernel", "plane_summary_kernel"} <= names, names
    assert not {"forward_coop_kernel", "finalize_coop_kernel", "accumulate_elementwise_kernel"} & names
    monkeypatch.setenv("BLOBBENCH_CUDA_COOP", "sometimes")
    with pytest.raises(ValueError, match="BLOBBENCH_CUDA_COOP"):
        blob_dice(x.cuda(), instances.cuda(), **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masking", ["paper", "official"])
def test_vector_loads_dice_ce_and_label_stats(monkeypatch, dtype, masking):
    # Dice+CE's composite clears with_ce: its Dice sums and its BCE sums take vector_loads.
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}[dtype]  # tests/test_dice_ce.py's tolerances
    x, instances = _case(13, (2, 2, 8, 16, 20), dtype)  # V = 2560
    kwargs = {"max_label": int(instances.max()), "masking": masking}
    want = loss_and_grad(blob_dice_ce, x, instances, **kwargs)
    default = _cuda(monkeypatch, None, blob_dice_ce, x, instances, **kwargs)
    got = _cuda(monkeypatch, "vector_loads", blob_dice_ce, x, instances, **kwargs)
    for ref in (want, default):
        assert rel_err(got[0], ref[0]) <= tol and rel_err(got[1], ref[1]) <= tol
    names = _names(_kernels(lambda: blob_dice_ce(x.cuda(), instances.cuda(), **kwargs)))
    assert "accumulate_fast_kernel" in names and "accumulate_elementwise_kernel" not in names, names
    # label_stats: sums, squared sums and exact counts
    xc, lc = x.cuda(), instances.cuda()
    stats_kwargs = {"squared_pred": True, "max_label": kwargs["max_label"]}
    want_stats, want_ids = torch.ops.blob.label_stats(x, instances, **stats_kwargs)
    stats, ids = torch.ops.blob.label_stats(xc, lc, **stats_kwargs)
    assert rel_err(stats[..., :2], want_stats[..., :2]) <= TOL[dtype][0]
    assert torch.equal(stats[..., 2].cpu(), want_stats[..., 2]) and torch.equal(ids.cpu(), want_ids)
    names = _names(_kernels(lambda: torch.ops.blob.label_stats(xc, lc, **stats_kwargs)))
    assert "accumulate_fast_kernel" in names and "accumulate_elementwise_kernel" not in names, names


@pytest.mark.parametrize("paths", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["odd_voxels", "unaligned"])
def test_odd_sizes_and_unaligned_inputs_fall_back(monkeypatch, paths, dtype, layout):
    # V = 315 is no multiple of 4; a view one element into a buffer is contiguous but not
    # 16-byte aligned. Both must run the one-voxel body (or the default kernels) correctly.
    shape = (2, 2, 5, 7, 9) if layout == "odd_voxels" else (2, 2, 4, 8, 8)
    x, instances = _case(2, shape, dtype)
    if layout == "unaligned":
        xb = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
        lb = torch.empty(instances.numel() + 1, dtype=instances.dtype, device="cuda")
        xb[1:].copy_(x.view(-1).cuda())
        lb[1:].copy_(instances.view(-1).cuda())
        xc, lc = xb[1:].view(shape), lb[1:].view(shape)
        assert xc.data_ptr() % 16 != 0 and lc.data_ptr() % 16 != 0 and xc.is_contiguous()
    else:
        xc, lc = x.cuda(), instances.cuda()
    want = loss_and_grad(blob_dice, x, instances, max_label=int(instances.max()))
    _use(monkeypatch, paths)
    got = loss_and_grad(blob_dice, xc, lc, max_label=int(instances.max()))
    _check(got, want, dtype)
    kernels = _kernels(lambda: blob_dice(xc, lc, max_label=int(instances.max())))
    assert not _vector_body(kernels)
    if paths == "vector_loads":  # the default accumulate kernel instead of the opt-in one
        assert "accumulate_elementwise_kernel" in _names(kernels)
        assert "accumulate_fast_kernel" not in _names(kernels)


@pytest.mark.parametrize("paths", PATHS)
@pytest.mark.parametrize("bad_id", [7, -1])
def test_id_out_of_range_gives_nan(monkeypatch, paths, bad_id):
    x, instances = _case(3, (2, 1, 4, 16, 16), torch.float32, blobs=3)
    instances[1, 0, 2, 5, 5] = bad_id
    got = _cuda(monkeypatch, paths, blob_dice, x, instances, max_label=3)
    assert torch.isnan(got[0]) and torch.isnan(got[1]).all()
    instances[1, 0, 2, 5, 5] = 0
    got = _cuda(monkeypatch, paths, blob_dice, x, instances, max_label=3)
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()


@pytest.mark.parametrize("paths", PATHS)
@pytest.mark.parametrize("activation", ["sigmoid", "none"])
def test_max_label_means_no_host_sync(monkeypatch, paths, activation):
    x, instances = _case(4, (2, 3, 8, 32, 32), torch.float32, activation=activation)
    x, instances = x.cuda().requires_grad_(True), instances.cuda()
    max_label = int(instances.max())
    _use(monkeypatch, paths)
    blob_dice(x, instances, activation=activation, max_label=max_label)  # first call: attributes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = blob_dice(x, instances, activation=activation, max_label=max_label)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


def _gpu_activities(fn):
    """The number of kernels, memsets and copies the device ran for fn()."""
    fn()  # warm-up: attributes, allocator
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


# Forward and backward with max_label, float32: the forward's launches, then autograd's seed fill,
# the backward's conversion of the seed to float64 and the backward kernel.
@pytest.mark.parametrize("paths,most", [("coop_forward", 4), ("vector_loads,coop_forward", 4), ("split_forward", 5)])
def test_launches_per_forward_and_backward(monkeypatch, paths, most):
    x, instances = _case(5, (2, 1, 16, 32, 32), torch.float32)
    x, instances = x.cuda().requires_grad_(True), instances.cuda()
    max_label = int(instances.max())

    def step():
        torch.autograd.grad(blob_dice(x, instances, max_label=max_label), x)

    _use(monkeypatch, None)
    default = _gpu_activities(step)
    _use(monkeypatch, paths)
    got = _gpu_activities(step)
    assert got <= most < default


@pytest.mark.parametrize("paths", PATHS)
def test_more_planes_than_resident_blocks(monkeypatch, paths):
    # 2400 planes: more than the blocks an H200 holds at once, so coop_forward takes its
    # two-launch variant and the finalisation loops over planes.
    x, instances = _case(6, (40, 60, 4, 8, 8), torch.float64, blobs=3)
    want = loss_and_grad(blob_dice, x, instances, max_label=int(instances.max()))
    got = _cuda(monkeypatch, paths, blob_dice, x, instances, max_label=int(instances.max()))
    _check(got, want, torch.float64)


@pytest.mark.parametrize("paths", PATHS)
def test_counts_exact_beyond_2_24_voxels_in_one_block(monkeypatch, paths):
    # One block per plane (BLOBBENCH_CUDA_BLOCKS_PER_PLANE=1) over 2^24 + 4096 voxels, instance 1
    # holding more than 2^24 of them: a float count would be off by a few, which moves the
    # float64 coefficient table (a_k ~ 1/N_k) far beyond 1e-12. p = 0 (activation "none") keeps
    # the sums exact, so the table isolates the counts.
    V = 2**24 + 4096
    instances = torch.ones(1, 1, V, dtype=torch.int32)
    instances[..., :1000] = 0
    instances[..., 5000:5007] = 2
    x = torch.zeros(1, 1, V, dtype=torch.float32)
    args = (2.0, 1.0, "none", "paper", False, 1e-5, 1e-5, 2)
    _, want_coef, _ = torch.ops.blob._dice_forward(x, instances, *args)
    assert (V - 1007) % 2 == 1 and V - 1007 > 2**24  # a count float32 cannot hold
    monkeypatch.setenv("BLOBBENCH_CUDA_BLOCKS_PER_PLANE", "1")
    _use(monkeypatch, paths)
    xc, lc = x.cuda(), instances.cuda()
    _, coef, _ = torch.ops.blob._dice_forward(xc, lc, *args)
    assert rel_err(coef, want_coef) <= 1e-12
    # ... and it was the opt-in accumulate, one block for the plane's 2^24 + 4096 voxels
    kernels = _kernels(lambda: torch.ops.blob._dice_forward(xc, lc, *args))
    ran = "forward_coop_kernel" if "coop_forward" in paths and "split" not in paths else "accumulate_fast_kernel"
    grids = [grid for name, grid in kernels if ran in name]
    assert grids and all(grid[:2] == (1, 1) for grid in grids), kernels
    assert "accumulate_elementwise_kernel" not in _names(kernels)
    stats, _ = torch.ops.blob.label_stats(xc, lc, activation="none", max_label=2)
    assert stats[0, 0, :, 2].cpu().tolist() == [1000.0, V - 1007.0, 7.0]
    if "vector_loads" in paths:  # label_stats takes the opt-in accumulate pass too
        kernels = _kernels(lambda: torch.ops.blob.label_stats(xc, lc, activation="none", max_label=2))
        grids = [grid for name, grid in kernels if "accumulate_fast_kernel" in name]
        assert grids and all(grid[:2] == (1, 1) for grid in grids), kernels


@pytest.mark.parametrize("paths", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_two_runs_are_bitwise_equal(monkeypatch, paths, dtype):
    x, instances = _case(7, (2, 2, 16, 40, 40), dtype, blobs=30)
    first = _cuda(monkeypatch, paths, blob_dice, x, instances, max_label=int(instances.max()))
    second = _cuda(monkeypatch, paths, blob_dice, x, instances, max_label=int(instances.max()))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("paths", PATHS)
def test_cuda_graph_capture_and_replay(monkeypatch, paths):
    _use(monkeypatch, paths)
    x, instances = _case(8, (2, 1, 16, 48, 48), torch.float32, blobs=25)
    x, instances = x.cuda(), instances.cuda()
    max_label = int(instances.max()) + 5
    static_x = x.clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            torch.autograd.grad(blob_dice(static_x, instances, max_label=max_label), static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = blob_dice(static_x, instances, max_label=max_label)
        (static_grad,) = torch.autograd.grad(static_loss, static_x)
    new_x = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).cuda()
    with torch.no_grad():
        static_x.copy_(new_x)
    graph.replay()
    want = loss_and_grad(blob_dice, new_x, instances, max_label=max_label)
    assert torch.equal(static_loss, want[0]) and torch.equal(static_grad, want[1])

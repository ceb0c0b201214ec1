"""CUDA-only behaviour: no host sync with max_label, CUDA-graph capture, large label ranges,
per-plane compaction."""

import numpy as np
import pytest
import torch
from conftest import HAVE_CUDA
from helpers import loss_and_grad, random_instances, rel_err

from blobbench import blob_dice

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device and a CUDA build of blobbench"),
]


def _case(seed=0, shape=(2, 1, 16, 48, 48), blobs=25):
    rng = np.random.default_rng(seed)
    instances = random_instances(rng, shape, blobs, empty_prob=0.0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return x.cuda(), instances.cuda()


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_max_label_means_no_host_sync(activation):
    x, instances = _case(1, shape=(2, 3, 8, 32, 32))
    x.requires_grad_(True)
    max_label = int(instances.max())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = blob_dice(x, instances, activation=activation, max_label=max_label)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("max_label", [10**6, 2**62])
def test_generous_max_label_under_the_budget_means_no_host_sync(max_label):
    # A dense table while it fits the budget (docs/design.md 5.2): still no sync. 2**62 is
    # beyond any budget, so that case compacts and must sync: it is the control.
    x, instances = _case(5, shape=(2, 1, 16, 32, 32))
    x.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if max_label > 10**6:
            with pytest.raises(RuntimeError, match="synchroniz"):
                blob_dice(x, instances, max_label=max_label)
            return
        loss = blob_dice(x, instances, max_label=max_label)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = loss_and_grad(blob_dice, x.detach().cpu(), instances.cpu())
    assert rel_err(loss.cpu(), want[0]) <= 1e-5 and rel_err(x.grad.cpu(), want[1]) <= 1e-4


def test_per_plane_compaction_matches_cpu():
    rng = np.random.default_rng(8)
    instances = (
        random_instances(rng, (4, 2, 6, 20, 20), 8, sparse_ids=True, empty_prob=0.1, dtype=torch.int64) * 1_000_003
    )
    x = torch.randn(instances.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    want = loss_and_grad(blob_dice, x, instances)
    got = loss_and_grad(blob_dice, x.cuda(), instances.cuda())
    assert rel_err(got[0], want[0]) <= 1e-12 and rel_err(got[1], want[1]) <= 1e-10


def test_cuda_graph_capture_and_replay():
    x, instances = _case(2)
    max_label = int(instances.max()) + 5
    static_x = x.clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the capture
            torch.autograd.grad(blob_dice(static_x, instances, max_label=max_label), static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = blob_dice(static_x, instances, max_label=max_label)
        (static_grad,) = torch.autograd.grad(static_loss, static_x)
    for seed in (3, 4):
        new_x = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).cuda()
        with torch.no_grad():
            static_x.copy_(new_x)
        graph.replay()
        want = loss_and_grad(blob_dice, new_x, instances)
        assert torch.equal(static_loss, want[0]) and torch.equal(static_grad, want[1])


@pytest.mark.parametrize("deterministic", [False, True])
def test_label_range_larger_than_shared_memory(deterministic):
    # 20000 ids: 8 warp tables of 20000 x 3 floats do not fit in shared memory.
    shape = (2, 1, 8, 128, 128)
    gen = torch.Generator().manual_seed(5)
    instances = torch.zeros(shape, dtype=torch.int32)
    flat = instances.view(-1)
    pos = torch.randperm(flat.numel(), generator=gen)[:40000]
    flat[pos] = torch.randint(1, 20000, (40000,), generator=gen, dtype=torch.int32)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    want = loss_and_grad(blob_dice, x, instances)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        got = loss_and_grad(blob_dice, x.cuda(), instances.cuda())
        got32 = loss_and_grad(blob_dice, x.float().cuda(), instances.cuda())
        if deterministic:
            again = loss_and_grad(blob_dice, x.float().cuda(), instances.cuda())
            assert torch.equal(got32[0], again[0]) and torch.equal(got32[1], again[1])
    finally:
        torch.use_deterministic_algorithms(prev)
    assert rel_err(got[0], want[0]) <= 1e-10 and rel_err(got[1], want[1]) <= 1e-8
    assert rel_err(got32[0], want[0]) <= 1e-5 and rel_err(got32[1], want[1]) <= 1e-4


def test_large_volume_matches_cpu():
    x, instances = _case(6, shape=(2, 1, 32, 96, 96), blobs=60)
    want = loss_and_grad(blob_dice, x.double().cpu(), instances.cpu())
    for masking in ("paper", "official"):
        want = loss_and_grad(blob_dice, x.double().cpu(), instances.cpu(), masking=masking, squared_pred=True)
        got = loss_and_grad(blob_dice, x, instances, masking=masking, squared_pred=True)
        assert rel_err(got[0], want[0]) <= 1e-5 and rel_err(got[1], want[1]) <= 1e-4


def test_softmax_id_above_max_label_0_gives_nan():
    # softmax with max_label = 0 has a table of 2 labels (channel 0's derived background is
    # label 1), but an id 1 in a channel >= 1 is still above max_label: NaN, as the CPU raises.
    x = torch.randn(2, 3, 4, 6, 6, generator=torch.Generator().manual_seed(16))
    inst = torch.zeros(x.shape, dtype=torch.int32)
    inst[1, 2, 1, 1, 1] = 1
    with pytest.raises(ValueError, match="max_label"):
        blob_dice(x, inst, activation="softmax", max_label=0)
    loss, grad = loss_and_grad(blob_dice, x.cuda(), inst.cuda(), activation="softmax", max_label=0)
    assert torch.isnan(loss) and torch.isnan(grad).all()
    inst[1, 2, 1, 1, 1] = 0
    loss, grad = loss_and_grad(blob_dice, x.cuda(), inst.cuda(), activation="softmax", max_label=0)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()

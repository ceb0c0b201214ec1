"""The training loop: a few steps of each loss, and the same step under torch.compile and under
DistributedDataParallel (gloo, 2 CPU processes) equal to the single-process eager step."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import blobbench
from blobbench.bench.train import LOSSES, TrainConfig, make_dataset, make_loss, make_net, train_run

TINY = dict(
    dims=2, image_size=48, crop=32, train_images=4, test_images=2, iterations=3, batch=2, features=(4, 8, 16, 32)
)


@pytest.mark.parametrize("loss", LOSSES)
def test_a_few_training_steps(loss, tmp_path):
    cfg = TrainConfig(loss=loss, **TINY)
    r = train_run(cfg, str(tmp_path), progress=False)
    assert len(r["loss_curve"]) == 3 and all(torch.isfinite(torch.tensor(r["loss_curve"])))
    assert set(r["metrics"]) >= {"f1", "sensitivity", "precision", "dice"}
    assert all(0.0 <= v <= 1.0 for v in r["metrics"].values())
    assert r["_prediction"].shape == (2, 1, 48, 48)
    assert (tmp_path / "checkpoints" / f"{loss}_seed0.pt").exists()


def test_3d_run_and_figure(tmp_path):
    pytest.importorskip("matplotlib")
    from blobbench.bench.train import compare

    cfg = TrainConfig(**{**TINY, "dims": 3, "image_size": 32, "crop": 32, "iterations": 2})
    r = compare(["dice", "blob_dice"], [0], cfg, str(tmp_path), progress=False)
    assert set(r["table"]) == {"dice", "blob_dice"}
    assert (tmp_path / "figure.png").stat().st_size > 5_000 and (tmp_path / "table.md").exists()


def test_dataset_is_instance_imbalanced():
    cfg = TrainConfig(**{**TINY, "image_size": 96})
    images, masks = make_dataset(6, cfg, seed=0)
    inst = blobbench.label_instances(masks, spatial_dims=2)
    sizes = torch.cat([torch.bincount(inst[i].reshape(-1).long())[1:] for i in range(6)])
    sizes = sizes[sizes > 0].double()
    assert sizes.numel() > 30 and sizes.median() < 30 and sizes.max() > 150
    # small blobs are fainter than large ones
    big = torch.zeros_like(masks)
    for i in range(6):
        s = torch.bincount(inst[i].reshape(-1).long())
        big[i] = torch.isin(inst[i], torch.nonzero(s > 150).flatten()) & masks[i]
    small = masks & ~big
    assert images[big].mean() > images[small].mean() + 0.2


def _batch(seed, n=4):
    cfg = TrainConfig(**{**TINY, "image_size": 32})
    x, m = make_dataset(n, cfg, seed=seed)
    m[:, 0, 0, 0] = True  # every element has at least one instance (see the DDP test)
    return x.double(), blobbench.label_instances(m, spatial_dims=2)


def _grads(net):
    return [p.grad.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("loss", ["blob_dice", "blob_tversky"])
def test_compiled_step_equals_eager(loss):
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = make_net(TrainConfig(**{**TINY, "dropout": 0.0}))
    net_c = copy.deepcopy(net)
    fn = make_loss(loss)
    x, inst = _batch(1)
    x = x.float()
    eager = fn(net(x), inst)
    eager.backward()
    step = torch.compile(lambda a, b: fn(net_c(a), b))
    comp = step(x, inst)
    comp.backward()
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
    for g_c, g_e in zip(_grads(net_c), _grads(net)):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6)


def _ddp_worker(rank, world, port, state, loss, x, inst, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = make_net(TrainConfig(**{**TINY, "dropout": 0.0})).double()
        net.load_state_dict(state)
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        half = x.shape[0] // world
        sl = slice(rank * half, (rank + 1) * half)
        value = make_loss(loss)(ddp(x[sl]), inst[sl])
        value.backward()
        total = value.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            torch.save({"loss": total / world, "grads": _grads(net)}, out)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("loss", ["blob_dice", "blob_tversky"])
def test_ddp_gloo_equals_single_process(loss, tmp_path):
    """DDP averages the gradients of the two halves of the batch. Blob loss is a mean over batch
    elements (global: over (b, c); blob: over elements with instances), so with equal halves in
    which every element has instances, that average is exactly the full-batch gradient."""
    torch.manual_seed(0)
    net = make_net(TrainConfig(**{**TINY, "dropout": 0.0})).double()
    x, inst = _batch(2)
    single = make_loss(loss)(net(x), inst)
    single.backward()
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), net.state_dict(), loss, x, inst, str(out)), nprocs=2)
    got = torch.load(out)
    torch.testing.assert_close(got["loss"], single.detach(), rtol=1e-12, atol=1e-12)
    for g_d, g_s in zip(got["grads"], _grads(net)):
        torch.testing.assert_close(g_d, g_s, rtol=1e-9, atol=1e-12)

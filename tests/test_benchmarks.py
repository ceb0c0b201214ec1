"""pytest-benchmark timings of blob Dice (and Tversky, Dice+CE) fwd+bwd, grouped by profile (excluded by
default).

    pytest -m benchmark                                   # run and print the grouped tables
    pytest -m benchmark --benchmark-save=base             # store a baseline (.benchmarks/)
    pytest -m benchmark --benchmark-compare=0001 --benchmark-compare-fail=median:10%   # gate

One crop per profile; CUDA is synchronised inside the timed function. Devices: cpu, plus cuda
when a GPU and the CUDA kernels are present, or ``$BLOBBENCH_DEVICES`` (``cpu,cuda:1``).
"""
import pytest
import torch

import blobbench
from blobbench.bench.bench import devices_from_env, forward_backward, loss_fn, normalize_device, prepare, synchronize
from blobbench.bench.synthetic import profile_batch

pytestmark = pytest.mark.benchmark

PROFILES = ["ms", "shanel", "deepmact"]
IMPLS = ["fused", "fused_tversky", "vectorized", "monai_dice", "naive", "fused_dice_ce", "monai_dice_ce",
         "naive_dice_ce", "fused_cc_dice_ce", "vectorized_cc_dice_ce", "naive_cc_dice_ce"]
_HAVE_CUDA = torch.cuda.is_available() and blobbench.has_cuda_kernels()
DEVICES = devices_from_env("cpu,cuda" if _HAVE_CUDA else "cpu")


@pytest.fixture(scope="module")
def batches():
    return {p: profile_batch(p, seed=0, batch=1) for p in PROFILES}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("profile", PROFILES)
def test_forward_backward(benchmark, batches, profile, impl, device):
    device = normalize_device(device)  # cuda -> cuda:N (fails clearly without that device)
    x, inst = batches[profile]
    x = x.to(device).requires_grad_(True)
    inst = inst.to(device)
    fn = loss_fn(impl)
    prepare(fn, inst)  # the CC losses' Voronoi regions, once, outside the timed steps

    def step():
        forward_backward(fn, x, inst)
        synchronize(device)

    benchmark.group = f"{profile} {tuple(x.shape)} fwd+bwd"
    benchmark.extra_info.update(profile=profile, impl=impl, device=device,
                                instances=int(inst.max()))
    step()  # warm-up
    if impl.startswith("naive"):
        benchmark.pedantic(step, rounds=3, iterations=1)
    else:
        benchmark(step)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("step", ["label_instances", "voronoi_regions"])
@pytest.mark.parametrize("profile", PROFILES)
def test_preprocessing(benchmark, batches, profile, step):
    """What a data pipeline computes per crop: cc3d labelling against the Voronoi regions (CPU)."""
    _, inst = batches[profile]
    mask = inst > 0
    fn = (lambda: blobbench.label_instances(mask)) if step == "label_instances" else (
        lambda: blobbench.voronoi_regions(inst))
    benchmark.group = f"{profile} {tuple(inst.shape)} preprocessing"
    benchmark.extra_info.update(profile=profile, step=step, instances=int(inst.max()))
    out = benchmark.pedantic(fn, rounds=3, iterations=1)
    assert out.shape == inst.shape and bool(((out > 0) == mask).all() if step == "label_instances" else (out > 0).all())

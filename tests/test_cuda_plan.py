"""Host-side planning of the opt-in CUDA forward paths (csrc/cuda_forward_plan.h), runnable
without a GPU: the switch BLOBBENCH_CUDA_PATHS, the choice between one cooperative launch and two
launches, and the blocks per plane (expected values worked out by hand from docs/design.md 5.3:
a block step is 8 warps x 256 voxels, a block covers at most 2^30 voxels)."""

import pytest
import torch

import blobbench  # noqa: F401  (loads the operators)

PLAN = torch.ops.blob._cuda_forward_plan


def test_path_switch(monkeypatch):
    monkeypatch.setenv("BLOBBENCH_CUDA_PATHS", "vector_loads, split_forward")
    assert torch.ops.blob._cuda_path_enabled("vector_loads")
    assert torch.ops.blob._cuda_path_enabled("split_forward")
    assert not torch.ops.blob._cuda_path_enabled("coop_forward")
    monkeypatch.setenv("BLOBBENCH_CUDA_PATHS", "all")
    assert torch.ops.blob._cuda_path_enabled("coop_forward")
    # "all" runs coop_forward's one launch: split_forward only forces its fallback
    assert not torch.ops.blob._cuda_path_enabled("split_forward")
    monkeypatch.delenv("BLOBBENCH_CUDA_PATHS")
    assert not torch.ops.blob._cuda_path_enabled("vector_loads")


# (voxels, planes, coop, split, coop_supported, coop_resident, acc_resident, forced) -> plan
CASES = [
    # neither path: the default kernels
    ((10**6, 4, False, False, True, 1056, 1056, 0), [0, 0]),
    # 1e6 voxels = 489 block steps; 1056 resident blocks / 4 planes = 264 blocks per plane
    ((10**6, 4, True, False, True, 1056, 1056, 0), [1, 264]),
    # more planes than resident blocks: two launches, one block per plane fills the device
    ((10**6, 2400, True, False, True, 1056, 1056, 0), [2, 1]),
    # split_forward forces two launches; so does a device without cooperative launch
    ((10**6, 4, True, True, True, 1056, 1056, 0), [2, 264]),
    ((10**6, 4, False, True, True, 1056, 1056, 0), [2, 264]),
    ((10**6, 4, True, False, False, 0, 1056, 0), [2, 264]),
    # a small plane: one block step, one block
    ((100, 4, True, False, True, 1056, 1056, 0), [1, 1]),
    # 3 * 2^30 voxels need 3 blocks (2^30 voxels each at most); 2 resident blocks do not hold them
    ((3 * 2**30, 1, True, False, True, 2, 2, 0), [2, 3]),
    ((3 * 2**30, 1, False, True, True, 2, 2, 1), [2, 3]),
    # forced blocks per plane: taken where they fit, capped at the block steps
    ((10**6, 4, True, False, True, 1056, 1056, 1), [1, 1]),
    ((10**6, 4, True, False, True, 1056, 1056, 1000), [2, 489]),
]


@pytest.mark.parametrize("args,want", CASES)
def test_forward_plan(args, want):
    assert PLAN(*args) == want


def test_blocks_per_plane_from_the_environment(monkeypatch):
    monkeypatch.setenv("BLOBBENCH_CUDA_BLOCKS_PER_PLANE", "7")
    assert PLAN(10**6, 4, False, True, True, 1056, 1056) == [2, 7]
    monkeypatch.delenv("BLOBBENCH_CUDA_BLOCKS_PER_PLANE")
    assert PLAN(10**6, 4, False, True, True, 1056, 1056) == [2, 264]
    for bad in ("abc", "0", "-3", "1e3"):
        monkeypatch.setenv("BLOBBENCH_CUDA_BLOCKS_PER_PLANE", bad)
        with pytest.raises(ValueError, match="BLOBBENCH_CUDA_BLOCKS_PER_PLANE"):
            PLAN(10**6, 4, False, True, True, 1056, 1056)

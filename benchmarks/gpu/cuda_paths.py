"""The CUDA paths the GPU check runs, and a switch for ``BLOBBENCH_CUDA_PATHS`` inside one process.

The C++ side reads the variable on every call (``blob::cuda_path_enabled``), so a script can run
the default path and each opt-in path one after the other without a new process. The names are
those of ``kCudaPathNames`` in ``csrc/common/cuda_paths.cpp`` (a test holds the two lists together).
"""
from __future__ import annotations

import contextlib
import os

VAR = "BLOBBENCH_CUDA_PATHS"
#: every opt-in CUDA path (csrc/common/cuda_paths.cpp, kCudaPathNames)
CUDA_PATHS = ("vector_loads", "coop_forward", "split_forward", "fused_dice_ce", "softmax_inf", "parallel_finalize")
#: the opt-in paths that change the Dice/Tversky forward
FORWARD_PATHS = ("vector_loads", "coop_forward", "split_forward")


def all_settings() -> list[str]:
    """Every setting of the variable worth a sanitizer run: the default, all, each path alone."""
    return ["default", "all", *CUDA_PATHS]


def forward_settings() -> list[str]:
    """The settings that give a different Dice forward: the default, each forward path, all."""
    return ["default", *FORWARD_PATHS, "all"]


@contextlib.contextmanager
def cuda_paths(setting: str):
    """``BLOBBENCH_CUDA_PATHS`` set to ``setting`` ("default": unset) inside the block."""
    old = os.environ.get(VAR)
    if setting == "default":
        os.environ.pop(VAR, None)
    else:
        os.environ[VAR] = setting
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(VAR, None)
        else:
            os.environ[VAR] = old


def enabled() -> list[str]:
    """The opt-in paths the extension sees as on now (``torch.ops.blob._cuda_path_enabled``)."""
    import torch

    import blobbench  # noqa: F401 - loads the operators

    return [p for p in CUDA_PATHS if torch.ops.blob._cuda_path_enabled(p)]

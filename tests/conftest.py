import pytest
import torch

import blobbench

HAVE_CUDA = torch.cuda.is_available() and blobbench.has_cuda_kernels()
DEVICES = ["cpu"] + (["cuda"] if HAVE_CUDA else [])
devices = pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not HAVE_CUDA, reason="needs a CUDA device and a CUDA build of blobbench")])],
)

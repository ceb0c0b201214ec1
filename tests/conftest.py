import os
import tempfile

# A fresh inductor cache per test session: torch keys its compiled-graph cache on the traced
# graph and torch's version, not on this extension's build, so a cache left by an older build
# (whose private ops had other names) would be replayed against the new library.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="blobbench-inductor-"))

import pytest
import torch

import blobbench

HAVE_CUDA = torch.cuda.is_available() and blobbench.has_cuda_kernels()
DEVICES = ["cpu"] + (["cuda"] if HAVE_CUDA else [])
devices = pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device and a CUDA build of blobbench"),
            ],
        ),
    ],
)

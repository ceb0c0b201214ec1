"""blobbench: fused instance-aware blob losses for PyTorch, with references and benchmarks.

``torch.ops.blob.dice`` / ``torch.ops.blob.tversky`` compute every per-instance term of blob
loss (Kofler et al. 2022) in one pass over the voxels, on the CPU and on CUDA.

``import blobbench`` needs torch (and numpy) only. The features with optional dependencies load
them when first used and say which extra installs them: :func:`label_instances` and the metrics
on bool masks need cc3d (``blobbench[instances]``); :class:`LabelInstancesd` and the loop
references :func:`naive_blob_dice` / :func:`naive_blob_tversky` need MONAI (``blobbench[monai]``);
the benchmark app in :mod:`blobbench.bench` needs ``blobbench[bench]``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from ._ops import dense_label_limit, has_cuda_kernels
from .cc_losses import CCDiceCELoss, CCDiceLoss, cc_dice, cc_dice_ce
from .instances import label_instances
from .losses import BlobDiceCELoss, BlobDiceLoss, BlobTverskyLoss, blob_dice, blob_dice_ce, blob_tversky
from .metrics import BlobMetrics, CCDiceMetric, blob_metrics, cc_metrics, detection_counts
from .stats import InstanceStats, instance_stats
from .voronoi import voronoi_regions

__version__ = "0.1.0"

# Loaded on first access (PEP 562): the transform subclasses a MONAI class, and the references
# are the test oracle, not part of the loss library.
_LAZY = {
    "LabelInstancesd": "transforms",
    "VoronoiRegionsd": "transforms",
    "naive_blob_dice": "reference",
    "naive_blob_dice_ce": "reference",
    "naive_blob_loss": "reference",
    "naive_blob_tversky": "reference",
    "naive_cc_dice": "reference",
    "naive_cc_dice_ce": "reference",
    "vectorized_blob_loss": "reference",
    "vectorized_cc_loss": "reference",
}

if TYPE_CHECKING:  # pragma: no cover
    from .reference import (
        naive_blob_dice,
        naive_blob_dice_ce,
        naive_blob_loss,
        naive_blob_tversky,
        naive_cc_dice,
        naive_cc_dice_ce,
        vectorized_blob_loss,
        vectorized_cc_loss,
    )
    from .transforms import LabelInstancesd, VoronoiRegionsd


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blobbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BlobDiceCELoss",
    "BlobDiceLoss",
    "BlobMetrics",
    "BlobTverskyLoss",
    "CCDiceCELoss",
    "CCDiceLoss",
    "CCDiceMetric",
    "InstanceStats",
    "LabelInstancesd",
    "VoronoiRegionsd",
    "blob_dice",
    "blob_dice_ce",
    "blob_metrics",
    "blob_tversky",
    "cc_dice",
    "cc_dice_ce",
    "cc_metrics",
    "dense_label_limit",
    "detection_counts",
    "has_cuda_kernels",
    "instance_stats",
    "label_instances",
    "naive_blob_dice",
    "naive_blob_dice_ce",
    "naive_blob_loss",
    "naive_blob_tversky",
    "naive_cc_dice",
    "naive_cc_dice_ce",
    "vectorized_blob_loss",
    "vectorized_cc_loss",
    "voronoi_regions",
]
if importlib.util.find_spec("monai") is None:  # `from blobbench import *` works without the extra
    __all__.remove("LabelInstancesd")
    __all__.remove("VoronoiRegionsd")

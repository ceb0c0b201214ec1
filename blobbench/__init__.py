"""blobbench: fused instance-aware blob losses for PyTorch, with references and benchmarks.

``torch.ops.blob.dice`` / ``torch.ops.blob.tversky`` compute every per-instance term of blob
loss (Kofler et al. 2022) in one pass over the voxels, on the CPU and on CUDA.
"""
from ._ops import dense_label_limit, has_cuda_kernels
from .instances import label_instances
from .losses import BlobDiceLoss, BlobTverskyLoss, blob_dice, blob_tversky
from .metrics import BlobMetrics, blob_metrics, detection_counts
from .stats import InstanceStats, instance_stats
from .transforms import LabelInstancesd
from .reference import (
    naive_blob_dice,
    naive_blob_loss,
    naive_blob_tversky,
    vectorized_blob_loss,
)

__version__ = "0.1.0"

__all__ = [
    "BlobDiceLoss",
    "BlobMetrics",
    "InstanceStats",
    "LabelInstancesd",
    "blob_metrics",
    "detection_counts",
    "instance_stats",
    "BlobTverskyLoss",
    "blob_dice",
    "blob_tversky",
    "dense_label_limit",
    "has_cuda_kernels",
    "label_instances",
    "naive_blob_dice",
    "naive_blob_loss",
    "naive_blob_tversky",
    "vectorized_blob_loss",
]

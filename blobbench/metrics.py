"""The paper's detection and volumetric metrics (Kofler et al. 2022, section 2.5), vectorised.

Instances are the connected components (cc3d) of the ground truth and of the binarised
prediction (or integer instance maps given as they are). Per (b, c), following the paper:

- a **true positive** (TP) is a *predicted* blob with at least one voxel on a ground-truth blob;
- a **false positive** (FP) is any other predicted blob (it touches no ground-truth voxel);
- a **false negative** (FN) is a *ground-truth* blob that no predicted voxel touches;
- instance sensitivity ``S = TP / (TP + FN)``, instance precision ``P = TP / (TP + FP)``,
  instance F1 ``= 2 S P / (S + P)`` (which equals ``2 TP / (2 TP + FP + FN)``);
- volumetric Dice ``DSC = 2 |P & G| / (|P| + |G|)``, sensitivity ``|P & G| / |G|``, precision
  ``|P & G| / |P|``.

Splits and merges, as the definitions count them:

- **split**: one ground-truth blob and two disconnected predicted pieces, both on it: TP = 2,
  FP = 0, FN = 0, so S = P = F1 = 1. TP counts predicted blobs, so it can exceed the number of
  ground-truth blobs; ``detection_counts`` also reports ``gt_detected``, the ground-truth blobs
  that some prediction touches.
- **merge**: two ground-truth blobs and one predicted blob covering both: TP = 1, FP = 0, FN = 0,
  so S = P = F1 = 1.

Neither is penalised by the detection metrics (the volumetric ones see what the extra or missing
voxels cost).

A ratio whose denominator is 0 has nothing to get wrong and is 1 (S with no ground-truth blobs
and nothing touching them, P with no predicted blobs); F1 and DSC are then 1 only when both sides
are empty, else 0. Counting is done with one ``torch.unique`` over plane-offset ids: no loop over
instances.

Layout: ``(B, C, *spatial)``. 5-D inputs are volumes; a 3-D or 4-D input must be confirmed with
``spatial_dims`` (or a connectivity of that dimensionality), since it may be one volume missing
its batch or channel dims.
"""

from __future__ import annotations

import torch

from .instances import check_spatial_dims, label_instances, spatial_dims_of

__all__ = ["METRIC_NAMES", "blob_metrics", "detection_counts", "BlobMetrics"]

METRIC_NAMES = ("f1", "sensitivity", "precision", "dice", "volumetric_sensitivity", "volumetric_precision")


def _as_instances(t: torch.Tensor, connectivity, spatial_dims, name) -> torch.Tensor:
    if t.dtype == torch.bool:
        return label_instances(t, connectivity, spatial_dims=spatial_dims, dtype=torch.int64).to(t.device)
    if t.is_floating_point():
        raise TypeError(
            f"{name} must be a bool mask or an integer instance map, got {t.dtype}; "
            "threshold probabilities first (BlobMetrics does with `threshold`)"
        )
    if (t < 0).any():
        raise ValueError(f"{name} must be >= 0 (0 = background)")
    return t.long()


def _count_ids(inst: torch.Tensor, planes: int) -> torch.Tensor:
    """Distinct non-zero ids per plane: ``Tensor[planes]``."""
    flat = inst.reshape(planes, -1)
    stride = int(flat.max()) + 1 if flat.numel() else 1
    keyed = flat + torch.arange(planes, device=flat.device).unsqueeze(1) * stride
    keys = torch.unique(keyed[flat > 0])
    return torch.bincount(torch.div(keys, stride, rounding_mode="floor"), minlength=planes)


def detection_counts(
    y_pred: torch.Tensor,
    y: torch.Tensor,
    *,
    connectivity: int | None = None,
    spatial_dims: int | None = None,
) -> dict:
    """TP, FP, FN, blob counts and voxel overlaps per (b, c) (the module's definitions).

    Args:
        y_pred: ``Tensor[B, C, *spatial]``: a bool mask (labelled here with cc3d) or an integer
            instance map of the prediction.
        y: the ground truth, the same way (bool mask or instance map, e.g. from
            :func:`blobbench.label_instances`), of ``y_pred``'s shape.
        connectivity: for the cc3d labelling of bool masks (default 26 in 3D, 8 in 2D).
        spatial_dims: 1, 2 or 3; required for 3-D and 4-D inputs (``(B, C, L)``,
            ``(B, C, H, W)``) unless ``connectivity`` implies it.

    Returns:
        dict of ``Tensor[B, C]`` (int64): ``tp`` (predicted blobs touching the truth), ``fp``
        (the other predicted blobs), ``fn`` (true blobs nothing touches), ``gt_detected`` (true
        blobs something touches), ``n_pred``, ``n_gt``, ``inter`` (voxels in both),
        ``pred_voxels``, ``gt_voxels``.
    """
    return _detection_counts(y_pred, y, connectivity, spatial_dims, "detection_counts")


def _detection_counts(y_pred, y, connectivity, spatial_dims, fn) -> dict:
    if y_pred.shape != y.shape:
        raise ValueError(f"{fn}: y_pred and y must have the same shape, got {tuple(y_pred.shape)} and {tuple(y.shape)}")
    spatial = spatial_dims_of(y.shape, spatial_dims, connectivity, fn=fn, arg="y")
    B, C = y.shape[:2]
    pred = _as_instances(y_pred, connectivity, spatial, "y_pred")
    gt = _as_instances(y, connectivity, spatial, "y").to(pred.device)
    both = (pred > 0) & (gt > 0)
    planes = B * C
    n_pred, n_gt = _count_ids(pred, planes), _count_ids(gt, planes)
    tp = _count_ids(torch.where(both, pred, 0), planes)  # predicted blobs touching the truth
    detected = _count_ids(torch.where(both, gt, 0), planes)  # true blobs touched by the prediction
    inter = both.reshape(planes, -1).sum(1)
    out = {
        "tp": tp,
        "fp": n_pred - tp,
        "fn": n_gt - detected,
        "gt_detected": detected,
        "n_pred": n_pred,
        "n_gt": n_gt,
        "inter": inter,
        "pred_voxels": (pred > 0).reshape(planes, -1).sum(1),
        "gt_voxels": (gt > 0).reshape(planes, -1).sum(1),
    }
    return {k: v.view(B, C) for k, v in out.items()}


def _ratio(num, den, empty_value):
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, empty_value))


def blob_metrics(
    y_pred: torch.Tensor,
    y: torch.Tensor,
    *,
    connectivity: int | None = None,
    spatial_dims: int | None = None,
) -> dict:
    """Instance F1 / sensitivity / precision and volumetric Dice / sensitivity / precision.

    ``sensitivity = TP / (TP + FN)``, ``precision = TP / (TP + FP)``,
    ``f1 = 2 * sensitivity * precision / (sensitivity + precision)`` (paper section 2.5; the
    module docstring says how splits and merges count).

    Args: as :func:`detection_counts`.

    Returns:
        dict name -> ``Tensor[B, C]`` float64, names as :data:`METRIC_NAMES`.

    Example::

        gt = torch.zeros(1, 1, 8, 8, 8, dtype=torch.bool); gt[0, 0, 2:4, 2:4, 2:4] = True
        blob_metrics(gt, gt)["f1"]                              # tensor([[1.]])
        blob_metrics(gt[:, :, 0], gt[:, :, 0], spatial_dims=2)  # 2D images (B, C, H, W)
    """
    return _blob_metrics_of(y_pred, y, connectivity, spatial_dims, "blob_metrics")


def _blob_metrics_of(y_pred, y, connectivity, spatial_dims, fn) -> dict:
    c = _detection_counts(y_pred, y, connectivity, spatial_dims, fn)
    sensitivity = _ratio(c["tp"], c["tp"] + c["fn"], 1.0)
    precision = _ratio(c["tp"], c["tp"] + c["fp"], 1.0)
    sp = sensitivity + precision
    f1 = torch.where(sp > 0, 2 * sensitivity * precision / sp.clamp(min=1e-300), torch.zeros_like(sp))
    dsc_den = c["pred_voxels"] + c["gt_voxels"]
    return {
        "f1": f1,
        "sensitivity": sensitivity,
        "precision": precision,
        "dice": _ratio(2 * c["inter"], dsc_den, 1.0),
        "volumetric_sensitivity": _ratio(c["inter"], c["gt_voxels"], 1.0),
        "volumetric_precision": _ratio(c["inter"], c["pred_voxels"], 1.0),
    }


class BlobMetrics:
    """MONAI-style cumulative metric: call it per batch, ``aggregate()`` over the dataset.

    Args:
        threshold: probabilities (or, with ``sigmoid=True``, logits) above it are foreground;
            bool or integer ``y_pred`` is used as is.
        sigmoid: apply a sigmoid to floating ``y_pred`` first.
        connectivity: for cc3d (default 26 in 3D, 8 in 2D).
        spatial_dims: 1, 2 or 3; required for 3-D and 4-D inputs (``(B, C, L)``,
            ``(B, C, H, W)``) unless ``connectivity`` implies it.
        reduction: ``"mean"`` over all (b, c) seen (default), ``"mean_batch"`` per channel, or
            ``"none"`` for the ``Tensor[N, C]`` of every case.

    Example::

        metric = BlobMetrics(sigmoid=True)
        for logits, label in loader_outputs:
            metric(logits, label > 0)
        print(metric.aggregate())     # {'f1': ..., 'sensitivity': ..., ...}
        metric.reset()
    """

    def __init__(
        self,
        threshold: float = 0.5,
        *,
        sigmoid: bool = False,
        connectivity: int | None = None,
        spatial_dims: int | None = None,
        reduction: str = "mean",
    ):
        if reduction not in ("mean", "mean_batch", "none"):
            raise ValueError(f"BlobMetrics: reduction must be 'mean', 'mean_batch' or 'none', got {reduction!r}")
        check_spatial_dims(spatial_dims, "BlobMetrics")
        self.threshold, self.sigmoid, self.connectivity, self.reduction = threshold, sigmoid, connectivity, reduction
        self.spatial_dims = spatial_dims
        self.reset()

    def reset(self) -> None:
        self._buffer = {k: [] for k in METRIC_NAMES}

    def __call__(self, y_pred: torch.Tensor, y: torch.Tensor) -> dict:
        if y_pred.is_floating_point():
            p = torch.sigmoid(y_pred) if self.sigmoid else y_pred
            y_pred = p > self.threshold
        y = y if not y.is_floating_point() else y > 0.5
        m = _blob_metrics_of(y_pred, y, self.connectivity, self.spatial_dims, "BlobMetrics")
        for k, v in m.items():
            self._buffer[k].append(v.cpu())
        return m

    def aggregate(self, reduction: str | None = None) -> dict:
        reduction = reduction or self.reduction
        if not self._buffer["f1"]:
            raise RuntimeError("BlobMetrics.aggregate() before any call: nothing to aggregate")
        out = {}
        for k, vs in self._buffer.items():
            v = torch.cat(vs)  # (N, C)
            out[k] = v.mean() if reduction == "mean" else v.mean(0) if reduction == "mean_batch" else v
        return out

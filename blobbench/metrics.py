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
from .voronoi import check_regions, region_error, voronoi_regions

__all__ = ["METRIC_NAMES", "blob_metrics", "detection_counts", "BlobMetrics", "cc_metrics", "CCDiceMetric"]

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


def cc_metrics(
    pred: torch.Tensor,
    instances: torch.Tensor,
    regions: torch.Tensor | None = None,
    *,
    spacing=None,
    spatial_dims: int | None = None,
) -> dict:
    """Per-component (Voronoi) Dice of a hard prediction: every ground-truth instance scored on its
    region (CC-Metrics, Jaus et al. 2025; MONAI ``DiceMetric(per_component=True)``), batched and
    multi-class, from one pass over the voxels.

    For each (b, c) plane with instances and each region k of it (docs/design.md, section 9):
    tp, fp, fn = the region's voxels predicted and in an instance, predicted and not, in an
    instance and not predicted; ``dice = 2 tp / (2 tp + fp + fn)`` (region k holds instance k, so
    the denominator is never 0). Planes without instances have no component and no entry.

    Args:
        pred: ``Tensor[B, C, *spatial]``: the hard prediction per channel, bool or integer
            (non-zero = foreground). For a class map, pass its one-hot channels (``class_map == c``).
        instances: ``Tensor[B, C, *spatial]`` integer instance ids per channel (0 = background),
            e.g. :func:`blobbench.label_instances` of the ground truth.
        regions: their Voronoi regions (:func:`blobbench.voronoi_regions`), or None to compute them
            (with ``spacing``; the slow part, see there).
        spacing, spatial_dims: as in :func:`blobbench.voronoi_regions`; ``spatial_dims`` confirms
            the layout of 3-D and 4-D inputs.

    Returns:
        dict of 1-D tensors, one entry per component, ordered by (b, c, id): ``b``, ``c``, ``id``
        (int64: where and which instance), ``dice`` (float64), ``tp``, ``fp``, ``fn``, ``voxels``
        (the region's size) (int64).

    Example::

        inst = label_instances(gt_mask)                       # (B, C, D, H, W)
        m = cc_metrics(logits > 0, inst)
        m["dice"].mean()                                      # mean over all components
    """
    fn = "cc_metrics"
    if pred.shape != instances.shape:
        raise ValueError(
            f"{fn}: pred and instances must have the same shape, got {tuple(pred.shape)} and {tuple(instances.shape)}"
        )
    if spatial_dims is None and spacing is not None and not isinstance(spacing, (int, float)) and instances.dim() < 5:
        spatial_dims = len(spacing)
    spatial_dims_of(instances.shape, spatial_dims, None, fn=fn, arg="instances")
    if pred.is_floating_point():
        raise TypeError(f"{fn}: pred must be a bool or integer hard prediction, got {pred.dtype}; threshold first")
    if instances.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"{fn}: instances must hold integer ids (uint8, int16, int32 or int64), got {instances.dtype}")
    if instances.numel() and int(instances.min()) < 0:
        raise ValueError(f"{fn}: instances must be >= 0 (0 = background), found {int(instances.min())}")
    if regions is None:
        regions = voronoi_regions(instances, spacing, spatial_dims=instances.dim() - 2)
    else:
        check_regions(instances, regions, fn)
    B, C = instances.shape[:2]
    planes = B * C
    reg = regions.reshape(planes, -1).long()
    pred_fg = (pred.reshape(planes, -1) != 0).to(reg.device)
    truth = instances.reshape(planes, -1) > 0
    # One pass: the key of a voxel is (plane, region, truth, prediction); unique keys per plane and region.
    stride = int(reg.max()) + 1 if reg.numel() else 1
    key = reg + torch.arange(planes, device=reg.device).unsqueeze(1) * stride
    ids, inverse = torch.unique(key.reshape(-1), return_inverse=True)
    code = truth.reshape(-1).long() * 2 + pred_fg.reshape(-1).long()
    hist = torch.bincount(inverse * 4 + code, minlength=ids.numel() * 4).view(-1, 4)
    tn, fp, fn_, tp = hist.unbind(1)
    plane = torch.div(ids, stride, rounding_mode="floor")
    region_id = ids - plane * stride
    # The checks of the regions, on the same table: every region holds its instance.
    n_t = fn_ + tp
    has_instances = torch.zeros(planes, dtype=torch.long, device=reg.device).index_add_(0, plane, (n_t > 0).long()) > 0
    bad = (region_id > 0) & (n_t == 0) | (region_id == 0) & has_instances[plane]
    if bool(bad.any()):
        j = int(bad.nonzero()[0])
        raise region_error(fn, int(plane[j]) // C, int(plane[j]) % C, int(region_id[j]))
    keep = region_id > 0
    tp, fp, fn_ = tp[keep], fp[keep], fn_[keep]
    dice = (2 * tp).double() / (2 * tp + fp + fn_).double()
    plane = plane[keep]
    return {
        "b": torch.div(plane, C, rounding_mode="floor"),
        "c": plane % C,
        "id": region_id[keep],
        "dice": dice,
        "tp": tp,
        "fp": fp,
        "fn": fn_,
        "voxels": (tp + fp + fn_ + tn[keep]),
    }


class CCDiceMetric:
    """Cumulative per-component (Voronoi) Dice, MONAI-style: call it per batch, ``aggregate()``.

    Args:
        threshold: probabilities (or, with ``sigmoid=True``, logits) above it are foreground; bool
            or integer predictions are used as they are.
        sigmoid: apply a sigmoid to floating predictions first.
        spacing, spatial_dims: for the regions computed when a call passes none (see
            :func:`cc_metrics`).
        reduction: ``"mean"``: the mean over every component seen (ccmetrics' ``"overall"``);
            ``"mean_case"``: the mean over (b, c) cases with instances of their components' mean
            (ccmetrics' ``"patient"``, MONAI's per-component value per case); ``"none"``: the
            dict of every component (as :func:`cc_metrics` returns, ``b`` counting across calls).

    Cases without instances have no component and are left out (ccmetrics and MONAI give them
    1 or 0 by the prediction, or NaN).

    Example::

        metric = CCDiceMetric(sigmoid=True)
        for logits, inst, regions in loader_outputs:
            metric(logits, inst, regions)
        metric.aggregate()          # tensor(0.71..., dtype=torch.float64)
    """

    def __init__(
        self,
        threshold: float = 0.5,
        *,
        sigmoid: bool = False,
        spacing=None,
        spatial_dims: int | None = None,
        reduction: str = "mean",
    ):
        if reduction not in ("mean", "mean_case", "none"):
            raise ValueError(f"CCDiceMetric: reduction must be 'mean', 'mean_case' or 'none', got {reduction!r}")
        check_spatial_dims(spatial_dims, "CCDiceMetric")
        self.threshold, self.sigmoid, self.reduction = threshold, sigmoid, reduction
        self.spacing, self.spatial_dims = spacing, spatial_dims
        self.reset()

    def reset(self) -> None:
        self._buffer = []
        self._cases = 0

    def __call__(self, y_pred: torch.Tensor, instances: torch.Tensor, regions: torch.Tensor | None = None) -> dict:
        if y_pred.is_floating_point():
            p = torch.sigmoid(y_pred) if self.sigmoid else y_pred
            y_pred = p > self.threshold
        m = cc_metrics(y_pred, instances, regions, spacing=self.spacing, spatial_dims=self.spatial_dims)
        stored = {k: v.cpu() for k, v in m.items()}
        stored["b"] = stored["b"] + self._cases
        self._cases += instances.shape[0]
        self._buffer.append(stored)
        return m

    def aggregate(self, reduction: str | None = None):
        reduction = reduction or self.reduction
        if not self._buffer:
            raise RuntimeError("CCDiceMetric.aggregate() before any call: nothing to aggregate")
        allm = {k: torch.cat([m[k] for m in self._buffer]) for k in self._buffer[0]}
        if reduction == "none":
            return allm
        dice = allm["dice"]
        if dice.numel() == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        if reduction == "mean":
            return dice.mean()
        if reduction == "mean_case":
            case = allm["b"] * (int(allm["c"].max()) + 1) + allm["c"]
            _, inv = torch.unique(case, return_inverse=True)
            sums = torch.zeros(int(inv.max()) + 1, dtype=torch.float64).index_add_(0, inv, dice)
            return (sums / torch.bincount(inv).double()).mean()
        raise ValueError(f"CCDiceMetric: reduction must be 'mean', 'mean_case' or 'none', got {reduction!r}")

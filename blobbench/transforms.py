"""MONAI dictionary transform: label instances inside a data pipeline.

``LabelInstancesd`` adds a cc3d instance map next to each label key. Label the whole volume
*before* random cropping: a crop keeps the ids (they need not be contiguous, the losses accept
that). Where a crop cuts a blob into pieces that are disconnected inside the crop, the pieces
keep one id and count as one instance, while labelling the crop anew would count each piece;
where no blob is cut, both give the same loss (``tests/test_instance_tools.py::test_crop_after_labelling``
checks both statements).
"""

from __future__ import annotations

import numpy as np
import torch

from ._optional import require
from .instances import label_instances
from .voronoi import voronoi_regions

__all__ = ["LabelInstancesd", "VoronoiRegionsd", "smallest_label_dtype"]

_DTYPES = {"uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64}


def smallest_label_dtype(max_id: int) -> torch.dtype:
    """uint8, int16, int32 or int64: the smallest that holds ``max_id``."""
    for dt in (torch.uint8, torch.int16, torch.int32, torch.int64):
        if max_id <= torch.iinfo(dt).max:
            return dt
    raise ValueError(f"{max_id} instances do not fit int64")


MapTransform = require("monai.transforms", "monai", "LabelInstancesd").MapTransform
MetaTensor = require("monai.data", "monai", "LabelInstancesd").MetaTensor


class LabelInstancesd(MapTransform):
    """Add ``{key}{postfix}``: the connected components of the label under ``key``.

    Args:
        keys: label keys; each holds a channel-first array ``(C, *spatial)`` (1 to 3 spatial dims),
            a binary mask per channel or, with ``num_classes``, a class map ``(1, *spatial)``.
        connectivity: 6, 18 or 26 in 3D (default 26), 4 or 8 in 2D (default 8).
        num_classes: label a class map per class: the result has ``num_classes`` channels,
            channel c holding the components of class c (channel 0 stays 0), ready for
            ``activation="softmax"``.
        dtype: ``"auto"`` (uint8, int16 or int32 by the instance count), or
            ``"uint8"``/``"int16"``/``"int32"``/``"int64"`` / a torch dtype (too small raises).
        postfix: suffix of the new key (default ``"_instances"``).
        allow_missing_keys: as in MONAI.

    The result is a tensor (a MetaTensor with the label's metadata when the label is one), so the
    spatial transforms that follow (crops, flips) can list the new key beside the label.
    """

    def __init__(
        self,
        keys,
        connectivity: int | None = None,
        num_classes: int | None = None,
        dtype="auto",
        postfix: str = "_instances",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if isinstance(dtype, str) and dtype != "auto" and dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto', one of {sorted(_DTYPES)} or a torch dtype, got {dtype!r}")
        if not isinstance(dtype, str) and dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be 'auto', one of {sorted(_DTYPES)} or a torch dtype, got {dtype!r}")
        self.connectivity, self.num_classes, self.dtype, self.postfix = connectivity, num_classes, dtype, postfix

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            arr = label if isinstance(label, torch.Tensor) else torch.as_tensor(np.asarray(label))
            if arr.dim() < 2 or arr.dim() > 4:
                raise ValueError(
                    f"LabelInstancesd: {key!r} must be channel-first (C, *spatial) with 1 to 3 "
                    f"spatial dims, got shape {tuple(arr.shape)}"
                )
            if arr.is_floating_point():
                if not torch.equal(arr, arr.round()):
                    raise ValueError(f"LabelInstancesd: {key!r} must hold integer labels")
                arr = arr.long()
            inst = label_instances(
                arr.as_subclass(torch.Tensor)[None],
                self.connectivity,
                spatial_dims=arr.dim() - 1,  # channel-first (C, *spatial), MONAI's layout
                num_classes=self.num_classes,
                dtype=torch.int64,
            )[0]
            if self.dtype == "auto":
                dtype = smallest_label_dtype(int(inst.max()) if inst.numel() else 0)
            else:
                dtype = _DTYPES.get(self.dtype, self.dtype)
                if inst.numel() and int(inst.max()) > torch.iinfo(dtype).max:
                    raise ValueError(f"LabelInstancesd: {int(inst.max())} instances in {key!r} do not fit {dtype}")
            inst = inst.to(dtype)
            if isinstance(label, MetaTensor):
                inst = MetaTensor(inst, meta=dict(label.meta), applied_operations=list(label.applied_operations))
            d[f"{key}{self.postfix}"] = inst
        return d


class VoronoiRegionsd(MapTransform):
    """Add ``{key}{postfix}``: the Voronoi regions of the instance map under ``key``.

    The ``regions`` of :func:`blobbench.cc_dice` / :func:`blobbench.cc_dice_ce` and
    :func:`blobbench.cc_metrics`, computed once per sample in the data pipeline instead of in the
    training step (:func:`blobbench.voronoi_regions`: scipy on the CPU, about 60 times the cost of
    a cc3d labelling of the same patch).

    Put it *after* the random crop: the regions of a crop are not the crop of the volume's regions
    (an instance outside the crop claims part of it), and a region without its instance is an
    error in the losses. (``LabelInstancesd`` goes *before* the crop.)

    Args:
        keys: keys of instance maps, channel-first integer arrays ``(C, *spatial)`` (1 to 3 spatial
            dims), e.g. the output of :class:`LabelInstancesd`.
        spacing: None (isotropic), a number or one value per spatial dim, or ``"pixdim"``: the
            voxel size of the MetaTensor under ``key`` (``MetaTensor.pixdim``).
        postfix: suffix of the new key (default ``"_regions"``).
        allow_missing_keys: as in MONAI.

    The result has the instance map's dtype (a MetaTensor with its metadata when the input is one).

    Example::

        Compose([LoadImaged("label"), LabelInstancesd("label"), RandSpatialCropd(["image", "label",
                 "label_instances"], (96, 96, 96)), VoronoiRegionsd("label_instances", spacing="pixdim")])
    """

    def __init__(self, keys, spacing=None, postfix: str = "_regions", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if isinstance(spacing, str) and spacing != "pixdim":
            raise ValueError(f"VoronoiRegionsd: spacing must be None, numbers or 'pixdim', got {spacing!r}")
        self.spacing, self.postfix = spacing, postfix

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            inst = d[key]
            arr = inst if isinstance(inst, torch.Tensor) else torch.as_tensor(np.asarray(inst))
            if arr.dim() < 2 or arr.dim() > 4:
                raise ValueError(
                    f"VoronoiRegionsd: {key!r} must be channel-first (C, *spatial) with 1 to 3 "
                    f"spatial dims, got shape {tuple(arr.shape)}"
                )
            spacing = self.spacing
            if spacing == "pixdim":
                if not isinstance(inst, MetaTensor):
                    raise ValueError(f"VoronoiRegionsd: spacing='pixdim' needs a MetaTensor under {key!r}")
                spacing = tuple(float(s) for s in inst.pixdim)[: arr.dim() - 1]
            regions = voronoi_regions(arr.as_subclass(torch.Tensor)[None], spacing, spatial_dims=arr.dim() - 1)[0]
            if isinstance(inst, MetaTensor):
                regions = MetaTensor(regions, meta=dict(inst.meta), applied_operations=list(inst.applied_operations))
            d[f"{key}{self.postfix}"] = regions
        return d

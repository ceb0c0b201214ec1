"""Instance labelling: binary or class masks to instance maps with cc3d (connected components)."""

from __future__ import annotations

import numpy as np
import torch

from ._optional import require

__all__ = ["label_instances"]

_CONNECTIVITY = {1: (2,), 2: (4, 8), 3: (6, 18, 26)}
_LAYOUT = {1: "(B, C, L)", 2: "(B, C, H, W)", 3: "(B, C, D, H, W)"}
_KIND = {1: "lines", 2: "images", 3: "volumes"}


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def check_spatial_dims(spatial_dims, fn: str) -> None:
    """Raise unless ``spatial_dims`` is None or the int 1, 2 or 3."""
    if spatial_dims is None:
        return
    if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int) or spatial_dims not in (1, 2, 3):
        raise ValueError(f"{fn}: spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")


def spatial_dims_of(shape, spatial_dims: int | None, connectivity: int | None, *, fn: str, arg: str) -> int:
    """The number of spatial dims of a ``(B, C, *spatial)`` tensor, with the layout confirmed.

    A 5-D tensor is read as ``(B, C, D, H, W)``. A 3-D or 4-D tensor could also be one volume
    missing its batch or channel dims, so the caller must confirm its layout with
    ``spatial_dims`` or with a connectivity of that dimensionality; otherwise this raises a
    ValueError naming the expected layout. Raises too when the two disagree with the shape.

    Args:
        shape: the tensor's shape.
        spatial_dims: 1, 2 or 3, or None.
        connectivity: the cc3d connectivity the caller asked for, or None.
        fn, arg: the function and argument names for the messages.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3 or len(shape) > 5:
        raise ValueError(
            f"{fn}: {arg} must have shape (B, C, *spatial) with 1 to 3 spatial dims, got {_shape_str(shape)}"
        )
    spatial = len(shape) - 2
    if spatial_dims is not None:
        check_spatial_dims(spatial_dims, fn)
        if spatial_dims != spatial:
            raise ValueError(
                f"{fn}: {arg} of shape {_shape_str(shape)} has {spatial} spatial dim(s) in the expected "
                f"(B, C, *spatial) layout, not spatial_dims={spatial_dims}; give {spatial_dims}D data as "
                f"{_LAYOUT[spatial_dims]} (e.g. {arg}[None, None] for a single one)"
            )
    if connectivity is not None and connectivity not in _CONNECTIVITY[spatial]:
        raise ValueError(
            f"{fn}: connectivity must be one of {_CONNECTIVITY[spatial]} for {spatial}D {arg} "
            f"{_LAYOUT[spatial]}, got {connectivity} ({arg} has shape {_shape_str(shape)}; the expected "
            f"layout is (B, C, *spatial))"
        )
    if spatial < 3 and spatial_dims is None and connectivity is None:
        raise ValueError(
            f"{fn}: {arg} of shape {_shape_str(shape)} is ambiguous: the expected layout (B, C, *spatial) "
            f"reads it as B={shape[0]}, C={shape[1]} {spatial}D {_KIND[spatial]} {_LAYOUT[spatial]}, but it "
            f"may be a single volume without its batch or channel dims. Pass spatial_dims={spatial} to "
            f"confirm, or give volumes as (B, C, D, H, W), e.g. {arg}[None, None] for one volume"
        )
    return spatial


def _label_plane(mask: np.ndarray, connectivity: int) -> np.ndarray:
    cc3d = require("cc3d", "instances", "label_instances")
    if mask.ndim == 1:
        # cc3d labels 2D and 3D arrays: a line is a 1 x L image.
        return _label_plane(mask[None], 4)[0]
    return cc3d.connected_components(np.ascontiguousarray(mask), connectivity=connectivity)


def label_instances(
    mask: torch.Tensor | np.ndarray,
    connectivity: int | None = None,
    *,
    spatial_dims: int | None = None,
    num_classes: int | None = None,
    dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """Connected components of a mask, batched over (B, C): the ``instances`` of the blob losses.

    Args:
        mask: ``[B, C, *spatial]`` (1 to 3 spatial dims), tensor or array: ``(B, C, D, H, W)``
            volumes, or, with ``spatial_dims=2`` (or a 2D ``connectivity``), ``(B, C, H, W)``
            images, with ``spatial_dims=1`` ``(B, C, L)`` lines. A 3-D or 4-D mask without either
            is refused, because it may be one volume missing its batch or channel dims
            (``mask[None, None]`` makes one ``(D, H, W)`` volume a batch). Without
            ``num_classes`` each channel is a binary mask (non-zero = foreground) and is labelled
            on its own. With ``num_classes`` it must be a class map ``[B, 1, *spatial]`` of ints
            in ``[0, num_classes)``; channel c of the result labels the components of class c
            (channel 0, the background class, stays 0), ready for ``activation="softmax"``.
        connectivity: neighbourhood, 6, 18 or 26 in 3D (default 26), 4 or 8 in 2D (default 8).
        spatial_dims: 1, 2 or 3: confirms the layout of a 3-D or 4-D ``mask`` (must equal
            ``mask.ndim - 2``).
        num_classes: see ``mask``.
        dtype: integer dtype of the result (int32 by default; uint8 or int16 save memory when
            there are fewer than 255 or 32767 instances per channel).

    Returns:
        ``Tensor[B, C or num_classes, *spatial]`` of ``dtype`` on ``mask``'s device: 0 for
        background, 1..N for the N components of each (b, c).
    """
    device = mask.device if isinstance(mask, torch.Tensor) else torch.device("cpu")
    arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if arr.ndim < 3 or arr.ndim > 5:
        raise ValueError(
            f"label_instances: mask must have shape (B, C, *spatial) with 1 to 3 spatial dims, got {arr.shape}"
        )
    if num_classes is not None:
        if arr.shape[1] != 1:
            raise ValueError(f"with num_classes, mask must be a class map (B, 1, *spatial), got {arr.shape}")
        if arr.min() < 0 or arr.max() >= num_classes:
            raise ValueError(f"class map values must be in [0, {num_classes}), found [{arr.min()}, {arr.max()}]")
        arr = np.concatenate([(arr == c) for c in range(num_classes)], axis=1)
        arr[:, 0] = False
    spatial = spatial_dims_of(arr.shape, spatial_dims, connectivity, fn="label_instances", arg="mask")
    if connectivity is None:
        connectivity = _CONNECTIVITY[spatial][-1]
    if dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
        raise ValueError(f"dtype must be torch.uint8, int16, int32 or int64, got {dtype}")
    out = np.zeros(arr.shape, dtype=np.int64)
    for b in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            out[b, c] = _label_plane(arr[b, c] != 0, connectivity)
    limit = torch.iinfo(dtype).max
    if out.max(initial=0) > limit:
        raise ValueError(f"{out.max()} instances in one channel do not fit dtype {dtype}; use a wider dtype")
    return torch.from_numpy(out).to(device=device, dtype=dtype)

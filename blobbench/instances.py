"""Instance labelling: binary or class masks to instance maps with cc3d (connected components)."""

from __future__ import annotations

import numpy as np
import torch

from ._optional import require

__all__ = ["label_instances"]

_CONNECTIVITY = {1: (2,), 2: (4, 8), 3: (6, 18, 26)}


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
    num_classes: int | None = None,
    dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """Connected components of a mask, batched over (B, C): the ``instances`` of the blob losses.

    Args:
        mask: ``[B, C, *spatial]`` (1 to 3 spatial dims), tensor or array. Without
            ``num_classes`` each channel is a binary mask (non-zero = foreground) and is labelled
            on its own. With ``num_classes`` it must be a class map ``[B, 1, *spatial]`` of ints
            in ``[0, num_classes)``; channel c of the result labels the components of class c
            (channel 0, the background class, stays 0), ready for ``activation="softmax"``.
        connectivity: neighbourhood, 6, 18 or 26 in 3D (default 26), 4 or 8 in 2D (default 8).
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
        raise ValueError(f"mask must have shape (B, C, *spatial) with 1 to 3 spatial dims, got {arr.shape}")
    spatial = arr.ndim - 2
    allowed = _CONNECTIVITY[spatial]
    if connectivity is None:
        connectivity = allowed[-1]
    if connectivity not in allowed:
        raise ValueError(f"connectivity must be one of {allowed} for {spatial}D masks, got {connectivity}")
    if num_classes is not None:
        if arr.shape[1] != 1:
            raise ValueError(f"with num_classes, mask must be a class map (B, 1, *spatial), got {arr.shape}")
        if arr.min() < 0 or arr.max() >= num_classes:
            raise ValueError(f"class map values must be in [0, {num_classes}), found [{arr.min()}, {arr.max()}]")
        arr = np.concatenate([(arr == c) for c in range(num_classes)], axis=1)
        arr[:, 0] = False
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

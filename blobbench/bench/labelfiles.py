"""Users' own label files for the benchmark: NIfTI (nibabel), .npy and .npz.

A label file holds a 2D or 3D label map (0 = background, any non-zero value = foreground). It is
labelled into instances with cc3d (connected components of the foreground) and cut into
training crops as a dataset profile says; crops keep the volume's instance ids, as a pipeline
that labels before cropping does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["load_label_volume", "crops_from_labels"]


def load_label_volume(path: str | Path, key: str | None = None) -> np.ndarray:
    """The label map in ``path`` as a 3D integer array (a 2D map gets a leading axis of 1).

    Args:
        path: ``.nii``/``.nii.gz`` (needs nibabel), ``.npy`` or ``.npz``.
        key: the array's name in an ``.npz`` (default: ``"label"`` if present, else the only array).

    Raises:
        ValueError: unknown suffix, wrong number of dims, non-integer values, or an ambiguous .npz.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        try:
            import nibabel as nib
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("reading NIfTI needs nibabel: pip install nibabel "
                              "(or pip install 'blobbench[bench]')") from e
        arr = np.asanyarray(nib.load(str(path)).dataobj)
    elif name.endswith(".npy"):
        arr = np.load(path)
    elif name.endswith(".npz"):
        with np.load(path) as data:
            names = list(data.keys())
            if key is None:
                if "label" in names:
                    key = "label"
                elif len(names) == 1:
                    key = names[0]
                else:
                    raise ValueError(f"{path}: holds arrays {names}; name one with key= (--labels-key)")
            if key not in names:
                raise ValueError(f"{path}: no array {key!r}, it holds {names}")
            arr = data[key]
    else:
        raise ValueError(f"{path}: label files must be .nii, .nii.gz, .npy or .npz")
    arr = np.squeeze(np.asarray(arr))
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected a 2D or 3D label map, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{path}: label values must be integers")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{path}: label values must be integers, got dtype {arr.dtype}")
    return arr


def crops_from_labels(labels: np.ndarray, crop, n_crops: int, seed: int = 0, *,
                      connectivity: int = 26) -> torch.Tensor:
    """Label the foreground of ``labels`` with cc3d, then cut ``n_crops`` crops of shape ``crop``.

    Each crop is centred on a random foreground voxel (a random position if there is none) and
    shifted to lie inside the volume; a dimension smaller than the crop is taken whole.

    Returns:
        ``Tensor[n_crops, 1, *crop']`` int32 instance ids (crop' = crop clipped to the volume).
    """
    import cc3d

    inst = cc3d.connected_components(np.ascontiguousarray(labels != 0), connectivity=connectivity)
    if int(inst.max(initial=0)) > np.iinfo(np.int32).max:
        raise ValueError("more instances than int32 holds")
    inst = inst.astype(np.int32)
    size = np.minimum(np.asarray(crop, dtype=int), inst.shape)
    rng = np.random.default_rng(seed)
    fg = np.flatnonzero(inst)
    out = []
    for _ in range(n_crops):
        if fg.size:
            center = np.array(np.unravel_index(int(fg[rng.integers(fg.size)]), inst.shape))
        else:
            center = np.array([rng.integers(s) for s in inst.shape])
        lo = np.clip(center - size // 2, 0, np.array(inst.shape) - size)
        out.append(inst[tuple(slice(a, a + s) for a, s in zip(lo, size))])
    return torch.from_numpy(np.stack(out)[:, None].copy())

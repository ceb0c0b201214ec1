"""Seeded synthetic instance maps shaped like the paper's datasets (docs/design.md, "The dataset profiles").

Blobs are unions of 1 to 3 overlapping ellipsoids (irregular shapes) with a heavy-tailed size
distribution (many tiny blobs, a few large ones, as in the paper's Fig. 4), painted into a
binary mask and labelled with cc3d, so the ids are connected components like a user's.

Two generators:

- :func:`synthetic_instances`: blobs placed anywhere (touching blobs merge, as in real data), for
  the dataset profiles;
- :func:`grid_instances`: exactly ``n`` blobs, one per cell of a grid, for the sweeps over the
  instance count and the volume, where the count must be exact.

Both are deterministic in their seed and cached on disk (``$BLOBBENCH_CACHE``, default
``~/.cache/blobbench``); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Profile", "PROFILES", "synthetic_instances", "grid_instances", "logits_like", "profile_batch", "cache_dir"]

_GENERATOR_VERSION = 1  # bump when the generators change: old cache entries are then ignored


@dataclass(frozen=True)
class Profile:
    name: str
    crop: tuple  # (D, H, W) training crop
    batch: int  # crops per batch x batch size, as in the paper's table
    blobs_per_crop: float
    blobs_std: float
    crops: int = 2  # crops drawn per volume (the "crops" of "crops x batch")
    description: str = ""


# Blob counts per *crop* drawn before labelling (touching blobs merge, so SHANEL draws more than
# the ~250 components per crop it ends with); the paper gives counts per volume.
PROFILES = {
    "ms": Profile("ms", (32, 192, 192), 8, 25.0, 23.0, 2, "MS lesions (MR), 2 x 4"),
    "lits": Profile("lits", (64, 192, 192), 4, 12.4, 14.9, 2, "LiTS liver tumours (CT), 2 x 2"),
    "disco": Profile("disco", (64, 192, 192), 12, 28.3, 24.4, 2, "DISCO-MS (microscopy), 2 x 6"),
    "shanel": Profile("shanel", (32, 128, 128), 18, 330.0, 170.0, 6, "SHANEL (microscopy), 6 x 3"),
    "deepmact": Profile("deepmact", (48, 192, 192), 8, 7.0, 8.1, 2, "DeepMACT (microscopy), 2 x 4"),
}


def cache_dir() -> Path:
    """Where generated volumes are cached (``$BLOBBENCH_CACHE`` or ``~/.cache/blobbench``)."""
    return Path(os.environ.get("BLOBBENCH_CACHE", Path.home() / ".cache" / "blobbench"))


def _cached(key: str, make):
    """``make()`` (an int array), memoised on disk under a hash of ``key``."""
    name = hashlib.sha1(f"v{_GENERATOR_VERSION}:{key}".encode()).hexdigest()[:20] + ".npy"
    path = cache_dir() / name
    try:
        return np.load(path)
    except (OSError, ValueError):
        pass
    arr = make()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, path)  # atomic: concurrent writers leave one whole file
    except OSError:
        pass  # a read-only home is not an error: the volume is just not cached
    return arr


def paint_blob(mask, rng, center, r, lo_bound=None, hi_bound=None, *, spread: float = 0.6):
    """Paint (in place) a union of 1 to 3 ellipsoids of radius about ``r``, their centres drawn
    around ``center`` with std ``spread * r``, clipped to the box ``[lo_bound, hi_bound)``
    (default: the whole array). Any number of dims."""
    nd = mask.ndim
    lo_bound = np.zeros(nd, dtype=int) if lo_bound is None else lo_bound
    hi_bound = np.array(mask.shape) if hi_bound is None else hi_bound
    for _part in range(int(rng.integers(1, 4))):
        radii = r * rng.uniform(0.6, 1.4, size=nd)
        c = center + rng.normal(0, r * spread, size=nd)
        lo = np.maximum(np.floor(c - radii).astype(int), lo_bound)
        hi = np.minimum(np.ceil(c + radii).astype(int) + 1, hi_bound)
        if np.any(hi <= lo):
            continue
        grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
        d = sum(((g - cc) / rr) ** 2 for g, cc, rr in zip(grids, c, radii))
        mask[tuple(slice(a, b) for a, b in zip(lo, hi))] |= d <= 1.0


def _pareto_radius(rng, cap):
    # Pareto radii: median ~2 voxels, a heavy tail up to ``cap``.
    return min(1.0 + rng.pareto(2.0) * 1.5, cap)


def synthetic_instances(shape, n_blobs: int, seed: int, *, connectivity: int = 26, cache: bool = True) -> np.ndarray:
    """One instance map of ``shape`` (3D) with about ``n_blobs`` components (int32).

    Blobs are placed uniformly and may touch (they then merge into one component, as lesions do),
    so the component count can be below ``n_blobs``.
    """
    import cc3d

    shape = tuple(int(s) for s in shape)

    def make():
        rng = np.random.default_rng(seed)
        mask = np.zeros(shape, dtype=bool)
        for _ in range(int(n_blobs)):
            r = _pareto_radius(rng, min(shape) / 6 + 1)
            center = np.array([rng.uniform(0, s) for s in shape])
            paint_blob(mask, rng, center, r)
        return cc3d.connected_components(mask, connectivity=connectivity).astype(np.int32)

    return _cached(f"synthetic:{shape}:{n_blobs}:{seed}:{connectivity}", make) if cache else make()


def _grid_for(shape, n):
    """Grid dims (one per axis, product >= n) with cells as close to cubes as the shape allows."""
    shape = np.array(shape, dtype=float)
    edge = (shape.prod() / n) ** (1 / 3)
    grid = np.maximum(1, np.floor(shape / edge)).astype(int)
    while grid.prod() < n:  # grow the axis with the largest cells
        grid[np.argmax(shape / grid)] += 1
    return grid


def grid_instances(shape, n: int, seed: int, *, cache: bool = True) -> np.ndarray:
    """An instance map of ``shape`` (3D) with exactly ``n`` components (ids 1..n, int32).

    The volume is cut into a grid of cells; ``n`` random cells each get one irregular blob with a
    heavy-tailed size, kept one voxel inside its cell so that blobs never touch.

    Raises:
        ValueError: if ``n`` blobs do not fit (cells must be at least 3 voxels wide).
    """
    import cc3d

    shape = tuple(int(s) for s in shape)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")

    def make():
        rng = np.random.default_rng(seed)
        mask = np.zeros(shape, dtype=bool)
        if n == 0:
            return mask.astype(np.int32)
        grid = _grid_for(shape, n)
        cell = np.array(shape) // grid
        if np.any(cell < 3):
            raise ValueError(f"{n} separate blobs do not fit in a volume of shape {shape}")
        for flat in rng.choice(int(grid.prod()), size=n, replace=False):
            lo = np.array(np.unravel_index(int(flat), tuple(grid))) * cell
            inner_lo, inner_hi = lo + 1, lo + cell - 1  # one voxel of margin on each side
            half = (inner_hi - inner_lo) / 2
            center = inner_lo + half - 0.5 + rng.uniform(-0.25, 0.25, size=3) * half
            r = _pareto_radius(rng, max(1.0, float(half.min())))
            box = tuple(slice(a, b) for a, b in zip(inner_lo, inner_hi))
            local = np.zeros(tuple(inner_hi - inner_lo), dtype=bool)
            seed_voxel = tuple(np.round(center - inner_lo).astype(int).clip(0, inner_hi - inner_lo - 1))
            local[seed_voxel] = True  # never empty
            paint_blob(local, rng, center - inner_lo, r)
            # Keep the part connected to the seed voxel: one blob is one component.
            parts = cc3d.connected_components(local, connectivity=26)
            mask[box] |= parts == parts[seed_voxel]
        labels = cc3d.connected_components(mask, connectivity=26).astype(np.int32)
        assert int(labels.max()) == n, (int(labels.max()), n)
        return labels

    return _cached(f"grid:{shape}:{n}:{seed}", make) if cache else make()


def logits_like(instances: torch.Tensor, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Logits that roughly follow the target, as a network's would mid-training (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(instances.shape, generator=gen) * 2.0
    return (noise + torch.where(instances.cpu() > 0, 1.5, -3.0)).to(dtype)


def profile_batch(
    profile: Profile | str, seed: int = 0, *, batch: int | None = None, device="cpu", dtype=torch.float32
):
    """(logits, instances) for one training batch of a profile: ``Tensor[B, 1, D, H, W]`` each.

    ``batch`` defaults to the paper's crops x batch size for the profile.
    """
    p = PROFILES[profile] if isinstance(profile, str) else profile
    rng = np.random.default_rng(seed)
    B = batch or p.batch
    maps = []
    for b in range(B):
        n = max(1, int(round(rng.normal(p.blobs_per_crop, p.blobs_std * 0.25))))
        maps.append(synthetic_instances(p.crop, n, seed * 1000 + b))
    instances = torch.from_numpy(np.stack(maps)[:, None])
    logits = logits_like(instances, seed, dtype)
    return logits.to(device), instances.to(device)

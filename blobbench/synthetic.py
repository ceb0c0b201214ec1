"""Seeded synthetic instance maps shaped like the paper's datasets (DESIGN.md section 5).

Blobs are unions of 1 to 3 overlapping ellipsoids (irregular shapes) with a heavy-tailed size
distribution (many tiny blobs, a few large ones, as in the paper's Fig. 4), painted into a
binary mask and labelled with cc3d, so the ids are connected components like a user's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Profile", "PROFILES", "synthetic_instances", "profile_batch"]


@dataclass(frozen=True)
class Profile:
    name: str
    crop: tuple          # (D, H, W) training crop
    batch: int           # crops per batch x batch size, as in the paper's table
    blobs_per_crop: float
    blobs_std: float


# Blob counts per *crop* drawn before labelling (touching blobs merge, so SHANEL draws more than
# the ~250 components per crop it ends with); the paper gives counts per volume.
PROFILES = {
    "ms": Profile("ms", (32, 192, 192), 8, 25.0, 23.0),
    "lits": Profile("lits", (64, 192, 192), 4, 12.4, 14.9),
    "disco": Profile("disco", (64, 192, 192), 12, 28.3, 24.4),
    "shanel": Profile("shanel", (32, 128, 128), 18, 330.0, 170.0),
    "deepmact": Profile("deepmact", (48, 192, 192), 8, 7.0, 8.1),
}


def synthetic_instances(shape, n_blobs: int, seed: int, *, connectivity: int = 26) -> np.ndarray:
    """One instance map of ``shape`` (3D) with about ``n_blobs`` components (int32)."""
    import cc3d

    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=bool)
    grids = None
    for _ in range(int(n_blobs)):
        # Pareto radii: median ~2 voxels, a tail up to ~1/6 of the crop.
        r = min(1.0 + rng.pareto(2.0) * 1.5, min(shape) / 6 + 1)
        center = np.array([rng.uniform(0, s) for s in shape])
        for _part in range(int(rng.integers(1, 4))):
            radii = r * rng.uniform(0.6, 1.4, size=3)
            c = center + rng.normal(0, r * 0.6, size=3)
            lo = np.maximum(np.floor(c - radii).astype(int), 0)
            hi = np.minimum(np.ceil(c + radii).astype(int) + 1, shape)
            if np.any(hi <= lo):
                continue
            grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
            d = sum(((g - cc) / rr) ** 2 for g, cc, rr in zip(grids, c, radii))
            mask[tuple(slice(a, b) for a, b in zip(lo, hi))] |= d <= 1.0
    return cc3d.connected_components(mask, connectivity=connectivity).astype(np.int32)


def profile_batch(profile: Profile | str, seed: int = 0, *, batch: int | None = None,
                  device="cpu", dtype=torch.float32):
    """(logits, instances) for one training batch of a profile: ``Tensor[B, 1, D, H, W]`` each."""
    p = PROFILES[profile] if isinstance(profile, str) else profile
    rng = np.random.default_rng(seed)
    B = batch or p.batch
    maps = []
    for b in range(B):
        n = max(1, int(round(rng.normal(p.blobs_per_crop, p.blobs_std * 0.25))))
        maps.append(synthetic_instances(p.crop, n, seed * 1000 + b))
    instances = torch.from_numpy(np.stack(maps)[:, None])
    gen = torch.Generator().manual_seed(seed)
    # Logits that roughly follow the target, as a network's would mid-training.
    logits = torch.randn(instances.shape, generator=gen) * 2.0 + torch.where(instances > 0, 1.5, -3.0)
    return logits.to(device=device, dtype=dtype), instances.to(device)

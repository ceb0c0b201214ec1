"""Seeded random inputs for the blob loss tests."""

from __future__ import annotations

import numpy as np
import torch

LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


def random_instances(
    rng: np.random.Generator,
    shape,
    max_blobs: int,
    *,
    sparse_ids: bool = False,
    empty_prob: float = 0.15,
    dtype=torch.int32,
) -> torch.Tensor:
    """(B, C, *spatial) instance ids: random boxes per plane, some planes empty.

    Boxes are drawn in order, so later boxes overwrite parts of earlier ones (irregular shapes,
    and some ids disappear: ids are not contiguous). ``sparse_ids`` draws large, sparse ids.
    """
    B, C, *spatial = shape
    out = np.zeros(shape, dtype=np.int64)
    hi = int(torch.iinfo(dtype).max) if dtype != torch.int64 else 10**12
    for b in range(B):
        for c in range(C):
            if rng.random() < empty_prob:
                continue
            n = int(rng.integers(1, max_blobs + 1))
            if sparse_ids:
                ids = rng.choice(np.arange(1, min(hi, 10**6)), size=n, replace=False)
                if dtype == torch.int64:
                    ids = ids * 1_000_003
            else:
                ids = rng.permutation(np.arange(1, min(hi, 3 * n) + 1))[:n]
            for k in ids:
                lo = [int(rng.integers(0, s)) for s in spatial]
                ext = [int(rng.integers(1, max(2, s // 3) + 1)) for s in spatial]
                sl = tuple(slice(a, min(s, a + e)) for a, e, s in zip(lo, ext, spatial))
                out[(b, c) + sl] = k
    return torch.from_numpy(out).to(dtype)


def random_case(seed: int):
    """One random option set and input, drawn from the seed."""
    rng = np.random.default_rng(seed)
    ndim = int(rng.choice([1, 2, 3], p=[0.1, 0.3, 0.6]))
    spatial = {
        1: [int(rng.integers(8, 40))],
        2: [int(rng.integers(4, 16)) for _ in range(2)],
        3: [int(rng.integers(3, 9)) for _ in range(3)],
    }[ndim]
    activation = str(rng.choice(["sigmoid", "softmax", "none"], p=[0.5, 0.25, 0.25]))
    C = int(rng.integers(2, 4)) if activation == "softmax" else int(rng.integers(1, 3))
    B = int(rng.integers(1, 4))
    masking = "paper" if activation == "softmax" else str(rng.choice(["paper", "official"]))
    label_dtype = LABEL_DTYPES[int(rng.integers(0, 4))]
    sparse = bool(rng.random() < 0.15)
    instances = random_instances(
        rng, (B, C, *spatial), max_blobs=int(rng.integers(1, 7)), sparse_ids=sparse, empty_prob=0.2, dtype=label_dtype
    )
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn((B, C, *spatial), generator=gen, dtype=torch.float64) * 2
    x = torch.sigmoid(logits) if activation == "none" else logits
    options = dict(
        activation=activation,
        masking=masking,
        squared_pred=bool(rng.random() < 0.3),
        smooth_nr=float(rng.choice([1e-5, 1e-3, 0.0])),
        smooth_dr=float(rng.choice([1e-5, 1e-3])),
    )
    alpha, beta = float(rng.choice([2.0, 1.0, 0.0])), float(rng.choice([1.0, 0.5]))
    return x, instances, alpha, beta, options


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (or absolute when b is ~0)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-12))


def loss_and_grad(fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def with_spatial_dims(fn):
    """``fn`` (a blob loss) told the layout of its input, ``(B, C, *spatial)``: the tests know it,
    and 3-D / 4-D inputs need ``spatial_dims`` (blob_dice refuses to guess)."""

    def call(x, *args, **kwargs):
        return fn(x, *args, spatial_dims=x.dim() - 2, **kwargs)

    call.__name__ = getattr(fn, "__name__", "loss")
    return call

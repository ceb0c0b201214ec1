"""``blobbench quality``: which loss finds which lesions? A 3D loss-quality benchmark by lesion size.

Every loss trains the same network (a small MONAI ``UNet``, :func:`make_quality_net`) with the
same budget, on the same seeded data, for several seeds; the fixed test set is segmented
and scored lesion by lesion, overall and per size bin; every loss is compared with MONAI
``DiceCELoss`` on the same seeds and data, with paired 95 % bootstrap confidence intervals.

Data (fixed before any training run; docs/design.md, section 6.1). Volumes of ``size^3`` voxels:

- background: a smooth texture (white noise blurred with a Gaussian of sigma 4, std 0.2) plus
  white Gaussian noise of std ``noise`` (0.7), added after everything else;
- lesions (the ground truth), Poisson(``lesions``) + 2 per volume (6 + 2 by default), placed at least 2 voxels apart
  (so that each is one connected component of the mask): their target volume is **log-uniform
  from 10 to 5,000 voxels**, rasterised shapes are rescaled until their voxel count is within
  x0.75-1.33 of the target; half are **ellipsoids** with random axes (ratios 1 : U(0.5, 1) :
  U(0.5, 1)) and a random rotation, half **lumpy unions** of 2-4 rotated ellipsoids around a main
  one (its largest 26-connected component kept); intensity U(0.6, 1.0) above the background,
  blurred with a Gaussian of sigma 0.6 (partial volume). With noise 0.7, a 10-voxel lesion of
  contrast 0.8 has a matched-filter SNR of about 0.8 * sqrt(10) / 0.7 = 3.6, below the maximum
  of the noise over a volume's 110,592 positions (48^3); a 50-voxel one about 8: **the small lesions sit
  at the detection limit of the noise**, the large ones far above it;
- distractors, **lesion-like but not in the ground truth**, so that precision can move:
  Poisson(``vessels``) *vessels* (straight tubes of length U(10, 24) and radius U(0.7, 1.3), the
  lesions' contrast: told apart by shape only) and Poisson(``spots``) *bright spots* (compact
  ellipsoids of 8-60 voxels, contrast U(1.6, 2.2): told apart by intensity only), blurred like
  the lesions.

Size bins, fixed in advance, by the voxel count of a connected component (26-connectivity):
**small < 50 voxels, medium 50-499, large >= 500**. Ground-truth lesions are binned by their
own size, predicted components by theirs.

Metrics per run, pooled over the test volumes (:func:`lesion_counts`, :func:`pooled_metrics`):

- lesion-wise **sensitivity** = ground-truth lesions touched by the prediction / lesions;
  **precision** = predicted components touching a lesion / predicted components (the paper's
  detection rule: one voxel of overlap is a hit, section 2.5 of Kofler et al.); **F1** their
  harmonic mean; each overall and per size bin;
- **volumetric DSC**, the mean over volumes of each volume's Dice;
- **lesion-wise Dice** in the manner of BraTS 2023: per volume, each lesion's Dice against the
  predicted components that touch it, a 0 for every false-positive component, summed and divided
  by (lesions + false positives); 1 for a volume with neither; the mean over volumes. (BraTS also
  dilates the ground truth by 3 voxels before matching and drops lesions under 10 voxels; here
  neither, since the small lesions are the question);
- ``f1_paper``: the paper's per-volume instance F1 (:func:`blobbench.blob_metrics`, TP counting
  predicted blobs), the mean over volumes, for comparison with the paper's Table 1;
- training time per step (wall clock, so it depends on the machine's load).

Statistics (:func:`paired_bootstrap`): each loss minus ``dice_ce`` on the same seeds (same
initialisation, training data and crops) and the same test volumes; the 95 % interval is a
percentile bootstrap that resamples seeds and test volumes (both with replacement, paired), so
it covers the variation of training and of the test lesions. With few seeds it is too narrow
where the seed-to-seed variation of a difference dominates (about 80 % coverage for a nominal 95 %
with 5 seeds, tests/test_quality.py). Per-loss means get the same (unpaired) bootstrap for the
figure.

Losses: ``dice`` (MONAI ``DiceLoss``), ``dice_ce`` (MONAI ``DiceCELoss``), ``blob_dice``
(:func:`blobbench.blob_dice`), ``blob_dice_ce`` (:func:`blobbench.blob_dice_ce`), all with a
sigmoid, blob losses with alpha = 2, beta = 1 (the paper's), lambda_dice = lambda_ce = 1; and
``cc_dice_ce`` (:func:`blobbench.cc_dice_ce`, the component-wise Voronoi family of issue 20, with
its defaults alpha = beta = 1, the regions computed per crop).

Output (``--out``): ``train_summary.json`` (configuration, per-run numbers and per-volume counts,
the comparisons with their intervals), ``table.md``, ``sensitivity_by_size.png``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

__all__ = [
    "QualityConfig", "QUICK", "SIZE_BINS", "BIN_NAMES", "COUNT_FIELDS", "METRICS", "GENERATOR_VERSION",
    "available_losses", "make_quality_loss", "make_quality_net", "make_volume", "make_volumes", "lesion_counts",
    "pooled_metrics", "paired_bootstrap", "train_one", "run_quality", "summarize", "resummarize",
]

GENERATOR_VERSION = 1  # bump when make_volumes changes: a committed run names the version it used
SIZE_BINS = (50, 500)  # small < 50 <= medium < 500 <= large (voxels), fixed before any run
BIN_NAMES = ("small", "medium", "large")
BASELINE = "dice_ce"
# A blob loss against its plain counterpart (the paper's Table 1 pair), besides every loss against
# BASELINE (which is blob_dice_ce's and cc_dice_ce's counterpart).
COUNTERPARTS = {"blob_dice": "dice"}


@dataclass
class QualityConfig:
    losses: tuple = ("dice", "dice_ce", "blob_dice", "blob_dice_ce", "cc_dice_ce")
    seeds: tuple = (0, 1, 2, 3, 4)
    size: int = 48  # volumes are size^3
    crop: int = 24  # training crops are crop^3
    window: int | None = None  # inference window edge (None: the whole volume in one pass)
    train_volumes: int = 16  # per seed (training data differ between seeds, not between losses)
    test_volumes: int = 16  # one test set for every run
    iterations: int = 80
    batch: int = 2
    lr: float = 3e-3
    features: tuple = (16, 32, 64)
    dropout: float = 0.1
    noise: float = 0.7
    lesions: float = 6.0  # Poisson mean (+2) per volume
    vessels: float = 3.0  # Poisson mean per volume
    spots: float = 3.0  # Poisson mean per volume
    test_seed: int = 20_000
    n_boot: int = 10_000
    boot_seed: int = 12345
    threads: int | None = None
    device: str = "cpu"
    extra: dict = field(default_factory=dict)


# A few-minute version (2 min 19 s on the loaded 2-core machine): a first look, not an answer.
QUICK = dict(losses=("dice_ce", "blob_dice_ce"), seeds=(0, 1), train_volumes=6, test_volumes=6, iterations=40,
             n_boot=2000)


# ----------------------------------------------------------------------------- data


def _gauss_blur(vol: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (zero padding) with torch; ``float32`` array of ``vol``'s shape."""
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    k = (k / k.sum()).float()
    x = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0]
        pad[axis] = r
        x = torch.nn.functional.conv3d(x, k.view(shape), padding=tuple(pad))
    return x[0, 0].numpy()


def _rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _ellipsoid(shape, center, radii, rot) -> np.ndarray:
    grids = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    d = (grids - center) @ rot  # coordinates along the ellipsoid's axes
    return ((d / radii) ** 2).sum(-1) <= 1.0


def _largest_component(mask: np.ndarray) -> np.ndarray:
    import cc3d

    lab = cc3d.connected_components(mask.astype(np.uint8), connectivity=26)
    if lab.max() <= 1:
        return mask
    counts = np.bincount(lab.reshape(-1))
    counts[0] = 0
    return lab == counts.argmax()


def _lesion_shape(rng, target: float, lumpy: bool) -> np.ndarray:
    """A bool box holding one lesion of about ``target`` voxels (x0.75-1.33 after rescaling)."""
    ratios = np.concatenate([[1.0], rng.uniform(0.5, 1.0, size=2)])
    rng.shuffle(ratios)
    rot = _rotation(rng)
    parts = []
    if lumpy:
        for _ in range(int(rng.integers(1, 4))):  # 1-3 satellites: unions of 2-4 ellipsoids
            direction = rng.normal(size=3)
            parts.append((direction / np.linalg.norm(direction), rng.uniform(0.35, 0.6), _rotation(rng),
                          rng.uniform(0.5, 1.0, size=3)))
    main_share = 0.6 if lumpy else 1.0
    scale = 1.0
    best = None
    for _ in range(8):
        vol_main = target * main_share * scale
        a = (vol_main * 3 / (4 * math.pi * ratios.prod())) ** (1 / 3)
        radii = a * ratios
        extent = radii.max() * 2.2 + 2
        n = int(math.ceil(2 * extent)) + 1
        c = np.full(3, (n - 1) / 2)
        m = _ellipsoid((n, n, n), c, radii, rot)
        for direction, frac, prot, pratios in parts:
            pr = a * pratios * (frac * 1.6)
            m |= _ellipsoid((n, n, n), c + direction * radii.max() * 0.8, pr, prot)
        if parts:
            m = _largest_component(m)
        got = int(m.sum())
        best = m
        if 0.75 * target <= got <= 1.33 * target:
            break
        scale *= target / max(got, 1)
    nz = np.nonzero(best)
    return best[tuple(slice(i.min(), i.max() + 1) for i in nz)]


def _tube(rng) -> np.ndarray:
    length, radius = rng.uniform(10, 24), rng.uniform(0.7, 1.3)
    d = rng.normal(size=3)
    d /= np.linalg.norm(d)
    n = int(math.ceil(length + 2 * radius)) + 3
    c = np.full(3, (n - 1) / 2)
    g = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).astype(np.float64) - c
    t = np.clip(g @ d, -length / 2, length / 2)
    m = np.linalg.norm(g - t[..., None] * d, axis=-1) <= radius
    nz = np.nonzero(m)
    return m[tuple(slice(i.min(), i.max() + 1) for i in nz)]


def _place(occupied: np.ndarray, shape_box: np.ndarray, rng, margin: int = 2, tries: int = 50):
    """A corner where ``shape_box`` (with ``margin`` voxels around it) meets nothing occupied."""
    size = np.array(occupied.shape)
    box = np.array(shape_box.shape)
    if np.any(box > size):
        return None
    for _ in range(tries):
        lo = rng.integers(0, size - box + 1)
        a = np.maximum(lo - margin, 0)
        b = np.minimum(lo + box + margin, size)
        if not occupied[tuple(slice(i, j) for i, j in zip(a, b))].any():
            return lo
    return None


def make_volume(rng, cfg: QualityConfig):
    """One ``(image float32[s, s, s], lesion mask bool[s, s, s], distractor mask bool[s, s, s])``."""
    s = cfg.size
    shape = (s, s, s)
    occupied = np.zeros(shape, dtype=bool)
    lesion = np.zeros(shape, dtype=bool)
    distract = np.zeros(shape, dtype=bool)
    signal = np.zeros(shape, dtype=np.float32)
    n_les = int(rng.poisson(cfg.lesions)) + 2
    targets = np.exp(rng.uniform(math.log(10), math.log(5000), size=n_les))
    for target in sorted(targets, reverse=True):  # the large ones first, while there is room
        m = _lesion_shape(rng, float(target), lumpy=bool(rng.random() < 0.5))
        lo = _place(occupied, m, rng)
        if lo is None:
            continue
        sl = tuple(slice(i, i + k) for i, k in zip(lo, m.shape))
        occupied[sl] |= m
        lesion[sl] |= m
        signal[sl][m] = rng.uniform(0.6, 1.0)
    kinds = ["vessel"] * int(rng.poisson(cfg.vessels)) + ["spot"] * int(rng.poisson(cfg.spots))
    for kind in kinds:
        if kind == "vessel":
            m, contrast = _tube(rng), rng.uniform(0.6, 1.0)
        else:
            m, contrast = _lesion_shape(rng, float(rng.uniform(8, 60)), lumpy=False), rng.uniform(1.6, 2.2)
        lo = _place(occupied, m, rng)
        if lo is None:
            continue
        sl = tuple(slice(i, i + k) for i, k in zip(lo, m.shape))
        occupied[sl] |= m
        distract[sl] |= m
        signal[sl][m] = contrast
    texture = _gauss_blur(rng.normal(size=shape).astype(np.float32), 4.0)
    texture *= 0.2 / max(float(texture.std()), 1e-8)
    image = _gauss_blur(signal, 0.6) + texture + rng.normal(0, cfg.noise, size=shape).astype(np.float32)
    return image.astype(np.float32), lesion, distract


def make_volumes(n: int, cfg: QualityConfig, seed: int):
    """``n`` volumes: ``(images float32[n, 1, s, s, s], masks bool[n, 1, s, s, s])``; deterministic
    in ``seed`` and the generator fields of ``cfg`` (size, noise, lesions, vessels, spots)."""
    rng = np.random.default_rng([GENERATOR_VERSION, seed])
    vols = [make_volume(rng, cfg) for _ in range(n)]
    images = torch.from_numpy(np.stack([v[0] for v in vols])[:, None])
    masks = torch.from_numpy(np.stack([v[1] for v in vols])[:, None])
    return images, masks


# ----------------------------------------------------------------------------- losses


def available_losses() -> tuple:
    import blobbench

    base = ("dice", "dice_ce", "blob_dice", "blob_dice_ce")
    return base + (("cc_dice_ce",) if hasattr(blobbench, "cc_dice_ce") else ())  # scipy needed


def make_quality_loss(name: str):
    """``f(logits, instances) -> loss`` for one of :func:`available_losses` (3D, one channel)."""
    import blobbench

    if name == "dice":
        from monai.losses import DiceLoss

        d = DiceLoss(sigmoid=True)
        return lambda x, inst: d(x, (inst > 0).to(x.dtype))
    if name == "dice_ce":
        from monai.losses import DiceCELoss

        dce = DiceCELoss(sigmoid=True)
        return lambda x, inst: dce(x, (inst > 0).to(x.dtype))
    if name == "blob_dice":
        return blobbench.BlobDiceLoss(alpha=2.0, beta=1.0, spatial_dims=3)
    if name == "blob_dice_ce":
        return blobbench.BlobDiceCELoss(alpha=2.0, beta=1.0, lambda_dice=1.0, lambda_ce=1.0, spatial_dims=3)
    if name == "cc_dice_ce" and hasattr(blobbench, "cc_dice_ce"):
        # Voronoi regions of each crop computed inside (regions=None), after the crop as design.md 9 asks.
        return lambda x, inst: blobbench.cc_dice_ce(x, inst)
    raise ValueError(f"loss must be one of {available_losses()}, got {name!r}")


def make_quality_net(cfg: QualityConfig):
    """MONAI ``UNet`` (3D, one channel in and out): ``cfg.features`` channels per level, stride 2,
    two plain convolutions per level (no residual units), LeakyReLU, instance norm, dropout.

    Smaller than ``blobbench train``'s (mish, residual units): the committed run must fit a loaded
    2-core CPU, and a step of this one costs about a third of that one.
    """
    from monai.networks.nets import UNet

    ch = tuple(cfg.features)
    return UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=ch, strides=(2,) * (len(ch) - 1),
                num_res_units=0, act="leakyrelu", dropout=cfg.dropout)


# ----------------------------------------------------------------------------- metrics

# Per-volume count fields: for each bin and "all", lesions, lesions detected, predicted
# components, predicted components on a lesion; then the per-volume scores.
COUNT_FIELDS = tuple(
    f"{what}_{b}" for b in BIN_NAMES + ("all",) for what in ("gt", "gt_hit", "pred", "pred_hit")
) + ("dsc", "lesion_dice", "f1_paper")


def _bin_of(sizes: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.array(SIZE_BINS), sizes, side="right")


def lesion_counts(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Counts and scores of one volume (bool ``pred`` and ``gt`` of one shape; 26-connectivity).

    Returns a dict of :data:`COUNT_FIELDS`: ``gt_<bin>`` lesions of that size bin, ``gt_hit_<bin>``
    those touched by a predicted voxel, ``pred_<bin>`` predicted components of that bin (by their
    own size), ``pred_hit_<bin>`` those touching a lesion (``<bin>`` in small, medium, large, all);
    ``dsc`` the volume's Dice (1 if both are empty), ``lesion_dice`` the BraTS-2023-style
    lesion-wise Dice (module docstring), ``f1_paper`` the paper's instance F1 of the volume.
    """
    import cc3d

    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"lesion_counts: pred and gt must have one shape, got {pred.shape} and {gt.shape}")
    g = cc3d.connected_components(gt.astype(np.uint8), connectivity=26).astype(np.int64)
    p = cc3d.connected_components(pred.astype(np.uint8), connectivity=26).astype(np.int64)
    ng, npd = int(g.max()), int(p.max())
    g_size = np.bincount(g.reshape(-1), minlength=ng + 1)[1:]
    p_size = np.bincount(p.reshape(-1), minlength=npd + 1)[1:]
    both = (g > 0) & (p > 0)
    g_inter = np.bincount(g[both], minlength=ng + 1)[1:]  # voxels of lesion k that are predicted
    p_hit = np.bincount(p[both], minlength=npd + 1)[1:] > 0
    g_hit = g_inter > 0
    # Predicted voxels of the components touching each lesion (BraTS: the union matched to it).
    pairs = np.unique(g[both] * (npd + 1) + p[both])
    pg, pp = pairs // (npd + 1), pairs % (npd + 1)
    matched = np.bincount(pg, weights=p_size[pp - 1], minlength=ng + 1)[1:] if pairs.size else np.zeros(ng)
    out = {}
    gb, pb = _bin_of(g_size), _bin_of(p_size)
    for i, b in enumerate(BIN_NAMES + ("all",)):
        gsel = gb == i if b != "all" else np.ones(ng, dtype=bool)
        psel = pb == i if b != "all" else np.ones(npd, dtype=bool)
        out[f"gt_{b}"] = int(gsel.sum())
        out[f"gt_hit_{b}"] = int((g_hit & gsel).sum())
        out[f"pred_{b}"] = int(psel.sum())
        out[f"pred_hit_{b}"] = int((p_hit & psel).sum())
    den = int(pred.sum()) + int(gt.sum())
    out["dsc"] = 2.0 * int(both.sum()) / den if den else 1.0
    n_fp = int((~p_hit).sum())
    lesion_dice = 2.0 * g_inter / (matched + g_size) if ng else np.zeros(0)
    out["lesion_dice"] = float(lesion_dice.sum() / (ng + n_fp)) if ng + n_fp else 1.0
    tp, fn = int(p_hit.sum()), int((~g_hit).sum())
    out["f1_paper"] = 2.0 * tp / (2 * tp + n_fp + fn) if (2 * tp + n_fp + fn) else 1.0
    return out


def _ratio(num, den, empty):
    return np.where(den > 0, num / np.maximum(den, 1), empty)


def pooled_metrics(counts: np.ndarray) -> dict:
    """Metrics of count arrays ``[..., V, len(COUNT_FIELDS)]`` pooled over the volume axis V.

    Detection metrics sum the counts over the volumes (a bin with no lesions has sensitivity NaN,
    one with no predicted components precision NaN; F1 is 0 when either is 0, else NaN when either
    is NaN); ``dsc``, ``lesion_dice`` and ``f1_paper`` are means over the volumes. Returns name ->
    array of the leading shape.
    """
    idx = {f: i for i, f in enumerate(COUNT_FIELDS)}
    tot = counts.sum(-2)
    out = {}
    for b in BIN_NAMES + ("all",):
        sfx = "" if b == "all" else f"_{b}"
        s = _ratio(tot[..., idx[f"gt_hit_{b}"]], tot[..., idx[f"gt_{b}"]], np.nan)
        p = _ratio(tot[..., idx[f"pred_hit_{b}"]], tot[..., idx[f"pred_{b}"]], np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = 2 * s * p / (s + p)
        # 0 when nothing was found or nothing predicted was right (the other may be NaN: 2 TP / (2 TP + FP + FN)
        # is 0); NaN when one is undefined and the other positive (a bin's lesions found by components of
        # another bin), or both are.
        f1 = np.where((s == 0) | (p == 0), 0.0, f1)
        out[f"sensitivity{sfx}"], out[f"precision{sfx}"], out[f"f1{sfx}"] = s, p, f1
    for f in ("dsc", "lesion_dice", "f1_paper"):
        out[f] = counts[..., idx[f]].mean(-1)
    return out


METRICS = ("f1", "sensitivity", "precision", "dsc", "lesion_dice", "f1_paper") + tuple(
    f"{m}_{b}" for b in BIN_NAMES for m in ("sensitivity", "precision", "f1")
)


# ----------------------------------------------------------------------------- statistics


def paired_bootstrap(a: np.ndarray, b, stat, *, n_boot: int = 10_000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap of ``stat(a) - stat(b)`` (or of ``stat(a)`` when ``b`` is None).

    ``a`` and ``b``: arrays ``[S, V, ...]`` (seeds, test volumes, fields), paired: ``a[s, v]`` and
    ``b[s, v]`` are the same seed and volume. Each resample draws S seeds and V volumes with
    replacement and applies the same draw to both. ``stat`` maps ``[..., S, V, F]`` to ``[...]``
    (vectorised over leading resample axes); its mean over seeds is taken here when it returns a
    per-seed axis, so it may also return ``[..., S]``.

    Returns ``(estimate, low, high)``; NaN resamples (e.g. an empty bin) are left out.
    """
    a = np.asarray(a, dtype=np.float64)
    S, V = a.shape[:2]
    rng = np.random.default_rng(seed)

    def value(x):
        v = np.asarray(stat(x))
        return v.mean(-1) if v.ndim == x.ndim - 2 else v  # a per-seed result: mean over seeds

    est = value(a) - (value(np.asarray(b, dtype=np.float64)) if b is not None else 0.0)
    draws = []
    chunk = max(1, 200_000 // max(1, a[0, 0].size * S * V))
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        si = rng.integers(0, S, size=(k, S))
        vi = rng.integers(0, V, size=(k, V))
        sel = (si[:, :, None], vi[:, None, :])
        d = value(a[sel])
        if b is not None:
            d = d - value(np.asarray(b, dtype=np.float64)[sel])
        draws.append(d)
    draws = np.concatenate(draws)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return float(est), math.nan, math.nan
    alpha = (1 - level) / 2
    lo, hi = np.quantile(draws, [alpha, 1 - alpha])
    return float(est), float(lo), float(hi)


def _metric_stat(name):
    return lambda x: pooled_metrics(x)[name]  # [..., S]; paired_bootstrap averages the seeds


# ----------------------------------------------------------------------------- runs


def _crops(images, instances, cfg: QualityConfig, gen: torch.Generator):
    idx = torch.randint(0, images.shape[0], (cfg.batch,), generator=gen)
    hi = cfg.size - cfg.crop + 1
    xs, ys = [], []
    for i in idx.tolist():
        lo = torch.randint(0, hi, (3,), generator=gen).tolist()
        sl = (i, slice(None)) + tuple(slice(a, a + cfg.crop) for a in lo)
        xs.append(images[sl])
        ys.append(instances[sl])
    return torch.stack(xs), torch.stack(ys)


def train_one(cfg: QualityConfig, loss: str, seed: int, train_data, test_data, progress: bool = False) -> dict:
    """Train ``loss`` with ``seed`` on ``train_data``, score ``test_data``; per-run numbers."""
    from monai.inferers import sliding_window_inference

    from .train import train_step

    device = torch.device(cfg.device)
    torch.manual_seed(seed)
    net = make_quality_net(cfg).to(device)
    loss_fn = make_quality_loss(loss)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    train_x, train_inst = train_data
    losses = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for it in range(cfg.iterations):
        x, inst = _crops(train_x, train_inst, cfg, gen)
        losses.append(float(train_step(net, loss_fn, opt, x.to(device), inst.to(device))))
        if progress and (it + 1) % max(1, cfg.iterations // 10) == 0:
            print(f"\r    step {it + 1}/{cfg.iterations}, loss {statistics.fmean(losses[-20:]):.4f}",
                  end="", file=sys.stderr, flush=True)
    sync()
    train_s = time.perf_counter() - t0
    if progress:
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)
    test_x, test_m = test_data
    net.eval()
    counts = []
    with torch.no_grad():
        for i in range(test_x.shape[0]):
            window = (cfg.window or cfg.size,) * 3
            logits = sliding_window_inference(test_x[i : i + 1].to(device), window, sw_batch_size=4, predictor=net,
                                              overlap=0.25)
            pred = (logits > 0).cpu().numpy()[0, 0]  # sigmoid > 0.5
            c = lesion_counts(pred, test_m[i, 0].numpy())
            counts.append([c[f] for f in COUNT_FIELDS])
    counts = np.array(counts, dtype=np.float64)
    metrics = {k: float(v) for k, v in pooled_metrics(counts).items()}
    return {
        "loss": loss,
        "seed": seed,
        "metrics": metrics,
        "train_seconds": train_s,
        "seconds_per_step": train_s / cfg.iterations,
        "final_loss": statistics.fmean(losses[-20:]),
        "loss_curve": losses[:: max(1, len(losses) // 50)],
        "counts": counts.tolist(),
    }


def _fmt_s(s: float) -> str:
    return f"{int(s // 60)} min {int(s % 60):02d} s" if s >= 60 else f"{s:.0f} s"


def run_quality(cfg: QualityConfig, out_dir: str, progress: bool = True, log=print) -> dict:
    """Every loss x every seed; statistics; ``train_summary.json``, ``table.md`` and the figure."""
    import blobbench

    for loss in cfg.losses:
        if loss not in available_losses():
            raise ValueError(f"loss {loss!r} is not available; choose from {', '.join(available_losses())}")
    if cfg.crop > cfg.size:
        raise ValueError(f"crop ({cfg.crop}) must not exceed size ({cfg.size})")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    test = make_volumes(cfg.test_volumes, cfg, cfg.test_seed)
    jobs = [(s, loss) for s in cfg.seeds for loss in cfg.losses]
    runs, done_s = [], []
    train = None
    for j, (seed, loss) in enumerate(jobs):
        if train is None or train[0] != seed:
            x, m = make_volumes(cfg.train_volumes, cfg, 10_000 + seed)
            train = (seed, (x, blobbench.label_instances(m, spatial_dims=3)))
        t0 = time.perf_counter()
        r = train_one(cfg, loss, seed, train[1], test, progress=progress)
        done_s.append(time.perf_counter() - t0)
        runs.append(r)
        eta = statistics.fmean(done_s) * (len(jobs) - j - 1)
        m = r["metrics"]
        log(f"[{j + 1}/{len(jobs)}] {loss} seed {seed}: F1 {m['f1']:.3f}, sens {m['sensitivity']:.3f} "
            f"(small {m['sensitivity_small']:.2f}), prec {m['precision']:.3f}, DSC {m['dsc']:.3f}, "
            f"{r['seconds_per_step'] * 1000:.0f} ms/step; run {done_s[-1]:.0f} s, "
            f"elapsed {_fmt_s(time.perf_counter() - t_start)}, ETA {_fmt_s(eta)}")
    result = summarize(cfg, runs)
    result["elapsed_s"] = time.perf_counter() - t_start
    result["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                         "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                         "device": cfg.device, "load_average_at_end": list(os.getloadavg())}
    with open(os.path.join(out_dir, "train_summary.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    text = format_quality_table(result)
    with open(os.path.join(out_dir, "table.md"), "w") as fh:
        fh.write(text)
    log(text)
    try:
        render_sensitivity_figure(result, os.path.join(out_dir, "sensitivity_by_size.png"))
    except ImportError:
        log("matplotlib is not installed: no figure")
    return result


def summarize(cfg: QualityConfig, runs: list) -> dict:
    """Per-loss means with intervals, and paired differences against ``dice_ce``, from ``runs``."""
    seeds = list(cfg.seeds)
    by = {(r["loss"], r["seed"]): np.array(r["counts"]) for r in runs}
    stacked = {loss: np.stack([by[(loss, s)] for s in seeds]) for loss in cfg.losses}  # [S, V, F]
    per_loss, paired = {}, {}
    for k, loss in enumerate(cfg.losses):
        per_loss[loss] = {}
        for name in METRICS:
            est, lo, hi = paired_bootstrap(stacked[loss], None, _metric_stat(name), n_boot=cfg.n_boot,
                                           seed=cfg.boot_seed + k)
            per_loss[loss][name] = {"mean": est, "low": lo, "high": hi}
        steps = [r["seconds_per_step"] for r in runs if r["loss"] == loss]
        per_loss[loss]["seconds_per_step"] = {"median": statistics.median(steps), "min": min(steps),
                                              "max": max(steps)}
        if BASELINE in cfg.losses and loss != BASELINE:
            paired[loss] = {}
            for name in METRICS:
                est, lo, hi = paired_bootstrap(stacked[loss], stacked[BASELINE], _metric_stat(name),
                                               n_boot=cfg.n_boot, seed=cfg.boot_seed)
                per_seed = (pooled_metrics(stacked[loss])[name] - pooled_metrics(stacked[BASELINE])[name]).tolist()
                paired[loss][name] = {"diff": est, "low": lo, "high": hi, "per_seed": per_seed}
    counterpart = {}
    for loss, plain in COUNTERPARTS.items():
        if loss in cfg.losses and plain in cfg.losses:
            counterpart[f"{loss} - {plain}"] = {}
            for name in METRICS:
                est, lo, hi = paired_bootstrap(stacked[loss], stacked[plain], _metric_stat(name),
                                               n_boot=cfg.n_boot, seed=cfg.boot_seed)
                counterpart[f"{loss} - {plain}"][name] = {"diff": est, "low": lo, "high": hi}
    return {
        "config": asdict(cfg),
        "generator_version": GENERATOR_VERSION,
        "size_bins": {"small": f"< {SIZE_BINS[0]}", "medium": f"{SIZE_BINS[0]}-{SIZE_BINS[1] - 1}",
                      "large": f">= {SIZE_BINS[1]}"},
        "count_fields": list(COUNT_FIELDS),
        "test_lesions": {b: int(stacked[cfg.losses[0]][0, :, COUNT_FIELDS.index(f"gt_{b}")].sum())
                         for b in BIN_NAMES + ("all",)},
        "baseline": BASELINE,
        "runs": runs,
        "per_loss": per_loss,
        "paired_vs_baseline": paired,
        "paired_vs_counterpart": counterpart,
    }


def resummarize(out_dir: str, log=print) -> dict:
    """Statistics, ``table.md`` and the figure again from ``out_dir/train_summary.json`` (no
    training): the same seeded bootstrap, so the numbers already there come out unchanged."""
    path = os.path.join(out_dir, "train_summary.json")
    with open(path) as fh:
        old = json.load(fh)
    conf = {k: tuple(v) if isinstance(v, list) else v for k, v in old["config"].items()}
    result = summarize(QualityConfig(**conf), old["runs"])
    for k in ("elapsed_s", "machine"):
        if k in old:
            result[k] = old[k]
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    text = format_quality_table(result)
    with open(os.path.join(out_dir, "table.md"), "w") as fh:
        fh.write(text)
    log(text)
    try:
        render_sensitivity_figure(result, os.path.join(out_dir, "sensitivity_by_size.png"))
    except ImportError:
        log("matplotlib is not installed: no figure")
    return result


def format_quality_table(result) -> str:
    cfg = result["config"]
    les = result["test_lesions"]
    cols = ("f1", "sensitivity", "precision", "sensitivity_small", "sensitivity_medium", "sensitivity_large",
            "precision_small", "dsc", "lesion_dice", "f1_paper")
    head = ("F1", "sens.", "prec.", "sens. small", "sens. medium", "sens. large", "prec. small", "DSC",
            "lesion Dice", "F1 (paper, per volume)")
    lines = [
        f"3D lesion quality: {len(cfg['seeds'])} seeds x {cfg['iterations']} steps of {cfg['batch']} crops "
        f"{cfg['crop']}^3, UNet {tuple(cfg['features'])}; test set {cfg['test_volumes']} volumes {cfg['size']}^3 "
        f"with {les['all']} lesions (small {les['small']}, medium {les['medium']}, large {les['large']}); "
        f"bins: small < {SIZE_BINS[0]}, medium {SIZE_BINS[0]}-{SIZE_BINS[1] - 1}, large >= {SIZE_BINS[1]} voxels.",
        "",
        "Mean over seeds [95 % bootstrap interval over seeds and test volumes]:",
        "",
        "| loss | " + " | ".join(head) + " | ms/step (median) |",
        "| --- | " + " | ".join("---" for _ in head) + " | --- |",
    ]
    for loss, row in result["per_loss"].items():
        cells = [f"{row[c]['mean']:.3f} [{row[c]['low']:.3f}, {row[c]['high']:.3f}]" for c in cols]
        lines.append(f"| {loss} | " + " | ".join(cells) + f" | {row['seconds_per_step']['median'] * 1000:.0f} |")
    if result["paired_vs_baseline"]:
        lines += ["", f"Paired difference against {result['baseline']} (same seeds, data and test volumes), "
                      "[95 % bootstrap interval]; * where the interval excludes 0:", "",
                  "| loss | " + " | ".join(head) + " |", "| --- | " + " | ".join("---" for _ in head) + " |"]
        for loss, row in result["paired_vs_baseline"].items():
            cells = []
            for c in cols:
                d = row[c]
                star = "*" if (d["low"] > 0 or d["high"] < 0) else ""
                cells.append(f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]{star}")
            lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    for pair, row in result.get("paired_vs_counterpart", {}).items():
        lines += ["", f"Paired difference {pair} (the paper's Table 1 pair), [95 % bootstrap interval]:", "",
                  "| pair | " + " | ".join(head) + " |", "| --- | " + " | ".join("---" for _ in head) + " |"]
        cells = []
        for c in cols:
            d = row[c]
            star = "*" if (d["low"] > 0 or d["high"] < 0) else ""
            cells.append(f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]{star}")
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_sensitivity_figure(result, path: str) -> None:
    """Sensitivity by size bin per loss (and overall), mean over seeds with 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = list(result["per_loss"])
    groups = [("small", "sensitivity_small"), ("medium", "sensitivity_medium"), ("large", "sensitivity_large"),
              ("all", "sensitivity"), ("precision\n(all)", "precision")]
    les = result["test_lesions"]
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    width = 0.8 / len(losses)
    for k, loss in enumerate(losses):
        xs, ys, lo, hi = [], [], [], []
        for g, (_, key) in enumerate(groups):
            v = result["per_loss"][loss][key]
            xs.append(g + (k - (len(losses) - 1) / 2) * width)
            ys.append(v["mean"])
            lo.append(v["mean"] - v["low"])
            hi.append(v["high"] - v["mean"])
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=loss)
    labels = []
    for name, _ in groups:
        n = les.get(name)
        labels.append(f"{name}\n(n = {n})" if n is not None else name)
    ax.set_xticks(range(len(groups)), labels)
    ax.set_ylabel("lesion-wise sensitivity / precision")
    ax.set_ylim(0, 1.02)
    ax.grid(axis="y", alpha=0.3)
    cfg = result["config"]
    ax.set_title(f"Sensitivity by lesion size, {len(cfg['seeds'])} seeds, 95 % bootstrap intervals "
                 f"(small < {SIZE_BINS[0]}, large >= {SIZE_BINS[1]} voxels)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

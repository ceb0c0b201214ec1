"""``blobbench train``: dice against blob dice in a real (small) training loop.

Synthetic, instance-imbalanced data: each image holds a few large, bright blobs and many small,
faint ones in Gaussian noise, so that a loss dominated by large structures has something to
miss. A MONAI ``UNet`` (mish activation, dropout 0.1, as in the paper) is trained on random
crops with one of the losses below; the test images are segmented with sliding-window inference
and a 0.5 threshold and scored with the paper's metrics (instance F1, sensitivity, precision and
volumetric Dice, :mod:`blobbench.metrics`).

Losses: ``dice`` (MONAI DiceLoss, sigmoid), ``blob_dice`` (:func:`blobbench.blob_dice`, alpha=2,
beta=1), ``tversky`` (MONAI TverskyLoss 0.3/0.7), ``blob_tversky`` (:func:`blobbench.blob_tversky`,
alpha=2, beta=1, fp/fn weights 0.3/0.7). The instance maps are labelled once per image with cc3d
(before cropping, as :class:`blobbench.LabelInstancesd` does in a pipeline).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .synthetic import paint_blob

__all__ = ["TrainConfig", "make_dataset", "make_net", "make_loss", "train_step", "train_run", "compare", "LOSSES"]

LOSSES = ("dice", "blob_dice", "tversky", "blob_tversky")


@dataclass
class TrainConfig:
    loss: str = "blob_dice"
    seed: int = 0
    dims: int = 2
    image_size: int = 96  # training / test images are image_size^dims
    crop: int = 48  # training crops (and the sliding window) are crop^dims
    train_images: int = 48
    test_images: int = 16
    iterations: int = 2000
    batch: int = 8
    lr: float = 2e-3
    features: tuple = (16, 32, 64, 128)  # UNet channels per level
    dropout: float = 0.1
    noise: float = 0.45
    small_blobs: int = 14  # per image, faint
    large_blobs: int = 2  # per image, bright
    threads: int | None = None
    device: str = "cpu"
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- data


def make_dataset(n: int, cfg: TrainConfig, seed: int):
    """``n`` images and masks: ``float32[n, 1, *shape]`` images, ``bool[n, 1, *shape]`` masks.

    Large blobs (radius 6-12 voxels) have intensity 1; small ones (radius 1-2.5) have intensity
    0.35-0.7; the noise is Gaussian with std ``cfg.noise``.
    """
    rng = np.random.default_rng(seed)
    shape = (cfg.image_size,) * cfg.dims
    images = np.zeros((n, 1) + shape, dtype=np.float32)
    masks = np.zeros((n, 1) + shape, dtype=bool)
    for i in range(n):
        img = np.zeros(shape, dtype=np.float32)
        m = np.zeros(shape, dtype=bool)
        for kind, count in (("large", cfg.large_blobs), ("small", cfg.small_blobs)):
            for _ in range(int(rng.poisson(count))):
                r = rng.uniform(6, 12) if kind == "large" else rng.uniform(1.0, 2.5)
                center = rng.uniform(r, np.array(shape) - r)
                b = np.zeros(shape, dtype=bool)
                paint_blob(b, rng, center, r, spread=0.5)
                img[b] = np.maximum(img[b], 1.0 if kind == "large" else rng.uniform(0.35, 0.7))
                m |= b
        images[i, 0] = img + rng.normal(0, cfg.noise, size=shape).astype(np.float32)
        masks[i, 0] = m
    return torch.from_numpy(images), torch.from_numpy(masks)


def _random_crops(images, instances, cfg: TrainConfig, gen: torch.Generator):
    n = images.shape[0]
    idx = torch.randint(0, n, (cfg.batch,), generator=gen)
    hi = cfg.image_size - cfg.crop + 1
    xs, ys = [], []
    for i in idx.tolist():
        lo = torch.randint(0, hi, (cfg.dims,), generator=gen).tolist()
        sl = (i, slice(None)) + tuple(slice(a, a + cfg.crop) for a in lo)
        xs.append(images[sl])
        ys.append(instances[sl])
    return torch.stack(xs), torch.stack(ys)


# ----------------------------------------------------------------------------- model and loss


def make_net(cfg: TrainConfig):
    """MONAI ``UNet`` with mish activations and dropout, as in the paper's networks.

    (MONAI ``BasicUNet`` would match the paper more closely, but with torch 2.14 its replication
    padding breaks ``torch.compile``'s backward — an inductor stride mismatch in
    ``replication_pad2d_backward`` that happens with MONAI's own DiceLoss too — and the training
    step must compile.)
    """
    from monai.networks.nets import UNet

    ch = tuple(cfg.features)
    return UNet(
        spatial_dims=cfg.dims,
        in_channels=1,
        out_channels=1,
        channels=ch,
        strides=(2,) * (len(ch) - 1),
        num_res_units=2,
        act=("mish", {}),
        dropout=cfg.dropout,
    )


def make_loss(name: str, spatial_dims: int = 2):
    """``f(logits, instances) -> loss`` for one of :data:`LOSSES`."""
    import blobbench

    if name == "dice":
        from monai.losses import DiceLoss

        d = DiceLoss(sigmoid=True)
        return lambda x, inst: d(x, (inst > 0).to(x.dtype))
    if name == "tversky":
        from monai.losses import TverskyLoss

        t = TverskyLoss(sigmoid=True, alpha=0.3, beta=0.7)
        return lambda x, inst: t(x, (inst > 0).to(x.dtype))
    if name == "blob_dice":
        return blobbench.BlobDiceLoss(alpha=2.0, beta=1.0, spatial_dims=spatial_dims)
    if name == "blob_tversky":
        return blobbench.BlobTverskyLoss(alpha=2.0, beta=1.0, fp_weight=0.3, fn_weight=0.7, spatial_dims=spatial_dims)
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")


def train_step(net, loss_fn, optimizer, x, inst):
    """One optimisation step; returns the loss (detached)."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(net(x), inst)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def predict(net, images, cfg: TrainConfig):
    """Sliding-window inference (crop-sized windows, 25% overlap): probabilities."""
    from monai.inferers import sliding_window_inference

    net.eval()
    out = sliding_window_inference(images, (cfg.crop,) * cfg.dims, sw_batch_size=8, predictor=net, overlap=0.25)
    net.train()
    return torch.sigmoid(out)


# ----------------------------------------------------------------------------- runs


def train_run(cfg: TrainConfig, out_dir: str | None = None, progress: bool = True, data=None) -> dict:
    """Train one network with ``cfg``; evaluate on the test images. Returns a summary dict."""
    from tqdm.auto import tqdm

    import blobbench

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if data is None:
        data = (
            make_dataset(cfg.train_images, cfg, seed=10_000 + cfg.seed),
            make_dataset(cfg.test_images, cfg, seed=20_000),
        )  # one test set for every run
    (train_x, train_m), (test_x, test_m) = data
    train_inst = blobbench.label_instances(train_m, spatial_dims=cfg.dims)
    device = torch.device(cfg.device)
    net = make_net(cfg).to(device)
    loss_fn = make_loss(cfg.loss, cfg.dims)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    t0 = time.perf_counter()
    bar = tqdm(
        range(cfg.iterations),
        desc=f"{cfg.loss} seed {cfg.seed}",
        unit="it",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )
    for it in bar:
        x, inst = _random_crops(train_x, train_inst, cfg, gen)
        x, inst = x.to(device, non_blocking=True), inst.to(device, non_blocking=True)
        losses.append(float(train_step(net, loss_fn, opt, x, inst)))
        if it % 20 == 0:
            bar.set_postfix(loss=f"{statistics.fmean(losses[-20:]):.4f}")
    train_s = time.perf_counter() - t0
    prob = predict(net, test_x.to(device), cfg).cpu()
    metric = blobbench.BlobMetrics(threshold=0.5, spatial_dims=cfg.dims)
    metric(prob, test_m)
    scores = {k: float(v) for k, v in metric.aggregate().items()}
    summary = {
        "config": asdict(cfg),
        "metrics": scores,
        "train_seconds": train_s,
        "final_loss": statistics.fmean(losses[-20:]),
        "loss_curve": losses[:: max(1, len(losses) // 100)],
    }
    if out_dir:
        os.makedirs(os.path.join(out_dir, "checkpoints"), exist_ok=True)
        torch.save(
            {"state_dict": net.state_dict(), "config": asdict(cfg)},
            os.path.join(out_dir, "checkpoints", f"{cfg.loss}_seed{cfg.seed}.pt"),
        )
    summary["_prediction"] = prob  # for the figure; dropped before JSON
    return summary


def _mip(t):
    """Maximum-intensity projection over the first spatial axis of a 3D image (2D: itself)."""
    return t.amax(0) if t.dim() == 3 else t


def render_figure(test_x, test_m, predictions: dict, path: str, index: int = 0):
    """Like the paper's Fig. 5: the (projected) image, then per loss the predicted blobs coloured
    true positive (green), false positive (red), and the missed ground-truth blobs (blue)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import blobbench

    img = _mip(test_x[index, 0])
    gt = test_m[index : index + 1]
    dims = gt.dim() - 2
    gt_inst = blobbench.label_instances(gt, spatial_dims=dims)[0, 0]
    n = len(predictions) + 1
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.9))
    axes[0].imshow(img.numpy(), cmap="gray")
    axes[0].contour(_mip(gt[0, 0].float()).numpy(), levels=[0.5], colors="yellow", linewidths=0.6)
    axes[0].set_title(f"image, ground truth (yellow)\n{int(gt_inst.max())} blobs", fontsize=9)
    for ax, (name, prob) in zip(axes[1:], predictions.items()):
        pred = prob[index : index + 1] > 0.5
        pred_inst = blobbench.label_instances(pred, spatial_dims=dims)[0, 0]
        # TP: predicted blobs touching the truth; FP: the others; FN: true blobs no prediction touches.
        hit_pred = torch.unique(pred_inst[(pred_inst > 0) & (gt_inst > 0)])
        hit_gt = torch.unique(gt_inst[(pred_inst > 0) & (gt_inst > 0)])
        tp = torch.isin(pred_inst, hit_pred) & (pred_inst > 0)
        fp = (pred_inst > 0) & ~tp
        fn = (gt_inst > 0) & ~torch.isin(gt_inst, hit_gt)
        rgb = torch.stack([_mip(fp.float()), _mip(tp.float()), _mip(fn.float())], -1).clamp(0, 1)
        base = (img - img.min()) / (img.max() - img.min() + 1e-8)
        over = 0.45 * base[..., None].repeat(1, 1, 3) + 0.55 * rgb
        ax.imshow(over.numpy())
        m = blobbench.blob_metrics(pred, gt, spatial_dims=dims)
        ax.set_title(
            f"{name}: F1 {m['f1'].item():.2f}, DSC {m['dice'].item():.2f}\nTP green, FP red, FN blue", fontsize=9
        )
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def compare(losses, seeds, cfg: TrainConfig, out_dir: str, progress: bool = True) -> dict:
    """Train every loss with every seed on the same data and budget; table, JSON and figure."""
    from tqdm.auto import tqdm

    os.makedirs(out_dir, exist_ok=True)
    runs, first_preds = [], {}
    data_test = make_dataset(cfg.test_images, cfg, seed=20_000)
    t0 = time.perf_counter()
    jobs = [(s, loss) for s in seeds for loss in losses]
    with tqdm(jobs, desc="training runs", unit="run", file=sys.stderr, disable=not progress) as bar:
        for seed, loss in bar:
            bar.set_postfix_str(f"{loss} seed {seed}")
            c = TrainConfig(**{**asdict(cfg), "loss": loss, "seed": seed})
            data = (make_dataset(c.train_images, c, seed=10_000 + seed), data_test)
            r = train_run(c, out_dir, progress=progress, data=data)
            pred = r.pop("_prediction")
            if seed == seeds[0]:
                first_preds[loss] = pred
            runs.append(r)
            print(
                f"  {loss:13s} seed {seed}: "
                + ", ".join(
                    f"{k} {v:.3f}" for k, v in r["metrics"].items() if k in ("dice", "f1", "sensitivity", "precision")
                )
                + f"  ({r['train_seconds']:.0f} s)",
                flush=True,
            )
    table = {}
    for loss in losses:
        rs = [r for r in runs if r["config"]["loss"] == loss]
        table[loss] = {
            k: {
                "mean": statistics.fmean(r["metrics"][k] for r in rs),
                "std": statistics.stdev([r["metrics"][k] for r in rs]) if len(rs) > 1 else 0.0,
            }
            for k in rs[0]["metrics"]
        }
    result = {
        "config": asdict(cfg),
        "losses": list(losses),
        "seeds": list(seeds),
        "runs": runs,
        "table": table,
        "elapsed_s": time.perf_counter() - t0,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    with open(os.path.join(out_dir, "train_summary.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    text = format_table(result)
    print(text)
    with open(os.path.join(out_dir, "table.md"), "w") as fh:
        fh.write(text)
    try:
        render_figure(data_test[0], data_test[1], first_preds, os.path.join(out_dir, "figure.png"))
    except ImportError:
        print("matplotlib is not installed: no figure")
    return result


def format_table(result) -> str:
    cols = (("dice", "DSC"), ("f1", "F1"), ("sensitivity", "IS"), ("precision", "IP"))
    lines = [
        f"Test metrics, mean ± std over seeds {result['seeds']} "
        f"({result['config']['iterations']} iterations each, {result['config']['dims']}D, "
        f"{result['config']['test_images']} test images)",
        "",
        "| loss | " + " | ".join(c[1] for c in cols) + " |",
        "| --- | " + " | ".join("---" for _ in cols) + " |",
    ]
    for loss, row in result["table"].items():
        lines.append(f"| {loss} | " + " | ".join(f"{row[k]['mean']:.3f} ± {row[k]['std']:.3f}" for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"

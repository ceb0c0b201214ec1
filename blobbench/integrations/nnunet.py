"""nnU-Net v2 trainers that train with blob loss (``nnUNetTrainerBlobDiceCE``, ``nnUNetTrainerBlobDice``)
or with its component-wise (Voronoi) sibling (``nnUNetTrainerCCDiceCE``, ``nnUNetTrainerGlobalCCDiceCE``).

Both keep everything of nnU-Net's default ``nnUNetTrainer`` (plans, network, augmentation, deep
supervision weights, optimiser, schedule, inference) and replace its loss, per output scale, by
the paper's total ``alpha * global + beta * blob`` (Kofler et al. 2022, Eq. 2, defaults alpha = 2,
beta = 1) computed by blobbench's fused operators on the device nnU-Net trains on:

* ``nnUNetTrainerBlobDiceCE``: :func:`blobbench.blob_dice_ce`, criterion Dice + binary
  cross-entropy with weights 1 and 1 (nnU-Net's own Dice + CE weights);
* ``nnUNetTrainerBlobDice``: :func:`blobbench.blob_dice`, criterion Dice;
* ``nnUNetTrainerGlobalCCDiceCE``: :func:`blobbench.cc_dice_ce`, ``1 * global + 1 * CC`` with
  Dice + binary cross-entropy (weights 1 and 1) per Voronoi region, the weighting of Look-Closer's
  trainer of the same name (Learning to Look Closer, ISBI 2026);
* ``nnUNetTrainerCCDiceCE``: the CC term alone (``alpha = 0``), as Look-Closer's
  ``nnUNetTrainerCCDiceCE``.

Use them from the command line, after making nnU-Net find them (see "Finding the trainers")::

    export nnUNet_extTrainer="$(python -m blobbench.integrations.nnunet path)"
    nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerBlobDiceCE

Where the instances are labelled
--------------------------------
Once per training sample, in nnU-Net's data-augmentation pipeline, on the augmented patch, just
before nnU-Net downsamples the target for deep supervision (:class:`LabelInstancesTransform`,
cc3d with full connectivity: 26 in 3D, 8 in 2D). So the labelling

* runs once per sample, not once per output scale and not in the loss: in nnU-Net's augmentation
  worker processes, which run in parallel with the GPU (``nnUNet_n_proc_DA``), never as a
  device-to-host copy plus cc3d on the training thread, which is what nnU-Net's maintainers
  warned against;
* labels exactly the patch the loss sees: after rotation, scaling, mirroring and the removal of
  the padding label, so the instance map and the semantic target can never disagree.

Labelling once per case at preprocessing time was considered and rejected: the instance map would
then have to pass through nnU-Net's spatial augmentation as a segmentation channel, which
resamples a segmentation one label at a time (one ``grid_sample`` per id, i.e. O(N·V) per patch
for N instances, the cost blob loss is built to avoid), and a case's ids would have to be stored
beside nnU-Net's preprocessed data in a format of ours. Labelling the patch also costs little:
cc3d on a patch is a few milliseconds (``benchmarks/nnunet_epoch_time.py`` measures it). The one
difference to labelling whole cases: a blob cut by the patch border into two pieces counts as two.

Where the Voronoi regions are computed (the CC trainers)
-------------------------------------------------------
Also once per sample in the augmentation workers, by :class:`VoronoiRegionsTransform`, the last
step of the pipeline, after nnU-Net's deep-supervision downsampling: at every output scale the
regions are the Voronoi partition of *that scale's* instance maps (:func:`blobbench.voronoi_regions`,
scipy's exact feature transform, distances in full-resolution voxels: a scale pooled by 2 along an
axis has spacing 2 there). Downsampling the full-resolution regions instead would leave regions
whose instance vanished at a coarse scale, which have no CC term. The regions travel as K more
target channels after the instance maps: ``(B, S + 2K, *spatial)``. The cost is scipy's transform
per scale and sample (about 0.3 s for a 128³ patch with 30 blobs on one core; see
``docs/design.md`` section 9), in the workers, not on the training thread.

Differences from Look-Closer's trainers: their global term is nnU-Net's ``DC_and_CE_loss``
(softmax CE over both classes, batch Dice where the plans say so, no smoothing), ours is the blob
operators' global Dice + BCE per (sample, class); their regions come from CuPy on the GPU inside
the loss, recomputed every step, ours from scipy in the data workers; theirs need a binary task,
ours take any number of classes or regions (one-vs-rest, below).

Deep supervision: an instance map per output scale
--------------------------------------------------
The instance maps travel as extra channels of nnU-Net's segmentation target, so nnU-Net's own
``DownsampleSegForDSTransform`` downsamples them with the same nearest-neighbour sampling as the
semantic target: at every scale the instance map is exactly as large as the semantic target there
(``instances > 0`` is the class's voxels at that scale), a blob too small for a coarse scale is
absent from it, and a blob that nearest-neighbour sampling splits keeps its one id, i.e. stays one
lesion. (Connected components of each downsampled target would instead have to run once per scale
and could split one lesion into several.) The per-scale losses are combined with nnU-Net's own
deep-supervision weights (its ``DeepSupervisionWrapper``, whose inner loss is replaced).

Target layout per scale: ``(B, S + K, *spatial)``, int16 (int32 if a patch has more than 32767
blobs of a class): the S semantic channels nnU-Net uses (S = 1 class map, or one channel per region
in region-based training), then one instance map per foreground class or region.

Which probabilities the loss sees
---------------------------------
The fused Dice+CE operator takes sigmoid logits, one binary problem per channel. nnU-Net's default
network has a softmax head (channel 0 = background) and predicts with its softmax. The trainers
give the loss, for every foreground class c, the one-vs-rest logit

    z_c = x_c - logsumexp_{j != c} x_j,   so that   sigmoid(z_c) = softmax(x)_c

exactly: the loss sees the very probabilities nnU-Net segments with at inference, gradients reach
every channel (background included), and as in nnU-Net's Dice (``do_bg=False``) the background
class has no term of its own. For one foreground class, z = x_1 - x_0, and the BCE of sigmoid(z) is
nnU-Net's softmax cross-entropy. With several classes the CE part is a binary cross-entropy per
class on the softmax probabilities (one-vs-rest), not the multi-class CE. In region-based training
(``regions_class_order`` in dataset.json) nnU-Net's heads are already sigmoid, one per region,
and the logits are used as they are.

Differences from nnU-Net's own loss to know about: the global Dice is per (sample, class), as
MONAI's, never nnU-Net's "batch Dice" of some plans; the loss is alpha + beta = 3 times the scale
of a single criterion (the paper's choice); an ignore label is not supported (the blob operators
have no voxel mask) and is refused with an error.

Finding the trainers
--------------------
nnU-Net looks trainers up by name inside ``nnunetv2.training.nnUNetTrainer`` and, from nnunetv2
2.8 on, in the folders listed in the ``nnUNet_extTrainer`` environment variable.
``python -m blobbench.integrations.nnunet path`` prints blobbench's trainer folder for that
variable (nothing is written anywhere). For an nnunetv2 without ``nnUNet_extTrainer``,
``python -m blobbench.integrations.nnunet install`` writes a three-line module that imports the
trainers into nnunetv2's trainer folder (``uninstall`` removes it; reinstalling nnunetv2 removes it
too). Either way ``nnUNetv2_predict`` finds the trainer by the same lookup.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from .._optional import require

require("nnunetv2", "nnunet", "blobbench.integrations.nnunet")

from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, SegOnlyTransform  # noqa: E402
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms  # noqa: E402
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import (  # noqa: E402
    DownsampleSegForDSTransform,
)
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402

import blobbench  # noqa: E402

__all__ = [
    "BlobLossForNNUNet",
    "CCLossForNNUNet",
    "LabelInstancesTransform",
    "VoronoiRegionsTransform",
    "nnUNetTrainerBlobDice",
    "nnUNetTrainerBlobDiceCE",
    "nnUNetTrainerBlobDiceCE_demo",
    "nnUNetTrainerCCDiceCE",
    "nnUNetTrainerGlobalCCDiceCE",
    "one_vs_rest_logits",
    "trainer_folder",
    "write_demo_dataset",
]

SHIM_NAME = "blobbench_nnunet_trainers.py"


def trainer_folder() -> Path:
    """The folder to put in ``nnUNet_extTrainer``: it holds one module that imports the trainers."""
    return Path(__file__).resolve().parent / "nnunet_trainers"


class LabelInstancesTransform(SegOnlyTransform):
    """Appends the connected components of every foreground class (or region) to a sample's target.

    A batchgeneratorsv2 transform for one sample: ``segmentation`` ``(S, *spatial)`` becomes
    ``(S + K, *spatial)``, channel ``S + k`` holding the instance ids (0 = background) of the k-th
    foreground label (``seg[0] == label``) or, with ``regions``, of the k-th region channel
    (``seg[k] != 0``). int16, or int32 when a channel has more than 32767 components.

    Args:
        foreground_labels: nnU-Net's ``label_manager.foreground_labels`` (used without regions).
        regions: the foreground regions when the target has been converted to regions, else None.
        connectivity: cc3d connectivity; None is full connectivity (26 in 3D, 8 in 2D).
    """

    def __init__(self, foreground_labels, regions=None, connectivity: int | None = None):
        super().__init__()
        self.foreground_labels = tuple(int(label) for label in foreground_labels or ())
        self.num_regions = None if regions is None else len(regions)
        self.connectivity = connectivity

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> torch.Tensor:
        if self.num_regions is not None:
            masks = segmentation[: self.num_regions] != 0
        else:
            masks = torch.stack([segmentation[0] == label for label in self.foreground_labels])
        instances = blobbench.label_instances(
            masks[None], self.connectivity, spatial_dims=segmentation.ndim - 1, dtype=torch.int32
        )[0]
        dtype = torch.int16 if int(instances.max()) <= torch.iinfo(torch.int16).max else torch.int32
        return torch.cat([segmentation.to(dtype), instances.to(dtype)])


class VoronoiRegionsTransform(BasicTransform):
    """Appends the Voronoi regions of a sample's instance maps to its target, at every output scale.

    The last step of a CC trainer's pipeline, after :class:`LabelInstancesTransform` and nnU-Net's
    ``DownsampleSegForDSTransform``: each scale's target ``(S + K, *spatial)`` becomes
    ``(S + 2K, *spatial)``, channel ``S + K + k`` holding :func:`blobbench.voronoi_regions` of
    instance channel ``S + k`` at that scale (same dtype). Distances are in full-resolution voxels:
    the spacing of a scale is ``1 / s`` per axis for the scale factors ``s`` nnU-Net downsampled with.

    Args:
        num_semantic_channels: S, the target channels before the instance maps.
        ds_scales: nnU-Net's deep-supervision scales (one factor or one per axis, per scale), or
            None when the target is one tensor.
    """

    def __init__(self, num_semantic_channels: int, ds_scales=None):
        super().__init__()
        self.num_semantic_channels = int(num_semantic_channels)
        self.ds_scales = None if ds_scales is None else [s if isinstance(s, (list, tuple)) else [s] for s in ds_scales]

    def _append_regions(self, segmentation: torch.Tensor, scale) -> torch.Tensor:
        s = self.num_semantic_channels
        instances = segmentation[s:]
        spatial = segmentation.ndim - 1
        factors = [1.0] * spatial if scale is None else [float(f) for f in scale] * (spatial if len(scale) == 1 else 1)
        spacing = tuple(1.0 / f for f in factors)
        regions = blobbench.voronoi_regions(instances[None], spacing=spacing)[0]
        return torch.cat([segmentation, regions.to(segmentation.dtype)])

    def apply(self, data_dict, **params):
        segmentation = data_dict.get("segmentation")
        if segmentation is None:
            return data_dict
        if isinstance(segmentation, (list, tuple)):
            scales = self.ds_scales if self.ds_scales is not None else [None] * len(segmentation)
            if len(scales) != len(segmentation):
                raise ValueError(
                    f"VoronoiRegionsTransform: {len(segmentation)} target scales but {len(scales)} ds_scales"
                )
            data_dict["segmentation"] = [self._append_regions(t, sc) for t, sc in zip(segmentation, scales)]
        else:
            data_dict["segmentation"] = self._append_regions(segmentation, None)
        return data_dict


def one_vs_rest_logits(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid logits of the softmax probabilities of the foreground classes.

    ``logits`` ``(B, C, *spatial)`` of a softmax head (channel 0 = background) to ``(B, C - 1,
    *spatial)``: ``z_c = x_c - logsumexp_{j != c} x_j``, so ``sigmoid(z_c) == softmax(x)[:, c]``.
    """
    channels = logits.shape[1]
    if channels < 2:
        raise ValueError(f"a softmax head needs at least 2 channels, got {channels}")
    z = []
    for c in range(1, channels):
        others = torch.cat([logits[:, :c], logits[:, c + 1 :]], dim=1)
        z.append(logits[:, c] - torch.logsumexp(others, dim=1))
    return torch.stack(z, dim=1)


class BlobLossForNNUNet(torch.nn.Module):
    """One output scale: nnU-Net's ``(output, target)`` to a blob loss of the foreground channels.

    Args:
        loss_fn: :func:`blobbench.blob_dice_ce` or :func:`blobbench.blob_dice` (any function
            ``(logits, instances, alpha, beta, **kwargs)`` with sigmoid logits).
        num_semantic_channels: S, the number of target channels before the instance maps.
        has_regions: the network has sigmoid heads (use the logits as they are); else it has a
            softmax head and the loss gets :func:`one_vs_rest_logits`.
        alpha, beta: the paper's weights of the global and the blob term.
        **loss_kwargs: passed to ``loss_fn``.
    """

    def __init__(
        self,
        loss_fn: Callable[..., torch.Tensor],
        num_semantic_channels: int,
        has_regions: bool,
        alpha: float = 2.0,
        beta: float = 1.0,
        **loss_kwargs,
    ):
        super().__init__()
        self.loss_fn = loss_fn
        self.num_semantic_channels = num_semantic_channels
        self.has_regions = has_regions
        self.alpha = alpha
        self.beta = beta
        self.loss_kwargs = loss_kwargs

    def logits_and_instances(self, output: torch.Tensor, target: torch.Tensor):
        """The sigmoid logits and the instance maps the loss function receives, on ``output``'s device."""
        instances = target[:, self.num_semantic_channels :].to(output.device, non_blocking=True)
        logits = output.float()
        if not self.has_regions:
            logits = one_vs_rest_logits(logits)
        if logits.shape != instances.shape:
            raise ValueError(
                f"blob loss: the network gives {tuple(logits.shape)} foreground logits but the target has "
                f"{tuple(instances.shape)} instance maps; was the target made by the trainer's "
                f"LabelInstancesTransform?"
            )
        return logits, instances

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, instances = self.logits_and_instances(output, target)
        return self.loss_fn(logits, instances, self.alpha, self.beta, **self.loss_kwargs)


class CCLossForNNUNet(BlobLossForNNUNet):
    """One output scale: nnU-Net's ``(output, target)`` to a CC loss of the foreground channels.

    The target is ``(B, S + 2K, *spatial)``: S semantic channels, K instance maps, then their K
    Voronoi regions (:class:`VoronoiRegionsTransform`). ``loss_fn`` is
    :func:`blobbench.cc_dice_ce` (any ``(logits, instances, regions, alpha, beta, **kwargs)``).
    """

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        extra = target.shape[1] - self.num_semantic_channels
        if extra <= 0 or extra % 2:
            raise ValueError(
                f"CC loss: expected a target of S + 2K channels (S = {self.num_semantic_channels} semantic, K "
                f"instance maps, K region maps) but it has {target.shape[1]}; was it made by the trainer's "
                "LabelInstancesTransform and VoronoiRegionsTransform?"
            )
        k = extra // 2
        logits, instances = self.logits_and_instances(output, target[:, : self.num_semantic_channels + k])
        regions = target[:, self.num_semantic_channels + k :].to(output.device, non_blocking=True)
        return self.loss_fn(logits, instances, regions, self.alpha, self.beta, **self.loss_kwargs)


class _BlobLossTrainer(nnUNetTrainer):
    """nnU-Net's default trainer with its loss replaced by a blob loss (see the module docstring)."""

    blob_alpha = 2.0
    blob_beta = 1.0
    # cc3d connectivity of the instances; None = full (26 in 3D, 8 in 2D).
    blob_connectivity: int | None = None
    # the loss module of one scale; the CC trainers also append the Voronoi regions to the target
    loss_module = BlobLossForNNUNet
    with_regions = False

    def blob_loss_function(self):
        """(function, keyword arguments) of the blob loss of one scale."""
        raise NotImplementedError

    @property
    def _num_semantic_channels(self) -> int:
        return len(self.label_manager.foreground_regions) if self.label_manager.has_regions else 1

    def _build_loss(self):
        if self.label_manager.has_ignore_label:
            raise NotImplementedError(
                f"{type(self).__name__}: datasets with an ignore label are not supported (the blob "
                "operators have no voxel mask); train with nnUNetTrainer"
            )
        loss_fn, kwargs = self.blob_loss_function()
        blob = self.loss_module(
            loss_fn,
            self._num_semantic_channels,
            self.label_manager.has_regions,
            self.blob_alpha,
            self.blob_beta,
            **kwargs,
        )
        # nnU-Net's own loss, built for its deep-supervision weights; its inner loss is replaced.
        loss = super()._build_loss()
        if isinstance(loss, DeepSupervisionWrapper):
            loss.loss = blob
            return loss
        return blob

    @classmethod
    def _add_instance_labelling(cls, transforms, base_transforms, args, kwargs):
        bound = inspect.signature(base_transforms).bind(*args, **kwargs)
        bound.apply_defaults()
        labelling = LabelInstancesTransform(
            bound.arguments["foreground_labels"], bound.arguments["regions"], cls.blob_connectivity
        )
        if not isinstance(transforms, ComposeTransforms):
            raise TypeError(f"{cls.__name__}: expected nnU-Net's ComposeTransforms, got {type(transforms).__name__}")
        steps = transforms.transforms
        at = next((i for i, t in enumerate(steps) if isinstance(t, DownsampleSegForDSTransform)), len(steps))
        steps.insert(at, labelling)
        if cls.with_regions:
            n_semantic = 1 if bound.arguments["regions"] is None else len(bound.arguments["regions"])
            steps.append(VoronoiRegionsTransform(n_semantic, bound.arguments["deep_supervision_scales"]))
        return transforms

    @classmethod
    def get_training_transforms(cls, *args, **kwargs):
        transforms = nnUNetTrainer.get_training_transforms(*args, **kwargs)
        return cls._add_instance_labelling(transforms, nnUNetTrainer.get_training_transforms, args, kwargs)

    @classmethod
    def get_validation_transforms(cls, *args, **kwargs):
        transforms = nnUNetTrainer.get_validation_transforms(*args, **kwargs)
        return cls._add_instance_labelling(transforms, nnUNetTrainer.get_validation_transforms, args, kwargs)

    def _semantic_target(self, target: torch.Tensor) -> torch.Tensor:
        semantic = target[:, : self._num_semantic_channels]
        return semantic.bool() if self.label_manager.has_regions else semantic

    def validation_step(self, batch: dict) -> dict:
        # nnU-Net's online Dice reads the target as its semantic channels only: hand it those, and
        # the loss the full target (semantic + instances) it was given.
        full = batch["target"]
        if isinstance(full, list):
            semantic = [self._semantic_target(t) for t in full]
        else:
            semantic = self._semantic_target(full)
        loss = self.loss
        self.loss = lambda output, _semantic: loss(output, full)
        try:
            return super().validation_step({**batch, "target": semantic})
        finally:
            self.loss = loss


class nnUNetTrainerBlobDiceCE(_BlobLossTrainer):
    """nnU-Net's default trainer with blob Dice + CE: ``2 * DiceCE_global + 1 * DiceCE_blob`` per scale."""

    blob_lambda_dice = 1.0
    blob_lambda_ce = 1.0

    def blob_loss_function(self):
        return blobbench.blob_dice_ce, {"lambda_dice": self.blob_lambda_dice, "lambda_ce": self.blob_lambda_ce}


class nnUNetTrainerBlobDice(_BlobLossTrainer):
    """nnU-Net's default trainer with blob Dice: ``2 * Dice_global + 1 * Dice_blob`` per scale."""

    def blob_loss_function(self):
        return blobbench.blob_dice, {}


class nnUNetTrainerGlobalCCDiceCE(_BlobLossTrainer):
    """nnU-Net's default trainer with CC-DiceCE: ``1 * DiceCE_global + 1 * DiceCE_CC`` per scale.

    The CC term scores every instance on its Voronoi region (:func:`blobbench.cc_dice_ce`); the
    weights 1 : 1 follow Look-Closer's ``nnUNetTrainerGlobalCCDiceCE``.
    """

    loss_module = CCLossForNNUNet
    with_regions = True
    blob_alpha = 1.0
    blob_beta = 1.0
    blob_lambda_dice = 1.0
    blob_lambda_ce = 1.0

    def blob_loss_function(self):
        return blobbench.cc_dice_ce, {"lambda_dice": self.blob_lambda_dice, "lambda_ce": self.blob_lambda_ce}


class nnUNetTrainerCCDiceCE(nnUNetTrainerGlobalCCDiceCE):
    """The CC term alone, ``DiceCE_CC`` per scale (``alpha = 0``), as Look-Closer's ``nnUNetTrainerCCDiceCE``."""

    blob_alpha = 0.0


class nnUNetTrainerBlobDiceCE_demo(nnUNetTrainerBlobDiceCE):
    """``nnUNetTrainerBlobDiceCE`` for a demo or a smoke test: 2 epochs of 3 training iterations and
    1 validation iteration (nnU-Net's default is 1000 epochs of 250). The README's nnU-Net example
    and CI train it end to end on the CPU (about two minutes with nnU-Net's final validation).

    nnU-Net records a trainer's ``__init__`` arguments by name, so a subclass spells out the
    signature, as here.
    """

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):  # noqa: B008 (nnU-Net's signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 1


def write_demo_dataset(
    raw_folder: str | os.PathLike,
    dataset_id: int = 990,
    *,
    num_cases: int = 6,
    shape: tuple[int, int, int] = (32, 40, 36),
    blobs_per_class: int = 5,
    seed: int = 0,
) -> Path:
    """Write a tiny synthetic nnU-Net raw dataset of 3D volumes with small blobs of two classes.

    ``raw_folder/Dataset{dataset_id}_BlobDemo`` with ``imagesTr``, ``labelsTr`` (NIfTI) and
    ``dataset.json``: labels background 0, "lesion" 1, "nodule" 2; every case has
    ``blobs_per_class`` balls of radius 1 to 4 voxels per class (overlaps merge) and an image that
    is brighter inside them, plus noise. For tests, benchmarks and the README's demo, not science.
    Returns the dataset folder.
    """
    import json

    import numpy as np

    sitk = require("SimpleITK", "nnunet", "write_demo_dataset")
    folder = Path(raw_folder) / f"Dataset{dataset_id:03d}_BlobDemo"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    for case in range(num_cases):
        seg = np.zeros(shape, dtype=np.uint8)
        for label in (1, 2):
            for _ in range(blobs_per_class):
                radius = rng.uniform(1.0, 4.0)
                centre = rng.uniform(4, np.array(shape) - 4)
                seg[((grid - centre) ** 2).sum(-1) <= radius**2] = label
        image = (seg * 1.5 + rng.normal(0, 0.5, shape)).astype(np.float32)
        for array, path in ((image, f"imagesTr/case{case:03d}_0000.nii.gz"), (seg, f"labelsTr/case{case:03d}.nii.gz")):
            sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / path))
    meta = {
        "channel_names": {"0": "synthetic"},
        "labels": {"background": 0, "lesion": 1, "nodule": 2},
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return folder


def _nnunet_trainer_dir() -> Path:
    import nnunetv2

    return Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"


def main(argv=None) -> int:
    """``python -m blobbench.integrations.nnunet {path,install,uninstall}``."""
    parser = argparse.ArgumentParser(
        prog="python -m blobbench.integrations.nnunet",
        description="Make nnUNetv2_train -tr nnUNetTrainerBlobDiceCE (or ...BlobDice, ...CCDiceCE, ...GlobalCCDiceCE) find blobbench's trainers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("path", help='print the folder for nnUNet_extTrainer (export nnUNet_extTrainer="$(... path)")')
    sub.add_parser("install", help="write a module importing the trainers into nnunetv2's trainer folder")
    sub.add_parser("uninstall", help="remove that module")
    demo = sub.add_parser("demo-dataset", help="write a tiny synthetic dataset into $nnUNet_raw")
    demo.add_argument("dataset_id", type=int, nargs="?", default=990)
    args = parser.parse_args(argv)
    shim = _nnunet_trainer_dir() / SHIM_NAME
    if args.command == "path":
        print(trainer_folder())
    elif args.command == "install":
        shutil.copyfile(trainer_folder() / SHIM_NAME, shim)
        print(f"wrote {shim}")
    elif args.command == "demo-dataset":
        raw = os.environ.get("nnUNet_raw")
        if not raw:
            parser.error("set nnUNet_raw first (nnU-Net's raw data folder)")
        print(write_demo_dataset(raw, args.dataset_id))
    else:
        if shim.exists():
            os.remove(shim)
            print(f"removed {shim}")
        else:
            print(f"nothing to remove: {shim} does not exist")
    return 0


if __name__ == "__main__":
    sys.exit(main())

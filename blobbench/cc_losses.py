"""Component-wise (Voronoi) losses: CC-Dice and CC-DiceCE, functional forms and modules.

Every instance of a (b, c) plane is scored on its Voronoi region (the voxels nearer to it than to
any other instance, :func:`blobbench.voronoi_regions`) instead of on its voxels plus the whole
background as in blob loss (docs/design.md, section 9):

    L = alpha * L_global + beta * L_cc

    L_cc = mean over batch elements with instances of
           mean over their planes with instances of
           mean over the plane's regions k of  lambda_dice * Dice_k + lambda_ce * CE_k

with Dice_k MONAI's Dice of p against t = [instances > 0] on region k's voxels and CE_k the mean
binary cross-entropy there (CC-Dice: the Dice part only). L_global is blob loss's global term.
The defaults alpha = beta = 1 follow "Learning to Look Closer" (``nnUNetTrainerGlobalCCDiceCE``).

The regions partition each plane, so every term is a closed form of per-region sums
(:func:`blobbench.closed_form.cc_terms`). The functions call the fused operators
``torch.ops.blob.cc_dice`` / ``cc_dice_ce`` (on the CPU one accumulate pass and one backward
pass; on other devices an ATen composite) through :data:`_cc_loss`; the plain-PyTorch
``index_add`` path (:func:`_scatter_cc_loss`) is the baseline, :func:`blobbench.vectorized_cc_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .closed_form import cc_terms, reduce_blob_terms
from .losses import _BlobLossModule, _check_layout, _max_label_arg, _without_background
from .voronoi import check_region_table, check_regions, voronoi_regions

__all__ = ["cc_dice", "cc_dice_ce", "CCDiceLoss", "CCDiceCELoss"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
_ACTIVATIONS = ("sigmoid", "softmax", "none")


def _check_inputs(input, instances, activation, loss, lambda_dice, lambda_ce, fn):
    if not isinstance(input, torch.Tensor) or not isinstance(instances, torch.Tensor):
        raise TypeError(f"{fn}: `input` and `instances` must be tensors")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: `input` must be a float16, bfloat16, float32 or float64 tensor, got {input.dtype}")
    if instances.dtype not in _INT_DTYPES:
        raise TypeError(
            f"{fn}: `instances` must hold integer instance ids (uint8, int16, int32 or int64), got {instances.dtype}"
        )
    if input.dim() < 3 or input.dim() > 5:
        raise ValueError(
            f"{fn}: `input` must have shape (B, C, *spatial) with 1 to 3 spatial dims, got {tuple(input.shape)}"
        )
    if instances.shape != input.shape:
        raise ValueError(
            f"{fn}: `instances` must have the shape of `input` {tuple(input.shape)}, got {tuple(instances.shape)}"
        )
    if instances.device != input.device:
        raise ValueError(f"{fn}: `instances` must be on the device of `input` ({input.device}), got {instances.device}")
    if input.numel() == 0:
        raise ValueError(f"{fn}: an empty batch has no loss (input of shape {tuple(input.shape)})")
    if activation not in _ACTIVATIONS:
        raise ValueError(f'{fn}: `activation` must be one of "sigmoid", "softmax" or "none", got {activation!r}')
    if activation == "softmax":
        if loss == "dice_ce":
            raise ValueError(
                f'{fn}: activation="softmax" is not supported: CC Dice+CE takes one binary cross-entropy per '
                "channel and region (sigmoid or none), as blob_dice_ce; use cc_dice with softmax"
            )
        if input.shape[1] < 2:
            raise ValueError(
                f'{fn}: activation="softmax" needs at least 2 channels (channel 0 is the background class), '
                f"got C = {input.shape[1]}"
            )
    if not (lambda_dice >= 0 and lambda_ce >= 0):
        raise ValueError(f"{fn}: `lambda_dice` and `lambda_ce` must be >= 0, got {lambda_dice} and {lambda_ce}")
    if loss == "dice_ce" and activation == "none" and bool(((input < 0) | (input > 1)).any()):
        raise ValueError(
            f'{fn}: with activation="none" `input` must hold probabilities in [0, 1] (the domain of the binary '
            "cross-entropy), found values outside"
        )
    read = instances[:, 1:] if activation == "softmax" else instances  # softmax never reads channel 0
    smallest = int(read.min())
    if smallest < 0:
        raise ValueError(
            f"{fn}: `instances` must be >= 0 (0 = background), found a negative id (the smallest is {smallest})"
        )


def _regions_for(input, instances, regions, activation, spacing, fn):
    """The given regions, checked, or the Voronoi regions of ``instances`` (the slow path)."""
    if regions is None:
        source = instances
        if activation == "softmax":  # channel 0's instances are not read: no regions to compute
            source = instances.clone()
            source[:, 0] = 0
        return voronoi_regions(source, spacing, spatial_dims=input.dim() - 2)
    check_regions(instances, regions, fn, first_channel=1 if activation == "softmax" else 0)
    return regions


def _scatter_cc_loss(
    input: torch.Tensor,
    instances: torch.Tensor,
    regions: torch.Tensor | None,
    alpha: float,
    beta: float,
    *,
    loss: str,
    activation: str,
    squared_pred: bool,
    smooth_nr: float,
    smooth_dr: float,
    lambda_dice: float,
    lambda_ce: float,
    max_label: int | None,
    spacing,
    fn: str,
) -> torch.Tensor:
    """CC-Dice / CC-DiceCE from per-region sums added with ``index_add`` (docs/design.md, section 9).

    Pure PyTorch, any device, autograd for the backward; the ``VectorizedCCLoss`` of "Learning to
    Look Closer" in our semantics, batched and multi-class. Syncs with the host (the id range and
    the checks of the regions). ``loss`` is ``"dice"`` or ``"dice_ce"``.
    """
    _check_inputs(input, instances, activation, loss, lambda_dice, lambda_ce, fn)
    regions = _regions_for(input, instances, regions, activation, spacing, fn)
    bound = _max_label_arg(max_label)
    B, C = input.shape[:2]
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.to(acc)
    p = (torch.sigmoid(x) if activation == "sigmoid" else torch.softmax(x, 1) if activation == "softmax" else x)
    target = (instances > 0).to(acc)
    if activation == "softmax":
        target[:, 0] = (instances[:, 1:] == 0).all(dim=1).to(acc)
    labels = regions.reshape(B, C, -1).long()
    first = 1 if activation == "softmax" else 0
    if first:
        labels = labels.clone()
        labels[:, 0] = 0  # channel 0 (the background class) has no regions: its voxels feed the global term
    largest = int(labels.max())
    if max_label is not None and largest > bound:
        raise ValueError(f"{fn}: `regions` holds an id above max_label (the largest is {largest}, max_label = {bound})")
    ids = None
    K = largest + 1
    if K > 4 * labels.numel():  # sparse, huge ids: compact them (0 stays column 0)
        ids, inverse = torch.unique(torch.cat([labels.new_zeros(1), labels.reshape(-1)]), return_inverse=True)
        labels, K = inverse[1:].view_as(labels), ids.numel()
    index = (labels + (torch.arange(B * C, device=input.device) * K).view(B, C, 1)).reshape(-1)

    pf, tf = p.reshape(-1), target.reshape(-1)

    def total(values):
        return torch.zeros(B * C * K, dtype=acc, device=input.device).index_add_(0, index, values).view(B, C, K)

    I, T = total(pf * tf), total(tf)
    P = total(pf * pf) if squared_pred else total(pf)
    N = torch.bincount(index, minlength=B * C * K).view(B, C, K)
    region_ids = None if ids is None else ids.expand(B, C, K)
    check_region_table(N[:, first:], T[:, first:], None if ids is None else region_ids[:, first:], fn)
    E = None
    if loss == "dice_ce":
        if activation == "sigmoid":
            bce = F.binary_cross_entropy_with_logits(x, target, reduction="none")
        else:
            bce = F.binary_cross_entropy(p, target, reduction="none")
        E = total(bce.reshape(-1))
    N = N.to(acc)
    args = dict(loss=loss, lambda_dice=lambda_dice, lambda_ce=lambda_ce, smooth_nr=smooth_nr, smooth_dr=smooth_dr)
    sums = (I, P, T, E, N)
    global_loss = cc_terms(*(s if s is None else s.sum(-1) for s in sums), **args).mean()
    terms = cc_terms(*(s if s is None else s[..., 1:] for s in sums), **args)
    present = N[..., 1:] > 0
    present[:, :first] = False
    cc_loss = reduce_blob_terms(terms, present)
    out = alpha * global_loss + beta * cc_loss
    return out if input.dtype in (torch.float16, torch.bfloat16) else out.to(input.dtype)


def _fused_cc_loss(
    input, instances, regions, alpha, beta, *, loss, activation, squared_pred, smooth_nr, smooth_dr,
    lambda_dice, lambda_ce, max_label, spacing, fn,
):  # fmt: skip
    """The fused operators ``torch.ops.blob.cc_dice`` / ``cc_dice_ce`` (one accumulate pass, one
    backward pass; they check their arguments). Eager calls go to the public ops (C++ autograd);
    while Dynamo traces, to the private forward ops, whose table size it must see (as blob_dice)."""
    if regions is None:
        _check_inputs(input, instances, activation, loss, lambda_dice, lambda_ce, fn)
        regions = _regions_for(input, instances, None, activation, spacing, fn)
    elif not isinstance(regions, torch.Tensor):
        raise TypeError(f"{fn}: `regions` must be a tensor (or None), got {type(regions).__name__}")
    bound = _max_label_arg(max_label)
    ops = torch.ops.blob
    if torch.compiler.is_compiling():
        if loss == "dice":
            args = (activation, squared_pred, smooth_nr, smooth_dr, bound)
            return ops._cc_dice_forward.default(input, instances, regions, alpha, beta, *args)[0]
        args = (lambda_dice, lambda_ce, activation, squared_pred, smooth_nr, smooth_dr, bound)
        return ops._cc_dice_ce_forward.default(input, instances, regions, alpha, beta, *args)[0]
    kwargs = dict(activation=activation, squared_pred=squared_pred, smooth_nr=smooth_nr, smooth_dr=smooth_dr)
    kwargs["max_label"] = bound
    if loss == "dice":
        return ops.cc_dice.default(input, instances, regions, alpha, beta, **kwargs)
    return ops.cc_dice_ce.default(input, instances, regions, alpha, beta, lambda_dice=lambda_dice,
                                  lambda_ce=lambda_ce, **kwargs)  # fmt: skip


# The implementation behind cc_dice / cc_dice_ce: the fused operators torch.ops.blob.cc_dice /
# cc_dice_ce (fused CPU kernels; an ATen composite on other devices). The scatter path stays as the
# baseline, blobbench.vectorized_cc_loss.
_cc_loss = _fused_cc_loss


def cc_dice(
    input: torch.Tensor,
    instances: torch.Tensor,
    regions: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    *,
    activation: str = "sigmoid",
    squared_pred: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    max_label: int | None = None,
    spacing=None,
    spatial_dims: int | None = None,
) -> torch.Tensor:
    """Component-wise (Voronoi) Dice loss ``alpha * L_global + beta * L_cc``.

    Every instance k of a (b, c) plane is scored with MONAI's Dice
    ``1 - (2 sum(p t) + smooth_nr) / (sum(p^q) + sum(t) + smooth_dr)`` on the voxels of its region
    (t = [instances > 0]); L_cc averages them per plane, then over the planes with instances of each
    batch element, then over the batch elements with instances (blob loss's reduction, planes
    without instances skipped; 0 with zero gradient without any). L_global is
    :func:`blob_dice`'s global term. docs/design.md, section 9, has the closed form.

    Args:
        input: ``Tensor[B, C, *spatial]`` (1 to 3 spatial dims), float16/bfloat16/float32/float64:
            logits (``"sigmoid"``, ``"softmax"``) or probabilities (``"none"``).
        instances: ``Tensor[B, C, *spatial]``, uint8/int16/int32/int64 instance ids per channel
            (0 = background), e.g. from :func:`blobbench.label_instances`.
        regions: ``Tensor[B, C, *spatial]``: the Voronoi regions of ``instances``
            (:func:`blobbench.voronoi_regions`, or :class:`blobbench.transforms.VoronoiRegionsd` in
            the data pipeline), with ``instances``' dtype and device. ``None`` computes them here:
            the slow path (scipy on the CPU, about 60 times a cc3d labelling of the patch, plus a
            copy to the host and back for CUDA tensors).
        alpha, beta: weights of the global and the CC term (default 1 and 1, as Look-Closer's
            ``nnUNetTrainerGlobalCCDiceCE``; blob loss's paper uses 2 and 1).
        activation: ``"sigmoid"`` (default), ``"softmax"`` (over C; channel 0 is the background
            class: its target is "no instance in any other channel", it has no CC term and
            ``instances[:, 0]`` / ``regions[:, 0]`` are not read) or ``"none"``.
        squared_pred, smooth_nr, smooth_dr: as in MONAI's ``DiceLoss``.
        max_label: an upper bound on the region ids, or None; ids above it raise.
        spacing: voxel size per spatial dim for ``regions=None`` (see
            :func:`blobbench.voronoi_regions`); ignored when ``regions`` is given.
        spatial_dims: 1, 2 or 3; required for 3-D and 4-D inputs, as in :func:`blob_dice`.

    Returns:
        A 0-dim tensor: float32 for float16/bfloat16 input, else ``input``'s dtype.

    Raises:
        ValueError / TypeError naming the argument: bad dtypes, shapes, devices or options, negative
        ids, ``regions`` that do not fit ``instances`` (an instance voxel whose region is not its
        id, a region without its instance, e.g. regions computed before a crop), an empty batch.

    This release computes the sums with PyTorch ops (any device; it syncs with the host); the
    fused operator replaces them when it lands.

    Example:
        >>> logits = torch.randn(2, 1, 16, 32, 32, requires_grad=True)
        >>> instances = torch.zeros(2, 1, 16, 32, 32, dtype=torch.int32)
        >>> instances[0, 0, 2:5, 3:9, 3:9] = 1; instances[0, 0, 10:12, 20:25, 5:8] = 2
        >>> regions = blobbench.voronoi_regions(instances)
        >>> cc_dice(logits, instances, regions).backward()
    """
    _check_layout(input, spatial_dims, "cc_dice")
    return _cc_loss(
        input,
        instances,
        regions,
        float(alpha),
        float(beta),
        loss="dice",
        activation=activation,
        squared_pred=bool(squared_pred),
        smooth_nr=float(smooth_nr),
        smooth_dr=float(smooth_dr),
        lambda_dice=1.0,
        lambda_ce=0.0,
        max_label=max_label,
        spacing=spacing,
        fn="cc_dice",
    )


def cc_dice_ce(
    input: torch.Tensor,
    instances: torch.Tensor,
    regions: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    *,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    activation: str = "sigmoid",
    squared_pred: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    max_label: int | None = None,
    spacing=None,
    spatial_dims: int | None = None,
) -> torch.Tensor:
    """Component-wise (Voronoi) Dice+CE loss ``alpha * L_global + beta * L_cc`` (CC-DiceCE).

    The term of region k is ``lambda_dice * Dice_k + lambda_ce * CE_k``: MONAI's ``DiceCELoss`` on
    the region's voxels (for one channel: Dice plus ``BCEWithLogitsLoss``, a mean over the region's
    voxels). With ``activation="none"`` the cross-entropy is ``binary_cross_entropy`` on the
    probabilities (values outside [0, 1] raise). ``"softmax"`` is refused, as by
    :func:`blob_dice_ce`. L_global is :func:`blob_dice_ce`'s global term (per channel Dice + BCE,
    the BCE a mean over the plane). Reduction, defaults and the other arguments as in
    :func:`cc_dice`.

    Example:
        >>> cc_dice_ce(logits, instances, regions, lambda_ce=0.5).backward()
    """
    _check_layout(input, spatial_dims, "cc_dice_ce")
    return _cc_loss(
        input,
        instances,
        regions,
        float(alpha),
        float(beta),
        loss="dice_ce",
        activation=activation,
        squared_pred=bool(squared_pred),
        smooth_nr=float(smooth_nr),
        smooth_dr=float(smooth_dr),
        lambda_dice=float(lambda_dice),
        lambda_ce=float(lambda_ce),
        max_label=max_label,
        spacing=spacing,
        fn="cc_dice_ce",
    )


class _CCLossModule(_BlobLossModule):
    """The blob loss modules' option handling (MONAI's names included) without masking, and
    ``forward(input, instances, regions=None)``."""

    def __init__(self, alpha, beta, activation, smooth_nr, smooth_dr, max_label, spacing, spatial_dims, monai):
        super().__init__(alpha, beta, activation, "paper", smooth_nr, smooth_dr, max_label, spatial_dims, *monai)
        self.spacing = spacing

    def _loss(self, fn, input, instances, regions=None, **options):
        if not self.include_background:
            name = type(self).__name__
            input, instances = _without_background(input, instances, name)
            regions = None if regions is None else regions[:, 1:]
        return fn(
            input,
            instances,
            regions,
            self.alpha,
            self.beta,
            activation=self.activation,
            smooth_nr=self.smooth_nr,
            smooth_dr=self.smooth_dr,
            max_label=self.max_label,
            spacing=self.spacing,
            spatial_dims=self.spatial_dims,
            **options,
        )


class CCDiceLoss(_CCLossModule):
    """Component-wise (Voronoi) Dice loss as a module; see :func:`cc_dice`.

    ``forward(input, instances, regions=None)``: ``input: Tensor[B, C, *spatial]`` logits,
    ``instances`` and ``regions`` integer ids of the same shape (``regions=None``: computed from
    ``instances``, the slow path). MONAI's names ``sigmoid``, ``softmax``, ``include_background``,
    ``to_onehot_y`` and ``reduction`` are accepted as in :class:`BlobDiceLoss`.

    Example:
        >>> loss_fn = CCDiceLoss(alpha=1.0, beta=1.0)
        >>> loss = loss_fn(logits, instances, regions)
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        *,
        activation: str | None = None,
        squared_pred: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        max_label: int | None = None,
        spacing=None,
        spatial_dims: int | None = None,
        sigmoid: bool | None = None,
        softmax: bool | None = None,
        include_background: bool = True,
        to_onehot_y: bool = False,
        reduction: str = "mean",
    ):
        monai = (sigmoid, softmax, include_background, to_onehot_y, reduction)
        super().__init__(alpha, beta, activation, smooth_nr, smooth_dr, max_label, spacing, spatial_dims, monai)
        self.squared_pred = bool(squared_pred)

    def forward(
        self, input: torch.Tensor, instances: torch.Tensor, regions: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._loss(cc_dice, input, instances, regions, squared_pred=self.squared_pred)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, activation={self.activation!r}, "
            f"squared_pred={self.squared_pred}"
        )


class CCDiceCELoss(_CCLossModule):
    """Component-wise (Voronoi) Dice+CE loss (CC-DiceCE) as a module; see :func:`cc_dice_ce`.

    ``forward(input, instances, regions=None)`` as :class:`CCDiceLoss`. ``lambda_dice`` /
    ``lambda_ce`` weigh Dice and cross-entropy inside every term (MONAI ``DiceCELoss``); ``alpha`` /
    ``beta`` the global and the CC term. ``softmax=True`` is an error (see :func:`cc_dice_ce`).

    Example:
        >>> loss_fn = CCDiceCELoss()        # Look-Closer's GlobalCCDiceCE weights: 1 and 1
        >>> loss = loss_fn(logits, instances, regions)
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        *,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        activation: str | None = None,
        squared_pred: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        max_label: int | None = None,
        spacing=None,
        spatial_dims: int | None = None,
        sigmoid: bool | None = None,
        softmax: bool | None = None,
        include_background: bool = True,
        to_onehot_y: bool = False,
        reduction: str = "mean",
    ):
        monai = (sigmoid, softmax, include_background, to_onehot_y, reduction)
        super().__init__(alpha, beta, activation, smooth_nr, smooth_dr, max_label, spacing, spatial_dims, monai)
        if self.activation == "softmax":
            raise ValueError(
                "CCDiceCELoss: softmax is not supported: CC Dice+CE takes one binary cross-entropy per channel "
                "and region (sigmoid or none); use CCDiceLoss(softmax=True), or one sigmoid channel per class"
            )
        if not (lambda_dice >= 0 and lambda_ce >= 0):
            raise ValueError(f"CCDiceCELoss: lambda_dice and lambda_ce must be >= 0, got {lambda_dice} and {lambda_ce}")
        self.lambda_dice, self.lambda_ce = float(lambda_dice), float(lambda_ce)
        self.squared_pred = bool(squared_pred)

    def forward(
        self, input: torch.Tensor, instances: torch.Tensor, regions: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._loss(
            cc_dice_ce,
            input,
            instances,
            regions,
            lambda_dice=self.lambda_dice,
            lambda_ce=self.lambda_ce,
            squared_pred=self.squared_pred,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, lambda_dice={self.lambda_dice}, "
            f"lambda_ce={self.lambda_ce}, activation={self.activation!r}"
        )

"""Reference implementations of blob loss: the oracle and the baseline of the fused operators.

* :func:`naive_blob_loss` is the paper's loop: for each batch element, channel and instance it
  builds a mask, multiplies the network output by it and calls the base criterion again, so
  time and autograd memory grow as O(N * V). It works with *any* criterion (the paper's point:
  "convert any loss"); :func:`naive_blob_dice` / :func:`naive_blob_tversky` use MONAI's
  ``DiceLoss`` / ``TverskyLoss`` and are the ground truth of the tests.
* :func:`vectorized_blob_loss` is the closed form (:mod:`blobbench.closed_form`, docs/design.md)
  in plain PyTorch (``index_add`` of per-label sums, autograd for the backward): what a strong
  user would write without our kernels, and the baseline the fused op must beat.

The references import the library (the closed form), never the reverse.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._optional import require
from .cc_losses import _scatter_cc_loss
from .closed_form import blob_terms, global_terms, reduce_blob_terms
from .voronoi import voronoi_regions

__all__ = [
    "naive_blob_loss",
    "naive_blob_dice",
    "naive_blob_tversky",
    "naive_blob_dice_ce",
    "vectorized_blob_loss",
    "global_targets",
    "naive_cc_loss",
    "naive_cc_dice",
    "naive_cc_dice_ce",
    "vectorized_cc_loss",
]


def _activate(input: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "sigmoid":
        return torch.sigmoid(input)
    if activation == "softmax":
        return torch.softmax(input, dim=1)
    if activation == "none":
        return input
    raise ValueError(f"activation must be 'sigmoid', 'softmax' or 'none', got {activation!r}")


def _check_masking(masking: str, activation: str) -> None:
    if masking not in ("paper", "official"):
        raise ValueError(f"masking must be 'paper' or 'official', got {masking!r}")
    if masking == "official" and activation == "softmax":
        raise ValueError('masking="official" is only defined for activation "sigmoid" or "none"')


def global_targets(instances: torch.Tensor, activation: str, dtype: torch.dtype) -> torch.Tensor:
    """Binary targets of the global term, ``Tensor[B, C, *spatial]``.

    ``[l > 0]`` per channel; with softmax, channel 0 (the background class) is "no instance in
    any other channel".
    """
    target = (instances > 0).to(dtype)
    if activation == "softmax":
        target[:, 0] = (instances[:, 1:] == 0).all(dim=1).to(dtype)
    return target


def naive_blob_loss(
    input: torch.Tensor,
    instances: torch.Tensor,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    activation: str = "sigmoid",
    masking: str = "paper",
) -> torch.Tensor:
    """The blob term L_blob of the paper, computed with its loop (paper Eq. 1 and 3).

    Args:
        input: ``Tensor[B, C, *spatial]`` logits (``"sigmoid"``, ``"softmax"``) or probabilities.
        instances: ``Tensor[B, C, *spatial]`` integer instance ids (0 = background).
        criterion: any loss ``criterion(prediction[1, 1, *spatial], target[1, 1, *spatial])``.
            With ``masking="paper"`` it receives probabilities with the other instances set to 0
            (they contribute nothing to sums of p and g), so it must not apply an activation.
            With ``masking="official"`` it receives ``input * mask`` (the published code: masked
            logits are 0, i.e. p = 0.5) and must apply the sigmoid itself.
        activation: ``"sigmoid"``, ``"softmax"`` (channel 0 has no blob term) or ``"none"``.
        masking: ``"paper"`` or ``"official"``.

    Returns:
        Mean over batch elements with instances of the mean over their channels with instances
        of the mean over instances of ``criterion``; 0 (with zero gradient) without instances.
    """
    _check_masking(masking, activation)
    probs = _activate(input, activation) if masking == "paper" else input
    first_channel = 1 if activation == "softmax" else 0
    element_losses = []
    for b in range(input.shape[0]):
        channel_losses = []
        for c in range(first_channel, input.shape[1]):
            label = instances[b : b + 1, c : c + 1]
            ids = torch.unique(label)
            ids = ids[ids > 0]
            if ids.numel() == 0:
                continue
            losses = []
            for k in ids:
                mask = (label == 0) | (label == k)
                target = (label == k).to(input.dtype)
                losses.append(criterion(probs[b : b + 1, c : c + 1] * mask, target))
            channel_losses.append(sum(losses) / len(losses))
        if channel_losses:
            element_losses.append(sum(channel_losses) / len(channel_losses))
    if not element_losses:
        return input.sum() * 0.0
    return sum(element_losses) / len(element_losses)


def _naive_total(input, instances, make_loss, alpha, beta, activation, masking):
    _check_masking(masking, activation)
    probs = _activate(input, activation)
    global_loss = make_loss(False)(probs, global_targets(instances, activation, input.dtype))
    # Official masking applies the sigmoid inside the criterion, to the masked logits.
    own_sigmoid = masking == "official" and activation == "sigmoid"
    blob_loss = naive_blob_loss(input, instances, make_loss(own_sigmoid), activation=activation, masking=masking)
    return alpha * global_loss + beta * blob_loss


def naive_blob_dice(
    input: torch.Tensor,
    instances: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 1.0,
    *,
    activation: str = "sigmoid",
    masking: str = "paper",
    squared_pred: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
) -> torch.Tensor:
    """Blob Dice with the paper's loop and MONAI's ``DiceLoss``: the oracle of ``blob_dice``.

    Global term: ``DiceLoss(include_background=True)`` on all (b, c); blob term:
    :func:`naive_blob_loss` with ``DiceLoss`` per instance. Arguments as in
    :func:`blobbench.blob_dice`.
    """
    DiceLoss = require("monai.losses", "monai", "naive_blob_dice").DiceLoss

    def make(own_sigmoid):
        return DiceLoss(
            include_background=True,
            sigmoid=own_sigmoid,
            squared_pred=squared_pred,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
        )

    return _naive_total(input, instances, make, alpha, beta, activation, masking)


def naive_blob_tversky(
    input: torch.Tensor,
    instances: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 1.0,
    *,
    fp_weight: float = 0.3,
    fn_weight: float = 0.7,
    activation: str = "sigmoid",
    masking: str = "paper",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
) -> torch.Tensor:
    """Blob Tversky with the paper's loop and MONAI's ``TverskyLoss`` (its alpha, beta =
    ``fp_weight``, ``fn_weight``): the oracle of ``blob_tversky``."""
    TverskyLoss = require("monai.losses", "monai", "naive_blob_tversky").TverskyLoss

    def make(own_sigmoid):
        return TverskyLoss(
            include_background=True,
            sigmoid=own_sigmoid,
            alpha=fp_weight,
            beta=fn_weight,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
        )

    return _naive_total(input, instances, make, alpha, beta, activation, masking)


def _check_dice_ce(activation: str, lambda_dice: float, lambda_ce: float) -> None:
    if activation == "softmax":
        raise ValueError(
            'blob Dice+CE is defined for activation "sigmoid" or "none" (one binary cross-entropy '
            "per channel and per instance); softmax cross-entropy over classes has no per-instance "
            "form in the paper's loop"
        )
    if lambda_dice < 0 or lambda_ce < 0:
        raise ValueError(f"lambda_dice and lambda_ce must be >= 0, got {lambda_dice} and {lambda_ce}")


def _naive_global_dice_ce(input, instances, activation, dice_ce, on_probabilities):
    """The global Dice+CE term: ``dice_ce`` (MONAI ``DiceCELoss(sigmoid=True)``) on each channel of
    the logits, averaged over the channels; ``on_probabilities`` on the whole input for ``"none"``."""
    targets = global_targets(instances, activation, input.dtype)
    if activation == "sigmoid":
        channels = [dice_ce(input[:, c : c + 1], targets[:, c : c + 1]) for c in range(input.shape[1])]
        return sum(channels) / len(channels)
    return on_probabilities(input, targets)


def naive_blob_dice_ce(
    input: torch.Tensor,
    instances: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 1.0,
    *,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    activation: str = "sigmoid",
    masking: str = "paper",
    squared_pred: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
) -> torch.Tensor:
    """Blob Dice+CE with the paper's loop and MONAI's ``DiceCELoss``: the oracle of ``blob_dice_ce``.

    The criterion of every term is ``lambda_dice * Dice + lambda_ce * BCE`` (MONAI ``DiceCELoss``
    on one channel, where it uses ``BCEWithLogitsLoss``):

    * global term: MONAI ``DiceCELoss(sigmoid=True)`` on each channel of the logits, averaged over
      the channels (for one channel exactly ``DiceCELoss(sigmoid=True)`` on the whole output; for
      several, per-channel binary cross-entropy, where MONAI would switch to a softmax
      cross-entropy over channels that does not fit sigmoid outputs). With ``activation="none"``:
      ``DiceLoss`` + ``binary_cross_entropy`` on the probabilities.
    * blob term, ``masking="official"`` (sigmoid): ``DiceCELoss(sigmoid=True)`` on the logits
      multiplied by the instance's mask, as the published code applies its criterion (other
      instances enter as logit 0 with target 0).
    * blob term, ``masking="paper"`` (or ``activation="none"``, where both maskings agree): the
      criterion on the masked probabilities ``p * mask``: ``DiceLoss`` and
      ``torch.nn.functional.binary_cross_entropy`` (a mean over all voxels of the plane; a
      masked voxel adds 0 to the sum; logs clamped at -100 as torch does).

    ``activation="softmax"`` raises. Other arguments as in :func:`naive_blob_dice`.
    """
    _check_masking(masking, activation)
    _check_dice_ce(activation, lambda_dice, lambda_ce)
    losses = require("monai.losses", "monai", "naive_blob_dice_ce")
    dice_args = dict(squared_pred=squared_pred, smooth_nr=smooth_nr, smooth_dr=smooth_dr)
    bce = torch.nn.functional.binary_cross_entropy

    def on_probabilities(p, g):
        dice = losses.DiceLoss(include_background=True, sigmoid=False, **dice_args)(p, g)
        return lambda_dice * dice + lambda_ce * bce(p, g)

    dice_ce = losses.DiceCELoss(sigmoid=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce, **dice_args)
    global_loss = _naive_global_dice_ce(input, instances, activation, dice_ce, on_probabilities)
    criterion = dice_ce if masking == "official" and activation == "sigmoid" else on_probabilities
    blob_loss = naive_blob_loss(input, instances, criterion, activation=activation, masking=masking)
    return alpha * global_loss + beta * blob_loss


def vectorized_blob_loss(
    input: torch.Tensor,
    instances: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 1.0,
    *,
    loss: str = "dice",
    activation: str = "sigmoid",
    masking: str = "paper",
    squared_pred: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    fp_weight: float = 0.3,
    fn_weight: float = 0.7,
) -> torch.Tensor:
    """Blob loss from per-label sums in plain PyTorch (``index_add``), autograd for the backward.

    Same arguments and result as :func:`blobbench.blob_dice` (``loss="dice"``) or
    :func:`blobbench.blob_tversky` (``loss="tversky"``). Costs one sync (the label range) and
    O(B * C * K) memory for the tables besides the autograd buffers of the activation.
    """
    _check_masking(masking, activation)
    if loss not in ("dice", "tversky"):
        raise ValueError(f"loss must be 'dice' or 'tversky', got {loss!r}")
    B, C = input.shape[:2]
    p = _activate(input, activation).reshape(B, C, -1)
    labels = instances.reshape(B, C, -1).long()
    if activation == "softmax":
        labels = labels.clone()
        labels[:, 0] = (labels[:, 1:] == 0).all(dim=1).long()
    K = max(int(labels.max()) + 1, 2)
    if K > 4 * labels.numel():  # sparse, huge ids: compact them (0 stays 0)
        ids, inverse = torch.unique(torch.cat([labels.new_zeros(1), labels.reshape(-1)]), return_inverse=True)
        labels, K = inverse[1:].view_as(labels), max(ids.numel(), 2)
    offsets = (torch.arange(B * C, device=input.device) * K).view(B, C, 1)
    index = (labels + offsets).reshape(-1)
    acc_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    pf = p.reshape(-1).to(acc_dtype)
    S = torch.zeros(B * C * K, dtype=acc_dtype, device=input.device).index_add_(0, index, pf)
    squared = squared_pred and loss == "dice"
    P = torch.zeros_like(S).index_add_(0, index, pf * pf) if squared else S
    N = torch.bincount(index, minlength=B * C * K).to(acc_dtype)
    S, P, N = (t.view(B, C, K) for t in (S, P, N))

    args = dict(smooth_nr=smooth_nr, smooth_dr=smooth_dr, fp_weight=fp_weight, fn_weight=fn_weight)
    global_loss = global_terms(S, P, N, loss=loss, **args)
    blob, present = blob_terms(S, P, N, loss=loss, activation=activation, masking=masking, squared_pred=squared, **args)
    blob_loss = reduce_blob_terms(blob, present)
    total = alpha * global_loss.mean() + beta * blob_loss
    return total.to(input.dtype)


def _regions_or_voronoi(instances, regions, activation):
    if regions is not None:
        return regions
    source = instances
    if activation == "softmax":  # channel 0 is not read
        source = instances.clone()
        source[:, 0] = 0
    return voronoi_regions(source, spatial_dims=instances.dim() - 2)


def naive_cc_loss(
    input: torch.Tensor,
    instances: torch.Tensor,
    regions: torch.Tensor,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    activation: str = "sigmoid",
) -> torch.Tensor:
    """The component-wise term L_cc with a loop over planes and regions (docs/design.md, section 9).

    Args:
        input: ``Tensor[B, C, *spatial]``: what ``criterion`` receives, gathered per region (logits
            or probabilities, as the criterion expects).
        instances: ``Tensor[B, C, *spatial]`` instance ids; the target is ``instances > 0``.
        regions: ``Tensor[B, C, *spatial]`` region ids (:func:`blobbench.voronoi_regions`).
        criterion: any loss ``criterion(prediction[1, 1, N_k], target[1, 1, N_k])`` on the N_k voxels
            of region k.
        activation: with ``"softmax"`` channel 0 has no term.

    Returns:
        Mean over batch elements with regions of the mean over their planes with regions of the
        mean over the regions k > 0 of ``criterion``; 0 (with zero gradient) without any.
    """
    first_channel = 1 if activation == "softmax" else 0
    element_losses = []
    for b in range(input.shape[0]):
        plane_losses = []
        for c in range(first_channel, input.shape[1]):
            region = regions[b, c]
            ids = torch.unique(region)
            ids = ids[ids > 0]
            if ids.numel() == 0:
                continue
            target = (instances[b, c] > 0).to(input.dtype)
            losses = []
            for k in ids:
                inside = region == k
                losses.append(criterion(input[b, c][inside].view(1, 1, -1), target[inside].view(1, 1, -1)))
            plane_losses.append(sum(losses) / len(losses))
        if plane_losses:
            element_losses.append(sum(plane_losses) / len(plane_losses))
    if not element_losses:
        return input.sum() * 0.0
    return sum(element_losses) / len(element_losses)


def naive_cc_dice(
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
) -> torch.Tensor:
    """CC-Dice with a loop over planes and regions and MONAI's ``DiceLoss``: the oracle of ``cc_dice``.

    Global term: ``DiceLoss(include_background=True)`` on all (b, c) (as :func:`naive_blob_dice`);
    CC term: :func:`naive_cc_loss` with ``DiceLoss`` on each region's probabilities.
    ``regions=None``: :func:`blobbench.voronoi_regions` of ``instances``. Arguments as in
    :func:`blobbench.cc_dice`.
    """
    DiceLoss = require("monai.losses", "monai", "naive_cc_dice").DiceLoss
    dice = DiceLoss(include_background=True, squared_pred=squared_pred, smooth_nr=smooth_nr, smooth_dr=smooth_dr)
    probs = _activate(input, activation)
    global_loss = dice(probs, global_targets(instances, activation, input.dtype))
    regions = _regions_or_voronoi(instances, regions, activation)
    cc_loss = naive_cc_loss(probs, instances, regions, dice, activation=activation)
    return alpha * global_loss + beta * cc_loss


def naive_cc_dice_ce(
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
) -> torch.Tensor:
    """CC-DiceCE with a loop over planes and regions and MONAI's ``DiceCELoss``: the oracle of
    ``cc_dice_ce``.

    * global term: as :func:`naive_blob_dice_ce` (``DiceCELoss(sigmoid=True)`` per channel of the
      logits, averaged; ``DiceLoss`` + ``binary_cross_entropy`` on probabilities for ``"none"``);
    * region k: ``DiceCELoss(sigmoid=True)`` on the logits of the region's voxels (Dice plus
      ``BCEWithLogitsLoss``, a mean over the region); for ``"none"`` ``DiceLoss`` +
      ``binary_cross_entropy`` on its probabilities.

    ``activation="softmax"`` raises. Other arguments as in :func:`blobbench.cc_dice_ce`.
    """
    _check_dice_ce(activation, lambda_dice, lambda_ce)
    losses = require("monai.losses", "monai", "naive_cc_dice_ce")
    dice_args = dict(squared_pred=squared_pred, smooth_nr=smooth_nr, smooth_dr=smooth_dr)
    bce = torch.nn.functional.binary_cross_entropy

    def on_probabilities(p, g):
        dice = losses.DiceLoss(include_background=True, sigmoid=False, **dice_args)(p, g)
        return lambda_dice * dice + lambda_ce * bce(p, g)

    dice_ce = losses.DiceCELoss(sigmoid=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce, **dice_args)
    global_loss = _naive_global_dice_ce(input, instances, activation, dice_ce, on_probabilities)
    regions = _regions_or_voronoi(instances, regions, activation)
    criterion = dice_ce if activation == "sigmoid" else on_probabilities
    cc_loss = naive_cc_loss(input, instances, regions, criterion, activation=activation)
    return alpha * global_loss + beta * cc_loss


def vectorized_cc_loss(
    input: torch.Tensor,
    instances: torch.Tensor,
    regions: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    *,
    loss: str = "dice",
    activation: str = "sigmoid",
    squared_pred: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
) -> torch.Tensor:
    """CC-Dice (``loss="dice"``) or CC-DiceCE (``"dice_ce"``) from per-region sums added with
    ``index_add`` over plane-offset region ids, autograd for the backward: the baseline.

    The ``VectorizedCCLoss`` of "Learning to Look Closer" (a segmented sum per sample) in our
    semantics, batched over planes and multi-class. Same result as :func:`blobbench.cc_dice` /
    :func:`blobbench.cc_dice_ce` (the fused operators) up to rounding. Syncs with
    the host (the id range, the checks of the regions).
    """
    if loss not in ("dice", "dice_ce"):
        raise ValueError(f"loss must be 'dice' or 'dice_ce', got {loss!r}")
    return _scatter_cc_loss(
        input,
        instances,
        regions,
        float(alpha),
        float(beta),
        loss=loss,
        activation=activation,
        squared_pred=squared_pred,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
        lambda_dice=lambda_dice if loss == "dice_ce" else 1.0,
        lambda_ce=lambda_ce if loss == "dice_ce" else 0.0,
        max_label=None,
        spacing=None,
        fn="vectorized_cc_loss",
    )

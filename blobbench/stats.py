"""Per-instance statistics for logging: which instances does the model miss?

:func:`instance_stats` runs the same one-pass accumulation as the fused losses
(``torch.ops.blob.label_stats``: per (b, c, label) the sums of p, of p^2 and the voxel count) and
derives, for every instance of every (b, c), with no loop over instances:

- ``size``: its voxel count;
- ``mass``: the predicted probability mass inside it (sum of p over its voxels);
- ``dice``: its own Dice, 1 - its blob-loss term (paper Eq. 1: the other instances of the
  channel masked out; ``masking="official"`` with a sigmoid counts them as logit 0, p = 0.5).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _ops  # noqa: F401  (registers the operators)
from .closed_form import blob_terms
from .losses import _check_options, _max_label_arg

__all__ = ["InstanceStats", "instance_stats"]


class InstanceStats(NamedTuple):
    """Per-instance numbers, dense over the label range ``K``.

    Attributes:
        ids: ``Tensor[B, C, K]`` int64, the instance id of each column of each (b, c):
            ``0..K-1`` when the table is dense, or, when sparse, large ids were compacted, the
            sorted distinct ids of that (b, c) (padded with its largest id, whose extra columns
            have ``size == 0``). Column 0 is the background.
        size: ``Tensor[B, C, K]`` float64 voxel count of each id in each (b, c).
        mass: ``Tensor[B, C, K]`` float64 sum of the predicted probabilities over those voxels.
        dice: ``Tensor[B, C, K]`` float64 Dice of each instance against the prediction on its
            blob-loss domain; NaN where the id is absent and for the background column.
        present: ``Tensor[B, C, K]`` bool, the instances that exist (``size > 0``, id > 0;
            never on channel 0 with ``activation="softmax"``).
    """

    ids: torch.Tensor
    size: torch.Tensor
    mass: torch.Tensor
    dice: torch.Tensor
    present: torch.Tensor


@torch.no_grad()
def instance_stats(
    input: torch.Tensor,
    instances: torch.Tensor,
    *,
    activation: str = "sigmoid",
    masking: str = "paper",
    squared_pred: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    max_label: int | None = None,
) -> InstanceStats:
    """Size, predicted mass and Dice of every instance, in one pass over the voxels.

    Args:
        input: ``Tensor[B, C, *spatial]`` logits (or probabilities with ``activation="none"``).
        instances: ``Tensor[B, C, *spatial]`` integer instance ids (0 = background).
        activation, masking, squared_pred, smooth_nr, smooth_dr, max_label: as in
            :func:`blobbench.blob_dice`; ``dice`` is ``1 -`` the instance's blob Dice term.

    Returns:
        :class:`InstanceStats`. Log, for example, ``stats.dice[stats.present]`` and
        ``stats.size[stats.present]``.

    Example::

        s = blobbench.instance_stats(logits, instances)
        missed = s.present & (s.dice < 0.1)          # (B, C, K) instances the model misses
        print(s.size[missed])
    """
    _check_options(activation, masking)
    stats, label_ids = torch.ops.blob.label_stats(
        input.detach(), instances, activation=activation, squared_pred=squared_pred, max_label=_max_label_arg(max_label)
    )
    S, P, N = stats.unbind(-1)
    B, C, K = stats.shape[:3]
    if label_ids.numel():  # compacted: the sorted ids of each (b, c)
        ids = label_ids.to(torch.int64).reshape(B, C, K)
    else:
        ids = torch.arange(K, device=stats.device).expand(B, C, K)
    # The closed form the losses use (masking rule included): dice = 1 - the instance's term.
    terms, present = blob_terms(
        S,
        P,
        N,
        activation=activation,
        masking=masking,
        squared_pred=squared_pred,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
    )
    present = torch.cat([torch.zeros_like(present[..., :1]), present], -1)
    dice = torch.cat([torch.full_like(terms[..., :1], float("nan")), 1 - terms], -1)
    dice = torch.where(present, dice, torch.full_like(dice, float("nan")))
    return InstanceStats(ids=ids, size=N, mass=S, dice=dice, present=present)

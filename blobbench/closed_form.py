"""The closed form of blob loss from per-label sums (docs/design.md, "The closed form").

For one (b, c) and label k, let ``S_k`` be the sum of the probabilities p over the voxels of label
k, ``P_k`` the sum of p^q (q = 2 with ``squared_pred`` for Dice, else q = 1, so ``P = S``) and
``N_k`` the voxel count; label 0 is the background and ``G = sum_{k>0} N_k``. Every term of blob
loss is a formula in these sums:

    instance k (Dice):  L_k = 1 - (2 S_k + nr) / (P_0 + P_k + M_k + N_k + dr)
    global     (Dice):  L_g = 1 - (2 sum_{k>0} S_k + nr) / (sum_k P_k + G + dr)

with ``M_k`` the mass the other instances add under ``masking="official"`` with a sigmoid
(p = 0.5 for each of their ``G - N_k`` voxels, 0.25 when squared), 0 otherwise. Tversky uses
tp = S_k, fp = S_0 + M_k, fn = N_k - S_k on the same domain.

This module is the library's single statement of those formulas in PyTorch: :mod:`blobbench.stats`
uses it for the per-instance Dice, and the vectorized reference
(:func:`blobbench.vectorized_blob_loss`) builds the whole loss from it. The fused C++/CUDA
kernels implement the same formulas in ``csrc/blob_loss_math.h``; the tests hold both to the
paper's loop. Nothing here imports the references (they import this).
"""

from __future__ import annotations

import torch

__all__ = ["region_loss", "blob_terms", "global_terms", "reduce_blob_terms", "cc_terms"]


def region_loss(
    loss: str,
    s_t: torch.Tensor,
    n_t: torch.Tensor,
    p_dom: torch.Tensor,
    s_nont: torch.Tensor,
    masked,
    smooth_nr: float,
    smooth_dr: float,
    fp_weight: float,
    fn_weight: float,
) -> torch.Tensor:
    """Dice or Tversky loss of one region from its sums (all arguments broadcast).

    Args:
        loss: ``"dice"`` or ``"tversky"``.
        s_t: sum of p over the target voxels; n_t: their count.
        p_dom: sum of p^q over the whole domain (target and non-target voxels), for Dice.
        s_nont: sum of p over the non-target voxels of the domain, for Tversky.
        masked: extra prediction mass of masked voxels (``masking="official"``), or 0.
        smooth_nr, smooth_dr, fp_weight, fn_weight: as in :func:`blobbench.blob_tversky`.
    """
    if loss == "dice":
        return 1 - (2 * s_t + smooth_nr) / (p_dom + masked + n_t + smooth_dr)
    tp, fp, fn = s_t, s_nont + masked, n_t - s_t
    return 1 - (tp + smooth_nr) / (tp + fp_weight * fp + fn_weight * fn + smooth_dr)


def blob_terms(
    S: torch.Tensor,
    P: torch.Tensor,
    N: torch.Tensor,
    *,
    loss: str = "dice",
    activation: str = "sigmoid",
    masking: str = "paper",
    squared_pred: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    fp_weight: float = 0.3,
    fn_weight: float = 0.7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every instance's blob-loss term from per-label sums (paper Eq. 1, in closed form).

    Args:
        S, P, N: ``Tensor[B, C, K]``: per label of each (b, c), the sum of p, of p^q (q = 2 with
            ``squared_pred`` for Dice, else q = 1: pass ``S``) and the voxel count; label 0 is
            the background.
        loss: ``"dice"`` or ``"tversky"``; the other arguments as in :func:`blobbench.blob_dice`
            and :func:`blobbench.blob_tversky`.

    Returns:
        ``(terms, present)``, each ``Tensor[B, C, K - 1]`` for labels 1..K-1: the term of
        instance k (its own voxels and the background; the other instances left out, or with
        ``masking="official"`` and a sigmoid entering as logit 0, p = 0.5), and whether it is an
        instance with a term (present, and not on channel 0 under softmax).
    """
    n_fg = N[..., 1:].sum(-1, keepdim=True)
    squared = squared_pred and loss == "dice"
    official_sigmoid = masking == "official" and activation == "sigmoid"
    mass = (0.25 if squared else 0.5) if official_sigmoid else 0.0
    terms = region_loss(
        loss,
        S[..., 1:],
        N[..., 1:],
        P[..., :1] + P[..., 1:],
        S[..., :1],
        mass * (n_fg - N[..., 1:]),
        smooth_nr,
        smooth_dr,
        fp_weight,
        fn_weight,
    )
    present = N[..., 1:] > 0
    if activation == "softmax":
        present[:, 0] = False
    return terms, present


def global_terms(
    S: torch.Tensor,
    P: torch.Tensor,
    N: torch.Tensor,
    *,
    loss: str = "dice",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    fp_weight: float = 0.3,
    fn_weight: float = 0.7,
) -> torch.Tensor:
    """The global term of each (b, c), ``Tensor[B, C]``: target = every voxel with label > 0.

    ``S``, ``P``, ``N`` as in :func:`blob_terms` (with softmax, channel 0's labels must already
    be the background-class target: 1 where no other channel has an instance).
    """
    return region_loss(
        loss,
        S[..., 1:].sum(-1),
        N[..., 1:].sum(-1),
        P.sum(-1),
        S[..., 0],
        0.0,
        smooth_nr,
        smooth_dr,
        fp_weight,
        fn_weight,
    )


def reduce_blob_terms(terms: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """L_blob: mean over instances, then over channels with instances, then over batch elements
    with instances (paper Eq. 3 and the official batch handling); 0 when there is no instance.

    Args:
        terms, present: ``Tensor[B, C, K - 1]`` from :func:`blob_terms`.

    Returns:
        A scalar tensor of ``terms``' dtype; absent instances get no gradient.
    """
    n_inst = present.sum(-1)
    plane_mean = torch.where(present, terms, 0).sum(-1) / n_inst.clamp(min=1)
    has = n_inst > 0
    n_ch = has.sum(1)
    element_mean = torch.where(has, plane_mean, 0).sum(1) / n_ch.clamp(min=1)
    has_b = n_ch > 0
    return torch.where(has_b, element_mean, 0).sum() / has_b.sum().clamp(min=1)


def cc_terms(
    I: torch.Tensor,
    P: torch.Tensor,
    T: torch.Tensor,
    E: torch.Tensor | None,
    N: torch.Tensor,
    *,
    loss: str = "dice",
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
) -> torch.Tensor:
    """The component-wise (Voronoi) term of each region from its sums (docs/design.md, section 9).

    Args:
        I, P, T, E, N: tensors of one shape (e.g. ``[B, C, K]``): per region, the sum of p * t, of
            p^q (q = 2 with ``squared_pred``, else q = 1), of t, of the voxels' binary
            cross-entropies (``loss="dice_ce"`` only; None for ``"dice"``) and the voxel count.
        loss: ``"dice"``: ``1 - (2 I + nr) / (P + T + dr)``; ``"dice_ce"``:
            ``lambda_dice * Dice + lambda_ce * E / N``.

    Summed over a plane's regions the same sums give the plane's global term (blob loss's, section
    2), so this formula serves both.
    """
    dice = 1 - (2 * I + smooth_nr) / (P + T + smooth_dr)
    if loss == "dice":
        return dice
    return lambda_dice * dice + lambda_ce * E / N.clamp(min=1)

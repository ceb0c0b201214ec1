"""User-facing blob losses: functional forms and ``nn.Module`` wrappers of the fused operators.

Blob loss (Kofler et al., "blob loss: instance imbalance aware loss functions for semantic
segmentation", arXiv 2205.08209) adds to a global loss one term per connected component
("blob") of the ground truth, computed with every *other* blob masked out (paper Eq. 1):

    L = alpha * L_global + beta * L_blob                                      (paper Eq. 2)

    L_blob = mean over batch elements with instances of
             mean over channels with instances of
             mean over the channel's instances k of  loss(p on Omega_k, [l == k])  (Eq. 1, 3)

where Omega_k is every voxel except those of the other instances of the same channel. The fused
operators compute all instance terms in one pass over the voxels (``torch.ops.blob.dice`` /
``torch.ops.blob.tversky``), so the cost no longer grows with the number of instances.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _ops  # noqa: F401  (registers the operators)
from .instances import check_spatial_dims

__all__ = ["blob_dice", "blob_tversky", "blob_dice_ce", "BlobDiceLoss", "BlobTverskyLoss", "BlobDiceCELoss"]


def _max_label_arg(max_label):
    if max_label is None:
        return -1
    if isinstance(max_label, bool) or not isinstance(max_label, int) or max_label < 0:
        raise ValueError(f"max_label must be None or an int >= 0, got {max_label!r}")
    return max_label


def _check_layout(input, spatial_dims, fn):
    """A 3-D or 4-D input is ambiguous: (B, C, H, W) or a 3-D volume that lost its channel dim."""
    if spatial_dims is None:
        if input.dim() in (3, 4):
            n = input.dim() - 2
            raise ValueError(
                f"{fn}: a {input.dim()}-D input {tuple(input.shape)} is read as (B, C, *spatial) with "
                f"{n} spatial dim{'s' if n > 1 else ''} and C = {input.shape[1]} channels: pass "
                f"spatial_dims={n} to confirm, or keep the channel dim (B, 1, ...) if the second dim "
                f"is spatial"
            )
        return
    check_spatial_dims(spatial_dims, fn)
    if input.dim() != spatial_dims + 2:
        raise ValueError(
            f"{fn}: spatial_dims={spatial_dims} expects input of shape (B, C, *spatial) with "
            f"{spatial_dims + 2} dims, got {tuple(input.shape)}"
        )


def _changed_options(activation, masking, smooth_nr, smooth_dr, max_label):
    """The shared options that differ from the schemas' defaults, as keyword arguments.

    Only those cross into C++: converting an argument costs ~0.3 us, a noticeable share of a small
    call (tests hold the Python defaults equal to the schemas')."""
    kwargs = {}
    if activation != "sigmoid":
        kwargs["activation"] = activation
    if masking != "paper":
        kwargs["masking"] = masking
    if smooth_nr != 1e-5:
        kwargs["smooth_nr"] = float(smooth_nr)
    if smooth_dr != 1e-5:
        kwargs["smooth_dr"] = float(smooth_dr)
    if max_label is not None:
        kwargs["max_label"] = _max_label_arg(max_label)
    return kwargs


# The operator overloads, looked up once. Eager calls go to the public ops (autograd in C++,
# one dispatch per call); torch.compile traces the private forward ops (blobbench/_ops.py).
_DICE = torch.ops.blob.dice.default
_TVERSKY = torch.ops.blob.tversky.default
_DICE_FORWARD = torch.ops.blob._dice_forward.default
_TVERSKY_FORWARD = torch.ops.blob._tversky_forward.default
_DICE_CE = torch.ops.blob.dice_ce.default
_DICE_CE_FORWARD = torch.ops.blob._dice_ce_forward.default


def blob_dice(
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
    max_label: int | None = None,
    spatial_dims: int | None = None,
) -> torch.Tensor:
    """Blob Dice loss ``alpha * L_global + beta * L_blob`` in one fused pass.

    Args:
        input: ``Tensor[B, C, *spatial]`` (1 to 3 spatial dims), float16/bfloat16/float32/float64:
            logits for ``activation="sigmoid"`` or ``"softmax"``, probabilities for ``"none"``.
        instances: ``Tensor[B, C, *spatial]``, uint8/int16/int32/int64 instance ids per channel:
            0 is background, k > 0 is instance k of that channel (ids need not be contiguous;
            see :func:`blobbench.label_instances`). With ``activation="softmax"`` channel 0 is the
            background class: its target is "no instance in any other channel" and
            ``instances[:, 0]`` is not read.
        alpha: weight of the global Dice term (paper: 2).
        beta: weight of the blob term (paper: 1).
        activation: ``"sigmoid"`` (default), ``"softmax"`` (over C) or ``"none"``.
        masking: ``"paper"`` (voxels of other instances are left out, paper Eq. 1) or
            ``"official"`` (as the paper's published code: other instances enter as logit 0,
            i.e. p = 0.5 with target 0 and no gradient; sigmoid or none only).
        squared_pred: use ``p**2`` in the denominators (MONAI ``squared_pred``).
        smooth_nr, smooth_dr: MONAI's smoothing constants of numerator and denominator.
        max_label: an upper bound on the ids. Given, the op needs no device-to-host sync (on CUDA
            it is capturable in a CUDA graph; ids above it make the loss NaN there, and raise on
            the CPU). ``None`` finds the range with one reduction and one sync. Above
            ``dense_label_limit`` a bound keeps the sync-free dense table while the table fits
            256 MiB; beyond that, and for sparse ids without a bound, the ids are compacted per
            (b, c) plane with a sort, which syncs once (docs/design.md, section 5.2).
        spatial_dims: 1, 2 or 3. Required for 3-D and 4-D inputs, whose layout is ambiguous (a
            ``(B, C, H, W)`` image, or a ``(B, D, H, W)`` volume that lost its channel dim would
            otherwise be read as 2-D with D channels); 5-D inputs are ``(B, C, D, H, W)``.

    Returns:
        A 0-dim tensor: float32 for float16/bfloat16 input (the sums are accumulated in float32
        or wider, as MONAI's losses return float32 under autocast), else ``input``'s dtype; the
        gradient has ``input``'s dtype. Each Dice term is MONAI's
        ``1 - (2 sum(p g) + smooth_nr) / (sum(p^q) + sum(g) + smooth_dr)``; the global term is the
        mean over (b, c) (``DiceLoss(include_background=True)``).

    Example:
        >>> logits = torch.randn(2, 1, 16, 32, 32, requires_grad=True)
        >>> instances = torch.zeros(2, 1, 16, 32, 32, dtype=torch.int32)
        >>> instances[0, 0, 2:5, 3:9, 3:9] = 1; instances[0, 0, 10:12, 20:25, 5:8] = 2
        >>> loss = blob_dice(logits, instances)
        >>> loss.backward()

    Raises:
        ValueError / TypeError: naming the argument, for bad dtypes, shapes, devices, options,
        negative ids or (on the CPU) ids above ``max_label``. An empty batch raises (MONAI's
        DiceLoss returns NaN). Double backward raises.
    """
    _check_layout(input, spatial_dims, "blob_dice")
    if torch.compiler.is_compiling():
        # Traceable for any label range: the private forward op exposes the table's size.
        return _DICE_FORWARD(
            input,
            instances,
            float(alpha),
            float(beta),
            activation,
            masking,
            bool(squared_pred),
            float(smooth_nr),
            float(smooth_dr),
            _max_label_arg(max_label),
        )[0]
    kwargs = _changed_options(activation, masking, smooth_nr, smooth_dr, max_label)
    if squared_pred:
        kwargs["squared_pred"] = True
    return _DICE(input, instances, float(alpha), float(beta), **kwargs)


def blob_tversky(
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
    max_label: int | None = None,
    spatial_dims: int | None = None,
) -> torch.Tensor:
    """Blob Tversky loss ``alpha * L_global + beta * L_blob`` (the paper's "blob tversky").

    Each term is MONAI's ``TverskyLoss``:
    ``1 - (tp + smooth_nr) / (tp + fp_weight * fp + fn_weight * fn + smooth_dr)``.
    ``fp_weight`` / ``fn_weight`` are MONAI's ``alpha`` / ``beta`` of Tversky (paper: 0.3 / 0.7),
    renamed so they cannot be confused with ``alpha`` / ``beta`` of blob loss (global / blob
    weights). Shapes, activations, masking, ``max_label``, ``spatial_dims``, the returned dtype
    and the errors are as in :func:`blob_dice`.
    """
    _check_layout(input, spatial_dims, "blob_tversky")
    if torch.compiler.is_compiling():
        return _TVERSKY_FORWARD(
            input,
            instances,
            float(alpha),
            float(beta),
            activation,
            masking,
            float(fp_weight),
            float(fn_weight),
            float(smooth_nr),
            float(smooth_dr),
            _max_label_arg(max_label),
        )[0]
    kwargs = _changed_options(activation, masking, smooth_nr, smooth_dr, max_label)
    if fp_weight != 0.3:
        kwargs["fp_weight"] = float(fp_weight)
    if fn_weight != 0.7:
        kwargs["fn_weight"] = float(fn_weight)
    return _TVERSKY(input, instances, float(alpha), float(beta), **kwargs)


def blob_dice_ce(
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
    max_label: int | None = None,
    spatial_dims: int | None = None,
) -> torch.Tensor:
    """Blob Dice+CE loss ``alpha * L_global + beta * L_blob`` in one fused pass.

    Every term, global and per instance, is ``lambda_dice * Dice + lambda_ce * BCE``, as MONAI's
    ``DiceCELoss`` on one channel (where it uses ``BCEWithLogitsLoss``); the BCE is a mean over
    the plane's voxels. Exactly what the paper's loop computes with that criterion
    (:func:`blobbench.reference.naive_blob_dice_ce`):

    * global term: ``DiceCELoss(sigmoid=True)`` per channel, averaged over (b, c) (for C = 1 the
      whole output; for C > 1 one binary cross-entropy per channel, where MONAI's class would
      switch to a softmax cross-entropy over the channels);
    * ``masking="official"`` blob terms: ``DiceCELoss(sigmoid=True)`` on the logits multiplied by
      the instance's mask (other instances: logit 0, target 0: ``log 2`` each in the BCE);
    * ``masking="paper"`` blob terms: Dice on the masked probabilities and
      ``binary_cross_entropy(p * mask, target)`` (other instances add 0; logs clamped at -100 as
      torch does).

    With ``activation="none"`` (``input`` are probabilities) every BCE is
    ``binary_cross_entropy`` on them and the two maskings agree. ``"softmax"`` is refused: a
    per-instance term has one channel, where a softmax cross-entropy over classes has no form.

    Args:
        input: ``Tensor[B, C, *spatial]`` logits (``"sigmoid"``) or probabilities (``"none"``).
        instances: ``Tensor[B, C, *spatial]`` integer instance ids per channel (0 = background).
        alpha, beta: weights of the global and the blob term (paper Eq. 2: 2 and 1).
        lambda_dice, lambda_ce: weights of Dice and cross-entropy inside every term (MONAI
            ``DiceCELoss``), >= 0.
        activation, masking, squared_pred, smooth_nr, smooth_dr, max_label, spatial_dims: as in
            :func:`blob_dice` (``squared_pred`` and the smoothing constants apply to the Dice part).

    Returns:
        A 0-dim tensor (float32 for float16/bfloat16 input, else ``input``'s dtype).

    On CUDA this release runs the Dice kernels with the cross-entropy added by PyTorch ops (more
    launches than Dice; with ``max_label`` still no device-to-host sync); the CPU kernels are
    fused. With ``activation="none"`` values outside [0, 1]
    raise on the CPU and give NaN on CUDA (the cross-entropy's domain).

    Example:
        >>> logits = torch.randn(2, 1, 16, 32, 32, requires_grad=True)
        >>> instances = torch.zeros(2, 1, 16, 32, 32, dtype=torch.int32)
        >>> instances[0, 0, 2:5, 3:9, 3:9] = 1
        >>> blob_dice_ce(logits, instances, lambda_ce=0.5).backward()
    """
    _check_layout(input, spatial_dims, "blob_dice_ce")
    args = (float(alpha), float(beta), float(lambda_dice), float(lambda_ce))
    if torch.compiler.is_compiling():
        return _DICE_CE_FORWARD(
            input,
            instances,
            *args,
            activation,
            masking,
            bool(squared_pred),
            float(smooth_nr),
            float(smooth_dr),
            _max_label_arg(max_label),
        )[0]
    kwargs = _changed_options(activation, masking, smooth_nr, smooth_dr, max_label)
    if lambda_dice != 1.0:
        kwargs["lambda_dice"] = args[2]
    if lambda_ce != 1.0:
        kwargs["lambda_ce"] = args[3]
    if squared_pred:
        kwargs["squared_pred"] = True
    return _DICE_CE(input, instances, args[0], args[1], **kwargs)


_ACTIVATIONS = ("sigmoid", "softmax", "none")
_MASKINGS = ("paper", "official")


def _check_options(activation, masking, spatial_dims=None, owner="blob loss"):
    check_spatial_dims(spatial_dims, owner)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if masking not in _MASKINGS:
        raise ValueError(f"masking must be one of {_MASKINGS}, got {masking!r}")
    if masking == "official" and activation == "softmax":
        raise ValueError('masking="official" is only defined for activation "sigmoid" or "none"')


def _monai_style(activation, sigmoid, softmax, include_background, to_onehot_y, reduction, cls):
    """Resolves MONAI's argument names (``sigmoid``, ``softmax``, ``include_background``,
    ``to_onehot_y``, ``reduction``) against blob loss's; returns the activation.

    Where a MONAI option has no meaning for blob loss the error says why.
    """
    if sigmoid and softmax:
        raise ValueError(f"{cls}: sigmoid=True and softmax=True are exclusive (as in MONAI)")
    alias = "sigmoid" if sigmoid else "softmax" if softmax else "none" if sigmoid is False else None
    if activation is not None and alias is not None and alias != activation:
        raise ValueError(f"{cls}: activation={activation!r} contradicts sigmoid={sigmoid!r}, softmax={softmax!r}")
    activation = activation or alias or "sigmoid"
    if not include_background and activation == "softmax":
        raise ValueError(
            f"{cls}: include_background=False is not supported with softmax: the fused op's global "
            "term averages every class, the background class (channel 0) included"
        )
    if to_onehot_y:
        raise ValueError(
            f"{cls}: to_onehot_y has no meaning for blob loss: the target holds instance ids per "
            "channel, not class indices; build them from a class map with "
            "blobbench.label_instances(class_map, num_classes=C)"
        )
    if reduction != "mean":
        raise ValueError(
            f"{cls}: reduction must be 'mean', got {reduction!r}: blob loss is defined as a mean over "
            "the instances, channels and batch elements (paper Eq. 2 and 3), so there is no per-element "
            "loss to return or sum"
        )
    return activation


def _without_background(input, instances, cls):
    if input.dim() < 3 or input.shape[1] < 2:
        raise ValueError(
            f"{cls}: include_background=False needs at least 2 channels (channel 0 is left out), "
            f"got input of shape {tuple(input.shape)}"
        )
    return input[:, 1:], instances[:, 1:]


class _BlobLossModule(nn.Module):
    """What the blob loss modules share: the options of every blob loss, resolved once (MONAI's
    names included, see :class:`BlobDiceLoss`), and the call of the functional loss."""

    def __init__(
        self,
        alpha,
        beta,
        activation,
        masking,
        smooth_nr,
        smooth_dr,
        max_label,
        spatial_dims,
        sigmoid,
        softmax,
        include_background,
        to_onehot_y,
        reduction,
    ):
        super().__init__()
        name = type(self).__name__
        activation = _monai_style(activation, sigmoid, softmax, include_background, to_onehot_y, reduction, name)
        _check_options(activation, masking, spatial_dims, name)
        _max_label_arg(max_label)
        self.include_background = bool(include_background)
        self.alpha, self.beta = float(alpha), float(beta)
        self.activation, self.masking = activation, masking
        self.smooth_nr, self.smooth_dr = float(smooth_nr), float(smooth_dr)
        self.max_label = max_label
        self.spatial_dims = spatial_dims

    def _loss(self, fn, input, instances, **options):
        if not self.include_background:
            input, instances = _without_background(input, instances, type(self).__name__)
        return fn(
            input,
            instances,
            self.alpha,
            self.beta,
            activation=self.activation,
            masking=self.masking,
            smooth_nr=self.smooth_nr,
            smooth_dr=self.smooth_dr,
            max_label=self.max_label,
            spatial_dims=self.spatial_dims,
            **options,
        )


class BlobDiceLoss(_BlobLossModule):
    """Blob Dice loss (Kofler et al. 2022, Eq. 1-3) as a module; see :func:`blob_dice`.

    Args are those of :func:`blob_dice`; ``forward(input, instances)`` takes
    ``input: Tensor[B, C, *spatial]`` (logits) and ``instances: Tensor[B, C, *spatial]`` (ids).

    MONAI's argument names are accepted where they mean something for blob loss:

    - ``sigmoid=True`` / ``softmax=True``: aliases of ``activation="sigmoid"`` / ``"softmax"``;
      ``sigmoid=False`` alone means no activation (``activation="none"``), as in MONAI. The
      default, with neither, is the paper's sigmoid.
    - ``include_background=False``: channel 0 is left out of the loss (sigmoid or none; with
      softmax it is an error, the fused op's global term averages every class).
    - ``to_onehot_y`` and ``reduction`` other than ``"mean"``: errors that say why (the target
      holds instance ids; the paper's reduction is a mean).

    The paper's names: ``alpha`` / ``beta`` weigh the global and the blob term (Eq. 2).

    Example:
        >>> loss_fn = BlobDiceLoss(alpha=2.0, beta=1.0)
        >>> loss = loss_fn(logits, instances)
        >>> BlobDiceLoss(sigmoid=True, include_background=False)  # MONAI-style
    """

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 1.0,
        *,
        activation: str | None = None,
        masking: str = "paper",
        squared_pred: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        max_label: int | None = None,
        spatial_dims: int | None = None,
        sigmoid: bool | None = None,
        softmax: bool | None = None,
        include_background: bool = True,
        to_onehot_y: bool = False,
        reduction: str = "mean",
    ):
        super().__init__(
            alpha, beta, activation, masking, smooth_nr, smooth_dr, max_label, spatial_dims,
            sigmoid, softmax, include_background, to_onehot_y, reduction,
        )  # fmt: skip
        self.squared_pred = bool(squared_pred)

    def forward(self, input: torch.Tensor, instances: torch.Tensor) -> torch.Tensor:
        return self._loss(blob_dice, input, instances, squared_pred=self.squared_pred)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, activation={self.activation!r}, "
            f"masking={self.masking!r}, squared_pred={self.squared_pred}"
        )


class BlobTverskyLoss(_BlobLossModule):
    """Blob Tversky loss as a module; see :func:`blob_tversky` (paper defaults 0.3 / 0.7).

    MONAI's argument names (``sigmoid``, ``softmax``, ``include_background``, ``to_onehot_y``,
    ``reduction``) are accepted as in :class:`BlobDiceLoss`.
    """

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 1.0,
        *,
        fp_weight: float = 0.3,
        fn_weight: float = 0.7,
        activation: str | None = None,
        masking: str = "paper",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        max_label: int | None = None,
        spatial_dims: int | None = None,
        sigmoid: bool | None = None,
        softmax: bool | None = None,
        include_background: bool = True,
        to_onehot_y: bool = False,
        reduction: str = "mean",
    ):
        super().__init__(
            alpha, beta, activation, masking, smooth_nr, smooth_dr, max_label, spatial_dims,
            sigmoid, softmax, include_background, to_onehot_y, reduction,
        )  # fmt: skip
        self.fp_weight, self.fn_weight = float(fp_weight), float(fn_weight)

    def forward(self, input: torch.Tensor, instances: torch.Tensor) -> torch.Tensor:
        return self._loss(blob_tversky, input, instances, fp_weight=self.fp_weight, fn_weight=self.fn_weight)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, fp_weight={self.fp_weight}, "
            f"fn_weight={self.fn_weight}, activation={self.activation!r}, masking={self.masking!r}"
        )


class BlobDiceCELoss(_BlobLossModule):
    """Blob Dice+CE loss as a module; see :func:`blob_dice_ce`.

    ``forward(input, instances)``: ``input: Tensor[B, C, *spatial]`` logits, ``instances``
    integer ids of the same shape. ``lambda_dice`` / ``lambda_ce`` weigh Dice and cross-entropy
    inside every term, as in MONAI's ``DiceCELoss``; ``alpha`` / ``beta`` the global and the blob
    term (paper Eq. 2). MONAI's names ``sigmoid``, ``include_background``, ``to_onehot_y`` and
    ``reduction`` are accepted as in :class:`BlobDiceLoss`; ``softmax=True`` is an error (see
    :func:`blob_dice_ce`).

    Example:
        >>> loss_fn = BlobDiceCELoss(alpha=2.0, beta=1.0, lambda_dice=1.0, lambda_ce=1.0)
        >>> loss = loss_fn(logits, instances)
    """

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 1.0,
        *,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        activation: str | None = None,
        masking: str = "paper",
        squared_pred: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        max_label: int | None = None,
        spatial_dims: int | None = None,
        sigmoid: bool | None = None,
        softmax: bool | None = None,
        include_background: bool = True,
        to_onehot_y: bool = False,
        reduction: str = "mean",
    ):
        super().__init__(
            alpha, beta, activation, masking, smooth_nr, smooth_dr, max_label, spatial_dims,
            sigmoid, softmax, include_background, to_onehot_y, reduction,
        )  # fmt: skip
        if self.activation == "softmax":
            raise ValueError(
                "BlobDiceCELoss: softmax is not supported: blob Dice+CE takes one binary cross-entropy per "
                "channel and per instance (sigmoid or none); use BlobDiceLoss(softmax=True), or one sigmoid "
                "channel per class"
            )
        if not (lambda_dice >= 0 and lambda_ce >= 0):
            raise ValueError(
                f"BlobDiceCELoss: lambda_dice and lambda_ce must be >= 0, got {lambda_dice} and {lambda_ce}"
            )
        self.lambda_dice, self.lambda_ce = float(lambda_dice), float(lambda_ce)
        self.squared_pred = bool(squared_pred)

    def forward(self, input: torch.Tensor, instances: torch.Tensor) -> torch.Tensor:
        return self._loss(
            blob_dice_ce,
            input,
            instances,
            lambda_dice=self.lambda_dice,
            lambda_ce=self.lambda_ce,
            squared_pred=self.squared_pred,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, lambda_dice={self.lambda_dice}, "
            f"lambda_ce={self.lambda_ce}, activation={self.activation!r}, masking={self.masking!r}"
        )

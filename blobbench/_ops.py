"""Python side of the ``torch.ops.blob`` operators: their fake kernels.

The operators, their device kernels and their autograd are C++ (``csrc/``): ``blob::dice`` and
``blob::tversky`` have a ``torch::autograd::Function`` registered for the Autograd key that
calls the private ``blob::_dice_forward`` / ``blob::_tversky_forward`` (loss, per-label
coefficient table, compacted ids) and, in the backward, ``blob::_dice_backward`` /
``blob::_tversky_backward``. No Python runs per call in eager mode.

Under ``torch.compile`` the losses of :mod:`blobbench.losses` call the private forward op
directly (see the autograd registered at the bottom of this module): without ``max_label`` its
outputs carry the data-dependent size of the coefficient table, which Dynamo must see.

The fake kernels below let ``torch.compile`` and ``torch.library.opcheck`` trace the operators
without running them. They enforce the same argument rules as the C++ checks
(``check_tensors`` / ``check_inputs`` / ``check_backward_args`` in ``csrc/common/glue.cpp``), with
the same messages; ``tests/test_edge_cases.py`` holds the two to each other.
"""

from __future__ import annotations

import math

import torch

from . import _C  # noqa: F401  (loads the library and registers the operators)

__all__ = ["dense_label_limit", "has_cuda_kernels"]

# Mirrors of the C++ constants (csrc/blob_ops.h).
_DENSE_TABLE_BUDGET = 256 << 20
_NUM_STATS, _NUM_COEF = 3, 2
_NUM_STATS_CE, _NUM_COEF_CE = 5, 4


def dense_label_limit(voxels_per_plane: int) -> int:
    """Largest label range always kept as a dense table (mirrors ``csrc/common/glue.cpp``)."""
    return max(1 << 16, voxels_per_plane // 8)


def _dense_for_bound(max_label: int, planes: int, voxels_per_plane: int, entries: int = _NUM_STATS + _NUM_COEF) -> bool:
    """Whether a caller-given ``max_label`` keeps a dense table (no compaction, no sync).

    ``entries``: float64 values per label in the op's tables (5; 9 for Dice+CE)."""
    if max_label < dense_label_limit(voxels_per_plane):
        return True
    return max_label < _DENSE_TABLE_BUDGET // (planes * entries * 8)


# c10's names of the dtypes, as the C++ messages print them.
_C10_NAMES = {
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.float32: "Float",
    torch.float64: "Double",
    torch.uint8: "Byte",
    torch.int8: "Char",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LABELS = (torch.uint8, torch.int16, torch.int32, torch.int64)


def _name(dtype) -> str:
    return _C10_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _shape(t) -> str:
    return "(" + ", ".join(str(int(s)) for s in t.shape) + ")"


def _check_tensors(input, instances, op):
    if input.dtype not in _FLOATS:
        raise TypeError(
            f"{op}: `input` must be a float16, bfloat16, float32 or float64 tensor, got {_name(input.dtype)}"
        )
    if instances.dtype not in _LABELS:
        raise TypeError(
            f"{op}: `instances` must hold integer instance ids (uint8, int16, int32 "
            f"or int64), got {_name(instances.dtype)}; label a mask with "
            f"blobbench.label_instances() or cast ids with .long()"
        )
    if not 3 <= input.dim() <= 5:
        raise ValueError(
            f"{op}: `input` must have shape (B, C, *spatial) with 1 to 3 spatial dims, got shape {_shape(input)}"
        )
    if instances.shape != input.shape:
        raise ValueError(
            f"{op}: `instances` must have the shape of `input` (B, C, *spatial), "
            f"got instances {_shape(instances)} and input {_shape(input)}"
        )
    if instances.device != input.device:
        raise ValueError(
            f"{op}: `input` and `instances` must be on the same device, got input "
            f"on {input.device} and instances on {instances.device}"
        )
    if input.numel() == 0:
        raise ValueError(f"{op}: `input` must not be empty (an empty batch has no loss), got shape {_shape(input)}")


def _check_activation(activation, op):
    if activation not in ("sigmoid", "softmax", "none"):
        raise ValueError(f'{op}: `activation` must be one of "sigmoid", "softmax" or "none", got "{activation}"')


def _check_inputs(input, instances, activation, masking, max_label, op):
    _check_activation(activation, op)
    _check_masking(activation, masking, op)
    _check_tensors(input, instances, op)
    if activation == "softmax" and input.shape[1] < 2:
        raise ValueError(
            f'{op}: activation="softmax" needs at least 2 channels (channel 0 is '
            f"the background class), got C = {input.shape[1]}"
        )
    if max_label < -1:
        raise ValueError(
            f"{op}: `max_label` must be -1 (find it) or an upper bound >= 0 on the instance ids, got {max_label}"
        )


def _check_masking(activation, masking, op):
    if masking not in ("paper", "official"):
        raise ValueError(f'{op}: `masking` must be "paper" or "official", got "{masking}"')
    if masking == "official" and activation == "softmax":
        raise ValueError(
            f'{op}: masking="official" is only defined for activation "sigmoid" or '
            f'"none" (the published code masks sigmoid logits); use masking="paper" '
            f"with softmax"
        )


def _loss_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_lambdas(lambda_dice, lambda_ce, op):
    if not (lambda_dice >= 0 and lambda_ce >= 0):
        raise ValueError(f"{op}: `lambda_dice` and `lambda_ce` must be >= 0, got {lambda_dice:f} and {lambda_ce:f}")


def _check_dice_ce(activation, masking, lambda_dice, lambda_ce, op):
    """The options of blob.dice_ce, in the C++ order: activation, masking, then Dice+CE's own."""
    _check_activation(activation, op)
    _check_masking(activation, masking, op)
    if activation == "softmax":
        raise ValueError(
            f'{op}: activation="softmax" is not supported: blob Dice+CE takes one binary '
            f'cross-entropy per channel and per instance (activation "sigmoid" or "none"); use '
            f"blob.dice with softmax, or one sigmoid channel per class"
        )
    _check_lambdas(lambda_dice, lambda_ce, op)


def _forward_fake(op, input, instances, activation, masking, max_label, ncoef=_NUM_COEF):
    _check_inputs(input, instances, activation, masking, max_label, op)
    entries = _NUM_STATS_CE + _NUM_COEF_CE if ncoef == _NUM_COEF_CE else _NUM_STATS + _NUM_COEF
    return _forward_outputs(input, instances, activation, max_label, entries, ncoef)


def _forward_outputs(input, ids, activation, max_label, entries, ncoef):
    """The loss, the (B, C, K, ncoef) float64 coefficient table and the (B, C, K) or (B, C, 0)
    ids (of ``ids``' dtype: the instances, or the CC ops' regions) that a forward op returns."""
    B, C = input.shape[:2]
    voxels = math.prod(input.shape[2:])
    loss = input.new_empty((), dtype=_loss_dtype(input.dtype))
    if max_label >= 0 and _dense_for_bound(max_label, B * C, voxels, entries):
        K = max(max_label + 1, 2) if activation == "softmax" else max_label + 1
        label_ids = ids.new_empty((B, C, 0))
    else:
        # The label range is only known from the data (dense from its maximum, or compacted).
        ctx = torch.library.get_ctx()
        K = ctx.new_dynamic_size(min=2)
        label_ids = ids.new_empty((B, C, ctx.new_dynamic_size()))
    coef = input.new_empty((B, C, K, ncoef), dtype=torch.float64)
    return loss, coef, label_ids


@torch.library.register_fake("blob::_dice_forward")
def _dice_forward_fake(
    input, instances, alpha, beta, activation, masking, squared_pred, smooth_nr, smooth_dr, max_label
):
    return _forward_fake("blob.dice", input, instances, activation, masking, max_label)


@torch.library.register_fake("blob::_tversky_forward")
def _tversky_forward_fake(
    input, instances, alpha, beta, activation, masking, fp_weight, fn_weight, smooth_nr, smooth_dr, max_label
):
    return _forward_fake("blob.tversky", input, instances, activation, masking, max_label)


@torch.library.register_fake("blob::_dice_ce_forward")
def _dice_ce_forward_fake(
    input,
    instances,
    alpha,
    beta,
    lambda_dice,
    lambda_ce,
    activation,
    masking,
    squared_pred,
    smooth_nr,
    smooth_dr,
    max_label,
):
    _check_dice_ce(activation, masking, lambda_dice, lambda_ce, "blob.dice_ce")
    return _forward_fake("blob.dice_ce", input, instances, activation, masking, max_label, _NUM_COEF_CE)


@torch.library.register_fake("blob::dice_ce")
def _dice_ce_fake(
    input,
    instances,
    alpha=2.0,
    beta=1.0,
    *,
    lambda_dice=1.0,
    lambda_ce=1.0,
    activation="sigmoid",
    masking="paper",
    squared_pred=False,
    smooth_nr=1e-5,
    smooth_dr=1e-5,
    max_label=-1,
):
    _check_dice_ce(activation, masking, lambda_dice, lambda_ce, "blob.dice_ce")
    _check_inputs(input, instances, activation, masking, max_label, "blob.dice_ce")
    return input.new_empty((), dtype=_loss_dtype(input.dtype))


@torch.library.register_fake("blob::dice")
def _dice_fake(
    input,
    instances,
    alpha=2.0,
    beta=1.0,
    *,
    activation="sigmoid",
    masking="paper",
    squared_pred=False,
    smooth_nr=1e-5,
    smooth_dr=1e-5,
    max_label=-1,
):
    _check_inputs(input, instances, activation, masking, max_label, "blob.dice")
    return input.new_empty((), dtype=_loss_dtype(input.dtype))


@torch.library.register_fake("blob::tversky")
def _tversky_fake(
    input,
    instances,
    alpha=2.0,
    beta=1.0,
    *,
    activation="sigmoid",
    masking="paper",
    fp_weight=0.3,
    fn_weight=0.7,
    smooth_nr=1e-5,
    smooth_dr=1e-5,
    max_label=-1,
):
    _check_inputs(input, instances, activation, masking, max_label, "blob.tversky")
    return input.new_empty((), dtype=_loss_dtype(input.dtype))


def _backward_fake(op, grad, input, instances, coef, label_ids, activation, ncoef=_NUM_COEF):
    _check_activation(activation, op)
    _check_tensors(input, instances, op)
    if grad.numel() != 1 or not grad.dtype.is_floating_point:
        raise ValueError(
            f"{op}: `grad` must be a floating scalar (the gradient of the loss), got "
            f"shape {_shape(grad)} {_name(grad.dtype)}"
        )
    B, C = input.shape[:2]
    if (
        coef.dim() != 4
        or coef.shape[0] != B
        or coef.shape[1] != C
        or coef.shape[3] != ncoef
        or coef.dtype != torch.float64
    ):
        raise ValueError(
            f"{op}: `coef` must be the (B, C, K, {ncoef}) float64 table of the forward op, "
            f"got {_shape(coef)} {_name(coef.dtype)}"
        )
    if label_ids.dim() != 3 or label_ids.shape[0] != B or label_ids.shape[1] != C or label_ids.dtype != instances.dtype:
        raise ValueError(
            f"{op}: `label_ids` must be the (B, C, K) or (B, C, 0) ids of the forward "
            f"op, of `instances`' dtype, got {_shape(label_ids)} "
            f"{_name(label_ids.dtype)}"
        )
    for t in (grad, coef, label_ids):
        if t.device != input.device:
            raise ValueError(
                f"{op}: `grad`, `coef` and `label_ids` must be on `input`'s device ({input.device}), got {t.device}"
            )
    return torch.empty_like(input)


@torch.library.register_fake("blob::_dice_backward")
def _dice_backward_fake(grad, input, instances, coef, label_ids, activation, squared_pred):
    return _backward_fake("blob.dice (backward)", grad, input, instances, coef, label_ids, activation)


@torch.library.register_fake("blob::_tversky_backward")
def _tversky_backward_fake(grad, input, instances, coef, label_ids, activation):
    return _backward_fake("blob.tversky (backward)", grad, input, instances, coef, label_ids, activation)


@torch.library.register_fake("blob::_dice_ce_backward")
def _dice_ce_backward_fake(grad, input, instances, coef, label_ids, activation, squared_pred):
    op = "blob.dice_ce (backward)"
    _check_activation(activation, op)
    if activation == "softmax":
        raise ValueError(f'{op}: activation="softmax" is not supported by blob Dice+CE')
    return _backward_fake(op, grad, input, instances, coef, label_ids, activation, _NUM_COEF_CE)


@torch.library.register_fake("blob::label_stats")
def _label_stats_fake(input, instances, *, activation="sigmoid", squared_pred=False, max_label=-1):
    _, coef, label_ids = _forward_fake("blob.label_stats", input, instances, activation, "paper", max_label)
    return input.new_empty((*coef.shape[:3], _NUM_STATS), dtype=torch.float64), label_ids


# ---- autograd of the private forward ops, for torch.compile ----------------------------------
# Without max_label the size of the coefficient table is data-dependent. Dynamo cannot trace
# blob::dice then (the op's output does not carry the table's size), so under torch.compile
# blob_dice / blob_tversky call the private forward op instead, whose outputs expose the
# table; this autograd (the same one-pass backward op as the C++ autograd) serves that path.


def _setup_context(ctx, inputs, output):
    input, instances = inputs[0], inputs[1]
    _, coef, label_ids = output
    ctx.save_for_backward(input, instances, coef, label_ids)
    ctx.mark_non_differentiable(coef, label_ids)
    ctx.activation = inputs[4]
    ctx.squared_pred = inputs[6] if isinstance(inputs[6], bool) else False


def _dice_forward_backward(ctx, grad_loss, _grad_coef, _grad_ids):
    input, instances, coef, label_ids = ctx.saved_tensors
    grad_input = torch.ops.blob._dice_backward(
        grad_loss, input, instances, coef, label_ids, ctx.activation, ctx.squared_pred
    )
    return (grad_input,) + (None,) * 9


def _tversky_forward_backward(ctx, grad_loss, _grad_coef, _grad_ids):
    input, instances, coef, label_ids = ctx.saved_tensors
    grad_input = torch.ops.blob._tversky_backward(grad_loss, input, instances, coef, label_ids, ctx.activation)
    return (grad_input,) + (None,) * 10


def _dice_ce_setup_context(ctx, inputs, output):
    input, instances = inputs[0], inputs[1]
    _, coef, label_ids = output
    ctx.save_for_backward(input, instances, coef, label_ids)
    ctx.mark_non_differentiable(coef, label_ids)
    ctx.activation = inputs[6]
    ctx.squared_pred = bool(inputs[8])


def _dice_ce_forward_backward(ctx, grad_loss, _grad_coef, _grad_ids):
    input, instances, coef, label_ids = ctx.saved_tensors
    grad_input = torch.ops.blob._dice_ce_backward(
        grad_loss, input, instances, coef, label_ids, ctx.activation, ctx.squared_pred
    )
    return (grad_input,) + (None,) * 11


torch.library.register_autograd("blob::_dice_forward", _dice_forward_backward, setup_context=_setup_context)
torch.library.register_autograd(
    "blob::_dice_ce_forward", _dice_ce_forward_backward, setup_context=_dice_ce_setup_context
)
torch.library.register_autograd("blob::_tversky_forward", _tversky_forward_backward, setup_context=_setup_context)


# ---- component-wise (Voronoi) losses: blob::cc_dice, blob::cc_dice_ce -----------------------
# Schemas (csrc/ops/cc_ops.cpp; semantics in csrc/ops/cc_ops.h and docs/design.md):
#
#   cc_dice(Tensor input, Tensor instances, Tensor regions, float alpha=1.0, float beta=1.0, *,
#           str activation="sigmoid", bool squared_pred=False, float smooth_nr=1e-5,
#           float smooth_dr=1e-5, int max_label=-1) -> Tensor
#   cc_dice_ce(Tensor input, Tensor instances, Tensor regions, float alpha=1.0, float beta=1.0, *,
#              float lambda_dice=1.0, float lambda_ce=1.0, str activation="sigmoid",
#              bool squared_pred=False, float smooth_nr=1e-5, float smooth_dr=1e-5,
#              int max_label=-1) -> Tensor
#   _cc_dice_forward(input, instances, regions, alpha, beta, activation, squared_pred, smooth_nr,
#                    smooth_dr, max_label) -> (loss, coef (B, C, K, 2), label_ids)
#   _cc_dice_ce_forward(input, instances, regions, alpha, beta, lambda_dice, lambda_ce, activation,
#                       squared_pred, smooth_nr, smooth_dr, max_label) -> (loss, coef (B, C, K, 3),
#                       label_ids)
#   _cc_dice_backward / _cc_dice_ce_backward(grad, input, instances, regions, coef, label_ids,
#                                            activation, squared_pred) -> grad_input
#
# The loss is the total alpha * global + beta * cc: the global term (blob.dice's / blob.dice_ce's)
# comes from the same pass. regions: same shape, dtype and device as instances, every voxel the id
# of its nearest instance of its (b, c) plane (blobbench.voronoi_regions), 0 in planes without
# instances. max_label bounds the region ids (= the instance ids).

_CC_NUM_STATS, _CC_NUM_COEF = 4, 2
_CC_NUM_STATS_CE, _CC_NUM_COEF_CE = 5, 3


def _check_regions(regions, instances, op):
    if regions.shape != instances.shape:
        raise ValueError(
            f"{op}: `regions` must have the shape of `instances` (B, C, *spatial), got regions "
            f"{_shape(regions)} and instances {_shape(instances)}"
        )
    if regions.dtype != instances.dtype:
        raise TypeError(
            f"{op}: `regions` must have the dtype of `instances`, got regions {_name(regions.dtype)} "
            f"and instances {_name(instances.dtype)}"
        )
    if regions.device != instances.device:
        raise ValueError(
            f"{op}: `regions` and `instances` must be on the same device, got regions on "
            f"{regions.device} and instances on {instances.device}"
        )


def _check_cc_activation(activation, op):
    """cc_dice_ce's activation: a known one, and not softmax."""
    _check_activation(activation, op)
    if activation == "softmax":
        raise ValueError(
            f'{op}: activation="softmax" is not supported: CC Dice+CE takes one binary '
            f'cross-entropy per channel and per region (activation "sigmoid" or "none"); use '
            f"blob.cc_dice with softmax, or one sigmoid channel per class"
        )


def _check_cc_ce(activation, lambda_dice, lambda_ce, op):
    """cc_dice_ce's own options, in the C++ order: activation, softmax refused, lambdas."""
    _check_cc_activation(activation, op)
    _check_lambdas(lambda_dice, lambda_ce, op)


def _cc_forward_fake(op, input, instances, regions, activation, max_label, with_ce):
    _check_inputs(input, instances, activation, "paper", max_label, op)
    _check_regions(regions, instances, op)
    ncoef = _CC_NUM_COEF_CE if with_ce else _CC_NUM_COEF
    entries = (_CC_NUM_STATS_CE if with_ce else _CC_NUM_STATS) + ncoef
    return _forward_outputs(input, regions, activation, max_label, entries, ncoef)


@torch.library.register_fake("blob::_cc_dice_forward")
def _cc_dice_forward_fake(
    input, instances, regions, alpha, beta, activation, squared_pred, smooth_nr, smooth_dr, max_label
):
    _check_activation(activation, "blob.cc_dice")
    return _cc_forward_fake("blob.cc_dice", input, instances, regions, activation, max_label, False)


@torch.library.register_fake("blob::_cc_dice_ce_forward")
def _cc_dice_ce_forward_fake(
    input,
    instances,
    regions,
    alpha,
    beta,
    lambda_dice,
    lambda_ce,
    activation,
    squared_pred,
    smooth_nr,
    smooth_dr,
    max_label,
):
    _check_cc_ce(activation, lambda_dice, lambda_ce, "blob.cc_dice_ce")
    return _cc_forward_fake("blob.cc_dice_ce", input, instances, regions, activation, max_label, True)


@torch.library.register_fake("blob::cc_dice")
def _cc_dice_fake(
    input,
    instances,
    regions,
    alpha=1.0,
    beta=1.0,
    *,
    activation="sigmoid",
    squared_pred=False,
    smooth_nr=1e-5,
    smooth_dr=1e-5,
    max_label=-1,
):
    _check_activation(activation, "blob.cc_dice")
    _check_inputs(input, instances, activation, "paper", max_label, "blob.cc_dice")
    _check_regions(regions, instances, "blob.cc_dice")
    return input.new_empty((), dtype=_loss_dtype(input.dtype))


@torch.library.register_fake("blob::cc_dice_ce")
def _cc_dice_ce_fake(
    input,
    instances,
    regions,
    alpha=1.0,
    beta=1.0,
    *,
    lambda_dice=1.0,
    lambda_ce=1.0,
    activation="sigmoid",
    squared_pred=False,
    smooth_nr=1e-5,
    smooth_dr=1e-5,
    max_label=-1,
):
    _check_cc_ce(activation, lambda_dice, lambda_ce, "blob.cc_dice_ce")
    _check_inputs(input, instances, activation, "paper", max_label, "blob.cc_dice_ce")
    _check_regions(regions, instances, "blob.cc_dice_ce")
    return input.new_empty((), dtype=_loss_dtype(input.dtype))


def _cc_backward_fake(op, grad, input, instances, regions, coef, label_ids, activation, ncoef):
    out = _backward_fake(op, grad, input, instances, coef, label_ids, activation, ncoef)
    _check_regions(regions, instances, op)
    return out


@torch.library.register_fake("blob::_cc_dice_backward")
def _cc_dice_backward_fake(grad, input, instances, regions, coef, label_ids, activation, squared_pred):
    return _cc_backward_fake(
        "blob.cc_dice (backward)", grad, input, instances, regions, coef, label_ids, activation, _CC_NUM_COEF
    )


@torch.library.register_fake("blob::_cc_dice_ce_backward")
def _cc_dice_ce_backward_fake(grad, input, instances, regions, coef, label_ids, activation, squared_pred):
    op = "blob.cc_dice_ce (backward)"
    _check_cc_activation(activation, op)
    return _cc_backward_fake(op, grad, input, instances, regions, coef, label_ids, activation, _CC_NUM_COEF_CE)


def _cc_setup_context(ctx, inputs, output):
    input, instances, regions = inputs[0], inputs[1], inputs[2]
    _, coef, label_ids = output
    ctx.save_for_backward(input, instances, regions, coef, label_ids)
    ctx.mark_non_differentiable(coef, label_ids)
    ctx.with_ce = len(inputs) == 12
    ctx.activation = inputs[7] if ctx.with_ce else inputs[5]
    ctx.squared_pred = bool(inputs[8] if ctx.with_ce else inputs[6])


def _cc_forward_backward(ctx, grad_loss, _grad_coef, _grad_ids):
    input, instances, regions, coef, label_ids = ctx.saved_tensors
    op = torch.ops.blob._cc_dice_ce_backward if ctx.with_ce else torch.ops.blob._cc_dice_backward
    grad_input = op(grad_loss, input, instances, regions, coef, label_ids, ctx.activation, ctx.squared_pred)
    return (grad_input,) + (None,) * (11 if ctx.with_ce else 9)


torch.library.register_autograd("blob::_cc_dice_forward", _cc_forward_backward, setup_context=_cc_setup_context)
torch.library.register_autograd(
    "blob::_cc_dice_ce_forward", _cc_forward_backward, setup_context=_cc_setup_context
)


def has_cuda_kernels() -> bool:
    """Whether this build of blobbench compiled the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("blob::_dice_forward", "CUDA")

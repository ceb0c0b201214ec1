"""Registration glue of the ``torch.ops.blob`` operators: fake kernels and autograd.

``blob::dice`` and ``blob::tversky`` are CompositeImplicitAutograd in C++: they call
``blob::dice_forward`` / ``blob::tversky_forward``, which return ``(loss, coef, label_ids)``.
``coef`` is the (B, C, K, 2) float64 table of per-label gradient coefficients that the one-pass
backward ops (``blob::dice_backward`` / ``blob::tversky_backward``) need; ``label_ids`` is empty
unless the label range was compacted (sparse ids above ``dense_label_limit``).
"""
from __future__ import annotations

import math

import torch

from . import _C  # noqa: F401  (loads the library and registers the operators)

__all__ = ["dense_label_limit"]


def dense_label_limit(voxels_per_plane: int) -> int:
    """Largest label range kept as a dense table; larger ranges are compacted (mirrors C++)."""
    return max(1 << 16, voxels_per_plane // 8)


def _forward_fake(input, instances, max_label):
    B, C = input.shape[:2]
    voxels = math.prod(input.shape[2:])
    loss = input.new_empty(())
    if max_label >= 0 and max_label + 1 <= dense_label_limit(voxels):
        K = max(max_label + 1, 2)
        label_ids = instances.new_empty((0,))
    else:
        # The label range is only known from the data.
        ctx = torch.library.get_ctx()
        K = ctx.new_dynamic_size(min=2)
        label_ids = instances.new_empty((ctx.new_dynamic_size(),))
    coef = input.new_empty((B, C, K, 2), dtype=torch.float64)
    return loss, coef, label_ids


@torch.library.register_fake("blob::dice_forward")
def _dice_forward_fake(input, instances, alpha, beta, activation, masking, squared_pred,
                       smooth_nr, smooth_dr, max_label):
    return _forward_fake(input, instances, max_label)


@torch.library.register_fake("blob::tversky_forward")
def _tversky_forward_fake(input, instances, alpha, beta, activation, masking, fp_weight,
                          fn_weight, smooth_nr, smooth_dr, max_label):
    return _forward_fake(input, instances, max_label)


@torch.library.register_fake("blob::dice_backward")
def _dice_backward_fake(grad, input, instances, coef, label_ids, activation, squared_pred):
    return torch.empty_like(input)


@torch.library.register_fake("blob::tversky_backward")
def _tversky_backward_fake(grad, input, instances, coef, label_ids, activation):
    return torch.empty_like(input)


@torch.library.register_fake("blob::label_stats")
def _label_stats_fake(input, instances, *, activation="sigmoid", squared_pred=False, max_label=-1):
    _, coef, label_ids = _forward_fake(input, instances, max_label)
    return input.new_empty((*coef.shape[:3], 3), dtype=torch.float64), label_ids


def _setup_context(ctx, inputs, output):
    input, instances = inputs[0], inputs[1]
    _, coef, label_ids = output
    ctx.save_for_backward(input, instances, coef, label_ids)
    ctx.mark_non_differentiable(coef, label_ids)
    ctx.activation = inputs[4]
    ctx.squared_pred = inputs[6] if isinstance(inputs[6], bool) else False


def _dice_backward(ctx, grad_loss, _grad_coef, _grad_ids):
    input, instances, coef, label_ids = ctx.saved_tensors
    grad_input = torch.ops.blob.dice_backward(grad_loss, input, instances, coef, label_ids,
                                              ctx.activation, ctx.squared_pred)
    return (grad_input,) + (None,) * 9


def _tversky_backward(ctx, grad_loss, _grad_coef, _grad_ids):
    input, instances, coef, label_ids = ctx.saved_tensors
    grad_input = torch.ops.blob.tversky_backward(grad_loss, input, instances, coef, label_ids,
                                                 ctx.activation)
    return (grad_input,) + (None,) * 10


torch.library.register_autograd("blob::dice_forward", _dice_backward, setup_context=_setup_context)
torch.library.register_autograd("blob::tversky_forward", _tversky_backward,
                                setup_context=_setup_context)


def has_cuda_kernels() -> bool:
    """Whether this build of blobbench compiled the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("blob::dice_forward", "CUDA")

"""torch.compile with every option changed from its default, and with half-precision inputs.

Under torch.compile the losses call the private forward ops (``blob::_dice_forward`` ...) with
their own positional argument lists, and the autograd of those ops (blobbench/_ops.py) reads
``activation`` and ``squared_pred`` back from those lists by position. With the default options
a swapped pair of arguments (``smooth_nr`` / ``smooth_dr``, ``alpha`` / ``beta``,
``fp_weight`` / ``fn_weight``, ``lambda_dice`` / ``lambda_ce``) or a wrong position cannot
show; here every option has a non-default value distinct from its partner's, so any swap
changes the loss or the gradient.

The option matrix is traced with the ``aot_eager`` backend: Dynamo, the fake kernels and AOT
autograd run as with inductor, only the code generation (identical for every option set, and
covered by the default-option tests in test_dice.py / test_dice_ce.py) is left out, which keeps
each compile to about a second on 2 cores.
"""

import numpy as np
import pytest
import torch
from helpers import loss_and_grad, random_instances, rel_err

import blobbench
from blobbench import blob_dice, blob_dice_ce, blob_tversky

# (activation, masking): every combination each loss accepts.
DICE_MODES = [("sigmoid", "paper"), ("sigmoid", "official"), ("none", "paper"), ("none", "official"),
              ("softmax", "paper")]
CE_MODES = [m for m in DICE_MODES if m[0] != "softmax"]

# Non-default and pairwise distinct: a swap of any pair changes the value. The smoothing
# constants are large so that they move the loss well beyond float64 rounding.
SHARED = dict(smooth_nr=0.25, smooth_dr=0.75)
ALPHA, BETA = 1.5, 0.4
OPTIONS = {
    "dice": dict(SHARED, squared_pred=True),
    "tversky": dict(SHARED, fp_weight=0.6, fn_weight=0.2),
    "dice_ce": dict(SHARED, squared_pred=True, lambda_dice=0.8, lambda_ce=0.3),
}
LOSSES = {"dice": blob_dice, "tversky": blob_tversky, "dice_ce": blob_dice_ce}


def _case(activation, seed=3, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    C = 3 if activation == "softmax" else 2
    inst = random_instances(rng, (2, C, 3, 6, 7), 4, empty_prob=0.0)
    logits = torch.randn(inst.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = torch.sigmoid(logits) if activation == "none" else logits
    return x.to(dtype), inst


def _compiled(fn, **options):
    torch._dynamo.reset()
    return torch.compile(lambda x, i: fn(x, i, ALPHA, BETA, **options), backend="aot_eager", fullgraph=True)


def _cases():
    for loss, modes in (("dice", DICE_MODES), ("tversky", DICE_MODES), ("dice_ce", CE_MODES)):
        for n, (activation, masking) in enumerate(modes):
            # max_label alternates between absent (data-dependent table) and a bound (static table)
            yield pytest.param(loss, activation, masking, None if n % 2 else 30, id=f"{loss}-{activation}-{masking}")


@pytest.mark.parametrize("loss,activation,masking,max_label", list(_cases()))
def test_compiled_loss_equals_eager_with_every_option_changed(loss, activation, masking, max_label):
    fn = LOSSES[loss]
    options = dict(OPTIONS[loss], activation=activation, masking=masking, max_label=max_label)
    x, inst = _case(activation)
    eager = loss_and_grad(lambda a, b: fn(a, b, ALPHA, BETA, **options), x, inst)
    comp = loss_and_grad(_compiled(fn, **options), x, inst)
    assert rel_err(comp[0], eager[0]) <= 1e-12, (comp[0].item(), eager[0].item())
    assert rel_err(comp[1], eager[1]) <= 1e-10


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_option_of_the_compiled_loss_changes_it(loss):
    """The matrix above can only catch a swap if each option moves the loss: this holds each
    option, changed alone from the values above, to a different compiled loss and gradient."""
    fn = LOSSES[loss]
    x, inst = _case("sigmoid")
    base = dict(OPTIONS[loss], activation="sigmoid", masking="official")
    ref = loss_and_grad(_compiled(fn, **base), x, inst)
    swaps = [("smooth_nr", "smooth_dr")] + {
        "dice": [], "tversky": [("fp_weight", "fn_weight")], "dice_ce": [("lambda_dice", "lambda_ce")]}[loss]
    for a, b in swaps:
        other = dict(base, **{a: base[b], b: base[a]})
        got = loss_and_grad(_compiled(fn, **other), x, inst)
        assert rel_err(got[0], ref[0]) > 1e-4, (a, b)
    torch._dynamo.reset()
    swapped = torch.compile(lambda t, i: fn(t, i, BETA, ALPHA, **base), backend="aot_eager", fullgraph=True)
    assert rel_err(loss_and_grad(swapped, x, inst)[0], ref[0]) > 1e-4
    if "squared_pred" in base:
        # squared_pred reaches the backward through the autograd's context (position 6 / 8)
        got = loss_and_grad(_compiled(fn, **dict(base, squared_pred=False)), x, inst)
        assert rel_err(got[1], ref[1]) > 1e-4


HALF = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF + [torch.float64], ids=["float16", "bfloat16", "float64"])
def test_opcheck_with_half_inputs(dtype):
    """The fake kernels' output dtypes for half inputs: a float32 loss, float64 tables, the
    gradient in the input's dtype (opcheck compares them with the real kernels'); float64 keeps
    its dtype (test_dice.py's opcheck runs float32)."""
    x, inst = _case("sigmoid", seed=5, dtype=dtype)
    x = x.requires_grad_(True)
    opts = dict(activation="sigmoid", masking="paper")
    for max_label in (-1, int(inst.max()) + 2):
        torch.library.opcheck(torch.ops.blob.dice.default, (x, inst, ALPHA, BETA), dict(opts, max_label=max_label))
        torch.library.opcheck(torch.ops.blob.tversky.default, (x, inst, ALPHA, BETA), dict(opts, max_label=max_label))
        torch.library.opcheck(torch.ops.blob.dice_ce.default, (x, inst, ALPHA, BETA), dict(opts, max_label=max_label))
        torch.library.opcheck(
            torch.ops.blob._dice_forward.default,
            (x, inst, ALPHA, BETA, "sigmoid", "paper", True, 1e-5, 1e-5, max_label),
        )
        torch.library.opcheck(
            torch.ops.blob._tversky_forward.default,
            (x, inst, ALPHA, BETA, "sigmoid", "paper", 0.3, 0.7, 1e-5, 1e-5, max_label),
        )
        torch.library.opcheck(
            torch.ops.blob._dice_ce_forward.default,
            (x, inst, ALPHA, BETA, 1.0, 0.5, "sigmoid", "paper", False, 1e-5, 1e-5, max_label),
        )
        torch.library.opcheck(torch.ops.blob.label_stats.default, (x.detach(), inst), dict(max_label=max_label))
    no_aot = ("test_schema", "test_autograd_registration", "test_faketensor")
    grad = torch.tensor(1.0)
    for fwd, bwd, extra, args in (
        ("_dice_forward", "_dice_backward", (True,), ("sigmoid", "paper", True, 1e-5, 1e-5, -1)),
        ("_tversky_forward", "_tversky_backward", (), ("sigmoid", "paper", 0.3, 0.7, 1e-5, 1e-5, -1)),
        ("_dice_ce_forward", "_dice_ce_backward", (False,), (1.0, 0.5, "sigmoid", "paper", False, 1e-5, 1e-5, -1)),
    ):
        loss, coef, ids = getattr(torch.ops.blob, fwd)(x.detach(), inst, ALPHA, BETA, *args)
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert coef.dtype == torch.float64
        torch.library.opcheck(
            getattr(torch.ops.blob, bwd).default,
            (grad, x.detach(), inst, coef, ids, "sigmoid", *extra),
            test_utils=no_aot,
        )


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_compiled_loss_with_half_inputs_is_float32_and_equals_eager(loss, dtype):
    fn = LOSSES[loss]
    x, inst = _case("sigmoid", seed=6, dtype=dtype)
    for max_label in (None, 30):
        eager = loss_and_grad(fn, x, inst, ALPHA, BETA, max_label=max_label)
        torch._dynamo.reset()
        compiled = torch.compile(lambda a, b: fn(a, b, ALPHA, BETA, max_label=max_label), fullgraph=True,
                                 backend="aot_eager")
        comp = loss_and_grad(compiled, x, inst)
        assert comp[0].dtype == eager[0].dtype == torch.float32
        assert comp[1].dtype == eager[1].dtype == dtype
        assert torch.equal(comp[0], eager[0]) and torch.equal(comp[1], eager[1])


def test_compiled_module_with_half_inputs_under_inductor():
    """One inductor compile (the generated code around the ops) with a bfloat16 input and
    non-default options: the fake kernel's float32 loss feeds inductor's buffers."""
    x, inst = _case("sigmoid", seed=7, dtype=torch.bfloat16)
    module = blobbench.BlobDiceLoss(ALPHA, BETA, squared_pred=True, smooth_nr=0.25, smooth_dr=0.75, masking="official")
    torch._dynamo.reset()
    eager = loss_and_grad(module, x, inst)
    comp = loss_and_grad(torch.compile(module, fullgraph=True), x, inst)
    assert comp[0].dtype == torch.float32 and comp[1].dtype == torch.bfloat16
    assert rel_err(comp[0], eager[0]) <= 1e-6 and rel_err(comp[1], eager[1]) <= 1e-2


def test_fake_dice_ce_table_size_counts_its_nine_entries_per_label():
    """A max_label whose dense table fits the 256 MiB budget with Dice's 5 float64 entries per
    label but not with Dice+CE's 9: Dice keeps the dense table of max_label + 1 labels, Dice+CE's
    table follows the ids present (a data-dependent size); the fake kernel must say the same
    (opcheck), or torch.compile would trace a table of the wrong size."""
    x, inst = _case("sigmoid", seed=8, dtype=torch.float32)
    planes = x.shape[0] * x.shape[1]
    max_label = 1_200_000
    assert max_label < (256 << 20) // (planes * 5 * 8) and max_label >= (256 << 20) // (planes * 9 * 8)
    ce_args = (x, inst, ALPHA, BETA, 1.0, 0.5, "sigmoid", "paper", False, 1e-5, 1e-5, max_label)
    _, coef, _ = torch.ops.blob._dice_ce_forward(*ce_args)
    assert coef.shape[2] < 100  # not max_label + 1: the table follows the ids present
    torch.library.opcheck(torch.ops.blob._dice_ce_forward.default, ce_args,
                          test_utils=("test_schema", "test_faketensor"))

"""The oracles (blobbench/reference.py) refuse what the fused ops refuse, each with its message:
a reference that silently accepted an option the op refuses would be compared with nothing."""

import pytest
import torch

from blobbench import naive_blob_dice, naive_blob_dice_ce, naive_blob_tversky


def _case():
    x = torch.randn(1, 2, 2, 3, 3, dtype=torch.float64)
    inst = torch.zeros(x.shape, dtype=torch.int32)
    inst[0, 1, 0, :2, :2] = 1
    return x, inst


def test_dice_ce_oracle_refuses_softmax():
    with pytest.raises(ValueError, match=r'^blob Dice\+CE is defined for activation "sigmoid" or "none"'):
        naive_blob_dice_ce(*_case(), activation="softmax")


@pytest.mark.parametrize("lambdas", [(-0.5, 1.0), (1.0, -0.5), (-1.0, -1.0)])
def test_dice_ce_oracle_refuses_a_negative_lambda(lambdas):
    message = rf"^lambda_dice and lambda_ce must be >= 0, got {lambdas[0]} and {lambdas[1]}$"
    with pytest.raises(ValueError, match=message):
        naive_blob_dice_ce(*_case(), lambda_dice=lambdas[0], lambda_ce=lambdas[1])
    assert torch.isfinite(naive_blob_dice_ce(*_case(), lambda_dice=0.0, lambda_ce=0.0))


@pytest.mark.parametrize("oracle", [naive_blob_dice, naive_blob_tversky, naive_blob_dice_ce])
def test_oracles_refuse_official_masking_with_softmax(oracle):
    with pytest.raises(ValueError, match="official"):
        oracle(*_case(), activation="softmax", masking="official")


def test_generic_loop_refuses_official_masking_with_softmax():
    from monai.losses import DiceLoss

    from blobbench import naive_blob_loss

    with pytest.raises(ValueError, match="official"):
        naive_blob_loss(*_case(), DiceLoss(), activation="softmax", masking="official")


def test_loop_reads_every_channel_when_the_first_spatial_dim_is_smaller_than_c():
    """(B, C, D, H, W) with D = 1 < C = 3: each channel's instances count (the loop's channel
    range is C, not a spatial size); held to the closed form, which has no loop."""
    from blobbench import vectorized_blob_loss

    x = torch.randn(1, 3, 1, 4, 4, dtype=torch.float64)
    inst = torch.zeros(x.shape, dtype=torch.int32)
    for c in range(3):
        inst[0, c, 0, c : c + 2, 1:3] = 1
    want = vectorized_blob_loss(x, inst, 1.0, 1.0)
    got = naive_blob_dice(x, inst, 1.0, 1.0)
    assert abs(got.item() - want.item()) <= 1e-12 * abs(want.item())

"""The closed form (blobbench/closed_form.py) through the vectorized reference, against the paper's
loop with MONAI's losses, for every option: Dice and Tversky, every activation x masking,
squared_pred, non-default smoothing and Tversky weights.

The seeded random cases of test_dice.py draw the options at random; a mutation run that keeps a
fraction of the seeds (benchmarks/mutation) then misses combinations (official masking with
squared_pred, Tversky in the closed form, softmax's derived background). This grid has each
combination once, on inputs small enough for the loop.
"""

import numpy as np
import pytest
import torch
from helpers import loss_and_grad, random_instances, rel_err

from blobbench import naive_blob_dice, naive_blob_tversky, vectorized_blob_loss

MODES = [("sigmoid", "paper"), ("sigmoid", "official"), ("none", "paper"), ("none", "official"), ("softmax", "paper")]
OPTS = dict(smooth_nr=0.25, smooth_dr=0.75)
ALPHA, BETA = 1.5, 0.4


def _case(activation, seed):
    rng = np.random.default_rng(seed)
    C = 3 if activation == "softmax" else 2
    inst = random_instances(rng, (2, C, 3, 5, 6), 4, empty_prob=0.0)
    if activation == "softmax":
        # channel 0 is the background class: its ids are not read, junk must not matter
        inst[:, 0] = torch.from_numpy(rng.integers(0, 3, size=inst[:, 0].shape)).to(inst.dtype)
    logits = torch.randn(inst.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (torch.sigmoid(logits) if activation == "none" else logits), inst


@pytest.mark.parametrize("squared_pred", [False, True], ids=["linear", "squared"])
@pytest.mark.parametrize("activation,masking", MODES, ids=[f"{a}-{m}" for a, m in MODES])
def test_vectorized_dice_matches_the_loop_for_every_option(activation, masking, squared_pred):
    x, inst = _case(activation, 21)
    opts = dict(OPTS, activation=activation, masking=masking, squared_pred=squared_pred)
    want = loss_and_grad(naive_blob_dice, x, inst, ALPHA, BETA, **opts)
    got = loss_and_grad(vectorized_blob_loss, x, inst, ALPHA, BETA, **opts)
    assert rel_err(got[0], want[0]) <= 1e-12 and rel_err(got[1], want[1]) <= 1e-10


@pytest.mark.parametrize("activation,masking", MODES, ids=[f"{a}-{m}" for a, m in MODES])
def test_vectorized_tversky_matches_the_loop_for_every_option(activation, masking):
    x, inst = _case(activation, 22)
    opts = dict(OPTS, activation=activation, masking=masking, fp_weight=0.6, fn_weight=0.2)
    want = loss_and_grad(naive_blob_tversky, x, inst, ALPHA, BETA, **opts)
    got = loss_and_grad(vectorized_blob_loss, x, inst, ALPHA, BETA, loss="tversky", **opts)
    assert rel_err(got[0], want[0]) <= 1e-12 and rel_err(got[1], want[1]) <= 1e-10


def test_vectorized_loss_keeps_the_input_dtype():
    x, inst = _case("sigmoid", 23)
    assert vectorized_blob_loss(x.float(), inst).dtype == torch.float32
    want = vectorized_blob_loss(x, inst)
    assert rel_err(vectorized_blob_loss(x.float(), inst), want) <= 1e-6


def test_vectorized_loss_refuses_an_unknown_loss_and_official_softmax():
    x, inst = _case("softmax", 24)
    with pytest.raises(ValueError, match=r"^loss must be 'dice' or 'tversky', got 'focal'$"):
        vectorized_blob_loss(x, inst, loss="focal")
    with pytest.raises(ValueError, match="official"):
        vectorized_blob_loss(x, inst, activation="softmax", masking="official")

"""MONAI's argument names on the loss modules (sigmoid, softmax, include_background, to_onehot_y,
reduction): the same loss where they have a meaning for blob loss, a clear error where not."""

import pytest
import torch

from blobbench import BlobDiceLoss, BlobTverskyLoss


def _case(C=3):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, C, 4, 8, 8, generator=gen, dtype=torch.float64)
    inst = torch.zeros(2, C, 4, 8, 8, dtype=torch.int64)
    inst[0, 0, 0, 0, 0:2] = 1
    if C > 2:
        inst[:, 1, 1:3, 1:4, 1:4] = 1
        inst[:, 2, 2:4, 5:8, 5:8] = 2
    return x, inst


@pytest.mark.parametrize("cls", [BlobDiceLoss, BlobTverskyLoss])
@pytest.mark.parametrize(
    "monai,ours",
    [
        (dict(sigmoid=True), dict(activation="sigmoid")),
        (dict(softmax=True), dict(activation="softmax")),
        (dict(sigmoid=False), dict(activation="none")),
        (dict(), dict(activation="sigmoid")),  # the paper's default
    ],
)
def test_activation_aliases(cls, monai, ours):
    x, inst = _case()
    if ours["activation"] == "none":
        x = torch.sigmoid(x)
    assert cls(**monai).activation == ours["activation"]
    assert torch.equal(cls(**monai)(x, inst), cls(**ours)(x, inst))


@pytest.mark.parametrize("cls", [BlobDiceLoss, BlobTverskyLoss])
def test_include_background_false_leaves_channel_0_out(cls):
    x, inst = _case()
    got = cls(sigmoid=True, include_background=False)(x, inst)
    assert torch.equal(got, cls()(x[:, 1:], inst[:, 1:]))
    assert not torch.equal(got, cls()(x, inst))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sigmoid=True, softmax=True), r"sigmoid=True and softmax=True are exclusive"),
        (dict(activation="none", sigmoid=True), r"activation='none' contradicts sigmoid=True"),
        (dict(softmax=True, include_background=False), r"include_background=False is not supported with softmax"),
        (dict(to_onehot_y=True), r"to_onehot_y has no meaning for blob loss.*label_instances"),
        (dict(reduction="sum"), r"reduction must be 'mean', got 'sum'.*paper Eq. 2 and 3"),
        (dict(reduction="none"), r"reduction must be 'mean', got 'none'"),
    ],
)
@pytest.mark.parametrize("cls", [BlobDiceLoss, BlobTverskyLoss])
def test_options_without_a_meaning_for_blob_loss_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {match}"):
        cls(**kwargs)


def test_include_background_false_needs_two_channels():
    x, inst = _case(C=1)
    with pytest.raises(ValueError, match=r"include_background=False needs at least 2 channels"):
        BlobDiceLoss(include_background=False)(x, inst)


FULL_MESSAGES = [
    (dict(to_onehot_y=True),
     "to_onehot_y has no meaning for blob loss: the target holds instance ids per channel, not class indices; "
     "build them from a class map with blobbench.label_instances(class_map, num_classes=C)"),
    (dict(reduction="sum"),
     "reduction must be 'mean', got 'sum': blob loss is defined as a mean over the instances, channels and batch "
     "elements (paper Eq. 2 and 3), so there is no per-element loss to return or sum"),
    (dict(softmax=True, include_background=False),
     "include_background=False is not supported with softmax: the fused op's global term averages every class, "
     "the background class (channel 0) included"),
]


@pytest.mark.parametrize("kwargs,message", FULL_MESSAGES, ids=["to_onehot_y", "reduction", "include_background"])
def test_monai_option_errors_say_why_in_full(kwargs, message):
    with pytest.raises(ValueError) as e:
        BlobDiceLoss(**kwargs)
    assert str(e.value) == f"BlobDiceLoss: {message}"


@pytest.mark.parametrize("cls", [BlobDiceLoss, BlobTverskyLoss])
def test_module_passes_max_label_to_the_op(cls):
    """The module's max_label reaches the op: an id above it raises (on the CPU)."""
    x, inst = _case()
    with pytest.raises(ValueError, match=r"holds an id above max_label \(the largest is \d+, max_label = 0\)"):
        cls(max_label=0)(x, inst)
    assert torch.equal(cls(max_label=int(inst.max()))(x, inst), cls()(x, inst))

"""Every error message of the blob loss operators."""

import pytest
import torch
from conftest import devices

import blobbench
from blobbench import blob_dice


def _inputs(device="cpu", C=1):
    x = torch.randn(2, C, 4, 5, 6, device=device)
    lab = torch.zeros(2, C, 4, 5, 6, dtype=torch.int32, device=device)
    lab[0, :, 1:3, 1:3, 1:3] = 1
    return x, lab


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda x, lab: (x, lab.float()), r"`instances` must hold integer instance ids.*Float"),
        (lambda x, lab: (x, lab.bool()), r"`instances` must hold integer instance ids.*Bool"),
        (lambda x, lab: (x.int(), lab), r"`input` must be a float16, bfloat16, float32 or float64 tensor"),
        (lambda x, lab: (x[:, :, 0, 0, 0], lab[:, :, 0, 0, 0]), r"`input` must have shape \(B, C, \*spatial\)"),
        (lambda x, lab: (x, lab[:, :, :3]), r"`instances` must have the shape of `input`"),
        (lambda x, lab: (x[:0], lab[:0]), r"`input` must not be empty"),
    ],
)
def test_bad_tensors_raise_clear_errors(bad, match):
    x, lab = _inputs()
    x, lab = bad(x, lab)
    with pytest.raises((TypeError, ValueError), match=match):
        blob_dice(x, lab)


_NEGATIVE = r"^blob\.dice: `instances` must be >= 0 \(0 = background\), found a negative id \(the smallest is {}\)$"
_ABOVE = r"^blob\.dice: `instances` holds an id above max_label \(the largest is {}, max_label = {}\)$"


def test_negative_labels_raise():
    x, lab = _inputs()
    lab[1, 0, 0, 0, 0] = -3
    lab[0, 0, 0, 0, 1] = -2
    with pytest.raises(ValueError, match=_NEGATIVE.format(-3)):
        blob_dice(x, lab)


# max_label 5: a dense table checked in the accumulate pass (the message computed once it
# failed); 10**6: a large table, which the CPU sizes by the ids present after reading their range;
# 10**12: beyond the dense budget.
@pytest.mark.parametrize("max_label", [5, 10**6, 10**12])
def test_labels_above_max_label_raise_on_cpu(max_label):
    x, lab = _inputs()
    lab = lab.long()
    lab[1, 0, 0, 0, 0] = max_label + 4
    lab[0, 0, 3, 0, 0] = max_label + 2
    with pytest.raises(ValueError, match=_ABOVE.format(max_label + 4, max_label)):
        blob_dice(x, lab, max_label=max_label)


@pytest.mark.parametrize("max_label", [5, 10**6, 10**12])
def test_negative_labels_with_max_label_raise_on_cpu(max_label):
    x, lab = _inputs()
    lab = lab.long()
    lab[1, 0, 0, 0, 0] = -1
    lab[0, 0, 3, 0, 0] = -7
    with pytest.raises(ValueError, match=_NEGATIVE.format(-7)):
        blob_dice(x, lab, max_label=max_label)
    lab[1, 0, 2, 2, 2] = max_label + 1  # an id above max_label as well: the negative one is named
    with pytest.raises(ValueError, match=_NEGATIVE.format(-7)):
        blob_dice(x, lab, max_label=max_label)


def test_softmax_range_errors_name_the_read_channels():
    """Softmax never reads channel 0's ids: the messages name the ids of the other channels."""
    x, lab = _inputs(C=2)
    lab[:, 0] = 50  # ignored
    lab[1, 1, 0, 0, 0] = 3
    with pytest.raises(ValueError, match=_ABOVE.format(3, 2)):
        blob_dice(x, lab, activation="softmax", max_label=2)
    lab[1, 1, 0, 0, 0] = -4
    with pytest.raises(ValueError, match=_NEGATIVE.format(-4)):
        blob_dice(x, lab, activation="softmax", max_label=2)


# The CPU reads the ids' range in its own loop over contiguous labels (softmax skips channel 0 of
# every batch element), one chunk per thread, chunks that cross batch elements here (3 x 2 read
# channels x 60,000 voxels), and with ATen's aminmax otherwise (a non-contiguous tensor): both must
# name the same extremes, for every label dtype, wherever the extreme id sits. max_label: None
# reads the range first; 200 reads it once the accumulate pass failed; 10**5 sizes a dense table
# by the ids present; 10**6 is beyond the dense budget.
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("max_label", [None, 200, 10**5, 10**6])
def test_range_errors_name_the_extremes_of_the_read_channels(dtype, layout, max_label):
    g = torch.Generator().manual_seed(7)
    B, C, shape = 3, 3, (30, 40, 50)
    x = torch.randn(B, C, *shape, generator=g)
    lab = torch.randint(0, 100, (B, C, *shape), generator=g).to(dtype)
    lab[:, 0] = 250 if dtype == torch.uint8 else 10**4  # channel 0: never read with softmax

    def call(lab):
        if layout == "transposed":  # same values, strides that are not contiguous
            lab = lab.transpose(2, 4).contiguous().transpose(2, 4)
            assert not lab.is_contiguous()
        return blob_dice(x, lab, activation="softmax", max_label=max_label)

    assert torch.isfinite(call(lab))  # channel 0's ids are above every max_label: not read
    if max_label is not None:
        hi = min(max_label + 3, torch.iinfo(dtype).max)
        # the last id, the first of a batch element and of a chunk (2 threads: 2 chunks of 180,000
        # ids, the second from (1, 2, 0, 0, 0)), the last before that chunk, one in the middle
        for where in [(2, 2, 29, 39, 49), (1, 1, 0, 0, 0), (1, 2, 0, 0, 0), (1, 1, 29, 39, 49), (0, 2, 14, 20, 25)]:
            bad = lab.clone()
            bad[where] = hi
            bad[0, 1, 0, 0, 1] = hi - 1
            if hi <= max_label:
                assert torch.isfinite(call(bad))
            else:
                with pytest.raises(ValueError, match=_ABOVE.format(hi, max_label)):
                    call(bad)
    if dtype != torch.uint8:
        for where in [(2, 2, 29, 39, 49), (1, 1, 0, 0, 0), (1, 2, 0, 0, 0), (0, 1, 0, 0, 0)]:
            bad = lab.clone()
            bad[where] = -5
            bad[2, 1, 3, 3, 3] = -2
            with pytest.raises(ValueError, match=_NEGATIVE.format(-5)):
                call(bad)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(activation="relu"), r"`activation` must be one of \"sigmoid\", \"softmax\" or \"none\", got \"relu\""),
        (dict(masking="exact"), r"`masking` must be \"paper\" or \"official\", got \"exact\""),
        (dict(activation="softmax", masking="official"), r"masking=\"official\" is only defined"),
        (dict(activation="softmax"), r"softmax\" needs at least 2 channels"),
        (dict(max_label=-4), r"max_label must be None or an int >= 0"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, match):
    x, lab = _inputs()
    with pytest.raises(ValueError, match=match):
        blob_dice(x, lab, **kwargs)


def test_op_level_max_label_check():
    x, lab = _inputs()
    with pytest.raises(ValueError, match=r"`max_label` must be -1 \(find it\)"):
        torch.ops.blob.dice(x, lab, max_label=-2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(activation="tanh"), r"activation must be one of"),
        (dict(masking="x"), r"masking must be one of"),
        (dict(activation="softmax", masking="official"), r"masking=\"official\" is only defined"),
        (dict(max_label=2.5), r"max_label must be None or an int"),
    ],
)
def test_module_validates_options_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        blobbench.BlobDiceLoss(**kwargs)


def test_backward_op_checks_its_table():
    x, lab = _inputs()
    with pytest.raises(ValueError, match=r"blob.dice \(backward\): `coef` must be the \(B, C, K, 2\) float64 table"):
        torch.ops.blob._dice_backward(
            torch.tensor(1.0), x, lab, torch.zeros(2, 1, 3), lab.new_empty(2, 1, 0), "sigmoid", False
        )
    coef = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    lab[0, 0, 0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"outside the coefficient table"):
        torch.ops.blob._dice_backward(torch.tensor(1.0), x, lab, coef, lab.new_empty(2, 1, 0), "sigmoid", False)


@devices
def test_devices_must_match(device):
    if device == "cpu":
        pytest.skip("needs a second device")
    x, lab = _inputs("cuda")
    with pytest.raises(ValueError, match=r"must be on the same device"):
        blob_dice(x, lab.cpu())


@devices
def test_out_of_range_labels_never_pass_silently(device):
    x, lab = _inputs(device)
    lab[1, 0, 0, 0, 0] = 9
    if device == "cpu":
        with pytest.raises(ValueError, match="max_label"):
            blob_dice(x, lab, max_label=5)
    else:  # sync-free: the loss and the gradient are NaN, documented
        x.requires_grad_(True)
        loss = blob_dice(x, lab, max_label=5)
        loss.backward()
        assert torch.isnan(loss) and torch.isnan(x.grad).any()


def test_label_instances_errors():
    with pytest.raises(ValueError, match="connectivity must be one of"):
        blobbench.label_instances(torch.zeros(1, 1, 4, 4, 4), connectivity=8)
    with pytest.raises(ValueError, match="mask must have shape"):
        blobbench.label_instances(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="class map values must be in"):
        blobbench.label_instances(torch.full((1, 1, 4, 4), 3), num_classes=3)

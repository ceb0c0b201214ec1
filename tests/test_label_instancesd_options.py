"""LabelInstancesd's options: allow_missing_keys, a torch dtype, a string dtype, and the errors
that name the key (the MONAI transform of blobbench/transforms.py)."""

import pytest
import torch

from blobbench import LabelInstancesd


def _label():
    lab = torch.zeros(1, 6, 6, 6, dtype=torch.uint8)
    lab[0, :2, :2, :2] = 1
    lab[0, 4:, 4:, 4:] = 1
    return lab


def test_missing_key_is_skipped_when_allowed_and_raises_otherwise():
    out = LabelInstancesd(["label", "other"], allow_missing_keys=True)({"label": _label()})
    assert set(out) == {"label", "label_instances"} and int(out["label_instances"].max()) == 2
    with pytest.raises(KeyError):
        LabelInstancesd(["label", "other"])({"label": _label()})


@pytest.mark.parametrize("dtype", [torch.int16, "int16", torch.int64, "uint8"])
def test_requested_dtype_is_the_result_dtype(dtype):
    out = LabelInstancesd("label", dtype=dtype)({"label": _label()})["label_instances"]
    want = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    assert out.dtype == want and out.shape == (1, 6, 6, 6)
    assert sorted(out.unique().tolist()) == [0, 1, 2]


def test_auto_dtype_is_the_smallest_that_holds_the_ids():
    assert LabelInstancesd("label")({"label": _label()})["label_instances"].dtype == torch.uint8


def test_non_integer_float_labels_are_refused_naming_the_key():
    lab = _label().float()
    lab[0, 0, 0, 0] = 0.5
    with pytest.raises(ValueError, match=r"^LabelInstancesd: 'seg' must hold integer labels$"):
        LabelInstancesd("seg")({"seg": lab})
    ok = LabelInstancesd("seg")({"seg": _label().float()})["seg_instances"]
    assert int(ok.max()) == 2

"""The benchmark's correctness check (blobbench.bench.bench._check_worker) against planted wrong
implementations.

The other tests of the check assert on the differences the check itself computes, with the real
fused op; a check that compared the fused op with itself, or kept the best crop instead of the
worst, passed them. Here the fused implementation the check loads is replaced by one that is
wrong on a single crop of four by a known amount (1 % on the loss of one crop, +0.01 on every
gradient entry of another), and the check must report exactly that amount; the reference must be
the float64 naive loop, computed here independently.

The worker runs in this process (it is a plain function of a pipe and a task), with its
address-space cap disabled: it would cap the test process.
"""

import numpy as np
import pytest
import torch
from helpers import random_instances

import blobbench
from blobbench.bench import bench

CROPS = 4
LOSS_CROP, GRAD_CROP = 1, 2  # neither the first nor the last crop
NAIVE = {"dice": blobbench.naive_blob_dice, "tversky": blobbench.naive_blob_tversky,
         "dice_ce": blobbench.naive_blob_dice_ce}


class _Conn:
    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(msg)

    def close(self):
        pass


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(11)
    inst = random_instances(rng, (CROPS, 1, 5, 10, 10), 4, empty_prob=0.0)
    x = torch.randn(inst.shape, generator=torch.Generator().manual_seed(11))
    return x, inst


def _crop_of(t, x):
    """Which crop of ``x`` the tensor ``t`` (a (1, C, ...) crop, any dtype) is."""
    for b in range(x.shape[0]):
        if torch.equal(t.detach().float().cpu(), x[b:b + 1]):
            return b
    raise AssertionError("the check called an implementation on an input that is no crop of the case")


def _run(monkeypatch, tmp_path, case, losses, wrong=None, calls=None):
    """The check's result (checks dict) with the fused implementations replaced by ``wrong``."""
    x, inst = case
    path = tmp_path / "case.pt"
    torch.save((x, inst), path)
    monkeypatch.setattr(bench, "_cap_address_space", lambda extra: None)
    real = bench.loss_fn
    fused = {v[1] for v in bench.LOSSES.values()}

    def loss_fn(impl):
        f = real(impl)

        def call(xi, ii):
            b = _crop_of(xi, x)
            if calls is not None:
                calls.append((impl, b, xi.dtype))
            out = f(xi, ii)
            if wrong is not None and impl in fused:
                out = wrong(out, xi, b)
            return out

        return call

    monkeypatch.setattr(bench, "loss_fn", loss_fn)
    conn = _Conn()
    bench._check_worker(conn, {"path": str(path), "devices": ["cpu"], "threads": torch.get_num_threads(),
                               "losses": list(losses)})
    (msg,) = conn.sent
    assert msg["status"] == "ok", msg
    return msg["checks"]


def _planted(out, xi, b):
    if b == LOSS_CROP:  # the loss 1 % too large, its gradient right
        return out + 0.01 * out.detach()
    if b == GRAD_CROP:  # the loss right, every gradient entry 0.01 too large
        return out + 0.01 * (xi - xi.detach()).sum()
    return out


def _reference(case, loss):
    """Per crop: the float64 loop's loss and gradient."""
    x, inst = case
    out = []
    for b in range(x.shape[0]):
        xr = x[b:b + 1].double().requires_grad_(True)
        ref = NAIVE[loss](xr, inst[b:b + 1])
        ref.backward()
        out.append((ref.item(), xr.grad))
    return out


@pytest.mark.parametrize("loss", ["dice", "tversky", "dice_ce"])
def test_check_reports_a_wrong_crop_of_several_by_its_error(monkeypatch, tmp_path, case, loss):
    calls = []
    chk = _run(monkeypatch, tmp_path, case, [loss], _planted, calls)
    assert set(chk) == {f"{loss}/cpu"}
    row = chk[f"{loss}/cpu"]
    assert row["crops"] == CROPS
    # the worst crop's error, the one planted: 1 % on the loss, 0.01 on the gradient
    assert abs(row["loss_rel_diff"] - 0.01) < 1e-4, row
    assert abs(row["grad_max_abs_diff"] - 0.01) < 1e-4, row
    ref = _reference(case, loss)
    assert row["grad_max_abs"] == max(float(g.abs().max()) for _, g in ref)
    # loss and loss_ref are the first crop's: the fused op in float32, the loop in float64
    assert row["loss_ref"] == ref[0][0]
    assert row["loss"] == blobbench.__dict__[{"dice": "blob_dice", "tversky": "blob_tversky",
                                              "dice_ce": "blob_dice_ce"}[loss]](case[0][0:1], case[1][0:1]).item()
    # the reference is the float64 naive loop, the candidate the fused op in float32, each crop once
    naive, fused = (i for i in bench.LOSSES[loss][:2])
    assert sorted(calls) == sorted([(naive, b, torch.float64) for b in range(CROPS)]
                                   + [(fused, b, torch.float32) for b in range(CROPS)])


def test_check_of_a_right_implementation_reports_float32_rounding(monkeypatch, tmp_path, case):
    chk = _run(monkeypatch, tmp_path, case, ["dice", "tversky", "dice_ce"])
    assert set(chk) == {"dice/cpu", "tversky/cpu", "dice_ce/cpu"}
    for row in chk.values():
        assert row["crops"] == CROPS
        assert 0 < row["loss_rel_diff"] < 1e-5 and row["grad_max_abs_diff"] < 1e-5 * row["grad_max_abs"]


def test_check_reports_a_wrong_implementation_on_one_crop_only(monkeypatch, tmp_path, case):
    """Whichever crop is wrong, the report shows it (the worst crop is kept, not the first or the
    last, and a later good crop does not overwrite it)."""
    for bad in range(CROPS):
        chk = _run(monkeypatch, tmp_path, case, ["dice"],
                   lambda out, xi, b, bad=bad: out * 1.01 if b == bad else out)
        assert abs(chk["dice/cpu"]["loss_rel_diff"] - 0.01) < 1e-4, bad
        assert chk["dice/cpu"]["grad_max_abs_diff"] > 1e-3 * chk["dice/cpu"]["grad_max_abs"], bad
        monkeypatch.undo()


def test_check_failure_is_reported_not_raised(monkeypatch, tmp_path, case):
    def broken(out, xi, b):
        raise RuntimeError("planted failure")

    x, inst = case
    torch.save((x, inst), tmp_path / "case.pt")
    monkeypatch.setattr(bench, "_cap_address_space", lambda extra: None)
    real = bench.loss_fn
    monkeypatch.setattr(bench, "loss_fn",
                        lambda impl: (lambda a, b: broken(None, a, b)) if impl == "fused" else real(impl))
    conn = _Conn()
    bench._check_worker(conn, {"path": str(tmp_path / "case.pt"), "devices": ["cpu"],
                              "threads": torch.get_num_threads(), "losses": ["dice"]})
    (msg,) = conn.sent
    assert msg["status"] == "error" and msg["error"] == "RuntimeError: planted failure"


def _plain_dice(x, inst):
    """MONAI's DiceLoss(sigmoid=True) on the foreground mask, written out: mean over (b, c) of
    1 - (2 sum p g + 1e-5) / (sum p + sum g + 1e-5)."""
    p, g = torch.sigmoid(x).flatten(2), (inst > 0).to(x.dtype).flatten(2)
    return (1 - (2 * (p * g).sum(-1) + 1e-5) / (p.sum(-1) + g.sum(-1) + 1e-5)).mean()


def test_benchmark_implementations_compute_what_they_are_named(case):
    """Each name of the timed implementations gives its loss (a timing of the wrong function would
    be reported under the right name)."""
    x, inst = case[0][:2].double(), case[1][:2]
    want = {
        "naive": blobbench.naive_blob_dice(x, inst), "fused": blobbench.blob_dice(x, inst),
        "vectorized": blobbench.vectorized_blob_loss(x, inst), "monai_dice": _plain_dice(x, inst),
        "naive_tversky": blobbench.naive_blob_tversky(x, inst), "fused_tversky": blobbench.blob_tversky(x, inst),
        "naive_dice_ce": blobbench.naive_blob_dice_ce(x, inst), "fused_dice_ce": blobbench.blob_dice_ce(x, inst),
    }
    for impl, value in want.items():
        got = bench.loss_fn(impl)(x, inst)
        assert abs(got.item() - value.item()) <= 1e-12 * abs(value.item()), impl
    assert abs(blobbench.vectorized_blob_loss(x, inst).item() - want["naive"].item()) <= 1e-10
    with pytest.raises(ValueError, match=r"^unknown implementation 'nope'; choose from \["):
        bench.loss_fn("nope")

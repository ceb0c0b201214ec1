"""blobbench.integrations.nnunet: nnU-Net v2's real trainer with blob loss, on the CPU.

One synthetic nnU-Net dataset per session (6 small 3D cases with blobs of two classes), planned
and preprocessed by nnU-Net itself; then the trainers' targets, their loss against the loop
reference per deep-supervision scale, a few training iterations, the lookup by name that
``nnUNetv2_train -tr`` does, and one ``nnUNetv2_train`` run end to end. Marked ``nnunet``; skipped
without nnunetv2 (``pip install -e ".[nnunet]"``). About a minute or two on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason='needs nnunetv2: pip install -e ".[nnunet]"')
pytest.importorskip("monai", reason="the loop reference needs MONAI")

from blobbench.integrations import nnunet as integration  # noqa: E402
from blobbench.reference import naive_blob_dice, naive_blob_dice_ce, naive_cc_dice_ce  # noqa: E402

pytestmark = pytest.mark.nnunet

DATASET_ID = 990
CONFIG = "3d_fullres"


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="module")
def nnunet_dirs(tmp_path_factory):
    """nnUNet_raw/_preprocessed/_results in a temporary folder, the demo dataset planned and preprocessed."""
    root = tmp_path_factory.mktemp("nnunet")
    env = {
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
    }
    saved = {k: os.environ.get(k) for k in [*env, "nnUNet_n_proc_DA", "nnUNet_extTrainer"]}
    os.environ.update(env)
    integration.write_demo_dataset(env["nnUNet_raw"], DATASET_ID)
    subprocess.run(
        [_bin("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", CONFIG, "-np", "1", "-npfp", "1"],
        check=True,
        capture_output=True,
        env={**os.environ, **env},
    )
    # Augmentation in the training process: deterministic enough for a test, and 2 cores.
    os.environ["nnUNet_n_proc_DA"] = "0"
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _make_trainer(cls, root):
    from batchgenerators.utilities.file_and_folder_operations import load_json

    folder = root / "preprocessed" / f"Dataset{DATASET_ID}_BlobDemo"
    plans = load_json(str(folder / "nnUNetPlans.json"))
    plans["continue_training"] = False
    trainer = cls(plans, CONFIG, 0, load_json(str(folder / "dataset.json")), device=torch.device("cpu"))
    trainer.initialize()
    return trainer


@pytest.fixture(scope="module")
def trainer_and_loaders(nnunet_dirs):
    torch.manual_seed(0)
    np.random.seed(0)
    trainer = _make_trainer(integration.nnUNetTrainerBlobDiceCE, nnunet_dirs)
    dl_tr, dl_val = trainer.get_dataloaders()
    return trainer, dl_tr, dl_val


def _ds_weights(n: int) -> np.ndarray:
    # nnU-Net's deep supervision weights, written out: 1/2^i, the lowest scale 0, normalised.
    w = np.array([1 / 2**i for i in range(n)])
    w[-1] = 0
    return w / w.sum()


def test_target_carries_an_instance_map_per_scale(trainer_and_loaders):
    cc3d = pytest.importorskip("cc3d")
    trainer, dl_tr, _ = trainer_and_loaders
    target = next(dl_tr)["target"]
    assert isinstance(target, list) and len(target) == 3  # 3 deep-supervision scales for these plans
    full = target[0]
    assert full.shape[1] == 3 and full.dtype == torch.int16  # class map + 2 instance maps
    for b in range(full.shape[0]):
        for c in (1, 2):
            expected = cc3d.connected_components((full[b, 0] == c).numpy(), connectivity=26)
            np.testing.assert_array_equal(full[b, c].numpy(), expected)
    for scaled in target[1:]:
        # the instance maps are downsampled with the class map (nearest), never relabelled
        nearest = torch.nn.functional.interpolate(full[None].float()[0], scaled.shape[2:], mode="nearest-exact")
        torch.testing.assert_close(scaled, nearest.to(torch.int16))
        for c in (1, 2):
            torch.testing.assert_close(scaled[:, c] > 0, scaled[:, 0] == c)


@pytest.mark.parametrize(
    "cls, reference",
    [
        ("nnUNetTrainerBlobDiceCE", naive_blob_dice_ce),
        ("nnUNetTrainerBlobDice", naive_blob_dice),
    ],
)
def test_trainer_loss_equals_the_loop_reference(nnunet_dirs, cls, reference):
    torch.manual_seed(0)
    trainer = _make_trainer(getattr(integration, cls), nnunet_dirs)
    dl_tr, _ = trainer.get_dataloaders()
    batch = next(dl_tr)
    with torch.no_grad():
        output = trainer.network(batch["data"])
        loss = trainer.loss(output, batch["target"])
    weights = _ds_weights(len(output))
    expected = torch.zeros((), dtype=torch.float64)
    for w, out, tgt in zip(weights, output, batch["target"]):
        if w == 0:
            continue
        # the softmax probabilities of the foreground classes, as sigmoid logits (written independently)
        p = out.double().softmax(1)[:, 1:]
        logits = torch.log(p) - torch.log1p(-p)
        expected = expected + w * reference(logits, tgt[:, 1:].long(), 2.0, 1.0)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def cc_trainer_and_batch(nnunet_dirs):
    torch.manual_seed(0)
    np.random.seed(0)
    trainer = _make_trainer(integration.nnUNetTrainerGlobalCCDiceCE, nnunet_dirs)
    dl_tr, dl_val = trainer.get_dataloaders()
    return trainer, dl_tr, dl_val, next(dl_tr)


def _nearest_instance_ids(instances: np.ndarray, spacing) -> list[set]:
    """Brute force, per voxel: the set of instance ids at the minimal (spacing-weighted) distance."""
    coords = np.stack(np.nonzero(instances), axis=1).astype(np.float64)
    ids = instances[instances > 0]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in instances.shape], indexing="ij"), -1).reshape(-1, instances.ndim)
    d2 = ((((grid[:, None, :] - coords[None]) * np.asarray(spacing)) ** 2).sum(-1))
    best = d2.min(1, keepdims=True)
    return [set(ids[row].tolist()) for row in np.isclose(d2, best, rtol=0, atol=1e-9)]


def test_cc_target_carries_the_voronoi_regions_of_every_scale(cc_trainer_and_batch):
    # The regions of each scale are the Voronoi partition of that scale's own instance maps (brute
    # force here), with distances in full-resolution voxels: spacing 1/s for a scale factor s.
    trainer, _, _, batch = cc_trainer_and_batch
    target = batch["target"]
    scales = trainer._get_deep_supervision_scales()
    assert isinstance(target, list) and len(target) == len(scales) == 3
    for tgt, scale in zip(target, scales):
        assert tgt.shape[1] == 5  # class map, 2 instance maps, 2 region maps
        instances, regions = tgt[:, 1:3], tgt[:, 3:5]
        torch.testing.assert_close(instances > 0, torch.stack([tgt[:, 0] == 1, tgt[:, 0] == 2], 1))
        spacing = [1.0 / f for f in scale]
        for b in range(tgt.shape[0]):
            for c in range(2):
                inst, reg = instances[b, c].numpy(), regions[b, c].numpy()
                if not inst.any():
                    assert not reg.any()
                    continue
                if tgt is not target[-1] and b > 0:
                    continue  # brute force on every plane of the coarsest scale, on one sample elsewhere
                nearest = _nearest_instance_ids(inst, spacing)
                got = reg.reshape(-1).tolist()
                wrong = sum(g not in ok for g, ok in zip(got, nearest))
                assert wrong == 0, f"scale {scale}, b={b}, c={c}: {wrong} voxels not in their nearest instance's region"


def _expected_cc_loss(output, target, alpha: float) -> torch.Tensor:
    """nnU-Net's deep-supervision sum of the loop reference, on the softmax probabilities as logits."""
    expected = torch.zeros((), dtype=torch.float64)
    for w, out, tgt in zip(_ds_weights(len(output)), output, target):
        if w == 0:
            continue
        p = out.double().softmax(1)[:, 1:]
        logits = torch.log(p) - torch.log1p(-p)
        expected = expected + w * naive_cc_dice_ce(logits, tgt[:, 1:3].long(), tgt[:, 3:5].long(), alpha, 1.0)
    return expected


@pytest.mark.parametrize("cls, alpha", [("nnUNetTrainerGlobalCCDiceCE", 1.0), ("nnUNetTrainerCCDiceCE", 0.0)])
def test_cc_trainer_loss_equals_the_loop_reference(nnunet_dirs, cc_trainer_and_batch, cls, alpha):
    _, _, _, batch = cc_trainer_and_batch
    torch.manual_seed(0)
    trainer = _make_trainer(getattr(integration, cls), nnunet_dirs)
    with torch.no_grad():
        output = trainer.network(batch["data"])
        loss = trainer.loss(output, batch["target"])
    expected = _expected_cc_loss(output, batch["target"], alpha)
    assert torch.isfinite(loss) and expected > 0
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)


def test_cc_training_iterations_give_finite_losses(cc_trainer_and_batch):
    trainer, dl_tr, dl_val, _ = cc_trainer_and_batch
    before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.network.train()
    losses = [float(trainer.train_step(next(dl_tr))["loss"]) for _ in range(2)]
    assert all(np.isfinite(losses)), losses
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.network.parameters()))
    trainer.network.eval()
    with torch.no_grad():
        val = trainer.validation_step(next(dl_val))
    assert np.isfinite(val["loss"])
    assert val["tp_hard"].shape == (2,)


def test_training_iterations_give_finite_losses(trainer_and_loaders):
    trainer, dl_tr, dl_val = trainer_and_loaders
    before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.network.train()
    losses = [float(trainer.train_step(next(dl_tr))["loss"]) for _ in range(3)]
    assert all(np.isfinite(losses)), losses
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.network.parameters()))
    trainer.network.eval()
    with torch.no_grad():
        val = trainer.validation_step(next(dl_val))
    assert np.isfinite(val["loss"])
    assert val["tp_hard"].shape == (2,)  # nnU-Net's online Dice saw the class map, not the instances


def test_nnunet_finds_the_trainers_through_nnUNet_extTrainer(nnunet_dirs):
    code = (
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        "for name in ('nnUNetTrainerBlobDiceCE', 'nnUNetTrainerBlobDice', 'nnUNetTrainerGlobalCCDiceCE', "
        "'nnUNetTrainerCCDiceCE'):\n"
        "    c = find(name); print(c.__module__, c.__qualname__)\n"
    )
    env = {**os.environ, "nnUNet_extTrainer": str(integration.trainer_folder())}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    assert "blobbench.integrations.nnunet nnUNetTrainerBlobDiceCE" in out
    assert "blobbench.integrations.nnunet nnUNetTrainerBlobDice\n" in out
    assert "blobbench.integrations.nnunet nnUNetTrainerGlobalCCDiceCE" in out
    assert "blobbench.integrations.nnunet nnUNetTrainerCCDiceCE" in out


def test_install_writes_and_uninstall_removes_the_shim(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(integration, "_nnunet_trainer_dir", lambda: tmp_path)
    integration.main(["install"])
    shim = tmp_path / integration.SHIM_NAME
    assert shim.read_text() == (integration.trainer_folder() / integration.SHIM_NAME).read_text()
    integration.main(["uninstall"])
    assert not shim.exists()
    integration.main(["path"])
    assert capsys.readouterr().out.strip().endswith(str(integration.trainer_folder()))


def test_nnUNetv2_train_runs_a_blob_trainer_end_to_end(nnunet_dirs):
    # The README's example: the documented lookup (nnUNet_extTrainer = blobbench's folder) and the
    # demo trainer through nnU-Net's own command: training, checkpoint and the final validation.
    env = {
        **os.environ,
        "nnUNet_extTrainer": str(integration.trainer_folder()),
        "nnUNet_def_n_proc": "1",  # the final validation's export workers: 1 process, not 8, on 2 cores
    }
    cmd = [
        _bin("nnUNetv2_train"),
        str(DATASET_ID),
        CONFIG,
        "0",
        "-tr",
        "nnUNetTrainerBlobDiceCE_demo",
        "-device",
        "cpu",
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    fold = (
        nnunet_dirs
        / "results"
        / f"Dataset{DATASET_ID}_BlobDemo"
        / f"nnUNetTrainerBlobDiceCE_demo__nnUNetPlans__{CONFIG}"
        / "fold_0"
    )
    assert (fold / "checkpoint_final.pth").exists()
    assert (fold / "validation" / "summary.json").exists()
    assert "train_loss" in run.stdout and "nan" not in run.stdout.split("train_loss", 1)[1].split("\n", 1)[0]

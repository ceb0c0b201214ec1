"""Training-iteration time of nnU-Net's plain trainer against blobbench's blob trainers.

    python benchmarks/nnunet_epoch_time.py [--iters 20] [--device cpu] [--workdir DIR]

Writes the synthetic demo dataset (``blobbench.integrations.nnunet.write_demo_dataset``), plans
and preprocesses it with nnU-Net (3d_fullres), builds ``nnUNetTrainer``,
``nnUNetTrainerBlobDiceCE`` and ``nnUNetTrainerBlobDice`` on the same plans and then times, with
the three interleaved (so that a busy machine slows all of them alike), per iteration: the batch
(loading + augmentation, in the training process: ``nnUNet_n_proc_DA=0``, so the labelling
transform's cost is counted in full rather than hidden in worker processes) and ``train_step``
(forward, loss over the deep-supervision scales, backward, optimiser step). An epoch is
``num_iterations_per_epoch`` (250) such iterations plus validation, so the ratio of the
per-iteration medians is the ratio of epoch times. Also times the labelling transform alone per
sample and the loss alone per call (blob loss against nnU-Net's Dice + CE on the same outputs).

Needs ``blobbench[nnunet]``. Not an asv suite (no ``time_*`` names): run it as a script.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _stats(xs):
    import numpy as np

    xs = np.asarray(xs) * 1e3
    return f"median {np.median(xs):7.1f} ms  (IQR {np.percentile(xs, 25):.1f}-{np.percentile(xs, 75):.1f}, n={len(xs)})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per trainer (after 2 warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=None, help="nnU-Net folders go here (default: a new temp folder)")
    args = parser.parse_args(argv)

    root = Path(args.workdir or tempfile.mkdtemp(prefix="blobbench-nnunet-"))
    env = {
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
    }
    os.environ.update(env)

    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from blobbench.integrations import nnunet as integration

    dataset_id, config = 990, "3d_fullres"
    folder = root / "preprocessed" / f"Dataset{dataset_id}_BlobDemo"
    if not (folder / "nnUNetPlans.json").exists():
        integration.write_demo_dataset(env["nnUNet_raw"], dataset_id)
        plan = Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"
        subprocess.run([str(plan), "-d", str(dataset_id), "-c", config, "-np", "1", "-npfp", "1"], check=True)
    os.environ["nnUNet_n_proc_DA"] = "0"

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    classes = [nnUNetTrainer, integration.nnUNetTrainerBlobDiceCE, integration.nnUNetTrainerBlobDice]
    trainers = {}
    for cls in classes:
        plans = load_json(str(folder / "nnUNetPlans.json"))
        plans["continue_training"] = False
        torch.manual_seed(0)
        trainer = cls(plans, config, 0, load_json(str(folder / "dataset.json")), device=torch.device(args.device))
        trainer.initialize()
        trainer.network.train()
        dl_tr, _ = trainer.get_dataloaders()
        trainers[cls.__name__] = (trainer, dl_tr)

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    data_t = {n: [] for n in trainers}
    step_t = {n: [] for n in trainers}
    for it in range(args.iters + 2):
        for name, (trainer, dl) in trainers.items():
            t0 = time.perf_counter()
            batch = next(dl)
            t1 = time.perf_counter()
            trainer.train_step(batch)
            sync()
            t2 = time.perf_counter()
            if it >= 2:
                data_t[name].append(t1 - t0)
                step_t[name].append(t2 - t1)

    print(f"device {args.device}, torch threads {torch.get_num_threads()}, plans {folder / 'nnUNetPlans.json'}")
    base = np.median(np.add(data_t["nnUNetTrainer"], step_t["nnUNetTrainer"]))
    for name in trainers:
        total = np.add(data_t[name], step_t[name])
        print(f"{name:26s} batch      {_stats(data_t[name])}")
        print(f"{'':26s} train_step {_stats(step_t[name])}")
        print(f"{'':26s} iteration  {_stats(total)}  ratio to nnUNetTrainer {np.median(total) / base:.3f}")

    # The parts alone: the labelling transform per sample, and the loss per call on the same outputs.
    blob_trainer, dl = trainers["nnUNetTrainerBlobDiceCE"]
    plain_trainer, plain_dl = trainers["nnUNetTrainer"]
    labelling = next(
        t for t in dl.data_loader.transforms.transforms if isinstance(t, integration.LabelInstancesTransform)
    )
    batch = next(plain_dl)
    seg = batch["target"][0][0] if isinstance(batch["target"], list) else batch["target"][0]
    label_t = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        labelling(segmentation=seg.clone())
        label_t.append(time.perf_counter() - t0)
    print(f"{'LabelInstancesTransform':26s} per sample {_stats(label_t)}  (patch {tuple(seg.shape[1:])})")

    blob_batch = next(dl)
    with torch.no_grad():
        output = [o.detach().requires_grad_() for o in blob_trainer.network(blob_batch["data"].to(args.device))]
    targets = [t.to(args.device) for t in blob_batch["target"]]
    plain_targets = [t[:, :1] for t in targets]
    for name, loss, tgt in (
        ("nnU-Net DC_and_CE", plain_trainer.loss, plain_targets),
        ("blob DiceCE", blob_trainer.loss, targets),
        ("blob Dice", trainers["nnUNetTrainerBlobDice"][0].loss, targets),
    ):
        fwd_bwd = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            loss(output, tgt).backward()
            sync()
            fwd_bwd.append(time.perf_counter() - t0)
        print(f"{name:26s} loss fwd+bwd, all scales {_stats(fwd_bwd)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

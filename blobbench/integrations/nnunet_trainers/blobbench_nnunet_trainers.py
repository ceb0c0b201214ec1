# nnU-Net imports this file as a top-level module when nnUNet_extTrainer names this folder, or as a
# module of its trainer folder when `python -m blobbench.integrations.nnunet install` copied it
# there. It only re-exports the trainers, which live in blobbench. nnU-Net imports every module of
# its trainer folder whatever trainer it looks for, so a broken blobbench must not break the lookup
# of nnU-Net's own trainers: it is reported as a warning instead.
import warnings

try:
    from blobbench.integrations.nnunet import (  # noqa: F401
        nnUNetTrainerBlobDice,
        nnUNetTrainerBlobDiceCE,
        nnUNetTrainerBlobDiceCE_demo,
        nnUNetTrainerCCDiceCE,
        nnUNetTrainerGlobalCCDiceCE,
    )
except ImportError as e:  # pragma: no cover - only when blobbench is broken or gone
    warnings.warn(f"blobbench's nnU-Net trainers are unavailable: {e}", stacklevel=1)

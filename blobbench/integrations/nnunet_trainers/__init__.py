"""The folder that ``nnUNet_extTrainer`` points at (see :mod:`blobbench.integrations.nnunet`).

nnU-Net imports every module of this folder as a top-level module while it searches for a trainer
by name, so the folder holds one shim module with a name no other package uses.
"""

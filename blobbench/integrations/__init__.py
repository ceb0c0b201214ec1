"""Integrations of the blob losses into training frameworks.

Each submodule imports its framework when it is imported itself, never from ``import blobbench``:
:mod:`blobbench.integrations.nnunet` (nnU-Net v2 trainers, extra ``blobbench[nnunet]``).
"""

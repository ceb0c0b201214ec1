"""Optional dependencies: imported when a feature needs them, with an error naming the extra.

The core (the losses, ``instance_stats``, the metrics on instance maps) needs torch and numpy
only. cc3d (labelling), MONAI (the transform, the loop references) and the benchmark app's
libraries are extras; see the README's install section.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that says which extra installs it.

    Args:
        module: the module to import, e.g. ``"cc3d"`` or ``"monai.losses"``.
        extra: the blobbench extra that provides it, e.g. ``"instances"``.
        feature: what needs it, for the message, e.g. ``"label_instances"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f'{feature} needs {module.split(".")[0]}, which is not installed: pip install "blobbench[{extra}]"'
        ) from e

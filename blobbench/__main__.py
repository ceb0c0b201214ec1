"""``python -m blobbench`` and the ``blobbench`` console script: the command lives in
:mod:`blobbench.bench.cli`; this shim keeps the entry point ``blobbench.__main__:main`` and says
which extra to install when the command's dependencies are missing."""

from __future__ import annotations

import sys

# What every run of the command imports (matplotlib and nibabel are optional: no plots, no
# NIfTI files without them, and the command says so).
_NEEDS = ("tqdm", "monai", "cc3d")


def main(argv=None) -> int:
    from ._optional import require

    try:
        for module in _NEEDS:
            require(module, "bench", "the blobbench command")
    except ImportError as e:
        print(f"blobbench: {e}", file=sys.stderr)
        return 2
    from .bench.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())

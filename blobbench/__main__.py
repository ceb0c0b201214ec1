"""``python -m blobbench`` and the ``blobbench`` console script: the command lives in
:mod:`blobbench.bench.cli`; this shim keeps the entry point ``blobbench.__main__:main``."""

import sys

from .bench.cli import main

if __name__ == "__main__":
    sys.exit(main())

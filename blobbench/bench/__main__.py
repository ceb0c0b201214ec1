"""``python -m blobbench.bench``: the same command as ``python -m blobbench``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

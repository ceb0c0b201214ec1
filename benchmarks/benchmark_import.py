"""asv suite: the cost of ``import blobbench`` (issue 12: at most 0.5 s on top of ``import torch``).

``timeraw_*`` benchmarks run their code in a fresh interpreter each time (asv's way of timing
imports); compare ``timeraw_import_torch_blobbench`` with ``timeraw_import_torch``.
``track_optional_modules_loaded`` counts the optional dependencies (monai, nibabel, matplotlib,
cc3d) that ``import blobbench`` loads: it must stay 0.

    asv run --python=same --bench ImportSuite
"""

import subprocess
import sys


class ImportSuite:
    timeout = 120

    def timeraw_import_torch(self):
        return "import torch"

    def timeraw_import_torch_blobbench(self):
        return "import torch, blobbench"

    def track_optional_modules_loaded(self):
        code = "import sys, blobbench; print(sum(m in sys.modules for m in ('monai', 'nibabel', 'matplotlib', 'cc3d')))"
        return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)

    track_optional_modules_loaded.unit = "modules"

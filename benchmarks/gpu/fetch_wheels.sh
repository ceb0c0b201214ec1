#!/usr/bin/env bash
# The wheels blobbench's GPU check needs on an offline GPU machine, into ./.whl (git-ignored).
# Run from the repository root on the development machine, before the call that carries `.whl`:
#
#   bash benchmarks/gpu/fetch_wheels.sh
#
# The GPU machines (../shared/device/README.md) have Python 3.12, torch, numpy, pytest,
# pytest-benchmark, ninja, pybind11 and setuptools, and no package registry. The check needs
# four packages more:
#   connected-components-3d  blobbench.label_instances (every profile's instances)
#   monai                    the oracle loops and the MONAI baselines of the command
#   scipy                    blobbench.voronoi_regions (the CC losses without `regions`) and the
#                            test modules that import it (a collection error fails every test)
#   tqdm                     the command's progress
# ../shared/device/fetch-wheels.sh fetches matplotlib and its dependencies (plots; the check runs
# with --no-plots) and nibabel (label files) instead of scipy, and the working tree, the carried
# folder included, may be at most 64 MiB: with scipy's 35 MB next to them it would not fit.
# This folder is emptied first, so nothing else travels along. scipy < 1.18: 1.17 runs with numpy
# 1.26.4 to 2.x, 1.18 needs numpy >= 2.0, and the machine's numpy version is not known here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PYTHON:-python3}
mkdir -p .whl  # .gitignore ignores it
rm -f .whl/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl connected-components-3d monai "scipy<1.18" tqdm "$@"
ls -1 .whl
# what travels: tracked and untracked files that git does not ignore, plus this folder
# (a tracked file deleted from the working tree does not travel: stat skips it)
tree_bytes=$( { git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null || true; } \
  | awk '{ s += $1 } END { print s + 0 }')
whl_bytes=$(du -sb .whl | cut -f1)
total_mib=$(( (tree_bytes + whl_bytes) / 1048576 ))
echo "working tree ${tree_bytes} bytes + .whl ${whl_bytes} bytes = ${total_mib} MiB (the limit is 64 MiB)"
if [ "$total_mib" -ge 60 ]; then
  echo "too close to the 64 MiB a call may carry: ignore or remove untracked files" >&2
  exit 1
fi

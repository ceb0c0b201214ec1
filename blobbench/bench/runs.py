"""Run folders: every ``blobbench`` run writes a new folder, ``latest`` points at the newest.

``<out>/<UTC time>-<git revision>-<machine>/`` (e.g. ``20261127-031500-b48e0d5-myhost``, with
``+dirty`` after the revision when the working tree has uncommitted changes), never an existing
one; ``<out>/latest`` is a relative symbolic link to it (a ``LATEST`` text file with its name
where the file system has no links). ``blobbench compare`` and ``blobbench report`` accept a
``result.json``, a run folder, or a folder holding ``latest``.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from pathlib import Path

__all__ = ["git_revision", "machine_slug", "run_id", "new_run_dir", "update_latest", "resolve_result"]


def git_revision(path=None) -> str:
    """Short git revision of the checkout holding ``path`` (default: blobbench's), ``+dirty`` when
    tracked files differ from it; ``nogit`` outside a git checkout."""
    if path is None:
        import blobbench

        path = os.path.dirname(os.path.abspath(blobbench.__file__))
    try:
        rev = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode != 0:
            return "nogit"
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "nogit"


def _slug(s: str, n: int = 24) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower()[:n].strip("-") or "unknown"


def machine_slug(gpu_name: str | None = None) -> str:
    """The machine in a folder name: host name, and the GPU's name when CUDA was measured."""
    s = _slug(platform.node() or "host")
    if gpu_name:
        s += "-" + _slug(gpu_name.replace("NVIDIA", ""), 16)
    return s


def run_id(revision: str, machine: str, when: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if when is None else when))
    return f"{stamp}-{revision}-{machine}"


def new_run_dir(parent, name: str) -> Path:
    """Create ``parent/name`` (``name-2``, ``-3``, ... if taken): never reuses an existing folder."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        path = parent / (name if k == 1 else f"{name}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder name for {parent / name}")


def update_latest(parent, run_dir) -> Path:
    """Point ``parent/latest`` at ``run_dir`` (atomically replaced); returns the pointer's path."""
    parent, run_dir = Path(parent), Path(run_dir)
    link = parent / "latest"
    tmp = parent / f".latest-{os.getpid()}"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(run_dir.name, tmp, target_is_directory=True)
        os.replace(tmp, link)
        return link
    except OSError:
        (parent / "LATEST").write_text(run_dir.name + "\n")
        return parent / "LATEST"


def resolve_result(path) -> Path:
    """The ``result.json`` meant by ``path``: the file itself, a run folder's, or the latest run's."""
    p = Path(path)
    if p.is_file():
        return p
    for cand in (p / "result.json", p / "latest" / "result.json"):
        if cand.is_file():
            return cand
    if (p / "LATEST").is_file():
        cand = p / (p / "LATEST").read_text().strip() / "result.json"
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"{path}: no result.json there (give a result.json, a run folder or a folder with "
                            f"'latest')")

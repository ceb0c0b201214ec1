"""Build of blobbench and its C++/CUDA extension ``blobbench._C``.

CUDA sources are compiled when a CUDA toolkit (nvcc) and a CUDA-enabled torch are present,
or when ``FORCE_CUDA=1``; ``USE_CUDA=0`` forces a CPU-only build. With no GPU visible (a CI
machine, a container build) an architecture list is chosen for you unless
``TORCH_CUDA_ARCH_LIST`` is set. Install with ``pip install --no-build-isolation -e .`` so
the extension is built against the torch you run.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """CUDA_HOME, else the standard toolkit location, else nvcc's folder on PATH.

    An ``nvcc`` on PATH can be a wrapper script outside the toolkit, which makes torch look
    for headers in the wrong place, so the standard location wins over PATH.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ.setdefault("CUDA_HOME", _cuda_home)

import torch  # noqa: E402  (CUDA_HOME must be set before cpp_extension reads it)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    use = os.environ.get("USE_CUDA", "auto").lower()
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    if use in ("0", "false", "no", "off"):
        return False
    have_nvcc = bool(_cuda_home) and os.path.exists(os.path.join(_cuda_home, "bin", "nvcc"))
    if use in ("1", "true", "yes", "on"):
        if not have_nvcc or torch.version.cuda is None:
            sys.exit("USE_CUDA=1 but no nvcc (CUDA_HOME) or no CUDA-enabled torch was found")
        return True
    return have_nvcc and torch.version.cuda is not None


def _pip_cuda_includes():
    """Headers of the pip CUDA wheels (torch's headers include e.g. cusparse.h from there)."""
    dirs = []
    for entry in sys.path:
        dirs += sorted(glob.glob(os.path.join(entry, "nvidia", "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(entry, "nvidia", "cusparse", "include")))
    seen, out = set(), []
    for d in dirs:
        if os.path.isdir(d) and d not in seen:
            seen.add(d)
            out.append(d)
    return out


def _extension():
    # csrc/common: the library block and the machinery every operator family shares; csrc/ops: one
    # family per file group (blob_*, cc_*); then autograd and the CPU kernels (docs/design.md 5.1).
    sources = []
    for folder in ("common", "ops", "autograd", "cpu"):
        sources += sorted(glob.glob(os.path.join("csrc", folder, "*.cpp")))
    # -fno-trapping-math: lets GCC if-convert the clamps of the exp polynomial so the activation
    # loops vectorise (the kernels never rely on floating-point exception flags).
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    # -g0: Python's own CFLAGS (pyenv, distributions) carry -g, and debug info for the ATen
    # templates costs ~40 % of each C++ file's compile time (glue.cpp: 125 s of CPU with -g,
    # 74 s without; the object 17.8 MB against 0.4 MB) without changing the code generated.
    # BLOBBENCH_DEBUG_INFO=1 keeps it (for gdb).
    if os.environ.get("BLOBBENCH_DEBUG_INFO", "0") != "1":
        cxx_flags.append("-g0")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to detect: sm_80 code runs on all Ampere and Ada cards, sm_90 on Hopper,
            # and PTX for newer cards.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        print(
            f"blobbench: building with CUDA ({_cuda_home}, arch "
            f"{os.environ.get('TORCH_CUDA_ARCH_LIST', 'detected')}): {len(sources)} sources, the CPU "
            "kernels compiled for two ISAs; about 25-30 minutes on 2 cores, the CUDA files most of it",
            file=sys.stderr,
            flush=True,
        )
        return CUDAExtension(
            "blobbench._C",
            sources,
            include_dirs=include_dirs + _pip_cuda_includes(),
            define_macros=[("BLOB_WITH_CUDA", "1")],
            # --diag_suppress=3189: torch's headers use "module" as an identifier, which nvcc (C++20
            # modules) warns about once per translation unit ("parsed as an identifier").
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
                                                           "-Xcudafe", "--diag_suppress=3189"]},
            extra_link_args=["-fopenmp"],
        )
    print(
        f"blobbench: building the CPU-only extension: {len(sources)} sources, the CPU kernels "
        "compiled for two ISAs; 7-16 minutes on 2 cores",
        file=sys.stderr,
        flush=True,
    )
    return CppExtension("blobbench._C", sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])


# ninja prints each finished step with its count and the elapsed time (shown with pip -v).
os.environ.setdefault("NINJA_STATUS", "[%f/%t, %es] ")

_ANNOUNCE = ('{ echo "blobbench: compiling $in (started $$(date +%T))" >/proc/$$PPID/fd/1; } 2>/dev/null; ')


def _announcing(write_ninja_file):
    """torch's ``_write_ninja_file``, then each compile rule of the build.ninja it wrote is made to
    say which source it starts compiling. ninja shows a command's output only when it finishes
    (a CUDA file takes minutes), so the line goes straight to ninja's own stdout (``$PPID`` is
    ninja; Linux's /proc; elsewhere it is silently skipped)."""
    def write(path, *args, **kwargs):
        write_ninja_file(path, *args, **kwargs)
        with open(path) as fh:
            lines = fh.read().split("\n")
        rule = None
        for i, line in enumerate(lines):
            if line.startswith("rule "):
                rule = line.split()[1]
            elif rule in ("compile", "cuda_compile") and line.startswith("  command = "):
                lines[i] = "  command = " + _ANNOUNCE + line[len("  command = "):]
        with open(path, "w") as fh:
            fh.write("\n".join(lines))
    return write


class _BuildExtension(BuildExtension):
    """torch's BuildExtension (ninja), saying which source it compiles when the compiler starts."""

    def build_extensions(self):
        import torch.utils.cpp_extension as cpp_extension

        original = cpp_extension._write_ninja_file
        cpp_extension._write_ninja_file = _announcing(original)
        try:
            super().build_extensions()
        finally:
            cpp_extension._write_ninja_file = original


setup(
    packages=find_packages(include=["blobbench", "blobbench.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExtension.with_options(use_ninja=True)},
)

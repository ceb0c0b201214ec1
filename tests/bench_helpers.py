"""Helpers of the benchmark-suite tests."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def asv_suite():
    """``benchmarks/benchmark_blob.py`` as a module (the repository root is not on sys.path)."""
    spec = importlib.util.spec_from_file_location("benchmark_blob", ROOT / "benchmarks" / "benchmark_blob.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

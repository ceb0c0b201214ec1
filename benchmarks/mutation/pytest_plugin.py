"""pytest plugin for the mutation runs (``-p benchmarks.mutation.pytest_plugin``, set in
pyproject's [tool.mutmut]; never loaded by the test suite itself).

1. torch.compile under mutmut's stats run. There mutmut records, in every call of a mutated
   function, which test called it; the record sets a ``ContextVar``, which Dynamo cannot trace,
   so every ``fullgraph=True`` test would fail. While Dynamo traces bytecode
   (``is_dynamo_compiling``), the trampoline is told that no mutant is active (it calls the
   original function, unrecorded); the same tests' eager calls of the same functions are still
   recorded, and so are the calls made while AOT autograd traces the graph (plain Python: the
   autograd of the private forward ops runs only there, and must be attributed to the compile
   tests). Mutant runs (one mutant active) trace the trampolines unchanged.

2. No compile caches. tests/conftest.py gives each pytest session a fresh inductor cache folder,
   but mutmut runs every mutant in a process forked from one session: the FX graph and
   AOTAutograd caches written by the clean run would be replayed for a mutant of Python code
   that only runs while torch.compile traces (the autograd of the private forward ops in
   blobbench/_ops.py), and hide it. Both caches are off in mutation runs.

3. Thinned seed sweeps. The oracle tests run one random case per seed, up to 220 seeds per test
   function; a surviving mutant of a hot function (``blob_dice``) would rerun them all. With
   ``BLOBBENCH_MUTATION_THIN=N`` (default 8) a test function with at least 20 ``seed`` cases keeps
   every N-th of them (20 to 28 cases). The thinned set is a subset of the suite: what it kills,
   the suite kills. ``BLOBBENCH_MUTATION_THIN=1`` runs every seed (benchmarks/mutation/run.sh
   reruns the survivors so).
"""

import os
import torch

# asv's discovery imports every module under benchmarks/, this one included, where mutmut is not
# installed (CI's environment): the import must not fail there. The patch below is made at import
# time, as before, because the mutated modules are imported while pytest loads the conftests,
# before any pytest_configure hook runs.
try:
    from mutmut.mutation import trampoline
except ModuleNotFoundError:
    trampoline = None

if trampoline is not None:
    _get = trampoline.get_mutant_under_test

    def _get_mutant_under_test() -> str:
        name = _get()
        if name == "stats" and torch.compiler.is_dynamo_compiling():
            return ""
        return name

    trampoline.get_mutant_under_test = _get_mutant_under_test


def pytest_configure(config):
    if trampoline is None:
        raise RuntimeError(
            "benchmarks.mutation.pytest_plugin is for mutation runs and needs mutmut "
            "(pip install mutmut==3.8.1; then bash benchmarks/mutation/run.sh)"
        )
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False

THIN = int(os.environ.get("BLOBBENCH_MUTATION_THIN", "8"))
MIN_SWEEP = 20


def _seed_sweep(item):
    """(index of the item's seed, number of seeds of its test function), or None."""
    spec = getattr(item, "callspec", None)
    if spec is None or "seed" not in spec.indices:
        return None
    for mark in item.iter_markers("parametrize"):
        if mark.args and mark.args[0] == "seed":
            return spec.indices["seed"], len(list(mark.args[1]))
    return None


def pytest_collection_modifyitems(config, items):
    """Keeps every THIN-th seed of the large sweeps, by the seed's index in its sweep (so a run
    of some listed test ids selects the same cases as a run of whole files)."""
    if THIN <= 1:
        return
    keep, drop = [], []
    for item in items:
        sweep = _seed_sweep(item)
        (drop if sweep and sweep[1] >= MIN_SWEEP and sweep[0] % THIN else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep

"""The opt-in switch of the CUDA paths not yet verified on a GPU (docs/design.md section 5.6).

The switch is host code: it runs, and is tested, on any machine."""

import pytest
import torch

import blobbench  # noqa: F401  (loads the operators)

NAMES = ["vector_loads", "coop_forward", "split_forward", "fused_dice_ce", "softmax_inf", "parallel_finalize"]


def enabled(name):
    return torch.ops.blob._cuda_path_enabled(name)


def test_every_path_is_off_by_default(monkeypatch):
    monkeypatch.delenv("BLOBBENCH_CUDA_PATHS", raising=False)
    assert [enabled(n) for n in NAMES] == [False] * len(NAMES)
    monkeypatch.setenv("BLOBBENCH_CUDA_PATHS", "")
    assert [enabled(n) for n in NAMES] == [False] * len(NAMES)


def test_all_turns_every_path_on_but_the_forced_fallback(monkeypatch):
    # split_forward only forces coop_forward's two-launch fallback: "all" must run the one launch.
    monkeypatch.setenv("BLOBBENCH_CUDA_PATHS", "all")
    assert [enabled(n) for n in NAMES] == [n != "split_forward" for n in NAMES]
    monkeypatch.setenv("BLOBBENCH_CUDA_PATHS", "all,split_forward")
    assert [enabled(n) for n in NAMES] == [True] * len(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_one_name_turns_on_that_path_only(monkeypatch, name):
    monkeypatch.setenv("BLOBBENCH_CUDA_PATHS", name)
    assert [enabled(n) for n in NAMES] == [n == name for n in NAMES]


def test_a_list_with_spaces_and_empty_items(monkeypatch):
    monkeypatch.setenv("BLOBBENCH_CUDA_PATHS", " coop_forward ,, vector_loads,")
    assert [enabled(n) for n in NAMES] == [n in ("coop_forward", "vector_loads") for n in NAMES]


def test_the_variable_is_read_at_each_call(monkeypatch):
    monkeypatch.setenv("BLOBBENCH_CUDA_PATHS", "fused_dice_ce")
    assert enabled("fused_dice_ce")
    monkeypatch.setenv("BLOBBENCH_CUDA_PATHS", "softmax_inf")
    assert not enabled("fused_dice_ce")


def test_an_unknown_name_in_the_variable_is_an_error(monkeypatch):
    monkeypatch.setenv("BLOBBENCH_CUDA_PATHS", "coop_forward,coop_fwd")
    with pytest.raises(ValueError, match=r"BLOBBENCH_CUDA_PATHS: unknown CUDA path 'coop_fwd'.*vector_loads"):
        enabled("coop_forward")


def test_an_unknown_name_asked_for_is_an_error(monkeypatch):
    monkeypatch.delenv("BLOBBENCH_CUDA_PATHS", raising=False)
    with pytest.raises(ValueError, match=r"`name` must be one of vector_loads, .*got 'fast'"):
        enabled("fast")

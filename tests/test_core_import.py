"""The core is light: ``import blobbench`` needs torch only, and the features with optional
dependencies say which extra installs them. (Import *time* is tracked in the benchmark suite.)"""

import subprocess
import sys

import pytest
import torch

import blobbench

OPTIONAL = ("monai", "nibabel", "matplotlib", "cc3d")


def _loaded_after(code: str) -> list:
    script = f"import sys\n{code}\nprint(' '.join(m for m in {OPTIONAL!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_import_loads_no_optional_dependency():
    assert _loaded_after("import blobbench") == []


def test_core_features_load_no_optional_dependency():
    # The losses, their statistics and the metrics on instance maps run on torch alone.
    code = """
import torch, blobbench
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 2, 6, 6, generator=g, requires_grad=True)
inst = torch.randint(0, 4, (2, 2, 6, 6), generator=g)
(blobbench.blob_dice(x, inst, spatial_dims=2) + blobbench.blob_tversky(x, inst, spatial_dims=2)).backward()
blobbench.BlobDiceLoss(spatial_dims=2)(x, inst)
blobbench.instance_stats(x, inst)
blobbench.blob_metrics(inst, inst, spatial_dims=2)
blobbench.vectorized_blob_loss(x, inst)
"""
    assert _loaded_after(code) == []


def test_lazy_names_resolve_to_their_modules():
    from blobbench import reference, transforms

    assert blobbench.naive_blob_dice is reference.naive_blob_dice
    assert blobbench.vectorized_blob_loss is reference.vectorized_blob_loss
    assert blobbench.LabelInstancesd is transforms.LabelInstancesd
    assert set(blobbench.__all__) <= set(dir(blobbench))
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        _ = blobbench.not_a_name


def _block(monkeypatch, *modules):
    """Make ``import m`` fail for each module, as if it were not installed."""
    for m in list(sys.modules):
        if any(m == b or m.startswith(b + ".") for b in modules):
            monkeypatch.delitem(sys.modules, m)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def test_label_instances_without_cc3d_names_the_extra(monkeypatch):
    _block(monkeypatch, "cc3d")
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ImportError, match=r'label_instances needs cc3d.*pip install "blobbench\[instances\]"'):
        blobbench.label_instances(mask, spatial_dims=2)
    # The metrics label bool masks with cc3d; instance maps need no labelling.
    with pytest.raises(ImportError, match=r"blobbench\[instances\]"):
        blobbench.blob_metrics(mask, mask, spatial_dims=2)
    assert blobbench.blob_metrics(mask.long(), mask.long(), spatial_dims=2)["f1"].item() == 1.0


def test_naive_references_without_monai_name_the_extra(monkeypatch):
    _block(monkeypatch, "monai")
    x, inst = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4, dtype=torch.long)
    with pytest.raises(ImportError, match=r'naive_blob_dice needs monai.*pip install "blobbench\[monai\]"'):
        blobbench.naive_blob_dice(x, inst)
    with pytest.raises(ImportError, match=r'naive_blob_tversky needs monai.*"blobbench\[monai\]"'):
        blobbench.naive_blob_tversky(x, inst)


def test_transform_without_monai_names_the_extra(monkeypatch):
    _block(monkeypatch, "monai")
    monkeypatch.delitem(sys.modules, "blobbench.transforms", raising=False)
    monkeypatch.delitem(vars(blobbench), "LabelInstancesd", raising=False)
    monkeypatch.delattr(blobbench, "transforms", raising=False)
    with pytest.raises(ImportError, match=r'LabelInstancesd needs monai.*pip install "blobbench\[monai\]"'):
        _ = blobbench.LabelInstancesd


def test_library_does_not_import_the_oracle():
    # The references import the library (the closed form), never the reverse.
    code = "import blobbench, blobbench.stats, blobbench.closed_form, blobbench.metrics, blobbench.instances"
    script = f"import sys\n{code}\nprint('blobbench.reference' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_command_without_its_extra_names_it(monkeypatch, capsys):
    from blobbench.__main__ import main

    _block(monkeypatch, "tqdm")
    assert main(["--help"]) == 2
    err = capsys.readouterr().err
    assert 'the blobbench command needs tqdm, which is not installed: pip install "blobbench[bench]"' in err


def test_command_entry_point_runs_the_cli(capsys):
    from blobbench.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "usage: blobbench" in capsys.readouterr().out

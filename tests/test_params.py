"""Presets: resolution order, validation before compute, notebook setup semantics."""
from pathlib import Path

import nbformat
import pytest

from realfake_utils import params
from realfake_utils.params import ParamError, resolve, setup_notebook


def make_notebook(path: Path, source: str, body: str = "x = 1") -> None:
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_code_cell(body)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def world(tmp_path, monkeypatch):
    nbs, presets = tmp_path / "notebooks", tmp_path / "params"
    nbs.mkdir()
    presets.mkdir()
    make_notebook(nbs / "00_alpha.ipynb", 'preset = "digits"\nrun_dir = ""\nseed = 0\nimage_size = 16\nlr = 0.1')
    make_notebook(nbs / "01_beta.ipynb",
                  'preset = "digits"\nrun_dir = ""\nimage_size = 16\nsteps = 10\nuse_dm = True\nks = [1, 2]')
    (presets / "digits.yaml").write_text("description: default\nshared: {}\n")
    (presets / "small.yaml").write_text(
        "extends: digits\ndescription: small\nshared:\n  image_size: 8\n01_beta:\n  steps: 2\n")
    (presets / "_base.yaml").write_text("shared:\n  image_size: 4\n")
    monkeypatch.setattr(params, "NOTEBOOK_DIR", nbs)
    monkeypatch.setattr(params, "PRESET_DIR", presets)
    monkeypatch.delenv("REALFAKE_RUNNER", raising=False)
    monkeypatch.delenv("REALFAKE_PRESET", raising=False)
    monkeypatch.delenv("REALFAKE_DATA", raising=False)
    return tmp_path


def test_resolution_order_and_types(world):
    out = resolve("small", {"lr": 1})
    assert out["00_alpha"] == {"preset": "small", "run_dir": "", "seed": 0, "image_size": 8, "lr": 1.0}
    assert isinstance(out["00_alpha"]["lr"], float)
    assert out["01_beta"]["steps"] == 2 and out["01_beta"]["image_size"] == 8
    assert resolve("small", {"steps": 5})["01_beta"]["steps"] == 5  # override beats section


def test_extends_chain_and_listing(world):
    (world / "params" / "tiny.yaml").write_text("extends: small\n01_beta:\n  ks: [1]\n")
    out = resolve("tiny")
    assert out["01_beta"]["steps"] == 2 and out["01_beta"]["ks"] == [1]
    assert "_base" not in params.list_presets() and "tiny" in params.list_presets()


@pytest.mark.parametrize("yaml_text, fragment", [
    ("01_beta:\n  stepz: 3\n", "'stepz' is not a parameter of notebook 01_beta"),
    ("shared:\n  imag_size: 3\n", "shared parameter 'imag_size'"),
    ("02_gamma:\n  steps: 3\n", "section '02_gamma' is not a notebook"),
    ("01_beta:\n  steps: ten\n", "parameter 'steps' of notebook 01_beta expects int"),
    ("01_beta:\n  use_dm: 1\n", "parameter 'use_dm' of notebook 01_beta expects bool"),
    ("extends: nope\n", "unknown preset 'nope'"),
])
def test_bad_presets_are_refused_with_the_key_named(world, yaml_text, fragment):
    (world / "params" / "bad.yaml").write_text(yaml_text)
    with pytest.raises(ParamError, match=fragment.replace("(", r"\(")):
        resolve("bad")


def test_bad_overrides(world):
    with pytest.raises(ParamError, match="'lr_rate' is not a parameter of any notebook"):
        resolve("digits", {"lr_rate": 0.1})
    with pytest.raises(ParamError, match="'lr' of notebook 00_alpha expects float"):
        resolve("digits", {"lr": "fast"})
    with pytest.raises(ParamError, match="unknown preset 'digitz'.*digits"):
        resolve("digitz")
    with pytest.raises(ParamError, match="key=value"):
        params.parse_overrides(["steps"])
    assert params.parse_overrides(["ks=[1, 5]", "lr=0.5", "run_dir="]) == {"ks": [1, 5], "lr": 0.5, "run_dir": ""}


def test_setup_notebook_applies_preset_but_keeps_edits(world, monkeypatch):
    ns = {"preset": "small", "run_dir": "", "image_size": 16, "steps": 7, "use_dm": True, "ks": [1, 2]}
    out = setup_notebook(ns, "01_beta")
    assert out["image_size"] == 8  # left at the default: takes the preset's value
    assert out["steps"] == 7       # edited in the cell: kept
    monkeypatch.setenv("REALFAKE_PRESET", "small")
    ns = {"preset": "digits", "run_dir": "", "image_size": 16, "steps": 10, "use_dm": True, "ks": [1, 2]}
    assert setup_notebook(ns, "01_beta")["steps"] == 2 and ns["preset"] == "small"
    monkeypatch.setenv("REALFAKE_RUNNER", "1")  # injected by the runner: untouched
    ns = {"preset": "digits", "run_dir": "", "image_size": 16, "steps": 10, "use_dm": True, "ks": [1, 2]}
    assert setup_notebook(ns, "01_beta")["steps"] == 10


def test_setup_notebook_refuses_a_wrong_type_in_the_cell(world):
    ns = {"preset": "digits", "run_dir": "", "image_size": "big", "steps": 10, "use_dm": True, "ks": [1]}
    with pytest.raises(ParamError, match="'image_size'"):
        setup_notebook(ns, "01_beta")


def test_data_root_from_environment(world, monkeypatch):
    make_notebook(world / "notebooks" / "02_gamma.ipynb", 'preset = "digits"\ndata_root = ""')
    monkeypatch.setenv("REALFAKE_DATA", "/data/eurosat")
    assert resolve("digits")["02_gamma"]["data_root"] == "/data/eurosat"
    assert resolve("digits", {"data_root": "/x"})["02_gamma"]["data_root"] == "/x"


def test_every_shipped_preset_resolves():
    """The real presets in params/ against the real notebooks: no typo, no wrong type."""
    names = list(params.list_presets())
    assert {"smoke", "digits"} <= set(names)
    for name in names:
        out = resolve(name)
        assert set(out) == set(params.notebook_names())


def test_a_child_shared_value_beats_a_parent_section(world):
    (world / "params" / "child.yaml").write_text("extends: small\nshared:\n  steps: 9\n")
    assert resolve("child")["01_beta"]["steps"] == 9  # small.yaml's 01_beta: steps: 2 is older

"""Presets: resolution order, validation before compute, notebook setup semantics."""
import re
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


# ------------------------------------------------------------------------- broken preset files
@pytest.mark.parametrize("text, fragment", [
    ("shared:\n  image_size: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "a preset is a mapping of sections .* not a list"),
])
def test_a_broken_preset_file_is_named_and_does_not_break_the_others(world, text, fragment):
    (world / "params" / "broken.yaml").write_text(text)
    listing = params.list_presets()
    assert listing["small"] == "small" and listing["broken"].startswith("BROKEN: ")
    assert "broken.yaml" in listing["broken"] and "\n" not in listing["broken"]
    assert resolve("small")["01_beta"]["steps"] == 2          # other presets still resolve
    with pytest.raises(ParamError, match=f"broken.yaml.*{fragment}"):
        resolve("broken")
    (world / "params" / "child.yaml").write_text("extends: broken\n")
    with pytest.raises(ParamError, match="broken.yaml"):     # through extends: the broken file is named
        resolve("child")
    with pytest.raises(ParamError, match="unknown preset 'nosuch'") as err:
        resolve("nosuch")
    assert "broken" not in str(err.value).split("Known presets:")[1].split(" (files in")[0]


def test_malformed_override_names_the_key():
    with pytest.raises(ParamError, match=r"-p scale_k=\[1,2: the value of 'scale_k' is not valid YAML"):
        params.parse_overrides(["scale_k=[1,2"])


# ------------------------------------------------------------------------- the schema (params/_schema.yaml)
def test_every_notebook_parameter_has_a_schema_entry_of_its_type():
    """When you add or rename a notebook parameter, add its entry to params/_schema.yaml."""
    schema = params.load_schema()
    missing, wrong = [], []
    for nb in params.notebook_names():
        for key, default in params.notebook_defaults(nb).items():
            entry = params.schema_entry(nb, key, schema)
            t = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}.get(
                type(default), "any")
            if entry is None:
                missing.append(f"{key}: {{type: {t}}}   # {nb}, default {default!r}")
            elif not params._is(default, entry.get("type", "any")):
                wrong.append(f"{key}: type {entry.get('type')} but the default in {nb} is {default!r} ({t})")
    assert not missing, ("add these entries to params/_schema.yaml (with min/max/choices/elements as "
                         "fits):\n  " + "\n  ".join(missing))
    assert not wrong, "fix these entries in params/_schema.yaml:\n  " + "\n  ".join(wrong)
    for nb in params.notebook_names():   # and every default satisfies its own entry
        for key, default in params.notebook_defaults(nb).items():
            params.check_value(nb, key, default, f"notebooks/{nb}")


@pytest.mark.parametrize("override, fragment", [
    ("seeds=[]", r"'seeds' of notebook \d\d_\w+ = \[\]: the list is empty; allowed: list of int, non-empty"),
    ("image_size=-4", r"'image_size' of notebook 01_prepare = -4: -4 is below the minimum 8"),
    ("seeds=[a,b]", r"'seeds' of notebook \d\d_\w+ = \['a', 'b'\]: element 0: 'a' is not an int"),
    ("scale_k=[0]", r"'scale_k' of notebook 03_synthesize = \[0\]: element 0: 0 is below the minimum 1"),
    ("lora_rank=0", r"'lora_rank' of notebook 02_finetune = 0: 0 is below the minimum 1"),
])
def test_bad_values_of_the_right_type_are_refused_before_any_notebook_runs(override, fragment, tmp_path, capsys):
    from realfake_utils import runner

    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        runner.main(["run", "--preset", "digits", "--run-dir", str(run_dir), "-p", override])
    assert err.value.code == 2
    msg = capsys.readouterr().err.strip()
    assert re.search(fragment, msg) and len(msg.splitlines()) == 1, msg
    assert f"-p {override.split('=')[0]}" in msg and "_schema.yaml" in msg
    assert not run_dir.exists()   # refused before the run folder, let alone a notebook


def test_schema_applies_to_presets_and_to_values_edited_in_the_cell(world):
    (world / "params" / "_schema.yaml").write_text(
        "steps: {type: int, min: 1}\nks: {type: list, elements: int, min: 1, non_empty: true}\n"
        "lr: {type: float, gt: 0}\n01_beta.image_size: {type: int, choices: [8, 16]}\n")
    (world / "params" / "bad.yaml").write_text("01_beta:\n  steps: 0\n")
    with pytest.raises(ParamError, match=r"params/bad.yaml \[01_beta\]: parameter 'steps' .* = 0"):
        resolve("bad")
    with pytest.raises(ParamError, match=r"'lr' of notebook 00_alpha = 0.0: 0.0 must be greater than 0"):
        resolve("digits", {"lr": 0})
    with pytest.raises(ParamError, match=r"'image_size' of notebook 01_beta = 4: 4 is not one of \[8, 16\]"):
        resolve("digits", {"image_size": 4})
    assert resolve("digits", {"image_size": 4}, ["00_alpha"])["00_alpha"]["image_size"] == 4  # per notebook
    ns = {"preset": "small", "run_dir": "", "image_size": 16, "steps": 10, "use_dm": True, "ks": []}
    with pytest.raises(ParamError, match="parameters cell: parameter 'ks' of notebook 01_beta = \\[\\]"):
        setup_notebook(ns, "01_beta")   # JupyterLab: an edited value is checked too


def test_parameters_cell_is_read_whatever_its_comments_say(world):
    """papermill's line parser drops `x = [0, 1]  # k = 1 ...` with only a warning; ours does not."""
    make_notebook(world / "notebooks" / "02_gamma.ipynb",
                  'preset = "digits"\nseeds = [0, 1]   # every row at k = 1 with each; k > 1 with the first\n'
                  'rate: float = 0.5  # annotated\nx = y = 3')
    assert params.notebook_defaults("02_gamma") == {"preset": "digits", "seeds": [0, 1], "rate": 0.5, "x": 3,
                                                    "y": 3}
    make_notebook(world / "notebooks" / "03_delta.ipynb", 'preset = "digits"\nn = len([1])')
    with pytest.raises(ParamError, match=r"03_delta.ipynb: the default of parameter 'n' \(len\(\[1\]\)\) is not"):
        params.notebook_defaults("03_delta")

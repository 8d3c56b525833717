"""Install files agree with each other; notebooks follow the kit's conventions."""
import re
import tomllib
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _constraints() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            out[_name(name)] = version.strip()
    return out


def test_environment_yml_and_pyproject_agree():
    deps = {_name(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pinned = {_name(r): r.split("==")[1] for r in pip_section if "==" in r}
    assert set(pinned) == deps, f"only in environment.yml: {set(pinned) - deps}; only in pyproject: {deps - set(pinned)}"
    constraints = _constraints()
    for name, version in pinned.items():
        assert constraints[name] == version, f"{name}: environment.yml {version} vs constraints {constraints[name]}"


def test_constraints_pin_the_tested_torch():
    constraints = _constraints()
    assert constraints["torch"] == "2.14.1" and constraints["torchvision"] == "0.29.1"
    deps = {_name(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert deps <= set(constraints), f"unpinned: {deps - set(constraints)}"


def test_the_ten_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == [
        "00_theory_checks", "01_prepare", "02_finetune", "03_synthesize", "04_train_classifier",
        "05_ood_eval", "06_lira", "07_sscd", "08_retrieval_baseline", "09_figures_tables"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_conventions(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: outputs not stripped"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one 'parameters' cell, has {len(tagged)}"
    for name in ("preset", "run_dir"):
        assert re.search(rf"^{name}\s*=", tagged[0].source, re.M), f"{path.name}: no '{name}' parameter"
    assert re.search(r'^preset\s*=\s*"digits"', tagged[0].source, re.M), "the default preset is digits"
    assert f'rf.setup(globals(), "{path.stem}")' in "".join(c.source for c in nb.cells), \
        f"{path.name} must call rf.setup(globals(), \"{path.stem}\")"
    assert nb.cells[0].cell_type == "markdown", f"{path.name}: start with a narrative markdown cell"
    assert nb.metadata["kernelspec"]["name"] == "realfake-kit"


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_notebook_and_its_text_file_are_in_sync(path):
    """Each notebook is paired with a py:percent text file (jupytext); both hold the same cells.
    After editing either, run `.venv/bin/jupytext --sync notebooks/<name>.py`."""
    import jupytext

    text = path.with_suffix(".py")
    assert text.exists(), f"{text.name} missing: run jupytext --set-formats ipynb,py:percent {path}"
    a, b = nbformat.read(path, as_version=4), jupytext.read(text)
    cells = lambda nb: [(c.cell_type, c.source.strip(), sorted(c.metadata.get("tags", []))) for c in nb.cells]
    assert cells(a) == cells(b), f"{path.name} and {text.name} differ: run jupytext --sync {text}"

"""Install files agree with each other; notebooks follow the kit's conventions; the package's
sibling imports sit at module level and form no cycle."""
import ast
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


MAX_NOTEBOOK_CODE_LINES = 105     # DEVELOPING.md: "at most about 100 code lines"


def notebook_code_lines(nb) -> int:
    """Non-blank, non-comment lines of a notebook's code cells (the parameters cell included)."""
    return sum(1 for c in nb.cells if c.cell_type == "code" for line in c.source.splitlines()
               if line.strip() and not line.strip().startswith("#"))


def notebook_defs(nb) -> list[str]:
    """``cell <i>: <name>`` for every function or class a code cell defines."""
    return [f"cell {i}: {n.name}" for i, c in enumerate(nb.cells) if c.cell_type == "code"
            for n in ast.walk(ast.parse(c.source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_a_short_narrative(path):
    """Issue 10: a notebook is parameters -> a few package calls -> plots -> checks: no function or class
    defined in a cell (logic lives in realfake_utils) and about 100 code lines at most."""
    nb = nbformat.read(path, as_version=4)
    defs = notebook_defs(nb)
    assert not defs, f"{path.name} defines {defs} in its cells: move them into realfake_utils"
    n = notebook_code_lines(nb)
    assert n <= MAX_NOTEBOOK_CODE_LINES, (f"{path.name}: {n} code lines (at most about 100): move multi-stage "
                                          "work into one realfake_utils call")


def test_the_notebook_checks_count_code_lines_and_find_a_def():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# title\ntext\ndef"),
                                         nbformat.v4.new_code_cell("# comment\n\nx = 1\ny = 2  # c\n"),
                                         nbformat.v4.new_code_cell("for i in range(2):\n    def f():\n        pass\n")])
    assert notebook_code_lines(nb) == 5
    assert notebook_defs(nb) == ["cell 2: f"]


# --------------------------------------------------------------------------------------------------
# Imports between sibling modules of realfake_utils: at module level, no cycle
# --------------------------------------------------------------------------------------------------
PACKAGE = ROOT / "realfake_utils"


def _sibling_targets(node: ast.AST, package: str, modules: set[str]) -> list[str]:
    """The sibling modules an import statement names (``from . import x``, ``from .x import y``,
    ``from <package>.x import y``, ``import <package>.x``)."""
    out: list[str] = []
    if isinstance(node, ast.ImportFrom):
        if node.level == 1 or node.module == package:
            out = [a.name for a in node.names] if not node.module or node.module == package \
                else [node.module.split(".")[0]]
        elif node.level == 0 and (node.module or "").startswith(package + "."):
            out = [node.module.split(".")[1]]
    elif isinstance(node, ast.Import):
        out = [a.name.split(".")[1] for a in node.names if a.name.startswith(package + ".")]
    return [m for m in out if m in modules]


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


LAZY_MARK = "# lazy:"     # a deliberate deferred sibling import says why on its line (the CLI defers torch)


def import_graph(package_dir: Path) -> tuple[dict[str, set[str]], list[str]]:
    """The module-level import graph of the package's modules (``from . import`` etc. executed at import
    time: top level, ``if`` / ``try`` blocks and class bodies; ``if TYPE_CHECKING`` skipped), and every
    sibling import inside a function body as ``file:line``, except those whose line carries
    ``# lazy: <reason>`` (``runner.py``: the ``realfake`` command starts without importing torch)."""
    package = package_dir.name
    modules = {p.stem for p in package_dir.glob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    lazy: list[str] = []

    def visit(node: ast.AST, module: str, path: Path, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            targets = _sibling_targets(child, package, modules)
            if targets and in_function:
                if LAZY_MARK not in lines[path][child.lineno - 1]:
                    lazy.append(f"{path.relative_to(package_dir.parent)}:{child.lineno}")
            elif targets:
                graph[module].update(t for t in targets if t != module)
            visit(child, module, path, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                         ast.Lambda)))

    lines = {path: path.read_text().splitlines() for path in sorted(package_dir.glob("*.py"))}
    for path, text in lines.items():
        visit(ast.parse("\n".join(text), str(path)), path.stem, path, False)
    return graph, lazy


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected part of ``graph`` that has one, as the path of modules (depth-first)."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}           # 1 = on the current path, 2 = finished

    def dfs(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node, [node])
    return cycles


def test_sibling_imports_are_at_module_level_and_acyclic():
    """Issue 10: imports between sibling modules at module level (lazy imports only for heavy third-party
    libraries such as diffusers / transformers), and the package's import graph has no cycle."""
    graph, lazy = import_graph(PACKAGE)
    assert not lazy, ("sibling modules imported inside a function body (move them to the module's imports): "
                      + ", ".join(lazy))
    cycles = import_cycles(graph)
    assert not cycles, "import cycles between realfake_utils modules: " + "; ".join(" -> ".join(c) for c in cycles)
    assert graph["__init__"] >= {"params", "rundir"} and "data" in graph["classify"]   # the graph is read


def test_the_import_checks_find_a_cycle_and_a_lazy_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from .c import f\n")
    (pkg / "c.py").write_text("from pkg.a import x\nfrom typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from .d import T\n")
    (pkg / "d.py").write_text("import os\n\ndef g():\n    from . import a\n    import json\n"
                              "    from . import b  # lazy: a reason\n")
    graph, lazy = import_graph(pkg)
    assert graph == {"__init__": set(), "a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert lazy == ["pkg/d.py:4"]
    assert import_cycles(graph) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []

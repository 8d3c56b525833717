"""Presets: YAML files in ``params/``, resolved against the notebooks' ``parameters`` cells.

A preset file has an optional ``extends: <preset>``, a ``description``, a ``shared`` section (keys passed
to every notebook that declares them) and one section per notebook (``00_theory_checks:`` ...).
Resolution for one notebook is

    parameters-cell defaults  <-  each file of the extends chain, base first
                                  (its shared section, then its notebook section)  <-  overrides

The parameters cell of each notebook holds the embedded default (``digits``), so a notebook runs as-is
in JupyterLab. Every key is checked against the parameters cell (read with ``ast``) and every value against the
default's type and its ``params/_schema.yaml`` entry before any compute starts.
"""
from __future__ import annotations

import ast
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
PRESET_DIR = REPO_ROOT / "params"
DEFAULT_PRESET = "digits"
RESERVED = ("extends", "description", "shared", "paper_vs_official")


class ParamError(ValueError):
    """A preset or parameter problem, found before any compute starts."""


def notebook_names() -> list[str]:
    """The numbered notebooks, in run order (``00_theory_checks`` ...)."""
    return sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


@lru_cache(maxsize=None)
def _inspect(path: str, mtime: float) -> dict[str, Any]:
    """Name -> default of the ``parameters`` cell, read with :mod:`ast` (papermill's line regex drops,
    with only a warning, an assignment whose comment it cannot parse, e.g. one containing ``k = 1``)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if not cells:
        return {}
    try:
        tree = ast.parse(cells[0].source)
    except SyntaxError as err:
        raise ParamError(f"{Path(path).name}: the parameters cell is not valid Python (line {err.lineno}: "
                         f"{err.msg})") from None
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        for target in targets:
            if not isinstance(target, ast.Name):
                continue
            try:
                out[target.id] = ast.literal_eval(value)
            except (ValueError, SyntaxError, TypeError):
                raise ParamError(
                    f"{Path(path).name}: the default of parameter '{target.id}' ({ast.unparse(value)}) is "
                    "not a literal; parameters cells must hold plain Python literals") from None
    return out


def notebook_defaults(notebook: str) -> dict[str, Any]:
    """Parameter names and default values of one notebook's ``parameters`` cell."""
    path = NOTEBOOK_DIR / f"{notebook}.ipynb"
    if not path.exists():
        raise ParamError(f"no notebook '{notebook}' in {NOTEBOOK_DIR}; notebooks: {notebook_names()}")
    return dict(_inspect(str(path), path.stat().st_mtime))


def read_preset_file(path: Path) -> dict[str, Any]:
    """One preset file parsed, or :class:`ParamError` in one line naming the file (and the YAML line)."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ParamError(f"{path}:{where}: not valid YAML ({problem}); fix or remove the file") from None
    except OSError as err:
        raise ParamError(f"{path}: cannot read ({err.strerror})") from None
    if not isinstance(raw, dict):
        raise ParamError(f"{path}: a preset is a mapping of sections (extends, description, shared, "
                         f"NN_notebook: ...), not a {type(raw).__name__}")
    return raw


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description (files starting with ``_`` are building blocks). A file that
    cannot be parsed is listed with ``BROKEN: <reason>`` instead of breaking the listing."""
    out = {}
    for p in sorted(PRESET_DIR.glob("*.yaml")):
        if not p.name.startswith("_"):
            try:
                desc = read_preset_file(p).get("description", "")
                out[p.stem] = str(desc or "").strip()
            except ParamError as err:
                out[p.stem] = f"BROKEN: {err}"
    return out


def _preset_names() -> str:
    return ", ".join(n for n, d in list_presets().items() if not d.startswith("BROKEN:"))


def load_layers(name: str, _seen: tuple = ()) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """The ``extends`` chain of a preset, base first: [(file name, {section: {key: value}}), ...]."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        known = _preset_names()
        raise ParamError(f"unknown preset '{name}'. Known presets: {known} (files in {PRESET_DIR})")
    if name in _seen:
        raise ParamError(f"preset '{name}' extends itself through {' -> '.join(_seen)}")
    raw = read_preset_file(path)
    layers = load_layers(raw["extends"], _seen + (name,)) if raw.get("extends") else []
    sections = {}
    for section, values in raw.items():
        if section in RESERVED and section != "shared":
            continue
        if not isinstance(values, dict):
            raise ParamError(f"{path}: section '{section}' must be a mapping of key: value")
        sections[section] = values
    return layers + [(f"params/{name}.yaml", sections)]


def load_preset(name: str) -> dict[str, dict[str, Any]]:
    """A preset with its ``extends`` chain merged into {section: {key: value}} (unvalidated)."""
    merged: dict[str, dict[str, Any]] = {}
    for _, sections in load_layers(name):
        for section, values in sections.items():
            merged.setdefault(section, {}).update(values)
    return merged


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _check(notebook: str, key: str, default: Any, value: Any, origin: str) -> Any:
    if not _type_ok(default, value):
        raise ParamError(
            f"{origin}: parameter '{key}' of notebook {notebook} expects {type(default).__name__} "
            f"(default {default!r}) but got {type(value).__name__} {value!r}")
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    return value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["k=v", ...]`` from the command line; values are parsed as YAML (``3``, ``0.5``, ``[1,2]``)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ParamError(f"-p expects key=value, got '{item}'")
        key, text = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ParamError(f"-p {key.strip()}={text}: the value of '{key.strip()}' is not valid YAML "
                             f"({problem}); quote lists, e.g. -p '{key.strip()}=[1, 2]'") from None
    return out


# ------------------------------------------------------------------------------------------ schema
SCHEMA_FILE = "_schema.yaml"
_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "list": (list, tuple), "dict": dict}


def load_schema() -> dict[str, dict[str, Any]]:
    """``params/_schema.yaml``: parameter name (or ``NN_name.key``) -> {type, min, max, gt, choices,
    elements, non_empty}."""
    path = PRESET_DIR / SCHEMA_FILE
    if not path.exists():
        return {}
    return _load_schema(str(path), path.stat().st_mtime)


@lru_cache(maxsize=None)
def _load_schema(path: str, mtime: float) -> dict[str, dict[str, Any]]:
    raw = read_preset_file(Path(path))
    for key, entry in raw.items():
        if not isinstance(entry, dict):
            raise ParamError(f"{path}: entry '{key}' must be a mapping such as {{type: int, min: 1}}")
    return raw


def schema_entry(notebook: str, key: str, schema: dict | None = None) -> dict[str, Any] | None:
    schema = load_schema() if schema is None else schema
    return schema.get(f"{notebook}.{key}", schema.get(key))


def _is(value: Any, tname: str) -> bool:
    if tname in ("any", None):
        return True
    if tname in ("int", "float") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES.get(tname, object))


def _scalar_problem(value: Any, entry: dict[str, Any], tname: str | None) -> str | None:
    if tname and not _is(value, tname):
        return f"{value!r} is not a{'n' if tname[0] in 'aeiou' else ''} {tname}"
    if "choices" in entry and value not in entry["choices"]:
        return f"{value!r} is not one of {entry['choices']}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in entry and value < entry["min"]:
            return f"{value!r} is below the minimum {entry['min']}"
        if "max" in entry and value > entry["max"]:
            return f"{value!r} is above the maximum {entry['max']}"
        if "gt" in entry and not value > entry["gt"]:
            return f"{value!r} must be greater than {entry['gt']}"
    return None


def _allowed(entry: dict[str, Any]) -> str:
    parts = [entry.get("type", "any")]
    if entry.get("elements"):
        parts[0] += f" of {entry['elements']}"
    if entry.get("non_empty"):
        parts.append("non-empty")
    if "choices" in entry:
        parts.append(f"one of {entry['choices']}")
    lo = f">= {entry['min']}" if "min" in entry else f"> {entry['gt']}" if "gt" in entry else ""
    if lo:
        parts.append(lo)
    if "max" in entry:
        parts.append(f"<= {entry['max']}")
    return ", ".join(parts)


def check_value(notebook: str, key: str, value: Any, origin: str, schema: dict | None = None) -> None:
    """Refuse a value of the right type but the wrong content (range, list elements, choices, empty
    list) with one line naming the key, notebook, value and what is allowed. Entries whose ``type``
    disagrees with the value's type are skipped here (the default's type decides; a test flags the
    schema entry)."""
    entry = schema_entry(notebook, key, schema)
    if not entry or value is None:
        return
    tname = entry.get("type", "any")
    if not _is(value, tname):
        return
    problem = None
    if tname == "list":
        if entry.get("non_empty") and len(value) == 0:
            problem = "the list is empty"
        else:
            for i, v in enumerate(value):
                p = _scalar_problem(v, entry, entry.get("elements"))
                if p:
                    problem = f"element {i}: {p}"
                    break
    elif tname != "any":
        problem = _scalar_problem(value, entry, tname)
    if problem:
        raise ParamError(f"{origin}: parameter '{key}' of notebook {notebook} = {value!r}: {problem}; "
                         f"allowed: {_allowed(entry)} (params/{SCHEMA_FILE})")


def _close(key: str, known: set[str]) -> str:
    import difflib

    hits = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(h) for h in hits)}?)" if hits else " (`realfake show digits` lists them)"


def resolve(preset: str, overrides: dict[str, Any] | None = None,
            notebooks: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Resolved, validated parameters per notebook: {notebook: {key: value}}.

    Raises :class:`ParamError` naming the key and notebook for an unknown preset, an unknown
    parameter, or a value of the wrong type.
    """
    overrides = dict(overrides or {})
    all_nbs = notebook_names()
    notebooks = notebooks or all_nbs
    layers = load_layers(preset)
    defaults = {nb: notebook_defaults(nb) for nb in all_nbs}
    declared = {k for d in defaults.values() for k in d}
    for origin, sections in layers:
        for section, values in sections.items():
            if section == "shared":
                for key in values:
                    if key not in declared:
                        raise ParamError(f"{origin}: shared parameter '{key}' is not a parameter of any "
                                         f"notebook; check the spelling{_close(key, declared)}")
            elif section not in defaults:
                raise ParamError(f"{origin}: section '{section}' is not a notebook; notebooks: {all_nbs}")
            else:
                for key in values:
                    if key not in defaults[section]:
                        raise ParamError(
                            f"{origin}: '{key}' is not a parameter of notebook {section}; "
                            f"its parameters are {sorted(defaults[section])}")
    for key in overrides:
        if key not in declared:
            raise ParamError(f"-p {key}=...: '{key}' is not a parameter of any notebook; "
                             f"check the spelling{_close(key, declared)}")
    if "data_root" not in overrides and os.environ.get("REALFAKE_DATA") and "data_root" in declared:
        overrides["data_root"] = os.environ["REALFAKE_DATA"]
    out = {}
    for nb in notebooks:
        params = dict(defaults[nb])
        for origin, sections in layers:  # base file first; in each file shared, then the section
            for source in ("shared", nb):
                for key, value in sections.get(source, {}).items():
                    if key in params:
                        params[key] = _check(nb, key, defaults[nb][key], value, f"{origin} [{source}]")
        origins = {}
        for origin, sections in layers:
            for source in ("shared", nb):
                for key in sections.get(source, {}):
                    origins[key] = f"{origin} [{source}]"
        for key, value in overrides.items():
            if key in params:
                params[key] = _check(nb, key, defaults[nb][key], value, f"-p {key}")
                origins[key] = f"-p {key}"
        if "preset" in params:
            params["preset"] = preset
        schema = load_schema()
        for key, value in params.items():
            check_value(nb, key, value, origins.get(key, f"notebooks/{nb} parameters cell"), schema)
        out[nb] = params
    return out


def setup_notebook(ns: dict[str, Any], notebook: str) -> dict[str, Any]:
    """Apply a preset to a notebook's namespace when it was not run by ``realfake run``.

    In JupyterLab or under nbval the parameters cell holds the ``digits`` defaults. If ``preset`` (or
    the environment variable ``REALFAKE_PRESET``, used by ``make test`` to select ``smoke``) names
    another preset, every parameter the user left at its default takes the preset's value; values
    edited in the cell are kept. Under ``realfake run`` (``REALFAKE_RUNNER=1``) the runner has
    already injected resolved values and nothing changes. Returns the notebook's parameters.
    """
    defaults = notebook_defaults(notebook)
    if not os.environ.get("REALFAKE_RUNNER"):
        preset = ns.get("preset", DEFAULT_PRESET)
        if preset == DEFAULT_PRESET and os.environ.get("REALFAKE_PRESET"):
            preset = os.environ["REALFAKE_PRESET"]
        resolved = resolve(preset, notebooks=[notebook])[notebook]
        for key, default in defaults.items():
            if key not in ns or ns[key] == default:
                ns[key] = resolved[key]
            else:
                ns[key] = _check(notebook, key, default, ns[key], "parameters cell")
                check_value(notebook, key, ns[key], "parameters cell")
        ns["preset"] = preset
    return {key: ns[key] for key in defaults}

"""Presets: YAML files in ``params/``, resolved against the notebooks' ``parameters`` cells.

A preset file has an optional ``extends: <preset>``, a ``description``, a ``shared`` section (keys passed
to every notebook that declares them) and one section per notebook (``00_theory_checks:`` ...).
Resolution for one notebook is

    parameters-cell defaults  <-  each file of the extends chain, base first
                                  (its shared section, then its notebook section)  <-  overrides

The parameters cell of each notebook holds the embedded default (``digits``), so a notebook runs as-is
in JupyterLab. Every key is checked against ``papermill.inspect_notebook`` and every value against the
default's type before any compute starts.
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
    import papermill

    out = {}
    for name, info in papermill.inspect_notebook(path).items():
        text = info["default"]
        try:
            out[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError) as err:
            raise ParamError(
                f"{Path(path).name}: the default of parameter '{name}' ({text}) is not a literal; "
                "parameters cells must hold plain Python literals") from err
    return out


def notebook_defaults(notebook: str) -> dict[str, Any]:
    """Parameter names and default values of one notebook's ``parameters`` cell."""
    path = NOTEBOOK_DIR / f"{notebook}.ipynb"
    if not path.exists():
        raise ParamError(f"no notebook '{notebook}' in {NOTEBOOK_DIR}; notebooks: {notebook_names()}")
    return dict(_inspect(str(path), path.stat().st_mtime))


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description (files starting with ``_`` are building blocks)."""
    out = {}
    for p in sorted(PRESET_DIR.glob("*.yaml")):
        if not p.name.startswith("_"):
            out[p.stem] = (yaml.safe_load(p.read_text()) or {}).get("description", "").strip()
    return out


def load_layers(name: str, _seen: tuple = ()) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """The ``extends`` chain of a preset, base first: [(file name, {section: {key: value}}), ...]."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(list_presets())
        raise ParamError(f"unknown preset '{name}'. Known presets: {known} (files in {PRESET_DIR})")
    if name in _seen:
        raise ParamError(f"preset '{name}' extends itself through {' -> '.join(_seen)}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ParamError(f"{path}: a preset is a mapping of sections")
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
        out[key.strip()] = yaml.safe_load(text) if text.strip() else ""
    return out


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
                                         f"notebook; check the spelling (known: {sorted(declared)})")
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
                             f"check the spelling (known: {sorted(declared)})")
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
        for key, value in overrides.items():
            if key in params:
                params[key] = _check(nb, key, defaults[nb][key], value, f"-p {key}")
        if "preset" in params:
            params["preset"] = preset
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
        ns["preset"] = preset
    return {key: ns[key] for key in defaults}

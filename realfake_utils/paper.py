"""The paper's published numbers (``resources/paper_numbers.yaml``, schema v2), read in one place.

Every step or report that shows a published number beside a measured one reads it here:
``PaperNumbers.load().value("table2", "IN-10", "lora-dm-vg-lp")`` -> 90.5, with the cell's ``source``
(table / row / column) in :meth:`PaperNumbers.cell`. :func:`paper_column` names the paper's column a
preset's run is shown beside.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .params import ParamError, load_layers

PAPER_NUMBERS = Path(__file__).resolve().parent / "resources" / "paper_numbers.yaml"

# preset -> (paper column of Table 1, label shown beside it)
PRESET_COLUMNS = {
    "digits": ("IN-10", "IN-10 (closest small set: the digits are not ImageNet)"),
    "smoke": ("IN-10", "IN-10 (closest small set; smoke numbers mean nothing)"),
    "eurosat-mini": ("EuroSAT", "EuroSAT (the run: a 10,000-image subset at 32 px)"),
    "eurosat": ("EuroSAT", "EuroSAT"), "eurosat-official": ("EuroSAT", "EuroSAT"),
    "imagenette": ("IN-10", "IN-10"), "imagenette-official": ("IN-10", "IN-10"),
    "imagenet100": ("IN-100", "IN-100"), "imagenet100-official": ("IN-100", "IN-100"),
    "imagenet1k": ("IN-1K", "IN-1K"), "imagenet1k-official": ("IN-1K", "IN-1K"),
    "cub": ("CUB", "CUB"), "cub-official": ("CUB", "CUB"),
    "cars": ("Cars", "Cars"), "cars-official": ("Cars", "Cars"),
    "pets": ("PET", "PET"), "pets-official": ("PET", "PET"),
}
MINIATURE_PRESETS = ("digits", "smoke", "eurosat-mini")


@dataclass(frozen=True)
class PaperCell:
    """One published number (``paper_numbers.yaml`` v2 entry)."""

    value: float
    unit: str
    source: str
    note: str = ""


class PaperNumbers:
    """The published numbers: ``cell(table, column, row)`` -> :class:`PaperCell` or None (not printed)."""

    def __init__(self, data: dict[str, Any]):
        if data.get("schema_version") != 2:
            raise ValueError(f"{PAPER_NUMBERS.name}: schema_version {data.get('schema_version')!r}, expected 2 "
                             "(see the file's header)")
        self.data = data
        self.tables: dict[str, dict[str, dict[str, dict[str, Any]]]] = data.get("tables") or {}
        self.claims: dict[str, dict[str, str]] = data.get("claims") or {}
        self.citations: dict[str, str] = data.get("citations") or {}

    @classmethod
    def load(cls, path: str | Path | None = None) -> "PaperNumbers":
        return cls(yaml.safe_load(Path(path or PAPER_NUMBERS).read_text()) or {})

    def cell(self, table: str, column: str, row: str) -> PaperCell | None:
        e = ((self.tables.get(table) or {}).get(column) or {}).get(row)
        if e is None:
            return None
        return PaperCell(float(e["value"]), str(e.get("unit", "")), str(e["source"]), str(e.get("note", "")))

    def value(self, table: str, column: str, row: str) -> float | None:
        c = self.cell(table, column, row)
        return None if c is None else c.value

    def claim(self, key: str) -> tuple[str, str]:
        c = self.claims.get(key) or {}
        return str(c.get("text", "")), str(c.get("source", ""))


def paper_column(preset: str) -> tuple[str, str]:
    """(Table 1 column, label) the run of ``preset`` is shown beside; an unknown preset (an
    ``imagefolder`` data set of your own) is shown beside IN-10, labelled as the closest small set."""
    return PRESET_COLUMNS.get(preset, ("IN-10", "IN-10 (closest small set; not the run's data set)"))


def is_paper_preset(preset: str) -> bool:
    """A preset built on ``params/_paper.yaml`` (the paper's protocol at the paper's sizes)."""
    try:
        return any(name == "params/_paper.yaml" for name, _ in load_layers(preset))
    except ParamError:
        return False

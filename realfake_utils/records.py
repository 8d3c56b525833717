"""Typed results records: the contract between a step and every consumer of its numbers.

Each step defines one record (a dataclass subclassing :class:`Record`) in its own module and ends with
``record.save(run)``, which writes ``results/<STEP>.json``. A consumer (a later step, 09, the report)
calls ``ThatRecord.load(run)`` and gets the same typed object back, never a dict whose layout it must
guess. The JSON holds ``{"record": <class name>, "version": <VERSION>, ...fields}``; loading checks both
and names the step to rerun when they disagree.

Fields may be plain JSON types, nested dataclasses, and ``list`` / ``dict`` / ``Optional`` of those.
Paths inside a record are stored relative to the run folder (see :meth:`Record.rel`).
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .rundir import read_json, write_json

R = TypeVar("R", bound="Record")


class RecordError(RuntimeError):
    """A results record is missing, of another kind, or of another version."""


def run_root(run: Any) -> Path:
    """The run folder of a ``RunDir`` (its ``.root``) or of a plain path (a ``pathlib.Path``'s own
    ``.root`` is "/", never the run folder: use this, not ``getattr(run, "root", run)``)."""
    return Path(run) if isinstance(run, (str, os.PathLike)) else Path(run.root)


_root = run_root


@dataclasses.dataclass
class Record:
    """Base of every step's results record (subclasses are dataclasses with ``STEP`` set)."""

    STEP: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    @classmethod
    def path(cls, run: Any) -> Path:
        return _root(run) / "results" / f"{cls.STEP}.json"

    def to_dict(self) -> dict[str, Any]:
        return {"record": type(self).__name__, "version": self.VERSION, **dataclasses.asdict(self)}

    def save(self, run: Any) -> Path:
        """Write ``results/<STEP>.json`` atomically (temp file, then rename)."""
        return write_json(self.path(run), self.to_dict())

    @classmethod
    def exists(cls, run: Any) -> bool:
        return cls.path(run).exists()

    @classmethod
    def load(cls: type[R], run: Any) -> R:
        """The record ``STEP`` wrote in this run folder; a clear error naming the step otherwise."""
        path = cls.path(run)
        if not path.exists():
            raise RecordError(f"{path} does not exist: run notebook {cls.STEP} first "
                              f"(realfake run --only {cls.STEP[:2]} ...)")
        data = read_json(path)
        if data.get("record") != cls.__name__ or data.get("version") != cls.VERSION:
            raise RecordError(
                f"{path} holds {data.get('record')} v{data.get('version')}, not {cls.__name__} "
                f"v{cls.VERSION}: it was written by another version of the kit; rerun {cls.STEP}")
        return from_dict(cls, {k: v for k, v in data.items() if k not in ("record", "version")})

    @classmethod
    def load_or_none(cls: type[R], run: Any) -> R | None:
        return cls.load(run) if cls.exists(run) else None

    @staticmethod
    def rel(run: Any, path: str | os.PathLike) -> str:
        """``path`` relative to the run folder (records never store absolute paths inside it)."""
        p, root = Path(path).resolve(), _root(run).resolve()
        try:
            return p.relative_to(root).as_posix()
        except ValueError:
            return str(path)


def from_dict(cls: Any, data: Any) -> Any:
    """Build ``cls`` (a dataclass or a typing form of dataclasses) from its ``asdict`` JSON."""
    origin = typing.get_origin(cls)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(cls) if a is not type(None)]
        if data is None:
            return None
        return from_dict(args[0], data) if len(args) == 1 else data
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(cls) or (Any,)
        return [from_dict(arg, x) for x in data]
    if origin is dict:
        _, arg = typing.get_args(cls) or (Any, Any)
        return {k: from_dict(arg, v) for k, v in data.items()}
    if dataclasses.is_dataclass(cls) and isinstance(data, dict):
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(data) - names
        if unknown:
            raise RecordError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        return cls(**{k: from_dict(hints[k], v) for k, v in data.items()})
    return data

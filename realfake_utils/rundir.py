"""The run folder: everything a later step or a figure needs, written atomically.

```
runs/<preset>/
  NN_step.ipynb          executed copy (written by `realfake run`)
  results/NN_step.json   the numbers a step produced
  figures/<name>.png|pdf
  artifacts/             manifests, models, features, LoRA weights, synthetic sets, checkpoints
  run.log
```
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .params import REPO_ROOT


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if os.path.isfile(tmp):
            os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; a shared run folder needs the umask's mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def content_hash(obj: Any, length: int = 16) -> str:
    """SHA-256 (hex, first ``length`` characters) of ``obj`` as canonical JSON: the one cache key of the
    kit. Keys hold content (parameters, file hashes), never absolute paths or mtimes, so a run folder can
    be moved or copied and still reuse what it holds."""
    text = json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def tree_sha256(folder: str | os.PathLike) -> str:
    """SHA-256 over the relative paths and bytes of every file under ``folder`` (hidden and temp files
    excluded): the content identity of a model folder, wherever it lies."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            h.update(rel.encode() + b"\0" + file_sha256(p).encode() + b"\0")
    return h.hexdigest()


class UnsafePathError(ValueError):
    """A path read from a manifest or index points outside the folder it must stay in."""


def confine(root: str | os.PathLike, rel: str | os.PathLike, what: str = "path") -> Path:
    """``root / rel``, refused unless it stays inside ``root`` (no absolute paths, no ``..`` escapes,
    no symlink out): use it for every path read from a manifest, index or captions file."""
    root_r = Path(root).resolve()
    rel_p = Path(rel)
    if rel_p.is_absolute():
        raise UnsafePathError(f"{what} {str(rel)!r} is absolute; entries must be relative to {root_r}")
    full = (root_r / rel_p).resolve()
    if full != root_r and root_r not in full.parents:
        raise UnsafePathError(f"{what} {str(rel)!r} leaves {root_r}; entries must stay inside it")
    return full


DONE = "DONE.json"


def mark_done(folder: str | os.PathLike, key: str, files: list[str] | None = None,
              info: dict[str, Any] | None = None) -> Path:
    """Write ``folder/DONE.json`` last, once a unit of work is complete: its cache ``key`` and the
    SHA-256 of each of ``files`` (paths relative to ``folder``), so a half-written or replaced file is
    caught by :func:`is_done` and the unit is redone rather than trusted."""
    folder = Path(folder)
    hashes = {f: file_sha256(folder / f) for f in (files or [])}
    return write_json(folder / DONE, {"key": key, "files": hashes, "info": info or {}})


def is_done(folder: str | os.PathLike, key: str, verify: bool = True) -> bool:
    """Whether ``folder`` holds a finished unit for ``key`` (and, with ``verify``, every file it lists
    still has the bytes it had when the marker was written)."""
    marker = Path(folder) / DONE
    if not marker.exists():
        return False
    try:
        data = read_json(marker)
    except (OSError, ValueError):
        return False
    if data.get("key") != key:
        return False
    if verify:
        for rel, sha in data.get("files", {}).items():
            p = Path(folder) / rel
            if not p.is_file() or file_sha256(p) != sha:
                return False
    return True


def done_info(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``info`` a finished unit recorded in its marker ({} when there is none)."""
    marker = Path(folder) / DONE
    return read_json(marker).get("info", {}) if marker.exists() else {}


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically (temp file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class RunDir:
    """Paths and writers of one run folder (``runs/<preset>`` unless ``run_dir`` is given)."""

    def __init__(self, preset: str, run_dir: str | os.PathLike = "", notebook: str = ""):
        self.root = Path(run_dir) if run_dir else REPO_ROOT / "runs" / preset
        if not self.root.is_absolute():
            self.root = (REPO_ROOT / self.root).resolve()
        self.preset = preset
        self.notebook = notebook
        for sub in ("results", "figures", "artifacts"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def results(self) -> Path:
        return self.root / "results"

    def result_path(self, notebook: str | None = None) -> Path:
        return self.results / f"{notebook or self.notebook}.json"

    def save_results(self, results: dict[str, Any], notebook: str | None = None) -> Path:
        """Write ``results/<notebook>.json`` (atomically) and return its path."""
        return write_json(self.result_path(notebook), results)

    def load_results(self, notebook: str) -> dict[str, Any]:
        """Results of an earlier step; a clear error if that step has not run in this folder."""
        path = self.result_path(notebook)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: run notebook {notebook} first "
                f"(realfake run --preset {self.preset} --only {notebook[:2]})")
        return read_json(path)

    def save_figure(self, fig, name: str) -> Path:
        """Save ``figures/<name>.png`` and ``.pdf`` (atomically); returns the PNG path."""
        for ext in ("png", "pdf"):
            with atomic_path(self.figures / f"{name}.{ext}") as tmp:
                fig.savefig(tmp, format=ext, dpi=130, bbox_inches="tight")
        return self.figures / f"{name}.png"

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

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
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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

"""realfake_utils: the tested logic behind the realfake-kit notebooks.

Real-Fake: Effective Training Data Synthesis Through Distribution Matching (Yuan et al., ICLR 2024),
with the retrieval baseline of Geng et al. (2024), "The Unmet Promise of Synthetic Training Images".
One module per concern; notebooks call them. Submodules are imported lazily (torch is heavy).
"""
from __future__ import annotations

from typing import Any

from .params import ParamError, setup_notebook
from .rundir import RunDir, seed_everything

__version__ = "0.1.0"


def setup(ns: dict[str, Any], notebook: str) -> RunDir:
    """First call of every notebook: apply the preset (see :func:`params.setup_notebook`), seed
    everything with ``seed`` if the notebook has one, and return the run folder."""
    params = setup_notebook(ns, notebook)
    if "seed" in params:
        seed_everything(int(params["seed"]))
    return RunDir(ns.get("preset", "digits"), ns.get("run_dir", ""), notebook)


__all__ = ["ParamError", "RunDir", "seed_everything", "setup", "setup_notebook"]

"""realfake_utils: the tested logic behind the realfake-kit notebooks.

Real-Fake: Effective Training Data Synthesis Through Distribution Matching (Yuan et al., ICLR 2024),
with the retrieval baseline of Geng et al. (2024), "The Unmet Promise of Synthetic Training Images".
One module per concern; notebooks call them. Submodules are imported lazily (torch is heavy).
"""
from __future__ import annotations

from typing import Any

from .params import ParamError, setup_notebook
from .rundir import LOCK_TOKEN_ENV, RunDir, RunFolderBusy, lock_run_folder, seed_everything

__version__ = "0.1.0"


def setup(ns: dict[str, Any], notebook: str) -> RunDir:
    """First call of every notebook: apply the preset (see :func:`params.setup_notebook`), seed
    everything with ``seed`` if the notebook has one, take the run folder's lock for the kernel's
    lifetime (shared with the `realfake run` that started this kernel, via ``$REALFAKE_LOCK_TOKEN``;
    refused while another run or kernel writes the folder) and return the run folder."""
    import os

    params = setup_notebook(ns, notebook)
    if "seed" in params:
        seed_everything(int(params["seed"]))
    run = RunDir(ns.get("preset", "digits"), ns.get("run_dir", ""), notebook)
    try:
        run.lock = lock_run_folder(run.root, role="kernel", token=os.environ.get(LOCK_TOKEN_ENV) or None,
                                   wait_s=10.0)
    except RunFolderBusy as err:
        raise RunFolderBusy(f"{notebook}: {err}") from None
    return run


__all__ = ["ParamError", "RunDir", "RunFolderBusy", "seed_everything", "setup", "setup_notebook"]

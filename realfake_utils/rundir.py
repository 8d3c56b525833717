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

import atexit
import fcntl
import hashlib
import json
import os
import random
import secrets
import signal
import socket
import tempfile
import time
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


def make_temp_dir(prefix: str, dir: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """``tempfile.mkdtemp`` whose folder gets the umask's mode (mkdtemp makes 0700; a folder renamed
    into a shared run folder must be readable by whoever the umask allows)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=dir))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


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


# ------------------------------------------------------------------------------ one writer per run folder
LOCK_NAME = ".realfake.lock"
LOCK_TOKEN_ENV = "REALFAKE_LOCK_TOKEN"   # set by `realfake run` for its kernels: they share its lock
_HELD: dict[str, "RunLock"] = {}


class RunFolderBusy(RuntimeError):
    """Another process (a `realfake run` or a notebook kernel) holds the run folder's lock."""


class RunLock:
    """A held lock on a run folder: ``fcntl.flock`` on ``<run>/.realfake.lock`` for this process's
    lifetime (or until :meth:`release`). The kernel releases it when the process dies, so a lock of a
    dead process is never stale in effect; its recorded PID is only reported (``took_over``)."""

    def __init__(self, root: Path, fd: int, token: str, role: str, took_over: int | None = None):
        self.root, self.fd, self.token, self.role, self.took_over = root, fd, token, role, took_over

    @property
    def path(self) -> Path:
        return self.root / LOCK_NAME

    def release(self) -> None:
        """Drop the lock; the last holder clears the record (a record left behind means a process
        died holding the folder, reported as ``took_over`` by the next owner)."""
        if self.fd >= 0:
            try:
                gate = os.open(self.root / (LOCK_NAME + ".gate"), os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(gate, fcntl.LOCK_EX)
                    info = _read_lock_info(self.fd)
                    others = [p for p in info.get("members", []) if p != os.getpid() and _pid_alive(p)]
                    if others:
                        _write_lock_info(self.fd, dict(info, members=others))
                    else:
                        os.ftruncate(self.fd, 0)
                finally:
                    os.close(gate)
            except OSError:
                pass   # a vanished or read-only folder: closing still drops the lock
            os.close(self.fd)   # closing the descriptor drops the flock
            self.fd = -1
        _HELD.pop(str(self.root), None)

    def __repr__(self) -> str:
        return f"RunLock({str(self.path)!r}, role={self.role!r}, pid={os.getpid()})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock_info(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        info = json.loads(data.decode() or "{}")
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _write_lock_info(fd: int, info: dict[str, Any]) -> None:
    # in place, never by rename: the flock belongs to this inode
    data = (json.dumps(info, sort_keys=True) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _busy_message(root: Path, info: dict[str, Any]) -> str:
    members = [p for p in info.get("members", []) if isinstance(p, int)]
    alive = [p for p in members if _pid_alive(p)] or members or [info.get("pid", "?")]
    who = ", ".join(str(p) for p in alive)
    what = "a `realfake run`" if info.get("role") == "run" else "a notebook kernel"
    since = info.get("started", "?")
    return (f"run folder {root} is in use by PID {who} ({what} started {since} on {info.get('host', '?')}; "
            f"lock file {root / LOCK_NAME}): wait for it to finish or stop it (kill {alive[0]}), or use "
            "another run folder; two writers on one run folder corrupt it")


def lock_run_folder(root: str | os.PathLike, role: str = "run", token: str | None = None,
                    wait_s: float = 0.0) -> RunLock:
    """Take the run folder's lock for this process (idempotent within a process).

    ``role="run"``: `realfake run`, the owner; refused at once (:class:`RunFolderBusy`, naming the PID
    and the lock file) while any other process holds the folder. ``role="kernel"`` with the owner's
    ``token`` (``$REALFAKE_LOCK_TOKEN``, passed by the runner to its kernels): joins the owner's lock
    and holds it itself, so a kernel that outlives a killed runner still keeps others out. A kernel
    without the token (JupyterLab, nbval) becomes an owner like a run. ``wait_s``: how long to wait for
    holders that are ending (a kernel owner being shut down, or kernels whose run has ended or was
    killed); a live `realfake run` is refused at once.

    Protocol: every acquisition happens under an exclusive flock on ``.realfake.lock.gate``; an owner
    takes ``LOCK_EX`` on the lock file (possible only if no one holds it), records pid / token, and
    converts to ``LOCK_SH``; members with the token add a ``LOCK_SH``.
    """
    root = Path(root).resolve()
    key = str(root)
    if key in _HELD:
        return _HELD[key]
    root.mkdir(parents=True, exist_ok=True)
    t_end = time.monotonic() + wait_s
    while True:
        gate = os.open(root / (LOCK_NAME + ".gate"), os.O_RDWR | os.O_CREAT, 0o666)
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(gate, fcntl.LOCK_EX)
            info = _read_lock_info(fd)
            pid = os.getpid()
            if token and info.get("token") == token:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)   # owners hold SH: cannot block
                info["members"] = [p for p in info.get("members", []) if _pid_alive(p)] + [pid]
                _write_lock_info(fd, info)
                lock = RunLock(root, fd, token, role)
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = info.get("pid")
                ending = info.get("role") == "kernel" or not (isinstance(owner, int) and _pid_alive(owner))
                if ending and time.monotonic() < t_end:
                    os.close(fd)
                    fd = -1
                    continue   # (finally releases the gate) a kernel being shut down: try again
                raise RunFolderBusy(_busy_message(root, info)) from None
            old = info.get("pid")
            took_over = old if isinstance(old, int) and old != pid and not _pid_alive(old) else None
            new_token = token or secrets.token_hex(8)
            _write_lock_info(fd, {"pid": pid, "role": role, "token": new_token, "members": [pid],
                                  "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")})
            fcntl.flock(fd, fcntl.LOCK_SH)   # under the gate: no one can slip in between
            lock = RunLock(root, fd, new_token, role, took_over)
            break
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        finally:
            os.close(gate)
            if fd < 0:
                time.sleep(0.1)
    _HELD[key] = lock
    atexit.register(lock.release)   # a normal exit clears the record; only a killed process leaves one
    return lock


# ------------------------------------------------------------------------------ test hook: hard kills
KILL_ENV = "REALFAKE_KILL_AFTER_UNITS"
_UNITS: dict[str, int] = {}


def unit_finished(kind: str) -> None:
    """Call right after a unit of work of ``kind`` is durably in place (an image renamed into its set,
    a checkpoint saved, an epoch checkpoint written). With ``REALFAKE_KILL_AFTER_UNITS=<kind>:<n>`` in
    the environment the process SIGKILLs itself after its ``n``-th such unit: the kill tests stop a
    job at exactly a chosen point, with no timing involved. Without the variable it only counts."""
    _UNITS[kind] = _UNITS.get(kind, 0) + 1
    spec = os.environ.get(KILL_ENV, "")
    if spec:
        want, _, n = spec.rpartition(":")
        if want == kind and n.isdigit() and _UNITS[kind] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)


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

"""Run folder: umask-respecting atomic writes, the run-folder lock, the kill hook, content-keyed caches."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from realfake_utils import rundir

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                       (0o077, 0o600, 0o700)])
def test_atomic_writes_and_temp_folders_respect_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    from realfake_utils.models import atomic_dir

    umask(mask)
    p = rundir.write_json(tmp_path / "a" / "x.json", {"a": 1})
    assert p.stat().st_mode & 0o777 == file_mode
    with rundir.atomic_path(tmp_path / "y.bin") as tmp:
        tmp.write_bytes(b"1")
    assert (tmp_path / "y.bin").stat().st_mode & 0o777 == file_mode
    d = rundir.make_temp_dir(".t.", tmp_path)
    assert d.stat().st_mode & 0o777 == dir_mode
    with atomic_dir(tmp_path / "model") as tmp:   # the folder a model build renames into place
        (tmp / "config.json").write_text("{}")
    assert (tmp_path / "model").stat().st_mode & 0o777 == dir_mode


# ------------------------------------------------------------------------------------------- the lock
HOLDER = textwrap.dedent("""
    import sys
    from realfake_utils import rundir
    role, token = sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
    lock = rundir.lock_run_folder(sys.argv[1], role=role, token=token)
    print(lock.token, flush=True)   # the parent reads this line: the lock is held from here on
    sys.stdin.read()                # hold it until the parent closes stdin (or kills this process)
""")


def hold(folder: Path, role: str = "run", token: str | None = None) -> tuple[subprocess.Popen, str]:
    """A child process holding the folder's lock; returns it once it holds it (no timing involved)."""
    argv = [sys.executable, "-c", HOLDER, str(folder), role] + ([token] if token else [])
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    line = proc.stdout.readline().strip()
    assert line, proc.stderr.read()
    return proc, line


def release(proc: subprocess.Popen, kill: bool = False) -> None:
    if kill:
        proc.send_signal(signal.SIGKILL)
    else:
        proc.stdin.close()
    proc.wait()


def test_second_owner_refused_naming_pid_and_lock_file(tmp_path):
    proc, _ = hold(tmp_path)
    try:
        with pytest.raises(rundir.RunFolderBusy) as err:
            rundir.lock_run_folder(tmp_path, role="run")
        msg = str(err.value)
        assert f"PID {proc.pid}" in msg and str(tmp_path / rundir.LOCK_NAME) in msg and "\n" not in msg
        with pytest.raises(rundir.RunFolderBusy):   # a kernel without the run's token: refused too
            rundir.lock_run_folder(tmp_path, role="kernel", token="not-the-token")
    finally:
        release(proc)
    lock = rundir.lock_run_folder(tmp_path)   # released cleanly: free, nothing to take over
    assert lock.took_over is None
    lock.release()


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    proc, _ = hold(tmp_path)
    release(proc, kill=True)   # died holding it: the kernel dropped the flock, the record stays
    lock = rundir.lock_run_folder(tmp_path)
    try:
        assert lock.took_over == proc.pid
        assert rundir.lock_run_folder(tmp_path) is lock   # idempotent within a process
    finally:
        lock.release()


def test_kernel_with_the_runs_token_joins_and_outlives_a_killed_runner(tmp_path):
    runner, token = hold(tmp_path, "run")
    kernel, _ = hold(tmp_path, "kernel", token)   # joins: not refused
    release(runner, kill=True)                     # the runner dies, the kernel keeps writing
    try:
        with pytest.raises(rundir.RunFolderBusy, match=f"PID {kernel.pid}"):
            rundir.lock_run_folder(tmp_path, role="run")
    finally:
        release(kernel)
    rundir.lock_run_folder(tmp_path).release()


def test_setup_in_a_notebook_kernel_respects_the_lock(tmp_path, monkeypatch):
    """rf.setup (JupyterLab: no token) while a `realfake run` holds the folder: refused, naming it."""
    import realfake_utils as rf
    from tests.test_params import make_notebook
    from realfake_utils import params

    nbs = tmp_path / "nbs"
    nbs.mkdir()
    make_notebook(nbs / "01_beta.ipynb", 'preset = "digits"\nrun_dir = ""\nseed = 0')
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "digits.yaml").write_text("description: d\n")
    monkeypatch.setattr(params, "NOTEBOOK_DIR", nbs)
    monkeypatch.setattr(params, "PRESET_DIR", tmp_path / "params")
    for var in ("REALFAKE_RUNNER", "REALFAKE_PRESET", rundir.LOCK_TOKEN_ENV):
        monkeypatch.delenv(var, raising=False)
    run_dir = tmp_path / "run"
    proc, token = hold(run_dir, "run")
    try:
        ns = {"preset": "digits", "run_dir": str(run_dir), "seed": 0}
        with pytest.raises(rundir.RunFolderBusy, match=f"01_beta: run folder .* PID {proc.pid}"):
            rf.setup(ns, "01_beta")
        monkeypatch.setenv(rundir.LOCK_TOKEN_ENV, token)   # as a kernel started by that run
        run = rf.setup(ns, "01_beta")
        assert run.lock.role == "kernel" and run.root == run_dir.resolve()
        run.lock.release()
    finally:
        release(proc)


# ------------------------------------------------------------------------------------------- kill hook
def test_unit_finished_kills_after_exactly_n_units(tmp_path):
    script = textwrap.dedent(f"""
        from pathlib import Path
        from realfake_utils import rundir
        for i in range(10):
            rundir.unit_finished("epoch" if i % 2 else "image")
            Path({str(tmp_path)!r}, str(i)).write_text("")
    """)
    env = {**os.environ, rundir.KILL_ENV: "epoch:3"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == [0, 1, 2, 3, 4]   # killed at i = 5
    env[rundir.KILL_ENV] = ""
    assert subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO).returncode == 0


# ------------------------------------------------------------------------------------------- caches
def test_a_copied_run_folder_reuses_the_clip_feature_cache(tmp_path):
    """Cache keys hold content: the copy's features come from the copied cache, no image is read."""
    import torch

    from realfake_utils import features as F
    from realfake_utils import models as M

    class Images:
        def __init__(self, n):
            self.n, self.reads = n, []

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            self.reads.append(i)
            g = torch.Generator().manual_seed(i)
            return torch.randint(0, 256, (3, 16, 16), generator=g, dtype=torch.uint8)

    torch.set_num_threads(1)
    a = tmp_path / "runA"
    clip = M.build_tiny_clip(a / "artifacts" / "miniature" / "clip", image_size=16, projection_dim=32,
                             hidden=32)
    ids = [f"img{i}" for i in range(6)]
    cache = Path("artifacts") / "features" / "clip_image.safetensors"
    first = F.extract_clip_features(str(clip), Images(6), ids, a / cache, batch_size=3, progress=False)
    b = tmp_path / "moved" / "runB"
    shutil.copytree(a, b)
    shutil.rmtree(a)   # moved, not only copied
    imgs = Images(6)
    again = F.extract_clip_features(str(b / "artifacts" / "miniature" / "clip"), imgs, ids, b / cache,
                                    batch_size=3, progress=False)
    assert imgs.reads == [] and torch.equal(again, first)


# ------------------------------------------------------------------------------------------- safe loading
@pytest.mark.parametrize("entry", ["../../../etc/hostname", "/etc/shadow", "a/../../outside.png"])
def test_set_manifest_paths_stay_inside_the_set(tmp_path, entry):
    """A manifest row pointing outside its set (relative escape or absolute path) is refused."""
    import json

    from realfake_utils import classify

    set_dir = tmp_path / "syn" / "k1"
    (set_dir / "a").mkdir(parents=True)
    rows = [{"file": "a/ok.png", "label": 0, "class_name": "a"}, {"file": entry, "label": 0, "class_name": "a"}]
    (set_dir / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(rundir.UnsafePathError, match=r"leaves|absolute"):
        classify.read_image_set(set_dir)
    (set_dir / "manifest.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert classify.read_image_set(set_dir)[0]["path"] == str((set_dir / "a" / "ok.png").resolve())


class _Payload:
    """Unpickling this would run code: torch.load(weights_only=True) must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def test_checkpoints_are_loaded_with_weights_only(tmp_path):
    import pickle

    import torch

    from realfake_utils import classify

    marker = tmp_path / "code-ran"
    torch.save({"model": {}, "recipe": _Payload(str(marker)), "num_classes": 2}, tmp_path / "model.pt")
    with pytest.raises(pickle.UnpicklingError):
        classify.load_classifier(tmp_path)
    assert not marker.exists()

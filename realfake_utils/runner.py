"""The ``realfake`` command: run the numbered notebooks of a preset with papermill.

    realfake presets                         list presets
    realfake show NAME [-p k=v ...]          print one preset, resolved per notebook
    realfake run --preset NAME [--only 00,03] [--from 02] [-p key=value ...] [--run-dir DIR]

Everything is validated (preset, parameter names, types) before the first notebook starts.
"""
from __future__ import annotations

import argparse
import csv
import errno
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from . import params as _params
from .params import ParamError, list_presets, notebook_names, parse_overrides, resolve
from .rundir import LOCK_TOKEN_ENV, RunDir, RunFolderBusy, lock_run_folder

KERNEL = "realfake-kit"


# The paper's recipe tables, as a preset resolves them (`realfake show`): each table's cells are the
# parameters of the notebook that uses them (Table 6: 03's sampler; Table 7: 02's LoRA fine-tuning;
# Table 8: 04's classifier recipe, params/recipes/<recipe>.yaml + recipe_overrides).
TABLE6_SYNTHESIS = ("image_size", "num_inference_steps", "guidance_scale", "latent_prior_strength", "lora_scale",
                    "guidance_feature", "negative_prompt", "batch_size")
TABLE7_LORA = ("image_size", "lora_rank", "lora_alpha", "learning_rate", "lr_warmup_steps", "global_batch_size",
               "gradient_accumulation_steps", "num_train_epochs", "max_train_steps", "snr_gamma", "dm_loss",
               "dm_loss_form", "dm_loss_weight", "visual_guidance", "guidance_token_position",
               "guidance_feature_train", "random_flip", "mixed_precision")
TABLE8_CLASSIFIER = ("model", "pretrained", "train_size", "test_size", "epochs", "global_batch_size", "opt", "lr",
                     "momentum", "weight_decay", "sched", "decay_milestones", "decay_rate", "warmup_epochs",
                     "hflip", "color_jitter", "auto_augment", "mixup", "cutmix", "label_smoothing", "bce_loss",
                     "drop_path_rate", "amp")


def recipe_tables(resolved: dict[str, dict]) -> dict[str, dict]:
    """The values of the paper's Tables 6 (synthesis, 03), 7 (LoRA fine-tuning, 02) and 8 (classifier
    recipe, 04: ``params/recipes/<recipe>.yaml`` with ``recipe_overrides`` applied, through
    ``classify.load_recipe``) as ``resolve`` gives them for a preset, so ``realfake show`` prints what a
    run will use next to the paper's tables. Fine-tuning runs ``num_train_epochs`` passes when > 0, else
    ``max_train_steps`` steps."""
    out: dict[str, dict] = {}
    syn_p, ft_p, cl_p = (resolved.get(n, {}) for n in ("03_synthesize", "02_finetune", "04_train_classifier"))
    if syn_p:
        out["Table 6 synthesis (03_synthesize)"] = {
            "sampler": "UniPC (synthesize.SynthesisSettings.scheduler)",
            **{k: syn_p[k] for k in TABLE6_SYNTHESIS if k in syn_p}}
    if ft_p:
        lora = {k: ft_p[k] for k in TABLE7_LORA if k in ft_p}
        if lora.get("num_train_epochs"):      # epochs decide; max_train_steps is not used
            lora.pop("max_train_steps", None)
        out["Table 7 LoRA fine-tuning (02_finetune)"] = lora
    if cl_p.get("recipe"):
        from .classify import load_recipe  # lazy: the CLI starts without torch (classify imports it)

        rc = load_recipe(cl_p["recipe"], image_size=cl_p.get("image_size"), **(cl_p.get("recipe_overrides") or {}))
        key = f"Table 8 classifier (04_train_classifier: params/recipes/{rc['name']}.yaml"
        key += f" + recipe_overrides {cl_p['recipe_overrides']})" if cl_p.get("recipe_overrides") else ")"
        out[key] = {"description": rc.get("description", ""), **{k: rc[k] for k in TABLE8_CLASSIFIER if k in rc},
                    "sources": rc.get("sources", {})}
    return out


def show_text(name: str, overrides: dict | None = None) -> str:
    """``realfake show``: the preset resolved per notebook, then its Table 6-8 values (``recipe_tables``)."""
    resolved = resolve(name, overrides or {})
    tables = recipe_tables(resolved)
    text = yaml.safe_dump(resolved, sort_keys=False)
    if tables:
        text += ("\n# The paper's recipe tables as this preset resolves them (Table 6: synthesis, Table 7: LoRA, "
                 "Table 8: classifier)\n" + yaml.safe_dump({"paper_tables": tables}, sort_keys=False, allow_unicode=True,
                                                width=200))
    return text


def select_notebooks(only: str | None, start: str | None) -> list[str]:
    """Notebooks to run from ``--only 00,03`` / ``--from 02`` (numbers or full names)."""
    names = notebook_names()

    def find(token: str) -> str:
        token = token.strip()
        hits = [n for n in names if n == token or n.split("_")[0] == token.zfill(2)]
        if not hits:
            raise ParamError(f"no notebook '{token}'; notebooks: {', '.join(names)}")
        return hits[0]

    if only:
        chosen = {find(t) for t in only.split(",") if t.strip()}
        names = [n for n in names if n in chosen]
    if start:
        first = find(start)
        names = [n for n in names if n >= first]
    return names


def _kernel_name() -> str:
    from jupyter_client.kernelspec import find_kernel_specs

    return KERNEL if KERNEL in find_kernel_specs() else "python3"


def run(preset: str, only: str | None = None, start: str | None = None,
        overrides: dict | None = None, run_dir: str = "") -> RunDir:
    """Validate everything, then execute the selected notebooks in order into the run folder."""
    notebooks = select_notebooks(only, start)
    overrides = dict(overrides or {})
    if overrides.get("run_dir"):  # `-p run_dir=X` is `--run-dir X` (else notebooks and logs would split)
        given = str(overrides.pop("run_dir"))
        if run_dir and Path(run_dir).resolve() != Path(given).resolve():
            raise ParamError(f"-p run_dir={given} and --run-dir {run_dir} disagree; give the run folder once, "
                             "with --run-dir")
        run_dir = given
    if run_dir:
        overrides["run_dir"] = str(Path(run_dir).resolve())
    params = resolve(preset, overrides, notebooks)  # raises before any compute
    try:
        run_folder = RunDir(preset, run_dir)
        lock = lock_run_folder(run_folder.root, role="run", wait_s=10.0)  # waits only for ending kernels
    except RunFolderBusy as err:
        raise ParamError(str(err)) from None
    except OSError as err:
        raise ParamError(_os_error_line(err, Path(run_dir or f"runs/{preset}"))) from None
    if lock.took_over:
        print(f"realfake run: took over the lock of PID {lock.took_over}, which is no longer running "
              f"({lock.path})", file=sys.stderr, flush=True)
    saved = {k: os.environ.get(k) for k in ("REALFAKE_RUNNER", LOCK_TOKEN_ENV)}
    os.environ["REALFAKE_RUNNER"] = "1"  # the kernel inherits it: notebooks keep injected values
    os.environ[LOCK_TOKEN_ENV] = lock.token  # ... and this token: its rf.setup joins this run's lock
    try:
        return _execute(notebooks, params, run_folder, preset)
    finally:
        lock.release()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_FIXES = {
    errno.ENOSPC: "free space on that disk or choose a run folder on another disk (--run-dir)",
    errno.EDQUOT: "free space within your quota or choose another run folder (--run-dir)",
    errno.EROFS: "the file system is read-only: choose a writable run folder (--run-dir)",
    errno.EACCES: "make the run folder writable for you (chmod / chown) or choose another (--run-dir)",
    errno.EPERM: "make the run folder writable for you (chmod / chown) or choose another (--run-dir)",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another run folder (--run-dir)",
}


def _os_error_line(err: OSError, fallback: Path) -> str:
    """One line for an error from the machine: what, which path, and the fix."""
    path = err.filename or fallback
    fix = _FIXES.get(err.errno or 0, "check the path and the disk, then rerun (finished work is kept)")
    return f"cannot write {path}: {err.strerror or err} ({errno.errorcode.get(err.errno or 0, 'OSError')}); {fix}"


def excluded_note(run_folder: RunDir) -> str:
    """``"; N file(s) excluded, listed in <path>"`` when 01 excluded unreadable files, else ``""``."""
    path = run_folder.artifacts / "data" / "excluded.csv"
    try:
        with open(path, newline="") as f:
            n = sum(1 for _ in csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return ""
    return f"; {n} file(s) excluded, listed in {path}" if n else ""


def _execute(notebooks: list[str], params: dict, run_folder: RunDir, preset: str) -> RunDir:
    import papermill as pm

    log = run_folder.root / "run.log"
    kernel = _kernel_name()
    print(f"realfake run: preset '{preset}', {len(notebooks)} notebook(s) -> {run_folder.root}", flush=True)
    t_all = time.time()
    for i, nb in enumerate(notebooks, 1):
        out = run_folder.root / f"{nb}.ipynb"
        print(f"[{i}/{len(notebooks)}] {nb} ...", end=" ", flush=True)
        t0 = time.time()
        try:
            with _stderr_to(run_folder.root / "kernels.log"), _progress_to(run_folder.root / "progress.log", nb):
                pm.execute_notebook(str(_params.NOTEBOOK_DIR / f"{nb}.ipynb"), str(out), parameters=params[nb],
                                    kernel_name=kernel, cwd=str(_params.NOTEBOOK_DIR), progress_bar=False,
                                    log_output=True)
        except pm.PapermillExecutionError as err:
            dt = time.time() - t0
            print(f"FAILED after {dt:.0f}s", flush=True)
            hint = ""
            if err.ename in ("OSError", "PermissionError") and "No space left" in str(err.evalue):
                hint = f"\n  {_FIXES[errno.ENOSPC]}"
            msg = (f"{nb} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                   f"  executed notebook with the traceback: {out}{hint}")
            _log(log, f"{nb} FAILED {dt:.1f}s: {err.ename}: {err.evalue}")
            raise SystemExit(msg) from None
        except OSError as err:  # the machine: full disk, read-only or vanished folder, ...
            dt = time.time() - t0
            print(f"FAILED after {dt:.0f}s", flush=True)
            line = _os_error_line(err, out)
            _log(log, f"{nb} FAILED {dt:.1f}s: {line}")
            raise SystemExit(f"{nb}: {line}") from None
        except Exception as err:  # papermill / kernel start-up problems: one line, logged
            dt = time.time() - t0
            print(f"FAILED after {dt:.0f}s", flush=True)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            _log(log, f"{nb} FAILED {dt:.1f}s: {type(err).__name__}: {first}")
            raise SystemExit(f"{nb} failed: {type(err).__name__}: {first} (kernel output: "
                             f"{run_folder.root / 'kernels.log'})") from None
        dt = time.time() - t0
        note = excluded_note(run_folder) if nb.startswith("01_") else ""
        print(f"ok ({dt:.0f}s){note}", flush=True)
        _log(log, f"{nb} ok {dt:.1f}s{note} params={params[nb]}")
    total = time.time() - t_all
    print(f"done in {total / 60:.1f} min. Results: {run_folder.results}  Figures: {run_folder.figures}")
    report = run_folder.root / "REPORT.md"
    if report.exists():
        print(f"Report: {report}")
    _log(log, f"run of {notebooks} done in {total:.1f}s")
    return run_folder


@contextmanager
def _progress_to(path: Path, nb: str):
    """Stream the cells' printed output (progress bars included) to ``path`` as it happens, each line
    stamped with the time and the notebook: ``tail -f runs/<preset>/progress.log`` follows a batch run."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {nb} %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("papermill")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False        # not to the terminal, which shows one line per notebook
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        handler.close()


@contextmanager
def _stderr_to(path: Path):
    """Send file descriptor 2 (inherited by the kernel process) to ``path`` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "a") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _log(path: Path, line: str) -> None:
    try:
        with open(path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
    except OSError as err:  # the log is on the same full / read-only disk: say so, do not mask the cause
        print(f"realfake: could not append to {path}: {err.strerror}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="realfake", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("presets", help="list presets")
    show = sub.add_parser("show", help="print a preset resolved per notebook")
    show.add_argument("name")
    show.add_argument("-p", dest="params", action="append", metavar="KEY=VALUE")
    r = sub.add_parser("run", help="run notebooks of a preset with papermill")
    r.add_argument("--preset", default="digits")
    r.add_argument("--only", help="comma-separated notebook numbers, e.g. 00,03")
    r.add_argument("--from", dest="start", help="first notebook to run, e.g. 02")
    r.add_argument("-p", dest="params", action="append", metavar="KEY=VALUE",
                   help="override a parameter (YAML value), repeatable")
    r.add_argument("--run-dir", default="", help="run folder (default runs/<preset>)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "presets":
            for name, desc in list_presets().items():
                print(f"{name:16s} {desc.splitlines()[0] if desc else ''}")
        elif args.cmd == "show":
            print(show_text(args.name, parse_overrides(args.params)))
        else:
            run(args.preset, args.only, args.start, parse_overrides(args.params), args.run_dir)
    except ParamError as err:
        print(f"realfake: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

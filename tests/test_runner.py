"""The `realfake` command: validation before compute, papermill execution, failures."""
import json

import pytest

from realfake_utils import params, runner
from tests.test_params import make_notebook, world  # noqa: F401  (fixture)


BETA = 'preset = "digits"\nrun_dir = ""\nimage_size = 16\nsteps = 10\nuse_dm = True\nks = [1, 2]'


@pytest.fixture
def nb_world(world):  # noqa: F811
    marker = world / "executed.txt"
    body = (f"from pathlib import Path\nPath({str(marker)!r}).write_text(str(image_size))\n"
            "import json, os\nos.makedirs(os.path.join(run_dir, 'results'), exist_ok=True)\n"
            "json.dump({'steps': steps}, open(os.path.join(run_dir, 'results', '01_beta.json'), 'w'))")
    make_notebook(world / "notebooks" / "01_beta.ipynb",
                  'preset = "digits"\nrun_dir = ""\nimage_size = 16\nsteps = 10\nuse_dm = True\nks = [1, 2]', body)
    make_notebook(world / "notebooks" / "02_fail.ipynb", 'preset = "digits"\nrun_dir = ""',
                  "raise ValueError('planted failure')")
    return world, marker


def run_01_with(world, body: str):
    """`realfake run --preset small --only 01` with 01's code cell replaced by ``body``; returns the run folder."""
    make_notebook(world / "notebooks" / "01_beta.ipynb", BETA, body)
    run_dir = world / "run"
    runner.main(["run", "--preset", "small", "--only", "01", "--run-dir", str(run_dir)])
    return run_dir


def test_select_notebooks(nb_world):
    assert runner.select_notebooks("1", None) == ["01_beta"]
    assert runner.select_notebooks(None, "01") == ["01_beta", "02_fail"]
    assert runner.select_notebooks("00,02", None) == ["00_alpha", "02_fail"]
    with pytest.raises(params.ParamError, match="no notebook '07'"):
        runner.select_notebooks("07", None)


def test_misspelled_parameter_is_refused_before_any_compute(nb_world, capsys):
    world, marker = nb_world
    with pytest.raises(SystemExit) as err:
        runner.main(["run", "--preset", "small", "--run-dir", str(world / "run"), "-p", "stepz=3"])
    assert err.value.code == 2
    assert "'stepz' is not a parameter of any notebook" in capsys.readouterr().err
    assert not marker.exists() and not (world / "run").exists()


def test_run_executes_with_papermill_and_reports_failures(nb_world, capsys):
    world, marker = nb_world
    run_dir = world / "run"
    runner.main(["run", "--preset", "small", "--only", "01", "--run-dir", str(run_dir), "-p", "steps=3"])
    assert marker.read_text() == "8"  # the preset's shared image_size reached the kernel
    assert json.loads((run_dir / "results" / "01_beta.json").read_text()) == {"steps": 3}
    assert (run_dir / "01_beta.ipynb").exists() and "01_beta ok" in (run_dir / "run.log").read_text()
    assert "[1/1] 01_beta ... ok" in capsys.readouterr().out
    # the cells' output streams into progress.log as they run (a batch run is followed with tail -f)
    make_notebook(world / "notebooks" / "01_beta.ipynb", BETA, "print('step 7 of 10')")
    runner.main(["run", "--preset", "small", "--only", "01", "--run-dir", str(run_dir)])
    assert any(line.endswith("01_beta step 7 of 10") or " 01_beta step 7 of 10" in line
               for line in (run_dir / "progress.log").read_text().splitlines())
    assert "step 7 of 10" not in capsys.readouterr().out   # the terminal keeps one line per notebook
    with pytest.raises(SystemExit, match="02_fail failed in cell .*ValueError: planted failure"):
        runner.main(["run", "--preset", "small", "--from", "02", "--run-dir", str(run_dir)])


def test_presets_and_show_commands(nb_world, capsys):
    runner.main(["presets"])
    out = capsys.readouterr().out
    assert "small" in out and "digits" in out
    runner.main(["show", "small"])
    assert "steps: 2" in capsys.readouterr().out


def test_a_second_run_on_a_held_folder_is_refused_at_once(nb_world, capsys):
    """Another process holds the run folder (it signals through a pipe once it does): refused in one
    line naming its PID and the lock file; after it is killed, its stale lock is taken over."""
    from tests.test_rundir import hold, release

    world, marker = nb_world
    run_dir = world / "run"
    proc, _ = hold(run_dir)
    try:
        with pytest.raises(SystemExit) as err:
            runner.main(["run", "--preset", "small", "--only", "01", "--run-dir", str(run_dir)])
        assert err.value.code == 2
        msg = capsys.readouterr().err.strip()
        assert len(msg.splitlines()) == 1 and f"PID {proc.pid}" in msg and ".realfake.lock" in msg
        assert not marker.exists() and not (run_dir / "run.log").exists()   # nothing ran, nothing logged
    finally:
        release(proc, kill=True)
    runner.main(["run", "--preset", "small", "--only", "01", "--run-dir", str(run_dir)])
    assert f"took over the lock of PID {proc.pid}" in capsys.readouterr().err
    assert marker.exists()


def test_the_runners_kernel_shares_its_lock(nb_world):
    """The kernel `realfake run` starts joins the run's lock with the token it inherits (rf.setup does
    this); a second owner would be refused."""
    world, _ = nb_world
    body = ("import os\nfrom realfake_utils import rundir\n"
            "lock = rundir.lock_run_folder(run_dir, role='kernel', token=os.environ['REALFAKE_LOCK_TOKEN'])\n"
            "open(os.path.join(run_dir, 'kernel_lock.txt'), 'w').write(lock.role + ' ' + lock.token)")
    run_dir = run_01_with(world, body)
    role, token = (run_dir / "kernel_lock.txt").read_text().split()
    assert role == "kernel" and len(token) == 16


def test_p_run_dir_is_the_run_folder(nb_world):
    world, marker = nb_world
    run_dir = world / "elsewhere"
    runner.main(["run", "--preset", "small", "--only", "01", "-p", f"run_dir={run_dir}"])
    assert (run_dir / "run.log").exists() and (run_dir / "01_beta.ipynb").exists()
    assert (run_dir / "results" / "01_beta.json").exists()   # notebooks and logs in one folder
    with pytest.raises(params.ParamError, match="disagree"):
        runner.run("small", "01", None, {"run_dir": str(run_dir)}, str(world / "other"))


def test_an_unwritable_run_folder_is_one_line_naming_path_and_fix(nb_world, capsys):
    world, marker = nb_world
    (world / "afile").write_text("x")
    bad = world / "afile" / "run"   # a file where a folder must be (a chmod is no test as root)
    with pytest.raises(SystemExit) as err:
        runner.main(["run", "--preset", "small", "--only", "01", "--run-dir", str(bad)])
    assert err.value.code == 2
    msg = capsys.readouterr().err.strip()
    assert len(msg.splitlines()) == 1 and "afile" in msg and "ENOTDIR" in msg and "--run-dir" in msg
    assert not marker.exists()


def test_a_full_disk_is_one_line_and_a_failed_line_in_run_log(nb_world, capsys):
    """A real ENOSPC: the executed notebook's path is a link to /dev/full, which refuses every write."""
    world, marker = nb_world
    run_dir = world / "run"
    run_dir.mkdir()
    (run_dir / "01_beta.ipynb").symlink_to("/dev/full")
    with pytest.raises(SystemExit) as err:
        runner.main(["run", "--preset", "small", "--only", "01", "--run-dir", str(run_dir)])
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and "No space left on device" in msg and "free space" in msg
    assert "ENOSPC" in msg
    assert "01_beta FAILED" in (run_dir / "run.log").read_text()
    assert "[1/1] 01_beta ... FAILED" in capsys.readouterr().out


def test_the_terminal_line_of_01_names_the_excluded_files(nb_world, capsys):
    world, _ = nb_world
    body = ("import os\nd = os.path.join(run_dir, 'artifacts', 'data')\nos.makedirs(d, exist_ok=True)\n"
            "open(os.path.join(d, 'excluded.csv'), 'w').write("
            "'path,reason,class_name\\n/x/a.png,truncated,a\\n/x/b.png,not an image,b\\n')")
    run_dir = run_01_with(world, body)
    out = capsys.readouterr().out
    assert f"2 file(s) excluded, listed in {run_dir.resolve() / 'artifacts' / 'data' / 'excluded.csv'}" in out


def test_show_prints_the_resolved_table_6_7_8_values(capsys):
    """`realfake show imagenette` ends with the paper's recipe tables as the preset resolves them: Table 6
    (03's sampler), Table 7 (02's LoRA), Table 8 (04's recipe file cell by cell, recipe_overrides applied)."""
    import yaml

    runner.main(["show", "imagenette"])
    out = capsys.readouterr().out
    tables = yaml.safe_load(out.split("# The paper's recipe tables", 1)[1].split("\n", 1)[1])["paper_tables"]
    t6, t7, t8 = (tables[k] for k in tables)                     # in this order
    assert next(iter(tables)).startswith("Table 6") and list(tables)[2].startswith("Table 8")
    # Table 6: UniPC, 30 steps, guidance 2.0, img strength 0.75, 512 px
    assert (t6["num_inference_steps"], t6["guidance_scale"], t6["latent_prior_strength"], t6["image_size"]) == \
        (30, 2.0, 0.75, 512) and t6["sampler"].startswith("UniPC")
    # Table 7: lr 1e-4, batch 8 x 8, 300 epochs, SNR-gamma 0.75, 512 px; Eq. 21 with gamma 0.05
    assert (t7["learning_rate"], t7["global_batch_size"], t7["num_train_epochs"], t7["snr_gamma"],
            t7["image_size"], t7["dm_loss_weight"]) == (1e-4, 64, 300, 0.75, 512, 0.05)
    assert "max_train_steps" not in t7                          # epochs decide in the paper presets
    recipe = yaml.safe_load((params.PRESET_DIR / "recipes" / "imagenette.yaml").read_text())
    for key in runner.TABLE8_CLASSIFIER:                         # every cell, as in the recipe file
        assert t8[key] == recipe[key], key
    assert (t8["epochs"], t8["global_batch_size"], t8["lr"], t8["hflip"]) == (200, 1024, 0.1, 0.0)
    assert "Table 8" in t8["sources"]["table8"]
    over = runner.recipe_tables(params.resolve("imagenette", {"recipe_overrides": {"epochs": 1}}))
    t8_over = next(v for k, v in over.items() if k.startswith("Table 8"))
    assert t8_over["epochs"] == 1 and "recipe_overrides" in [k for k in over if k.startswith("Table 8")][0]
    digits = runner.recipe_tables(params.resolve("digits"))
    assert next(v for k, v in digits.items() if "recipes/miniature.yaml" in k)["train_size"] == 16

"""The `realfake` command: validation before compute, papermill execution, failures."""
import json

import pytest

from realfake_utils import params, runner
from tests.test_params import make_notebook, world  # noqa: F401  (fixture)


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
    with pytest.raises(SystemExit, match="02_fail failed in cell .*ValueError: planted failure"):
        runner.main(["run", "--preset", "small", "--from", "02", "--run-dir", str(run_dir)])


def test_presets_and_show_commands(nb_world, capsys):
    runner.main(["presets"])
    out = capsys.readouterr().out
    assert "small" in out and "digits" in out
    runner.main(["show", "small"])
    assert "steps: 2" in capsys.readouterr().out

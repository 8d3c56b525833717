"""Step 01's checks and record (realfake_utils.prepare, realfake_utils.probe): the capacity oracle,
PrepareRecord round trip, the sample probe and the MMD report."""
from __future__ import annotations

import pytest
import torch

from realfake_utils import prepare, probe
from realfake_utils import pretrain as P
from tests.test_pretrain import NAMES, TINY, _digits

torch.set_num_threads(1)

def test_oracle_and_prepare_record_round_trip(tmp_path):
    from realfake_utils.rundir import RunDir

    run = RunDir("smoke", tmp_path / "run")
    rows = [{"id": f"d{i}", "label": i % 4, "path": ""} for i in range(24)]
    x = _digits(24)
    cfg = P.MiniatureConfig(**TINY)
    res = P.build_miniature(run.artifacts, rows, x, NAMES, cfg, log=lambda *a: None)
    train = (x[:16], torch.tensor([i % 4 for i in range(16)]))
    test = (x[16:], torch.tensor([i % 4 for i in range(16, 24)]))
    prompts = [f"photo of {NAMES[i % 4]}" for i in range(16)]
    check, part, sx, sy = prepare.oracle_check(run.artifacts, NAMES, train, test, rows[:16], prompts, cfg,
                                               sample_steps=2, device="cpu", log=lambda *a: None)
    assert part.built and part.steps == 2 and sx.shape == (16, 3, 16, 16) and sorted(sy.tolist()) == sorted(train[1].tolist())
    assert 0 <= check.synthetic_top1 <= 100 and check.gap == pytest.approx(check.real_top1 - check.synthetic_top1)
    # the goal is the caller's max_gap (01's max_oracle_gap), reused from the cached oracle
    loose, *_ = prepare.oracle_check(run.artifacts, NAMES, train, test, rows[:16], prompts, cfg, sample_steps=2,
                                     device="cpu", log=lambda *a: None, max_gap=check.gap + 1.0)
    assert loose.max_gap == check.gap + 1.0 and loose.within_goal
    again = P.train_oracle(run.artifacts, rows[:16], train[0], prompts, cfg, log=lambda *a: None)
    assert not again.built and again.final_loss == part.final_loss
    parts = dict(res["parts"], oracle=part)
    rec = prepare.PrepareRecord.build(
        run, parts, dataset="digits", image_size=16, class_names=NAMES, counts={"pool": 24, "train": 16, "test": 8},
        excluded=0, excluded_list=str(run.artifacts / "data" / "excluded.csv"), base_model=str(res["base"]),
        clip_model=str(res["clip"]), clip_projection_dim=16, captioner="none", oracle=check)
    rec.save(run)
    back = prepare.PrepareRecord.load(run)
    assert back == rec and back.parts["base"].path == "artifacts/miniature/base"
    assert back.excluded_list == "artifacts/data/excluded.csv" and back.oracle.gap == check.gap
    fig = P.loss_figure(back.parts if False else parts)
    assert len(fig.axes) == 4


def test_sample_probe_and_mmd_report():
    from realfake_utils.data import digits_array

    x = digits_array(range(400), 16)
    from sklearn.datasets import load_digits
    y = torch.from_numpy(load_digits().target[:400])
    acc = probe.probe_accuracy(x[:300], y[:300], {"test": (x[300:], y[300:]), "wrong": (x[300:], (y[300:] + 1) % 10)})
    assert acc["test"] > 0.9 and acc["wrong"] < 0.1
    f = torch.randn(200, 8)
    rep = probe.mmd_report(f[:60] + 2.0, f[60:130], f[130:])
    assert rep["ratio"] > 3 and rep["mmd2_vs_train"] > rep["noise_floor"]


def test_mmd_ratio_compares_equal_sample_sizes():
    # samples from the target itself must sit at the noise floor (ratio ~1) whatever their number: at
    # unequal sizes the biased estimate's 1/n term alone would put 50 samples ~3x above 400 test points
    g = torch.Generator().manual_seed(0)
    train, test, few = (torch.randn(n, 8, generator=g) for n in (300, 400, 50))
    rep = probe.mmd_report(few, train, test)
    assert rep["n_equal"] == 50 and 0.7 < rep["ratio"] < 1.4
    naive = float(probe._mmd2(few, train, unbiased=False, kernel="gaussian", bandwidth=rep["bandwidth"])) / float(
        probe._mmd2(test, train, unbiased=False, kernel="gaussian", bandwidth=rep["bandwidth"]))
    assert naive > 1.8                                  # what the unequal-size ratio reported
    assert probe.mmd_report(test, train, few)["n_equal"] == 50   # the larger side is drawn down, either way

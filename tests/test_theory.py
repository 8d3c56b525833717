"""realfake_utils.theory: the helpers behind notebook 00 (tiny sizes)."""
import math

import numpy as np
import pytest
import torch

from realfake_utils import theory as T


def test_hoeffding_bound_by_hand():
    # sqrt((ln 100 + ln 20) / (2 * 50))
    assert T.hoeffding_bound(50, 100, 0.05) == pytest.approx(math.sqrt((math.log(100) + math.log(20)) / 100))
    # two-sided: ln(2 |H| / delta)
    assert T.hoeffding_bound(50, 100, 0.05, two_sided=True) == pytest.approx(
        math.sqrt(math.log(2 * 100 / 0.05) / 100))
    # |H| = 1, delta = e^-2, n = 4: sqrt(2 / 8) = 0.5
    assert T.hoeffding_bound(4, 1, math.exp(-2)) == pytest.approx(0.5)
    arr = T.hoeffding_bound(np.array([4, 16]), 1, math.exp(-2))
    assert arr.tolist() == pytest.approx([0.5, 0.25])
    with pytest.raises(ValueError):
        T.hoeffding_bound(10, 0, 0.05)


def test_jensen_helpers():
    r = T.jensen_random(40, 4, 32, seed=1)
    assert r["holds"] == 40 and np.all(r["dm"] <= r["l_simple"] * (1 + 1e-6))
    adv = T.jensen_adversarial(4, 16, steps=40, seed=0)
    assert adv["max_ratio"] <= 1 + 1e-6 and adv["ratios"][-1] > adv["ratios"][0]
    dm, ls = T.jensen_equality(5, 16)
    assert dm == pytest.approx(ls, rel=1e-6)
    dm, ls = T.jensen_cancelling(6, 16)
    assert dm < 1e-12 < ls
    gap = T.jensen_gap_vs_batch([1, 4, 16], 30, 128)
    assert gap["mean_ratio"][0] == pytest.approx(1.0)
    assert np.allclose(gap["mean_ratio"], gap["expected_ratio"], rtol=0.2)


def test_official_vs_paper_small():
    o = T.official_vs_paper(6, 4, shape=(2, 4, 4))
    assert np.allclose(o["ratio_unweighted"], 1.0, rtol=1e-5)
    assert o["cs_holds"] == 6 and o["bsz2_holds"] == 6
    assert o["effective_mean_form_weight"] == pytest.approx(0.003 * 16)


def test_hoeffding_experiment_small():
    errors, info = T.digits_hypothesis_errors(10, seed=0)
    assert errors.shape == (10, info["n_population"]) and set(np.unique(errors)) <= {0.0, 1.0}
    assert 0 < info["risk_min"] <= info["risk_max"] < 1
    hx = T.hoeffding_experiment(errors, [20, 200], 20, delta=0.05, seed=0)
    assert hx["bound"][0] > hx["bound"][1]
    assert all(g <= b for g, b in zip(hx["mean_sup_gap"], hx["bound"]))
    assert hx["bound_single_h"][0] < hx["bound"][0]


def test_short_diffusion_run_logs_both_losses():
    images = (T.digits_images(8)[:64] * 127.5 + 127.5).round().to(torch.uint8)  # uint8 is accepted
    cfg = T.tiny_unet_config(8, 1, width=8)
    before = torch.get_num_threads()
    out = T.short_diffusion_run(images, 3, batch_size=4, unet_config=cfg, seed=0)
    assert torch.get_num_threads() == before
    assert out["l_simple"].shape == (3,) and out["l_dm"].shape == (3,)
    assert np.all(out["l_dm"] <= out["l_simple"] * (1 + 1e-6)) and np.all(out["l_dm"] > 0)
    again = T.short_diffusion_run(images, 3, batch_size=4, unet_config=cfg, seed=0)
    assert np.allclose(out["l_simple"], again["l_simple"])  # seeded

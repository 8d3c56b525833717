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


def test_mmd_estimators_check_agrees_with_sklearn():
    e = T.mmd_estimators_check(40)
    assert e["points_per_sample"] == 40
    assert e["linear"] == pytest.approx(e["mean_embedding_sq_distance"], rel=1e-9)
    assert e["gaussian_biased"] == pytest.approx(e["sklearn_biased"], rel=1e-9)
    assert e["gaussian_unbiased"] == pytest.approx(e["sklearn_unbiased"], rel=1e-9)
    assert e["gaussian_biased"] > e["gaussian_unbiased"]


def test_gaussian_sample_and_permutation_check():
    g = torch.Generator().manual_seed(0)
    x = T.gaussian_sample(2000, g, dim=3, shift=2.0)
    assert x.shape == (2000, 3) and x.mean().item() == pytest.approx(2.0, abs=0.1)
    # a shift of 3 standard deviations is found every time at n = 30; the null rarely
    res = T.mmd_permutation_check([30], trials=4, dim=2, shift=3.0, n_perm=30, seed=0)
    assert res["power"] == [1.0] and res["type1"][0] <= 0.5


def test_hoeffding_check_allowed_violations():
    hx = T.hoeffding_check(8, [50], 20, delta=0.05, seed=0)
    from scipy.stats import binom

    assert hx["allowed_violations"] == int(binom.ppf(0.999, 20, 0.05))
    assert hx["n_hypotheses"] == 8 and len(hx["violations"]) == 1


def test_summaries_and_figures():
    o = T.official_vs_paper(4, 4, shape=(2, 4, 4))
    s = T.official_vs_paper_summary(o)
    assert s["trials"] == 4 and s["max_abs_ratio_error"] < 1e-5 and s["effective_mean_form_weight"] == pytest.approx(0.048)
    dr = {"l_simple": np.array([1.0, 0.5]), "l_dm": np.array([0.2, 0.6]), "steps": 2, "n_params": 3, "seconds": 0.1}
    d = T.diffusion_run_summary(dr, 4)
    assert d["holds"] == 1 and d["final_ratio_x_batch"] == pytest.approx(0.8 / 1.5 * 4)
    gap = T.jensen_gap_vs_batch([1, 4], 5, 8)
    figs = [T.plot_jensen_gap({"a": gap}), T.plot_diffusion_losses(dr, 4),
            T.plot_mmd_power({"ns": [10, 20], "power": [0.1, 0.9], "type1": [0.0, 0.1], "shift": 0.3}),
            T.plot_hoeffding(T.hoeffding_check(4, [20, 40], 5))]
    import matplotlib.pyplot as plt

    assert all(len(f.axes) == 1 and f.axes[0].lines for f in figs)
    for f in figs:
        plt.close(f)

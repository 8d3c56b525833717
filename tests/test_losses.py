"""realfake_utils.losses: hand-computed values, the Jensen bound, MMD against scikit-learn."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import rbf_kernel

from realfake_utils import losses as L

torch.set_num_threads(1)

# Two samples, two elements each. Residuals r = eps - eps_hat: r_0 = (1, 1), r_1 = (-1, 3).
EPS = torch.tensor([[1.0, 2.0], [0.0, 4.0]])
EPS_HAT = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
W = torch.tensor([0.5, 1.0])


def test_l_simple_by_hand():
    # per-sample MSE: (1 + 1)/2 = 1, (1 + 9)/2 = 5; mean over batch 3
    assert L.l_simple(EPS_HAT, EPS).item() == pytest.approx(3.0)
    # weighted: (0.5 * 1 + 1.0 * 5) / 2 = 2.75
    assert L.l_simple(EPS_HAT, EPS, W).item() == pytest.approx(2.75)
    # equals torch's MSE without weights
    assert L.l_simple(EPS_HAT, EPS).item() == pytest.approx(
        torch.nn.functional.mse_loss(EPS_HAT, EPS).item())


def test_min_snr_weights_by_hand():
    ac = torch.tensor([0.5, 0.9, 0.2, 1 / 6])  # SNR = 1, 9, 0.25, 0.2
    t = torch.tensor([0, 1, 2, 3])
    snr = L.compute_snr(t, ac)
    assert snr.tolist() == pytest.approx([1.0, 9.0, 0.25, 0.2])
    # epsilon: min(SNR, 5) / SNR
    assert L.min_snr_weights(t, ac, 5.0).tolist() == pytest.approx([1.0, 5 / 9, 1.0, 1.0])
    # gamma 0.75 (the paper's value) clips more
    assert L.min_snr_weights(t, ac, 0.75).tolist() == pytest.approx([0.75, 0.75 / 9, 1.0, 1.0])
    # v-prediction: min(SNR, gamma) / (SNR + 1)
    assert L.min_snr_weights(t, ac, 5.0, "v_prediction").tolist() == pytest.approx(
        [0.5, 0.5, 0.2, 0.2 / 1.2])
    with pytest.raises(ValueError):
        L.min_snr_weights(t, ac, 5.0, "flow")
    with pytest.raises(ValueError):
        L.min_snr_weights(t, ac, 0.0)


def test_dm_loss_paper_form_by_hand():
    # mean residual = ((1 - 1)/2, (1 + 3)/2) = (0, 2); squared, mean over elements: (0 + 4)/2 = 2
    assert L.dm_loss(EPS_HAT, EPS, "paper", weight=1.0).item() == pytest.approx(2.0)
    assert L.dm_loss(EPS_HAT, EPS, "paper").item() == pytest.approx(0.05 * 2.0)  # paper default
    # Eq. 21's DM term has no per-sample weights: Min-SNR weights are refused in the paper form
    with pytest.raises(ValueError, match="no per-sample"):
        L.dm_loss(EPS_HAT, EPS, "paper", 1.0, W)


def test_dm_loss_official_form_by_hand():
    # sum of residuals = (0, 4); squared, mean over elements: 8
    assert L.dm_loss(EPS_HAT, EPS, "official", weight=1.0).item() == pytest.approx(8.0)
    assert L.dm_loss(EPS_HAT, EPS, "official").item() == pytest.approx(0.003 * 8.0)
    # weighted sums: (0.5*1 - 1, 0.5*1 + 3) = (-0.5, 3.5) -> (0.25 + 12.25)/2 = 6.25
    assert L.dm_loss(EPS_HAT, EPS, "official", 1.0, W).item() == pytest.approx(6.25)
    # the official code's expression, literally
    pred_ws = (EPS_HAT * W.view(2, 1)).sum(0)
    tgt_ws = (EPS * W.view(2, 1)).sum(0)
    assert L.dm_loss(EPS_HAT, EPS, "official", 0.003, W).item() == pytest.approx(
        0.003 * torch.nn.functional.mse_loss(pred_ws, tgt_ws).item())
    with pytest.raises(ValueError):
        L.dm_loss(EPS_HAT, EPS, "sum")


def _independent_eq21(eps_hat, eps, gamma, snr_w=None):
    """Eq. 21 written out element by element with numpy (float64): L_simple (Min-SNR weights on it
    when given) + gamma * ||mean_i r_i||^2, both per element (divided by D), no weights in the mean."""
    e, h = eps.double().numpy().reshape(len(eps), -1), eps_hat.double().numpy().reshape(len(eps), -1)
    b, d = e.shape
    w = np.ones(b) if snr_w is None else snr_w.double().numpy()
    ls = sum(w[i] * sum((e[i, j] - h[i, j]) ** 2 for j in range(d)) / d for i in range(b)) / b
    mean_r = [sum(e[i, j] - h[i, j] for i in range(b)) / b for j in range(d)]
    return ls + gamma * sum(m * m for m in mean_r) / d, ls


def _independent_official(eps_hat, eps, weight, snr_w=None):
    """The official code's loss, written out: mean_i(w_i MSE_i) + weight * MSE(sum_i w_i eps_hat_i,
    sum_i w_i eps_i)."""
    e, h = eps.double().numpy().reshape(len(eps), -1), eps_hat.double().numpy().reshape(len(eps), -1)
    b, d = e.shape
    w = np.ones(b) if snr_w is None else snr_w.double().numpy()
    ls = float(np.mean([w[i] * np.mean((h[i] - e[i]) ** 2) for i in range(b)]))
    ps, ts = (w[:, None] * h).sum(0), (w[:, None] * e).sum(0)
    return ls + weight * float(np.mean((ps - ts) ** 2)), ls


@pytest.mark.parametrize("snr_gamma", [None, 0.75, 5.0])
def test_overall_loss_matches_eq21_and_official_code(snr_gamma):
    """Both forms against values computed independently, with and without Min-SNR, on a batch with
    timesteps of the SD 1.5 schedule (where Min-SNR weights differ strongly between samples)."""
    from realfake_utils.models import SD_SCHEDULER_CONFIG

    c = SD_SCHEDULER_CONFIG
    betas = torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, c["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(4)
    eps, eps_hat = torch.randn(6, 2, 3, 3, generator=g), torch.randn(6, 2, 3, 3, generator=g) * 0.7
    t = torch.tensor([5, 80, 300, 520, 760, 990])
    w = None if snr_gamma is None else L.min_snr_weights(t, ac, snr_gamma)
    if w is not None:
        assert w.max() / w.min() > 5                      # the weights really differ across the batch
    total, ls, ld = L.overall_loss(eps_hat, eps, True, "paper", 0.05, w)
    ref_total, ref_ls = _independent_eq21(eps_hat, eps, 0.05, w)
    assert total.item() == pytest.approx(ref_total, rel=1e-5) and ls.item() == pytest.approx(ref_ls, rel=1e-5)
    assert ld.item() == pytest.approx(ref_total - ref_ls, rel=1e-4)
    total, ls, ld = L.overall_loss(eps_hat, eps, True, "official", 0.003, w)
    ref_total, ref_ls = _independent_official(eps_hat, eps, 0.003, w)
    assert total.item() == pytest.approx(ref_total, rel=1e-5) and ls.item() == pytest.approx(ref_ls, rel=1e-5)
    total, ls, ld = L.overall_loss(eps_hat, eps, False, "paper", 0.05, w)
    assert total.item() == pytest.approx(ref_ls, rel=1e-5) and ld.item() == 0.0


def test_official_is_bsz_squared_times_paper():
    g = torch.Generator().manual_seed(0)
    for bsz in (1, 3, 8):
        a, b = torch.randn(bsz, 4, 5, 5, generator=g), torch.randn(bsz, 4, 5, 5, generator=g)
        off = L.dm_loss(a, b, "official", 1.0).item()
        pap = L.dm_loss(a, b, "paper", 1.0).item()
        assert off == pytest.approx(bsz**2 * pap, rel=1e-5)


def test_jensen_paper_form_never_exceeds_l_simple():
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        bsz = int(torch.randint(1, 17, (1,), generator=g))
        shape = (bsz, 3, 4, 4)
        scale = float(torch.rand(1, generator=g) * 10)
        eps = torch.randn(shape, generator=g) * scale
        eps_hat = torch.randn(shape, generator=g) + torch.randn(1, 3, 4, 4, generator=g) * scale
        assert L.dm_loss(eps_hat, eps, "paper", 1.0).item() <= L.l_simple(eps_hat, eps).item() * (1 + 1e-6)


def test_jensen_adversarial_and_equality():
    # equality: all residuals equal
    r = torch.randn(1, 2, 3, 3).repeat(6, 1, 1, 1)
    eps_hat = torch.zeros_like(r)
    assert L.dm_loss(eps_hat, r, "paper", 1.0).item() == pytest.approx(L.l_simple(eps_hat, r).item(),
                                                                       rel=1e-6)
    # adversary: gradient ascent on dm / l_simple cannot push the ratio above 1
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    zeros = torch.zeros(8, 16)
    for _ in range(100):
        ratio = L.dm_loss(zeros, x, "paper", 1.0) / L.l_simple(zeros, x)
        assert ratio.item() <= 1 + 1e-6
        (grad,) = torch.autograd.grad(ratio, x)
        with torch.no_grad():
            x += 0.05 * grad / grad.norm() * x.norm()
    assert ratio.item() > 0.99  # it converges to the equality case
    # cancelling residuals: dm = 0 while l_simple > 0
    r = torch.tensor([[1.0, -2.0], [-1.0, 2.0]])
    assert L.dm_loss(torch.zeros_like(r), r, "paper", 1.0).item() == 0.0


def test_mmd_gaussian_matches_sklearn():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 5)), rng.normal(0.5, 1.0, size=(25, 5))
    bw = 1.7
    gamma = 1 / (2 * bw**2)
    kxx, kyy, kxy = rbf_kernel(x, x, gamma=gamma), rbf_kernel(y, y, gamma=gamma), rbf_kernel(x, y, gamma=gamma)
    n, m = len(x), len(y)
    biased = kxx.mean() + kyy.mean() - 2 * kxy.mean()
    unbiased = ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                - 2 * kxy.mean())
    assert L.mmd2(x, y, bandwidth=bw, unbiased=False) == pytest.approx(biased, rel=1e-10)
    assert L.mmd2(x, y, bandwidth=bw, unbiased=True) == pytest.approx(unbiased, rel=1e-10)
    # median heuristic: the median pairwise distance of the pooled sample
    z = np.concatenate([x, y])
    d = np.sqrt(((z[:, None] - z[None]) ** 2).sum(-1))[np.triu_indices(len(z), 1)]
    assert L.median_bandwidth(z) == pytest.approx(np.median(d), rel=1e-9)
    assert L.median_bandwidth(z[:-1]) == pytest.approx(np.median(  # an even number of pairs
        np.sqrt(((z[:-1, None] - z[None, :-1]) ** 2).sum(-1))[np.triu_indices(len(z) - 1, 1)]), rel=1e-9)
    # torch input gives the same
    assert L.mmd2(torch.tensor(x), torch.tensor(y)) == pytest.approx(L.mmd2(x, y), rel=1e-12)


def test_mmd_blocks_equal_full(monkeypatch):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(70, 3)), rng.normal(size=(50, 3))
    full = L.mmd2(x, y)
    monkeypatch.setattr(L, "_BLOCK", 16)
    assert L.mmd2(x, y) == pytest.approx(full, rel=1e-10)


def test_linear_mmd_is_mean_embedding_distance():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 6)), rng.normal(1.0, 2.0, size=(55, 6))
    dist = float(((x.mean(0) - y.mean(0)) ** 2).sum())
    assert L.mmd2(x, y, kernel="linear", unbiased=False) == pytest.approx(dist, rel=1e-10)
    with pytest.raises(ValueError):
        L.mmd2(x, y, kernel="poly")


def test_permutation_test_p_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=g)
    y_same = torch.randn(60, 4, generator=g)
    y_shift = torch.randn(60, 4, generator=g) + 1.0
    stat, p = L.mmd_permutation_test(x, y_shift, n_perm=200, seed=0)
    assert stat == pytest.approx(L.mmd2(x, y_shift), rel=1e-8)
    assert p == pytest.approx(1 / 201)
    _, p_same = L.mmd_permutation_test(x, y_same, n_perm=200, seed=0)
    assert p_same > 0.05
    # deterministic given the seed; biased statistic and linear kernel work too
    assert L.mmd_permutation_test(x, y_same, n_perm=50, seed=3) == L.mmd_permutation_test(
        x, y_same, n_perm=50, seed=3)
    s_lin, p_lin = L.mmd_permutation_test(x, y_shift, n_perm=100, kernel="linear", unbiased=False)
    assert s_lin == pytest.approx(float(((x.mean(0) - y_shift.mean(0)) ** 2).sum()), rel=1e-8)
    assert p_lin < 0.05
    assert math.isfinite(p_same)

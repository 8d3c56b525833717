"""Numerical checks of the paper's theory (Real-Fake, Sec. 3, Apx. B, C), used by notebook 00.

* Jensen bound of Eq. 7: ``||1/B sum_i r_i||^2 <= 1/B sum_i ||r_i||^2`` for residuals
  ``r_i = eps_i - eps_hat_i`` -- random batches (:func:`jensen_random`), an adversary that maximises
  the ratio by gradient ascent (:func:`jensen_adversarial`), the equality case (all residuals equal,
  :func:`jensen_equality`) and the gap as the batch grows (:func:`jensen_gap_vs_batch`).
* Official vs paper form of the DM loss (:func:`official_vs_paper`): with unit weights
  ``official = B^2 * paper``; with Min-SNR weights ``0 < w_i <= 1``, Cauchy-Schwarz
  ``||sum_i w_i r_i||^2 <= (sum_i w_i^2)(sum_i ||r_i||^2)`` and ``official <= B^2 * L_simple(w)``.
* Hoeffding + union bound of Eq. 3 / 14 (:func:`hoeffding_bound`) and its empirical check on the
  digits with a finite, fixed hypothesis class (:func:`hoeffding_experiment`).
* MMD (Eq. 5, 6, 20): the kit's estimators against scikit-learn's kernel matrices
  (:func:`mmd_estimators_check`) and the permutation test's power and size (:func:`mmd_permutation_check`).
* :func:`short_diffusion_run`: a short real DDPM training (tiny diffusers ``UNet2DModel``,
  ``DDPMScheduler.add_noise``, AdamW) that logs ``L_simple`` and the batch ``L_DM`` every step.
* ``plot_*``: the notebook's figures, one function each.
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import numpy as np
import torch

from . import losses as L


def _ratio(residuals: torch.Tensor) -> tuple[float, float]:
    """(paper-form DM loss, L_simple) of a batch of residuals (weight 1, no SNR weights)."""
    zeros = torch.zeros_like(residuals)
    return (L.dm_loss(zeros, residuals, "paper", 1.0).item(), L.l_simple(zeros, residuals).item())


# --------------------------------------------------------------------------------------------------
# Jensen (Eq. 7)
# --------------------------------------------------------------------------------------------------
def jensen_random(n_trials: int, batch_size: int, dim: int, seed: int = 0,
                  rel_tol: float = 1e-6) -> dict[str, Any]:
    """Random residual batches of several kinds: iid Gaussian, a shared offset plus noise (the
    residuals of a biased model), heavy-tailed (Student t, 2 dof) and a random per-sample scale.
    Returns {"dm", "l_simple" (arrays), "holds" (count), "n"}.
    """
    g = torch.Generator().manual_seed(seed)
    dm, ls = np.empty(n_trials), np.empty(n_trials)
    t_dist = torch.distributions.StudentT(2.0)
    for k in range(n_trials):
        kind = k % 4
        shape = (batch_size, dim)
        if kind == 0:
            r = torch.randn(shape, generator=g)
        elif kind == 1:
            r = torch.randn(1, dim, generator=g) * 3 + torch.randn(shape, generator=g)
        elif kind == 2:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            r = t_dist.sample(shape)
        else:
            r = torch.randn(shape, generator=g) * torch.rand(batch_size, 1, generator=g) * 10
        dm[k], ls[k] = _ratio(r)
    holds = int(np.sum(dm <= ls * (1 + rel_tol)))
    return {"dm": dm, "l_simple": ls, "holds": holds, "n": n_trials}


def jensen_adversarial(batch_size: int, dim: int, steps: int = 300, lr: float = 0.05,
                       seed: int = 0) -> dict[str, Any]:
    """An adversary runs normalised gradient ascent on ``ratio = L_DM / L_simple`` over the residuals,
    from a random start. Jensen says the ratio never exceeds 1; the adversary converges to the
    equality case (all residuals equal). Returns {"ratios" (per step), "max_ratio"}.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, dim, generator=g, dtype=torch.float64).requires_grad_(True)
    ratios = []
    for _ in range(steps):
        r = (x.mean(0)).pow(2).mean() / x.pow(2).mean()  # the two losses in float64
        ratios.append(r.item())
        (grad,) = torch.autograd.grad(r, x)
        with torch.no_grad():
            x += lr * grad / (grad.norm() + 1e-12) * x.norm()
    # cross-check the final point with the library's float32 implementation
    dm, ls = _ratio(x.detach().float())
    ratios.append(dm / ls)
    return {"ratios": np.array(ratios), "max_ratio": float(max(ratios))}


def jensen_equality(batch_size: int, dim: int, seed: int = 0) -> tuple[float, float]:
    """All residuals equal: ``L_DM == L_simple`` (the equality case of Jensen)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(1, dim, generator=g).repeat(batch_size, 1)
    return _ratio(r)


def jensen_cancelling(batch_size: int, dim: int, seed: int = 0) -> tuple[float, float]:
    """Residuals that cancel in pairs (``r``, ``-r``): ``L_DM == 0 < L_simple``, the largest gap."""
    g = torch.Generator().manual_seed(seed)
    half = torch.randn(max(batch_size // 2, 1), dim, generator=g)
    return _ratio(torch.cat([half, -half])[:batch_size])


def jensen_gap_vs_batch(batch_sizes: Sequence[int], n_trials: int, dim: int, seed: int = 0,
                        offset: float = 0.0) -> dict[str, Any]:
    """Mean ratio ``L_DM / L_simple`` for iid N(offset, 1) residuals at each batch size, with the
    expectation ``(offset^2 + 1/B) / (offset^2 + 1)`` (for large ``dim``): the gap ``1 - ratio``
    grows with ``B`` toward ``1 / (1 + offset^2)``."""
    g = torch.Generator().manual_seed(seed)
    mean_ratio, theory = [], []
    for b in batch_sizes:
        ratios = []
        chunk = max(1, 2**22 // (b * dim))  # keep each draw under ~32 MB
        for start in range(0, n_trials, chunk):
            k = min(chunk, n_trials - start)
            r = torch.randn(k, b, dim, generator=g, dtype=torch.float64) + offset
            dm = r.mean(1).pow(2).mean(-1)  # the paper form per trial, vectorised over trials
            ls = r.pow(2).mean((1, 2))
            ratios.append(dm / ls)
        mean_ratio.append(float(torch.cat(ratios).mean()))
        theory.append((offset**2 + 1.0 / b) / (offset**2 + 1.0))
    return {"batch_sizes": list(batch_sizes), "mean_ratio": mean_ratio, "expected_ratio": theory}


# --------------------------------------------------------------------------------------------------
# Official (sum, Min-SNR weighted) vs paper (mean) form
# --------------------------------------------------------------------------------------------------
def official_vs_paper(n_trials: int, batch_size: int, shape: Sequence[int] = (4, 8, 8),
                      gamma: float = L.OFFICIAL_SNR_GAMMA, num_train_timesteps: int = 1000,
                      seed: int = 0) -> dict[str, Any]:
    """Random predictions / targets and random timesteps of SD's scaled-linear schedule.

    Per trial: ``ratio_unweighted = official(w=1) / (B^2 paper(w=1))`` (exactly 1),
    Cauchy-Schwarz ``official(w) <= (sum w^2) * sum_i ||r_i||^2 / D`` and
    ``official(w) <= B^2 * L_simple(w)`` (as ``w_i <= 1``). Returns arrays and counts.
    """
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(seed)
    B = batch_size
    ratio_unw, cs_lhs, cs_rhs, j_rhs = [], [], [], []
    for k in range(n_trials):
        eps = torch.randn(B, *shape, generator=g)
        eps_hat = eps * torch.rand(1, generator=g) + torch.randn(B, *shape, generator=g) * 0.5
        if k % 2:
            eps_hat = eps_hat + torch.randn(1, *shape, generator=g)  # a shared bias
        t = torch.randint(0, num_train_timesteps, (B,), generator=g)
        w = L.min_snr_weights(t, sched.alphas_cumprod, gamma)
        off1 = L.dm_loss(eps_hat, eps, "official", 1.0).item()
        pap1 = L.dm_loss(eps_hat, eps, "paper", 1.0).item()
        ratio_unw.append(off1 / (B**2 * pap1))
        off_w = L.dm_loss(eps_hat, eps, "official", 1.0, w).item()
        sum_sq = (eps - eps_hat).pow(2).reshape(B, -1).mean(1).sum().item()  # sum_i ||r_i||^2 / D
        cs_lhs.append(off_w)
        cs_rhs.append(float(w.pow(2).sum()) * sum_sq)
        j_rhs.append(B**2 * L.l_simple(eps_hat, eps, w).item())
    ratio_unw, cs_lhs, cs_rhs, j_rhs = map(np.array, (ratio_unw, cs_lhs, cs_rhs, j_rhs))
    return {
        "ratio_unweighted": ratio_unw,
        "official_weighted": cs_lhs, "cauchy_schwarz_rhs": cs_rhs, "bsz2_lsimple_rhs": j_rhs,
        "cs_holds": int(np.sum(cs_lhs <= cs_rhs * (1 + 1e-5))),
        "bsz2_holds": int(np.sum(cs_lhs <= j_rhs * (1 + 1e-5))),
        "n": n_trials, "batch_size": B,
        "effective_mean_form_weight": L.OFFICIAL_DM_WEIGHT * B**2,
    }


def official_vs_paper_summary(ovp: dict[str, Any]) -> dict[str, Any]:
    """The numbers of :func:`official_vs_paper` worth keeping: worst ratio errors and the weights
    (official 0.003 on the sum form acts like ``0.003 * B^2`` on the mean form: 0.192 at B = 8)."""
    b = int(ovp["batch_size"])
    return {
        "batch_size": b, "trials": int(len(ovp["ratio_unweighted"])),
        "max_abs_ratio_error": float(np.max(np.abs(ovp["ratio_unweighted"] - 1))),
        "max_cs_ratio": float(np.max(ovp["official_weighted"] / ovp["cauchy_schwarz_rhs"])),
        "max_bsz2_ratio": float(np.max(ovp["official_weighted"] / ovp["bsz2_lsimple_rhs"])),
        "official_weight": L.OFFICIAL_DM_WEIGHT, "paper_weight": L.PAPER_DM_WEIGHT,
        "official_snr_gamma": L.OFFICIAL_SNR_GAMMA, "paper_snr_gamma": L.PAPER_SNR_GAMMA,
        "effective_mean_form_weight": L.OFFICIAL_DM_WEIGHT * b * b,
    }


# --------------------------------------------------------------------------------------------------
# Hoeffding + union bound (Eq. 3 / 14)
# --------------------------------------------------------------------------------------------------
def hoeffding_bound(n: int | np.ndarray, n_hypotheses: int, delta: float,
                    two_sided: bool = False) -> float | np.ndarray:
    """Uniform deviation bound for a finite class ``H`` and a loss in [0, 1]: with probability at
    least ``1 - delta`` over an iid sample ``S`` of size ``n``, for every ``h`` in ``H``

        R(h) - R_S(h) <= sqrt((ln|H| + ln(1/delta)) / (2 n))          (one-sided, Eq. 3 / 14)

    (Hoeffding ``P(R - R_S > eps) <= exp(-2 n eps^2)`` and a union bound over ``H``);
    ``two_sided=True`` bounds ``|R(h) - R_S(h)|`` with ``ln(2|H|/delta)``.
    """
    if n_hypotheses < 1 or not 0 < delta < 1:
        raise ValueError("need |H| >= 1 and 0 < delta < 1")
    log_term = math.log(n_hypotheses) + math.log((2.0 if two_sided else 1.0) / delta)
    return np.sqrt(log_term / (2.0 * np.asarray(n, dtype=float))) if np.ndim(n) else \
        math.sqrt(log_term / (2.0 * n))


def digits_hypothesis_errors(n_hypotheses: int, n_features: int = 6, ref_fraction: float = 0.3,
                             seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """A finite hypothesis class on scikit-learn's digits, fixed before any sample ``S`` is drawn.

    The digits are split once into a reference part (``ref_fraction``) and a population part. Each
    hypothesis is a nearest-class-mean classifier on a random subset of ``n_features`` pixels,
    fitted on the reference part only. Returns the 0/1 loss matrix ``[|H|, n_population]`` on the
    population part (the distribution ``S`` is then drawn from) and a description.
    """
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_ref = int(round(ref_fraction * len(y)))
    ref, pop = order[:n_ref], order[n_ref:]
    errors = np.empty((n_hypotheses, len(pop)), dtype=np.float64)
    classes = np.unique(y)
    for h in range(n_hypotheses):
        feats = rng.choice(X.shape[1], size=n_features, replace=False)
        means = np.stack([X[ref][y[ref] == c][:, feats].mean(0) for c in classes])
        d = ((X[pop][:, feats][:, None, :] - means[None]) ** 2).sum(-1)
        errors[h] = (classes[d.argmin(1)] != y[pop]).astype(np.float64)
    risks = errors.mean(1)
    info = {"n_population": int(len(pop)), "n_reference": int(n_ref), "n_hypotheses": n_hypotheses,
            "n_features": n_features, "risk_min": float(risks.min()), "risk_max": float(risks.max())}
    return errors, info


def hoeffding_experiment(errors: np.ndarray, ns: Sequence[int], n_trials: int, delta: float = 0.05,
                         seed: int = 0) -> dict[str, Any]:
    """For each ``n``: draw ``S`` (``n`` iid points, with replacement, from the population whose 0/1
    losses are ``errors``), compute ``sup_h R(h) - R_S(h)`` where ``R(h)`` is the exact population
    risk; compare with :func:`hoeffding_bound` and with the single-hypothesis (|H| = 1) bound.
    """
    rng = np.random.default_rng(seed)
    n_h, n_pop = errors.shape
    risks = errors.mean(1)
    out = {"ns": list(ns), "mean_sup_gap": [], "quantile_sup_gap": [], "max_sup_gap": [],
           "bound": [], "bound_single_h": [], "violations": [], "n_trials": n_trials,
           "delta": delta, "n_hypotheses": n_h}
    for n in ns:
        gaps = np.empty(n_trials)
        for t in range(n_trials):
            idx = rng.integers(0, n_pop, size=n)
            gaps[t] = np.max(risks - errors[:, idx].mean(1))
        b = hoeffding_bound(n, n_h, delta)
        out["mean_sup_gap"].append(float(gaps.mean()))
        out["quantile_sup_gap"].append(float(np.quantile(gaps, 1 - delta)))
        out["max_sup_gap"].append(float(gaps.max()))
        out["bound"].append(float(b))
        out["bound_single_h"].append(float(hoeffding_bound(n, 1, delta)))
        out["violations"].append(int(np.sum(gaps > b)))
    return out


# --------------------------------------------------------------------------------------------------
# Short real diffusion training
# --------------------------------------------------------------------------------------------------
def digits_images(image_size: int = 8) -> torch.Tensor:
    """scikit-learn's digits as float ``[N, 1, S, S]`` in [-1, 1] (bilinear resize from 8x8)."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                            align_corners=False).clamp(-1, 1)
    return x


def tiny_unet_config(image_size: int, channels: int, width: int = 16) -> dict[str, Any]:
    """Config of a tiny ``diffusers.UNet2DModel`` (two resolution levels, ~50k parameters at 16)."""
    return {
        "sample_size": image_size, "in_channels": channels, "out_channels": channels,
        "layers_per_block": 1, "block_out_channels": [width, 2 * width],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": min(8, width), "attention_head_dim": 8,
    }


def short_diffusion_run(images: torch.Tensor, steps: int, batch_size: int = 32, lr: float = 1e-3,
                        seed: int = 0, unet_config: dict[str, Any] | None = None,
                        num_train_timesteps: int = 1000, dm_weight: float = 0.0,
                        device: str = "cpu", num_threads: int | None = 1) -> dict[str, Any]:
    """Train a tiny ``UNet2DModel`` for ``steps`` AdamW steps on ``images`` (float [N, C, H, W] in
    [-1, 1], or uint8) with the DDPM objective (``+ dm_weight * L_DM`` in the paper form if > 0).

    Logged every step on the training batch: ``l_simple`` and ``l_dm`` (paper form, weight 1, no
    SNR weights, the quantity bounded by Eq. 7). Returns {"l_simple", "l_dm", "steps", "seconds",
    "n_params", "config"}. ``num_threads`` (default 1, restored afterwards): a model this small gains
    nothing from more CPU threads, and on a loaded 2-core machine two threads were measured 20-50x
    slower per step than one.
    """
    previous_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _short_diffusion_run(images, steps, batch_size, lr, seed, unet_config,
                                    num_train_timesteps, dm_weight, device)
    finally:
        torch.set_num_threads(previous_threads)


def _short_diffusion_run(images, steps, batch_size, lr, seed, unet_config, num_train_timesteps,
                         dm_weight, device):
    from diffusers import DDPMScheduler, UNet2DModel

    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1
    images = images.float()
    _, c, h, w = images.shape
    if h != w:
        raise ValueError(f"square images expected, got {h}x{w}")
    torch.manual_seed(seed)
    config = unet_config or tiny_unet_config(h, c)
    model = UNet2DModel(**config).to(device)
    sched = DDPMScheduler(num_train_timesteps=num_train_timesteps)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    log_ls, log_dm = [], []
    start = time.time()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        x0 = images[idx].to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, num_train_timesteps, (batch_size,), generator=g).to(device)
        noisy = sched.add_noise(x0, noise, t)
        eps_hat = model(noisy, t).sample
        ls = L.l_simple(eps_hat, noise)
        dm = L.dm_loss(eps_hat, noise, "paper", 1.0)
        loss = ls + dm_weight * dm if dm_weight else ls
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log_ls.append(ls.item())
        log_dm.append(dm.item())
    return {"l_simple": np.array(log_ls), "l_dm": np.array(log_dm), "steps": steps,
            "seconds": time.time() - start, "config": config,
            "n_params": sum(p.numel() for p in model.parameters())}


def diffusion_run_summary(dr: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """What :func:`short_diffusion_run` showed: the steps at which ``L_DM <= L_simple`` (Eq. 7; all of
    them), both loss curves, and ``B * L_DM / L_simple`` over the last 10 steps (1 for iid residuals)."""
    ls, dm = np.asarray(dr["l_simple"]), np.asarray(dr["l_dm"])
    return {"steps": int(dr["steps"]), "holds": int(np.sum(dm <= ls * (1 + 1e-6))), "n_params": int(dr["n_params"]),
            "seconds": float(dr["seconds"]), "l_simple": ls.tolist(), "l_dm": dm.tolist(), "batch_size": batch_size,
            "final_ratio_x_batch": float(dm[-10:].mean() / ls[-10:].mean() * batch_size)}


# --------------------------------------------------------------------------------------------------
# MMD (Eq. 5, 6, 20): estimators against an independent computation, permutation-test power
# --------------------------------------------------------------------------------------------------
def mmd_estimators_check(points: int = 300, class_a: int = 3, class_b: int = 8) -> dict[str, Any]:
    """The kit's MMD^2 (``losses.mmd2``) on scikit-learn's digits, class ``class_a`` vs ``class_b``,
    beside an independent computation: the linear-kernel biased MMD^2 is the squared distance of the
    mean embeddings (Eq. 6); the Gaussian-kernel biased (V) and unbiased (U) estimators (Eq. 20,
    median-heuristic bandwidth from ``scipy.spatial.distance.pdist``) from the kernel matrices of
    ``sklearn.metrics.pairwise.rbf_kernel``."""
    from scipy.spatial.distance import pdist
    from sklearn.datasets import load_digits
    from sklearn.metrics.pairwise import rbf_kernel

    X, y = load_digits(return_X_y=True)
    xa, xb = X[y == class_a][:points], X[y == class_b][:points]
    sigma = float(np.median(pdist(np.concatenate([xa, xb]))))
    gamma = 1.0 / (2 * sigma ** 2)
    kxx, kyy, kxy = (rbf_kernel(u, v, gamma=gamma) for u, v in ((xa, xa), (xb, xb), (xa, xb)))
    n, m = len(xa), len(xb)
    return {
        "linear": L.mmd2(xa, xb, kernel="linear", unbiased=False),
        "mean_embedding_sq_distance": float(np.sum((xa.mean(0) - xb.mean(0)) ** 2)),
        "gaussian_biased": L.mmd2(xa, xb, unbiased=False),
        "gaussian_unbiased": L.mmd2(xa, xb, unbiased=True),
        "sklearn_biased": float(kxx.mean() + kyy.mean() - 2 * kxy.mean()),
        "sklearn_unbiased": float((kxx.sum() - np.trace(kxx)) / (n * (n - 1))
                                  + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()),
        "bandwidth": sigma, "points_per_sample": n,
    }


def gaussian_sample(n: int, generator: torch.Generator, dim: int, shift: float = 0.0) -> torch.Tensor:
    """``n`` draws of ``N(shift * 1, I_dim)`` (the null has ``shift = 0``)."""
    return torch.randn(n, dim, generator=generator) + shift


def mmd_permutation_check(ns: Sequence[int], trials: int, dim: int, shift: float, n_perm: int = 200,
                          seed: int = 0) -> dict[str, Any]:
    """Power of the MMD permutation test (level 0.05) of ``N(0, I)`` vs ``N(shift, I)`` and its
    rejection rate under the null (``N(0, I)`` vs ``N(0, I)``), for each sample size in ``ns``."""
    from functools import partial

    null = partial(gaussian_sample, dim=dim)
    alt = partial(gaussian_sample, dim=dim, shift=shift)
    return {"ns": list(ns), "power": L.mmd_power(null, alt, ns, trials, n_perm=n_perm, seed=seed),
            "type1": L.mmd_power(null, null, ns, trials, n_perm=n_perm, seed=seed + 7),
            "trials": trials, "n_perm": n_perm, "shift": shift, "dim": dim}


def hoeffding_check(n_hypotheses: int, ns: Sequence[int], n_trials: int, delta: float = 0.05,
                    seed: int = 0) -> dict[str, Any]:
    """:func:`hoeffding_experiment` on :func:`digits_hypothesis_errors`, plus ``allowed``: the 99.9 %
    quantile of Binomial(``n_trials``, ``delta``), the most violating draws per ``|S|`` consistent with
    P(violation) <= delta (Eq. 3 is a probability statement)."""
    from scipy.stats import binom

    errors, info = digits_hypothesis_errors(n_hypotheses, seed=seed)
    out = hoeffding_experiment(errors, ns, n_trials, delta=delta, seed=seed)
    return {**out, **info, "allowed_violations": int(binom.ppf(0.999, n_trials, delta))}


# --------------------------------------------------------------------------------------------------
# Figures of notebook 00 (one function each)
# --------------------------------------------------------------------------------------------------
def _line_figure(lines: Sequence[tuple], hline: float | None = None, **axes: Any):
    """One axes of ``(x, y, style, plot kwargs)`` lines (and a dotted horizontal line), ``axes``
    passed to ``Axes.set``: the shape of every figure of notebook 00."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for x, y, style, kw in lines:
        ax.plot(x, y, style, **kw)
    if hline is not None:
        ax.axhline(hline, color="k", ls=":", lw=0.8)
    ax.set(**axes)
    ax.legend(fontsize=8)
    return fig


def plot_jensen_gap(gaps: dict[str, dict[str, Any]]):
    """Mean ``L_DM / L_simple`` against the batch size, measured and expected, one line per
    residual distribution (``{label: jensen_gap_vs_batch(...)}``)."""
    lines = []
    for name, g in gaps.items():
        lines += [(g["batch_sizes"], g["mean_ratio"], "o-", {"label": f"measured, {name}"}),
                  (g["batch_sizes"], g["expected_ratio"], "k--", {"lw": 0.8})]
    return _line_figure(lines, xscale="log", yscale="log", xlabel="batch size B", ylabel="mean  L_DM / L_simple",
                        title="Jensen gap vs batch size (dashed: expectation)")


def plot_mmd_power(res: dict[str, Any]):
    """Rejection rate of the permutation test against n (:func:`mmd_permutation_check`)."""
    return _line_figure([(res["ns"], res["power"], "o-", {"label": f"power (shift {res['shift']} per dim)"}),
                         (res["ns"], res["type1"], "s-", {"label": "rejection rate under H0"})], hline=0.05,
                        xscale="log", xlabel="n per sample", ylabel="rejection rate at level 0.05",
                        ylim=(-0.02, 1.02), title="MMD permutation test")


def plot_hoeffding(hx: dict[str, Any]):
    """Sup gap over H against |S| beside the Hoeffding + union bound (:func:`hoeffding_check`)."""
    ns = hx["ns"]
    return _line_figure([(ns, hx["bound"], "k-", {"label": f"Hoeffding + union bound, |H|={hx['n_hypotheses']}"}),
                         (ns, hx["bound_single_h"], "k--", {"lw": 0.8, "label": "single-hypothesis bound"}),
                         (ns, hx["quantile_sup_gap"], "o-", {"label": f"{1 - hx['delta']:.0%} quantile of sup gap"}),
                         (ns, hx["mean_sup_gap"], "s-", {"label": "mean sup gap"})],
                        xscale="log", yscale="log", xlabel="|S|", ylabel="sup_h R(h) - R_S(h)",
                        title=f"Eq. 3 on the digits (delta = {hx['delta']})")


def plot_diffusion_losses(dr: dict[str, Any], batch_size: int):
    """``L_simple`` and the batch ``L_DM`` per step of :func:`short_diffusion_run`, with
    ``L_simple / B`` (where ``L_DM`` would sit for independent zero-mean residuals)."""
    steps = np.arange(1, len(dr["l_simple"]) + 1)
    return _line_figure([(steps, dr["l_simple"], "-", {"label": "L_simple (per-sample MSE)"}),
                         (steps, dr["l_dm"], "-", {"label": "L_DM (batch mean residual, paper form)"}),
                         (steps, np.asarray(dr["l_simple"]) / batch_size, "k:",
                          {"lw": 0.8, "label": "L_simple / B (iid residuals)"})],
                        yscale="log", xlabel="training step", ylabel="loss",
                        title=f"Tiny DDPM on the digits, batch {batch_size}")


__all__ = [
    "diffusion_run_summary", "digits_hypothesis_errors", "digits_images", "gaussian_sample", "hoeffding_bound",
    "hoeffding_check",
    "hoeffding_experiment", "mmd_estimators_check", "mmd_permutation_check", "plot_diffusion_losses",
    "plot_hoeffding", "plot_jensen_gap", "plot_mmd_power",
    "jensen_adversarial", "jensen_cancelling", "jensen_equality", "jensen_gap_vs_batch",
    "jensen_random", "official_vs_paper", "official_vs_paper_summary", "short_diffusion_run", "tiny_unet_config",
]

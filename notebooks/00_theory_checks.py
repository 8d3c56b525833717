# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: realfake-kit (.venv)
#     language: python
#     name: realfake-kit
# ---

# %% [markdown]
# # 00 - Theory checks (paper Sec. 3, Apx. B, C)
#
# Real-Fake (Yuan et al., ICLR 2024) frames training-data synthesis as **distribution matching**:
# a classifier trained on synthetic data generalises to the real task when the synthetic
# distribution is close to the real one, measured by the Maximum Mean Discrepancy (MMD). This
# notebook checks numerically the statements the method rests on, with the kit's own
# implementations in `realfake_utils.losses` and `realfake_utils.theory`:
#
# 1. **Jensen bound of Eq. 7.** The DM loss is the squared norm of the batch-mean residual,
#    `L_DM = ||1/B sum_i (eps_i - eps_hat_i)||^2`, and Jensen's inequality gives
#    `L_DM <= 1/B sum_i ||eps_i - eps_hat_i||^2 = L_simple`: minimising `L_simple` (the DDPM
#    objective) minimises an upper bound of the MMD in the noise space, and `L_DM` targets it
#    directly. Checked on random and adversarial residuals, the equality case and the gap vs batch size.
# 2. **MMD (Eq. 5, 6, 20).** With a linear feature map the MMD^2 is the squared distance between
#    the mean embeddings; the Gaussian-kernel biased / unbiased estimators agree with an independent
#    computation through scikit-learn; a permutation test whose power grows with the sample size.
# 3. **Official code vs paper.** The official code (BAAI-DCAI/Training-Data-Synthesis,
#    `finetune/train_text_to_image_lora.py`) uses `0.003 * MSE(sum_i w_i eps_hat_i, sum_i w_i eps_i)`
#    with Min-SNR-5 weights `w_i`; the paper writes the batch *mean* with weight 0.05. With unit
#    weights the sum form is exactly `B^2` times the mean form; with Min-SNR weights (`w_i <= 1`)
#    Cauchy-Schwarz bounds it by `(sum_i w_i^2) sum_i ||r_i||^2 <= B^2 L_simple(w)`.
# 4. **Hoeffding + union bound (Eq. 3 / 14).** For a finite hypothesis class `H` and a loss in
#    [0, 1], with probability `1 - delta` every `h` has `R(h) - R_S(h) <= sqrt((ln|H| + ln(1/delta)) / 2|S|)`.
#    We measure the sup over `H` of that gap on the digits as `|S|` grows.
# 5. **A short real diffusion training** on the digits: `L_simple` and the batch `L_DM` are logged
#    at every step and `L_DM <= L_simple` must hold at every step.
#
# Each check asserts and prints one deterministic line (marked `# NBVAL_CHECK_OUTPUT`).

# %% tags=["parameters"]
preset = "digits"
run_dir = ""
seed = 0
jensen_trials = 1000
jensen_batch_size = 8
jensen_dim = 1024
jensen_batch_sizes = [1, 2, 4, 8, 16, 32, 64, 128]
jensen_gap_trials = 200
adversarial_steps = 300
mmd_points = 300
mmd_permutations = 200
mmd_power_ns = [10, 20, 40, 80, 160]
mmd_power_trials = 20
mmd_power_dim = 8
mmd_shift = 0.3
official_trials = 200
official_batch_size = 8
hoeffding_hypotheses = 200
hoeffding_ns = [25, 50, 100, 200, 400, 800, 1600]
hoeffding_trials = 200
hoeffding_delta = 0.05
diffusion_steps = 200
diffusion_batch_size = 32
diffusion_image_size = 8
diffusion_lr = 0.001

# %%
import realfake_utils as rf

run = rf.setup(globals(), "00_theory_checks")

import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.spatial.distance import pdist
from scipy.stats import binom
from sklearn.datasets import load_digits
from sklearn.metrics.pairwise import rbf_kernel

from realfake_utils import losses, theory

torch.set_num_threads(min(2, torch.get_num_threads()))
t_start = time.time()
results = {"preset": preset, "seed": seed}
print(run)

# %% [markdown]
# ## 1. The Jensen bound of Eq. 7
# Residual batches of four kinds (iid Gaussian, a shared offset as from a biased model,
# heavy-tailed Student-t, random per-sample scales), `jensen_batch_size` samples of `jensen_dim`
# elements each. `L_DM` (paper form, weight 1, no SNR weights) must never exceed `L_simple`.

# %%
jr = theory.jensen_random(jensen_trials, jensen_batch_size, jensen_dim, seed=seed)
assert jr["holds"] == jensen_trials, jr["holds"]
results["jensen_random"] = {"holds": jr["holds"], "n": jensen_trials,
                            "max_ratio": float(np.max(jr["dm"] / jr["l_simple"]))}

# %%
# NBVAL_CHECK_OUTPUT
print(f"Jensen bound holds on {jr['holds']}/{jensen_trials} random batches")

# %% [markdown]
# **Adversarial and extreme cases.** An adversary runs gradient ascent on the ratio
# `L_DM / L_simple` over the residuals themselves: it can only reach 1, which it does by making all
# residuals equal (Jensen's equality case, a model whose error is the same on every sample).
# Residuals that cancel in pairs give the other extreme, `L_DM = 0 < L_simple`.

# %%
adv = theory.jensen_adversarial(jensen_batch_size, 64, steps=adversarial_steps, seed=seed)
eq_dm, eq_ls = theory.jensen_equality(jensen_batch_size, jensen_dim, seed=seed)
ca_dm, ca_ls = theory.jensen_cancelling(jensen_batch_size, jensen_dim, seed=seed)
assert adv["max_ratio"] <= 1 + 1e-6, adv["max_ratio"]
assert adv["ratios"][-1] > 0.9, adv["ratios"][-1]
assert abs(eq_dm - eq_ls) <= 1e-6 * eq_ls
assert ca_dm <= 1e-12 and ca_ls > 0
results["jensen_adversarial"] = {"max_ratio": adv["max_ratio"], "final_ratio": float(adv["ratios"][-1]),
                                 "start_ratio": float(adv["ratios"][0])}
results["jensen_equality"] = {"dm": eq_dm, "l_simple": eq_ls}
results["jensen_cancelling"] = {"dm": ca_dm, "l_simple": ca_ls}

# %%
# NBVAL_CHECK_OUTPUT
print(f"adversary never pushes L_DM/L_simple above 1: True; equality when all residuals are equal: True; "
      f"cancelling residuals give L_DM = 0: True")

# %% [markdown]
# **Gap vs batch size.** For iid zero-mean residuals the expected ratio is `1/B`: the larger the
# batch, the more `L_DM` (a statement about the batch *distribution*) differs from `L_simple` (a
# per-sample statement). With a shared offset `mu` (a biased model) the ratio tends to
# `mu^2 / (mu^2 + 1)`: what is left is exactly the distribution-level error `L_DM` targets.

# %%
gap0 = theory.jensen_gap_vs_batch(jensen_batch_sizes, jensen_gap_trials, jensen_dim, seed=seed)
gap1 = theory.jensen_gap_vs_batch(jensen_batch_sizes, jensen_gap_trials, jensen_dim, seed=seed + 1,
                                  offset=0.5)
for g in (gap0, gap1):
    rel = np.abs(np.array(g["mean_ratio"]) / np.array(g["expected_ratio"]) - 1)
    assert np.all(rel < 0.2), rel
results["jensen_gap_vs_batch"] = {"zero_mean": gap0, "offset_0.5": gap1}

fig, ax = plt.subplots(figsize=(5.5, 3.6))
for g, name in ((gap0, "iid N(0, 1) residuals"), (gap1, "iid N(0.5, 1) residuals")):
    ax.plot(g["batch_sizes"], g["mean_ratio"], "o-", label=f"measured, {name}")
    ax.plot(g["batch_sizes"], g["expected_ratio"], "k--", lw=0.8)
ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="mean  L_DM / L_simple",
       title="Jensen gap vs batch size (dashed: expectation)")
ax.legend(fontsize=8)
run.save_figure(fig, "00_jensen_gap_vs_batch")
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
print(f"mean L_DM/L_simple follows its expectation (within 20%) for B in {jensen_batch_sizes}: True")

# %% [markdown]
# ## 2. MMD (Eq. 5, 6, 20)
# On the digits (64 pixels), class 3 against class 8. With the linear kernel the biased MMD^2 is the
# squared distance of the mean embeddings (Eq. 6). With the Gaussian kernel (median-heuristic
# bandwidth) both estimators must equal an independent computation: the bandwidth from
# `scipy.spatial.distance.pdist`, the kernel matrices from `sklearn.metrics.pairwise.rbf_kernel`.

# %%
X, y = load_digits(return_X_y=True)
xa, xb = X[y == 3][:mmd_points], X[y == 8][:mmd_points]
lin = losses.mmd2(xa, xb, kernel="linear", unbiased=False)
mean_dist = float(np.sum((xa.mean(0) - xb.mean(0)) ** 2))
assert abs(lin - mean_dist) <= 1e-9 * mean_dist

sigma = float(np.median(pdist(np.concatenate([xa, xb]))))
gamma = 1.0 / (2 * sigma**2)
kxx, kyy, kxy = rbf_kernel(xa, xa, gamma=gamma), rbf_kernel(xb, xb, gamma=gamma), rbf_kernel(xa, xb, gamma=gamma)
n, m = len(xa), len(xb)
sk_biased = kxx.mean() + kyy.mean() - 2 * kxy.mean()
sk_unbiased = ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
               - 2 * kxy.mean())
ours_biased = losses.mmd2(xa, xb, unbiased=False)
ours_unbiased = losses.mmd2(xa, xb, unbiased=True)
assert abs(ours_biased - sk_biased) <= 1e-9 * abs(sk_biased)
assert abs(ours_unbiased - sk_unbiased) <= 1e-9 * abs(sk_unbiased)
assert ours_biased >= ours_unbiased  # the V-statistic adds the positive diagonal terms
results["mmd_estimators"] = {"linear": lin, "mean_embedding_sq_distance": mean_dist,
                             "gaussian_biased": ours_biased, "gaussian_unbiased": ours_unbiased,
                             "sklearn_biased": float(sk_biased), "sklearn_unbiased": float(sk_unbiased),
                             "bandwidth": sigma, "points_per_sample": n}

# %%
# NBVAL_CHECK_OUTPUT
print("linear-kernel MMD^2 equals the squared distance of mean embeddings: True; "
      "Gaussian biased and unbiased MMD^2 equal the scikit-learn rbf_kernel computation: True")


# %% [markdown]
# **Permutation test.** `x ~ N(0, I)` against `y ~ N(mu, I)` with `mu = mmd_shift` in every one of
# `mmd_power_dim` dimensions (alternative), and against a second `N(0, I)` sample (null), at level
# 0.05. The power must grow with `n`; the null rejection rate stays near the level.

# %%
def draw_null(k, g):
    return torch.randn(k, mmd_power_dim, generator=g)


def draw_shifted(k, g):
    return torch.randn(k, mmd_power_dim, generator=g) + mmd_shift


power = losses.mmd_power(draw_null, draw_shifted, mmd_power_ns, mmd_power_trials,
                         n_perm=mmd_permutations, seed=seed)
type1 = losses.mmd_power(draw_null, draw_null, mmd_power_ns, mmd_power_trials,
                         n_perm=mmd_permutations, seed=seed + 7)
assert power[-1] > power[0] and power[-1] >= 0.8, power
assert max(type1) <= 0.25, type1
results["mmd_permutation"] = {"ns": mmd_power_ns, "power": power, "type1": type1,
                              "trials": mmd_power_trials, "n_perm": mmd_permutations, "shift": mmd_shift}

fig, ax = plt.subplots(figsize=(5.5, 3.6))
ax.plot(mmd_power_ns, power, "o-", label=f"power (shift {mmd_shift} per dim)")
ax.plot(mmd_power_ns, type1, "s-", label="rejection rate under H0")
ax.axhline(0.05, color="k", ls=":", lw=0.8)
ax.set(xscale="log", xlabel="n per sample", ylabel="rejection rate at level 0.05", ylim=(-0.02, 1.02),
       title="MMD permutation test")
ax.legend(fontsize=8)
run.save_figure(fig, "00_mmd_power")
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
print(f"permutation-test power grows with n (n={mmd_power_ns[0]} -> n={mmd_power_ns[-1]}): True; "
      "null rejection rate <= 0.25: True")

# %% [markdown]
# ## 3. The official code's DM loss vs the paper's
# Random predictions / targets shaped like SD latents, random timesteps of SD's scaled-linear
# schedule, Min-SNR weights with the official gamma 5. Checked per batch: `official(w=1) = B^2 paper(w=1)`,
# Cauchy-Schwarz `official(w) <= (sum_i w_i^2) sum_i ||r_i||^2 / D` and `official(w) <= B^2 L_simple(w)`.
# Consequence: at the official batch size 8 the official weight 0.003 acts like `0.003 * 64 = 0.192` on
# the mean form, about 3.8x the paper's 0.05 (before the Min-SNR weights, which only shrink it).

# %%
ovp = theory.official_vs_paper(official_trials, official_batch_size, seed=seed)
assert np.allclose(ovp["ratio_unweighted"], 1.0, rtol=1e-5)
assert ovp["cs_holds"] == official_trials and ovp["bsz2_holds"] == official_trials
results["official_vs_paper"] = {
    "batch_size": official_batch_size, "trials": official_trials,
    "max_abs_ratio_error": float(np.max(np.abs(ovp["ratio_unweighted"] - 1))),
    "max_cs_ratio": float(np.max(ovp["official_weighted"] / ovp["cauchy_schwarz_rhs"])),
    "max_bsz2_ratio": float(np.max(ovp["official_weighted"] / ovp["bsz2_lsimple_rhs"])),
    "official_weight": losses.OFFICIAL_DM_WEIGHT, "paper_weight": losses.PAPER_DM_WEIGHT,
    "official_snr_gamma": losses.OFFICIAL_SNR_GAMMA, "paper_snr_gamma": losses.PAPER_SNR_GAMMA,
    "effective_mean_form_weight_at_bsz8": losses.OFFICIAL_DM_WEIGHT * 64,
}
print({k: v for k, v in results["official_vs_paper"].items()})

# %%
# NBVAL_CHECK_OUTPUT
print(f"official sum form == B^2 x paper mean form on {official_trials}/{official_trials} unweighted batches; "
      f"Cauchy-Schwarz bound on {ovp['cs_holds']}/{official_trials}; "
      f"B^2 L_simple(w) bound on {ovp['bsz2_holds']}/{official_trials}")

# %% [markdown]
# ## 4. Hoeffding + union bound (Eq. 3 / 14) on the digits
# A finite class fixed before any sample is drawn: `hoeffding_hypotheses` nearest-class-mean
# classifiers, each on 6 random pixels, fitted on a reference split of the digits. The remaining
# digits are the distribution; `S` is drawn iid from it, so the true risk `R(h)` is exact. For each
# `|S|` we record `sup_h R(h) - R_S(h)` over `hoeffding_trials` draws and compare it with the bound
# for `|H|` hypotheses (and, dashed, with the single-hypothesis bound that ignores the union).
# The bound is a probability statement, P(violation) <= delta: the number of violating draws must be
# consistent with that (at most the 99.9% quantile of Binomial(trials, delta)), and the mean sup gap
# must stay under the bound.

# %%
errors, hinfo = theory.digits_hypothesis_errors(hoeffding_hypotheses, seed=seed)
hx = theory.hoeffding_experiment(errors, hoeffding_ns, hoeffding_trials, delta=hoeffding_delta, seed=seed)
# P(violation) <= delta for each |S|: the violation count must be consistent with Binomial(trials, delta)
allowed = int(binom.ppf(0.999, hoeffding_trials, hoeffding_delta))
assert all(v <= allowed for v in hx["violations"]), (hx["violations"], allowed)
assert all(g <= b for g, b in zip(hx["mean_sup_gap"], hx["bound"]))
results["hoeffding"] = {**hx, **hinfo}

fig, ax = plt.subplots(figsize=(5.5, 3.6))
ax.plot(hoeffding_ns, hx["bound"], "k-", label=f"Hoeffding + union bound, |H|={hoeffding_hypotheses}")
ax.plot(hoeffding_ns, hx["bound_single_h"], "k--", lw=0.8, label="single-hypothesis bound")
ax.plot(hoeffding_ns, hx["quantile_sup_gap"], "o-", label=f"{1 - hoeffding_delta:.0%} quantile of sup gap")
ax.plot(hoeffding_ns, hx["mean_sup_gap"], "s-", label="mean sup gap")
ax.set(xscale="log", yscale="log", xlabel="|S|", ylabel="sup_h R(h) - R_S(h)",
       title=f"Eq. 3 on the digits (delta = {hoeffding_delta})")
ax.legend(fontsize=8)
run.save_figure(fig, "00_hoeffding")
plt.show()
print("violations per |S|:", dict(zip(hoeffding_ns, hx["violations"])))

# %%
# NBVAL_CHECK_OUTPUT
print(f"Hoeffding + union bound: violations consistent with a rate <= delta = {hoeffding_delta} "
      f"(Binomial 99.9% quantile) for every |S| in {hoeffding_ns}: True")

# %% [markdown]
# ## 5. L_DM <= L_simple during a real diffusion training
# A tiny `diffusers.UNet2DModel` trained from scratch on the digits (`diffusion_image_size` px, one
# channel) with `DDPMScheduler.add_noise` and AdamW on `L_simple`. At every step we also compute
# the batch `L_DM` (paper form, unweighted) of the same predictions: Jensen says it can never exceed
# `L_simple`, and the gap shows how much of the per-sample error is not distribution-level error.
# For independent zero-mean residuals `L_DM` would sit near `L_simple / B` (dotted); where it sits
# above, the model's errors share a component across the batch (a distribution-level bias), which
# is what the DM loss penalises directly.

# %%
images = theory.digits_images(diffusion_image_size)
dr = theory.short_diffusion_run(images, diffusion_steps, batch_size=diffusion_batch_size,
                                lr=diffusion_lr, seed=seed)
holds = int(np.sum(dr["l_dm"] <= dr["l_simple"] * (1 + 1e-6)))
assert holds == diffusion_steps, holds
results["diffusion_run"] = {"steps": diffusion_steps, "holds": holds, "n_params": dr["n_params"],
                            "seconds": dr["seconds"], "l_simple": dr["l_simple"].tolist(),
                            "l_dm": dr["l_dm"].tolist(), "image_size": diffusion_image_size,
                            "batch_size": diffusion_batch_size}
results["diffusion_run"]["final_ratio_x_batch"] = float(dr["l_dm"][-10:].mean() / dr["l_simple"][-10:].mean()
                                                       * diffusion_batch_size)
print(f"{dr['n_params']} parameters, {diffusion_steps} steps in {dr['seconds']:.1f} s; "
      f"L_simple {dr['l_simple'][0]:.3f} -> {dr['l_simple'][-5:].mean():.3f}, "
      f"L_DM {dr['l_dm'][0]:.4f} -> {dr['l_dm'][-5:].mean():.4f}")

fig, ax = plt.subplots(figsize=(5.5, 3.6))
steps = np.arange(1, diffusion_steps + 1)
ax.plot(steps, dr["l_simple"], label="L_simple (per-sample MSE)")
ax.plot(steps, dr["l_dm"], label="L_DM (batch mean residual, paper form)")
ax.plot(steps, dr["l_simple"] / diffusion_batch_size, "k:", lw=0.8, label="L_simple / B (iid residuals)")
ax.set(yscale="log", xlabel="training step", ylabel="loss",
       title=f"Tiny DDPM on the digits, batch {diffusion_batch_size}")
ax.legend(fontsize=8)
run.save_figure(fig, "00_diffusion_losses")
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
print(f"L_DM <= L_simple at {holds}/{diffusion_steps} training steps")

# %%
results["seconds"] = time.time() - t_start
run.save_results(results)
print(f"results written to {run.result_path()} ({results['seconds']:.0f} s)")

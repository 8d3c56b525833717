"""Diffusion training losses and MMD (Real-Fake, Yuan et al. ICLR 2024, Sec. 3 and Apx. B, C).

Notation: ``eps`` is the target (the noise for epsilon prediction, the velocity for v-prediction),
``eps_hat`` the UNet's prediction, both ``[B, ...]``; the residual of sample ``i`` is
``r_i = eps_i - eps_hat_i`` with ``D`` elements.

* :func:`l_simple` -- the DDPM objective ``L_simple = 1/B sum_i w_i ||r_i||^2 / D`` (per-sample
  mean squared error, mean over the batch), with optional Min-SNR-gamma weights ``w_i``.
* :func:`min_snr_weights` -- Min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556) loss weights.
* :func:`dm_loss` -- the distribution-matching term of Eq. 7 / Eq. 21 in two forms:

  ``form="paper"``:    ``weight * || 1/B sum_i r_i ||^2 / D``  (Eq. 21's second term, gamma = 0.05:
  the mean of the residuals, **no per-sample weights**; Jensen's inequality gives
  ``dm_loss <= l_simple`` with ``w_i = 1``, the bound of Eq. 7). Table 7's SNR-gamma 0.75 weights
  the ``L_simple`` term only; passing ``snr_weights`` with this form is refused.

  ``form="official"``: ``weight * || sum_i w_i r_i ||^2 / D``  -- what the official code computes
  (BAAI-DCAI/Training-Data-Synthesis, ``finetune/train_text_to_image_lora.py``, training loop:
  ``model_pred_ws = (model_pred * mse_loss_weights).sum(dim=0)``, ``target_ws`` likewise,
  ``dist_loss = F.mse_loss(model_pred_ws, target_ws, reduction="mean")``,
  ``loss = loss + dist_loss * args.dist_match``), with the Min-SNR weights of its L_simple term.
  With ``w_i = 1`` the official form is exactly ``B**2`` times the paper form; with Min-SNR weights
  (``0 < w_i <= 1``) Cauchy-Schwarz gives ``official <= B**2 * l_simple(w)`` (see
  :mod:`realfake_utils.theory`).

  Defaults: the paper's gamma = 0.05 (Apx. E, under Eq. 21) and SNR-gamma 0.75 (Table 7); the
  official launcher ``finetune/train_lora.sh`` passes ``--dist_match=0.003`` ``--snr_gamma=5``
  (batch size 8, so the effective weight on the mean form with ``w_i = 1`` is ``0.003 * 64 = 0.192``).
  The official code only defines the Min-SNR weights inside its ``snr_gamma`` branch, so its DM loss
  needs ``--snr_gamma``.

* :func:`overall_loss` -- ``L_overall = L_simple + L_DM`` of Eq. 21 for either form (the paper form:
  Min-SNR weights on ``L_simple`` only; the official form: on both terms, as the official code).

* :func:`mmd2` -- squared Maximum Mean Discrepancy (Eq. 5, 6, 20), Gaussian (median-heuristic
  bandwidth) or linear kernel, biased (V-statistic) or unbiased (U-statistic) estimator, computed in
  blocks so a few thousand points fit in memory.
* :func:`mmd_permutation_test` -- two-sample permutation test on MMD^2, returns ``(mmd2, p_value)``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

PAPER_DM_WEIGHT = 0.05
PAPER_SNR_GAMMA = 0.75
OFFICIAL_DM_WEIGHT = 0.003
OFFICIAL_SNR_GAMMA = 5.0
DM_FORMS = ("paper", "official")


# --------------------------------------------------------------------------------------------------
# Diffusion losses
# --------------------------------------------------------------------------------------------------
def _per_sample_sq_error(eps_hat: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    if eps_hat.shape != eps.shape:
        raise ValueError(f"eps_hat {tuple(eps_hat.shape)} and eps {tuple(eps.shape)} differ in shape")
    if eps.dim() < 1 or eps.shape[0] == 0:
        raise ValueError("expected a non-empty batch [B, ...]")
    diff = eps_hat.float() - eps.float()
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)


def _check_weights(snr_weights: torch.Tensor | None, batch: int, ref: torch.Tensor) -> torch.Tensor:
    if snr_weights is None:
        return torch.ones(batch, dtype=torch.float32, device=ref.device)
    w = torch.as_tensor(snr_weights, device=ref.device).float().reshape(-1)
    if w.numel() != batch:
        raise ValueError(f"snr_weights has {w.numel()} entries for a batch of {batch}")
    return w


def l_simple(eps_hat: torch.Tensor, eps: torch.Tensor,
             snr_weights: torch.Tensor | None = None) -> torch.Tensor:
    """DDPM ``L_simple``: mean over the batch of the per-sample MSE, each times its Min-SNR weight.

    ``eps_hat``, ``eps``: ``[B, ...]``; ``snr_weights``: ``[B]`` or None. Returns a scalar (float32).
    This is the official code's ``F.mse_loss(..., reduction="none").mean(non-batch dims) * w``
    followed by ``.mean()`` (and plain ``F.mse_loss`` when no weights are given).
    """
    per_sample = _per_sample_sq_error(eps_hat, eps)
    w = _check_weights(snr_weights, per_sample.shape[0], per_sample)
    return (per_sample * w).mean()


def compute_snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) for each timestep."""
    ac = torch.as_tensor(alphas_cumprod).double()
    t = torch.as_tensor(timesteps, device=ac.device).long()
    a = ac[t]
    return a / (1.0 - a)


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, Sec. 3.4 / 4.2), one per timestep.

    ``epsilon``: ``min(SNR, gamma) / SNR`` (the official Real-Fake code and diffusers' scripts);
    ``v_prediction``: ``min(SNR, gamma) / (SNR + 1)``; ``sample`` (x0): ``min(SNR, gamma)``.
    Returns float32 ``[B]`` on the device of ``timesteps``.
    """
    if gamma is None or gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    snr = compute_snr(timesteps, alphas_cumprod)
    clipped = torch.minimum(snr, torch.full_like(snr, float(gamma)))
    if prediction_type == "epsilon":
        w = clipped / snr
    elif prediction_type == "v_prediction":
        w = clipped / (snr + 1.0)
    elif prediction_type == "sample":
        w = clipped
    else:
        raise ValueError(f"unknown prediction_type '{prediction_type}' "
                         "(expected 'epsilon', 'v_prediction' or 'sample')")
    return w.float().to(torch.as_tensor(timesteps).device)


def dm_loss(eps_hat: torch.Tensor, eps: torch.Tensor, form: str = "paper",
            weight: float | None = None, snr_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Distribution-matching term of Eq. 7 / Eq. 21 (see the module docstring for both forms).

    ``form="paper"``: ``weight * mean_elements( (1/B sum_i (eps_i - eps_hat_i))^2 )`` (Eq. 21, no
    per-sample weights: ``snr_weights`` is refused);
    ``form="official"``: ``weight * mean_elements( (sum_i w_i eps_hat_i - sum_i w_i eps_i)^2 )``.
    ``weight`` defaults to the form's published value (paper 0.05, official 0.003); pass
    ``weight=1.0`` for the raw quantity. ``snr_weights`` (``[B]``, official form) default to 1.
    """
    if form not in DM_FORMS:
        raise ValueError(f"unknown DM-loss form '{form}' (expected one of {DM_FORMS})")
    if eps_hat.shape != eps.shape:
        raise ValueError(f"eps_hat {tuple(eps_hat.shape)} and eps {tuple(eps.shape)} differ in shape")
    if form == "paper" and snr_weights is not None:
        raise ValueError("dm_loss(form='paper'): Eq. 21's DM term is the plain mean of the residuals and "
                         "has no per-sample (Min-SNR) weights; Min-SNR weights L_simple only "
                         "(overall_loss does that), or use form='official'")
    if weight is None:
        weight = PAPER_DM_WEIGHT if form == "paper" else OFFICIAL_DM_WEIGHT
    bsz = eps.shape[0]
    w = _check_weights(snr_weights, bsz, eps).view(bsz, *([1] * (eps.dim() - 1)))
    pred_ws = (eps_hat.float() * w).sum(dim=0)
    target_ws = (eps.float() * w).sum(dim=0)
    if form == "paper":
        pred_ws, target_ws = pred_ws / bsz, target_ws / bsz
    return float(weight) * (pred_ws - target_ws).pow(2).mean()


def overall_loss(eps_hat: torch.Tensor, eps: torch.Tensor, dm: bool = True, form: str = "paper",
                 weight: float | None = None, snr_weights: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``L_overall = L_simple + L_DM`` (Eq. 21); returns ``(total, l_simple, l_dm)``.

    ``snr_weights`` (Min-SNR, Table 7's SNR-gamma) weight ``L_simple``; the DM term takes them only in
    the official form (the official code reuses them there), never in the paper form. ``dm=False``:
    ``L_simple`` alone (``l_dm`` is a zero tensor).
    """
    ls = l_simple(eps_hat, eps, snr_weights=snr_weights)
    if not dm:
        return ls, ls, torch.zeros((), device=ls.device)
    ld = dm_loss(eps_hat, eps, form=form, weight=weight,
                 snr_weights=snr_weights if form == "official" else None)
    return ls + ld, ls, ld


# --------------------------------------------------------------------------------------------------
# MMD
# --------------------------------------------------------------------------------------------------
KERNELS = ("gaussian", "linear")
_BLOCK = 2048


def _as_2d(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    t = t.detach().to("cpu", torch.float64)
    if t.dim() == 1:
        t = t[:, None]
    return t.reshape(t.shape[0], -1)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d.clamp_min_(0.0)


def median_bandwidth(z, max_points: int = 2000, seed: int = 0) -> float:
    """Median heuristic: the median pairwise Euclidean distance of the (pooled) points.

    Uses a seeded subset of ``max_points`` points when there are more. Returns ``sigma`` of the
    Gaussian kernel ``exp(-||a - b||^2 / (2 sigma^2))``; 1.0 if all points coincide.
    """
    z = _as_2d(z)
    if z.shape[0] > max_points:
        g = torch.Generator().manual_seed(seed)
        z = z[torch.randperm(z.shape[0], generator=g)[:max_points]]
    d = _sq_dists(z, z)
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1)
    vals = d[iu[0], iu[1]]
    if vals.numel() == 0:
        return 1.0
    med = float(np.median(vals.sqrt().numpy()))  # numpy's median (averages the middle pair)
    return med if med > 0 else 1.0


def gaussian_gamma(bandwidth: float) -> float:
    """The ``gamma`` of ``sklearn.metrics.pairwise.rbf_kernel`` for a bandwidth sigma: 1/(2 sigma^2)."""
    return 1.0 / (2.0 * float(bandwidth) ** 2)


def _kernel(a: torch.Tensor, b: torch.Tensor, kernel: str, bandwidth: float | None) -> torch.Tensor:
    if kernel == "linear":
        return a @ b.T
    return torch.exp(-_sq_dists(a, b) * gaussian_gamma(bandwidth))


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, kernel: str, bandwidth: float | None,
                same: bool) -> tuple[float, float]:
    """Sum of all kernel entries and of the diagonal (when ``a is b``), in blocks."""
    total = 0.0
    for i in range(0, a.shape[0], _BLOCK):
        for j in range(0, b.shape[0], _BLOCK):
            total += float(_kernel(a[i:i + _BLOCK], b[j:j + _BLOCK], kernel, bandwidth).sum())
    diag = 0.0
    if same:
        diag = float((a * a).sum()) if kernel == "linear" else float(a.shape[0])
    return total, diag


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel '{kernel}' (expected one of {KERNELS})")


def mmd2(x, y, kernel: str = "gaussian", bandwidth: float | None = None,
         unbiased: bool = True) -> float:
    """Squared MMD between samples ``x`` ``[n, d]`` and ``y`` ``[m, d]`` (torch or numpy).

    ``kernel="gaussian"``: ``k(a, b) = exp(-||a - b||^2 / (2 bandwidth^2))`` with the median
    heuristic on the pooled sample when ``bandwidth`` is None; ``kernel="linear"``: ``k(a, b) = a.b``
    (then the biased estimate is exactly ``||mean(x) - mean(y)||^2``, Eq. 6).
    ``unbiased=True``: the U-statistic (diagonal terms of Kxx, Kyy left out; can be negative);
    ``False``: the V-statistic ``mean Kxx + mean Kyy - 2 mean Kxy`` (always >= 0).
    """
    _check_kernel(kernel)
    x, y = _as_2d(x), _as_2d(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features, y has {y.shape[1]}")
    n, m = x.shape[0], y.shape[0]
    if unbiased and (n < 2 or m < 2):
        raise ValueError("the unbiased MMD^2 needs at least 2 points in each sample")
    if kernel == "gaussian" and bandwidth is None:
        bandwidth = median_bandwidth(torch.cat([x, y]))
    sxx, dxx = _kernel_sum(x, x, kernel, bandwidth, True)
    syy, dyy = _kernel_sum(y, y, kernel, bandwidth, True)
    sxy, _ = _kernel_sum(x, y, kernel, bandwidth, False)
    if unbiased:
        return (sxx - dxx) / (n * (n - 1)) + (syy - dyy) / (m * (m - 1)) - 2.0 * sxy / (n * m)
    return sxx / n**2 + syy / m**2 - 2.0 * sxy / (n * m)


def mmd_permutation_test(x, y, n_perm: int = 200, seed: int = 0, kernel: str = "gaussian",
                         bandwidth: float | None = None, unbiased: bool = True
                         ) -> tuple[float, float]:
    """Permutation two-sample test of H0: x and y come from one distribution.

    The kernel matrix of the pooled sample is computed once (bandwidth by the median heuristic on the
    pooled sample, which permutations do not change); each of the ``n_perm`` seeded permutations
    reassigns the pooled points to two groups of sizes ``n`` and ``m``. Returns
    ``(mmd2, p_value)`` with ``p = (1 + #{perm >= observed}) / (1 + n_perm)``.
    """
    _check_kernel(kernel)
    x, y = _as_2d(x), _as_2d(y)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError("the permutation test needs at least 2 points in each sample")
    z = torch.cat([x, y])
    if kernel == "gaussian" and bandwidth is None:
        bandwidth = median_bandwidth(z)
    K = _kernel(z, z, kernel, bandwidth)
    diag = torch.diagonal(K).clone()

    def stats(ix: torch.Tensor) -> torch.Tensor:  # ix: [N, P] 0/1 membership of group x
        iy = 1.0 - ix
        Kx, Ky = K @ ix, K @ iy
        sxx, syy, sxy = (ix * Kx).sum(0), (iy * Ky).sum(0), (ix * Ky).sum(0)
        if unbiased:
            dxx, dyy = diag @ ix, diag @ iy
            return (sxx - dxx) / (n * (n - 1)) + (syy - dyy) / (m * (m - 1)) - 2 * sxy / (n * m)
        return sxx / n**2 + syy / m**2 - 2 * sxy / (n * m)

    N = n + m
    observed = torch.zeros(N, 1, dtype=K.dtype)
    observed[:n] = 1.0
    obs = float(stats(observed)[0])
    g = torch.Generator().manual_seed(int(seed))
    exceed = 0
    for start in range(0, n_perm, 64):
        p = min(64, n_perm - start)
        ranks = torch.argsort(torch.rand(p, N, generator=g), dim=1)  # [P, N] permutations
        ix = (ranks < n).to(K.dtype).T  # [N, P]
        exceed += int((stats(ix) >= obs - 1e-12).sum())
    return obs, (1.0 + exceed) / (1.0 + n_perm)


def mmd_power(sample_x, sample_y, ns: Sequence[int], trials: int, n_perm: int = 200,
              alpha: float = 0.05, seed: int = 0, kernel: str = "gaussian") -> list[float]:
    """Rejection rate of :func:`mmd_permutation_test` at level ``alpha`` for each sample size.

    ``sample_x(n, generator)`` / ``sample_y(n, generator)`` draw ``n`` points (a ``torch.Generator``
    seeded per trial). With ``sample_y`` equal to ``sample_x`` this estimates the type-I error.
    """
    rates = []
    for n in ns:
        rejected = 0
        for t in range(trials):
            g = torch.Generator().manual_seed(seed * 100003 + n * 1009 + t)
            _, p = mmd_permutation_test(sample_x(n, g), sample_y(n, g), n_perm=n_perm,
                                        seed=seed + t, kernel=kernel)
            rejected += p <= alpha
        rates.append(rejected / trials)
    return rates


__all__ = [
    "DM_FORMS", "KERNELS", "OFFICIAL_DM_WEIGHT", "OFFICIAL_SNR_GAMMA", "PAPER_DM_WEIGHT",
    "PAPER_SNR_GAMMA", "compute_snr", "dm_loss", "gaussian_gamma", "l_simple", "median_bandwidth",
    "min_snr_weights", "mmd2", "mmd_permutation_test", "mmd_power", "overall_loss",
]

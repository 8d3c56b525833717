"""LiRA membership inference (Carlini et al. 2022, "Membership Inference Attacks From First
Principles"), as used in Sec. 4.5 / Fig. 3 of Real-Fake.

Pure attack math first (numpy / scipy / scikit-learn, no torch needed):

- :func:`logit_scaled_confidence` - phi = log p_y - log sum_{y' != y} p_y', from a numerically stable
  log-softmax (logsumexp), for any number of queries (the image and its horizontal flip);
- :func:`balanced_masks` - N shadow models, each example a member of exactly N/2 of them;
- :func:`lira_scores` - online (per-example Gaussians of in and out scores, log-likelihood ratio with
  ``scipy.stats.norm.logpdf``), offline (out only, one-sided: ``norm.logcdf``), each with a per-example
  or a fixed global variance;
- :func:`attack_metrics` - ROC (``sklearn.metrics.roc_curve``), AUC, balanced accuracy, TPR at fixed FPR;
  :func:`bootstrap_intervals` - seeded, stratified bootstrap over examples of AUC and TPR at 0.1 % / 1 %
  FPR; :func:`evaluate_attack` - all of it as one :class:`Attack` with its (subsampled) ROC curve;
- :func:`plot_roc` / :func:`plot_fig3` - ROC curves on log-log axes from 1e-5, as in Carlini et al. and
  Real-Fake Fig. 3 (06 and 09 draw the figure with these).

Then the shadow-model machinery (:func:`run_shadow_models`, :func:`load_shadow_scores`): the trainer is
a callable passed in, every finished shadow model's scores are written atomically and sealed with
``rundir.mark_done``, never retrained, and index ranges (``shard="0:8"``) let several processes share
the work.

Then Sec. 4.5's protocol, one call per stage (06 is parameters -> these calls -> figure -> checks):
:func:`private_data` (the real train split, half members), :func:`shadow_models`, :func:`real_target`
(a classifier on the members), :func:`synthetic_target` (LoRA on the members with 02's recorded
configuration, a synthetic set of equal size with 03's settings, a classifier on it),
:func:`build_record` -> :class:`LiraRecord` (``results/06_lira.json``). Every folder under
``artifacts/lira/`` is named by ``rundir.content_hash`` of what defines its content.

Score arrays have shape ``[n_models, n_examples, n_queries]``; masks ``[n_models, n_examples]`` (bool).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

import numpy as np

from . import data, finetune as ft, synthesize as syn
from .classify import TensorImages, load_classifier, predict_logits, train_classifier
from .finetune import FinetuneConfig, FinetuneRecord
from .records import Record
from .rundir import atomic_path, content_hash, is_done, mark_done, read_json, tree_sha256, write_json

ATTACKS = ("online", "online_fixed", "offline", "offline_fixed")
ATTACK_LABELS = {
    "online": "LiRA online",
    "online_fixed": "LiRA online, fixed variance",
    "offline": "LiRA offline",
    "offline_fixed": "LiRA offline, fixed variance",
}
DEFAULT_FPRS = (1e-3, 1e-2)


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------
def _logsumexp(x: np.ndarray, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


def logit_scaled_confidence(logits: Any, labels: Any) -> np.ndarray:
    """phi = log p_y - log sum_{y' != y} p_y' (= log(p_y / (1 - p_y))), numerically stable.

    ``logits``: array-like (numpy or torch) ``[..., C]``; ``labels``: integer array-like broadcastable
    to ``logits.shape[:-1]`` (e.g. ``[n]`` for logits ``[n, C]``, or ``[n, 1]`` for ``[n, q, C]``).
    Computed in float64 from a log-softmax: no probability is ever rounded to 0 or 1, so phi stays
    finite even for logit gaps of thousands.
    """
    z = _to_numpy(logits).astype(np.float64)
    y = np.asarray(_to_numpy(labels)).astype(np.int64)
    if z.ndim == 1:
        z = z[None]
    y = np.broadcast_to(y.reshape(y.shape + (1,) * (z.ndim - 1 - y.ndim)), z.shape[:-1])
    logp = z - _logsumexp(z, axis=-1, keepdims=True)
    onehot = np.arange(z.shape[-1]) == y[..., None]
    log_py = np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
    log_rest = _logsumexp(np.where(onehot, -np.inf, logp), axis=-1)
    return log_py - log_rest


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def balanced_masks(n_models: int, n_examples: int, seed: int = 0) -> np.ndarray:
    """``[n_models, n_examples]`` bool: each example is 'in' for exactly ``n_models // 2`` models,
    chosen at random (Carlini et al.'s construction; ``n_models`` must be even). A draw that leaves a
    model without members or non-members (possible with a handful of examples only) is redrawn."""
    if n_models < 2 or n_models % 2:
        raise ValueError(f"n_models must be an even number >= 2 (each example in exactly half), got {n_models}")
    rng = np.random.default_rng(seed)
    for _ in range(1000):  # redrawn only when a model got no member or no non-member (a few examples)
        masks = rng.uniform(size=(n_models, n_examples)).argsort(0).argsort(0) < n_models // 2
        if n_examples < 2 or (masks.any(1) & ~masks.all(1)).all():
            break
    return masks


# --------------------------------------------------------------------------------------------------
# Attacks
# --------------------------------------------------------------------------------------------------
def _as3d(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a[..., None] if a.ndim == 2 else a


def _gaussian_fit(scores: np.ndarray, masks: np.ndarray, fixed: bool):
    """Per-example, per-query mean and std of the shadow scores selected by ``masks``.

    ``scores`` [M, n, q], ``masks`` [M, n]. Mean per example and query (Carlini et al.'s code takes the
    median; the mean is the Gaussian maximum-likelihood estimate the closed-form tests assume). Std per
    example (pooled over queries) or, with ``fixed``, one global std pooled over all examples'
    within-example deviations (their code's ``np.std`` over all scores also counts the spread of the
    per-example means, which inflates it).
    """
    min_count = 1 if fixed else 2  # a per-example variance needs two scores; a pooled one does not
    w = masks[..., None].astype(np.float64)  # [M, n, 1]
    cnt = w.sum(0)  # [n, 1]
    if (cnt < min_count).any():
        bad = int((cnt[:, 0] < min_count).sum())
        raise ValueError(f"{bad} example(s) have fewer than {min_count} shadow models on this side; "
                         "train more shadow models (each example must be in and out of several), or use a "
                         "fixed-variance attack")
    mean = (scores * w).sum(0) / cnt  # [n, q]
    dev2 = ((scores - mean[None]) ** 2 * w).sum(0)  # [n, q]
    if fixed:
        dof = (cnt - 1).sum() * scores.shape[2]
        if dof < 1:
            raise ValueError("a fixed variance needs some examples with at least 2 shadow scores on each "
                             "side; train more shadow models")
        var = dev2.sum() / dof
        std = np.full(mean.shape[0], np.sqrt(var))
    else:
        var = dev2.sum(1) / ((cnt[:, 0] - 1) * scores.shape[2])
        std = np.sqrt(var)
    return mean, np.maximum(std, 1e-30)[:, None]


def lira_scores(shadow_scores: np.ndarray, shadow_masks: np.ndarray, target_scores: np.ndarray,
                attack: str = "online") -> np.ndarray:
    """Membership score of every example in the target model (higher = more likely a member).

    ``shadow_scores`` [M, n, q] (or [M, n]); ``shadow_masks`` [M, n] (True = trained on it);
    ``target_scores`` [n, q] (or [n]). Attacks (Carlini et al. Sec. IV):

    - ``online``: log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out), per example, averaged over
      queries (their code's ``score.mean(1)``);
    - ``offline``: one-sided test against the out distribution only, log Pr[Z < phi] with
      Z ~ N(mu_out, s_out) (``norm.logcdf``), averaged over queries;
    - ``*_fixed``: the same with one global variance (pooled within-example deviations) instead of a
      per-example one, which is what works with few shadow models.
    """
    from scipy.stats import norm

    if attack not in ATTACKS:
        raise ValueError(f"unknown attack '{attack}'; choose from {ATTACKS}")
    s = _as3d(shadow_scores)
    m = np.asarray(shadow_masks, dtype=bool)
    t = np.asarray(target_scores, dtype=np.float64)
    t = t[:, None] if t.ndim == 1 else t
    if s.shape[:2] != m.shape or t.shape != s.shape[1:]:
        raise ValueError(f"shape mismatch: shadow scores {s.shape}, masks {m.shape}, target {t.shape}")
    fixed = attack.endswith("_fixed")
    mu_out, sd_out = _gaussian_fit(s, ~m, fixed)
    if attack.startswith("online"):
        mu_in, sd_in = _gaussian_fit(s, m, fixed)
        lr = norm.logpdf(t, mu_in, sd_in) - norm.logpdf(t, mu_out, sd_out)
    else:
        lr = norm.logcdf(t, mu_out, sd_out)
    return lr.mean(1)


def global_threshold_scores(target_scores: np.ndarray) -> np.ndarray:
    """The baseline attack without shadow models: the target's own phi (averaged over queries)."""
    t = np.asarray(target_scores, dtype=np.float64)
    return t.mean(1) if t.ndim == 2 else t


def leave_one_out(shadow_scores: np.ndarray, shadow_masks: np.ndarray, attack: str = "online",
                  targets: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Carlini et al.'s evaluation: each shadow model in turn is the target, the others the shadows.
    Returns (scores, is_member) concatenated over the targets."""
    s = _as3d(shadow_scores)
    m = np.asarray(shadow_masks, dtype=bool)
    preds, labels = [], []
    for k in (range(len(s)) if targets is None else targets):
        keep = np.arange(len(s)) != k
        preds.append(lira_scores(s[keep], m[keep], s[k], attack))
        labels.append(m[k])
    return np.concatenate(preds), np.concatenate(labels)


# --------------------------------------------------------------------------------------------------
# Metrics, bootstrap intervals, the ROC record of one attack
# --------------------------------------------------------------------------------------------------
def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Largest TPR whose FPR is <= ``target`` on the ROC (0 if none)."""
    ok = np.flatnonzero(np.asarray(fpr) <= target + 1e-12)
    return float(np.asarray(tpr)[ok].max()) if len(ok) else 0.0


def _check_labels(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    y = np.asarray(is_member, dtype=bool)
    if scores.shape != y.shape:
        raise ValueError(f"{scores.shape[0] if scores.ndim else 0} scores for {y.shape[0]} membership labels")
    if y.all() or (~y).all():
        raise ValueError("need both members and non-members to compute a ROC")
    return scores, y


def attack_metrics(scores: np.ndarray, is_member: np.ndarray,
                   fprs: Sequence[float] = DEFAULT_FPRS) -> dict[str, Any]:
    """ROC with ``sklearn.metrics.roc_curve``: AUC, balanced accuracy (max over thresholds of
    1 - (FPR + FNR) / 2, as Carlini et al.'s "accuracy"), TPR at each FPR in ``fprs``, plus the curve."""
    from sklearn.metrics import auc, roc_curve

    scores, y = _check_labels(scores, is_member)
    fpr, tpr, _ = roc_curve(y, scores)
    out = {
        "auc": float(auc(fpr, tpr)),
        "balanced_accuracy": float(np.max(1 - (fpr + (1 - tpr)) / 2)),
        "n_members": int(y.sum()),
        "n_nonmembers": int((~y).sum()),
        "min_resolvable_fpr": 1.0 / int((~y).sum()),
        "fpr": fpr,
        "tpr": tpr,
    }
    for f in fprs:
        out[f"tpr_at_{_fmt_fpr(f)}_fpr"] = tpr_at_fpr(fpr, tpr, f)
    return out


def _fmt_fpr(f: float) -> str:
    return f"{f * 100:g}%".replace("%", "pct")


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without the curve arrays."""
    return {k: v for k, v in metrics.items() if k not in ("fpr", "tpr")}


def fast_auc(scores: np.ndarray, is_member: np.ndarray) -> np.ndarray:
    """AUC as the Mann-Whitney statistic (average ranks for ties), row-wise for 2-D ``scores`` /
    ``is_member`` ([B, n]); equals ``sklearn.metrics.roc_auc_score`` (tested)."""
    from scipy.stats import rankdata

    s = np.atleast_2d(scores)
    y = np.atleast_2d(is_member).astype(bool)
    r = rankdata(s, axis=1)
    n_pos = y.sum(1)
    n_neg = y.shape[1] - n_pos
    return ((r * y).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def fast_tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, target: float) -> np.ndarray:
    """TPR at FPR <= ``target``, row-wise over [B, n_pos] / [B, n_neg]: the share of members scoring
    strictly above the (m+1)-th highest non-member, m = floor(target * n_neg) (the false positives
    allowed). Equals :func:`tpr_at_fpr` on the ``roc_curve`` (tested)."""
    pos = np.atleast_2d(member_scores)
    neg = -np.sort(-np.atleast_2d(nonmember_scores), axis=1)
    m = int(np.floor(target * neg.shape[1] + 1e-9))
    if m >= neg.shape[1]:
        return np.ones(pos.shape[0])
    return (pos > neg[:, m:m + 1]).mean(1)


@dataclass
class Interval:
    """Percentile bootstrap interval (``n_bootstrap`` resamples of the examples, members and
    non-members resampled separately so both counts stay fixed)."""

    lo: float
    hi: float
    confidence: float = 0.95
    n_bootstrap: int = 0


def _bootstrap_draws(scores: Sequence[np.ndarray], is_member: np.ndarray, n_bootstrap: int, seed: int,
                     fprs: Sequence[float], chunk: int = 200) -> list[dict[str, np.ndarray]]:
    """Metric values on ``n_bootstrap`` stratified resamples of the examples (members and non-members
    resampled separately, so both counts stay fixed); the SAME resampled examples for every score
    vector of ``scores`` (paired: differences between targets keep their correlation)."""
    checked = [_check_labels(s, is_member) for s in scores]
    y = checked[0][1]
    pos_idx, neg_idx = np.flatnonzero(y), np.flatnonzero(~y)
    keys = ["auc"] + [f"tpr_at_{_fmt_fpr(f)}_fpr" for f in fprs]
    out: list[dict[str, list]] = [{k: [] for k in keys} for _ in scores]
    rng = np.random.default_rng(seed)
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        ip = pos_idx[rng.integers(0, len(pos_idx), size=(b, len(pos_idx)))]
        ineg = neg_idx[rng.integers(0, len(neg_idx), size=(b, len(neg_idx)))]
        lab = np.concatenate([np.ones(ip.shape, dtype=bool), np.zeros(ineg.shape, dtype=bool)], 1)
        for (sc, _), vals in zip(checked, out):
            bp, bn = sc[ip], sc[ineg]
            vals["auc"].append(fast_auc(np.concatenate([bp, bn], 1), lab))
            for f, k in zip(fprs, keys[1:]):
                vals[k].append(fast_tpr_at_fpr(bp, bn, f))
    return [{k: np.concatenate(v) for k, v in vals.items()} for vals in out]


def _interval(draws: np.ndarray, confidence: float, n: int) -> Interval:
    a = (1 - confidence) / 2
    lo, hi = np.quantile(draws, [a, 1 - a])
    return Interval(float(lo), float(hi), confidence, int(n))


def bootstrap_intervals(scores: np.ndarray, is_member: np.ndarray, n_bootstrap: int = 1000, seed: int = 0,
                        fprs: Sequence[float] = DEFAULT_FPRS, confidence: float = 0.95) -> dict[str, Interval]:
    """Seeded, stratified percentile bootstrap over examples of the AUC and the TPR at each of ``fprs``:
    {"auc": Interval, "tpr_at_1pct_fpr": Interval, ...}. ``n_bootstrap = 0`` gives (nan, nan)."""
    keys = ["auc"] + [f"tpr_at_{_fmt_fpr(f)}_fpr" for f in fprs]
    if n_bootstrap <= 0:
        _check_labels(scores, is_member)
        return {k: Interval(float("nan"), float("nan"), confidence, 0) for k in keys}
    (draws,) = _bootstrap_draws([scores], is_member, n_bootstrap, seed, fprs)
    return {k: _interval(draws[k], confidence, n_bootstrap) for k in keys}


@dataclass
class Difference:
    """``b - a`` of one attack's metrics between two targets on the same examples (Sec. 4.5's
    comparison: ``a`` = real-trained, ``b`` = synthetic-trained), with paired bootstrap intervals (the
    same resampled examples for both targets). An interval entirely below 0: ``b`` leaks less."""

    attack: str
    a: str
    b: str
    auc: float
    tpr_at_0p1pct_fpr: float
    tpr_at_1pct_fpr: float
    auc_interval: Interval
    tpr_at_0p1pct_fpr_interval: Interval
    tpr_at_1pct_fpr_interval: Interval


def paired_difference(attack: str, a: Attack, b: Attack, scores_a: np.ndarray, scores_b: np.ndarray,
                      is_member: np.ndarray, n_bootstrap: int = 1000, seed: int = 0,
                      confidence: float = 0.95) -> Difference:
    """:class:`Difference` of attack ``attack`` between targets ``a`` and ``b`` (their attack scores on
    the same private examples), paired bootstrap over examples."""
    nan = Interval(float("nan"), float("nan"), confidence, 0)
    ci = {"auc": nan, "tpr_at_0.1pct_fpr": nan, "tpr_at_1pct_fpr": nan}
    if n_bootstrap > 0:
        da, db = _bootstrap_draws([scores_a, scores_b], is_member, n_bootstrap, seed, DEFAULT_FPRS)
        ci = {k: _interval(db[k] - da[k], confidence, n_bootstrap) for k in ci}
    return Difference(attack=attack, a=a.target, b=b.target, auc=b.auc - a.auc,
                      tpr_at_0p1pct_fpr=b.tpr_at_0p1pct_fpr - a.tpr_at_0p1pct_fpr,
                      tpr_at_1pct_fpr=b.tpr_at_1pct_fpr - a.tpr_at_1pct_fpr, auc_interval=ci["auc"],
                      tpr_at_0p1pct_fpr_interval=ci["tpr_at_0.1pct_fpr"],
                      tpr_at_1pct_fpr_interval=ci["tpr_at_1pct_fpr"])


def subsample_roc(fpr: np.ndarray, tpr: np.ndarray, max_points: int = 500) -> tuple[list[float], list[float]]:
    """At most ~``max_points`` points of a ROC curve for storing and plotting: the first and last point,
    the upper envelope at log-spaced FPRs from 1/len down to 1e-5 (where Fig. 3 looks) and at evenly spaced
    indices. A curve already small enough is returned unchanged."""
    fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
    if len(fpr) <= max_points:
        return fpr.tolist(), tpr.tolist()
    half = max(2, max_points // 2)
    grid = np.logspace(-5, 0, half)
    at_log = np.searchsorted(fpr, grid, side="right") - 1   # last point with fpr <= g: highest tpr there
    at_lin = np.linspace(0, len(fpr) - 1, half).round().astype(int)
    idx = np.unique(np.concatenate([[0, len(fpr) - 1], at_log[at_log >= 0], at_lin]))
    return fpr[idx].tolist(), tpr[idx].tolist()


@dataclass
class Attack:
    """One attack on one target model: the numbers of Real-Fake Fig. 3 and its ROC curve.

    ``target``: ``real`` (classifier trained on the members, Sec. 4.5 "private data"), ``synthetic``
    (trained on a synthetic set from a generator fine-tuned on the members) or ``leave-one-out``
    (Carlini et al.'s own evaluation over the shadow models). ``attack``: one of :data:`ATTACKS` or
    ``global`` (the global-threshold baseline, no shadow models). TPRs and FPRs are fractions.
    """

    target: str
    attack: str
    auc: float
    balanced_accuracy: float
    tpr_at_0p1pct_fpr: float
    tpr_at_1pct_fpr: float
    n_members: int
    n_nonmembers: int
    min_resolvable_fpr: float
    auc_interval: Interval
    tpr_at_0p1pct_fpr_interval: Interval
    tpr_at_1pct_fpr_interval: Interval
    fpr: list[float]
    tpr: list[float]

    @property
    def label(self) -> str:
        return ATTACK_LABELS.get(self.attack, "global threshold (no shadows)")


def evaluate_attack(target: str, attack: str, scores: np.ndarray, is_member: np.ndarray,
                    n_bootstrap: int = 1000, seed: int = 0, max_points: int = 500) -> Attack:
    """:func:`attack_metrics` + :func:`bootstrap_intervals` + :func:`subsample_roc` as an :class:`Attack`."""
    m = attack_metrics(scores, is_member)
    ci = bootstrap_intervals(scores, is_member, n_bootstrap, seed)
    fpr, tpr = subsample_roc(m["fpr"], m["tpr"], max_points)
    return Attack(target=target, attack=attack, auc=m["auc"], balanced_accuracy=m["balanced_accuracy"],
                  tpr_at_0p1pct_fpr=m["tpr_at_0.1pct_fpr"], tpr_at_1pct_fpr=m["tpr_at_1pct_fpr"],
                  n_members=m["n_members"], n_nonmembers=m["n_nonmembers"],
                  min_resolvable_fpr=m["min_resolvable_fpr"], auc_interval=ci["auc"],
                  tpr_at_0p1pct_fpr_interval=ci["tpr_at_0.1pct_fpr"],
                  tpr_at_1pct_fpr_interval=ci["tpr_at_1pct_fpr"], fpr=fpr, tpr=tpr)


def membership_scores(shadow_scores: np.ndarray, shadow_masks: np.ndarray,
                      target_scores: np.ndarray) -> dict[str, np.ndarray]:
    """{attack: membership score per example} for every attack of :data:`ATTACKS` and ``global``."""
    out = {a: lira_scores(shadow_scores, shadow_masks, target_scores, a) for a in ATTACKS}
    out["global"] = global_threshold_scores(target_scores)
    return out


def attack_target(target: str, shadow_scores: np.ndarray, shadow_masks: np.ndarray,
                  target_scores: np.ndarray, is_member: np.ndarray, n_bootstrap: int = 1000,
                  seed: int = 0, max_points: int = 500) -> list[Attack]:
    """Every attack of :data:`ATTACKS` and the global threshold against one target model's phi scores."""
    return [evaluate_attack(target, a, sc, is_member, n_bootstrap, seed, max_points)
            for a, sc in membership_scores(shadow_scores, shadow_masks, target_scores).items()]


def format_attacks(attacks: Sequence[Attack]) -> str:
    """One line per attack: AUC and TPR at 1 % FPR with their bootstrap intervals, TPR at 0.1 % FPR."""
    lines = []
    for a in attacks:
        ci_auc, ci_t = a.auc_interval, a.tpr_at_1pct_fpr_interval
        lines.append(f"{a.target:>13s} {a.label:32s} AUC {a.auc:.3f} [{ci_auc.lo:.3f}, {ci_auc.hi:.3f}]  "
                     f"TPR@1%FPR {100 * a.tpr_at_1pct_fpr:5.2f}% [{100 * ci_t.lo:.2f}, {100 * ci_t.hi:.2f}]  "
                     f"TPR@0.1%FPR {100 * a.tpr_at_0p1pct_fpr:5.2f}%  ({a.n_members} members / "
                     f"{a.n_nonmembers} non-members)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Figure (06 and 09 both draw Fig. 3 with these)
# --------------------------------------------------------------------------------------------------
def _curve(c: Any) -> tuple[str, np.ndarray, np.ndarray, float]:
    if isinstance(c, Attack):
        return c.label, np.asarray(c.fpr), np.asarray(c.tpr), c.auc
    return "", np.asarray(c["fpr"]), np.asarray(c["tpr"]), float(c["auc"])


def plot_roc(curves: dict[str, Any] | Sequence[Attack], ax=None, title: str = "", xmin: float = 1e-5):
    """ROC curves on log-log axes from ``xmin`` (Carlini et al.; Real-Fake Fig. 3). ``curves``: a list
    of :class:`Attack` (labelled by attack) or {label: metrics of :func:`attack_metrics`}."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 4.0))
    items = list(curves.items()) if isinstance(curves, dict) else [(None, c) for c in curves]
    grid = np.logspace(np.log10(xmin), 0, 200)
    ax.plot(grid, grid, ls="--", color="gray", lw=0.8, label="chance")
    for label, c in items:
        name, fpr, tpr, auc_ = _curve(c)
        ax.plot(np.clip(fpr, xmin, 1), np.clip(tpr, xmin, 1), lw=1.5,
                label=f"{label or name} (AUC {auc_:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(xmin, 1)
    ax.set_ylim(xmin, 1)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return ax.figure


TARGET_TITLES = {"real": "(a) trained on the real members", "synthetic": "(b) trained on synthetic data"}


def plot_fig3(record: "LiraRecord", axes: Sequence | None = None, with_global: bool = False):
    """Real-Fake Fig. 3 from a :class:`LiraRecord`: one log-log ROC panel per target (real, synthetic)
    with the four LiRA attacks. ``axes``: existing axes to draw into (09's figure), else a new figure."""
    import matplotlib.pyplot as plt

    targets = [t for t in ("real", "synthetic") if record.by_target(t)]
    if axes is None:
        fig, axes = plt.subplots(1, max(1, len(targets)), figsize=(4.4 * max(1, len(targets)), 4.2),
                                 squeeze=False)
        axes = list(axes[0])
    for ax, t in zip(axes, targets):
        plot_roc([a for a in record.by_target(t) if with_global or a.attack != "global"], ax=ax,
                 title=f"{TARGET_TITLES[t]} ({record.n_members} members / {record.n_nonmembers} non-members)")
    fig = axes[0].figure
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# Shadow models: resumable (rundir.mark_done per model), shardable
# --------------------------------------------------------------------------------------------------
TrainFn = Callable[[np.ndarray, int], Any]
"""``train_fn(member_indices, shadow_index) -> logits [n_examples, n_queries, C]`` for ALL examples
(queries: the image and its horizontal flip). It trains a fresh model on ``member_indices`` only."""
SCORES_FILE = "scores.npz"


def parse_shard(shard: str | Sequence[int] | None, n_models: int) -> list[int]:
    """``None``/``""`` -> all; ``"0:8"`` -> 0..7; ``"3"`` -> [3]; a list -> itself."""
    if shard is None or shard == "":
        return list(range(n_models))
    if isinstance(shard, str):
        if ":" in shard:
            a, b = shard.split(":")
            idx = list(range(int(a or 0), int(b) if b else n_models))
        else:
            idx = [int(shard)]
    else:
        idx = [int(i) for i in shard]
    bad = [i for i in idx if not 0 <= i < n_models]
    if bad:
        raise ValueError(f"shadow indices {bad} out of range 0..{n_models - 1}")
    return idx


def shadow_dir(out_dir: str | os.PathLike, k: int) -> Path:
    """The folder of shadow model ``k``: ``scores.npz`` + ``DONE.json`` (+ ``model/`` when trained by
    the kit's classifier trainer)."""
    return Path(out_dir) / f"shadow_{k:03d}"


def _write_npz(path: Path, **arrays) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _shadow_config(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{out_dir} has no shadow models (no config.json); run run_shadow_models")
    return read_json(path)


def _shadow_key(cfg: dict[str, Any], k: int) -> str:
    return content_hash({"shadow_config": cfg, "k": int(k)})


def prepare_shadow_dir(out_dir: str | os.PathLike, labels: np.ndarray, n_models: int, seed: int,
                       config: dict[str, Any] | None = None) -> np.ndarray:
    """Create (or check) ``out_dir/masks.npz`` + ``config.json``; returns the masks.

    A folder made for other labels, another number of models, seed or config is refused (stale
    scores would otherwise be silently mixed)."""
    out_dir = Path(out_dir)
    labels = np.asarray(labels, dtype=np.int64)
    cfg = json.loads(json.dumps({"n_models": int(n_models), "seed": int(seed), "n_examples": int(len(labels)),
                                 "labels_sha256": content_hash(labels.tolist(), 64), **(config or {})},
                                default=str))
    cfg_path, mask_path = out_dir / "config.json", out_dir / "masks.npz"
    masks = balanced_masks(n_models, len(labels), seed)
    if cfg_path.exists():
        old = read_json(cfg_path)
        if old != cfg:
            raise ValueError(f"{out_dir} holds shadow models of another configuration:\n  there: {old}\n"
                             f"  asked: {cfg}\nuse another folder or delete it")
        saved = np.load(mask_path)
        if not (np.array_equal(saved["masks"], masks) and np.array_equal(saved["labels"], labels)):
            raise ValueError(f"{mask_path} does not match the masks/labels of this configuration")
        return masks
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_npz(mask_path, masks=masks, labels=labels)
    write_json(cfg_path, cfg)
    return masks


def run_shadow_models(train_fn: TrainFn, labels: np.ndarray, out_dir: str | os.PathLike,
                      n_models: int = 16, seed: int = 0, shard: str | Sequence[int] | None = None,
                      config: dict[str, Any] | None = None, log: Callable[[str], None] | None = print
                      ) -> list[int]:
    """Train the shadow models of ``shard`` that are not finished yet; returns the indices trained.

    Shadow model k trains on ``masks[k]`` (see :func:`balanced_masks`); its phi scores for every
    example and query go to ``shadow_{k:03d}/scores.npz`` atomically, then ``rundir.mark_done`` seals
    the folder (key: the shadow configuration and k; the scores' SHA-256 is verified on reading). A
    finished model is never retrained, so a killed run resumes and processes given disjoint ``shard``
    ranges share the work.
    """
    labels = np.asarray(labels, dtype=np.int64)
    masks = prepare_shadow_dir(out_dir, labels, n_models, seed, config)
    cfg = _shadow_config(Path(out_dir))
    done = []
    for k in parse_shard(shard, n_models):
        d, key = shadow_dir(out_dir, k), _shadow_key(cfg, k)
        if is_done(d, key):
            continue
        logits = _to_numpy(train_fn(np.flatnonzero(masks[k]), k))
        if logits.ndim == 2:
            logits = logits[:, None]
        if logits.shape[0] != len(labels):
            raise ValueError(f"train_fn returned logits for {logits.shape[0]} examples, expected {len(labels)}")
        scores = logit_scaled_confidence(logits, labels[:, None])
        _write_npz(d / SCORES_FILE, scores=scores.astype(np.float64), mask=masks[k])
        mark_done(d, key, [SCORES_FILE], info={"k": k, "n_members": int(masks[k].sum())})
        done.append(k)
        if log:
            log(f"shadow model {k + 1}/{n_models} done ({int(masks[k].sum())} members)")
    return done


def load_shadow_scores(out_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(scores [M, n, q], masks [M, n]) of all shadow models; a clear error listing unfinished ones."""
    out_dir = Path(out_dir)
    cfg = _shadow_config(out_dir)
    n = int(cfg["n_models"])
    missing = [k for k in range(n) if not is_done(shadow_dir(out_dir, k), _shadow_key(cfg, k))]
    if missing:
        raise FileNotFoundError(f"shadow models {missing} of {n} are not finished in {out_dir}; "
                                "run (or resume) run_shadow_models for them (06: shadow_shard)")
    files = [np.load(shadow_dir(out_dir, k) / SCORES_FILE) for k in range(n)]
    return np.stack([f["scores"] for f in files]), np.stack([f["mask"] for f in files])


# --------------------------------------------------------------------------------------------------
# Glue to the kit's classifier trainer (realfake_utils.classify)
# --------------------------------------------------------------------------------------------------
def query_logits(model, images, batch_size: int = 256) -> np.ndarray:
    """Logits ``[N, 2, C]`` of the image and its horizontal flip (Carlini et al.'s two queries)."""
    a = predict_logits(model, images, batch_size=batch_size)
    b = predict_logits(model, images.flip(-1), batch_size=batch_size)
    return np.stack([_to_numpy(a), _to_numpy(b)], 1)


def train_target(out_dir: str | os.PathLike, images, labels, num_classes: int, recipe: dict[str, Any],
                 seed: int, device: str = "auto"):
    """Train (or read back) one classifier with ``classify.train_classifier`` and return it (eval)."""
    train_classifier(out_dir, TensorImages(images, labels), None, num_classes, recipe, seed=seed,
                     device=device)
    return load_classifier(out_dir, device=device)


def classifier_trainer(images, labels, out_root: str | os.PathLike, num_classes: int,
                       recipe: dict[str, Any], seed: int = 0, device: str = "auto") -> TrainFn:
    """A :data:`TrainFn` for :func:`run_shadow_models`: shadow model k is ``classify.train_classifier``
    on ``images[members]`` (run folder ``out_root/shadow_{k:03d}/model``, itself resumable per epoch),
    queried on all ``images`` and their flips."""
    labels = np.asarray(_to_numpy(labels), dtype=np.int64)

    def train(members: np.ndarray, k: int):
        import torch

        idx = torch.as_tensor(members, dtype=torch.long)
        model = train_target(shadow_dir(out_root, k) / "model", images[idx], labels[members], num_classes,
                             recipe, seed=seed * 1000 + k, device=device)
        return query_logits(model, images)

    return train


def scored_target(out_dir: str | os.PathLike, key: str, images, labels, query_images, query_labels,
                  num_classes: int, recipe: dict[str, Any], seed: int, device: str = "auto") -> np.ndarray:
    """phi scores [n, 2] of the private data under a classifier trained on (``images``, ``labels``);
    the classifier in ``out_dir/model``, the scores in ``out_dir/scores.npz``, sealed by ``mark_done``
    with ``key`` (a finished target is read back, never retrained)."""
    out_dir = Path(out_dir)
    if is_done(out_dir, key):
        return np.load(out_dir / SCORES_FILE)["scores"]
    model = train_target(out_dir / "model", images, labels, num_classes, recipe, seed=seed, device=device)
    scores = logit_scaled_confidence(query_logits(model, query_images), np.asarray(query_labels)[:, None])
    _write_npz(out_dir / SCORES_FILE, scores=scores)
    mark_done(out_dir, key, [SCORES_FILE], info={"n_train": int(len(labels))})
    return scores


# --------------------------------------------------------------------------------------------------
# Sec. 4.5 protocol: the private data, the shadow models, the two targets
# --------------------------------------------------------------------------------------------------
@dataclass
class PrivateData:
    """The private data of Sec. 4.5 (the real train split, or ``max_examples`` of it) split into
    exactly half members / half non-members."""

    images: Any                 # torch.uint8 [n, 3, S, S]
    labels: Any                 # torch.int64 [n]
    rows: list[dict[str, Any]]  # manifest rows, same order
    member: np.ndarray          # bool [n]
    class_names: list[str]
    image_size: int
    seed: int

    @property
    def ids(self) -> list[str]:
        return [str(r["id"]) for r in self.rows]

    @property
    def n_members(self) -> int:
        return int(self.member.sum())

    @property
    def n_nonmembers(self) -> int:
        return int((~self.member).sum())

    def key(self) -> dict[str, Any]:
        """What decides this split's content (hashed into every folder tag)."""
        return {"ids": self.ids, "member": np.flatnonzero(self.member).tolist(), "image_size": self.image_size,
                "labels": _to_numpy(self.labels).tolist()}

    def subset(self, which: np.ndarray):
        import torch

        idx = torch.as_tensor(np.flatnonzero(which), dtype=torch.long)
        return self.images[idx], self.labels[idx]


def private_data(run: Any, image_size: int, max_examples: int = 0, seed: int = 0) -> PrivateData:
    """The real train split of the run folder (01's manifest), a random ``max_examples`` subset of it
    if > 0, and a random half of it as members (seeded)."""
    data_dir = _run_root(run) / "artifacts" / "data"
    images, labels, rows = data.load_split(data_dir, "train", image_size)
    names = data.class_names(data.read_manifest(data_dir))
    rng = np.random.default_rng(seed)
    if max_examples and max_examples < len(rows):
        keep = np.sort(rng.choice(len(rows), size=max_examples, replace=False))
        images, labels, rows = images[keep], labels[keep], [rows[i] for i in keep]
    member = np.zeros(len(rows), dtype=bool)
    member[rng.permutation(len(rows))[:len(rows) // 2]] = True
    return PrivateData(images, labels, list(rows), member, list(names), int(image_size), int(seed))


def lira_root(run: Any) -> Path:
    return _run_root(run) / "artifacts" / "lira"


@dataclass
class ShadowModels:
    scores: np.ndarray   # [M, n, 2]
    masks: np.ndarray    # [M, n]
    folder: str          # relative to the run folder


def shadow_models(run: Any, private: PrivateData, recipe: dict[str, Any], n_shadow: int, seed: int = 0,
                  shard: str = "", device: str = "auto", log: Callable[[str], None] | None = print
                  ) -> ShadowModels:
    """Train (or resume) the ``n_shadow`` shadow classifiers on random halves of the private data
    (each example in exactly half) and return all their phi scores. Folder
    ``artifacts/lira/shadows_<content_hash>``: the hash covers the private split, the recipe,
    ``n_shadow`` and the seed, so any change trains a new, separate set."""
    cfg = {"private": private.key(), "recipe": recipe, "n_shadow": int(n_shadow), "seed": int(seed)}
    out = lira_root(run) / f"shadows_{content_hash(cfg)}"
    train_fn = classifier_trainer(private.images, private.labels, out, len(private.class_names), recipe,
                                  seed=seed, device=device)
    run_shadow_models(train_fn, _to_numpy(private.labels), out, n_models=n_shadow, seed=seed, shard=shard,
                      config={"unit": content_hash(cfg)}, log=log)
    scores, masks = load_shadow_scores(out)
    return ShadowModels(scores, masks, _rel(run, out))


def _run_root(run: Any) -> Path:
    """The run folder of a ``RunDir`` or of a plain path."""
    return Path(run) if isinstance(run, (str, os.PathLike)) else Path(run.root)


def _rel(run: Any, path: Path) -> str:
    return Record.rel(run, path)


def real_target(run: Any, private: PrivateData, recipe: dict[str, Any], seed: int = 0,
                device: str = "auto") -> np.ndarray:
    """Sec. 4.5 target (a): a classifier trained on the members, queried on all private data."""
    cfg = {"private": private.key(), "recipe": recipe, "seed": int(seed), "target": "real"}
    x, y = private.subset(private.member)
    return scored_target(lira_root(run) / f"target_real_{content_hash(cfg)}", content_hash(cfg), x, y,
                         private.images, _to_numpy(private.labels), len(private.class_names), recipe,
                         seed=seed + 10_000, device=device)


@dataclass
class SyntheticInfo:
    """How Sec. 4.5 target (b) was made (or why it was not)."""

    ran: bool
    status: str
    set_name: str = ""                       # the 03 set (Table 2 row) whose recipe was repeated
    lora_variant: str = ""
    n_synthetic: int = 0
    finetune_config: dict[str, Any] = field(default_factory=dict)   # the member LoRA's resolved config
    synthesis_settings: dict[str, Any] = field(default_factory=dict)
    folder: str = ""                         # relative to the run folder


@dataclass
class SyntheticTarget:
    scores: Any                              # phi [n, 2] on the private data, or None
    info: SyntheticInfo


def member_finetune_config(run: Any, variant: str, output_dir: str | os.PathLike):
    """02's resolved fine-tuning configuration of ``variant``, from 02's record
    (``FinetuneRecord.config_of`` -> ``FinetuneConfig.from_record``, never rebuilt from parameters):
    only the output folder differs; the training data (the members) is given to the trainer."""
    rec = FinetuneRecord.load(run)
    rec.config_of(variant, _run_root(run))   # a clear error when 02 did not train this variant
    return FinetuneConfig.from_record(rec, variant=variant, output_dir=str(output_dir))


def members_train_set(run: Any, private: PrivateData):
    """02's training data (``artifacts/lora/train_set.safetensors``: images, prompts, CLIP embeddings as
    02 trained on them) restricted to the members."""
    path = _run_root(run) / "artifacts" / "lora" / ft.TRAIN_SET_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run 02_finetune first (06 fine-tunes on the "
                                "members of exactly the training data 02 used)")
    ts = ft.load_train_set(path)
    pos = {i: j for j, i in enumerate(ts.ids)}
    missing = [i for i, m in zip(private.ids, private.member) if m and i not in pos]
    if missing:
        raise ValueError(f"{len(missing)} members (e.g. {missing[0]}) are not in 02's train set {path}: "
                         "02 ran on another split; rerun 02_finetune")
    sel = [pos[i] for i, m in zip(private.ids, private.member) if m]
    return ft.TrainSet(images=ts.images[sel], prompts=[ts.prompts[j] for j in sel], labels=ts.labels[sel],
                       image_embeds=None if ts.image_embeds is None else ts.image_embeds[sel],
                       ids=[ts.ids[j] for j in sel], class_names=ts.class_names)


def _base_identity(base_model: str) -> str:
    p = Path(base_model)
    return tree_sha256(p) if p.is_dir() else str(base_model)


def synthetic_target(run: Any, private: PrivateData, recipe: dict[str, Any], seed: int = 0,
                     device: str = "auto", set_name: str = "") -> SyntheticTarget:
    """Sec. 4.5 target (b): "We only employ LoRA to finetune the diffusion model on the member data,
    then generate synthetic data of equal size. Subsequently, we train a ResNet50 on synthetic data."

    The set whose recipe is repeated: 03's default set (``set_name`` overrides it), from 03's record.
    1. the LoRA variant behind it, trained on the members with 02's resolved configuration from 02's
       record (:func:`member_finetune_config`; same trainer ``finetune.launch_training``, same process
       count), on 02's training data restricted to the members (:func:`members_train_set`);
    2. one synthetic image per member (k = 1, "of equal size") with 03's settings of that set
       (``synthesize.member_settings``: the member LoRA swapped in) and guidance features from the
       members only (``synthesize.synthesize_members``);
    3. a classifier with ``recipe`` on that set, queried on all private data.
    Folder ``artifacts/lira/synthetic_<content_hash>`` (the hash covers the private split, both
    configurations, the base model's content and the recipe); every stage resumes.
    """
    import torch

    plan = syn.SynthesisRecord.load(run)
    target_set = plan.set_named(set_name) if set_name else plan.default()
    variant = target_set.variant
    if not target_set.row.get("finetune"):
        return SyntheticTarget(None, SyntheticInfo(False, f"not run: set {target_set.name} uses no LoRA "
                                                          "(nothing to fine-tune on the members)",
                                                   set_name=target_set.name, lora_variant=variant))
    root = lira_root(run)
    probe_cfg = member_finetune_config(run, variant, "")
    probe_st = syn.member_settings(run, target_set.name, lora_dir="")
    unit = {"private": private.key(), "finetune": probe_cfg.hashed_dict(),
            "base": _base_identity(probe_cfg.base_model),
            "synthesis": {k: v for k, v in probe_st.to_dict().items() if k not in ("base_model", "lora_dir", "lora_name")},
            "recipe": recipe, "seed": int(seed)}
    tag = content_hash(unit)
    folder = root / f"synthetic_{tag}"
    # 1. LoRA on the members, with 02's configuration and process count
    cfg = member_finetune_config(run, variant, folder / "lora")
    ts_m = members_train_set(run, private)
    ts_path = folder / "members_train_set.safetensors"
    if not ts_path.exists() or ft.load_train_set(ts_path).fingerprint() != ts_m.fingerprint():
        ft.save_train_set(ts_path, ts_m)
    nproc = ft.FinetuneRecord.load(run).variants[variant].num_processes
    ft.launch_training(cfg, ts_path, nproc or None)
    # 2. one synthetic image per member, with 03's settings of the set and the member LoRA
    member_rows = [dict(r, split="train") for r, m in zip(private.rows, private.member) if m]
    manifest = data.write_manifest(member_rows, folder / "members" / "manifest.csv")
    settings = syn.member_settings(run, target_set.name, lora_dir=str(folder / "lora"))
    set_dir = folder / "set"
    syn.synthesize_members(run, set_dir, settings, manifest, ts_m, device=device)
    srows = syn.image_set_rows(set_dir)
    syn_images = data.load_images(srows, private.image_size)
    syn_labels = torch.tensor([int(r["label"]) for r in srows])
    # 3. the classifier on the synthetic set, queried on all private data
    scores = scored_target(folder / "target", tag, syn_images, syn_labels, private.images,
                           _to_numpy(private.labels), len(private.class_names), recipe,
                           seed=seed + 20_000, device=device)
    info = SyntheticInfo(True, f"ran: {len(srows)} synthetic images ({target_set.name} recipe of 03) from a "
                               f"LoRA ({variant}, 02's configuration) fine-tuned on {len(ts_m)} members",
                         set_name=target_set.name, lora_variant=variant, n_synthetic=len(srows),
                         finetune_config=cfg.to_dict() | {"output_dir": _rel(run, Path(cfg.output_dir)),
                                                          "base_model": _rel(run, Path(cfg.base_model))},
                         synthesis_settings=settings.to_dict() | {"lora_dir": _rel(run, folder / "lora"),
                                                                  "base_model": _rel(run, Path(settings.base_model))},
                         folder=_rel(run, folder))
    return SyntheticTarget(scores, info)


# --------------------------------------------------------------------------------------------------
# The step's record (results/06_lira.json): read by 09 / report, never guessed
# --------------------------------------------------------------------------------------------------
def paper_fig3() -> dict[str, float]:
    """Fig. 3's published TPRs at 0.1 % FPR as fractions ({"real": 1e-4, "synthetic": 1e-5}), from
    ``resources/paper_numbers.yaml`` (the kit's one place for published numbers)."""
    import yaml

    path = Path(__file__).resolve().parent / "resources" / "paper_numbers.yaml"
    cells = yaml.safe_load(path.read_text())["tables"]["fig3_lira"]["IN-10"]
    return {k: float(v["value"]) / 100 for k, v in cells.items()}


@dataclass
class LiraRecord(Record):
    """Results of 06 (Sec. 4.5, Fig. 3): every attack on every target, with ROC curves and
    bootstrap intervals. TPR / FPR values are fractions."""

    STEP: ClassVar[str] = "06_lira"

    n_examples: int
    n_members: int
    n_nonmembers: int
    n_shadow: int
    recipe: str
    epochs: int
    n_bootstrap: int
    attacks: list[Attack]
    synthetic: SyntheticInfo
    leave_one_out: Optional[Attack] = None
    differences: list[Difference] = field(default_factory=list)   # synthetic - real, paired bootstrap
    paper_tpr_at_0p1pct_fpr: dict[str, float] = field(default_factory=dict)   # Fig. 3 caption
    shadow_folder: str = ""

    def by_target(self, target: str) -> list[Attack]:
        return [a for a in self.attacks if a.target == target]

    def find(self, target: str, attack: str = "online") -> Attack | None:
        return next((a for a in self.attacks if a.target == target and a.attack == attack), None)

    def difference(self, attack: str = "online") -> Difference | None:
        """Sec. 4.5's comparison for ``attack``: synthetic-trained minus real-trained (paired)."""
        return next((d for d in self.differences if d.attack == attack), None)


def build_record(private: PrivateData, shadows: ShadowModels, real_scores: np.ndarray,
                 synthetic: SyntheticTarget, recipe: dict[str, Any], n_bootstrap: int = 1000,
                 seed: int = 0, max_points: int = 500) -> LiraRecord:
    """All attacks of Fig. 3 on both targets (+ Carlini et al.'s leave-one-out over the shadows) as a
    :class:`LiraRecord`; intervals from a bootstrap over examples seeded with ``seed``."""
    member = private.member
    real = membership_scores(shadows.scores, shadows.masks, real_scores)
    attacks = [evaluate_attack("real", a, sc, member, n_bootstrap, seed, max_points) for a, sc in real.items()]
    differences = []
    if synthetic.scores is not None:
        syn = membership_scores(shadows.scores, shadows.masks, synthetic.scores)
        syn_attacks = [evaluate_attack("synthetic", a, sc, member, n_bootstrap, seed, max_points)
                       for a, sc in syn.items()]
        differences = [paired_difference(a.attack, r, a, real[a.attack], syn[a.attack], member, n_bootstrap, seed)
                       for r, a in zip(attacks, syn_attacks)]
        attacks += syn_attacks
    loo = None
    if len(shadows.scores) >= 3:
        loo = evaluate_attack("leave-one-out", "online_fixed",
                              *leave_one_out(shadows.scores, shadows.masks, "online_fixed"),
                              n_bootstrap=n_bootstrap, seed=seed, max_points=max_points)
    return LiraRecord(n_examples=len(member), n_members=int(member.sum()), n_nonmembers=int((~member).sum()),
                      n_shadow=int(len(shadows.scores)), recipe=str(recipe.get("name", "")),
                      epochs=int(recipe.get("epochs", 0)), n_bootstrap=int(n_bootstrap), attacks=attacks,
                      synthetic=synthetic.info, leave_one_out=loo, differences=differences,
                      paper_tpr_at_0p1pct_fpr=paper_fig3(),
                      shadow_folder=shadows.folder)


def format_fig3_comparison(record: LiraRecord) -> str:
    """Sec. 4.5's comparison: online-attack TPR at 0.1 % FPR, real- vs synthetic-trained, beside Fig. 3."""
    lines = [f"{'':28s} {'this run':>10s} {'paper (IN-10)':>14s}"]
    for t, title in (("real", "(a) trained on real members"), ("synthetic", "(b) trained on synthetic")):
        a = record.find(t)
        if a is not None:
            lines.append(f"{title:28s} {100 * a.tpr_at_0p1pct_fpr:9.3f}% "
                         f"{100 * record.paper_tpr_at_0p1pct_fpr.get(t, float('nan')):13.3f}%")
    d = record.difference("online")
    if d is not None:
        ci_t, ci_a = d.tpr_at_1pct_fpr_interval, d.auc_interval
        lines.append(f"synthetic - real (online, paired bootstrap over examples): TPR@1%FPR "
                     f"{100 * d.tpr_at_1pct_fpr:+.2f} points [{100 * ci_t.lo:+.2f}, {100 * ci_t.hi:+.2f}], "
                     f"AUC {d.auc:+.3f} [{ci_a.lo:+.3f}, {ci_a.hi:+.3f}]")
    lines.append(f"(smallest resolvable FPR here: {100 / max(record.n_nonmembers, 1):.3f}%; "
                 + ("TPR at 0.1% FPR is resolved)" if record.n_nonmembers >= 1000 else
                    "with fewer than 1,000 non-members TPR at 0.1% FPR is the TPR at zero false positives)"))
    return "\n".join(lines)

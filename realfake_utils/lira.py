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
- :func:`plot_roc` - ROC curves on log-log axes from 1e-5, as in Carlini et al. and Real-Fake Fig. 3.

Then the shadow-model machinery (:func:`run_shadow_models`, :func:`load_shadow_scores`): the trainer is
a callable passed in, every finished shadow model's scores are written atomically and never retrained,
and index ranges (``shard="0:8"``) let several processes share the work.

Score arrays have shape ``[n_models, n_examples, n_queries]``; masks ``[n_models, n_examples]`` (bool).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

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
    chosen at random (Carlini et al.'s construction; ``n_models`` must be even)."""
    if n_models < 2 or n_models % 2:
        raise ValueError(f"n_models must be an even number >= 2 (each example in exactly half), got {n_models}")
    rng = np.random.default_rng(seed)
    order = rng.uniform(size=(n_models, n_examples)).argsort(0).argsort(0)
    return order < n_models // 2


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
# Metrics and figure
# --------------------------------------------------------------------------------------------------
def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Largest TPR whose FPR is <= ``target`` on the ROC (0 if none)."""
    ok = np.flatnonzero(np.asarray(fpr) <= target + 1e-12)
    return float(np.asarray(tpr)[ok].max()) if len(ok) else 0.0


def attack_metrics(scores: np.ndarray, is_member: np.ndarray,
                   fprs: Sequence[float] = DEFAULT_FPRS) -> dict[str, Any]:
    """ROC with ``sklearn.metrics.roc_curve``: AUC, balanced accuracy (max over thresholds of
    1 - (FPR + FNR) / 2, as Carlini et al.'s "accuracy"), TPR at each FPR in ``fprs``, plus the curve."""
    from sklearn.metrics import auc, roc_curve

    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_member, dtype=bool)
    if y.all() or (~y).all():
        raise ValueError("need both members and non-members to compute a ROC")
    scores = np.nan_to_num(scores, nan=-np.inf)
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
    """Metrics without the curve arrays (for ``results/*.json``)."""
    return {k: v for k, v in metrics.items() if k not in ("fpr", "tpr")}


def plot_roc(curves: dict[str, dict[str, Any]], ax=None, title: str = "", xmin: float = 1e-5):
    """ROC curves on log-log axes from ``xmin`` (Carlini et al. Fig.; Real-Fake Fig. 3).
    ``curves``: label -> metrics from :func:`attack_metrics`."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 4.0))
    grid = np.logspace(np.log10(xmin), 0, 200)
    ax.plot(grid, grid, ls="--", color="gray", lw=0.8, label="chance")
    for label, m in curves.items():
        fpr = np.clip(m["fpr"], xmin, 1)
        ax.plot(fpr, np.clip(m["tpr"], xmin, 1), lw=1.5,
                label=f"{label} (AUC {m['auc']:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(xmin, 1)
    ax.set_ylim(xmin, 1)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    return ax.figure


# --------------------------------------------------------------------------------------------------
# Shadow models: resumable, shardable
# --------------------------------------------------------------------------------------------------
TrainFn = Callable[[np.ndarray, int], Any]
"""``train_fn(member_indices, shadow_index) -> logits [n_examples, n_queries, C]`` for ALL examples
(queries: the image and its horizontal flip). It trains a fresh model on ``member_indices`` only."""


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


def shadow_path(out_dir: str | os.PathLike, k: int) -> Path:
    return Path(out_dir) / f"shadow_{k:03d}.npz"


def _write_npz(path: Path, **arrays) -> None:
    from .rundir import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def prepare_shadow_dir(out_dir: str | os.PathLike, labels: np.ndarray, n_models: int, seed: int,
                       config: dict[str, Any] | None = None) -> np.ndarray:
    """Create (or check) ``out_dir/masks.npz`` + ``config.json``; returns the masks.

    A folder made for other labels, another number of models, seed or config is refused (stale
    scores would otherwise be silently mixed)."""
    from .rundir import read_json, write_json

    out_dir = Path(out_dir)
    labels = np.asarray(labels, dtype=np.int64)
    cfg = {"n_models": int(n_models), "seed": int(seed), "n_examples": int(len(labels)),
           **(config or {})}
    cfg_path, mask_path = out_dir / "config.json", out_dir / "masks.npz"
    masks = balanced_masks(n_models, len(labels), seed)
    if cfg_path.exists():
        old = read_json(cfg_path)
        if old != json.loads(json.dumps(cfg, default=str)):
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
    example and query go to ``out_dir/shadow_{k:03d}.npz`` atomically. A finished file is never
    retrained, so a killed run resumes and processes given disjoint ``shard`` ranges share the work.
    """
    labels = np.asarray(labels, dtype=np.int64)
    masks = prepare_shadow_dir(out_dir, labels, n_models, seed, config)
    done = []
    for k in parse_shard(shard, n_models):
        path = shadow_path(out_dir, k)
        if path.exists():
            continue
        logits = _to_numpy(train_fn(np.flatnonzero(masks[k]), k))
        if logits.ndim == 2:
            logits = logits[:, None]
        if logits.shape[0] != len(labels):
            raise ValueError(f"train_fn returned logits for {logits.shape[0]} examples, expected {len(labels)}")
        scores = logit_scaled_confidence(logits, labels[:, None])
        _write_npz(path, scores=scores.astype(np.float64), mask=masks[k])
        done.append(k)
        if log:
            log(f"shadow model {k + 1}/{n_models} done ({int(masks[k].sum())} members)")
    return done


def load_shadow_scores(out_dir: str | os.PathLike, n_models: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(scores [M, n, q], masks [M, n]) of all shadow models; a clear error listing missing ones."""
    from .rundir import read_json

    out_dir = Path(out_dir)
    cfg_path = out_dir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{out_dir} has no shadow models (no config.json); run run_shadow_models")
    n = int(n_models or read_json(cfg_path)["n_models"])
    missing = [k for k in range(n) if not shadow_path(out_dir, k).exists()]
    if missing:
        raise FileNotFoundError(f"shadow models {missing} of {n} are not finished in {out_dir}; "
                                "run (or resume) run_shadow_models for them")
    files = [np.load(shadow_path(out_dir, k)) for k in range(n)]
    return np.stack([f["scores"] for f in files]), np.stack([f["mask"] for f in files])


# --------------------------------------------------------------------------------------------------
# Glue to the kit's classifier trainer (realfake_utils.classify)
# --------------------------------------------------------------------------------------------------
class TensorImages:
    """A (PIL image, label) dataset over uint8 images ``[N,3,H,W]`` (what ``classify.train_classifier``
    consumes)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i].permute(1, 2, 0).numpy()), self.labels[i]


def query_logits(model, images, batch_size: int = 256) -> np.ndarray:
    """Logits ``[N, 2, C]`` of the image and its horizontal flip (Carlini et al.'s two queries)."""
    from .classify import predict_logits

    a = predict_logits(model, images, batch_size=batch_size)
    b = predict_logits(model, images.flip(-1), batch_size=batch_size)
    return np.stack([_to_numpy(a), _to_numpy(b)], 1)


def train_target(out_dir: str | os.PathLike, images, labels, num_classes: int, recipe: dict[str, Any],
                 seed: int, device: str = "auto"):
    """Train (or read back) one classifier with ``classify.train_classifier`` and return it (eval)."""
    from .classify import load_classifier, train_classifier

    train_classifier(out_dir, TensorImages(images, labels), None, num_classes, recipe, seed=seed,
                     device=device)
    return load_classifier(out_dir, device=device)


def classifier_trainer(images, labels, out_root: str | os.PathLike, num_classes: int,
                       recipe: dict[str, Any], seed: int = 0, device: str = "auto") -> TrainFn:
    """A :data:`TrainFn` for :func:`run_shadow_models`: shadow model k is ``classify.train_classifier``
    on ``images[members]`` (run folder ``out_root/model_{k:03d}``, itself resumable per epoch), queried
    on all ``images`` and their flips."""
    labels = np.asarray(_to_numpy(labels), dtype=np.int64)

    def train(members: np.ndarray, k: int):
        import torch

        idx = torch.as_tensor(members, dtype=torch.long)
        model = train_target(Path(out_root) / f"model_{k:03d}", images[idx], labels[members], num_classes,
                             recipe, seed=seed * 1000 + k, device=device)
        return query_logits(model, images)

    return train

"""Checks that a generator learned the target: the sample probe, MMD² against the real noise floor,
and the synthetic-only accuracy of the capacity oracle.

- :func:`sample_prompts`: class-prompted samples (``photo of [classname]``) through the stock pipeline;
- :func:`probe_accuracy` / :func:`feature_probe_accuracy` (the **sample probe**): a classifier trained on
  REAL target-train images (pixels with the luminance standardised per image, or CLIP features) labels
  generated samples; the fraction it labels as the prompted class (issue goal: >= 90 % after fine-tuning);
- :func:`mmd_report`: MMD² (Gaussian kernel, median bandwidth, unbiased; ``losses.mmd2``) of samples to
  the target train set in CLIP space, beside the noise floor train-vs-test (two real samples of the
  target) and their ratio (goal: within 3x of the floor);
- the synthetic-only accuracy itself (a classifier trained on samples) is ``classify.synthetic_only_check``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from .features import build_prompt
from .losses import mmd2 as _mmd2


# issue 12's goals for a generator that learned the target (read in 02's record and REPORT.md)
PROBE_GOAL = 0.90        # the sample probe labels at least this fraction of the samples as prompted
MMD_RATIO_GOAL = 3.0     # biased MMD² of the samples at most this many times the real test split's


def sample_prompts(pipe, class_names: Sequence[str], n_per_class: int | Sequence[int],
                   guidance_scale: float = 2.0, num_inference_steps: int = 20, seed: int = 0,
                   batch_size: int = 100, negative_prompt: str | None = None,
                   **pipe_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Images from prompts ``photo of <class>`` (stock pipeline call): ``n_per_class`` per class (an int
    or one count per class, e.g. the train split's, for 1x). Returns ``(uint8 [N,3,H,W], labels [N])``."""
    counts = [int(n_per_class)] * len(class_names) if np.isscalar(n_per_class) else [int(c) for c in n_per_class]
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    out = []
    for s in range(0, len(labels), batch_size):
        lab = labels[s:s + batch_size]
        g = torch.Generator().manual_seed(int(seed) * 100_003 + s)
        kw = {} if negative_prompt is None else {"negative_prompt": [negative_prompt] * len(lab)}
        with torch.no_grad():
            res = pipe(prompt=[build_prompt(class_names[c]) for c in lab], guidance_scale=guidance_scale,
                       num_inference_steps=num_inference_steps, generator=g, output_type="np", **kw,
                       **pipe_kwargs)
        out.append(torch.from_numpy((np.clip(res.images, 0, 1) * 255).round().astype(np.uint8))
                   .permute(0, 3, 1, 2))
    return torch.cat(out), torch.tensor(labels)


def probe_features(images: torch.Tensor, normalize_style: bool = True, max_size: int = 16) -> np.ndarray:
    """Pixel features for the probe (images average-pooled to at most ``max_size``): with
    ``normalize_style``, the luminance of each image standardised to zero mean and unit variance
    (blind to tint and contrast, so the probe measures the class content); else raw RGB in [0, 1]."""
    import torch.nn.functional as F

    x = images.float() / 255.0
    if x.shape[-1] > max_size:
        x = F.adaptive_avg_pool2d(x, max_size)
    if normalize_style:
        x = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).flatten(1)
        x = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)
    return x.flatten(1).numpy()


def _probe_model(kind: str, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    if kind == "svm":
        return SVC(C=10.0, gamma="scale", random_state=seed)
    if kind == "logistic":
        return LogisticRegression(max_iter=2000, C=0.5, random_state=seed)
    raise ValueError(f"probe model must be 'svm' or 'logistic', got {kind!r}")


def probe_accuracy(train_images: torch.Tensor, train_labels, eval_sets: dict[str, tuple],
                   normalize_style: bool = True, seed: int = 0, model: str = "svm") -> dict[str, float]:
    """The sample probe on pixels: a classifier (RBF ``svm`` or ``logistic`` regression) fitted on real
    target-train images (:func:`probe_features`); its accuracy on each ``name: (images, labels)`` of
    ``eval_sets`` (generated samples with their prompted class; the real test set is its ceiling)."""
    clf = _probe_model(model, seed)
    clf.fit(probe_features(train_images, normalize_style), np.asarray(train_labels))
    return {k: float((clf.predict(probe_features(x, normalize_style)) == np.asarray(y)).mean())
            for k, (x, y) in eval_sets.items()}


def feature_probe_accuracy(train_feats: torch.Tensor, train_labels, eval_sets: dict[str, tuple],
                           seed: int = 0) -> dict[str, float]:
    """The sample probe on (standardised) CLIP features of the real target train set (logistic
    regression), accuracy on each ``name: (features, labels)`` (for data sets whose class is in the
    colours, such as EuroSAT, where a luminance probe is blind)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5, random_state=seed))
    clf.fit(np.asarray(train_feats, dtype=np.float64), np.asarray(train_labels))
    return {k: float((clf.predict(np.asarray(x, dtype=np.float64)) == np.asarray(y)).mean())
            for k, (x, y) in eval_sets.items()}


def mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased squared MMD, Gaussian kernel with the median heuristic (``losses.mmd2``)."""
    return float(_mmd2(x, y, kernel="gaussian", unbiased=True))


def _equal_size_biased(a: torch.Tensor, b: torch.Tensor, train: torch.Tensor, kw: dict, draws: int,
                       seed: int) -> tuple[float, float, int]:
    """Biased MMD² of ``a`` and of ``b`` to ``train`` with the larger of ``a`` / ``b`` drawn down to the
    smaller's size (the mean over ``draws`` seeded subsets): the V-statistic's bias is about
    ``(1 - mean k) / n`` on each side, so two estimates are comparable only at one ``n``."""
    n = min(len(a), len(b))
    g = torch.Generator().manual_seed(seed)

    def mean_biased(x: torch.Tensor) -> float:
        if len(x) == n:
            return float(_mmd2(x, train, unbiased=False, **kw))
        return float(np.mean([_mmd2(x[torch.randperm(len(x), generator=g)[:n]], train, unbiased=False, **kw)
                              for _ in range(draws)]))
    return mean_biased(a), mean_biased(b), n


def mmd_report(sample_feats: torch.Tensor, train_feats: torch.Tensor, test_feats: torch.Tensor,
               draws: int = 8, seed: int = 0) -> dict[str, float]:
    """MMD² of samples to the target train set in CLIP space beside the real noise floor (the real test
    set vs the train set), with one Gaussian bandwidth for both (the median pairwise distance of the
    train features). ``mmd2_vs_train`` / ``noise_floor``: unbiased (U-statistic; the floor is ~0 and can
    be negative); ``ratio``: samples / floor of the biased (V-statistic, always > 0) estimates at one
    sample size ``n_equal`` (the larger of samples / test drawn down to the smaller, mean of ``draws``
    subsets), the number the goal "within 3x of the real-test noise floor" is read on. At unequal sizes
    the V-statistic's ``1/n`` bias alone would move the ratio (more test images, lower floor)."""
    s = torch.as_tensor(sample_feats, dtype=torch.float64)
    t = torch.as_tensor(train_feats, dtype=torch.float64)
    te = torch.as_tensor(test_feats, dtype=torch.float64)
    bw = float(torch.cdist(t, t).flatten().median()) or 1.0
    kw = dict(kernel="gaussian", bandwidth=bw)
    m = float(_mmd2(s, t, unbiased=True, **kw))
    floor = float(_mmd2(te, t, unbiased=True, **kw))
    vm, vfloor, n = _equal_size_biased(s, te, t, kw, draws, seed)
    return {"mmd2_vs_train": m, "noise_floor": floor, "biased_vs_train": vm, "biased_noise_floor": vfloor,
            "ratio": vm / max(vfloor, 1e-12), "n_equal": n, "bandwidth": bw}


__all__ = ["MMD_RATIO_GOAL", "PROBE_GOAL", "feature_probe_accuracy", "mmd2", "mmd_report", "probe_accuracy", "probe_features",
           "sample_prompts"]

"""Seed statistics: the one place where per-seed values become estimates, intervals and verdicts.

Every step (04 classifiers, 05 OOD, 06 LiRA, 08 retrieval) and the report use these functions, so a
comparison printed by a notebook and the verdict in REPORT.md are the same computation.

- :func:`seed_stats`: mean, sample std and a Student-t 95 % interval of the mean over seeds.
- :func:`paired`: the paired difference (same classifier seeds on both sides), with its t interval.
- :func:`welch`: Welch's unequal-variance t-test and interval, for unpaired samples.
- :func:`verdict`: "holds" / "contradicted" / "inconclusive" from a comparison's interval.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

CONFIDENCE = 0.95


def _t_quantile(df: float, confidence: float) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, df))


class _Interval:
    """Shared by :class:`Estimate` and :class:`Comparison` (both dataclasses with ``lo`` / ``hi``)."""

    lo: float
    hi: float

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Estimate(_Interval):
    """Mean over ``n`` seeds, sample std (ddof 1), and the ``confidence`` t interval of the mean."""

    n: int
    mean: float
    std: float
    lo: float
    hi: float
    min: float
    max: float
    confidence: float = CONFIDENCE

    def fmt(self, digits: int = 1, unit: str = "") -> str:
        """``mean +- half-width`` (95 % interval), or the single value when n = 1."""
        if self.n == 0:
            return "n/a"
        if self.n == 1 or not math.isfinite(self.half_width):
            return f"{self.mean:.{digits}f}{unit} (n=1)"
        return f"{self.mean:.{digits}f} +- {self.half_width:.{digits}f}{unit} (n={self.n})"


def seed_stats(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean, std and t interval of per-seed values (an empty input gives nan everywhere)."""
    a = np.asarray([float(v) for v in values], dtype=float)
    if a.size == 0:
        nan = float("nan")
        return Estimate(0, nan, nan, nan, nan, nan, nan, confidence)
    mean = float(a.mean())
    if a.size == 1:
        return Estimate(1, mean, 0.0, -math.inf, math.inf, mean, mean, confidence)
    std = float(a.std(ddof=1))
    half = _t_quantile(a.size - 1, confidence) * std / math.sqrt(a.size)
    return Estimate(int(a.size), mean, std, mean - half, mean + half, float(a.min()), float(a.max()),
                    confidence)


@dataclass(frozen=True)
class Comparison(_Interval):
    """``diff = mean(b) - mean(a)`` with its interval and two-sided p-value (None when not testable)."""

    test: str
    diff: float
    lo: float
    hi: float
    p: float | None
    n_a: int
    n_b: int
    confidence: float = CONFIDENCE



def paired(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Comparison:
    """Paired t interval of ``b - a`` (element i of both sides shares classifier seed i)."""
    from scipy import stats

    a_ = np.asarray([float(v) for v in a], dtype=float)
    b_ = np.asarray([float(v) for v in b], dtype=float)
    if a_.size != b_.size:
        raise ValueError(f"paired comparison needs equal lengths, got {a_.size} and {b_.size}")
    d = b_ - a_
    if d.size < 2:
        diff = float(d.mean()) if d.size else float("nan")
        return Comparison("paired t", diff, -math.inf, math.inf, None, a_.size, b_.size, confidence)
    est = seed_stats(d, confidence)
    if est.std == 0:   # every seed moved by exactly the same amount: the t model has no spread to
        # scale, and a zero-width interval would claim certainty that two or three seeds cannot give
        return Comparison("paired t (no spread: untestable)", est.mean, -math.inf, math.inf, None,
                          a_.size, b_.size, confidence)
    p = float(stats.ttest_rel(b_, a_).pvalue)
    return Comparison("paired t", est.mean, est.lo, est.hi, p, a_.size, b_.size, confidence)


def welch(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Comparison:
    """Welch's t-test and interval of ``mean(b) - mean(a)`` (Welch-Satterthwaite degrees of freedom)."""
    from scipy import stats

    a_ = np.asarray([float(v) for v in a], dtype=float)
    b_ = np.asarray([float(v) for v in b], dtype=float)
    if a_.size == 0 or b_.size == 0:
        return Comparison("welch", float("nan"), float("nan"), float("nan"), None, a_.size, b_.size,
                          confidence)
    diff = float(b_.mean() - a_.mean())
    if a_.size < 2 or b_.size < 2:
        return Comparison("welch", diff, -math.inf, math.inf, None, a_.size, b_.size, confidence)
    va, vb = a_.var(ddof=1) / a_.size, b_.var(ddof=1) / b_.size
    se = math.sqrt(va + vb)
    if se == 0:        # both sides constant over seeds: untestable, as in :func:`paired`
        return Comparison("welch (no spread: untestable)", diff, -math.inf, math.inf, None, a_.size,
                          b_.size, confidence)
    df = (va + vb) ** 2 / (va ** 2 / (a_.size - 1) + vb ** 2 / (b_.size - 1))
    half = _t_quantile(df, confidence) * se
    p = float(stats.ttest_ind(b_, a_, equal_var=False).pvalue)
    return Comparison("welch", diff, diff - half, diff + half, p, a_.size, b_.size, confidence)


def compare(a: Sequence[float], b: Sequence[float], paired_seeds: bool,
            confidence: float = CONFIDENCE) -> Comparison:
    """:func:`paired` when both sides ran the same classifier seeds, else :func:`welch`."""
    if paired_seeds and len(a) == len(b):
        return paired(a, b, confidence)
    return welch(a, b, confidence)


def verdict(c: Comparison, expect: str = "greater", margin: float = 0.0) -> str:
    """The claim "b > a" (``expect='greater'``), "b < a" (``'less'``) or "|b - a| <= margin"
    (``'equal'``), judged by the comparison's interval: ``holds`` if the interval lies on the claimed
    side, ``contradicted`` if on the other, ``inconclusive`` if it straddles."""
    lo, hi = c.lo, c.hi
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if expect == "greater":
        return "holds" if lo > margin else "contradicted" if hi < margin else "inconclusive"
    if expect == "less":
        return "holds" if hi < -margin else "contradicted" if lo > -margin else "inconclusive"
    if expect == "equal":
        return "holds" if (lo >= -margin and hi <= margin) else \
            "contradicted" if (lo > margin or hi < -margin) else "inconclusive"
    raise ValueError(f"expect must be 'greater', 'less' or 'equal', not {expect!r}")

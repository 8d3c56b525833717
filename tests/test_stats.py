"""realfake_utils.stats against values computed here from first principles (scipy only for t quantiles)."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from realfake_utils import stats


def test_seed_stats_is_the_student_t_interval_of_the_mean():
    v = [91.0, 94.5, 92.0, 95.5]
    e = stats.seed_stats(v)
    m, s = np.mean(v), np.std(v, ddof=1)
    half = sps.t.ppf(0.975, len(v) - 1) * s / math.sqrt(len(v))
    assert (e.n, e.mean, e.std) == (4, pytest.approx(m), pytest.approx(s))
    assert (e.lo, e.hi) == (pytest.approx(m - half), pytest.approx(m + half))
    assert e.half_width == pytest.approx(half)
    assert stats.seed_stats([3.0]).fmt() == "3.0 (n=1)" and math.isinf(stats.seed_stats([3.0]).hi)
    assert stats.seed_stats([]).fmt() == "n/a"


def test_paired_equals_the_t_interval_of_the_differences_and_scipys_p():
    a, b = [80.0, 84.0, 82.0], [85.0, 88.0, 86.0]
    c = stats.paired(a, b)
    d = np.subtract(b, a)
    half = sps.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    assert c.diff == pytest.approx(d.mean())
    assert (c.lo, c.hi) == (pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
    assert c.p == pytest.approx(sps.ttest_rel(b, a).pvalue)
    assert stats.verdict(c, "greater") == "holds" and stats.verdict(c, "less") == "contradicted"
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired([1.0, 2.0], [1.0])


def test_welch_uses_welch_satterthwaite_degrees_of_freedom():
    a, b = [70.0, 75.0, 72.0, 71.0], [80.0, 90.0, 85.0]
    c = stats.welch(a, b)
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    half = sps.t.ppf(0.975, df) * math.sqrt(va + vb)
    diff = np.mean(b) - np.mean(a)
    assert (c.lo, c.hi) == (pytest.approx(diff - half), pytest.approx(diff + half))
    assert c.p == pytest.approx(sps.ttest_ind(b, a, equal_var=False).pvalue)
    assert stats.compare(a, b, paired_seeds=True).test == "welch"       # unequal lengths: unpaired


def test_no_spread_over_seeds_is_untestable_not_certain():
    # two seeds that moved by exactly the same amount say nothing about the seed-to-seed spread
    c = stats.paired([90.0, 91.0], [92.0, 93.0])
    assert c.diff == pytest.approx(2.0) and c.p is None and math.isinf(c.lo) and math.isinf(c.hi)
    assert stats.verdict(c, "greater") == "inconclusive"
    w = stats.welch([90.0, 90.0], [95.0, 95.0])
    assert w.p is None and stats.verdict(w, "greater") == "inconclusive"
    assert stats.verdict(stats.paired([50.0, 50.0], [50.0, 50.0]), "equal", margin=1.0) == "inconclusive"


def test_verdict_equal_and_margin():
    near = stats.Comparison("paired t", 0.2, -0.5, 0.9, 0.5, 3, 3)
    assert stats.verdict(near, "equal", margin=1.0) == "holds"
    assert stats.verdict(near, "equal", margin=0.1) == "inconclusive"
    far = stats.Comparison("paired t", 5.0, 3.0, 7.0, 0.01, 3, 3)
    assert stats.verdict(far, "equal", margin=1.0) == "contradicted"
    with pytest.raises(ValueError, match="expect"):
        stats.verdict(far, "bigger")

"""Paired statistics: bootstrap interval of a difference, exact McNemar, verdicts."""

import math

import numpy as np
import pytest

from pitome.stats import compare, mcnemar_exact, paired_bootstrap


def test_mcnemar_exact_matches_hand_computed_binomial():
    # 10 discordant pairs, 1 for a, 9 for b: p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    a = [1] * 1 + [0] * 9 + [1] * 40 + [0] * 5
    b = [0] * 1 + [1] * 9 + [1] * 40 + [0] * 5
    result = mcnemar_exact(a, b)
    assert (result.only_a, result.only_b) == (1, 9)
    assert result.p == pytest.approx(22 / 1024)
    assert mcnemar_exact(b, a).p == pytest.approx(22 / 1024)


def test_mcnemar_without_discordant_pairs_is_one_and_is_capped():
    same = [1, 0, 1, 1]
    assert mcnemar_exact(same, same).p == 1.0
    assert mcnemar_exact([1, 0], [0, 1]).p == 1.0  # 2 * P(X <= 1 | n=2) = 1.5, capped


def test_mcnemar_agrees_with_scipy_binomtest():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    a, b = rng.random(300) < 0.8, rng.random(300) < 0.75
    result = mcnemar_exact(a, b)
    expected = scipy_stats.binomtest(result.only_a, result.only_a + result.only_b, 0.5).pvalue
    assert result.p == pytest.approx(expected, rel=1e-9)


def test_bootstrap_difference_and_interval():
    rng = np.random.default_rng(0)
    b = rng.random(500) < 0.8
    a = b.copy()
    a[np.flatnonzero(~b)[:25]] = True  # a fixes 25 of b's errors: +5 points, no item worse
    result = paired_bootstrap(a, b, scale=100.0, resamples=4000)
    assert result.diff == pytest.approx(5.0)
    assert 0 < result.low < 5.0 < result.high < 10.0
    # the interval width is about 2 * 1.96 * sd(d) / sqrt(n) * 100
    d = (a.astype(float) - b) * 100
    half = 1.96 * d.std() / math.sqrt(d.size)
    assert (result.high - result.low) / 2 == pytest.approx(half, rel=0.15)


def test_bootstrap_is_deterministic_and_seeded():
    rng = np.random.default_rng(1)
    a, b = rng.random(200), rng.random(200)
    assert paired_bootstrap(a, b, seed=5) == paired_bootstrap(a, b, seed=5)
    assert paired_bootstrap(a, b, seed=5).low != paired_bootstrap(a, b, seed=6).low


def test_pairing_matters_identical_shift_is_significant():
    # a = b + 0.001 everywhere: the means differ by a hair, yet every pair agrees, so the interval is tight
    rng = np.random.default_rng(2)
    b = rng.random(100)
    result = compare(b + 0.001, b)
    assert result.verdict == "better" and result.p is None
    assert result.low == pytest.approx(0.001) and result.high == pytest.approx(0.001)


def test_small_differences_are_ties():
    # 0.4 points on 500 items (3 vs 1 discordant items) must not be called a win
    b = np.array([1] * 400 + [0] * 100)
    a = b.copy()
    a[400:403] = 1
    a[0] = 0
    result = compare(a, b, scale=100.0)
    assert result.diff == pytest.approx(0.4)
    assert result.verdict == "tie" and result.p > 0.05 and result.low <= 0


def test_large_differences_are_wins_and_losses():
    b = np.array([1] * 400 + [0] * 100)
    a = b.copy()
    a[400:440] = 1
    assert compare(a, b, scale=100.0).verdict == "better"
    assert compare(b, a, scale=100.0).verdict == "worse"
    assert "[" in compare(a, b, scale=100.0).text() and "p=" in compare(a, b, scale=100.0).text()


@pytest.mark.parametrize("bad", [dict(a=[1, 0], b=[1]), dict(a=[], b=[]), dict(a=[1, float("nan")], b=[1, 0])])
def test_bad_input_raises(bad):
    with pytest.raises(ValueError):
        paired_bootstrap(bad["a"], bad["b"])


def test_mcnemar_rejects_non_binary():
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([0.5, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap([1, 0], [0, 1], level=1.5)

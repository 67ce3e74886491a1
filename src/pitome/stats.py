"""Paired statistics for comparing two merge settings on the same items.

Two settings evaluated on the same items are compared item by item, never by their two means alone: a
0.3-point gap in accuracy on 500 items is well inside the noise, and only the paired test can tell.

- ``paired_bootstrap``: difference of means (a - b) with a percentile bootstrap interval that resamples
  items (both settings keep their pairing), for accuracies (0/1 per item) and for per-item cosines alike.
- ``mcnemar_exact``: the exact two-sided McNemar test on the discordant pairs of two 0/1 vectors.
- ``compare``: both at once, with a verdict ('better' / 'worse' / 'tie') that needs the interval to exclude
  zero and, for 0/1 data, McNemar's p below ``alpha`` too.

numpy only; deterministic for a given seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

__all__ = ["BootstrapResult", "McNemarResult", "Comparison", "paired_bootstrap", "mcnemar_exact", "compare"]


@dataclass(frozen=True)
class BootstrapResult:
    """Difference of means a - b (times ``scale``) and its ``level`` percentile interval [low, high]."""

    diff: float
    low: float
    high: float
    level: float
    n: int


@dataclass(frozen=True)
class McNemarResult:
    """only_a: items right under a only; only_b: right under b only; p: exact two-sided p-value."""

    only_a: int
    only_b: int
    p: float


@dataclass(frozen=True)
class Comparison:
    """a against b on the same items (see ``compare``)."""

    diff: float
    low: float
    high: float
    p: Optional[float]
    only_a: Optional[int]
    only_b: Optional[int]
    n: int
    verdict: str

    def text(self, digits: int = 1) -> str:
        """'+1.2 [+0.2, +2.2]' (the interval), with McNemar's p when there is one."""
        fmt = f"{{:+.{digits}f}}"
        out = f"{fmt.format(self.diff)} [{fmt.format(self.low)}, {fmt.format(self.high)}]"
        if self.p is not None:
            out += f" p={self.p:.2g}"
        return out


def _paired(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired data must have one value per item in both settings, got {x.size} and {y.size}")
    if x.size == 0:
        raise ValueError("paired data is empty")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired data contains NaN or infinite values")
    return x, y


def paired_bootstrap(a: Any, b: Any, level: float = 0.95, resamples: int = 10000, seed: int = 0,
                     scale: float = 1.0) -> BootstrapResult:
    """mean(a) - mean(b) and a percentile interval from ``resamples`` resamplings of the items.

    scale: multiply everything (100 turns 0/1 correctness into percentage points).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    x, y = _paired(a, b)
    d = (x - y) * scale
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // d.size)  # bound the index matrix to ~16 MB
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        means[start:start + count] = d[rng.integers(0, d.size, size=(count, d.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return BootstrapResult(float(d.mean()), float(low), float(high), level, int(d.size))


def _binomial_tail(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exact (integer arithmetic, then one division)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n


def mcnemar_exact(a_correct: Any, b_correct: Any) -> McNemarResult:
    """Exact McNemar test: under 'no difference' each discordant item is right under a or b with prob. 1/2."""
    x, y = _paired(a_correct, b_correct)
    if not (np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all()):
        raise ValueError("McNemar's test needs 0/1 (wrong/right) values per item")
    only_a = int(((x == 1) & (y == 0)).sum())
    only_b = int(((x == 0) & (y == 1)).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else min(1.0, 2.0 * _binomial_tail(min(only_a, only_b), n))
    return McNemarResult(only_a, only_b, p)


def compare(a: Any, b: Any, level: float = 0.95, alpha: float = 0.05, resamples: int = 10000, seed: int = 0,
            scale: float = 1.0) -> Comparison:
    """a against b: bootstrap difference and interval; McNemar too when both are 0/1 per item.

    verdict: 'better' when the interval lies above 0 (and McNemar p < alpha for 0/1 data), 'worse' when it
    lies below 0 (same condition), otherwise 'tie'.
    """
    boot = paired_bootstrap(a, b, level, resamples, seed, scale)
    x, y = _paired(a, b)
    binary = bool(np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all())
    test = mcnemar_exact(x, y) if binary else None
    significant = test is None or test.p < alpha
    verdict = "tie"
    if significant and boot.low > 0:
        verdict = "better"
    elif significant and boot.high < 0:
        verdict = "worse"
    return Comparison(boot.diff, boot.low, boot.high, None if test is None else test.p,
                      None if test is None else test.only_a, None if test is None else test.only_b, boot.n, verdict)

"""The statistics evaluation, judging and hallucination share: win rates with their interval and sign test, the
comparisons a difference needs, proportion intervals, rater agreement, ROC AUC, and a reproducible spread subset.

Below ``evaluate``, ``judge`` and ``hallucination``, which import it and nothing of each other's for these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np

__all__ = [
    "WinRate", "comparisons_needed", "evenly_spaced", "fleiss_kappa", "interval_from_standard_error", "roc_auc",
    "wilson_interval", "win_rate",
]


@dataclass(frozen=True)
class WinRate:
    """A pairwise win rate (ties count one half) with an interval and a test that agree with each other.

    The sign test sets ties aside and asks whether the decisive share ``wins / (wins + losses)`` differs from
    one half. The interval is that share's exact (Clopper-Pearson) 95 % interval, carried over to the
    tie-halved rate with the ties held fixed: rate = ties / 2n + (decisive / n) * share. So the rate's interval
    excludes 50 % exactly when p < 0.05 (one half maps to one half), and without ties it is the share's own.
    """

    wins: int
    losses: int
    ties: int
    rate: float
    ci_low: float
    ci_high: float
    p_value: float  # exact two-sided sign test of wins against losses, ties set aside
    n: int
    decisive_share: float | None  # wins / (wins + losses); None when every comparison was a tie
    decisive_ci: tuple[float, float] | None  # its exact 95 % interval
    method: str = ("exact sign test of wins against losses (ties set aside); 95 % interval: the decisive share's "
                   "Clopper-Pearson interval, ties held fixed")


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Return Wilson's score interval for a proportion ``successes / n`` (successes may be fractional)."""
    if n <= 0:
        raise ValueError("an interval needs at least one observation")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0 or n successes one end is exactly 0 or 1; the formula leaves rounding dust (3e-17) there.
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == n else min(1.0, centre + half))


def win_rate(wins: int, losses: int, ties: int = 0) -> WinRate:
    """Return the win rate of ``wins`` against ``losses`` (ties one half) with its interval and sign test."""
    from scipy.stats import binomtest

    if min(wins, losses, ties) < 0:
        raise ValueError(f"counts must be non-negative, got wins={wins}, losses={losses}, ties={ties}")
    n = wins + losses + ties
    if n == 0:
        raise ValueError("a win rate needs at least one comparison")
    decisive = wins + losses
    rate = (wins + ties / 2) / n
    if decisive == 0:
        return WinRate(wins, losses, ties, rate, rate, rate, 1.0, n, None, None)
    test = binomtest(wins, decisive, 0.5)
    share_ci = test.proportion_ci(confidence_level=0.95, method="exact")
    tie_part, weight = ties / (2 * n), decisive / n
    return WinRate(wins, losses, ties, rate, tie_part + weight * share_ci.low, tie_part + weight * share_ci.high,
                   float(test.pvalue), n, wins / decisive, (share_ci.low, share_ci.high))


def comparisons_needed(difference: float = 0.05, power: float = 0.8, alpha: float = 0.05) -> int:
    """Return the decisive comparisons a two-sided sign test needs to detect ``0.5 + difference``.

    Normal approximation to the binomial: n = ((z_{1-alpha/2} * 0.5 + z_power * sqrt(p(1-p))) / difference)^2.
    """
    if not 0 < difference < 0.5:
        raise ValueError(f"difference must lie in (0, 0.5), got {difference}")
    normal = NormalDist()
    p = 0.5 + difference
    root_n = (normal.inv_cdf(1 - alpha / 2) * 0.5 + normal.inv_cdf(power) * math.sqrt(p * (1 - p))) / difference
    return math.ceil(root_n ** 2)


def interval_from_standard_error(rate: float, standard_error: float) -> tuple[float, float]:
    """Return the normal 95 % interval ``rate ± 1.96 SE`` (AlpacaEval publishes a standard error, not an interval)."""
    half = NormalDist().inv_cdf(0.975) * standard_error
    return rate - half, rate + half


def fleiss_kappa(table: Sequence[Sequence[str]]) -> float:
    """Return Fleiss' kappa of a table with one row per item and one label per rater (same raters per row)."""
    categories = sorted({label for row in table for label in row})
    raters = len(table[0])
    counts = np.array([[row.count(category) for category in categories] for row in table], dtype=float)
    per_item = ((counts ** 2).sum(axis=1) - raters) / (raters * (raters - 1))
    shares = counts.sum(axis=0) / counts.sum()
    expected = float((shares ** 2).sum())
    if expected == 1.0:
        return 1.0  # every rater gave every item the same single label
    return float((per_item.mean() - expected) / (1 - expected))


def evenly_spaced(items: Sequence, count: int | None) -> list:
    """Return ``count`` items spread evenly over ``items`` (all of them for None): a fixed, reproducible subset."""
    if count is None or count >= len(items):
        return list(items)
    return [items[(index * len(items)) // count] for index in range(count)]


def roc_auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Return the area under the ROC curve of a score that should be higher for ``positives`` than ``negatives``."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([1] * len(positives) + [0] * len(negatives), [*positives, *negatives]))

"""Paired statistics for `kiln compare`: two versions answered the same items, so each figure is
tested on the per-item differences, not on two independent standard errors.

- an accuracy or pass@k (a mean over documents or problems): a paired bootstrap of the mean
  difference, resampling items (for 0/1 outcomes it decides as McNemar's test does: only the
  items the two versions answer differently move it);
- bits per byte (a ratio of sums over documents): a paired bootstrap of the difference of the two
  ratios, resampling documents;
- a speed measured interleaved (A, B, A, B, ...) in one process: a t-interval over the paired
  differences of at least MIN_REPEATS repeats.

Each test gives the difference (B - A), its 95% interval and a two-sided p-value; `holm` decides
which of the figures shown moved, at a 5% family-wise error rate over all of them.

Those tests ask whether these two models differ on items like these. Two re-trains of one recipe
with different seeds are two different models, and on tiny a seed moves bits per byte by more
than the paired interval's width. `with_seed_spread` asks instead whether the recipes differ: the
figure's standard deviation across k re-trains of one recipe (s) adds 2 s^2 to the variance of
the difference (one seed draw on each side), and the interval is a t-interval with
Welch-Satterthwaite's degrees of freedom (k - 1 where the seeds dominate).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

ALPHA = 0.05
RESAMPLES = 4000
MIN_REPEATS = 5


@dataclass
class Paired:
    delta: float  # B - A
    low: float  # the 95% interval of delta
    high: float
    p: float  # two-sided, before the Holm correction
    n: int  # items (or repeats) paired
    method: str
    se: float  # the standard error of delta (the bootstrap draws' standard deviation)

    def as_dict(self) -> dict:
        return asdict(self)


def _bootstrap_p(draws: np.ndarray) -> float:
    """Two-sided p of "no difference" from bootstrap draws of the difference (percentile test)."""
    below, above = (draws <= 0).sum(), (draws >= 0).sum()
    return float(min(1.0, 2 * (min(below, above) + 1) / (len(draws) + 1)))


def _indices(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))


def paired_mean(a: list[float], b: list[float], seed: int = 0) -> Paired:
    """B's mean minus A's over the same items (accuracies: 0/1; pass@k: each problem's estimate)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = y - x
    delta = float(d.mean())
    if not d.any():  # every item answered alike: nothing to resample
        return Paired(delta, 0.0, 0.0, 1.0, len(d), "paired bootstrap", 0.0)
    draws = d[_indices(len(d), seed)].mean(axis=1)
    low, high = np.quantile(draws, [ALPHA / 2, 1 - ALPHA / 2])
    return Paired(delta, float(low), float(high), _bootstrap_p(draws), len(d), "paired bootstrap", float(draws.std()))


def paired_ratio(a: list[tuple[float, float]], b: list[tuple[float, float]], seed: int = 0) -> Paired:
    """B's bits per byte minus A's over the same documents, each given as (bits, bytes)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    delta = float(y[:, 0].sum() / y[:, 1].sum() - x[:, 0].sum() / x[:, 1].sum())
    idx = _indices(len(x), seed)
    draws = y[idx, 0].sum(1) / y[idx, 1].sum(1) - x[idx, 0].sum(1) / x[idx, 1].sum(1)
    if not np.any(draws) and delta == 0:
        return Paired(0.0, 0.0, 0.0, 1.0, len(x), "paired bootstrap (ratio)", 0.0)
    low, high = np.quantile(draws, [ALPHA / 2, 1 - ALPHA / 2])
    p = _bootstrap_p(draws)
    return Paired(delta, float(low), float(high), p, len(x), "paired bootstrap (ratio)", float(draws.std()))


def paired_t(a: list[float], b: list[float]) -> Paired | None:
    """B - A over repeats measured in pairs (A, B, A, B, ...): the mean difference with a
    t-interval; None with fewer than MIN_REPEATS pairs (too few to say)."""
    from scipy import stats

    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    n = len(d)
    if n < MIN_REPEATS:
        return None
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        return Paired(mean, mean, mean, 1.0 if mean == 0 else 0.0, n, "paired t", 0.0)
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * se
    p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    return Paired(mean, mean - half, mean + half, p, n, "paired t over interleaved repeats", se)


def with_seed_spread(r: Paired, spread: float, retrains: int) -> Paired:
    """`r` as a difference between recipes: the figure's standard deviation `spread` across
    `retrains` re-trains of one recipe (seeds alone differing) widens the interval; see the module
    docstring."""
    from scipy import stats

    seeds = 2 * spread**2
    method = f"{r.method} + seed spread of {retrains} re-trains"
    if seeds == 0:  # the re-trains agreed exactly: nothing to add
        return replace(r, method=method)
    se = math.sqrt(r.se**2 + seeds)
    df = (retrains - 1) * (se**2 / seeds) ** 2  # Welch-Satterthwaite
    half = float(stats.t.ppf(1 - ALPHA / 2, df)) * se
    p = float(2 * stats.t.sf(abs(r.delta) / se, df))
    return Paired(r.delta, r.delta - half, r.delta + half, p, r.n, method, se)


def holm(pvalues: list[float], alpha: float = ALPHA) -> tuple[list[bool], list[float]]:
    """Holm's step-down correction: (rejected, adjusted p) per p-value, in the given order. The
    family-wise error rate over all the figures is at most `alpha`."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    m, running = len(pvalues), 0.0
    adjusted = [1.0] * m
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return [adj <= alpha for adj in adjusted], adjusted

"""The numeric core, on arrays: the recovered fraction, paired bootstrap draws and their intervals.

Every interval is a percentile interval of a **paired bootstrap over test examples** (P, U and ∅ outcomes
resampled with the same indices), combined with a bootstrap over replicates (seeds, partner sets) when
there are several. A numpy Generator draws the index matrices directly: `scipy.stats.bootstrap` resamples
one statistic at a time and cannot share draws across pairs and defenses or nest replicates.

**Undefined draws.** In a draw whose gain V_U − V_∅ is ≤ 0 the recovered fraction is undefined (the
victim gives nothing in that resample). Such a draw is never dropped (dropping it would condition the
interval on a positive gain and make it too narrow): it counts at both ends, as recovered 0 for the lower
bound and as recovered 1 for the upper (`percentile_ci` with ``undefined=(0, 1)``). The interval is then
never narrower than what the data support, and where many draws are undefined it widens towards [0, 1],
which is the honest answer. ``tests/test_scoring_statistics.py`` checks its coverage by simulation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

RECOVERED_UNDEFINED = (0.0, 1.0)
"""How a draw with no positive gain counts in a recovered interval: 0 at the lower end, 1 at the upper."""


def recovered_fraction(v_protected: float, v_unprotected: float, v_counterfactual: float,
                       higher_is_better: bool = True) -> float | None:
    """clip((V_P − V_∅) / (V_U − V_∅), 0, 1); None when the victim gives nothing (gain ≤ 0)."""
    s = 1.0 if higher_is_better else -1.0
    gain = s * (v_unprotected - v_counterfactual)
    if gain <= 0:
        return None
    return min(1.0, max(0.0, s * (v_protected - v_counterfactual) / gain))


def utility_ratio(artifact: float, expert: float, higher_is_better: bool = True) -> float | None:
    """metric(artifact) / metric(expert), inverted for lower-is-better metrics; None when undefined."""
    num, den = (artifact, expert) if higher_is_better else (expert, artifact)
    if den <= 0:
        return None
    return num / den


@dataclass(frozen=True)
class PairOutcomes:
    """Per-example outcomes of one pipeline on one victim, [replicate, example], in the metric's direction
    (sign-flipped for lower-is-better metrics, so larger is better). NaN rows mark missing replicates."""

    protected: np.ndarray
    unprotected: np.ndarray
    counterfactual: np.ndarray


def present_replicates(outcomes: PairOutcomes) -> np.ndarray:
    """[R] bool: the replicates with outcomes in all three fillings (no NaN row in P, U or ∅)."""
    return ~(np.isnan(outcomes.protected).any(axis=1) | np.isnan(outcomes.unprotected).any(axis=1)
             | np.isnan(outcomes.counterfactual).any(axis=1))


def weighted_means(x: np.ndarray, w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Per draw: the replicate-weighted mean of example-weighted means. x [R, n]; w [B, n] example
    counts; c [B, R] replicate counts. Missing replicates (NaN rows) get no weight."""
    present = ~np.isnan(x).any(axis=1)
    xs = np.where(present[:, None], x, 0.0)
    per_rep = (w @ xs.T) / w.sum(axis=1, keepdims=True)  # [B, R]
    cw = c * present[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (cw * per_rep).sum(axis=1) / cw.sum(axis=1)


@dataclass(frozen=True)
class PairStatistics:
    """Per draw (or one point): the three victim values, the gain and the recovered fraction."""

    v_protected: np.ndarray
    v_unprotected: np.ndarray
    v_counterfactual: np.ndarray

    @property
    def gain(self) -> np.ndarray:
        return self.v_unprotected - self.v_counterfactual

    @property
    def recovered(self) -> np.ndarray:
        """clip((V_P − V_∅) / gain, 0, 1); NaN where the gain is ≤ 0 (undefined: see the module docstring)."""
        gain = self.gain
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.clip((self.v_protected - self.v_counterfactual) / gain, 0.0, 1.0)
        return np.where(gain > 0, r, np.nan)


def pair_statistics(outcomes: PairOutcomes, example_weights: np.ndarray, replicate_weights: np.ndarray) -> PairStatistics:
    """The pair's values under example weights [B, n] and replicate weights [B, R] (all ones = the point)."""
    return PairStatistics(*(weighted_means(x, example_weights, replicate_weights)
                            for x in (outcomes.protected, outcomes.unprotected, outcomes.counterfactual)))


def bootstrap_counts(rng: np.random.Generator, n: int, draws: int, within: np.ndarray | None = None) -> np.ndarray:
    """[draws, n] resampling counts: each draw resamples the indices ``within`` (default all) with replacement."""
    idx = np.arange(n) if within is None else np.asarray(within)
    counts = np.zeros((draws, n))
    picks = idx[rng.integers(0, len(idx), size=(draws, len(idx)))]
    rows = np.repeat(np.arange(draws), len(idx))
    np.add.at(counts, (rows, picks.ravel()), 1.0)
    return counts


def percentile_ci(draws: np.ndarray, level: float,
                  undefined: tuple[float, float] | None = None) -> tuple[float, float] | None:
    """The central ``level`` percentile interval of ``draws``. NaN draws are undefined values: with
    ``undefined=(lo, hi)`` each counts as ``lo`` for the lower bound and as ``hi`` for the upper (never
    dropped); without it they must not occur (a NaN there is a bug upstream, so it raises)."""
    draws = np.asarray(draws, dtype=float)
    if draws.size == 0:
        return None
    nan = np.isnan(draws)
    if nan.all():
        return None if undefined is None else (float(undefined[0]), float(undefined[1]))
    if undefined is None:
        if nan.any():
            raise ValueError("bootstrap draws hold undefined values; say how they count (undefined=(lo, hi))")
        lo, hi = np.percentile(draws, [50 * (1 - level), 100 - 50 * (1 - level)])
        return float(lo), float(hi)
    lo = np.percentile(np.where(nan, undefined[0], draws), 50 * (1 - level))
    hi = np.percentile(np.where(nan, undefined[1], draws), 100 - 50 * (1 - level))
    return float(lo), float(hi)


def flip(ci: tuple[float, float] | None) -> tuple[float, float] | None:
    """The interval of 1 − x from that of x (security from recovered)."""
    return None if ci is None else (1.0 - ci[1], 1.0 - ci[0])


def stable_rng(*key: object) -> np.random.Generator:
    """A generator seeded from ``key``: the same data give the same draws on every machine."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))

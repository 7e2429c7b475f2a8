"""The winner's-curse-corrected worst case: choose the best pair on one half of the test examples, report
it on the other.

The naive maximum of recovered over many noisy pairs is biased upward; the held-out value of a pair chosen
on independent examples is not. The choice is pessimistic: the highest lower confidence bound on the
selection half, so a pair recovered exactly beats one that reaches the clip at 1 by noise. The protocol's
break decision reads the chosen pair's **selection-half** value (`Selection.selection_recovered`); the
held-out half is read only to report, so stopping the protocol never biases what is reported
(``tests/test_scoring_statistics.py`` simulates it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bench.scoring.bootstrap import PairOutcomes, pair_statistics, present_replicates, stable_rng
from bench.scoring.results import CI_LEVEL


def selection_split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(selection half, held-out half) of ``n`` example indices, by a seeded permutation. With fewer than
    two examples there is nothing to split: both halves are everything."""
    if n < 2:
        everything = np.arange(n)
        return everything, everything
    perm = rng.permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def example_split(seed: int, suite: str, victim: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The (selection, held-out) halves of a victim's ``n`` test examples: one seeded split per (seed, suite,
    victim), shared by every defense and pair, the same on every machine."""
    return selection_split(n, stable_rng(seed, suite, victim, "split"))


def indicator(n: int, idx: np.ndarray) -> np.ndarray:
    """[1, n] example weights: 1 on ``idx``, 0 elsewhere."""
    w = np.zeros((1, n))
    w[0, idx] = 1.0
    return w


@dataclass(frozen=True)
class Selection:
    """The winner's-curse-corrected worst case of one victim."""

    index: int | None
    """The pair chosen on the selection half (None when no pair is scorable)."""
    recovered: float | None
    """Its recovered on the held-out half (reported)."""
    draws: np.ndarray
    """Bootstrap draws of that held-out recovered (resampling the held-out half and replicates); NaN where
    the held-out gain of a draw is ≤ 0."""
    naive: float | None
    """The uncorrected maximum over pairs of recovered on all examples (reported for contrast)."""
    selection_recovered: float | None = None
    """The chosen pair's recovered on the selection half (what a stopping rule may read)."""


def common_replicates(pairs: Sequence[PairOutcomes], n_replicates: int) -> np.ndarray:
    """[R] 1.0 on the replicates present in every one of ``pairs`` (`present_replicates`), 0.0 elsewhere;
    all ones when no replicate is common to all (then every pair is read on what it has)."""
    mask = np.ones(n_replicates, dtype=bool)
    for p in pairs:
        mask &= present_replicates(p)
    return mask.astype(float) if mask.any() else np.ones(n_replicates)


def select_worst_pair(pairs: Sequence[PairOutcomes | None], eligible: Sequence[bool], selection: np.ndarray,
                      heldout: np.ndarray, heldout_counts: np.ndarray,
                      replicate_counts: np.ndarray | Sequence[np.ndarray],
                      tie_break: Sequence[tuple] | None = None, selection_counts: np.ndarray | None = None,
                      level: float = CI_LEVEL) -> Selection:
    """Choose, among ``eligible`` pairs, the one the ``selection`` examples show recovering most, and report
    its recovered on the ``heldout`` examples, with draws over ``heldout_counts`` [B, n] and
    ``replicate_counts`` [B, R] (one array for every pair, or one per pair: a pair lacking some replicates
    resamples only those it has, `bench.scoring.victim`).

    "Recovering most" is read pessimistically when ``selection_counts`` (bootstrap counts within the
    selection half) are given: the pair with the highest lower confidence bound on the selection half,
    then the highest point value, then ``tie_break``. A pair the attacker recovers exactly (an algebraic
    attack that restores the expert: every draw is 1) then beats a noisy pair whose point value only
    touches the clip at 1 by chance; the choice still sees the selection half only, so the held-out
    value stays unbiased.

    **Replicates.** The choice reads only the replicates every eligible pair has (`common_replicates`): a
    pair re-run under more seeds (the protocol's replicates of the worst pair) is compared with the others
    on the same seeds, so the added seeds never steer which pair is chosen; the chosen pair is then
    reported on all of its replicates, the draws resampling replicates and held-out examples."""
    n_draws, n = heldout_counts.shape
    per_pair = [replicate_counts] * len(pairs) if isinstance(replicate_counts, np.ndarray) else list(replicate_counts)
    ones_r = np.ones((1, per_pair[0].shape[1] if per_pair else 1))
    common = common_replicates([p for p, ok in zip(pairs, eligible) if ok and p is not None], ones_r.shape[1])
    sel_r = ones_r * common[None, :]
    sel_w, held_w, all_w = indicator(n, selection), indicator(n, heldout), np.ones((1, n))
    best, best_key, best_sel = None, None, None
    naive = None
    for i, (p, ok) in enumerate(zip(pairs, eligible)):
        if not ok or p is None:
            continue
        full = float(pair_statistics(p, all_w, ones_r).recovered[0])
        if not math.isnan(full):
            naive = full if naive is None else max(naive, full)
        r_sel = float(pair_statistics(p, sel_w, sel_r).recovered[0])
        if math.isnan(r_sel):
            continue
        lower = r_sel
        if selection_counts is not None:
            # replicates resampled when every pair has them all; else the common ones, each once (resampling
            # them among the others would leave draws with none of them)
            reps = (per_pair[i][: len(selection_counts)] if common.all()
                    else np.broadcast_to(common, (len(selection_counts), len(common))))
            draws = np.nan_to_num(pair_statistics(p, selection_counts, reps).recovered,
                                  nan=0.0)  # a draw in which the victim gives nothing is no evidence of recovery
            lower = float(np.percentile(draws, 50 * (1 - level)))
        key = (-lower, -r_sel, *(tie_break[i] if tie_break else ()), i)
        if best_key is None or key < best_key:
            best, best_key, best_sel = i, key, r_sel
    if best is None:
        return Selection(None, None, np.full(n_draws, np.nan), naive)
    chosen = pairs[best]
    assert chosen is not None
    point = float(pair_statistics(chosen, held_w, ones_r).recovered[0])
    draws = pair_statistics(chosen, heldout_counts, per_pair[best]).recovered
    return Selection(best, None if math.isnan(point) else point, draws, naive, best_sel)

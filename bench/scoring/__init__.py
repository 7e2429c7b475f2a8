"""Scores of the leaderboard (scoring version 4): utility, the recovered fraction against the honest
counterpart, the held-out worst case, intervals and rank bands.

For a victim task v and one pipeline (attack A with its params, merge M with its params, partners,
seed), the victim's slot is filled three ways (`bench.plan`) and each merged model is evaluated on v's test
examples: V_P (the protected artifact under A and M), and, under A's **honest counterpart** c(A) and M,
V_U (the unprotected expert) and V_∅ (θ_pre: the same free-rider, data and partners without the victim).
c(A) is what a free-rider with A's data budget runs on an unprotected release (`bench.plugins.Attack.counterpart`):
``none`` for a data-free undo attack (realign, scale-division, anchor-align, revert-*, taylor-invert,
unmask), plain merge-finetune with the same samples for an attack that trains on the attacker's labels
(GradErase), the composition of the parts' counterparts for a composite. An attack is thus credited only
for what it takes from the protected model, never for what it destroys in the unprotected one.

Worked example (vision-effnet, PaRaMS, animal-mnist, ``revert-ffn / ta``): revert-ffn reverts every
MBConv block to θ_pre, so applied to the unprotected expert it gives 0.596, the same as applied to the
PaRaMS release (V_P = 0.596). Against those references an attack that merely destroys would score 1. The
counterpart of revert-ffn is ``none``: the unprotected expert merged by TA gives V_U = 0.772 and θ_pre in
its slot V_∅ = 0.523, so recovered = (0.596 − 0.523) / (0.772 − 0.523) = 0.29.

* **gain** = V_U − V_∅. A pair whose gain is not significantly positive is **uninformative** (N/A with the
  reason; a significantly negative gain says so), never divided.
* **recovered** = clip((V_P − V_∅) / (V_U − V_∅), 0, 1).
* **utility** = metric(artifact alone) / metric(expert), per victim; the floor applies to every victim.
* **security** (per victim) = 1 − recovered of the best (attack, merge), chosen on one half of the test
  examples and reported on the other (`selection`). The protocol's breaks read the selection half only.
  Suite security is the mean over informative victims.
* **Intervals**: paired percentile bootstrap over test examples and replicates (`bootstrap`); a draw with
  no positive gain counts at both ends, never dropped.
* **Ranks**: bands from a paired bootstrap of security; entries it does not separate share ranks; utility
  counts up to 1 (`ranking`). No cross-suite rank unless every ranked defense covers the same suites.

Modules: `results` (the rows returned and the constants), `cells` (reading stored cells and finding each
protected cell's references), `bootstrap` (the numeric core), `selection` (the held-out worst case),
`victim` (one defense on one victim), `summaries` (entries, suite-level pair rows, `score`), `ranking`.

Other rules (each pinned by a test in ``tests/test_scoring.py`` or ``tests/test_scoring_statistics.py``):

* *Means over replicates.* V_x of a pair is the mean over its replicates of the per-replicate
  example mean; recovered is the ratio of the mean differences (not a mean of ratios).
* *Replicates of one pair* (the protocol re-runs each victim's worst pair under more seeds): the worst pair is
  chosen on the replicates every pair has, then reported pooled over all of its own; each pair's bootstrap
  resamples only the replicates it has (never a seed it lacks); utility resamples its seeds with the examples.
* *Lower-is-better metrics* (perplexity, FID): outcomes are sign-flipped, so a gain is always an
  improvement, and utility is metric(expert) / metric(artifact).
* *Superseded cells.* Protected cells are read at their newest version per coordinates (a re-run
  with other params supersedes the older); references are found by exact spec.
* *Honest ranking.* An entry is unranked when any cell it rests on failed, when a standard attack has no
  cell or is N/A for a non-structural reason (a budget excess is a misconfiguration), when a protected
  cell's references were never run, when any victim's utility is below the floor, when a
  function-preserving claim was violated, or when no victim is informative.
* *Strength variants* (``NAME[key=value]``, a setting other than the defense's defaults: `bench frontier`) are
  scored as entries of their own and never ranked: a defense is ranked at its default setting, and the frontier
  page draws the others.
* *The ``none`` defense* is the reference row: it shows each victim's gain per merge, has no security or
  best attack, and is never ranked.
* *Entry-level pair rows* (the heatmap) are means over one stated set of victims, the same for every
  defense: those where the pair's gain is significant; V_P, V_U, V_∅ and recovered agree with each other.
* *Partner side effect* = mean over partner tasks of (merged partner metric with the protected
  victim − with the unprotected victim), sign-adjusted, from the plain merges when there are any.
"""

from __future__ import annotations

from bench.scoring.bootstrap import (
    PairOutcomes,
    PairStatistics,
    bootstrap_counts,
    pair_statistics,
    percentile_ci,
    recovered_fraction,
    utility_ratio,
)
from bench.scoring.cells import attack_name
from bench.scoring.ranking import separated
from bench.scoring.results import (
    CI_LEVEL,
    FLAG_CODES,
    METRICS,
    N_BOOTSTRAP,
    PRIMARY_METRICS,
    REFERENCE,
    SCORING_VERSION,
    UTILITY_FLOOR,
    DefenseScore,
    Flag,
    PairScore,
    RankStability,
    Scores,
    ScoringError,
    VictimScore,
)
from bench.scoring.selection import Selection, example_split, select_worst_pair, selection_split
from bench.scoring.summaries import score

__all__ = [
    "CI_LEVEL", "FLAG_CODES", "METRICS", "N_BOOTSTRAP", "PRIMARY_METRICS", "REFERENCE", "SCORING_VERSION",
    "UTILITY_FLOOR", "DefenseScore", "Flag", "PairOutcomes", "PairScore", "PairStatistics", "RankStability",
    "Scores", "ScoringError", "Selection", "VictimScore", "attack_name", "bootstrap_counts", "example_split", "pair_statistics",
    "percentile_ci", "recovered_fraction", "score", "select_worst_pair", "selection_split", "separated",
    "utility_ratio",
]

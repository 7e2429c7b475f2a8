"""Scores of the leaderboard: utility, counterfactual recovered fraction, held-out worst case, CIs, ranks.

For a victim task v and one pipeline (attack with its params, merge with its params, partners, seed),
the victim's slot is filled three ways (`bench.plan`) and each merged model is evaluated on v's test
examples: V_P (the protected artifact), V_U (the unprotected expert), V_∅ (θ_pre: the same
free-rider, data and partners without the victim). A protected cell is read only against the U and
∅ cells whose spec is identical apart from the filling (`bench.plan.counterpart_spec`), so a cell
merged with λ = 0.5 never pairs with a reference merged with λ = 0.3.

* **gain** = V_U − V_∅: what the victim's model gives this free-rider beyond its own data and
  partners. A pair whose gain interval includes 0 is **uninformative**: N/A with that reason, never
  divided.
* **recovered** = clip((V_P − V_∅) / (V_U − V_∅), 0, 1). An attack that fine-tunes on its own labels
  is credited only with what it gets *because of the victim's release*: if V_P equals V_∅ it scores 0.
* **utility** = metric(artifact alone) / metric(expert), per victim; the floor applies to every victim.
* **security** (per victim) = 1 − recovered of the best (attack, merge), where the best is chosen on
  one half of the test examples and its recovered is reported on the other half (the winner's-curse
  correction: the naive maximum over many noisy pairs is biased upward; the held-out value of a pair
  chosen on independent examples is not). The choice is pessimistic: the highest lower confidence
  bound on the selection half, so a pair recovered exactly beats one that reaches the clip at 1 by
  noise (`select_worst_pair`). Suite security is the mean over informative victims.

Uncertainty (DESIGN §4): every interval is a percentile interval of a **paired bootstrap over test
examples** (P, U and ∅ outcomes resampled with the same indices, `bench.outcomes`), combined with a
bootstrap over replicates (seeds, partner sets) when there are several. The example and replicate
draws of a (suite, victim) are shared by every pair and every defense, so comparisons between them
see the same noise. Draws are seeded from (seed, suite, victim): the same data give the same
intervals. A numpy Generator draws the index matrices directly: `scipy.stats.bootstrap` resamples
one statistic at a time and cannot share draws across pairs and defenses or nest replicates.
Security's interval conditions on the pair chosen on the selection half (its draws resample the
held-out half only), so it reflects test-example and replicate noise, not the choice itself.
Replicate noise that both halves share (one seed, one partner set) is not corrected by the split.

Other rules (each pinned by a test in ``tests/test_scoring.py``):

* *Means over replicates.* V_x of a pair is the mean over its replicates of the per-replicate
  example mean; recovered is the ratio of the mean differences (not a mean of ratios).
* *Lower-is-better metrics* (perplexity, FID): outcomes are sign-flipped, so a gain is always an
  improvement, and utility is metric(expert) / metric(artifact).
* *Primary metric.* The first of `PRIMARY_METRICS` a task reports, else the alphabetically first.
* *Superseded cells.* Protected cells are read at their newest version per coordinates (a re-run
  with other params supersedes the older); references are found by exact spec.
* *Honest ranking.* An entry is unranked when any cell it rests on failed (``failed_cells`` names
  them), when a standard attack has no cell or is N/A for a non-structural reason (a budget excess
  means the budget is misconfigured: ``budget_exceeded``), when a protected cell's references were
  never run, when any victim's utility is below the floor, when a function-preserving claim was
  violated, or when no victim is informative. Only structural N/A reasons excuse an attack.
* *The ``none`` defense* is the reference row: its protected filling is the unprotected cell, so it
  recovers everything by construction, needs no other attack to be complete, and is never ranked.
* *Partner side effect* = mean over partner tasks of (merged partner metric with the protected
  victim − with the unprotected victim), sign-adjusted, from the plain merges when there are any.
* *Costs*: protect seconds = stage ``protect``; attack seconds = stages ``prepare`` + ``finish``.

This module is longer than the house's ~500 lines because it is one concept, the score, and most of
it is the rules above, each pinned by a test; the tables that print scores live in `bench.report`.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.keys import canonical
from bench.outcomes import OutcomeError, decode
from bench.plan import counterpart_spec, spec_id
from bench.store import CellRecord, newest_ok

UTILITY_FLOOR = 0.9
"""Utility below this on any victim is flagged and unranked (JailbreakBench's 90 % rule)."""
BREAK_THRESHOLD = 0.5
"""An attack 'breaks' a defense when it recovers at least this fraction of the victim's gain."""
N_BOOTSTRAP = 1000
CI_LEVEL = 0.95
PRIMARY_METRICS = ("accuracy", "acc", "exact_match", "pass@1", "f1", "clip_score")
REFERENCE = "none"
"""Name of the no-defense / no-attack plugins: the unprotected reference."""

METRICS: dict[str, dict[str, Any]] = {
    "utility": {"higher_is_better": True, "description": "protected artifact alone / unprotected expert, on the victim task"},
    "security": {"higher_is_better": True, "description": "1 - recovered of the best (attack, merge), chosen on half the test examples and measured on the other half"},
    "recovered": {"higher_is_better": False, "description": "(V_P - V_∅) / (V_U - V_∅) clipped to [0, 1]: share of what the victim's model gives the free-rider that it still gets from the protected release"},
    "gain": {"higher_is_better": True, "description": "V_U - V_∅: what the unprotected victim gives the free-rider beyond its own data and partners"},
    "partner_effect": {"higher_is_better": True, "description": "merged partner-task metric with the protected minus the unprotected victim"},
    "protect_s": {"higher_is_better": False, "description": "wall seconds of the protect stage"},
    "attack_s": {"higher_is_better": False, "description": "wall seconds of the attack's prepare and finish stages"},
    "peak_rss_mb": {"higher_is_better": False, "description": "peak resident memory of the cell, MiB"},
}

FLAG_CODES = {
    "function_preservation_violated": "claims function preservation but changed outputs beyond tolerance",
    "utility_below_floor": "utility below the floor on some victim",
    "incomplete": "a standard attack, or a reference cell it needs, was never run",
    "budget_exceeded": "an attack was N/A because it needs more than the budget grants (a misconfigured budget)",
    "failed_cells": "some cells failed",
    "no_security": "no informative victim: no pair's gain is significantly positive",
    "uninformative": "some victims or pairs carry no significant gain and are not scored",
    "no_examples": "the suite gives no per-example outcomes: intervals rest on replicates only, the winner's curse is uncorrected",
}


class ScoringError(ValueError):
    """The stored results cannot be scored as asked."""


# ---------------------------------------------------------------- result types


@dataclass(frozen=True)
class Flag:
    code: str
    """One of `FLAG_CODES`."""
    message: str


@dataclass(frozen=True)
class PairScore:
    """One (attack, merge) of one defense on one victim, on all test examples (or averaged over a suite's victims)."""

    attack: str
    merge: str
    recovered: float | None
    """clip((V_P − V_∅) / (V_U − V_∅), 0, 1); None when N/A (see ``na_reason``)."""
    n: int
    """Replicates (or victims) the value rests on."""
    na_reason: str = ""
    attack_s: float | None = None
    partner_effect: float | None = None
    v_protected: float | None = None
    v_unprotected: float | None = None
    v_counterfactual: float | None = None
    gain: float | None = None
    """V_U − V_∅ (in the metric's direction)."""
    gain_ci: tuple[float, float] | None = None
    recovered_ci: tuple[float, float] | None = None
    informative: bool | None = None
    """Whether the gain's interval excludes 0 (None when there is no reference to tell)."""
    examples: int = 0
    """Test examples the values rest on (0 when the suite gives no per-example outcomes)."""


@dataclass
class VictimScore:
    """Scores of one defense on one victim task of one suite."""

    suite: str
    defense: str
    victim: str
    metric: str
    higher_is_better: bool
    acc_pre: float | None
    acc_ft: float | None
    utility: float | None = None
    utility_ci: tuple[float, float] | None = None
    security: float | None = None
    security_ci: tuple[float, float] | None = None
    best_attack: str | None = None
    """The (attack, merge) chosen on the selection half of the test examples."""
    best_merge: str | None = None
    best_recovered: float | None = None
    """Its recovered on the held-out half (1 − security)."""
    informative: bool = False
    """Some pair of this victim has a significantly positive gain."""
    pairs: list[PairScore] = field(default_factory=list)
    partner_effect: float | None = None
    protect_s: float | None = None
    attack_s: float | None = None
    """Cost of the best attack."""
    peak_rss_mb: float | None = None
    attacks_evaluated: list[str] = field(default_factory=list)
    attacks_missing: list[str] = field(default_factory=list)
    attacks_na: dict[str, str] = field(default_factory=dict)
    """Attacks N/A for this defense for a structural reason, with the reason."""
    replicates: list[tuple[tuple[str, ...], int]] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)
    cell_ids: list[str] = field(default_factory=list)
    """Every cell a number here rests on (protected cells, their U and ∅ references, baselines, utility cells)."""
    failed_cells: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.attacks_missing


@dataclass
class DefenseScore:
    """Scores of one defense on one suite (mean over victims), or overall (``suite`` is None)."""

    suite: str | None
    defense: str
    victims: list[str]
    utility: float | None = None
    utility_ci: tuple[float, float] | None = None
    security: float | None = None
    security_ci: tuple[float, float] | None = None
    best_attack: str | None = None
    best_merge: str | None = None
    best_recovered: float | None = None
    pairs: list[PairScore] = field(default_factory=list)
    partner_effect: float | None = None
    protect_s: float | None = None
    attack_s: float | None = None
    peak_rss_mb: float | None = None
    attacks_missing: list[str] = field(default_factory=list)
    suites: list[str] = field(default_factory=list)
    """Suites the score covers (overall rows: where the defense applies)."""
    uninformative_victims: list[str] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)
    rank: int | None = None
    unranked_reason: str = ""

    @property
    def complete(self) -> bool:
        return not self.attacks_missing

    def has_flag(self, code: str) -> bool:
        return any(f.code == code for f in self.flags)


@dataclass
class RankStability:
    """How often the point ranking survives resampling (one group: a suite, or overall)."""

    defenses: list[str]
    """Ranked defenses in point-estimate order."""
    rank_probability: list[list[float]]
    """[i][k]: share of draws in which defenses[i] lands at rank k+1."""
    pairwise_flip: list[tuple[str, str, float]]
    """(a, b, share of draws in which b outranks a) for each adjacent pair of the point ranking."""
    stable_fraction: float
    """Share of draws whose full ranking equals the point ranking."""


@dataclass
class Scores:
    victims: list[VictimScore]
    suites: list[DefenseScore]
    overall: list[DefenseScore]
    stability: dict[str, RankStability]
    """Per suite name, and '*' for overall."""
    not_applicable: list[tuple[str, str, str]]
    """(suite, defense, reason) of defenses whose every cell on a suite is N/A."""
    standard_attacks: list[str]
    config: dict[str, Any]

    def entry(self, suite: str, defense: str) -> DefenseScore:
        for s in self.suites:
            if s.suite == suite and s.defense == defense:
                return s
        raise KeyError(f"no scores for defense {defense!r} on suite {suite!r}")

    def victim_scores(self, suite: str, defense: str) -> list[VictimScore]:
        return [v for v in self.victims if v.suite == suite and v.defense == defense]


# ---------------------------------------------------------------- reading cells


def attack_name(cell: CellRecord) -> str:
    """The attack plugin a cell ran: its spec name (a sweep point 'x[k=v]' ran attack 'x'), else its label."""
    spec = cell.spec.get("attack") if isinstance(cell.spec, dict) else None
    name = spec.get("name") if isinstance(spec, dict) else None
    return name if isinstance(name, str) and name else cell.attack


# ---------------------------------------------------------------- the numeric core (pure, on arrays)


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


def _weighted_means(x: np.ndarray, w: np.ndarray, c: np.ndarray) -> np.ndarray:
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
        gain = self.gain
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.clip((self.v_protected - self.v_counterfactual) / gain, 0.0, 1.0)
        return np.where(gain > 0, r, np.nan)


def pair_statistics(outcomes: PairOutcomes, example_weights: np.ndarray, replicate_weights: np.ndarray) -> PairStatistics:
    """The pair's values under example weights [B, n] and replicate weights [B, R] (all ones = the point)."""
    return PairStatistics(*(_weighted_means(x, example_weights, replicate_weights)
                            for x in (outcomes.protected, outcomes.unprotected, outcomes.counterfactual)))


def bootstrap_counts(rng: np.random.Generator, n: int, draws: int, within: np.ndarray | None = None) -> np.ndarray:
    """[draws, n] resampling counts: each draw resamples the indices ``within`` (default all) with replacement."""
    idx = np.arange(n) if within is None else np.asarray(within)
    counts = np.zeros((draws, n))
    picks = idx[rng.integers(0, len(idx), size=(draws, len(idx)))]
    rows = np.repeat(np.arange(draws), len(idx))
    np.add.at(counts, (rows, picks.ravel()), 1.0)
    return counts


def selection_split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(selection half, held-out half) of ``n`` example indices, by a seeded permutation. With fewer than
    two examples there is nothing to split: both halves are everything."""
    if n < 2:
        everything = np.arange(n)
        return everything, everything
    perm = rng.permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def indicator(n: int, idx: np.ndarray) -> np.ndarray:
    w = np.zeros((1, n))
    w[0, idx] = 1.0
    return w


def percentile_ci(draws: np.ndarray, level: float) -> tuple[float, float] | None:
    draws = np.asarray(draws, dtype=float)
    draws = draws[~np.isnan(draws)]
    if draws.size == 0:
        return None
    lo, hi = np.percentile(draws, [50 * (1 - level), 100 - 50 * (1 - level)])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Selection:
    """The winner's-curse-corrected worst case of one victim."""

    index: int | None
    """The pair chosen on the selection half (None when no pair is scorable)."""
    recovered: float | None
    """Its recovered on the held-out half."""
    draws: np.ndarray
    """Bootstrap draws of that held-out recovered (resampling the held-out half and replicates)."""
    naive: float | None
    """The uncorrected maximum over pairs of recovered on all examples (reported for contrast)."""


def select_worst_pair(pairs: Sequence[PairOutcomes | None], eligible: Sequence[bool], selection: np.ndarray,
                      heldout: np.ndarray, heldout_counts: np.ndarray, replicate_counts: np.ndarray,
                      tie_break: Sequence[tuple] | None = None, selection_counts: np.ndarray | None = None,
                      level: float = CI_LEVEL) -> Selection:
    """Choose, among ``eligible`` pairs, the one the ``selection`` examples show recovering most, and report
    its recovered on the ``heldout`` examples, with draws over ``heldout_counts`` [B, n] and
    ``replicate_counts`` [B, R].

    "Recovering most" is read pessimistically when ``selection_counts`` (bootstrap counts within the
    selection half) are given: the pair with the highest lower confidence bound on the selection half,
    then the highest point value, then ``tie_break``. A pair the attacker recovers exactly (an algebraic
    attack that restores the expert: every draw is 1) then beats a noisy pair whose point value only
    touches the clip at 1 by chance; the choice still sees the selection half only, so the held-out
    value stays unbiased."""
    n_draws, n = heldout_counts.shape
    ones_r = np.ones((1, replicate_counts.shape[1]))
    sel_w, held_w, all_w = indicator(n, selection), indicator(n, heldout), np.ones((1, n))
    best, best_key = None, None
    naive = None
    for i, (p, ok) in enumerate(zip(pairs, eligible)):
        if not ok or p is None:
            continue
        full = float(pair_statistics(p, all_w, ones_r).recovered[0])
        if not math.isnan(full):
            naive = full if naive is None else max(naive, full)
        r_sel = float(pair_statistics(p, sel_w, ones_r).recovered[0])
        if math.isnan(r_sel):
            continue
        lower = r_sel
        if selection_counts is not None:
            draws = np.nan_to_num(pair_statistics(p, selection_counts, replicate_counts[: len(selection_counts)]).recovered,
                                  nan=0.0)  # a draw in which the victim gives nothing is no evidence of recovery
            lower = float(np.percentile(draws, 50 * (1 - level)))
        key = (-lower, -r_sel, *(tie_break[i] if tie_break else ()), i)
        if best_key is None or key < best_key:
            best, best_key = i, key
    if best is None:
        return Selection(None, None, np.full(n_draws, np.nan), naive)
    chosen = pairs[best]
    assert chosen is not None
    point = float(pair_statistics(chosen, held_w, ones_r).recovered[0])
    draws = pair_statistics(chosen, heldout_counts, replicate_counts).recovered
    return Selection(best, None if math.isnan(point) else point, draws, naive)


# ---------------------------------------------------------------- reading cells


def _primary_metric(names: Iterable[str]) -> str | None:
    names = sorted(set(names))
    for preferred in PRIMARY_METRICS:
        if preferred in names:
            return preferred
    return names[0] if names else None


def _sign(higher_is_better: bool) -> float:
    return 1.0 if higher_is_better else -1.0


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _timing(cell: CellRecord, *stages: str) -> float | None:
    timings = cell.provenance.get("timings") or {}
    found = [float(timings[s]) for s in stages if isinstance(timings.get(s), (int, float))]
    return sum(found) if found else None


def _mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(np.mean(vals)) if vals else None


def _max(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(max(vals)) if vals else None


def _quiet_nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def _stable_rng(*key: object) -> np.random.Generator:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _examples(cell: CellRecord, role: str, task: str, metric: str, sign: float) -> np.ndarray | None:
    """Per-example outcomes (sign-adjusted) of a stored metric; its value as a single outcome when the
    suite gave none; None when the metric is absent."""
    m = cell.find(role, task, metric)
    if m is None or not math.isfinite(m.value):
        return None
    if not m.examples:
        return np.array([sign * m.value])
    try:
        return sign * decode(m.examples)
    except OutcomeError:
        return None


@dataclass
class _Index:
    """The cells, keyed for the lookups scoring needs."""

    by_id: dict[str, CellRecord]
    metric_of: dict[tuple[str, str], tuple[str, bool]]
    """(suite, task) -> (primary metric, higher_is_better)."""
    baselines: dict[tuple[str, str, str, int], CellRecord]
    """(suite, recipe hash, victim, seed) -> newest ok baseline cell."""
    utility: dict[tuple[str, str, str, int, str], CellRecord]
    """`_utility_key` -> newest ok utility cell."""
    protected: list[CellRecord]
    """Newest ok-or-N/A protected merge cells per coordinates."""
    unprotected: list[CellRecord]
    """Newest unprotected merge cells per coordinates (the ``none`` defense's own cells)."""
    failed: list[CellRecord]


def _newest(records: Iterable[CellRecord]) -> list[CellRecord]:
    """The newest cell at each coordinates, whatever its status (a failure after a success is still a failure)."""
    newest: dict[tuple, CellRecord] = {}
    for c in sorted(records, key=lambda c: (c.created, c.cell_id)):
        newest[c.coordinates] = c
    return list(newest.values())


def _index(records: list[CellRecord]) -> _Index:
    cells = sorted(records, key=lambda c: (c.created, c.cell_id))
    by_id: dict[str, CellRecord] = {}
    for c in cells:
        by_id[c.cell_id] = c
    names: dict[tuple[str, str], dict[str, bool]] = defaultdict(dict)
    baselines: dict[tuple[str, str, str, int], CellRecord] = {}
    for c in newest_ok(cells):
        for m in c.metrics:
            names[(c.suite, m.task)].setdefault(m.metric, m.higher_is_better)
        if c.kind == "baseline":
            baselines[(c.suite, str(c.spec.get("recipe_hash", "")), c.victim, c.seed)] = c
    metric_of = {}
    for key, found in names.items():
        name = _primary_metric(found)
        if name is not None:
            metric_of[key] = (name, found[name])
    newest = _newest(c for c in cells if c.kind == "merge")
    protected = [c for c in newest if c.filling == "protected" and c.status != "failed"]
    unprotected = [c for c in newest if c.filling == "unprotected" and c.status != "failed"]
    utility = {_utility_key(c): c for c in newest_ok(c for c in cells if c.kind == "utility")}
    failed = [c for c in _newest(cells) if c.status == "failed"]
    return _Index(by_id, metric_of, baselines, utility, protected, unprotected, failed)


# ---------------------------------------------------------------- one victim of one defense


@dataclass
class _Pair:
    attack: str
    attack_name: str
    merge: str
    replicates: dict[tuple[tuple[str, ...], int], tuple[CellRecord, CellRecord | None, CellRecord | None]] = field(
        default_factory=dict)
    """(partners, seed) -> (protected cell, unprotected cell, counterfactual cell)."""


@dataclass
class _VictimData:
    """What the suite-level aggregation and the rank stability need of one victim."""

    security_draws: np.ndarray
    utility_draws: np.ndarray


def _utility_key(cell: CellRecord) -> tuple[str, str, str, int, str]:
    """What a protected cell and the utility cell of its artifact share: suite, recipe, victim, seed, defense spec."""
    return (cell.suite, str(cell.spec.get("recipe_hash", "")), cell.victim, cell.seed, canonical(cell.spec.get("defense")))


def _utility_cell(ix: _Index, p: CellRecord) -> CellRecord | None:
    return ix.utility.get(_utility_key(p))


class _VictimScorer:
    """Scores one (suite, defense, victim) from its protected cells and their references."""

    def __init__(self, ix: _Index, suite: str, defense: str, victim: str, cells: list[CellRecord],
                 standard: list[str], n_bootstrap: int, ci_level: float, seed: int,
                 required: Sequence[str] = ()) -> None:
        self.ix, self.suite, self.defense, self.victim = ix, suite, defense, victim
        self.cells, self.standard, self.required = cells, standard, list(required)
        self.n_bootstrap, self.ci_level, self.seed = n_bootstrap, ci_level, seed
        self.metric, self.hib = ix.metric_of.get((suite, victim), ("", True))
        self.sign = _sign(self.hib)
        self.ids: set[str] = set()
        self.failed: set[str] = set()
        self.missing: dict[str, str] = {}
        self.budget: dict[str, str] = {}

    def _ref(self, p: CellRecord, filling: str) -> CellRecord | None:
        if self.defense == REFERENCE and filling == "unprotected":
            return p
        ref = self.ix.by_id.get(spec_id(counterpart_spec(p.spec, filling)))  # type: ignore[arg-type]
        if ref is None:
            self.missing[attack_name(p)] = f"the {filling} reference of {p.attack}/{p.merge} was never run"
            return None
        self.ids.add(ref.cell_id)
        if ref.status == "failed":
            self.failed.add(ref.cell_id)
            return None
        return ref if ref.status == "ok" else None

    def score(self) -> tuple[VictimScore, _VictimData]:
        vs = VictimScore(self.suite, self.defense, self.victim, self.metric, self.hib, None, None)
        pairs = self._collect(vs)
        self._baseline_and_utility(vs)
        outcomes, reasons, n = self._outcomes(pairs)
        reps = sorted({r for p in pairs for r in p.replicates})
        rng = _stable_rng(self.seed, self.suite, self.victim)
        split_rng, draw_rng = np.random.default_rng(rng.integers(2**63)), np.random.default_rng(rng.integers(2**63))
        n_eff = max(n, 1)
        rep_counts = (bootstrap_counts(draw_rng, len(reps), self.n_bootstrap) if len(reps) > 1
                      else np.ones((self.n_bootstrap, max(len(reps), 1))))
        all_counts = bootstrap_counts(draw_rng, n_eff, self.n_bootstrap) if n > 1 else np.ones((self.n_bootstrap, n_eff))
        selection, heldout = selection_split(n_eff, split_rng)
        held_counts = (bootstrap_counts(draw_rng, n_eff, self.n_bootstrap, within=heldout) if n > 1
                       else np.ones((self.n_bootstrap, n_eff)))
        sel_counts = bootstrap_counts(draw_rng, n_eff, self.n_bootstrap, within=selection) if n > 1 else None
        ones = (np.ones((1, n_eff)), np.ones((1, max(len(reps), 1))))
        scores, eligible = [], []
        for pair, out, reason in zip(pairs, outcomes, reasons):
            scores.append(self._pair_score(pair, out, reason, ones, all_counts, rep_counts, n))
            eligible.append(out is not None and bool(scores[-1].informative))
        vs.pairs = scores
        vs.informative = any(eligible)
        tie = [(p.attack_s or 0.0, p.attack, p.merge) for p in scores]
        sel = select_worst_pair(outcomes, eligible, selection, heldout, held_counts, rep_counts, tie, sel_counts,
                                self.ci_level)
        if sel.index is not None and sel.recovered is not None:
            best = scores[sel.index]
            vs.best_attack, vs.best_merge, vs.attack_s = best.attack, best.merge, best.attack_s
            vs.best_recovered, vs.security = sel.recovered, 1.0 - sel.recovered
            vs.security_ci = _flip(percentile_ci(sel.draws, self.ci_level))
        plain = [p.partner_effect for p in scores if p.attack == REFERENCE and p.partner_effect is not None]
        vs.partner_effect = _mean(plain) if plain else _mean(p.partner_effect for p in scores)
        vs.replicates = reps
        vs.flags = self._flags(vs, n)
        vs.cell_ids = sorted(self.ids)
        vs.failed_cells = sorted(self.failed)
        security_draws = 1.0 - sel.draws if vs.security is not None else np.full(self.n_bootstrap, np.nan)
        return vs, _VictimData(security_draws, self._utility_draws)

    # -------------------------------------------------------- pieces

    def _collect(self, vs: VictimScore) -> list[_Pair]:
        pairs: dict[tuple[str, str], _Pair] = {}
        evaluated, na = set(), {}
        for c in self.cells:
            self.ids.add(c.cell_id)
            name = attack_name(c)
            if c.status == "na":
                kind = (c.provenance or {}).get("na_kind", "structural")
                if kind == "budget":
                    self.budget[name] = c.reason
                else:
                    na.setdefault(name, c.reason)
                continue
            pair = pairs.setdefault((c.attack, c.merge), _Pair(c.attack, name, c.merge))
            u, z = self._ref(c, "unprotected"), self._ref(c, "counterfactual")
            pair.replicates[(tuple(c.partners), c.seed)] = (c, u, z)
            evaluated.add(name)
        vs.attacks_evaluated = sorted(evaluated)
        vs.attacks_na = {a: r for a, r in sorted(na.items()) if a not in evaluated}
        if self.defense != REFERENCE:
            absent = [a for a in self.standard if a not in evaluated and a not in vs.attacks_na]
            for label in self.required:
                self.missing.setdefault(label, f"protocol step {label} was never run")
            vs.attacks_missing = sorted(set(absent) | set(self.missing) | set(self.budget))
        for c in self.ix.failed:
            if (c.suite, c.victim) == (self.suite, self.victim) and (
                    (c.filling == "protected" and c.defense == self.defense) or
                    (c.kind == "utility" and c.defense == self.defense)):
                self.failed.add(c.cell_id)
                self.ids.add(c.cell_id)
        return [pairs[k] for k in sorted(pairs)]

    def _outcomes(self, pairs: list[_Pair]) -> tuple[list[PairOutcomes | None], list[str], int]:
        reps = sorted({r for p in pairs for r in p.replicates})
        out: list[PairOutcomes | None] = []
        reasons: list[str] = []
        lengths: list[int] = []
        for pair in pairs:
            rows: dict[str, list[np.ndarray | None]] = {"p": [], "u": [], "z": []}
            reason = ""
            for r in reps:
                cells = pair.replicates.get(r)
                if cells is None:
                    for k in rows:
                        rows[k].append(None)
                    continue
                p, u, z = cells
                if u is None or z is None:
                    reason = reason or "a reference cell (unprotected or counterfactual) is missing, failed or N/A"
                for k, cell in zip("puz", (p, u, z)):
                    rows[k].append(_examples(cell, "merged", self.victim, self.metric, self.sign) if cell else None)
            present = [x for xs in rows.values() for x in xs if x is not None]
            sizes = {len(x) for x in present}
            if not present or any(all(x is None for x in xs) for xs in rows.values()):
                out.append(None)
                reasons.append(reason or "no victim metric in the merged cells")
                continue
            if len(sizes) != 1:
                out.append(None)
                reasons.append("per-example outcomes of different lengths (different test splits)")
                continue
            size = sizes.pop()
            lengths.append(size)
            mats = []
            for k in "puz":
                mats.append(np.stack([x if x is not None else np.full(size, np.nan) for x in rows[k]]))
            # A replicate counts only where all three fillings are present.
            missing = np.isnan(mats[0]).any(1) | np.isnan(mats[1]).any(1) | np.isnan(mats[2]).any(1)
            for m in mats:
                m[missing] = np.nan
            out.append(PairOutcomes(*mats))
            reasons.append("")
        if not lengths:
            return out, reasons, 0
        # Pairs measured on another number of test examples than most (cells of an older recipe, or
        # without per-example outcomes) cannot be resampled with the others: N/A with the reason.
        n = max(set(lengths), key=lambda k: (lengths.count(k), k))
        for i, o in enumerate(out):
            if o is not None and o.protected.shape[1] != n:
                out[i] = None
                reasons[i] = f"measured on {o.protected.shape[1]} test outcomes where the other pairs have {n}"
        return out, reasons, n

    def _pair_score(self, pair: _Pair, out: PairOutcomes | None, reason: str, ones: tuple, all_counts: np.ndarray,
                    rep_counts: np.ndarray, n: int) -> PairScore:
        cells = [c for c, _u, _z in pair.replicates.values()]
        attack_s = _mean(_timing(c, "prepare", "finish") for c in cells)
        effect = _mean(self._partner_effect(c, u) for c, u, _z in pair.replicates.values())
        if out is None:
            return PairScore(pair.attack, pair.merge, None, 0, reason, attack_s, effect)
        point = pair_statistics(out, *ones)
        draws = pair_statistics(out, all_counts, rep_counts)
        gain_ci = percentile_ci(draws.gain, self.ci_level)
        informative = gain_ci is not None and gain_ci[0] > 0
        gain = float(point.gain[0])
        recovered = float(point.recovered[0]) if informative else None
        na = "" if informative else (f"uninformative: the victim's gain {gain:+.3f} has interval "
                                     f"[{gain_ci[0]:+.3f}, {gain_ci[1]:+.3f}], which includes 0"
                                     if gain_ci else "uninformative: no gain could be measured")
        n_reps = int((~np.isnan(out.protected).any(axis=1)).sum())
        s = self.sign
        return PairScore(
            pair.attack, pair.merge, recovered, n_reps, na, attack_s, effect,
            v_protected=s * float(point.v_protected[0]), v_unprotected=s * float(point.v_unprotected[0]),
            v_counterfactual=s * float(point.v_counterfactual[0]), gain=gain, gain_ci=gain_ci,
            recovered_ci=percentile_ci(draws.recovered, self.ci_level) if informative else None,
            informative=informative, examples=n if n > 1 else 0,
        )

    def _partner_effect(self, p: CellRecord, u: CellRecord | None) -> float | None:
        if u is None or not p.partners:
            return None
        deltas = []
        for t in p.partners:
            metric, hib = self.ix.metric_of.get((p.suite, t), (None, True))
            a = p.value("merged", t, metric) if metric else None
            b = u.value("merged", t, metric) if metric else None
            if a is None or b is None:
                return None
            deltas.append(_sign(hib) * (a - b))
        return float(np.mean(deltas))

    def _baseline_and_utility(self, vs: VictimScore) -> None:
        """θ_pre, the expert and the utility (artifact / expert) with its paired bootstrap over test examples."""
        self._utility_draws = np.full(self.n_bootstrap, np.nan)
        seeds = sorted({c.seed for c in self.cells} or {0})
        recipe = str(self.cells[0].spec.get("recipe_hash", "")) if self.cells else ""
        bases = [b for s in seeds if (b := self.ix.baselines.get((self.suite, recipe, self.victim, s)))]
        self.ids.update(b.cell_id for b in bases)
        pre = [v for b in bases if (v := b.value("pretrained", self.victim, self.metric)) is not None]
        ft = [v for b in bases if (v := b.value("expert", self.victim, self.metric)) is not None]
        vs.acc_pre, vs.acc_ft = _mean(pre), _mean(ft)
        protect = []
        art, exp = [], []
        fp_violated, fp_diffs = False, []
        for s, b in zip(seeds, bases):
            if self.defense == REFERENCE:
                e = _examples(b, "expert", self.victim, self.metric, 1.0)
                art.append(e)
                exp.append(e)
                continue
            same_seed = [c for c in self.cells if c.seed == s]
            carriers = [c for c in same_seed if c.status == "ok"]
            # a not-applicable merge cell names the same artifact: utility does not wait for an applicable step
            ucell = _utility_cell(self.ix, same_seed[0]) if same_seed else None
            source = ucell or next((c for c in carriers if c.find("utility") is not None), None)
            if source is None:
                continue
            self.ids.add(source.cell_id)
            art.append(_examples(source, "utility", self.victim, self.metric, 1.0))
            exp.append(_examples(b, "expert", self.victim, self.metric, 1.0))
            protect.append(_timing(source, "protect"))
            for c in [source, *carriers]:
                violated, diff = _function_preservation(c)
                fp_violated |= violated
                if violated and diff is not None:
                    fp_diffs.append(diff)
        self._fp = (fp_violated, fp_diffs)
        vs.protect_s = _mean(protect)
        vs.peak_rss_mb = _max(_number(c.provenance.get("peak_rss_mb")) for c in self.cells if c.status == "ok")
        pairs = [(a, e) for a, e in zip(art, exp) if a is not None and e is not None and len(a) == len(e)]
        if not pairs:
            return
        a_mean = float(np.mean([a.mean() for a, _ in pairs]))
        e_mean = float(np.mean([e.mean() for _, e in pairs]))
        vs.utility = utility_ratio(a_mean, e_mean, self.hib)
        n = len(pairs[0][0])
        if n > 1 and all(len(a) == n for a, _ in pairs):
            w = bootstrap_counts(_stable_rng(self.seed, self.suite, self.victim, "utility"), n, self.n_bootstrap)
            a_draws = np.mean([(w @ a) / n for a, _ in pairs], axis=0)
            e_draws = np.mean([(w @ e) / n for _, e in pairs], axis=0)
            num, den = (a_draws, e_draws) if self.hib else (e_draws, a_draws)
            with np.errstate(invalid="ignore", divide="ignore"):
                self._utility_draws = np.where(den > 0, num / den, np.nan)
            vs.utility_ci = percentile_ci(self._utility_draws, self.ci_level)
        elif vs.utility is not None:
            self._utility_draws = np.full(self.n_bootstrap, vs.utility)

    def _flags(self, vs: VictimScore, n: int) -> list[Flag]:
        flags = []
        violated, diffs = self._fp
        if violated:
            worst = f" (max |Δ| = {max(diffs):.3g})" if diffs else ""
            flags.append(Flag("function_preservation_violated",
                              f"{vs.defense} claims function preservation but changed outputs on {vs.victim}{worst}"))
        if self.budget:
            flags.append(Flag("budget_exceeded", "; ".join(f"{a} on {vs.victim}: {r}" for a, r in sorted(self.budget.items()))))
        absent = [a for a in vs.attacks_missing if a not in self.budget]
        if absent:
            detail = [self.missing.get(a, f"{a} was never run") for a in absent]
            flags.append(Flag("incomplete", f"on {vs.victim}: " + "; ".join(detail)))
        if self.failed:
            flags.append(Flag("failed_cells", f"{len(self.failed)} cell(s) failed on {vs.victim}: "
                                              + ", ".join(sorted(self.failed))))
        uninformative = [f"{p.attack}/{p.merge}" for p in vs.pairs if p.informative is False]
        if not vs.informative:
            flags.append(Flag("uninformative", f"{vs.victim}: no pair's gain is significantly positive"))
        elif uninformative:
            flags.append(Flag("uninformative", f"{vs.victim}: pairs without a significant gain: {', '.join(uninformative)}"))
        if n <= 1 and vs.pairs:
            flags.append(Flag("no_examples", f"{vs.victim}: no per-example outcomes"))
        return flags


def _flip(ci: tuple[float, float] | None) -> tuple[float, float] | None:
    return None if ci is None else (1.0 - ci[1], 1.0 - ci[0])


def _function_preservation(cell: CellRecord) -> tuple[bool, float | None]:
    """(violated, max_abs_diff) from the cell's function-preservation flag (the runner applied the one
    tolerance, `bench.plugins.PRESERVATION_TOLERANCE`, and stored the verdict as ``ok``)."""
    flag = ((cell.provenance or {}).get("flags") or {}).get("function_preservation")
    if not isinstance(flag, dict) or not flag.get("claimed"):
        return False, None
    diff = _number(flag.get("max_abs_diff"))
    ok = flag.get("ok")
    if ok is None:  # an old flag without a verdict: apply the tolerance it recorded
        tol = _number(flag.get("tolerance"))
        ok = diff is not None and tol is not None and diff <= tol
    return not bool(ok), diff


# ---------------------------------------------------------------- scoring


def score(records: Iterable[CellRecord], *, attacks: Sequence[str],
          utility_floor: float = UTILITY_FLOOR, n_bootstrap: int = N_BOOTSTRAP, ci_level: float = CI_LEVEL,
          seed: int = 0, missing: Mapping[tuple[str, str, str], Sequence[str]] | None = None) -> Scores:
    """Score every (suite, defense) in ``records``. ``attacks`` is the standard set a complete entry must
    have run (the caller decides it: a protocol's steps, or an explicit list; never the installed plugins).
    ``missing`` adds, per (suite, defense, victim), steps a protocol needed that were never run
    (`bench.protocol`): the entry is then incomplete, like one missing a standard attack."""
    if n_bootstrap < 1:
        raise ScoringError(f"n_bootstrap must be at least 1, got {n_bootstrap}")
    if not 0 < ci_level < 1:
        raise ScoringError(f"ci_level must lie strictly between 0 and 1, got {ci_level}")
    records = list(records)
    standard = sorted(dict.fromkeys(attacks))
    ix = _index(records)
    groups: dict[tuple[str, str, str], list[CellRecord]] = defaultdict(list)
    for c in ix.protected:
        groups[(c.suite, c.defense, c.victim)].append(c)
    for c in ix.unprotected:  # the reference row: the unprotected filling is what defense `none` releases
        groups[(c.suite, REFERENCE, c.victim)].append(c)
    # A defense that cannot act on a suite's architecture at all (every cell structurally N/A) is no entry
    # there: `Scores.not_applicable` lists it with the reason.
    by_entry: dict[tuple[str, str], list[CellRecord]] = defaultdict(list)
    for (suite, defense, _victim), cells in groups.items():
        by_entry[(suite, defense)].extend(cells)
    inapplicable = {key for key, cells in by_entry.items() if key[1] != REFERENCE and _structurally_na(cells)}
    groups = defaultdict(list, {k: v for k, v in groups.items() if (k[0], k[1]) not in inapplicable})
    victims, draws = [], {}
    for key in sorted(groups):
        vs, data = _VictimScorer(ix, *key, groups[key], standard, n_bootstrap, ci_level, seed,
                                 (missing or {}).get(key, ())).score()
        victims.append(vs)
        draws[key] = data
    suites, suite_draws = _score_suites(victims, draws, utility_floor, ci_level, n_bootstrap)
    overall, overall_draws = _score_overall(suites, suite_draws, utility_floor, ci_level)
    stability = {}
    for suite in sorted({s.suite for s in suites if s.suite is not None}):
        stability[suite] = _stability([s for s in suites if s.suite == suite], suite_draws)
    stability["*"] = _stability(overall, overall_draws)
    config = {"utility_floor": utility_floor, "n_bootstrap": n_bootstrap, "ci_level": ci_level, "seed": seed,
              "break_threshold": BREAK_THRESHOLD, "reference": REFERENCE,
              "recovered": "counterfactual: (V_P - V_∅) / (V_U - V_∅), clipped to [0, 1]",
              "worst_case": "best pair chosen on half the test examples, reported on the other half",
              "intervals": "paired percentile bootstrap over test examples and replicates"}
    return Scores(victims, suites, overall, stability, _not_applicable(records, suites), standard, config)


def _score_suites(victims: list[VictimScore], draws: dict, floor: float, ci_level: float,
                  n_bootstrap: int) -> tuple[list[DefenseScore], dict]:
    groups: dict[tuple[str, str], list[VictimScore]] = defaultdict(list)
    for v in victims:
        groups[(v.suite, v.defense)].append(v)
    out, suite_draws = [], {}
    for (suite, defense), vss in sorted(groups.items()):
        informative = [v for v in vss if v.security is not None]
        sec = (np.stack([draws[(suite, defense, v.victim)].security_draws for v in informative]) if informative
               else np.full((1, n_bootstrap), np.nan))
        util = np.stack([draws[(suite, defense, v.victim)].utility_draws for v in vss])
        ds = DefenseScore(suite, defense, [v.victim for v in vss], suites=[suite])
        ds.security = _mean(v.security for v in informative)
        ds.utility = _mean(v.utility for v in vss)
        ds.security_ci = percentile_ci(_quiet_nanmean(sec, axis=0), ci_level) if informative else None
        ds.utility_ci = percentile_ci(_quiet_nanmean(util, axis=0), ci_level)
        ds.pairs = _average_pairs([v.pairs for v in vss])
        worst = max(informative, key=lambda v: (v.best_recovered or 0.0, v.victim), default=None)
        if worst is not None:
            ds.best_attack, ds.best_merge = worst.best_attack, worst.best_merge
            ds.best_recovered, ds.attack_s = worst.best_recovered, worst.attack_s
        ds.partner_effect = _mean(v.partner_effect for v in vss)
        ds.protect_s = _mean(v.protect_s for v in vss)
        ds.peak_rss_mb = _max(v.peak_rss_mb for v in vss)
        ds.attacks_missing = sorted({a for v in vss for a in v.attacks_missing})
        ds.uninformative_victims = sorted(v.victim for v in vss if v.security is None)
        ds.flags = _merge_flags([f for v in vss for f in v.flags])
        if not informative:
            ds.flags = _merge_flags([*ds.flags, Flag("no_security", "no victim carries a significant gain")])
        below = [f"{v.victim} {v.utility:.3f}" for v in vss if v.utility is not None and v.utility < floor]
        if below:
            ds.flags = _merge_flags([*ds.flags, Flag("utility_below_floor",
                                                     f"utility below the floor {floor:g} on " + ", ".join(below))])
        out.append(ds)
        suite_draws[(suite, defense)] = (_quiet_nanmean(sec, axis=0), _quiet_nanmean(util, axis=0))
    for suite in sorted({d.suite for d in out}):
        _rank([d for d in out if d.suite == suite])
    return out, suite_draws


def _average_pairs(groups: list[list[PairScore]]) -> list[PairScore]:
    """Per (attack, merge): the mean over victims of their informative recovered values."""
    acc: dict[tuple[str, str], list[PairScore]] = defaultdict(list)
    for ps in groups:
        for p in ps:
            acc[(p.attack, p.merge)].append(p)
    out = []
    for (a, m), ps in sorted(acc.items()):
        vals = [p.recovered for p in ps if p.recovered is not None]
        reason = "" if vals else "; ".join(sorted({p.na_reason for p in ps if p.na_reason}))
        out.append(PairScore(a, m, float(np.mean(vals)) if vals else None, len(vals), reason,
                             _mean(p.attack_s for p in ps), _mean(p.partner_effect for p in ps),
                             _mean(p.v_protected for p in ps), _mean(p.v_unprotected for p in ps),
                             _mean(p.v_counterfactual for p in ps), _mean(p.gain for p in ps),
                             informative=any(p.informative for p in ps)))
    return out


def _merge_flags(flags: list[Flag]) -> list[Flag]:
    """One flag per code, its messages joined (the victim-level detail stays in the victim rows)."""
    by_code: dict[str, list[str]] = defaultdict(list)
    for f in flags:
        if f.message not in by_code[f.code]:
            by_code[f.code].append(f.message)
    return [Flag(code, "; ".join(msgs)) for code, msgs in sorted(by_code.items())]


UNRANKING = ("failed_cells", "budget_exceeded", "incomplete", "utility_below_floor", "function_preservation_violated")
"""Flags that unrank an entry (besides having no security)."""


def _rank_key(ds: DefenseScore) -> tuple:
    return (-(ds.security or 0.0), -(ds.utility or 0.0), ds.defense)


def _rank(group: list[DefenseScore]) -> None:
    """Assign ranks 1.. to the rankable entries of one group; say why the others are unranked."""
    rankable = []
    for ds in group:
        blocking = [f for f in ds.flags if f.code in UNRANKING]
        if ds.defense == REFERENCE:
            ds.unranked_reason = "the reference row: an unprotected release (shown, never ranked)"
        elif blocking:
            ds.unranked_reason = "; ".join(f"{f.code}: {f.message}" for f in blocking)
        elif ds.security is None:
            ds.unranked_reason = "no informative victim: no security could be scored"
        elif ds.utility is None:
            ds.unranked_reason = "no utility measured"
        else:
            rankable.append(ds)
    for i, ds in enumerate(sorted(rankable, key=_rank_key), start=1):
        ds.rank = i


def _score_overall(suites: list[DefenseScore], suite_draws: dict, floor: float,
                   ci_level: float) -> tuple[list[DefenseScore], dict]:
    by_defense: dict[str, list[DefenseScore]] = defaultdict(list)
    for s in suites:
        by_defense[s.defense].append(s)
    out, draws = [], {}
    for defense, ss in sorted(by_defense.items()):
        scored = [s for s in ss if s.security is not None]
        sec = (_quiet_nanmean(np.stack([suite_draws[(s.suite, defense)][0] for s in scored]), axis=0) if scored
               else np.full_like(suite_draws[(ss[0].suite, defense)][0], np.nan))
        util = _quiet_nanmean(np.stack([suite_draws[(s.suite, defense)][1] for s in ss]), axis=0)
        ds = DefenseScore(None, defense, sorted({v for s in ss for v in s.victims}), suites=[s.suite for s in ss])
        ds.security, ds.utility = _mean(s.security for s in scored), _mean(s.utility for s in ss)
        ds.security_ci, ds.utility_ci = percentile_ci(sec, ci_level), percentile_ci(util, ci_level)
        worst = [s for s in scored if s.best_recovered is not None]
        if worst:
            top = max(worst, key=lambda s: s.best_recovered)
            ds.best_attack, ds.best_merge, ds.best_recovered, ds.attack_s = (
                top.best_attack, top.best_merge, top.best_recovered, top.attack_s)
        ds.partner_effect = _mean(s.partner_effect for s in ss)
        ds.protect_s = _mean(s.protect_s for s in ss)
        ds.peak_rss_mb = _max(s.peak_rss_mb for s in ss)
        ds.attacks_missing = sorted({a for s in ss for a in s.attacks_missing})
        ds.uninformative_victims = sorted({f"{s.suite}/{v}" for s in ss for v in s.uninformative_victims})
        ds.flags = _merge_flags([f for s in ss for f in s.flags])
        out.append(ds)
        draws[(None, defense)] = (sec, util)
    _rank(out)
    return out, draws


def _stability(group: list[DefenseScore], draws: dict) -> RankStability:
    ranked = sorted((d for d in group if d.rank is not None), key=lambda d: d.rank)
    names = [d.defense for d in ranked]
    if not ranked:
        return RankStability([], [], [], 1.0)
    sec = np.stack([draws[(d.suite, d.defense)][0] for d in ranked])  # [defense, draw]
    util = np.stack([draws[(d.suite, d.defense)][1] for d in ranked])
    n, n_draws = sec.shape
    counts = np.zeros((n, n))
    same = 0
    for b in range(n_draws):
        # NaN (a defense with no resampled value) sorts last, like an unscored entry.
        order = sorted(range(n), key=lambda i: (np.nan_to_num(-sec[i, b], nan=np.inf),
                                                np.nan_to_num(-util[i, b], nan=np.inf), names[i]))
        for r, i in enumerate(order):
            counts[i, r] += 1
        same += order == list(range(n))
    flips = []
    for i in range(n - 1):
        b_wins = sec[i + 1] > sec[i]
        tie = sec[i + 1] == sec[i]
        b_wins |= tie & (util[i + 1] > util[i])
        flips.append((names[i], names[i + 1], float(np.mean(b_wins))))
    return RankStability(names, (counts / n_draws).tolist(), flips, same / n_draws)


def _structurally_na(cells: list[CellRecord]) -> bool:
    """Every cell N/A because the defense cannot act on the architecture (`bench.plan.NaKind`); cells stored
    before that kind existed say so in their reason, which the planner words one way."""
    def inapplicable(c: CellRecord) -> bool:
        kind = (c.provenance or {}).get("na_kind", "structural")
        return kind == "architecture" or (kind == "structural" and c.reason.endswith("which this architecture lacks"))

    return all(c.status == "na" and inapplicable(c) for c in cells)


def _not_applicable(records: list[CellRecord], suites: list[DefenseScore]) -> list[tuple[str, str, str]]:
    scored = {(s.suite, s.defense) for s in suites}
    reasons: dict[tuple[str, str], set[str]] = defaultdict(set)
    for c in records:
        inapplicable = c.kind == "utility" and c.status == "na" and _structurally_na([c])
        if (inapplicable or (c.kind == "merge" and c.filling == "protected" and c.status == "na")) \
                and (c.suite, c.defense) not in scored:
            reasons[(c.suite, c.defense)].add(c.reason)
    return [(s, d, "; ".join(sorted(r))) for (s, d), r in sorted(reasons.items())]

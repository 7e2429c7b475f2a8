"""What scoring returns: the typed result rows, the flags they carry, and the scoring constants."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

UTILITY_FLOOR = 0.9
"""Utility below this on any victim is flagged and unranked (JailbreakBench's 90 % rule)."""
N_BOOTSTRAP = 1000
CI_LEVEL = 0.95
PRIMARY_METRICS = ("accuracy", "acc", "exact_match", "pass@1", "f1", "clip_score")
REFERENCE = "none"
"""Name of the no-defense / no-attack plugins: the unprotected reference."""
SCORING_VERSION = "4"
"""3: references from each attack's honest counterpart; breaks decided on the selection half; undefined
bootstrap draws counted at both ends; rank bands; utility capped at 1 for ranking. 4: the worst pair is chosen on
the replicates every pair has and reported pooled over all of its own; each pair's draws resample only the
replicates it has; utility resamples seeds (the same numbers as 3 wherever every cell has one seed)."""

METRICS: dict[str, dict[str, Any]] = {
    "utility": {"higher_is_better": True, "description": "protected artifact alone / unprotected expert, on the victim task"},
    "security": {"higher_is_better": True, "description": "1 - recovered of the best (attack, merge), chosen on half the test examples and measured on the other half"},
    "recovered": {"higher_is_better": False, "description": "(V_P - V_∅) / (V_U - V_∅) clipped to [0, 1], V_U and V_∅ from the attack's honest counterpart: share of what the victim's model gives the free-rider that it still gets from the protected release"},
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
    "mixed_experts": "cells built from different experts (content hashes) were found together and not paired",
    "no_security": "no informative victim: no pair's gain is significantly positive",
    "uninformative_victims": "some victims carry no significant gain under any pair and are not scored",
    "no_examples": "the suite gives no per-example outcomes: intervals rest on replicates only, the winner's curse is uncorrected",
}


class ScoringError(ValueError):
    """The stored results cannot be scored as asked."""


@dataclass(frozen=True)
class Flag:
    code: str
    """One of `FLAG_CODES`."""
    message: str
    """Names what it is about (the victim, the pair)."""


@dataclass(frozen=True)
class PairScore:
    """One (attack, merge) of one defense: on one victim (all its test examples), or on a suite (`victims`)."""

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
    """V_U: the unprotected expert under the attack's honest counterpart (`bench.plan.counterpart_spec`)."""
    v_counterfactual: float | None = None
    """V_∅: θ_pre in the victim's slot under the same counterpart."""
    gain: float | None = None
    """V_U − V_∅ (in the metric's direction)."""
    gain_ci: tuple[float, float] | None = None
    recovered_ci: tuple[float, float] | None = None
    informative: bool | None = None
    """Whether the gain's interval lies above 0 (None when there is no reference to tell)."""
    examples: int = 0
    """Test examples the values rest on (0 when the suite gives no per-example outcomes)."""
    counterpart: str = ""
    """The attack whose U and ∅ cells the pair is read against (its honest counterpart)."""
    victims: tuple[str, ...] = ()
    """Suite-level rows: the victims the means cover (every victim where the pair's gain is significant)."""


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
    """Its recovered on the held-out half (1 − security): the reported value."""
    selection_recovered: float | None = None
    """Its recovered on the selection half: what the protocol's break decision reads (never reported as a score)."""
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
    """The best rank the data support (the band's lower end)."""
    rank_band: tuple[int, int] | None = None
    """(best, worst) rank the paired bootstrap cannot rule out: entries it does not separate share ranks."""
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
    """(a, b, share of draws in which b is strictly more secure than a) for each adjacent pair of the point order."""
    stable_fraction: float
    """Share of draws whose full order equals the point order."""


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

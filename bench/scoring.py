"""Scores of the leaderboard: utility, recovered fraction, worst-case security, CIs, ranks, flags.

For a victim task v with acc_pre = θ_pre on v (baseline role 'pretrained') and acc_ft = the
unprotected expert on v (baseline role 'expert'):

* **utility** = metric(protected artifact alone) / acc_ft; 1.0 = no loss.
* **recovered(attack, merge)** = (merged_protected − acc_pre) / (merged_unprotected − acc_pre),
  clipped to [0, 1], where *merged_unprotected* is the ``none``/``none`` cell with the same
  (suite, victim, partners, merge, seed). When the denominator is ≤ 0 merging gives nothing even
  without protection, so there is nothing to recover: the value is N/A (never divided).
* **security** = 1 − max over (attack, merge) of recovered: the free-rider picks the best attack
  and merge, as RobustBench takes the worst case over AutoAttack.

Choices where DESIGN §4 leaves room (each is a parameter or constant below):

* *Replicates.* A replicate is one (partner set, seed) of a victim. recovered(attack, merge) is the
  mean over replicates; the worst case is then taken over (attack, merge). Suite scores are means
  over victim tasks, the overall score the mean over the suites where the defense applies.
* *Lower-is-better metrics* (perplexity, FID): every difference is sign-flipped so "gain" always
  means improvement, and utility is acc_ft / metric(artifact).
* *Primary metric.* A task may report several metrics; the first of `PRIMARY_METRICS` that it
  reports is scored, else the alphabetically first.
* *Duplicates.* Two ok cells at the same coordinates (a re-run with other params): the newest wins.
* *Confidence intervals* are percentile bootstrap intervals: replicates are resampled with
  replacement within each victim, with the same draws for every defense of a suite (a paired
  bootstrap, so rank flips reflect shared noise correctly). The generator is seeded from
  (seed, suite, victim): the same data and seed give the same intervals.
* *Ranking* is by security, then utility, then name. A defense is ranked only when its security
  rests on every attack of the standard set (else it is "incomplete") and its utility is at least
  the floor (default 0.9, JailbreakBench's 90 % rule: a defense that breaks its own model would
  otherwise win by destroying what there is to merge). Unranked entries are still reported. The
  ``none`` defense is ranked as the reference row: the plain merge recovers everything from it by
  construction, so it needs no other attack to be complete.
* *Completeness.* The standard attack set defaults to `bench.plan.standard_attacks` (every
  registered attack and the declared composites). An attack counts as run when at least one of its
  cells (any sweep point, any merge) has a recovered value; an attack the planner marked N/A for the
  defense (status 'na', with its reason) is not missing; a failed or never-run attack is.
* *Partner side effect* = mean over partner tasks of (merged partner metric with the protected
  victim − with the unprotected victim), sign-adjusted so negative means the partners lose; the
  summary uses plain merges (attack ``none``) when there are any, since that is what releasing the
  protected model does to an honest merger's other tasks.
* *Costs*: protect seconds = stage ``protect``; attack seconds = stages ``prepare`` + ``finish``;
  peak memory = ``provenance["peak_rss_mb"]``.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.store import CellRecord, newest_ok

UTILITY_FLOOR = 0.9
"""Utility below this is flagged and unranked (JailbreakBench flags defenses refusing >10 % benign)."""
BREAK_THRESHOLD = 0.5
"""An attack 'breaks' a defense when it recovers at least this fraction of the merging gain."""
N_BOOTSTRAP = 1000
CI_LEVEL = 0.95
FP_TOLERANCE = 1e-4
"""Max |output difference| a function-preserving defense may show, used only when a cell's flag has no 'ok'."""
PRIMARY_METRICS = ("accuracy", "acc", "exact_match", "pass@1", "f1", "clip_score")
REFERENCE = "none"
"""Name of the no-defense / no-attack plugins: the unprotected reference."""

METRICS: dict[str, dict[str, Any]] = {
    "utility": {"higher_is_better": True, "description": "protected artifact alone / unprotected expert, on the victim task"},
    "security": {"higher_is_better": True, "description": "1 - worst-case recovered fraction over attacks and merges"},
    "recovered": {"higher_is_better": False, "description": "share of the unprotected merge gain over θ_pre the attacker recovers, in [0, 1]"},
    "partner_effect": {"higher_is_better": True, "description": "merged partner-task metric with the protected minus the unprotected victim"},
    "protect_s": {"higher_is_better": False, "description": "wall seconds of the protect stage"},
    "attack_s": {"higher_is_better": False, "description": "wall seconds of the attack's prepare and finish stages"},
    "peak_rss_mb": {"higher_is_better": False, "description": "peak resident memory of the cell, MiB"},
}

FLAG_CODES = {
    "function_preservation_violated": "claims function preservation but changed outputs beyond tolerance",
    "utility_below_floor": "utility below the floor",
    "incomplete": "security rests on fewer attacks than the standard set",
    "failed_cells": "some cells failed",
    "no_security": "no attack could be scored (no baseline, no reference, or merging gives nothing)",
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
    """recovered(attack, merge) of one defense on one victim (or averaged over a suite's victims)."""

    attack: str
    merge: str
    recovered: float | None
    """Mean recovered fraction; None when N/A (see ``na_reason``)."""
    n: int
    """Replicates (or victims) the mean rests on."""
    na_reason: str = ""
    attack_s: float | None = None
    partner_effect: float | None = None


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
    best_merge: str | None = None
    pairs: list[PairScore] = field(default_factory=list)
    partner_effect: float | None = None
    protect_s: float | None = None
    attack_s: float | None = None
    """Cost of the best attack."""
    peak_rss_mb: float | None = None
    attacks_evaluated: list[str] = field(default_factory=list)
    attacks_missing: list[str] = field(default_factory=list)
    attacks_na: dict[str, str] = field(default_factory=dict)
    """Attacks the planner marked not applicable to this defense, with the reason."""
    replicates: list[tuple[tuple[str, ...], int]] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)
    cell_ids: list[str] = field(default_factory=list)
    """Every cell a number here rests on (own cells, unprotected references, baselines)."""

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


# ---------------------------------------------------------------- standard attack set


def standard_attacks(explicit: Sequence[str] | None = None) -> list[str]:
    """The attacks a complete security number must rest on.

    ``explicit`` wins; else `bench.plan.standard_attacks` (every registered attack plus the
    composites the attack modules declare standard), so nothing is excluded silently.
    """
    if explicit is not None:
        return sorted(dict.fromkeys(explicit))
    from bench.plan import standard_attacks as planned

    return sorted(dict.fromkeys(planned()))


def attack_name(cell: CellRecord) -> str:
    """The attack plugin a cell ran: its spec name (a sweep point 'x[k=v]' ran attack 'x'), else its label."""
    spec = cell.spec.get("attack") if isinstance(cell.spec, dict) else None
    name = spec.get("name") if isinstance(spec, dict) else None
    return name if isinstance(name, str) and name else cell.attack


# ---------------------------------------------------------------- indexing the cells


def _sign(higher_is_better: bool) -> float:
    return 1.0 if higher_is_better else -1.0


def _primary_metric(names: Iterable[str]) -> str | None:
    names = sorted(set(names))
    for preferred in PRIMARY_METRICS:
        if preferred in names:
            return preferred
    return names[0] if names else None


@dataclass
class _Index:
    """The ok cells, keyed for the lookups scoring needs."""

    metric_of: dict[tuple[str, str], tuple[str, bool]]
    """(suite, task) -> (primary metric, higher_is_better)."""
    baselines: dict[tuple[str, str, int], CellRecord]
    """(suite, victim, seed) -> baseline cell."""
    merges: dict[tuple[str, str, str, tuple[str, ...], int, str, str], CellRecord]
    """(suite, defense, victim, partners, seed, attack, merge) -> merge cell."""
    not_ok: list[CellRecord]


def _index(records: Iterable[CellRecord]) -> _Index:
    cells = sorted(records, key=lambda c: (c.created, c.cell_id))
    names: dict[tuple[str, str], dict[str, bool]] = defaultdict(dict)
    baselines: dict[tuple[str, str, int], CellRecord] = {}
    merges: dict[tuple[str, str, str, tuple[str, ...], int, str, str], CellRecord] = {}
    not_ok = [c for c in cells if c.status != "ok"]
    for c in newest_ok(cells):
        for m in c.metrics:
            names[(c.suite, m.task)].setdefault(m.metric, m.higher_is_better)
        if c.kind == "baseline":
            baselines[(c.suite, c.victim, c.seed)] = c
        elif c.kind == "merge":
            merges[(c.suite, c.defense, c.victim, tuple(c.partners), c.seed, c.attack, c.merge)] = c
    metric_of = {}
    for key, found in names.items():
        name = _primary_metric(found)
        if name is not None:
            metric_of[key] = (name, found[name])
    return _Index(metric_of, baselines, merges, not_ok)


def _value(cell: CellRecord, role: str, task: str, metric: str) -> float | None:
    v = cell.value(role, task, metric)
    return None if v is None or not math.isfinite(v) else float(v)


# ---------------------------------------------------------------- per replicate


def recovered_fraction(merged_protected: float, merged_unprotected: float, acc_pre: float,
                       higher_is_better: bool = True) -> float | None:
    """Clipped share of the unprotected merge gain that the protected merge keeps; None when there is no gain."""
    s = _sign(higher_is_better)
    gain = s * (merged_unprotected - acc_pre)
    if gain <= 0:
        return None
    return min(1.0, max(0.0, s * (merged_protected - acc_pre) / gain))


def utility_ratio(artifact: float, expert: float, higher_is_better: bool = True) -> float | None:
    """metric(artifact) / metric(expert), inverted for lower-is-better metrics; None when undefined."""
    num, den = (artifact, expert) if higher_is_better else (expert, artifact)
    if den <= 0:
        return None
    return num / den


@dataclass
class _Obs:
    """What one merge cell of a defense contributes."""

    recovered: float | None
    na_reason: str
    utility: float | None
    partner_effect: float | None
    attack_s: float | None
    protect_s: float | None
    peak_rss_mb: float | None
    cell_ids: tuple[str, ...]


def _timing(cell: CellRecord, *stages: str) -> float | None:
    timings = cell.provenance.get("timings") or {}
    found = [float(timings[s]) for s in stages if isinstance(timings.get(s), (int, float))]
    return sum(found) if found else None


def _observe(cell: CellRecord, ix: _Index) -> _Obs:
    metric, hib = ix.metric_of.get((cell.suite, cell.victim), (None, True))
    base = ix.baselines.get((cell.suite, cell.victim, cell.seed))
    ref = ix.merges.get((cell.suite, REFERENCE, cell.victim, tuple(cell.partners), cell.seed, REFERENCE, cell.merge))
    ids = [cell.cell_id] + ([base.cell_id] if base else []) + ([ref.cell_id] if ref else [])
    pre = _value(base, "pretrained", cell.victim, metric) if base and metric else None
    ft = _value(base, "expert", cell.victim, metric) if base and metric else None
    merged = _value(cell, "merged", cell.victim, metric) if metric else None
    merged_ref = _value(ref, "merged", cell.victim, metric) if ref and metric else None
    art = _value(cell, "utility", cell.victim, metric) if metric else None

    recovered, reason = None, ""
    if base is None or pre is None:
        reason = f"no baseline cell for victim {cell.victim!r}, seed {cell.seed}"
    elif ref is None or merged_ref is None:
        reason = f"no unprotected reference merge ({REFERENCE}/{REFERENCE}, merge {cell.merge!r})"
    elif merged is None:
        reason = "the merged model has no victim metric"
    else:
        recovered = recovered_fraction(merged, merged_ref, pre, hib)
        if recovered is None:
            reason = "merging gives nothing beyond θ_pre even unprotected"
    utility = utility_ratio(art, ft, hib) if art is not None and ft is not None else None
    return _Obs(recovered, reason, utility, _partner_effect(cell, ref, ix),
                _timing(cell, "prepare", "finish"), _timing(cell, "protect"),
                _number(cell.provenance.get("peak_rss_mb")), tuple(ids))


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _partner_effect(cell: CellRecord, ref: CellRecord | None, ix: _Index) -> float | None:
    if ref is None or not cell.partners:
        return None
    deltas = []
    for p in cell.partners:
        metric, hib = ix.metric_of.get((cell.suite, p), (None, True))
        a = _value(cell, "merged", p, metric) if metric else None
        b = _value(ref, "merged", p, metric) if metric else None
        if a is None or b is None:
            return None
        deltas.append(_sign(hib) * (a - b))
    return float(np.mean(deltas))


def _function_preservation(cell: CellRecord) -> tuple[bool, float | None]:
    """(violated, max_abs_diff) from the cell's function-preservation flag."""
    flag = (cell.provenance.get("flags") or {}).get("function_preservation")
    if not isinstance(flag, dict) or not flag.get("claimed"):
        return False, None
    diff = _number(flag.get("max_abs_diff"))
    ok = flag.get("ok")
    if ok is None:
        ok = diff is not None and diff <= FP_TOLERANCE
    return not bool(ok), diff


# ---------------------------------------------------------------- the bootstrap machinery


def _stable_rng(*key: object) -> np.random.Generator:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _quiet_nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def _quiet_nanmax(a: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmax(a, axis=axis)


def _ci(draws: np.ndarray, level: float) -> tuple[float, float] | None:
    draws = draws[~np.isnan(draws)]
    if draws.size == 0:
        return None
    lo, hi = np.percentile(draws, [50 * (1 - level), 100 - 50 * (1 - level)])
    return float(lo), float(hi)


def _opt(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


@dataclass
class _VictimData:
    """One (suite, defense, victim): replicate-by-pair matrices aligned to the suite's replicate list."""

    pairs: list[tuple[str, str]]
    rec: np.ndarray
    """[replicate, pair] recovered, NaN where N/A or absent."""
    util: np.ndarray
    """[replicate] utility, NaN where absent."""


def _victim_statistics(data: _VictimData, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per draw (one row of replicate indices in ``idx``): security and utility."""
    pair_means = _quiet_nanmean(data.rec[idx], axis=1)  # [draw, pair]: recovered(attack, merge)
    worst = _quiet_nanmax(pair_means, axis=1) if data.pairs else np.full(idx.shape[0], np.nan)
    return 1.0 - worst, _quiet_nanmean(data.util[idx], axis=1)


# ---------------------------------------------------------------- scoring


def score(records: Iterable[CellRecord], *, attacks: Sequence[str] | None = None,
          utility_floor: float = UTILITY_FLOOR, n_bootstrap: int = N_BOOTSTRAP, ci_level: float = CI_LEVEL,
          seed: int = 0) -> Scores:
    """Score every (suite, defense) in ``records``; ``attacks`` is the standard set (see `standard_attacks`)."""
    if n_bootstrap < 1:
        raise ScoringError(f"n_bootstrap must be at least 1, got {n_bootstrap}")
    if not 0 < ci_level < 1:
        raise ScoringError(f"ci_level must lie strictly between 0 and 1, got {ci_level}")
    records = list(records)
    standard = standard_attacks(attacks)
    ix = _index(records)
    victims, draws = _score_victims(ix, records, standard, n_bootstrap, ci_level, seed)
    suites, suite_draws = _score_suites(victims, draws, utility_floor, ci_level)
    overall, overall_draws = _score_overall(suites, suite_draws, utility_floor, ci_level)
    stability = {}
    for suite in sorted({s.suite for s in suites if s.suite is not None}):
        group = [s for s in suites if s.suite == suite]
        stability[suite] = _stability(group, suite_draws)
    stability["*"] = _stability(overall, overall_draws)
    config = {"utility_floor": utility_floor, "n_bootstrap": n_bootstrap, "ci_level": ci_level, "seed": seed,
              "break_threshold": BREAK_THRESHOLD, "reference": REFERENCE}
    return Scores(victims, suites, overall, stability, _not_applicable(records, suites), standard, config)


def score_store(store: Any, **kwargs: Any) -> Scores:
    """`score` over every cell of a `bench.store.Store`."""
    return score(store.cells(), **kwargs)


def _score_victims(ix: _Index, records: list[CellRecord], standard: list[str], n_bootstrap: int,
                   ci_level: float, seed: int) -> tuple[list[VictimScore], dict[tuple[str, str, str], tuple]]:
    by_victim: dict[tuple[str, str, str], list[CellRecord]] = defaultdict(list)
    for c in ix.merges.values():
        by_victim[(c.suite, c.defense, c.victim)].append(c)
    not_ok: dict[tuple[str, str, str], list[CellRecord]] = defaultdict(list)
    for c in ix.not_ok:
        if c.kind == "merge":
            not_ok[(c.suite, c.defense, c.victim)].append(c)

    # The suite's replicate list per victim is shared by all defenses (paired bootstrap).
    replicates: dict[tuple[str, str], list[tuple[tuple[str, ...], int]]] = defaultdict(list)
    for (suite, _d, victim), cells in by_victim.items():
        replicates[(suite, victim)].extend((tuple(c.partners), c.seed) for c in cells)
    replicates = {k: sorted(set(v)) for k, v in replicates.items()}
    indices = {k: _stable_rng(seed, *k).integers(0, len(v), size=(n_bootstrap, len(v)))
               for k, v in replicates.items()}

    out, draws = [], {}
    for key in sorted(by_victim):
        suite, defense, victim = key
        reps = replicates[(suite, victim)]
        vs, data = _victim_score(key, by_victim[key], not_ok.get(key, []), reps, ix, standard)
        point = _victim_statistics(data, np.arange(len(reps))[None, :])
        boot = _victim_statistics(data, indices[(suite, victim)])
        _fill_victim(vs, point, boot, ci_level)
        out.append(vs)
        draws[key] = (boot[0], boot[1])
    return out, draws


def _victim_score(key: tuple[str, str, str], cells: list[CellRecord], failed: list[CellRecord],
                  reps: list[tuple[tuple[str, ...], int]], ix: _Index,
                  standard: list[str]) -> tuple[VictimScore, _VictimData]:
    suite, defense, victim = key
    metric, hib = ix.metric_of.get((suite, victim), ("", True))
    base_cells = [ix.baselines[(suite, victim, s)] for s in sorted({c.seed for c in cells})
                  if (suite, victim, s) in ix.baselines]
    pre = [v for b in base_cells if (v := _value(b, "pretrained", victim, metric)) is not None]
    ft = [v for b in base_cells if (v := _value(b, "expert", victim, metric)) is not None]
    vs = VictimScore(suite, defense, victim, metric, hib,
                     float(np.mean(pre)) if pre else None, float(np.mean(ft)) if ft else None)

    pairs = sorted({(c.attack, c.merge) for c in cells})
    rep_pos = {r: i for i, r in enumerate(reps)}
    rec = np.full((len(reps), len(pairs)), np.nan)
    util_sum = np.zeros(len(reps))
    util_n = np.zeros(len(reps))
    per_pair: dict[tuple[str, str], list[_Obs]] = defaultdict(list)
    ids: set[str] = set()
    fp_diffs: list[float] = []
    fp_violated = False
    for c in cells:
        obs = _observe(c, ix)
        ids.update(obs.cell_ids)
        r, p = rep_pos[(tuple(c.partners), c.seed)], pairs.index((c.attack, c.merge))
        if obs.recovered is not None:
            rec[r, p] = obs.recovered
        if obs.utility is not None:
            util_sum[r] += obs.utility
            util_n[r] += 1
        per_pair[(c.attack, c.merge)].append(obs)
        violated, diff = _function_preservation(c)
        fp_violated |= violated
        if violated and diff is not None:
            fp_diffs.append(diff)
    with np.errstate(invalid="ignore", divide="ignore"):
        util = np.where(util_n > 0, util_sum / np.maximum(util_n, 1), np.nan)

    vs.replicates = sorted({(tuple(c.partners), c.seed) for c in cells})
    vs.cell_ids = sorted(ids | {c.cell_id for c in failed})
    vs.pairs = [_pair_score(a, m, per_pair[(a, m)]) for a, m in pairs]
    evaluated = sorted({p.attack for p in vs.pairs if p.recovered is not None})
    covered = {attack_name(c) for c in cells if c.attack in evaluated} | set(evaluated)
    na = {c.attack: c.reason for c in failed if c.status == "na" and c.attack not in evaluated}
    na_names = {attack_name(c) for c in failed if c.status == "na"} | set(na)
    vs.attacks_evaluated = evaluated
    vs.attacks_na = dict(sorted(na.items()))
    # The unprotected reference recovers everything with the plain merge by construction; it needs no other attack.
    if defense != REFERENCE:
        vs.attacks_missing = [a for a in standard if a not in covered and a not in na_names]
    all_obs = [o for obs in per_pair.values() for o in obs]
    vs.protect_s = _mean(o.protect_s for o in all_obs)
    vs.peak_rss_mb = _max(o.peak_rss_mb for o in all_obs)
    vs.flags = _victim_flags(vs, failed, fp_violated, fp_diffs)
    return vs, _VictimData(pairs, rec, util)


def _pair_score(attack: str, merge: str, obs: list[_Obs]) -> PairScore:
    values = [o.recovered for o in obs if o.recovered is not None]
    reasons = sorted({o.na_reason for o in obs if o.recovered is None and o.na_reason})
    return PairScore(attack, merge, float(np.mean(values)) if values else None, len(values),
                     "" if values else "; ".join(reasons),
                     _mean(o.attack_s for o in obs), _mean(o.partner_effect for o in obs))


def _mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(np.mean(vals)) if vals else None


def _max(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(max(vals)) if vals else None


def _victim_flags(vs: VictimScore, failed: list[CellRecord], fp_violated: bool, fp_diffs: list[float]) -> list[Flag]:
    flags = []
    if fp_violated:
        worst = f" (max |Δ| = {max(fp_diffs):.3g})" if fp_diffs else ""
        flags.append(Flag("function_preservation_violated",
                          f"{vs.defense} claims function preservation but changed outputs on {vs.victim}{worst}"))
    if vs.attacks_missing:
        flags.append(Flag("incomplete", f"security on {vs.victim} rests on {len(vs.attacks_evaluated)} attacks; "
                                        f"missing: {', '.join(vs.attacks_missing)}"))
    n_failed = sum(1 for c in failed if c.status == "failed")
    if n_failed:
        flags.append(Flag("failed_cells", f"{n_failed} cell(s) failed on {vs.victim}"))
    return flags


def _fill_victim(vs: VictimScore, point: tuple, boot: tuple, ci_level: float) -> None:
    security, utility = point
    vs.security, vs.utility = _opt(security[0]), _opt(utility[0])
    vs.security_ci, vs.utility_ci = _ci(boot[0], ci_level), _ci(boot[1], ci_level)
    best = _best_pair(vs.pairs)
    if vs.security is not None and best is not None:
        vs.best_attack, vs.best_merge, vs.attack_s = best.attack, best.merge, best.attack_s
    plain = [p.partner_effect for p in vs.pairs if p.attack == REFERENCE and p.partner_effect is not None]
    vs.partner_effect = _mean(plain) if plain else _mean(p.partner_effect for p in vs.pairs)
    if vs.security is None:
        vs.flags.append(Flag("no_security", f"no attack could be scored on {vs.victim}"))


def _score_suites(victims: list[VictimScore], draws: dict, floor: float,
                  ci_level: float) -> tuple[list[DefenseScore], dict]:
    groups: dict[tuple[str, str], list[VictimScore]] = defaultdict(list)
    for v in victims:
        groups[(v.suite, v.defense)].append(v)
    out, suite_draws = [], {}
    for (suite, defense), vss in sorted(groups.items()):
        sec = np.stack([draws[(suite, defense, v.victim)][0] for v in vss])
        util = np.stack([draws[(suite, defense, v.victim)][1] for v in vss])
        ds = DefenseScore(suite, defense, [v.victim for v in vss], suites=[suite])
        ds.security = _mean(v.security for v in vss)
        ds.utility = _mean(v.utility for v in vss)
        ds.security_ci = _ci(_quiet_nanmean(sec, axis=0), ci_level)
        ds.utility_ci = _ci(_quiet_nanmean(util, axis=0), ci_level)
        ds.pairs = _average_pairs([v.pairs for v in vss])
        _fill_best(ds)
        ds.partner_effect = _mean(v.partner_effect for v in vss)
        ds.protect_s = _mean(v.protect_s for v in vss)
        ds.peak_rss_mb = _max(v.peak_rss_mb for v in vss)
        ds.attacks_missing = sorted({a for v in vss for a in v.attacks_missing})
        ds.flags = _merge_flags([f for v in vss for f in v.flags])
        _floor_flag(ds, floor)
        out.append(ds)
        suite_draws[(suite, defense)] = (_quiet_nanmean(sec, axis=0), _quiet_nanmean(util, axis=0))
    for suite in sorted({d.suite for d in out}):
        _rank([d for d in out if d.suite == suite])
    return out, suite_draws


def _average_pairs(groups: list[list[PairScore]]) -> list[PairScore]:
    """Per (attack, merge): the mean over victims of their recovered means."""
    acc: dict[tuple[str, str], list[PairScore]] = defaultdict(list)
    for ps in groups:
        for p in ps:
            acc[(p.attack, p.merge)].append(p)
    out = []
    for (a, m), ps in sorted(acc.items()):
        vals = [p.recovered for p in ps if p.recovered is not None]
        reason = "" if vals else "; ".join(sorted({p.na_reason for p in ps if p.na_reason}))
        out.append(PairScore(a, m, float(np.mean(vals)) if vals else None, len(vals), reason,
                             _mean(p.attack_s for p in ps), _mean(p.partner_effect for p in ps)))
    return out


def _best_pair(pairs: list[PairScore]) -> PairScore | None:
    """The (attack, merge) recovering most; among ties the cheaper attack, then the first by name."""
    scored = [p for p in pairs if p.recovered is not None]
    if not scored:
        return None
    return min(scored, key=lambda p: (-p.recovered, p.attack_s or 0.0, p.attack, p.merge))


def _fill_best(ds: DefenseScore) -> None:
    best = _best_pair(ds.pairs)
    if best is not None:
        ds.best_attack, ds.best_merge, ds.best_recovered, ds.attack_s = best.attack, best.merge, best.recovered, best.attack_s


def _merge_flags(flags: list[Flag]) -> list[Flag]:
    """One flag per code, its messages joined (the victim-level detail stays in the victim rows)."""
    by_code: dict[str, list[str]] = defaultdict(list)
    for f in flags:
        if f.message not in by_code[f.code]:
            by_code[f.code].append(f.message)
    return [Flag(code, "; ".join(msgs)) for code, msgs in sorted(by_code.items())]


def _floor_flag(ds: DefenseScore, floor: float) -> None:
    if ds.utility is not None and ds.utility < floor:
        ds.flags.append(Flag("utility_below_floor", f"utility {ds.utility:.3f} is below the floor {floor:g}"))
        ds.flags.sort(key=lambda f: f.code)


def _rank_key(ds: DefenseScore) -> tuple:
    return (-(ds.security or 0.0), -(ds.utility or 0.0), ds.defense)


def _rank(group: list[DefenseScore]) -> None:
    """Assign ranks 1.. to the rankable entries of one group; say why the others are unranked."""
    rankable = []
    for ds in group:
        if ds.security is None:
            ds.unranked_reason = "no attack could be scored"
        elif ds.attacks_missing:
            ds.unranked_reason = "incomplete: missing " + ", ".join(ds.attacks_missing)
        elif ds.has_flag("utility_below_floor"):
            ds.unranked_reason = "utility below the floor"
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
        sec = _quiet_nanmean(np.stack([suite_draws[(s.suite, defense)][0] for s in ss]), axis=0)
        util = _quiet_nanmean(np.stack([suite_draws[(s.suite, defense)][1] for s in ss]), axis=0)
        ds = DefenseScore(None, defense, sorted({v for s in ss for v in s.victims}), suites=[s.suite for s in ss])
        ds.security, ds.utility = _mean(s.security for s in ss), _mean(s.utility for s in ss)
        ds.security_ci, ds.utility_ci = _ci(sec, ci_level), _ci(util, ci_level)
        worst = [s for s in ss if s.best_recovered is not None]
        if worst:
            top = max(worst, key=lambda s: s.best_recovered)
            ds.best_attack, ds.best_merge, ds.best_recovered, ds.attack_s = (
                top.best_attack, top.best_merge, top.best_recovered, top.attack_s)
        ds.partner_effect = _mean(s.partner_effect for s in ss)
        ds.protect_s = _mean(s.protect_s for s in ss)
        ds.peak_rss_mb = _max(s.peak_rss_mb for s in ss)
        ds.attacks_missing = sorted({a for s in ss for a in s.attacks_missing})
        ds.flags = _merge_flags([f for s in ss for f in s.flags if f.code != "utility_below_floor"])
        _floor_flag(ds, floor)
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
        # NaN (a defense with no resampled replicate) sorts last, like an unscored entry.
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


def _not_applicable(records: list[CellRecord], suites: list[DefenseScore]) -> list[tuple[str, str, str]]:
    scored = {(s.suite, s.defense) for s in suites}
    reasons: dict[tuple[str, str], set[str]] = defaultdict(set)
    for c in records:
        if c.kind == "merge" and c.status == "na" and (c.suite, c.defense) not in scored:
            reasons[(c.suite, c.defense)].add(c.reason)
    return [(s, d, "; ".join(sorted(r))) for (s, d), r in sorted(reasons.items())]


# ---------------------------------------------------------------- the table the CLI prints


TABLE_HEADERS = ("rank", "suite", "defense", "utility", "security", "security CI", "best attack", "recovered",
                 "protect s", "attack s", "flags")


def table_rows(scores: Scores, *, include_overall: bool = True) -> list[tuple[Any, ...]]:
    """One row per (suite, defense) and, first, one per defense overall; ranked rows first in each group."""
    groups: list[tuple[str, list[DefenseScore]]] = []
    if include_overall:
        groups.append(("overall", scores.overall))
    for suite in sorted({s.suite for s in scores.suites if s.suite}):
        groups.append((suite, [s for s in scores.suites if s.suite == suite]))
    rows = []
    for label, group in groups:
        for ds in sorted(group, key=lambda d: (d.rank is None, d.rank or 0, _rank_key(d))):
            rows.append((
                ds.rank if ds.rank is not None else "-", label, ds.defense, _fmt(ds.utility), _fmt(ds.security),
                _fmt_ci(ds.security_ci), f"{ds.best_attack}/{ds.best_merge}" if ds.best_attack else "-",
                _fmt(ds.best_recovered), _fmt(ds.protect_s, 1), _fmt(ds.attack_s, 1),
                ",".join(f.code for f in ds.flags) or "",
            ))
    return rows


def format_table(scores: Scores, *, include_overall: bool = True) -> str:
    """The leaderboard as a plain-text table (what `bench leaderboard` prints)."""
    from tabulate import tabulate

    rows = table_rows(scores, include_overall=include_overall)
    if not rows:
        return "no scored cells: run `bench run` first"
    return tabulate(rows, headers=TABLE_HEADERS, disable_numparse=True)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _fmt_ci(ci: tuple[float, float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"

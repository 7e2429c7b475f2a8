"""From victims to entries: a defense's suite score, its suite-level pair rows, the overall rows, and `score`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bench.scoring.bootstrap import percentile_ci, recovered_fraction
from bench.scoring.cells import index, maximum, mean, quiet_nanmean
from bench.scoring.ranking import assign_ranks, stability
from bench.scoring.results import (
    CI_LEVEL,
    N_BOOTSTRAP,
    REFERENCE,
    SCORING_VERSION,
    UTILITY_FLOOR,
    DefenseScore,
    Flag,
    PairScore,
    Scores,
    ScoringError,
    VictimScore,
)
from bench.scoring.victim import VictimDraws, VictimScorer, utility_undefined
from bench.store import CellRecord


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
    ix = index(records)
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
    inapplicable = {key for key, cells in by_entry.items() if key[1] != REFERENCE and structurally_na(cells)}
    groups = defaultdict(list, {k: v for k, v in groups.items() if (k[0], k[1]) not in inapplicable})
    victims, draws = [], {}
    for key in sorted(groups):
        vs, data = VictimScorer(ix, *key, groups[key], standard, n_bootstrap, ci_level, seed,
                                (missing or {}).get(key, ())).score()
        victims.append(vs)
        draws[key] = data
    suites, suite_draws = score_suites(victims, draws, utility_floor, ci_level, n_bootstrap)
    overall, overall_draws = score_overall(suites, suite_draws, ci_level)
    stab = {}
    for suite in sorted({s.suite for s in suites if s.suite is not None}):
        stab[suite] = stability([s for s in suites if s.suite == suite],
                                {d: v for (s, d), v in suite_draws.items() if s == suite})
    stab["*"] = stability(overall, {d: v for (_s, d), v in overall_draws.items()})
    config = {"scoring_version": SCORING_VERSION, "utility_floor": utility_floor, "n_bootstrap": n_bootstrap,
              "ci_level": ci_level, "seed": seed, "reference": REFERENCE,
              "recovered": "(V_P - V_∅) / (V_U - V_∅), clipped to [0, 1]; V_U and V_∅ under the attack's honest "
                           "counterpart (none for a data-free undo attack, merge-finetune with the same samples "
                           "for an attack that trains)",
              "worst_case": "best pair chosen on half the test examples, reported on the other half; the "
                            "protocol's breaks read the selection half only",
              "intervals": "paired percentile bootstrap over test examples and replicates; a draw with no "
                           "positive gain counts as recovered 0 at the lower end and 1 at the upper",
              "ranks": "rank bands: defenses share ranks unless a paired bootstrap separates their security "
                       "at the CI level; utility capped at 1 for ordering"}
    return Scores(victims, suites, overall, stab, not_applicable(records, suites), standard, config)


@dataclass(frozen=True)
class EntryDraws:
    """Bootstrap draws of one entry's security (NaN where some victim's draw is undefined: no evidence in a
    rank comparison), the same with undefined victim draws at security 0 (``lower``) and 1 (``upper``), whose
    percentiles bound the interval, and of its utility."""

    security: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    utility: np.ndarray

    def security_ci(self, level: float) -> tuple[float, float]:
        return (float(np.percentile(self.lower, 50 * (1 - level))),
                float(np.percentile(self.upper, 100 - 50 * (1 - level))))


def entry_draws(victim_security: np.ndarray, victim_utility: np.ndarray) -> EntryDraws:
    """Means over victims of per-victim draws [V, B]: an undefined victim draw (the held-out gain ≤ 0) counts
    as security 0 at the lower end and 1 at the upper (`bench.scoring.bootstrap`)."""
    return EntryDraws(victim_security.mean(axis=0), np.nan_to_num(victim_security, nan=0.0).mean(axis=0),
                      np.nan_to_num(victim_security, nan=1.0).mean(axis=0), quiet_nanmean(victim_utility, axis=0))


def informative_victims(victims: list[VictimScore]) -> dict[tuple[str, str, str], tuple[str, ...]]:
    """(suite, attack, merge) -> victims where that pair's gain is significant. The gain V_U − V_∅ comes from
    the counterpart's cells, shared by every defense, so the set is the same for every defense compared."""
    found: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for v in victims:
        for p in v.pairs:
            if p.informative:
                found[(v.suite, p.attack, p.merge)].add(v.victim)
    return {k: tuple(sorted(vs)) for k, vs in found.items()}


def entry_pairs(vss: list[VictimScore], covered: Mapping[tuple[str, str, str], tuple[str, ...]]) -> list[PairScore]:
    """Per (attack, merge): V_P, V_U, V_∅ as means over one stated set of victims (those where the pair's gain
    is significant, the same for every defense) and the recovered fraction of those means, so the four
    agree. A defense missing the pair on one of those victims (the protocol stopped earlier there) gets no
    value, with the reason, rather than a mean over other victims."""
    by_pair: dict[tuple[str, str], dict[str, PairScore]] = defaultdict(dict)
    for v in vss:
        for p in v.pairs:
            by_pair[(p.attack, p.merge)][v.victim] = p
    suite = vss[0].suite if vss else ""
    out = []
    for (a, m), per_victim in sorted(by_pair.items()):
        victims = covered.get((suite, a, m), ())
        ps = list(per_victim.values())
        common = dict(attack_s=mean(p.attack_s for p in ps), partner_effect=mean(p.partner_effect for p in ps),
                      counterpart=next((p.counterpart for p in ps if p.counterpart), ""), victims=victims)
        absent = [v for v in victims if per_victim.get(v) is None or per_victim[v].v_protected is None]
        if not victims or absent:
            reason = (f"not run on {', '.join(absent)} (the protocol stopped earlier there)" if absent else
                      "; ".join(sorted({p.na_reason for p in ps if p.na_reason})) or "no victim with a significant gain")
            out.append(PairScore(a, m, None, 0, reason, **common))
            continue
        chosen = [per_victim[v] for v in victims]
        vp, vu, vz = (mean(getattr(p, f) for p in chosen) for f in ("v_protected", "v_unprotected", "v_counterfactual"))
        hib = vss[0].higher_is_better
        out.append(PairScore(a, m, recovered_fraction(vp, vu, vz, hib), len(chosen), "", v_protected=vp,
                             v_unprotected=vu, v_counterfactual=vz, gain=mean(p.gain for p in chosen),
                             informative=True, **common))
    return out


def score_suites(victims: list[VictimScore], draws: Mapping[tuple[str, str, str], VictimDraws], floor: float,
                 ci_level: float, n_bootstrap: int) -> tuple[list[DefenseScore], dict[tuple[str, str], EntryDraws]]:
    groups: dict[tuple[str, str], list[VictimScore]] = defaultdict(list)
    for v in victims:
        groups[(v.suite, v.defense)].append(v)
    covered = informative_victims(victims)
    out, suite_draws = [], {}
    for (suite, defense), vss in sorted(groups.items()):
        scored = [v for v in vss if v.security is not None]
        sec = (np.stack([draws[(suite, defense, v.victim)].security_draws for v in scored]) if scored
               else np.full((1, n_bootstrap), np.nan))
        util = np.stack([draws[(suite, defense, v.victim)].utility_draws for v in vss])
        ds = DefenseScore(suite, defense, [v.victim for v in vss], suites=[suite])
        ds.security = mean(v.security for v in scored)
        ds.utility = mean(v.utility for v in vss)
        ed = entry_draws(sec, util)
        ds.security_ci = ed.security_ci(ci_level) if scored else None
        ds.utility_ci = percentile_ci(ed.utility, ci_level, utility_undefined(ed.utility))
        ds.pairs = entry_pairs(vss, covered)
        worst = max(scored, key=lambda v: (v.best_recovered or 0.0, v.victim), default=None)
        if worst is not None:
            ds.best_attack, ds.best_merge = worst.best_attack, worst.best_merge
            ds.best_recovered, ds.attack_s = worst.best_recovered, worst.attack_s
        ds.partner_effect = mean(v.partner_effect for v in vss)
        ds.protect_s = mean(v.protect_s for v in vss)
        ds.peak_rss_mb = maximum(v.peak_rss_mb for v in vss)
        ds.attacks_missing = sorted({a for v in vss for a in v.attacks_missing})
        if defense != REFERENCE:
            ds.uninformative_victims = sorted(v.victim for v in vss if v.pairs and not v.informative)
        ds.flags = merge_flags([f for v in vss for f in v.flags])
        if defense != REFERENCE and not scored:
            ds.flags = merge_flags([*ds.flags, Flag("no_security", "no victim carries a significant gain")])
        below = [f"{v.victim} {v.utility:.3f}" for v in vss if v.utility is not None and v.utility < floor]
        if below:
            ds.flags = merge_flags([*ds.flags, Flag("utility_below_floor",
                                                    f"utility below the floor {floor:g} on " + ", ".join(below))])
        out.append(ds)
        suite_draws[(suite, defense)] = ed
    for suite in sorted({d.suite for d in out}):
        assign_ranks([d for d in out if d.suite == suite],
                     {d: v.security for (s, d), v in suite_draws.items() if s == suite}, ci_level)
    return out, suite_draws


def merge_flags(flags: list[Flag]) -> list[Flag]:
    """One flag per code, its messages joined (each names its victim or pair)."""
    by_code: dict[str, list[str]] = defaultdict(list)
    for f in flags:
        if f.message not in by_code[f.code]:
            by_code[f.code].append(f.message)
    return [Flag(code, "; ".join(msgs)) for code, msgs in sorted(by_code.items())]


def score_overall(suites: list[DefenseScore], suite_draws: Mapping[tuple[str, str], EntryDraws],
                  ci_level: float) -> tuple[list[DefenseScore], dict]:
    """One row per defense over the suites it has entries on. Ranked only when every rankable defense covers
    the same suites: a mean over whichever suites a defense applies to is no common scale."""
    by_defense: dict[str, list[DefenseScore]] = defaultdict(list)
    for s in suites:
        by_defense[s.defense].append(s)
    out, draws = [], {}
    for defense, ss in sorted(by_defense.items()):
        scored = [s for s in ss if s.security is not None]
        parts = [suite_draws[(s.suite, defense)] for s in scored]
        util = quiet_nanmean(np.stack([suite_draws[(s.suite, defense)].utility for s in ss]), axis=0)
        nan = np.full_like(util, np.nan)
        ed = EntryDraws(*(np.mean([getattr(p, f) for p in parts], axis=0) if parts else nan
                          for f in ("security", "lower", "upper")), util)
        ds = DefenseScore(None, defense, sorted({v for s in ss for v in s.victims}), suites=[s.suite for s in ss])
        ds.security, ds.utility = mean(s.security for s in scored), mean(s.utility for s in ss)
        ds.security_ci = ed.security_ci(ci_level) if parts else None
        ds.utility_ci = percentile_ci(util, ci_level, utility_undefined(util))
        worst = [s for s in scored if s.best_recovered is not None]
        if worst:
            top = max(worst, key=lambda s: s.best_recovered)
            ds.best_attack, ds.best_merge, ds.best_recovered, ds.attack_s = (
                top.best_attack, top.best_merge, top.best_recovered, top.attack_s)
        ds.partner_effect = mean(s.partner_effect for s in ss)
        ds.protect_s = mean(s.protect_s for s in ss)
        ds.peak_rss_mb = maximum(s.peak_rss_mb for s in ss)
        ds.attacks_missing = sorted({a for s in ss for a in s.attacks_missing})
        ds.uninformative_victims = sorted({f"{s.suite}/{v}" for s in ss for v in s.uninformative_victims})
        ds.flags = merge_flags([f for s in ss for f in s.flags])
        out.append(ds)
        draws[(None, defense)] = ed
    assign_ranks(out, {d: v.security for (_s, d), v in draws.items()}, ci_level)
    coverage = {tuple(sorted(d.suites)) for d in out if d.rank is not None}
    if len(coverage) > 1:
        for d in out:
            if d.rank is not None:
                d.rank, d.rank_band = None, None
                d.unranked_reason = ("no cross-suite rank: the rankable defenses apply to different suites "
                                     f"({', '.join('/'.join(c) for c in sorted(coverage))}); see each suite's ranking")
    return out, draws


def structurally_na(cells: list[CellRecord]) -> bool:
    """Every cell N/A because the defense cannot act on the architecture (`bench.plan.NaKind`); cells stored
    before that kind existed say so in their reason, which the planner words one way."""
    def inapplicable(c: CellRecord) -> bool:
        kind = (c.provenance or {}).get("na_kind", "structural")
        return kind == "architecture" or (kind == "structural" and c.reason.endswith("which this architecture lacks"))

    return all(c.status == "na" and inapplicable(c) for c in cells)


def not_applicable(records: list[CellRecord], suites: list[DefenseScore]) -> list[tuple[str, str, str]]:
    scored = {(s.suite, s.defense) for s in suites}
    reasons: dict[tuple[str, str], set[str]] = defaultdict(set)
    for c in records:
        inapplicable = c.kind == "utility" and c.status == "na" and structurally_na([c])
        if (inapplicable or (c.kind == "merge" and c.filling == "protected" and c.status == "na")) \
                and (c.suite, c.defense) not in scored:
            reasons[(c.suite, c.defense)].add(c.reason)
    return [(s, d, "; ".join(sorted(r))) for (s, d), r in sorted(reasons.items())]

"""Entries, ranks and their stability on hand-built victims, draws and cells: a suite entry from its victims, the
overall row from the suites, the suite-level pair rows, rank bands, rank stability and the not-applicable list.
Every expected value is worked out here by hand (arithmetic in the comments) or by a naive numpy
re-implementation of the documented definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scored_cells import SUITE, baseline, merge_spec, pipeline, record, unique, utility_cell  # noqa: E402

from bench.scoring import ScoringError, score, separated
from bench.scoring.ranking import assign_ranks, rank_key, stability, unranked_reason
from bench.scoring.results import (
    REFERENCE,
    SCORING_VERSION,
    DefenseScore,
    Flag,
    PairScore,
    RankStability,
    VictimScore,
)
from bench.scoring.summaries import (
    EntryDraws,
    entry_draws,
    entry_pairs,
    merge_flags,
    not_applicable,
    score_overall,
    score_suites,
    structurally_na,
)
from bench.scoring.victim import VictimDraws
from bench.store import CellRecord

LACKS = "defense attn needs attention, which this architecture lacks"


# ---------------------------------------------------------------- naive re-implementations of the docstrings


def naive_interval(lower: np.ndarray, upper: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` interval: the lower tail of ``lower``, the upper tail of ``upper``."""
    tail = 100 * (1 - level) / 2
    return float(np.percentile(lower, tail)), float(np.percentile(upper, 100 - tail))


def naive_utility_interval(draws: np.ndarray, level: float) -> tuple[float, float]:
    """A NaN utility draw counts as 0 at the lower end and as the largest defined draw at the upper."""
    top = np.nanmax(draws)
    return naive_interval(np.where(np.isnan(draws), 0.0, draws), np.where(np.isnan(draws), top, draws), level)


def naive_stability(names: list[str], sec: list[list[float]], util: list[list[float]]) -> tuple:
    """Per draw: order by security (descending, NaN last), utility capped at 1 (descending, NaN last), name."""
    n, n_draws = len(names), len(sec[0])
    counts = [[0] * n for _ in range(n)]
    same = 0
    def key(i: int, b: int) -> tuple:
        s, u = sec[i][b], min(util[i][b], 1.0)
        return (math.inf if math.isnan(s) else -s, math.inf if math.isnan(u) else -u, names[i])

    for b in range(n_draws):
        order = sorted(range(n), key=lambda i: key(i, b))  # noqa: B023  (used at once, inside the loop)
        for r, i in enumerate(order):
            counts[i][r] += 1
        same += order == list(range(n))
    flips = [(names[i], names[i + 1], sum(sec[i + 1][b] > sec[i][b] for b in range(n_draws)) / n_draws)
             for i in range(n - 1)]
    return [[c / n_draws for c in row] for row in counts], flips, same / n_draws


def ranked(name: str, security: float, utility: float) -> DefenseScore:
    return DefenseScore("s", name, ["v"], utility=utility, security=security, rank=1)


def draws_of(sec: list[float], util: list[float]) -> EntryDraws:
    s = np.array(sec, dtype=float)
    return EntryDraws(s, np.nan_to_num(s, nan=0.0), np.nan_to_num(s, nan=1.0), np.array(util, dtype=float))


# ---------------------------------------------------------------- rank order, separation, bands


def test_rank_key_orders_by_security_then_capped_utility_then_name_and_an_unscored_entry_last():
    unscored = DefenseScore("s", "a-none", ["v"], utility=1.0, security=None)
    low = DefenseScore("s", "z-low", ["v"], utility=0.5, security=0.1)
    # same security: utility decides against the name order (y-hi 0.95 > b-lo 0.9, although "b" < "y")
    hi = DefenseScore("s", "y-hi", ["v"], utility=0.95, security=0.6)
    lo = DefenseScore("s", "b-lo", ["v"], utility=0.9, security=0.6)
    no_util = DefenseScore("s", "a-nou", ["v"], utility=None, security=0.6)  # no utility reads as 0, not as 1
    order = sorted([unscored, low, no_util, lo, hi], key=rank_key)
    assert [d.defense for d in order] == ["y-hi", "b-lo", "a-nou", "z-low", "a-none"]


def test_separation_needs_the_lower_tail_percentile_of_the_difference_strictly_above_zero():
    # 1001 draws: percentile p sits at index p/100 * 1000. At 75 % the 12.5 % tail is index 125 (exact in floats).
    zeros = np.zeros(1001)
    tie_at_tail = np.r_[np.zeros(126), np.ones(875)]  # sorted[125] = 0: the tail is 0, not above it
    assert not separated(tie_at_tail, zeros, 0.75)
    clear_at_tail = np.r_[np.zeros(125), np.ones(876)]  # sorted[125] = 1
    assert separated(clear_at_tail, zeros, 0.75)
    assert not separated(zeros, clear_at_tail, 0.75)  # the other way round the difference is ≤ 0
    # at 50 % the 25 % tail is index 250: 126 zeros no longer reach it
    assert separated(tie_at_tail, zeros, 0.5)
    # 130 undefined draws are no evidence (difference 0): index 125 is then a 0
    undefined = np.r_[np.full(130, np.nan), np.ones(871)]
    assert not separated(undefined, zeros, 0.75)
    assert separated(undefined, zeros, 0.5)  # index 250 is past the 130 undefined draws


def test_rank_bands_count_the_defenses_the_paired_draws_separate_on_each_side():
    rng = np.random.default_rng(11)
    base = rng.normal(0.5, 0.05, 400)
    noise = rng.normal(0.0, 0.2, 400)
    draws = {"top": base + 0.3, "mid": base + 0.15 + noise, "low": base, "low2": base - 0.001 * rng.random(400)}
    group = [ranked(n, float(d.mean()), 1.0) for n, d in draws.items()]
    group.append(DefenseScore("s", REFERENCE, ["v"], utility=1.0, security=None))
    assign_ranks(group, {**draws, REFERENCE: np.zeros(400)}, 0.95)

    def naive_sep(a: np.ndarray, b: np.ndarray) -> bool:  # the central 95 % interval of a − b excludes 0 (above)
        return bool(np.percentile(a - b, 2.5) > 0)

    names = list(draws)
    for d in group[:-1]:
        others = [o for o in names if o != d.defense]
        better = sum(naive_sep(draws[o], draws[d.defense]) for o in others)
        worse = sum(naive_sep(draws[d.defense], draws[o]) for o in others)
        assert d.rank_band == (1 + better, 4 - worse) and d.rank == 1 + better
    bands = {d.defense: d.rank_band for d in group}
    # top clears low and low2 (+0.3 in every draw) but not mid, whose noise (sd 0.2) hides it from everyone;
    # low2 is below low by a hair in every draw (a paired difference, so separated)
    assert bands == {"top": (1, 2), "mid": (1, 4), "low": (2, 3), "low2": (3, 4), REFERENCE: None}
    assert group[-1].rank is None


def test_unranked_reasons_name_the_reference_a_variant_the_blocking_flags_and_what_is_missing():
    ref = DefenseScore("s", REFERENCE, ["v"], utility=1.0, security=0.5)
    assert unranked_reason(ref).startswith("the reference row: an unprotected release")
    assert unranked_reason(ref).endswith("never ranked)")
    variant = unranked_reason(DefenseScore("s", "guard[k=2]", ["v"], utility=1.0, security=0.5))
    assert variant.startswith("a strength setting other than the default")
    assert variant.endswith("the defense is ranked at its default setting")
    flags = [Flag("failed_cells", "cell c1 failed"), Flag("uninformative_victims", "w: no gain"),
             Flag("incomplete", "realign never run")]
    blocked = DefenseScore("s", "g", ["v"], utility=1.0, security=0.5, flags=flags)
    # blocking flags only, each as "code: message", joined by "; "
    assert unranked_reason(blocked) == "failed_cells: cell c1 failed; incomplete: realign never run"
    no_security = DefenseScore("s", "g", ["v"], utility=1.0, security=None)
    assert unranked_reason(no_security) == "no informative victim: no security could be scored"
    no_utility = DefenseScore("s", "g", ["v"], utility=None, security=0.5)
    assert unranked_reason(no_utility) == "no utility measured"
    assert unranked_reason(DefenseScore("s", "g", ["v"], utility=0.95, security=0.5)) == ""


# ---------------------------------------------------------------- rank stability


def test_stability_with_three_defenses_counts_ranks_adjacent_flips_and_whole_orders():
    sec = {"a": [0.9, 0.5, 0.9, 0.7], "b": [0.6, 0.6, 0.6, 0.7], "c": [0.3, 0.3, 0.7, 0.2]}
    draws = {k: draws_of(v, [1.0] * 4) for k, v in sec.items()}
    st = stability([ranked("c", 0.3, 1.0), ranked("a", 0.9, 1.0), ranked("b", 0.6, 1.0)], draws)
    # by hand: draw 0 a>b>c; draw 1 b>a>c; draw 2 a>c>b; draw 3 a=b (utility ties, the name puts a first)>c
    assert st.defenses == ["a", "b", "c"]
    assert st.stable_fraction == 0.5  # draws 0 and 3
    assert st.rank_probability == [[0.75, 0.25, 0.0], [0.25, 0.5, 0.25], [0.0, 0.25, 0.75]]
    # b strictly above a in draw 1 only (draw 3 is a tie); c strictly above b in draw 2 only
    assert st.pairwise_flip == [("a", "b", 0.25), ("b", "c", 0.25)]
    want = naive_stability(["a", "b", "c"], [sec["a"], sec["b"], sec["c"]], [[1.0] * 4] * 3)
    assert (st.rank_probability, st.pairwise_flip, st.stable_fraction) == want


def test_stability_breaks_security_ties_by_the_drawn_utility_higher_first():
    sec = [0.5, 0.5, 0.5]
    draws = {"b": draws_of(sec, [0.97, 0.9, 0.97]), "a": draws_of(sec, [0.95, 0.95, 0.95])}
    st = stability([ranked("a", 0.5, 0.95), ranked("b", 0.5, 0.97)], draws)
    # point order b (0.97) before a (0.95); draw 1 reverses it (0.9 < 0.95)
    assert st.defenses == ["b", "a"]
    assert st.stable_fraction == pytest.approx(2 / 3)
    np.testing.assert_allclose(st.rank_probability, [[2 / 3, 1 / 3], [1 / 3, 2 / 3]])


def test_stability_caps_drawn_utility_at_one_so_the_name_decides_above_it():
    sec = [0.4, 0.4]
    draws = {"a": draws_of(sec, [1.0, 1.0]), "b": draws_of(sec, [1.05, 1.2])}
    st = stability([ranked("b", 0.4, 1.05), ranked("a", 0.4, 1.0)], draws)
    # 1.05 and 1.2 count as 1: every draw ties with a, and "a" < "b"
    assert st.defenses == ["a", "b"] and st.stable_fraction == 1.0
    assert st.rank_probability == [[1.0, 0.0], [0.0, 1.0]]


def test_stability_puts_a_defense_without_a_drawn_security_last_even_against_security_zero():
    draws = {"p": draws_of([np.nan, 0.5], [1.0, 1.0]), "q": draws_of([0.0, 0.3], [0.9, 0.9])}
    st = stability([ranked("p", 0.5, 1.0), ranked("q", 0.4, 0.9)], draws)
    # draw 0: p undefined sorts after q's 0 (its higher utility does not lift it); draw 1: p 0.5 > q 0.3
    assert st.defenses == ["p", "q"] and st.stable_fraction == 0.5
    assert st.rank_probability == [[0.5, 0.5], [0.5, 0.5]]
    assert st.pairwise_flip == [("p", "q", 0.0)]  # draw 0: 0 > NaN is no flip; draw 1: 0.3 < 0.5
    want = naive_stability(["p", "q"], [[np.nan, 0.5], [0.0, 0.3]], [[1.0, 1.0], [0.9, 0.9]])
    assert (st.rank_probability, st.pairwise_flip, st.stable_fraction) == want


def test_stability_puts_a_defense_without_a_drawn_utility_last_even_against_utility_zero():
    draws = {"x": draws_of([0.5, 0.5], [0.0, 0.5]), "a": draws_of([0.5, 0.5], [np.nan, 0.2])}
    st = stability([ranked("a", 0.5, 0.2), ranked("x", 0.5, 0.5)], draws)
    # point order x (0.5) > a (0.2); draw 0: x's 0 beats a's undefined utility although "a" < "x"
    assert st.defenses == ["x", "a"] and st.stable_fraction == 1.0
    assert st.rank_probability == [[1.0, 0.0], [0.0, 1.0]]


def test_stability_of_a_group_without_ranked_entries_is_empty_and_trivially_stable():
    group = [DefenseScore("s", "g", ["v"], utility=1.0, security=None), DefenseScore("s", REFERENCE, ["v"])]
    assert stability(group, {}) == RankStability([], [], [], 1.0)


# ---------------------------------------------------------------- entry draws and their interval


def test_entry_draws_average_over_victims_with_undefined_draws_at_zero_and_one():
    sec = np.array([[0.2, np.nan, 0.6], [0.4, 0.8, np.nan]])  # [victim, draw]
    util = np.array([[0.9, np.nan, 1.0], [0.7, np.nan, np.nan]])
    ed = entry_draws(sec, util)
    np.testing.assert_allclose(ed.security, [0.3, np.nan, np.nan])  # (0.2 + 0.4) / 2; NaN where any is NaN
    np.testing.assert_allclose(ed.lower, [0.3, 0.4, 0.3])  # (0 + 0.8) / 2, (0.6 + 0) / 2
    np.testing.assert_allclose(ed.upper, [0.3, 0.9, 0.8])  # (1 + 0.8) / 2, (0.6 + 1) / 2
    np.testing.assert_allclose(ed.utility, [0.8, np.nan, 1.0])  # NaN victims ignored; all-NaN stays NaN


def test_entry_interval_reads_the_lower_tail_of_lower_and_the_upper_tail_of_upper():
    lower = np.linspace(0.0, 1.0, 1001)  # percentile p of it is p / 100
    upper = np.linspace(1.0, 2.0, 1001)  # ... and 1 + p / 100
    ed = EntryDraws(np.full(1001, np.nan), lower, upper, np.ones(1001))
    assert ed.security_ci(0.95) == pytest.approx((0.025, 1.975))
    assert ed.security_ci(0.8) == pytest.approx((0.1, 1.9))


# ---------------------------------------------------------------- suite-level pair rows


def _victim(victim: str, pairs: list[PairScore], hib: bool = False) -> VictimScore:
    return VictimScore("s", "g", victim, "perplexity", hib, None, None, pairs=pairs)


def test_entry_pair_rows_average_the_covered_victims_in_the_metrics_direction():
    # perplexity (lower is better); gains are stored in the metric's direction (positive: the victim helps)
    v = _victim("v", [PairScore("aa", "ta", 0.25, 1, attack_s=1.0, partner_effect=0.2, v_protected=18.0,
                                v_unprotected=12.0, v_counterfactual=20.0, gain=8.0, informative=True),
                      PairScore("ba", "ta", 0.5, 1, attack_s=4.0, v_protected=15.0, v_unprotected=10.0,
                                v_counterfactual=20.0, gain=10.0, informative=True, counterpart="none")])
    w = _victim("w", [PairScore("aa", "ta", 0.5, 1, attack_s=3.0, v_protected=30.0, v_unprotected=20.0,
                                v_counterfactual=40.0, gain=20.0, informative=True, counterpart="none")])
    x = _victim("x", [PairScore("aa", "ta", None, 1, "uninformative: x", attack_s=5.0, partner_effect=0.4,
                                v_protected=5.0, v_unprotected=6.0, v_counterfactual=5.0, gain=-1.0,
                                informative=False)])
    covered = {("s", "aa", "ta"): ("v", "w"), ("s", "ba", "ta"): ("v",)}
    aa, ba = entry_pairs([v, w, x], covered)
    # V_P (18 + 30) / 2 = 24, V_U (12 + 20) / 2 = 16, V_∅ (20 + 40) / 2 = 30: gain 30 − 16 = 14 (lower is
    # better), recovered (30 − 24) / 14 = 3/7; read as higher-is-better the gain would be negative (no value)
    assert (aa.attack, aa.merge, aa.n, aa.na_reason, aa.victims) == ("aa", "ta", 2, "", ("v", "w"))
    assert (aa.v_protected, aa.v_unprotected, aa.v_counterfactual) == pytest.approx((24.0, 16.0, 30.0))
    assert aa.recovered == pytest.approx(3 / 7)
    assert aa.gain == pytest.approx(14.0) and aa.informative is True  # mean of 8 and 20
    # cost and partner effect: every victim that ran the pair (x too): (1 + 3 + 5) / 3, (0.2 + 0.4) / 2
    assert aa.attack_s == pytest.approx(3.0) and aa.partner_effect == pytest.approx(0.3)
    assert aa.counterpart == "none"  # the first non-empty one (v's is empty)
    # 15 vs ∅ 20 and U 10: (20 − 15) / (20 − 10) = 0.5
    assert (ba.recovered, ba.n, ba.na_reason, ba.attack_s) == (pytest.approx(0.5), 1, "", 4.0)


def test_entry_pair_rows_without_a_value_say_why_and_never_end_the_list():
    v = _victim("v", [PairScore("ab", "ta", None, 1, "uninformative: r1", attack_s=2.0),
                      PairScore("ac", "ta", None, 1, "", attack_s=1.0),
                      PairScore("ad", "ta", 0.5, 1, v_protected=15.0, v_unprotected=10.0, v_counterfactual=20.0,
                                gain=10.0, informative=True),
                      PairScore("ba", "ta", 0.5, 1, v_protected=15.0, v_unprotected=10.0, v_counterfactual=20.0,
                                gain=10.0, informative=True)])
    w = _victim("w", [PairScore("ab", "ta", None, 1, "uninformative: r2", attack_s=4.0),
                      PairScore("ad", "ta", None, 0, "a reference cell is missing")])  # ran, no value: absent
    covered = {("s", "ad", "ta"): ("v", "w", "x"), ("s", "ba", "ta"): ("v",)}
    rows = {(p.attack, p.merge): p for p in entry_pairs([v, w], covered)}
    assert list(rows) == [("ab", "ta"), ("ac", "ta"), ("ad", "ta"), ("ba", "ta")]
    ab, ac, ad, ba = rows.values()
    assert (ab.attack, ab.merge, ab.recovered, ab.n) == ("ab", "ta", None, 0)
    assert ab.na_reason == "uninformative: r1; uninformative: r2"  # distinct reasons, sorted
    assert ab.counterpart == "" and ab.attack_s == pytest.approx(3.0) and ab.victims == ()
    assert ac.na_reason == "no victim with a significant gain" and ac.n == 0 and ac.counterpart == ""
    # w ran it without a value, x never ran it: both named, no mean over v alone
    assert ad.na_reason == "not run on w, x (the protocol stopped earlier there)"
    assert ad.recovered is None and ad.v_protected is None and ad.victims == ("v", "w", "x")
    assert ba.recovered == pytest.approx(0.5) and ba.informative is True  # after three rows without a value
    assert entry_pairs([], covered) == []


# ---------------------------------------------------------------- a suite entry from its victims


def _scored(victim: str, defense: str, *, security: float | None, utility: float | None, best: str | None = None,
            attack_s: float | None = None, partner: float | None = None, protect: float | None = None,
            rss: float | None = None, flags: list[Flag] | None = None, missing: list[str] | None = None) -> VictimScore:
    informative = security is not None
    pairs = [PairScore("x", "ta", (1 - security) if informative else None, 1, "" if informative else "uninformative",
                       v_protected=0.7, v_unprotected=0.8, v_counterfactual=0.6, gain=0.2, informative=informative)]
    return VictimScore("s", defense, victim, "accuracy", True, 0.5, 0.9, utility=utility, security=security,
                       best_attack=best, best_merge="ta" if best else None,
                       best_recovered=None if security is None else 1 - security, informative=informative,
                       pairs=pairs, partner_effect=partner, protect_s=protect, attack_s=attack_s, peak_rss_mb=rss,
                       attacks_missing=missing or [], flags=flags or [])


def test_suite_entry_averages_its_victims_and_names_the_worst_and_the_floor_breaches():
    nan = np.nan
    victims = [
        _scored("a", "g", security=0.6, utility=0.95, best="xa", attack_s=2.0, partner=-0.1, protect=4.0, rss=100.0,
                flags=[Flag("mixed_experts", "a: m1")], missing=["unmask"]),
        _scored("b", "g", security=1.0, utility=0.9, best="xb", attack_s=5.0, partner=0.3, protect=6.0, rss=300.0,
                flags=[Flag("mixed_experts", "b: m2")], missing=["realign", "unmask"]),
        _scored("c", "g", security=None, utility=0.8),
        _scored("a", "h", security=None, utility=0.5),
        _scored("b", "h", security=None, utility=0.7),
    ]
    sec = {"a": [0.5, 0.6, 0.7, nan, 0.6], "b": [1.0, 0.9, nan, 1.0, 0.8], "c": [nan] * 5}
    util = {"a": [0.9, 1.0, nan, 0.95, 0.92], "b": [0.85, nan, nan, 0.9, 0.95], "c": [0.8, 0.8, nan, 0.8, 0.8]}
    draws = {("s", "g", k): VictimDraws(np.array(sec[k]), np.array(util[k])) for k in sec}
    draws.update({("s", "h", k): VictimDraws(np.full(5, nan), np.array([0.6, 0.5, 0.4, 0.7, nan]))
                  for k in ("a", "b")})
    out, ed = score_suites(victims, draws, 0.9, 0.9, 5)
    g, h = out
    assert (g.suite, g.defense, g.victims, g.suites) == ("s", "g", ["a", "b", "c"], ["s"])
    assert g.security == pytest.approx(0.8)  # (0.6 + 1.0) / 2: c has no security
    assert g.utility == pytest.approx((0.95 + 0.9 + 0.8) / 3)
    # the worst victim: a recovers 0.4, b 0 (a falsy 0 must still count as 0, not lose or win by its name)
    assert (g.best_attack, g.best_merge, g.best_recovered, g.attack_s) == ("xa", "ta", pytest.approx(0.4), 2.0)
    assert (g.partner_effect, g.protect_s, g.peak_rss_mb) == (pytest.approx(0.1), 5.0, 300.0)
    assert g.attacks_missing == ["realign", "unmask"] and g.uninformative_victims == ["c"]
    # utility exactly at the floor (b, 0.9) is not below it
    assert g.flags == [Flag("mixed_experts", "a: m1; b: m2"),
                       Flag("utility_below_floor", "utility below the floor 0.9 on c 0.800")]
    # interval: scored victims a and b, undefined draws at 0 (lower) and 1 (upper), 5 % tails at level 0.9
    lower = np.array([0.75, 0.75, 0.35, 0.5, 0.7])  # (0.5 + 1) / 2, (0.6 + 0.9) / 2, (0.7 + 0) / 2, ...
    upper = np.array([0.75, 0.75, 0.85, 1.0, 0.7])
    assert g.security_ci == pytest.approx(naive_interval(lower, upper, 0.9))
    u = np.array([0.85, 0.9, nan, (0.95 + 0.9 + 0.8) / 3, (0.92 + 0.95 + 0.8) / 3])  # nan-mean over a, b, c
    np.testing.assert_allclose(ed[("s", "g")].utility, u)
    assert g.utility_ci == pytest.approx(naive_utility_interval(u, 0.9))
    np.testing.assert_allclose(ed[("s", "g")].lower, lower)
    # h: no scored victim at all
    assert h.security is None and h.security_ci is None and h.best_attack is None
    assert h.flags == [Flag("no_security", "no victim carries a significant gain"),
                       Flag("utility_below_floor", "utility below the floor 0.9 on a 0.500, b 0.700")]
    assert h.utility_ci == pytest.approx(naive_utility_interval(np.array([0.6, 0.5, 0.4, 0.7, nan]), 0.9))
    assert g.rank is None and "utility_below_floor" in g.unranked_reason


def test_suite_entries_of_clean_defenses_are_ranked_by_their_paired_draws():
    rng = np.random.default_rng(4)
    victims, draws = [], {}
    shift = {"p": 0.0, "q": -0.4}
    for d in ("p", "q"):
        for v in ("a", "b"):
            victims.append(_scored(v, d, security=0.7 + shift[d], utility=0.95))
            draws[("s", d, v)] = VictimDraws(0.7 + shift[d] + 0.01 * rng.standard_normal(50), np.full(50, 0.95))
    out, _ed = score_suites(victims, draws, 0.9, 0.95, 50)
    assert [(d.defense, d.rank, d.rank_band) for d in out] == [("p", 1, (1, 1)), ("q", 2, (2, 2))]


# ---------------------------------------------------------------- the overall row from the suites


def _suite_entry(suite: str, defense: str, *, security: float | None, utility: float, best: tuple | None = None,
                 partner: float | None = None, protect: float | None = None, rss: float | None = None,
                 victims: list[str] | None = None) -> DefenseScore:
    ds = DefenseScore(suite, defense, victims or ["a"], utility=utility, security=security, suites=[suite],
                      partner_effect=partner, protect_s=protect, peak_rss_mb=rss)
    if best:
        ds.best_attack, ds.best_merge, ds.best_recovered, ds.attack_s = best
    return ds


def test_overall_row_averages_the_suites_draw_by_draw():
    nan = np.nan
    suites = [
        _suite_entry("s1", "g", security=0.6, utility=0.95, best=("x", "ta", 0.4, 2.0), partner=0.1, protect=4.0,
                     rss=100.0, victims=["a", "b"]),
        _suite_entry("s2", "g", security=0.8, utility=0.85, best=("y", "ties", 0.2, 7.0), partner=0.3, protect=6.0,
                     rss=300.0, victims=["a", "c"]),
        _suite_entry("s1", "h", security=None, utility=0.9, protect=1.0, rss=50.0),
    ]
    suite_draws = {("s1", "g"): draws_of([0.5, 0.6, nan, 0.7], [0.9, 1.0, nan, 0.95]),
                   ("s2", "g"): draws_of([0.8, 0.9, 0.7, nan], [0.8, nan, nan, 0.9]),
                   ("s1", "h"): draws_of([nan] * 4, [0.9, 0.9, 0.9, nan])}
    out, draws = score_overall(suites, suite_draws, 0.8)
    g, h = out
    assert (g.suite, g.defense, g.victims, g.suites) == (None, "g", ["a", "b", "c"], ["s1", "s2"])
    assert (g.security, g.utility) == (pytest.approx(0.7), pytest.approx(0.9))
    assert (g.best_attack, g.best_merge, g.best_recovered, g.attack_s) == ("x", "ta", 0.4, 2.0)  # s1 recovers more
    assert (g.partner_effect, g.protect_s, g.peak_rss_mb) == (pytest.approx(0.2), 5.0, 300.0)
    gd = draws[(None, "g")]
    np.testing.assert_allclose(gd.security, [0.65, 0.75, nan, nan])  # (0.5 + 0.8) / 2, (0.6 + 0.9) / 2
    lower, upper = np.array([0.65, 0.75, 0.35, 0.35]), np.array([0.65, 0.75, 0.85, 0.85])
    np.testing.assert_allclose(gd.lower, lower)
    np.testing.assert_allclose(gd.upper, upper)
    u = np.array([0.85, 1.0, nan, 0.925])  # nan-mean over the two suites
    np.testing.assert_allclose(gd.utility, u)
    assert g.security_ci == pytest.approx(naive_interval(lower, upper, 0.8))
    assert g.utility_ci == pytest.approx(naive_utility_interval(u, 0.8))
    # the rankable defenses (g alone: h has no security) cover one set of suites: g keeps its rank
    assert (g.rank, g.rank_band, g.unranked_reason) == (1, (1, 1), "")
    # h has no scored suite: NaN draws per draw (not a single NaN), no interval
    hd = draws[(None, "h")]
    assert hd.security.shape == (4,) and np.isnan(hd.security).all() and np.isnan(hd.upper).all()
    assert h.security is None and h.security_ci is None and h.best_attack is None
    assert h.utility_ci == pytest.approx(naive_utility_interval(np.array([0.9, 0.9, 0.9, nan]), 0.8))
    assert h.rank is None and h.partner_effect is None and h.peak_rss_mb == 50.0


def test_overall_row_refuses_a_cross_suite_rank_and_names_the_suite_sets():
    suites = [_suite_entry("s1", "g", security=0.6, utility=0.95), _suite_entry("s2", "g", security=0.8, utility=0.95),
              _suite_entry("s1", "k", security=0.5, utility=0.95)]
    suite_draws = {k: draws_of([0.6, 0.7], [0.95, 0.95]) for k in (("s1", "g"), ("s2", "g"), ("s1", "k"))}
    out, _draws = score_overall(suites, suite_draws, 0.95)
    want = "no cross-suite rank: the rankable defenses apply to different suites (s1, s1/s2); see each suite's ranking"
    assert [(d.defense, d.rank, d.rank_band, d.unranked_reason) for d in out] == [("g", None, None, want),
                                                                                   ("k", None, None, want)]


def test_flags_merge_per_code_with_each_message_once():
    flags = [Flag("b", "n"), Flag("a", "m1"), Flag("a", "m2"), Flag("a", "m1")]
    assert merge_flags(flags) == [Flag("a", "m1; m2"), Flag("b", "n")]


# ---------------------------------------------------------------- not applicable


def _cell(kind: str, defense: str, status: str, reason: str = "", provenance: dict | None = None,
          filling: str = "protected", attack: str = "none") -> CellRecord:
    return CellRecord(f"{kind}-{defense}-{filling}-{attack}-{reason}", kind, "toy", "v", ("p",), defense, attack, "ta",
                      0, status, reason, {}, provenance, filling=filling)


def test_structurally_na_reads_the_na_kind_and_falls_back_on_the_planners_wording():
    assert structurally_na([_cell("merge", "g", "na", "anything", {"na_kind": "architecture"})])
    assert structurally_na([_cell("merge", "g", "na", LACKS, {"na_kind": "structural"})])
    assert structurally_na([_cell("merge", "g", "na", LACKS, {})])  # cells stored before na_kind: the wording
    assert structurally_na([_cell("merge", "g", "na", LACKS, None)])
    assert not structurally_na([_cell("merge", "g", "na", "a structure θ_pre lacks", {"na_kind": "structural"})])
    assert not structurally_na([_cell("merge", "g", "na", LACKS, {"na_kind": "budget"})])
    assert not structurally_na([_cell("merge", "g", "ok", LACKS, {"na_kind": "architecture"})])
    assert not structurally_na([_cell("merge", "g", "na", "x", {"na_kind": "architecture"}),
                                _cell("merge", "g", "ok", "", {}, attack="realign")])


def test_not_applicable_lists_unscored_defenses_whose_utility_or_protected_merges_are_na():
    records = [
        _cell("utility", "attn", "na", LACKS, {"na_kind": "architecture"}),
        _cell("merge", "barrier", "na", "r2", {"na_kind": "structural"}),
        _cell("merge", "barrier", "na", "r1", {"na_kind": "structural"}, attack="realign"),
        _cell("merge", "counterfactual", "na", LACKS, {"na_kind": "architecture"}, filling="counterfactual"),
        _cell("merge", "solo", "ok"),
        _cell("merge", "scored", "na", LACKS, {"na_kind": "architecture"}),
        _cell("utility", "budgety", "na", "needs more", {"na_kind": "budget"}),
        _cell("utility", "fine", "ok", "", {}),
    ]
    suites = [DefenseScore("toy", "scored", ["v"])]
    assert not_applicable(records, suites) == [("toy", "attn", LACKS), ("toy", "barrier", "r1; r2")]


# ---------------------------------------------------------------- score(): settings, missing steps, stability keys


def _records() -> list[CellRecord]:
    return unique([baseline(), utility_cell("guard", 0.88),
                   *pipeline("guard", "none", "ta", p=0.65, u=0.8, z=0.6),
                   *pipeline("guard", "realign", "ta", p=0.76, u=0.8, z=0.6)])


def test_score_accepts_one_draw_and_refuses_a_level_of_zero_or_one():
    s = score(_records(), attacks=["none", "realign"], n_bootstrap=1)
    assert s.entry(SUITE, "guard").security is not None
    for level in (0.0, 1.0):
        with pytest.raises(ScoringError, match="ci_level"):
            score(_records(), attacks=["none"], ci_level=level)


def test_protocol_steps_never_run_make_that_victims_entry_incomplete():
    missing = {(SUITE, "guard", "v"): ["realign@seed1"], (SUITE, "other", "v"): ["x"]}
    entry = score(_records(), attacks=["none", "realign"], n_bootstrap=20, missing=missing).entry(SUITE, "guard")
    assert entry.attacks_missing == ["realign@seed1"] and entry.has_flag("incomplete") and entry.rank is None


def test_scores_carry_a_stability_per_suite_and_overall_and_the_settings_used():
    s = score(_records(), attacks=["none", "realign"], n_bootstrap=20, ci_level=0.9, seed=3, utility_floor=0.8)
    assert set(s.stability) == {SUITE, "*"}
    assert s.stability[SUITE].defenses == ["guard"] and s.stability["*"].defenses == ["guard"]
    assert set(s.config) == {"scoring_version", "utility_floor", "n_bootstrap", "ci_level", "seed", "reference",
                             "recovered", "worst_case", "intervals", "ranks"}
    assert {k: s.config[k] for k in ("scoring_version", "utility_floor", "n_bootstrap", "ci_level", "seed",
                                     "reference")} == {"scoring_version": SCORING_VERSION, "utility_floor": 0.8,
                                                       "n_bootstrap": 20, "ci_level": 0.9, "seed": 3,
                                                       "reference": REFERENCE}
    with pytest.raises(KeyError, match="'absent'.*'toy'"):
        s.entry(SUITE, "absent")


def test_a_defense_na_on_the_architecture_everywhere_is_no_entry_but_one_na_for_a_pipeline_is():
    na = {"timings": {}, "na_kind": "architecture"}
    cells = [record(merge_spec("v", ("p",), 0, "attn", a, "ta"), [], status="na", reason=LACKS, provenance=na)
             for a in ("none", "realign")]
    s = score(unique([*_records(), *cells]), attacks=["none", "realign"], n_bootstrap=10)
    assert {d.defense for d in s.suites} == {"guard", REFERENCE}
    assert s.not_applicable == [(SUITE, "attn", LACKS)]

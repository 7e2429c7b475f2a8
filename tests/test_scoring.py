"""Scores on hand-built cells with answers worked out by hand: counterfactual references matched by
full spec, per-example intervals, the winner's-curse correction, and the ranking rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scored_cells import (  # noqa: E402  (tests/ is on sys.path)
    SUITE,
    N,
    baseline,
    merge_spec,
    metric,
    outcomes,
    pipeline,
    record,
    unique,
    utility_cell,
)

from bench.outcomes import encode
from bench.plan import counterpart_spec, spec_id
from bench.report import format_table
from bench.scoring import (
    PairOutcomes,
    ScoringError,
    bootstrap_counts,
    pair_statistics,
    recovered_fraction,
    score,
    select_worst_pair,
    selection_split,
    utility_ratio,
)
from bench.store import CellRecord, Metric

ATTACKS = ["none", "realign"]


def worked_example() -> list[CellRecord]:
    """θ_pre 0.5, expert 0.9. Counterfactual floor 0.6 everywhere; unprotected merges 0.8 (ta), 0.7 (ties).

    Defense 'guard': none/ta 0.65 -> 0.25, none/ties 0.6 -> 0, realign/ta 0.76 -> 0.8, realign/ties 0.65 -> 0.5.
    """
    return unique([
        baseline(), utility_cell("guard", 0.88),
        *pipeline("guard", "none", "ta", p=0.65, u=0.8, z=0.6),
        *pipeline("guard", "none", "ties", p=0.6, u=0.7, z=0.6),
        *pipeline("guard", "realign", "ta", p=0.76, u=0.8, z=0.6, timings={"prepare": 2.0, "finish": 1.0}),
        *pipeline("guard", "realign", "ties", p=0.65, u=0.7, z=0.6),
    ])


# ---------------------------------------------------------------- the counterfactual ratio


def test_recovered_is_read_against_the_counterfactual_not_theta_pre():
    s = score(worked_example(), attacks=ATTACKS, n_bootstrap=200)
    (v,) = s.victim_scores(SUITE, "guard")
    pairs = {(p.attack, p.merge): p for p in v.pairs}
    assert pairs[("none", "ta")].recovered == pytest.approx(0.05 / 0.2)
    assert pairs[("none", "ties")].recovered == pytest.approx(0.0)
    assert pairs[("realign", "ta")].recovered == pytest.approx(0.8)
    assert pairs[("realign", "ties")].recovered == pytest.approx(0.5)
    # Against θ_pre (0.5) as the floor, realign/ta would have read (0.76 − 0.5)/(0.8 − 0.5) = 0.87.
    a = pairs[("realign", "ta")]
    assert (a.v_protected, a.v_unprotected, a.v_counterfactual) == pytest.approx((0.76, 0.8, 0.6))
    assert a.gain == pytest.approx(0.2) and a.informative and a.examples == N
    assert a.gain_ci[0] > 0 and a.recovered_ci[0] <= 0.8 <= a.recovered_ci[1]
    assert a.counterpart == "none"  # read against the plain merge's U and ∅ cells
    assert (v.best_attack, v.best_merge) == ("realign", "ta")
    assert v.security_ci[0] < v.security < v.security_ci[1]  # one seed, yet a real interval
    assert v.attack_s == pytest.approx(3.0)
    assert v.utility == pytest.approx(0.88 / 0.9) and v.utility_ci[0] < v.utility < v.utility_ci[1]
    assert (v.acc_pre, v.acc_ft) == (0.5, 0.9)


def test_finetuning_attack_that_only_matches_its_own_counterfactual_recovers_nothing():
    # merge-finetune lifts every filling: P 0.72 equals ∅ 0.72 (what the attacker's own labels give),
    # U 0.80. The old θ_pre floor (0.5) would have credited the attack with (0.72 − 0.5)/(0.8 − 0.5) = 0.73.
    records = unique([baseline(), utility_cell("g", 0.88),
                      *pipeline("g", "merge-finetune", "ta", p=0.72, u=0.80, z=0.72)])
    (v,) = score(records, attacks=["merge-finetune"], n_bootstrap=200).victim_scores(SUITE, "g")
    (pair,) = v.pairs
    assert pair.recovered == 0.0 and pair.informative
    assert v.security == pytest.approx(1.0)


def test_recovered_formula_clips_and_flips_sign_for_lower_is_better():
    assert recovered_fraction(0.95, 0.8, 0.6) == 1.0
    assert recovered_fraction(0.3, 0.8, 0.6) == 0.0
    assert recovered_fraction(0.7, 0.8, 0.6) == pytest.approx(0.5)
    assert recovered_fraction(0.7, 0.6, 0.6) is None  # nothing to recover: never divided
    # perplexity: counterfactual 20, unprotected 12 (a gain of 8), protected 18 (2 of it)
    assert recovered_fraction(18.0, 12.0, 20.0, higher_is_better=False) == pytest.approx(0.25)
    assert utility_ratio(11.0, 10.0, higher_is_better=False) == pytest.approx(10 / 11)


def test_pair_whose_gain_interval_includes_zero_is_uninformative_not_divided():
    # U 0.61 vs ∅ 0.60 on 400 examples: a gain of 0.01, not significant.
    records = unique([baseline(), utility_cell("g", 0.88),
                      *pipeline("g", "none", "ta", p=0.9, u=0.61, z=0.60, partners=("p",)),
                      *pipeline("g", "realign", "ties", p=0.7, u=0.8, z=0.6)])  # its own references: none/ties
    # make the weak pair's U and ∅ independent (not nested), as real fillings are
    for i, r in enumerate(records):
        if r.kind == "merge" and r.attack == "none" and r.merge == "ta" and r.filling == "unprotected":
            v = np.random.default_rng(0).permutation(outcomes(0.61))
            records[i] = record(r.spec, [Metric("merged", "v", "accuracy", float(v.mean()), True, encode(v))])
    s = score(records, attacks=ATTACKS, n_bootstrap=300)
    (v,) = s.victim_scores(SUITE, "g")
    weak = next(p for p in v.pairs if p.attack == "none")
    assert weak.informative is False and weak.recovered is None and "uninformative" in weak.na_reason
    assert weak.gain_ci[0] <= 0 <= weak.gain_ci[1]
    assert (v.best_attack, v.best_merge) == ("realign", "ties")  # security rests on the informative pair only
    # the victim is informative (another pair is): no victim-level flag, the pair says why it is not scored
    assert v.flags == [] and s.entry(SUITE, "g").uninformative_victims == []


def test_victim_without_any_informative_pair_has_no_security_and_the_entry_is_unranked():
    records = unique([baseline(), utility_cell("g", 0.88), *pipeline("g", "none", "ta", p=0.6, u=0.6, z=0.6)])
    s = score(records, attacks=["none"], n_bootstrap=50)
    entry = s.entry(SUITE, "g")
    assert entry.security is None and entry.rank is None
    assert entry.uninformative_victims == ["v"] and entry.has_flag("no_security")


# ---------------------------------------------------------------- full-spec matching


def test_cells_with_different_params_never_pair():
    # the protected merge used λ = 0.5; the only references were merged with λ = 0.3
    protected = pipeline("g", "none", "ta", p=0.7, u=0.8, z=0.6, merge_params={"lambda_": 0.5}, with_refs=False)
    refs = pipeline("none-such", "none", "ta", p=0.0, u=0.8, z=0.6, merge_params={"lambda_": 0.3})[1:]
    s = score(unique([baseline(), utility_cell("g", 0.88), *protected, *refs]), attacks=["none"], n_bootstrap=20)
    (v,) = s.victim_scores(SUITE, "g")
    (pair,) = v.pairs
    assert pair.recovered is None and "missing" in pair.na_reason
    entry = s.entry(SUITE, "g")
    assert entry.has_flag("incomplete") and entry.rank is None
    assert "never run" in entry.unranked_reason


def test_counterpart_spec_finds_the_shared_reference_cells(toy_suite):
    from bench.plan import build_plan

    plan = build_plan(toy_suite, defense="toy-scale", attack="none", merge="ta,ta-tuned", victims=["t10"],
                      evaluate="victim")
    merges = [c for c in plan.cells if c.kind == "merge"]
    by_id = {c.cell_id: c for c in merges}
    protected = [c for c in merges if c.filling == "protected"]
    assert protected and all(c.defense is not None for c in protected)
    for c in protected:
        u = by_id[spec_id(counterpart_spec(c.spec(), "unprotected"))]
        z = by_id[spec_id(counterpart_spec(c.spec(), "counterfactual"))]
        assert (u.filling, z.filling) == ("unprotected", "counterfactual")
        assert u.defense is None and z.defense is None
        assert u.merge.spec() == c.merge.spec() and u.attack.spec() == c.attack.spec()
        assert u.evaluated_tasks == ("t10",) and z.evaluated_tasks == ("t10",)  # as the protected cell
    # one unprotected and one counterfactual cell per pipeline, shared by every defense
    assert sum(c.filling == "unprotected" for c in merges) == 2
    assert not any(c.defense is not None and c.defense.name == "none" for c in merges)


# ---------------------------------------------------------------- honest ranking


def test_a_failed_cell_unranks_its_defense_and_is_named():
    records = worked_example()
    failed_spec = merge_spec("v", ("p",), 0, "guard", "realign", "dare")
    records.append(record(failed_spec, [], status="failed", reason="RuntimeError: boom"))
    s = score(records, attacks=ATTACKS, n_bootstrap=50)
    entry = s.entry(SUITE, "guard")
    assert entry.rank is None and entry.has_flag("failed_cells")
    assert spec_id(failed_spec) in entry.unranked_reason


def test_a_failed_reference_cell_unranks_the_defenses_that_need_it():
    records = [r for r in worked_example()]
    spec = records[-1].spec
    ref = counterpart_spec(spec, "counterfactual")
    records = [r for r in records if r.cell_id != spec_id(ref)]
    records.append(record(ref, [], status="failed", reason="MemoryError"))
    entry = score(records, attacks=ATTACKS, n_bootstrap=50).entry(SUITE, "guard")
    assert entry.rank is None and spec_id(ref) in entry.unranked_reason


def test_budget_na_is_a_misconfiguration_not_an_excuse():
    records = worked_example()
    spec = merge_spec("v", ("p",), 0, "guard", "merge-finetune", "ta")
    records.append(record(spec, [], status="na", reason="needs 256 labelled, budget allows 64",
                          provenance={"na_kind": "budget"}))
    entry = score(records, attacks=[*ATTACKS, "merge-finetune"], n_bootstrap=50).entry(SUITE, "guard")
    assert entry.has_flag("budget_exceeded") and entry.rank is None
    assert "merge-finetune" in entry.attacks_missing


def test_structural_na_excuses_an_attack():
    records = worked_example()
    spec = merge_spec("v", ("p",), 0, "guard", "taylor-invert", "ta")
    records.append(record(spec, [], status="na", reason="defense guard releases no Taylor FFN",
                          provenance={"na_kind": "structural"}))
    s = score(records, attacks=[*ATTACKS, "taylor-invert"], n_bootstrap=50)
    entry = s.entry(SUITE, "guard")
    assert not entry.attacks_missing and entry.rank == 1
    (v,) = s.victim_scores(SUITE, "guard")
    assert "taylor-invert" in v.attacks_na


def test_utility_is_read_even_when_every_merge_so_far_is_not_applicable():
    # a defense whose release plain merges cannot combine (MergeBarrier's FFN) still has its utility
    records = [baseline(), utility_cell("barrier", 0.72)]
    spec = merge_spec("v", ("p",), 0, "barrier", "none", "ta")
    records.append(record(spec, [], status="na", reason="a structure θ_pre does not have",
                          provenance={"na_kind": "structural"}))
    (v,) = score(records, attacks=["none"], n_bootstrap=20).victim_scores(SUITE, "barrier")
    assert v.utility == pytest.approx(0.8) and v.security is None


def test_a_standard_attack_never_run_makes_the_entry_incomplete():
    entry = score(worked_example(), attacks=[*ATTACKS, "unmask"], n_bootstrap=20).entry(SUITE, "guard")
    assert entry.attacks_missing == ["unmask"] and entry.rank is None and entry.has_flag("incomplete")


def test_utility_floor_applies_per_victim_not_to_the_mean():
    records = worked_example()  # victim v: utility 0.88 / 0.9 = 0.978
    records += [baseline(victim="w", partners=("p",)), utility_cell("guard", 0.5, victim="w"),
                *pipeline("guard", "none", "ta", p=0.65, u=0.8, z=0.6, victim="w"),
                *pipeline("guard", "realign", "ta", p=0.7, u=0.8, z=0.6, victim="w")]
    entry = score(unique(records), attacks=ATTACKS, n_bootstrap=50).entry(SUITE, "guard")
    assert entry.utility > 0.7  # the mean (0.978 + 0.556) / 2 = 0.77 would hide it
    assert entry.has_flag("utility_below_floor") and "w" in entry.unranked_reason and entry.rank is None


def test_function_preservation_violation_unranks():
    records = [r for r in worked_example() if r.kind != "utility"]
    records.append(utility_cell("guard", 0.88, flags={"claimed": True, "max_abs_diff": 0.5, "tolerance": 0.001, "ok": False}))
    entry = score(records, attacks=ATTACKS, n_bootstrap=20).entry(SUITE, "guard")
    assert entry.has_flag("function_preservation_violated") and entry.rank is None


def test_reference_row_shows_the_gains_has_no_security_and_is_never_ranked():
    s = score(worked_example(), attacks=ATTACKS, n_bootstrap=50)
    entry = s.entry(SUITE, "none")
    assert entry.security is None and entry.best_attack is None and entry.utility == pytest.approx(1.0)
    assert entry.rank is None and entry.rank_band is None and "reference" in entry.unranked_reason
    assert not entry.attacks_missing and entry.flags == []
    (v,) = s.victim_scores(SUITE, "none")
    gains = {(p.attack, p.merge): p.gain for p in v.pairs}
    assert gains == pytest.approx({("none", "ta"): 0.2, ("none", "ties"): 0.1})  # U − ∅ by hand
    assert v.security is None and v.best_recovered is None


def test_partner_side_effect_compares_protected_and_unprotected_merges():
    records = unique([baseline(), utility_cell("g", 0.88),
                      *pipeline("g", "none", "ta", p=0.7, u=0.8, z=0.6, partner=(0.55, 0.75))])
    (v,) = score(records, attacks=["none"], n_bootstrap=20).victim_scores(SUITE, "g")
    assert v.partner_effect == pytest.approx(-0.2)


def test_newest_protected_cell_wins_and_is_read_against_its_own_references():
    old = pipeline("g", "none", "ta", p=0.8, u=0.8, z=0.6, merge_params={"lambda_": 0.3})
    new = pipeline("g", "none", "ta", p=0.6, u=0.8, z=0.6, merge_params={"lambda_": 0.5})
    new[0] = record(new[0].spec, list(new[0].metrics), created=5.0)
    records = unique([baseline(), utility_cell("g", 0.88), *old, *new])
    (v,) = score(records, attacks=["none"], n_bootstrap=20).victim_scores(SUITE, "g")
    (pair,) = v.pairs
    assert pair.recovered == pytest.approx(0.0)


# ---------------------------------------------------------------- intervals


def test_intervals_combine_examples_and_replicates_and_are_deterministic():
    records = [baseline(), baseline(seed=1), utility_cell("g", 0.88), utility_cell("g", 0.88, seed=1)]
    records += pipeline("g", "none", "ta", p=0.7, u=0.8, z=0.6, seed=0)
    records += pipeline("g", "none", "ta", p=0.66, u=0.8, z=0.6, seed=1)
    records = unique(records)
    a = score(records, attacks=["none"], n_bootstrap=300, seed=3)
    b = score(records, attacks=["none"], n_bootstrap=300, seed=3)
    (va,), (vb,) = a.victim_scores(SUITE, "g"), b.victim_scores(SUITE, "g")
    assert va.security_ci == vb.security_ci and va.pairs[0].recovered_ci == vb.pairs[0].recovered_ci
    (pair,) = va.pairs
    assert pair.n == 2 and pair.recovered == pytest.approx(0.4)  # (0.1 + 0.06) / (0.2 + 0.2)
    lo, hi = pair.recovered_ci
    assert lo < 0.3 and hi > 0.5  # the replicates disagree (0.5 vs 0.3): the interval spans them


def test_pair_statistics_resample_the_fillings_with_shared_indices():
    rng = np.random.default_rng(0)
    z = (rng.random((1, 200)) < 0.5).astype(float)
    u = np.maximum(z, (rng.random((1, 200)) < 0.6).astype(float))
    out = PairOutcomes(u.copy(), u, z)  # P == U: every draw must recover exactly 1
    draws = pair_statistics(out, bootstrap_counts(rng, 200, 100), np.ones((100, 1)))
    assert np.allclose(draws.recovered[~np.isnan(draws.recovered)], 1.0)
    assert np.all(draws.gain >= 0)


# ---------------------------------------------------------------- the winner's curse


def _simulate(rng: np.random.Generator, truths: list[float], n: int = 1000) -> list[PairOutcomes]:
    """Independent per-example outcomes per filling: ∅ at 0.45, U at 0.85, P at 0.45 + r·0.4."""
    pairs = []
    for r in truths:
        z = (rng.random((1, n)) < 0.45).astype(float)
        u = (rng.random((1, n)) < 0.85).astype(float)
        p = (rng.random((1, n)) < 0.45 + r * 0.4).astype(float)
        pairs.append(PairOutcomes(p, u, z))
    return pairs


def test_held_out_worst_case_is_unbiased_where_the_naive_max_is_not_and_covers_the_truth():
    rng = np.random.default_rng(12345)
    truths = [0.5] * 12  # twelve equally strong pairs: any max over them is pure noise
    n, sims, draws = 1000, 200, 400
    naive, corrected, covered = [], [], 0
    for _ in range(sims):
        pairs = _simulate(rng, truths, n)
        sel, held = selection_split(n, rng)
        counts = bootstrap_counts(rng, n, draws, within=held)
        result = select_worst_pair(pairs, [True] * len(pairs), sel, held, counts, np.ones((draws, 1)))
        naive.append(result.naive)
        corrected.append(result.recovered)
        lo, hi = np.percentile(result.draws, [2.5, 97.5])
        covered += lo <= truths[result.index] <= hi
    mc = np.std(corrected) / math.sqrt(sims)
    assert np.mean(naive) - 0.5 > 5 * mc  # the naive max is biased upward
    assert abs(np.mean(corrected) - 0.5) < 3 * mc + 0.005  # the held-out value is not (ratio bias ~0.3 %)
    assert covered / sims >= 0.90  # a 95 % interval covers the truth near its nominal rate


def test_held_out_selection_still_finds_a_dominant_pair():
    rng = np.random.default_rng(7)
    pairs = _simulate(rng, [0.2, 0.9, 0.3])
    sel, held = selection_split(1000, rng)
    result = select_worst_pair(pairs, [True] * 3, sel, held, bootstrap_counts(rng, 1000, 200, within=held),
                               np.ones((200, 1)))
    assert result.index == 1 and result.recovered == pytest.approx(0.9, abs=0.12)


# ---------------------------------------------------------------- misc


def test_bad_bootstrap_settings_raise_a_sentence():
    with pytest.raises(ScoringError, match="n_bootstrap"):
        score([], attacks=[], n_bootstrap=0)
    with pytest.raises(ScoringError, match="ci_level"):
        score([], attacks=[], ci_level=1.5)


def test_the_standard_attack_set_is_what_the_caller_passes_never_the_installed_plugins():
    # an empty set: nothing is required, so the entry is complete with the attacks it ran
    entry = score(worked_example(), attacks=[], n_bootstrap=20).entry(SUITE, "guard")
    assert entry.complete
    entry = score(worked_example(), attacks=[*ATTACKS, "unmask"], n_bootstrap=20).entry(SUITE, "guard")
    assert entry.attacks_missing == ["unmask"]
    with pytest.raises(TypeError):
        score(worked_example())  # type: ignore[call-arg]


def test_table_lists_overall_then_suites_with_intervals():
    text = format_table(score(worked_example(), attacks=ATTACKS, n_bootstrap=50))
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["rank", "suite", "defense"]
    assert "overall" in lines[2] and "[" in text


def test_ranking_separates_what_the_bootstrap_separates_and_bands_the_rest():
    records = worked_example()  # guard: security about 0.2 (realign/ta recovers 0.8)
    # weak gives everything back (P = U): security 0, far below guard; twin is guard's exact copy
    records += [utility_cell("weak", 0.88), *pipeline("weak", "none", "ta", p=0.8, u=0.8, z=0.6)[:1],
                *pipeline("weak", "realign", "ta", p=0.8, u=0.8, z=0.6)[:1],
                *pipeline("weak", "none", "ties", p=0.7, u=0.7, z=0.6)[:1],
                *pipeline("weak", "realign", "ties", p=0.7, u=0.7, z=0.6)[:1]]
    records += [utility_cell("twin", 0.88)] + [
        record({**r.spec, "defense": {**r.spec["defense"], "name": "twin"}}, list(r.metrics), provenance=r.provenance)
        for r in worked_example() if r.kind == "merge" and r.filling == "protected"]
    s = score(unique(records), attacks=ATTACKS, n_bootstrap=200)
    bands = {d.defense: d.rank_band for d in s.suites if d.rank_band}
    # guard and twin have identical outcomes: no draw separates them, they share ranks 1-2; weak is 3rd
    assert bands == {"guard": (1, 2), "twin": (1, 2), "weak": (3, 3)}
    assert s.entry(SUITE, "guard").rank == s.entry(SUITE, "twin").rank == 1
    assert s.entry(SUITE, "none").rank is None  # the reference: shown, never ranked


def test_stability_counts_the_draws_that_reorder_the_point_ranking():
    from bench.scoring.ranking import stability
    from bench.scoring.results import DefenseScore
    from bench.scoring.summaries import EntryDraws

    def entry(name: str, sec: float) -> DefenseScore:
        return DefenseScore("toy", name, ["v"], utility=1.0, security=sec, rank=1)

    one = np.ones(4)
    draws = {"a": EntryDraws(np.array([0.5, 0.6, 0.7, 0.7]), one, one, one),
             "b": EntryDraws(np.array([0.55, 0.5, 0.45, 0.6]), one, one, one)}
    st = stability([entry("a", 0.625), entry("b", 0.525)], draws)
    # by hand: b is strictly more secure in draw 0 only; the order a > b holds in draws 1, 2 and 3
    assert st.defenses == ["a", "b"]
    assert st.pairwise_flip == [("a", "b", 0.25)] and st.stable_fraction == 0.75
    assert st.rank_probability == [[0.75, 0.25], [0.25, 0.75]]


def test_utility_above_one_earns_no_credit_in_the_order():
    from bench.scoring.ranking import rank_key
    from bench.scoring.results import DefenseScore

    better_than_expert = DefenseScore("toy", "b-plus", ["v"], utility=1.021, security=0.3)
    exact = DefenseScore("toy", "a-exact", ["v"], utility=1.0, security=0.3)
    below = DefenseScore("toy", "c-below", ["v"], utility=0.99, security=0.3)
    # capped at 1, 1.021 ties with 1.0 and the name decides; 0.99 stays below
    assert [d.defense for d in sorted([better_than_expert, below, exact], key=rank_key)] == \
        ["a-exact", "b-plus", "c-below"]


def test_selection_prefers_a_pair_recovered_exactly_to_one_that_touches_the_clip_by_noise():
    rng = np.random.default_rng(3)
    n = 600
    sel, held = selection_split(n, rng)
    z = (rng.random((1, n)) < 0.5).astype(float)
    u = np.maximum(z, (rng.random((1, n)) < 0.5).astype(float))
    exact = PairOutcomes(u.copy(), u, z)  # an algebraic attack that restores the expert: P == U everywhere
    noisy_p = z.copy()
    noisy_p[0, sel] = rng.permutation(u[0, sel])  # the same mean as U on the selection half, other examples
    noisy = PairOutcomes(noisy_p, u, z)  # ... and nothing on the held-out half
    draws = 300
    result = select_worst_pair([noisy, exact], [True, True], sel, held, bootstrap_counts(rng, n, draws, within=held),
                               np.ones((draws, 1)), tie_break=[(0.0,), (2.0,)],  # the noisy pair is cheaper
                               selection_counts=bootstrap_counts(rng, n, draws, within=sel))
    assert result.index == 1 and result.recovered == 1.0


def test_a_defense_that_cannot_act_on_the_architecture_is_listed_not_applicable_not_as_an_entry():
    na = {"timings": {}, "na_kind": "architecture"}
    reason = "defense attn-only needs attention, which this architecture lacks"
    cells = [record(merge_spec("v", ("p",), 0, "attn-only", a, "ta"), [], status="na", reason=reason, provenance=na)
             for a in ATTACKS]
    s = score(unique([*worked_example(), *cells]), attacks=ATTACKS, n_bootstrap=20)
    assert (SUITE, "attn-only") not in {(d.suite, d.defense) for d in s.suites}
    assert (SUITE, "attn-only", reason) in s.not_applicable
    # a release no *plain* merge can combine (structural N/A of the pipeline) stays an entry: other attacks may
    structural = [record(merge_spec("v", ("p",), 0, "taylor", a, "ta"), [], status="na",
                         reason="defense taylor releases a structure θ_pre does not have", provenance={"na_kind": "structural"})
                  for a in ATTACKS]
    s = score(unique([*worked_example(), *structural]), attacks=ATTACKS, n_bootstrap=20)
    assert (SUITE, "taylor") in {(d.suite, d.defense) for d in s.suites}


# ---------------------------------------------------------------- scoring version 3: honest counterparts


def _cell(spec: dict, values: np.ndarray | float, *, task: str = "v", provenance: dict | None = None,
          n: int = 1000) -> CellRecord:
    """A merge cell whose victim outcomes are ``values`` (an array, or an accuracy: the first round(acc·n) right)."""
    v = outcomes(values, n) if np.isscalar(values) else np.asarray(values, dtype=float)
    return record(spec, [Metric("merged", task, "accuracy", float(v.mean()), True, encode(v))],
                  provenance=provenance or {"timings": {"prepare": 0.0, "finish": 0.0}})


def test_an_undo_attack_is_credited_only_for_what_it_takes_from_the_protected_model():
    # vision-effnet, PaRaMS, animal-mnist, revert-ffn / ta (shipped cells): revert-ffn reverts every MBConv block,
    # so applied to the unprotected expert it gives 0.596, as applied to the release. Its honest counterpart is
    # the plain merge: U 0.772, ∅ 0.523, so it recovers (0.596 − 0.523) / (0.772 − 0.523) = 0.293, not 1.
    spec = lambda attack, filling, defense=None: merge_spec("v", ("p",), 0, defense, attack, "ta", filling=filling)  # noqa: E731
    records = [baseline(), utility_cell("params", 0.88),
               _cell(spec("none", "protected", "params"), 0.21), _cell(spec("none", "unprotected"), 0.772),
               _cell(spec("none", "counterfactual"), 0.523),
               _cell(spec("revert-ffn", "protected", "params"), 0.596),
               # what the pre-v3 rule read: the attack applied to U and ∅ (still in old stores; never read now)
               _cell(spec("revert-ffn", "unprotected"), 0.596), _cell(spec("revert-ffn", "counterfactual"), 0.523)]
    (v,) = score(records, attacks=["none", "revert-ffn"], n_bootstrap=100).victim_scores(SUITE, "params")
    pair = next(p for p in v.pairs if p.attack == "revert-ffn")
    assert pair.recovered == pytest.approx(0.073 / 0.249)
    assert (pair.v_unprotected, pair.v_counterfactual, pair.counterpart) == (pytest.approx(0.772), pytest.approx(0.523), "none")
    assert spec_id(spec("revert-ffn", "unprotected")) not in v.cell_ids
    assert spec_id(spec("none", "unprotected")) in v.cell_ids


def test_a_finetuning_attack_is_read_against_plain_merge_finetune_with_the_same_samples():
    ft = {"samples": 256, "steps": 25, "batch_size": 16}
    ge = {"samples": 256, "steps": 25, "batch_size": 16, "estimate_steps": 20}

    def spec(attack: str, params: dict, filling: str, defense: str | None = None) -> dict:
        s = merge_spec("v", ("p",), 0, defense, attack, "ta", filling=filling, attack_params=params)
        s["attack"]["version"] = "2" if attack == "merge-finetune" else "1"
        return s

    records = [baseline(), utility_cell("g", 0.88),
               _cell(spec("graderase", ge, "protected", "g"), 0.74),
               _cell(spec("merge-finetune", ft, "unprotected"), 0.80),
               _cell(spec("merge-finetune", ft, "counterfactual"), 0.70),
               # GradErase run on the unprotected expert: not what an honest free-rider runs, never read
               _cell(spec("graderase", ge, "unprotected"), 0.74), _cell(spec("graderase", ge, "counterfactual"), 0.70)]
    (v,) = score(records, attacks=["graderase"], n_bootstrap=100).victim_scores(SUITE, "g")
    (pair,) = v.pairs
    assert pair.counterpart == "merge-finetune"
    assert pair.recovered == pytest.approx(0.04 / 0.10)  # against merge-finetune's 0.80 and 0.70, not graderase's
    # merge-finetune is its own counterpart: read against its own U and ∅ cells
    records.append(_cell(spec("merge-finetune", ft, "protected", "g"), 0.75))
    (v,) = score(records, attacks=["graderase", "merge-finetune"], n_bootstrap=100).victim_scores(SUITE, "g")
    mf = next(p for p in v.pairs if p.attack == "merge-finetune")
    assert mf.recovered == pytest.approx(0.5) and mf.counterpart == "merge-finetune"


def test_the_counterpart_rule_of_every_standard_attack():
    from bench.plan import counterpart_attack_spec, make_attacks
    from bench.protocol import STANDARD

    names = {}
    for step in STANDARD.steps:
        for attack in make_attacks(step.attack, STANDARD.params):
            names[step.attack] = counterpart_attack_spec(attack.spec())
    trains = {"merge-finetune", "graderase", "realign+scale-division+merge-finetune", "anchor-align+merge-finetune",
              "revert-to-base+merge-finetune"}
    plain_ft = {"name": "merge-finetune", "version": "2", "params": {"samples": 256, "steps": 25, "batch_size": 16}}
    for attack, cp in names.items():
        if attack in trains:
            assert cp == plain_ft, attack
        else:  # every data-free undo attack (and none itself) is read against the plain merge
            assert cp == {"name": "none", "version": "1", "params": {}}, attack


def _half_split_cells(n: int = 400) -> tuple[list[CellRecord], np.ndarray, np.ndarray]:
    """∅ gets nothing right, U everything; the protected release is the expert on the selection half of the
    examples and θ_pre on the held-out half. By construction: selection 1, held-out 0, all examples 0.5."""
    from bench.scoring import example_split

    sel, held = example_split(0, SUITE, "v", n)
    assert len(sel) == len(held) == n // 2 and sorted([*sel, *held]) == list(range(n))  # a partition in halves
    p = np.zeros(n)
    p[sel] = 1.0
    spec = lambda filling, defense=None: merge_spec("v", ("p",), 0, defense, "none", "ta", filling=filling)  # noqa: E731
    cells = [baseline(), utility_cell("g", 0.88), _cell(spec("protected", "g"), p, n=n),
             _cell(spec("unprotected"), np.ones(n), n=n), _cell(spec("counterfactual"), np.zeros(n), n=n)]
    return cells, sel, held


def test_the_reported_worst_case_is_read_on_the_held_out_half_only():
    cells, _sel, _held = _half_split_cells()
    (v,) = score(cells, attacks=["none"], n_bootstrap=100).victim_scores(SUITE, "g")
    assert v.pairs[0].recovered == pytest.approx(0.5)  # all examples
    assert v.selection_recovered == pytest.approx(1.0)  # what a stopping rule may read
    assert v.best_recovered == pytest.approx(0.0) and v.security == pytest.approx(1.0)  # what is reported


def test_selection_reads_the_lower_bound_not_the_point_value_at_score_level():
    n = 600
    from bench.scoring import example_split

    sel, held = example_split(0, SUITE, "v", n)
    rng = np.random.default_rng(5)
    u = (rng.random(n) < 0.8).astype(float)
    noisy = np.zeros(n)
    noisy[sel] = rng.permutation(u[sel])  # U's mean on the selection half, nothing held out
    spec = lambda attack, filling, defense=None: merge_spec("v", ("p",), 0, defense, attack, "ta", filling=filling)  # noqa: E731
    records = [baseline(), utility_cell("g", 0.88), _cell(spec("none", "unprotected"), u, n=n),
               _cell(spec("none", "counterfactual"), np.zeros(n), n=n),
               _cell(spec("none", "protected", "g"), np.zeros(n), n=n),
               _cell(spec("realign", "protected", "g"), u, n=n, provenance={"timings": {"prepare": 2.0}}),
               _cell(spec("scale-division", "protected", "g"), noisy, n=n, provenance={"timings": {"prepare": 0.0}})]
    (v,) = score(records, attacks=["none", "realign", "scale-division"], n_bootstrap=300).victim_scores(SUITE, "g")
    # both read 1 on the selection half; the exact restoration has the higher lower bound and holds out at 1
    assert v.best_attack == "realign" and v.best_recovered == pytest.approx(1.0) and v.security == pytest.approx(0.0)


def test_a_significantly_negative_gain_says_so():
    rng = np.random.default_rng(1)
    z = (rng.random(1000) < 0.7).astype(float)
    u = (rng.random(1000) < 0.5).astype(float)
    spec = lambda filling, defense=None: merge_spec("v", ("p",), 0, defense, "none", "ta", filling=filling)  # noqa: E731
    records = [baseline(), utility_cell("g", 0.88), _cell(spec("protected", "g"), u), _cell(spec("unprotected"), u),
               _cell(spec("counterfactual"), z)]
    (v,) = score(records, attacks=["none"], n_bootstrap=200).victim_scores(SUITE, "g")
    (pair,) = v.pairs
    assert pair.gain_ci[1] < 0 and "significantly negative" in pair.na_reason and "includes 0" not in pair.na_reason
    entry = score(records, attacks=["none"], n_bootstrap=200).entry(SUITE, "g")
    assert entry.uninformative_victims == ["v"] and entry.has_flag("uninformative_victims")
    assert "v:" in next(f.message for f in entry.flags if f.code == "uninformative_victims")


def test_entry_pair_rows_cover_one_stated_set_of_victims_and_agree_with_their_values():
    records = [baseline(), baseline(victim="w"), utility_cell("g", 0.88), utility_cell("g", 0.88, victim="w"),
               utility_cell("h", 0.88), utility_cell("h", 0.88, victim="w"),
               *pipeline("g", "none", "ta", p=0.7, u=0.8, z=0.6),
               *pipeline("g", "none", "ta", p=0.9, u=0.6, z=0.6, victim="w"),  # w gives nothing under ta
               *pipeline("g", "realign", "ta", p=0.78, u=0.8, z=0.6, timings={"prepare": 2.0, "finish": 1.0},
                         partner=(0.55, 0.75)),
               *pipeline("g", "none", "ties", p=0.7, u=0.6, z=0.6, victim="w"),  # no victim gains under ties
               *pipeline("h", "none", "ta", p=0.65, u=0.8, z=0.6)[:1],
               *pipeline("h", "none", "ta", p=0.6, u=0.6, z=0.6, victim="w")[:1]]
    # h never ran realign on v (the protocol stopped there earlier)
    s = score(unique(records), attacks=[], n_bootstrap=100)
    g = {(p.attack, p.merge): p for p in s.entry(SUITE, "g").pairs}
    ta = g[("none", "ta")]
    assert ta.victims == ("v",)  # w's gain is 0: not covered, whatever its V_P
    assert (ta.v_protected, ta.v_unprotected, ta.v_counterfactual) == pytest.approx((0.7, 0.8, 0.6))
    assert ta.recovered == pytest.approx(recovered_fraction(ta.v_protected, ta.v_unprotected, ta.v_counterfactual))
    assert (ta.gain, ta.informative, ta.n, ta.counterpart, ta.na_reason) == (pytest.approx(0.2), True, 1, "none", "")
    ties = g[("none", "ties")]  # listed before realign/ta: a row without a value must not end the list
    assert ties.recovered is None and ties.n == 0 and ties.victims == () and "uninformative" in ties.na_reason
    realign = g[("realign", "ta")]
    assert (realign.attack_s, realign.partner_effect, realign.counterpart) == (3.0, pytest.approx(-0.2), "none")
    h = {(p.attack, p.merge): p for p in s.entry(SUITE, "h").pairs}
    assert h[("none", "ta")].victims == ("v",) and h[("none", "ta")].recovered == pytest.approx(0.25)
    assert ("realign", "ta") not in h  # never run by h anywhere: no row
    assert g[("realign", "ta")].victims == ("v",) and g[("realign", "ta")].recovered == pytest.approx(0.9)


def test_a_defense_missing_a_pair_on_a_covered_victim_gets_no_entry_value():
    records = [baseline(), baseline(victim="w"), utility_cell("g", 0.88), utility_cell("g", 0.88, victim="w"),
               utility_cell("h", 0.88), utility_cell("h", 0.88, victim="w"),
               *pipeline("g", "realign", "ta", p=0.7, u=0.8, z=0.6),
               *pipeline("g", "realign", "ta", p=0.7, u=0.8, z=0.6, victim="w"),
               *pipeline("h", "realign", "ta", p=0.7, u=0.8, z=0.6)[:1]]  # h: v only
    s = score(unique(records), attacks=[], n_bootstrap=50)
    (row,) = s.entry(SUITE, "h").pairs
    assert row.recovered is None and "not run on w" in row.na_reason and row.victims == ("v", "w")


def test_no_cross_suite_rank_when_defenses_cover_different_suites():
    other = "toy2"

    def on(suite: str, defense: str) -> list[CellRecord]:
        base = baseline(suite=suite)
        util = record({**utility_cell(defense, 0.88).spec, "suite": suite}, [metric("utility", "v", 0.88)],
                      provenance={"timings": {}})
        cells = [record({**r.spec, "suite": suite}, list(r.metrics), provenance=r.provenance)
                 for r in pipeline(defense, "none", "ta", p=0.7, u=0.8, z=0.6)]
        return [base, util, *cells]

    records = unique([*on(SUITE, "a"), *on(SUITE, "b"), *on(other, "a")])  # b never ran on toy2
    s = score(records, attacks=[], n_bootstrap=50)
    assert {d.defense: d.rank for d in s.suites if d.suite == SUITE} == {"a": 1, "b": 1, "none": None}
    overall = {d.defense: d for d in s.overall}
    assert overall["a"].rank is None and overall["b"].rank is None
    assert "different suites" in overall["a"].unranked_reason


def test_separation_reads_the_lower_tail_of_the_paired_difference_and_no_evidence_is_no_difference():
    from bench.scoring import separated

    base = np.zeros(100)
    ahead = base + 0.1
    ahead[:4] = -0.1  # a is ahead in 96 of 100 draws: the 2.5 % tail is behind, so not separated at 95 %
    assert not separated(ahead, base, 0.95)
    assert separated(ahead, base, 0.90)  # at 90 % the 5 % tail is ahead
    clear = base + 0.1
    assert separated(clear, base, 0.95) and not separated(base, clear, 0.95)
    undefined = clear.copy()
    undefined[:5] = np.nan  # a draw without a value is no evidence for a: counted as no difference (5 % of draws)
    assert not separated(undefined, base, 0.95)


def test_replicates_of_the_worst_pair_are_reported_pooled_but_never_steer_the_choice():
    """The protocol re-runs each victim's worst pair under seeds 1 and 2. Here seed 0 of pair "aa" recovers
    most, its seeds 1 and 2 little: pooled it would lose to "bb", so a choice that read every seed would report
    "bb". The choice reads seed 0 (the seed every pair has); the report pools aa's three seeds on the held-out
    half, and the interval resamples seeds (expected values computed here from the outcomes, by hand)."""
    from bench.scoring import example_split

    records = []
    for s in (0, 1, 2):
        records += [baseline(seed=s), utility_cell("g", 0.88, seed=s)]
        records += pipeline("g", "aa", "ta", p=0.88 if s == 0 else 0.6, u=0.9, z=0.5, seed=s)
    records += pipeline("g", "bb", "ta", p=0.8, u=0.9, z=0.5)
    (v,) = score(unique(records), attacks=["aa", "bb"], n_bootstrap=1000).victim_scores(SUITE, "g")
    _sel, held = example_split(0, SUITE, "v", N)
    pooled = {k: np.mean([outcomes(a)[held].mean() for a in accs])
              for k, accs in {"p": (0.88, 0.6, 0.6), "u": (0.9,) * 3, "z": (0.5,) * 3}.items()}
    want = (pooled["p"] - pooled["z"]) / (pooled["u"] - pooled["z"])
    assert 0.3 < want < 0.6  # below bb's 0.75: reading every seed would have chosen bb
    assert v.best_attack == "aa"
    assert v.best_recovered == pytest.approx(want, abs=1e-9)
    # seed 0 alone holds out near 0.95 with a test-example interval about ±0.1 wide; the seeds spread it
    assert v.security_ci[1] - v.security_ci[0] > 0.4
    # bb has seed 0 alone: its draws resample that one (an interval, not NaN draws from seeds it lacks)
    bb = next(p for p in v.pairs if p.attack == "bb")
    assert bb.recovered_ci is not None and bb.recovered_ci[1] - bb.recovered_ci[0] < 0.3 and bb.recovered_ci[0] > 0.5
    # and adding aa's seeds moved nothing else: bb's numbers and the choice's selection-half value are those of
    # seed 0 alone (the example draws do not depend on how many replicates a victim has)
    (alone,) = score(unique([r for r in records if r.seed == 0]), attacks=["aa", "bb"],
                     n_bootstrap=1000).victim_scores(SUITE, "g")
    assert next(p for p in alone.pairs if p.attack == "bb").recovered_ci == bb.recovered_ci
    assert (alone.best_attack, alone.selection_recovered) == ("aa", v.selection_recovered)


def test_utility_over_several_defense_seeds_resamples_the_seeds():
    """Utility cells of seeds 0, 1, 2 (the protocol's replicates re-protect): the point is the mean of the
    per-seed means over the expert's, and the interval holds the seeds' spread (here 0.9, 0.5, 0.9 against an
    expert at 0.9: draws range from 0.56 to 1)."""
    records = []
    for s, u in zip((0, 1, 2), (0.9, 0.5, 0.9)):
        records += [baseline(seed=s), utility_cell("g", u, seed=s)]
        records += pipeline("g", "none", "ta", p=0.6, u=0.9, z=0.5, seed=s)
    (v,) = score(unique(records), attacks=["none"], n_bootstrap=400).victim_scores(SUITE, "g")
    want = np.mean([outcomes(a).mean() for a in (0.9, 0.5, 0.9)]) / outcomes(0.9).mean()
    assert v.utility == pytest.approx(want, abs=1e-9)
    assert v.utility_ci[0] < 0.7 and v.utility_ci[1] >= 0.99  # a seed-blind interval would be about ±0.03

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

ATTACKS = ["none", "align"]


def worked_example() -> list[CellRecord]:
    """θ_pre 0.5, expert 0.9. Counterfactual floor 0.6 everywhere; unprotected merges 0.8 (ta), 0.7 (ties).

    Defense 'guard': none/ta 0.65 -> 0.25, none/ties 0.6 -> 0, align/ta 0.76 -> 0.8, align/ties 0.65 -> 0.5.
    """
    return unique([
        baseline(), utility_cell("guard", 0.88),
        *pipeline("guard", "none", "ta", p=0.65, u=0.8, z=0.6),
        *pipeline("guard", "none", "ties", p=0.6, u=0.7, z=0.6),
        *pipeline("guard", "align", "ta", p=0.76, u=0.8, z=0.6, timings={"prepare": 2.0, "finish": 1.0}),
        *pipeline("guard", "align", "ties", p=0.65, u=0.7, z=0.6),
    ])


# ---------------------------------------------------------------- the counterfactual ratio


def test_recovered_is_read_against_the_counterfactual_not_theta_pre():
    s = score(worked_example(), attacks=ATTACKS, n_bootstrap=200)
    (v,) = s.victim_scores(SUITE, "guard")
    pairs = {(p.attack, p.merge): p for p in v.pairs}
    assert pairs[("none", "ta")].recovered == pytest.approx(0.05 / 0.2)
    assert pairs[("none", "ties")].recovered == pytest.approx(0.0)
    assert pairs[("align", "ta")].recovered == pytest.approx(0.8)
    assert pairs[("align", "ties")].recovered == pytest.approx(0.5)
    # Against θ_pre (0.5) as the floor, align/ta would have read (0.76 − 0.5)/(0.8 − 0.5) = 0.87.
    a = pairs[("align", "ta")]
    assert (a.v_protected, a.v_unprotected, a.v_counterfactual) == pytest.approx((0.76, 0.8, 0.6))
    assert a.gain == pytest.approx(0.2) and a.informative and a.examples == N
    assert a.gain_ci[0] > 0 and a.recovered_ci[0] <= 0.8 <= a.recovered_ci[1]
    assert (v.best_attack, v.best_merge) == ("align", "ta")
    assert v.security == pytest.approx(0.2, abs=0.05)  # measured on the held-out half
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
                      *pipeline("g", "align", "ta", p=0.7, u=0.8, z=0.6)])
    # make the weak pair's U and ∅ independent (not nested), as real fillings are
    for i, r in enumerate(records):
        if r.kind == "merge" and r.attack == "none" and r.filling == "unprotected":
            v = np.random.default_rng(0).permutation(outcomes(0.61))
            records[i] = record(r.spec, [Metric("merged", "v", "accuracy", float(v.mean()), True, encode(v))])
    s = score(records, attacks=ATTACKS, n_bootstrap=300)
    (v,) = s.victim_scores(SUITE, "g")
    weak = next(p for p in v.pairs if p.attack == "none")
    assert weak.informative is False and weak.recovered is None and "uninformative" in weak.na_reason
    assert weak.gain_ci[0] <= 0 <= weak.gain_ci[1]
    assert (v.best_attack, v.best_merge) == ("align", "ta")  # security rests on the informative pair only
    assert "uninformative" in {f.code for f in v.flags}


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
    failed_spec = merge_spec("v", ("p",), 0, "guard", "align", "dare")
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
                *pipeline("guard", "align", "ta", p=0.7, u=0.8, z=0.6, victim="w")]
    entry = score(unique(records), attacks=ATTACKS, n_bootstrap=50).entry(SUITE, "guard")
    assert entry.utility > 0.7  # the mean (0.978 + 0.556) / 2 = 0.77 would hide it
    assert entry.has_flag("utility_below_floor") and "w" in entry.unranked_reason and entry.rank is None


def test_function_preservation_violation_unranks():
    records = [r for r in worked_example() if r.kind != "utility"]
    records.append(utility_cell("guard", 0.88, flags={"claimed": True, "max_abs_diff": 0.5, "tolerance": 0.001, "ok": False}))
    entry = score(records, attacks=ATTACKS, n_bootstrap=20).entry(SUITE, "guard")
    assert entry.has_flag("function_preservation_violated") and entry.rank is None


def test_unprotected_reference_row_recovers_everything():
    entry = score(worked_example(), attacks=ATTACKS, n_bootstrap=50).entry(SUITE, "none")
    assert entry.security == pytest.approx(0.0) and entry.utility == pytest.approx(1.0)
    assert entry.rank is None and "reference" in entry.unranked_reason and not entry.attacks_missing


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


def test_ranking_orders_by_security_and_stability_reports_flips():
    records = worked_example()
    records += [utility_cell("weak", 0.88), *pipeline("weak", "none", "ta", p=0.8, u=0.8, z=0.6)[:1],
                *pipeline("weak", "align", "ta", p=0.8, u=0.8, z=0.6)[:1],
                *pipeline("weak", "none", "ties", p=0.7, u=0.7, z=0.6)[:1],
                *pipeline("weak", "align", "ties", p=0.7, u=0.7, z=0.6)[:1]]
    s = score(records, attacks=ATTACKS, n_bootstrap=100)
    ranked = sorted((d for d in s.suites if d.rank), key=lambda d: d.rank)
    assert [d.defense for d in ranked] == ["guard", "weak"]  # none is the reference: shown, never ranked
    st = s.stability[SUITE]
    assert st.defenses[0] == "guard" and 0.0 <= st.stable_fraction <= 1.0


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

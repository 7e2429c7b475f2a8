"""Scores on hand-built cells with answers worked out by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest

from bench import scoring
from bench.scoring import ScoringError, format_table, recovered_fraction, score, utility_ratio
from bench.store import CellRecord, Metric

SUITE = "toy"
ATTACKS = ["none", "align"]


def baseline(victim: str = "v", seed: int = 0, pre: float = 0.5, ft: float = 0.9, suite: str = SUITE,
             metric: str = "accuracy", higher_is_better: bool = True) -> CellRecord:
    return CellRecord(
        cell_id=f"base:{suite}:{victim}:{seed}", kind="baseline", suite=suite, victim=victim, partners=(),
        defense="none", attack="none", merge="", seed=seed, status="ok",
        metrics=(Metric("pretrained", victim, metric, pre, higher_is_better),
                 Metric("expert", victim, metric, ft, higher_is_better)),
        created=1.0,
    )


def cell(defense: str, attack: str, merge: str, merged: float, *, utility: float = 0.9, victim: str = "v",
         partners: tuple[str, ...] = ("p",), partner_merged: float | None = None, seed: int = 0,
         suite: str = SUITE, status: str = "ok", reason: str = "", timings: dict | None = None,
         flags: dict | None = None, created: float = 2.0, metric: str = "accuracy",
         higher_is_better: bool = True) -> CellRecord:
    metrics = [Metric("utility", victim, metric, utility, higher_is_better),
               Metric("merged", victim, metric, merged, higher_is_better)]
    if partner_merged is not None:
        metrics += [Metric("merged", p, metric, partner_merged, higher_is_better) for p in partners]
    prov = {"timings": timings or {}, "peak_rss_mb": 100.0}
    if flags:
        prov["flags"] = flags
    return CellRecord(
        cell_id=f"{suite}:{victim}:{','.join(partners)}:{defense}:{attack}:{merge}:{seed}:{created}", kind="merge",
        suite=suite, victim=victim, partners=partners, defense=defense, attack=attack, merge=merge, seed=seed,
        status=status, reason=reason, metrics=tuple(metrics) if status == "ok" else (),
        provenance=prov, created=created,
    )


def references(merged_by_merge: dict[str, float], **kw) -> list[CellRecord]:
    """The unprotected none/none merges (utility = the expert itself)."""
    return [cell("none", "none", m, v, utility=kw.pop("utility", 0.9), **kw) for m, v in merged_by_merge.items()]


def worked_example() -> list[CellRecord]:
    """acc_pre 0.5, acc_ft 0.9; unprotected merges reach 0.8 (ta) and 0.7 (ties).

    Defense 'guard': none/ta 0.55 -> 1/6, none/ties 0.5 -> 0, align/ta 0.74 -> 0.8, align/ties 0.6 -> 0.5.
    """
    return [
        baseline(),
        *references({"ta": 0.8, "ties": 0.7}),
        cell("guard", "none", "ta", 0.55, utility=0.88),
        cell("guard", "none", "ties", 0.5, utility=0.88),
        cell("guard", "align", "ta", 0.74, utility=0.88, timings={"prepare": 2.0, "finish": 1.0, "protect": 5.0}),
        cell("guard", "align", "ties", 0.6, utility=0.88),
    ]


def test_security_is_one_minus_worst_case_over_attacks_and_merges():
    s = score(worked_example(), attacks=ATTACKS, n_bootstrap=50)
    (v,) = s.victim_scores(SUITE, "guard")
    recovered = {(p.attack, p.merge): p.recovered for p in v.pairs}
    assert recovered[("none", "ta")] == pytest.approx(0.05 / 0.3)
    assert recovered[("none", "ties")] == pytest.approx(0.0)
    assert recovered[("align", "ta")] == pytest.approx(0.8)
    assert recovered[("align", "ties")] == pytest.approx(0.5)
    assert v.security == pytest.approx(0.2)
    assert (v.best_attack, v.best_merge) == ("align", "ta")
    assert v.attack_s == pytest.approx(3.0)  # prepare + finish of the best attack
    assert v.utility == pytest.approx(0.88 / 0.9)
    assert (v.acc_pre, v.acc_ft) == (0.5, 0.9)
    entry = s.entry(SUITE, "guard")
    assert entry.security == pytest.approx(0.2) and entry.best_recovered == pytest.approx(0.8)


def test_unprotected_reference_scores_zero_security_and_full_utility():
    s = score(worked_example(), attacks=["none"], n_bootstrap=20)
    ref = s.entry(SUITE, "none")
    assert ref.security == pytest.approx(0.0)
    assert ref.utility == pytest.approx(1.0)


def test_recovered_is_clipped_to_unit_interval():
    assert recovered_fraction(0.95, 0.8, 0.5) == 1.0  # the attack beats the unprotected merge
    assert recovered_fraction(0.3, 0.8, 0.5) == 0.0  # worse than θ_pre
    assert recovered_fraction(0.65, 0.8, 0.5) == pytest.approx(0.5)
    records = [baseline(), *references({"ta": 0.8}), cell("g", "none", "ta", 0.95), cell("g", "align", "ta", 0.2)]
    (v,) = score(records, attacks=ATTACKS, n_bootstrap=10).victim_scores(SUITE, "g")
    assert {p.attack: p.recovered for p in v.pairs} == {"none": 1.0, "align": 0.0}
    assert v.security == 0.0


def test_recovered_flips_sign_for_lower_is_better_metrics():
    # perplexity: θ_pre 20, unprotected merge 12 (a gain of 8), protected merge 18 (a gain of 2)
    assert recovered_fraction(18.0, 12.0, 20.0, higher_is_better=False) == pytest.approx(0.25)
    assert recovered_fraction(18.0, 25.0, 20.0, higher_is_better=False) is None
    assert utility_ratio(11.0, 10.0, higher_is_better=False) == pytest.approx(10 / 11)


def test_degenerate_denominator_is_na_not_divided():
    # ties: the unprotected merge (0.5) is no better than θ_pre (0.5): nothing to recover there.
    assert recovered_fraction(0.7, 0.5, 0.5) is None
    assert recovered_fraction(0.7, 0.45, 0.5) is None
    records = [baseline(), *references({"ta": 0.8, "ties": 0.5}),
               cell("g", "none", "ta", 0.65), cell("g", "none", "ties", 0.9), cell("g", "align", "ta", 0.56)]
    s = score(records, attacks=ATTACKS, n_bootstrap=10)
    (v,) = s.victim_scores(SUITE, "g")
    ties = next(p for p in v.pairs if p.merge == "ties")
    assert ties.recovered is None and "nothing beyond" in ties.na_reason
    assert v.security == pytest.approx(0.5)  # the degenerate ties cell (0.9!) does not count
    assert (v.best_attack, v.best_merge) == ("none", "ta")


def test_all_degenerate_leaves_security_unscored_and_unranked():
    records = [baseline(), *references({"ta": 0.45}), cell("g", "none", "ta", 0.9), cell("g", "align", "ta", 0.9)]
    s = score(records, attacks=ATTACKS, n_bootstrap=10)
    e = s.entry(SUITE, "g")
    assert e.security is None and e.security_ci is None and e.rank is None
    assert e.has_flag("no_security")
    assert e.unranked_reason == "no attack could be scored"


def test_missing_baseline_makes_recovered_na_with_reason():
    records = [*references({"ta": 0.8}), cell("g", "none", "ta", 0.6)]
    (v,) = score(records, attacks=["none"], n_bootstrap=10).victim_scores(SUITE, "g")
    assert v.pairs[0].recovered is None and "no baseline" in v.pairs[0].na_reason


def noisy_records() -> list[CellRecord]:
    """Two partner sets x three seeds; recovered varies by replicate so intervals have width."""
    out = []
    for seed in range(3):
        out.append(baseline(seed=seed))
        for partners in (("p",), ("q",)):
            out += references({"ta": 0.8}, seed=seed, partners=partners)
            jitter = 0.02 * seed + (0.03 if partners == ("q",) else 0.0)
            out.append(cell("g", "none", "ta", 0.56 + jitter, seed=seed, partners=partners, utility=0.85 + jitter))
            out.append(cell("g", "align", "ta", 0.62 + jitter, seed=seed, partners=partners, utility=0.85 + jitter))
    return out


def test_bootstrap_intervals_are_deterministic_for_a_seed():
    a = score(noisy_records(), attacks=ATTACKS, n_bootstrap=200, seed=3).entry(SUITE, "g")
    b = score(noisy_records(), attacks=ATTACKS, n_bootstrap=200, seed=3).entry(SUITE, "g")
    c = score(noisy_records(), attacks=ATTACKS, n_bootstrap=200, seed=4).entry(SUITE, "g")
    assert a.security_ci == b.security_ci and a.utility_ci == b.utility_ci
    assert a.security_ci != c.security_ci  # the seed drives the resampling
    lo, hi = a.security_ci
    assert lo < a.security < hi
    assert 0.0 <= lo and hi <= 1.0


def test_bootstrap_interval_spans_replicate_extremes_only():
    s = score(noisy_records(), attacks=ATTACKS, n_bootstrap=500, seed=0)
    (v,) = s.victim_scores(SUITE, "g")
    per_replicate = [1 - (0.12 + 0.02 * seed + q) / 0.3 for seed in range(3) for q in (0.0, 0.03)]
    lo, hi = v.security_ci
    assert min(per_replicate) - 1e-9 <= lo and hi <= max(per_replicate) + 1e-9
    assert v.security == pytest.approx(sum(per_replicate) / 6)
    assert len(v.replicates) == 6


def test_single_replicate_interval_collapses_to_the_point():
    e = score(worked_example(), attacks=ATTACKS, n_bootstrap=50).entry(SUITE, "guard")
    assert e.security_ci == pytest.approx((0.2, 0.2))


def test_function_preservation_violation_is_flagged():
    broken = {"function_preservation": {"claimed": True, "max_abs_diff": 0.3, "ok": False}}
    fine = {"function_preservation": {"claimed": True, "max_abs_diff": 1e-7, "ok": True}}
    records = [baseline(), *references({"ta": 0.8}),
               cell("bad", "none", "ta", 0.6, flags=broken), cell("bad", "align", "ta", 0.6),
               cell("good", "none", "ta", 0.6, flags=fine), cell("good", "align", "ta", 0.6)]
    s = score(records, attacks=ATTACKS, n_bootstrap=10)
    assert s.entry(SUITE, "bad").has_flag("function_preservation_violated")
    assert "0.3" in next(f.message for f in s.entry(SUITE, "bad").flags)
    assert not s.entry(SUITE, "good").has_flag("function_preservation_violated")


def test_function_preservation_without_ok_uses_tolerance():
    flags = {"function_preservation": {"claimed": True, "max_abs_diff": 10 * scoring.FP_TOLERANCE}}
    records = [baseline(), *references({"ta": 0.8}), cell("g", "none", "ta", 0.6, flags=flags)]
    assert score(records, attacks=["none"], n_bootstrap=5).entry(SUITE, "g").has_flag("function_preservation_violated")


def test_utility_below_floor_is_flagged_and_unranked():
    records = [baseline(), *references({"ta": 0.8}),
               cell("wrecker", "none", "ta", 0.5, utility=0.45), cell("wrecker", "align", "ta", 0.5, utility=0.45),
               cell("honest", "none", "ta", 0.7, utility=0.9), cell("honest", "align", "ta", 0.7, utility=0.9)]
    s = score(records, attacks=ATTACKS, n_bootstrap=10)
    wrecker = s.entry(SUITE, "wrecker")
    assert wrecker.security == 1.0 and wrecker.utility == pytest.approx(0.5)
    assert wrecker.has_flag("utility_below_floor") and wrecker.rank is None
    assert s.entry(SUITE, "honest").rank is not None
    # a lower floor lets it rank, first (it does have the best security)
    assert score(records, attacks=ATTACKS, n_bootstrap=10, utility_floor=0.4).entry(SUITE, "wrecker").rank == 1


def test_security_on_fewer_attacks_than_the_standard_set_is_incomplete_not_ranked():
    records = worked_example()
    s = score(records, attacks=["none", "align", "unmask"], n_bootstrap=10)
    e = s.entry(SUITE, "guard")
    assert e.attacks_missing == ["unmask"] and not e.complete
    assert e.has_flag("incomplete") and e.rank is None and "unmask" in e.unranked_reason
    assert e.security == pytest.approx(0.2)  # still reported, just not ranked


def test_attack_marked_not_applicable_does_not_make_security_incomplete():
    records = [*worked_example(), cell("guard", "taylor-inversion", "ta", 0.0, status="na",
                                       reason="only applies to structure-changed artifacts")]
    e = score(records, attacks=["none", "align", "taylor-inversion"], n_bootstrap=10).entry(SUITE, "guard")
    assert e.complete and e.rank is not None
    (v,) = score(records, attacks=["none", "align", "taylor-inversion"], n_bootstrap=10).victim_scores(SUITE, "guard")
    assert v.attacks_na == {"taylor-inversion": "only applies to structure-changed artifacts"}


def test_failed_attack_counts_as_missing_and_is_flagged():
    records = [*worked_example(), cell("guard", "unmask", "ta", 0.0, status="failed", reason="RuntimeError: boom")]
    e = score(records, attacks=["none", "align", "unmask"], n_bootstrap=10).entry(SUITE, "guard")
    assert e.attacks_missing == ["unmask"]
    assert e.has_flag("failed_cells") and e.has_flag("incomplete")


def test_standard_attacks_default_to_every_planned_attack():
    from bench.plan import standard_attacks as planned
    from bench.registry import attacks

    default = scoring.standard_attacks()
    assert default == sorted(planned()) and set(attacks.names()) <= set(default)
    assert scoring.standard_attacks(["b", "a", "b"]) == ["a", "b"]


def test_a_sweep_point_covers_its_attack():
    swept = cell("guard", "align[steps=10]", "ta", 0.6)
    swept = dataclasses.replace(swept, spec={"attack": {"name": "align", "version": "1", "params": {"steps": 10}}})
    records = [baseline(), *references({"ta": 0.8}), cell("guard", "none", "ta", 0.55), swept]
    s = score(records, attacks=ATTACKS, n_bootstrap=5)
    e = s.entry(SUITE, "guard")
    assert e.complete and e.best_attack == "align[steps=10]"
    assert e.best_recovered == pytest.approx(1 / 3)


def test_partner_side_effect_compares_protected_and_unprotected_merges():
    records = [baseline(), cell("none", "none", "ta", 0.8, partner_merged=0.7),
               cell("g", "none", "ta", 0.6, partner_merged=0.64), cell("g", "align", "ta", 0.7, partner_merged=0.5)]
    (v,) = score(records, attacks=ATTACKS, n_bootstrap=5).victim_scores(SUITE, "g")
    assert v.partner_effect == pytest.approx(-0.06)  # the plain merge (attack none) is the summary
    assert {p.attack: p.partner_effect for p in v.pairs} == pytest.approx({"none": -0.06, "align": -0.2})


def test_ranking_orders_by_security_and_stability_reports_flips():
    records = [baseline(), *references({"ta": 0.8})]
    for name, merged in (("strong", 0.53), ("middling", 0.65), ("weak", 0.77)):
        records += [cell(name, "none", "ta", merged), cell(name, "align", "ta", merged)]
    s = score(records, attacks=ATTACKS, n_bootstrap=30)
    ranks = {d.defense: d.rank for d in s.suites}
    assert ranks == {"strong": 1, "middling": 2, "weak": 3, "none": 4}
    st = s.stability[SUITE]
    assert st.defenses == ["strong", "middling", "weak", "none"]
    assert st.stable_fraction == 1.0  # one replicate: nothing to resample differently
    assert st.rank_probability[0] == [1.0, 0.0, 0.0, 0.0]
    assert [f for _, _, f in st.pairwise_flip] == [0.0, 0.0, 0.0]


def test_rank_stability_sees_flips_when_replicates_disagree():
    records = []
    for seed, (a, b) in enumerate([(0.56, 0.62), (0.62, 0.56), (0.59, 0.60), (0.61, 0.57)]):
        records += [baseline(seed=seed), *references({"ta": 0.8}, seed=seed),
                    cell("a", "none", "ta", a, seed=seed), cell("b", "none", "ta", b, seed=seed)]
    s = score(records, attacks=["none"], n_bootstrap=400, seed=1)
    st = s.stability[SUITE]
    first_pair = st.pairwise_flip[0]
    assert 0.05 < first_pair[2] < 0.95
    assert 0.0 < st.stable_fraction < 1.0
    assert all(math.isclose(sum(row), 1.0) for row in st.rank_probability)


def test_overall_score_averages_over_suites():
    records = []
    for suite, merged in (("s1", 0.62), ("s2", 0.74)):  # security 0.6 and 0.2
        records += [baseline(suite=suite), *references({"ta": 0.8}, suite=suite),
                    cell("g", "none", "ta", merged, suite=suite)]
    s = score(records, attacks=["none"], n_bootstrap=10)
    (g,) = [d for d in s.overall if d.defense == "g"]
    assert g.security == pytest.approx(0.4) and g.suites == ["s1", "s2"]
    assert (g.best_attack, g.best_recovered) == ("none", pytest.approx(0.8))


def test_newest_duplicate_cell_wins():
    records = [*worked_example(), cell("guard", "align", "ta", 0.5, utility=0.88, created=9.0)]
    (v,) = score(records, attacks=ATTACKS, n_bootstrap=5).victim_scores(SUITE, "guard")
    assert {(p.attack, p.merge): p.recovered for p in v.pairs}[("align", "ta")] == pytest.approx(0.0)


def test_defense_na_on_a_whole_suite_is_listed_not_scored():
    records = [*worked_example(), cell("attn-only", "none", "ta", 0.0, status="na", reason="needs attention")]
    s = score(records, attacks=ATTACKS, n_bootstrap=5)
    assert s.not_applicable == [(SUITE, "attn-only", "needs attention")]
    assert all(d.defense != "attn-only" for d in s.suites)


def test_bad_bootstrap_settings_raise_a_sentence():
    with pytest.raises(ScoringError, match="n_bootstrap"):
        score(worked_example(), n_bootstrap=0)
    with pytest.raises(ScoringError, match="ci_level"):
        score(worked_example(), ci_level=1.5)


def test_table_lists_overall_then_suites_ranked_first():
    text = format_table(score(worked_example(), attacks=["none", "align", "unmask"], n_bootstrap=5))
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["rank", "suite", "defense"]
    body = [line.split() for line in lines[2:]]
    assert [row[1] for row in body] == ["overall", "overall", SUITE, SUITE]
    assert "incomplete" in text  # the missing 'unmask' attack is shown, not hidden
    assert format_table(score([], attacks=["none"], n_bootstrap=5)).startswith("no scored cells")


def test_summary_tables_read_the_newest_cell_per_coordinates_like_the_scores():
    from bench.report import summary_tables

    old = cell("guard", "none", "ta", 0.3, utility=0.4, created=2.0)
    new = cell("guard", "none", "ta", 0.8, utility=0.7, created=3.0)  # a re-run under a newer plugin version
    failed = dataclasses.replace(cell("guard", "none", "ta", 0.0, created=4.0), status="failed", metrics=())
    text = summary_tables([baseline(), new, old, failed], tasks=["v"])
    assert "0.800" in text and "0.700" in text
    assert not {"0.300", "0.400", "0.550"} & set(text.split())  # neither the superseded cell nor an average (0.55)
    assert "Not run" not in text  # the failure is of a cell a successful one stands for
    assert "Not run" in summary_tables([baseline(), failed], tasks=["v"])

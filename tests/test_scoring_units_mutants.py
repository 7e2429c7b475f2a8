"""Unit tests of the scoring package's module-level helpers: cell indexing and reference lookup
(`bench.scoring.cells`), the numeric core of bootstraps and intervals (`bench.scoring.bootstrap`) and the
selection / held-out split with the choice of the worst pair (`bench.scoring.selection`).

Every expected value is worked out by hand (arithmetic in comments) or by a naive loop written here from
the functions' documented definitions; the code under test is never used to produce an expectation."""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import replace

import numpy as np
import pytest

from bench.outcomes import encode
from bench.plan import counterpart_spec, spec_id
from bench.scoring.bootstrap import (
    PairOutcomes,
    PairStatistics,
    bootstrap_counts,
    flip,
    pair_statistics,
    percentile_ci,
    present_replicates,
    recovered_fraction,
    stable_rng,
    utility_ratio,
    weighted_means,
)
from bench.scoring.cells import (
    CellIndex,
    attack_name,
    examples,
    experts,
    index,
    maximum,
    mean,
    newest,
    number,
    primary_metric,
    quiet_nanmean,
    same_experts,
    sign,
    timing,
    utility_key,
)
from bench.scoring.selection import (
    common_replicates,
    example_split,
    indicator,
    select_worst_pair,
    selection_split,
)
from bench.store import CellRecord, Metric
from tests.scored_cells import RECIPE, SUITE, merge_spec, plugin, record

# ---------------------------------------------------------------------------------------------------------
# helpers


def _cell(**kw) -> CellRecord:
    """A bare merge cell; keyword arguments override its fields."""
    base = dict(cell_id="c", kind="merge", suite="toy", victim="v", partners=("p",), defense="d", attack="a",
                merge="m", seed=0, status="ok")
    base.update(kw)
    return CellRecord(**base)


def _hashed(expert: str | None, pretrained: str | None, partners=()) -> CellRecord:
    hashes = {"partners": list(partners)}
    if expert is not None:
        hashes["expert"] = expert
    if pretrained is not None:
        hashes["pretrained"] = pretrained
    return _cell(provenance={"hashes": hashes})


# ---------------------------------------------------------------------------------------------------------
# cells: experts, same_experts


def test_experts_reads_victim_sorted_partners_and_pretrained_hashes():
    c = _hashed("E", "PRE", partners=["z2", "a1"])
    assert experts(c) == ("E", ("a1", "z2"), "PRE")
    assert experts(_cell(provenance={"hashes": {"expert": "E", "pretrained": "PRE"}})) == ("E", (), "PRE")


def test_experts_is_unknown_when_either_hash_is_missing():
    assert experts(_hashed("E", None)) is None  # expert known, θ_pre unknown
    assert experts(_hashed(None, "PRE")) is None
    assert experts(_hashed("", "PRE")) is None
    assert experts(_cell(provenance={})) is None


def test_same_experts_unknown_on_either_side_counts_as_the_same():
    known = _hashed("E", "PRE", ["p"])
    unknown = _cell(provenance={})
    assert same_experts(known, unknown) is True
    assert same_experts(unknown, known) is True


def test_same_experts_compares_victim_expert_and_pretrained():
    a = _hashed("E", "PRE", ["p"])
    assert same_experts(a, _hashed("E", "PRE", ["p"])) is True
    assert same_experts(a, _hashed("E2", "PRE", ["p"])) is False
    assert same_experts(a, _hashed("E", "PRE2", ["p"])) is False
    assert same_experts(a, _hashed("E2", "PRE", ["p"]), partners=False) is False


def test_same_experts_partner_sets_count_only_when_both_recorded_and_asked_for():
    a = _hashed("E", "PRE", ["p", "q"])
    b = _hashed("E", "PRE", ["q", "p"])  # the same set, another order
    other = _hashed("E", "PRE", ["r"])
    none_recorded = _hashed("E", "PRE", [])
    assert same_experts(a, b) is True
    assert same_experts(a, other) is False
    assert same_experts(a, other, partners=False) is True
    assert same_experts(none_recorded, other) is True  # left side records no partners
    assert same_experts(other, none_recorded) is True  # right side records no partners


# ---------------------------------------------------------------------------------------------------------
# cells: attack_name, primary_metric, sign, number, timing, mean, maximum, quiet_nanmean


def test_attack_name_is_the_spec_name_of_a_sweep_point_not_its_label():
    spec = {"attack": {"name": "undo", "params": {"k": 3}}}
    assert attack_name(_cell(attack="undo[k=3]", spec=spec)) == "undo"


def test_attack_name_falls_back_to_the_label_without_a_usable_spec_name():
    assert attack_name(_cell(attack="lbl", spec={})) == "lbl"
    assert attack_name(_cell(attack="lbl", spec={"attack": None})) == "lbl"
    assert attack_name(_cell(attack="lbl", spec={"attack": {"name": ""}})) == "lbl"
    assert attack_name(_cell(attack="lbl", spec={"attack": {"name": 7}})) == "lbl"
    assert attack_name(_cell(attack="lbl", spec={"attack": {"version": "1"}})) == "lbl"
    assert attack_name(_cell(attack="lbl", spec=None)) == "lbl"


def test_primary_metric_prefers_the_documented_order_then_alphabetical():
    assert primary_metric(["f1", "acc", "zz"]) == "acc"  # 'acc' comes before 'f1' in PRIMARY_METRICS
    assert primary_metric(["perplexity", "f1"]) == "f1"
    assert primary_metric(["loss", "bleu", "loss"]) == "bleu"
    assert primary_metric(["b", "a"]) == "a"
    assert primary_metric([]) is None


def test_sign_is_plus_one_for_higher_is_better_minus_one_otherwise():
    assert sign(True) == 1.0
    assert sign(False) == -1.0


def test_number_accepts_finite_reals_only():
    assert number(3) == 3.0 and isinstance(number(3), float)
    assert number(-2.5) == -2.5
    assert number(True) is None
    assert number(float("nan")) is None
    assert number(float("inf")) is None
    assert number("1") is None
    assert number(None) is None


def test_timing_sums_the_recorded_stages_and_is_none_when_none_recorded():
    c = _cell(provenance={"timings": {"protect": 2.0, "merge": 3, "eval": "fast"}})
    assert timing(c, "protect", "merge") == 5.0  # 2 + 3
    assert timing(c, "protect", "missing") == 2.0
    assert timing(c, "eval") is None  # not a number
    assert timing(c, "missing") is None
    assert timing(_cell(provenance={}), "protect") is None


def test_mean_and_maximum_skip_missing_values():
    assert mean([1.0, None, 4.0]) == 2.5  # (1 + 4) / 2
    assert mean([None]) is None
    assert mean([]) is None
    assert maximum([1.0, None, 4.0, -2.0]) == 4.0
    assert maximum([None, -3.0]) == -3.0
    assert maximum([None]) is None
    assert maximum([]) is None


def test_quiet_nanmean_of_an_all_nan_column_is_nan_without_a_warning():
    a = np.array([[1.0, np.nan], [3.0, np.nan]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = quiet_nanmean(a, axis=0)
    assert out[0] == 2.0 and math.isnan(out[1])


# ---------------------------------------------------------------------------------------------------------
# cells: examples


def _metrics_cell() -> CellRecord:
    a = np.array([1.0, 0.0, 1.0, 1.0])
    b = np.array([0.0, 0.0, 1.0, 0.0])
    o = np.array([0.5, 0.25])
    return _cell(victim="v", metrics=(
        Metric("merged", "v", "accuracy", 0.75, True, encode(a)),
        Metric("merged", "v", "f1", 0.25, True, encode(b)),
        Metric("merged", "other", "accuracy", 0.375, True, encode(o)),
        Metric("utility", "v", "accuracy", 0.5, True, encode(b)),
        Metric("merged", "v", "ppl", 2.0, False, ""),
        Metric("merged", "v", "nanmetric", float("nan"), True, ""),
        Metric("merged", "v", "broken", 0.5, True, "nonsense:3:xx"),
    ))


def test_examples_reads_the_asked_role_task_and_metric_with_its_sign():
    c = _metrics_cell()
    np.testing.assert_array_equal(examples(c, "merged", "v", "accuracy", 1.0), [1.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(examples(c, "merged", "v", "f1", 1.0), [0.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(examples(c, "merged", "other", "accuracy", -1.0), [-0.5, -0.25])
    np.testing.assert_array_equal(examples(c, "utility", "v", "accuracy", 1.0), [0.0, 0.0, 1.0, 0.0])


def test_examples_of_a_metric_without_outcomes_is_its_signed_value():
    c = _metrics_cell()
    np.testing.assert_array_equal(examples(c, "merged", "v", "ppl", -1.0), [-2.0])  # -1 · 2.0


def test_examples_is_none_for_absent_non_finite_or_undecodable_metrics():
    c = _metrics_cell()
    assert examples(c, "merged", "v", "missing", 1.0) is None
    assert examples(c, "pretrained", "v", "accuracy", 1.0) is None
    assert examples(c, "merged", "v", "nanmetric", 1.0) is None
    assert examples(c, "merged", "v", "broken", 1.0) is None


# ---------------------------------------------------------------------------------------------------------
# cells: utility_key, newest, index, CellIndex.reference


def test_utility_key_is_suite_recipe_victim_seed_and_canonical_defense():
    c = _cell(suite="s", victim="w", seed=3, spec={"recipe_hash": "r9", "defense": {"params": {"b": 1, "a": 2},
                                                                                   "name": "d"}})
    # canonical JSON: sorted keys, no spaces
    assert utility_key(c) == ("s", "r9", "w", 3, '{"name":"d","params":{"a":2,"b":1}}')
    bare = _cell(suite="s", victim="w", seed=1, spec={})
    assert utility_key(bare) == ("s", "", "w", 1, "null")


def test_utility_key_separates_victims_seeds_recipes_and_defenses():
    spec = {"recipe_hash": "r", "defense": plugin("d", strength=1)}
    base = _cell(spec=spec)
    keys = {
        utility_key(base),
        utility_key(replace(base, victim="v2")),
        utility_key(replace(base, seed=1)),
        utility_key(replace(base, suite="other")),
        utility_key(replace(base, spec={**spec, "recipe_hash": "r2"})),
        utility_key(replace(base, spec={**spec, "defense": plugin("d", strength=2)})),
        utility_key(replace(base, spec={**spec, "defense": plugin("e", strength=1)})),
    }
    assert len(keys) == 7
    # the partner set is not part of it: one utility cell serves every partner set
    assert utility_key(replace(base, partners=("q", "r"))) == utility_key(base)


def test_newest_keeps_the_latest_cell_per_coordinates_whatever_its_status():
    old = _cell(cell_id="a", created=1.0)
    new_failed = _cell(cell_id="b", created=2.0, status="failed")
    elsewhere = _cell(cell_id="c", created=0.5, seed=1)
    out = newest([new_failed, elsewhere, old])
    assert sorted(c.cell_id for c in out) == ["b", "c"]


def _baseline_without_recipe(created: float) -> CellRecord:
    spec = {"kind": "baseline", "suite": SUITE, "victim": "v", "partners": ["p"], "seed": 2, "defense": None,
            "attack": None, "merge": None}
    return CellRecord(cell_id=f"b{created}", kind="baseline", suite=SUITE, victim="v", partners=("p",), defense="-",
                      attack="-", merge="-", seed=2, status="ok", spec=spec, created=created,
                      metrics=(Metric("expert", "v", "accuracy", 0.9),))


def test_index_keys_baselines_by_recipe_hash_defaulting_to_empty():
    b = _baseline_without_recipe(1.0)
    with_recipe = replace(b, cell_id="br", seed=3, spec={**b.spec, "recipe_hash": RECIPE, "seed": 3})
    ix = index([b, with_recipe])
    assert set(ix.baselines) == {(SUITE, "", "v", 2), (SUITE, RECIPE, "v", 3)}
    assert ix.baselines[(SUITE, "", "v", 2)] is b


def test_index_drops_failed_merge_cells_from_protected_and_unprotected_and_lists_them():
    spec = merge_spec("v", ("p",), 0, "d", "a", "m")
    ok_p = record(spec, [], created=1.0)
    failed_p = record(spec, [], status="failed", created=2.0)
    na_p = record(merge_spec("v", ("p",), 1, "d", "a", "m"), [], status="na", created=1.0)
    uspec = counterpart_spec(spec, "unprotected")
    ok_u = record(uspec, [], created=1.0)
    failed_u = record(uspec, [], status="failed", created=2.0)
    other_u = record(counterpart_spec(merge_spec("v", ("p",), 1, "d", "a", "m"), "unprotected"), [], created=1.0)
    ix = index([ok_p, failed_p, na_p, ok_u, failed_u, other_u])
    assert ix.protected == [na_p]  # the newest at seed 0 failed: nothing to score there
    assert ix.unprotected == [other_u]
    assert {c.cell_id for c in ix.failed} == {failed_p.cell_id, failed_u.cell_id}
    assert len(ix.failed) == 2


def test_index_metric_of_reads_the_primary_metric_and_its_direction_per_suite_and_task():
    spec = merge_spec("v", ("p",), 0, "d", "a", "m")
    c = record(spec, [Metric("merged", "v", "perplexity", 3.0, False), Metric("merged", "v", "f1", 0.5, True),
                      Metric("merged", "t", "perplexity", 4.0, False)])
    ix = index([c])
    assert ix.metric_of == {(SUITE, "v"): ("f1", True), (SUITE, "t"): ("perplexity", False)}


def test_index_utility_keeps_the_newest_ok_utility_cell_per_key():
    spec = {"kind": "utility", "suite": SUITE, "recipe_hash": RECIPE, "victim": "v", "partners": ["p"], "seed": 0,
            "defense": plugin("d"), "attack": None, "merge": None}
    old = record(spec, [Metric("utility", "v", "accuracy", 0.5)], created=1.0)
    new = replace(old, cell_id="newer", created=3.0)
    newer_failed = replace(old, cell_id="failed", created=4.0, status="failed")
    ix = index([newer_failed, new, old])
    assert ix.utility == {(SUITE, RECIPE, "v", 0, '{"name":"d","params":{},"version":"1"}'): new}
    assert ix.by_id["failed"] is newer_failed


def _with_evaluate(spec: dict) -> dict:
    return {**spec, "evaluate": ["v"]}


def test_reference_prefers_the_counterpart_evaluated_as_the_protected_cell_was():
    spec = _with_evaluate(merge_spec("v", ("p",), 0, "d", "none", "m"))
    exact = counterpart_spec(spec, "unprotected")  # keeps 'evaluate'
    everything = {k: v for k, v in exact.items() if k != "evaluate"}
    c_exact, c_all = record(exact, []), record(everything, [])
    protected = record(spec, [])
    ix = index([protected, c_exact, c_all])
    assert ix.reference(protected, "unprotected") == (c_exact, spec_id(exact))


def test_reference_falls_back_to_the_counterpart_evaluated_on_every_task():
    spec = _with_evaluate(merge_spec("v", ("p",), 0, "d", "none", "m"))
    exact = counterpart_spec(spec, "unprotected")
    everything = {k: v for k, v in exact.items() if k != "evaluate"}
    c_all = record(everything, [])
    protected = record(spec, [])
    ix = index([protected, c_all])
    assert ix.reference(protected, "unprotected") == (c_all, spec_id(everything))


def test_reference_not_stored_names_the_exact_counterpart_id():
    spec = _with_evaluate(merge_spec("v", ("p",), 0, "d", "none", "m"))
    protected = record(spec, [])
    ix = index([protected])
    exact = counterpart_spec(spec, "unprotected")
    assert spec_id(exact) != spec_id({k: v for k, v in exact.items() if k != "evaluate"})
    assert ix.reference(protected, "unprotected") == (None, spec_id(exact))
    assert isinstance(ix, CellIndex)


# ---------------------------------------------------------------------------------------------------------
# bootstrap: recovered_fraction, utility_ratio


def test_recovered_fraction_of_a_lower_is_better_metric():
    # s = -1: gain = -(2 - 5) = 3; recovered = -(3 - 5) / 3 = 2/3
    assert recovered_fraction(3.0, 2.0, 5.0, higher_is_better=False) == pytest.approx(2 / 3)
    assert recovered_fraction(0.7, 0.9, 0.5) == pytest.approx(0.5)  # (0.7 - 0.5) / (0.9 - 0.5)
    assert recovered_fraction(0.7, 0.5, 0.5) is None  # no gain
    assert recovered_fraction(1.2, 0.9, 0.5) == 1.0 and recovered_fraction(0.1, 0.9, 0.5) == 0.0  # clipped


def test_utility_ratio_defaults_to_higher_is_better_and_is_none_for_a_zero_denominator():
    assert utility_ratio(0.8, 1.0) == pytest.approx(0.8)
    assert utility_ratio(4.0, 2.0, higher_is_better=False) == pytest.approx(0.5)  # expert / artifact = 2 / 4
    assert utility_ratio(0.8, 0.0) is None
    assert utility_ratio(0.0, 1.0, higher_is_better=False) is None


# ---------------------------------------------------------------------------------------------------------
# bootstrap: weighted_means, pair_statistics, present_replicates


def _naive_weighted_means(x: np.ndarray, w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Per draw b: Σ_r c[b,r]·m[b,r] / Σ_r c[b,r] over replicates r with no NaN, m[b,r] = Σ_i w[b,i]·x[r,i] / Σ_i w[b,i]."""
    out = []
    for b in range(w.shape[0]):
        num = den = 0.0
        for r in range(x.shape[0]):
            if np.isnan(x[r]).any():
                continue
            m = sum(w[b, i] * x[r, i] for i in range(x.shape[1])) / sum(w[b, :])
            num += c[b, r] * m
            den += c[b, r]
        out.append(num / den if den else np.nan)
    return np.array(out)


def test_weighted_means_weighs_examples_then_replicates_per_draw():
    x = np.array([[1.0, 0.0, 2.0], [np.nan, np.nan, np.nan], [4.0, 1.0, 0.0]])
    w = np.array([[1.0, 2.0, 1.0], [0.0, 3.0, 0.0], [2.0, 0.0, 5.0]])
    c = np.array([[1.0, 1.0, 1.0], [2.0, 5.0, 1.0], [0.0, 1.0, 3.0]])
    # draw 0: rep0 (1 + 0 + 2)/4 = 0.75, rep2 (4 + 2 + 0)/4 = 1.5 -> (0.75 + 1.5)/2 = 1.125
    got = weighted_means(x, w, c)
    np.testing.assert_allclose(got, _naive_weighted_means(x, w, c))
    assert got[0] == pytest.approx(1.125)
    assert np.isfinite(got).all()


def test_weighted_means_of_a_draw_with_no_present_replicate_is_nan_without_warning():
    x = np.array([[1.0, 2.0], [np.nan, np.nan]])
    w = np.ones((2, 2))
    c = np.array([[0.0, 3.0], [1.0, 0.0]])  # draw 0 resampled only the missing replicate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = weighted_means(x, w, c)
    assert math.isnan(got[0]) and got[1] == pytest.approx(1.5)


def test_pair_statistics_gain_and_recovered_per_draw():
    p = np.array([[0.6, 0.8]])
    u = np.array([[1.0, 1.0]])
    z = np.array([[0.2, 0.4]])
    w = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    s = pair_statistics(PairOutcomes(p, u, z), w, np.ones((3, 1)))
    np.testing.assert_allclose(s.v_protected, [0.7, 0.6, 0.8])
    np.testing.assert_allclose(s.gain, [0.7, 0.8, 0.6])  # 1 - 0.3, 1 - 0.2, 1 - 0.4
    np.testing.assert_allclose(s.recovered, [0.4 / 0.7, 0.4 / 0.8, 0.4 / 0.6])


def test_pair_statistics_recovered_is_clipped_and_nan_without_gain():
    s = PairStatistics(np.array([2.0, -1.0, 0.5, 0.5]), np.array([1.0, 1.0, 0.3, 0.2]), np.array([0.0, 0.0, 0.3, 0.3]))
    r = s.recovered
    assert r[0] == 1.0 and r[1] == 0.0
    assert math.isnan(r[2]) and math.isnan(r[3])  # gain 0 and gain < 0


def test_present_replicates_needs_all_three_fillings():
    ok = np.zeros((4, 2))
    p, u, z = ok.copy(), ok.copy(), ok.copy()
    p[1, 0] = np.nan
    u[2, 1] = np.nan
    z[3, :] = np.nan
    np.testing.assert_array_equal(present_replicates(PairOutcomes(p, u, z)), [True, False, False, False])


# ---------------------------------------------------------------------------------------------------------
# bootstrap: bootstrap_counts, percentile_ci, flip, stable_rng


def test_bootstrap_counts_resample_every_index_with_rows_summing_to_n():
    counts = bootstrap_counts(np.random.default_rng(0), 7, 50)
    assert counts.shape == (50, 7)
    np.testing.assert_array_equal(counts.sum(axis=1), np.full(50, 7.0))
    assert (counts == np.round(counts)).all() and counts.min() >= 0
    assert (counts.sum(axis=0) > 0).all()  # 350 picks over 7 indices: every index is drawn somewhere
    assert counts.std() > 0


def test_bootstrap_counts_within_put_all_mass_on_the_given_indices():
    within = np.array([1, 4, 5])
    counts = bootstrap_counts(np.random.default_rng(1), 8, 40, within=within)
    assert counts.shape == (40, 8)
    np.testing.assert_array_equal(counts.sum(axis=1), np.full(40, 3.0))
    outside = np.setdiff1d(np.arange(8), within)
    assert (counts[:, outside] == 0).all()
    assert (counts[:, within].sum(axis=0) > 0).all()


def test_percentile_ci_is_the_central_percentile_interval():
    draws = np.arange(101.0)  # the p-th percentile of 0..100 is p
    assert percentile_ci(draws, 0.9) == pytest.approx((5.0, 95.0))
    assert percentile_ci(draws, 0.5) == pytest.approx((25.0, 75.0))
    rng = np.random.default_rng(3)
    x = rng.normal(size=37)
    lo, hi = percentile_ci(x, 0.95)
    assert (lo, hi) == pytest.approx((np.quantile(x, 0.025), np.quantile(x, 0.975)))
    assert isinstance(lo, float) and isinstance(hi, float)


def test_percentile_ci_of_one_draw_is_that_draw_and_of_none_is_none():
    assert percentile_ci(np.array([0.3]), 0.95) == (0.3, 0.3)
    assert percentile_ci(np.array([]), 0.95) is None
    assert percentile_ci(np.array([]), 0.95, undefined=(0.0, 1.0)) is None


def test_percentile_ci_counts_undefined_draws_at_both_ends():
    draws = np.concatenate([np.arange(1, 91) / 100, np.full(11, np.nan)])  # 90 values, 11 undefined
    lo, hi = percentile_ci(draws, 0.9, undefined=(0.0, 1.0))
    low_filled = np.concatenate([np.arange(1, 91) / 100, np.zeros(11)])
    high_filled = np.concatenate([np.arange(1, 91) / 100, np.ones(11)])
    assert lo == pytest.approx(np.quantile(low_filled, 0.05))
    assert hi == pytest.approx(np.quantile(high_filled, 0.95))
    assert lo == 0.0 and hi == 1.0  # 11 of 101 draws at each end: beyond the 5 % tails


def test_percentile_ci_undefined_draws_at_the_ends_move_the_interval():
    values = np.linspace(0.2, 0.8, 97)
    draws = np.concatenate([values, [np.nan] * 4])
    lo, hi = percentile_ci(draws, 0.9, undefined=(0.0, 1.0))
    assert lo == pytest.approx(np.quantile(np.concatenate([values, np.zeros(4)]), 0.05))
    assert hi == pytest.approx(np.quantile(np.concatenate([values, np.ones(4)]), 0.95))
    assert 0.0 < lo < 0.3 and 0.7 < hi < 1.0


def test_percentile_ci_all_undefined_is_the_undefined_interval_or_none():
    nan3 = np.full(3, np.nan)
    assert percentile_ci(nan3, 0.95, undefined=(0.0, 1.0)) == (0.0, 1.0)
    assert percentile_ci(nan3, 0.95) is None


def test_percentile_ci_refuses_undefined_draws_it_was_not_told_how_to_count():
    with pytest.raises(ValueError, match=r"^bootstrap draws hold undefined values; say how they count"):
        percentile_ci(np.array([0.1, np.nan]), 0.95)


def test_flip_maps_an_interval_of_x_to_one_of_one_minus_x():
    assert flip((0.2, 0.7)) == pytest.approx((0.3, 0.8))
    assert flip(None) is None


def test_stable_rng_agrees_on_equal_keys_and_differs_when_any_part_differs():
    def first(*key):
        return stable_rng(*key).integers(0, 2**62, size=4).tolist()

    base = first(0, "toy", "v", "split")
    assert first(0, "toy", "v", "split") == base
    for other in [(1, "toy", "v", "split"), (0, "toy2", "v", "split"), (0, "toy", "w", "split"),
                  (0, "toy", "v", "draws"), (0, "toy", "v")]:
        assert first(*other) != base


def test_stable_rng_is_seeded_from_the_sha256_of_the_key_so_every_machine_draws_the_same():
    # the documented derivation (the first 8 bytes of sha256(repr(key)), little-endian) pins the draws
    # independently of the platform and of Python's hash randomisation
    key = (3, "toy", "v", "split")
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little")
    expected = np.random.default_rng(seed).random(5)
    np.testing.assert_array_equal(stable_rng(*key).random(5), expected)


# ---------------------------------------------------------------------------------------------------------
# selection: splits and indicator


def test_selection_split_halves_are_disjoint_sorted_and_cover_everything():
    for n in (2, 3, 7, 40):
        sel, held = selection_split(n, np.random.default_rng(n))
        assert len(sel) == n // 2 and len(held) == n - n // 2
        assert np.intersect1d(sel, held).size == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([sel, held])), np.arange(n))
        assert (np.diff(sel) > 0).all() and (np.diff(held) > 0).all()


def test_selection_split_of_fewer_than_two_examples_uses_everything_twice():
    sel, held = selection_split(1, np.random.default_rng(0))
    np.testing.assert_array_equal(sel, [0])
    np.testing.assert_array_equal(held, [0])
    sel, held = selection_split(0, np.random.default_rng(0))
    assert sel.size == 0 and held.size == 0


def test_selection_split_of_two_examples_puts_one_in_each_half():
    sel, held = selection_split(2, np.random.default_rng(5))
    assert sel.size == 1 and held.size == 1 and sel[0] != held[0]


def test_example_split_is_the_seeded_permutation_of_seed_suite_and_victim():
    # the split is part of what a published number means: it must be the same on every machine and in
    # every version, so it is pinned to its documented derivation (a permutation from the generator keyed by
    # (seed, suite, victim, "split"), first half selection), written out here with hashlib and numpy
    n = 30
    key = (4, "toy", "v", "split")
    gen = np.random.default_rng(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little"))
    perm = gen.permutation(n)
    sel, held = example_split(4, "toy", "v", n)
    np.testing.assert_array_equal(sel, np.sort(perm[:15]))
    np.testing.assert_array_equal(held, np.sort(perm[15:]))


def test_example_split_depends_on_seed_suite_and_victim():
    n = 40
    base = example_split(0, "toy", "v", n)[0].tolist()
    assert example_split(0, "toy", "v", n)[0].tolist() == base
    assert example_split(1, "toy", "v", n)[0].tolist() != base
    assert example_split(0, "toy2", "v", n)[0].tolist() != base
    assert example_split(0, "toy", "w", n)[0].tolist() != base


def test_indicator_is_one_row_of_ones_on_the_indices():
    w = indicator(5, np.array([0, 3]))
    np.testing.assert_array_equal(w, [[1.0, 0.0, 0.0, 1.0, 0.0]])


def test_common_replicates_marks_those_every_pair_has():
    full = np.zeros((3, 2))
    gap = full.copy()
    gap[1] = np.nan
    a = PairOutcomes(full, full, full)
    b = PairOutcomes(gap, full, full)
    np.testing.assert_array_equal(common_replicates([a, b], 3), [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(common_replicates([b, a], 3), [1.0, 0.0, 1.0])
    only0 = full.copy()
    only0[[1, 2]] = np.nan
    only1 = full.copy()
    only1[[0, 2]] = np.nan
    # nothing in common: every replicate counts
    disjoint = common_replicates([PairOutcomes(only0, full, full), PairOutcomes(only1, full, full)], 3)
    assert disjoint.shape == (3,)
    np.testing.assert_array_equal(disjoint, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(common_replicates([], 2), [1.0, 1.0])


# ---------------------------------------------------------------------------------------------------------
# selection: select_worst_pair


def _pair_of(p: list[float]) -> PairOutcomes:
    """One replicate, ∅ = 0 and U = 1 on every example: the recovered on any examples is the mean of P there."""
    p_row = np.array([p])
    return PairOutcomes(p_row, np.ones_like(p_row), np.zeros_like(p_row))


def test_select_worst_pair_chooses_on_the_selection_half_and_reports_the_held_out_half():
    sel, held = np.array([0, 1, 2]), np.array([3, 4, 5])
    a = _pair_of([1, 1, 1, 1, 0, 0])  # selection 3/3 = 1, held-out 1/3, all 4/6
    b = _pair_of([1, 1, 0, 1, 1, 1])  # selection 2/3, held-out 1, all 5/6
    ineligible = _pair_of([1, 1, 1, 1, 1, 1])  # would win everything if it counted
    counts = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 3, 0, 0], [0, 0, 0, 0, 2, 1.0]])
    out = select_worst_pair([ineligible, None, b, a], [False, True, True, True], sel, held, counts, np.ones((3, 1)))
    assert out.index == 3
    assert out.recovered == pytest.approx(1 / 3)
    assert out.selection_recovered == pytest.approx(1.0)
    assert out.naive == pytest.approx(5 / 6)  # the naive maximum is b's, over all examples
    # draws of a's held-out recovered: (1+0+0)/3, 3·1/3, (2·0 + 1·0)/3
    np.testing.assert_allclose(out.draws, [1 / 3, 1.0, 0.0])


def test_select_worst_pair_skips_a_pair_without_selection_gain_and_goes_on():
    sel, held = np.array([0, 1]), np.array([2, 3])
    # no gain on the selection half (U = ∅ there): undefined, skipped; its full value still counts in naive
    p = np.array([[0.0, 0.0, 1.0, 1.0]])
    u = np.array([[0.0, 0.0, 1.0, 1.0]])
    no_gain = PairOutcomes(p, u, np.zeros_like(p))  # all examples: recovered (0.5 - 0) / (0.5 - 0) = 1
    later = _pair_of([0.5, 0.5, 0.25, 0.25])  # selection 0.5, held-out 0.25, all 0.375
    out = select_worst_pair([no_gain, later], [True, True], sel, held, np.ones((1, 4)), np.ones((1, 1)))
    assert out.index == 1
    assert out.recovered == pytest.approx(0.25)
    assert out.naive == pytest.approx(1.0)


def test_select_worst_pair_without_a_scorable_pair_reports_nothing_but_the_naive_value():
    sel, held = np.array([0, 1]), np.array([2, 3])
    p = np.array([[0.0, 0.0, 1.0, 1.0]])
    no_gain = PairOutcomes(p, p.copy(), np.zeros_like(p))  # all examples: 0.5 / 0.5 = 1
    out = select_worst_pair([no_gain, None], [True, True], sel, held, np.ones((4, 4)), np.ones((4, 1)))
    assert out.index is None and out.recovered is None and out.selection_recovered is None
    assert out.naive == pytest.approx(1.0)
    assert out.draws.shape == (4,) and np.isnan(out.draws).all()


def test_select_worst_pair_reports_none_when_the_held_out_half_has_no_gain():
    sel, held = np.array([0, 1]), np.array([2, 3])
    p = np.array([[1.0, 1.0, 0.0, 0.0]])
    u = np.array([[1.0, 1.0, 0.0, 0.0]])  # gain only on the selection half
    pair = PairOutcomes(p, u, np.zeros_like(p))
    held_counts = np.array([[0.0, 0, 1, 1], [0, 0, 2, 0]])
    out = select_worst_pair([pair], [True], sel, held, held_counts, np.ones((2, 1)))
    assert out.index == 0 and out.selection_recovered == 1.0
    assert out.recovered is None
    assert np.isnan(out.draws).all()


def test_select_worst_pair_breaks_ties_by_tie_break_then_order():
    sel, held = np.array([0, 1]), np.array([2, 3])
    a = _pair_of([1, 0, 0, 0])  # selection 0.5, held-out 0
    b = _pair_of([0, 1, 1, 1])  # selection 0.5, held-out 1
    counts, reps = np.ones((1, 4)), np.ones((1, 1))
    assert select_worst_pair([a, b], [True, True], sel, held, counts, reps).index == 0
    assert select_worst_pair([a, b], [True, True], sel, held, counts, reps, tie_break=[(1,), (0,)]).index == 1
    assert select_worst_pair([a, b], [True, True], sel, held, counts, reps, tie_break=[(0,), (0,)]).index == 0
    # the point value outranks the tie-break
    c = _pair_of([1, 0.5, 0, 0])  # selection 0.75
    assert select_worst_pair([a, c], [True, True], sel, held, counts, reps, tie_break=[(0,), (1,)]).index == 1


def test_select_worst_pair_prefers_an_exact_recovery_to_a_noisy_touch_of_the_clip():
    # selection half: examples 0..3, U = 1, ∅ = 0. "exact" restores U on every example: every draw recovers 1.
    # "noisy" has P = 4 on example 0 and 0 on 1..3: its point value is 4/4 = 1 too, but the draws without
    # example 0 (the 2nd and 3rd rows of sel_counts) recover 0, so its lower bound is 0.
    sel, held = np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7])
    u = np.array([[1.0, 1, 1, 1, 1, 1, 1, 1]])
    z = np.zeros_like(u)
    exact = PairOutcomes(u.copy(), u, z)
    noisy = PairOutcomes(np.array([[4.0, 0, 0, 0, 1, 1, 1, 1]]), u, z)  # selection: 4/4 = 1 (= clip)
    sel_counts = np.array([[1.0, 1, 1, 1, 0, 0, 0, 0], [0, 2, 1, 1, 0, 0, 0, 0], [0, 0, 2, 2, 0, 0, 0, 0]])
    held_counts = np.array([[0.0, 0, 0, 0, 1, 1, 1, 1]])
    reps = np.ones((3, 1))
    # point values tie at 1 (noisy first wins by order); the lower bounds are 1 (exact) and 0 (noisy)
    assert select_worst_pair([noisy, exact], [True, True], sel, held, held_counts[:1].repeat(3, 0), reps).index == 0
    out = select_worst_pair([noisy, exact], [True, True], sel, held, held_counts[:1].repeat(3, 0), reps,
                            selection_counts=sel_counts)
    assert out.index == 1


def test_select_worst_pair_counts_a_selection_draw_without_gain_as_no_recovery():
    # "gappy" recovers fully where the victim gives anything, but in two of three selection draws U = ∅:
    # those draws count as 0, so its lower bound is 0 and a pair at 0.5 in every draw is chosen
    sel, held = np.array([0, 1, 2]), np.array([3, 4, 5])
    gappy = PairOutcomes(np.array([[1.0, 0, 0, 1, 1, 1]]), np.array([[1.0, 0, 0, 1, 1, 1]]), np.zeros((1, 6)))
    half = _pair_of([0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    sel_counts = np.array([[3.0, 0, 0, 0, 0, 0], [0, 3, 0, 0, 0, 0], [0, 1, 2, 0, 0, 0]])
    held_counts = np.ones((3, 6))
    out = select_worst_pair([gappy, half], [True, True], sel, held, held_counts, np.ones((3, 1)),
                            selection_counts=sel_counts)
    assert out.index == 1
    assert out.selection_recovered == pytest.approx(0.5)


def test_select_worst_pair_reports_the_chosen_pair_on_its_own_replicates():
    # two replicates; pair b misses replicate 1: the choice reads replicate 0 only, the report reads all of
    # the chosen pair's replicates with its own replicate counts
    sel, held = np.array([0, 1]), np.array([2, 3])
    u = np.ones((2, 4))
    z = np.zeros((2, 4))
    a = PairOutcomes(np.array([[1.0, 1, 0.5, 0.5], [0, 0, 0, 0]]), u, z)  # rep0 sel 1; rep1 sel 0
    b_p = np.array([[0.5, 0.5, 1, 1], [np.nan] * 4])
    b = PairOutcomes(b_p, u, z)  # rep0 sel 0.5
    counts = np.array([[0.0, 0, 1, 1], [0, 0, 1, 1]])
    rep_a = np.array([[1.0, 0.0], [1.0, 3.0]])
    rep_b = np.array([[1.0, 1.0], [0.0, 2.0]])
    out = select_worst_pair([a, b], [True, True], sel, held, counts, [rep_a, rep_b])
    # on replicate 0 only, a (1) beats b (0.5); over both of a's replicates a would be 0.5 and tie
    assert out.index == 0
    assert out.selection_recovered == pytest.approx(1.0)
    # held-out point over both replicates: (0.5 + 0) / 2
    assert out.recovered == pytest.approx(0.25)
    # draws: rep weights (1, 0) -> 0.5; (1, 3) -> (0.5 + 0) / 4 = 0.125
    np.testing.assert_allclose(out.draws, [0.5, 0.125])
    assert out.naive == pytest.approx(0.75)  # b over its replicate 0: (0.5 + 0.5 + 1 + 1) / 4


def _naive_recovered(pair: PairOutcomes, w: np.ndarray, c: np.ndarray) -> np.ndarray:
    vals = [_naive_weighted_means(x, w, c) for x in (pair.protected, pair.unprotected, pair.counterfactual)]
    out = []
    for vp, vu, vz in zip(*vals):
        gain = vu - vz
        out.append(float(np.clip((vp - vz) / gain, 0.0, 1.0)) if gain > 0 else np.nan)  # NaN stays NaN
    return np.array(out)


def _naive_select(pairs, eligible, sel, held, held_counts, reps, tie_break, sel_counts, level=0.95):
    """The documented rule, written out: among eligible pairs, the highest lower bound on the selection half
    (its point value without selection counts; draws without gain count 0), then the highest point value,
    then the smallest tie-break, then the first; read on the replicates every eligible pair has."""
    n, r = held_counts.shape[1], reps[0].shape[1]
    live = [p for p, ok in zip(pairs, eligible) if ok and p is not None]
    common = np.array([all(not any(np.isnan(x[k]).any() for x in (p.protected, p.unprotected, p.counterfactual))
                           for p in live) for k in range(r)], dtype=float)
    if not common.any():
        common = np.ones(r)
    ind = lambda idx: np.array([[1.0 if i in set(idx.tolist()) else 0.0 for i in range(n)]])  # noqa: E731
    naive, best, best_rank = None, None, None
    for i, (p, ok) in enumerate(zip(pairs, eligible)):
        if not ok or p is None:
            continue
        full = _naive_recovered(p, np.ones((1, n)), np.ones((1, r)))[0]
        if not np.isnan(full):
            naive = full if naive is None else max(naive, full)
        point = _naive_recovered(p, ind(sel), common[None, :])[0]
        if np.isnan(point):
            continue
        lower = point
        if sel_counts is not None:
            b = len(sel_counts)
            rc = reps[i][:b] if common.all() else np.tile(common, (b, 1))
            d = np.nan_to_num(_naive_recovered(p, sel_counts, rc), nan=0.0)
            lower = float(np.quantile(d, (1 - level) / 2))
        rank = (-lower, -point, *(tie_break[i] if tie_break else ()), i)
        if best_rank is None or rank < best_rank:
            best, best_rank = i, rank
    if best is None:
        return None, None, naive
    held_point = _naive_recovered(pairs[best], ind(held), np.ones((1, r)))[0]
    return best, (None if np.isnan(held_point) else held_point), naive


@pytest.mark.parametrize("seed", range(12))
def test_select_worst_pair_agrees_with_the_documented_rule_on_random_pairs(seed):
    rng = np.random.default_rng(seed)
    n, r, k, b = 10, 3, 4, 6
    pairs = []
    for _ in range(k):
        rate_z, rate_u = rng.uniform(0.1, 0.5), rng.uniform(0.3, 0.9)
        z = (rng.random((r, n)) < rate_z).astype(float)
        u = (rng.random((r, n)) < rate_u).astype(float)
        p = (rng.random((r, n)) < rng.uniform(0.1, 0.9)).astype(float)
        if rng.random() < 0.4:
            p[rng.integers(r)] = np.nan  # a missing replicate
        pairs.append(PairOutcomes(p, u, z))
    if seed % 3 == 0:
        pairs[1] = None
    eligible = [bool(e) for e in rng.random(k) < 0.8]
    sel, held = selection_split(n, rng)
    held_counts = bootstrap_counts(rng, n, b, within=held)
    per_pair = [bootstrap_counts(rng, r, b) for _ in range(k)]
    reps = per_pair if seed % 2 else per_pair[0]
    sel_counts = bootstrap_counts(rng, n, 5, within=sel) if seed % 4 < 2 else None
    tie = [(int(t),) for t in rng.integers(0, 2, size=k)] if seed % 5 < 2 else None
    out = select_worst_pair(pairs, eligible, sel, held, held_counts, reps, tie_break=tie, selection_counts=sel_counts)
    rep_list = per_pair if seed % 2 else [per_pair[0]] * k
    best, held_value, naive = _naive_select(pairs, eligible, sel, held, held_counts, rep_list, tie, sel_counts)
    assert out.index == best
    assert (out.naive is None) == (naive is None) and (naive is None or out.naive == pytest.approx(naive))
    if best is None:
        assert out.recovered is None and np.isnan(out.draws).all()
        return
    assert (out.recovered is None) == (held_value is None)
    if held_value is not None:
        assert out.recovered == pytest.approx(held_value)
    expected_draws = _naive_recovered(pairs[best], held_counts, rep_list[best])
    np.testing.assert_allclose(out.draws, expected_draws, equal_nan=True)


def _two_replicate_pairs() -> tuple[PairOutcomes, PairOutcomes]:
    """Selection half: examples 0, 1. "split" recovers 1 on replicate 0 and 0 on replicate 1 (0.5 over both);
    "steady" recovers 0.6 on both."""
    u, z = np.ones((2, 4)), np.zeros((2, 4))
    split = PairOutcomes(np.array([[1.0, 1, 0, 0], [0, 0, 0, 0]]), u, z)
    steady = PairOutcomes(np.full((2, 4), 0.6), u, z)
    return split, steady


def test_select_worst_pair_ignores_the_replicates_an_ineligible_pair_lacks():
    sel, held = np.array([0, 1]), np.array([2, 3])
    split, steady = _two_replicate_pairs()
    lacking_p = np.ones((2, 4))
    lacking_p[1] = np.nan
    lacking = PairOutcomes(lacking_p, np.ones((2, 4)), np.zeros((2, 4)))
    out = select_worst_pair([lacking, split, steady], [False, True, True], sel, held, np.ones((1, 4)),
                            np.ones((1, 2)))
    # both replicates count: split 0.5 < steady 0.6 (reading replicate 0 only would pick split at 1)
    assert out.index == 2
    assert out.selection_recovered == pytest.approx(0.6)


def test_select_worst_pair_lower_bounds_resample_replicates_when_every_pair_has_them_all():
    sel, held = np.array([0, 1]), np.array([2, 3])
    split, steady = _two_replicate_pairs()
    sel_counts = np.array([[1.0, 1, 0, 0], [2, 0, 0, 0]])
    # replicate counts of the draws: the selection draws take the first two rows, both on replicate 0 only
    reps = np.array([[2.0, 0], [2, 0], [1, 1]])
    out = select_worst_pair([split, steady], [True, True], sel, held, np.ones((3, 4)), reps,
                            selection_counts=sel_counts)
    # split's draws read replicate 0: 1 and 1 -> lower bound 1 > steady's 0.6 (its point value 0.5 < 0.6)
    assert out.index == 0
    assert out.selection_recovered == pytest.approx(0.5)


def test_select_worst_pair_equal_lower_bounds_fall_back_to_the_higher_point_value():
    sel, held = np.array([0, 1, 2]), np.array([3, 4, 5])
    u = np.array([[1.0, 1, 0, 1, 1, 1]])  # example 2 gives no gain
    z = np.zeros_like(u)
    low = PairOutcomes(np.array([[0.5, 0.5, 0, 0, 0, 0]]), u, z)  # selection (0.5 + 0.5 + 0) / 2 = 0.5
    high = PairOutcomes(np.array([[0.9, 0.7, 0, 1, 1, 1]]), u, z)  # selection (0.9 + 0.7) / 2 = 0.8
    # the first draw resamples example 2 only: no gain, counted 0 for both; the 2.5 % bound is then 0 for both
    sel_counts = np.array([[0.0, 0, 3, 0, 0, 0], [1, 1, 1, 0, 0, 0], [2, 1, 0, 0, 0, 0]])
    out = select_worst_pair([low, high], [True, True], sel, held, np.ones((3, 6)), np.ones((3, 1)),
                            selection_counts=sel_counts)
    assert out.index == 1
    assert out.selection_recovered == pytest.approx(0.8)


def test_select_worst_pair_lower_bound_is_the_two_and_a_half_percentile_of_the_selection_draws():
    # 41 selection draws: the 2.5 % percentile sits at position 0.025 · 40 = 1, the second smallest draw.
    # "spread" draws 0 once, 0.2 once and 1 otherwise: lower bound 0.2. "flat" recovers 0.21 in every draw,
    # so it is chosen (a bound read a little higher, e.g. at 2.55 %: 0.2 + 0.02 · 0.8 = 0.216, would not).
    sel, held = np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7])
    u = np.ones((1, 8))
    z = np.zeros((1, 8))
    spread = PairOutcomes(np.array([[0.0, 0.2, 1, 1, 1, 1, 1, 1]]), u, z)  # selection point (0 + .2 + 1 + 1) / 4
    flat = PairOutcomes(np.full((1, 8), 0.21), u, z)
    rows = [[1.0, 0, 0, 0], [0, 1.0, 0, 0]] + [[0, 0, 1.0, 0]] * 39
    sel_counts = np.hstack([np.array(rows), np.zeros((41, 4))])
    out = select_worst_pair([spread, flat], [True, True], sel, held, np.ones((1, 8)), np.ones((41, 1)),
                            selection_counts=sel_counts)
    assert out.index == 1
    assert out.selection_recovered == pytest.approx(0.21)
    # with the lower bound at 0.19 instead, "spread" (lower bound 0.2) wins
    flat19 = PairOutcomes(np.full((1, 8), 0.19), u, z)
    out = select_worst_pair([spread, flat19], [True, True], sel, held, np.ones((1, 8)), np.ones((41, 1)),
                            selection_counts=sel_counts)
    assert out.index == 0


# ---------------------------------------------------------------- the planner's counterpart rule


def test_a_protected_cells_protected_counterpart_is_itself_and_bad_input_is_named() -> None:
    spec = merge_spec("v", ("p",), 0, "params", "realign", "ta")
    # the protected filling keeps the defense and the attack: the cell's own spec, hence its own store key
    assert counterpart_spec(spec, "protected") == spec and spec_id(counterpart_spec(spec, "protected")) == spec_id(spec)
    # the references drop the defense and run the honest counterpart (a data-free undo attack: the plain merge)
    for filling in ("unprotected", "counterfactual"):
        ref = counterpart_spec(spec, filling)
        assert ref["defense"] is None and ref["attack"]["name"] == "none" and ref["filling"] == filling
    with pytest.raises(ValueError, match="only merge cells have counterparts; this is a 'utility' cell"):
        counterpart_spec({**spec, "kind": "utility"}, "unprotected")
    with pytest.raises(ValueError, match="unknown filling 'released'; use one of protected, unprotected, counterfactual"):
        counterpart_spec(spec, "released")


def test_a_composite_of_two_data_using_attacks_has_both_as_its_counterpart() -> None:
    from bench.plugins import CompositeAttack
    from bench.registry import attacks

    fine = attacks.get("merge-finetune")
    first, second = fine.from_overrides({"steps": "3"}), fine.from_overrides({"steps": "5"})
    both = CompositeAttack([attacks.get("realign")(), first, second]).counterpart()
    # realign's counterpart (none) is dropped; the two fine-tunes stay, in order
    assert isinstance(both, CompositeAttack) and [s.params.steps for s in both.steps] == [3, 5]
    assert CompositeAttack([attacks.get("realign")(), first]).counterpart() is first


@pytest.mark.parametrize("needs,own", [({}, False), ({"labelled": 4}, True), ({"unlabelled": 4}, True),
                                       ({"finetune_steps": 4}, True)])
def test_an_attack_that_uses_any_data_is_its_own_counterpart(needs, own) -> None:
    from bench.plugins import AttackNeeds
    from bench.registry import attacks

    attack = attacks.get("realign")()
    attack.needs = lambda: AttackNeeds(**needs)  # labelled, unlabelled or fine-tuning alone is enough
    assert (attack.counterpart() is attack) == own
    assert own or attack.counterpart().name == "none"


def test_only_an_unprotected_merge_that_tunes_for_no_victim_is_a_shared_reference() -> None:
    from types import SimpleNamespace

    from bench.plan import make_merge, shared_reference

    def cell(merge: str, filling: str = "unprotected", kind: str = "merge") -> SimpleNamespace:
        return SimpleNamespace(kind=kind, filling=filling, merge=make_merge(merge))

    assert shared_reference(cell("adamerging-layer"))  # unlabelled data only: the same merge for every victim
    assert not shared_reference(cell("adamerging-layer", "protected"))
    assert not shared_reference(cell("adamerging-layer", "counterfactual"))
    assert not shared_reference(cell("ta-tuned"))  # tunes λ on the victim's labelled samples
    assert not shared_reference(cell("ta"))  # no data: computed per cell as any plain merge

"""One (suite, defense, victim) scored from hand-built cells (`bench.scoring.victim`): which cells, roles,
metrics and seeds each number is read from, the flags and their messages, and the intervals.

Expected values are worked out by hand (the arithmetic is in the comments) or by a naive re-implementation
written here from the documented definitions (`bench.scoring` module docstring, `bench.scoring.bootstrap`):
a bootstrap draw resamples the test examples with replacement, drawn from `stable_rng` keyed by
(seed, suite, victim, stream), "seeded by (suite, victim), not by defense". The code under test never
produces an expectation.

The cells are built so that a mutation reading the wrong thing changes the answer: every cell carries a
decoy metric ``zz_aux`` on the same role and task *before* the primary one (a lookup without the metric
name reads the decoy), outcomes are random and not nested, and victims, seeds and partners differ.
"""

from __future__ import annotations

import numpy as np
import pytest
from scored_cells import RECIPE, SUITE, merge_spec, outcomes, plugin, record  # noqa: E402  (tests/ is on sys.path)

from bench.outcomes import encode
from bench.plan import counterpart_spec
from bench.scoring import example_split, score
from bench.scoring.bootstrap import stable_rng
from bench.scoring.victim import _uninformative_reason, function_preservation, utility_undefined
from bench.store import CellRecord, Metric

DECOY = "zz_aux"
"""Not a primary metric and sorted after every real one: never chosen, but first in each cell's metrics."""

# ---------------------------------------------------------------------------------------------------------
# cells


def met(role: str, task: str, values, metric: str = "accuracy", hib: bool = True, examples: bool = True) -> Metric:
    v = np.asarray(values, dtype=float).ravel()
    return Metric(role, task, metric, float(v.mean()), hib, encode(v) if examples else "")


def with_decoy(role: str, task: str, values, metric: str = "accuracy", hib: bool = True,
               examples: bool = True) -> list[Metric]:
    """The metric, preceded by a decoy of other values (1 − v for accuracies, v + 7 otherwise)."""
    v = np.asarray(values, dtype=float).ravel()
    fake = 1.0 - v if hib else v + 7.0
    return [met(role, task, fake, DECOY, hib, examples), met(role, task, v, metric, hib, examples)]


def bern(rng: np.random.Generator, rate: float, n: int) -> np.ndarray:
    return (rng.random(n) < rate).astype(float)


def pspec(attack: str = "none", *, defense: str = "g", victim: str = "v", seed: int = 0, merge: str = "ta",
          partners: tuple[str, ...] = ("p",), suite: str = SUITE) -> dict:
    return merge_spec(victim, partners, seed, defense, attack, merge, suite=suite)


def merged(spec: dict, values=None, *, metric: str = "accuracy", hib: bool = True, examples: bool = True,
           extra: list[Metric] | None = None, provenance: dict | None = None, created: float = 2.0,
           status: str = "ok", reason: str = "") -> CellRecord:
    """A merge cell: the victim's merged outcomes ``values`` (with a decoy first) and ``extra`` metrics."""
    ms = [] if values is None else with_decoy("merged", spec["victim"], values, metric, hib, examples)
    return record(spec, [*ms, *(extra or [])], provenance=provenance or {"timings": {}}, created=created,
                  status=status, reason=reason)


def trio(spec: dict, p, u, z, *, metric: str = "accuracy", hib: bool = True, examples: bool = True,
         p_extra: list[Metric] | None = None, u_extra: list[Metric] | None = None,
         provenance: dict | None = None, created: float = 2.0) -> list[CellRecord]:
    """The protected cell of ``spec`` and its unprotected and counterfactual references."""
    kw = dict(metric=metric, hib=hib, examples=examples)
    return [merged(spec, p, extra=p_extra, provenance=provenance, created=created, **kw),
            merged(counterpart_spec(spec, "unprotected"), u, extra=u_extra, **kw),
            merged(counterpart_spec(spec, "counterfactual"), z, **kw)]


def base_cell(victim: str = "v", seed: int = 0, pre=(0.0, 1.0), ft=(1.0, 1.0), *, metric: str = "accuracy",
              hib: bool = True, examples: bool = True, suite: str = SUITE, recipe: str | None = RECIPE,
              provenance: dict | None = None, decoy: bool = True) -> CellRecord:
    spec = {"kind": "baseline", "suite": suite, "recipe_hash": recipe, "victim": victim, "partners": ["p"],
            "seed": seed, "defense": None, "attack": None, "merge": None}
    if recipe is None:
        del spec["recipe_hash"]
    if decoy:
        ms = [*with_decoy("pretrained", victim, pre, metric, hib, examples),
              *with_decoy("expert", victim, ft, metric, hib, examples)]
    else:
        ms = [met("pretrained", victim, pre, metric, hib, examples), met("expert", victim, ft, metric, hib, examples)]
    return record(spec, ms, created=1.0, provenance=provenance)


def util_cell(values, *, defense: str = "g", victim: str = "v", seed: int = 0, metric: str = "accuracy",
              hib: bool = True, examples: bool = True, timings: dict | None = None, flags: dict | None = None,
              hashes: dict | None = None, status: str = "ok", suite: str = SUITE,
              metrics: list[Metric] | None = None) -> CellRecord:
    spec = {"kind": "utility", "suite": suite, "recipe_hash": RECIPE, "victim": victim, "partners": ["p"],
            "seed": seed, "defense": plugin(defense), "attack": None, "merge": None}
    prov: dict = {"timings": {"protect": 5.0} if timings is None else timings}
    if flags is not None:
        prov["flags"] = {"function_preservation": flags}
    if hashes is not None:
        prov["hashes"] = hashes
    ms = metrics if metrics is not None else with_decoy("utility", victim, values, metric, hib, examples)
    return record(spec, ms, provenance=prov, status=status, created=1.5)


def one(records: list[CellRecord], *, defense: str = "g", victim: str = "v", attacks: list[str] | None = None,
        **kw):
    """The VictimScore of (defense, victim)."""
    s = score(records, attacks=attacks or [], **kw)
    return next(v for v in s.victim_scores(SUITE, defense) if v.victim == victim)


def pairs_of(vs) -> dict:
    return {(p.attack, p.merge): p for p in vs.pairs}


def flags_of(vs) -> dict[str, str]:
    return {f.code: f.message for f in vs.flags}


# ---------------------------------------------------------------------------------------------------------
# naive re-implementations of the documented definitions


def naive_counts(rng: np.random.Generator, n: int, draws: int, within=None) -> np.ndarray:
    """Each draw picks len(within) indices of ``within`` with replacement (`bootstrap_counts`' docstring):
    one rng.integers(0, len(within), (draws, len(within))) call, then counted index by index."""
    idx = np.arange(n) if within is None else np.asarray(within)
    picks = idx[rng.integers(0, len(idx), size=(draws, len(idx)))]
    out = np.zeros((draws, n))
    for b in range(draws):
        for i in picks[b]:
            out[b, i] += 1.0
    return out


def pct(x: np.ndarray, level: float, undefined: tuple[float, float] | None = None) -> tuple[float, float]:
    """The central ``level`` percentile interval; NaN draws count as undefined[0] low and undefined[1] high."""
    lo_q, hi_q = 50 * (1 - level), 100 - 50 * (1 - level)
    if undefined is None:
        return float(np.percentile(x, lo_q)), float(np.percentile(x, hi_q))
    return (float(np.percentile(np.where(np.isnan(x), undefined[0], x), lo_q)),
            float(np.percentile(np.where(np.isnan(x), undefined[1], x), hi_q)))


def recovered_draws(wp: np.ndarray, wu: np.ndarray, wz: np.ndarray) -> np.ndarray:
    """clip((V_P − V_∅) / (V_U − V_∅), 0, 1), NaN where the gain V_U − V_∅ is ≤ 0."""
    out = np.full(len(wp), np.nan)
    for b in range(len(wp)):
        gain = wu[b] - wz[b]
        if gain > 0:
            out[b] = min(1.0, max(0.0, (wp[b] - wz[b]) / gain))
    return out


# ---------------------------------------------------------------------------------------------------------
# module-level functions


def test_function_preservation_reads_the_stored_verdict_and_the_max_abs_diff():
    def cell(flag) -> CellRecord:
        return record(pspec(), [], provenance={"timings": {}, "flags": {"function_preservation": flag}})

    assert function_preservation(record(pspec(), [], provenance={})) == (False, None)
    assert function_preservation(record(pspec(), [], provenance={"flags": None})) == (False, None)
    assert function_preservation(cell("yes")) == (False, None)  # not a dict
    assert function_preservation(cell({"claimed": False, "ok": False, "max_abs_diff": 3.0})) == (False, None)
    # the verdict wins over the tolerance it was judged with
    assert function_preservation(cell({"claimed": True, "ok": True, "max_abs_diff": 0.5, "tolerance": 0.001})) \
        == (False, 0.5)
    assert function_preservation(cell({"claimed": True, "ok": False, "max_abs_diff": 0.5, "tolerance": 9.0})) \
        == (True, 0.5)
    assert function_preservation(cell({"claimed": True, "ok": False})) == (True, None)


def test_function_preservation_of_an_old_flag_applies_the_tolerance_it_recorded():
    def fp(**flag):
        cell = record(pspec(), [], provenance={"flags": {"function_preservation": {"claimed": True, **flag}}})
        return function_preservation(cell)

    assert fp(max_abs_diff=0.0005, tolerance=0.001) == (False, 0.0005)
    assert fp(max_abs_diff=0.001, tolerance=0.001) == (False, 0.001)  # at the tolerance: preserved
    assert fp(max_abs_diff=0.002, tolerance=0.001) == (True, 0.002)
    assert fp(tolerance=0.001) == (True, None)  # no difference recorded: nothing shows it was preserved
    assert fp(max_abs_diff=0.0005) == (True, 0.0005)  # no tolerance recorded
    assert fp(max_abs_diff=True, tolerance=1.0) == (True, None)  # a bool is no number


def test_utility_undefined_counts_zero_low_and_the_largest_defined_draw_high():
    assert utility_undefined(np.array([0.5, np.nan, 0.8, 0.7])) == (0.0, 0.8)
    assert utility_undefined(np.array([np.nan, np.nan])) == (0.0, 0.0)  # nothing defined: 0 at both ends
    assert utility_undefined(np.array([1.25])) == (0.0, 1.25)


def test_uninformative_reason_words_each_case():
    assert _uninformative_reason(0.3, None) == "uninformative: no gain could be measured"
    assert _uninformative_reason(0.01, (-0.02, 0.04)) == (
        "uninformative: the victim's gain +0.010 has interval [-0.020, +0.040], which includes 0")
    # an upper end exactly at 0 still includes 0
    assert _uninformative_reason(-0.02, (-0.05, 0.0)) == (
        "uninformative: the victim's gain -0.020 has interval [-0.050, +0.000], which includes 0")
    assert _uninformative_reason(-0.2, (-0.3, -0.1)) == (
        "uninformative: the victim's gain -0.200 has interval [-0.300, -0.100]: significantly negative "
        "(the merge does better without the victim)")


# ---------------------------------------------------------------------------------------------------------
# the numbers of one defense on two victims, every interval re-derived from the documented bootstrap

N_EX, N_BOOT, SEED, LEVEL = 60, 200, 5, 0.9


def _two_victims() -> tuple[list[CellRecord], dict]:
    """Victim v (accuracy) and victim w (perplexity: lower is better), 60 random test outcomes per filling."""
    rng = np.random.default_rng(34)
    data = {
        "v": dict(hib=True, metric="accuracy", p=bern(rng, 0.55, N_EX), u=bern(rng, 0.7, N_EX), z=bern(rng, 0.45, N_EX),
                  pre=bern(rng, 0.3, N_EX), ft=bern(rng, 0.9, N_EX), art=bern(rng, 0.8, N_EX)),
        "w": dict(hib=False, metric="perplexity", p=rng.normal(16, 4, N_EX), u=rng.normal(11, 3, N_EX),
                  z=rng.normal(20, 4, N_EX), pre=rng.normal(25, 4, N_EX), ft=rng.normal(10, 2, N_EX),
                  art=rng.normal(11, 2, N_EX)),
    }
    records = []
    for x, d in data.items():
        kw = dict(metric=d["metric"], hib=d["hib"])
        records += [base_cell(x, pre=d["pre"], ft=d["ft"], **kw), util_cell(d["art"], victim=x, **kw),
                    *trio(pspec(victim=x), d["p"], d["u"], d["z"], **kw)]
    return records, data


def _expected(x: str, d: dict) -> dict:
    """Point values and intervals of victim ``x`` from the definitions (one seed: no replicate resampling)."""
    s = 1.0 if d["hib"] else -1.0
    P, U, Z = s * d["p"], s * d["u"], s * d["z"]
    draws = stable_rng(SEED, SUITE, x, "draws")  # one stream per (seed, suite, victim): all examples, then held out
    W = naive_counts(draws, N_EX, N_BOOT)
    sel, held = example_split(SEED, SUITE, x, N_EX)
    H = naive_counts(draws, N_EX, N_BOOT, within=held)
    gain_draws = (W @ U - W @ Z) / N_EX
    rec_all = recovered_draws(W @ P / N_EX, W @ U / N_EX, W @ Z / N_EX)
    k = len(held)
    rec_held = recovered_draws(H @ P / k, H @ U / k, H @ Z / k)

    def point(idx):
        return (P[idx].mean() - Z[idx].mean()) / (U[idx].mean() - Z[idx].mean())

    everything = np.arange(N_EX)
    lo, hi = pct(rec_held, LEVEL, (0.0, 1.0))
    Wu = naive_counts(stable_rng(SEED, SUITE, x, "utility"), N_EX, N_BOOT)
    a, e = Wu @ d["art"] / N_EX, Wu @ d["ft"] / N_EX
    num, den = (a, e) if d["hib"] else (e, a)
    util_draws = np.array([nu / de if de > 0 else np.nan for nu, de in zip(num, den)])
    utility = d["art"].mean() / d["ft"].mean() if d["hib"] else d["ft"].mean() / d["art"].mean()
    return dict(gain=U.mean() - Z.mean(), gain_ci=pct(gain_draws, LEVEL), recovered=min(1.0, max(0.0, point(everything))),
                recovered_ci=pct(rec_all, LEVEL, (0.0, 1.0)), best=min(1.0, max(0.0, point(held))),
                selection=min(1.0, max(0.0, point(sel))), security_ci=(1.0 - hi, 1.0 - lo), security_draws=1.0 - rec_held,
                utility=utility, util_draws=util_draws,
                utility_ci=pct(util_draws, LEVEL, (0.0, float(np.nanmax(util_draws)))))


def test_every_number_of_two_victims_follows_the_definitions_and_the_documented_draws():
    records, data = _two_victims()
    s = score(records, attacks=["none"], n_bootstrap=N_BOOT, ci_level=LEVEL, seed=SEED)
    approx = lambda x: pytest.approx(x, rel=1e-9, abs=1e-12)  # noqa: E731
    want = {x: _expected(x, d) for x, d in data.items()}
    for x, d in data.items():
        (vs,) = [v for v in s.victim_scores(SUITE, "g") if v.victim == x]
        w = want[x]
        assert (vs.metric, vs.higher_is_better) == (d["metric"], d["hib"])
        assert (vs.acc_pre, vs.acc_ft) == (approx(d["pre"].mean()), approx(d["ft"].mean()))
        (pair,) = vs.pairs
        # V_x are reported in the metric's own direction: the raw means
        assert (pair.v_protected, pair.v_unprotected, pair.v_counterfactual) == (
            approx(d["p"].mean()), approx(d["u"].mean()), approx(d["z"].mean()))
        assert pair.gain == approx(w["gain"]) and pair.gain_ci == approx(w["gain_ci"])
        assert pair.informative and pair.na_reason == "" and pair.gain_ci[0] > 0
        assert pair.recovered == approx(w["recovered"]) and pair.recovered_ci == approx(w["recovered_ci"])
        assert (pair.n, pair.examples, pair.counterpart) == (1, N_EX, "none")
        assert (vs.best_attack, vs.best_merge) == ("none", "ta")
        assert vs.best_recovered == approx(w["best"]) and vs.security == approx(1.0 - w["best"])
        assert vs.selection_recovered == approx(w["selection"])
        assert vs.security_ci == approx(w["security_ci"])
        assert vs.utility == approx(w["utility"]) and vs.utility_ci == approx(w["utility_ci"])
        assert vs.flags == [] and vs.informative
    # some held-out draw of v has no positive gain (counted at both ends of the security interval)
    assert np.isnan(want["v"]["security_draws"]).any()
    # the entry: means over the two victims of their security and utility draws
    entry = s.entry(SUITE, "g")
    sec = np.stack([want[x]["security_draws"] for x in ("v", "w")])
    assert entry.security == approx(np.mean([1.0 - want[x]["best"] for x in ("v", "w")]))
    assert entry.security_ci == approx((np.percentile(np.nan_to_num(sec, nan=0.0).mean(axis=0), 5),
                                        np.percentile(np.nan_to_num(sec, nan=1.0).mean(axis=0), 95)))
    util = np.nanmean(np.stack([want[x]["util_draws"] for x in ("v", "w")]), axis=0)
    assert entry.utility_ci == approx(pct(util, LEVEL, (0.0, float(np.nanmax(util)))))


def _naive_pair(x: str, P, U, Z, *, seed: int = 0, draws: int = N_BOOT, level: float = 0.95) -> dict:
    """gain and recovered intervals of a one-seed pair of victim ``x`` over all its examples (sign-adjusted
    outcomes): the first draw of the (seed, suite, victim) "draws" stream."""
    n = len(P)
    W = naive_counts(stable_rng(seed, SUITE, x, "draws"), n, draws)
    rec = recovered_draws(W @ P / n, W @ U / n, W @ Z / n)
    return dict(gain_ci=pct((W @ U - W @ Z) / n, level), recovered_ci=pct(rec, level, (0.0, 1.0)), rec_draws=rec)


# ---------------------------------------------------------------------------------------------------------
# which cells are read: N/A, budget, protocol steps, failures


def _ok_pipeline(attack: str = "none", seed: int = 0, victim: str = "v", n: int = 40, rng_seed: int = 0,
                 created: float = 3.0, **kw) -> list[CellRecord]:
    rng = np.random.default_rng(rng_seed)
    return trio(pspec(attack, seed=seed, victim=victim, **kw), bern(rng, 0.7, n), bern(rng, 0.95, n),
                bern(rng, 0.2, n), created=created)


def test_na_cells_are_listed_with_their_reasons_and_budget_excesses_are_flagged_per_attack():
    na = [record(pspec("taylor-invert"), [], status="na", reason="defense g releases no Taylor FFN", created=1.0),
          record(pspec("merge-finetune"), [], status="na", reason="needs 256 labelled, budget allows 64",
                 provenance={"na_kind": "budget"}, created=1.0),
          record(pspec("graderase"), [], status="na", reason="needs 512 labelled", provenance={"na_kind": "budget"},
                 created=1.0)]
    # the N/A cells come first in the victim's cells: the ones after them are still read
    records = [base_cell(), util_cell([1.0, 1.0]), *na, *_ok_pipeline("none"), *_ok_pipeline("realign")]
    vs = one(records, attacks=["none", "realign", "taylor-invert", "merge-finetune", "graderase", "unmask"])
    assert vs.attacks_evaluated == ["none", "realign"]
    assert [(p.attack, p.informative) for p in vs.pairs] == [("none", True), ("realign", True)]
    assert vs.attacks_na == {"taylor-invert": "defense g releases no Taylor FFN"}
    assert vs.attacks_missing == ["graderase", "merge-finetune", "unmask"]
    assert flags_of(vs) == {
        "budget_exceeded": "graderase on v: needs 512 labelled; merge-finetune on v: needs 256 labelled, budget allows 64",
        "incomplete": "on v: unmask was never run"}


def test_a_protocol_step_never_run_makes_the_victim_incomplete_with_its_label():
    records = [base_cell(), util_cell([1.0, 1.0]), *_ok_pipeline("none")]
    s = score(records, attacks=[], n_bootstrap=50,
              missing={(SUITE, "g", "v"): ["realign/ta seed 1", "none/ties seed 0"]})
    (vs,) = s.victim_scores(SUITE, "g")
    assert vs.attacks_missing == ["none/ties seed 0", "realign/ta seed 1"]
    assert flags_of(vs) == {"incomplete": "on v: protocol step none/ties seed 0 was never run; "
                                          "protocol step realign/ta seed 1 was never run"}
    # the reference row has no protocol: nothing is missing there
    (ref,) = s.victim_scores(SUITE, "none")
    assert ref.attacks_missing == [] and ref.flags == []


def test_failed_cells_counted_are_this_defenses_on_this_victim_and_its_failed_references():
    records = [base_cell(), util_cell([1.0, 1.0]), *_ok_pipeline("none")]
    ties = _ok_pipeline("none", merge="ties")
    z_ties = record(ties[2].spec, [], status="failed", reason="MemoryError")
    own_merge = record(pspec("realign", merge="dare"), [], status="failed", reason="boom")
    own_utility = util_cell([1.0], seed=1, status="failed")
    others = [record(pspec("realign", victim="w"), [], status="failed"),  # same defense, another victim
              record(pspec("realign", defense="h"), [], status="failed"),  # another defense, same victim
              util_cell([1.0], defense="h", status="failed")]  # another defense's utility cell
    records += [*ties[:2], z_ties, own_merge, own_utility, *others]
    vs = one(records, n_bootstrap=50)
    want = sorted([z_ties.cell_id, own_merge.cell_id, own_utility.cell_id])
    assert vs.failed_cells == want
    assert flags_of(vs)["failed_cells"] == f"3 cell(s) failed on v: {want[0]}, {want[1]}, {want[2]}"
    assert set(want) <= set(vs.cell_ids) and not {c.cell_id for c in others} & set(vs.cell_ids)
    ties_pair = pairs_of(vs)[("none", "ties")]
    assert ties_pair.recovered is None and ties_pair.counterpart == "none"
    assert ties_pair.na_reason == "a reference cell (unprotected or counterfactual) is missing, failed or N/A"


def test_a_reference_cell_that_is_na_leaves_the_pair_na_with_the_reference_reason():
    cells = _ok_pipeline("none")
    z_na = record(cells[2].spec, [], status="na", reason="not applicable")
    vs = one([base_cell(), util_cell([1.0, 1.0]), *cells[:2], z_na], n_bootstrap=50)
    (pair,) = vs.pairs
    assert pair.recovered is None and pair.n == 0 and pair.counterpart == "none"
    assert pair.na_reason == "a reference cell (unprotected or counterfactual) is missing, failed or N/A"
    assert z_na.cell_id in vs.cell_ids and vs.failed_cells == []


def test_missing_references_are_named_in_the_incomplete_flag():
    rng = np.random.default_rng(3)
    p, u, z = bern(rng, 0.6, 40), bern(rng, 0.9, 40), bern(rng, 0.3, 40)
    no_u = trio(pspec("none"), p, u, z)
    no_z = trio(pspec("aa"), p, u, z)  # "aa" is its own counterpart: its own U and ∅ cells
    records = [base_cell(), util_cell([1.0, 1.0]), no_u[0], no_u[2], no_z[0], no_z[1]]
    vs = one(records, attacks=["none", "aa"], n_bootstrap=50)
    reason = "a reference cell (unprotected or counterfactual) is missing, failed or N/A"
    ta, aa = pairs_of(vs)[("none", "ta")], pairs_of(vs)[("aa", "ta")]
    assert (ta.recovered, ta.n, ta.na_reason, ta.counterpart) == (None, 0, reason, "")
    assert (aa.recovered, aa.n, aa.na_reason, aa.counterpart) == (None, 0, reason, "aa")
    assert vs.attacks_missing == ["aa", "none"] and vs.attacks_evaluated == ["aa", "none"]
    assert flags_of(vs) == {"incomplete": (
        f"on v: the counterfactual reference of aa/ta (cell {no_z[2].cell_id}) was never run; "
        f"the unprotected reference of none/ta (cell {no_u[1].cell_id}) was never run"),
        # no pair could be read at all: nothing to resample, nothing informative
        "uninformative_victims": "v: no pair's gain is significantly positive",
        "no_examples": "v: no per-example outcomes"}


def test_the_reference_row_reads_each_unprotected_cell_as_its_own_unprotected_value():
    # an undo attack's unprotected cell (stored under the pre-v3 rule): in the reference row it is V_U itself, and
    # its counterfactual is its counterpart's (none/ta): gain 0.6 − 0.5 = 0.1, never none/ta's 0.8 − 0.5
    n = 200
    spec = lambda attack, filling: merge_spec("v", ("p",), 0, None, attack, "ta", filling=filling)  # noqa: E731
    records = [base_cell(), merged(spec("none", "unprotected"), outcomes(0.8, n)),
               merged(spec("none", "counterfactual"), outcomes(0.5, n)),
               merged(spec("revert-ffn", "unprotected"), outcomes(0.6, n))]
    vs = one(records, defense="none", n_bootstrap=50)
    revert = pairs_of(vs)[("revert-ffn", "ta")]
    assert (revert.v_protected, revert.v_unprotected, revert.v_counterfactual) == pytest.approx((0.6, 0.6, 0.5))
    assert revert.gain == pytest.approx(0.1)
    assert pairs_of(vs)[("none", "ta")].gain == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------------------
# per-example outcomes: lengths, missing fillings, missing replicates


def _pair_cells(attack: str, n: int, rng: np.random.Generator, **kw) -> list[CellRecord]:
    return trio(pspec(attack, **kw), bern(rng, 0.6, n), bern(rng, 0.95, n), bern(rng, 0.2, n))


def test_pairs_on_another_number_of_examples_than_most_are_na_with_both_numbers():
    rng = np.random.default_rng(4)
    common = [base_cell(), util_cell([1.0, 1.0])]
    # two pairs on 40 examples, one on 50: the 40 of most pairs win
    vs = one(common + _pair_cells("aa", 40, rng) + _pair_cells("bb", 40, rng) + _pair_cells("cc", 50, rng),
             n_bootstrap=50)
    got = pairs_of(vs)
    assert [got[(a, "ta")].examples for a in ("aa", "bb")] == [40, 40]
    cc = got[("cc", "ta")]
    assert (cc.recovered, cc.n, cc.examples, cc.gain) == (None, 0, 0, None)
    assert cc.na_reason == "measured on 50 test outcomes where the other pairs have 40"
    # one pair each: the tie goes to the larger number
    vs = one(common + _pair_cells("aa", 50, rng) + _pair_cells("bb", 40, rng), n_bootstrap=50)
    got = pairs_of(vs)
    assert got[("aa", "ta")].examples == 50 and got[("aa", "ta")].informative
    assert got[("bb", "ta")].na_reason == "measured on 40 test outcomes where the other pairs have 50"


def test_a_pair_whose_fillings_differ_in_length_or_lack_the_victim_metric_is_na_and_the_next_pairs_are_read():
    rng = np.random.default_rng(5)
    short = trio(pspec("aa"), bern(rng, 0.6, 40), bern(rng, 0.9, 30), bern(rng, 0.2, 40))
    # bb's protected cell holds only a partner-task metric
    spec = pspec("bb")
    blind = [merged(spec, None, extra=[met("merged", "p", [0.5, 0.5])]),
             merged(counterpart_spec(spec, "unprotected"), bern(rng, 0.9, 40)),
             merged(counterpart_spec(spec, "counterfactual"), bern(rng, 0.2, 40))]
    vs = one([base_cell(), util_cell([1.0, 1.0]), *short, *blind, *_pair_cells("cc", 40, rng)], n_bootstrap=50)
    got = pairs_of(vs)
    assert list(got) == [("aa", "ta"), ("bb", "ta"), ("cc", "ta")]
    assert got[("aa", "ta")].na_reason == "per-example outcomes of different lengths (different test splits)"
    assert got[("bb", "ta")].na_reason == "no victim metric in the merged cells"
    assert all(got[(a, "ta")].recovered is None and got[(a, "ta")].n == 0 for a in ("aa", "bb"))
    assert got[("cc", "ta")].informative and got[("cc", "ta")].examples == 40


def test_a_replicate_counts_only_where_all_three_fillings_have_outcomes():
    """Pairs aa, bb, cc ran seeds 0 and 1; in seed 1, aa lacks its ∅ cell, bb its U cell and cc's protected
    cell lacks the victim metric. dd ran seed 0 only. Every pair then rests on seed 0 alone: its values are the
    seed-0 means, whatever the other fillings of seed 1 hold."""
    rng = np.random.default_rng(6)
    n = 40
    records = [base_cell(seed=0), base_cell(seed=1), util_cell([1.0, 1.0]), util_cell([1.0, 1.0], seed=1)]
    seed0 = {}
    for attack in ("aa", "bb", "cc", "dd"):
        p, u, z = bern(rng, 0.6, n), bern(rng, 0.95, n), bern(rng, 0.15, n)
        seed0[attack] = (p.mean(), u.mean(), z.mean())
        records += trio(pspec(attack), p, u, z)
        if attack == "dd":
            continue
        # seed 1: other values everywhere (so reading any of them moves the pair's numbers)
        c1 = trio(pspec(attack, seed=1), bern(rng, 0.1, n), bern(rng, 0.5, n), bern(rng, 0.45, n))
        if attack == "aa":
            c1 = c1[:2]
        elif attack == "bb":
            c1 = [c1[0], c1[2]]
        else:
            c1[0] = merged(c1[0].spec, None, extra=[met("merged", "p", [0.5, 0.5])])
        records += c1
    # ee ran seed 0 without references: no value, among pairs that have replicates
    records.append(merged(pspec("ee"), bern(rng, 0.6, n)))
    vs = one(records, n_bootstrap=50)
    assert vs.replicates == [(("p",), 0), (("p",), 1)]
    ee = pairs_of(vs)[("ee", "ta")]
    assert (ee.recovered, ee.n) == (None, 0) and ee.na_reason.startswith("a reference cell")
    for attack, want in seed0.items():
        pair = pairs_of(vs)[(attack, "ta")]
        assert (pair.v_protected, pair.v_unprotected, pair.v_counterfactual) == pytest.approx(want), attack
        assert pair.n == 1 and pair.informative, attack
        assert pair.recovered == pytest.approx((want[0] - want[2]) / (want[1] - want[2])), attack


# ---------------------------------------------------------------------------------------------------------
# partner side effect, attack cost, the N/A pair's other fields


def _partnered(attack: str, *, p_partner: tuple[float, float], u_partner: tuple[float, float], z_missing: bool = False,
               timings: dict | None = None, partners: tuple[str, ...] = ("p", "q"), seed: int = 7) -> list[CellRecord]:
    """A pair whose merges also report partner task p (accuracy) and q (perplexity: lower is better)."""
    rng = np.random.default_rng(seed)
    spec = pspec(attack, partners=partners)

    def partner(values):
        return [*with_decoy("merged", "p", [values[0]]), *with_decoy("merged", "q", [values[1]], "perplexity", False)]

    cells = trio(spec, bern(rng, 0.6, 40), bern(rng, 0.95, 40), bern(rng, 0.2, 40), p_extra=partner(p_partner),
                 u_extra=partner(u_partner), provenance={"timings": timings or {}})
    return cells[:2] if z_missing else cells


def test_partner_effect_is_the_sign_adjusted_mean_over_partners_from_the_plain_merges():
    # none/ta: p 0.55 vs 0.75 → −0.2; q (lower is better) 14 vs 12 → −(14 − 12) = −2; mean −1.1
    # realign/ta: p 0.80 vs 0.75 → +0.05; q 11 vs 12 → +1; mean +0.525
    plain = _partnered("none", p_partner=(0.55, 14.0), u_partner=(0.75, 12.0))
    undo = _partnered("aa", p_partner=(0.80, 11.0), u_partner=(0.75, 12.0))
    common = [base_cell(), util_cell([1.0, 1.0])]
    vs = one(common + plain + undo, n_bootstrap=50)
    assert pairs_of(vs)[("none", "ta")].partner_effect == pytest.approx(-1.1)
    assert pairs_of(vs)[("aa", "ta")].partner_effect == pytest.approx(0.525)
    assert vs.partner_effect == pytest.approx(-1.1)  # the plain merge's, not the mean with aa's
    # no plain merge: the mean over the pairs there are
    vs = one(common + undo, n_bootstrap=50)
    assert vs.partner_effect == pytest.approx(0.525)
    # a plain merge without partner metrics says nothing: the other pairs' effect is reported
    vs = one(common + undo + _partnered("none", p_partner=(0.5, 10.0), u_partner=(0.5, 10.0), partners=()),
             n_bootstrap=50)
    assert pairs_of(vs)[("none", "ta")].partner_effect is None and vs.partner_effect == pytest.approx(0.525)


def test_partner_effect_needs_the_unprotected_cell_and_every_partner_metric():
    common = [base_cell(), util_cell([1.0, 1.0])]
    cells = _partnered("none", p_partner=(0.55, 14.0), u_partner=(0.75, 12.0))
    # the unprotected merge lacks q: no effect (not a mean over the partners that are there)
    u = cells[1]
    cells[1] = record(u.spec, [m for m in u.metrics if m.task != "q"], provenance=u.provenance)
    vs = one(common + cells, n_bootstrap=50)
    assert vs.pairs[0].partner_effect is None and vs.partner_effect is None
    # no unprotected cell at all
    cells = _partnered("none", p_partner=(0.55, 14.0), u_partner=(0.75, 12.0))
    vs = one(common + [cells[0], cells[2]], n_bootstrap=50)
    assert vs.pairs[0].partner_effect is None


def test_a_pair_without_a_value_keeps_its_cost_partner_effect_and_counterpart():
    cells = _partnered("none", p_partner=(0.55, 14.0), u_partner=(0.75, 12.0), z_missing=True,
                       timings={"prepare": 1.5, "finish": 0.25, "protect": 9.0})
    vs = one([base_cell(), util_cell([1.0, 1.0]), *cells], n_bootstrap=50)
    (pair,) = vs.pairs
    assert (pair.recovered, pair.n, pair.counterpart) == (None, 0, "none")
    assert pair.attack_s == pytest.approx(1.75)  # prepare + finish
    assert pair.partner_effect == pytest.approx(-1.1)
    assert pair.na_reason == "a reference cell (unprotected or counterfactual) is missing, failed or N/A"
    assert (pair.gain, pair.gain_ci, pair.recovered_ci, pair.informative, pair.examples) == (None, None, None, None, 0)


# ---------------------------------------------------------------------------------------------------------
# the choice of the worst pair


def test_equally_strong_pairs_are_told_apart_by_attack_cost_then_name():
    rng = np.random.default_rng(8)
    p, u, z = bern(rng, 0.7, 40), bern(rng, 0.95, 40), bern(rng, 0.1, 40)
    common = [base_cell(), util_cell([1.0, 1.0])]
    # identical outcomes: aa costs 0.5 s, bb recorded no timing (counted as free)
    aa = trio(pspec("aa"), p, u, z, provenance={"timings": {"prepare": 0.5}})
    bb = trio(pspec("bb"), p, u, z, provenance={"timings": {}})
    vs = one(common + aa + bb, n_bootstrap=100)
    assert pairs_of(vs)[("bb", "ta")].attack_s is None
    assert (vs.best_attack, vs.attack_s) == ("bb", None)
    # equal costs: the name decides
    cc = trio(pspec("cc"), p, u, z, provenance={"timings": {"prepare": 0.5}})
    vs = one(common + aa + cc, n_bootstrap=100)
    assert (vs.best_attack, vs.attack_s) == ("aa", 0.5)
    bb = trio(pspec("bb"), p, u, z, provenance={"timings": {"prepare": 0.25}})
    vs = one(common + aa + bb, n_bootstrap=100)
    assert (vs.best_attack, vs.attack_s) == ("bb", 0.25)


def _wide_and_narrow(n: int = 400) -> tuple[list[CellRecord], dict[str, np.ndarray]]:
    """Per half of the test examples (200 each), at random places: pair "wide" has ∅ right on 60, U on 100
    and P on 98 (recovered (98 − 60) / (100 − 60) = 0.95 with a small, noisy gain: a wide interval), pair
    "narrow" has U right everywhere, ∅ nowhere and P on 150 (0.75, the gain 1 in every draw: a narrow one)."""
    rng = np.random.default_rng(9)
    halves = example_split(0, SUITE, "v", n)

    def place(k: int) -> np.ndarray:
        v = np.zeros(n)
        for idx in halves:
            v[rng.choice(idx, k, replace=False)] = 1.0
        return v

    v = dict(wz=place(60), wu=place(100), wp=place(98), np=place(150))
    cells = [*trio(pspec("wide"), v["wp"], v["wu"], v["wz"]), *trio(pspec("narrow"), v["np"], np.ones(n), np.zeros(n))]
    return [base_cell(), util_cell([1.0, 1.0]), *cells], v


def test_the_worst_pair_is_chosen_by_its_lower_bound_at_the_requested_level():
    records, v = _wide_and_narrow()
    sel, _held = example_split(0, SUITE, "v", 400)
    # the design, checked here with an independent bootstrap of the selection half: the wide pair's bound is
    # below the narrow one's at the 2.5 % percentile and above it at the 40 % percentile
    idx = sel[np.random.default_rng(0).integers(0, len(sel), size=(2000, len(sel)))]
    gain = v["wu"][idx].mean(axis=1) - v["wz"][idx].mean(axis=1)
    wide = recovered_draws(v["wp"][idx].mean(axis=1), v["wu"][idx].mean(axis=1), v["wz"][idx].mean(axis=1))
    wide = np.where(gain > 0, wide, 0.0)
    narrow = v["np"][idx].mean(axis=1)
    assert np.percentile(wide, 2.5) < np.percentile(narrow, 2.5) - 0.1
    assert np.percentile(wide, 40) > np.percentile(narrow, 40) + 0.1
    assert one(records, n_bootstrap=300).best_attack == "narrow"  # 95 %: the 2.5 % bound
    assert one(records, n_bootstrap=300, ci_level=0.2).best_attack == "wide"  # 20 %: the 40 % bound


def test_a_chosen_pair_without_a_held_out_gain_leaves_the_victim_without_security():
    # U beats ∅ on the selection half only: informative over all examples, nothing to recover held out
    n = 200
    sel, held = example_split(0, SUITE, "v", n)
    u, z, p = np.zeros(n), np.zeros(n), np.zeros(n)
    u[sel] = 1.0
    p[sel[: len(sel) // 2]] = 1.0
    vs = one([base_cell(), util_cell([1.0, 1.0]), *trio(pspec("none"), p, u, z)], n_bootstrap=100)
    (pair,) = vs.pairs
    assert pair.informative and pair.recovered == pytest.approx(0.5)
    assert (vs.security, vs.best_attack, vs.best_recovered, vs.security_ci) == (None, None, None, None)
    assert vs.informative and vs.flags == []


# ---------------------------------------------------------------------------------------------------------
# uninformative pairs, and informative ones with some undefined draws


def test_an_uninformative_pair_gives_its_gain_interval_in_words_and_no_recovered_interval():
    rng = np.random.default_rng(12)
    n = 80
    p, u, z = bern(rng, 0.5, n), bern(rng, 0.52, n), bern(rng, 0.5, n)
    vs = one([base_cell(), util_cell([1.0, 1.0]), *trio(pspec("none"), p, u, z)], n_bootstrap=N_BOOT)
    want = _naive_pair("v", p, u, z)
    (pair,) = vs.pairs
    lo, hi = want["gain_ci"]
    assert lo <= 0 <= hi  # the design: no significant gain
    gain = u.mean() - z.mean()
    assert pair.gain == pytest.approx(gain) and pair.gain_ci == pytest.approx(want["gain_ci"])
    assert (pair.informative, pair.recovered, pair.recovered_ci) == (False, None, None)
    assert pair.na_reason == (f"uninformative: the victim's gain {gain:+.3f} has interval [{lo:+.3f}, {hi:+.3f}], "
                              "which includes 0")
    assert flags_of(vs) == {"uninformative_victims": "v: no pair's gain is significantly positive"}
    assert not vs.informative and vs.security is None


def test_an_informative_pair_counts_its_undefined_draws_at_both_ends_of_its_recovered_interval():
    # at a 50 % level the interval is the 25–75 % percentiles: a gain positive in most draws, not all
    rng = np.random.default_rng(11)
    n = 60
    p, u, z = bern(rng, 0.55, n), bern(rng, 0.6, n), bern(rng, 0.5, n)
    vs = one([base_cell(), util_cell([1.0, 1.0]), *trio(pspec("none"), p, u, z)], n_bootstrap=N_BOOT, ci_level=0.5)
    want = _naive_pair("v", p, u, z, level=0.5)
    assert want["gain_ci"][0] > 0 and np.isnan(want["rec_draws"]).any()  # the design
    (pair,) = vs.pairs
    assert pair.informative and pair.gain_ci == pytest.approx(want["gain_ci"])
    assert pair.recovered_ci == pytest.approx(want["recovered_ci"])


# ---------------------------------------------------------------------------------------------------------
# few examples


def test_without_per_example_outcomes_nothing_is_resampled_and_the_victim_is_flagged():
    # one stored value per filling: P 0.7, U 0.9, ∅ 0.5 → recovered 0.5, every draw the point
    records = [base_cell(pre=[0.5], ft=[0.8], examples=False), util_cell([0.72], examples=False),
               *trio(pspec("none"), [0.7], [0.9], [0.5], examples=False)]
    s = score(records, attacks=["none"], n_bootstrap=50)
    (vs,) = s.victim_scores(SUITE, "g")
    (pair,) = vs.pairs
    assert pair.examples == 0 and pair.n == 1
    assert pair.gain_ci == pytest.approx((0.4, 0.4)) and pair.recovered_ci == pytest.approx((0.5, 0.5))
    assert vs.security == pytest.approx(0.5) and vs.security_ci == pytest.approx((0.5, 0.5))
    assert vs.utility == pytest.approx(0.9)  # 0.72 / 0.8
    assert vs.utility_ci is None
    assert s.entry(SUITE, "g").utility_ci == pytest.approx((0.9, 0.9))  # the victim's point in every draw
    assert flags_of(vs) == {"no_examples": "v: no per-example outcomes"}


def test_two_examples_are_resampled_like_any_other_number():
    # P = [1, 0], U = [1, 1], ∅ = [0, 0]: the gain is 1 in every draw, recovered the share of example 0
    p, u, z = np.array([1.0, 0.0]), np.ones(2), np.zeros(2)
    art, ft = np.array([1.0, 1.0]), np.array([1.0, 0.0])  # the expert is 0 where a draw picks example 1 twice
    records = [base_cell(pre=[0.0, 0.0], ft=ft), util_cell(art), *trio(pspec("none"), p, u, z)]
    s = score(records, attacks=["none"], n_bootstrap=N_BOOT, seed=SEED)
    (vs,) = s.victim_scores(SUITE, "g")
    (pair,) = vs.pairs
    assert pair.examples == 2 and vs.flags == []
    want = _naive_pair("v", p, u, z, seed=SEED)
    assert pair.recovered == 0.5 and pair.recovered_ci == pytest.approx(want["recovered_ci"])
    assert pair.recovered_ci == (0.0, 1.0)  # draws of 0, 0.5 and 1
    # held out: one example; its draws weigh that example alone (recovered 1 or 0, never 0.5)
    sel, held = example_split(SEED, SUITE, "v", 2)
    assert vs.best_recovered == p[held[0]] and vs.security_ci == (1.0 - p[held[0]], 1.0 - p[held[0]])
    # utility: artifact 1 over expert 0.5 = 2; a draw with the expert at 0 has no ratio (0 low, the largest high)
    W = naive_counts(stable_rng(SEED, SUITE, "v", "utility"), 2, N_BOOT)
    e = W @ ft / 2
    draws = np.where(e > 0, (W @ art / 2) / np.where(e > 0, e, 1.0), np.nan)
    assert np.isnan(draws).any() and vs.utility == 2.0
    assert vs.utility_ci == pytest.approx(pct(draws, 0.95, (0.0, float(np.nanmax(draws)))))


# ---------------------------------------------------------------------------------------------------------
# θ_pre, the expert and utility


def test_baseline_and_utility_are_read_at_the_seeds_the_victims_cells_ran():
    # the defense ran seed 1 only: seed 0's baseline (θ_pre 0.5, expert 0.9) is another run's
    rng = np.random.default_rng(12)
    pre1, ft1, art1 = bern(rng, 0.3, 50), bern(rng, 0.8, 50), bern(rng, 0.7, 50)
    records = [base_cell(seed=0, pre=[0.5, 0.5], ft=[0.9, 0.9]), base_cell(seed=1, pre=pre1, ft=ft1),
               util_cell([0.1, 0.1], seed=0), util_cell(art1, seed=1),
               *_ok_pipeline("none", seed=1)]
    vs = one(records, n_bootstrap=50)
    assert (vs.acc_pre, vs.acc_ft) == pytest.approx((pre1.mean(), ft1.mean()))
    assert vs.utility == pytest.approx(art1.mean() / ft1.mean())


def test_cells_without_a_recipe_hash_find_the_baseline_stored_without_one():
    rng = np.random.default_rng(13)
    ft = bern(rng, 0.8, 50)
    spec = pspec("none")
    del spec["recipe_hash"]
    p, u, z = bern(rng, 0.6, 50), bern(rng, 0.9, 50), bern(rng, 0.2, 50)
    records = [base_cell(pre=[0.25, 0.25], ft=ft, recipe=None), *trio(spec, p, u, z)]
    vs = one(records, n_bootstrap=50)
    assert (vs.acc_pre, vs.acc_ft) == pytest.approx((0.25, ft.mean()))


def test_utility_falls_back_to_the_first_merge_cell_that_carries_the_artifacts_utility():
    """No utility cell: the protected merge cells of the same seed carry the artifact's own score (role
    "utility"). Cell aa carries none, bb carries 0.6, cc 0.3; N/A cells carry nothing."""
    rng = np.random.default_rng(14)
    ft = bern(rng, 0.75, 40)
    art_bb, art_cc = bern(rng, 0.6, 40), bern(rng, 0.3, 40)
    aa = _pair_cells("aa", 40, rng)
    bb = _pair_cells("bb", 40, rng)
    bb[0] = record(bb[0].spec, [*with_decoy("utility", "v", art_bb), *bb[0].metrics], created=3.0)
    cc = _pair_cells("cc", 40, rng)
    cc[0] = record(cc[0].spec, [*with_decoy("utility", "v", art_cc), *cc[0].metrics], created=4.0)
    na = record(pspec("dd"), [], status="na", reason="no", created=1.0)
    vs = one([base_cell(ft=ft), na, *aa, *bb, *cc], n_bootstrap=50)
    assert vs.utility == pytest.approx(art_bb.mean() / ft.mean())
    assert bb[0].cell_id in vs.cell_ids


def test_a_seed_without_an_artifact_score_or_with_other_experts_is_skipped_not_the_end():
    """Seeds 0, 1 and 2: seed 0 has no utility cell and its merge carries no artifact score, seed 1's utility
    cell was built from another expert than its baseline; seed 2 is read (alone)."""
    rng = np.random.default_rng(15)
    hashes = lambda expert, partners: {"expert": expert, "pretrained": "pre", "partners": partners}  # noqa: E731
    bases = [record(base_cell(seed=s).spec, list(base_cell(seed=s, ft=ft).metrics), created=1.0,
                    provenance={"timings": {}, "hashes": hashes("E", ["p1"])})
             for s, ft in ((0, [1.0, 1.0]), (1, [1.0, 1.0]), (2, [0.8, 0.8]))]
    other = util_cell([0.2, 0.2], seed=1, hashes=hashes("F", ["p1"]))
    # seed 2's utility cell names other partners than its baseline: utility does not depend on partners
    mine = util_cell([0.6, 0.6], seed=2, hashes=hashes("E", ["p9"]))
    cells = [c for s in (0, 1, 2) for c in _pair_cells("none", 40, rng, seed=s)]
    vs = one([*bases, other, mine, *cells], n_bootstrap=50)
    assert vs.utility == pytest.approx(0.6 / 0.8)
    assert flags_of(vs) == {"mixed_experts": (f"on v, cells built from different experts were not paired: utility: "
                                              f"cell {other.cell_id} and the baseline {bases[1].cell_id}")}
    assert mine.cell_id in vs.cell_ids and other.cell_id not in vs.cell_ids


def test_utility_over_two_seeds_pools_them_and_resamples_seeds_and_examples():
    rng = np.random.default_rng(16)
    n = 30
    art = [bern(rng, 0.8, n), bern(rng, 0.5, n)]
    ft = [bern(rng, 0.9, n), bern(rng, 0.85, n)]
    records = [base_cell(seed=s, ft=ft[s]) for s in (0, 1)]
    records += [util_cell(art[s], seed=s, timings={"protect": (4.0, 7.0)[s]}) for s in (0, 1)]
    records += [c for s in (0, 1) for c in _pair_cells("none", n, rng, seed=s)]
    vs = one(records, n_bootstrap=N_BOOT, seed=SEED)
    # the point: the mean of the per-seed artifact means over the mean of the per-seed expert means
    assert vs.utility == pytest.approx((art[0].mean() + art[1].mean()) / (ft[0].mean() + ft[1].mean()))
    W = naive_counts(stable_rng(SEED, SUITE, "v", "utility"), n, N_BOOT)  # examples: one draw for every seed
    C = naive_counts(stable_rng(SEED, SUITE, "v", "utility seeds"), 2, N_BOOT)  # seeds

    def pooled(xs):
        return sum(C[:, s] * (W @ xs[s]) / n for s in (0, 1)) / C.sum(axis=1)

    a, e = pooled(art), pooled(ft)
    draws = np.where(e > 0, a / np.where(e > 0, e, 1.0), np.nan)
    assert vs.utility_ci == pytest.approx(pct(draws, 0.95, (0.0, float(np.nanmax(draws)))))
    assert vs.protect_s == pytest.approx(5.5)  # (4 + 7) / 2


def test_protect_time_is_read_from_the_utility_cells_and_memory_from_the_ok_merge_cells():
    rng = np.random.default_rng(17)
    cells = _pair_cells("aa", 40, rng) + _pair_cells("bb", 40, rng)
    cells[0] = record(cells[0].spec, list(cells[0].metrics), provenance={"timings": {}, "peak_rss_mb": 300.0})
    cells[3] = record(cells[3].spec, list(cells[3].metrics), provenance={"timings": {}, "peak_rss_mb": 120})
    na = record(pspec("cc"), [], status="na", reason="n/a", provenance={"timings": {}, "peak_rss_mb": 900.0})
    vs = one([base_cell(), util_cell([1.0, 1.0], timings={"protect": 6.5, "prepare": 100.0}), na, *cells],
             n_bootstrap=50)
    assert vs.protect_s == 6.5 and vs.peak_rss_mb == 300.0
    vs = one([base_cell(), util_cell([1.0, 1.0], timings={"prepare": 100.0}), *cells], n_bootstrap=50)
    assert vs.protect_s is None


def test_utility_is_undefined_when_the_artifact_and_expert_scores_cannot_be_compared():
    rng = np.random.default_rng(18)
    cells = _pair_cells("none", 40, rng)
    ft = bern(rng, 0.8, 40)
    # different test splits (30 against 40 outcomes)
    vs = one([base_cell(ft=ft), util_cell(bern(rng, 0.8, 30)), *cells], n_bootstrap=50)
    assert (vs.utility, vs.utility_ci) == (None, None) and vs.acc_ft == pytest.approx(ft.mean())
    # the utility cell scored another metric only
    other = util_cell(None, metrics=[met("utility", "v", [0.7, 0.7], DECOY)])
    vs = one([base_cell(ft=ft), other, *cells], n_bootstrap=50)
    assert (vs.utility, vs.utility_ci) == (None, None)
    assert other.cell_id in vs.cell_ids


def test_the_reference_rows_utility_is_one_over_every_seed_with_an_expert_score():
    # the expert scores 0 on seed 0 and 0.8 on seed 1: the pooled ratio is 0.4 / 0.4 = 1
    n = 20
    ft0, ft1 = np.zeros(n), np.r_[np.ones(16), np.zeros(4)]
    bases = [base_cell(seed=s, ft=ft, decoy=False) for s, ft in ((0, ft0), (1, ft1))]
    bases = [record(b.spec, [met("expert", "v", np.zeros(n), DECOY), *b.metrics], created=1.0) for b in bases]
    rng = np.random.default_rng(19)
    cells = [c for s in (0, 1) for c in _pair_cells("none", n, rng, seed=s)]
    vs = one([*bases, *cells], defense="none", n_bootstrap=50)
    assert vs.utility == 1.0 and vs.acc_ft == pytest.approx(0.4)


# ---------------------------------------------------------------------------------------------------------
# flags


def test_function_preservation_is_checked_on_the_utility_cell_and_every_ok_merge_cell():
    rng = np.random.default_rng(20)
    cells = _pair_cells("aa", 40, rng) + _pair_cells("bb", 40, rng)
    fp = lambda **f: {"timings": {}, "flags": {"function_preservation": {"claimed": True, **f}}}  # noqa: E731
    # bb's merge cell: a verdict of preserved, whatever its recorded difference
    cells[3] = record(cells[3].spec, list(cells[3].metrics), provenance=fp(ok=True, max_abs_diff=0.9))
    common = [base_cell(), *cells]
    vs = one(common + [util_cell([1.0, 1.0], flags={"claimed": True, "ok": False, "max_abs_diff": 0.5})],
             n_bootstrap=50)
    assert flags_of(vs) == {
        "function_preservation_violated": "g claims function preservation but changed outputs on v (max |Δ| = 0.5)"}
    # aa's merge cell broke it too, by 0.25, and the utility cell recorded no difference: the largest is named
    cells[0] = record(cells[0].spec, list(cells[0].metrics), provenance=fp(ok=False, max_abs_diff=0.25))
    vs = one([base_cell(), *cells, util_cell([1.0, 1.0], flags={"claimed": True, "ok": False})], n_bootstrap=50)
    assert flags_of(vs)["function_preservation_violated"].endswith("on v (max |Δ| = 0.25)")
    # violated without any recorded difference: no figure
    vs = one([base_cell(), *cells[1:], util_cell([1.0, 1.0], flags={"claimed": True, "ok": False})], n_bootstrap=50)
    assert flags_of(vs)["function_preservation_violated"] == "g claims function preservation but changed outputs on v"
    # preserved everywhere: no flag
    vs = one([base_cell(), *cells[1:], util_cell([1.0, 1.0], flags={"claimed": True, "ok": True})], n_bootstrap=50)
    assert vs.flags == []


def test_an_na_merge_cell_is_not_checked_for_function_preservation():
    rng = np.random.default_rng(21)
    prov = {"timings": {}, "flags": {"function_preservation": {"claimed": True, "ok": False, "max_abs_diff": 2.0}}}
    na = record(pspec("cc"), [], status="na", reason="n/a", provenance=prov)
    vs = one([base_cell(), util_cell([1.0, 1.0]), na, *_pair_cells("aa", 40, rng)], n_bootstrap=50)
    assert vs.flags == []


def test_references_of_other_experts_are_named_in_one_sorted_flag():
    def hashed(cells, expert):
        return [record(c.spec, list(c.metrics), created=c.created,
                       provenance={"timings": {}, "hashes": {"expert": expert, "pretrained": "pre", "partners": []}})
                for c in cells]

    rng = np.random.default_rng(22)
    aa, bb = _pair_cells("aa", 40, rng), _pair_cells("bb", 40, rng)
    # aa's references and bb's counterfactual were built from expert F; the protected cells from E
    aa = hashed(aa[:1], "E") + hashed(aa[1:], "F")
    bb = hashed(bb[:2], "E") + hashed(bb[2:], "F")
    vs = one([base_cell(), util_cell([1.0, 1.0]), *aa, *bb], n_bootstrap=50)
    mixed = sorted([f"aa/ta: cell {aa[0].cell_id} and its unprotected reference {aa[1].cell_id}",
                    f"aa/ta: cell {aa[0].cell_id} and its counterfactual reference {aa[2].cell_id}",
                    f"bb/ta: cell {bb[0].cell_id} and its counterfactual reference {bb[2].cell_id}"])
    assert flags_of(vs)["mixed_experts"] == (
        "on v, cells built from different experts were not paired: " + "; ".join(mixed))
    assert all(p.recovered is None for p in vs.pairs)
    assert pairs_of(vs)[("aa", "ta")].counterpart == "" and pairs_of(vs)[("bb", "ta")].counterpart == "bb"


def test_a_victim_with_unscored_metric_gets_an_empty_metric_name():
    # every merge N/A, no baseline, no utility cell: no metric of the victim is known
    na = [record(pspec("aa"), [], status="na", reason="a structure θ_pre does not have"),
          record(pspec("bb"), [], status="na", reason="a structure θ_pre does not have")]
    vs = one(na, n_bootstrap=20)
    assert (vs.metric, vs.higher_is_better) == ("", True)
    assert vs.attacks_na == {"aa": "a structure θ_pre does not have", "bb": "a structure θ_pre does not have"}
    assert vs.pairs == [] and vs.flags == [] and vs.utility is None


# ---------------------------------------------------------------------------------------------------------
# replicates


def test_pair_intervals_resample_the_replicates_each_pair_has_from_their_own_stream():
    """aa ran seeds 0, 1, 2; bb seeds 0 and 2. A draw resamples the test examples (the "draws" stream, shared by
    every pair) and, independently, the replicates: all three for aa (the "replicates" stream), and for bb
    its own two (a stream keyed by the replicates it has, drawing among them only)."""
    rng = np.random.default_rng(23)
    n = 30
    vals = {(a, s): (bern(rng, 0.5 + 0.1 * s, n), bern(rng, 0.9, n), bern(rng, 0.3 - 0.1 * s, n))
            for a, seeds in (("aa", (0, 1, 2)), ("bb", (0, 2))) for s in seeds}
    records = [base_cell(seed=s) for s in (0, 1, 2)] + [util_cell([1.0, 1.0], seed=s) for s in (0, 1, 2)]
    for (a, s), (p, u, z) in vals.items():
        records += trio(pspec(a, seed=s), p, u, z)
    vs = one(records, n_bootstrap=N_BOOT, seed=SEED)
    W = naive_counts(stable_rng(SEED, SUITE, "v", "draws"), n, N_BOOT)
    reps = {"aa": naive_counts(stable_rng(SEED, SUITE, "v", "replicates"), 3, N_BOOT),
            "bb": naive_counts(stable_rng(SEED, SUITE, "v", "replicates", (0, 2)), 3, N_BOOT, within=[0, 2])}
    assert not reps["bb"][:, 1].any()
    for a, seeds in (("aa", (0, 1, 2)), ("bb", (0, 2))):
        C = reps[a]

        def v(k, a=a, seeds=seeds, C=C):  # the replicate-weighted mean of the per-replicate example means
            return sum(C[:, s] * (W @ vals[(a, s)][k]) / n for s in seeds) / sum(C[:, s] for s in seeds)

        pair = pairs_of(vs)[(a, "ta")]
        assert pair.n == len(seeds)
        assert pair.gain_ci == pytest.approx(pct(v(1) - v(2), 0.95))
        assert pair.recovered_ci == pytest.approx(pct(recovered_draws(v(0), v(1), v(2)), 0.95, (0.0, 1.0)))
        # the point: means over the replicates of the per-replicate means
        means = [np.mean([vals[(a, s)][k].mean() for s in seeds]) for k in range(3)]
        assert (pair.v_protected, pair.v_unprotected, pair.v_counterfactual) == pytest.approx(means)


def test_the_lower_bound_of_the_choice_resamples_the_selection_half_only():
    """Pair "half" restores the expert exactly on the selection half (every draw there recovers 1) and nothing
    held out; pair "most" recovers about 0.9 everywhere. Read on the selection half, half's lower bound (1)
    beats most's (below 0.9); a bound resampling every example would put half near 0.5 and choose most."""
    n = 400
    sel, held = example_split(0, SUITE, "v", n)
    half = np.zeros(n)
    half[sel] = 1.0
    most = bern(np.random.default_rng(24), 0.9, n)
    records = [base_cell(), util_cell([1.0, 1.0]), *trio(pspec("half"), half, np.ones(n), np.zeros(n)),
               *trio(pspec("most"), most, np.ones(n), np.zeros(n))]
    assert most[sel].mean() < 1.0
    vs = one(records, n_bootstrap=200)
    assert vs.best_attack == "half" and vs.selection_recovered == 1.0 and vs.best_recovered == 0.0


def _two_seed_pairs(examples: bool) -> list[CellRecord]:
    """aa recovers (0.9 − 0.5) / 0.4 = 1 on seed 0 and (0.58 − 0.5) / 0.4 = 0.2 on seed 1: pooled
    (0.74 − 0.5) / 0.4 = 0.6; bb recovers (0.72 − 0.5) / 0.4 = 0.55 on both. With ``examples`` each value is
    stored as two equal per-example outcomes, else as the single value."""
    n = 2 if examples else 1
    records = [base_cell(seed=s) for s in (0, 1)] + [util_cell([1.0, 1.0], seed=s) for s in (0, 1)]
    for attack, p in (("aa", (0.9, 0.58)), ("bb", (0.72, 0.72))):
        for s in (0, 1):
            records += trio(pspec(attack, seed=s), np.full(n, p[s]), np.full(n, 0.9), np.full(n, 0.5),
                            examples=examples)
    return records


def test_with_per_example_outcomes_the_choice_reads_the_lower_bound_over_resampled_seeds():
    # with two examples, the selection half is one example: the choice's draws vary by the seeds they pick. A
    # quarter of aa's draws pick seed 1 twice (0.2): its 2.5 % bound is 0.2, below bb's 0.55 in every draw
    vs = one(_two_seed_pairs(examples=True), n_bootstrap=200)
    assert pairs_of(vs)[("aa", "ta")].recovered == pytest.approx(0.6)
    assert vs.best_attack == "bb" and vs.best_recovered == pytest.approx(0.55)


def test_without_per_example_outcomes_the_choice_reads_the_pooled_value():
    # no test examples to split or resample: the choice is the uncorrected one (FLAG_CODES["no_examples"]),
    # the highest pooled value: aa's 0.6 over bb's 0.55
    vs = one(_two_seed_pairs(examples=False), n_bootstrap=200)
    assert vs.best_attack == "aa" and vs.best_recovered == pytest.approx(0.6)
    assert flags_of(vs) == {"no_examples": "v: no per-example outcomes"}

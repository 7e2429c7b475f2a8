"""One (suite, defense, victim): its pairs read against their references, its utility, its held-out worst case."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from bench.scoring.bootstrap import (
    RECOVERED_UNDEFINED,
    PairOutcomes,
    bootstrap_counts,
    flip,
    pair_statistics,
    percentile_ci,
    present_replicates,
    stable_rng,
    utility_ratio,
)
from bench.scoring.cells import (
    CellIndex,
    attack_name,
    examples,
    maximum,
    mean,
    number,
    same_experts,
    sign,
    timing,
    utility_key,
)
from bench.scoring.results import REFERENCE, Flag, PairScore, VictimScore
from bench.scoring.selection import example_split, select_worst_pair
from bench.store import CellRecord


@lru_cache(maxsize=16)
def example_counts(seed: int, suite: str, victim: str, n: int, draws: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One victim's example draws [draws, n]: over all its test examples, within the held-out half, within the
    selection half (`example_split`). Seeded by (suite, victim), not by defense: every defense and pair sees the
    same split and draws. Cached (read-only arrays): a protocol walk re-scores every victim after each step."""
    rng = stable_rng(seed, suite, victim, "draws")
    selection, heldout = example_split(seed, suite, victim, n)
    out = (bootstrap_counts(rng, n, draws), bootstrap_counts(rng, n, draws, within=heldout),
           bootstrap_counts(rng, n, draws, within=selection))
    for a in out:
        a.flags.writeable = False
    return out


@lru_cache(maxsize=16)
def utility_counts(seed: int, suite: str, victim: str, n: int, draws: int) -> np.ndarray:
    """One victim's example draws [draws, n] for its utility interval (cached and read-only, as `example_counts`)."""
    w = bootstrap_counts(stable_rng(seed, suite, victim, "utility"), n, draws)
    w.flags.writeable = False
    return w


@dataclass
class Pair:
    attack: str
    attack_name: str
    merge: str
    replicates: dict[tuple[tuple[str, ...], int], tuple[CellRecord, CellRecord | None, CellRecord | None]] = field(
        default_factory=dict)
    """(partners, seed) -> (protected cell, unprotected cell, counterfactual cell)."""
    counterpart: str = ""


@dataclass
class VictimDraws:
    """What the suite-level aggregation and the ranks need of one victim: bootstrap draws of its security
    (NaN where undefined) and utility, on the example and replicate draws every defense shares."""

    security_draws: np.ndarray
    utility_draws: np.ndarray


class VictimScorer:
    """Scores one (suite, defense, victim) from its protected cells and their references."""

    def __init__(self, ix: CellIndex, suite: str, defense: str, victim: str, cells: list[CellRecord],
                 standard: list[str], n_bootstrap: int, ci_level: float, seed: int,
                 required: Sequence[str] = ()) -> None:
        self.ix, self.suite, self.defense, self.victim = ix, suite, defense, victim
        self.cells, self.standard, self.required = cells, standard, list(required)
        self.n_bootstrap, self.ci_level, self.seed = n_bootstrap, ci_level, seed
        self.metric, self.hib = ix.metric_of.get((suite, victim), ("", True))
        self.sign = sign(self.hib)
        self.ids: set[str] = set()
        self.failed: set[str] = set()
        self.missing: dict[str, str] = {}
        self.budget: dict[str, str] = {}
        self.mixed: set[str] = set()
        """Pairs (and the utility) whose cells rest on different experts: never paired, named in a flag."""
        self._utility_draws = np.full(n_bootstrap, np.nan)
        self._fp: tuple[bool, list[float]] = (False, [])

    def _ref(self, p: CellRecord, filling: str) -> CellRecord | None:
        if self.defense == REFERENCE and filling == "unprotected":
            return p
        ref, wanted = self.ix.reference(p, filling)
        if ref is None:
            self.missing[attack_name(p)] = f"the {filling} reference of {p.attack}/{p.merge} (cell {wanted}) was never run"
            return None
        if not same_experts(p, ref):  # cells of different experts never pair
            self.mixed.add(f"{p.attack}/{p.merge}: cell {p.cell_id} and its {filling} reference {ref.cell_id}")
            return None
        self.ids.add(ref.cell_id)
        if ref.status == "failed":
            self.failed.add(ref.cell_id)
            return None
        return ref if ref.status == "ok" else None

    def score(self) -> tuple[VictimScore, VictimDraws]:
        vs = VictimScore(self.suite, self.defense, self.victim, self.metric, self.hib, None, None)
        pairs = self._collect(vs)
        self._baseline_and_utility(vs)
        outcomes, reasons, n = self._outcomes(pairs)
        reps = sorted({r for p in pairs for r in p.replicates})
        n_eff = max(n, 1)
        # replicates draw from their own stream: adding seeds to one pair leaves every example draw (and so the
        # choice of the worst pair, and every other pair's interval) as it was
        rep_counts = (bootstrap_counts(stable_rng(self.seed, self.suite, self.victim, "replicates"), len(reps),
                                       self.n_bootstrap) if len(reps) > 1
                      else np.ones((self.n_bootstrap, max(len(reps), 1))))
        selection, heldout = example_split(self.seed, self.suite, self.victim, n_eff)
        if n > 1:
            all_counts, held_counts, sel_counts = example_counts(self.seed, self.suite, self.victim, n_eff,
                                                                self.n_bootstrap)
        else:
            all_counts = held_counts = np.ones((self.n_bootstrap, n_eff))
            sel_counts = None
        ones = (np.ones((1, n_eff)), np.ones((1, max(len(reps), 1))))
        scores, eligible = [], []
        pair_reps = [self._replicate_counts(out, rep_counts) for out in outcomes]
        for pair, out, reason, reps_i in zip(pairs, outcomes, reasons, pair_reps):
            scores.append(self._pair_score(pair, out, reason, ones, all_counts, reps_i, n))
            eligible.append(out is not None and bool(scores[-1].informative))
        vs.pairs = scores
        vs.informative = any(eligible)
        security_draws = np.full(self.n_bootstrap, np.nan)
        if self.defense != REFERENCE:  # the reference row shows gains; it has no attacker to beat
            tie = [(p.attack_s or 0.0, p.attack, p.merge) for p in scores]
            sel = select_worst_pair(outcomes, eligible, selection, heldout, held_counts, pair_reps, tie, sel_counts,
                                    self.ci_level)
            if sel.index is not None and sel.recovered is not None:
                best = scores[sel.index]
                vs.best_attack, vs.best_merge, vs.attack_s = best.attack, best.merge, best.attack_s
                vs.best_recovered, vs.security = sel.recovered, 1.0 - sel.recovered
                vs.selection_recovered = sel.selection_recovered
                vs.security_ci = flip(percentile_ci(sel.draws, self.ci_level, RECOVERED_UNDEFINED))
                security_draws = 1.0 - sel.draws
        plain = [p.partner_effect for p in scores if p.attack == REFERENCE and p.partner_effect is not None]
        vs.partner_effect = mean(plain) if plain else mean(p.partner_effect for p in scores)
        vs.replicates = reps
        vs.flags = self._flags(vs, n)
        vs.cell_ids = sorted(self.ids)
        vs.failed_cells = sorted(self.failed)
        return vs, VictimDraws(security_draws, self._utility_draws)

    # -------------------------------------------------------- pieces

    def _collect(self, vs: VictimScore) -> list[Pair]:
        pairs: dict[tuple[str, str], Pair] = {}
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
            pair = pairs.setdefault((c.attack, c.merge), Pair(c.attack, name, c.merge))
            u, z = self._ref(c, "unprotected"), self._ref(c, "counterfactual")
            if u is not None:
                pair.counterpart = u.attack
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

    def _outcomes(self, pairs: list[Pair]) -> tuple[list[PairOutcomes | None], list[str], int]:
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
                    rows[k].append(examples(cell, "merged", self.victim, self.metric, self.sign) if cell else None)
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

    def _replicate_counts(self, out: PairOutcomes | None, rep_counts: np.ndarray) -> np.ndarray:
        """The replicate draws [B, R] of one pair: ``rep_counts`` (every replicate resampled) when it has every
        replicate; else draws within the replicates it has (a pair the protocol re-ran under more seeds sits
        beside pairs of seed 0 alone, whose draws must not pick seeds they lack)."""
        if out is None or rep_counts.shape[1] < 2:
            return rep_counts
        present = present_replicates(out)
        if present.all() or not present.any():
            return rep_counts
        idx = np.flatnonzero(present)
        rng = stable_rng(self.seed, self.suite, self.victim, "replicates", tuple(idx.tolist()))
        return bootstrap_counts(rng, len(present), self.n_bootstrap, within=idx)

    def _pair_score(self, pair: Pair, out: PairOutcomes | None, reason: str, ones: tuple, all_counts: np.ndarray,
                    rep_counts: np.ndarray, n: int) -> PairScore:
        cells = [c for c, _u, _z in pair.replicates.values()]
        attack_s = mean(timing(c, "prepare", "finish") for c in cells)
        effect = mean(self._partner_effect(c, u) for c, u, _z in pair.replicates.values())
        if out is None:
            return PairScore(pair.attack, pair.merge, None, 0, reason, attack_s, effect, counterpart=pair.counterpart)
        point = pair_statistics(out, *ones)
        draws = pair_statistics(out, all_counts, rep_counts)
        gain_ci = percentile_ci(draws.gain, self.ci_level)
        informative = gain_ci is not None and gain_ci[0] > 0
        gain = float(point.gain[0])
        recovered = float(point.recovered[0]) if informative else None
        na = "" if informative else _uninformative_reason(gain, gain_ci)
        n_reps = int((~np.isnan(out.protected).any(axis=1)).sum())
        s = self.sign
        return PairScore(
            pair.attack, pair.merge, recovered, n_reps, na, attack_s, effect,
            v_protected=s * float(point.v_protected[0]), v_unprotected=s * float(point.v_unprotected[0]),
            v_counterfactual=s * float(point.v_counterfactual[0]), gain=gain, gain_ci=gain_ci,
            recovered_ci=percentile_ci(draws.recovered, self.ci_level, RECOVERED_UNDEFINED) if informative else None,
            informative=informative, examples=n if n > 1 else 0, counterpart=pair.counterpart,
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
            deltas.append(sign(hib) * (a - b))
        return float(np.mean(deltas))

    def _baseline_and_utility(self, vs: VictimScore) -> None:
        """θ_pre, the expert and the utility (artifact / expert) with its paired bootstrap over test examples."""
        seeds = sorted({c.seed for c in self.cells} or {0})
        recipe = str(self.cells[0].spec.get("recipe_hash", "")) if self.cells else ""
        bases = [b for s in seeds if (b := self.ix.baselines.get((self.suite, recipe, self.victim, s)))]
        self.ids.update(b.cell_id for b in bases)
        pre = [v for b in bases if (v := b.value("pretrained", self.victim, self.metric)) is not None]
        ft = [v for b in bases if (v := b.value("expert", self.victim, self.metric)) is not None]
        vs.acc_pre, vs.acc_ft = mean(pre), mean(ft)
        protect = []
        art, exp = [], []
        fp_violated, fp_diffs = False, []
        for s, b in zip(seeds, bases):
            if self.defense == REFERENCE:
                e = examples(b, "expert", self.victim, self.metric, 1.0)
                art.append(e)
                exp.append(e)
                continue
            same_seed = [c for c in self.cells if c.seed == s]
            carriers = [c for c in same_seed if c.status == "ok"]
            # a not-applicable merge cell names the same artifact: utility does not wait for an applicable step
            ucell = self.ix.utility.get(utility_key(same_seed[0])) if same_seed else None
            source = ucell or next((c for c in carriers if c.find("utility") is not None), None)
            if source is None:
                continue
            if not same_experts(source, b, partners=False):
                self.mixed.add(f"utility: cell {source.cell_id} and the baseline {b.cell_id}")
                continue
            self.ids.add(source.cell_id)
            art.append(examples(source, "utility", self.victim, self.metric, 1.0))
            exp.append(examples(b, "expert", self.victim, self.metric, 1.0))
            protect.append(timing(source, "protect"))
            for c in [source, *carriers]:
                violated, diff = function_preservation(c)
                fp_violated |= violated
                if violated and diff is not None:
                    fp_diffs.append(diff)
        self._fp = (fp_violated, fp_diffs)
        vs.protect_s = mean(protect)
        vs.peak_rss_mb = maximum(number(c.provenance.get("peak_rss_mb")) for c in self.cells if c.status == "ok")
        pairs = [(a, e) for a, e in zip(art, exp) if a is not None and e is not None and len(a) == len(e)]
        if not pairs:
            return
        a_mean = float(np.mean([a.mean() for a, _ in pairs]))
        e_mean = float(np.mean([e.mean() for _, e in pairs]))
        vs.utility = utility_ratio(a_mean, e_mean, self.hib)
        n = len(pairs[0][0])
        if n > 1 and all(len(a) == n for a, _ in pairs):
            w = utility_counts(self.seed, self.suite, self.victim, n, self.n_bootstrap)
            # several seeds (the protocol's replicates re-protect): resample them too, so their spread is in the interval
            c = (bootstrap_counts(stable_rng(self.seed, self.suite, self.victim, "utility seeds"), len(pairs),
                                  self.n_bootstrap) if len(pairs) > 1 else np.ones((self.n_bootstrap, 1)))
            a_draws = (c * np.stack([(w @ a) / n for a, _ in pairs], axis=1)).sum(axis=1) / c.sum(axis=1)
            e_draws = (c * np.stack([(w @ e) / n for _, e in pairs], axis=1)).sum(axis=1) / c.sum(axis=1)
            num, den = (a_draws, e_draws) if self.hib else (e_draws, a_draws)
            with np.errstate(invalid="ignore", divide="ignore"):
                self._utility_draws = np.where(den > 0, num / den, np.nan)
            vs.utility_ci = percentile_ci(self._utility_draws, self.ci_level, utility_undefined(self._utility_draws))
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
        if self.mixed:
            flags.append(Flag("mixed_experts", f"on {vs.victim}, cells built from different experts were not paired: "
                                               + "; ".join(sorted(self.mixed))))
        if self.failed:
            flags.append(Flag("failed_cells", f"{len(self.failed)} cell(s) failed on {vs.victim}: "
                                              + ", ".join(sorted(self.failed))))
        if vs.pairs and not vs.informative:
            flags.append(Flag("uninformative_victims", f"{vs.victim}: no pair's gain is significantly positive"))
        if n <= 1 and vs.pairs:
            flags.append(Flag("no_examples", f"{vs.victim}: no per-example outcomes"))
        return flags


def utility_undefined(draws: np.ndarray) -> tuple[float, float]:
    """How a utility draw whose expert scores 0 (no ratio) counts: 0 at the lower end, the largest defined
    draw at the upper (never dropped)."""
    defined = draws[~np.isnan(draws)]
    return 0.0, float(defined.max()) if defined.size else 0.0


def _uninformative_reason(gain: float, gain_ci: tuple[float, float] | None) -> str:
    if gain_ci is None:
        return "uninformative: no gain could be measured"
    where = f"the victim's gain {gain:+.3f} has interval [{gain_ci[0]:+.3f}, {gain_ci[1]:+.3f}]"
    if gain_ci[1] < 0:
        return f"uninformative: {where}: significantly negative (the merge does better without the victim)"
    return f"uninformative: {where}, which includes 0"


def function_preservation(cell: CellRecord) -> tuple[bool, float | None]:
    """(violated, max_abs_diff) from the cell's function-preservation flag (the runner applied the one
    tolerance, `bench.plugins.PRESERVATION_TOLERANCE`, and stored the verdict as ``ok``)."""
    flag = ((cell.provenance or {}).get("flags") or {}).get("function_preservation")
    if not isinstance(flag, dict) or not flag.get("claimed"):
        return False, None
    diff = number(flag.get("max_abs_diff"))
    ok = flag.get("ok")
    if ok is None:  # an old flag without a verdict: apply the tolerance it recorded
        tol = number(flag.get("tolerance"))
        ok = diff is not None and tol is not None and diff <= tol
    return not bool(ok), diff

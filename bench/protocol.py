"""The standard protocol: a fixed, ordered, budgeted evaluation of every defense (AutoAttack's idea).

RobustBench made robustness numbers comparable by fixing one parameter-free ensemble, run in order,
where each attack runs only on the points the previous ones left unbroken (Croce & Hein 2020). The
same here: a protocol is data (`Protocol`): an ordered list of (attack, merge) **steps** with their
parameters, a **break threshold**, the replicates (seeds, partner arrangement) and the threat model's
budget. Steps go cheapest first: plain merges, then algebraic attacks, then the tuned merges, then
fine-tuning attacks, then AdaMerging.

For each (defense, victim), a step runs only while the defense is not yet broken there: *broken* means
the recovered fraction of the worst (attack, merge) so far, read on the **selection half** of the test
examples (`bench.scoring`: the pair is chosen there and reported on the other, held-out half), is at or
above the threshold. The held-out half never steers a stop (no optional stopping): the value an entry
reports was not looked at when the protocol decided to stop, so it stays unbiased. A step's replicates
run together and are scored together (their interval rests on all of them), so the break decision is
made per (defense, victim), not per replicate. Each step's unprotected and counterfactual references
are computed once per victim and shared by every defense, and only while some defense is unbroken on
that victim, except for the plain-merge steps, whose references are the suite's signal table (`signal`).

Everything a decision rests on is in the store: `walk` re-derives the breaks from stored cells by
re-scoring the cells of the first k steps, so an export made later, elsewhere, or after a crash reads
exactly what the run decided. The protocol's name and version are stamped on every export.

Choices where the issue (and AutoAttack) leave room, with the reason:

* *Replicates*: every step runs seed 0 with the victim merged with all other tasks (``rest``), and the
  breaks read seed 0. Then, for each (defense, victim), the **worst pair** (the one the scoring chooses on
  the selection half) runs again under the replicate seeds (seed 1 in version 4; 1 and 2 in version 3): the defense re-protects
  with the new seed (its utility cell too), DARE re-draws its masks, the fine-tuning attacks and AdaMerging
  their batches, with fresh reference cells under the same seeds. The scoring chooses the pair on the
  replicates every pair shares (seed 0) and reports it on the held-out half pooled over all its seeds, the
  interval resampling seeds and examples (`bench.scoring`), so the published worst case holds the seed
  variance that a re-run would show (``benchmarks/replicate_variance.py`` measured it at up to 1.9 test-example
  standard errors on the stochastic steps) at the cost of one more run of one step per pair (two in version 3), not of every step.
* *The attacker's data*: fine-tuning attacks use the whole labelled budget (256 samples), the tuned
  merges tune on the same 256 samples: the attacker is strong and spends what it is granted.
* *Algebraic attacks merge by task arithmetic*: they restore the expert's function exactly or not at
  all, so the merge that follows matters less than the restoration; the tuned merges then run as
  their own steps on every defense not yet broken.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from bench.keys import canonical
from bench.plan import (
    Cell,
    PartnerMode,
    attack_label,
    build_plan,
    defense_applicability,
    make_attacks,
    make_defense,
    reference_ids,
    split_names,
)
from bench.plugins import AttackNeeds
from bench.registry import defenses
from bench.store import CellRecord, Store
from bench.suite import Suite

REFERENCE = "none"
PLAIN = "plain merge"
"""The step group whose references are always computed: they are the suite's signal table."""
REPLICATE_GROUP = "replicates"
"""The cells of the replicate seeds (`Protocol.replicate_seeds`), run after the last step."""


@dataclass(frozen=True)
class Step:
    """One (attack, merge) of a protocol."""

    attack: str
    """An attack name or a '+'-composite."""
    merge: str
    group: str
    """'plain merge', 'algebraic', 'tuned merge', 'fine-tuning' or 'adamerging' (for the cost profile)."""
    evaluate: Literal["all", "victim"] = "victim"
    """``all``: the merged model is evaluated on every merged task (the partners' side effect); ``victim``: on the
    victim only, which is all security reads. Since version 5 only the task-arithmetic plain merge evaluates
    every task."""

    @property
    def label(self) -> str:
        return f"{self.attack} / {self.merge}"


REPLICATES = Step("worst pair", "replicate seeds", REPLICATE_GROUP)
"""What a `StepReport` of the replicate phase names: each pair's worst step, under the replicate seeds."""


@dataclass(frozen=True)
class Protocol:
    """A named, versioned, ordered evaluation; see the module docstring."""

    name: str
    version: str
    steps: tuple[Step, ...]
    break_threshold: float
    seeds: tuple[int, ...]
    partners: PartnerMode
    params: Mapping[str, Mapping[str, str]]
    """Plugin parameters of every step, as ``--param PLUGIN.KEY=VALUE`` would give them."""
    budget: AttackNeeds
    description: str = ""
    omitted: Mapping[str, str] = field(default_factory=dict)
    """Standard attacks and learned merges that no step runs, each with the measured reason (`coverage`)."""
    replicate_seeds: tuple[int, ...] = ()
    """Seeds run, after the walk, on each (defense, victim)'s worst pair only (`Walker.replicates`): the
    defense, the attack and the merge re-drawn, so the reported worst case's interval holds their variance."""

    def stamp(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}

    def attacks(self) -> list[str]:
        return list(dict.fromkeys(s.attack for s in self.steps))

    def merges(self) -> list[str]:
        return list(dict.fromkeys(s.merge for s in self.steps))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "description": self.description,
            "break_threshold": self.break_threshold, "seeds": list(self.seeds), "partners": self.partners,
            "params": {k: dict(v) for k, v in sorted(self.params.items())},
            "budget": {"labelled": self.budget.labelled, "unlabelled": self.budget.unlabelled,
                       "finetune_steps": self.budget.finetune_steps, "knows_defense": self.budget.knows_defense},
            "steps": [{"index": i, "attack": s.attack, "merge": s.merge, "group": s.group, "evaluate": s.evaluate}
                      for i, s in enumerate(self.steps)],
            "omitted": dict(sorted(self.omitted.items())),
            "replicate_seeds": list(self.replicate_seeds),
        }


def _steps(group: str, attacks: Sequence[str], merges: Sequence[str], evaluate: Literal["all", "victim"] = "victim"
           ) -> list[Step]:
    return [Step(a, m, group, evaluate) for a in attacks for m in merges]


STANDARD = Protocol(
    name="standard",
    version="5",
    description="every standard attack, tuned merge and layer-wise AdaMerging, cheapest first; a step runs only on "
                "(defense, victim) pairs not yet broken",
    steps=tuple(
        _steps(PLAIN, ["none"], ["wa"]) + _steps(PLAIN, ["none"], ["ta"], evaluate="all")
        + _steps(PLAIN, ["none"], ["ties", "dare-ties"])
        + _steps("algebraic", ["scale-division", "realign", "realign+scale-division", "revert-attention",
                               "revert-ffn", "revert-to-base", "taylor-invert", "taylor-invert+realign+scale-division",
                               "anchor-align", "anchor-align-indep", "taylor-invert+anchor-align"], ["ta"])
        + _steps("tuned merge", ["none"], ["ta-tuned", "ties-tuned", "dare-ties-tuned"])
        + _steps("fine-tuning", ["merge-finetune", "graderase", "realign+scale-division+merge-finetune",
                                 "anchor-align+merge-finetune", "revert-to-base+merge-finetune"], ["ta"])
        + _steps("adamerging", ["none"], ["adamerging-layer"])
    ),
    break_threshold=0.9,
    seeds=(0,),
    partners="rest",
    params={"merge-finetune": {"samples": "256"}, "graderase": {"samples": "256"},
            "adamerging-layer": {"steps": "25", "lr": "0.02"}},
    budget=AttackNeeds(anchor=True, labelled=256, unlabelled=1024, finetune_steps=1000, knows_defense=True),
    omitted={
        "unmask": "under task arithmetic it maps the unprotected expert exactly to θ_pre, so V_U = V_∅ and its gain is "
                  "0 on every victim: no recovered can be read from it (version 1, both suites)",
        "adamerging-task": "the layer-wise variant recovered at least as much on all 5 protected pairs where version 1 "
                           "ran both, at the same order of cost",
    },
    replicate_seeds=(1,),
)
"""Version 2 (what changed from version 1, and why; the figures are the shipped version-1 cells):

* ``unmask / ta`` is gone. Unmask replaces every weight the defense could have touched by θ_pre's, so under task
  arithmetic it maps the unprotected expert exactly to θ_pre: V_U under unmask equals V_∅, its gain is 0 on
  every victim of both suites, and no recovered can ever be read from it. The attack stays registered (the
  claims ledger checks MergeGuard's sentence about it).
* ``none / adamerging-task`` is gone; ``adamerging-layer`` stays. On all five protected (defense, victim) pairs
  where version 1 ran both, the layer-wise variant recovered at least as much (0.56 against 0.45, 0.69 / 0.59,
  0.65 / 0.63, 0.66 / 0.46, 0.66 / 0.60), as the paper's layer-wise results dominate its task-wise ones; each
  AdaMerging cell is the most expensive cell of a suite (140–500 s here), so the weaker variant costs the most
  per unit of attack strength.
* The honest reference (scoring version 3) removed the U and ∅ cells of every undo attack: the algebraic steps
  read the ``none / ta`` step's references.
* Experts are built with portable kernels (`bench.portable`), so every machine builds the same ones.

Version 3 adds the replicate seeds (1, 2) on each pair's worst step (see *Replicates* in the module
docstring); every seed-0 cell of version 2 is a cell of version 3 (same ids), so a store of version 2 resumes.

Version 4 cuts the protocol toward its budget (two hours wall, cold, on a 2-core CPU, both embedded suites).
Measured on the version-3 cells (`bench run --dry-run` profiles; the cells' own times), AdaMerging was the
costliest step group of text-mix (5,532 of 14,927 cell-seconds) and the replicates the costliest of vision-effnet
(5,860 of 12,357). Two cuts, each chosen because it gives up the least attack strength per CPU-second:

* ``adamerging-layer`` runs **50 Adam steps at lr 1e-2** instead of 100 at 5e-3: the same distance λ can travel
  from its prior (steps × lr, the module's schedule note), in half the forward passes. On every protected pair
  where version 3 ran AdaMerging (five), the 50-step schedule recovered at least as much (+0.005 to +0.072; each
  difference's interval includes 0) and no cell moved by more than 0.033; so the attacker is not weaker.
* **One replicate seed** (1) instead of two. Dropping seed 2 from the version-3 cells (158 cells, 2,899 cell-s on
  vision, 986 on text) changed no rank band; the widest change is vision MergeGuard's security 0.330 → 0.216
  (interval [0.070, 0.699] → [0.050, 0.695]); the MergeGuard stage-1 intervals widen by 0.013–0.021. The seed
  variance is still in every published interval (seeds 0 and 1 are resampled), with one seed fewer to estimate
  it from.

It does not yet fit: one cold run of version 4 (fresh store and cache, experts included, ``--jobs 2``, idle 2-core
Xeon) took 160.6 minutes wall, vision-effnet 66.3 and text-mix 94.2 (`wall_profile`,
``benchmarks/protocol_wall.py``); its largest groups are text-mix's AdaMerging (18.8) and plain merges (18.7) and
vision-effnet's replicates (14.3) and tuned merges (14.2).

Version 5 cuts again, each cut chosen from the version-4 run's own cells (`wall_profile`, the cells' stage timings)
and measured for what it changes (``benchmarks/protocol_cut.py``: the same (defense, victim, attack, merge, seed)
cells of two stores, victim metric and recovered side by side):

* **Partner side effects are read under task arithmetic only.** WA, TIES and DARE-TIES evaluate the victim alone
  (``Step.evaluate``); ``none / ta`` still evaluates every merged task, and it is the step whose references the
  undo attacks share. Security reads the victim only, so no security number can move; the partner effect of an
  entry is the TA one. On text-mix the four plain steps' protected cells spent 1,840 of their 2,164 cell-seconds
  evaluating five tasks; a victim-only evaluation is about a fifth of that.
* **AdaMerging runs 25 Adam steps at lr 2e-2** (50 at 1e-2 in version 4): the same steps × lr, as the version-4
  cut was argued. On the five vision-effnet protected pairs where version 4 ran AdaMerging (the version-4 experts),
  the 25-step schedule recovered +0.087 more on average (−0.011 to +0.246; two increases significant, no
  significant decrease), so the attacker is not weaker.
* **Tuned merges 2+**: each candidate's BatchNorm statistics are re-estimated on the attacker's own labelled
  samples (its 256, the ones it is scored on), and token inputs are scored in length-sorted batches
  (`merges.tuned`). On text-mix every tuned cell of the version-4 MergeGuard pairs chose the same coefficient and
  gave the same victim outcomes; length-sorting took trec-question's TA search from 22.6 s to 16.4 s. On the 15
  vision-effnet protected pairs (with the 256-image repair below) recovered moved by +0.073 (TA-tuned), +0.021
  (DARE-TIES-tuned) and −0.047 (TIES-tuned) on average: three increases significant, no significant decrease.
* **vision-effnet repairs BatchNorm on 256 training images** (1,024 before; `VisionEffNet.recalibration_samples`):
  a quarter of the repair in every merged evaluation and in MergeGuard's mask evaluations; merged victim
  accuracy 0.2–1.7 points lower on the nine plain merges measured.

Not a protocol change, but measured in the same cells: the version-4 run computed MergeGuard's stage 1 twice, at
the same time in both workers, on 10 of 16 (victim, seed) pairs (``mergeguard`` and ``mergeguard-stage1``
fine-tune the same model); the local executor now runs one defense's groups one after another
(`bench.executors.local.group_cells`).
"""

PROTOCOLS: dict[str, Protocol] = {STANDARD.name: STANDARD}


class ProtocolError(ValueError):
    """An unknown protocol, or a protocol that does not fit the registered plugins."""


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {name!r}; known: {', '.join(sorted(PROTOCOLS))}")
    return PROTOCOLS[name]


# ---------------------------------------------------------------- planning


def protocol_defenses(selected: str | Sequence[str] | None = None) -> list[str]:
    """The defenses a protocol run covers: every registered one (third-party plugins too) unless selected. A
    selected name may be a variant ``NAME[key=value,...]``; each comes back as its canonical label
    (`bench.plugins.Defense.label`: the plain name at the default params), once."""
    if selected is None or selected == "all" or list(selected) == ["all"]:
        return list(defenses.names())
    names = split_names(selected) if isinstance(selected, str) else list(selected)
    # unknown names fail here, with a did-you-mean; bad parameters with the label and the reason
    return list(dict.fromkeys(make_defense(n).label for n in names))


def step_cells(protocol: Protocol, suite: Suite, step: Step, defense_names: Sequence[str],
               victims: Sequence[str] | None = None) -> list[Cell]:
    """The cells of one step: per victim a baseline, each defense's utility cell, the step's protected merge
    cells, and the unprotected and counterfactual cells of the step attack's honest counterpart
    (`Attack.counterpart`). Where the counterpart's pipeline is itself a step that evaluates every task (an
    undo attack's ``none / ta`` is the plain-merge step), its references are that step's cells, not copies
    evaluated on the victim only, so no reference is computed twice."""
    plan = build_plan(suite, defense=list(defense_names) or [REFERENCE], attack=step.attack, merge=step.merge,
                      seeds=protocol.seeds, victims=victims, partners=protocol.partners, params=protocol.params,
                      budget=protocol.budget, evaluate=step.evaluate)
    counterparts = {canonical(a.counterpart().spec()) for a in make_attacks(step.attack, protocol.params)}
    everywhere = {(s.attack, s.merge) for s in protocol.steps if s.evaluate == "all"}
    cells = []
    for c in plan.cells:
        if c.kind != "merge":
            cells.append(c)
        elif c.filling == "protected":
            if attack_label(c.attack) == step.attack:
                cells.append(c)
        elif canonical(c.attack.spec()) in counterparts:
            if c.filling == "unprotected" and (attack_label(c.attack), step.merge) in everywhere:
                c = replace(c, evaluate_partners=True)
            cells.append(c)
    return cells


# ---------------------------------------------------------------- breaks, from stored cells


@dataclass
class VictimWalk:
    """Where one (defense, victim) stands in the protocol."""

    defense: str
    victim: str
    broken_at: int | None = None
    """Index of the step after which the selection-half recovered reached the threshold (None: never broken)."""
    applicable: bool = True
    """False when the defense cannot act on the suite's architecture (its utility cell is N/A): nothing
    of it runs after the first step, whose N/A cells record why."""

    @property
    def active(self) -> bool:
        return self.applicable and self.broken_at is None
    recovered: float | None = None
    """The selection-half recovered of the worst pair at the break (or after the last step scored): what the
    decision read. The reported value is the held-out one (`bench.scoring`)."""
    missing: list[str] = field(default_factory=list)
    """Labels of steps it needs (up to its break) whose cells are not all stored."""
    na: dict[str, str] = field(default_factory=dict)
    """Step label -> structural N/A reason."""
    replicated: str | None = None
    """Label of the step whose pair was re-run under the replicate seeds (its worst pair after the walk)."""


@dataclass
class Walk:
    """The protocol's state on one suite, re-derived from stored cells."""

    protocol: Protocol
    suite: str
    victims: dict[tuple[str, str], VictimWalk]
    cell_ids: set[str]
    """Every planned cell of the steps each (defense, victim) needs, and the shared references."""

    def broken_by(self, defense: str, victim: str) -> str | None:
        w = self.victims.get((defense, victim))
        if w is None or w.broken_at is None:
            return None
        return self.protocol.steps[w.broken_at].label

    def missing(self, defense: str) -> list[str]:
        return sorted({f"{w.victim}: {m}" for w in self.victims.values() if w.defense == defense for m in w.missing})


def _done(rec: CellRecord | None) -> bool:
    if rec is None:
        return False
    return rec.status == "ok" or (rec.status == "na" and (rec.provenance or {}).get("na_kind", "structural") != "budget")


def _references_done(cell: Cell, by_id: Mapping[str, CellRecord]) -> bool:
    spec = cell.spec()
    return all(any(_done(by_id.get(i)) for i in reference_ids(spec, f)) for f in ("unprotected", "counterfactual"))


class Walker:
    """Replays the protocol over stored cells, one step at a time: after each step it scores the cells of
    the steps so far and marks every (defense, victim) whose selection-half recovered reached the threshold as
    broken at that step. `run_protocol` advances it as steps finish; `walk` replays a whole store."""

    def __init__(self, protocol: Protocol, suite: Suite, defense_names: Sequence[str]) -> None:
        self.protocol, self.suite = protocol, suite
        # keyed by variant label, as the store's defense column and the scores are
        self.names = list(dict.fromkeys(make_defense(d).label for d in defense_names if d != REFERENCE))
        self.state = {(d, v): VictimWalk(d, v) for d in self.names for v in suite.tasks}
        self.seen: set[str] = set()
        self.steps_done = 0
        self._replicated: dict[tuple[str, str], list[Cell]] = {}

    def needs(self, cell: Cell) -> bool:
        """Whether the protocol still needs ``cell``: baselines and utility cells; the protected cells of
        (defense, victim) pairs not yet broken; the references of a plain-merge step (the signal table)
        and, of other steps, those of victims where some defense is still unbroken."""
        if cell.kind != "merge":
            return True
        if cell.defense is None:
            step = self.protocol.steps[min(self.steps_done, len(self.protocol.steps) - 1)]
            return step.group == PLAIN or any(w.active for (d, v), w in self.state.items() if v == cell.victim)
        w = self._owner(cell)
        return w is None or w.active or (self.steps_done == 0 and w.broken_at is None)

    def _owner(self, cell: Cell) -> VictimWalk | None:
        if cell.kind != "merge" or cell.defense is None:
            return None
        return self.state.get((cell.defense.label, cell.victim))

    def advance(self, cells: Sequence[Cell], by_id: Mapping[str, CellRecord]) -> list[tuple[str, str]]:
        """Account for the next step's ``cells`` against the stored ``by_id``; returns the pairs it broke."""
        from bench import scoring

        k = self.steps_done
        step = self.protocol.steps[k]
        new = False
        for c in cells:
            if c.kind == "utility" and c.defense is not None and c.na_reason and (c.defense.label, c.victim) in self.state:
                self.state[(c.defense.label, c.victim)].applicable = False
            if not self.needs(c):
                continue
            if c.cell_id not in self.seen:
                self.seen.add(c.cell_id)
                new = new or c.cell_id in by_id
            w = self._owner(c)
            if w is None:
                continue
            rec = by_id.get(c.cell_id)
            if rec is not None and rec.status == "na" and _done(rec):
                w.na[step.label] = rec.reason
            elif (not _done(rec) or not _references_done(c, by_id)) and step.label not in w.missing:
                w.missing.append(step.label)
        self.steps_done += 1
        if not new or not any(w.active for w in self.state.values()):
            return []
        # only the pairs still in play are re-scored (their protected cells, and every shared reference)
        active = {(w.defense, w.victim) for w in self.state.values() if w.active}
        live = [r for i in sorted(self.seen) if (r := by_id.get(i)) is not None
                and (r.kind != "merge" or r.filling != "protected" or (r.defense, r.victim) in active)
                and (r.kind != "utility" or (r.defense, r.victim) in active)]
        scores = scoring.score(live, attacks=[])
        fresh = []
        for vs in scores.victims:
            w = self.state.get((vs.defense, vs.victim))
            if w is None or not w.active:
                continue
            # decided on the selection half only: the held-out half, which the entry reports, never steers a stop
            w.recovered = vs.selection_recovered
            if vs.selection_recovered is not None and vs.selection_recovered >= self.protocol.break_threshold:
                w.broken_at = k
                fresh.append((vs.defense, vs.victim))
        return sorted(fresh)

    def replicates(self, by_id: Mapping[str, CellRecord]) -> list[Cell]:
        """After the last step: the cells of each applicable (defense, victim)'s worst pair under the protocol's
        replicate seeds: its step's baseline, utility, protected and reference cells for that defense and
        victim. The worst pair is the one the scoring chooses from the cells the walk read (seed 0's selection
        half; the break's pair for a broken defense), so the seeds add evidence to the reported pair without
        steering which pair is reported."""
        from bench import scoring

        if not self.protocol.replicate_seeds or self.steps_done < len(self.protocol.steps):
            return []
        steps = {(s.attack, s.merge): s for s in self.protocol.steps}
        seeded = replace(self.protocol, seeds=self.protocol.replicate_seeds)
        live = [r for i in sorted(self.seen) if (r := by_id.get(i)) is not None]
        self._replicated = {}
        for vs in scoring.score(live, attacks=[]).victims:
            w = self.state.get((vs.defense, vs.victim))
            step = steps.get((vs.best_attack, vs.best_merge))
            if w is None or not w.applicable or step is None:
                continue
            w.replicated = step.label
            self._replicated[(w.defense, w.victim)] = step_cells(seeded, self.suite, step, [w.defense], [w.victim])
        cells = {c.cell_id: c for cs in self._replicated.values() for c in cs}
        return list(cells.values())

    def account_replicates(self, by_id: Mapping[str, CellRecord]) -> None:
        """Mark the replicate cells (`replicates`) read, and each pair whose replicates are not all stored as
        missing them (the planned cells hold each protected cell's references, so all of them done is enough)."""
        for (d, v), cells in self._replicated.items():
            w = self.state[(d, v)]
            self.seen.update(c.cell_id for c in cells)
            done = all(_done(by_id.get(c.cell_id)) for c in cells)
            label = f"replicates of {w.replicated}"
            if not done and label not in w.missing:
                w.missing.append(label)

    def result(self) -> Walk:
        return Walk(self.protocol, self.suite.name, self.state, set(self.seen))


def walk(protocol: Protocol, suite: Suite, records: Iterable[CellRecord], defense_names: Sequence[str]) -> Walk:
    """The protocol's state on ``suite`` re-derived from stored ``records`` (what a run decided)."""
    by_id = {r.cell_id: r for r in records}
    walker = Walker(protocol, suite, defense_names)
    for step in protocol.steps:
        walker.advance(step_cells(protocol, suite, step, walker.names), by_id)
    walker.replicates(by_id)
    walker.account_replicates(by_id)
    return walker.result()


# ---------------------------------------------------------------- running


@dataclass
class StepReport:
    index: int
    step: Step
    cells: int
    ran: int
    seconds: float
    broken: list[tuple[str, str]]
    failed: int = 0


RunCells = Callable[[Sequence[Cell]], Any]
"""Runs cells into the store (the local or Ray executor); returns its `RunSummary`."""


def run_protocol(protocol: Protocol, suite: Suite, store: Store, defense_names: Sequence[str], run_cells: RunCells,
                 *, victims: Sequence[str] | None = None,
                 log: Callable[[str], None] = print) -> tuple[Walk, list[StepReport]]:
    """Run ``protocol`` on ``suite`` for ``defense_names``, step by step, each step only on the (defense,
    victim) pairs the earlier steps left unbroken. A re-run resumes: stored cells are skipped and the
    breaks are re-derived from them as the steps are replayed. ``victims`` runs a slice: the same cells
    for those victims only (partners are still every other task), so the others stay missing and their
    entries incomplete until a run covers them."""
    for v in victims or ():
        suite.check_task(v)
    walker = Walker(protocol, suite, defense_names)
    reports: list[StepReport] = []
    for k, step in enumerate(protocol.steps):
        todo = [c for c in step_cells(protocol, suite, step, walker.names)
                if walker.needs(c) and (not victims or c.victim in victims)]
        t0 = time.time()
        summary = run_cells(todo)
        seconds = time.time() - t0
        fresh = walker.advance(todo, {r.cell_id: r for r in store.cells(suite=suite.name)})
        ran = summary.ok + summary.na + summary.failed
        reports.append(StepReport(k, step, len(todo), ran, seconds, fresh, summary.failed))
        alive = sorted({w.defense for w in walker.state.values() if w.active})
        log(f"[protocol {protocol.name} v{protocol.version}] step {k + 1}/{len(protocol.steps)} {step.label}: "
            f"{ran} cells run in {seconds:.0f}s"
            + (f"; broken now: {', '.join(f'{d} on {v}' for d, v in fresh)}" if fresh else "")
            + f"; still unbroken somewhere: {', '.join(alive) if alive else 'none'}")
    if protocol.replicate_seeds:
        todo = [c for c in walker.replicates({r.cell_id: r for r in store.cells(suite=suite.name)})
                if not victims or c.victim in victims]
        t0 = time.time()
        summary = run_cells(todo)
        seconds = time.time() - t0
        walker.account_replicates({r.cell_id: r for r in store.cells(suite=suite.name)})
        ran = summary.ok + summary.na + summary.failed
        reports.append(StepReport(len(protocol.steps), REPLICATES, len(todo), ran, seconds, [], summary.failed))
        seeds = ", ".join(map(str, protocol.replicate_seeds))
        log(f"[protocol {protocol.name} v{protocol.version}] replicates (seeds {seeds} on each pair's worst step): "
            f"{ran} cells run in {seconds:.0f}s")
    return walker.result(), reports


# ---------------------------------------------------------------- reading the results


def coverage(protocol: Protocol) -> list[tuple[str, str]]:
    """Every standard attack (registered attacks and their declared composites) and every merge that learns
    on the attacker's data (tuned merges, AdaMerging), with the step that covers it, or ``omitted: REASON``
    where the protocol leaves it out on purpose ('' for a gap). Plain
    merge variants are the honest merger's choices, not attacks: the protocol covers their families (WA,
    TA, TIES, DARE) with one step each, since each plain step costs a reference pair per victim."""
    from bench.plan import standard_attacks
    from bench.registry import merges

    def covered(name: str, steps: list[str]) -> str:
        return steps[0] if steps else f"omitted: {protocol.omitted[name]}" if name in protocol.omitted else ""

    out = [(a, covered(a, [s.label for s in protocol.steps if s.attack == a])) for a in standard_attacks()]
    for m in merges.names():
        method = merges.get(m)
        if method.needs_data or method.labelled_param:
            out.append((m, covered(m, [s.label for s in protocol.steps if s.merge == m])))
    return out


def cell_group(record: CellRecord, protocol: Protocol) -> str:
    """The step group a stored cell of ``protocol`` belongs to: the replicates for a seed outside the protocol's
    seeds, 'baseline' and 'utility (protect)' by kind, else its (attack, merge) step's group ('other' if no step
    has it)."""
    if record.seed not in protocol.seeds:
        return REPLICATE_GROUP
    if record.kind == "baseline":
        return "baseline"
    if record.kind == "utility":
        return "utility (protect)"
    return next((s.group for s in protocol.steps if (s.attack, s.merge) == (record.attack, record.merge)), "other")


def stage_profile(records: Iterable[CellRecord], protocol: Protocol) -> list[dict[str, Any]]:
    """Seconds per (step group, stage) over the cells of a protocol run: where the time goes. ``wall`` is
    each cell's measured wall time; a stage whose result came from the cache (a shared merge, an
    artifact) records the seconds it took when computed, so stage columns can exceed ``wall``."""
    totals: dict[tuple[str, str], float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        if r.status != "ok":
            continue
        group = cell_group(r, protocol)
        counts[group] += 1
        timings = (r.provenance or {}).get("timings") or {}
        for stage, secs in timings.items():
            # a merge cell records its artifact's protect time, computed once by the utility cell: count it there
            if isinstance(secs, (int, float)) and not (stage == "protect" and r.kind == "merge"):
                totals[(group, stage)] += float(secs)
        wall = (r.provenance or {}).get("wall_seconds")
        if isinstance(wall, (int, float)):
            totals[(group, "wall")] += float(wall)
    groups = sorted({g for g, _ in totals}, key=_group_key)
    rows = []
    for g in groups:
        row: dict[str, Any] = {"group": g, "cells": counts[g]}
        for stage in ("protect", "prepare", "merge", "finish", "evaluate", "wall"):
            row[stage] = round(totals.get((g, stage), 0.0), 1)
        rows.append(row)
    return rows


_GROUP_ORDER = ["baseline", "utility (protect)", "plain merge", "algebraic", "tuned merge", "fine-tuning", "adamerging",
                REPLICATE_GROUP]


def _group_key(group: str) -> tuple[int, str]:
    """The documented groups in their order, then any other (a custom step group, 'other') by name."""
    return (_GROUP_ORDER.index(group) if group in _GROUP_ORDER else len(_GROUP_ORDER), group)

START_UP = "experts and start-up"
"""The wall-profile row of what a suite does before its first cell finishes (`wall_profile`)."""


def wall_profile(records: Iterable[CellRecord], runs: Mapping[str, tuple[float, float | None]],
                 protocol: Protocol) -> list[dict[str, Any]]:
    """Wall-clock seconds per (suite, step group) of the runs that wrote ``records``: rows ``{"suite", "group",
    "cells", "seconds"}``, suites in the order they ran, groups in the protocol's order after `START_UP`. Walking
    the cells in the order they finished (``created``), each gap between two finishes is charged to the step group of the cell that closed it (a suite's steps run one after the other, so the gap
    belongs to the group that was running). The first gap of each suite, less its cell's own wall time, is
    charged to `START_UP` (the experts it fine-tunes or loads, the workers' start). A gap that spans the start of
    another run counts from that run's start (the idle time between a crash and its resume is not the
    protocol's); cells of imported runs (no start time) are skipped. ``runs``: `bench.store.Store.run_times`."""
    timed = sorted((r for r in records if runs.get(r.run_id, (0.0, None))[0] > 0), key=lambda r: r.created)
    seconds: dict[tuple[str, str], float] = defaultdict(float)
    cells: dict[tuple[str, str], int] = defaultdict(int)
    previous: CellRecord | None = None
    for r in timed:
        started = runs[r.run_id][0]
        since = started if previous is None or previous.created < started else previous.created
        gap = r.created - since
        if previous is None or previous.suite != r.suite:
            own = (r.provenance or {}).get("wall_seconds")
            start_up = max(0.0, gap - (float(own) if isinstance(own, (int, float)) else 0.0))
            seconds[(r.suite, START_UP)] += start_up
            gap -= start_up
        key = (r.suite, cell_group(r, protocol))
        seconds[key] += gap
        cells[key] += 1
        previous = r
    suites = list(dict.fromkeys(s for s, _ in seconds))
    keys = sorted(seconds, key=lambda k: (suites.index(k[0]), k[1] != START_UP, _group_key(k[1])))
    return [{"suite": s, "group": g, "cells": cells[(s, g)], "seconds": round(seconds[(s, g)], 1)} for s, g in keys]


def signal(scores: Any, protocol: Protocol, suite: str) -> list[dict[str, Any]]:
    """Per victim and plain-attack merge step of ``suite``: the merge gain V_U − V_∅ with its interval (what
    the victim's model gives the free-rider beyond its partners), read from the reference row's pairs of
    ``scores`` (`bench.scoring.Scores`)."""
    merge_steps = [s.merge for s in protocol.steps if s.attack == REFERENCE]
    rows = []
    for vs in scores.victim_scores(suite, REFERENCE):
        for p in vs.pairs:
            if p.attack != REFERENCE or p.merge not in merge_steps:
                continue
            rows.append({"victim": vs.victim, "merge": p.merge, "v_unprotected": p.v_unprotected,
                         "v_counterfactual": p.v_counterfactual, "gain": p.gain, "gain_ci": p.gain_ci,
                         "informative": p.informative, "examples": p.examples})
    rows.sort(key=lambda r: (r["victim"], merge_steps.index(r["merge"])))
    return rows


@dataclass
class Scope:
    """What a protocol publishes from a set of stored cells: the cells its steps planned (up to each
    (defense, victim)'s break), the steps each entry still lacks, and the step that broke each."""

    records: list[CellRecord]
    missing: dict[tuple[str, str, str], list[str]]
    broken_by: dict[tuple[str, str, str], str | None]
    walks: dict[str, Walk]
    skipped_suites: dict[str, str]
    not_applicable: list[tuple[str, str, str]] = field(default_factory=list)
    """(suite, defense, reason) of every registered defense that cannot act on a suite's architecture, from
    the planner's rule (`bench.plan.defense_applicability`), so it is listed even with no stored cell."""


def scope(records: Iterable[CellRecord], protocol: Protocol, *, cache_dir: str | None = None) -> Scope:
    """Walk ``protocol`` over the stored cells of every suite they hold (the defenses walked are those with
    cells there). A suite whose plugin is not installed cannot be planned and is left out, with the reason."""
    from bench.registry import RegistryError, suites

    records = list(records)
    out = Scope([], {}, {}, {}, {})
    for name in sorted({r.suite for r in records}):
        own = [r for r in records if r.suite == name]
        try:
            suite = suites.get(name)(cache_dir=cache_dir)
        except RegistryError as exc:
            out.skipped_suites[name] = str(exc)
            continue
        names = sorted({r.defense for r in own if r.kind in ("utility", "merge") and r.filling == "protected"
                        and r.defense not in (REFERENCE, "-")})
        w = walk(protocol, suite, own, names)
        out.walks[name] = w
        arch = suite.arch_map()
        for d in defenses.names():
            reason = defense_applicability(make_defense(d), arch)
            if reason:
                out.not_applicable.append((name, d, reason))
        out.records.extend(r for r in own if r.cell_id in w.cell_ids)
        for (d, v), vw in w.victims.items():
            out.missing[(name, d, v)] = list(vw.missing)
            out.broken_by[(name, d, v)] = w.broken_by(d, v)
    return out


# ---------------------------------------------------------------- what a run will cost


@dataclass
class StepEstimate:
    """One step's share of a protocol run before it starts, if no pair breaks (an upper bound: a break only
    removes cells)."""

    index: int
    step: Step
    cells: int
    """Planned cells, N/A ones included (a defense that cannot act on the architecture records why, at no cost)."""
    stored: int
    seconds: float
    """Estimated wall seconds of the cells still to run, on one worker."""
    unknown: int
    """Cells to run with no timed cell of their kind to estimate from."""


class CellTimes:
    """Median wall seconds of timed cells, looked up from the most specific match to the least: the same
    suite, defense, attack, merge and filling; then any setting of the same defense (``NAME[*]``: its variants,
    `bench.plan.parse_variant`); then any defense; then the same on any suite."""

    def __init__(self, records: Iterable[CellRecord]) -> None:
        samples: dict[tuple, list[float]] = defaultdict(list)
        for r in records:
            wall = (r.provenance or {}).get("wall_seconds")
            if r.status != "ok" or not isinstance(wall, (int, float)):
                continue
            for key in self._keys(r.suite, r.kind, r.defense, r.attack, r.merge, r.filling):
                samples[key].append(float(wall))
        self._median = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}

    @staticmethod
    def _keys(suite: str, kind: str, defense: str, attack: str, merge: str, filling: str) -> list[tuple]:
        family = defense.split("[", 1)[0] + "[*]"
        return [(suite, kind, defense, attack, merge, filling), (suite, kind, family, attack, merge, filling),
                (suite, kind, "*", attack, merge, filling), ("*", kind, defense, attack, merge, filling),
                ("*", kind, family, attack, merge, filling), ("*", kind, "*", attack, merge, filling)]

    def seconds(self, suite: str, cell: Cell) -> float | None:
        for key in self._keys(suite, cell.kind, cell.defense_label, cell.attack_label, cell.merge_label, cell.filling):
            if key in self._median:
                return self._median[key]
        return None


def estimate(protocol: Protocol, suite: Suite, defense_names: Sequence[str], stored: Iterable[str],
             times: CellTimes, *, victims: Sequence[str] | None = None) -> list[StepEstimate]:
    """Per step: the cells a run would plan if no pair broke, how many are already in the store (``stored``
    cell ids), and the estimated seconds of the rest from ``times`` (a cell planned by an earlier step is
    counted there only)."""
    done, seen = set(stored), set()
    names = [d for d in defense_names if d != REFERENCE]
    out = []
    for k, step in enumerate(protocol.steps):
        cells = [c for c in step_cells(protocol, suite, step, names)
                 if c.cell_id not in seen and (not victims or c.victim in victims)]
        seen.update(c.cell_id for c in cells)
        todo = [c for c in cells if c.cell_id not in done and not c.na_reason]
        secs = [times.seconds(suite.name, c) for c in todo]
        stored_here = sum(c.cell_id in done for c in cells)
        out.append(StepEstimate(k, step, len(cells), stored_here, sum(s for s in secs if s is not None),
                                sum(s is None for s in secs)))
    if protocol.replicate_seeds:
        out.append(_replicate_estimate(protocol, suite, names, done, times, victims))
    return out


def _replicate_estimate(protocol: Protocol, suite: Suite, names: Sequence[str], done: set[str], times: CellTimes,
                        victims: Sequence[str] | None) -> StepEstimate:
    """The replicate phase, typically: which step is a pair's worst is known only after the walk, so each
    (defense, victim) is counted at its median-cost step, with that step's cells under the replicate seeds
    (baseline, utility, protected and references; a reference shared by two defenses is counted twice)."""
    seeded = replace(protocol, seeds=protocol.replicate_seeds)
    per_pair: dict[tuple[str, str], list[tuple[float, int, int, int]]] = defaultdict(list)
    for step in protocol.steps:
        cells = [c for c in step_cells(seeded, suite, step, names) if not victims or c.victim in victims]
        for d in names:
            label = make_defense(d).label
            for v in {c.victim for c in cells}:
                mine = [c for c in cells if c.victim == v and (c.defense is None or c.defense.label == label)]
                todo = [c for c in mine if c.cell_id not in done and not c.na_reason]
                secs = [times.seconds(suite.name, c) for c in todo]
                per_pair[(label, v)].append((sum(x for x in secs if x is not None), len(mine),
                                             sum(c.cell_id in done for c in mine), sum(x is None for x in secs)))
    chosen = [sorted(costs)[len(costs) // 2] for costs in per_pair.values()]
    return StepEstimate(len(protocol.steps), REPLICATES, sum(c[1] for c in chosen), sum(c[2] for c in chosen),
                        sum(c[0] for c in chosen), sum(c[3] for c in chosen))

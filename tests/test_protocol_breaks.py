"""The protocol's break decisions on hand-built stored cells: breaks read the selection half only, a break
at a later step skips what follows, and the export names the step; the expected walk is worked out by hand."""

from __future__ import annotations

import json

import numpy as np
from scored_cells import record

from bench.outcomes import encode
from bench.plugins import AttackNeeds
from bench.protocol import Protocol, Step, step_cells, walk
from bench.scoring import example_split
from bench.store import Metric, Store

N = 200
BUDGET = AttackNeeds(anchor=True, labelled=256, unlabelled=1024, finetune_steps=1000, knows_defense=True)
PROTOCOL = Protocol(name="mini", version="0", break_threshold=0.9, seeds=(0,), partners="rest", params={},
                    budget=BUDGET, steps=(Step("none", "ties", "plain merge", "all"),
                                          Step("revert-to-base", "ta", "algebraic"),
                                          Step("none", "ta", "plain merge", "all")))


def _metric(task: str, v: np.ndarray, role: str = "merged") -> Metric:
    return Metric(role, task, "accuracy", float(v.mean()), True, encode(v))


def _stored(suite, victim_outcome) -> list:
    """Every cell the three steps plan, stored: ∅ scores 0 and U 1 on every example (a gain of 1); the
    protected release scores what ``victim_outcome(victim, step_index, sel, held)`` says."""
    records, seen = [], set()
    for k, step in enumerate(PROTOCOL.steps):
        for c in step_cells(PROTOCOL, suite, step, ["toy-scale"]):
            if c.cell_id in seen:
                continue
            seen.add(c.cell_id)
            sel, held = example_split(0, suite.name, c.victim, N)
            if c.kind == "baseline":
                metrics = [_metric(c.victim, np.zeros(N), "pretrained"), _metric(c.victim, np.ones(N), "expert")]
            elif c.kind == "utility":
                metrics = [_metric(c.victim, np.ones(N), "utility")]
            elif c.filling == "counterfactual":
                metrics = [_metric(c.victim, np.zeros(N))]
            elif c.filling == "unprotected":
                metrics = [_metric(t, np.ones(N)) for t in c.evaluated_tasks]
            else:
                metrics = [_metric(c.victim, victim_outcome(c.victim, k, sel, held))]
            records.append(record(c.spec(), metrics, provenance={"timings": {}}))
    return records


def _half(idx: np.ndarray) -> np.ndarray:
    v = np.zeros(N)
    v[idx] = 1.0
    return v


def test_breaks_read_the_selection_half_at_a_later_step_and_skip_what_follows(toy_suite, tmp_path) -> None:
    a, b, c = toy_suite.tasks[:3]

    def outcome(victim, k, sel, held):
        if k != 1:
            return np.zeros(N)  # the plain merges recover nothing
        # step 1 (revert-to-base / ta): on a the release is the expert on the selection half only (selection
        # recovered 1, held-out 0); on b on the held-out half only (selection 0, held-out 1); on c everywhere
        return _half(sel) if victim == a else _half(held) if victim == b else np.ones(N)

    records = _stored(toy_suite, outcome)
    w = walk(PROTOCOL, toy_suite, records, ["toy-scale"])
    assert w.victims[("toy-scale", a)].broken_at == 1 and w.broken_by("toy-scale", a) == "revert-to-base / ta"
    assert w.victims[("toy-scale", b)].broken_at is None and w.broken_by("toy-scale", b) is None
    assert w.victims[("toy-scale", c)].broken_at == 1
    assert all(not v.missing for v in w.victims.values())
    # a's step-2 cells are not needed (it broke at step 1): a walk without them is still complete
    step2 = {c.cell_id for c in step_cells(PROTOCOL, toy_suite, PROTOCOL.steps[2], ["toy-scale"])
             if c.victim == a and c.filling == "protected"}
    w2 = walk(PROTOCOL, toy_suite, [r for r in records if r.cell_id not in step2], ["toy-scale"])
    assert not w2.victims[("toy-scale", a)].missing
    # ... while b, unbroken, owes step 2 when its cell is gone
    step2b = {c.cell_id for c in step_cells(PROTOCOL, toy_suite, PROTOCOL.steps[2], ["toy-scale"])
              if c.victim == b and c.filling == "protected"}
    w3 = walk(PROTOCOL, toy_suite, [r for r in records if r.cell_id not in step2b], ["toy-scale"])
    assert w3.victims[("toy-scale", b)].missing == ["none / ta"]

    from leaderboard import export as lb_export

    path = tmp_path / "r.sqlite"
    with Store(path) as store:
        for r in records:
            store.put_cell(r)
    out = tmp_path / "data"
    lb_export.export(path, out, protocol=PROTOCOL)
    entry = json.loads((out / "entries" / "toy" / "toy-scale.json").read_text())
    assert entry["summary"]["broken_by"][a] == "revert-to-base / ta" and entry["summary"]["broken_by"][b] is None
    victims = {v["victim"]: v for v in entry["victims"]}
    # a stopped on its selection half (1.0) but reports its held-out half (0.0): not broken on the site
    assert victims[a]["selection_recovered"] == 1.0 and victims[a]["best_recovered"] == 0.0
    assert victims[a]["broken"] is False and victims[a]["security"] == 1.0
    # b's recovery lies on held-out examples the selection never sees: the plain merge (0) is chosen, b stays
    # unbroken; c is restored everywhere: stopped at step 1 and broken on the site
    assert victims[b]["selection_recovered"] == 0.0 and victims[b]["best_recovered"] == 0.0
    assert victims[b]["broken"] is False
    assert victims[c]["best_recovered"] == 1.0 and victims[c]["broken"] is True
    assert entry["summary"]["broken_on"] == [c]


def test_a_selection_recovered_equal_to_the_threshold_breaks_and_the_walk_keeps_each_pairs_recovered(toy_suite) -> None:
    from dataclasses import replace

    a, b, c = toy_suite.tasks[:3]

    def outcome(victim, k, sel, held):
        if k != 1:
            return np.zeros(N)
        return _half(sel) if victim == a else _half(held) if victim == b else np.zeros(N)

    at_one = replace(PROTOCOL, break_threshold=1.0)
    w = walk(at_one, toy_suite, _stored(toy_suite, outcome), ["toy-scale"])
    # a recovers exactly 1.0 of its gain on the selection half: "reached the threshold" includes equality
    assert w.victims[("toy-scale", a)].broken_at == 1 and w.victims[("toy-scale", a)].recovered == 1.0
    # b and c recover nothing the selection half can see, at every step: unbroken, recovered 0 after the last
    for v in (b, c):
        assert w.victims[("toy-scale", v)].broken_at is None and w.victims[("toy-scale", v)].recovered == 0.0

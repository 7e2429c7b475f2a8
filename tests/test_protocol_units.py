"""Small pieces of `bench.protocol` on hand-built records, each expected value worked out by hand."""

from __future__ import annotations

import re
from dataclasses import replace
from types import SimpleNamespace

import pytest

from bench.plugins import AttackNeeds
from bench.protocol import (
    PROTOCOLS,
    REPLICATE_GROUP,
    STANDARD,
    START_UP,
    CellTimes,
    Protocol,
    ProtocolError,
    Step,
    _steps,
    get_protocol,
    signal,
    stage_profile,
    wall_profile,
)
from bench.store import CellRecord

BUDGET = AttackNeeds(anchor=True, labelled=256, unlabelled=1024, finetune_steps=1000, knows_defense=True)
PROTOCOL = Protocol(name="p", version="0", break_threshold=0.9, seeds=(0,), partners="rest", params={}, budget=BUDGET,
                    steps=(Step("none", "ta", "plain merge", "all"), Step("realign", "ta", "algebraic"),
                           Step("none", "ties", "custom")),
                    replicate_seeds=(1,))


def _rec(i: int, kind: str, attack: str = "-", merge: str = "-", seed: int = 0, status: str = "ok",
         timings: dict | None = None, wall: object = None, suite: str = "s", defense: str = "d",
         filling: str = "protected") -> CellRecord:
    prov: dict = {"timings": timings or {}}
    if wall is not None:
        prov["wall_seconds"] = wall
    return CellRecord(cell_id=f"c{i}", kind=kind, suite=suite, victim="v", partners=("p",), defense=defense,
                      attack=attack, merge=merge, seed=seed, status=status, provenance=prov, filling=filling)


def test_wall_profile_charges_each_gap_between_finishes_to_the_cell_that_closed_it() -> None:
    runs = {"r1": (100.0, 200.0), "r2": (1000.0, None), "imported": (0.0, 0.0)}

    def at(rec: CellRecord, run: str, created: float) -> CellRecord:
        return replace(rec, run_id=run, created=created)

    records = [
        # listed out of order: the walk sorts by finish time
        at(_rec(7, "merge", "none", "custom-merge", suite="t"), "r2", 1040.0),  # no step has it: 'other'
        at(_rec(0, "baseline", wall=10.0, suite="s"), "r1", 130.0),  # first of s: 30 s, of which 20 before it began
        at(_rec(1, "utility", suite="s"), "r1", 150.0),
        at(_rec(2, "merge", "none", "ta", suite="s"), "r1", 160.0),
        at(_rec(3, "merge", "realign", "ta", wall=5.0, suite="t"), "r1", 175.0),  # first of t: 15 s, 10 before it
        at(_rec(9, "merge", "none", "ta", suite="s"), "imported", 50.0),  # an imported cell: no clock of ours
        # the resumed run: counted from its own start (1000), not from the last cell of r1 (175)
        at(_rec(4, "merge", "none", "ta", seed=1, suite="t"), "r2", 1010.0),
        at(_rec(5, "merge", "none", "ties", wall="?", suite="t"), "r2", 1030.0),
    ]
    rows = wall_profile(records, runs, PROTOCOL)
    assert rows == [
        {"suite": "s", "group": START_UP, "cells": 0, "seconds": 20.0},
        {"suite": "s", "group": "baseline", "cells": 1, "seconds": 10.0},
        {"suite": "s", "group": "utility (protect)", "cells": 1, "seconds": 20.0},
        {"suite": "s", "group": "plain merge", "cells": 1, "seconds": 10.0},
        {"suite": "t", "group": START_UP, "cells": 0, "seconds": 10.0},
        {"suite": "t", "group": "algebraic", "cells": 1, "seconds": 5.0},
        {"suite": "t", "group": REPLICATE_GROUP, "cells": 1, "seconds": 10.0},
        {"suite": "t", "group": "custom", "cells": 1, "seconds": 20.0},
        {"suite": "t", "group": "other", "cells": 1, "seconds": 10.0},
    ]
    # every second from the first run's start to its last cell, and from the resumed run's start to its last cell
    assert sum(r["seconds"] for r in rows) == (175.0 - 100.0) + (1040.0 - 1000.0)
    # a suite's first cell without a recorded wall time: the whole gap is start-up
    first = wall_profile([at(_rec(0, "baseline", suite="s"), "r1", 130.0)], runs, PROTOCOL)
    assert first == [{"suite": "s", "group": START_UP, "cells": 0, "seconds": 30.0},
                     {"suite": "s", "group": "baseline", "cells": 1, "seconds": 0.0}]


def test_stage_profile_sums_each_stage_per_group_and_counts_protection_once() -> None:
    records = [
        # a failed cell first: it is skipped, and the cells after it still count
        _rec(0, "merge", "none", "ta", status="failed", timings={"merge": 100.0}, wall=1000.0),
        _rec(1, "baseline", timings={"evaluate": 1.5}, wall=2.0),
        _rec(2, "utility", timings={"protect": 5.0, "evaluate": 1.0}, wall=6.5),
        # a merge cell repeats its artifact's protect time (computed once by the utility cell): not counted again
        _rec(3, "merge", "none", "ta", timings={"protect": 5.0, "merge": 2.0, "evaluate": 3.0}, wall=5.5),
        _rec(4, "merge", "realign", "ta", timings={"prepare": 1.0, "merge": 2.0, "evaluate": 3.0, "finish": 0.5},
             wall=7.0),
        _rec(5, "merge", "none", "wa", timings={"merge": 1.0}, wall=1.5),  # no step of the protocol
        # the replicate seed: its own group whatever the kind; a non-numeric timing is ignored
        _rec(6, "merge", "realign", "ta", seed=1, timings={"prepare": 4.0, "evaluate": "n/a"}, wall=9.0),
        _rec(7, "utility", seed=1, timings={"protect": 8.0}, wall=8.5),
        _rec(8, "merge", "none", "ta", timings={"merge": 0.5}),  # no wall time recorded
        _rec(9, "merge", "none", "ties", timings={"merge": 0.75}, wall=0.75),  # a group of its own, seconds to 0.1
    ]
    rows = stage_profile(records, PROTOCOL)

    def row(group: str, cells: int, **stages: float) -> dict:
        out = {"group": group, "cells": cells}
        out.update({s: stages.get(s, 0.0) for s in ("protect", "prepare", "merge", "finish", "evaluate", "wall")})
        return out

    assert rows == [
        row("baseline", 1, evaluate=1.5, wall=2.0),
        row("utility (protect)", 1, protect=5.0, evaluate=1.0, wall=6.5),
        row("plain merge", 2, merge=2.5, evaluate=3.0, wall=5.5),
        row("algebraic", 1, prepare=1.0, merge=2.0, evaluate=3.0, finish=0.5, wall=7.0),
        row(REPLICATE_GROUP, 2, protect=8.0, prepare=4.0, wall=17.5),
        # groups outside the documented order come after it, by name
        row("custom", 1, merge=0.8, wall=0.8),
        row("other", 1, merge=1.0, wall=1.5),
    ]


def test_steps_cross_attacks_with_merges_in_order_and_evaluate_the_victim_by_default() -> None:
    assert _steps("algebraic", ["a", "b"], ["ta", "ties"]) == [
        Step("a", "ta", "algebraic", "victim"), Step("a", "ties", "algebraic", "victim"),
        Step("b", "ta", "algebraic", "victim"), Step("b", "ties", "algebraic", "victim")]
    assert _steps("plain merge", ["none"], ["wa"], evaluate="all") == [Step("none", "wa", "plain merge", "all")]


def test_cell_times_take_the_median_of_the_most_specific_timed_match() -> None:
    walls = {("s", "params[high=80]"): [3, 1, 2], ("s", "params[high=40]"): [40, 30],
             ("s", "taylor"): [800, 500, 700, 600], ("u", "params[high=80]"): [9100, 9000, 9200],
             ("u", "params[high=10]"): [7300, 7000, 7200, 7100], ("s", "barrier[dims=[1, 2]]"): [900, 10, 20]}
    timed = [(s, d, w) for (s, d), ws in walls.items() for w in ws]
    records = [_rec(i, "merge", "none", "ta", suite=s, defense=d, wall=w) for i, (s, d, w) in enumerate(timed)]
    records += [
        # never timed: a failed cell, a wall time that is not a number, and no wall time at all
        _rec(90, "merge", "none", "ta", defense="params[high=80]", status="failed", wall=10.0 ** 6),
        _rec(91, "merge", "none", "ta", defense="params[high=80]", wall="99999"),
        _rec(92, "merge", "none", "ta", defense="params[high=80]"),
        # another kind and another filling of the same coordinates are looked up apart
        _rec(93, "utility", "none", "ta", defense="params[high=80]", wall=123.0),
        _rec(94, "merge", "none", "ta", defense="none", filling="unprotected", wall=77.0),
    ]
    times = CellTimes(records)

    def secs(suite: str, defense: str, kind: str = "merge", merge: str = "ta", filling: str = "protected"):
        cell = SimpleNamespace(kind=kind, defense_label=defense, attack_label="none", merge_label=merge,
                               filling=filling)
        return times.seconds(suite, cell)

    # the median is the upper middle of the sorted times (sorted(v)[len(v) // 2]), worked out by hand:
    assert secs("s", "params[high=80]") == 2  # [1, 2, 3]
    assert secs("s", "params[high=5]") == 3  # any params setting on s: [1, 2, 3, 30, 40]
    # a setting whose value holds brackets is of the family before the first one
    assert secs("s", "barrier[n=4]") == 20
    assert secs("s", "mergeguard") == 40  # any defense on s: [1, 2, 3, 10, 20, 30, 40, 500, 600, 700, 800, 900]
    assert secs("t", "params[high=80]") == 9000  # that defense on any suite: [1, 2, 3, 9000, 9100, 9200]
    assert secs("t", "params[high=5]") == 7100  # any params setting anywhere: 12 times, the 7th
    assert secs("t", "mergeguard") == 700  # anything anywhere: 19 times, the 10th
    assert secs("s", "params[high=80]", kind="utility") == 123
    assert secs("s", "none", filling="unprotected") == 77
    assert secs("s", "params[high=80]", merge="wa") is None


class _OneSecond:
    """Times every cell at 1 s (the estimate's arithmetic, apart from the lookup)."""

    def seconds(self, suite: str, cell: object) -> float:
        return 1.0


FOUR = Protocol(name="four", version="0", break_threshold=0.9, seeds=(0,), partners="rest", params={}, budget=BUDGET,
                steps=(Step("none", "ties", "plain merge", "all"), Step("none", "wa", "plain merge", "all"),
                       Step("revert-to-base", "ta", "algebraic"), Step("none", "ta", "plain merge", "all")),
                replicate_seeds=(1,))


def test_estimate_rows_are_indexed_by_step_and_a_victim_slice_counts_that_victim_only(toy_suite) -> None:
    from bench.protocol import estimate, step_cells

    v = toy_suite.tasks[0]
    rows = estimate(FOUR, toy_suite, ["toy-scale"], [], _OneSecond(), victims=[v])
    assert [r.index for r in rows] == [0, 1, 2, 3, 4] and rows[-1].step.group == REPLICATE_GROUP
    # per step and victim: a baseline, the defense's utility cell, the protected cell and its two references (5);
    # a cell an earlier step planned is not counted again: the baseline and utility cell after the first step,
    # and none / ta's references, which revert-to-base (read against the plain merge) plans before none / ta
    assert [r.cells for r in rows[:4]] == [5, 3, 3, 1]
    mine = {c.cell_id for s in FOUR.steps for c in step_cells(FOUR, toy_suite, s, ["toy-scale"])}
    assert all(r.seconds == r.cells for r in rows[:4]) and sum(r.cells for r in rows[:4]) == len(mine) // 3
    # the replicate row of the one victim: its median-cost step's 5 cells under seed 1
    assert (rows[-1].cells, rows[-1].seconds, rows[-1].stored) == (5, 5.0, 0)


def test_the_replicate_row_counts_each_pair_at_its_median_cost_step_under_the_replicate_seeds(toy_suite) -> None:
    from dataclasses import replace

    from bench.protocol import estimate, step_cells

    seed1 = replace(FOUR, seeds=(1,))
    # the seed-1 merge cells of the first two steps are stored already: per victim the four steps then cost
    # 2, 2, 5 and 5 cells (the baseline and utility cells of seed 1 are never stored here): the upper median
    # of four is the third, 5, on each of the 3 victims
    stored = [c.cell_id for s in FOUR.steps[:2] for c in step_cells(seed1, toy_suite, s, ["toy-scale"])
              if c.kind == "merge"]
    # and every seed-0 cell of every step (what the walk ran): none of them is a replicate
    stored += [c.cell_id for s in FOUR.steps for c in step_cells(FOUR, toy_suite, s, ["toy-scale"])]
    reps = estimate(FOUR, toy_suite, ["toy-scale"], stored, _OneSecond())[-1]
    assert (reps.cells, reps.stored, reps.seconds, reps.unknown) == (15, 0, 15.0, 0)
    # all of them stored: nothing left, each pair's median step still counted in cells
    everything = stored + [c.cell_id for s in FOUR.steps for c in step_cells(seed1, toy_suite, s, ["toy-scale"])]
    done = estimate(FOUR, toy_suite, ["toy-scale"], everything, _OneSecond())[-1]
    assert (done.cells, done.stored, done.seconds) == (15, 15, 0.0)


def test_estimate_reads_the_times_of_its_own_suite_before_other_suites(toy_suite) -> None:
    from bench.protocol import estimate, step_cells

    planned = {c.cell_id: c for s in FOUR.steps for c in step_cells(FOUR, toy_suite, s, ["toy-scale"])}
    # every planned kind timed at 1 s on this suite and at 100 s on another: only this suite's times count
    records = [CellRecord(cell_id=f"{suite}{i}", kind=c.kind, suite=suite, victim=c.victim, partners=c.partners,
                          defense=c.defense_label, attack=c.attack_label, merge=c.merge_label, seed=0, status="ok",
                          filling=c.filling, provenance={"wall_seconds": wall})
               for suite, wall in ((toy_suite.name, 1.0), ("elsewhere", 100.0))
               for i, c in enumerate(planned.values())]
    rows = estimate(FOUR, toy_suite, ["toy-scale"], [], CellTimes(records))
    assert sum(r.seconds for r in rows[:4]) == len(planned)
    assert rows[-1].seconds == 15.0  # 3 victims x 5 cells at 1 s


def test_describe_writes_every_field_of_the_protocol() -> None:
    assert PROTOCOL.describe() == {
        "name": "p", "version": "0", "description": "", "break_threshold": 0.9, "seeds": [0], "partners": "rest",
        "params": {}, "budget": {"labelled": 256, "unlabelled": 1024, "finetune_steps": 1000, "knows_defense": True},
        "steps": [{"index": 0, "attack": "none", "merge": "ta", "group": "plain merge", "evaluate": "all"},
                  {"index": 1, "attack": "realign", "merge": "ta", "group": "algebraic", "evaluate": "victim"},
                  {"index": 2, "attack": "none", "merge": "ties", "group": "custom", "evaluate": "victim"}],
        "omitted": {}, "replicate_seeds": [1],
    }


def test_an_unknown_protocol_names_every_known_one(monkeypatch) -> None:
    monkeypatch.setitem(PROTOCOLS, "p", PROTOCOL)
    with pytest.raises(ProtocolError, match=r"^unknown protocol 'nope'; known: p, standard$"):
        get_protocol("nope")


def test_signal_reads_the_reference_rows_plain_merge_pairs_in_step_order() -> None:
    def pair(attack: str, merge: str, gain: float) -> SimpleNamespace:
        return SimpleNamespace(attack=attack, merge=merge, v_unprotected=0.9, v_counterfactual=0.9 - gain, gain=gain,
                               gain_ci=(gain - 0.1, gain + 0.1), informative=True, examples=100)

    victims = [SimpleNamespace(victim="b", pairs=[pair("realign", "ta", 0.5), pair("none", "ties", 0.4),
                                                  pair("none", "ta", 0.3)]),
               SimpleNamespace(victim="a", pairs=[pair("none", "ta", 0.2)])]

    class Scores:
        def victim_scores(self, suite: str, defense: str) -> list:
            assert (suite, defense) == ("s", "none")
            return victims

    # PROTOCOL's plain-attack steps are none / ta and none / ties; an undo attack's pair is no signal
    rows = signal(Scores(), PROTOCOL, "s")
    assert [(r["victim"], r["merge"], r["gain"]) for r in rows] == [("a", "ta", 0.2), ("b", "ta", 0.3),
                                                                    ("b", "ties", 0.4)]
    assert rows[0] == {"victim": "a", "merge": "ta", "v_unprotected": 0.9, "v_counterfactual": 0.9 - 0.2,
                       "gain": 0.2, "gain_ci": (0.2 - 0.1, 0.2 + 0.1), "informative": True, "examples": 100}


def test_scope_walks_each_plannable_suite_and_names_those_it_cannot_plan(toy_suite, tmp_path, monkeypatch) -> None:
    from dataclasses import replace

    from bench.protocol import scope
    from bench.registry import RegistryError, suites
    from bench.store import Store
    from tests.test_protocol import _run, mini, register_conv_only

    protocol = mini()
    with Store(tmp_path / "r.sqlite") as store:
        _run(protocol, toy_suite, store, ["toy-scale"])
        records = store.cells()
    # a defense with only a utility cell stored is walked (its steps missing), and so is one with only merge cells
    util = next(r for r in records if r.kind == "utility")
    merge = next(r for r in records if r.kind == "merge" and r.filling == "protected")
    records += [replace(util, cell_id="only-utility", defense="params"),
                replace(merge, cell_id="only-merge", defense="mergelock"),
                replace(util, cell_id="ghost", suite="a-ghost")]  # a suite not installed, sorted first

    register_conv_only(monkeypatch)

    made: list[object] = []
    real_get = suites.get

    def get(name: str):
        if name == "a-ghost":
            raise RegistryError("unknown suite 'a-ghost'")
        made.append(name)
        return lambda cache_dir=None: made.append(cache_dir) or real_get(name)(cache_dir=cache_dir)

    monkeypatch.setattr(suites, "get", get)
    sc = scope(records, protocol, cache_dir=str(toy_suite.cache_dir))
    assert sc.skipped_suites == {"a-ghost": "unknown suite 'a-ghost'"}
    assert made == [toy_suite.name, str(toy_suite.cache_dir)]  # the suite is built on the cache it was given
    assert set(sc.walks) == {toy_suite.name} and sc.walks[toy_suite.name].suite == toy_suite.name
    walked = {d for (_s, d, _v) in sc.missing}
    assert walked == {"toy-scale", "params", "mergelock"}
    assert all(sc.missing[(toy_suite.name, "params", v)] for v in toy_suite.tasks)  # it ran nothing
    reason = next(r for s, d, r in sc.not_applicable if (s, d) == (toy_suite.name, "conv-only"))
    assert "convolution" in reason and {d for _s, d, _r in sc.not_applicable} == {"conv-only"}


def test_a_victim_without_a_worst_pair_gets_no_replicates(toy_suite, tmp_path) -> None:
    from dataclasses import replace

    from bench.protocol import walk
    from bench.store import Store
    from tests.test_protocol import _run, mini

    protocol = replace(mini(), replicate_seeds=(1,))
    with Store(tmp_path / "r.sqlite") as store:
        _run(protocol, toy_suite, store, ["toy-scale"])
        records = store.cells()
    # on victim v every reference merge scores what θ_pre's does: no pair has a gain, so none is the worst
    v = toy_suite.tasks[0]
    zero = next(m for r in records if r.victim == v and r.filling == "counterfactual" for m in r.metrics
                if (m.role, m.task) == ("merged", v))
    flat = [replace(r, metrics=tuple(zero if (m.role, m.task) == ("merged", v) else m for m in r.metrics))
            if r.victim == v and r.kind == "merge" and r.filling != "protected" else r for r in records]
    result = walk(protocol, toy_suite, flat, ["toy-scale"])
    replicated = {victim: w.replicated for (_d, victim), w in result.victims.items()}
    assert replicated[v] is None
    assert all(replicated[t] for t in toy_suite.tasks if t != v)
    assert not any(m.startswith("replicates") for m in result.victims[("toy-scale", v)].missing)


def test_a_cell_is_done_when_ok_or_na_by_structure_never_when_failed_missing_or_over_budget() -> None:
    from bench.protocol import _done

    def na(prov: dict | None) -> CellRecord:
        return CellRecord(cell_id="n", kind="merge", suite="s", victim="v", partners=(), defense="d", attack="a",
                          merge="m", seed=0, status="na", provenance=prov)  # type: ignore[arg-type]

    assert _done(_rec(1, "merge")) and not _done(None)
    assert not _done(_rec(2, "merge", status="failed"))
    failed_structural = CellRecord(**{**_rec(3, "merge", status="failed").__dict__,
                                      "provenance": {"na_kind": "structural"}})
    assert not _done(failed_structural)  # a failed cell is never done, whatever its provenance says
    # an N/A cell is done (it records why it cannot run) unless the budget made it N/A: a larger one may run it
    assert _done(na({"na_kind": "structural"})) and _done(na({})) and _done(na(None))
    assert not _done(na({"na_kind": "budget"}))


def test_each_step_report_counts_what_ran_and_logs_the_breaks_and_the_defenses_still_unbroken(toy_suite,
                                                                                              tmp_path) -> None:
    from dataclasses import replace

    from bench.executors.local import run_local
    from bench.protocol import REPLICATES, run_protocol
    from bench.store import Store
    from tests.test_protocol import mini

    protocol = replace(mini(), replicate_seeds=(1,))
    given: list[int] = []
    sums: list[SimpleNamespace] = []
    logs: list[str] = []
    with Store(tmp_path / "r.sqlite") as store:
        def run_cells(cells):
            given.append(len(cells))
            done = run_local(toy_suite, store, cells, run_id="p", log=lambda m: None)
            # reported as if 2 more were N/A and 1 more failed: a report adds up what the executor says
            sums.append(SimpleNamespace(ok=done.ok, na=done.na + 2, failed=done.failed + 1))
            return sums[-1]

        result, reports = run_protocol(protocol, toy_suite, store, ["toy-scale", "params", "mergelock"], run_cells,
                                       log=logs.append)
    assert [r.index for r in reports] == [0, 1, 2, 3] and [r.step for r in reports] == [*protocol.steps, REPLICATES]
    assert [r.cells for r in reports] == given
    assert [r.ran for r in reports] == [s.ok + s.na + s.failed for s in sums]
    assert [r.failed for r in reports] == [s.failed for s in sums] and all(s.failed >= 1 for s in sums)
    assert all(0 <= r.seconds < 600 for r in reports) and reports[-1].broken == []
    broken = [r.broken for r in reports[:-1]]
    assert broken[0] == sorted(broken[0]) and sum(len(b) for b in broken) >= 2
    first = broken[0]
    # the first log line names every pair the step broke, joined by ', ', and the defenses still unbroken
    assert f"broken now: {', '.join(f'{d} on {v}' for d, v in first)}" in logs[0] if first else "broken now" not in logs[0]
    alive = sorted({w.defense for w in result.victims.values() if w.broken_at is None or w.broken_at > 0})
    assert logs[0].endswith(f"still unbroken somewhere: {', '.join(alive) if alive else 'none'}")
    assert len(alive) >= 2  # so the join is seen
    # a step that breaks nothing says only who is still unbroken
    assert re.fullmatch(rf"\[protocol mini v0\] step 2/3 revert-to-base / ta: {reports[1].ran} cells run in \d+s; "
                        rf"still unbroken somewhere: {', '.join(alive)}", logs[1]) and not broken[1]
    assert re.fullmatch(rf"\[protocol mini v0\] replicates \(seeds 1 on each pair's worst step\): {reports[-1].ran} "
                        r"cells run in \d+s", logs[-1])


def test_a_victim_slice_runs_that_victims_replicates_only(toy_suite, tmp_path) -> None:
    from dataclasses import replace

    from bench.executors.local import run_local
    from bench.protocol import run_protocol
    from bench.store import Store
    from tests.test_protocol import mini

    protocol = replace(mini(), replicate_seeds=(1,))
    v = toy_suite.tasks[1]
    with Store(tmp_path / "r.sqlite") as store:
        run_protocol(protocol, toy_suite, store, ["toy-scale"],
                     lambda cells: run_local(toy_suite, store, cells, run_id="p", log=lambda m: None),
                     victims=[v], log=lambda m: None)
        stored = store.cells()
    assert {r.victim for r in stored} == {v} and {r.seed for r in stored} == {0, 1}


def test_a_later_steps_references_run_only_on_victims_where_a_defense_is_still_unbroken(toy_suite, tmp_path) -> None:
    from bench.executors.local import run_local
    from bench.protocol import run_protocol
    from bench.store import Store
    from tests.test_protocol import mini

    protocol = mini()
    handed: list[list] = []
    with Store(tmp_path / "r.sqlite") as store:
        def run_cells(cells):
            handed.append(list(cells))
            return run_local(toy_suite, store, cells, run_id="p", log=lambda m: None)

        result, _ = run_protocol(protocol, toy_suite, store, ["toy-scale", "params"], run_cells, log=lambda m: None)
    unbroken = {v for (_d, v), w in result.victims.items() if w.broken_at is None}
    broken_everywhere = set(toy_suite.tasks) - unbroken
    assert unbroken and broken_everywhere  # both kinds of victim, so the rule is seen both ways
    assert all(w.na == {} for w in result.victims.values())  # every cell ran: no step is N/A anywhere

    def refs(k: int) -> set[str]:
        return {c.victim for c in handed[k] if c.kind == "merge" and c.filling != "protected"}

    # step 2 is algebraic: its references (none / ta's) only where some defense is still unbroken ...
    assert refs(1) == unbroken
    # ... step 3 is a plain merge: its references on every victim (the suite's signal table)
    assert refs(2) == set(toy_suite.tasks)


# a protocol whose every setting differs from the defaults, so a step that drops one plans other cells
TUNED = Protocol(name="tuned", version="0", break_threshold=0.9, seeds=(0,), partners="pairs",
                 params={"merge-finetune": {"steps": "3", "samples": "16"}, "ta": {"lambda_": "0.5"}},
                 budget=AttackNeeds(anchor=True, labelled=16, unlabelled=0, finetune_steps=3, knows_defense=True),
                 steps=(Step("none", "ta", "plain merge", "all"), Step("merge-finetune", "ta", "fine-tuning", "victim")))


def test_a_step_plans_under_the_protocols_own_partners_params_budget_and_evaluation(toy_suite) -> None:
    from dataclasses import replace

    from bench.protocol import step_cells

    victim = toy_suite.tasks[0]
    others = {(t,) for t in toy_suite.tasks[1:]}
    cells = step_cells(TUNED, toy_suite, TUNED.steps[1], ["toy-scale"], [victim])
    merges = [c for c in cells if c.kind == "merge"]
    # pairs: one merge per other task and filling, each with that task alone as partner
    assert sorted(c.filling for c in merges) == ["counterfactual", "counterfactual", "protected", "protected",
                                                 "unprotected", "unprotected"]
    assert {c.partners for c in merges} == others
    # the protocol's params reach the merge and the attack, and the references are the attack's own
    # counterpart (a data-using attack: itself, at the same params)
    assert all(c.merge.spec()["params"] == {"lambda_": 0.5} for c in merges)
    assert all(c.attack.spec()["params"]["steps"] == 3 and c.attack.spec()["params"]["samples"] == 16 for c in merges)
    # evaluate="victim": no merge of this step is evaluated on the partners (merge-finetune / ta is no
    # evaluate-all step, so its unprotected cells are not either)
    assert not any(c.evaluate_partners for c in merges)
    # the budget allows the 16 samples: nothing is N/A; a budget of 8 makes every merge cell N/A by budget
    assert not any(c.na_reason for c in merges)
    poor = replace(TUNED, budget=replace(TUNED.budget, labelled=8))
    assert {(c.na_kind, "needs 16 labelled, budget allows 8" in c.na_reason)
            for c in step_cells(poor, toy_suite, poor.steps[1], ["toy-scale"], [victim]) if c.kind == "merge"} == \
        {("budget", True)}


def test_merge_cells_out_of_budget_leave_the_defense_applicable(toy_suite) -> None:
    from dataclasses import replace

    from bench.protocol import walk

    # every merge cell of the first step is N/A by budget; the defense still acts on the architecture
    poor = replace(TUNED, budget=replace(TUNED.budget, labelled=8), steps=TUNED.steps[::-1])
    w = walk(poor, toy_suite, [], ["toy-scale"])
    assert {v.applicable for v in w.victims.values()} == {True}
    assert {tuple(v.missing) for v in w.victims.values()} == {("merge-finetune / ta", "none / ta")}


def test_stamp_merges_and_missing_name_what_the_export_prints() -> None:
    from bench.protocol import VictimWalk, Walk

    assert PROTOCOL.stamp() == {"name": "p", "version": "0"}
    # each merge once, in the order of the steps
    assert PROTOCOL.merges() == ["ta", "ties"]
    w = Walk(protocol=PROTOCOL, suite="s", cell_ids=set(), victims={
        ("d", "v2"): VictimWalk("d", "v2", missing=["none / ta", "realign / ta"]),
        ("d", "v1"): VictimWalk("d", "v1", missing=["realign / ta"]),
        ("e", "v1"): VictimWalk("e", "v1", missing=["none / ties"])})
    assert w.missing("d") == ["v1: realign / ta", "v2: none / ta", "v2: realign / ta"]
    assert w.missing("e") == ["v1: none / ties"] and w.missing("f") == []


def test_version_5_reads_partner_side_effects_under_task_arithmetic_only() -> None:
    plain = [(s.merge, s.evaluate) for s in STANDARD.steps if s.group == "plain merge"]
    assert STANDARD.version == "5"
    assert plain == [("wa", "victim"), ("ta", "all"), ("ties", "victim"), ("dare-ties", "victim")]
    assert all(s.evaluate == "victim" for s in STANDARD.steps if s.group != "plain merge")
    assert STANDARD.params["adamerging-layer"] == {"steps": "25", "lr": "0.02"}

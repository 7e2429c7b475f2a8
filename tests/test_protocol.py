"""The standard protocol (`bench.protocol`): ordered steps, breaks, resumption, coverage, and its export."""

from __future__ import annotations

import json

import pytest

from bench.executors.local import run_local
from bench.plugins import AttackNeeds
from bench.protocol import (
    STANDARD,
    Protocol,
    ProtocolError,
    Step,
    coverage,
    get_protocol,
    run_protocol,
    scope,
    stage_profile,
    step_cells,
    walk,
)
from bench.store import Store

BUDGET = AttackNeeds(anchor=True, labelled=256, unlabelled=1024, finetune_steps=1000, knows_defense=True)


def mini(threshold: float = 0.9) -> Protocol:
    """Three cheap steps on the toy suite; toy-scale (an amplified task vector) is recovered by TIES."""
    return Protocol(name="mini", version="0", break_threshold=threshold, seeds=(0,), partners="rest", params={},
                    budget=BUDGET, steps=(Step("none", "ties", "plain merge", "all"),
                                          Step("revert-to-base", "ta", "algebraic"),
                                          Step("none", "ta", "plain merge", "all")))


def register_conv_only(monkeypatch) -> None:
    """Register, for one test, a defense ``conv-only`` that acts on convolutions only (nothing to do on the toy
    BERT): the planner marks its cells N/A for the architecture."""
    from dataclasses import dataclass

    from bench.artifact import Artifact
    from bench.plugins import Defense
    from bench.registry import defenses

    monkeypatch.setattr(defenses, "_entries", dict(defenses._entries))

    @dataclass(frozen=True)
    class NoParams:
        """No parameters."""

    @defenses.register("conv-only")
    class ConvOnly(Defense):
        """Acts on convolutions only: nothing to do on the toy BERT."""

        name = "conv-only"
        Params = NoParams
        applies_to = frozenset({"convolution"})

        def protect(self, expert, ctx):
            return Artifact(state=dict(expert.body))


def _run(protocol, suite, store, defenses):
    logs: list[str] = []

    def run_cells(cells):
        return run_local(suite, store, cells, run_id="p", log=lambda m: None)

    result, reports = run_protocol(protocol, suite, store, defenses, run_cells, log=logs.append)
    return result, reports, logs


def test_standard_protocol_covers_every_standard_attack_and_learned_merge() -> None:
    covered = dict(coverage(STANDARD))
    assert [name for name, step in covered.items() if not step] == []
    # version 2 leaves two out on purpose, each with its reason; nothing else is left out
    assert {n for n, step in covered.items() if step.startswith("omitted: ")} == {"unmask", "adamerging-task"}
    assert covered["unmask"] == f"omitted: {STANDARD.omitted['unmask']}"
    groups = [s.group for s in STANDARD.steps]
    # cheapest first: every group's steps are contiguous and in the documented order
    order = ["plain merge", "algebraic", "tuned merge", "fine-tuning", "adamerging"]
    assert sorted(groups, key=order.index) == groups
    assert get_protocol("standard") is STANDARD
    with pytest.raises(ProtocolError, match="unknown protocol"):
        get_protocol("nope")


def test_a_broken_defense_skips_the_later_steps_and_the_walk_replays_the_run(toy_suite, tmp_path) -> None:
    protocol = mini()
    with Store(tmp_path / "r.sqlite") as store:
        result, reports, logs = _run(protocol, toy_suite, store, ["toy-scale"])
        records = store.cells()
    assert len(reports) == 3 and len(logs) == 3 and "step 1/3" in logs[0]
    broken = {v: w.broken_at for (d, v), w in result.victims.items()}
    assert set(broken) == set(toy_suite.tasks)
    assert 0 in broken.values()  # the amplified task vector gives the victim back under TIES
    protected = [r for r in records if r.kind == "merge" and r.filling == "protected"]
    for victim, at in broken.items():
        steps_run = {(r.attack, r.merge) for r in protected if r.victim == victim}
        needed = protocol.steps if at is None else protocol.steps[:at + 1]
        assert steps_run == {(s.attack, s.merge) for s in needed}, (victim, at)
    # plain-merge references run for every victim (the signal table); others only while a defense is unbroken
    refs = {(r.victim, r.attack, r.merge) for r in records if r.kind == "merge" and r.filling == "unprotected"}
    assert refs == {(v, s.attack, s.merge) for v in toy_suite.tasks for i, s in enumerate(protocol.steps)
                    if s.group == "plain merge" or broken[v] is None or broken[v] >= i}
    replay = walk(protocol, toy_suite, records, ["toy-scale"])
    assert {k: w.broken_at for k, w in replay.victims.items()} == {k: w.broken_at for k, w in result.victims.items()}
    assert all(not w.missing for w in replay.victims.values())


def test_threshold_above_one_breaks_nothing_so_every_step_runs(toy_suite, tmp_path) -> None:
    protocol = mini(threshold=1.01)  # recovered is clipped to [0, 1]: nothing can reach it
    with Store(tmp_path / "r.sqlite") as store:
        result, _reports, _ = _run(protocol, toy_suite, store, ["toy-scale"])
        protected = {(r.victim, r.attack, r.merge) for r in store.cells(kind="merge") if r.filling == "protected"}
    assert all(w.broken_at is None for w in result.victims.values())
    assert protected == {(v, s.attack, s.merge) for v in toy_suite.tasks for s in protocol.steps}


def test_a_victim_slice_runs_the_same_cells_for_that_victim_only(toy_suite, tmp_path) -> None:
    protocol = mini(threshold=1.01)
    victim = toy_suite.tasks[0]

    def run_cells(cells):
        return run_local(toy_suite, store, cells, run_id="p", log=lambda m: None)

    with Store(tmp_path / "slice.sqlite") as store:
        run_protocol(protocol, toy_suite, store, ["toy-scale"], run_cells, victims=[victim], log=lambda m: None)
        sliced = {r.cell_id for r in store.cells()}
        assert {r.victim for r in store.cells()} == {victim}
        replay = walk(protocol, toy_suite, store.cells(), ["toy-scale"])
        with pytest.raises(KeyError, match="no task"):
            run_protocol(protocol, toy_suite, store, ["toy-scale"], run_cells, victims=["nope"], log=lambda m: None)
    assert not replay.victims[("toy-scale", victim)].missing
    assert all(replay.victims[("toy-scale", v)].missing for v in toy_suite.tasks[1:])
    with Store(tmp_path / "full.sqlite") as store:
        _run(protocol, toy_suite, store, ["toy-scale"])
        full = {r.cell_id for r in store.cells() if r.victim == victim}
    assert sliced == full  # the slice's cells are the full run's cells of that victim


def test_a_rerun_resumes_without_recomputing(toy_suite, tmp_path) -> None:
    protocol = mini()
    with Store(tmp_path / "r.sqlite") as store:
        first, _, _ = _run(protocol, toy_suite, store, ["toy-scale"])
        n = len(store.cells())
        second, reports, _ = _run(protocol, toy_suite, store, ["toy-scale"])
        assert len(store.cells()) == n
    assert sum(r.ran for r in reports) == 0
    assert {k: w.broken_at for k, w in first.victims.items()} == {k: w.broken_at for k, w in second.victims.items()}


def test_export_under_the_protocol_names_the_breaking_step_and_flags_a_missing_one(toy_suite, tmp_path) -> None:
    from leaderboard import export as lb_export

    protocol = mini(threshold=1.01)
    path = tmp_path / "r.sqlite"
    with Store(path) as store:
        _run(protocol, toy_suite, store, ["toy-scale"])
    out = tmp_path / "data"
    lb_export.export(path, out, protocol=protocol)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["protocol"]["name"] == "mini" and manifest["config"]["protocol"]["version"] == "0"
    assert [s["merge"] for s in manifest["config"]["protocol"]["steps"]] == ["ties", "ta", "ta"]
    entry = next(e for e in manifest["entries"] if e["defense"] == "toy-scale")
    assert entry["summary"]["complete"] and entry["summary"]["broken_by"] == {v: None for v in toy_suite.tasks}
    signal = manifest["signal"]["toy"]
    assert {(r["victim"], r["merge"]) for r in signal} == {(v, m) for v in toy_suite.tasks for m in ("ta", "ties")}
    # delete one needed protected cell: the entry is incomplete and says which step is missing
    with Store(path) as store:
        victim = toy_suite.tasks[0]
        gone = next(r for r in store.cells(kind="merge") if r.filling == "protected" and r.merge == "ties"
                    and r.victim == victim)
        with store._tx() as db:
            db.execute("DELETE FROM metrics WHERE cell_id = ?", (gone.cell_id,))
            db.execute("DELETE FROM cells WHERE cell_id = ?", (gone.cell_id,))
    lb_export.export(path, out, protocol=protocol)
    manifest = json.loads((out / "manifest.json").read_text())
    entry = next(e for e in manifest["entries"] if e["defense"] == "toy-scale")
    assert not entry["summary"]["complete"] and entry["summary"]["rank"] is None
    assert any("none / ties" in m for m in entry["summary"]["attacks_missing"])


def test_replicate_seeds_rerun_each_pairs_worst_step_and_the_export_pools_them(toy_suite, tmp_path) -> None:
    from dataclasses import replace as dc_replace

    from bench.scoring import score
    from leaderboard import export as lb_export

    # TIES recovers the amplified task vector most: put it between two steps, so the worst is neither end
    protocol = dc_replace(mini(threshold=1.01), replicate_seeds=(1, 2),
                          steps=(Step("none", "ta", "plain merge", "all"), Step("none", "ties", "plain merge", "all"),
                                 Step("revert-to-base", "ta", "algebraic")))
    path = tmp_path / "r.sqlite"
    with Store(path) as store:
        result, reports, logs = _run(protocol, toy_suite, store, ["toy-scale"])
        records = store.cells()
        _, again, _ = _run(protocol, toy_suite, store, ["toy-scale"])
    assert "replicates (seeds 1, 2" in logs[-1] and reports[-1].ran > 0 and sum(r.ran for r in again) == 0
    # the worst pair as the scores of seed 0 alone choose it, and as the scores of everything report it
    first = {vs.victim: (vs.best_attack, vs.best_merge) for vs in
             score([r for r in records if r.seed == 0], attacks=[]).victim_scores("toy", "toy-scale")}
    pooled = {vs.victim: vs for vs in score(records, attacks=[]).victim_scores("toy", "toy-scale")}
    for v in toy_suite.tasks:
        attack, merge = first[v]
        assert (attack, merge) == ("none", "ties")
        assert result.victims[("toy-scale", v)].replicated == f"{attack} / {merge}"
        assert (pooled[v].best_attack, pooled[v].best_merge) == (attack, merge)
        mine = [r for r in records if r.victim == v and r.seed in (1, 2)]
        protected = {(r.attack, r.merge, r.seed) for r in mine if r.kind == "merge" and r.filling == "protected"}
        assert protected == {(attack, merge, s) for s in (1, 2)}  # that step only, under each replicate seed
        assert {(r.kind, r.seed) for r in mine if r.kind != "merge"} == {(k, s) for k in ("baseline", "utility")
                                                                         for s in (1, 2)}
        assert {(r.filling, r.seed) for r in mine if r.kind == "merge" and r.filling != "protected"} == {
            (f, s) for f in ("unprotected", "counterfactual") for s in (1, 2)}
    replay = walk(protocol, toy_suite, records, ["toy-scale"])
    assert {k: w.replicated for k, w in replay.victims.items()} == {k: w.replicated for k, w in result.victims.items()}
    assert all(not w.missing for w in replay.victims.values())
    # one replicate cell gone: the replay and the export say which replicates are missing
    victim = toy_suite.tasks[0]
    with Store(path) as store:
        gone = next(r for r in store.cells(kind="merge") if r.filling == "protected" and r.seed == 2 and r.victim == victim)
        with store._tx() as db:
            db.execute("DELETE FROM metrics WHERE cell_id = ?", (gone.cell_id,))
            db.execute("DELETE FROM cells WHERE cell_id = ?", (gone.cell_id,))
        replay = walk(protocol, toy_suite, store.cells(), ["toy-scale"])
    label = f"replicates of {gone.attack} / {gone.merge}"
    assert replay.victims[("toy-scale", victim)].missing == [label]
    assert all(not replay.victims[("toy-scale", v)].missing for v in toy_suite.tasks[1:])
    out = tmp_path / "data"
    lb_export.export(path, out, protocol=protocol)
    entry = next(e for e in json.loads((out / "manifest.json").read_text())["entries"] if e["defense"] == "toy-scale")
    assert not entry["summary"]["complete"] and any(label in m for m in entry["summary"]["attacks_missing"])
    from leaderboard.site import build_site

    index = build_site(out, tmp_path / "site").read_text()
    assert "runs again under seeds 1, 2" in index and "runs one seed" not in index


def test_scope_reads_only_the_protocol_cells(toy_suite, tmp_path) -> None:
    protocol = mini()
    with Store(tmp_path / "r.sqlite") as store:
        _run(protocol, toy_suite, store, ["toy-scale"])
        # an ad-hoc cell the protocol never planned (another merge) is not published under it
        from bench.plan import build_plan

        extra = build_plan(toy_suite, defense="toy-scale", merge="wa", victims=[toy_suite.tasks[0]])
        run_local(toy_suite, store, extra.cells, run_id="x", log=lambda m: None)
        sc = scope(store.cells(), protocol)
    assert "wa" not in {r.merge for r in sc.records}
    assert {r.merge for r in sc.records if r.kind == "merge"} <= {"ta", "ties"}
    rows = stage_profile(sc.records, protocol)
    assert {r["group"] for r in rows} >= {"baseline", "plain merge"} and all(r["wall"] >= 0 for r in rows)


def test_step_cells_keep_the_step_attack_and_its_counterparts_references(toy_suite) -> None:
    protocol = mini()
    cells = step_cells(protocol, toy_suite, Step("revert-to-base", "ta", "algebraic"), ["toy-scale"])
    merges = [c for c in cells if c.kind == "merge"]
    assert {c.attack_label for c in merges if c.filling == "protected"} == {"revert-to-base"}
    # a data-free undo attack is read against the plain merge: its U and ∅ cells run attack none ...
    assert {c.attack_label for c in merges if c.filling != "protected"} == {"none"}
    # ... and they are the plain-merge step's own cells (evaluated on every task), not copies
    plain = {c.cell_id for c in step_cells(protocol, toy_suite, protocol.steps[2], ["toy-scale"])}
    assert {c.cell_id for c in merges if c.filling != "protected"} <= plain
    assert {c.kind for c in cells} == {"baseline", "utility", "merge"}
    composite = step_cells(protocol, toy_suite, Step("revert-to-base+revert-ffn", "ta", "algebraic"), ["toy-scale"])
    assert {c.attack_label for c in composite if c.kind == "merge" and c.filling == "protected"} == \
        {"revert-to-base+revert-ffn"}


def test_cli_show_and_refusals(capsys) -> None:
    from bench.cli import main

    assert main(["show", "protocol", "standard"]) == 0
    text = capsys.readouterr().out
    assert f"version {STANDARD.version}" in text and "adamerging-layer" in text and "no step covers: none" in text
    assert "worst pair again under seeds 1" in text
    assert "omitted on purpose: unmask:" in text
    assert main(["run", "--protocol", "standard", "--merge", "ta"]) == 2
    assert "the protocol fixes" in capsys.readouterr().err
    assert main(["run", "--protocol", "nope"]) == 2


def test_published_cells_import_into_a_store_and_a_protocol_run_continues_from_them(toy_suite, tmp_path) -> None:
    from bench.cli import main
    from leaderboard import export as lb_export

    protocol = mini()
    with Store(tmp_path / "a.sqlite") as store:
        first, _, _ = _run(protocol, toy_suite, store, ["toy-scale"])
    lb_export.export(tmp_path / "a.sqlite", tmp_path / "data", protocol=protocol)
    assert main(["leaderboard", "import", "--from", str(tmp_path / "data"), "--store", str(tmp_path / "b.sqlite")]) == 0
    with Store(tmp_path / "b.sqlite") as store:
        again, reports, _ = _run(protocol, toy_suite, store, ["toy-scale"])
    assert sum(r.ran for r in reports) == 0  # every cell the protocol needs was published
    assert {k: w.broken_at for k, w in again.victims.items()} == {k: w.broken_at for k, w in first.victims.items()}
    # and the export of the imported store publishes the same numbers
    lb_export.export(tmp_path / "b.sqlite", tmp_path / "data2", protocol=protocol)
    a = json.loads((tmp_path / "data" / "manifest.json").read_text())
    b = json.loads((tmp_path / "data2" / "manifest.json").read_text())
    assert [e["summary"] for e in a["entries"]] == [e["summary"] for e in b["entries"]]


def test_a_new_defense_reuses_the_published_references_and_computes_only_its_own_cells(toy_suite, tmp_path) -> None:
    from bench.cli import main
    from leaderboard import export as lb_export

    protocol = mini()
    with Store(tmp_path / "a.sqlite") as store:
        _run(protocol, toy_suite, store, ["toy-scale"])
        published = store.cells()
    lb_export.export(tmp_path / "a.sqlite", tmp_path / "data", protocol=protocol)
    assert main(["leaderboard", "import", "--references-only", "--from", str(tmp_path / "data"),
                 "--store", str(tmp_path / "b.sqlite")]) == 0
    with Store(tmp_path / "b.sqlite") as store:
        imported = {r.cell_id for r in store.cells()}
        assert imported == {r.cell_id for r in published if r.kind == "baseline" or r.filling != "protected"}
        _, reports, _ = _run(protocol, toy_suite, store, ["toy-scale"])
        ran = [r for r in store.cells() if r.cell_id not in imported]
    # the run computed the defense's own cells only: every one is its utility or a protected merge
    assert ran and all(r.defense == "toy-scale" and (r.kind == "utility" or r.filling == "protected") for r in ran)
    assert sum(r.ran for r in reports) == len(ran)
    lb_export.export(tmp_path / "b.sqlite", tmp_path / "data2", protocol=protocol)
    a = json.loads((tmp_path / "data" / "manifest.json").read_text())
    b = json.loads((tmp_path / "data2" / "manifest.json").read_text())
    assert [e["summary"]["security"] for e in a["entries"]] == [e["summary"]["security"] for e in b["entries"]]


def test_a_defense_that_cannot_act_on_the_architecture_stops_after_the_first_step(toy_suite, tmp_path,
                                                                                  monkeypatch) -> None:
    from leaderboard import export as lb_export

    register_conv_only(monkeypatch)
    protocol = mini(threshold=1.01)
    path = tmp_path / "r.sqlite"
    with Store(path) as store:
        result, reports, logs = _run(protocol, toy_suite, store, ["conv-only"])
        protected = [r for r in store.cells(kind="merge") if r.filling == "protected"]
        refs = {(r.victim, r.attack, r.merge) for r in store.cells(kind="merge") if r.filling == "unprotected"}
    assert all(not w.applicable and not w.missing for w in result.victims.values())
    assert {(r.attack, r.merge) for r in protected} == {("none", "ties")} and all(r.status == "na" for r in protected)
    # each victim's walk keeps why: the first step's N/A reason, under that step's label
    reasons = {r.victim: r.reason for r in protected}
    assert all(reasons.values()) and {k: w.na for k, w in result.victims.items()} == {
        ("conv-only", v): {protocol.steps[0].label: reasons[v]} for v in toy_suite.tasks}
    # no defense is active, so only the plain steps' references (the signal table) run
    assert {(a, m) for _, a, m in refs} == {("none", "ties"), ("none", "ta")}
    assert "still unbroken somewhere: none" in logs[-1]
    lb_export.export(path, tmp_path / "data", protocol=protocol)
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert "conv-only" not in {e["defense"] for e in manifest["entries"]}
    assert any(n["defense"] == "conv-only" and "convolution" in n["reason"] for n in manifest["not_applicable"])


def test_the_dry_run_estimate_reads_the_medians_of_timed_cells_of_the_same_kind(toy_suite, tmp_path) -> None:
    from dataclasses import replace as dc_replace

    from bench.protocol import CellTimes, estimate

    protocol = mini()
    with Store(tmp_path / "a.sqlite") as store:
        _run(protocol, toy_suite, store, ["toy-scale"])
        records = store.cells()
    # give every stored cell a known wall time: 1 s for the first of each kind, 2 s for the second, ... so the
    # median of a kind with n cells is n // 2 + 1 seconds (the upper median), computed here by hand
    kinds: dict[tuple, int] = {}
    timed = []
    for r in records:
        key = (r.kind, r.defense, r.attack, r.merge, r.filling)
        kinds[key] = kinds.get(key, 0) + 1
        timed.append(dc_replace(r, provenance={**r.provenance, "wall_seconds": float(kinds[key])}))
    times = CellTimes(timed)
    rows = estimate(protocol, toy_suite, ["toy-scale"], [], times)
    planned = [c for s in protocol.steps for c in step_cells(protocol, toy_suite, s, ["toy-scale"])]
    unique = {c.cell_id: c for c in planned}
    assert sum(r.cells for r in rows) == len(unique)  # a cell two steps plan is counted once
    todo = [c for c in unique.values() if not c.na_reason]
    key = {c.cell_id: (c.kind, c.defense_label, c.attack_label, c.merge_label, c.filling) for c in todo}
    # the break stopped some cells; no other defense ran, so those have no timed cell of their kind at all
    never = [c for c in todo if not any(k[0] == c.kind and k[2:] == key[c.cell_id][2:] for k in kinds)]
    want = sum(kinds[key[c.cell_id]] // 2 + 1 for c in todo if key[c.cell_id] in kinds)
    assert never and len(never) + sum(key[c.cell_id] in kinds for c in todo) == len(todo)
    assert sum(r.seconds for r in rows) == pytest.approx(want)
    assert sum(r.unknown for r in rows) == len(never)
    # everything stored: nothing left to run
    done = estimate(protocol, toy_suite, ["toy-scale"], list(unique), times)
    assert sum(r.seconds for r in done) == 0 and sum(r.stored for r in done) == len(unique)
    # a kind never timed on this suite falls back to the same kind on another suite, else counts as unknown
    other = CellTimes([dc_replace(r, suite="elsewhere") for r in timed])
    assert sum(r.seconds for r in estimate(protocol, toy_suite, ["toy-scale"], [], other)) == pytest.approx(want)
    nothing = estimate(protocol, toy_suite, ["toy-scale"], [], CellTimes([]))
    assert sum(r.unknown for r in nothing) == len(todo)
    # replicate seeds add one row: per (defense, victim) the cells of its median-cost step under those seeds
    seeded = dc_replace(protocol, replicate_seeds=(1,))
    flat = CellTimes([dc_replace(r, provenance={**r.provenance, "wall_seconds": 1.0}) for r in records])
    *steps, reps = estimate(seeded, toy_suite, ["toy-scale"], [], flat)
    assert [r.step for r in steps] == list(protocol.steps) and reps.step.group == "replicates"
    one_seed = dc_replace(protocol, seeds=(1,))
    per_victim = {v: sorted(len([c for c in step_cells(one_seed, toy_suite, s, ["toy-scale"], [v])
                                 if c.defense is None or c.defense.label == "toy-scale"]) for s in protocol.steps)
                  for v in toy_suite.tasks}
    assert reps.cells == sum(counts[len(counts) // 2] for counts in per_victim.values())
    # every timed kind at 1 s, nothing stored; the kinds the break kept from running have no time at all
    assert reps.seconds + reps.unknown == reps.cells and reps.stored == 0 and reps.unknown > 0


def test_cli_protocol_dry_run_prints_the_estimate_and_writes_nothing(plugin_site, tmp_path, capsys) -> None:
    from bench.cli import main

    store = tmp_path / "none.sqlite"
    assert main(["run", "--protocol", "standard", "--suite", "toy", "--defense", "toy-scale", "--dry-run",
                 "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"toy: protocol standard v{STANDARD.version}, 1 defenses, 3 victims" in out and "upper bound if no pair breaks" in out
    assert "adamerging" in out and "| replicates" in out and "median-cost step" in out and not store.exists()


def test_protocol_defenses_reads_all_lists_and_variants() -> None:
    from bench.protocol import protocol_defenses
    from bench.registry import defenses

    every = list(defenses.names())
    assert protocol_defenses(None) == protocol_defenses("all") == protocol_defenses(["all"]) == every
    assert protocol_defenses("params,mergelock,params") == ["params", "mergelock"]  # once each, in order
    assert protocol_defenses(["mergelock", "params"]) == ["mergelock", "params"]
    # a variant at the default params is the plain name; another setting keeps its label
    high = defenses.get("params").Params().high
    assert protocol_defenses([f"params[high={high}]"]) == ["params"]
    assert protocol_defenses(["params[high=7]"]) == ["params[high=7]"]


def test_coverage_reports_a_gap_apart_from_an_omission() -> None:
    from dataclasses import replace as dc_replace

    # drop the step of one standard attack: with no reason given it is a gap (''), with one it is an omission
    steps = tuple(s for s in STANDARD.steps if s.attack != "graderase")
    gap = dict(coverage(dc_replace(STANDARD, steps=steps)))
    assert gap["graderase"] == "" and gap["unmask"].startswith("omitted: ")
    told = dict(coverage(dc_replace(STANDARD, steps=steps, omitted={**STANDARD.omitted, "graderase": "a reason"})))
    assert told["graderase"] == "omitted: a reason"
    assert dict(coverage(STANDARD))["graderase"] == "graderase / ta"

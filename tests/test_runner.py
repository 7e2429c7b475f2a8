from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import subprocess_env

from bench.artifact import Artifact
from bench.executors.local import run_local
from bench.plan import build_plan, parse_param_args
from bench.plugins import AttackNeeds, Defense
from bench.registry import defenses
from bench.store import Store


def test_plan_includes_baselines_and_reference_cells(toy_suite) -> None:
    plan = build_plan(toy_suite, defense="toy-scale", attack="none", merge="ta,wa")
    kinds = [(c.kind, c.defense_label, c.merge_label) for c in plan.cells]
    assert kinds.count(("baseline", "-", "-")) == 3
    assert ("merge", "none", "ta") in kinds and ("merge", "toy-scale", "wa") in kinds
    # one utility cell per victim for the defense; none for the unprotected expert (its baseline says it)
    assert kinds.count(("utility", "toy-scale", "-")) == 3 and not any(k[:2] == ("utility", "none") for k in kinds)
    assert len({c.cell_id for c in plan.cells}) == len(plan.cells)


def test_utility_cell_is_not_applicable_where_the_defense_is(toy_suite) -> None:
    class NeedsConv(Defense):
        name = "needs-conv-test"
        applies_to = frozenset({"conv_channels"})

        def protect(self, expert, ctx):
            raise AssertionError("never protected")

    defenses.register("needs-conv-test", obj=NeedsConv) if "needs-conv-test" not in defenses else None
    plan = build_plan(toy_suite, defense="needs-conv-test", merge="ta", victims=["t10"])
    cell = next(c for c in plan.cells if c.kind == "utility")
    assert cell.na_reason == "defense needs-conv-test needs conv_channels, which this architecture lacks"


def test_attack_over_budget_is_not_applicable(toy_suite) -> None:
    from bench.plan import applicability, make_merge
    from bench.plugins import Attack

    class Greedy(Attack):
        name = "greedy"

        def needs(self) -> AttackNeeds:
            return AttackNeeds(labelled=1000)

    reason, kind = applicability(defenses.get("none")(), Greedy(), make_merge("ta"), toy_suite.arch_map(),
                                 AttackNeeds(labelled=256))
    assert "needs 1000 labelled" in reason and kind == "budget"
    # a tuned merge's labelled samples count against the same budget
    reason, kind = applicability(defenses.get("none")(), Attack(), make_merge("ta-tuned", {"samples": "512"}),
                                 toy_suite.arch_map(), AttackNeeds(labelled=256))
    assert "needs 512 labelled" in reason and kind == "budget"


def test_param_args_parse_plugin_key_values() -> None:
    assert parse_param_args(["ta.lambda_=0.5", "params+dropout.p=0.1"]) == {"ta": {"lambda_": "0.5"}, "params+dropout": {"p": "0.1"}}
    with pytest.raises(ValueError, match="PLUGIN.KEY=VALUE"):
        parse_param_args(["lambda_=0.5"])


def test_run_then_warm_rerun_does_no_model_work(toy_suite, tmp_path) -> None:
    plan = build_plan(toy_suite, defense="toy-scale", merge="ta", victims=["t10"])
    with Store(tmp_path / "r.sqlite") as store:
        first = run_local(toy_suite, store, plan.cells, run_id="a", log=lambda m: None)
        assert first.ok == len(plan.cells) and first.failed == 0
        again = run_local(toy_suite, store, plan.cells, run_id="b", log=lambda m: None)
        assert again.skipped == len(plan.cells) and again.worked == 0 and not again.records
        recs = {(r.defense, r.kind): r for r in store.cells()}
    base = recs[("-", "baseline")]
    assert base.value("expert") > base.value("pretrained")  # the expert learned its task
    ref, prot = recs[("none", "merge")], recs[("toy-scale", "merge")]
    floor = recs[("counterfactual", "merge")]
    assert (ref.filling, floor.filling, prot.filling) == ("unprotected", "counterfactual", "protected")
    assert ref.value("utility") is None and ref.spec["defense"] is None  # the expert itself fills the slot
    assert {m.task for m in floor.metrics} == {"t10"}  # θ_pre in the victim's slot: evaluated on the victim
    assert floor.provenance["hashes"]["filling"] == base.provenance["hashes"]["pretrained"]
    assert ref.provenance["hashes"]["filling"] == base.provenance["hashes"]["expert"]
    assert all(m.examples.startswith("bits:128:") for r in (base, ref, floor, prot) for m in r.metrics)
    # the utility cell measures the artifact its merge cells merged: the same weights, the same number
    util = recs[("toy-scale", "utility")]
    assert util.provenance["hashes"]["artifact"] == prot.provenance["hashes"]["artifact"]
    assert util.value("utility") == prot.value("utility") and util.metrics[0].role == "utility"
    for r in (ref, floor, prot):
        assert r.provenance["hashes"]["merged"] and r.provenance["timings"]["merge"] >= 0
        assert r.spec["merge"]["params"]["lambda_"] == pytest.approx(0.3)


class Broken(Defense):
    name = "broken-test"

    def protect(self, expert, ctx):
        raise RuntimeError("boom")


class Liar(Defense):
    """Claims function preservation but perturbs the weights."""

    name = "liar-test"
    function_preserving = True

    def protect(self, expert, ctx):
        return Artifact({k: v + 0.5 if v.is_floating_point() else v for k, v in expert.body.items()})


def test_failing_plugin_fails_its_cell_not_the_run(toy_suite, tmp_path) -> None:
    defenses.register("broken-test", obj=Broken) if "broken-test" not in defenses else None
    plan = build_plan(toy_suite, defense="broken-test", merge="ta", victims=["t20"])
    with Store(tmp_path / "r.sqlite") as store:
        s = run_local(toy_suite, store, plan.cells, run_id="a", log=lambda m: None)
        failed = [r for r in store.cells() if r.status == "failed"]
    assert s.failed == 2 and s.ok == len(plan.cells) - 2  # its utility cell and its merge cell
    assert {r.kind for r in failed} == {"utility", "merge"}
    assert all(r.defense == "broken-test" and "boom" in r.reason for r in failed)


def test_false_function_preservation_claim_is_flagged(toy_suite, tmp_path) -> None:
    defenses.register("liar-test", obj=Liar) if "liar-test" not in defenses else None
    plan = build_plan(toy_suite, defense="liar-test", merge="ta", victims=["t10"])
    with Store(tmp_path / "r.sqlite") as store:
        run_local(toy_suite, store, plan.cells, run_id="a", log=lambda m: None)
        flags = {(r.kind, r.defense): r.provenance.get("flags", {}).get("function_preservation")
                 for r in store.cells() if r.kind != "baseline"}
    assert flags[("merge", "liar-test")]["ok"] is False and flags[("merge", "liar-test")]["max_abs_diff"] > 0
    assert flags[("utility", "liar-test")] == flags[("merge", "liar-test")]
    assert flags[("merge", "none")] is None  # the unprotected filling claims nothing


def test_killed_run_resumes_without_loss_or_duplicates(plugin_site, tmp_path) -> None:
    env = subprocess_env(plugin_site, tmp_path / "cache")
    store_path = tmp_path / "r.sqlite"
    args = [sys.executable, "-m", "bench.cli", "run", "--suite", "toy", "--defense", "toy-scale", "--merge", "ta,wa,ties",
            "--seeds", "0,1", "--store", str(store_path)]
    # Build the experts first so the kill lands among the cells.
    subprocess.run([sys.executable, "-m", "bench.cli", "suite", "build", "toy"], env=env, check=True, capture_output=True)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    count = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
        if store_path.exists():
            with Store(store_path) as s:
                count = len(s.cells())
            if count >= 5:
                break
    assert proc.poll() is None, "the run finished before it could be killed; make the matrix larger"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with Store(store_path) as s:
        before = {r.cell_id: r for r in s.cells()}
    assert 5 <= len(before)
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    with Store(store_path) as s:
        after = s.cells()
        n_rows = s._conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    ids = [r.cell_id for r in after]
    assert len(ids) == len(set(ids)) == n_rows
    assert set(before) <= set(ids)
    expected = len(build_plan(__import__("toyplugin").ToySuite(), defense="toy-scale", merge="ta,wa,ties", seeds=[0, 1]).cells)
    assert len(ids) == expected
    # same numbers: cells finished before the kill agree with a fresh computation of the same cells
    fresh_store = tmp_path / "fresh.sqlite"
    subprocess.run(args[:-1] + [str(fresh_store)], env=env, check=True, capture_output=True, timeout=600)
    with Store(fresh_store) as s:
        fresh = {r.cell_id: r.metrics for r in s.cells()}
    for cid, rec in before.items():
        assert [(m.role, m.task, round(m.value, 6)) for m in rec.metrics] == [(m.role, m.task, round(m.value, 6)) for m in fresh[cid]]


def test_cli_user_errors_are_one_line(plugin_site, tmp_path) -> None:
    env = subprocess_env(plugin_site, tmp_path / "cache")
    for argv, needle in ((["run", "--suite", "toy", "--defense", "parms"], "Did you mean 'params'"),
                         (["run", "--suite", "toy", "--param", "ta.nope=1", "--merge", "ta"], "unknown parameter"),
                         (["merge", "--method", "ta", "--base", str(tmp_path / "missing"), "--models", "x", "--out", str(tmp_path / "o")], "not found")):
        out = subprocess.run([sys.executable, "-m", "bench.cli", *argv], env=env, capture_output=True, text=True)
        assert out.returncode == 2, out.stderr
        assert needle in out.stderr and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def test_bench_merge_writes_hand_checkable_safetensors(tmp_path) -> None:
    from bench.checkpoint_io import merge_checkpoints
    from bench.weights import load_state, save_state

    base = {"w": torch.zeros(2, 2), "n": torch.tensor([3])}
    a = {"w": torch.ones(2, 2), "n": torch.tensor([3])}
    b = {"w": torch.full((2, 2), 3.0), "n": torch.tensor([3])}
    for name, sd in (("base", base), ("a", a), ("b", b)):
        save_state(sd, tmp_path / f"{name}.safetensors")
    out = merge_checkpoints("ta", str(tmp_path / "base.safetensors"), [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")],
                            str(tmp_path / "m.safetensors"), {"lambda_": "0.5"})
    merged = load_state(out)
    assert torch.equal(merged["w"], torch.full((2, 2), 2.0))  # 0 + 0.5 * (1 + 3)
    assert torch.equal(merged["n"], torch.tensor([3]))


def test_sharded_output_has_an_index(tmp_path) -> None:
    from bench.checkpoint_io import write_sharded
    from bench.weights import open_checkpoint

    tensors = [(f"t{i}", torch.full((256,), float(i))) for i in range(6)]
    out = write_sharded(iter(tensors), tmp_path / "model", shard_bytes=2048)
    assert (out / "model.safetensors.index.json").is_file()
    loaded = open_checkpoint(out)
    assert sorted(loaded) == sorted(n for n, _ in tensors)
    assert torch.equal(loaded["t4"], torch.full((256,), 4.0))


def test_the_unprotected_merge_is_computed_once_for_every_victim(toy_suite, tmp_path) -> None:
    plan = build_plan(toy_suite, defense="none", merge="ta")
    with Store(tmp_path / "r.sqlite") as store:
        run_local(toy_suite, store, plan.cells, run_id="a", log=lambda m: None)
        merge_keys = store._conn.execute("SELECT COUNT(*) FROM stages WHERE key LIKE 'merge:%'").fetchone()[0]
        cells = store.cells(kind="merge", filling="unprotected")
    # one unprotected merge for all three victims, and one counterfactual (θ_pre in the slot) per victim
    assert len(cells) == 3 and merge_keys == 1 + 3
    assert len({c.provenance["hashes"]["merged"] for c in cells}) == 1
    # the same merged model is evaluated on every task, whichever task is the victim
    by_victim = {c.victim: {m.task: m.value for m in c.metrics if m.role == "merged"} for c in cells}
    assert by_victim["t10"] == by_victim["t20"] == by_victim["t30"]


def test_process_pool_agrees_with_serial_run_and_logs_each_cell(toy_suite, tmp_path, monkeypatch) -> None:
    ada = {"adamerging-task": {"steps": "1", "samples": "8", "batch_size": "8", "batches_per_step": "1"}}
    plan = build_plan(toy_suite, defense="toy-scale", merge="adamerging-task,ta,wa", victims=["t10", "t20"], params=ada)
    with Store(tmp_path / "serial.sqlite") as store:
        run_local(toy_suite, store, plan.cells, run_id="a", log=lambda m: None)
        serial = {r.cell_id: [(m.role, m.task, round(m.value, 6)) for m in r.metrics] for r in store.cells()}
    monkeypatch.setenv("MERGEARENA_QUIET", "0")  # not a terminal: one log line per finished cell
    lines: list[str] = []
    with Store(tmp_path / "pool.sqlite") as store:
        summary = run_local(toy_suite, store, plan.cells, run_id="b", jobs=2, log=lines.append)
        pooled = {r.cell_id: [(m.role, m.task, round(m.value, 6)) for m in r.metrics] for r in store.cells()}
    assert summary.ok == len(plan.cells) and pooled == serial
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == len(plan.cells) and progress[-1].startswith(f"[{len(plan.cells)}/{len(plan.cells)}]")
    trains = ["/adamerging-task" in line for line in progress]
    assert any(trains) and trains == sorted(trains)  # every merge that trains ran after every cheap cell


def test_merges_that_train_run_after_every_cheap_cell(toy_suite) -> None:
    from bench.executors.local import group_cells, trains_to_merge

    plan = build_plan(toy_suite, defense="toy-scale", merge="adamerging-task,ta,wa")
    order = [c for g in group_cells(plan.cells) for c in g]
    assert sorted(c.cell_id for c in order) == sorted(c.cell_id for c in plan.cells)
    kinds = ["baseline" if c.kind == "baseline" else ("trains" if trains_to_merge(c) else "cheap") for c in order]
    assert "trains" in kinds and kinds == sorted(kinds, key=["baseline", "cheap", "trains"].index)


def test_summary_tables_follow_the_suite_task_order(toy_suite, tmp_path) -> None:
    from bench.report import summary_tables

    plan = build_plan(toy_suite, defense="none", merge="ta")
    with Store(tmp_path / "r.sqlite") as store:
        run_local(toy_suite, store, plan.cells, run_id="a", log=lambda m: None)
        text = summary_tables(store.cells(), tasks=["t30", "t10", "t20"])
    header = next(line for line in text.splitlines() if "t10" in line)
    assert header.index("t30") < header.index("t10") < header.index("t20") < header.index("mean")


def test_victim_only_evaluation_is_its_own_cell_and_skips_partners(toy_suite, tmp_path) -> None:
    full = build_plan(toy_suite, defense="toy-scale", merge="ta", victims=["t10"])
    lean = build_plan(toy_suite, defense="toy-scale", merge="ta", victims=["t10"], evaluate="victim")
    ids = lambda plan: {c.cell_id: c for c in plan.cells}  # noqa: E731
    shared = set(ids(full)) & set(ids(lean))
    # the counterfactual reference, baseline and utility cells are the same measurement; the protected
    # merge and its unprotected reference (evaluated on the victim only, like it) are not
    assert ({(c.kind, c.defense_label) for i, c in ids(lean).items() if i in shared}
            == {("baseline", "-"), ("utility", "toy-scale"), ("merge", "counterfactual")})
    with Store(tmp_path / "r.sqlite") as store:
        run_local(toy_suite, store, lean.cells, run_id="a", log=lambda m: None)
        merged_tasks = {r.defense: {m.task for m in r.metrics if m.role == "merged"} for r in store.cells(kind="merge")}
    assert merged_tasks == {"none": {"t10"}, "counterfactual": {"t10"}, "toy-scale": {"t10"}}
    with pytest.raises(ValueError, match="evaluate"):
        build_plan(toy_suite, evaluate="some")


def test_results_for_one_defense_keep_the_baselines_and_the_reference(toy_suite, tmp_path, capsys) -> None:
    from bench.cli import main

    plan = build_plan(toy_suite, defense="toy-scale", merge="ta", victims=["t10"])
    with Store(tmp_path / "r.sqlite") as store:
        run_local(toy_suite, store, plan.cells, run_id="a", log=lambda m: None)
    assert main(["results", "--defense", "toy-scale", "--store", str(tmp_path / "r.sqlite")]) == 0
    text = capsys.readouterr().out
    assert "'pretrained'" in text and "'expert'" in text and "'toy-scale', 'none', 'ta'" in text and "'none', 'none', 'ta'" in text


def test_structure_changed_release_gets_its_utility_measured_under_attack_none(toy_suite, tmp_path) -> None:
    # TaylorMLP releases an FFN θ_pre does not have: no plain merge can combine it, but the artifact
    # alone still has a utility, and the run must record it.
    plan = build_plan(toy_suite, defense="taylormlp", attack="none", merge="ta", victims=["t10"])
    with Store(tmp_path / "r.sqlite") as store:
        run_local(toy_suite, store, plan.cells, run_id="a", log=lambda m: None)
        recs = {(r.defense, r.kind): r for r in store.cells()}
    assert recs[("taylormlp", "merge")].status == "na"
    util, base = recs[("taylormlp", "utility")], recs[("-", "baseline")]
    assert util.status == "ok", util.reason
    assert util.provenance["defense_notes"] and util.provenance["timings"]["protect"] > 0
    # a Taylor expansion approximates the expert: it keeps the expert's learned accuracy, not θ_pre's. Measured:
    # utility 1.0 and expert 1.0 (no test example of 128 differs); the bound allows one flipped example (1/128)
    assert util.value("utility") == pytest.approx(base.value("expert"), abs=1.5 / 128)
    assert base.value("expert") - base.value("pretrained") > 0.2


def test_an_adamerging_reference_is_merged_once_for_every_victim(toy_suite, tmp_path, monkeypatch) -> None:
    """The unprotected AdaMerging merge is the same merge whichever task is the victim: with victim-only
    evaluation the first victim's cell evaluates it for the others, so it is merged once, not once per victim."""
    from bench.executors.local import group_cells
    from bench.merging import MergeMethod
    from bench.plan import shared_reference

    ada = {"adamerging-task": {"steps": "3", "samples": "16", "batch_size": "8", "batches_per_step": "2"}}
    plan = build_plan(toy_suite, defense="none", merge="adamerging-task", victims=["t10", "t20", "t30"], params=ada,
                      evaluate="victim")
    references = [c for c in plan.cells if shared_reference(c)]
    assert len(references) == 3 and sum(1 for g in group_cells(plan.cells) if any(map(shared_reference, g))) == 1
    calls: list[tuple[str, tuple[str, ...]]] = []
    original = MergeMethod.merge

    def counted(self, base, experts, params=None, *, ctx=None, seed=0):
        if self.name == "adamerging-task":
            calls.append((ctx.victim, tuple(ctx.tasks)))
        return original(self, base, experts, params, ctx=ctx, seed=seed)

    monkeypatch.setattr(MergeMethod, "merge", counted)
    with Store(tmp_path / "r.sqlite") as store:
        summary = run_local(toy_suite, store, plan.cells, run_id="a", log=lambda m: None)
        cells = store.cells(kind="merge", filling="unprotected")
    assert summary.failed == 0 and len(cells) == 3
    # three counterfactual merges (θ_pre in each victim's slot) and one unprotected merge
    assert len(calls) == 4, calls
    assert len({c.provenance["hashes"]["merged"] for c in cells}) == 1
    for c in cells:
        assert [m.task for m in c.metrics if m.role == "merged"] == [c.victim]


def test_groups_of_one_defense_run_one_after_another(toy_suite) -> None:
    from bench.executors.local import group_cells

    plan = build_plan(toy_suite, defense="toy-scale,none,toy-scale[factor=4]", merge="ta,wa")
    groups = group_cells(plan.cells)
    assert sorted(c.cell_id for g in groups for c in g) == sorted(c.cell_id for c in plan.cells)
    labels = [g[0].defense_label for g in groups if g[0].kind != "baseline"]
    runs = [label for i, label in enumerate(labels) if i == 0 or labels[i - 1] != label]
    assert len(runs) == len(set(runs))  # each defense's groups are contiguous
    for label in set(labels):  # and its victims keep the suite's task order
        victims = [g[0].victim for g in groups if g[0].kind != "baseline" and g[0].defense_label == label]
        assert victims == sorted(victims, key=toy_suite.tasks.index)
    assert {"toy-scale", "toy-scale[factor=4]", "none", "counterfactual"} <= set(labels)

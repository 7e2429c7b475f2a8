"""Plugins cannot poison a run: a plugin that changes shared weights in place fails its own cell and every
other cell stays exact; non-finite weights fail the cell that produced them, naming the tensor."""

from __future__ import annotations

import torch

from bench.artifact import Artifact
from bench.executors.local import run_local
from bench.plan import build_plan
from bench.plugins import Attack, Defense
from bench.registry import attacks, defenses
from bench.store import Store


class Vandal(Defense):
    """Scales the expert it was given in place, then releases it."""

    name = "vandal-test"

    def protect(self, expert, ctx):
        for v in expert.body.values():
            if v.is_floating_point():
                v.mul_(0.0)
        return Artifact(state=dict(expert.body))


class PreVandal(Attack):
    """Overwrites θ_pre (the anchor every cell shares) in place while preparing."""

    name = "prevandal-test"

    def prepare(self, artifact, ctx):
        for v in ctx.base.values():
            if v.is_floating_point():
                v.add_(1.0)
        return artifact


class NaNDefense(Defense):
    name = "nan-test"

    def protect(self, expert, ctx):
        state = {k: v.clone() for k, v in expert.body.items()}
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key][0] = float("nan")
        return Artifact(state=state)


def _register(registry, cls) -> None:
    if cls.name not in registry:
        registry.register(cls.name, obj=cls)


def _values(store: Store) -> dict[str, list]:
    return {r.cell_id: [(m.role, m.task, m.value) for m in r.metrics] for r in store.cells() if r.status == "ok"}


def test_a_defense_that_mutates_the_expert_fails_and_leaves_other_cells_exact(toy_suite, tmp_path) -> None:
    _register(defenses, Vandal)
    clean = build_plan(toy_suite, defense="toy-scale", merge="ta", victims=["t10"])
    with Store(tmp_path / "clean.sqlite") as store:
        run_local(toy_suite, store, clean.cells, run_id="a", log=lambda m: None)
        reference = _values(store)
    toy_suite.forget_loaded()
    # the vandal runs first (its group comes before toy-scale's): without the guard every later cell of
    # the run would read a zeroed expert and be stored 'ok'
    plan = build_plan(toy_suite, defense="vandal-test,toy-scale", merge="ta", victims=["t10"])
    with Store(tmp_path / "mixed.sqlite") as store:
        run_local(toy_suite, store, plan.cells, run_id="b", log=lambda m: None)
        failed = [r for r in store.cells() if r.status == "failed"]
        mixed = _values(store)
    assert failed and all(r.defense == "vandal-test" for r in failed)
    assert all("vandal-test modified the expert in place" in r.reason for r in failed)
    assert {cid: v for cid, v in mixed.items() if cid in reference} == reference


def test_an_attack_that_mutates_theta_pre_fails_its_cell(toy_suite, tmp_path) -> None:
    _register(attacks, PreVandal)
    plan = build_plan(toy_suite, defense="toy-scale", attack="prevandal-test", merge="ta", victims=["t10"])
    before = {k: v.clone() for k, v in toy_suite.pretrained().items()}
    with Store(tmp_path / "r.sqlite") as store:
        run_local(toy_suite, store, plan.cells, run_id="a", log=lambda m: None)
        failed = [r for r in store.cells() if r.status == "failed"]
        ok_plain = [r for r in store.cells(attack="none", kind="merge") if r.status == "ok"]
    assert {r.attack for r in failed} == {"prevandal-test"} and all("θ_pre" in r.reason for r in failed)
    assert ok_plain  # the plain merges ran on an intact θ_pre
    assert all(torch.equal(before[k], v) for k, v in toy_suite.pretrained().items())  # reloaded from disk


def test_a_defense_releasing_nan_fails_its_cells_naming_the_tensor(toy_suite, tmp_path) -> None:
    _register(defenses, NaNDefense)
    plan = build_plan(toy_suite, defense="nan-test", merge="ta", victims=["t20"])
    with Store(tmp_path / "r.sqlite") as store:
        run_local(toy_suite, store, plan.cells, run_id="a", log=lambda m: None)
        failed = [r for r in store.cells() if r.status == "failed"]
    assert {r.kind for r in failed} == {"utility", "merge"}
    assert all("non-finite" in r.reason and "tensor" in r.reason for r in failed)


def test_a_budget_na_cell_is_retried_under_a_larger_budget(toy_suite, tmp_path) -> None:
    from bench.plugins import AttackNeeds

    small = AttackNeeds(labelled=16, unlabelled=1024, finetune_steps=1000, knows_defense=True)
    plan = build_plan(toy_suite, defense="toy-scale", attack="merge-finetune", merge="ta", victims=["t10"],
                      params={"merge-finetune": {"samples": "32", "steps": "2"}}, budget=small)
    with Store(tmp_path / "r.sqlite") as store:
        run_local(toy_suite, store, plan.cells, run_id="a", log=lambda m: None)
        na = [r for r in store.cells(attack="merge-finetune") if r.status == "na"]
        assert na and all(r.provenance["na_kind"] == "budget" for r in na)
        plan = build_plan(toy_suite, defense="toy-scale", attack="merge-finetune", merge="ta", victims=["t10"],
                          params={"merge-finetune": {"samples": "32", "steps": "2"}})
        summary = run_local(toy_suite, store, plan.cells, run_id="b", log=lambda m: None)
        assert summary.ok >= len(na)
        assert all(r.status == "ok" for r in store.cells(attack="merge-finetune"))


def test_a_non_finite_metric_fails_the_cell_not_the_run(toy_suite, tmp_path, monkeypatch) -> None:
    from bench.outcomes import Evaluation

    real = type(toy_suite).evaluate_examples

    def broken(self, body, head, task, *, merged=False):
        return Evaluation({"accuracy": float("nan")}) if merged else real(self, body, head, task, merged=merged)

    monkeypatch.setattr(type(toy_suite), "evaluate_examples", broken)
    plan = build_plan(toy_suite, defense="toy-scale", merge="wa", victims=["t30"])
    with Store(tmp_path / "r.sqlite") as store:
        summary = run_local(toy_suite, store, plan.cells, run_id="a", log=lambda m: None)
        failed = [r for r in store.cells() if r.status == "failed"]
    assert summary.failed == len(failed) == 3  # the three merge cells; baseline and utility are fine
    assert all("non-finite accuracy" in r.reason for r in failed)


def test_two_runs_on_one_store_share_the_work(plugin_site, tmp_path) -> None:
    import re
    import subprocess
    import sys

    from conftest import subprocess_env

    env = subprocess_env(plugin_site, tmp_path / "cache")
    env["MERGEARENA_QUIET"] = "0"
    store_path = tmp_path / "shared.sqlite"
    args = [sys.executable, "-m", "bench.cli", "run", "--suite", "toy", "--defense", "toy-scale", "--merge", "ta,wa,ties",
            "--seeds", "0,1", "--store", str(store_path)]
    subprocess.run([sys.executable, "-m", "bench.cli", "suite", "build", "toy"], env=env, check=True, capture_output=True)
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    with Store(store_path) as store:
        stored = store.cells()
        leftover = store._conn.execute("SELECT COUNT(*) FROM claims").fetchone()[0]
    total = len(stored)
    ran = [int(re.search(r"ran (\d+) cells", o).group(1)) for o in outs]
    assert sum(ran) == total and min(ran) > 0, outs  # every cell computed once, by one of the two runs
    assert any("claimed by another run" in o for o in outs)
    assert leftover == 0  # both released their leases


def test_an_expired_claim_is_taken_over(tmp_path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        assert store.claim(["a", "b"], "run-1", ttl=-1.0) == ["a", "b"]  # a dead run's lease, already expired
        assert store.claim(["a", "b", "c"], "run-2", ttl=60.0) == ["a", "b", "c"]
        assert store.claim(["c"], "run-3", ttl=60.0) == []
        assert store.claimed_elsewhere(["a", "c"], "run-3") == {"a", "c"}
        store.release("run-2", ["a"])
        assert store.claim(["a"], "run-3", ttl=60.0) == ["a"]
        # a lease whose process is gone from this host is free at once, however long it had to run
        store._conn.execute("UPDATE claims SET pid = 2147483646 WHERE holder = 'run-2'")
        assert store.claim(["b"], "run-4", ttl=60.0) == ["b"]

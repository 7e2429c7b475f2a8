"""The tuning free-rider: ta-tuned / ties-tuned / dare-ties-tuned choose their coefficient on exactly the
attacker's labelled victim budget, never on the test split, and pick the best value of their grid."""

from __future__ import annotations

import pytest
import torch

from bench.merging import MergeContext
from bench.registry import merges


def _ctx(suite, victim: str = "t10", seed: int = 0) -> MergeContext:
    tasks = sorted(suite.tasks)
    return MergeContext(suite=suite, tasks=tasks, heads=[suite.expert(t).head for t in tasks], seed=seed, victim=victim)


class _Recorder:
    """Wraps a suite's `batches` to record every (split, input row) drawn."""

    def __init__(self, suite) -> None:
        self.suite, self.inner, self.seen = suite, suite.batches, []

    def __call__(self, task, split, **kw):
        for b in self.inner(task, split, **kw):
            self.seen += [(task, split, tuple(row.tolist())) for row in b.inputs["input_ids"]]
            yield b


def test_ta_tuned_picks_the_best_lambda_on_the_labelled_budget(toy_suite, monkeypatch) -> None:
    experts = [toy_suite.expert(t).body for t in sorted(toy_suite.tasks)]
    base = toy_suite.pretrained()
    method = merges.get("ta-tuned")
    ctx = _ctx(toy_suite)
    recorder = _Recorder(toy_suite)
    monkeypatch.setattr(toy_suite, "batches", recorder)
    merged = method.merge(base, experts, method.Params(samples=64), ctx=ctx)
    monkeypatch.setattr(toy_suite, "batches", recorder.inner)
    # exactly 64 distinct training samples of the victim were read, nothing of the test split
    assert {(t, s) for t, s, _ in recorder.seen} == {("t10", "train")}
    assert len(set(recorder.seen)) == 64
    # the chosen λ is the argmax of the recorded criterion over the grid, and the merge is TA at that λ
    from merges.tuned import TA_GRID

    grid = ctx.notes["grid"]
    assert [g[0] for g in grid] == list(TA_GRID)
    best = max(range(len(grid)), key=lambda i: (grid[i][1], -grid[i][2], -i))
    assert ctx.notes["lambda_"] == grid[best][0]
    ta = merges.get("ta")
    expected = ta.merge(base, experts, ta.Params(lambda_=ctx.notes["lambda_"]))
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_tuned_merge_draws_the_same_samples_as_the_finetuning_attacks(toy_suite) -> None:
    from attacks._train import TrainBudget, budget_batches
    from merges.tuned import labelled_victim_batches

    ctx = _ctx(toy_suite, seed=3)
    tuned = torch.cat([b.inputs["input_ids"] for b in labelled_victim_batches(ctx, 48)])
    finetune = torch.cat([b.inputs["input_ids"] for b in budget_batches(toy_suite, "t10", TrainBudget(48, 1, 16), seed=3)])
    assert torch.equal(tuned, finetune)


def test_tuned_merges_declare_their_labelled_need_and_refuse_without_a_victim(toy_suite) -> None:
    from merges.tuned import TuningError

    for name in ("ta-tuned", "ties-tuned", "dare-ties-tuned"):
        method = merges.get(name)
        assert method.labelled(method.Params(samples=100)) == 100 and method.needs_data
        assert not method.tensorwise
    method = merges.get("ta-tuned")
    ctx = _ctx(toy_suite, victim="")
    with pytest.raises(TuningError, match="victim"):
        method.merge(toy_suite.pretrained(), [toy_suite.expert("t10").body], method.Params(), ctx=ctx)
    assert merges.get("ta").labelled(merges.get("ta").Params()) == 0


def test_ties_and_dare_tuned_record_what_they_chose(toy_suite) -> None:
    experts = [toy_suite.expert(t).body for t in sorted(toy_suite.tasks)]
    for name, param in (("ties-tuned", "lambda_"), ("dare-ties-tuned", "p")):
        ctx = _ctx(toy_suite, victim="t20")
        method = merges.get(name)
        method.merge(toy_suite.pretrained(), experts, method.Params(samples=32), ctx=ctx)
        assert ctx.notes["tuned"] == param and ctx.notes[param] in [g[0] for g in ctx.notes["grid"]]
        assert ctx.notes["samples"] == 32


def test_a_tuned_merge_is_cached_per_victim_and_recorded_in_provenance(toy_suite, tmp_path) -> None:
    from bench.executors.local import run_local
    from bench.plan import build_plan
    from bench.store import Store

    plan = build_plan(toy_suite, defense="none", merge="ta-tuned", victims=["t10", "t20"],
                      params={"ta-tuned": {"samples": "32"}})
    with Store(tmp_path / "r.sqlite") as store:
        summary = run_local(toy_suite, store, plan.cells, run_id="a", log=lambda m: None)
        assert summary.failed == 0
        keys = store._conn.execute("SELECT COUNT(*) FROM stages WHERE key LIKE 'merge:%'").fetchone()[0]
        cells = store.cells(kind="merge")
    # the same four experts tuned for two different victims are two merges (the objective is in the key),
    # plus one counterfactual per victim
    assert keys == 4 and len(cells) == 4
    for c in cells:
        assert c.provenance["merge_notes"]["tuned"] == "lambda_" and c.provenance["merge_notes"]["samples"] == 32

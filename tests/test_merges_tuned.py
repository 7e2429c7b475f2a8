"""The tuning free-rider: ta-tuned / ties-tuned / dare-ties-tuned choose their coefficient on exactly the
attacker's labelled victim budget, never on the test split, and pick the best value of their grid."""

from __future__ import annotations

import dataclasses

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


def _linear_case() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """θ_pre with a half-precision matrix, a 0-d tensor, an integer buffer; three experts near it."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(37, 11, generator=g), "h": torch.randn(9, 5, generator=g).half(), "s": torch.tensor(0.5),
            "steps": torch.tensor([7], dtype=torch.long)}
    experts = []
    for _ in range(3):
        e = {k: (v + 0.1 * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v.clone()
             for k, v in base.items()}
        experts.append(e)
    return base, experts


@pytest.mark.parametrize("name", ["ta", "ties"])
@pytest.mark.parametrize("block_elements", [64, 1 << 21])
def test_linear_direction_gives_the_plain_merge_bit_for_bit_at_every_lambda(name, block_elements) -> None:
    from bench.outofcore import merged_tensor
    from merges.tuned import TA_GRID, TIES_GRID, LinearDirection

    base, experts = _linear_case()
    method = merges.get(name)
    direction = LinearDirection(method, base, experts, method.Params(), seed=5, block_elements=block_elements)
    assert set(direction.directions) == {"w", "h", "s"}  # the integer buffer is θ_pre's
    for lam in (TA_GRID if name == "ta" else TIES_GRID) + (0.0, -0.7):
        params = {**dataclasses.asdict(method.Params()), "lambda_": lam}
        fast = direction.at(lam)
        for k in base:
            plain = merged_tensor(method, base, experts, params, k, seed=5, block_elements=block_elements)
            assert fast[k].dtype == base[k].dtype and torch.equal(fast[k], plain), (name, lam, k)


def test_linear_direction_follows_a_ties_merge_that_is_merged_again() -> None:
    """Row blocks guess the zero-sign majority +1; here it is −1, so the plain merge merges the tensor twice."""
    from bench.outofcore import merged_tensor
    from merges.ties import TiesJob
    from merges.tuned import LinearDirection

    base = {"w": torch.zeros(4)}
    experts = [{"w": torch.tensor([-1.0, -1.0, -1.0, 2.0])}, {"w": torch.tensor([-1.0, -1.0, -1.0, -2.0])}]
    method = merges.get("ties")
    params = method.Params(k=1.0, aggregate="sum")
    rounds = []
    original = TiesJob.again
    try:
        TiesJob.again = lambda self: rounds.append(original(self)) or rounds[-1]
        direction = LinearDirection(method, base, experts, params, block_elements=1)
    finally:
        TiesJob.again = original
    assert rounds == [True, False]  # the guess was wrong once
    for lam in (0.4, 1.0):
        plain = merged_tensor(method, base, experts, {**dataclasses.asdict(params), "lambda_": lam}, "w", block_elements=1)
        assert torch.equal(direction.at(lam)["w"], plain)
        assert torch.equal(plain, torch.tensor([-2.0, -2.0, -2.0, -2.0]) * lam)  # the tie takes the majority, −1


def test_ties_tuned_merges_its_direction_once_and_returns_ties_at_the_chosen_lambda(toy_suite, monkeypatch) -> None:
    from merges import ties as ties_module

    experts = [toy_suite.expert(t).body for t in sorted(toy_suite.tasks)]
    base = toy_suite.pretrained()
    jobs = []
    original_init = ties_module.TiesJob.__init__

    def counting_init(self, spec, **kw):
        jobs.append(spec.name)
        original_init(self, spec, **kw)

    monkeypatch.setattr(ties_module.TiesJob, "__init__", counting_init)
    ctx = _ctx(toy_suite, victim="t20")
    method = merges.get("ties-tuned")
    merged = method.merge(base, experts, method.Params(samples=32), ctx=ctx)
    float_tensors = [k for k, v in base.items() if v.is_floating_point()]
    assert sorted(jobs) == sorted(float_tensors)  # one job per tensor, not one per λ of the grid
    monkeypatch.setattr(ties_module.TiesJob, "__init__", original_init)
    ties = merges.get("ties")
    expected = ties.merge(base, experts, ties.Params(lambda_=ctx.notes["lambda_"]))
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_linear_direction_refuses_a_merge_that_is_not_linear_in_lambda() -> None:
    from merges.tuned import LinearDirection

    base, experts = _linear_case()
    with pytest.raises(TypeError, match="not linear"):
        LinearDirection(merges.get("wa"), base, experts, merges.get("wa").Params())


def test_the_criterion_runs_the_model_once_per_batch_and_reads_the_loss_of_two_passes(toy_suite, monkeypatch) -> None:
    from merges.tuned import _criterion, labelled_victim_batches

    ctx = _ctx(toy_suite, victim="t20")
    batches = labelled_victim_batches(ctx, 150)
    head = ctx.heads[list(ctx.tasks).index("t20")]
    body = toy_suite.expert("t10").body
    calls = []
    build = toy_suite.task_model

    def counted(*args, **kw):
        model = build(*args, **kw)
        model.register_forward_hook(lambda *_: calls.append(1))
        return model

    monkeypatch.setattr(toy_suite, "task_model", counted)
    acc, loss = _criterion(ctx, body, head, batches)
    assert len(calls) == len(batches) > 1
    model = build(body, head, "t20")
    model.eval()
    with torch.no_grad():
        losses = [float(toy_suite.loss(model, b)) * len(b.labels) for b in batches]
        hits = [int((model(**b.inputs).argmax(-1) == b.labels).sum()) for b in batches]
    assert loss == sum(losses) / 150 and acc == sum(hits) / 150

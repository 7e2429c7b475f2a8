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
    # every λ's score, computed here: θ_pre + λ Σ τ_i built by hand and run on the same 64 samples
    from merges.tuned import TA_GRID

    samples = list(toy_suite.batches("t10", "train", batch_size=64, limit=64, shuffle=True, seed=0))
    head = toy_suite.expert("t10").head
    scores = [_naive_accuracy_and_loss(toy_suite, _naive_ta(base, experts, lam), head, samples) for lam in TA_GRID]
    grid = ctx.notes["grid"]
    assert [g[0] for g in grid] == list(TA_GRID)
    assert [g[1] for g in grid] == pytest.approx([acc for acc, _ in scores], abs=1e-6)
    assert [g[2] for g in grid] == pytest.approx([loss for _, loss in scores], abs=1e-5)
    assert len({acc for acc, _ in scores}) > 1  # the λ matter on this budget: scoring one model for all would show
    best = max(range(len(TA_GRID)), key=lambda i: (scores[i][0], -scores[i][1], -i))
    assert ctx.notes["lambda_"] == TA_GRID[best]
    expected = _naive_ta(base, experts, TA_GRID[best])
    assert all(torch.allclose(merged[k].float(), expected[k].float(), atol=1e-6) for k in expected)


def _naive_ta(base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]], lam: float) -> dict[str, torch.Tensor]:
    """θ_pre + λ Σ (θ_i − θ_pre), tensor by tensor, written without `merges` (integer buffers: θ_pre's)."""
    return {k: v + lam * sum(e[k] - v for e in experts) if v.is_floating_point() else v for k, v in base.items()}


def _naive_accuracy_and_loss(suite, body, head, batches) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``body`` with ``head`` over ``batches``, summed example by example."""
    model = suite.task_model(body, head, "t10").eval()
    hits, losses = [], []
    with torch.no_grad():
        for b in batches:
            logits = model(**b.inputs)
            hits += (logits.argmax(-1) == b.labels).tolist()
            losses += torch.nn.functional.cross_entropy(logits, b.labels, reduction="none").tolist()
    return sum(hits) / len(hits), sum(losses) / len(losses)


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
    with pytest.raises(TuningError, match=r"^a tuned merge needs the victim task it tunes for \(MergeContext\.victim\)$"):
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


def test_dare_ties_tuned_scores_each_drop_rate_with_its_own_seeded_merge(toy_suite) -> None:
    """Each p of the grid is scored on its own DARE-TIES merge, drawn with the cell's seed, and the best one is
    returned; the scores are recomputed here with a naive loop over the same labelled samples."""
    from merges.tuned import DARE_GRID

    experts = [toy_suite.expert(t).body for t in sorted(toy_suite.tasks)]
    base = toy_suite.pretrained()
    ctx = _ctx(toy_suite, victim="t10", seed=3)
    method = merges.get("dare-ties-tuned")
    merged = method.merge(base, experts, method.Params(samples=64), ctx=ctx)
    dare = merges.get("dare-ties")
    candidates = [dare.merge(base, experts, dare.Params(p=p), seed=3) for p in DARE_GRID]
    samples = list(toy_suite.batches("t10", "train", batch_size=64, limit=64, shuffle=True, seed=3))
    head = toy_suite.expert("t10").head
    scores = [_naive_accuracy_and_loss(toy_suite, c, head, samples) for c in candidates]
    grid = ctx.notes["grid"]
    assert [g[0] for g in grid] == list(DARE_GRID)
    assert [g[1] for g in grid] == pytest.approx([acc for acc, _ in scores], abs=1e-6)
    assert [g[2] for g in grid] == pytest.approx([loss for _, loss in scores], abs=1e-5)
    assert len(set(scores)) == len(DARE_GRID)  # every p is a different model here
    best = max(range(len(DARE_GRID)), key=lambda i: (scores[i][0], -scores[i][1], -i))
    assert ctx.notes["p"] == DARE_GRID[best]
    assert all(torch.equal(merged[k], candidates[best][k]) for k in base)
    seed0 = dare.merge(base, experts, dare.Params(p=DARE_GRID[best]), seed=0)
    assert any(not torch.equal(merged[k], seed0[k]) for k in base)  # the seed reaches the drops


def test_tune_without_a_context_names_the_tuned_method() -> None:
    from merges.tuned import DARE_GRID, TA_GRID, TuningError, tune, tune_lambda

    base, experts = {"w": torch.zeros(2)}, [{"w": torch.ones(2)}]
    with pytest.raises(TuningError, match="dare-ties-tuned tunes on labelled victim data and needs a suite context"):
        tune(merges.get("dare-ties"), base, experts, None, param="p", grid=DARE_GRID, samples=8)
    with pytest.raises(TuningError, match="ta-tuned tunes on labelled victim data and needs a suite context"):
        tune_lambda(merges.get("ta"), base, experts, None, grid=TA_GRID, samples=8)


def test_select_prefers_accuracy_then_the_lower_loss_then_the_smaller_coefficient(monkeypatch) -> None:
    import types

    import merges.tuned as tuned

    # (accuracy, loss) per coefficient: 0.2-0.4 share the best accuracy, 0.3 and 0.4 the lower loss too
    scores = {0.1: (0.1234567891, 0.3), 0.2: (0.75, 0.4), 0.3: (0.75, 0.2123456789), 0.4: (0.75, 0.2123456789), 0.5: (0.6, 0.1)}
    monkeypatch.setattr(tuned, "_criterion", lambda ctx, merged, head, batches: scores[merged["value"]])
    ctx = MergeContext(suite=None, tasks=["v"], heads=[{}], victim="v")
    batches = [types.SimpleNamespace(labels=torch.zeros(3)), types.SimpleNamespace(labels=torch.zeros(2))]
    chosen = tuned.select(ctx, batches, param="lambda_", grid=list(scores), candidate=lambda v: {"value": v})
    assert chosen == {"value": 0.3} and ctx.notes["lambda_"] == 0.3
    assert ctx.notes["grid"] == [[v, round(acc, 6), round(loss, 6)] for v, (acc, loss) in scores.items()]
    assert ctx.notes["samples"] == 5 and ctx.notes["tuned"] == "lambda_"
    assert ctx.notes["criterion"] == "accuracy on the labelled victim samples, then lower loss"


def test_the_labelled_budget_is_at_least_one_sample(toy_suite) -> None:
    from merges.tuned import TuningError, labelled_victim_batches

    ctx = MergeContext(suite=toy_suite, tasks=["t10"], heads=[{}], victim="t10")
    assert [len(b.labels) for b in labelled_victim_batches(ctx, 1)] == [1]
    with pytest.raises(TuningError, match="needs at least one labelled sample; got samples=0"):
        labelled_victim_batches(ctx, 0)


def test_the_labelled_budget_cannot_exceed_the_victims_training_split(toy_suite) -> None:
    from merges.tuned import TuningError, labelled_victim_batches

    ctx = MergeContext(suite=toy_suite, tasks=["t10"], heads=[{}], victim="t10")
    n = sum(len(b.labels) for b in toy_suite.batches("t10", "train", batch_size=7))  # counted independently
    assert sum(len(b.labels) for b in labelled_victim_batches(ctx, n)) == n
    with pytest.raises(TuningError, match=rf"^task 't10' has only {n} training samples; the tuned merge asks for {n + 1}$"):
        labelled_victim_batches(ctx, n + 1)


def test_linear_direction_keeps_every_buffer_wherever_it_comes_in_the_state_dict() -> None:
    from merges.tuned import LinearDirection

    base, experts = _linear_case()
    # the integer buffer first: a tensor without a direction must not end the walk over the others
    order = ["steps", "w", "h", "s"]
    base, experts = {k: base[k] for k in order}, [{k: e[k] for k in order} for e in experts]
    method = merges.get("ta")
    merged = LinearDirection(method, base, experts, method.Params()).at(0.4)
    expected = method.merge(base, experts, method.Params(lambda_=0.4))
    assert list(merged) == order and all(torch.equal(merged[k], expected[k]) for k in order)


def test_linear_direction_refuses_a_merge_without_block_jobs() -> None:
    from merges.tuned import LinearDirection

    base, experts = _linear_case()
    method = merges.get("ties-global")  # merges the whole model at once: no per-tensor job to take D from
    with pytest.raises(TypeError, match="has no finish\\(direction, base\\) step: its merge is not linear"):
        LinearDirection(method, base, experts, method.Params())


class _Pooled(torch.nn.Module):
    """Token ids -> masked mean of embeddings -> logits (no BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.unsqueeze(-1).float()
        return self.out((self.emb(input_ids) * m).sum(1) / m.sum(1).clamp(min=1.0))


class _Normed(torch.nn.Module):
    """Features -> BatchNorm -> logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bn, self.out = torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.bn(x))


def _fake_ctx(model: torch.nn.Module) -> MergeContext:
    class Suite:
        def task_model(self, body, head, task):
            return model

        def recalibrate(self, *a, **kw):
            raise AssertionError("a candidate is repaired on the attacker's samples, not the suite's repair set")

        def output_loss(self, logits, batch):
            return torch.nn.functional.cross_entropy(logits, batch.labels)

    return MergeContext(suite=Suite(), tasks=("v",), heads=[{}], seed=0, victim="v")


def test_the_criterion_repairs_batchnorm_on_the_attackers_own_samples() -> None:
    from bench.suite import Batch
    from merges.tuned import _criterion

    g = torch.Generator().manual_seed(1)
    batches = [Batch({"x": torch.randn(16, 4, generator=g) * 3 + 2}, torch.randint(0, 2, (16,), generator=g))
               for _ in range(4)]
    model = _Normed()
    acc, loss = _criterion(_fake_ctx(model), {}, {}, batches)
    xs = [b.inputs["x"] for b in batches]
    # cumulative averages over equal batches: the mean of all 64 samples, the mean of the per-batch unbiased variances
    assert torch.allclose(model.bn.running_mean, torch.cat(xs).mean(0), atol=1e-5)
    assert torch.allclose(model.bn.running_var, torch.stack([x.var(0, unbiased=True) for x in xs]).mean(0), atol=1e-4)
    ref = _Normed().eval()
    ref.bn.running_mean.copy_(torch.cat(xs).mean(0))
    ref.bn.running_var.copy_(torch.stack([x.var(0, unbiased=True) for x in xs]).mean(0))
    with torch.no_grad():
        logits = ref(torch.cat(xs))
    labels = torch.cat([b.labels for b in batches])
    assert acc == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)


def test_the_criterion_runs_token_inputs_in_length_sorted_batches_with_the_same_sums() -> None:
    from bench.bucketing import pad_right
    from bench.suite import Batch
    from merges.tuned import _criterion

    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1, 50, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (150,), generator=g)]
    labels = torch.randint(0, 3, (150,), generator=g)
    batches = []
    for s in range(0, 150, 16):
        ids, mask = pad_right(seqs[s:s + 16])
        batches.append(Batch({"input_ids": ids, "attention_mask": mask}, labels[s:s + 16]))
    model = _Pooled()
    widths = []
    model.register_forward_hook(lambda m, args, kwargs, out: widths.append(kwargs["input_ids"].shape[1]),
                                with_kwargs=True)
    acc, loss = _criterion(_fake_ctx(model), {}, {}, batches)
    lengths = sorted(len(s) for s in seqs)
    assert widths == [lengths[63], lengths[127], lengths[149]]  # batches of 64 (EVAL_BATCH_SIZE) in length order
    with torch.no_grad():
        logits = torch.cat([model(**b.inputs) for b in batches])
    assert acc == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)

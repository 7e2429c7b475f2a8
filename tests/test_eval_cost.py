"""Cheaper evaluation and AdaMerging (bench.bucketing, merges.adamerging v3): same outcomes, same objective,
and a convergence stop that stops only when the objective has converged."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from bench.bucketing import (
    bucket_sequences,
    correct_in_order,
    has_batch_dependent_layers,
    pad_right,
    rebatch_by_length,
    regroup_by_length,
    sequence_inputs,
)
from bench.families.bert import BertFamily
from bench.merging import MergeContext
from bench.registry import merges
from bench.suite import Batch, Expert, MissingAssetError, Suite
from bench.weights import StateDict
from merges.adamerging import (
    ADAMERGING_VERSION,
    ConvergenceStop,
    _task_forwards,
    learn_coefficients,
    pass_lengths,
    prediction_entropy,
)
from tasks.training import accuracy_evaluation

# ---------------------------------------------------------------- a tiny BERT on variable-length inputs


class MeanPoolClassifier(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1e-9))


class TokenTagger(MeanPoolClassifier):
    """Per-position logits ``[B, T, C]`` (a token-level task)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)


def sequences(n: int, seed: int, lo: int = 2, hi: int = 30) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g)
    return [torch.randint(5, 128, (int(L),), generator=g).tolist() for L in lengths]


@pytest.fixture(scope="module")
def family() -> BertFamily:
    return BertFamily.tiny(seed=0)


@pytest.fixture(scope="module")
def classifier(family) -> MeanPoolClassifier:
    torch.manual_seed(3)
    return MeanPoolClassifier(family.build(family.new_module().state_dict()), nn.Linear(32, 3)).eval()


def split_order_batches(seqs, labels, batch_size) -> list[Batch]:
    out = []
    for s in range(0, len(seqs), batch_size):
        ids, mask = pad_right(seqs[s:s + batch_size])
        out.append(Batch({"input_ids": ids, "attention_mask": mask}, torch.as_tensor(labels[s:s + batch_size])))
    return out


# ---------------------------------------------------------------- evaluation


def test_bucketed_batches_are_length_sorted_and_cover_the_split_once():
    seqs = sequences(50, seed=1)
    b = bucket_sequences(seqs, np.zeros(50, dtype=np.int64), batch_size=8)
    assert sorted(np.concatenate(b.positions).tolist()) == list(range(50))
    widths = [batch.inputs["input_ids"].shape[1] for batch in b.batches]
    assert widths == sorted(widths)
    assert b.padded_tokens() < sum(m.inputs["attention_mask"].numel()
                                   for m in split_order_batches(seqs, np.zeros(50, dtype=np.int64), 8))
    assert b.real_tokens() == sum(len(s) for s in seqs)
    for batch, idx in zip(b.batches, b.positions):  # each row is its sequence, right-padded
        for row, i in enumerate(idx):
            assert batch.inputs["input_ids"][row, :len(seqs[i])].tolist() == seqs[i]
            assert int(batch.inputs["attention_mask"][row].sum()) == len(seqs[i])


def test_bucketing_keeps_every_outcome_in_split_order(classifier):
    seqs = sequences(150, seed=2)
    with torch.no_grad():
        preds = torch.cat([classifier(**b.inputs).argmax(-1)
                           for b in split_order_batches(seqs, np.zeros(150, dtype=np.int64), 16)]).numpy()
    # labels right on even examples, wrong on odd ones: the outcome vector is 1, 0, 1, 0, ... in split order
    labels = np.where(np.arange(150) % 2 == 0, preds, (preds + 1) % 3)
    old = accuracy_evaluation(classifier, split_order_batches(seqs, labels, 16)).examples["accuracy"]
    new = correct_in_order(classifier, bucket_sequences(seqs, labels, batch_size=16))
    assert np.array_equal(old, (np.arange(150) % 2 == 0).astype(float))
    assert np.array_equal(new, old)  # bit for bit, in the same order


def test_bucketed_logits_equal_split_order_logits_up_to_rounding(classifier):
    seqs = sequences(64, seed=4)
    labels = np.zeros(64, dtype=np.int64)
    bucketed = bucket_sequences(seqs, labels, batch_size=8)
    with torch.no_grad():
        old = torch.cat([classifier(**b.inputs) for b in split_order_batches(seqs, labels, 8)])
        new = torch.empty_like(old)
        for batch, idx in zip(bucketed.batches, bucketed.positions):
            new[torch.as_tensor(idx)] = classifier(**batch.inputs)
    assert torch.allclose(old, new, atol=1e-5, rtol=1e-5)


def test_rebatching_keeps_every_labelled_sequence_once_in_length_sorted_batches():
    seqs = sequences(70, seed=5)
    labels = np.arange(70) % 3
    batches = rebatch_by_length(split_order_batches(seqs, labels, 16), 16)
    assert [len(b.labels) for b in batches] == [16, 16, 16, 16, 6]
    rows = []
    for b in batches:
        mask = b.inputs["attention_mask"]
        assert mask.shape[1] == int(mask.sum(1).max())  # padded to its longest row only
        for r in range(len(b.labels)):
            n = int(mask[r].sum())
            assert mask[r, :n].all() and not mask[r, n:].any() and not b.inputs["input_ids"][r, n:].any()
            rows.append((tuple(b.inputs["input_ids"][r, :n].tolist()), int(b.labels[r])))
    assert sorted(rows) == sorted((tuple(s), int(y)) for s, y in zip(seqs, labels))
    lengths = [len(r[0]) for r in rows]
    assert lengths == sorted(lengths)
    assert sum(int(b.inputs["attention_mask"].numel()) for b in batches) < \
        sum(int(b.inputs["attention_mask"].numel()) for b in split_order_batches(seqs, labels, 16))


def test_rebatched_hits_and_loss_sum_equal_the_split_order_ones(classifier):
    seqs = sequences(90, seed=6)
    labels = np.arange(90) % 3
    sums = []
    with torch.no_grad():
        for batches in (split_order_batches(seqs, labels, 32), rebatch_by_length(split_order_batches(seqs, labels, 32), 32)):
            hits = sum(int((classifier(**b.inputs).argmax(-1) == b.labels).sum()) for b in batches)
            loss = sum(float(nn.functional.cross_entropy(classifier(**b.inputs), b.labels, reduction="sum"))
                       for b in batches)
            sums.append((hits, loss))
    assert sums[0][0] == sums[1][0] and sums[0][1] == pytest.approx(sums[1][1], rel=1e-5)


def test_rebatching_refuses_inputs_that_are_not_masked_tokens_and_a_bad_size():
    pixels = [Batch({"pixel_values": torch.zeros(2, 3, 4, 4)}, torch.zeros(2, dtype=torch.long))]
    with pytest.raises(ValueError, match="attention_mask"):
        rebatch_by_length(pixels, 8)
    with pytest.raises(ValueError, match="at least 1"):
        rebatch_by_length(split_order_batches(sequences(3, seed=7), np.zeros(3, dtype=np.int64), 2), 0)


def test_text_minilm_bucketed_evaluation_gives_the_split_order_outcomes(tmp_path):
    from tasks.text_minilm import TextMiniLM

    suite = TextMiniLM(cache_dir=tmp_path)
    try:
        body = suite.pretrained()
    except MissingAssetError as exc:
        pytest.skip(str(exc))
    torch.manual_seed(0)
    head = {"weight": torch.randn(2, 384) * 0.5, "bias": torch.zeros(2)}
    task = "rt-subjectivity"
    new = suite.evaluate_examples(body, head, task)
    old = accuracy_evaluation(suite.task_model(body, head, task), suite.batches(task, "test", batch_size=suite.EVAL_BATCH_SIZE))
    assert 0.0 < new.metrics["accuracy"] < 1.0
    assert np.array_equal(new.examples["accuracy"], old.examples["accuracy"])
    assert suite.eval_batches(task) is suite.eval_batches(task)  # tokenised once


# ---------------------------------------------------------------- regrouped AdaMerging steps


def entropy_batches(seqs, batch_size) -> list[dict[str, torch.Tensor]]:
    return [b.inputs for b in split_order_batches(seqs, np.zeros(len(seqs), dtype=np.int64), batch_size)]


@pytest.mark.parametrize("micro", [1, 5, 16])
@pytest.mark.parametrize("model_class", [MeanPoolClassifier, TokenTagger])
def test_regrouped_step_is_the_same_sum_of_batch_mean_entropies(family, micro, model_class):
    torch.manual_seed(5)
    model = model_class(family.build(family.new_module().state_dict()), nn.Linear(32, 4)).eval()
    batches = entropy_batches(sequences(37, seed=6), batch_size=16)  # batches of 16, 16 and 5
    with torch.no_grad():
        expected = sum(float(prediction_entropy(model(**b), b["attention_mask"])) for b in batches)
        micros = regroup_by_length(batches, micro)
        got = 0.0
        for m in micros:
            h = -(model(**m.inputs).softmax(-1) * model(**m.inputs).log_softmax(-1)).sum(-1)
            got += float((h * (m.weights if h.dim() == 1 else m.token_weights)).sum())
    assert got == pytest.approx(expected, rel=1e-5)
    assert sum(len(m.weights) for m in micros) == 37
    assert sum(int(m.inputs["attention_mask"].numel()) for m in micros) < sum(int(b["attention_mask"].numel()) for b in batches)


def test_regrouping_needs_masked_token_inputs_and_no_batchnorm():
    ids, mask = pad_right([[1, 2, 3], [4]])
    assert sequence_inputs({"input_ids": ids, "attention_mask": mask})
    assert not sequence_inputs({"pixel_values": torch.zeros(2, 3, 4, 4)})
    assert not sequence_inputs({"input_ids": ids, "attention_mask": mask, "pixel_values": torch.zeros(2, 5)})
    assert has_batch_dependent_layers(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    assert not has_batch_dependent_layers(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))


class TinyTextSuite(Suite):
    """Two 3-class tasks on a tiny BERT, unlabelled inputs of 2 to 30 tokens; only what AdaMerging calls."""

    name = "tiny-text"

    def __init__(self, cache_dir=None) -> None:
        super().__init__(cache_dir)
        self._family = BertFamily.tiny(seed=0)

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("a", "b")

    def family(self) -> BertFamily:
        return self._family

    def load_pretrained(self) -> StateDict:
        return dict(self._family.new_module().state_dict())

    def recipe(self) -> dict[str, object]:
        return {}

    def batches(self, task, split, *, batch_size=32, limit=None, shuffle=False, seed=0) -> Iterator[Batch]:
        seqs = sequences(48, seed=ord(task))
        order = torch.randperm(48, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(48)
        order = order[:limit].tolist()
        for i in range(0, len(order), batch_size):
            ids, mask = pad_right([seqs[j] for j in order[i:i + batch_size]])
            yield Batch({"input_ids": ids, "attention_mask": mask}, torch.full((len(ids),), -1))

    def task_model(self, body, head, task) -> nn.Module:
        lin = nn.Linear(32, 3)
        lin.load_state_dict(head)
        return MeanPoolClassifier(self._family.build(body), lin).eval()

    def finetune(self, task, body, head=None, *, seed=0, regularizer=None, steps=None) -> Expert:
        raise NotImplementedError

    def evaluate(self, body, head, task, *, merged=False) -> dict[str, float]:
        raise NotImplementedError


@pytest.fixture
def text_merge(tmp_path):
    suite = TinyTextSuite(cache_dir=tmp_path)
    base = suite.pretrained()
    torch.manual_seed(1)
    experts = [{k: v + 0.3 * v.std().nan_to_num(0.02) * torch.randn_like(v) if v.is_floating_point() else v
                for k, v in base.items()} for _ in suite.tasks]
    heads = [{"weight": 3.0 * torch.randn(3, 32), "bias": torch.zeros(3)} for _ in suite.tasks]
    return base, experts, MergeContext(suite=suite, tasks=suite.tasks, heads=heads, seed=0)


TEXT_ADA = {"steps": 24, "lr": 0.05, "prior": 0.3, "batch_size": 8, "batches_per_step": 2, "samples": 32, "clamp": True}


def test_adamerging_regroups_token_inputs_only(text_merge):
    base, experts, ctx = text_merge
    keys = [k for k in base if base[k].is_floating_point()]
    assert [f.micro_batch for f in _task_forwards(base, ctx, keys, 32, 8, micro_batch=8)] == [8, 8]
    assert [f.micro_batch for f in _task_forwards(base, ctx, keys, 32, 8, micro_batch=0)] == [0, 0]


@pytest.mark.parametrize("granularity", ["task", "tensor"])
def test_stacked_regrouped_steps_follow_the_version_2_computation(text_merge, granularity):
    base, experts, ctx = text_merge
    v2 = learn_coefficients(base, experts, ctx, granularity=granularity, regroup=False, stacked=False, **TEXT_ADA)
    v3 = learn_coefficients(base, experts, ctx, granularity=granularity, **TEXT_ADA)  # tol 0: every step
    assert v2.steps_taken == v3.steps_taken == 24
    assert np.allclose(v2.losses, v3.losses, rtol=1e-4)  # same objective, float rounding apart
    assert torch.allclose(v2.coefficients, v3.coefficients, atol=1e-3)


# ---------------------------------------------------------------- the convergence stop


def test_pass_lengths_cover_each_pool_evenly():
    assert pass_lengths([16, 12, 13], 2) == [8, 6, 13]
    assert pass_lengths([4], 1) == [4]


def test_convergence_stop_on_a_flat_objective_after_two_passes():
    stop = ConvergenceStop([3, 2], tol=1e-3)
    for _ in range(6):
        assert not stop.converged()
        stop.record([1.0, 2.0])
    assert stop.converged() and stop.improvement() == 0.0


def test_convergence_stop_keeps_going_while_the_objective_improves():
    stop = ConvergenceStop([4], tol=1e-3)
    for step in range(200):
        stop.record([10.0 * 0.99 ** step])  # 4 % better per pass of 4 steps
        assert not stop.converged()
    never = ConvergenceStop([2], tol=0.0)
    for _ in range(10):
        never.record([1.0])
    assert not never.converged()


def test_convergence_stop_compares_whole_passes_not_noisy_steps():
    # every pass sees the same two batches, one easy, one hard: step losses alternate but passes are equal
    stop = ConvergenceStop([2], tol=1e-3)
    for step in range(3):
        stop.record([0.5 if step % 2 else 3.0])
        assert not stop.converged()
    stop.record([0.5])
    assert stop.converged()


def test_adamerging_stops_early_on_a_converged_objective_and_runs_all_steps_otherwise(text_merge):
    base, experts, ctx = text_merge
    # lr so small that λ cannot move: the objective is flat from the start
    flat = learn_coefficients(base, experts, ctx, granularity="task", **{**TEXT_ADA, "lr": 1e-9, "steps": 50}, tol=1e-3)
    assert flat.converged and flat.steps_taken == 2 * max(pass_lengths([4, 4], 2)) == 4
    moving = learn_coefficients(base, experts, ctx, granularity="task", **{**TEXT_ADA, "steps": 12}, tol=1e-9)
    assert not moving.converged and moving.steps_taken == 12


def predictions(suite: Suite, ctx: MergeContext, state: StateDict) -> torch.Tensor:
    out = []
    for task, head in zip(ctx.tasks, ctx.heads):
        model = suite.task_model(state, head, task)
        with torch.no_grad():
            out += [model(**b.inputs).argmax(-1) for b in suite.batches(task, "test")]
    return torch.cat(out)


def test_the_stopped_merge_stays_within_tolerance_of_the_fixed_steps_merge(text_merge):
    base, experts, ctx = text_merge
    kwargs = {**TEXT_ADA, "steps": 100, "lr": 0.01}
    fixed = learn_coefficients(base, experts, ctx, granularity="task", regroup=False, stacked=False, measure=True, **kwargs)
    stopped = learn_coefficients(base, experts, ctx, granularity="task", tol=1e-3, measure=True, **kwargs)
    assert stopped.converged and stopped.steps_taken < 50 and fixed.steps_taken == 100
    gain = fixed.entropy_before - fixed.entropy_after
    assert gain > 0.3 * fixed.entropy_before  # the objective really moved
    assert stopped.entropy_after <= fixed.entropy_after + 0.1 * gain  # ≥ 90 % of the fixed-steps gain
    agree = (predictions(ctx.suite, ctx, fixed.state) == predictions(ctx.suite, ctx, stopped.state)).float().mean()
    assert float(agree) >= 0.95


def test_registered_adamerging_records_the_steps_taken_in_the_merge_notes(text_merge):
    base, experts, ctx = text_merge
    method = merges.get("adamerging-task")
    assert method.version == ADAMERGING_VERSION == "3"
    params = method.parse({k: str(v) for k, v in {**TEXT_ADA, "lr": 1e-9, "steps": 30}.items()})
    method.merge(base, experts, params, ctx=ctx)
    assert ctx.notes["steps_taken"] == 4 and ctx.notes["stopped"] == "converged" and ctx.notes["max_steps"] == 30
    assert ctx.notes["tol"] == params.tol > 0


# ---------------------------------------------------------------- convolutional models (BatchNorm)


class TinyConvBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # a bias before BatchNorm has no gradient: λ noise
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn(self.conv(pixel_values)))).mean((2, 3))


class TinyConvSuite(TinyTextSuite):
    name = "tiny-conv"

    def load_pretrained(self) -> StateDict:
        torch.manual_seed(0)
        return TinyConvBody().state_dict()

    def batches(self, task, split, *, batch_size=32, limit=None, shuffle=False, seed=0) -> Iterator[Batch]:
        x = torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(ord(task)))
        order = torch.randperm(48, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(48)
        x = x[order][:limit]
        for i in range(0, len(x), batch_size):
            yield Batch({"pixel_values": x[i:i + batch_size]}, torch.full((len(x[i:i + batch_size]),), -1))

    def task_model(self, body, head, task) -> nn.Module:
        model = MeanPoolClassifier(TinyConvBody(), nn.Linear(8, 3))
        model.forward = lambda pixel_values: model.head(model.body(pixel_values))  # type: ignore[method-assign]
        model.body.load_state_dict(body)
        model.head.load_state_dict(head)
        return model.eval()


def test_batchnorm_models_are_not_regrouped_and_follow_the_version_2_computation(tmp_path):
    suite = TinyConvSuite(cache_dir=tmp_path)
    base = suite.pretrained()
    torch.manual_seed(2)
    experts = [{k: v + 0.3 * torch.rand_like(v) if v.is_floating_point() else v for k, v in base.items()}
               for _ in suite.tasks]
    heads = [{"weight": 2.0 * torch.randn(3, 8), "bias": torch.zeros(3)} for _ in suite.tasks]
    ctx = MergeContext(suite=suite, tasks=suite.tasks, heads=heads, seed=0)
    keys = [k for k in base if base[k].is_floating_point()]
    assert [f.micro_batch for f in _task_forwards(base, ctx, keys, 32, 8, micro_batch=4)] == [0, 0]  # BatchNorm
    v2 = learn_coefficients(base, experts, ctx, granularity="tensor", regroup=False, stacked=False, **TEXT_ADA)
    v3 = learn_coefficients(base, experts, ctx, granularity="tensor", **TEXT_ADA)
    assert np.allclose(v2.losses, v3.losses, rtol=1e-4)
    assert torch.allclose(v2.coefficients, v3.coefficients, atol=1e-3)

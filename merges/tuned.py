"""The tuning free-rider: TA, TIES and DARE-TIES with their coefficient chosen on labelled victim data.

A real free-rider does not merge with fixed hyper-parameters: Task Arithmetic (Ilharco et al.,
ICLR 2023, §2 and Appendix) chooses λ "using held-out validation data", TIES-Merging (Yadav et
al., NeurIPS 2023) selects λ on validation data too, and DARE (Yu et al., ICML 2024) reports
results over its drop rate p. Here the attacker tunes on exactly what the threat model grants it:
its declared budget of labelled *victim* samples, drawn from the victim's training split (never the
test split) as the first ``samples`` of one seeded permutation, the same draw the fine-tuning
attacks (merge-finetune, GradErase) use, so a tuned merge composed with one of them uses no more
labelled data than the larger of the two. The objective is the victim task, since what the
free-rider wants is the victim's capability; with θ_pre in the victim's slot (the counterfactual
filling) the same search runs, so the floor of the score is tuned as hard as the attack is.

Choices where the papers leave room (each pinned by a test):

* *Grids.* TA: λ ∈ {0.1, 0.2, …, 1.0} (the paper's grid is 0–1 in steps of 0.05; 0.1 halves the
  cost, and neighbouring values differ by less than the noise of a few hundred samples); TIES:
  λ ∈ {0.2, 0.4, …, 2.0} with k = 0.2 (around the paper's λ ≈ 1 for its disjoint mean, and down to
  TA-like values); DARE-TIES: p ∈ {0.1, 0.3, 0.5, 0.7, 0.9} with the method's other defaults.
* *Criterion.* Accuracy on the labelled samples, ties broken by the lower mean task loss, then by
  the grid's order (the smaller coefficient): deterministic.
* *BatchNorm* (since version ``2+…``). A candidate's BatchNorm statistics are re-estimated on the attacker's
  own labelled samples, the ones it is scored on (`bench.batchnorm.recalibrate_batchnorm`), not on the
  suite's post-merge repair set (1,024 training images for vision-effnet): a fifth of the forward passes per
  candidate. The chosen merge is then evaluated as every merged body is, after the suite's repair
  (`Suite.recalibrate`). Version 1 repaired each candidate with `Suite.recalibrate`; what the change moves
  was measured on protocol version 4's cells (`benchmarks/protocol_cut.py`, figures in `bench/protocol.py`).
* *Length-sorted criterion batches* (token inputs, models without BatchNorm; since version ``2+…``): the
  labelled samples are re-cut into batches of similar length (`bench.bucketing.rebatch_by_length`), so the
  forward passes pad less. The criterion is a sum over the same samples, so it changes only by float
  rounding.

The chosen value, the grid and the criterion's value are recorded in the merge's notes (a cell's
``provenance.merge_notes``).

Cost: TA and TIES are θ_pre + λ·D with a direction D (Σ τ_i; TIES's trimmed, elected, disjoint
merge) that does not depend on λ, so the λ search computes D once (`LinearDirection`) and each
candidate is one multiply-add per tensor: the same operation the block job ends with
(``finish``), so every candidate is bit-identical to the plain merge at that λ (tested). DARE's p
changes which entries are dropped, so dare-ties-tuned merges once per candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import cache
from typing import Any

import torch

from bench.batchnorm import batchnorm_layers, recalibrate_batchnorm
from bench.bucketing import rebatch_by_length, sequence_inputs
from bench.merging import MergeContext, MergeMethod, merge_method
from bench.outofcore import BLOCK_ELEMENTS, merged_tensor, tensor_dtype
from bench.params import params_dict
from bench.registry import merges
from bench.weights import StateDict

TA_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))
TIES_GRID: tuple[float, ...] = tuple(round(0.2 * i, 1) for i in range(1, 11))
DARE_GRID: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
EVAL_BATCH_SIZE = 64


class TuningError(ValueError):
    """A tuned merge cannot run as asked (no victim named, too few labelled samples)."""


def labelled_victim_batches(ctx: MergeContext, samples: int) -> list[Any]:
    """The attacker's labelled set: the first ``samples`` victim training samples of the seeded draw."""
    if not ctx.victim:
        raise TuningError("a tuned merge needs the victim task it tunes for (MergeContext.victim)")
    if samples < 1:
        raise TuningError(f"a tuned merge needs at least one labelled sample; got samples={samples}")
    batches = list(ctx.suite.batches(ctx.victim, "train", batch_size=EVAL_BATCH_SIZE, limit=samples, shuffle=True,
                                     seed=ctx.seed))
    n = sum(len(b.labels) for b in batches)
    if n < samples:
        raise TuningError(f"task {ctx.victim!r} has only {n} training samples; the tuned merge asks for {samples}")
    return batches


@torch.no_grad()
def _criterion(ctx: MergeContext, merged: StateDict, head: StateDict, batches: Sequence[Any]) -> tuple[float, float]:
    """(accuracy, mean loss) of the merged body with the victim's head on the labelled samples."""
    model = ctx.suite.task_model(merged, head, ctx.victim)
    if batchnorm_layers(model):
        recalibrate_batchnorm(model, (b.inputs for b in batches))  # BatchNorm repair on the attacker's samples
    elif all(sequence_inputs(b.inputs) for b in batches):
        batches = rebatch_by_length(batches, EVAL_BATCH_SIZE)  # the same samples with less padding
    model.eval()
    correct = total = 0
    loss = 0.0
    for batch in batches:
        logits = model(**batch.inputs)
        correct += int((logits.argmax(-1) == batch.labels).sum())
        total += len(batch.labels)
        loss += float(ctx.suite.output_loss(logits, batch)) * len(batch.labels)  # the same forward pass
    return correct / total, loss / total


def select(ctx: MergeContext, batches: Sequence[Any], *, param: str, grid: Sequence[float],
           candidate: Callable[[float], StateDict]) -> StateDict:
    """The ``candidate(value)`` over ``grid`` that scores best on ``batches``; the search is recorded in ``ctx.notes``."""
    samples = sum(len(b.labels) for b in batches)
    head = ctx.heads[list(ctx.tasks).index(ctx.victim)]
    best: tuple[tuple[float, float, int], float, StateDict] | None = None
    scores = []
    for i, value in enumerate(grid):
        merged = candidate(value)
        acc, loss = _criterion(ctx, merged, head, batches)
        scores.append([value, round(acc, 6), round(loss, 6)])
        key = (acc, -loss, -i)
        if best is None or key > best[0]:
            best = (key, value, merged)
    assert best is not None
    ctx.notes.update({"tuned": param, param: best[1], "grid": [list(s) for s in scores],
                      "criterion": "accuracy on the labelled victim samples, then lower loss", "samples": samples})
    return best[2]


def _require_ctx(ctx: MergeContext | None, inner: MergeMethod) -> MergeContext:
    if ctx is None:
        raise TuningError(f"merge method {inner.name}-tuned tunes on labelled victim data and needs a suite context")
    return ctx


def tune(inner: MergeMethod, base: StateDict, experts: list[StateDict], ctx: MergeContext, *, param: str,
         grid: Sequence[float], samples: int) -> StateDict:
    """The merge of ``inner`` whose ``param`` (over ``grid``) scores best on the labelled victim samples."""
    ctx = _require_ctx(ctx, inner)
    batches = labelled_victim_batches(ctx, samples)  # a bad budget is refused before the first merge

    def candidate(value: float) -> StateDict:
        return inner.merge(base, experts, inner.Params(**{param: value}), seed=ctx.seed)

    return select(ctx, batches, param=param, grid=grid, candidate=candidate)


@cache
def _direction_job(job_cls: type) -> type:
    """``job_cls`` whose merged block is its direction (float32, a copy), before λ and θ_pre are applied."""
    if not callable(getattr(job_cls, "finish", None)):
        raise TypeError(f"{job_cls.__name__} has no finish(direction, base) step: its merge is not linear in λ")
    return type(f"{job_cls.__name__}Direction", (job_cls,), {"finish": lambda self, direction, base: direction.clone()})


class LinearDirection:
    """A tensor-wise merge θ_pre + λ·D whose direction D does not depend on λ, with D computed once.

    ``inner`` is a block-job method (`bench.outofcore`) whose job ends with ``finish(direction, base)``
    (``ta``, ``ties``). D is merged exactly as the plain merge merges it (same blocks, same
    generator, same passes); `at` applies λ with the operation ``finish`` applies, so ``at(λ)`` is
    ``inner.merge(..., lambda_=λ)`` bit for bit. Integer buffers come from θ_pre.
    """

    def __init__(self, inner: MergeMethod, base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                 params: Any, *, seed: int = 0, block_elements: int = BLOCK_ELEMENTS) -> None:
        job = _direction_job(getattr(inner.fn, "tensor_job", type(None)))
        kwargs = params_dict(params)
        self.base = dict(base)
        self.directions = {name: merged_tensor(inner, base, experts, kwargs, name, seed=seed, block_elements=block_elements,
                                               job=job, float32=True)
                           for name in base if tensor_dtype(base, name).is_floating_point}

    def at(self, lambda_: float) -> StateDict:
        """θ_pre + λ·D in θ_pre's dtypes: the plain merge at ``lambda_``."""
        merged = {}
        for name, base in self.base.items():
            direction = self.directions.get(name)
            if direction is None:
                merged[name] = base
                continue
            # the jobs' finish: λ·D + θ_pre in float32 (bit for bit θ_pre + λ·D), then θ_pre's dtype
            merged[name] = torch.mul(direction, lambda_).add_(base.float()).to(base.dtype)
        return merged


def tune_lambda(inner: MergeMethod, base: StateDict, experts: list[StateDict], ctx: MergeContext, *,
                grid: Sequence[float], samples: int) -> StateDict:
    """`tune` over ``lambda_`` for a merge linear in λ: its direction merged once (`LinearDirection`)."""
    ctx = _require_ctx(ctx, inner)
    batches = labelled_victim_batches(ctx, samples)
    direction = LinearDirection(inner, base, experts, inner.Params(), seed=ctx.seed)
    return select(ctx, batches, param="lambda_", grid=grid, candidate=direction.at)


def _inner(name: str) -> MergeMethod:
    return merges.get(name)


def _version(inner: str) -> str:
    """This wrapper's version joined with the tuned method's, so a change to either makes new cells."""
    return f"2+{inner}.{merges.get(inner).version}"


@merge_method("ta-tuned", tensorwise=False, needs_data=True, labelled_param="samples", version=_version("ta"),
              paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (λ chosen on held-out validation data)")
def ta_tuned(base: StateDict, experts: list[StateDict], *, ctx: MergeContext, samples: int = 256) -> StateDict:
    """Task arithmetic with λ ∈ {0.1, …, 1.0} chosen on ``samples`` labelled victim training samples."""
    return tune_lambda(_inner("ta"), base, experts, ctx, grid=TA_GRID, samples=samples)


@merge_method("ties-tuned", tensorwise=False, needs_data=True, labelled_param="samples", version=_version("ties"),
              paper="Yadav et al., TIES-Merging, NeurIPS 2023 (λ chosen on validation data)")
def ties_tuned(base: StateDict, experts: list[StateDict], *, ctx: MergeContext, samples: int = 256) -> StateDict:
    """TIES (per-tensor trim, k = 0.2) with λ ∈ {0.2, …, 2.0} chosen on ``samples`` labelled victim samples."""
    return tune_lambda(_inner("ties"), base, experts, ctx, grid=TIES_GRID, samples=samples)


@merge_method("dare-ties-tuned", tensorwise=False, needs_data=True, labelled_param="samples",
              version=_version("dare-ties"),
              paper="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (results over the drop rate p)")
def dare_ties_tuned(base: StateDict, experts: list[StateDict], *, ctx: MergeContext, samples: int = 256) -> StateDict:
    """DARE-TIES with its drop rate p ∈ {0.1, 0.3, 0.5, 0.7, 0.9} chosen on ``samples`` labelled victim samples."""
    return tune(_inner("dare-ties"), base, experts, ctx, param="p", grid=DARE_GRID, samples=samples)


__all__ = ["DARE_GRID", "TA_GRID", "TIES_GRID", "LinearDirection", "TuningError", "dare_ties_tuned",
           "labelled_victim_batches", "select", "ta_tuned", "ties_tuned", "tune", "tune_lambda"]

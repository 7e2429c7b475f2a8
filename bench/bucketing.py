"""Length bucketing: batches of similar-length sequences, so little compute goes to padding.

A padded batch of token sequences costs compute for every position up to its longest member. If
examples are sorted by length before the batches are cut, each batch is padded only to the longest of
similar-length neighbours. On text-minilm's test splits (batches of 64, at most 64 tokens), the padded
positions fall from 1.9–2.5 times the real tokens to 1.1–1.4 times.

Two users:

* **Evaluation** (`bucket_sequences`, `correct_in_order`): the test split is tokenised once, cut into
  length-sorted batches, and the per-example outcomes are put back in test-split order, so the outcome
  vector is the same as with batches in split order. Padded positions are masked out of attention and
  pooling, so an example's logits do not depend on its batch in exact arithmetic. In float32 they
  differ only by rounding (a different reduction length), which does not flip any prediction on the
  suites' test splits (`tests/test_eval_cost.py`, and the check in `benchmarks/eval_cost.py`).
* **AdaMerging's steps** (`regroup_by_length`): the examples of one step's batches are regrouped into
  length-sorted micro-batches. Each example keeps the weight its original batch gave it, so the step's
  objective stays the same sum.

Regrouping is only sound when an example's output does not depend on the rest of its batch. So it is
not used for models with BatchNorm in batch-statistics mode (`has_batch_dependent_layers`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bench.suite import Batch


def length_order(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """Indices that sort ``lengths`` ascending; equal lengths keep their original order (stable)."""
    return np.argsort(np.asarray(lengths), kind="stable")


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``seqs`` right-padded with ``pad_id`` to the longest (as a
    Hugging Face tokenizer with ``padding=True`` and ``padding_side="right"`` does)."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids, mask


@dataclass(frozen=True)
class BucketedBatches:
    """Length-sorted batches of one split and where each of their examples sits in the split."""

    batches: tuple[Batch, ...]
    positions: tuple[np.ndarray, ...]
    """For each batch, the split index of each of its examples."""
    size: int
    """Examples in the split."""

    def padded_tokens(self) -> int:
        return sum(int(b.inputs["attention_mask"].numel()) for b in self.batches)

    def real_tokens(self) -> int:
        return sum(int(b.inputs["attention_mask"].sum()) for b in self.batches)


def bucket_sequences(seqs: Sequence[Sequence[int]], labels: Sequence[int] | np.ndarray, batch_size: int,
                     pad_id: int = 0) -> BucketedBatches:
    """Batches of ``batch_size`` token sequences taken in order of length, each right-padded to its longest."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    labels = np.asarray(labels)
    if len(labels) != len(seqs):
        raise ValueError(f"{len(seqs)} sequences but {len(labels)} labels")
    order = length_order([len(s) for s in seqs])
    batches, positions = [], []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_right([seqs[i] for i in idx], pad_id)
        batches.append(Batch(inputs={"input_ids": ids, "attention_mask": mask}, labels=torch.from_numpy(labels[idx])))
        positions.append(idx)
    return BucketedBatches(tuple(batches), tuple(positions), len(seqs))


@torch.no_grad()
def correct_in_order(model: nn.Module, bucketed: BucketedBatches) -> np.ndarray:
    """1.0 where ``model`` (put in eval mode) predicts the label (top-1), else 0.0, in split order."""
    if bucketed.size == 0:
        raise ValueError("no evaluation samples")
    model.eval()
    out = np.full(bucketed.size, np.nan)
    for batch, idx in zip(bucketed.batches, bucketed.positions):
        out[idx] = (model(**batch.inputs).argmax(-1) == batch.labels).to(torch.float64).numpy()
    if np.isnan(out).any():
        raise ValueError("the bucketed batches do not cover every example of the split")
    return out


def rebatch_by_length(batches: Sequence[Batch], batch_size: int) -> list[Batch]:
    """The labelled examples of ``batches`` (token inputs passing `sequence_inputs`) in length-sorted batches of
    ``batch_size``, each right-padded with 0 (id and mask) to its longest row, labels carried along.

    The same examples, so a sum over examples (correct predictions, per-example loss) is the same up to float
    rounding; a tuned merge's criterion uses it (`merges.tuned`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rows: list[tuple[int, dict[str, torch.Tensor], torch.Tensor]] = []
    for batch in batches:
        if not sequence_inputs(batch.inputs):
            raise ValueError("rebatch_by_length needs token inputs with a 0/1 attention_mask")
        mask = batch.inputs["attention_mask"]
        for r in range(mask.shape[0]):
            nonzero = torch.nonzero(mask[r]).flatten()
            length = int(nonzero[-1]) + 1 if len(nonzero) else 0
            rows.append((length, {k: v[r, :length] for k, v in batch.inputs.items()}, batch.labels[r]))
    order = length_order([r[0] for r in rows])
    out = []
    for start in range(0, len(order), batch_size):
        chosen = [rows[i] for i in order[start:start + batch_size]]
        width = max(1, max(r[0] for r in chosen))
        inputs = {}
        for key, first in chosen[0][1].items():
            t = torch.zeros((len(chosen), width), dtype=first.dtype)
            for row, (length, tensors, _) in enumerate(chosen):
                t[row, :length] = tensors[key]
            inputs[key] = t
        out.append(Batch(inputs=inputs, labels=torch.stack([r[2] for r in chosen])))
    return out


# ---------------------------------------------------------------- regrouping a step's batches (AdaMerging)


def has_batch_dependent_layers(model: nn.Module) -> bool:
    """Whether any example's output may depend on the rest of its batch (BatchNorm layers)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def sequence_inputs(batch: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``batch`` is regroupable token input: a 2-D ``attention_mask`` of 0/1 and only tensors of its shape."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return False
    if not all(isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(mask.shape) for v in batch.values()):
        return False
    return bool(((mask == 0) | (mask == 1)).all())


@dataclass(frozen=True)
class MicroBatch:
    """Regrouped examples and the weight of each one in the original objective."""

    inputs: dict[str, torch.Tensor]
    weights: torch.Tensor
    """Per example ``[B]`` (1 / size of its original batch), to weigh per-example entropies."""
    token_weights: torch.Tensor
    """Per position ``[B, T]`` (mask / real tokens of its original batch), for token-level outputs."""


def regroup_by_length(batches: Sequence[Mapping[str, torch.Tensor]], micro_batch: int) -> list[MicroBatch]:
    """The examples of ``batches`` (each passing `sequence_inputs`) in length-sorted micro-batches.

    Each row is cut after its last real token and the micro-batch right-padded with 0 (id and mask) to
    its longest row. An example of an original batch of ``B`` rows and ``N`` real tokens gets weight
    ``1 / B`` (its share of that batch's mean over examples) and each of its real tokens ``1 / N`` (its
    share of that batch's mean over real tokens). Summing weighted per-example (or per-token)
    values over all micro-batches then gives the sum over ``batches`` of each batch's mean.
    """
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be at least 1, got {micro_batch}")
    rows: list[tuple[int, dict[str, torch.Tensor], float, float]] = []  # (length, row tensors, 1/B, 1/N)
    for batch in batches:
        mask = batch["attention_mask"]
        real = float(mask.sum())
        for r in range(mask.shape[0]):
            nonzero = torch.nonzero(mask[r]).flatten()
            length = int(nonzero[-1]) + 1 if len(nonzero) else 0
            rows.append((length, {k: v[r, :length] for k, v in batch.items()}, 1.0 / mask.shape[0],
                         1.0 / max(real, 1.0)))
    order = length_order([r[0] for r in rows])
    out = []
    for start in range(0, len(order), micro_batch):
        chosen = [rows[i] for i in order[start:start + micro_batch]]
        width = max(1, max(r[0] for r in chosen))
        inputs = {}
        for key in chosen[0][1]:
            first = chosen[0][1][key]
            t = torch.zeros((len(chosen), width), dtype=first.dtype)
            for row, (length, tensors, _, _) in enumerate(chosen):
                t[row, :length] = tensors[key]
            inputs[key] = t
        weights = torch.tensor([r[2] for r in chosen], dtype=torch.float32)
        token_weights = inputs["attention_mask"].to(torch.float32) * torch.tensor([r[3] for r in chosen]).unsqueeze(1)
        out.append(MicroBatch(inputs, weights, token_weights))
    return out


__all__ = ["BucketedBatches", "MicroBatch", "bucket_sequences", "correct_in_order", "has_batch_dependent_layers",
           "length_order", "pad_right", "rebatch_by_length", "regroup_by_length", "sequence_inputs"]

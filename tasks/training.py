"""Fine-tuning and evaluation loops shared by the classifier suites (a body plus a linear task head)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bench.outcomes import Evaluation
from bench.suite import Batch, Expert, Regularizer, Suite
from bench.weights import CheckpointError, StateDict

QUIET_ENV = "MERGEARENA_QUIET"
T = TypeVar("T")


def progress(iterable: Iterable[T], *, total: int, desc: str) -> Iterable[T]:
    """A tqdm bar on a terminal; silent when stderr is not a tty or ``MERGEARENA_QUIET=1``."""
    from tqdm.auto import tqdm

    quiet = os.environ.get(QUIET_ENV) == "1" or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=quiet, leave=False)


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return math.ceil(num_samples / batch_size)


def endless(epoch_batches: Callable[[int], Iterator[Batch]]) -> Iterator[Batch]:
    """Batches of epoch 0, 1, 2, ... where ``epoch_batches(e)`` reshuffles with an epoch-dependent seed."""
    epoch = 0
    while True:
        yield from epoch_batches(epoch)
        epoch += 1


def linear_head(head: StateDict | None, in_features: int, num_classes: int) -> nn.Linear:
    """A fresh ``nn.Linear`` head (``head`` None) or one carrying ``head`` (keys 'weight', 'bias')."""
    layer = nn.Linear(in_features, num_classes)
    if head is not None:
        if set(head) != {"weight", "bias"}:
            raise CheckpointError(f"a linear task head has keys 'weight' and 'bias'; got {sorted(head)}")
        if tuple(head["weight"].shape) != (num_classes, in_features):
            raise CheckpointError(
                f"task head shape {tuple(head['weight'].shape)} does not match ({num_classes}, {in_features})"
            )
        layer.load_state_dict({k: v.float() for k, v in head.items()})
    return layer


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[Batch], steps: int,
          regularizer: Regularizer | None = None, desc: str = "fine-tune",
          loss_fn: Callable[[nn.Module, Batch], torch.Tensor] | None = None) -> None:
    """``steps`` optimiser steps of ``loss_fn(model, batch)`` (cross-entropy on the logits by default)
    + ``regularizer(model)``; leaves ``model`` in eval mode."""
    model.train()
    for _ in progress(range(steps), total=steps, desc=desc):
        batch = next(batches)
        loss = loss_fn(model, batch) if loss_fn is not None else F.cross_entropy(model(**batch.inputs), batch.labels)
        if regularizer is not None:
            loss = loss + regularizer(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


def finetune_classifier(suite: Suite, task: str, build: Callable[[], nn.Module], steps: int, *, seed: int,
                        batch_size: int, regularizer: Regularizer | None = None, desc: str = "fine-tune") -> Expert:
    """The expert recipe of the classifier suites (a body plus a linear head): one function, so that the
    suites that share it cannot drift apart, and the experts cached under their recipe hashes stay valid.

    ``build()`` makes the task model (``.body`` and ``.head``) after the RNG is seeded with ``seed``, so
    a fresh head is seeded too; then ``steps`` steps of the suite's optimiser (`Suite.make_optimizer`)
    on shuffled training batches, epoch ``e`` reshuffled with seed ``seed * 1000 + e``. The global RNG
    is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
        optimizer = suite.make_optimizer(model.parameters())
        stream = endless(lambda epoch: suite.batches(task, "train", batch_size=batch_size, shuffle=True,
                                                     seed=seed * 1000 + epoch))
        train(model, optimizer, stream, steps, regularizer, desc=desc)
    return Expert(body=detached_state(model.body), head=detached_state(model.head))


@torch.no_grad()
def correct_per_example(model: nn.Module, batches: Iterable[Batch]) -> np.ndarray:
    """1.0 where ``model`` (put in eval mode) predicts the label (top-1), else 0.0, in batch order."""
    model.eval()
    flags = [(model(**batch.inputs).argmax(-1) == batch.labels).to(torch.float64).numpy() for batch in batches]
    if not flags or sum(len(f) for f in flags) == 0:
        raise ValueError("no evaluation samples")
    return np.concatenate(flags)


def accuracy_evaluation(model: nn.Module, batches: Iterable[Batch]) -> Evaluation:
    """Top-1 accuracy of ``model`` over ``batches``, with its per-example outcomes."""
    return Evaluation.from_examples({"accuracy": correct_per_example(model, batches)})


def accuracy(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) over ``batches``."""
    return float(correct_per_example(model, batches).mean())


def detached_state(module: nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def batch_indices(n: int, batch_size: int, limit: int | None = None, shuffle: bool = False,
                  seed: int = 0) -> Iterator[np.ndarray]:
    """Index arrays of consecutive batches over ``n`` samples (a seeded permutation when ``shuffle``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy() if shuffle else np.arange(n)
    if limit is not None:
        order = order[:limit]
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def split_recipe(spec: object, steps: int) -> dict[str, int]:
    """What a recipe records of one task: split sizes and fine-tuning steps."""
    return {"train": spec.train_size, "test": spec.test_size, "steps": steps}


def package_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "missing"

"""Fine-tuning a merged body on a capped number of victim samples (shared by merge-finetune and GradErase)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bench.artifact import Artifact
from bench.suite import Batch, Suite
from bench.weights import StateDict

GradientHook = Callable[[list[torch.Tensor]], None]
"""Edits the body's gradients in place before each optimiser step (GradErase's projection)."""


@dataclass(frozen=True)
class TrainBudget:
    samples: int
    """Distinct labelled victim samples: the first ``samples`` of the training split in a seeded order."""
    steps: int
    batch_size: int


def budget_batches(suite: Suite, task: str, budget: TrainBudget, seed: int) -> list[Batch]:
    """The attacker's whole labelled set, fixed once: exactly ``budget.samples`` training samples."""
    batches = list(suite.batches(task, "train", batch_size=budget.batch_size, limit=budget.samples, shuffle=True, seed=seed))
    n = sum(len(b.labels) for b in batches)
    if n < budget.samples:
        raise ValueError(f"task {task!r} has only {n} training samples; the attack asks for {budget.samples}")
    return batches


def finetune_body(suite: Suite, body: StateDict | Artifact, head: StateDict, task: str, budget: TrainBudget, *,
                  seed: int, gradient_hook: GradientHook | None = None, data: Sequence[Batch] | None = None) -> StateDict:
    """Train the body (head frozen: the released head is what the free-rider keeps) for ``budget.steps``
    optimiser steps of the suite's recipe optimiser (`Suite.make_optimizer`), cycling over the fixed
    budget set; returns the new body (for an `Artifact`, its released tensors, trained).

    ``data``: the budget set when the caller drew it already (an attack that trains twice on the same
    k samples passes the one draw to both); otherwise `budget_batches` draws it with ``seed``, which
    also seeds the training randomness (dropout).
    """
    data = list(data) if data is not None else budget_batches(suite, task, budget, seed)
    if not data:
        raise ValueError(f"the attack's labelled set for task {task!r} is empty")
    model = suite.task_model(body, head, task)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for p in model.body.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = suite.make_optimizer(params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(budget.steps):
            batch = data[step % len(data)]
            loss = suite.loss(model, batch)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            if gradient_hook is not None:
                gradient_hook([p.grad for p in params])
            opt.step()
    model.eval()
    trained = {k: v.detach().clone() for k, v in model.body.state_dict().items()}
    state = body.state if isinstance(body, Artifact) else body
    return {k: trained[k].to(v.dtype) if k in trained else v for k, v in state.items()}

"""A throwaway third-party plugin used by the tests: a toy suite on a tiny BERT and a toy defense.

It registers through the ``mergearena.plugins`` entry point (the tests write a ``.dist-info`` with
that entry point), exactly as an outside package would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.artifact import Artifact
from bench.families.bert import BertFamily
from bench.outcomes import Evaluation
from bench.plugins import Defense, DefenseContext
from bench.registry import defenses, suites
from bench.suite import Batch, Expert, Regularizer, Split, Suite
from bench.weights import StateDict

MARKERS = {"t10": 10, "t20": 20, "t30": 30}
SEQ = 12


class ToyTaskModel(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))


@suites.register("toy")
class ToySuite(Suite):
    """Tiny BERT on three synthetic 'is marker token present' tasks (seconds per expert)."""

    name = "toy"
    description = "tiny random BERT, three synthetic marker-detection tasks"

    def __init__(self, cache_dir: Any = None, steps: int = 40) -> None:
        super().__init__(cache_dir)
        self.steps = steps
        self._family = BertFamily.tiny(seed=0)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(MARKERS)

    def family(self) -> BertFamily:
        return self._family

    def load_pretrained(self) -> StateDict:
        return {k: v.clone() for k, v in self._family.new_module().state_dict().items()}

    def recipe(self) -> dict[str, Any]:
        return {"steps": self.steps, "lr": 3e-3, "batch": 32, "seq": SEQ}

    def _data(self, task: str, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(sorted(MARKERS).index(task) * 2 + (split == "test"))
        n = 512 if split == "train" else 128
        ids = torch.randint(40, 128, (n, SEQ), generator=g)
        labels = torch.randint(0, 2, (n,), generator=g)
        pos = torch.randint(0, SEQ, (n,), generator=g)
        ids[labels == 1, pos[labels == 1]] = MARKERS[task]
        return ids, labels

    def batches(self, task: str, split: Split, *, batch_size: int = 32, limit: int | None = None,
                shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        self.check_task(task)
        ids, labels = self._data(task, split)
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(ids))
        order = order[:limit] if limit else order
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield Batch({"input_ids": ids[idx], "attention_mask": torch.ones_like(ids[idx])}, labels[idx])

    def task_model(self, body: StateDict | Artifact, head: StateDict, task: str) -> nn.Module:
        lin = nn.Linear(32, 2)
        lin.load_state_dict(head)
        return ToyTaskModel(self._family.build(body), lin).eval()

    def finetune(self, task: str, body: StateDict, head: StateDict | None = None, *, seed: int = 0,
                 regularizer: Regularizer | None = None, steps: int | None = None) -> Expert:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if head is None:
                head = {k: v.clone() for k, v in nn.Linear(32, 2).state_dict().items()}
            model = self.task_model(body, head, task).train()
            opt = self.make_optimizer(model.parameters())
            n = steps if steps is not None else self.steps
            it = iter(())
            for step in range(n):
                batch = next(it, None)
                if batch is None:
                    it = self.batches(task, "train", shuffle=True, seed=seed + step)
                    batch = next(it)
                loss = nn.functional.cross_entropy(model(**batch.inputs), batch.labels)
                if regularizer is not None:
                    loss = loss + regularizer(model)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return Expert({k: v.detach().clone() for k, v in model.body.state_dict().items()},
                      {k: v.detach().clone() for k, v in model.head.state_dict().items()})

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=3e-3)

    def evaluate(self, body: StateDict | Artifact, head: StateDict, task: str, *, merged: bool = False) -> dict[str, float]:
        return dict(self.evaluate_examples(body, head, task, merged=merged).metrics)

    def evaluate_examples(self, body: StateDict | Artifact, head: StateDict, task: str, *,
                          merged: bool = False) -> Evaluation:
        model = self.task_model(body, head, task)
        with torch.no_grad():
            flags = [(model(**b.inputs).argmax(-1) == b.labels).double() for b in self.batches(task, "test", batch_size=64)]
        return Evaluation.from_examples({"accuracy": torch.cat(flags).numpy()})


@dataclass(frozen=True)
class ToyScaleParams:
    factor: float = 2.0
    """Multiply every mergeable tensor of the task vector by this factor."""


@defenses.register("toy-scale")
class ToyScale(Defense):
    """Toy defense: amplify the task vector (not function-preserving; for harness tests only)."""

    name = "toy-scale"
    Params = ToyScaleParams
    frontier = {"factor": ("1.5", "2", "4", "8")}
    """Doubling steps of the amplification about the default 2 (tests of `bench frontier`)."""

    def protect(self, expert: Expert, ctx: DefenseContext) -> Artifact:
        f = self.params.factor
        state = {k: (ctx.base[k] + f * (v - ctx.base[k])) if v.is_floating_point() else v for k, v in expert.body.items()}
        return Artifact(state=state, notes={"factor": f})


@dataclass(frozen=True)
class ToyCrashParams:
    mode: str = "once"
    """'once': kill the worker process the first time (a marker file remembers); 'always': every time."""


@defenses.register("toy-crash")
class ToyCrash(Defense):
    """Toy defense that kills its worker process (tests that executors survive a dying worker)."""

    name = "toy-crash"
    Params = ToyCrashParams

    def protect(self, expert: Expert, ctx: DefenseContext) -> Artifact:
        import os

        marker = os.path.join(os.environ["TOY_CRASH_DIR"], f"{ctx.task}-{self.params.mode}")
        if self.params.mode == "always" or not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return Artifact(state=dict(expert.body))

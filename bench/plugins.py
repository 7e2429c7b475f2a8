"""Base classes of defenses and attacks, and the contexts the runner hands them.

A defense or attack is a small class with a frozen ``Params`` dataclass, so a result row can say
exactly what ran. Everything the harness reads of a plugin is declared on these base classes, with
a default and a docstring, as ART declares ``_estimator_requirements``: a plugin overrides what
applies to it, and nothing is discovered by ``getattr`` or by catching an exception.

* `Defense`: ``applies_to`` (architecture-map features), ``needs_data``, ``function_preserving``,
  ``changes_structure``, ``frontier`` (strength knobs for `bench frontier`; each setting is labelled by `label`).
* `Attack`: ``needs()`` (the threat model's budget), ``requires_features``, ``restores_structure``,
  ``sweep``, ``standard_composites``, ``has_finish()``.

Collection-valued declarations are frozen when the class is defined (a subclass may write a set,
list or dict), so no caller can change what every instance of a plugin declares; a sweep or a frontier over
a parameter the plugin does not have fails at import.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from bench.artifact import Artifact
from bench.families.base import ArchitectureMap
from bench.families.family import Family
from bench.params import NoParams, describe_params, param_text, params_dict, parse_params
from bench.suite import Expert, Suite
from bench.weights import StateDict


def seeded_generator(seed: int, *salt: object) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a salt (plugin name, tensor name): order-independent."""
    digest = hashlib.sha256(repr((seed, *salt)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _freeze(cls: type, declarations: Mapping[str, Callable[[Any], Any]]) -> None:
    """Replace the declarations ``cls``'s own body sets by immutable values (a property is left alone)."""
    for attr, freeze in declarations.items():
        value = vars(cls).get(attr)
        if value is not None and not isinstance(value, property):
            setattr(cls, attr, freeze(value))


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
    needs_data: ClassVar[bool] = False
    """Runs the model on the victim task's data (through ``ctx.suite``). Without data (`bench protect`
    with no ``--data``, `bench validate`) such a defense is refused or N/A before it runs."""
    function_preserving: ClassVar[bool] = False
    """Claims the artifact computes exactly what the expert computes (checked on probe inputs)."""
    changes_structure: ClassVar[bool] = False
    """Releases a structure the standard module cannot run (a variant)."""
    frontier: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType({})
    """Strength knobs: parameter -> 3 to 6 values as ``--param`` strings, weak to strong, the default among them.
    `bench frontier` runs each value as a variant (one knob at a time, the others at their defaults) and the
    site draws utility against security through them. Keys must be fields of ``Params``; empty: no knob."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _freeze(cls, {"applies_to": frozenset,
                      "frontier": lambda f: MappingProxyType({k: tuple(str(v) for v in vs) for k, vs in f.items()})})
        unknown = sorted(set(cls.frontier) - {f.name for f in dataclasses.fields(cls.Params)})
        if unknown:
            raise TypeError(f"defense {cls.__name__} declares a frontier over {', '.join(unknown)}, which its Params "
                            f"({cls.Params.__name__}) does not have")

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {**super().describe(), "frontier": {k: list(v) for k, v in cls.frontier.items()}}

    @property
    def label(self) -> str:
        """The variant label, the store's defense column: the name when the params are the defaults, else
        ``NAME[key=value,...]`` with the non-default keys, sorted (`bench.plan.parse_variant` reads it back)."""
        given, default = params_dict(self.params), params_dict(self.Params())
        changed = sorted(k for k in given if given[k] != default.get(k))
        if not changed:
            return self.name
        return f"{self.name}[{','.join(f'{k}={param_text(given[k])}' for k in changed)}]"

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
    requires_features: ClassVar[frozenset[str]] = frozenset()
    """Architecture-map features the attack acts on (all of them); on a suite without one its cells are N/A."""
    sweep: ClassVar[Mapping[str, tuple[Any, ...]]] = MappingProxyType({})
    """Parameter -> values: ``--attack NAME`` plans one attack per combination (a ``--param`` fixes its key),
    each labelled with its point (`label`). Keys must be fields of ``Params``."""
    standard_composites: ClassVar[tuple[str, ...]] = ()
    """'+'-composites with this attack that ``--attack all`` runs too (each when all its steps are registered)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _freeze(cls, {"requires_features": frozenset, "standard_composites": tuple,
                      "sweep": lambda sweep: MappingProxyType({k: tuple(v) for k, v in sweep.items()})})
        fields = {f.name for f in dataclasses.fields(cls.Params)}
        unknown = sorted(set(cls.sweep) - fields)
        if unknown:
            raise TypeError(f"attack {cls.__name__} sweeps {', '.join(unknown)}, which its Params "
                            f"({cls.Params.__name__}) does not have")
        bad = [c for c in cls.standard_composites if "+" not in c]
        if bad:
            raise TypeError(f"attack {cls.__name__}: standard composite {bad[0]!r} is not 'a+b'")

    def __init__(self, params: Any = None, *, sweep_point: Mapping[str, Any] | None = None) -> None:
        super().__init__(params)
        self.sweep_point: tuple[tuple[str, Any], ...] = tuple((sweep_point or {}).items())
        """The swept values this instance runs with, in sweep order (empty unless it is one point of `sweep`)."""

    @property
    def label(self) -> str:
        """The attack's name, with its swept values when it is one point of a sweep (``merge-finetune[samples=16]``)."""
        if not self.sweep_point:
            return self.name
        return f"{self.name}[{','.join(f'{k}={v}' for k, v in self.sweep_point)}]"

    def needs(self) -> AttackNeeds:
        return AttackNeeds()

    def prepare(self, artifact: Artifact, ctx: AttackContext) -> Artifact:
        return artifact

    def finish(self, merged: StateDict, ctx: AttackContext) -> StateDict:
        return merged

    def has_finish(self) -> bool:
        """Whether `finish` changes the merged body: then the merge alone does not determine the result, and a
        cached merge may not stand in for this pipeline (the one rule; a composite asks its steps)."""
        return type(self).finish is not Attack.finish

    def counterpart(self) -> Attack:
        """The honest counterpart (DESIGN §4): what a free-rider with this attack's data budget runs on an
        *unprotected* release. Its U and ∅ cells are this attack's references, so the attack is credited only
        for what it takes from the protected model, never for what it would destroy in the unprotected one.

        Default: an attack that uses no samples and no fine-tuning (an undo attack: realign, scale-division,
        anchor-align, revert-*, taylor-invert, unmask) has nothing to undo on an unprotected release, so the
        free-rider just merges: ``none``. An attack that uses data is its own counterpart unless it says
        otherwise (GradErase's is plain merge-finetune with the same samples)."""
        needs = self.needs()
        if needs.labelled or needs.unlabelled or needs.finetune_steps:
            return self
        from bench.registry import attacks

        return attacks.get("none")()


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

    @property
    def requires_features(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset().union(*(s.requires_features for s in self.steps))

    def has_finish(self) -> bool:
        return any(s.has_finish() for s in self.steps)

    def counterpart(self) -> Attack:
        """The composition of the steps' counterparts, ``none`` steps dropped (realign+scale-division+merge-finetune
        -> merge-finetune; realign+scale-division -> none)."""
        parts = [c for c in (s.counterpart() for s in self.steps) if c.name != "none"]
        if not parts:
            from bench.registry import attacks

            return attacks.get("none")()
        return parts[0] if len(parts) == 1 else CompositeAttack(parts)

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


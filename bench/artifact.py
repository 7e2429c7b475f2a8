"""What a defender releases: a state dict, plus a variant tag when the structure changed.

The modules that run a variant (`bench.families.family.Variant`) live with the family that builds
modules, so this module depends on nothing but weight hashing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.weights import StateDict, state_hash


@dataclass
class Artifact:
    """A released (protected) model body."""

    state: StateDict
    """The released tensors. With a variant, some standard tensors are replaced by the variant's own."""
    variant: str | None = None
    """Name of the module variant that runs this state (None: the family's standard module)."""
    head: StateDict | None = None
    """A task head released with the body when the defense retrained it (None: the expert's head)."""
    notes: dict[str, object] = field(default_factory=dict)
    """What the defense did (distances, timings, selected layers): provenance, not weights."""

    def content_hash(self) -> str:
        h = state_hash(self.state)
        if self.head is not None:
            h = state_hash({**{f"body.{k}": v for k, v in self.state.items()}, **{f"head.{k}": v for k, v in self.head.items()}})
        return f"{self.variant or 'standard'}:{h}"

    @property
    def structure_changed(self) -> bool:
        return self.variant is not None


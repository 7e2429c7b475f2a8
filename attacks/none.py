"""The baseline free-rider: merge the released artifact as it is."""

from __future__ import annotations

from bench.plugins import Attack, AttackNeeds
from bench.registry import attacks


@attacks.register()
class NoAttack(Attack):
    """Plain merge: no preparation of the artifact, nothing after the merge."""

    name = "none"

    def needs(self) -> AttackNeeds:
        return AttackNeeds(anchor=False)

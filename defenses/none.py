"""The baseline: release the expert unchanged."""

from __future__ import annotations

from bench.artifact import Artifact
from bench.plugins import Defense, DefenseContext
from bench.registry import defenses
from bench.suite import Expert


@defenses.register()
class NoDefense(Defense):
    """No protection: the artifact is the expert itself (the baseline every score is relative to)."""

    name = "none"
    function_preserving = True

    def protect(self, expert: Expert, ctx: DefenseContext) -> Artifact:
        return Artifact(state=dict(expert.body))

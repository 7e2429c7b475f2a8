from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.artifact import Artifact
from bench.plugins import Defense
from bench.registry import defenses
from bench.validate import validate


@dataclass(frozen=True)
class _P:
    shift: float = 0.1


class _Shifty(Defense):
    """Claims preservation while shifting every weight (must fail validation)."""

    name = "shifty-test"
    Params = _P
    function_preserving = True

    def protect(self, expert, ctx):
        return Artifact({k: v + self.params.shift if v.is_floating_point() else v for k, v in expert.body.items()})


class _Random(Defense):
    """Not deterministic for a seed (must fail validation)."""

    name = "random-test"

    def protect(self, expert, ctx):
        return Artifact({k: v + torch.randn(v.shape) * 1e-3 if v.is_floating_point() else v for k, v in expert.body.items()})


def test_function_preserving_defense_passes_on_every_family() -> None:
    checks = validate("params")
    assert [c.status for c in checks] == ["ok"] * len(checks)
    assert all(c.numbers["distance_artifact"] > 10 * c.numbers["distance_expert"] for c in checks)


def test_false_claim_and_nondeterminism_fail() -> None:
    for cls in (_Shifty, _Random):
        if cls.name not in defenses:
            defenses.register(cls.name, obj=cls)
    shifty = validate("shifty-test")
    assert {c.status for c in shifty if c.family != "open-clip-vit"} == {"FAIL"}
    assert "claims function preservation" in shifty[0].detail
    assert all(c.status == "FAIL" and "different artifacts" in c.detail for c in validate("random-test"))


def test_data_needing_defense_is_not_applicable_here() -> None:
    assert {c.status for c in validate("mergeguard")} == {"n/a"}

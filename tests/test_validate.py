from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.artifact import Artifact
from bench.families.tiny import TINY_NAMES, tiny
from bench.plugins import Defense
from bench.registry import defenses
from bench.suite import MissingAssetError
from bench.validate import validate, validate_on


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


def _runnable(name: str) -> bool:
    """Whether this machine can build the tiny ``name`` module (open_clip's needs its optional package)."""
    family, state = tiny(name)
    try:
        family.build(state)
    except MissingAssetError:
        return False
    return True


def _register_test_defenses() -> None:
    for cls in (_Shifty, _Random):
        if cls.name not in defenses:
            defenses.register(cls.name, obj=cls)


def test_function_preserving_defense_passes_on_every_family_that_runs() -> None:
    checks = validate("params")
    assert [c.family for c in checks] == list(TINY_NAMES)
    assert [c.status for c in checks] == ["ok" if _runnable(c.family) else "unverified" for c in checks]
    assert all(c.numbers["distance_artifact"] > 10 * c.numbers["distance_expert"] for c in checks)


def test_false_claim_is_caught_on_every_family_that_runs_and_never_passes_unrun() -> None:
    _register_test_defenses()
    shifty = validate("shifty-test", {"shift": "0.5"})
    runnable = [c for c in shifty if _runnable(c.family)]
    assert {"bert", "clip-vision", "llama"} <= {c.family for c in runnable}
    assert all(c.status == "FAIL" and "claims function preservation" in c.detail for c in runnable), shifty
    # a family whose module cannot run here was not checked: it is unverified, never ok
    assert all(c.status == "unverified" for c in shifty if c not in runnable)


def test_a_state_level_only_family_is_unverified_not_ok(monkeypatch) -> None:
    from bench.families.bert import BertFamily

    def no_module(self, state):
        raise MissingAssetError("this family's module needs a package that is not installed")

    monkeypatch.setattr(BertFamily, "build", no_module)
    for name in ("params", "shifty-test"):
        _register_test_defenses()
        check = validate_on(defenses.get(name).from_overrides({}), "bert")
        assert check.status == "unverified" and "not compared" in check.detail


def test_nondeterminism_fails() -> None:
    _register_test_defenses()
    assert all(c.status == "FAIL" and "different artifacts" in c.detail for c in validate("random-test"))


def test_data_needing_defense_is_not_applicable_here() -> None:
    assert {c.status for c in validate("mergeguard")} == {"n/a"}

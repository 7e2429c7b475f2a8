"""What the harness reads of a plugin is declared on `Attack` / `Defense`: frozen, checked at import, one rule each."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from bench.artifact import Artifact
from bench.families.base import ATTENTION, GATED_MLP
from bench.families.tiny import tiny
from bench.plan import make_attacks, make_merge, pipeline_applicability
from bench.plugins import DEFAULT_BUDGET, Attack, CompositeAttack, Defense
from bench.registry import attacks, defenses
from bench.validate import validate_on


@dataclass(frozen=True)
class _Samples:
    samples: int = 1


def test_declarations_are_frozen_when_the_class_is_defined() -> None:
    class Sweeping(Attack):
        name = "sweeping-test"
        Params = _Samples
        sweep = {"samples": [1, 2]}
        requires_features = {ATTENTION}
        standard_composites = ["sweeping-test+realign"]

    assert Sweeping.sweep == {"samples": (1, 2)} and isinstance(Sweeping.requires_features, frozenset)
    assert Sweeping.standard_composites == ("sweeping-test+realign",)
    with pytest.raises(TypeError):
        Sweeping.sweep["samples"] = (3,)  # type: ignore[index]
    assert attacks.get("merge-finetune").sweep["samples"] == (16, 64, 256)


def test_a_sweep_over_a_parameter_the_attack_lacks_fails_at_import() -> None:
    with pytest.raises(TypeError, match="sweeps sample, which its Params"):
        class Typo(Attack):  # noqa: F841
            Params = _Samples
            sweep = {"sample": (1, 2)}


def test_sweep_points_are_labelled_without_writing_on_a_shared_instance() -> None:
    points = make_attacks("merge-finetune")
    assert [a.label for a in points] == ["merge-finetune[samples=16]", "merge-finetune[samples=64]",
                                         "merge-finetune[samples=256]"]
    assert [a.params.samples for a in points] == [16, 64, 256]
    assert make_attacks("merge-finetune", {"merge-finetune": {"samples": "8"}})[0].label == "merge-finetune"
    assert attacks.get("realign").from_overrides().label == "realign"


def test_has_finish_is_one_rule_for_single_and_composite_attacks() -> None:
    plain, finishing = attacks.get("realign").from_overrides(), make_attacks("merge-finetune")[0]
    assert not plain.has_finish() and finishing.has_finish()
    assert CompositeAttack([plain, finishing]).has_finish()
    assert not CompositeAttack([plain, attacks.get("scale-division").from_overrides()]).has_finish()


def test_required_features_make_a_pipeline_structurally_not_applicable() -> None:
    class NeedsGate(Attack):
        name = "needs-gate-test"
        requires_features = frozenset({GATED_MLP})

    family, _ = tiny("bert")
    reason, kind = pipeline_applicability(CompositeAttack([NeedsGate()]), make_merge("ta"), family.arch_map(),
                                          DEFAULT_BUDGET)
    assert kind == "structural" and reason == "attack needs-gate-test needs gated_mlp"


def test_data_needs_are_declared_not_discovered() -> None:
    assert {n for n in defenses.names() if defenses.get(n).needs_data} >= {
        "mergeguard", "mergeguard-stage1", "mergeguard-stage2", "mergebarrier", "mergebarrier-ffn", "taylormlp"}
    assert not defenses.get("params").needs_data and not defenses.get("mergebarrier-att").needs_data

    class SecretReader(Defense):
        """Reads task data without declaring it: `bench validate` says so instead of calling it N/A."""

        name = "secret-reader-test"

        def protect(self, expert, ctx):
            next(iter(ctx.suite.batches(ctx.task, "train")))
            return Artifact({k: v.clone() for k, v in expert.body.items()})

    check = validate_on(SecretReader(), "bert")
    assert check.status == "FAIL" and "set needs_data = True on SecretReader" in check.detail
    SecretReader.needs_data = True
    assert validate_on(SecretReader(), "bert").status == "n/a"

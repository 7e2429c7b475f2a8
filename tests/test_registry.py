from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import subprocess_env

from bench.params import ParamError
from bench.registry import Registry, RegistryError, UnknownPluginError, defenses


def test_register_as_decorator_and_call() -> None:
    reg: Registry = Registry("widget")

    @reg.register("a", "alias-a")
    class A:
        pass

    reg.register("b", obj=42)
    assert reg.get("a") is A and reg.get("alias-a") is A and reg.get("b") == 42


def test_duplicate_name_is_rejected() -> None:
    reg: Registry = Registry("widget")
    reg.register("x", obj=1)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("x", obj=2)


def test_unknown_name_suggests_close_matches() -> None:
    reg: Registry = Registry("widget")
    reg.register("params", obj=1)
    reg.register("mergelock", obj=2)
    with pytest.raises(UnknownPluginError) as err:
        reg.get("parms")
    assert "Did you mean 'params'" in str(err.value)
    assert "Available: mergelock, params" in str(err.value)


def test_lazy_entry_imports_on_first_get() -> None:
    reg: Registry = Registry("widget")
    reg.register_lazy("dumps", "json:dumps")
    import json

    assert reg.get("dumps") is json.dumps


def test_builtin_none_plugins_are_registered() -> None:
    assert "none" in defenses
    assert defenses.get("none").name == "none"


def test_plugin_params_parse_from_strings(plugin_site) -> None:
    cls = defenses.get("toy-scale")
    assert cls.from_overrides({"factor": "3.5"}).params.factor == 3.5
    with pytest.raises(ParamError, match="expects float"):
        cls.from_overrides({"factor": "big"})
    with pytest.raises(ParamError, match="unknown parameter"):
        cls.from_overrides({"fator": "1"})


def test_entry_point_plugin_is_listed_and_runnable(plugin_site, tmp_path) -> None:
    env = subprocess_env(plugin_site, tmp_path / "cache")
    out = subprocess.run([sys.executable, "-m", "bench.cli", "list", "defense"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "toy-scale" in out.stdout
    run = subprocess.run(
        [sys.executable, "-m", "bench.cli", "run", "--suite", "toy", "--defense", "toy-scale", "--merge", "ta",
         "--victims", "t10", "--store", str(tmp_path / "r.sqlite")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr + run.stdout
    assert "toy-scale" in run.stdout and "Merged accuracy" in run.stdout


# ---------------------------------------------------------------- base class and name checks


def test_a_plugin_takes_its_name_from_its_class() -> None:
    from bench.plugins import Defense

    reg: Registry = Registry("defense", subclass_of="bench.plugins:Defense")

    @reg.register()
    class Mine(Defense):
        name = "mine"

    assert reg.get("mine") is Mine and reg.names() == ["mine"]


def test_a_name_that_disagrees_with_the_class_is_refused_in_one_sentence() -> None:
    from bench.plugins import Defense

    reg: Registry = Registry("defense", subclass_of="bench.plugins:Defense")

    class Mine(Defense):
        name = "mine"

    with pytest.raises(RegistryError, match=r"named 'mine' but registered as 'yours'; make them agree"):
        reg.register("yours", obj=Mine)
    reg.register("mine", "mine-alias", obj=Mine)  # aliases are fine when the class's own name is among them
    assert reg.get("mine-alias") is Mine


def test_a_plugin_of_the_wrong_kind_is_refused() -> None:
    from bench.plugins import Attack

    reg: Registry = Registry("defense", subclass_of="bench.plugins:Defense")

    class NotADefense(Attack):
        name = "x"

    with pytest.raises(RegistryError, match=r"must be a subclass of bench\.plugins\.Defense"):
        reg.register(obj=NotADefense)
    with pytest.raises(RegistryError, match="must be a subclass"):
        reg.register("y", obj=42)
    merges_like: Registry = Registry("merge method", instance_of="bench.merging:MergeMethod")
    with pytest.raises(RegistryError, match=r"must be an instance of bench\.merging\.MergeMethod"):
        merges_like.register("z", obj=lambda base, experts: base)


def test_a_lazy_entry_pointing_at_another_plugin_fails_when_imported() -> None:
    reg: Registry = Registry("defense", subclass_of="bench.plugins:Defense")
    reg.register_lazy("params-typo", "defenses.params:PaRaMS")
    with pytest.raises(RegistryError, match=r"'params-typo' \(defenses\.params:PaRaMS\).*named 'params'"):
        reg.get("params-typo")


def test_every_builtin_line_names_its_plugin() -> None:
    from bench.families.family import variants
    from bench.registry import attacks, families, file_suites, merges, suites

    for registry in (defenses, attacks, merges, suites, families, file_suites):
        for name in registry.names():
            assert registry.get(name).name == name, (registry.kind, name)
    assert variants.get("taylor-ffn") is not None

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

"""Shared fixtures: the toy plugin (installed as an entry point), stores and caches in tmp dirs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

FIXTURE_DIR = Path(__file__).parent / "plugin_fixture"

torch.set_num_threads(1)
os.environ.setdefault("MERGEARENA_QUIET", "1")


def write_entry_point(site: Path, dist: str, name: str, target: str) -> None:
    """Make ``site`` hold a distribution whose ``mergearena.plugins`` entry point ``name`` is ``target``."""
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[mergearena.plugins]\n{name} = {target}\n")


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory on sys.path holding the toy plugin distribution, discovered via its entry point."""
    site = tmp_path_factory.mktemp("site")
    write_entry_point(site, "mergearena_toyplugin", "toy", "toyplugin")
    for p in (str(site), str(FIXTURE_DIR)):
        if p not in sys.path:
            sys.path.insert(0, p)
    from bench.registry import discover_plugins

    discover_plugins(force=True)
    return site


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture()
def toy_suite(plugin_site: Path, toy_cache: Path):
    from toyplugin import ToySuite

    return ToySuite(cache_dir=toy_cache)


def subprocess_env(plugin_site: Path, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_site), str(FIXTURE_DIR), env.get("PYTHONPATH", "")])
    env["MERGEARENA_CACHE"] = str(cache)
    env["MERGEARENA_QUIET"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env

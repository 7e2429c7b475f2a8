"""A fresh machine reproduces the shipped vision-effnet numbers (slow: it fine-tunes the three experts in an empty
cache and runs the protocol for PaRaMS on the shipped references, minutes on 2 cores).

Two claims, each compared by value: the experts are the shipped experts, bit for bit (`bench.portable`; the
hashes every shipped cell records in its provenance); and what the fresh run computes (PaRaMS's utility and
every protected pair's recovered) lies inside the shipped intervals, while the imported references give every
victim's gain exactly as shipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leaderboard.export import SHIPPED, cells_of_export

pytestmark = pytest.mark.slow

SUITE, DEFENSE = "vision-effnet", "params"


def _entry(data: Path, suite: str, defense: str) -> dict:
    manifest = json.loads((data / "manifest.json").read_text())
    file = next(e["file"] for e in manifest["entries"] if (e["suite"], e["defense"]) == (suite, defense))
    return json.loads((data / file).read_text())


def _inside(value: float | None, ci: list[float] | None, shipped: float | None) -> bool:
    if value is None or shipped is None:
        return value is None and shipped is None
    lo, hi = ci if ci else (shipped, shipped)
    return lo - 1e-9 <= value <= hi + 1e-9


def test_a_fresh_machine_builds_the_shipped_experts_and_lands_inside_the_shipped_intervals(tmp_path: Path) -> None:
    from bench.registry import suites
    from bench.weights import state_hash

    shipped_cells, _ = cells_of_export(SHIPPED)
    recorded = {(r.victim, (r.provenance.get("hashes") or {}).get("expert")) for r in shipped_cells
                if r.suite == SUITE and r.kind == "baseline"}
    suite = suites.get(SUITE)(cache_dir=tmp_path / "cache")
    built = {(t, state_hash(suite.expert(t).body)) for t in suite.tasks}
    assert built == recorded  # the same bits as the machine that shipped them

    env = {**os.environ, "MERGEARENA_CACHE": str(tmp_path / "cache"), "MERGEARENA_QUIET": "1"}
    store, data = tmp_path / "r.sqlite", tmp_path / "data"
    bench = [sys.executable, "-m", "bench.cli"]
    subprocess.run([*bench, "leaderboard", "import", "--references-only", "--store", str(store)], check=True, env=env)
    subprocess.run([*bench, "run", "--protocol", "standard", "--suite", SUITE, "--defense", DEFENSE, "--jobs", "2",
                    "--store", str(store)], check=True, env=env, timeout=3600)
    subprocess.run([*bench, "leaderboard", "export", "--store", str(store), "--out", str(data)], check=True, env=env,
                   timeout=600)
    want, got = _entry(SHIPPED, SUITE, DEFENSE), _entry(data, SUITE, DEFENSE)
    assert got["summary"]["complete"]
    shipped_victims = {v["victim"]: v for v in want["victims"]}
    for v in got["victims"]:
        w = shipped_victims[v["victim"]]
        assert v["broken_by"] == w["broken_by"], v["victim"]  # the same steps ran, so the same pairs exist
        pairs = {(r["attack"], r["merge"]): r for r in w["recovered"]}
        assert {(r["attack"], r["merge"]) for r in v["recovered"]} == set(pairs), v["victim"]
        for r in v["recovered"]:
            p = pairs[(r["attack"], r["merge"])]
            assert r["gain"] == p["gain"]  # the imported reference cells: exactly the shipped gain
            assert _inside(r["recovered"], p["recovered_ci"], p["recovered"]), (v["victim"], r["attack"], r["merge"])
        assert _inside(v["utility"], w["utility_ci"], w["utility"]), v["victim"]
    s, w = got["summary"], want["summary"]
    assert _inside(s["security"], w["security_ci"], w["security"])

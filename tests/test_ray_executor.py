from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import subprocess_env

from bench.store import Store

pytest.importorskip("ray", reason="the Ray executor is the optional [ray] extra; CI installs it")


def test_ray_run_survives_dying_workers(plugin_site, tmp_path) -> None:
    env = subprocess_env(plugin_site, tmp_path / "cache")
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "TOY_CRASH_DIR": str(tmp_path), "RAY_AUTH_MODE": "disabled"})
    store = tmp_path / "r.sqlite"
    argv = [sys.executable, "-m", "bench.cli", "run", "--suite", "toy", "--defense", "toy-crash,toy-scale",
            "--merge", "ta", "--victims", "t10", "--executor", "ray", "--store", str(store),
            "--param", "toy-crash.mode=once"]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    with Store(store) as s:
        cells = s.cells()
    statuses = {(c.defense, c.kind): c.status for c in cells}
    # the crashing group was retried by Ray and finished; everything else finished too
    assert statuses[("toy-crash", "merge")] == "ok" and statuses[("toy-scale", "merge")] == "ok"
    assert statuses[("-", "baseline")] == "ok" and statuses[("none", "merge")] == "ok"

    argv2 = argv[:-1] + ["toy-crash.mode=always"]
    out = subprocess.run(argv2, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1  # a failed cell makes the run's exit status non-zero
    with Store(store) as s:
        # a non-default setting is its own variant label (`Defense.label`)
        crashed = [c for c in s.cells(defense="toy-crash[mode=always]") if c.spec["defense"]["params"]["mode"] == "always"]
    assert crashed and all(c.status == "failed" and c.reason for c in crashed)

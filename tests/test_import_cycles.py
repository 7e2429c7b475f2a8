"""`scripts/check_import_cycles.py`: the repository has no import cycle but the designed one, and a new one fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_import_cycles.py"


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def package(root: Path, modules: dict[str, str]) -> Path:
    """Write ``bench/<name>.py`` files under ``root`` (a stand-in for the repository)."""
    (root / "bench").mkdir(parents=True)
    (root / "bench" / "__init__.py").write_text("")
    for name, source in modules.items():
        (root / "bench" / f"{name}.py").write_text(source)
    return root


def test_the_repository_has_no_import_cycle() -> None:
    out = check()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no import cycles" in out.stdout


def test_a_function_level_or_relative_import_cycle_fails_and_is_printed(tmp_path: Path) -> None:
    root = package(tmp_path, {
        "a": "from bench.b import helper\n",
        "b": "def helper():\n    from . import a\n    return a\n",  # lazy and relative: still a cycle
        "c": "import importlib\n\nimportlib.import_module('bench.d')\n",
        "d": "import bench.c\n",
        "e": "import bench.a\n",  # imports into a cycle, is on none
    })
    out = check(str(root), "bench")
    assert out.returncode == 1, out.stdout
    assert "import cycle: bench.a -> bench.b -> bench.a" in out.stdout
    assert "import cycle: bench.c -> bench.d -> bench.c" in out.stdout
    assert "bench.e" not in out.stdout


def test_only_the_designed_lazy_registry_import_may_close_a_loop(tmp_path: Path) -> None:
    designed = {"registry": "import importlib\n\ndef discover():\n    importlib.import_module('bench.builtins')\n",
                "builtins": "from bench.registry import discover\n"}
    assert check(str(package(tmp_path / "ok", designed)), "bench").returncode == 0
    other = {**designed, "builtins": "import bench.plugins\n", "plugins": "from bench.registry import discover\n"}
    assert check(str(package(tmp_path / "ok2", other)), "bench").returncode == 0  # through the allowed edge
    bad = {**designed, "registry": "import bench.plugins\n" + designed["registry"], "plugins": "import bench.registry\n"}
    out = check(str(package(tmp_path / "bad", bad)), "bench")
    assert out.returncode == 1 and "import cycle: bench.plugins -> bench.registry -> bench.plugins" in out.stdout

"""The README's "Writing a plugin" works as written: a defense is one module, found through its entry
point, then validated, planned and run on the toy suite with no other file touched."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import write_entry_point

from bench.executors.local import run_local
from bench.plan import build_plan
from bench.registry import defenses, discover_plugins
from bench.store import Store
from bench.validate import validate

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture()
def readme_defense(plugin_site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The README's defense written as a third-party module ``my_defense``, with its entry point.

    The registry is restored afterwards (it is copied after the session's toy plugin registered), so
    the throwaway plugin does not outlive the test.
    """
    section = readme_section("Writing a plugin")
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    entry = re.search(r'^(\S+) = "my_package\.(\w+)"$', section, re.M)
    assert entry is not None, "the README's entry-point example changed; update this test with it"
    name, module = entry.groups()
    site = tmp_path / "site"
    site.mkdir()
    (site / f"{module}.py").write_text(code)
    write_entry_point(site, "my_package", name, module)
    monkeypatch.setattr(defenses, "_entries", dict(defenses._entries))
    monkeypatch.syspath_prepend(str(site))
    yield name
    sys.modules.pop(module, None)


def test_the_readme_defense_is_found_validated_planned_and_run(readme_defense: str, toy_suite, tmp_path: Path) -> None:
    assert readme_defense not in defenses
    discover_plugins(force=True)  # as `bench` does at start-up, which finds the entry point
    cls = defenses.get(readme_defense)
    assert cls.name == readme_defense and cls.function_preserving and cls.applies_to == frozenset({"attention"})
    assert cls.describe()["summary"] == "One line that `bench list` prints."

    checks = validate(readme_defense)
    # every family that can build its module here passes; one whose package is missing (open_clip without its
    # extra) says it could not run the model ('unverified'), never 'ok' without a check
    assert {c.status for c in checks} <= {"ok", "unverified"}, [(c.family, c.detail) for c in checks]
    assert all(c.status == "ok" for c in checks if c.family != "open-clip-vit"), [(c.family, c.detail) for c in checks]

    plan = build_plan(toy_suite, defense=readme_defense, merge="ta", victims=["t10"])
    mine = [c for c in plan.cells if c.defense is not None and c.defense.name == readme_defense]
    assert {c.kind for c in mine} == {"utility", "merge"} and not any(c.na_reason for c in mine)
    with Store(tmp_path / "r.sqlite") as store:
        summary = run_local(toy_suite, store, plan.cells, run_id="readme", log=lambda m: None)
        rows = [r for r in store.cells() if r.defense == readme_defense]
    assert summary.failed == 0 and summary.ok == len(plan.cells)
    assert rows and all(r.status == "ok" for r in rows)

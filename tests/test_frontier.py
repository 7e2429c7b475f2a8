"""Strength frontiers (`bench frontier`): declared knobs, variant labels, shared references, export and site."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from bench.params import ParamError
from bench.plugins import AttackNeeds
from bench.protocol import PROTOCOLS, STANDARD, Protocol, Step
from bench.store import Store

MINI = Protocol(name="frontier-mini", version="0", break_threshold=1.01, seeds=(0,), partners="rest", params={},
                budget=AttackNeeds(anchor=True, labelled=256, unlabelled=1024, finetune_steps=1000, knows_defense=True),
                steps=(Step("none", "ties", "plain merge", "all"), Step("revert-to-base", "ta", "algebraic")))
"""Two cheap steps; a threshold no recovered reaches (it is clipped to 1), so every step runs for every setting
and the cell counts below are fixed."""
VARIANTS = ["toy-scale[factor=1.5]", "toy-scale", "toy-scale[factor=4]", "toy-scale[factor=8]"]
"""toy-scale's declared factors 1.5, 2 (the default), 4, 8, labelled by hand."""


def _builtin(cls: type) -> bool:
    return cls.__module__.startswith("defenses.")


# ---------------------------------------------------------------- declared knobs


def test_every_registered_defense_declares_a_frontier_of_valid_settings(plugin_site) -> None:
    from bench.registry import defenses

    checked = 0
    for name in defenses.names():
        cls = defenses.get(name)
        fields = [f.name for f in dataclasses.fields(cls.Params)]
        if _builtin(cls) and fields:
            assert cls.frontier, f"built-in defense {name} has parameters but declares no frontier"
        for knob, values in cls.frontier.items():
            assert knob in fields, (name, knob)
            assert 3 <= len(values) <= 6, (name, knob, values)
            assert all(isinstance(v, str) for v in values), (name, knob)
            settings = [cls.from_overrides({knob: v}).params for v in values]  # each parses (ParamError otherwise)
            assert cls.Params() in settings, f"{name}.{knob}: the default is not among {values}"
            assert len({repr(s) for s in settings}) == len(values), f"{name}.{knob}: two values are one setting"
            checked += 1
    assert checked >= 12  # every built-in with parameters, and the toy plugin's


def test_a_frontier_over_a_parameter_the_defense_lacks_fails_at_import() -> None:
    from bench.plugins import Defense

    @dataclasses.dataclass(frozen=True)
    class P:
        strength: float = 1.0

    with pytest.raises(TypeError, match="frontier over nope"):
        type("Bad", (Defense,), {"name": "bad", "Params": P, "frontier": {"nope": ("1", "2", "3")}})
    ok = type("Good", (Defense,), {"name": "good", "Params": P, "frontier": {"strength": [0.5, 1, 2]}})
    assert ok.frontier["strength"] == ("0.5", "1", "2")  # frozen to --param strings
    with pytest.raises(TypeError):
        ok.frontier["strength"] = ("9",)  # type: ignore[index]


# ---------------------------------------------------------------- variant labels


def test_the_variant_label_is_the_name_at_the_defaults_else_the_sorted_non_default_keys(plugin_site) -> None:
    from bench.plan import make_defense, parse_variant, split_names
    from bench.protocol import protocol_defenses

    assert make_defense("toy-scale").label == "toy-scale"
    assert make_defense("toy-scale", {"factor": "2.0"}).label == "toy-scale"  # the default spelled out
    assert make_defense("toy-scale", {"factor": "4.0"}).label == "toy-scale[factor=4]"
    assert make_defense("toy-scale", {"factor": "0.125"}).label == "toy-scale[factor=0.125]"
    # several keys: sorted, only the non-default ones (permute=true is PaRaMS's default)
    assert make_defense("params", {"low": "0.1", "high": "5", "permute": "true"}).label == "params[high=5,low=0.1]"
    assert make_defense("mergebarrier-att", {"k": "none", "rsvd": "yes"}).label == "mergebarrier-att[rsvd=true]"
    # a label reads back to the same defense
    for label in ("toy-scale[factor=4]", "params[high=5,low=0.1]", "mergebarrier-att[rsvd=true]"):
        d = make_defense(label)
        assert d.label == label
    assert make_defense("params[high=5,low=0.1]").params == dataclasses.replace(
        make_defense("params").params, high=5.0, low=0.1)
    assert parse_variant("params[high=5,low=0.1]") == ("params", {"high": "5", "low": "0.1"})
    assert split_names("none, params[low=0.1,high=5],toy-scale") == ["none", "params[low=0.1,high=5]", "toy-scale"]
    assert protocol_defenses("toy-scale[factor=4.0],toy-scale[factor=2],toy-scale") == ["toy-scale[factor=4]",
                                                                                       "toy-scale"]
    for bad, why in (("toy-scale[factr=3]", "unknown parameter"), ("toy-scale[factor=x]", "expects float"),
                     ("toy-scale[factor=3", "expected NAME or NAME"), ("toy-scale[]", "is not key=value"),
                     ("toy-scale[factor=1,factor=2]", "twice"), ("params[low=30]", "low <= high")):
        with pytest.raises(ParamError, match=why):
            protocol_defenses(bad)


def test_default_cells_keep_their_labels_and_ids(plugin_site) -> None:
    """The ids were computed before variant labels existed; a default cell's spec is also rebuilt here by hand."""
    from bench.plan import Cell, make_attacks, make_defense, make_merge
    from bench.weights import hash_json

    recipe, others = "0123456789abcdef", ("t20", "t30")
    default, tripled = make_defense("toy-scale"), make_defense("toy-scale", {"factor": "3"})
    utility = Cell("utility", "toy", recipe, "t10", others, 0, default)
    merge = Cell("merge", "toy", recipe, "t10", others, 0, default, make_attacks("none")[0], make_merge("ta"))
    assert utility.defense_label == merge.defense_label == "toy-scale"
    assert utility.cell_id == "d1dc737ad0145e515581b795"
    assert merge.cell_id == "8a2f9fdab0e8907374800c24"
    by_hand = {"kind": "utility", "suite": "toy", "recipe_hash": recipe, "victim": "t10", "partners": list(others),
               "seed": 0, "defense": {"name": "toy-scale", "version": "1", "params": {"factor": 2.0}},
               "attack": None, "merge": None}
    assert utility.cell_id == hash_json(by_hand)[:24]
    # a non-default setting keeps its id too (ids never depended on the label); only its label is new
    other = Cell("utility", "toy", recipe, "t10", others, 0, tripled)
    assert (other.cell_id, other.defense_label) == ("83df592f06b6c00ce0a42240", "toy-scale[factor=3]")


# ---------------------------------------------------------------- bench frontier


def test_the_dry_run_lists_the_settings_and_the_estimate_and_writes_nothing(plugin_site, tmp_path, capsys) -> None:
    from bench.cli import main

    store = tmp_path / "none.sqlite"
    assert main(["frontier", "--defense", "toy-scale", "--suite", "toy", "--dry-run", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "4 settings (factor: 1.5, 2*, 4, 8" in out
    assert all(f"  {label}\n" in out for label in VARIANTS)
    assert f"toy: protocol standard v{STANDARD.version}, 4 defenses, 3 victims" in out and "upper bound" in out
    assert not store.exists()
    assert main(["frontier", "--defense", "none", "--suite", "toy", "--dry-run", "--store", str(store)]) == 2
    assert "declares no frontier" in capsys.readouterr().err
    assert main(["frontier", "--defense", "toy-scale[factor=3]", "--suite", "toy", "--dry-run",
                 "--store", str(store)]) == 2
    assert "not a variant" in capsys.readouterr().err


def test_each_setting_stops_at_its_own_break(toy_suite, tmp_path) -> None:
    """The protocol's walk is kept per variant: a setting that TIES does not break runs the later step even where
    the default setting was broken by TIES."""
    from bench.executors.local import run_local
    from bench.frontier import run_frontier
    from bench.protocol import walk

    breaking = dataclasses.replace(MINI, break_threshold=0.9, steps=(Step("none", "ties", "plain merge", "all"),
                                                                     Step("none", "ta", "plain merge", "all")))
    with Store(tmp_path / "r.sqlite") as store:
        variants, result, _ = run_frontier(breaking, toy_suite, store, "toy-scale", lambda cells: run_local(
            toy_suite, store, cells, run_id="f", log=lambda m: None), log=lambda m: None)
        records = store.cells()
    assert [v.label for v in variants] == VARIANTS
    broken = {(d, v): w.broken_at for (d, v), w in result.victims.items()}
    assert set(broken) == {(d, v) for d in VARIANTS for v in toy_suite.tasks}
    # the precondition that makes this test bite: some setting's break differs from the default's on a victim
    assert any(broken[(d, v)] != broken[("toy-scale", v)] for d, v in broken)
    for (label, victim), at in broken.items():
        ran = {(r.attack, r.merge) for r in records if r.kind == "merge" and r.filling == "protected"
               and r.defense == label and r.victim == victim}
        needed = breaking.steps if at is None else breaking.steps[:at + 1]
        assert ran == {(s.attack, s.merge) for s in needed}, (label, victim, at)
    replay = walk(breaking, toy_suite, records, VARIANTS)
    assert {k: w.broken_at for k, w in replay.victims.items()} == broken


@pytest.fixture(scope="module")
def frontier_run(plugin_site, toy_cache, tmp_path_factory) -> dict:
    """A store where the protocol first ran toy-scale at its defaults, then `bench frontier` ran its settings;
    every cell the frontier computed is counted."""
    from bench.cli import main
    from bench.runner import Runner

    root = tmp_path_factory.mktemp("frontier")
    store = root / "r.sqlite"
    computed: list[tuple[str, str, str, str]] = []
    real = Runner.run_cell

    def counting(self, cell):  # noqa: ANN001, ANN202
        computed.append((cell.cell_id, cell.kind, cell.filling if cell.kind == "merge" else "-", cell.defense_label))
        return real(self, cell)

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PROTOCOLS, MINI.name, MINI)
        common = ["--suite", "toy", "--store", str(store), "--cache-dir", str(toy_cache)]
        assert main(["run", "--protocol", MINI.name, "--defense", "toy-scale", *common]) == 0
        mp.setattr(Runner, "run_cell", counting)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            assert main(["frontier", "--defense", "toy-scale", "--protocol", MINI.name, *common]) == 0
        again = len(computed)
        assert main(["frontier", "--defense", "toy-scale", "--protocol", MINI.name, *common]) == 0
    with Store(store) as s:
        records = s.cells()
    return {"store": store, "root": root, "records": records, "computed": computed[:again],
            "rerun": computed[again:], "printed": printed.getvalue()}


def test_the_variants_share_the_reference_cells_and_each_gets_its_own_entry(frontier_run, tmp_path) -> None:
    from leaderboard import export as lb_export

    computed, records = frontier_run["computed"], frontier_run["records"]
    # the frontier computed only the three new settings' own cells: per victim a utility cell and one protected
    # merge per step; no reference, no baseline, no cell of the default setting (all stored by the first run)
    assert Counter((kind, filling) for _, kind, filling, _ in computed) == {("utility", "-"): 3 * 3,
                                                                          ("merge", "protected"): 3 * 3 * 2}
    assert {label for *_, label in computed} == set(VARIANTS) - {"toy-scale"}
    assert len({i for i, *_ in computed}) == len(computed)  # no cell computed twice
    assert frontier_run["rerun"] == []  # a second frontier run finds everything stored
    # the store holds one reference set for all four settings: per victim and step a U and a ∅ cell
    refs = [r for r in records if r.kind == "merge" and r.filling != "protected"]
    assert Counter(r.filling for r in refs) == {"unprotected": 3 * 2, "counterfactual": 3 * 2}
    assert len([r for r in records if r.kind == "baseline"]) == 3
    assert {r.defense for r in records if r.kind == "utility"} == set(VARIANTS)
    # ... and the export writes one entry per setting, each in its own file
    lb_export.export(frontier_run["store"], tmp_path / "data", protocol=MINI, n_bootstrap=100)
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    entries = {e["defense"]: e["file"] for e in manifest["entries"] if e["suite"] == "toy"}
    assert set(VARIANTS) <= set(entries) and len({entries[v] for v in VARIANTS}) == 4
    for label in VARIANTS:
        doc = json.loads((tmp_path / "data" / entries[label]).read_text())
        assert doc["defense"] == label
        assert {c["defense"] for c in doc["cells"] if c["filling"] == "protected" and c["kind"] != "baseline"} == {label}


@pytest.fixture(scope="module")
def exported(frontier_run) -> Path:
    from leaderboard import export as lb_export

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PROTOCOLS, MINI.name, MINI)
        lb_export.export(frontier_run["store"], frontier_run["root"] / "data", protocol=MINI, n_bootstrap=100)
    return frontier_run["root"] / "data"


def test_the_manifest_frontier_holds_every_setting_as_its_entry_summarises_it(frontier_run, exported) -> None:
    manifest = json.loads((exported / "manifest.json").read_text())
    [frontier] = manifest["frontiers"]
    assert (frontier["suite"], frontier["defense"]) == ("toy", "toy-scale")
    points = frontier["points"]
    # in declared order (weak to strong), the default among them, one knob
    assert [p["label"] for p in points] == VARIANTS
    assert [p["default"] for p in points] == [False, True, False, False]
    assert {p["knob"] for p in points} == {"factor"}
    stored = {r.defense: r.spec["defense"]["params"]["factor"] for r in frontier_run["records"] if r.kind == "utility"}
    assert [p["value"] for p in points] == [stored[v] for v in VARIANTS] == [1.5, 2.0, 4.0, 8.0]
    summaries = {e["defense"]: e["summary"] for e in manifest["entries"] if e["suite"] == "toy"}
    for p in points:
        entry = json.loads((exported / p["file"]).read_text())
        assert entry["defense"] == p["label"]
        for key in ("utility", "utility_ci", "security", "security_ci"):
            assert p[key] == summaries[p["label"]][key] == entry["summary"][key], (p["label"], key)
    assert all(p["utility"] is not None and p["security"] is not None for p in points)
    # the leaderboard ranks a defense at its default setting; the other settings are shown, unranked, so a frontier
    # run on one suite never changes a rank (nor makes the overall ranking cover different suites)
    assert all(summaries[v]["rank"] is None and "strength setting" in summaries[v]["unranked_reason"]
               for v in VARIANTS if v != "toy-scale")
    assert "strength setting" not in summaries["toy-scale"]["unranked_reason"]
    # `bench frontier` printed each setting's utility and security (and their intervals) as the entries have them
    rows = {cols[2]: cols for line in frontier_run["printed"].splitlines()
            if len(cols := [c.strip() for c in line.strip().strip("|").split("|")]) == 8}
    for v in VARIANTS:
        assert rows[v][3] == f"{summaries[v]['utility']:.3f}" and rows[v][5] == f"{summaries[v]['security']:.3f}", v
        assert rows[v][4].startswith("[") and rows[v][6].startswith("[")
    assert rows["toy-scale"][1] == "2 (default)"


def test_the_frontiers_page_draws_a_line_per_defense_and_marks_the_default(exported, tmp_path) -> None:
    from leaderboard.site import build_site, frontiers_view

    index = build_site(exported, tmp_path / "site")
    assert 'href="frontiers.html"' in index.read_text()
    html = (tmp_path / "site" / "frontiers.html").read_text()
    lines = re.findall(r'<polyline class="frontier-line" data-defense="([^"]+)" data-knob="([^"]+)" points="([^"]+)"',
                       html)
    assert [(d, k) for d, k, _ in lines] == [("toy-scale", "factor")]
    assert len(lines[0][2].split()) == 4  # through all four settings
    start = html.index('<svg class="scatter frontier"')
    svg = html[start:html.index("</svg>", start)]
    assert svg.count('<circle class="point') == 4 and svg.count('<circle class="point default"') == 1
    assert "toy-scale (default setting)" in svg
    assert svg.count('class="whisker utility-ci"') == 4  # every setting has a utility interval
    # two defenses (one of them with two knobs) give a line per defense and knob, in each defense's color
    manifest = json.loads((exported / "manifest.json").read_text())
    [own] = manifest["frontiers"]
    other = {"suite": "toy", "defense": "other", "points": [
        {**own["points"][0], "label": "other[a=1]", "knob": "a", "default": False},
        {**own["points"][1], "label": "other", "knob": "a", "default": True},
        {**own["points"][1], "label": "other", "knob": "b", "default": True},
        {**own["points"][3], "label": "other[b=3]", "knob": "b", "default": False}]}
    [view] = frontiers_view({**manifest, "frontiers": [own, other]})
    drawn = [(line["defense"], line["knob"], len(line["points"].split())) for line in view["figure"]["lines"]]
    assert drawn == [("toy-scale", "factor", 4), ("other", "a", 2), ("other", "b", 2)]
    assert len({line["color"] for line in view["figure"]["lines"] if line["defense"] == "other"}) == 1
    assert len(view["figure"]["points"]) == 4 + 3  # the shared default is drawn once


def test_without_frontier_data_the_page_says_how_to_make_one(exported, tmp_path) -> None:
    from leaderboard.site import build_site

    data = tmp_path / "data"
    data.mkdir()
    manifest = json.loads((exported / "manifest.json").read_text())
    for f in [*manifest["files"], {"path": "manifest.json"}]:
        (data / f["path"]).parent.mkdir(parents=True, exist_ok=True)
        (data / f["path"]).write_text((exported / f["path"]).read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "frontiers": []}))
    build_site(data, tmp_path / "site")
    html = (tmp_path / "site" / "frontiers.html").read_text()
    assert "No frontier in this export" in html and "bench frontier --defense NAME --suite SUITE" in html
    assert "frontier-line" not in html


def test_a_users_frontier_is_shown_beside_the_shipped_entries(exported, tmp_path) -> None:
    from leaderboard import export as lb_export

    out = lb_export.merge_exports(lb_export.SHIPPED, exported, tmp_path / "combined")
    manifest, _ = lb_export.load_export(out)  # validated
    [mine] = [f for f in manifest["frontiers"] if f["suite"] == "toy"]
    assert mine["defense"] == "toy-scale" + lb_export.YOUR_RUN
    assert [p["label"] for p in mine["points"]] == [v + lb_export.YOUR_RUN for v in VARIANTS]
    listed = {e["defense"]: e for e in manifest["entries"] if e["suite"] == "toy"}
    for p in mine["points"]:
        assert p["file"] == listed[p["label"]]["file"] and (out / p["file"]).is_file()
        assert p["security"] == listed[p["label"]]["summary"]["security"]

"""Cells of different experts never pair: scoring refuses to read a protected cell against references built
from other weights, combining such sources is refused, and a user's run is shown beside the shipped entries."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from scored_cells import baseline, pipeline, record, unique, utility_cell

from bench.scoring import score
from bench.store import Store
from leaderboard.export import YOUR_RUN, ExportError, combine, export, load_export, merge_exports


def _with_experts(cells, expert: str, partners: tuple[str, ...] = ("p1",), pretrained: str = "pre"):
    """The same cells, recorded as built from the given experts (what the runner writes in provenance)."""
    out = []
    for c in cells:
        prov = {**c.provenance, "hashes": {"expert": expert, "partners": list(partners), "pretrained": pretrained}}
        out.append(record(c.spec, list(c.metrics), provenance=prov, created=c.created))
    return out


def _set(expert: str, p: float = 0.7):
    return _with_experts([baseline(), utility_cell("g", 0.88), *pipeline("g", "none", "ta", p=p, u=0.8, z=0.6)], expert)


def test_a_protected_cell_never_pairs_with_references_of_other_experts():
    a, b = _set("expert-A"), _set("expert-B")
    # A's protected and utility cells, B's references and baseline: nothing may pair across them
    mixed = [c for c in a if c.kind in ("merge",) and c.filling == "protected"] + \
            [c for c in b if not (c.kind == "merge" and c.filling == "protected")]
    mixed += [c for c in a if c.kind == "utility"]
    s = score(unique(mixed), attacks=["none"], n_bootstrap=50)
    (v,) = s.victim_scores("toy", "g")
    (pair,) = v.pairs
    assert pair.recovered is None and v.security is None and v.utility is None
    entry = s.entry("toy", "g")
    assert entry.has_flag("mixed_experts") and entry.rank is None and "mixed_experts" in entry.unranked_reason
    # the same cells, all of one expert set, score normally
    (v,) = score(a, attacks=["none"], n_bootstrap=50).victim_scores("toy", "g")
    assert v.pairs[0].recovered == pytest.approx(0.5) and not v.flags


def test_partner_experts_are_part_of_the_identity():
    a = _set("expert-A")
    other_partner = _with_experts([c for c in a if c.kind == "merge" and c.filling != "protected"], "expert-A", ("p2",))
    cells = [c for c in a if not (c.kind == "merge" and c.filling != "protected")] + other_partner
    (v,) = score(cells, attacks=["none"], n_bootstrap=50).victim_scores("toy", "g")
    assert v.pairs[0].recovered is None and any(f.code == "mixed_experts" for f in v.flags)


def _store(path: Path, cells) -> Path:
    with Store(path) as store:
        for c in cells:
            store.put_cell(c)
    return path


def test_combining_sources_of_different_experts_is_refused(tmp_path: Path):
    one = _store(tmp_path / "a.sqlite", _set("expert-A"))
    two = _store(tmp_path / "b.sqlite", _set("expert-B", p=0.75))
    with pytest.raises(ExportError, match="different experts"):
        combine(one, two)
    assert len(combine(one, one).records) == len(_set("expert-A"))


def test_your_run_is_shown_beside_the_shipped_entries_which_stay_as_published(tmp_path: Path):
    shipped, local = tmp_path / "shipped", tmp_path / "local"
    export(_store(tmp_path / "a.sqlite", _set("expert-A")), shipped, attacks=["none"], n_bootstrap=50)
    export(_store(tmp_path / "b.sqlite", _set("expert-B", p=0.75)), local, attacks=["none"], n_bootstrap=50)
    out = merge_exports(shipped, local, tmp_path / "combined")
    manifest, entries = load_export(out)  # valid under the schema, file hashes included
    names = {(e["suite"], e["defense"]) for e in manifest["entries"]}
    assert {("toy", "g"), ("toy", "none"), ("toy", "g" + YOUR_RUN), ("toy", "none" + YOUR_RUN)} == names
    published = json.loads((shipped / "entries" / "toy" / "g.json").read_text())
    assert json.loads((out / "entries" / "toy" / "g.json").read_text()) == published  # never re-scored
    mine = next(e for e in entries if e["defense"] == "g" + YOUR_RUN)
    assert mine["summary"]["rank"] is None and "your run" in mine["summary"]["unranked_reason"]
    # each side keeps its own numbers: 0.5 recovered on the shipped experts, 0.75 on the local ones
    assert published["recovered"][0]["recovered"] == pytest.approx(0.5)
    assert mine["recovered"][0]["recovered"] == pytest.approx(0.75)


def test_your_run_rows_are_the_entries_your_runs_computed_not_the_references_you_imported(tmp_path: Path):
    """A store that imported the shipped references and re-ran one defense: the defense is shown as 'your run'
    even where it reproduces the shipped numbers exactly; the reference row, every cell of which came from a
    shipped run, is shown once, as shipped."""
    shipped, local = tmp_path / "shipped", tmp_path / "local"
    cells = [replace(c, run_id="shipped-run") for c in _set("expert-A")]
    with Store(tmp_path / "a.sqlite") as store:
        store.import_run("shipped-run", {"git": "abc"})
        for c in cells:
            store.put_cell(c)
    export(tmp_path / "a.sqlite", shipped, attacks=["none"], n_bootstrap=50)
    references = [c for c in cells if c.kind == "baseline" or c.filling != "protected"]
    ours = [replace(c, run_id="local-run") for c in cells if c not in references]
    assert references and ours
    with Store(tmp_path / "b.sqlite") as store:
        store.import_run("shipped-run", {"git": "abc"})
        store.import_run("local-run", {"git": "def"})
        for c in references + ours:
            store.put_cell(c)
    export(tmp_path / "b.sqlite", local, attacks=["none"], n_bootstrap=50)
    manifest, entries = load_export(merge_exports(shipped, local, tmp_path / "combined"))
    assert {e["defense"] for e in manifest["entries"]} == {"g", "none", "g" + YOUR_RUN}
    mine = next(e for e in entries if e["defense"] == "g" + YOUR_RUN)
    theirs = next(e for e in entries if e["defense"] == "g")
    assert mine["recovered"][0]["recovered"] == theirs["recovered"][0]["recovered"]  # reproduced exactly

"""The leaderboard that ships with the repository (`leaderboard/data`): valid, reproducible from its own cells,
covering every registered defense on every shipped suite, and rendered by a browser without errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from browser import chromium, needs_chromium  # (tests/ is on sys.path)

from leaderboard import export as lb_export

SHIPPED = lb_export.SHIPPED
EMBEDDED = ("vision-effnet", "text-mix")
"""Suites the shipped results cover with every registered defense."""
FRONTIER_SUITES = ("vision-effnet",)
"""Suites the shipped results cover with every declared strength setting of every defense that acts there
(`bench frontier`); text-mix's frontiers are planned with their measured unit cost, not shipped."""

@pytest.fixture(scope="module")
def shipped() -> tuple[dict, list[dict]]:
    return lb_export.load_export(SHIPPED)  # validates both kinds against their schemas


def test_manifest_hashes_match_the_shipped_files(shipped) -> None:
    manifest, _ = shipped
    for f in manifest["files"]:
        data = (SHIPPED / f["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f["sha256"], f["path"]
        assert len(data) == f["bytes"]


def test_shipped_results_come_from_the_standard_protocol(shipped) -> None:
    from bench.protocol import STANDARD

    manifest, entries = shipped
    stamp = manifest["config"]["protocol"]
    assert (stamp["name"], stamp["version"]) == (STANDARD.name, STANDARD.version)
    assert [(s["attack"], s["merge"]) for s in stamp["steps"]] == [(s.attack, s.merge) for s in STANDARD.steps]
    for e in entries:
        assert set(e["summary"]["broken_by"]) == set(e["summary"]["victims"]), e["suite"] + "/" + e["defense"]


def test_every_registered_defense_is_on_every_shipped_suite(shipped) -> None:
    from bench.registry import defenses

    manifest, _ = shipped
    listed = {(e["suite"], e["defense"]) for e in manifest["entries"]}
    listed |= {(n["suite"], n["defense"]) for n in manifest["not_applicable"]}
    builtin = [d for d in defenses.names() if defenses.get(d).__module__.startswith("defenses.")]
    # a suite may ship its reference row alone (its signal) before the protocol has run against any defense
    ran = {e["suite"] for e in manifest["entries"] if e["defense"] != "none"}
    assert set(EMBEDDED) <= ran
    for suite in sorted(ran):
        absent = [d for d in builtin if (suite, d) not in listed]
        assert not absent, f"{suite}: {absent}"


def test_rescoring_the_shipped_cells_reproduces_every_published_number(shipped, tmp_path: Path) -> None:
    """What is published is what the code computes from the cells it publishes."""
    from bench.protocol import STANDARD

    manifest, _ = shipped
    lb_export.export(lb_export.combine(SHIPPED), tmp_path / "again", protocol=STANDARD)
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    published = {(e["suite"], e["defense"]): e["summary"] for e in manifest["entries"]}
    recomputed = {(e["suite"], e["defense"]): e["summary"] for e in again["entries"]}
    assert recomputed == published
    assert again["signal"] == manifest["signal"]


def test_build_from_the_shipped_data_needs_no_store(tmp_path: Path, monkeypatch) -> None:
    from bench.cli import main

    monkeypatch.chdir(tmp_path)  # no store in the working directory
    assert main(["leaderboard", "build", "--out", str(tmp_path / "site")]) == 0
    index = (tmp_path / "site" / "index.html").read_text()
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    for e in manifest["entries"]:
        assert f'data-suite="{e["suite"]}" data-defense="{e["defense"]}"' in index
    assert f'version {manifest["config"]["protocol"]["version"]}' in index


def test_every_defense_ships_its_frontier_on_the_frontier_suites(shipped) -> None:
    """Every declared setting of every defense acting on the suite, each a complete entry."""
    from bench.frontier import frontier_variants, variant_labels
    from bench.registry import defenses

    manifest, _ = shipped
    entries = {(e["suite"], e["defense"]): e["summary"] for e in manifest["entries"]}
    shipped_frontiers = {(f["suite"], f["defense"]): f["points"] for f in manifest["frontiers"]}
    for suite in FRONTIER_SUITES:
        acting = [d for d in defenses.names() if defenses.get(d).frontier and (suite, d) in entries]
        assert acting, suite
        for d in acting:
            points = shipped_frontiers.get((suite, d))
            assert points is not None, f"{suite}: no frontier of {d}"
            assert {p["label"] for p in points} == set(variant_labels(frontier_variants(d))), (suite, d)
            for p in points:
                summary = entries[(suite, p["label"])]
                assert summary["complete"], (suite, p["label"])
                assert p["utility"] is not None and p["security"] is not None, (suite, p["label"])


@needs_chromium
def test_the_shipped_site_renders_in_a_browser_without_errors(tmp_path: Path) -> None:
    from leaderboard.site import build_site

    index = build_site(SHIPPED, tmp_path / "site")
    dom, console = chromium(tmp_path, index.as_uri(), "--dump-dom")
    assert console == []
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    rows = dom.count("<tr data-suite=")
    assert rows == len(manifest["entries"]) + len(manifest["overall"])
    assert 'class="signal"' in dom and "broken-by" in dom
    # the frontiers page: a line per (defense, knob) of every shipped frontier
    dom, console = chromium(tmp_path, (tmp_path / "site" / "frontiers.html").as_uri(), "--dump-dom")
    assert console == []
    lines = {(f["defense"], p["knob"]) for f in manifest["frontiers"] for p in f["points"]}
    assert dom.count('<polyline class="frontier-line"') == len(lines) > 0
    # the claims page: a row per claim, each with its verdict
    dom, console = chromium(tmp_path, (tmp_path / "site" / "claims.html").as_uri(), "--dump-dom")
    assert console == []
    claims = json.loads((SHIPPED / "claims.json").read_text())["claims"]
    for c in claims:
        assert f'id="claim-{c["id"]}" data-verdict="{c["verdict"]}"' in dom, c["id"]


def test_no_data_free_attack_is_credited_beyond_the_unattacked_pipeline(shipped) -> None:
    """Scoring version 3: an attack whose honest counterpart is `none` is read against the plain merge's own
    V_U and V_∅, so its recovered never exceeds what those give (issue: destructive attacks credited as breaks)."""
    _manifest, entries = shipped
    checked = 0
    for e in entries:
        for v in e["victims"]:
            plain = {p["merge"]: p for p in v["recovered"] if p["attack"] == "none"}
            for p in v["recovered"]:
                if p["counterpart"] != "none" or p["attack"] == "none" or p["merge"] not in plain:
                    continue
                ref = plain[p["merge"]]
                assert (p["v_unprotected"], p["v_counterfactual"]) == (ref["v_unprotected"], ref["v_counterfactual"])
                if p["recovered"] is not None:
                    gain = p["v_unprotected"] - p["v_counterfactual"]
                    expected = min(1.0, max(0.0, (p["v_protected"] - p["v_counterfactual"]) / gain))
                    assert p["recovered"] == pytest.approx(expected, abs=2e-5)  # the inputs are rounded to 6 digits
                checked += 1
    assert checked > 50  # vision-effnet alone: 78 such pairs


def test_one_break_threshold_and_ties_share_a_rank(shipped) -> None:
    from bench.protocol import STANDARD

    manifest, entries = shipped
    threshold = manifest["config"]["break_threshold"]
    from bench.scoring import SCORING_VERSION

    assert threshold == STANDARD.break_threshold and manifest["config"]["scoring_version"] == SCORING_VERSION
    for e in entries:
        for v in e["victims"]:
            held = v["best_recovered"]
            assert v["broken"] == (held is not None and held >= threshold)
        assert e["summary"]["broken_on"] == sorted(v["victim"] for v in e["victims"] if v["broken"])
        if e["defense"] == "none":
            assert e["summary"]["security"] is None and e["summary"]["rank"] is None
    for suite in EMBEDDED:
        ranked = [x["summary"] for x in manifest["entries"] if x["suite"] == suite and x["summary"]["rank"]]
        for a in ranked:
            for b in ranked:
                if a["security"] == b["security"]:
                    assert a["rank_band"] == b["rank_band"]


def test_every_text_mix_victim_gives_a_clear_gain_under_task_arithmetic(shipped) -> None:
    """The text suite's floor (issue: a text suite whose victims matter): under plain TA every victim's gain
    V_U − V_∅ is at least 0.15 with its interval's lower bound at least 0.10, read from the shipped signal table."""
    manifest, _ = shipped
    rows = [r for r in manifest["signal"]["text-mix"] if r["merge"] == "ta"]
    assert {r["victim"] for r in rows} == {"bbc-topic", "trec-question", "sms-spam", "autos-electronics",
                                           "tweet-sentiment"}
    for r in rows:
        assert r["gain"] == pytest.approx(r["v_unprotected"] - r["v_counterfactual"], abs=2e-6)  # 6-digit rounding
        assert r["gain"] >= 0.15 and r["gain_ci"][0] >= 0.10, r["victim"]

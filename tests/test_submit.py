"""`bench leaderboard submit` and `verify` (`leaderboard.submission`): a third-party defense's results as one
bundle, and a maintainer's check that re-computes a sample of its cells. Every expectation is read from the
bundle itself (its files, its cells' outcomes), never from re-running the code under test."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bench.cli import main
from bench.executors.local import run_local
from bench.outcomes import decode, encode
from bench.plugins import AttackNeeds
from bench.protocol import PROTOCOLS, Protocol, Step, run_protocol
from bench.store import Store

DEFENSE = "toy-scale"
BUDGET = AttackNeeds(anchor=True, labelled=256, unlabelled=1024, finetune_steps=1000, knows_defense=True)
MINI = Protocol(name="mini-submit", version="0", break_threshold=1.01, seeds=(0,), partners="rest", params={},
                budget=BUDGET, steps=(Step("none", "ties", "plain merge", "all"),
                                      Step("revert-to-base", "ta", "algebraic")))
"""Two cheap steps that never break (threshold above 1), so every planned cell runs."""


def read_zip(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def rewrite(src: Path, dst: Path, changes: dict[str, bytes], fix_hashes: bool = True) -> Path:
    """A copy of bundle ``src`` with some files replaced; with ``fix_hashes``, bundle.json lists their new sha256
    (so only a deeper check can catch the change)."""
    files = {**read_zip(src), **changes}
    if fix_hashes:
        meta = json.loads(files["bundle.json"])
        for name in changes:
            meta["files"][name] = hashlib.sha256(files[name]).hexdigest()
        files["bundle.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return dst


@pytest.fixture(scope="module")
def submitted(plugin_site, toy_cache, tmp_path_factory):
    """A protocol run of the toy defense on one victim of the toy suite, and its bundle written by the CLI."""
    from toyplugin import ToySuite

    suite = ToySuite(cache_dir=toy_cache)
    root = tmp_path_factory.mktemp("submit")
    store_path = root / "r.sqlite"
    with Store(store_path) as store:
        run_protocol(MINI, suite, store, [DEFENSE],
                     lambda cells: run_local(suite, store, cells, run_id="author", log=lambda m: None),
                     victims=[suite.tasks[0]], log=lambda m: None)
        stored = {c.cell_id: c for c in store.cells()}
    PROTOCOLS[MINI.name] = MINI
    try:
        out = root / "bundle.zip"
        assert main(["leaderboard", "submit", "--defense", DEFENSE, "--store", str(store_path), "--suite", "toy",
                     "--protocol", MINI.name, "--out", str(out)]) == 0
    finally:
        del PROTOCOLS[MINI.name]
    return out, stored, root


def entry_of(files: dict[str, bytes]) -> tuple[str, dict]:
    (name,) = [n for n in files if n.startswith("entries/")]
    return name, json.loads(files[name])


def test_the_bundle_holds_the_entry_with_every_cell_the_plugin_and_the_environment(submitted) -> None:
    out, stored, _ = submitted
    files = read_zip(out)
    assert set(files) == {"bundle.json", "plugin.json", "environment.json", f"entries/toy/{DEFENSE}.json"}
    meta = json.loads(files["bundle.json"])
    assert meta["defense"] == DEFENSE and meta["suites"] == ["toy"] and meta["format_version"] == 1
    assert meta["files"] == {n: hashlib.sha256(d).hexdigest() for n, d in files.items() if n != "bundle.json"}
    _, entry = entry_of(files)
    assert entry["defense"] == DEFENSE and entry["config"]["protocol"]["name"] == MINI.name
    cells = {c["cell_id"]: c for c in entry["cells"]}
    # every cell it rests on: its own, the shared U and ∅ references and the baseline, with per-example outcomes
    assert set(cells) == set(stored)
    assert {(c["kind"], c["filling"]) for c in cells.values()} == {
        ("baseline", "protected"), ("utility", "protected"), ("merge", "protected"), ("merge", "unprotected"),
        ("merge", "counterfactual")}
    for cid, c in cells.items():
        assert {(m["role"], m["task"], m["metric"]): m["examples"] for m in c["metrics"]} == \
            {(m.role, m.task, m.metric): m.examples for m in stored[cid].metrics}
        assert all(m["examples"] for m in c["metrics"])
    plugin = json.loads(files["plugin.json"])
    source = Path(__file__).parent / "plugin_fixture" / "toyplugin.py"
    assert plugin["name"] == DEFENSE and plugin["version"] == "1" and plugin["module"] == "toyplugin"
    assert plugin["default_params"] == {"factor": 2.0} and plugin["params_used"] == [{"factor": 2.0}]
    assert plugin["sources"] == [{"module": "toyplugin", "file": "toyplugin.py",
                                  "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}]
    env = json.loads(files["environment.json"])
    assert {"packages", "git", "cpu"} <= set(env)


def test_verify_recomputes_a_sample_and_every_cell_matches(submitted, toy_cache, capsys) -> None:
    out, stored, _ = submitted
    own = [c for c in stored.values() if c.defense == DEFENSE and c.status == "ok"]
    assert main(["leaderboard", "verify", str(out), "--sample", "2", "--seed", "3", "--cache-dir", str(toy_cache)]) == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if ln.startswith(("match", "MISMATCH"))]
    assert len(lines) == 2 and all(ln.startswith("match ") for ln in lines)
    # the two drawn cells are the defense's own (its protected merges and utility cells come first)
    assert {ln.split()[1] for ln in lines} <= {c.cell_id for c in own}
    assert "drew 2 cells (seed 3)" in text and "0 reference merge, 0 baseline" in text
    assert "all 2 sampled cells match" in text


def test_a_flipped_outcome_is_a_mismatch_that_names_the_cell(submitted, toy_cache, capsys) -> None:
    out, stored, root = submitted
    files = read_zip(out)
    name, entry = entry_of(files)
    target = next(c for c in entry["cells"] if c["kind"] == "merge" and c["filling"] == "protected")
    metric = next(m for m in target["metrics"] if m["role"] == "merged" and m["task"] == target["victim"])
    values = decode(metric["examples"])
    values[0] = 1.0 - values[0]
    metric["examples"] = encode(values)
    metric["value"] = float(np.mean(values))
    bad = rewrite(out, root / "flipped.zip", {name: json.dumps(entry).encode()})
    n_cells = len(entry["cells"])  # a sample of every cell draws the altered one, whatever the seed
    assert main(["leaderboard", "verify", str(bad), "--sample", str(n_cells), "--cache-dir", str(toy_cache)]) == 1
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if ln.startswith(("match", "MISMATCH"))]
    assert len(lines) == n_cells
    assert [ln.split()[1] for ln in lines if ln.startswith("MISMATCH")] == [target["cell_id"]]
    assert f"1 of {values.size} examples differ (merged/{target['victim']}/{metric['metric']})" in text
    assert f"1 of {n_cells} sampled cells differ: {target['cell_id']}" in text


def test_a_file_whose_hash_does_not_match_is_rejected(submitted, toy_cache, capsys) -> None:
    out, _, root = submitted
    files = read_zip(out)
    name, entry = entry_of(files)
    entry["summary"]["security"] = 1.0
    bad = rewrite(out, root / "tampered.zip", {name: json.dumps(entry).encode()}, fix_hashes=False)
    assert main(["leaderboard", "verify", str(bad), "--sample", "1", "--cache-dir", str(toy_cache)]) == 2
    err = capsys.readouterr().err
    assert f"file hash mismatch for {name}" in err


def test_a_plugin_whose_source_or_version_differs_is_rejected(submitted, toy_cache, capsys) -> None:
    out, _, root = submitted
    plugin = json.loads(read_zip(out)["plugin.json"])
    other = {**plugin, "sources": [{**plugin["sources"][0], "sha256": "0" * 64}]}
    bad = rewrite(out, root / "other-source.zip", {"plugin.json": json.dumps(other).encode()})
    assert main(["leaderboard", "verify", str(bad), "--sample", "1", "--cache-dir", str(toy_cache)]) == 2
    err = capsys.readouterr().err
    assert "source hash mismatch for toyplugin (toyplugin.py)" in err
    newer = rewrite(out, root / "other-version.zip", {"plugin.json": json.dumps({**plugin, "version": "2"}).encode()})
    assert main(["leaderboard", "verify", str(newer), "--sample", "1", "--cache-dir", str(toy_cache)]) == 2
    assert "made with version '2'" in capsys.readouterr().err


def test_other_experts_stop_verification_instead_of_a_mismatch(submitted, toy_cache, capsys) -> None:
    out, _, root = submitted
    files = read_zip(out)
    name, entry = entry_of(files)
    for c in entry["cells"]:
        c["provenance"]["hashes"]["expert"] = "f" * 64  # as if built from other expert weights
    bad = rewrite(out, root / "experts.zip", {name: json.dumps(entry).encode()})
    assert main(["leaderboard", "verify", str(bad), "--sample", "1", "--cache-dir", str(toy_cache)]) == 2
    captured = capsys.readouterr()
    assert "the expert of t10 on suite toy differs from the bundle's" in captured.err
    assert "MISMATCH" not in captured.out and "match" not in captured.out.replace("drew", "")


def test_submit_refusals(submitted, tmp_path, capsys) -> None:
    _, _, root = submitted
    store = str(root / "r.sqlite")
    assert main(["leaderboard", "submit", "--defense", DEFENSE, "--store", str(tmp_path / "nope.sqlite"),
                 "--out", str(tmp_path / "b.zip")]) == 2
    assert "no results store" in capsys.readouterr().err
    assert main(["leaderboard", "submit", "--defense", "toy-scal", "--store", store, "--out", str(tmp_path / "b.zip")]) == 2
    assert "Unknown defense 'toy-scal'" in capsys.readouterr().err
    assert main(["leaderboard", "submit", "--defense", "mergelock", "--store", store,
                 "--out", str(tmp_path / "b.zip")]) == 2
    assert "holds no cells of defense 'mergelock'" in capsys.readouterr().err
    assert main(["leaderboard", "verify", "--sample", "1"]) == 2
    assert not (tmp_path / "b.zip").exists()

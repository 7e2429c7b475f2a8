"""Published data (schema, byte-identical re-export, provenance) and the static site (escaping, browser)."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import struct
import threading
import urllib.request
import zlib
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from browser import chromium, needs_chromium  # noqa: E402  (tests/ is on sys.path)
from scored_cells import metric, record

from bench.plan import counterpart_spec
from bench.registry import attacks, defenses, merges
from bench.store import CellRecord, Metric, Store
from leaderboard.export import ExportError, entry_path, export, load_export, slug, validate
from leaderboard.site import build_site, make_server, methods_view, paper_url, pareto_front

EVIL = "<script>alert(1)</script>"
STANDARD = ["none", "align"]
T0 = 1_763_800_000.0
# merged victim metric per defense (counterfactual floor 0.6, unprotected merge 0.8) and utility of its
# artifact: security = 1 - (merged_with_align - 0.6) / 0.2, clipped
DEFENSES = {"params": (0.56, 0.88), "mergelock": (0.65, 0.9), EVIL: (0.77, 0.89), "wrecker": (0.5, 0.4)}
EXPECTED_ORDER = ["params", "mergelock", EVIL, "wrecker", "none"]  # by security; wrecker is under the floor; none is the reference, last
PROVENANCE = {"timings": {"protect": 4.0, "prepare": 2.0, "finish": 0.5, "merge": 1.0}, "peak_rss_mb": 512.0,
              "flags": {"function_preservation": {"claimed": True, "max_abs_diff": 0.0, "ok": True}}}


def _spec(kind: str, suite: str, seed: int, partners: tuple[str, ...], **plugins) -> dict:
    spec = {"kind": kind, "suite": suite, "recipe_hash": "r1", "victim": "v", "partners": list(partners), "seed": seed,
            "defense": None, "attack": None, "merge": None}
    for key, value in plugins.items():
        spec[key] = value
    return spec


def _plugin(name: str, **params) -> dict:
    return {"name": name, "version": "1", "params": params}


def make_records() -> list[CellRecord]:
    out: list[CellRecord] = []

    def add(spec: dict, metrics: list[Metric], provenance: dict) -> None:
        n = len(out) + 1
        prov = {**provenance, "hashes": {"artifact": f"sha256:{n:064x}"}}
        out.append(record(spec, metrics, provenance=prov, created=T0 + n, run_id="run-1"))

    for suite, shift in (("alpha", 0.0), ("beta", 0.01)):
        for seed in (0, 1):
            add(_spec("baseline", suite, seed, ("p", "q")), [metric("expert", "v", 0.9), metric("pretrained", "v", 0.5)],
                {"hashes": {}})
            for defense, (_merged, utility) in DEFENSES.items():
                add(_spec("utility", suite, seed, ("p", "q"), defense=_plugin(defense, strength=0.5)),
                    [metric("utility", "v", utility)], PROVENANCE)
            for partners in (("p",), ("q",)):
                jitter = shift + 0.01 * seed + (0.005 if partners == ("q",) else 0.0)
                for merge in ("ta", "ties"):
                    for attack, bonus in (("none", -0.04), ("align", 0.0)):
                        base = _spec("merge", suite, seed, partners, attack=_plugin(attack),
                                     merge=_plugin(merge, lambda_=0.3), filling="unprotected")
                        add(base, [metric("merged", "v", 0.8), metric("merged", partners[0], 0.7)], PROVENANCE)
                        add(counterpart_spec(base, "counterfactual"), [metric("merged", "v", 0.6)], PROVENANCE)
                        for defense, (merged, utility) in DEFENSES.items():
                            spec = {**base, "defense": _plugin(defense, strength=0.5), "filling": "protected"}
                            add(spec, [metric("merged", "v", merged + bonus + jitter), metric("merged", partners[0], 0.66),
                                       metric("utility", "v", utility)], PROVENANCE)
    return out


def held_out_recovered(suite: str, merged: float) -> float:
    """recovered of ``merged`` (plus each replicate's jitter) read on the held-out half of the victim's examples,
    by hand: the fixture's outcomes are the first round(acc·N) examples right; U 0.8 and ∅ 0.6 everywhere."""
    from scored_cells import N, outcomes

    from bench.scoring import example_split

    _sel, held = example_split(0, suite, "v", N)
    shift = 0.0 if suite == "alpha" else 0.01
    reps = [shift + 0.01 * seed + (0.005 if q else 0.0) for seed in (0, 1) for q in (False, True)]
    p = np.mean([outcomes(merged + j)[held].mean() for j in reps])
    u, z = outcomes(0.8)[held].mean(), outcomes(0.6)[held].mean()
    return float(np.clip((p - z) / (u - z), 0, 1))


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store") / "results.db"
    with Store(path) as store:
        store.start_run("run-1", ["bench", "run"], {"versions": {"mergearena": "0.1.0", "torch": "2.13.0"}})
        for rec in make_records():
            store.put_cell(rec)
    return path


@pytest.fixture(scope="module")
def site(store_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    export(store_path, out / "export", attacks=STANDARD, n_bootstrap=200)
    index = build_site(out / "export", out / "site")
    assert index == out / "site" / "index.html"
    return out / "site"


# ---------------------------------------------------------------- export


def test_export_writes_one_schema_valid_entry_per_suite_and_defense(store_path: Path, tmp_path: Path):
    paths = export(store_path, tmp_path, attacks=STANDARD, n_bootstrap=50)
    rel = sorted(p.relative_to(tmp_path).as_posix() for p in paths)
    expected_entries = sorted(entry_path(s, d) for s in ("alpha", "beta") for d in [*DEFENSES, "none"])
    assert rel == sorted([*expected_entries, "manifest.json", "leaderboard.csv", "recovered.csv", "claims.json"])
    manifest, entries = load_export(tmp_path)  # validates every document against its schema
    assert len(entries) == 10
    for name in ("utility", "security", "recovered", "attack_s"):
        assert isinstance(manifest["metrics"][name]["higher_is_better"], bool)
    params = next(e for e in entries if e["suite"] == "alpha" and e["defense"] == "params")
    s = params["summary"]
    assert type(s["utility"]) is float and type(s["security"]) is float
    assert s["security"] == 1.0  # its merges stay below the counterfactual floor: nothing recovered
    assert all(type(x) is float for x in s["security_ci"])
    assert s["rank"] == 1 and s["uninformative_victims"] == []
    lock = next(e for e in entries if e["suite"] == "alpha" and e["defense"] == "mergelock")["summary"]
    # align/ta is reported on the held-out half only: recomputed here from the nested outcomes on those indices
    assert lock["security"] == pytest.approx(1 - held_out_recovered("alpha", 0.65)) and lock["best_attack"] == "align"
    assert abs(lock["security"] - (1 - 0.0575 / 0.2)) > 1e-3  # ... which is not the all-example value
    pair = next(p for p in params["victims"][0]["recovered"] if (p["attack"], p["merge"]) == ("align", "ta"))
    assert pair["v_counterfactual"] == pytest.approx(0.6) and pair["v_unprotected"] == pytest.approx(0.8)
    assert pair["gain"] == pytest.approx(0.2) and pair["informative"] is True and pair["gain_ci"][0] > 0


def test_export_keeps_the_provenance_of_every_number(store_path: Path, tmp_path: Path):
    export(store_path, tmp_path, attacks=STANDARD, n_bootstrap=20)
    _, entries = load_export(tmp_path)
    e = next(e for e in entries if e["suite"] == "beta" and e["defense"] == "mergelock")
    cells = {c["cell_id"]: c for c in e["cells"]}
    victim = e["victims"][0]
    assert victim["cells"] and set(victim["cells"]) <= set(cells)
    kinds = {(cells[i]["kind"], cells[i]["filling"], cells[i]["defense"]) for i in victim["cells"]}
    assert kinds == {("baseline", "protected", "-"), ("utility", "protected", "mergelock"),
                     ("merge", "protected", "mergelock"), ("merge", "unprotected", "none"),
                     ("merge", "counterfactual", "counterfactual")}  # own, both references, baseline, utility
    assert all(m["examples"].startswith("bits:") for c in cells.values() for m in c["metrics"])
    own = next(c for c in cells.values() if c["defense"] == "mergelock" and c["kind"] == "merge")
    assert own["provenance"]["hashes"]["artifact"].startswith("sha256:")
    assert own["spec"]["defense"]["params"] == {"strength": 0.5}
    assert e["specs"]["defense"] == [{"name": "mergelock", "params": {"strength": 0.5}, "version": "1"}]
    assert e["runs"]["run-1"]["versions"]["torch"] == "2.13.0"
    assert [(r["partners"], r["seed"]) for r in victim["replicates"]] == [(["p"], 0), (["p"], 1), (["q"], 0), (["q"], 1)]
    # the date is when the newest cell was recorded, not when the export ran
    newest = max(c["date"] for c in e["cells"])
    assert e["date"] == newest and newest.startswith(datetime.fromtimestamp(T0, tz=timezone.utc).strftime("%Y-"))


def test_reexport_of_unchanged_results_is_byte_identical(store_path: Path, tmp_path: Path):
    first = {p.relative_to(tmp_path / "a"): p.read_bytes()
             for p in export(store_path, tmp_path / "a", attacks=STANDARD, n_bootstrap=100)}
    second = {p.relative_to(tmp_path / "b"): p.read_bytes()
              for p in export(store_path, tmp_path / "b", attacks=STANDARD, n_bootstrap=100)}
    again = {p.relative_to(tmp_path / "a"): p.read_bytes()
             for p in export(store_path, tmp_path / "a", attacks=STANDARD, n_bootstrap=100)}
    assert first == second == again
    manifest = json.loads(first[Path("manifest.json")])
    for f in manifest["files"]:
        assert hashlib.sha256(first[Path(f["path"])]).hexdigest() == f["sha256"]


def test_schema_rejects_numbers_written_as_strings(store_path: Path, tmp_path: Path):
    export(store_path, tmp_path, attacks=STANDARD, n_bootstrap=10)
    _, entries = load_export(tmp_path)
    doc = entries[0]
    doc["summary"]["utility"] = "0.9"
    with pytest.raises(ExportError, match="summary/utility"):
        validate(doc, "entry")


def test_export_removes_entries_no_longer_in_the_results(store_path: Path, tmp_path: Path):
    stale = tmp_path / "entries" / "alpha" / "gone.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    export(store_path, tmp_path, attacks=STANDARD, n_bootstrap=10)
    assert not stale.exists()


def test_incomplete_security_is_published_unranked(store_path: Path, tmp_path: Path):
    export(store_path, tmp_path, attacks=[*STANDARD, "unmask"], n_bootstrap=10)
    manifest, _ = load_export(tmp_path)
    params = next(e for e in manifest["entries"] if e["defense"] == "params")["summary"]
    assert params["complete"] is False and params["rank"] is None
    assert params["attacks_missing"] == ["unmask"] and "incomplete" in params["unranked_reason"]
    assert any(f["code"] == "incomplete" for f in params["flags"])


def test_csv_downloads_hold_every_row(store_path: Path, tmp_path: Path):
    export(store_path, tmp_path, attacks=STANDARD, n_bootstrap=10)
    rows = list(csv.DictReader((tmp_path / "leaderboard.csv").open()))
    assert len(rows) == 5 + 10  # overall per defense + one per (suite, defense)
    wrecker = next(r for r in rows if r["group"] == "alpha" and r["defense"] == "wrecker")
    assert wrecker["rank"] == "" and "utility_below_floor" in wrecker["flags"]
    recovered = list(csv.DictReader((tmp_path / "recovered.csv").open()))
    assert len(recovered) == 2 * 5 * 2 * 2  # suites x defenses (none too) x attacks x merges
    assert {float(r["recovered"]) for r in recovered if r["defense"] == "none"} == {1.0}


def test_export_rejects_a_missing_store(tmp_path: Path):
    with pytest.raises(ExportError, match="does not exist"):
        export(tmp_path / "nope.db", tmp_path / "out")


# ---------------------------------------------------------------- site (no browser)


class _Rows(HTMLParser):
    """Rows of the leaderboard table: (suite, defense, hidden)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, str, bool]] = []
        self._in_table = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._in_table = a.get("id") == "leaderboard"
        elif tag == "tr" and self._in_table and "data-defense" in a:
            self.rows.append((a["data-suite"] or "", a["data-defense"] or "", "hidden" in a))

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_table = False


def table_rows(html: str, visible_only: bool = True) -> list[tuple[str, str]]:
    parser = _Rows()
    parser.feed(html)
    return [(s, d) for s, d, hidden in parser.rows if not (visible_only and hidden)]


def expected_rows() -> list[tuple[str, str]]:
    return [(group, d) for group in ("overall", "alpha", "beta") for d in EXPECTED_ORDER]


def test_index_lists_ranked_rows_in_rank_order(site: Path):
    html = (site / "index.html").read_text()
    assert table_rows(html) == expected_rows()
    assert 'class="pareto-front"' in html and 'class="rank-stability"' in html


def test_plugin_text_is_escaped_everywhere(site: Path):
    pages = [site / "index.html", *sorted((site / "defense").glob("*.html")), *sorted((site / "attack").glob("*.html"))]
    assert len(pages) > 3
    for page in pages:
        html = page.read_text()
        assert EVIL not in html, page
    index = (site / "index.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in index
    evil_page = site / "defense" / Path(entry_path("alpha", EVIL)).name.replace(".json", ".html")
    assert evil_page.is_file() and "&lt;script&gt;alert(1)&lt;/script&gt;" in evil_page.read_text()
    # the only scripts on any page are the site's own
    assert re.findall(r"<script[^>]*>", index) == ['<script src="assets/app.js">']


def test_defense_page_shows_heatmap_breaker_and_exact_params(site: Path):
    html = (site / "defense" / "mergelock.html").read_text()
    assert html.count('class="heatmap"') == 2  # one per suite
    assert "&#34;strength&#34;: 0.5" in html  # the defense's params, escaped like any text
    # alpha: merged 0.65 + each replicate's jitter, reported on the held-out half (computed by hand)
    assert 'href="../attack/align.html"' in html and f"recovers {held_out_recovered('alpha', 0.65):.3f}" in html
    assert "V<sub>∅</sub>" in html and "0.600" in html  # the absolute values next to the ratio


def test_attack_page_lists_the_defenses_it_breaks(site: Path):
    html = (site / "attack" / "align.html").read_text()
    parser_rows = re.findall(r'<tr data-defense="([^"]*)" class="(breaks|holds)"', html)
    breaks = {d for d, c in parser_rows if c == "breaks"}
    # 0.85 recovered vs 0.29 vs 0 (names are HTML-escaped in the attribute)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in breaks and "mergelock" not in breaks and "params" not in breaks


def test_methods_page_lists_every_registered_plugin(site: Path):
    html = (site / "methods.html").read_text()
    sections = methods_view()
    for section, registry in zip(sections, (defenses, attacks, merges)):
        listed = {n for item in section["plugins"] for n in (item["name"], *item["aliases"])}
        assert set(registry.names()) <= listed, section["title"]
        for item in section["plugins"]:
            assert f'id="{section["anchor"]}-{slug(item["name"])}"' in html
            assert not item["error"], item  # every built-in plugin imports and describes itself


@pytest.fixture
def evil_plugin():
    from bench.plugins import Defense

    class Evil(Defense):
        """<img src=x onerror=alert(2)> a defense with hostile metadata."""

        name = "evil-doc"
        paper = "javascript:alert(3)"
        code = "javascript:alert(4)"

    defenses.register("evil-doc", obj=Evil)
    try:
        yield Evil
    finally:
        defenses._entries.pop("evil-doc", None)


def test_new_plugin_appears_on_methods_page_escaped(evil_plugin, site: Path, tmp_path: Path):
    build_site(site / "data", tmp_path)
    html = (tmp_path / "methods.html").read_text()
    assert ">evil-doc" in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html and "<img" not in html
    assert 'href="javascript:' not in html


def test_paper_links_are_http_only():
    assert paper_url("Foo et al., ICML 2025. https://arxiv.org/abs/2501.00001.") == "https://arxiv.org/abs/2501.00001"
    assert paper_url("Li et al., AAAI 2026, arXiv:2511.10712") == "https://arxiv.org/abs/2511.10712"
    assert paper_url("javascript:alert(1)") == ""


def test_pareto_front_keeps_only_undominated_points():
    pts = [(0.9, 0.3), (0.95, 0.2), (0.85, 0.1), (1.0, 0.0), (0.95, 0.1)]
    assert pareto_front(pts) == [0, 1, 3]


def test_build_site_from_a_store_path(store_path: Path, tmp_path: Path):
    index = build_site(store_path, tmp_path / "site")
    assert index.is_file() and (tmp_path / "site" / "data" / "manifest.json").is_file()
    assert (tmp_path / "site" / "data" / "leaderboard.csv").is_file()
    assert 'href="data/leaderboard.csv"' in (tmp_path / "site" / "downloads.html").read_text()


def test_build_refuses_to_overwrite_a_foreign_data_directory(store_path: Path, tmp_path: Path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a leaderboard export"):
        build_site(store_path, tmp_path)
    assert (tmp_path / "data" / "precious.txt").exists()


def test_serve_answers_with_the_index(site: Path):
    server = make_server(site, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10) as resp:
            assert resp.status == 200 and b'id="leaderboard"' in resp.read()
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- a real browser

def png_pixels(path: Path) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what chromium writes) into [h, w, channels]."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0
    bpp = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + width * bpp)
    out = np.zeros((height, width * bpp), dtype=np.int64)
    prev = np.zeros(width * bpp, dtype=np.int64)
    for y in range(height):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int64)
        if f == 0:
            row = line
        elif f == 1:
            row = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) % 256
        elif f == 2:
            row = (line + prev) % 256
        else:  # Average and Paeth depend on the reconstructed left neighbour: byte by byte
            row = np.zeros_like(line)
            for i in range(line.size):
                a = row[i - bpp] if i >= bpp else 0
                b = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                if f == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                row[i] = (line[i] + pred) % 256
        out[y] = row
        prev = row
    return out.reshape(height, width, bpp)


@needs_chromium
def test_console_capture_sees_page_errors(tmp_path: Path):
    """The console check below can fail: a page with an error is caught."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><script>undefinedFunction();</script></body></html>")
    _, console = chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert any("undefinedFunction" in line for line in console)


@needs_chromium
def test_browser_renders_the_ranked_table_without_console_errors(site: Path, tmp_path: Path):
    dom, console = chromium(tmp_path, (site / "index.html").as_uri(), "--dump-dom")
    assert console == []
    # the first screen is one suite: the first suite's rows only (not the cross-suite summary)
    first = next(s for s, _ in expected_rows() if s != "overall")
    assert table_rows(dom) == [r for r in expected_rows() if r[0] == first]
    dom, console = chromium(tmp_path, (site / "index.html").as_uri() + "#suite=all", "--dump-dom")
    assert console == [] and table_rows(dom) == expected_rows()
    assert 'class="pareto-front"' in dom and dom.count('class="scatter"') == 3
    # both intervals of every plotted point are drawn as whiskers
    assert dom.count('class="whisker utility-ci"') > 0 and dom.count('class="whisker security-ci"') > 0
    assert dom.count('class="rank-stability"') == 3


@needs_chromium
def test_browser_sorts_and_filters_from_the_url_hash(site: Path, tmp_path: Path):
    manifest = json.loads((site / "data" / "manifest.json").read_text())
    alpha = [(e["defense"], e["summary"]["utility"]) for e in manifest["entries"] if e["suite"] == "alpha"]
    published = [d for s, d in expected_rows() if s == "alpha"]
    by_utility = sorted(alpha, key=lambda x: (x[1], published.index(x[0])))
    url = (site / "index.html").as_uri() + "#suite=alpha&sort=utility&dir=asc"
    dom, console = chromium(tmp_path, url, "--dump-dom")
    assert console == []
    assert table_rows(dom) == [("alpha", d) for d, _ in by_utility]
    assert by_utility[0][0] == "wrecker"  # utility 0.4/0.9: lowest first
    assert 'aria-sort="ascending"' in dom


@needs_chromium
def test_clicking_a_header_sorts_the_table(site: Path, tmp_path: Path):
    # A copy of the index that clicks the 'security' header once the page has loaded.
    html = (site / "index.html").read_text().replace(
        "</body>", "<script>window.addEventListener('load', function () { "
        "document.querySelector('th[data-key=security] button').click(); });</script></body>")
    page = site / "index-click.html"
    page.write_text(html)
    try:
        dom, console = chromium(tmp_path, page.as_uri() + "#suite=all", "--virtual-time-budget=3000", "--dump-dom")
    finally:
        page.unlink()
    assert console == []
    manifest = json.loads((site / "data" / "manifest.json").read_text())
    rows = [("overall", o["defense"], o["summary"]["security"]) for o in manifest["overall"]]
    rows += [(e["suite"], e["defense"], e["summary"]["security"]) for e in manifest["entries"]]
    order = {r: i for i, r in enumerate(expected_rows())}
    # missing values (the reference row's security) sort last whichever the direction
    desc = sorted(rows, key=lambda r: (r[2] is None, -(r[2] or 0.0), order[(r[0], r[1])]))
    assert table_rows(dom) == [(s, d) for s, d, _ in desc]
    assert 'aria-sort="descending"' in dom


@needs_chromium
def test_defense_page_heatmap_renders_in_the_browser(site: Path, tmp_path: Path):
    # mergelock: the plain merge recovers little and align more (params recovers nothing anywhere: one colour)
    dom, console = chromium(tmp_path, (site / "defense" / "mergelock.html").as_uri(), "--dump-dom")
    assert console == []
    cells = re.findall(r'<td style="background-color: (#[0-9a-f]{6})"', dom)
    assert len(cells) == 2 * 2 * 2 and len(set(cells)) > 1  # suites x attacks x merges, not all one colour


@needs_chromium
def test_screenshot_of_the_index_is_not_blank(site: Path, tmp_path: Path):
    shot = tmp_path / "index.png"
    chromium(tmp_path, (site / "index.html").as_uri(), f"--screenshot={shot}", "--window-size=900,700",
             "--hide-scrollbars")
    pixels = png_pixels(shot)
    assert pixels.shape[:2] == (700, 900)
    gray = pixels[..., :3].mean(axis=2)
    assert gray.std() > 10  # a blank page is one colour; the table, header and plots are not
    assert (gray < 100).mean() > 0.01  # some dark ink (the header bar and text)


# ---------------------------------------------------------------- end to end with the real runner


def test_runner_results_export_and_render(toy_suite, tmp_path: Path):
    """Cells written by the real runner score, export schema-valid and render; numbers match the raw metrics."""
    from bench.executors.local import run_local
    from bench.plan import build_plan

    # λ = 1: the toy experts' task vectors are weak, and at 0.3 the victim gives the merge nothing (measured:
    # V_U = V_∅ = 0.477 on t10); at 1 its gain is significant (0.047 [0.015, 0.086]), so the formula is exercised
    plan = build_plan(toy_suite, defense="toy-scale", attack="none", merge="ta", victims=["t10"],
                      params={"ta": {"lambda_": "1.0"}})
    with Store(tmp_path / "r.sqlite") as store:
        summary = run_local(toy_suite, store, plan.cells, run_id="e2e", log=lambda m: None)
        assert summary.failed == 0
        export(store, tmp_path / "export", attacks=["none"], n_bootstrap=20)
        build_site(store, tmp_path / "site")
    _, entries = load_export(tmp_path / "export")
    entry = next(e for e in entries if e["defense"] == "toy-scale")
    cells = {(c["kind"], c["defense"]): c for c in entry["cells"]}
    assert set(cells) == {("baseline", "-"), ("utility", "toy-scale"), ("merge", "none"), ("merge", "counterfactual"),
                          ("merge", "toy-scale")}

    def metric(c: dict, role: str, task: str = "t10") -> float:
        return next(m["value"] for m in c["metrics"] if (m["role"], m["task"], m["metric"]) == (role, task, "accuracy"))

    ft = metric(cells[("baseline", "-")], "expert")
    protected, unprotected = metric(cells[("merge", "toy-scale")], "merged"), metric(cells[("merge", "none")], "merged")
    floor = metric(cells[("merge", "counterfactual")], "merged")
    (pair,) = entry["victims"][0]["recovered"]
    assert (pair["v_protected"], pair["v_unprotected"], pair["v_counterfactual"]) == pytest.approx((protected, unprotected, floor), abs=1e-5)
    assert pair["informative"] is True and unprotected - floor > 0.01
    expected = min(1.0, max(0.0, (protected - floor) / (unprotected - floor)))  # the amplified release clips at 1
    assert pair["recovered"] == pytest.approx(expected, abs=1e-6)
    assert entry["victims"][0]["utility"] == pytest.approx(metric(cells[("merge", "toy-scale")], "utility") / ft, abs=1e-6)
    assert cells[("merge", "toy-scale")]["provenance"]["hashes"]["artifact"]
    assert "e2e" in entry["runs"]  # the run (and its environment, when recorded) travels with the numbers
    assert (tmp_path / "site" / "defense" / "toy-scale.html").is_file()

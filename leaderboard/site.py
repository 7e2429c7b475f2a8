"""The static leaderboard site, rendered from an export (never edited by hand).

Pages: ``index.html`` (ranked table, sortable and filterable by suite; utility-versus-security
scatter with the Pareto front; rank stability under resampling), ``defense/<name>.html`` (heatmap
of recovered fraction per attack x merge, utility per task, the attack that breaks it, the exact
parameters that ran), ``attack/<name>.html`` (the defenses it breaks and at what cost),
``methods.html`` (every registered defense, attack and merge method, read from the registries),
``claims.html`` (every paper claim with our measurement per suite and its verdict, `leaderboard.claims`),
``frontiers.html`` (utility against security through each defense's stored strength settings, `bench frontier`) and
``downloads.html`` (the exported JSON and CSV, copied under ``data/``).

Everything is local: one stylesheet and one small script under ``assets/``, figures as inline SVG,
so the site works from ``file://`` or any static host. Templates autoescape, so plugin-supplied
text (names, docstrings, reasons) is always shown as text.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jinja2

from bench.scoring import REFERENCE
from leaderboard.claims import CLAIMS_FILE, build_claims
from leaderboard.export import ExportError, entry_path, export, load_export, slug

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
ASSETS = HERE / "assets"
DATA_DIR = "data"


# ---------------------------------------------------------------- formatting helpers


def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return f"{x:.{digits}f}"
    return str(x)


def fmt_ci(ci: Sequence[float] | None, digits: int = 3) -> str:
    return "" if not ci else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def sort_value(x: Any) -> str:
    """The ``data-value`` of a table cell: numbers as numbers, missing as empty (sorted last)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return repr(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def pretty_json(x: Any) -> str:
    """Indented JSON as plain text (the template escapes it like any other text)."""
    return json.dumps(x, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False)


_URL = re.compile(r"https?://[^\s<>\"')\]]+")


_ARXIV = re.compile(r"arXiv:\s*(\d{4}\.\d{4,5})(v\d+)?", re.IGNORECASE)


def paper_url(text: str | None) -> str:
    """The first http(s) link in a citation, else its arXiv id as a link ('' when neither).

    Only http(s) URLs are ever produced, so a hostile citation cannot become a ``javascript:`` link.
    """
    m = _URL.search(text or "")
    if m:
        return m.group(0).rstrip(".,;")
    arxiv = _ARXIV.search(text or "")
    return f"https://arxiv.org/abs/{arxiv.group(1)}{arxiv.group(2) or ''}" if arxiv else ""


def code_url(code: str | None) -> str:
    """A link for a plugin's ``code`` field: a URL as is, ``owner/name`` as a GitHub repository."""
    code = (code or "").strip()
    if _URL.fullmatch(code):
        return code
    if re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", code):
        return f"https://github.com/{code}"
    return ""


def heat_color(r: float | None) -> str:
    """Recovered fraction -> background: green (nothing recovered) to yellow to red (all of it)."""
    if r is None:
        return "#e4e4e4"
    stops = [(0.0, (26, 152, 80)), (0.5, (254, 224, 139)), (1.0, (215, 48, 39))]
    r = min(1.0, max(0.0, r))
    for (a, ca), (b, cb) in zip(stops, stops[1:]):
        if r <= b:
            t = (r - a) / (b - a)
            rgb = [round(x + (y - x) * t) for x, y in zip(ca, cb)]
            return "#{:02x}{:02x}{:02x}".format(*rgb)
    return "#d73027"


# ---------------------------------------------------------------- figures (geometry only; markup in templates)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both utility and security, by increasing utility."""
    front = []
    for i, (u, s) in enumerate(points):
        dominated = any(u2 >= u and s2 >= s and (u2 > u or s2 > s) for j, (u2, s2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _nice_step(span: float) -> float:
    for step in (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0):
        if span / step <= 8:
            return step
    return 1.0


def scatter(rows: list[dict[str, Any]], floor: float, size: tuple[int, int] = (460, 320)) -> dict[str, Any] | None:
    """Geometry of the utility (x) versus security (y) plot of one group of leaderboard rows (``size``: the
    drawing's width and height in pixels, margins included)."""
    pts = [r for r in rows if r["utility"] is not None and r["security"] is not None]
    if not pts:
        return None
    (w, h), left, right, top, bottom = size, 52, 130, 16, 44
    us = [r["utility"] for r in pts]
    x0 = math.floor((min([*us, floor]) - 0.02) * 20) / 20
    x1 = math.ceil((max([*us, 1.0]) + 0.02) * 20) / 20

    def px(u: float) -> float:
        return round(left + (u - x0) / (x1 - x0) * (w - left - right), 1)

    def py(s: float) -> float:
        return round(top + (1 - s) * (h - top - bottom), 1)

    step = _nice_step(x1 - x0)
    xticks = [round(x0 + k * step, 4) for k in range(int(round((x1 - x0) / step)) + 1)]
    front = pareto_front([(r["utility"], r["security"]) for r in pts])
    def clip_x(u: float) -> float:
        return px(min(max(u, x0), x1))

    points = [{"x": px(r["utility"]), "y": py(r["security"]), "label": r["defense"], "href": r["defense_href"],
               "utility": r["utility"], "security": r["security"], "ranked": r["rank"] is not None,
               "pareto": i in front,
               # both intervals as whiskers (clipped to the axes): utility across, security up and down
               "xerr": [clip_x(v) for v in r["utility_ci"]] if r.get("utility_ci") else None,
               "yerr": [py(v) for v in r["security_ci"]] if r.get("security_ci") else None,
               "utility_ci": r.get("utility_ci"), "security_ci": r.get("security_ci")}
              for i, r in enumerate(pts)]
    _place_labels(points)
    return {
        "width": w, "height": h, "plot": {"x": left, "y": top, "w": w - left - right, "h": h - top - bottom},
        "xticks": [{"x": px(t), "label": f"{t:g}"} for t in xticks if x0 - 1e-9 <= t <= x1 + 1e-9],
        "yticks": [{"y": py(t), "label": f"{t:g}"} for t in (0, 0.25, 0.5, 0.75, 1.0)],
        "points": points,
        "front": " ".join(f"{points[i]['x']},{points[i]['y']}" for i in front),
        "floor_x": px(floor) if x0 <= floor <= x1 else None, "floor": floor,
    }


def _place_labels(points: list[dict[str, Any]], char_w: float = 6.2, line_h: float = 12.0) -> None:
    """Set each point's label position, moving a label down until it overlaps no earlier one."""
    boxes: list[tuple[float, float, float]] = []  # (x, y, width) of placed labels
    for p in sorted(points, key=lambda p: (p["y"], p["x"])):
        lx, ly, width = p["x"] + 8, p["y"] + 4, char_w * len(p["label"])
        for _ in range(8):
            if not any(abs(ly - by) < line_h and lx < bx + bw and bx < lx + width for bx, by, bw in boxes):
                break
            ly += line_h
        boxes.append((lx, ly, width))
        p["lx"], p["ly"] = round(lx, 1), round(ly, 1)


FRONTIER_COLORS = ("#1f5fa8", "#c2571a", "#2b8a3e", "#8e3bb0", "#b0402a", "#0e7c86", "#6b6b00", "#a8326e")
"""One color per defense of a frontier plot (cycled)."""
FRONTIER_SIZE = (860, 560)
"""A frontier plot's size: every setting of every defense on one suite, a label each, so larger than a leaderboard's."""


def frontier_figure(items: list[dict[str, Any]], floor: float) -> dict[str, Any] | None:
    """Geometry of one suite's frontier plot: `scatter`'s axes and points (both intervals as whiskers) for every
    stored setting, one polyline per (defense, knob) through its points in declared order, the default marked.
    ``items`` are the manifest's ``frontiers`` of one suite (`leaderboard.export.frontiers`)."""
    rows: dict[str, dict[str, Any]] = {}
    for f in items:
        for p in f["points"]:
            rows.setdefault(p["label"], {"defense": p["label"], "defense_href": _href("defense", p["label"]),
                                         "rank": 0, **{k: p[k] for k in ("utility", "utility_ci", "security",
                                                                          "security_ci")}})
    geom = scatter(list(rows.values()), floor, FRONTIER_SIZE)
    if geom is None:
        return None
    at = {p["label"]: p for p in geom["points"]}
    lines, legend, marks = [], [], {}
    for i, f in enumerate(items):
        color = FRONTIER_COLORS[i % len(FRONTIER_COLORS)]
        legend.append({"defense": f["defense"], "color": color})
        for knob in dict.fromkeys(p["knob"] for p in f["points"]):
            drawn = [at[p["label"]] for p in f["points"] if p["knob"] == knob and p["label"] in at]
            if knob is not None and len(drawn) >= 2:
                lines.append({"defense": f["defense"], "knob": knob, "color": color,
                              "points": " ".join(f"{q['x']},{q['y']}" for q in drawn)})
        for p in f["points"]:
            if p["label"] in at and p["label"] not in marks:
                # the setting as its label writes it (``factor=4`` of ``toy-scale[factor=4]``)
                text = "default" if p["default"] else p["label"].partition("[")[2].rstrip("]") or p["label"]
                marks[p["label"]] = {**at[p["label"]], "variant": p["label"], "label": text, "color": color,
                                     "default": p["default"]}
    points = list(marks.values())
    _place_labels(points)
    return {**geom, "front": "", "points": points, "lines": lines, "legend": legend}


def frontiers_view(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Per suite with a frontier: its plot and a table row per point (an export without ``frontiers``: none)."""
    floor = manifest["config"]["utility_floor"]
    items = manifest.get("frontiers") or []
    out = []
    for suite in sorted({f["suite"] for f in items}):
        mine = [f for f in items if f["suite"] == suite]
        rows = [{**p, "defense": f["defense"], "href": _href("defense", p["label"])} for f in mine for p in f["points"]]
        out.append({"suite": suite, "figure": frontier_figure(mine, floor), "rows": rows})
    return out


def stability_figure(item: dict[str, Any]) -> dict[str, Any] | None:
    """Geometry of the rank-probability grid (defense x rank) of one group."""
    names = item["defenses"]
    if not names:
        return None
    cw, ch, left, top = 46, 24, 150, 22
    cells = []
    for i, row in enumerate(item["rank_probability"]):
        for k, p in enumerate(row):
            cells.append({"x": left + k * cw, "y": top + i * ch, "w": cw - 2, "h": ch - 2, "p": p,
                          "opacity": round(0.08 + 0.92 * p, 3) if p > 0 else 0.0, "label": f"{100 * p:.0f}%",
                          "dark": p > 0.5})
    return {"width": left + len(names) * cw + 4, "height": top + len(names) * ch + 4, "left": left, "top": top,
            "cw": cw, "ch": ch, "rows": [{"y": top + i * ch, "label": n} for i, n in enumerate(names)],
            "cols": [{"x": left + k * cw, "label": f"#{k + 1}"} for k in range(len(names))], "cells": cells}


# ---------------------------------------------------------------- view models


def _href(kind: str, name: str) -> str:
    return f"{kind}/{slug(name)}.html"


def broken_by_text(broken_by: dict[str, str | None] | None) -> str:
    """'realign / ta (2 of 3 victims)': the steps that broke a defense, with how many victims each broke."""
    if not broken_by:
        return ""
    counts: dict[str, int] = {}
    for step in broken_by.values():
        if step:
            counts[step] = counts.get(step, 0) + 1
    if not counts:
        return "unbroken"
    n = len(broken_by)
    text = "; ".join(f"{step} ({c} of {n})" for step, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    unbroken = n - sum(counts.values())
    return text + (f"; unbroken on {unbroken} of {n}" if unbroken else "")


def rank_text(band: list[int] | None) -> str:
    """'2' for a rank the data pin down, '1–3' for a band of ranks the intervals cannot separate."""
    if not band:
        return ""
    return str(band[0]) if band[0] == band[1] else f"{band[0]}–{band[1]}"


def _row(group: str, defense: str, s: dict[str, Any]) -> dict[str, Any]:
    reference = defense == REFERENCE
    return {"group": group, "defense": defense, "defense_href": _href("defense", defense),
            "attack_href": _href("attack", s["best_attack"]) if s["best_attack"] else "",
            "broken_by_text": "reference: each victim's gain is in the signal table" if reference
            else broken_by_text(s.get("broken_by")),
            "rank_text": rank_text(s.get("rank_band")), "reference": reference, **s}


def _group_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ranked rows by rank, then the unranked by security (never interleaved with the ranked), then the
    reference row (`none`: what an unprotected release gives)."""
    def key(r: dict[str, Any]) -> tuple:
        unscored = r["security"] is None
        return (r["reference"], r["rank"] is None, r["rank"] or 0, unscored, 0.0 if unscored else -r["security"],
                r["defense"])

    return sorted(rows, key=key)


def index_view(manifest: dict[str, Any]) -> dict[str, Any]:
    floor = manifest["config"]["utility_floor"]
    groups = [("overall", "Overall", [_row("overall", o["defense"], o["summary"]) for o in manifest["overall"]])]
    for suite in manifest["suites"]:
        rows_ = [_row(suite, e["defense"], e["summary"]) for e in manifest["entries"] if e["suite"] == suite]
        # a suite whose protocol has not yet run against any defense shows its signal (the reference row) only
        label = suite if any(not r["reference"] for r in rows_) else f"{suite} (reference only: no defense run yet)"
        groups.append((suite, label, rows_))
    rows = []
    figures = []
    stability = {(item["suite"] or "overall"): item for item in manifest["rank_stability"]}
    for key, label, group_rows in groups:
        ordered = _group_rows(group_rows)
        rows.extend(ordered)
        st = stability.get(key)
        figures.append({"key": key, "label": label, "scatter": scatter(ordered, floor),
                        "stability": stability_figure(st) if st else None, "stability_data": st})
    for i, r in enumerate(rows):
        r["order"] = i
    signal = [{"suite": suite, "rows": rows_} for suite, rows_ in sorted(manifest.get("signal", {}).items())]
    protocol = manifest["config"].get("protocol")
    return {"rows": rows, "figures": figures, "groups": [(k, label) for k, label, _ in groups], "signal": signal,
            "protocol": protocol}


def defense_view(defense: str, entries: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    suites = []
    for e in sorted((e for e in entries if e["defense"] == defense), key=lambda e: e["suite"]):
        attacks = sorted({p["attack"] for p in e["recovered"]})
        merges = sorted({p["merge"] for p in e["recovered"]})
        grid = {(p["attack"], p["merge"]): p for p in e["recovered"]}
        heat = [{"attack": a, "href": _href("attack", a),
                 "cells": [_heat_cell(grid.get((a, m))) for m in merges]} for a in attacks]
        # the one break rule: a victim whose held-out best recovered reaches the protocol's threshold
        breaking = [{"victim": v["victim"], "attack": v["best_attack"], "merge": v["best_merge"],
                     "recovered": v["best_recovered"], "attack_s": v["attack_s"]}
                    for v in e["victims"] if v.get("broken")]
        suites.append({"entry": e, "merges": merges, "heat": heat, "file": f"{DATA_DIR}/{_entry_file(e)}",
                       "breaking": breaking})
    return {"defense": defense, "suites": suites}


def _entry_file(e: dict[str, Any]) -> str:
    return entry_path(e["suite"], e["defense"])


def _heat_cell(p: dict[str, Any] | None) -> dict[str, Any]:
    if p is None:
        return {"value": None, "color": heat_color(None), "title": "not run", "text": ""}
    r = p["recovered"]
    title = f"recovered {r:.3f} over {p['n']} victim(s)" if r is not None else f"N/A: {p['na_reason']}"
    return {"value": r, "color": heat_color(r), "title": title, "text": fmt(r, 2) if r is not None else "N/A"}


def attack_view(attack: str, entries: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    rows, na = [], []
    for e in sorted(entries, key=lambda e: (e["suite"], e["defense"])):
        mine = [p for p in e["recovered"] if p["attack"] == attack and p["recovered"] is not None]
        if mine:
            best = max(mine, key=lambda p: p["recovered"])
            # breaks: it is the held-out worst case of some victim and reaches the threshold there (one rule)
            broken = [v["victim"] for v in e["victims"] if v.get("broken") and v["best_attack"] == attack]
            rows.append({"suite": e["suite"], "defense": e["defense"], "href": _href("defense", e["defense"]),
                         "recovered": best["recovered"], "merge": best["merge"], "attack_s": best["attack_s"],
                         "breaks": bool(broken), "broken_victims": broken,
                         "worst_case": e["summary"]["best_attack"] == attack})
        for v in e["victims"]:
            if attack in v["attacks_na"]:
                na.append({"suite": e["suite"], "defense": e["defense"], "victim": v["victim"],
                           "reason": v["attacks_na"][attack]})
            elif attack in v["attacks_missing"]:
                na.append({"suite": e["suite"], "defense": e["defense"], "victim": v["victim"],
                           "reason": "not run (missing from the standard set)"})
    rows.sort(key=lambda r: (not r["breaks"], -r["recovered"], r["suite"], r["defense"]))
    return {"attack": attack, "rows": rows, "na": na}


def _blank() -> dict[str, Any]:
    """Every key the methods template reads, so a plugin's partial ``describe()`` still renders."""
    return {"name": "", "version": "", "summary": "", "doc": "", "paper": "", "code": "", "params": [],
            "aliases": [], "error": "", "paper_url": "", "code_url": "", "counterpart": ""}


def attack_counterpart(cls: Any) -> str:
    """The attack (with default params) an attack's scores are read against: its honest counterpart."""
    try:
        return str(cls().counterpart().label)
    except Exception:  # a plugin whose defaults cannot be built: the page says nothing rather than fail
        return ""


def scoring_definition() -> str:
    """How scores are computed, with the worked example: the scoring package's own documentation."""
    import bench.scoring

    doc = bench.scoring.__doc__ or ""
    return doc.split("\nModules:")[0].strip()


def methods_view() -> list[dict[str, Any]]:
    """Every registered defense, attack and merge method, described by the plugin itself."""
    from bench.registry import attacks, defenses, merges

    sections = []
    for title, registry in (("Defenses", defenses), ("Attacks", attacks), ("Merge methods", merges)):
        items: dict[object, dict[str, Any]] = {}  # keyed by plugin object, so aliases share one item
        for name in registry.names():
            try:
                obj = registry.get(name)
                d = dict(obj.describe())
            except Exception as exc:  # a broken plugin is shown as broken, not hidden, and does not stop the build
                items[f"broken:{name}"] = {**_blank(), "name": name, "error": f"failed to load: {exc}"}
                continue
            if id(obj) in items:
                items[id(obj)]["aliases"].append(name)
                continue
            d = {**_blank(), **{k: v for k, v in d.items() if v is not None}}
            d["name"] = d["name"] or name
            d["aliases"] = [] if d["name"] == name else [name]
            d["paper_url"], d["code_url"] = paper_url(d["paper"]), code_url(d["code"])
            if registry is attacks:
                d["counterpart"] = attack_counterpart(obj)
            items[id(obj)] = d
        sections.append({"title": title, "anchor": slug(title.lower()),
                         "plugins": sorted(items.values(), key=lambda d: d["name"])})
    return sections


def claims_view(data: Path) -> dict[str, Any]:
    """The claims ledger of the export in ``data``: its ``claims.json`` when the export wrote one, else computed."""
    path = data / CLAIMS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else build_claims(data)


# ---------------------------------------------------------------- building


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters.update(fmt=fmt, fmt_ci=fmt_ci, sort_value=sort_value, slug=slug, pretty=pretty_json)
    return env


def _prepare_data(source: Any, out: Path) -> Path:
    """Put the export under ``out/data``: copy an export directory, or export a store there."""
    data = out / DATA_DIR
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        src = Path(source)
        if not (src / "manifest.json").is_file():
            raise ExportError(f"{src} is a directory without manifest.json; pass a results store or an export directory")
        if src.resolve() == data.resolve():
            return data
        _clear_data(data)
        shutil.copytree(src, data)
        return data
    _clear_data(data)
    export(source, data)
    return data


def _clear_data(data: Path) -> None:
    if not data.exists():
        return
    if not (data / "manifest.json").is_file() and any(data.iterdir()):
        raise ExportError(f"{data} exists and is not a leaderboard export; choose another output directory")
    shutil.rmtree(data)


def build_site(store_or_export_dir: Any, out_dir: str | os.PathLike) -> Path:
    """Render the site into ``out_dir`` from a results store (object or path) or an export directory.

    Returns the path of ``index.html``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _prepare_data(store_or_export_dir, out)
    manifest, entries = load_export(data)
    env = _environment()
    threshold = manifest["config"]["break_threshold"]
    common = {"manifest": manifest, "data_dir": DATA_DIR, "threshold": threshold,
              "metrics": manifest["metrics"]}

    for sub in ("defense", "attack"):
        for old in (out / sub).glob("*.html") if (out / sub).is_dir() else []:
            old.unlink()
    pages: dict[str, tuple[str, dict[str, Any]]] = {
        "index.html": ("index.html", {**common, "view": index_view(manifest), "root": "", "page": "index"}),
        "methods.html": ("methods.html", {**common, "sections": methods_view(), "scoring": scoring_definition(),
                                          "root": "", "page": "methods"}),
        "downloads.html": ("downloads.html", {**common, "root": "", "page": "downloads"}),
        "claims.html": ("claims.html", {**common, "claims": claims_view(data), "root": "", "page": "claims"}),
        "frontiers.html": ("frontiers.html", {**common, "suites": frontiers_view(manifest), "root": "",
                                              "page": "frontiers"}),
    }
    for defense in sorted({e["defense"] for e in entries}):
        pages[_href("defense", defense)] = ("defense.html", {**common, "view": defense_view(defense, entries, threshold),
                                                            "root": "../", "page": "defense"})
    attack_names = sorted(set(manifest["attacks"]) | {p["attack"] for e in entries for p in e["recovered"]})
    for attack in attack_names:
        pages[_href("attack", attack)] = ("attack.html", {**common, "view": attack_view(attack, entries, threshold),
                                                         "root": "../", "page": "attack"})
    for rel, (template, ctx) in sorted(pages.items()):
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(env.get_template(template).render(**ctx), encoding="utf-8")
    assets = out / "assets"
    assets.mkdir(exist_ok=True)
    for f in sorted(ASSETS.iterdir()):
        if f.is_file():
            shutil.copyfile(f, assets / f.name)
    return out / "index.html"


# ---------------------------------------------------------------- serving


def make_server(directory: str | os.PathLike, port: int = 8000, bind: str = "127.0.0.1") -> ThreadingHTTPServer:
    """An HTTP server for a built site (port 0 picks a free port; see ``server.server_address``)."""
    root = Path(directory)
    if not (root / "index.html").is_file():
        raise ExportError(f"{root} holds no index.html; build the site first with `bench leaderboard build`")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    return ThreadingHTTPServer((bind, port), handler)


def serve(directory: str | os.PathLike, port: int = 8000, bind: str = "127.0.0.1") -> None:
    """Serve a built site until interrupted (Ctrl-C)."""
    with make_server(directory, port, bind) as server:
        host, real_port = server.server_address[:2]
        print(f"Serving {directory} at http://{host}:{real_port}/ (Ctrl-C to stop)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass

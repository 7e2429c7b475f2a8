"""Published leaderboard data: one JSON per (suite, defense) entry, a manifest, and two CSVs.

Layout of an export directory::

    manifest.json                    every entry's summary, overall ranking, rank stability, strength frontiers, file hashes
    entries/<suite>/<defense>.json   scores per victim and per (attack, merge), and every cell they rest on
    leaderboard.csv                  one row per (suite, defense) and per defense overall
    recovered.csv                    one row per (suite, defense, victim, attack, merge)
    claims.json                      the claims ledger: each paper claim checked against these numbers (`leaderboard.claims`)

Both JSON kinds are validated against the schemas in ``leaderboard/schema/`` before they are written.
Nothing depends on the wall clock: dates come from the stored cells, keys are sorted and floats
rounded, so re-exporting unchanged results gives byte-identical files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import scoring
from bench.protocol import Protocol, Scope
from bench.scoring import DefenseScore, PairScore, Scores, VictimScore
from bench.store import CellRecord, Metric, Store
from leaderboard.claims import CLAIMS_FILE, claims_document

SCHEMA_VERSION = 3
"""2: counterfactual scores: pairs carry V_P, V_U, V_∅, gain and intervals; victims their held-out worst case.
3: scoring version 3: pairs name their honest counterpart (and, entry-level, the victims they cover), rank
bands, the selection-half value the protocol's breaks read, one break threshold (``broken``, ``broken_on``)."""
SCHEMA_DIR = Path(__file__).resolve().parent / "schema"
SHIPPED = Path(__file__).resolve().parent / "data"
"""The results that ship with the repository (`bench leaderboard export` writes them, `build` reads them)."""
DIGITS = 6
"""Scores are rounded to this many decimals: enough for any metric, stable across platforms."""


class ExportError(ValueError):
    """The results cannot be exported (bad source, or data that fails the published schema)."""


# ---------------------------------------------------------------- sources


@dataclass(frozen=True)
class Cells:
    """Cells gathered from several sources (the shipped export and a user's store), with their runs."""

    records: list[CellRecord]
    runs: dict[str, dict[str, Any]]


def combine(*sources: Any) -> Cells:
    """Cells of every source, later sources winning where a cell is in several. Refused when the sources were
    built from different experts (content hashes of the victim, partner and θ_pre bodies): their cells must
    never pair or supersede each other (`bench leaderboard build --with-shipped` keeps them apart instead)."""
    from bench.scoring.cells import experts

    cells: dict[str, CellRecord] = {}
    runs: dict[str, dict[str, Any]] = {}
    seen: dict[tuple[str, str], tuple[str, ...]] = {}
    for source in sources:
        if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
            records, source_runs = cells_of_export(source)
        else:
            records, source_runs = load_source(source)
        for c in records:
            ident = experts(c)
            if ident is None:
                continue
            key, models = (c.suite, c.victim), (ident[0], ident[2])
            if seen.setdefault(key, models) != models:
                raise ExportError(
                    f"cells of {c.suite}/{c.victim} were built from different experts (expert {models[0][:12]}… "
                    f"against {seen[key][0][:12]}…): they cannot be scored together. The same recipe fine-tunes "
                    "other weights on another CPU; `bench leaderboard build --store S --with-shipped` shows your "
                    "run beside the shipped entries without mixing them")
        cells.update({c.cell_id: c for c in records})
        runs.update(source_runs)
    return Cells(list(cells.values()), runs)


YOUR_RUN = " · your run"
"""Suffix of the defense name of an entry built from a user's store, shown beside the shipped entries."""


def merge_exports(shipped: str | os.PathLike, local: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """An export directory holding the shipped entries as published (never re-scored) and, beside them, the
    entries of a user's own export that rest on at least one cell the user's own runs computed, each renamed
    ``<defense> · your run`` and unranked: shown beside the published ones, never ranked with them.
    The CSV downloads stay the shipped ones (the user's numbers are in their own export)."""
    manifest, entries = load_export(shipped)
    local_manifest, local_entries = load_export(local)
    texts: dict[str, str] = {}
    for doc in entries:
        texts[entry_path(doc["suite"], doc["defense"])] = dumps(doc)
    listed = list(manifest["entries"])
    reason = ("your run: scored from your store alone (the cells it computed and the shipped references it "
              "imported); shown beside the shipped entries, never ranked with them")
    shipped_runs = set(manifest.get("runs") or [])
    for doc in local_entries:
        if all(c["run_id"] in shipped_runs for c in doc["cells"]):
            continue  # nothing computed locally (the shipped references a store imported): shown once, as shipped
        name = doc["defense"] + YOUR_RUN
        summary = {**doc["summary"], "rank": None, "rank_band": None, "unranked_reason": reason}
        doc = {**doc, "defense": name, "summary": summary}
        validate(doc, "entry")
        rel = entry_path(doc["suite"], name)
        texts[rel] = dumps(doc)
        listed.append({"suite": doc["suite"], "defense": name, "file": rel, "summary": summary})
    for extra in ("leaderboard.csv", "recovered.csv"):
        path = Path(shipped) / extra
        if path.is_file():
            texts[extra] = path.read_text(encoding="utf-8")
    files = [{"path": p, "sha256": hashlib.sha256(t.encode()).hexdigest(), "bytes": len(t.encode())}
             for p, t in sorted(texts.items())]
    # the user's frontiers beside the shipped ones, their settings renamed as their entries are
    mine = [{**f, "defense": f["defense"] + YOUR_RUN,
             "points": [{**p, "label": p["label"] + YOUR_RUN, "file": entry_path(f["suite"], p["label"] + YOUR_RUN)}
                        for p in f["points"]]} for f in local_manifest.get("frontiers") or []]
    frontier = {"frontiers": [*(manifest.get("frontiers") or []), *mine]} if "frontiers" in manifest or mine else {}
    combined = {**manifest, **frontier, "entries": listed, "files": files,
                "suites": sorted(set(manifest["suites"]) | set(local_manifest["suites"])),
                "defenses": sorted(set(manifest["defenses"]) | {e["defense"] for e in listed})}
    validate(combined, "manifest")
    texts["manifest.json"] = dumps(combined)
    out = Path(out_dir)
    _remove_stale_entries(out, set(texts))
    for rel, text in sorted(texts.items()):
        _write(out / rel, text)
    return out


def load_source(source: Any) -> tuple[list[CellRecord], dict[str, dict[str, Any]]]:
    """Cells and run environments from a `Store`, a path to a store file, `Cells`, or an iterable of `CellRecord`."""
    if isinstance(source, Cells):
        return list(source.records), dict(source.runs)
    if isinstance(source, Store):
        cells = source.cells()
        return cells, {r: source.run_env(r) for r in sorted({c.run_id for c in cells if c.run_id})}
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ExportError(f"results store {path} does not exist; run `bench run` first or pass the right --store")
        with Store(path) as store:
            return load_source(store)
    try:
        cells = list(source)
    except TypeError as exc:
        raise ExportError(f"cannot read results from a {type(source).__name__}; pass a Store or a store path") from exc
    if not all(isinstance(c, CellRecord) for c in cells):
        raise ExportError("an iterable source must hold only CellRecord objects")
    return cells, {}


def withheld_suites(source: Any, records: Sequence[CellRecord]) -> dict[str, str]:
    """Suites the leaderboard refuses to publish: those that pin a published table (real-scale
    suites) and whose reproduction gate (`bench reproduce`) has not passed on this store."""
    from bench.registry import suites
    from bench.reproduce import gate_passed

    out: dict[str, str] = {}
    for name in sorted({c.suite for c in records}):
        try:
            cls = suites.get(name)
        except Exception:  # a suite whose plugin is no longer installed cannot be gated
            continue
        if getattr(cls, "reference_table", None) is None:
            continue
        passed = gate_passed(source, name) if isinstance(source, (Store, str, os.PathLike)) else None
        if passed is not True:
            out[name] = ("its reproduction gate failed" if passed is False else "its reproduction gate has not run") + \
                f"; run `bench reproduce --suite {name}`"
    return out


# ---------------------------------------------------------------- small helpers


def slug(name: str) -> str:
    """A file-name-safe form of ``name``; a hash suffix keeps distinct names distinct."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "x"
    if safe == name:
        return safe
    return f"{safe[:60]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def entry_path(suite: str, defense: str) -> str:
    """Path of an entry's JSON, relative to the export directory (POSIX separators)."""
    return f"entries/{slug(suite)}/{slug(defense)}.json"


def iso_date(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _num(x: float | None, digits: int = DIGITS) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits) + 0.0  # + 0.0 turns -0.0 into 0.0


def _ci(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else [_num(ci[0]), _num(ci[1])]


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become null, tuples lists, keys strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def dumps(doc: Any) -> str:
    return json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


# ---------------------------------------------------------------- documents


def _flags(ds: DefenseScore | VictimScore) -> list[dict[str, str]]:
    return [{"code": f.code, "message": f.message} for f in ds.flags]


def _pair(p: PairScore) -> dict[str, Any]:
    extra = {"victims": list(p.victims)} if p.victims else {}
    return {**extra, "attack": p.attack, "merge": p.merge, "recovered": _num(p.recovered),
            "recovered_ci": _ci(p.recovered_ci), "counterpart": p.counterpart,
            "v_protected": _num(p.v_protected), "v_unprotected": _num(p.v_unprotected),
            "v_counterfactual": _num(p.v_counterfactual), "gain": _num(p.gain), "gain_ci": _ci(p.gain_ci),
            "informative": p.informative, "examples": p.examples, "n": p.n,
            "na_reason": p.na_reason, "attack_s": _num(p.attack_s, 3), "partner_effect": _num(p.partner_effect)}


def broken(vs: VictimScore, threshold: float) -> bool:
    """The site's one break rule: the victim's held-out best recovered reaches the protocol's threshold."""
    return vs.best_recovered is not None and vs.best_recovered >= threshold


def summary(ds: DefenseScore, broken_by: dict[str, str | None] | None = None,
            broken_on: Sequence[str] = ()) -> dict[str, Any]:
    """The numbers a leaderboard row shows; ``broken_by`` (victim -> protocol step) when a protocol ran."""
    extra = {"broken_by": dict(sorted(broken_by.items()))} if broken_by is not None else {}
    return {**extra, "rank_band": list(ds.rank_band) if ds.rank_band else None, "broken_on": sorted(broken_on),
        "utility": _num(ds.utility), "utility_ci": _ci(ds.utility_ci),
        "security": _num(ds.security), "security_ci": _ci(ds.security_ci),
        "best_attack": ds.best_attack, "best_merge": ds.best_merge, "best_recovered": _num(ds.best_recovered),
        "partner_effect": _num(ds.partner_effect), "protect_s": _num(ds.protect_s, 3),
        "attack_s": _num(ds.attack_s, 3), "peak_rss_mb": _num(ds.peak_rss_mb, 1),
        "complete": ds.complete, "attacks_missing": list(ds.attacks_missing), "rank": ds.rank,
        "unranked_reason": ds.unranked_reason, "flags": _flags(ds), "victims": list(ds.victims),
        "uninformative_victims": list(ds.uninformative_victims), "suites": list(ds.suites),
    }


def _victim(vs: VictimScore, threshold: float, scope: Scope | None = None) -> dict[str, Any]:
    extra = {"broken_by": scope.broken_by.get((vs.suite, vs.defense, vs.victim))} if scope is not None else {}
    return {**extra, "selection_recovered": _num(vs.selection_recovered), "broken": broken(vs, threshold),
        "victim": vs.victim, "metric": vs.metric, "higher_is_better": vs.higher_is_better,
        "acc_pre": _num(vs.acc_pre), "acc_ft": _num(vs.acc_ft),
        "utility": _num(vs.utility), "utility_ci": _ci(vs.utility_ci),
        "security": _num(vs.security), "security_ci": _ci(vs.security_ci),
        "best_attack": vs.best_attack, "best_merge": vs.best_merge, "best_recovered": _num(vs.best_recovered),
        "informative": vs.informative, "failed_cells": list(vs.failed_cells),
        "partner_effect": _num(vs.partner_effect), "protect_s": _num(vs.protect_s, 3),
        "attack_s": _num(vs.attack_s, 3), "peak_rss_mb": _num(vs.peak_rss_mb, 1),
        "complete": vs.complete, "attacks_evaluated": list(vs.attacks_evaluated),
        "attacks_missing": list(vs.attacks_missing), "attacks_na": dict(vs.attacks_na),
        "replicates": [{"partners": list(p), "seed": s} for p, s in vs.replicates],
        "flags": _flags(vs), "recovered": [_pair(p) for p in vs.pairs], "cells": list(vs.cell_ids),
    }


def _cell(c: CellRecord) -> dict[str, Any]:
    return {
        "cell_id": c.cell_id, "kind": c.kind, "filling": c.filling, "suite": c.suite, "victim": c.victim,
        "partners": list(c.partners),
        "defense": c.defense, "attack": c.attack, "merge": c.merge, "seed": c.seed, "status": c.status,
        "reason": c.reason, "spec": _clean(c.spec), "provenance": _clean(c.provenance),
        "metrics": [{"role": m.role, "task": m.task, "metric": m.metric, "value": _clean(float(m.value)),
                     "higher_is_better": m.higher_is_better, "examples": m.examples} for m in c.metrics],
        "run_id": c.run_id, "date": iso_date(c.created),
    }


def _plugin_specs(cells: Iterable[CellRecord], key: str) -> list[Any]:
    """Distinct specs of one plugin kind as the cells recorded them (the whole spec when not split by kind)."""
    seen: dict[str, Any] = {}
    for c in cells:
        spec = c.spec.get(key, c.spec) if isinstance(c.spec, dict) else c.spec
        spec = _clean(spec)
        seen[json.dumps(spec, sort_keys=True)] = spec
    return [seen[k] for k in sorted(seen)]


def _specs(own: list[CellRecord]) -> dict[str, Any]:
    by_attack: dict[str, list[CellRecord]] = {}
    by_merge: dict[str, list[CellRecord]] = {}
    for c in own:
        by_attack.setdefault(c.attack, []).append(c)
        by_merge.setdefault(c.merge, []).append(c)
    return {"defense": _plugin_specs(own, "defense"),
            "attacks": {a: _plugin_specs(cs, "attack") for a, cs in sorted(by_attack.items())},
            "merges": {m: _plugin_specs(cs, "merge") for m, cs in sorted(by_merge.items())}}


def break_threshold(protocol: Protocol | None) -> float:
    """The one break threshold: the protocol's (the standard protocol's for an ad-hoc export)."""
    from bench.protocol import STANDARD

    return (protocol or STANDARD).break_threshold


def _broken_on(scores: Scores, ds: DefenseScore, threshold: float) -> list[str]:
    if ds.suite is None:
        return sorted(f"{v.suite}/{v.victim}" for v in scores.victims
                      if v.defense == ds.defense and v.suite in ds.suites and broken(v, threshold))
    return [v.victim for v in scores.victim_scores(ds.suite, ds.defense) if broken(v, threshold)]


def _common(scores: Scores, protocol: Protocol | None = None) -> dict[str, Any]:
    config = {**_clean(scores.config), "break_threshold": break_threshold(protocol)}
    standard = list(scores.standard_attacks)
    if protocol is not None:
        config = {**config, "protocol": protocol.describe()}
        standard = protocol.attacks()
    return {"schema_version": SCHEMA_VERSION, "config": config, "standard_attacks": standard, "metrics": scoring.METRICS}


def _broken_by(scope: Scope | None, ds: DefenseScore) -> dict[str, str | None] | None:
    if scope is None or ds.suite is None:
        return None
    return {v: scope.broken_by.get((ds.suite, ds.defense, v)) for v in ds.victims}


def entry_document(scores: Scores, ds: DefenseScore, cells: dict[str, CellRecord],
                   runs: dict[str, dict[str, Any]], protocol: Protocol | None = None,
                   scope: Scope | None = None) -> dict[str, Any]:
    """The published JSON of one (suite, defense)."""
    victims = scores.victim_scores(ds.suite, ds.defense)
    ids = sorted({i for v in victims for i in v.cell_ids})
    used = [cells[i] for i in ids if i in cells]
    own = [c for c in used if c.kind == "merge" and c.filling == "protected" and c.defense == ds.defense and c.status == "ok"]
    run_ids = sorted({c.run_id for c in used if c.run_id})
    return {
        **_common(scores, protocol),
        "suite": ds.suite, "defense": ds.defense,
        "date": iso_date(max((c.created for c in used), default=0.0)),
        "summary": summary(ds, _broken_by(scope, ds), _broken_on(scores, ds, break_threshold(protocol))),
        "recovered": [_pair(p) for p in ds.pairs],
        "victims": [_victim(v, break_threshold(protocol), scope) for v in victims],
        "specs": _specs(own),
        "cells": [_cell(c) for c in used],
        "runs": {r: _clean(runs.get(r, {})) for r in run_ids},
    }


def _stability(scores: Scores) -> list[dict[str, Any]]:
    out = []
    for group, st in sorted(scores.stability.items()):
        out.append({
            "suite": None if group == "*" else group, "defenses": list(st.defenses),
            "rank_probability": [[_num(p) for p in row] for row in st.rank_probability],
            "pairwise_flip": [{"a": a, "b": b, "flip_rate": _num(r)} for a, b, r in st.pairwise_flip],
            "stable_fraction": _num(st.stable_fraction),
        })
    return out


def _declared_order(name: str) -> dict[tuple[str, str], int]:
    """(knob, variant label) -> position in the installed defense's declared frontier (empty when the plugin is not
    installed or declares none): the order its points are drawn in, weak to strong."""
    from bench.plan import make_defense
    from bench.registry import defenses

    try:
        declared = defenses.get(name).frontier
        return {(k, make_defense(name, {k: v}).label): i for k, values in declared.items() for i, v in enumerate(values)}
    except Exception:  # a defense no longer installed, or a declaration it no longer accepts: stored order
        return {}


def frontiers(scores: Scores, records: Sequence[CellRecord]) -> list[dict[str, Any]]:
    """Per (suite, defense) with at least two stored settings (variant labels ``NAME[key=value]``, `bench frontier`):
    each setting's utility and security with their intervals, as its entry's summary has them. A variant that
    changes one parameter is a point of that ``knob`` with its ``value`` (from the stored spec); the default setting
    is a point of every knob the stored variants vary (``default``: true, ``knob`` null when none does); a
    variant that changes several has ``knob`` null. Points run knob by knob in the declared order."""
    from bench.params import ParamError
    from bench.plan import parse_variant

    params = {(c.suite, c.defense): (c.spec.get("defense") or {}).get("params") or {} for c in records
              if c.kind in ("utility", "merge") and c.filling == "protected" and isinstance(c.spec, dict)}
    groups: dict[tuple[str, str], list[tuple[DefenseScore, dict[str, str]]]] = {}
    for ds in scores.suites:
        if ds.suite is None or ds.defense == scoring.REFERENCE:
            continue
        try:
            name, changed = parse_variant(ds.defense)
        except ParamError:
            continue
        groups.setdefault((ds.suite, name), []).append((ds, changed))
    out = []
    for (suite, name), items in sorted(groups.items()):
        if len(items) < 2:
            continue
        knobs = sorted({k for _, changed in items if len(changed) == 1 for k in changed})
        order = _declared_order(name)
        points = []
        for ds, changed in items:
            if not changed:  # the default setting: a point of every knob the variants vary
                point_knobs: list[str | None] = [*knobs] or [None]
            else:  # one knob's point, or (several keys changed) no knob's
                point_knobs = list(changed) if len(changed) == 1 else [None]
            for knob in point_knobs:
                value = params.get((suite, ds.defense), {}).get(knob, changed.get(knob)) if knob else None
                s = summary(ds)
                points.append({"label": ds.defense, "knob": knob, "value": _clean(value), "default": not changed,
                               "utility": s["utility"], "utility_ci": s["utility_ci"], "security": s["security"],
                               "security_ci": s["security_ci"], "file": entry_path(suite, ds.defense)})
        points.sort(key=lambda p: (p["knob"] is None, p["knob"] or "", order.get((p["knob"], p["label"]), len(order)),
                                   p["label"]))
        out.append({"suite": suite, "defense": name, "points": points})
    return out


def manifest_document(scores: Scores, records: list[CellRecord], files: list[dict[str, Any]],
                      protocol: Protocol | None = None, scope: Scope | None = None) -> dict[str, Any]:
    """The published index: summaries, overall ranking, rank stability, the strength frontiers of defenses with
    several stored settings (`frontiers`) and the hash of every file; under a
    protocol, also the signal table of every suite (each victim's merge gain with its interval)."""
    from bench.protocol import signal

    merges = [c for c in records if c.kind == "merge"]
    threshold = break_threshold(protocol)
    extra: dict[str, Any] = {}
    if protocol is not None:
        extra["signal"] = {suite: [{**row, "gain": _num(row["gain"]), "gain_ci": _ci(row["gain_ci"]),
                                    "v_unprotected": _num(row["v_unprotected"]),
                                    "v_counterfactual": _num(row["v_counterfactual"])}
                                   for row in signal(scores, protocol, suite)]
                           for suite in sorted({s.suite for s in scores.suites if s.suite})}
    return {
        **_common(scores, protocol), **extra,
        "date": iso_date(max((c.created for c in records), default=0.0)),
        "n_cells": len(records),
        "runs": sorted({c.run_id for c in records if c.run_id}),
        "suites": sorted({s.suite for s in scores.suites}),
        "defenses": sorted({c.defense for c in merges if c.filling != "counterfactual"}),
        "attacks": sorted({c.attack for c in merges} | set(scores.standard_attacks)),
        "merges": sorted({c.merge for c in merges}),
        "entries": [{"suite": ds.suite, "defense": ds.defense, "file": entry_path(ds.suite, ds.defense),
                     "summary": summary(ds, _broken_by(scope, ds), _broken_on(scores, ds, threshold))}
                    for ds in scores.suites],
        "overall": [{"defense": ds.defense, "summary": summary(ds, broken_on=_broken_on(scores, ds, threshold))}
                    for ds in scores.overall],
        "rank_stability": _stability(scores),
        "not_applicable": [{"suite": s, "defense": d, "reason": r} for s, d, r in scores.not_applicable],
        "frontiers": frontiers(scores, records),
        "files": files,
    }


# ---------------------------------------------------------------- CSVs


LEADERBOARD_COLUMNS = ("group", "defense", "rank", "rank_worst", "utility", "utility_lo", "utility_hi", "security", "security_lo",
                       "security_hi", "best_attack", "best_merge", "best_recovered", "partner_effect", "protect_s",
                       "attack_s", "peak_rss_mb", "complete", "flags")
RECOVERED_COLUMNS = ("suite", "defense", "victim", "attack", "merge", "recovered", "recovered_lo", "recovered_hi",
                     "v_protected", "v_unprotected", "v_counterfactual", "gain", "gain_lo", "gain_hi", "informative",
                     "examples", "n", "na_reason", "attack_s", "partner_effect")


def _csv(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return buf.getvalue()


def leaderboard_csv(scores: Scores) -> str:
    rows = []
    for group, items in [("overall", scores.overall), *[(s.suite, [s]) for s in scores.suites]]:
        for ds in items:
            s = summary(ds)
            rows.append({**s, "group": group, "defense": ds.defense,
                         "rank_worst": ds.rank_band[1] if ds.rank_band else None,
                         "utility_lo": (s["utility_ci"] or [None, None])[0],
                         "utility_hi": (s["utility_ci"] or [None, None])[1],
                         "security_lo": (s["security_ci"] or [None, None])[0],
                         "security_hi": (s["security_ci"] or [None, None])[1],
                         "flags": ";".join(f["code"] for f in s["flags"])})
    return _csv(LEADERBOARD_COLUMNS, rows)


def recovered_csv(scores: Scores) -> str:
    rows = []
    for v in scores.victims:
        for p in v.pairs:
            row = _pair(p)
            rec, gain = row["recovered_ci"] or [None, None], row["gain_ci"] or [None, None]
            rows.append({"suite": v.suite, "defense": v.defense, "victim": v.victim, **row,
                         "recovered_lo": rec[0], "recovered_hi": rec[1], "gain_lo": gain[0], "gain_hi": gain[1]})
    return _csv(RECOVERED_COLUMNS, rows)


# ---------------------------------------------------------------- schema


def load_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of ``kind`` ('entry' or 'manifest')."""
    return json.loads((SCHEMA_DIR / f"{kind}.schema.json").read_text(encoding="utf-8"))


def validate(doc: Any, kind: str) -> None:
    """Raise `ExportError` naming the first violation of the ``kind`` schema."""
    import jsonschema
    from referencing import Registry, Resource

    # The manifest schema refers to definitions in the entry schema by its $id.
    schemas = [load_schema(k) for k in ("entry", "manifest")]
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas)
    validator = jsonschema.Draft202012Validator(load_schema(kind), registry=registry)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "(root)"
        raise ExportError(f"{kind} JSON violates its schema at {where}: {errors[0].message}")


# ---------------------------------------------------------------- writing


def _write(path: Path, text: str) -> None:
    """Atomic write: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export(store: Any, out_dir: str | os.PathLike, *, attacks: Sequence[str] | None = None,
           utility_floor: float = scoring.UTILITY_FLOOR, n_bootstrap: int = scoring.N_BOOTSTRAP,
           ci_level: float = scoring.CI_LEVEL, seed: int = 0, protocol: Protocol | None = None) -> list[Path]:
    """Score the results in ``store`` and write the published files under ``out_dir``; returns their paths.

    Without ``protocol``, ``attacks`` is the standard attack set (default: every registered attack and
    declared composite, `bench.plan.standard_attacks`) and every stored cell is scored. With a ``protocol`` (`bench.protocol`), only the cells its steps
    planned are scored, an entry is complete when every step it needs (up to the one that broke it, on
    each victim) is stored, and every entry says which step broke it. Entry files of (suite, defense)
    pairs no longer in the results are removed, so the directory mirrors the source.
    """
    records, runs = load_source(store)
    withheld = withheld_suites(store, records)
    for name, reason in withheld.items():
        print(f"leaderboard: not publishing suite {name!r}: {reason}", file=sys.stderr)
    records = [c for c in records if c.suite not in withheld]
    scope = None
    missing = None
    if protocol is not None:
        from bench.protocol import scope as protocol_scope

        scope = protocol_scope(records, protocol)
        for name, reason in scope.skipped_suites.items():
            print(f"leaderboard: not publishing suite {name!r}: {reason}", file=sys.stderr)
        records, attacks, missing = scope.records, [], scope.missing
    elif attacks is None:  # an ad-hoc export: every attack the installed plugins declare standard
        from bench.plan import standard_attacks

        attacks = standard_attacks()
    scores = scoring.score(records, attacks=attacks, utility_floor=utility_floor, n_bootstrap=n_bootstrap,
                           ci_level=ci_level, seed=seed, missing=missing)
    if scope is not None:  # the planner's rule lists a defense that cannot act on a suite even with no stored cell
        listed = {(s, d) for s, d, _r in scores.not_applicable} | {(e.suite, e.defense) for e in scores.suites}
        scores.not_applicable = sorted([*scores.not_applicable,
                                        *(x for x in scope.not_applicable if (x[0], x[1]) not in listed)])
    by_id = {c.cell_id: c for c in records}
    texts: dict[str, str] = {}
    docs: list[dict[str, Any]] = []
    for ds in scores.suites:
        doc = entry_document(scores, ds, by_id, runs, protocol, scope)
        validate(doc, "entry")
        docs.append(doc)
        texts[entry_path(ds.suite, ds.defense)] = dumps(doc)
    texts["leaderboard.csv"] = leaderboard_csv(scores)
    texts["recovered.csv"] = recovered_csv(scores)
    texts[CLAIMS_FILE] = dumps(claims_document(docs, [{"suite": s, "defense": d, "reason": r}
                                                      for s, d, r in scores.not_applicable]))
    files = [{"path": p, "sha256": hashlib.sha256(t.encode()).hexdigest(), "bytes": len(t.encode())}
             for p, t in sorted(texts.items())]
    manifest = manifest_document(scores, records, files, protocol, scope)
    validate(manifest, "manifest")
    texts["manifest.json"] = dumps(manifest)

    out = Path(out_dir)
    _remove_stale_entries(out, set(texts))
    written = []
    for rel, text in sorted(texts.items()):
        _write(out / rel, text)
        written.append(out / rel)
    return written


def _remove_stale_entries(out: Path, keep: set[str]) -> None:
    entries = out / "entries"
    if not entries.is_dir():
        return
    for path in sorted(entries.rglob("*.json")):
        if path.relative_to(out).as_posix() not in keep:
            path.unlink()


def load_export(export_dir: str | os.PathLike, *, older: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The validated manifest and entry documents of an export directory. With ``older``, an export of an
    earlier schema version is accepted unvalidated (its cells are still read, to be re-scored)."""
    root = Path(export_dir)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise ExportError(f"{root} holds no manifest.json; create it with `bench leaderboard export`")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    current = manifest.get("schema_version") == SCHEMA_VERSION
    if current or not older:
        validate(manifest, "manifest")
    entries = []
    for item in manifest["entries"]:
        path = root / item["file"]
        if not path.is_file():
            raise ExportError(f"{path} is listed in the manifest but missing; re-run `bench leaderboard export`")
        doc = json.loads(path.read_text(encoding="utf-8"))
        if current or not older:
            validate(doc, "entry")
        elif not isinstance(doc.get("cells"), list):
            raise ExportError(f"{path} (schema version {doc.get('schema_version')}) holds no cells to re-score")
        entries.append(doc)
    return manifest, entries


def cells_of_export(export_dir: str | os.PathLike) -> tuple[list[CellRecord], dict[str, dict[str, Any]]]:
    """Every cell an export publishes (entries carry each cell they rest on, with its per-example outcomes),
    and the run environments: what `bench leaderboard build --store S --with-shipped` merges with a
    user's own store. A cell in several entries is read once."""
    _manifest, entries = load_export(export_dir, older=True)
    cells: dict[str, CellRecord] = {}
    runs: dict[str, dict[str, Any]] = {}
    for doc in entries:
        runs.update(doc.get("runs", {}))
        for c in doc["cells"]:
            if c["cell_id"] in cells:
                continue
            created = datetime.strptime(c["date"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp() \
                if "T" in c["date"] else 0.0
            cells[c["cell_id"]] = CellRecord(
                cell_id=c["cell_id"], kind=c["kind"], suite=c["suite"], victim=c["victim"],
                partners=tuple(c["partners"]), defense=c["defense"], attack=c["attack"], merge=c["merge"],
                seed=c["seed"], status=c["status"], reason=c["reason"], spec=c["spec"], provenance=c["provenance"],
                metrics=tuple(Metric(m["role"], m["task"], m["metric"], float(m["value"]) if m["value"] is not None
                                     else math.nan, m["higher_is_better"], m["examples"]) for m in c["metrics"]),
                run_id=c["run_id"], created=created, filling=c["filling"])
    return list(cells.values()), runs

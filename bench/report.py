"""Terminal tables of stored results (``bench run`` prints them at the end; ``bench results`` on demand)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from tabulate import tabulate

from bench.scoring import DefenseScore, Scores
from bench.store import CellRecord, newest_ok, strict_json


def results_frame(records: Sequence[CellRecord]) -> pd.DataFrame:
    """One row per stored metric, with the cell's coordinates (the long format CSV/JSON export)."""
    rows = []
    for r in records:
        base = {"cell_id": r.cell_id, "suite": r.suite, "kind": r.kind, "victim": r.victim, "partners": ",".join(r.partners),
                "defense": r.defense, "attack": r.attack, "merge": r.merge, "seed": r.seed, "status": r.status,
                "reason": r.reason}
        if not r.metrics:
            rows.append({**base, "role": None, "task": None, "metric": None, "value": None, "higher_is_better": None})
        for m in r.metrics:
            rows.append({**base, "role": m.role, "task": m.task, "metric": m.metric, "value": m.value,
                         "higher_is_better": m.higher_is_better})
    return pd.DataFrame(rows)


def _pivot(df: pd.DataFrame, index: list[str], tasks: list[str]) -> pd.DataFrame:
    table = df.pivot_table(index=index, columns="task", values="value", aggfunc="mean")
    table = table.reindex(columns=[t for t in tasks if t in table.columns])
    table["mean"] = table.mean(axis=1)
    return table


def summary_tables(records: Sequence[CellRecord], metric: str = "accuracy", tasks: Sequence[str] = ()) -> str:
    """Standalone accuracy (θ_pre, experts, protected artifacts) and merged victim accuracy per cell;
    columns in the order of ``tasks`` (the suite's), then any other victim by name."""
    df = results_frame(records)
    if df.empty or df["metric"].isna().all():
        return "no results"
    newest = newest_ok(records)  # a superseded cell is neither shown nor averaged in
    ok = df[df.cell_id.isin({c.cell_id for c in newest}) & (df.metric == metric)]
    done = {c.coordinates for c in newest}
    unfinished = {r.cell_id for r in records if r.status != "ok" and r.coordinates not in done}
    tasks = [t for t in tasks if t in set(ok["victim"])] + sorted(set(ok["victim"]) - set(tasks))
    parts = []
    base = ok[ok.role.isin(["pretrained", "expert"])]
    util = ok[ok.role == "utility"].assign(role=lambda d: "protected: " + d.defense)
    standalone = pd.concat([base, util])
    if not standalone.empty:
        t = _pivot(standalone, ["suite", "role"], tasks)
        order = {"pretrained": 0, "expert": 1}
        t = t.sort_index(key=lambda idx: idx.map(lambda v: (order.get(v, 2), v)) if idx.name == "role" else idx)
        parts.append(f"Standalone {metric} (θ_pre = pretrained body with each expert's head):\n"
                     + tabulate(t, headers="keys", floatfmt=".3f", tablefmt="github"))
    merged = ok[(ok.role == "merged") & (ok.task == ok.victim)]
    if not merged.empty:
        t = _pivot(merged, ["suite", "defense", "attack", "merge"], tasks)
        parts.append(f"Merged {metric} on the victim task (columns: victim; partners merged alongside):\n"
                     + tabulate(t, headers="keys", floatfmt=".3f", tablefmt="github"))
    na = df[df.cell_id.isin(unfinished)].drop_duplicates("cell_id")
    if not na.empty:
        counts = na.groupby(["status", "defense", "attack", "reason"]).size().reset_index(name="cells")
        parts.append("Not run:\n" + tabulate(counts, headers="keys", tablefmt="github", showindex=False, maxcolwidths=[None, None, None, 70, None]))
    return "\n\n".join(parts)


def to_format(records: Sequence[CellRecord], fmt: str) -> str:
    df = results_frame(records)
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        # pandas fills a cell without metrics with NaN; strict JSON writes it as null, never a bare NaN
        return strict_json(df.to_dict(orient="records"), indent=1)
    return summary_tables(records)


def protocol_table(scores: Scores, broken_by: Mapping[tuple[str, str, str], str | None]) -> str:
    """One row per (suite, defense) of a protocol's scores: utility, security with its interval, the step
    that broke it on each victim where it broke, costs and flags (`bench run --protocol` prints it)."""
    rows = []
    for ds in sorted(scores.suites, key=lambda d: (d.suite, d.rank is None, d.rank or 0, d.defense)):
        broke = [f"{v}: {broken_by[(ds.suite, ds.defense, v)]}" for v in ds.victims
                 if broken_by.get((ds.suite, ds.defense, v))]
        rows.append([ds.rank if ds.rank is not None else "-", ds.suite, ds.defense, _fmt(ds.utility),
                     _fmt(ds.security), _fmt_ci(ds.security_ci), "; ".join(broke) or "-",
                     _fmt(ds.protect_s, 0), _fmt(ds.attack_s, 0), ",".join(f.code for f in ds.flags)])
    return tabulate(rows, headers=["rank", "suite", "defense", "utility", "security", "security CI", "broken by",
                                   "protect s", "attack s", "flags"], tablefmt="github", disable_numparse=True)


def signal_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A suite's signal: each victim's merge gain V_U − V_∅ with its interval, per merge."""
    body = [[r["victim"], r["merge"], _fmt(r["v_unprotected"]), _fmt(r["v_counterfactual"]), _fmt(r["gain"]),
             _fmt_ci(r["gain_ci"]), "yes" if r["informative"] else "NO", r["examples"]] for r in rows]
    return tabulate(body, headers=["victim", "merge", "V_U", "V_∅", "gain", "gain CI", "significant", "examples"],
                    tablefmt="github", disable_numparse=True)


def profile_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Wall seconds per step group and stage (`bench.protocol.stage_profile`)."""
    stages = ("protect", "prepare", "merge", "finish", "evaluate", "wall")
    body = [[r["group"], r["cells"], *(f"{r[s]:.0f}" for s in stages)] for r in rows]
    total = ["total", sum(r["cells"] for r in rows), *(f"{sum(r[s] for r in rows):.0f}" for s in stages)]
    return tabulate([*body, total], headers=["step group", "cells", *(f"{s} s" for s in stages)],
                    tablefmt="github", disable_numparse=True)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _fmt_ci(ci: Sequence[float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


# ---------------------------------------------------------------- the scores table (`bench results --scores`)


TABLE_HEADERS = ("rank", "suite", "defense", "utility", "security", "security CI", "best attack", "recovered",
                 "uninformative", "protect s", "attack s", "flags")


def table_rows(scores: Scores, *, include_overall: bool = True) -> list[tuple[Any, ...]]:
    """One row per (suite, defense) and, first, one per defense overall; ranked rows first in each group."""
    groups: list[tuple[str, list[DefenseScore]]] = []
    if include_overall:
        groups.append(("overall", scores.overall))
    for suite in sorted({s.suite for s in scores.suites if s.suite}):
        groups.append((suite, [s for s in scores.suites if s.suite == suite]))
    rows = []
    for label, group in groups:
        for ds in sorted(group, key=lambda d: (d.rank is None, d.rank or 0, -(d.security or 0.0), -(d.utility or 0.0), d.defense)):
            rows.append((
                ds.rank if ds.rank is not None else "-", label, ds.defense, _fmt(ds.utility), _fmt(ds.security),
                _fmt_ci(ds.security_ci), f"{ds.best_attack}/{ds.best_merge}" if ds.best_attack else "-",
                _fmt(ds.best_recovered), ",".join(ds.uninformative_victims) or "",
                _fmt(ds.protect_s, 1), _fmt(ds.attack_s, 1), ",".join(f.code for f in ds.flags) or "",
            ))
    return rows


def format_table(scores: Scores, *, include_overall: bool = True) -> str:
    """The leaderboard as a plain-text table (what `bench leaderboard` prints)."""
    rows = table_rows(scores, include_overall=include_overall)
    if not rows:
        return "no scored cells: run `bench run` first"
    return tabulate(rows, headers=TABLE_HEADERS, disable_numparse=True)

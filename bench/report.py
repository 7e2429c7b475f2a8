"""Terminal tables of stored results (``bench run`` prints them at the end; ``bench results`` on demand)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from tabulate import tabulate

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

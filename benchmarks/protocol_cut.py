"""What a protocol cut changes: the same (defense, victim, attack, merge) cells in two stores, side by side.

A new protocol version changes how a step is computed (AdaMerging's schedule, BatchNorm repair on fewer
images, partner tasks left out of an evaluation). Its cost is measured by the cells' own times; what it gives up
is measured here, cell by cell, on the pairs both stores hold: every merge cell is matched with the cell of the
other store that has the same suite, victim, defense, filling, attack, merge name and seed (parameters and
plugin versions may differ: that is the cut), its victim metric compared, and for every protected pair whose
unprotected and counterfactual references are in both stores the recovered fraction (the scoring's own,
`bench.scoring.bootstrap.PairStatistics.recovered`) is compared with a paired bootstrap over the victim's test
examples (the same examples, the same draws, in both stores).

    .venv/bin/python benchmarks/protocol_cut.py --old OLD.sqlite --new NEW.sqlite [--merge adamerging-layer]
        [--suite vision-effnet] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.outcomes import decode  # noqa: E402
from bench.scoring import CI_LEVEL  # noqa: E402
from bench.scoring.bootstrap import PairOutcomes, bootstrap_counts, pair_statistics, percentile_ci  # noqa: E402
from bench.store import CellRecord, Store  # noqa: E402
from benchmarks._common import write_json  # noqa: E402

Key = tuple[str, str, str, str, str, str, int]
"""(suite, victim, defense, filling, attack, merge, seed)."""


def _key(r: CellRecord) -> Key:
    return (r.suite, r.victim, r.defense, r.filling, r.attack, r.merge, r.seed)


def victim_outcomes(r: CellRecord) -> np.ndarray | None:
    """Per-example outcomes of the merged model on the victim task in the metric's direction (sign-flipped when
    lower is better, as the scoring reads them), or None when not recorded."""
    for m in r.metrics:
        if m.task == r.victim and m.role == "merged" and m.examples:
            x = np.asarray(decode(m.examples), dtype=float)
            return x if m.higher_is_better else -x
    return None


def merge_cells(path: str, merges: set[str] | None, suites: set[str] | None,
                exclude: set[str] = frozenset()) -> dict[Key, CellRecord]:
    """The finished merge cells of a store by `Key`, leaving out the cell ids in ``exclude`` (the new store may be
    a copy of the old one with the cut's cells added)."""
    with Store(path, readonly=True) as st:
        return {_key(r): r for r in st.cells() if r.kind == "merge" and r.status == "ok" and r.cell_id not in exclude
                and (not merges or r.merge in merges) and (not suites or r.suite in suites)}


def recovered(p: np.ndarray, u: np.ndarray, z: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per row of example ``weights`` [B, n]: the pair's recovered fraction (NaN where the gain is not positive)."""
    outcomes = PairOutcomes(*(x[None, :] for x in (p, u, z)))
    return pair_statistics(outcomes, weights, np.ones((len(weights), 1))).recovered


def compare(old: dict[Key, CellRecord], new: dict[Key, CellRecord], *, draws: int = 2000,
            seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(cell rows, recovered rows) over the keys both stores hold."""
    cells = []
    for k in sorted(old.keys() & new.keys()):
        a, b = victim_outcomes(old[k]), victim_outcomes(new[k])
        if a is None or b is None or len(a) != len(b):
            continue
        cells.append({"suite": k[0], "victim": k[1], "defense": k[2], "filling": k[3], "attack": k[4], "merge": k[5],
                      "seed": k[6], "v_old": float(a.mean()), "v_new": float(b.mean()),
                      "diff": float(b.mean() - a.mean()),
                      "s_old": (old[k].provenance or {}).get("wall_seconds"),
                      "s_new": (new[k].provenance or {}).get("wall_seconds")})
    rng = np.random.default_rng(seed)
    pairs: list[dict[str, Any]] = []
    for k in sorted(old.keys() & new.keys()):
        suite, victim, defense, filling, attack, merge, s = k
        if filling != "protected":
            continue
        refs = []
        for store in (old, new):
            u = store.get((suite, victim, "none", "unprotected", attack, merge, s)) or \
                store.get((suite, victim, "none", "unprotected", "none", merge, s))
            z = store.get((suite, victim, "counterfactual", "counterfactual", attack, merge, s)) or \
                store.get((suite, victim, "counterfactual", "counterfactual", "none", merge, s))
            refs.append((u, z))
        if any(u is None or z is None for u, z in refs):
            continue
        o = [victim_outcomes(x) for x in (old[k], *refs[0])]
        n = [victim_outcomes(x) for x in (new[k], *refs[1])]
        if any(x is None for x in o + n) or len({len(x) for x in o + n}) != 1:
            continue
        point = np.ones((1, len(o[0])))
        counts = bootstrap_counts(rng, len(o[0]), draws)  # the same draws for both stores: a paired bootstrap
        r_old, r_new = float(recovered(*o, point)[0]), float(recovered(*n, point)[0])
        ci = percentile_ci(recovered(*n, counts) - recovered(*o, counts), CI_LEVEL, undefined=(-1.0, 1.0))
        pairs.append({"suite": suite, "victim": victim, "defense": defense, "attack": attack, "merge": merge, "seed": s,
                      "recovered_old": r_old, "recovered_new": r_new, "diff": r_new - r_old,
                      "diff_ci": None if ci is None else [float(ci[0]), float(ci[1])]})
    return cells, pairs


def _table(rows: Iterable[dict[str, Any]], cols: list[str]) -> str:
    rows = list(rows)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = []
        for c in cols:
            v = r[c]
            vals.append(f"{v:.3f}" if isinstance(v, float) else (f"[{v[0]:+.3f}, {v[1]:+.3f}]" if isinstance(v, list)
                                                                 else "-" if v is None else str(v)))
        out.append("| " + " | ".join(vals) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="the store of the earlier protocol version")
    ap.add_argument("--new", required=True, help="the store of the cut")
    ap.add_argument("--merge", default="", help="only these merges (comma list)")
    ap.add_argument("--suite", default="", help="only these suites (comma list)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    merges = {m for m in args.merge.split(",") if m} or None
    suites = {s for s in args.suite.split(",") if s} or None
    old = merge_cells(args.old, merges, suites)
    cells, pairs = compare(old, merge_cells(args.new, merges, suites, exclude={r.cell_id for r in old.values()}))
    print(f"{len(cells)} cells in both stores\n")
    print(_table(cells, ["suite", "victim", "defense", "filling", "attack", "merge", "seed", "v_old", "v_new", "diff",
                         "s_old", "s_new"]))
    print(f"\n{len(pairs)} protected pairs with their references in both stores\n")
    print(_table(pairs, ["suite", "victim", "defense", "attack", "merge", "seed", "recovered_old", "recovered_new",
                         "diff", "diff_ci"]))
    if cells:
        d = np.array([c["diff"] for c in cells])
        print(f"\nvictim metric, new − old: mean {d.mean():+.4f}, largest |diff| {np.abs(d).max():.4f}")
        so = [c["s_old"] for c in cells if c["s_old"] and c["s_new"]]
        sn = [c["s_new"] for c in cells if c["s_old"] and c["s_new"]]
        if so:
            print(f"cell seconds, new / old: {sum(sn) / sum(so):.2f} ({sum(sn):.0f} / {sum(so):.0f} s)")
    if args.json:
        write_json(args.json, {"cells": cells, "pairs": pairs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

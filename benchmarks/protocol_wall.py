"""Where the wall-clock time of a protocol run went: minutes per suite and step group, from the stored cells.

`bench run --dry-run` estimates a run from the stored cells' own times, and `bench.protocol.stage_profile` sums
those times (cell-seconds, which count each of the parallel workers' seconds). This prints what the clock did
(`bench.protocol.wall_profile`: each gap between two cells' finishes is charged to the step group of the cell that
closed it; a suite's first gap, less its cell's own time, is its start-up: the experts it fine-tunes or loads).

    .venv/bin/bench run --protocol standard --suite vision-effnet,text-mix --jobs 2 --store cold.sqlite \\
        --cache-dir cold-cache
    .venv/bin/python benchmarks/protocol_wall.py --store cold.sqlite [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.protocol import get_protocol, wall_profile  # noqa: E402
from bench.store import Store  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="the run's store (SQLite)")
    ap.add_argument("--protocol", default="standard", help="the protocol whose step groups name the rows")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    protocol = get_protocol(args.protocol)
    with Store(args.store, readonly=True) as store:
        runs = store.run_times()
        cells = store.cells()
    rows = wall_profile(cells, runs, protocol)
    print("| suite | step group | cells | wall minutes |\n|---|---|---|---|")
    for suite in dict.fromkeys(r["suite"] for r in rows):
        mine = [r for r in rows if r["suite"] == suite]
        for r in mine:
            print(f"| {suite} | {r['group']} | {r['cells']} | {r['seconds'] / 60:.1f} |")
        print(f"| {suite} | **all** | | **{sum(r['seconds'] for r in mine) / 60:.1f}** |")
    total = sum(r["seconds"] for r in rows)
    last: dict[str, float] = {}
    for r in cells:
        last[r.run_id] = max(last.get(r.run_id, 0.0), r.created)
    spans = [(s, f if f is not None else last.get(run, s)) for run, (s, f) in runs.items() if s > 0]
    clock = sum(f - s for s, f in spans)
    print(f"\nall suites: {total / 60:.1f} min from the first run's start to the last cell; the runs' own clock "
          f"(started to finished, or to its last cell while unfinished; {len(spans)} run(s)): {clock / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({"protocol": protocol.stamp(), "rows": rows,
                                               "total_seconds": round(total, 1), "runs_seconds": round(clock, 1)},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

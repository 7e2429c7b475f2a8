"""How much do the seeds move a number, against how much the test examples do? Reads a store holding the same
cells under several seeds (`bench run ... --seeds 0,1,2`) and prints, per (victim, filling, defense, attack,
merge): the victim metric under each seed, the spread between seeds (sample standard deviation) and the
standard error from the test examples of one cell (the binomial SE of its per-example outcomes, what the
published intervals rest on), and their ratio.

A seed changes what is stochastic in a cell: the defense's randomness (PaRaMS's scales and permutation),
DARE's drop mask, the fine-tuning attacks' sample order, AdaMerging's batches. A CPU of another instruction
set moves the same things by rounding differences (the experts themselves are bit-exact, `bench.portable`),
so the seed spread also bounds what a re-run on another machine moves.

    .venv/bin/bench run --suite vision-effnet --defense params --attack none,merge-finetune \\
        --merge ta,dare-ties --victims digits --seeds 0,1,2 --evaluate victim --store seeds.sqlite --jobs 2
    .venv/bin/python benchmarks/replicate_variance.py --store seeds.sqlite [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.outcomes import decode  # noqa: E402
from bench.store import Store  # noqa: E402


def victim_outcomes(record) -> tuple[float, int, float] | None:
    """(metric, examples, binomial-style SE of the mean) of the victim's primary metric in a stored cell."""
    for m in record.metrics:
        if m.role in ("merged", "utility") and m.task == record.victim and m.examples:
            values = decode(m.examples)
            n = len(values)
            sd = float(values.std(ddof=1)) if n > 1 else 0.0
            return float(values.mean()), n, sd / math.sqrt(n)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--suite", default=None)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    groups: dict[tuple, dict[int, tuple[float, int, float]]] = defaultdict(dict)
    with Store(args.store, readonly=True) as store:
        for r in store.cells(**({"suite": args.suite} if args.suite else {})):
            if r.status != "ok" or r.kind == "baseline":
                continue
            got = victim_outcomes(r)
            if got is not None:
                groups[(r.suite, r.victim, r.filling, r.defense, r.attack, r.merge)][r.seed] = got
    rows = []
    for key, by_seed in sorted(groups.items()):
        if len(by_seed) < 2:
            continue
        values = [v for v, _, _ in by_seed.values()]
        between = statistics.stdev(values)
        within = statistics.mean(se for _, _, se in by_seed.values())
        rows.append({"suite": key[0], "victim": key[1], "filling": key[2], "defense": key[3], "attack": key[4],
                     "merge": key[5], "seeds": sorted(by_seed), "values": [round(v, 4) for v in values],
                     "between_seed_sd": round(between, 4), "test_example_se": round(within, 4),
                     "ratio": round(between / within, 2) if within > 0 else None})
    if not rows:
        print("no cell is stored under two or more seeds: run `bench run ... --seeds 0,1,2` first", file=sys.stderr)
        return 1
    print(f"{'victim':<14}{'filling':<15}{'defense':<11}{'attack':<16}{'merge':<10}{'values by seed':<26}"
          f"{'seed SD':>8}{'test SE':>8}{'ratio':>7}")
    for r in rows:
        print(f"{r['victim']:<14}{r['filling']:<15}{r['defense']:<11}{r['attack']:<16}{r['merge']:<10}"
              f"{' '.join(f'{v:.3f}' for v in r['values']):<26}{r['between_seed_sd']:>8.4f}{r['test_example_se']:>8.4f}"
              f"{r['ratio'] if r['ratio'] is not None else '-':>7}")
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    print(f"seed SD ÷ test-example SE: median {statistics.median(ratios):.2f}, max {max(ratios):.2f} over {len(ratios)} cells")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

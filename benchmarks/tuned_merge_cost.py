"""Cost of a tuned merge's λ search (``ta-tuned``, ``ties-tuned``) before and after its direction is merged once.

TA and TIES are θ_pre + λ·D with a direction D that does not depend on λ (`merges.tuned.LinearDirection`),
and the criterion needs accuracy and loss of one forward pass (`bench.suite.Suite.output_loss`). This
script runs, on the suites' cached experts (every task merged, as the protocol's unprotected reference),
the λ search both ways in one run:

* ``before``: the previous computation, reproduced here: every candidate merged from the experts
  (``inner.merge`` per λ) and scored with two forward passes per batch (one for accuracy, one inside
  ``Suite.loss``);
* ``after``: the registered merge (``ta-tuned`` / ``ties-tuned``): D merged once, each candidate one
  multiply-add per tensor, one forward pass per batch.

``same`` says whether both pick the same λ with the same recorded (accuracy, loss) grid and return
bit-identical weights. ``merge s`` and ``score s`` split the ``before`` time between merging the
candidates and scoring them. Seconds are the fastest of ``--repeats``.

    .venv/bin/python benchmarks/tuned_merge_cost.py              # text-minilm, first victim (~4 min on 2 cores)
    .venv/bin/python benchmarks/tuned_merge_cost.py --suites all --victims all --json tuned_merge_cost.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _common import comma_list, environment, fastest, print_table, timed, write_json

from bench.merging import MergeContext
from bench.registry import merges, suites
from bench.suite import Suite
from bench.weights import StateDict
from merges.tuned import TA_GRID, TIES_GRID, labelled_victim_batches

SUITES = ("text-minilm", "vision-effnet")
METHODS = {"ta-tuned": ("ta", TA_GRID), "ties-tuned": ("ties", TIES_GRID)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--suites", type=comma_list(SUITES), default=["text-minilm"], help="comma list or 'all'")
    p.add_argument("--methods", type=comma_list(tuple(METHODS)), default=list(METHODS), help="comma list or 'all'")
    p.add_argument("--victims", default="first", help="victims per suite: 'first' (default), 'all' or a comma list")
    p.add_argument("--samples", type=int, default=256, help="the attacker's labelled victim samples (protocol: 256)")
    p.add_argument("--repeats", type=int, default=1, help="time each way this many times, keep the fastest")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


@torch.no_grad()
def criterion_two_passes(ctx: MergeContext, merged: StateDict, head: StateDict, batches: Sequence[Any]) -> tuple[float, float]:
    """The previous criterion: accuracy from one forward pass, the loss from a second (``Suite.loss``)."""
    model = ctx.suite.task_model(merged, head, ctx.victim)
    ctx.suite.recalibrate(model, ctx.victim)
    model.eval()
    correct = total = 0
    loss = 0.0
    for batch in batches:
        logits = model(**batch.inputs)
        correct += int((logits.argmax(-1) == batch.labels).sum())
        total += len(batch.labels)
        loss += float(ctx.suite.loss(model, batch)) * len(batch.labels)
    return correct / total, loss / total


def search_before(inner: str, grid: Sequence[float], base: StateDict, experts: list[StateDict], ctx: MergeContext,
                  samples: int) -> tuple[StateDict, list[list[float]], float, float]:
    """The previous λ search: (chosen weights, grid of [λ, acc, loss], merge seconds, score seconds)."""
    method = merges.get(inner)
    batches = labelled_victim_batches(ctx, samples)
    head = ctx.heads[list(ctx.tasks).index(ctx.victim)]
    best: tuple[tuple[float, float, int], StateDict] | None = None
    scores, merge_s, score_s = [], 0.0, 0.0
    for i, lam in enumerate(grid):
        merged, s = timed(lambda lam=lam: method.merge(base, experts, method.Params(lambda_=lam), seed=ctx.seed))
        merge_s += s
        (acc, loss), s = timed(lambda merged=merged: criterion_two_passes(ctx, merged, head, batches))
        score_s += s
        scores.append([lam, round(acc, 6), round(loss, 6)])
        if best is None or (acc, -loss, -i) > best[0]:
            best = ((acc, -loss, -i), merged)
    assert best is not None
    return best[1], scores, merge_s, score_s


def victims_of(suite: Suite, choice: str) -> list[str]:
    if choice == "first":
        return [suite.tasks[0]]
    if choice == "all":
        return list(suite.tasks)
    chosen = [v for v in choice.split(",") if v]
    unknown = [v for v in chosen if v not in suite.tasks]
    if unknown:
        raise SystemExit(f"{suite.name} has no task {', '.join(unknown)}; its tasks: {', '.join(suite.tasks)}")
    return chosen


def compare(suite: Suite, victim: str, name: str, samples: int, repeats: int) -> dict[str, Any]:
    """One λ search both ways, every task merged, ``victim`` the objective."""
    tasks = list(suite.tasks)
    experts = [suite.expert(t) for t in tasks]
    bodies, base = [e.body for e in experts], suite.pretrained()
    inner, grid = METHODS[name]
    ctx = MergeContext(suite=suite, tasks=tuple(tasks), heads=[e.head for e in experts], seed=0, victim=victim)
    (old, old_grid, merge_s, score_s), before = fastest(
        lambda: search_before(inner, grid, base, bodies, ctx, samples), repeats)
    method = merges.get(name)
    new, after = fastest(lambda: method.merge(base, bodies, method.Params(samples=samples), ctx=ctx, seed=0), repeats)
    same = old_grid == ctx.notes["grid"] and all(torch.equal(old[k], new[k]) for k in old)
    return {"suite": suite.name, "victim": victim, "merge": name, "before s": before, "merge s": merge_s,
            "score s": score_s, "after s": after, "before ÷ after": before / after, "λ": ctx.notes["lambda_"],
            "same": same}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out: dict[str, Any] = {"benchmark": "tuned_merge_cost", "environment": environment(),
                           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    rows = []
    for name in args.suites:
        suite = suites.get(name)()
        missing = [t for t in suite.tasks if not suite.expert_cached(t)]
        if missing:
            print(f"{name}: fine-tuning the missing expert(s) {', '.join(missing)} first (cached afterwards)", flush=True)
        for victim in victims_of(suite, args.victims):
            for method in args.methods:
                row = compare(suite, victim, method, args.samples, args.repeats)
                print(f"  {name} {victim} {method}: {row['before s']:.1f} s -> {row['after s']:.1f} s "
                      f"(same: {row['same']})", flush=True)
                rows.append(row)
    print_table(f"λ search of the tuned merges, every task merged, {args.samples} labelled samples; seconds, fastest of "
                f"{args.repeats}; {torch.get_num_threads()} torch thread(s)", rows, ".3g")
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    out["rows"] = rows
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

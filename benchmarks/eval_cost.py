"""Cost of evaluating a merged model and of AdaMerging on the embedded suites (real experts, real data).

Unlike the other scripts, this one runs the suites' cached experts (`bench run` fine-tunes them on
first use, ~25 min for both suites on 2 cores) and reports accuracy next to time. It prints two tables
from one run:

1. **Evaluation** of a merged model (task arithmetic, λ 0.3, of every expert of the suite) on each
   task of ``--eval-suites`` (default text-minilm; vision-effnet too with ``--eval-suites all``).
   ``eval s`` times `Suite.evaluate_examples(..., merged=True)` as the runner calls it (model built
   from the state dict, BatchNorm recalibration on vision-effnet). ``bare fwd s`` times only
   ``model(**inputs)`` under ``torch.no_grad`` over the same inputs, with the model built beforehand;
   ``eval ÷ bare`` is the overhead of everything else. On text-minilm the ``v1`` columns are the same
   figures for the previous path, batches in test-split order each padded to its longest (now:
   tokenised once, length-sorted batches, `bench.bucketing`), and ``same outcomes`` says whether the
   two paths give identical per-example 0/1 outcomes in test-split order. On vision-effnet the
   recalibration pass is timed on its own.
2. **AdaMerging**, per merge, on ``--ada-suites`` with every task of the suite merged (what `bench run
   --partners rest` merges), seed 0. ``v2`` is version 2's computation (``learn_coefficients(...,
   tol=0, regroup=False, stacked=False)``: every step, experts added one at a time, batches as
   drawn). ``v3`` is the registered default (convergence stop, stacked task vectors,
   length-regrouped steps on token inputs). Each merged body is evaluated on every task. The table
   gives each version's mean accuracy, every task's change, the largest change and its paired
   standard error ``sqrt(discordant) / n`` (the noise of the difference on that test split).

    .venv/bin/python benchmarks/eval_cost.py --json eval_cost.json        # both tables (~1.5 h on 2 busy cores)
    .venv/bin/python benchmarks/eval_cost.py --parts eval --eval-suites all         # evaluation only (~10 min)
    .venv/bin/python benchmarks/eval_cost.py --parts adamerging --ada-suites vision-effnet --no-v2
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import comma_list, environment, fastest, print_table, write_json

from bench.bucketing import BucketedBatches
from bench.merging import MergeContext
from bench.outcomes import Evaluation
from bench.registry import merges, suites
from bench.suite import Batch, Suite
from bench.weights import StateDict
from merges.adamerging import DEFAULT_TOL, learn_coefficients
from tasks.training import accuracy_evaluation

SUITES = ("text-minilm", "vision-effnet")
GRANULARITIES = ("task", "tensor")
ADA_DEFAULTS = {"steps": 100, "lr": 5e-3, "prior": 0.3, "batch_size": 16, "batches_per_step": 2, "samples": 256,
                "clamp": True}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Evaluation time of a merged model vs a bare forward pass over the same inputs, and "
                    "AdaMerging time, steps and accuracy per merge (version 2 vs 3), on the embedded suites.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--parts", type=comma_list(("eval", "adamerging")), default="all", help="which tables")
    p.add_argument("--eval-suites", type=comma_list(SUITES), default="text-minilm", help="suites of the evaluation table")
    p.add_argument("--ada-suites", type=comma_list(SUITES), default="all", help="suites of the AdaMerging table")
    p.add_argument("--granularities", type=comma_list(GRANULARITIES), default="all",
                   help="AdaMerging variants: task (adamerging-task), tensor (adamerging-layer's default)")
    p.add_argument("--steps", type=int, default=ADA_DEFAULTS["steps"], help="AdaMerging's (most) steps")
    p.add_argument("--tol", type=float, default=DEFAULT_TOL, help="v3's convergence tolerance")
    p.add_argument("--no-v2", dest="v2", action="store_false", help="skip version 2's AdaMerging (the slow one)")
    p.add_argument("--repeats", type=int, default=2, help="evaluation timings: the fastest of this many")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 avoids thread contention on a shared machine; 0 keeps torch's default)")
    p.add_argument("--seed", type=int, default=0, help="merge seed (AdaMerging's pool draw)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps < 0:
        p.error("--repeats must be >= 1 and --steps >= 0")
    return args


# ---------------------------------------------------------------- helpers


def load_suite(name: str) -> Suite:
    suite = suites.get(name)()
    missing = [t for t in suite.tasks if not suite.expert_cached(t)]
    if missing:
        print(f"{name}: fine-tuning the missing expert(s) {', '.join(missing)} first (cached afterwards)", flush=True)
    return suite


@torch.no_grad()
def bare_forward(model: torch.nn.Module, batches: Sequence[Batch]) -> None:
    model.eval()
    for b in batches:
        model(**b.inputs)


def padded(batches: Sequence[Batch]) -> int:
    return sum(int(b.inputs["attention_mask"].numel()) for b in batches)


def paired_change(old: np.ndarray, new: np.ndarray) -> tuple[float, float]:
    """(new − old accuracy, its paired standard error sqrt(discordant) / n)."""
    return float(new.mean() - old.mean()), math.sqrt(float((old != new).sum())) / len(old)


# ---------------------------------------------------------------- 1. evaluation


def eval_rows(suite: Suite, repeats: int) -> list[dict[str, Any]]:
    tasks = list(suite.tasks)
    experts = [suite.expert(t) for t in tasks]
    merged = merges.get("ta").merge(suite.pretrained(), [e.body for e in experts])
    rows = []
    for task, expert in zip(tasks, experts):
        measure = eval_text_task if suite.name == "text-minilm" else eval_task
        rows.append(measure(suite, merged, task, expert.head, repeats))
        print(f"  eval {suite.name}/{task}: {rows[-1]['eval s']:.2f} s", flush=True)
    return rows


def eval_text_task(suite: Suite, merged: StateDict, task: str, head: StateDict, repeats: int) -> dict[str, Any]:
    """Bucketed evaluation (the suite's) vs version 1's split-order batches, and a bare forward over each."""
    ev, eval_s = fastest(lambda: suite.evaluate_examples(merged, head, task, merged=True), repeats)
    old, old_s = fastest(lambda: accuracy_evaluation(suite.task_model(merged, head, task),
                                                     suite.batches(task, "test", batch_size=suite.EVAL_BATCH_SIZE)),
                         repeats)
    model = suite.task_model(merged, head, task)
    split_order = list(suite.batches(task, "test", batch_size=suite.EVAL_BATCH_SIZE))
    bucketed: BucketedBatches = suite.eval_batches(task)
    _, bare_split = fastest(lambda: bare_forward(model, split_order), repeats)
    _, bare_bucket = fastest(lambda: bare_forward(model, bucketed.batches), repeats)
    return {
        "suite": suite.name, "task": task, "n": len(ev.examples["accuracy"]),
        "accuracy": round(ev.metrics["accuracy"], 4),
        "eval s": eval_s, "bare fwd s": bare_bucket, "eval ÷ bare": eval_s / bare_bucket,
        "v1 eval s": old_s, "v1 bare fwd s": bare_split, "v1 eval ÷ v1 bare": old_s / bare_split,
        "v1 ÷ bucketed eval": old_s / eval_s,
        "padded tokens v1/bucketed": f"{padded(split_order)}/{bucketed.padded_tokens()}",
        "real tokens": bucketed.real_tokens(),
        "same outcomes": bool(np.array_equal(old.examples["accuracy"], ev.examples["accuracy"])),
    }


def eval_task(suite: Suite, merged: StateDict, task: str, head: StateDict, repeats: int) -> dict[str, Any]:
    """The suite's evaluation of a merged body (recalibration included) vs a bare forward over the test split,
    and the recalibration pass alone."""
    ev, eval_s = fastest(lambda: suite.evaluate_examples(merged, head, task, merged=True), repeats)
    model = suite.task_model(merged, head, task)
    _, recal_s = fastest(lambda: suite.recalibrate(model, task), repeats)
    test = list(suite.batches(task, "test", batch_size=getattr(suite, "EVAL_BATCH_SIZE", 64)))
    _, bare_s = fastest(lambda: bare_forward(model, test), repeats)
    return {
        "suite": suite.name, "task": task, "n": len(ev.examples["accuracy"]),
        "accuracy": round(ev.metrics["accuracy"], 4),
        "eval s": eval_s, "bare fwd s": bare_s, "eval ÷ bare": eval_s / bare_s, "recalibration s": recal_s,
        "(eval − recalibration) ÷ bare": (eval_s - recal_s) / bare_s,
    }


# ---------------------------------------------------------------- 2. AdaMerging


def ada_merge(suite: Suite, granularity: str, version: str, args: argparse.Namespace) -> tuple[dict[str, Any], StateDict]:
    tasks = sorted(suite.tasks)  # the runner's member order
    experts = [suite.expert(t) for t in tasks]
    ctx = MergeContext(suite=suite, tasks=tuple(tasks), heads=[e.head for e in experts], seed=args.seed)
    legacy = version == "v2"
    kwargs = {**ADA_DEFAULTS, "steps": args.steps}
    start = time.perf_counter()
    result = learn_coefficients(suite.pretrained(), [e.body for e in experts], ctx, granularity=granularity,
                                tol=0.0 if legacy else args.tol, regroup=not legacy, stacked=not legacy, **kwargs)
    seconds = time.perf_counter() - start
    evals: dict[str, Evaluation] = {t: suite.evaluate_examples(result.state, e.head, t, merged=True)
                                    for t, e in zip(tasks, experts)}
    info = {"seconds": seconds, "steps": result.steps_taken, "stopped": "converged" if result.converged else "step limit",
            "final loss": result.losses[-1] if result.losses else float("nan"), "evals": evals,
            "coefficients": result.coefficients.mean(0).tolist()}
    return info, result.state


def ada_rows(suite: Suite, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for granularity in args.granularities:
        runs = {}
        for version in (("v2", "v3") if args.v2 else ("v3",)):
            info, _ = ada_merge(suite, granularity, version, args)
            runs[version] = info
            accs = {t: e.metrics["accuracy"] for t, e in info["evals"].items()}
            print(f"  adamerging-{granularity} {suite.name} {version}: {info['seconds']:.1f} s, {info['steps']} steps "
                  f"({info['stopped']}), accuracy {accs}", flush=True)
        new = runs["v3"]
        row: dict[str, Any] = {
            "suite": suite.name, "merge": "adamerging-task" if granularity == "task" else "adamerging-layer",
            "v3 s": new["seconds"], "v3 steps": new["steps"], "v3 s/step": new["seconds"] / max(new["steps"], 1),
            "v3 mean acc": float(np.mean([e.metrics["accuracy"] for e in new["evals"].values()])),
        }
        if "v2" in runs:
            old = runs["v2"]
            changes = {t: paired_change(old["evals"][t].examples["accuracy"], new["evals"][t].examples["accuracy"])
                       for t in old["evals"]}
            worst = max(changes, key=lambda t: abs(changes[t][0]))
            row.update({
                "v2 s": old["seconds"], "v2 steps": old["steps"], "v2 s/step": old["seconds"] / max(old["steps"], 1),
                "v2 ÷ v3 time": old["seconds"] / new["seconds"],
                "v2 mean acc": float(np.mean([e.metrics["accuracy"] for e in old["evals"].values()])),
                "largest Δacc (task)": f"{changes[worst][0]:+.4f} ({worst})",
                "its paired SE": changes[worst][1],
                "per-task Δacc": ", ".join(f"{t} {d:+.3f}" for t, (d, _) in changes.items()),
            })
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out: dict[str, Any] = {"benchmark": "eval_cost", "environment": environment(),
                           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    loaded: dict[str, Suite] = {}

    def get(name: str) -> Suite:
        if name not in loaded:
            loaded[name] = load_suite(name)
        return loaded[name]

    if "eval" in args.parts:
        out["eval"] = []
        for name in args.eval_suites:
            rows = eval_rows(get(name), args.repeats)
            print_table(f"{name}: evaluation of a merged model (ta λ 0.3 of every expert) vs a bare forward pass over "
                        f"the same inputs; seconds, fastest of {args.repeats}; {torch.get_num_threads()} torch thread(s)",
                        rows, ".3g")
            out["eval"] += rows
    if "adamerging" in args.parts:
        rows = [r for name in args.ada_suites for r in ada_rows(get(name), args)]
        print_table(f"AdaMerging per merge (every task of the suite merged, seed {args.seed}, at most {args.steps} steps; "
                    f"v3 tol {args.tol:g}); {torch.get_num_threads()} torch thread(s)", rows, ".4g")
        out["adamerging"] = rows
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

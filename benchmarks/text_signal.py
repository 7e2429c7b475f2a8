"""What a text suite's victims give a free-rider: expert accuracy, θ_pre accuracy and task-arithmetic gain per victim.

For each victim v of ``--suite`` and each merge size k in ``--sizes`` (k = 2: pairs, as PaRaMS merges two
models; k = number of tasks: every other task, the standard protocol's ``rest``), every set S of k − 1
partners is merged by task arithmetic (`merges.basic.task_arithmetic`, λ ``--lambda``) twice: with the
victim's expert (V_U) and with θ_pre in the victim's slot (V_∅, the same free-rider without the
victim), both read through the victim's head. Outcomes are averaged over the partner sets per test
example; ``gain`` = V_U − V_∅ with a 95 % paired-bootstrap interval over the test examples.

``±rec`` is the half-width of the 95 % interval of a recovered fraction of 0.5, as the leaderboard
would report it: a synthetic protected model that takes, per example, V_U's outcome or V_∅'s with
probability 1/2, scored on a random half of the test split (security is reported on the half not
used to pick the best attack; DESIGN.md §4). ``V_∅ floor`` is the trivial predictor's score
(majority class of the test split), under which scoring floors V_∅.

Costs: the experts' fine-tuning (seconds, or ``cached``), one evaluation of the all-task merge on
every task, with ``--finetune-steps N`` the seconds of N fine-tuning steps per task extrapolated to
the recipe, and with ``--encoder-cost`` the seconds of one training step (the suite's batch and
length) of the suite's 6-layer body against a 12-layer body of the same width (the shape of
all-MiniLM-L12-v2 and bge-small-en-v1.5, random weights: only the cost is measured). On a shared
machine wall seconds grow with the load; the CPU seconds (all threads) grow much less.

    .venv/bin/python benchmarks/text_signal.py --sizes 2,5 --finetune-steps 5 --encoder-cost   # text-mix: pairs and rest
    .venv/bin/python benchmarks/text_signal.py --suite text-minilm --sizes 4   # the old suite, rest only
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import environment, print_table, write_json

from bench.registry import suites
from bench.suite import Suite
from bench.weights import StateDict
from merges.basic import task_arithmetic

SUITES = ("text-mix", "text-minilm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--suite", choices=SUITES, default="text-mix")
    p.add_argument("--tasks", default="", help="comma list of the suite's tasks to merge (default: all)")
    p.add_argument("--sizes", default="", help="merge sizes k, comma list (default: 2 .. number of tasks)")
    p.add_argument("--lambda", dest="lambda_", type=float, default=0.3, help="task-arithmetic λ (default 0.3, the registered TA's)")
    p.add_argument("--max-sets", type=int, default=0,
                   help="at most this many partner sets per victim and k, spread over the combinations (0: all)")
    p.add_argument("--draws", type=int, default=2000, help="bootstrap draws")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="also time this many fine-tuning steps per task (wall and CPU seconds), extrapolated to the recipe's steps")
    p.add_argument("--encoder-cost", action="store_true", help="also time a training step of a 12-layer body")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def ta_merge(base: StateDict, bodies: list[StateDict], lambda_: float) -> StateDict:
    """The registered TA merge, as the runner calls it (a slot holding θ_pre contributes no task vector)."""
    return task_arithmetic.merge(base, bodies, task_arithmetic.parse({"lambda_": str(lambda_)}), seed=0)


def outcomes(suite: Suite, body: StateDict, head: StateDict, task: str) -> np.ndarray:
    return np.asarray(suite.evaluate_examples(body, head, task, merged=True).examples["accuracy"], dtype=np.float64)


def bootstrap_ci(u: np.ndarray, z: np.ndarray, rng: np.random.Generator, draws: int) -> tuple[float, float]:
    idx = rng.integers(0, len(u), size=(draws, len(u)))
    gains = u[idx].mean(1) - z[idx].mean(1)
    return float(np.percentile(gains, 2.5)), float(np.percentile(gains, 97.5))


def recovered_half_width(u: np.ndarray, z: np.ndarray, rng: np.random.Generator, draws: int) -> float:
    """Half-width of the 95 % interval of recovered ≈ 0.5 on a random half of the examples (see the docstring)."""
    take = rng.random(len(u)) < 0.5
    p = np.where(take, u, z)
    half = rng.permutation(len(u))[: len(u) // 2]
    u, z, p = u[half], z[half], p[half]
    idx = rng.integers(0, len(u), size=(draws, len(u)))
    gain = u[idx].mean(1) - z[idx].mean(1)
    ok = gain > 0
    rec = np.clip((p[idx].mean(1) - z[idx].mean(1))[ok] / gain[ok], 0.0, 1.0)
    lo, hi = np.percentile(rec, [2.5, 97.5])
    return float(hi - lo) / 2


def expert_table(suite: Suite, tasks: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows, experts = [], {}
    base = suite.pretrained()
    for t in tasks:
        cached = suite.expert_cached(t)
        start = time.perf_counter()
        experts[t] = suite.expert(t)
        finetune_s = time.perf_counter() - start
        labels = suite.task_data(t).test.labels if hasattr(suite, "task_data") else None
        majority = float(np.bincount(labels).max() / len(labels)) if labels is not None else float("nan")
        pre = outcomes(suite, base, experts[t].head, t)
        rows.append({
            "task": t, "classes": suite.num_classes(t), "test n": len(pre), "V_∅ floor": majority, "θ_pre": pre.mean(),
            "expert": outcomes(suite, experts[t].body, experts[t].head, t).mean(),
            "fine-tune s": "cached" if cached else round(finetune_s, 1),
        })
    return rows, experts


def partner_sets(others: list[str], size: int, max_sets: int) -> list[tuple[str, ...]]:
    """Every ``size``-subset of ``others``, or ``max_sets`` of them spread evenly over the list (every partner still appears
    when ``max_sets`` is large enough)."""
    sets = list(itertools.combinations(others, size))
    if max_sets <= 0 or len(sets) <= max_sets:
        return sets
    return [sets[round(i * (len(sets) - 1) / (max_sets - 1))] for i in range(max_sets)] if max_sets > 1 else sets[:1]


def signal_rows(suite: Suite, tasks: list[str], experts: dict[str, Any], sizes: list[int], lambda_: float,
                draws: int, max_sets: int = 0) -> list[dict[str, Any]]:
    base = suite.pretrained()
    rng = np.random.default_rng(0)
    rows = []
    for k in sizes:
        for v in tasks:
            others = [t for t in tasks if t != v]
            head = experts[v].head
            u_runs, z_runs = [], []
            for partners in partner_sets(others, k - 1, max_sets):
                bodies = [experts[p].body for p in partners]
                u_runs.append(outcomes(suite, ta_merge(base, [experts[v].body, *bodies], lambda_), head, v))
                z_runs.append(outcomes(suite, ta_merge(base, [base, *bodies], lambda_), head, v))
            u, z = np.mean(u_runs, axis=0), np.mean(z_runs, axis=0)
            lo, hi = bootstrap_ci(u, z, rng, draws)
            rows.append({
                "k": k, "arrangement": "pairs" if k == 2 else ("rest" if k == len(tasks) else f"{k - 1} partners"),
                "victim": v, "partner sets": len(u_runs), "V_U": u.mean(), "V_∅": z.mean(), "gain": u.mean() - z.mean(),
                "95% CI": f"[{lo:.3f}, {hi:.3f}]", "±rec@0.5 (n/2)": recovered_half_width(u, z, rng, draws),
            })
    return rows


def timed_evaluation(suite: Suite, bodies_heads: dict[str, tuple[StateDict, StateDict]]) -> tuple[float, int]:
    """Seconds of evaluating each task's (body, head) on its test split, test splits tokenised beforehand; real tokens."""
    tokens = 0
    for t in bodies_heads:
        tokens += suite.eval_batches(t).real_tokens()
    start = time.perf_counter()
    for t, (body, head) in bodies_heads.items():
        outcomes(suite, body, head, t)
    return time.perf_counter() - start, tokens


def eval_cost(suite: Suite, tasks: list[str], experts: dict[str, Any], lambda_: float) -> list[dict[str, Any]]:
    """One evaluation of the all-task merge on every task; and, on the same machine in the same run, one of
    text-minilm's four tasks (θ_pre with fresh heads: the cost does not depend on the weights)."""
    merged = ta_merge(suite.pretrained(), [experts[t].body for t in tasks], lambda_)
    seconds, tokens = timed_evaluation(suite, {t: (merged, experts[t].head) for t in tasks})
    rows = [{"suite": suite.name, "tasks": len(tasks), "test tokens": tokens, "s": seconds}]
    if suite.name != "text-minilm":
        from tasks.training import linear_head

        ref = suites.get("text-minilm")(cache_dir=suite.cache_dir)
        hidden = ref.family().config.hidden_size
        heads = {t: linear_head(None, hidden, ref.num_classes(t)).state_dict() for t in ref.tasks}
        seconds, tokens = timed_evaluation(ref, {t: (ref.pretrained(), heads[t]) for t in ref.tasks})
        rows.append({"suite": ref.name, "tasks": len(ref.tasks), "test tokens": tokens, "s": seconds})
    return rows


def encoder_step_cost(suite: Suite, repeats: int = 5) -> list[dict[str, Any]]:
    import transformers

    from bench.families.bert import BertFamily
    from tasks.text_minilm import TextClassifier

    rows = []
    base_config = suite.family().config
    for layers in (base_config.num_hidden_layers, 12):
        config = transformers.BertConfig(**{**base_config.to_dict(), "num_hidden_layers": layers})
        family = BertFamily(config)
        model = TextClassifier(family.new_module(), torch.nn.Linear(config.hidden_size, 2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(1000, 20000, (suite.BATCH_SIZE, suite.MAX_LENGTH), generator=torch.Generator().manual_seed(0))
        mask, labels = torch.ones_like(ids), torch.zeros(suite.BATCH_SIZE, dtype=torch.long)
        times, cpu = [], []
        for _ in range(repeats + 1):
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = torch.nn.functional.cross_entropy(model(ids, mask), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
        params = sum(p.numel() for p in model.body.parameters()) / 1e6
        rows.append({"layers": layers, "body params M": params, "wall s/step": float(np.median(times[1:])),
                     "cpu s/step": float(np.median(cpu[1:]))})
    return rows


def finetune_cost(suite: Suite, tasks: list[str], steps: int) -> list[dict[str, Any]]:
    """Seconds of ``steps`` fine-tuning steps per task (after one warm-up step), wall and CPU (all threads), and the
    recipe's steps at that rate: the CPU figure is what a loaded machine cannot inflate by waiting."""
    rows = []
    for t in tasks:
        suite.finetune(t, suite.pretrained(), steps=1)
        wall, cpu = time.perf_counter(), time.process_time()
        suite.finetune(t, suite.pretrained(), steps=steps)
        wall, cpu = (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps
        recipe_steps = suite._steps(t)
        rows.append({"task": t, "recipe steps": recipe_steps, "wall s/step": wall, "cpu s/step": cpu,
                     "recipe wall s": wall * recipe_steps, "recipe cpu s": cpu * recipe_steps})
    rows.append({"task": "all", "recipe steps": sum(r["recipe steps"] for r in rows),
                 "recipe wall s": sum(r["recipe wall s"] for r in rows), "recipe cpu s": sum(r["recipe cpu s"] for r in rows)})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    suite = suites.get(args.suite)()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] or list(suite.tasks)
    for t in tasks:
        suite.check_task(t)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()] or list(range(2, len(tasks) + 1))
    if any(not 2 <= k <= len(tasks) for k in sizes):
        sys.exit(f"--sizes: every k must be in 2..{len(tasks)}")
    print(f"suite {suite.name} (recipe {suite.recipe_hash()}), TA λ {args.lambda_}, tasks {', '.join(tasks)}")

    experts_rows, experts = expert_table(suite, tasks)
    print_table("experts", experts_rows, floatfmt=".3f")
    signal = signal_rows(suite, tasks, experts, sizes, args.lambda_, args.draws, args.max_sets)
    print_table("TA gain V_U − V_∅ per victim and merge size k (outcomes averaged over the partner sets)", signal, floatfmt=".3f")
    costs = eval_cost(suite, tasks, experts, args.lambda_)
    print_table("evaluation cost: one merged model on every task", costs, floatfmt=".2f")
    finetune = finetune_cost(suite, tasks, args.finetune_steps) if args.finetune_steps else []
    if finetune:
        print_table(f"fine-tuning cost ({args.finetune_steps} steps per task, {args.threads} threads)", finetune, floatfmt=".2f")
    encoder = encoder_step_cost(suite) if args.encoder_cost else []
    if encoder:
        print_table("encoder cost (one training step, random weights)", encoder, floatfmt=".3f")
    if args.json:
        write_json(args.json, {"environment": environment(), "suite": suite.name, "recipe_hash": suite.recipe_hash(),
                               "lambda": args.lambda_, "experts": experts_rows, "signal": signal, "costs": costs,
                               "finetune": finetune, "encoder": encoder})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

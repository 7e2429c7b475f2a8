"""The ``bench`` command line.

    bench run --suite text-minilm --defense all --attack all --merge all   # the cross-product
    bench list [defense|attack|merge|suite|family]                        # what is registered
    bench show NAME                                                       # one plugin's doc and params
    bench results [--format table|csv|json]                               # what the store holds
    bench suite build|show NAME                                           # experts and their accuracy
    bench merge --method ties --base B --models A1 A2 --param k=0.2 --out OUT
    bench protect --defense D --model DIR --base DIR --out DIR
    bench attack --attack realign,scale-division --artifact DIR --base DIR [--partner DIR] [--merge ta] --out DIR
    bench attack --attack realign --artifact EXPERT_DIR --base DIR                    # how far it moves an expert
    bench validate --defense NAME                                         # a plugin on tiny models of every family
    bench run --protocol standard --suite vision-effnet [--defense D]        # the standard protocol
    bench show protocol standard                                          # its ordered steps
    bench frontier --defense params --suite vision-effnet [--dry-run]     # utility vs security per declared setting
    bench leaderboard export|build|serve|import                           # shipped data in leaderboard/data
    bench leaderboard submit --defense D --out BUNDLE.zip                 # a defense's entries as one checkable file
    bench leaderboard verify BUNDLE.zip --sample 8                        # re-compute a sample of a bundle's cells
    bench reproduce --suite clip-vit-b32-ta8                              # baselines vs the published table

User mistakes (unknown plugin, bad parameter, missing data package, corrupt checkpoint) print one
line and exit with status 2; no traceback.

The module is over ~500 lines because it is the whole command line in one place: one small
function per command (which imports what it needs, so `bench --help` stays fast) and the parser.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.params import ParamError
from bench.registry import RegistryError, attacks, defenses, families, merges, suites
from bench.suite import MissingAssetError
from bench.weights import CheckpointError

if TYPE_CHECKING:
    from bench.plan import Plan

STORE_ENV = "MERGEARENA_STORE"
DEFAULT_SUITE = "text-minilm"
USER_ERRORS = (RegistryError, ParamError, CheckpointError, MissingAssetError, FileNotFoundError, ValueError, KeyError)


class UserError(Exception):
    """A mistake in the command line; printed as one line."""


def default_store() -> str:
    return os.environ.get(STORE_ENV, "mergearena-results.sqlite")


def _registry(kind: str):
    table = {"defense": defenses, "attack": attacks, "merge": merges, "suite": suites, "family": families}
    key = kind.rstrip("s")
    if key not in table:
        raise UserError(f"unknown kind {kind!r}; use one of {', '.join(table)}")
    return table[key]


def _describe(kind: str, name: str) -> dict:
    obj = _registry(kind).get(name)
    if hasattr(obj, "describe"):
        return obj.describe()
    doc = (obj.__doc__ or "").strip()
    return {"name": name, "summary": doc.splitlines()[0] if doc else "", "doc": doc, "params": []}


def _make_suite(name: str, cache_dir: str | None):
    return suites.get(name)(cache_dir=cache_dir)


def _key_values(items: Sequence[str], flag: str = "--param") -> dict[str, str]:
    """``["k=0.2", "aggregate=sum"]`` -> ``{"k": "0.2", "aggregate": "sum"}``; one line for a malformed item."""
    bad = [p for p in items if "=" not in p or not p.split("=", 1)[0]]
    if bad:
        raise UserError(f"{flag} {bad[0]!r}: expected KEY=VALUE, e.g. lambda_=0.5")
    return dict(p.split("=", 1) for p in items)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise UserError(f"--seeds {text!r}: expected a comma list of integers, e.g. 0,1,2")
    return seeds


def _plugins_in(plans: Sequence[Plan]) -> set[str]:
    """Names of the defenses, attacks (each step of a composite) and merge methods the plans' cells use."""
    from bench.plugins import CompositeAttack

    names: set[str] = set()
    for plan in plans:
        for c in plan.cells:
            if c.defense is not None:
                names.add(c.defense.name)
            if c.attack is not None:
                names.update(s.name for s in (c.attack.steps if isinstance(c.attack, CompositeAttack) else (c.attack,)))
            if c.merge is not None:
                names.add(c.merge.method.name)
    return names


def _check_param_targets(params: dict[str, dict[str, str]], in_run: set[str]) -> None:
    """A --param for a plugin the run does not use would be silently ignored: refuse it instead."""
    for plugin, values in params.items():
        if plugin not in in_run:
            key, value = next(iter(values.items()))
            raise UserError(f"--param {plugin}.{key}={value}: no plugin {plugin!r} in this run "
                            f"(it uses {', '.join(sorted(in_run))})")


# ---------------------------------------------------------------- commands


def cmd_list(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else ["suite", "defense", "attack", "merge"]
    for kind in kinds:
        reg = _registry(kind)
        print(f"{reg.kind}s:")
        for name in reg.names():
            try:
                summary = _describe(kind, name)["summary"]
            except Exception as exc:  # a broken plugin is listed with its error, not hidden
                summary = f"(failed to load: {exc})"
            print(f"  {name:<22} {summary}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    if args.name == "protocol":
        return _show_protocol(args.item or "standard")
    kinds = ("defense", "attack", "merge", "suite", "family")
    name = args.name
    if args.item:
        if args.name not in kinds:
            raise UserError(f"bench show {args.name} {args.item}: the first word must be one of protocol, "
                            f"{', '.join(kinds)}")
        kinds, name = (args.name,), args.item
        if kinds == ("attack",) and "+" in name:
            return _show_composite(name)
    args.name = name
    found = False
    for kind in kinds:
        if args.name in _registry(kind):
            found = True
            d = _describe(kind, args.name)
            print(f"{kind} {args.name}" + (f" (version {d['version']})" if d.get("version") else ""))
            print(d.get("doc") or d.get("summary") or "")
            if d.get("paper"):
                print(f"paper: {d['paper']}")
            if d.get("code"):
                print(f"code: {d['code']}")
            for p in d.get("params", []):
                print(f"  --param {args.name}.{p['name']}=<{p['type']}>   default {p['default']}")
            for knob, values in (d.get("frontier") or {}).items():
                print(f"  frontier {knob}: {', '.join(values)}   (`bench frontier --defense {args.name}`)")
            if kind == "attack":
                print(_counterpart_line(args.name))
    if not found:
        _registry(kinds[0]).get(args.name)  # raises with did-you-mean
    return 0


def _counterpart_line(name: str) -> str:
    from bench.plan import make_attacks

    attack = make_attacks(name)[0]
    cp = attack.counterpart()
    return (f"honest counterpart: {cp.label} {dict(cp.spec()['params']) or ''}".rstrip()
            + " (its U and ∅ cells are the references this attack is read against)")


def _show_composite(name: str) -> int:
    from bench.plan import make_attacks

    attack = make_attacks(name)[0]
    print(f"attack {name} (a composite: {', '.join(s.name for s in attack.steps)} in order)")
    print(_counterpart_line(name))
    return 0


def _show_protocol(name: str) -> int:
    from tabulate import tabulate

    from bench.protocol import coverage, get_protocol

    protocol = get_protocol(name)
    d = protocol.describe()
    print(f"protocol {d['name']} (version {d['version']}): {d['description']}")
    print(f"broken: selection-half recovered >= {d['break_threshold']} on a victim; then the later steps skip that "
          f"(defense, victim)")
    print(f"replicates: seeds {','.join(map(str, d['seeds']))}, partners '{d['partners']}'; budget: "
          + ", ".join(f"{k} {v}" for k, v in d["budget"].items()))
    if d["replicate_seeds"]:
        print(f"after the last step: each (defense, victim)'s worst pair again under seeds "
              f"{','.join(map(str, d['replicate_seeds']))} (defense, attack and merge re-drawn); reported pooled")
    print("params: " + ("; ".join(f"{plugin}.{k}={v}" for plugin, kv in d["params"].items() for k, v in kv.items()) or "-"))
    print(tabulate([[s["index"] + 1, s["group"], s["attack"], s["merge"], s["evaluate"]] for s in d["steps"]],
                   headers=["step", "group", "attack", "merge", "evaluates"], tablefmt="github"))
    gaps = [name for name, step in coverage(protocol) if not step]
    for name, why in sorted(protocol.omitted.items()):
        print(f"omitted on purpose: {name}: {why}")
    print("standard attacks and merge methods no step covers: " + (", ".join(gaps) if gaps else "none"))
    return 0


def _run_protocol(args: argparse.Namespace) -> int:
    """`bench run --protocol NAME`: the protocol fixes attacks, merges, seeds, partners and budget."""
    from bench.executors.local import run_local
    from bench.protocol import get_protocol, protocol_defenses, run_protocol, scope, signal, stage_profile
    from bench.report import profile_table, protocol_table, signal_table
    from bench.runner import environment
    from bench.scoring import score
    from bench.store import Store, check_store_path

    fixed = {"--attack": args.attack, "--merge": args.merge, "--seeds": args.seeds, "--partners": args.partners,
             "--evaluate": args.evaluate}
    given = [flag for flag, value in fixed.items() if value is not None] + (["--param"] if args.param else [])
    if given:
        raise UserError(f"{', '.join(given)}: the protocol fixes these; see `bench show protocol {args.protocol}`")
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: expected at least 1 worker process")
    protocol = get_protocol(args.protocol)
    names = protocol_defenses(args.defense)
    suite_names = [s.strip() for s in args.suite.split(",") if s.strip()]
    check_store_path(Path(args.store))
    victims = [v.strip() for v in args.victims.split(",") if v.strip()] if args.victims else None
    if args.dry_run:
        return _protocol_dry_run(args, protocol, names, suite_names, victims)
    store = Store(args.store)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    if args.executor == "ray":
        from bench.executors.ray_executor import run_ray
    store.start_run(run_id, sys.argv, {**environment(), "protocol": protocol.stamp()})
    exit_code = 0
    for name in suite_names:
        suite = _make_suite(name, args.cache_dir)

        def run_cells(cells, suite=suite):
            if args.executor == "ray":
                return run_ray(suite, store, cells, run_id=run_id, address=args.address)
            return run_local(suite, store, cells, run_id=run_id, jobs=args.jobs)

        t0 = time.time()
        _walk, reports = run_protocol(protocol, suite, store, names, run_cells, victims=victims)
        exit_code = max(exit_code, 1 if any(r.failed for r in reports) else 0)
        records = store.cells(suite=suite.name)
        sc = scope(records, protocol, cache_dir=args.cache_dir)
        scores = score(sc.records, attacks=[], missing=sc.missing)
        print(f"\n{suite.name}: protocol {protocol.name} v{protocol.version} in {time.time() - t0:.0f}s")
        print(protocol_table(scores, sc.broken_by))
        print(f"\nsignal (merge gain V_U − V_∅ of each victim):\n{signal_table(signal(scores, protocol, suite.name))}")
        print(f"\nwhere the time went (cells of this suite in the store):\n{profile_table(stage_profile(sc.records, protocol))}")
    store.finish_run(run_id)
    return exit_code


def _protocol_dry_run(args: argparse.Namespace, protocol: Any, names: list[str], suite_names: list[str],
                      victims: list[str] | None) -> int:
    """What a protocol run will cost before it starts: cells per step group and the estimated wall time, from
    the timed cells of the store and of the shipped results. Writes nothing."""
    from tabulate import tabulate

    from bench.protocol import CellTimes, estimate
    from bench.store import Store
    from leaderboard import export as lb_export

    stored = Store(args.store, readonly=True).cells() if Path(args.store).exists() else []
    shipped = lb_export.cells_of_export(lb_export.SHIPPED)[0] if (lb_export.SHIPPED / "manifest.json").is_file() else []
    times = CellTimes([*stored, *shipped])
    ids = {r.cell_id for r in stored if r.status == "ok" or r.status == "na"}
    total = unknown = 0.0
    for name in suite_names:
        suite = _make_suite(name, args.cache_dir)
        rows = estimate(protocol, suite, names, ids, times, victims=victims)
        groups: dict[str, list[float]] = {}
        for r in rows:
            g = groups.setdefault(r.step.group, [0, 0, 0, 0.0, 0])
            g[0] += 1
            g[1] += r.cells
            g[2] += r.stored
            g[3] += r.seconds
            g[4] += r.unknown
        builds = [t for t in suite.tasks if (not victims or t in victims) and not suite.expert_cached(t)]
        print(f"{suite.name}: protocol {protocol.name} v{protocol.version}, {len(names)} defenses, "
              f"{len(victims or suite.tasks)} victims; experts to fine-tune first: {len(builds)}")
        print(tabulate([[g, v[0], v[1], v[2], f"{v[3] / 60 / args.jobs:.1f}", v[4] or ""] for g, v in groups.items()],
                       headers=["step group", "steps", "cells", "stored", f"min ({args.jobs} jobs)", "no estimate"],
                       tablefmt="github"))
        total += sum(v[3] for v in groups.values())
        unknown += sum(v[4] for v in groups.values())
    print(f"\nupper bound if no pair breaks (a break skips the later steps of its pair): about "
          f"{total / 3600 / args.jobs:.1f} h on {args.jobs} worker(s)"
          + (f", plus {int(unknown)} cells with no timed cell of their kind" if unknown else "")
          + "; times are the medians of timed cells of the same kind in the store and the shipped results"
          + ("; the replicates row counts each pair at its median-cost step (its worst step is known only "
             "after the walk)." if protocol.replicate_seeds else "."))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.protocol:
        return _run_protocol(args)
    for flag, default in (("attack", "none"), ("merge", "all"), ("seeds", "0"), ("partners", "rest"),
                          ("evaluate", "all"), ("defense", "none")):
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    from bench.executors.local import run_local
    from bench.plan import build_plan, parse_param_args
    from bench.plugins import AttackNeeds
    from bench.report import summary_tables
    from bench.runner import environment
    from bench.store import Store, check_store_path

    suite_names = [s.strip() for s in args.suite.split(",") if s.strip()]
    if suite_names == ["all"]:
        suite_names = suites.names()
    params = parse_param_args(args.param)
    seeds = _seeds(args.seeds)
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: expected at least 1 worker process")
    check_store_path(Path(args.store))
    budget = AttackNeeds(anchor=True, labelled=args.budget_labelled, unlabelled=args.budget_unlabelled,
                         finetune_steps=args.budget_steps, knows_defense=not args.defense_unknown)
    plans = []
    for name in suite_names:
        suite = _make_suite(name, args.cache_dir)
        plan = build_plan(suite, defense=args.defense, attack=args.attack, merge=args.merge, seeds=seeds,
                          victims=args.victims.split(",") if args.victims else None, partners=args.partners,
                          params=params, budget=budget, evaluate=args.evaluate)
        plans.append(plan)
    _check_param_targets(params, _plugins_in(plans))
    if args.dry_run:
        # A dry run writes nothing: it reads an existing store, and plans against an empty one otherwise.
        store = Store(args.store, readonly=True) if Path(args.store).exists() else Store(":memory:")
    else:
        store = Store(args.store)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    from bench.runner import pending

    for plan in plans:
        todo, skipped = pending(plan.cells, store)
        print(f"{plan.suite.name}: {len(plan.cells)} cells ({len(plan.not_applicable)} N/A), "
              f"{skipped} already in {args.store}, {len(todo)} to run")
        if args.dry_run:
            for c in todo:
                print(f"  {c.cell_id}  {c.kind:<8} {c.victim:<18} {c.defense_label:<18} {c.attack_label:<26} {c.merge_label:<16} "
                      f"seed={c.seed}" + (f"  N/A: {c.na_reason}" if c.na_reason else ""))
    if args.dry_run:
        return 0
    if args.executor == "ray":
        from bench.executors.ray_executor import run_ray as runner_fn  # optional extra [ray]
    else:
        runner_fn = None
    store.start_run(run_id, sys.argv, environment())
    exit_code = 0
    for plan in plans:
        if runner_fn is not None:
            summary = runner_fn(plan.suite, store, plan.cells, run_id=run_id, address=args.address)
        else:
            summary = run_local(plan.suite, store, plan.cells, run_id=run_id, jobs=args.jobs)
        if summary.skipped == summary.total:
            print(f"{plan.suite.name}: all {summary.total} cells were already in the store; no model work was done.")
        else:
            print(f"{plan.suite.name}: ran {summary.ok + summary.na + summary.failed} cells in {summary.seconds:.1f}s "
                  f"({summary.ok} ok, {summary.na} N/A, {summary.failed} failed; {summary.skipped} skipped as done)")
        if summary.failed:
            exit_code = 1
            for rec in summary.records:
                if rec.status == "failed":
                    print(f"  failed {rec.defense}/{rec.attack}/{rec.merge} on {rec.victim}: {rec.reason}", file=sys.stderr)
        ids = {c.cell_id for c in plan.cells}
        print(summary_tables([r for r in store.cells(suite=plan.suite.name) if r.cell_id in ids], tasks=plan.suite.tasks))
    store.finish_run(run_id)
    return exit_code


def cmd_results(args: argparse.Namespace) -> int:
    from bench.report import to_format
    from bench.store import Store

    if not Path(args.store).is_file():
        raise UserError(f"no results store at {args.store}; run `bench run` first or pass --store")
    where = {k: v for k, v in (("suite", args.suite), ("defense", args.defense), ("attack", args.attack)) if v}
    with Store(args.store) as store:
        records = store.cells(**where)
        if args.defense or args.attack:
            from bench.plan import counterpart_spec, spec_id

            # the baselines and the unprotected and counterfactual cells of the same pipelines are what the
            # selected cells are read against
            context = store.cells(**({"suite": args.suite} if args.suite else {}))
            chosen = {r.cell_id for r in records}
            chosen |= {spec_id(counterpart_spec(r.spec, f)) for r in records if r.kind == "merge"
                       for f in ("unprotected", "counterfactual")}
            records = [r for r in context if r.cell_id in chosen or r.kind == "baseline"]
        if args.scores:
            from bench.report import format_table
            from bench.scoring import score

            if args.protocol == "none":  # ad hoc: complete means every attack the installed plugins declare
                from bench.plan import standard_attacks

                scores = score(records, attacks=standard_attacks())
            else:
                from bench.protocol import get_protocol, scope

                sc = scope(records, get_protocol(args.protocol), cache_dir=None)
                scores = score(sc.records, attacks=[], missing=sc.missing)
            print(format_table(scores))
        else:
            print(to_format(records, args.format))
    return 0


def cmd_suite(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    suite = _make_suite(args.name, args.cache_dir)
    if args.action == "build":
        for t in suite.tasks:
            print(f"{suite.name}/{t}: {'cached' if suite.expert_cached(t) else 'building'}", flush=True)
            suite.expert(t)
        print(f"experts in {suite.expert_dir()}")
        return 0
    rows = []
    pre = suite.pretrained()
    for t in suite.tasks:
        if not suite.expert_cached(t) and not args.build:
            rows.append([t, "-", "-", "(not built: bench suite build " + suite.name + ")"])
            continue
        e = suite.expert(t)
        pre_acc = suite.evaluate(pre, e.head, t)[suite.primary_metric]
        accs = {u: suite.evaluate(e.body, suite.expert(u).head if u != t else e.head, u)[suite.primary_metric]
                for u in suite.tasks if suite.expert_cached(u)} if args.cross else {t: suite.evaluate(e.body, e.head, t)[suite.primary_metric]}
        rows.append([t, f"{pre_acc:.3f}", f"{accs[t]:.3f}", ", ".join(f"{u}={v:.3f}" for u, v in accs.items() if u != t)])
    print(f"suite {suite.name}: {suite.description}")
    print(f"family {suite.family().name}; recipe {suite.recipe_hash()}; cache {suite.expert_dir()}")
    print(tabulate(rows, headers=["task", "θ_pre", "expert", "expert on other tasks"], tablefmt="github"))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from bench.checkpoint_io import merge_checkpoints

    params = _key_values(args.param)
    out = merge_checkpoints(args.method, args.base, args.models, args.out, params, seed=args.seed)
    print(f"merged {len(args.models)} model(s) with {args.method} into {out}")
    return 0


def cmd_protect(args: argparse.Namespace) -> int:
    from bench.protect import protect_checkpoint

    params = _key_values(args.param)
    note = protect_checkpoint(args.defense, args.model, args.base, args.out, params, family=args.family,
                              data=args.data, seed=args.seed)
    print(f"protected {args.model} with {args.defense} -> {args.out}")
    for k, v in note.items():
        if k in ("defense", "what", "output_hash", "input_hash"):
            print(f"  {k}: {v}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from bench.attack_checkpoint import attack_checkpoint
    from bench.plan import parse_param_args

    merge_params = _key_values(args.merge_param, "--merge-param")
    names = [a.strip() for a in args.attack.split(",") if a.strip()]
    params = parse_param_args(args.param)
    _check_param_targets(params, {part for n in names for part in n.split("+")})
    if args.out is None:  # the check: how far the attack moves the checkpoint (nothing is written)
        from bench.attack_check import check_attack, report_lines

        result = check_attack(names, args.artifact, args.base, partners=args.partner, merge=args.merge,
                              merge_params=merge_params, params=params, family=args.family, data=args.data, seed=args.seed)
        print("\n".join(report_lines(result)))
        return 0
    note = attack_checkpoint(names, args.artifact, args.base, args.out,
                             partners=args.partner, merge=args.merge, merge_params=merge_params,
                             params=params, family=args.family, data=args.data, seed=args.seed)
    cost = note["cost"]
    print(f"attacked {args.artifact} with {note['attack']['name']}" + (f", merged with {args.merge}" if args.merge else "")
          + f" -> {args.out}")
    print(f"  cost: {', '.join(f'{k} {v:.2f}s' for k, v in cost['seconds'].items())}; peak memory +{cost['peak_rss_mb_delta']:.0f} MB")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bench.validate import validate

    params = _key_values(args.param)
    checks = validate(args.defense, params, seed=args.seed)
    rows = [[c.family, c.status, f"{c.numbers['distance_expert']:.3g} -> {c.numbers['distance_artifact']:.3g}"
             if "distance_artifact" in c.numbers else "", c.detail] for c in checks]
    print(tabulate(rows, headers=["family", "check", "L2 from θ_pre (expert -> artifact)", "detail"], tablefmt="github"))
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def _leaderboard_submission(args: argparse.Namespace) -> int:
    """`bench leaderboard submit` and `verify` (`leaderboard.submission`)."""
    from bench.protocol import get_protocol
    from leaderboard import submission

    if args.action == "submit":
        if not args.defense:
            raise UserError("submit bundles one defense's results: pass --defense NAME")
        protocol = None if args.protocol == "none" else get_protocol(args.protocol)
        chosen = [s.strip() for s in args.suite.split(",") if s.strip()] if args.suite else None
        out = submission.submit(args.store or default_store(), args.defense, args.out or f"{args.defense}-submission.zip",
                                suites=chosen, protocol=protocol)
        print(f"bundle written: {out} (check it with `bench leaderboard verify {out} --sample 8`)")
        return 0
    if args.bundle is None:
        raise UserError("verify checks a bundle: bench leaderboard verify BUNDLE.zip --sample K")
    report = submission.verify(args.bundle, args.sample, seed=args.seed, cache_dir=args.cache_dir)
    if report.ok:
        print(f"verify: all {len(report.checks)} sampled cells match")
        return 0
    print(f"verify: {len(report.mismatched)} of {len(report.checks)} sampled cells differ: {', '.join(report.mismatched)}")
    return 1


def cmd_leaderboard(args: argparse.Namespace) -> int:
    if args.action in ("submit", "verify"):
        return _leaderboard_submission(args)
    if args.bundle is not None:
        raise UserError(f"bench leaderboard {args.action} takes no positional argument (only verify takes a bundle)")
    from bench.protocol import get_protocol
    from bench.store import Store
    from leaderboard import export as lb_export
    from leaderboard import site as lb_site

    protocol = None if args.protocol == "none" else get_protocol(args.protocol)
    store_path = args.store if args.store is not None else (default_store() if args.action == "export" else None)
    if store_path is not None and args.action != "import" and not Path(store_path).is_file():
        raise UserError(f"no results store at {store_path}; run `bench run` first or pass --store")
    if args.with_shipped and store_path is None:
        raise UserError("--with-shipped adds the shipped results to a store's: pass --store too")
    shipped = (lb_export.SHIPPED / "manifest.json").is_file()
    if args.with_shipped and not shipped:
        print(f"bench: no shipped results in {lb_export.SHIPPED}; using the store alone", file=sys.stderr)
    with_shipped = args.with_shipped and shipped
    if args.action == "build" and store_path is None and not shipped:
        raise UserError(f"no shipped results in {lb_export.SHIPPED} and no --store: run `bench run --protocol "
                        "standard` and pass --store")
    if args.action == "import":
        if store_path is None:
            raise UserError("import writes the shipped cells into a store: pass --store")
        records, runs = lb_export.cells_of_export(args.source or lb_export.SHIPPED)
        if args.references_only:
            records = [r for r in records if r.kind == "baseline" or (r.kind == "merge" and r.filling != "protected")]
            runs = {k: v for k, v in runs.items() if any(r.run_id == k for r in records)}
        with Store(store_path) as store:
            for run_id, env in sorted(runs.items()):
                store.import_run(run_id, env)
            added = sum(store.put_cell(r) for r in records)
        print(f"imported {added} of {len(records)} published {'reference ' if args.references_only else ''}cells into {store_path} "
              f"(a protocol run on this store now skips them)")
    elif args.action == "export":
        out = Path(args.out) if args.out else lb_export.SHIPPED
        source = lb_export.combine(lb_export.SHIPPED, store_path) if with_shipped else store_path
        files = lb_export.export(source, out, protocol=protocol)
        print(f"wrote {len(files)} files to {out}")
    elif args.action == "build":
        out = Path(args.out or "site")
        if store_path is None:  # the results that ship with the repository, as published
            index = lb_site.build_site(lb_export.SHIPPED, out)
        else:
            staging = out / ".export"
            # the user's store is scored alone; with the shipped data, the published entries are shown as they
            # ship and the user's beside them ("· your run"): never re-scored against cells of other experts
            lb_export.export(store_path, staging, protocol=protocol)
            if with_shipped:
                lb_export.merge_exports(lb_export.SHIPPED, staging, out / ".combined")
                shutil.rmtree(staging, ignore_errors=True)
                staging = out / ".combined"
            index = lb_site.build_site(staging, out)
            shutil.rmtree(staging, ignore_errors=True)
        print(f"site written: {index}")
    else:
        lb_site.serve(Path(args.out or "site"), args.port)
    return 0


def cmd_frontier(args: argparse.Namespace) -> int:
    """`bench frontier`: the protocol on each declared strength setting of a defense (`bench.frontier`)."""
    from bench.frontier import main as frontier_main

    return frontier_main(args, make_suite=_make_suite, dry_run=_protocol_dry_run)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from bench.reproduce import format_gate, reproduce

    result = reproduce(args.suite, args.store, args.cache_dir, args.tolerance_avg, args.tolerance_task, table=args.table)
    print(format_gate(result))
    return 0 if result.passed else 1


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, store: bool = True, cache: bool = True) -> None:
        if store:
            sp.add_argument("--store", default=default_store(), help=f"results database (SQLite; default ${STORE_ENV} or ./mergearena-results.sqlite)")
        if cache:
            sp.add_argument("--cache-dir", default=None, help="cache of experts and artifacts (default $MERGEARENA_CACHE or ~/.cache/mergearena)")

    r = sub.add_parser("run", help="run the cross-product defense x attack x merge x task",
                       description="Plan and run cells; finished cells in the store are skipped, so a killed run resumes.")
    r.add_argument("--suite", default=DEFAULT_SUITE, help="suite name(s), comma list or 'all' (default text-minilm)")
    r.add_argument("--protocol", default=None, metavar="NAME",
                   help="run a fixed protocol (e.g. standard: `bench show protocol standard`) for --defense (default "
                        "every registered defense); it fixes attacks, merges, seeds, partners and budget")
    r.add_argument("--defense", default=None, help="defense(s): comma list or 'all' (none is always included; default none, "
                                                   "or all with --protocol)")
    r.add_argument("--attack", default=None, help="attack(s): comma list, A+B composites, or 'all' (none is always included; default none)")
    r.add_argument("--merge", default=None, help="merge method(s): comma list or 'all' (default all)")
    r.add_argument("--victims", default=None, help="restrict victim tasks (comma list; default every task); with "
                   "--protocol, a slice: the protocol's cells for these victims only")
    r.add_argument("--partners", default=None, choices=["rest", "pairs"], help="merge the victim with all other tasks (rest, the default) or one at a time (pairs)")
    r.add_argument("--evaluate", default=None, choices=["all", "victim"],
                   help="evaluate merged models on every merged task (partner side effects) or on the victim only "
                        "(cheaper sweeps; the unprotected plain-merge reference cells still evaluate every task)")
    r.add_argument("--seeds", default=None, help="comma list of seeds (defense randomness, DARE, attacks; default 0)")
    r.add_argument("--param", action="append", default=[], metavar="PLUGIN.KEY=VALUE", help="plugin parameter, e.g. ta.lambda_=0.5 (repeatable)")
    r.add_argument("--jobs", type=int, default=1, help="worker processes (local executor)")
    r.add_argument("--executor", default="local", choices=["local", "ray"], help="where cells run")
    r.add_argument("--address", default=None, help="Ray cluster address (with --executor ray)")
    r.add_argument("--budget-labelled", type=int, default=256, help="labelled victim samples an attacker may use")
    r.add_argument("--budget-unlabelled", type=int, default=1024, help="unlabelled victim inputs an attacker may use")
    r.add_argument("--budget-steps", type=int, default=1000, help="fine-tuning steps an attacker may take")
    r.add_argument("--defense-unknown", action="store_true", help="attackers do not know which defense was applied")
    r.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    common(r)
    r.set_defaults(func=cmd_run)

    ls = sub.add_parser("list", help="list registered plugins")
    ls.add_argument("kind", nargs="?", help="defense, attack, merge, suite or family")
    ls.set_defaults(func=cmd_list)

    sh = sub.add_parser("show", help="show a plugin's documentation and parameters (`show params`, `show attack realign`: "
                                     "an attack names its honest counterpart), or a protocol (`show protocol standard`)")
    sh.add_argument("name", help="a plugin name; or a kind (defense, attack, merge, suite, family) then a name; or 'protocol'")
    sh.add_argument("item", nargs="?", help="after a kind: the plugin's name; after 'protocol': its name (default standard)")
    sh.set_defaults(func=cmd_show)

    res = sub.add_parser("results", help="print stored results",
                         description="Print stored results. Tables and scores read the newest successful cell at "
                                     "each coordinate (a re-run under a new plugin version supersedes the old one); "
                                     "csv and json export every stored cell with its cell_id.")
    res.add_argument("--format", default="table", choices=["table", "csv", "json"])
    res.add_argument("--suite")
    res.add_argument("--defense")
    res.add_argument("--attack")
    res.add_argument("--scores", action="store_true", help="print utility, worst-case security and the best attack per defense")
    res.add_argument("--protocol", default="standard",
                     help="with --scores: score the cells of this protocol ('none': every cell, complete against "
                          "every registered attack)")
    common(res, cache=False)
    res.set_defaults(func=cmd_results)

    su = sub.add_parser("suite", help="build a suite's experts, or show θ_pre and every expert on every task")
    su.add_argument("action", choices=["build", "show"])
    su.add_argument("name")
    su.add_argument("--build", action="store_true", help="with show: build missing experts")
    su.add_argument("--cross", action="store_true", help="with show: every expert on every task")
    common(su, store=False)
    su.set_defaults(func=cmd_suite)

    m = sub.add_parser("merge", help="merge checkpoints (HF directories or .safetensors) out of core, a few blocks in memory")
    m.add_argument("--method", required=True,
                   help="a tensor-wise method (wa, ta, ties, dare-ta, dare-ties, ...) or ties-global; methods that "
                        "tune on task data run through `bench run`")
    m.add_argument("--base", required=True, help="θ_pre checkpoint")
    m.add_argument("--models", required=True, nargs="+", help="expert checkpoints")
    m.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True, help="output directory (HF layout) or .safetensors file")
    m.set_defaults(func=cmd_merge)

    pr = sub.add_parser("protect", help="apply a defense to a checkpoint (for model owners)")
    pr.add_argument("--defense", required=True)
    pr.add_argument("--model", required=True, help="the fine-tuned checkpoint to protect")
    pr.add_argument("--base", required=True, help="θ_pre it was fine-tuned from")
    pr.add_argument("--out", required=True)
    pr.add_argument("--family", default=None, help="architecture family (default: detected from config.json)")
    pr.add_argument("--data", default=None, help="JSONL file of {text,label} (or suite:NAME/TASK) for defenses that need data")
    pr.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    pr.add_argument("--seed", type=int, default=0)
    pr.set_defaults(func=cmd_protect)

    at = sub.add_parser("attack", help="attack a released checkpoint (and optionally merge it), outside any suite; "
                                       "without --out, print how far the attack moves it (run it on an unprotected "
                                       "expert: an undo attack must leave it as it is)")
    at.add_argument("--attack", required=True, help="attack name(s); a comma list runs them in order")
    at.add_argument("--artifact", required=True, help="the released (protected) checkpoint")
    at.add_argument("--base", required=True, help="θ_pre")
    at.add_argument("--partner", action="append", default=[], help="a partner expert checkpoint (repeatable)")
    at.add_argument("--merge", default=None, help="merge the attacked artifact with the partners by this method")
    at.add_argument("--merge-param", action="append", default=[], metavar="KEY=VALUE")
    at.add_argument("--param", action="append", default=[], metavar="ATTACK.KEY=VALUE")
    at.add_argument("--family", default=None)
    at.add_argument("--data", default=None, help="labelled data for attacks that train: FILE.jsonl or suite:NAME/TASK")
    at.add_argument("--seed", type=int, default=0)
    at.add_argument("--out", default=None, help="output directory (HF layout) or .safetensors file; without it "
                                                "nothing is written and the relative change of the body is printed")
    at.set_defaults(func=cmd_attack)

    va = sub.add_parser("validate", help="check a defense plugin on tiny models of every family (seconds)")
    va.add_argument("--defense", required=True)
    va.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    va.add_argument("--seed", type=int, default=0)
    va.set_defaults(func=cmd_validate)

    lb = sub.add_parser("leaderboard", help="export results as JSON, build the static site, or serve it",
                        description="export: score a store under a protocol and write the published JSON (default "
                                    "into the repository's leaderboard/data). build: render the site from the "
                                    "shipped data (no --store), from a store (--store), or from both (--store S "
                                    "--with-shipped). serve: serve a built site. import: copy the published cells "
                                    "into a store, so a protocol run continues from them. submit: write one zip "
                                    "bundle of a defense's results (its entry per suite with every cell and "
                                    "per-example outcome, the plugin's version and source hash, the environment) "
                                    "to send to the maintainers. verify: check a bundle's file hashes and that the "
                                    "installed plugin is the same code, then re-compute --sample K of its cells "
                                    "(seeded) on the local experts and compare their per-example outcomes; exit 0 "
                                    "when all match, 1 on a mismatch (the cells are named), 2 on an error.")
    lb.add_argument("action", choices=["export", "build", "serve", "import", "submit", "verify"])
    lb.add_argument("bundle", nargs="?", default=None, help="verify: the bundle (zip) to check")
    lb.add_argument("--defense", default=None, help="submit: the defense whose results go in the bundle")
    lb.add_argument("--suite", default=None, help="submit: suite(s), comma list (default every suite the store "
                                                  "holds cells of the defense on)")
    lb.add_argument("--sample", type=int, default=8, help="verify: cells to re-compute, drawn at random (the "
                                                          "defense's own protected merge and utility cells first)")
    lb.add_argument("--seed", type=int, default=0, help="verify: seed of the random draw of cells")
    lb.add_argument("--cache-dir", default=None, help="verify: cache of experts and artifacts (default "
                                                      "$MERGEARENA_CACHE or ~/.cache/mergearena)")
    lb.add_argument("--from", dest="source", default=None,
                    help="import: the export directory whose cells go into --store (default the shipped data)")
    lb.add_argument("--out", default=None, help="output directory (export: leaderboard/data; build and serve: site); "
                                                "submit: the bundle file (default DEFENSE-submission.zip)")
    lb.add_argument("--port", type=int, default=8000)
    lb.add_argument("--store", default=None, help=f"results database (export: default ${STORE_ENV} or "
                                                   "./mergearena-results.sqlite; build: none, the shipped data; submit: as export)")
    lb.add_argument("--with-shipped", action="store_true",
                    help="build: show the shipped entries as published and your store's beside them (' · your run', "
                         "unranked; never re-scored together). export: add the shipped cells to the store's (refused "
                         "when they were built from other experts)")
    lb.add_argument("--references-only", action="store_true",
                    help="import: only the cells every defense shares (baselines, and the unprotected and θ_pre "
                         "references); a run of a new defense on that store then computes its own cells only. The "
                         "experts are built bit-identically on every CPU (bench.portable), and scoring refuses to pair "
                         "cells of different experts, so a mismatch is caught, never mixed")
    lb.add_argument("--protocol", default="standard", help="score under this protocol ('none': every stored cell, "
                                                          "against every registered attack)")
    lb.set_defaults(func=cmd_leaderboard)

    fr = sub.add_parser("frontier", help="run a defense's declared strength settings through the protocol: utility "
                                         "against security per setting (variants NAME[key=value])",
                        description="Each value of each knob the defense declares (`Defense.frontier`; one knob at a "
                                    "time, the others at their defaults) runs the protocol as a variant labelled "
                                    "NAME[key=value]; the references every variant shares run once, and stored cells "
                                    "are skipped. `bench leaderboard export` then lists the frontier in the manifest "
                                    "and the site draws it (frontiers.html).")
    fr.add_argument("--defense", required=True, help="a defense that declares a frontier (`bench show defense NAME`)")
    fr.add_argument("--suite", default=DEFAULT_SUITE, help="one suite (default text-minilm)")
    fr.add_argument("--victims", default=None, help="restrict victim tasks (comma list; default every task)")
    fr.add_argument("--jobs", type=int, default=1, help="worker processes (local executor)")
    fr.add_argument("--protocol", default="standard", metavar="NAME", help="the protocol each variant runs (default standard)")
    fr.add_argument("--dry-run", action="store_true", help="print the variants and the cost estimate and exit")
    common(fr)
    fr.set_defaults(func=cmd_frontier)

    rp = sub.add_parser("reproduce", help="check a suite's no-defense baselines against its lineage's published table")
    rp.add_argument("--suite", required=True)
    rp.add_argument("--table", default=None, help="published table JSON (default: the one the suite pins)")
    rp.add_argument("--tolerance-avg", type=float, default=1.0, help="allowed |measured - published| of a row's average")
    rp.add_argument("--tolerance-task", type=float, default=2.5, help="allowed |measured - published| per task")
    common(rp)
    rp.set_defaults(func=cmd_reproduce)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UserError, *USER_ERRORS) as exc:
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"bench: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; finished cells are in the store and a re-run resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

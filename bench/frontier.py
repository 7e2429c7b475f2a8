"""Trade-off frontiers: what more protection costs (`bench frontier`).

A defense declares its strength knobs (`bench.plugins.Defense.frontier`: parameter -> values, weak to
strong, the default among them). Each value, one knob at a time with the others at their defaults, is a
**variant** with its own label (`bench.plugins.Defense.label`: ``params[high=5]``; the default setting keeps
the plain name, so its cells are the ones any protocol run of the defense stores). `run_frontier` runs the
protocol on every variant at once: the unprotected and θ_pre references do not depend on the defense, so
they are computed once for all variants (or not at all when the store already holds them), and each variant
is scored as an entry of its own. The export gathers a defense's stored variants into the manifest's
``frontiers`` (`leaderboard.export.frontiers`) and the site draws utility against security through them.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.plan import Cell, make_defense, parse_variant
from bench.protocol import Protocol, RunCells, StepReport, Walk, run_protocol
from bench.registry import defenses
from bench.scoring import Scores
from bench.store import Store
from bench.suite import Suite


class FrontierError(ValueError):
    """A defense that declares no frontier, or a variant label where a plain name is expected."""


@dataclass(frozen=True)
class Variant:
    """One declared setting of a knob: the value as ``--param`` gives it, and the label it is stored under."""

    knob: str
    value: str
    label: str
    default: bool
    """The value is the knob's default: the variant is the defense at its default params (its plain name)."""


def frontier_variants(name: str) -> list[Variant]:
    """Every declared (knob, value) of defense ``name``, knob by knob in declared order; the default setting is
    listed under each knob (one label, run once)."""
    base, given = parse_variant(name)
    if given:
        raise FrontierError(f"bench frontier takes a defense name, not a variant ({name!r}); it runs the settings "
                            f"the defense declares (`bench show defense {base}`)")
    cls = defenses.get(name)
    if not cls.frontier:
        raise FrontierError(f"defense {name} declares no frontier (its class attribute `frontier`: parameter -> "
                            "values, weak to strong), so there is nothing to sweep")
    out = []
    for knob, values in cls.frontier.items():
        for value in values:
            label = make_defense(name, {knob: value}).label
            out.append(Variant(knob, value, label, label == name))
    return out


def variant_labels(variants: Sequence[Variant]) -> list[str]:
    """The distinct labels to run, in declared order (the default once)."""
    return list(dict.fromkeys(v.label for v in variants))


def run_frontier(protocol: Protocol, suite: Suite, store: Store, name: str, run_cells: RunCells, *,
                 victims: Sequence[str] | None = None, log: Callable[[str], None] = print
                 ) -> tuple[list[Variant], Walk, list[StepReport]]:
    """Run ``protocol`` on every declared variant of defense ``name`` together (`bench.protocol.run_protocol`):
    each (variant, victim) stops at its own break, while a step's references run once for every variant."""
    variants = frontier_variants(name)
    walk, reports = run_protocol(protocol, suite, store, variant_labels(variants), run_cells, victims=victims, log=log)
    return variants, walk, reports


def frontier_table(variants: Sequence[Variant], scores: Scores, suite: str) -> str:
    """Per declared (knob, value): the variant's utility and security with their intervals."""
    from tabulate import tabulate

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    def ci(c: tuple[float, float] | None) -> str:
        return "-" if c is None else f"[{c[0]:.3f}, {c[1]:.3f}]"

    rows = []
    for v in variants:
        try:
            ds = scores.entry(suite, v.label)
        except KeyError:  # every cell N/A (the defense cannot act on the suite), or nothing stored yet
            rows.append([v.knob, v.value + (" (default)" if v.default else ""), v.label, "-", "-", "-", "-", "-"])
            continue
        rows.append([v.knob, v.value + (" (default)" if v.default else ""), v.label, num(ds.utility), ci(ds.utility_ci),
                     num(ds.security), ci(ds.security_ci), "yes" if ds.complete else "no"])
    return tabulate(rows, headers=["knob", "value", "variant", "utility", "utility CI", "security", "security CI",
                                   "complete"], tablefmt="github", disable_numparse=True)


def main(args: argparse.Namespace, *, make_suite: Callable[[str, str | None], Suite],
         dry_run: Callable[..., int]) -> int:
    """`bench frontier --defense X --suite S [--jobs N] [--store S] [--victims ...] [--dry-run]`; the CLI hands in
    how it builds a suite and prints a protocol's dry run (so this module does not import the CLI)."""
    from bench.executors.local import run_local
    from bench.protocol import get_protocol, scope
    from bench.runner import RunSummary, environment
    from bench.scoring import score
    from bench.store import check_store_path

    if args.jobs < 1:
        raise FrontierError(f"--jobs {args.jobs}: expected at least 1 worker process")
    protocol = get_protocol(args.protocol)
    variants = frontier_variants(args.defense)
    labels = variant_labels(variants)
    victims = [v.strip() for v in args.victims.split(",") if v.strip()] if args.victims else None
    check_store_path(Path(args.store))
    print(f"frontier of {args.defense}: {len(labels)} settings ("
          + "; ".join(f"{k}: {', '.join(v.value + ('*' if v.default else '') for v in variants if v.knob == k)}"
                      for k in dict.fromkeys(v.knob for v in variants)) + "; * the default)")
    if args.dry_run:
        for label in labels:
            print(f"  {label}")
        # the shared references are planned once for all variants, so they are counted once here too
        return dry_run(args, protocol, labels, [args.suite], victims)
    suite = make_suite(args.suite, args.cache_dir)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    t0 = time.time()
    with Store(args.store) as store:
        store.start_run(run_id, sys.argv, {**environment(), "protocol": protocol.stamp()})

        def run_cells(cells: Sequence[Cell]) -> RunSummary:
            return run_local(suite, store, cells, run_id=run_id, jobs=args.jobs)

        _, _, reports = run_frontier(protocol, suite, store, args.defense, run_cells, victims=victims)
        store.finish_run(run_id)
        records = store.cells(suite=suite.name)
    sc = scope(records, protocol, cache_dir=args.cache_dir)
    scores = score(sc.records, attacks=[], missing=sc.missing)
    print(f"\n{suite.name}: frontier of {args.defense} under protocol {protocol.name} v{protocol.version} in "
          f"{time.time() - t0:.0f}s")
    print(frontier_table(variants, scores, suite.name))
    return 1 if any(r.failed for r in reports) else 0

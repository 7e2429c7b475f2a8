"""Reading stored cells for scoring: the index of cells, each protected cell's references, per-example outcomes.

A protected cell is read only against the U and ∅ cells of its pipeline's **honest counterpart**
(`bench.plan.counterpart_spec`): the same suite, recipe, victim, partners, merge with its params, seed,
and the attack a free-rider with the same data would run on an unprotected release (``none`` for a
data-free undo attack). A cell merged with λ = 0.5 never pairs with a reference merged with λ = 0.3, and
an attack that destroys the unprotected expert is not credited for it.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.keys import canonical
from bench.outcomes import OutcomeError, decode
from bench.plan import reference_ids
from bench.scoring.results import PRIMARY_METRICS
from bench.store import CellRecord, newest_ok


def experts(cell: CellRecord) -> tuple[str, tuple[str, ...], str] | None:
    """The models a cell was built from, by content hash: (victim expert, partner experts, θ_pre), as the runner
    records them in its provenance; None for a cell that recorded none (hand-built or very old cells)."""
    hashes = (cell.provenance or {}).get("hashes") or {}
    expert, pretrained = hashes.get("expert"), hashes.get("pretrained")
    if not expert or not pretrained:
        return None
    return str(expert), tuple(sorted(str(h) for h in hashes.get("partners") or ())), str(pretrained)


def same_experts(a: CellRecord, b: CellRecord, *, partners: bool = True) -> bool:
    """Whether two cells rest on the same experts (unknown counts as the same: nothing to tell them apart)."""
    x, y = experts(a), experts(b)
    if x is None or y is None:
        return True
    return (x[0], x[2]) == (y[0], y[2]) and (not partners or not x[1] or not y[1] or x[1] == y[1])


def attack_name(cell: CellRecord) -> str:
    """The attack plugin a cell ran: its spec name (a sweep point 'x[k=v]' ran attack 'x'), else its label."""
    spec = cell.spec.get("attack") if isinstance(cell.spec, dict) else None
    name = spec.get("name") if isinstance(spec, dict) else None
    return name if isinstance(name, str) and name else cell.attack


def primary_metric(names: Iterable[str]) -> str | None:
    """The first of `PRIMARY_METRICS` a task reports, else the alphabetically first."""
    names = sorted(set(names))
    for preferred in PRIMARY_METRICS:
        if preferred in names:
            return preferred
    return names[0] if names else None


def sign(higher_is_better: bool) -> float:
    return 1.0 if higher_is_better else -1.0


def number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def timing(cell: CellRecord, *stages: str) -> float | None:
    timings = cell.provenance.get("timings") or {}
    found = [float(timings[s]) for s in stages if isinstance(timings.get(s), (int, float))]
    return sum(found) if found else None


def mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(np.mean(vals)) if vals else None


def maximum(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(max(vals)) if vals else None


def quiet_nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def examples(cell: CellRecord, role: str, task: str, metric: str, sgn: float) -> np.ndarray | None:
    """Per-example outcomes (sign-adjusted) of a stored metric; its value as a single outcome when the
    suite gave none; None when the metric is absent."""
    m = cell.find(role, task, metric)
    if m is None or not math.isfinite(m.value):
        return None
    if not m.examples:
        return np.array([sgn * m.value])
    try:
        return sgn * decode(m.examples)
    except OutcomeError:
        return None


@dataclass
class CellIndex:
    """The cells, keyed for the lookups scoring needs."""

    by_id: dict[str, CellRecord]
    metric_of: dict[tuple[str, str], tuple[str, bool]]
    """(suite, task) -> (primary metric, higher_is_better)."""
    baselines: dict[tuple[str, str, str, int], CellRecord]
    """(suite, recipe hash, victim, seed) -> newest ok baseline cell."""
    utility: dict[tuple[str, str, str, int, str], CellRecord]
    """`utility_key` -> newest ok utility cell."""
    protected: list[CellRecord]
    """Newest ok-or-N/A protected merge cells per coordinates."""
    unprotected: list[CellRecord]
    """Newest unprotected merge cells per coordinates (the ``none`` defense's own cells)."""
    failed: list[CellRecord]

    def reference(self, protected: CellRecord, filling: str) -> tuple[CellRecord | None, str]:
        """The ``filling`` reference of a protected cell (its counterpart's cell, `bench.plan.reference_ids`),
        and the id it was looked for under when none is stored."""
        ids = reference_ids(protected.spec, filling)  # type: ignore[arg-type]
        for i in ids:
            if i in self.by_id:
                return self.by_id[i], i
        return None, ids[0]


def newest(records: Iterable[CellRecord]) -> list[CellRecord]:
    """The newest cell at each coordinates, whatever its status (a failure after a success is still a failure)."""
    out: dict[tuple, CellRecord] = {}
    for c in sorted(records, key=lambda c: (c.created, c.cell_id)):
        out[c.coordinates] = c
    return list(out.values())


def utility_key(cell: CellRecord) -> tuple[str, str, str, int, str]:
    """What a protected cell and the utility cell of its artifact share: suite, recipe, victim, seed, defense spec."""
    return (cell.suite, str(cell.spec.get("recipe_hash", "")), cell.victim, cell.seed, canonical(cell.spec.get("defense")))


def index(records: list[CellRecord]) -> CellIndex:
    cells = sorted(records, key=lambda c: (c.created, c.cell_id))
    by_id: dict[str, CellRecord] = {}
    for c in cells:
        by_id[c.cell_id] = c
    names: dict[tuple[str, str], dict[str, bool]] = defaultdict(dict)
    baselines: dict[tuple[str, str, str, int], CellRecord] = {}
    for c in newest_ok(cells):
        for m in c.metrics:
            names[(c.suite, m.task)].setdefault(m.metric, m.higher_is_better)
        if c.kind == "baseline":
            baselines[(c.suite, str(c.spec.get("recipe_hash", "")), c.victim, c.seed)] = c
    metric_of = {}
    for key, found in names.items():
        name = primary_metric(found)
        if name is not None:
            metric_of[key] = (name, found[name])
    latest = newest(c for c in cells if c.kind == "merge")
    protected = [c for c in latest if c.filling == "protected" and c.status != "failed"]
    unprotected = [c for c in latest if c.filling == "unprotected" and c.status != "failed"]
    utility = {utility_key(c): c for c in newest_ok(c for c in cells if c.kind == "utility")}
    failed = [c for c in newest(cells) if c.status == "failed"]
    return CellIndex(by_id, metric_of, baselines, utility, protected, unprotected, failed)

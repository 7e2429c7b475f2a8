"""The reproduction gate: a suite's no-defense baselines must match its lineage's published table.

``bench reproduce --suite NAME`` runs, through the ordinary harness (plan, local executor, store,
so the cells are the very cells `bench run` produces and are cached alike):

1. the baseline cells of every task: θ_pre and each expert on its own task. Each expert's own-task
   score is checked against the table's *individual* row **before anything is merged**: a
   checkpoint mapped to the wrong task (FusionBench issue #118: the L/14 ``resisc45`` id served the
   ``dtd`` model) fails here, and the gate then evaluates the failing expert on the other tasks to
   say whose checkpoint it looks like. θ_pre is checked against the *pretrained* row. When either
   fails, the merges are not run: their numbers would mean nothing.
2. one merge of all experts per merge row of the table (WA, TA, TIES, layer-wise AdaMerging, with
   the table's merge parameters), evaluated on every task.

A number passes when it is within ``tolerance_task`` (default ±2.5 points) of the published one; a
row's average when it is within ``tolerance_avg`` (±1.0), the tolerances the research notes
propose (harness-anchors §1.5). Scores are compared on the table's scale (``scale`` × the suite's
metric; 100 for accuracy in %).

**Tables** are JSON shipped with the suite (``Suite.reference_table()``, e.g.
``tasks/reference/clip-vit-b32-ta8.hf.json``): ``suite``, ``lineage``, ``title``, ``source`` (where
the numbers were read: citation, repository, file, commit), ``metric``, ``scale``, ``tasks`` and
``rows``; each row has ``name``, ``kind`` (``pretrained``, ``expert`` or ``merge``), ``label``,
``values`` (task -> number), ``average`` and, for merges, ``merge`` (a registered merge method)
and ``params``.

**Where the result goes.** The `GateResult` is written to the store's stage table under the key
``reproduce:<suite>`` (`gate_key`), replacing the previous one; `gate_passed(store, suite)` reads it
back (None when the suite was never gated) so the leaderboard can refuse to publish a suite whose
gate failed.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench.executors.local import run_local
from bench.plan import Cell, build_plan
from bench.registry import merges, suites
from bench.store import CellRecord, Store
from bench.suite import Suite

RowKind = Literal["pretrained", "expert", "merge"]
GATE_KEY_PREFIX = "reproduce:"
AVERAGE = "average"


def gate_key(suite: str) -> str:
    """The stage-table key under which a suite's latest gate result is stored."""
    return GATE_KEY_PREFIX + suite


# ---------------------------------------------------------------- published tables


@dataclass(frozen=True)
class ReferenceRow:
    """One published row: θ_pre, the individual experts, or one merge method with its parameters."""

    name: str
    kind: RowKind
    label: str
    values: Mapping[str, float]
    """Task -> published score (table scale)."""
    average: float | None = None
    """The published average (None: not published, so not checked)."""
    merge: str | None = None
    """Registered merge method of a ``merge`` row."""
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReferenceTable:
    """A published table of one suite and checkpoint lineage, with its source."""

    suite: str
    lineage: str
    title: str
    source: Mapping[str, Any]
    metric: str
    scale: float
    """Published number = scale × the suite's metric (100 for accuracy in %)."""
    tasks: tuple[str, ...]
    rows: tuple[ReferenceRow, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "table") -> ReferenceTable:
        try:
            tasks = tuple(data["tasks"])
            rows = tuple(_row(r, tasks, where) for r in data["rows"])
            table = cls(suite=data["suite"], lineage=data.get("lineage", ""), title=data.get("title", ""),
                         source=dict(data.get("source", {})), metric=data.get("metric", "accuracy"),
                         scale=float(data.get("scale", 1.0)), tasks=tasks, rows=rows)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{where} is not a reference table: missing or malformed field {exc}") from exc
        kinds = [r.kind for r in rows]
        if kinds.count("expert") != 1:
            raise ValueError(f"{where} needs exactly one row of kind 'expert' (the individual experts' scores)")
        return table

    def row_of_kind(self, kind: RowKind) -> ReferenceRow | None:
        return next((r for r in self.rows if r.kind == kind), None)

    @property
    def merge_rows(self) -> list[ReferenceRow]:
        return [r for r in self.rows if r.kind == "merge"]


def _row(data: Mapping[str, Any], tasks: Sequence[str], where: str) -> ReferenceRow:
    kind = data["kind"]
    if kind not in ("pretrained", "expert", "merge"):
        raise ValueError(f"{where}: row {data.get('name')!r} has kind {kind!r}; use pretrained, expert or merge")
    unknown = sorted(set(data["values"]) - set(tasks))
    if unknown:
        raise ValueError(f"{where}: row {data['name']!r} has values for tasks {unknown} not in the table's tasks")
    if kind == "merge" and not data.get("merge"):
        raise ValueError(f"{where}: merge row {data['name']!r} names no merge method")
    return ReferenceRow(name=data["name"], kind=kind, label=data.get("label", data["name"]),
                        values={k: float(v) for k, v in data["values"].items()},
                        average=None if data.get("average") is None else float(data["average"]),
                        merge=data.get("merge"), params=dict(data.get("params", {})))


def load_table(table: str | os.PathLike | Mapping[str, Any] | ReferenceTable) -> ReferenceTable:
    """A `ReferenceTable` from a JSON path, a dict, or itself."""
    if isinstance(table, ReferenceTable):
        return table
    if isinstance(table, Mapping):
        return ReferenceTable.from_dict(table)
    path = Path(table)
    if not path.is_file():
        raise FileNotFoundError(f"reference table {path} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"reference table {path} is not valid JSON: {exc}") from exc
    return ReferenceTable.from_dict(data, where=str(path))


def suite_table(suite: Suite) -> ReferenceTable:
    """The published table a suite pins (``Suite.reference_table()``)."""
    locate = getattr(suite, "reference_table", None)
    if not callable(locate):
        raise ValueError(f"suite {suite.name!r} ships no published table; pass one with --table")
    return load_table(locate())


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Check:
    """One measured number against its published counterpart."""

    row: str
    task: str
    """A task name, or ``"average"`` for the row's mean."""
    published: float
    measured: float | None
    """On the table's scale; None when it could not be measured (a failed cell, a skipped stage)."""
    tolerance: float

    @property
    def ok(self) -> bool:
        # A hair of slack so that a difference of exactly the tolerance passes despite float rounding.
        return self.measured is not None and abs(self.measured - self.published) <= self.tolerance + 1e-9

    @property
    def diff(self) -> float | None:
        return None if self.measured is None else self.measured - self.published


@dataclass
class GateResult:
    """What `reproduce` found; `passed` is what the leaderboard reads."""

    suite: str
    lineage: str
    table: str
    source: dict[str, Any]
    tolerance_avg: float
    tolerance_task: float
    tasks: list[str]
    rows: list[dict[str, str]]
    """(name, label, kind) of every table row, in table order."""
    checks: list[Check] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    """One sentence per problem: out-of-tolerance numbers, failed cells, suspected checkpoint mix-ups."""
    skipped: list[str] = field(default_factory=list)
    """Stages not run, with the reason."""
    recipe_hash: str = ""
    run_id: str = ""
    created: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures and not self.skipped and all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GateResult:
        data = dict(data)
        data.pop("passed", None)
        data["checks"] = [Check(**c) for c in data.get("checks", [])]
        return cls(**data)


def gate_passed(store: Store | str | os.PathLike, suite: str) -> bool | None:
    """Whether ``suite``'s latest stored gate passed; None when it was never run against this store."""
    if isinstance(store, Store):
        value = store.get_stage(gate_key(suite))
    else:
        if not Path(store).is_file():
            return None
        with Store(store, readonly=True) as opened:
            value = opened.get_stage(gate_key(suite))
    return None if value is None else bool(value.get("passed"))


def stored_gate(store: Store, suite: str) -> GateResult | None:
    """The latest stored gate result of ``suite``, or None."""
    value = store.get_stage(gate_key(suite))
    return None if value is None else GateResult.from_json(value)


# ---------------------------------------------------------------- the gate


def reproduce(suite_name: str, store_path: str | os.PathLike, cache_dir: str | os.PathLike | None,
              tolerance_avg: float = 1.0, tolerance_task: float = 2.5,
              table: str | os.PathLike | Mapping[str, Any] | ReferenceTable | None = None, *,
              suite: Suite | None = None, log: Callable[[str], None] = print) -> GateResult:
    """Run the no-defense baselines of ``suite_name`` and compare them with its published table.

    ``table`` defaults to the suite's own (`suite_table`); ``suite`` may pass a ready suite object
    (its name must be ``suite_name``). The result is stored under `gate_key` and returned.
    """
    if tolerance_avg < 0 or tolerance_task < 0:
        raise ValueError(f"tolerances must be >= 0; got average {tolerance_avg}, per task {tolerance_task}")
    suite = suite if suite is not None else suites.get(suite_name)(cache_dir=cache_dir)
    if suite.name != suite_name:
        raise ValueError(f"the suite object is {suite.name!r}, not {suite_name!r}")
    ref = load_table(table) if table is not None else suite_table(suite)
    _check_table_fits(ref, suite)
    suite.arch_map()  # resolves θ_pre now: a missing checkpoint fails before anything is written to the store
    result = GateResult(suite=suite.name, lineage=ref.lineage, table=ref.title, source=dict(ref.source),
                        tolerance_avg=tolerance_avg, tolerance_task=tolerance_task, tasks=list(ref.tasks),
                        rows=[{"name": r.name, "label": r.label, "kind": r.kind} for r in ref.rows],
                        recipe_hash=suite.recipe_hash(), created=time.time())
    store = Store(store_path)
    try:
        from bench.runner import environment

        result.run_id = f"reproduce-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        store.start_run(result.run_id, ["bench", "reproduce", "--suite", suite.name], environment())
        _gate(suite, ref, store, result, log)
        store.finish_run(result.run_id)
        store.put_stage(gate_key(suite.name), result.to_json())
    finally:
        store.close()
    return result


def _gate(suite: Suite, ref: ReferenceTable, store: Store, result: GateResult, log: Callable[[str], None]) -> None:
    tasks = list(ref.tasks)
    baselines = [c for c in build_plan(suite, merge="wa", victims=tasks).cells if c.kind == "baseline"]
    log(f"{suite.name}: baselines of {len(tasks)} task(s) (θ_pre and each expert on its own task)")
    records = _run(suite, store, baselines, result.run_id, log)
    measured_pre, measured_ft = {}, {}
    for cell in baselines:
        rec = records[cell.cell_id]
        if rec.status != "ok":
            result.failures.append(f"baseline of {cell.victim} {rec.status}: {rec.reason}")
            continue
        measured_pre[cell.victim] = _scaled(rec.value("pretrained", cell.victim, suite.primary_metric), ref)
        measured_ft[cell.victim] = _scaled(rec.value("expert", cell.victim, suite.primary_metric), ref)
    expert_row = ref.row_of_kind("expert")
    assert expert_row is not None  # from_dict guarantees one
    expert_checks = _row_checks(expert_row, measured_ft, result)
    pre_row = ref.row_of_kind("pretrained")
    pre_checks = _row_checks(pre_row, measured_pre, result) if pre_row else []
    mismatched = [c.task for c in expert_checks if c.task != AVERAGE and not c.ok]
    for task in mismatched:
        result.failures.append(_diagnose_expert(suite, task, measured_ft.get(task), expert_row, ref, result))
    if mismatched or result.failures or not all(c.ok for c in expert_checks + pre_checks):
        reason = ("expert checkpoints do not reproduce their published own-task scores" if mismatched
                  else "the baselines do not reproduce the published table")
        result.skipped.append(f"merges not run: {reason}")
        return
    for row in ref.merge_rows:
        _merge_row(suite, ref, row, store, result, log)


def _merge_row(suite: Suite, ref: ReferenceTable, row: ReferenceRow, store: Store, result: GateResult,
               log: Callable[[str], None]) -> None:
    """Merge all experts with the row's method and parameters; check every task and the average."""
    assert row.merge is not None
    params = {row.merge: {k: _param_text(v) for k, v in row.params.items()}}
    plan = build_plan(suite, merge=row.merge, params=params, victims=[ref.tasks[0]], partners="rest")
    cell = next(c for c in plan.cells if c.kind == "merge" and c.defense_label == "none" and c.attack_label == "none")
    log(f"{suite.name}: merge {row.label} ({row.merge} {row.params})")
    rec = _run(suite, store, [cell], result.run_id, log)[cell.cell_id]
    if rec.status != "ok":
        result.failures.append(f"merge {row.name} {rec.status}: {rec.reason}")
        measured: dict[str, float] = {}
    else:
        measured = {t: _scaled(rec.value("merged", t, suite.primary_metric), ref) for t in ref.tasks}
        measured = {t: v for t, v in measured.items() if v is not None}
    _row_checks(row, measured, result)


def _run(suite: Suite, store: Store, cells: list[Cell], run_id: str, log: Callable[[str], None]) -> dict[str, CellRecord]:
    run_local(suite, store, cells, run_id=run_id, log=log)
    wanted = {c.cell_id for c in cells}
    return {r.cell_id: r for r in store.cells(suite=suite.name) if r.cell_id in wanted}


def _row_checks(row: ReferenceRow, measured: Mapping[str, float], result: GateResult) -> list[Check]:
    """Per-task and average checks of one row, appended to ``result.checks``."""
    checks = [Check(row.name, t, v, measured.get(t), result.tolerance_task) for t, v in row.values.items()]
    if row.average is not None:
        values = [measured.get(t) for t in result.tasks]
        mean = sum(values) / len(values) if values and all(v is not None for v in values) else None
        checks.append(Check(row.name, AVERAGE, row.average, mean, result.tolerance_avg))
    result.checks.extend(checks)
    return checks


def _diagnose_expert(suite: Suite, task: str, own: float | None, expert_row: ReferenceRow, ref: ReferenceTable,
                     result: GateResult) -> str:
    """A sentence on a failing expert; names the task whose published score it reproduces, if any."""
    published = expert_row.values[task]
    if own is None:
        return f"expert of {task} could not be evaluated"
    head = f"expert of {task} scores {own:.1f} on {task}, published {published:.1f} (±{result.tolerance_task:g})"
    for other in ref.tasks:
        if other == task or other not in expert_row.values:
            continue
        score = _scaled(suite.evaluate(suite.expert(task).body, suite.expert(other).head, other)[suite.primary_metric], ref)
        if score is not None and abs(score - expert_row.values[other]) <= result.tolerance_task:
            return (f"{head}, but {score:.1f} on {other} (published {expert_row.values[other]:.1f}): "
                    f"the checkpoint given for {task} looks like the {other} expert (mis-mapped checkpoint)")
    return f"{head}: wrong, mis-mapped or differently trained checkpoint"


def _check_table_fits(ref: ReferenceTable, suite: Suite) -> None:
    if ref.suite != suite.name:
        raise ValueError(f"the reference table is for suite {ref.suite!r}, not {suite.name!r}")
    lineage = getattr(suite, "lineage_name", None)
    if lineage is not None and ref.lineage and ref.lineage != lineage:
        raise ValueError(f"the reference table is for lineage {ref.lineage!r}, but the suite uses {lineage!r}")
    unknown = [t for t in ref.tasks if t not in suite.tasks]
    if unknown:
        raise ValueError(f"the reference table has task(s) {unknown} that suite {suite.name!r} lacks")
    for row in ref.merge_rows:
        merges.get(row.merge)  # an unknown method fails now, with did-you-mean


def _scaled(value: float | None, ref: ReferenceTable) -> float | None:
    return None if value is None else value * ref.scale


def _param_text(value: Any) -> str:
    # The same strings `bench run --param` passes, so gate cells are the cells a user's run produces.
    return str(value).lower() if isinstance(value, bool) else str(value)


# ---------------------------------------------------------------- report


def format_gate(result: GateResult) -> str:
    """The gate as text: measured/published per row and task (✗ outside tolerance), then the verdict."""
    from tabulate import tabulate

    by = {(c.row, c.task): c for c in result.checks}
    header = ["row", *result.tasks, AVERAGE]
    lines = []
    for row in result.rows:
        cells = [row["label"]]
        for task in [*result.tasks, AVERAGE]:
            c = by.get((row["name"], task))
            if c is None:
                cells.append("")
            elif c.measured is None:
                cells.append(f"-/{c.published:.1f} ✗")
            else:
                cells.append(f"{c.measured:.1f}/{c.published:.1f}" + ("" if c.ok else " ✗"))
        lines.append(cells)
    source = result.source.get("citation") or result.source.get("url") or ""
    out = [f"reproduction gate: {result.suite} (lineage {result.lineage or '-'})",
           f"table: {result.table}" + (f" — {source}" if source else ""),
           f"measured/published; tolerance ±{result.tolerance_task:g} per task, ±{result.tolerance_avg:g} on the average",
           tabulate(lines, headers=header, tablefmt="github")]
    out += [f"FAIL: {f}" for f in result.failures]
    out += [f"SKIPPED: {s}" for s in result.skipped]
    bad = [c for c in result.checks if not c.ok and c.measured is not None]
    if bad:
        out.append(f"{len(bad)} number(s) outside tolerance: " + ", ".join(
            f"{c.row}/{c.task} {c.measured:.1f} vs {c.published:.1f}" for c in bad[:8]) + (" ..." if len(bad) > 8 else ""))
    out.append(f"gate {'PASSED' if result.passed else 'FAILED'} (stored as {gate_key(result.suite)!r})")
    return "\n".join(out)


__all__ = ["Check", "GateResult", "ReferenceRow", "ReferenceTable", "format_gate", "gate_key", "gate_passed",
           "load_table", "reproduce", "stored_gate", "suite_table"]

"""The results database (SQLite).

Schema (one file, WAL mode so several ``bench run`` processes can share it):

``runs``     one row per ``bench run`` invocation: its argv, start/end time and environment
             (package versions, git hash, host, python, torch, device).
``cells``    one row per finished cell, keyed by ``cell_id`` (a hash of the cell's full spec):
             the cell's coordinates (suite, victim, partners, defense, attack, merge, seed, kind),
             ``status`` ('ok', 'na' with ``reason``, 'failed' with ``reason``), ``spec`` (JSON:
             plugin names, versions, params, the suite recipe hash) and ``provenance`` (JSON: weight
             hashes of θ_pre, experts, artifact and merged model; wall time and peak memory per stage;
             flags such as function-preservation checks; package versions; git hash).
``metrics``  the numbers: (cell_id, role, task, metric) -> value, with ``higher_is_better``.
             Roles: 'pretrained' (θ_pre body with the expert's head), 'expert' (unprotected
             expert), 'utility' (protected artifact alone), 'merged' (the attacked merge, on the
             victim and on every partner task).
``stages``   the content-addressed stage cache: key -> JSON value (metrics of a model hash, ...).

A cell and its metrics are written in one transaction, so a killed run leaves either the whole
cell or nothing; ``INSERT OR IGNORE`` on ``cell_id`` means a cell is never stored twice.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, started REAL NOT NULL, finished REAL, argv TEXT NOT NULL, env TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cells (
    cell_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    kind TEXT NOT NULL,            -- 'baseline', 'utility' or 'merge'
    suite TEXT NOT NULL,
    victim TEXT NOT NULL,
    partners TEXT NOT NULL,        -- comma-separated task names
    defense TEXT NOT NULL,
    attack TEXT NOT NULL,
    merge TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL,          -- 'ok', 'na', 'failed'
    reason TEXT NOT NULL DEFAULT '',
    spec TEXT NOT NULL,            -- JSON
    provenance TEXT NOT NULL,      -- JSON
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS cells_by_coords ON cells (suite, defense, attack, merge, victim);
CREATE TABLE IF NOT EXISTS metrics (
    cell_id TEXT NOT NULL REFERENCES cells(cell_id),
    role TEXT NOT NULL,            -- 'pretrained', 'expert', 'utility', 'merged'
    task TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL NOT NULL,
    higher_is_better INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (cell_id, role, task, metric)
);
CREATE TABLE IF NOT EXISTS stages (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL);
"""


@dataclass(frozen=True)
class Metric:
    role: str
    """'pretrained', 'expert', 'utility' or 'merged'."""
    task: str
    metric: str
    value: float
    higher_is_better: bool = True


@dataclass(frozen=True)
class CellRecord:
    """A finished cell as stored (the unit `bench results` and scoring read)."""

    cell_id: str
    kind: str
    suite: str
    victim: str
    partners: tuple[str, ...]
    defense: str
    attack: str
    merge: str
    seed: int
    status: str
    reason: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[Metric, ...] = ()
    run_id: str = ""
    created: float = 0.0

    @property
    def coordinates(self) -> tuple[str, str, str, tuple[str, ...], str, str, str, int]:
        """Where the cell sits in the cross-product; cells that share it measure the same thing, and a
        newer one (a re-run under a new plugin version or other parameters) supersedes the older."""
        return (self.suite, self.kind, self.victim, self.partners, self.defense, self.attack, self.merge, self.seed)

    def value(self, role: str, task: str | None = None, metric: str | None = None) -> float | None:
        task = task or self.victim
        for m in self.metrics:
            if m.role == role and m.task == task and (metric is None or m.metric == metric):
                return m.value
        return None


def newest_ok(records: Iterable[CellRecord]) -> list[CellRecord]:
    """The newest successful cell at each `CellRecord.coordinates`, oldest first (what tables and scores read)."""
    newest: dict[tuple, CellRecord] = {}
    for c in sorted(records, key=lambda c: (c.created, c.cell_id)):
        if c.status == "ok":
            newest[c.coordinates] = c
    return sorted(newest.values(), key=lambda c: (c.created, c.cell_id))


class Store:
    """SQLite results store; safe for concurrent writers (WAL, busy timeout, one transaction per cell)."""

    def __init__(self, path: str | os.PathLike, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            # Workers read the stage cache and never write: the driver alone writes the store.
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=60.0, isolation_level=None)
            self._conn.execute("PRAGMA busy_timeout=60000")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=60000")
        self._conn.executescript(_SCHEMA)
        self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")

    # ------------------------------------------------------------ runs

    def start_run(self, run_id: str, argv: list[str], env: dict[str, Any]) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO runs VALUES (?, ?, NULL, ?, ?)", (run_id, time.time(), json.dumps(argv), json.dumps(env, sort_keys=True)))

    def finish_run(self, run_id: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE runs SET finished = ? WHERE run_id = ?", (time.time(), run_id))

    def run_env(self, run_id: str) -> dict[str, Any]:
        row = self._conn.execute("SELECT env FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return json.loads(row[0]) if row else {}

    # ------------------------------------------------------------ cells

    def has_cell(self, cell_id: str) -> bool:
        return self._conn.execute("SELECT 1 FROM cells WHERE cell_id = ?", (cell_id,)).fetchone() is not None

    def done_cells(self, cell_ids: Iterable[str]) -> set[str]:
        """The ids among ``cell_ids`` stored as ok or N/A (a failed cell is not done: runs retry it)."""
        ids = list(cell_ids)
        done: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            q = f"SELECT cell_id FROM cells WHERE status != 'failed' AND cell_id IN ({','.join('?' * len(chunk))})"
            done.update(r[0] for r in self._conn.execute(q, chunk))
        return done

    def put_cell(self, rec: CellRecord) -> bool:
        """Store a cell and its metrics atomically; False when the cell was already stored. A stored
        failure is replaced (failed cells are retried by the next run)."""
        with self._tx() as c:
            c.execute("DELETE FROM metrics WHERE cell_id IN (SELECT cell_id FROM cells WHERE cell_id = ? AND status = 'failed')",
                      (rec.cell_id,))
            c.execute("DELETE FROM cells WHERE cell_id = ? AND status = 'failed'", (rec.cell_id,))
            cur = c.execute(
                "INSERT OR IGNORE INTO cells VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (rec.cell_id, rec.run_id, rec.kind, rec.suite, rec.victim, ",".join(rec.partners), rec.defense,
                 rec.attack, rec.merge, rec.seed, rec.status, rec.reason,
                 json.dumps(rec.spec, sort_keys=True, default=str), json.dumps(rec.provenance, sort_keys=True, default=str),
                 rec.created or time.time()),
            )
            if cur.rowcount == 0:
                return False
            c.executemany(
                "INSERT INTO metrics VALUES (?,?,?,?,?,?)",
                [(rec.cell_id, m.role, m.task, m.metric, float(m.value), int(m.higher_is_better)) for m in rec.metrics],
            )
        return True

    def cells(self, **where: Any) -> list[CellRecord]:
        """Stored cells filtered by equality on coordinates (suite=, defense=, status=, ...)."""
        allowed = {"suite", "victim", "defense", "attack", "merge", "seed", "status", "kind", "run_id"}
        bad = set(where) - allowed
        if bad:
            raise ValueError(f"cannot filter cells by {', '.join(sorted(bad))}")
        clause = " AND ".join(f"{k} = ?" for k in where)
        q = "SELECT * FROM cells" + (f" WHERE {clause}" if clause else "") + " ORDER BY created, cell_id"
        rows = self._conn.execute(q, list(where.values())).fetchall()
        metrics: dict[str, list[Metric]] = {}
        for r in self._conn.execute("SELECT cell_id, role, task, metric, value, higher_is_better FROM metrics"):
            metrics.setdefault(r[0], []).append(Metric(r[1], r[2], r[3], r[4], bool(r[5])))
        out = []
        for r in rows:
            (cell_id, run_id, kind, suite, victim, partners, defense, attack, merge, seed, status, reason, spec,
             prov, created) = r
            out.append(CellRecord(
                cell_id=cell_id, kind=kind, suite=suite, victim=victim,
                partners=tuple(p for p in partners.split(",") if p), defense=defense, attack=attack, merge=merge,
                seed=seed, status=status, reason=reason, spec=json.loads(spec), provenance=json.loads(prov),
                metrics=tuple(sorted(metrics.get(cell_id, []), key=lambda m: (m.role, m.task, m.metric))),
                run_id=run_id, created=created,
            ))
        return out

    # ------------------------------------------------------------ stage cache

    def get_stage(self, key: str) -> Any | None:
        row = self._conn.execute("SELECT value FROM stages WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_stage(self, key: str, value: Any) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO stages VALUES (?, ?, ?)", (key, json.dumps(value, sort_keys=True), time.time()))

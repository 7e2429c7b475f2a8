"""The results database (SQLite).

Schema (one file, WAL mode so several ``bench run`` processes can share it):

``runs``     one row per ``bench run`` invocation: its argv, start/end time and environment
             (package versions, git hash, host, python, torch, device).
``cells``    one row per finished cell, keyed by ``cell_id`` (a hash of the cell's full spec):
             the cell's coordinates (suite, victim, partners, defense, attack, merge, seed, kind, and
             the victim slot's ``filling``: 'protected', 'unprotected' or 'counterfactual'),
             ``status`` ('ok', 'na' with ``reason``, 'failed' with ``reason``), ``spec`` (JSON:
             plugin names, versions, params, the suite recipe hash) and ``provenance`` (JSON: weight
             hashes of θ_pre, experts, artifact and merged model; wall time and peak memory per stage;
             flags such as function-preservation checks; package versions; git hash).
``metrics``  the numbers: (cell_id, role, task, metric) -> value, with ``higher_is_better`` and the
             per-example outcomes the value is the mean of (``examples``, `bench.outcomes` text).
             Roles: 'pretrained' (θ_pre body with the expert's head), 'expert' (unprotected
             expert), 'utility' (protected artifact alone), 'merged' (the attacked merge, on the
             victim and on every partner task).
``stages``   the content-addressed stage cache: key -> JSON value (metrics of a model hash, ...).
``claims``   leases on cells being computed: (cell_id, holder run, expiry). A run claims a group of cells
             before computing them, renews its leases while alive and releases each cell once stored,
             so two runs on one store share the work; a lease of a killed run is taken over at once on the
             same host (its pid is gone) and after it expires elsewhere.

A cell and its metrics are written in one transaction, so a killed run leaves either the whole
cell or nothing; ``INSERT OR IGNORE`` on ``cell_id`` means a cell is never stored twice.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2
"""2: cells have a ``filling``, metrics their per-example outcomes (a version-1 store is migrated on open)."""

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
    created REAL NOT NULL,
    filling TEXT NOT NULL DEFAULT 'protected'  -- 'protected', 'unprotected', 'counterfactual'
);
CREATE INDEX IF NOT EXISTS cells_by_coords ON cells (suite, defense, attack, merge, victim);
CREATE TABLE IF NOT EXISTS metrics (
    cell_id TEXT NOT NULL REFERENCES cells(cell_id),
    role TEXT NOT NULL,            -- 'pretrained', 'expert', 'utility', 'merged'
    task TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL NOT NULL,
    higher_is_better INTEGER NOT NULL DEFAULT 1,
    examples TEXT NOT NULL DEFAULT '',  -- per-example outcomes (bench.outcomes), '' when unknown
    PRIMARY KEY (cell_id, role, task, metric)
);
CREATE TABLE IF NOT EXISTS stages (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS claims (
    cell_id TEXT PRIMARY KEY, holder TEXT NOT NULL, expires REAL NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL
);
"""


_DONE = "(status = 'ok' OR (status = 'na' AND COALESCE(json_extract(provenance, '$.na_kind'), 'structural') != 'budget'))"
"""SQL: a stored cell that a run does not redo."""


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Metric:
    role: str
    """'pretrained', 'expert', 'utility' or 'merged'."""
    task: str
    metric: str
    value: float
    higher_is_better: bool = True
    examples: str = ""
    """Per-example outcomes whose mean is ``value`` (`bench.outcomes.encode`), or '' when the suite gives none."""


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
    filling: str = "protected"
    """What fills the victim's slot of a merge cell: the defense's artifact ('protected'), the unprotected
    expert ('unprotected') or θ_pre ('counterfactual'); 'protected' for baseline and utility cells."""

    @property
    def coordinates(self) -> tuple[str, str, str, tuple[str, ...], str, str, str, int, str]:
        """Where the cell sits in the cross-product; cells that share it measure the same thing, and a
        newer one (a re-run under a new plugin version or other parameters) supersedes the older."""
        return (self.suite, self.kind, self.victim, self.partners, self.defense, self.attack, self.merge, self.seed,
                self.filling)

    def find(self, role: str, task: str | None = None, metric: str | None = None) -> Metric | None:
        """The stored metric of ``role`` on ``task`` (the victim by default), or None."""
        task = task or self.victim
        for m in self.metrics:
            if m.role == role and m.task == task and (metric is None or m.metric == metric):
                return m
        return None

    def value(self, role: str, task: str | None = None, metric: str | None = None) -> float | None:
        m = self.find(role, task, metric)
        return None if m is None else m.value


def newest_ok(records: Iterable[CellRecord]) -> list[CellRecord]:
    """The newest successful cell at each `CellRecord.coordinates`, oldest first (what tables and scores read)."""
    newest: dict[tuple, CellRecord] = {}
    for c in sorted(records, key=lambda c: (c.created, c.cell_id)):
        if c.status == "ok":
            newest[c.coordinates] = c
    return sorted(newest.values(), key=lambda c: (c.created, c.cell_id))


class StoreError(ValueError):
    """The results store cannot be opened or created at the given path (a user mistake: one line)."""


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def strict_json(obj: Any, **kwargs: Any) -> str:
    """JSON that strict parsers (and SQLite's ``json_extract``) accept: never a bare NaN or Infinity.
    Parameters are finite by the time they get here (`bench.params`); a non-finite measurement in
    provenance (a diverged distance) is written as null."""
    return json.dumps(_finite_or_none(obj), allow_nan=False, default=str, **kwargs)


def check_store_path(path: Path) -> None:
    """Raise `StoreError` when ``path`` is a directory or cannot be created (a parent is a regular file)."""
    if path.is_dir():
        raise StoreError(f"results store {path} is a directory; pass a file path, e.g. --store {path / 'results.sqlite'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise StoreError(f"cannot create results store {path}: {parent} is a file, not a directory")
            return


class Store:
    """SQLite results store; safe for concurrent writers (WAL, busy timeout, one transaction per cell)."""

    def __init__(self, path: str | os.PathLike, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        check_store_path(self.path)
        try:
            self._open()
        except (sqlite3.DatabaseError, OSError) as exc:
            if getattr(self, "_conn", None) is not None:
                self._conn.close()
            what = "is not a SQLite database" if "not a database" in str(exc) else f"cannot be opened ({exc})"
            raise StoreError(f"results store {self.path} {what}; pass another --store") from exc

    def _open(self) -> None:
        if self.readonly:
            # Workers read the stage cache and never write: the driver alone writes the store.
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=60.0, isolation_level=None)
            self._conn.execute("PRAGMA busy_timeout=60000")
            self._conn.execute("SELECT COUNT(*) FROM sqlite_master")  # a file that is not SQLite fails here
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=60000")
        self._conn.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a version-1 store to version 2: its cells are 'protected' fillings with no per-example
        outcomes (their specs lack a filling, so they never pair with a version-2 cell)."""
        columns = {r[1] for r in self._conn.execute("PRAGMA table_info(cells)")}
        if "filling" not in columns:
            self._conn.execute("ALTER TABLE cells ADD COLUMN filling TEXT NOT NULL DEFAULT 'protected'")
        if "examples" not in {r[1] for r in self._conn.execute("PRAGMA table_info(metrics)")}:
            self._conn.execute("ALTER TABLE metrics ADD COLUMN examples TEXT NOT NULL DEFAULT ''")
        self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

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
            c.execute("INSERT INTO runs VALUES (?, ?, NULL, ?, ?)", (run_id, time.time(), strict_json(argv), strict_json(env, sort_keys=True)))

    def finish_run(self, run_id: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE runs SET finished = ? WHERE run_id = ?", (time.time(), run_id))

    def import_run(self, run_id: str, env: dict[str, Any]) -> None:
        """Record a run made elsewhere (its cells come from a published export), unless already known."""
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO runs VALUES (?, 0, 0, ?, ?)",
                      (run_id, strict_json(["imported"]), strict_json(env, sort_keys=True)))

    def run_times(self) -> dict[str, tuple[float, float | None]]:
        """Each run's (started, finished) epoch seconds; finished is None while it runs or after a crash, and an
        imported run records 0 for both."""
        rows = self._conn.execute("SELECT run_id, started, finished FROM runs").fetchall()
        return {r[0]: (float(r[1]), None if r[2] is None else float(r[2])) for r in rows}

    def run_env(self, run_id: str) -> dict[str, Any]:
        row = self._conn.execute("SELECT env FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return json.loads(row[0]) if row else {}

    # ------------------------------------------------------------ cells

    def done_cells(self, cell_ids: Iterable[str]) -> set[str]:
        """The ids among ``cell_ids`` stored as ok or structurally N/A (a failed cell is not done: runs retry
        it; nor is a cell N/A for the budget, which a run with another budget may be able to run)."""
        ids = list(cell_ids)
        done: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            q = f"SELECT cell_id FROM cells WHERE {_DONE} AND cell_id IN ({','.join('?' * len(chunk))})"
            done.update(r[0] for r in self._conn.execute(q, chunk))
        return done

    def put_cell(self, rec: CellRecord) -> bool:
        """Store a cell and its metrics atomically; False when the cell was already stored. A stored
        failure (or budget N/A) is replaced: those cells are retried by the next run."""
        with self._tx() as c:
            c.execute(f"DELETE FROM metrics WHERE cell_id IN (SELECT cell_id FROM cells WHERE cell_id = ? AND NOT {_DONE})",
                      (rec.cell_id,))
            c.execute(f"DELETE FROM cells WHERE cell_id = ? AND NOT {_DONE}", (rec.cell_id,))
            cur = c.execute(
                "INSERT OR IGNORE INTO cells (cell_id, run_id, kind, suite, victim, partners, defense, attack, merge, "
                "seed, status, reason, spec, provenance, created, filling) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (rec.cell_id, rec.run_id, rec.kind, rec.suite, rec.victim, ",".join(rec.partners), rec.defense,
                 rec.attack, rec.merge, rec.seed, rec.status, rec.reason,
                 strict_json(rec.spec, sort_keys=True), strict_json(rec.provenance, sort_keys=True),
                 rec.created or time.time(), rec.filling),
            )
            if cur.rowcount == 0:
                return False
            c.executemany(
                "INSERT INTO metrics (cell_id, role, task, metric, value, higher_is_better, examples) VALUES (?,?,?,?,?,?,?)",
                [(rec.cell_id, m.role, m.task, m.metric, float(m.value), int(m.higher_is_better), m.examples)
                 for m in rec.metrics],
            )
        return True

    def cells(self, **where: Any) -> list[CellRecord]:
        """Stored cells filtered by equality on coordinates (suite=, defense=, status=, ...)."""
        allowed = {"suite", "victim", "defense", "attack", "merge", "seed", "status", "kind", "run_id", "filling"}
        bad = set(where) - allowed
        if bad:
            raise ValueError(f"cannot filter cells by {', '.join(sorted(bad))}")
        clause = " AND ".join(f"{k} = ?" for k in where)
        columns = ("cell_id, run_id, kind, suite, victim, partners, defense, attack, merge, seed, status, reason, "
                   "spec, provenance, created, filling")
        q = f"SELECT {columns} FROM cells" + (f" WHERE {clause}" if clause else "") + " ORDER BY created, cell_id"
        rows = self._conn.execute(q, list(where.values())).fetchall()
        metrics: dict[str, list[Metric]] = {}
        mq = "SELECT cell_id, role, task, metric, value, higher_is_better, examples FROM metrics"
        if where:  # only the selected cells' metrics
            mq += f" WHERE cell_id IN (SELECT cell_id FROM cells WHERE {clause})"
        for r in self._conn.execute(mq, list(where.values())):
            metrics.setdefault(r[0], []).append(Metric(r[1], r[2], r[3], r[4], bool(r[5]), r[6]))
        out = []
        for r in rows:
            (cell_id, run_id, kind, suite, victim, partners, defense, attack, merge, seed, status, reason, spec,
             prov, created, filling) = r
            out.append(CellRecord(
                cell_id=cell_id, kind=kind, suite=suite, victim=victim,
                partners=tuple(p for p in partners.split(",") if p), defense=defense, attack=attack, merge=merge,
                seed=seed, status=status, reason=reason, spec=json.loads(spec), provenance=json.loads(prov),
                metrics=tuple(sorted(metrics.get(cell_id, []), key=lambda m: (m.role, m.task, m.metric))),
                run_id=run_id, created=created, filling=filling,
            ))
        return out

    # ------------------------------------------------------------ claims (two runs share one store's work)

    def claim(self, cell_ids: Iterable[str], holder: str, ttl: float) -> list[str]:
        """Lease, for ``holder``, the cells among ``cell_ids`` that are neither done nor leased by another
        live holder (an expired lease is taken over); returns the ids ``holder`` now holds, in order."""
        now = time.time()
        got = []
        host = socket.gethostname()
        with self._tx() as c:
            c.execute("DELETE FROM claims WHERE expires < ?", (now,))
            dead = [p for (p,) in c.execute("SELECT DISTINCT pid FROM claims WHERE host = ?", (host,)) if not _alive(p)]
            c.executemany("DELETE FROM claims WHERE host = ? AND pid = ?", [(host, p) for p in dead])
            for cid in cell_ids:
                if c.execute(f"SELECT 1 FROM cells WHERE cell_id = ? AND {_DONE}", (cid,)).fetchone():
                    continue
                c.execute("INSERT OR IGNORE INTO claims VALUES (?, ?, ?, ?, ?)", (cid, holder, now + ttl, host, os.getpid()))
                row = c.execute("SELECT holder FROM claims WHERE cell_id = ?", (cid,)).fetchone()
                if row and row[0] == holder:
                    got.append(cid)
        return got

    def renew_claims(self, holder: str, ttl: float) -> None:
        with self._tx() as c:
            c.execute("UPDATE claims SET expires = ? WHERE holder = ?", (time.time() + ttl, holder))

    def release(self, holder: str, cell_ids: Iterable[str] | None = None) -> None:
        with self._tx() as c:
            if cell_ids is None:
                c.execute("DELETE FROM claims WHERE holder = ?", (holder,))
            else:
                c.executemany("DELETE FROM claims WHERE holder = ? AND cell_id = ?", [(holder, i) for i in cell_ids])

    def claimed_elsewhere(self, cell_ids: Iterable[str], holder: str) -> set[str]:
        """The ids among ``cell_ids`` leased, unexpired, by a holder other than ``holder``."""
        ids = list(cell_ids)
        out: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            q = (f"SELECT cell_id FROM claims WHERE holder != ? AND expires >= ? "
                 f"AND cell_id IN ({','.join('?' * len(chunk))})")
            out.update(r[0] for r in self._conn.execute(q, [holder, time.time(), *chunk]))
        return out

    # ------------------------------------------------------------ stage cache

    def get_stage(self, key: str) -> Any | None:
        row = self._conn.execute("SELECT value FROM stages WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_stage(self, key: str, value: Any) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO stages VALUES (?, ?, ?)", (key, strict_json(value, sort_keys=True), time.time()))

"""Run cells in this process (``--jobs 1``) or in a pool of worker processes (``--jobs N``).

Only this driver writes cells to the store; workers return records. Experts are built here first
so that workers only read them from the cache. Cells are grouped by (victim, partners, defense,
seed); a group's first cell computes the artifact (cached on disk), then its other cells run one per
task, so the artifact is computed once and each finished cell is stored as soon as it returns.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import torch
from tqdm import tqdm

from bench.plan import Cell, shared_reference
from bench.registry import suites
from bench.runner import Runner, RunSummary, pending
from bench.store import CellRecord, Store
from bench.suite import Suite


def _say(message: str) -> None:
    print(message, flush=True)


def _progress_enabled() -> bool:
    return sys.stderr.isatty() and os.environ.get("MERGEARENA_QUIET") != "1"


def trains_to_merge(cell: Cell) -> bool:
    """Cells whose merge method learns on task data (AdaMerging): one costs as much as dozens of others."""
    return cell.merge is not None and cell.merge.method.needs_data


def group_cells(cells: Sequence[Cell]) -> list[list[Cell]]:
    """Cells sharing an artifact, in running order: baselines (cheap, they fill the evaluation cache),
    then every group's utility cell and cheap merges, then the merges that train, so a stopped run has
    the most cells. A utility cell joins its defense's cheap merges (same victim, partners, seed), so one
    worker computes the artifact that they share. Unprotected merges that train and tune for no victim
    (AdaMerging) are one group across victims: they are one merge of the same experts, so one worker
    merges it and the others find it cached (`bench.runner` evaluates it for every member).

    Within each of those three, the groups of one defense run one after another (defenses by label, victims
    in the cells' order): two settings of a defense that share a cached stage then meet it one after the
    other, not in two workers at once. MergeGuard's stage 1 is such a stage (``mergeguard`` and
    ``mergeguard-stage1`` fine-tune the same model): with victim-major order, the version-4 cold run computed it
    twice, at the same time, on 10 of its 16 (victim, seed) pairs, about 920 cell-seconds."""
    groups: dict[tuple, list[Cell]] = defaultdict(list)
    for c in cells:
        if shared_reference(c):
            groups[(True, False, "", (), c.defense_label, c.seed)].append(c)
            continue
        groups[(trains_to_merge(c), c.kind == "baseline", c.victim, c.partners, c.defense_label, c.seed)].append(c)
    return sorted(groups.values(), key=lambda g: (g[0].kind != "baseline", trains_to_merge(g[0]), g[0].defense_label))


def build_experts(suite: Suite, cells: Sequence[Cell], log: Callable[[str], None]) -> None:
    needed = sorted({t for c in cells if not c.na_reason for t in (c.victim, *c.partners)}, key=suite.tasks.index)
    for t in needed:
        if not suite.expert_cached(t):
            log(f"building expert {suite.name}/{t} (cached for later runs)")
        suite.expert(t)


LEASE_SECONDS = 600.0
"""How long a claim on a cell lasts without renewal: a killed run's cells are free again after it."""


class _Leases:
    """This run's claims on cells of the store, renewed by a heartbeat thread while the run lives."""

    def __init__(self, store: Store, holder: str) -> None:
        self.store, self.holder, self.mine = store, holder, set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if str(store.path) != ":memory:":
            self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        with Store(self.store.path) as own:  # sqlite connections stay in the thread that made them
            while not self._stop.wait(LEASE_SECONDS / 4):
                own.renew_claims(self.holder, LEASE_SECONDS)

    def take(self, cells: Sequence[Cell]) -> list[Cell]:
        got = set(self.store.claim([c.cell_id for c in cells], self.holder, LEASE_SECONDS))
        self.mine |= got
        return [c for c in cells if c.cell_id in got]

    def close(self) -> None:
        self._stop.set()
        self.store.release(self.holder)


def run_local(suite: Suite, store: Store, cells: Sequence[Cell], *, run_id: str, jobs: int = 1,
              log: Callable[[str], None] = _say, on_record: Callable[[CellRecord], None] | None = None) -> RunSummary:
    """Run the pending ``cells``. Each group of cells is claimed in the store just before it runs, so
    another run on the same store computes the groups this one has not claimed (and the summary says
    how many cells the other run did, or still holds)."""
    t0 = time.time()
    todo, skipped = pending(cells, store)
    summary = RunSummary(total=len(cells), skipped=skipped)
    if not todo:
        summary.seconds = time.time() - t0
        return summary
    build_experts(suite, todo, log)
    leases = _Leases(store, run_id)
    try:
        _run_claimed(suite, store, todo, summary, leases, run_id=run_id, jobs=jobs, log=log, on_record=on_record)
    finally:
        leases.close()
    others = [c.cell_id for c in todo if c.cell_id not in leases.mine]
    summary.by_other = len(store.done_cells(others))
    summary.elsewhere = len(store.claimed_elsewhere(others, run_id))
    if others and os.environ.get("MERGEARENA_QUIET") != "1":
        log(f"{len(others)} cells were claimed by another run on this store: {summary.by_other} done by it, "
            f"{summary.elsewhere} still running there")
    summary.seconds = time.time() - t0
    return summary


def _run_claimed(suite: Suite, store: Store, todo: list[Cell], summary: RunSummary, leases: _Leases, *, run_id: str,
                 jobs: int, log: Callable[[str], None], on_record: Callable[[CellRecord], None] | None) -> None:
    def record(rec: CellRecord, worked: bool) -> None:
        summary.ran += 1
        stored = store.put_cell(rec)
        store.release(run_id, [rec.cell_id])
        if stored:
            summary.records.append(rec)
            setattr(summary, rec.status, getattr(summary, rec.status) + 1)
            summary.worked += int(worked)
            if on_record:
                on_record(rec)
        if not bar.disable:
            return
        if os.environ.get("MERGEARENA_QUIET") != "1":  # a log file gets one line per cell instead of a bar
            done = summary.ok + summary.na + summary.failed
            seconds = rec.provenance.get("wall_seconds") if rec.provenance else None
            log(f"[{done}/{len(todo)}] {rec.kind} {rec.victim} {rec.defense or '-'}/{rec.attack or '-'}/{rec.merge or '-'}: "
                f"{rec.status}" + (f" in {seconds:.1f}s" if seconds is not None else ""))

    bar = tqdm(total=len(todo), desc=f"{suite.name} cells", unit="cell", disable=not _progress_enabled())
    if jobs <= 1:
        runner = Runner(suite, store, run_id)
        for group in group_cells(todo):
            for cell in leases.take(group):
                out = runner.run_cell(cell)
                record(out.record, out.worked)
                bar.update(1)
    else:
        ctx = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(suite.name, str(suite.cache_dir), str(store.path), run_id, threads, os.getpid())) as pool:
            groups = group_cells(todo)
            # the cheap cells all finish before the first merge that trains starts
            for phase in ([g for g in groups if not trains_to_merge(g[0])], [g for g in groups if trains_to_merge(g[0])]):
                # A group's first cell computes its artifact (cached on disk); the rest then run one cell
                # per task, so every finished cell reaches the store at once and a killed run loses little.
                rest: dict = {}
                futures = set()
                for g in phase:
                    g = leases.take(g)
                    if not g:  # another run on this store holds the whole group
                        continue
                    first = pool.submit(_run_group, g[:1])
                    rest[first] = g[1:]
                    futures.add(first)
                while futures:
                    finished, futures = wait(futures, return_when=FIRST_COMPLETED)
                    for f in finished:
                        results, stages = f.result()
                        for key, value in stages.items():
                            store.put_stage(key, value)
                        for rec, worked in results:
                            record(rec, worked)
                            bar.update(1)
                        futures |= {pool.submit(_run_group, [c]) for c in rest.pop(f, [])}
    bar.close()


# ---------------------------------------------------------------- worker side

_worker: Runner | None = None


def die_with_parent(parent_pid: int, poll_seconds: float = 1.0) -> None:
    """Make this process exit when ``parent_pid`` (its driver) dies, however it dies (``kill -9`` too),
    so a killed run never leaves workers holding gigabytes and competing with the resumed run.

    On Linux the kernel sends SIGKILL when the parent dies (``PR_SET_PDEATHSIG``; it fires when the
    parent *thread* that started the worker ends: the pool starts workers from the driver's main
    thread). Everywhere, a watchdog thread exits when the parent pid changes (the worker was reparented).
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the watchdog below still applies
    if os.getppid() != parent_pid:  # the driver died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="driver-watchdog", daemon=True).start()


def _init_worker(suite_name: str, cache_dir: str, store_path: str, run_id: str, threads: int, parent_pid: int) -> None:
    global _worker
    die_with_parent(parent_pid)
    torch.set_num_threads(threads)
    os.environ["MERGEARENA_QUIET"] = "1"
    suite = suites.get(suite_name)(cache_dir=cache_dir)
    _worker = Runner(suite, Store(store_path, readonly=True), run_id, collect_stages=True)


def run_group(runner: Runner, cells: Sequence[Cell]) -> tuple[list[tuple[CellRecord, bool]], dict]:
    """Run a group of cells in a worker; returns the records and the stage results to store."""
    out = []
    for c in cells:
        res = runner.run_cell(c)
        out.append((res.record, res.worked))
    return out, runner.stages.drain()


def _run_group(cells: list[Cell]) -> tuple[list[tuple[CellRecord, bool]], dict]:
    assert _worker is not None
    return run_group(_worker, cells)

"""Run cells as Ray tasks (``bench run --executor ray [--address ...]``), for many GPUs or nodes.

Each group of cells (one victim, partner set, defense and seed, so the artifact is computed once)
is a Ray task declaring its CPU/GPU needs. Workers read experts and artifacts from the shared cache
directory and the stage cache from the store (read-only); only this driver writes the store. A task
whose worker dies is retried by Ray (``max_retries``); if it still fails, its cells are stored as
'failed' with the reason and everything finished stays in the store.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.executors.local import build_experts, group_cells, run_group
from bench.plan import Cell
from bench.runner import Runner, RunSummary, pending
from bench.store import CellRecord, Store
from bench.suite import Suite


def _require_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("the Ray executor needs the [ray] extra: pip install 'mergearena[ray]'") from exc
    return ray


def _group_task(suite_name: str, cache_dir: str, store_path: str, run_id: str, cells: list[Cell]) -> tuple[list, dict]:
    import torch

    from bench.registry import suites

    os.environ["MERGEARENA_QUIET"] = "1"
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    suite = suites.get(suite_name)(cache_dir=cache_dir)
    runner = Runner(suite, Store(store_path, readonly=True), run_id, collect_stages=True)
    return run_group(runner, cells)


def run_ray(suite: Suite, store: Store, cells: Sequence[Cell], *, run_id: str, address: str | None = None,
            cpus_per_task: float = 1.0, gpus_per_task: float | None = None, max_retries: int = 2,
            log: Callable[[str], None] = print) -> RunSummary:
    ray = _require_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = time.time()
    todo, skipped = pending(cells, store)
    summary = RunSummary(total=len(cells), skipped=skipped)
    if not todo:
        summary.seconds = time.time() - t0
        return summary
    build_experts(suite, todo, log)  # on the driver, into the shared cache, before any task starts
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    if gpus_per_task is None:
        gpus_per_task = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    remote = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=max_retries,
                        retry_exceptions=False)(_group_task)
    groups = group_cells(todo)
    refs = {remote.remote(suite.name, str(suite.cache_dir), str(store.path), run_id, g): g for g in groups}
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            ref = ready[0]
            group = refs.pop(ref)
            try:
                results, stages = ray.get(ref)
            except Exception as exc:  # the worker died more often than it was retried, or the task raised
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'worker lost'}"
                results = [(_failed(c, run_id, reason), True) for c in group]
                stages = {}
            for key, value in stages.items():
                store.put_stage(key, value)
            for rec, worked in results:
                if store.put_cell(rec):
                    summary.records.append(rec)
                    setattr(summary, rec.status, getattr(summary, rec.status) + 1)
                    summary.worked += int(worked)
    finally:
        if started_here:
            ray.shutdown()
    summary.seconds = time.time() - t0
    return summary


def _failed(cell: Cell, run_id: str, reason: str) -> CellRecord:
    return CellRecord(cell_id=cell.cell_id, kind=cell.kind, suite=cell.suite, victim=cell.victim, partners=cell.partners,
                      defense=cell.defense_label, attack=cell.attack_label, merge=cell.merge_label, seed=cell.seed,
                      status="failed", reason=reason, spec=cell.spec(), run_id=run_id, filling=cell.filling)

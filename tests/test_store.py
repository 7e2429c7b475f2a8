from __future__ import annotations

import multiprocessing

import torch

from bench.store import CellRecord, Metric, Store


def _record(i: int, run: str = "r") -> CellRecord:
    return CellRecord(cell_id=f"c{i}", kind="merge", suite="s", victim="v", partners=("p",), defense="d", attack="a",
                      merge="m", seed=0, status="ok", spec={"i": i}, provenance={"h": "x"}, run_id=run,
                      metrics=(Metric("merged", "v", "accuracy", i / 100), Metric("utility", "v", "accuracy", 0.5)))


def test_cell_and_metrics_round_trip(tmp_path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        assert store.put_cell(_record(7))
        (rec,) = store.cells()
        assert rec.value("merged") == 0.07 and rec.value("utility") == 0.5
        assert rec.partners == ("p",) and rec.spec == {"i": 7}


def test_a_cell_is_never_stored_twice(tmp_path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        assert store.put_cell(_record(1))
        assert not store.put_cell(_record(1))
        assert len(store.cells()) == 1


def _writer(path: str, start: int) -> None:
    with Store(path) as store:
        for i in range(start, start + 40):
            store.put_cell(_record(i % 60, run=str(start)))
            store.put_stage(f"k{i}", {"v": i})


def test_two_processes_writing_one_store_do_not_corrupt_it(tmp_path) -> None:
    path = str(tmp_path / "s.sqlite")
    Store(path).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, s)) for s in (0, 20)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with Store(path) as store:
        cells = store.cells()
        assert sorted(c.cell_id for c in cells) == sorted(f"c{i}" for i in range(60))
        assert all(len(c.metrics) == 2 for c in cells)
        assert store.get_stage("k59") == {"v": 59}
        assert store._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_state_hash_covers_zero_dim_buffers() -> None:
    # BatchNorm's num_batches_tracked is a 0-dim int64 tensor
    from bench.weights import state_hash

    a = {"bn.num_batches_tracked": torch.tensor(3), "w": torch.ones(2, 2)}
    b = {"bn.num_batches_tracked": torch.tensor(4), "w": torch.ones(2, 2)}
    assert state_hash(a) == state_hash({k: v.clone() for k, v in a.items()}) != state_hash(b)
    assert state_hash({"x": torch.tensor(1.5, dtype=torch.bfloat16)}) != state_hash({"x": torch.tensor(1.5)})


def test_a_failed_cell_is_retried_and_replaced(tmp_path) -> None:
    failed = CellRecord(cell_id="c1", kind="merge", suite="s", victim="v", partners=("p",), defense="d", attack="a",
                        merge="m", seed=0, status="failed", reason="boom", spec={}, provenance={}, run_id="r1")
    with Store(tmp_path / "s.sqlite") as store:
        assert store.put_cell(failed) and store.put_cell(_record(0))
        assert store.done_cells(["c1", "c0"]) == {"c0"}  # the failure is not done
        assert store.put_cell(_record(1, run="r2"))  # the retry replaces it
        assert not store.put_cell(_record(1, run="r3"))  # a success is kept
        (rec,) = store.cells(run_id="r2")
        assert rec.status == "ok" and store.done_cells(["c1"]) == {"c1"} and len(store.cells()) == 2

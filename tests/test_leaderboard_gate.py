"""The leaderboard withholds a suite that pins a published table until its reproduction gate passes."""

from __future__ import annotations

from bench.registry import suites
from bench.reproduce import gate_key
from bench.store import CellRecord, Metric, Store
from leaderboard.export import export, withheld_suites


class _Gated:
    """Stands in for a real-scale suite class: it pins a reference table."""

    def reference_table(self):
        return None


def _cells(suite: str) -> list[CellRecord]:
    base = CellRecord(cell_id=f"{suite}-b", kind="baseline", suite=suite, victim="v", partners=("p",), defense="-",
                      attack="-", merge="-", seed=0, status="ok",
                      metrics=(Metric("pretrained", "v", "accuracy", 0.5), Metric("expert", "v", "accuracy", 0.9)))
    merge = CellRecord(cell_id=f"{suite}-m", kind="merge", suite=suite, victim="v", partners=("p",), defense="none",
                       attack="none", merge="ta", seed=0, status="ok",
                       spec={"defense": {"name": "none", "params": {}}, "attack": {"name": "none", "params": {}},
                             "merge": {"name": "ta", "params": {}}},
                       metrics=(Metric("utility", "v", "accuracy", 0.9), Metric("merged", "v", "accuracy", 0.8),
                                Metric("merged", "p", "accuracy", 0.7)))
    return [base, merge]


def test_gated_suite_is_withheld_until_its_gate_passes(tmp_path) -> None:
    if "gated-test" not in suites:
        suites.register("gated-test", obj=_Gated)
    path = tmp_path / "s.sqlite"
    with Store(path) as store:
        for c in _cells("gated-test") + _cells("toy-open"):
            store.put_cell(c)
        records = store.cells()
        assert "not run" in withheld_suites(store, records)["gated-test"]
        assert "toy-open" not in withheld_suites(store, records)
        export(store, tmp_path / "out")
        assert not (tmp_path / "out" / "entries" / "gated-test").exists()
        store.put_stage(gate_key("gated-test"), {"passed": False})
        assert "failed" in withheld_suites(store, records)["gated-test"]
        store.put_stage(gate_key("gated-test"), {"passed": True})
        assert withheld_suites(store, records) == {}
        export(store, tmp_path / "out")
        assert (tmp_path / "out" / "entries" / "gated-test").is_dir()

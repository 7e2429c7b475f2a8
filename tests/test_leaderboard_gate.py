"""The leaderboard withholds a suite that pins a published table until its reproduction gate passes."""

from __future__ import annotations

from bench.plan import counterpart_spec, spec_id
from bench.registry import suites
from bench.reproduce import gate_key
from bench.store import CellRecord, Metric, Store
from bench.suite import Suite
from leaderboard.export import export, withheld_suites


class _Gated(Suite):
    """Stands in for a real-scale suite class: it pins a reference table."""

    name = "gated-test"

    def reference_table(self):
        return None


def _cells(suite: str) -> list[CellRecord]:
    base = CellRecord(cell_id=f"{suite}-b", kind="baseline", suite=suite, victim="v", partners=("p",), defense="-",
                      attack="-", merge="-", seed=0, status="ok",
                      metrics=(Metric("pretrained", "v", "accuracy", 0.5), Metric("expert", "v", "accuracy", 0.9)))
    spec = {"kind": "merge", "suite": suite, "recipe_hash": "r", "victim": "v", "partners": ["p"], "seed": 0,
            "defense": None, "attack": {"name": "none", "params": {}}, "merge": {"name": "ta", "params": {}},
            "filling": "unprotected"}
    merge = CellRecord(cell_id=spec_id(spec), kind="merge", suite=suite, victim="v", partners=("p",), defense="none",
                       attack="none", merge="ta", seed=0, status="ok", spec=spec, filling="unprotected",
                       metrics=(Metric("merged", "v", "accuracy", 0.8), Metric("merged", "p", "accuracy", 0.7)))
    floor_spec = counterpart_spec(spec, "counterfactual")
    floor = CellRecord(cell_id=spec_id(floor_spec), kind="merge", suite=suite, victim="v", partners=("p",),
                       defense="counterfactual", attack="none", merge="ta", seed=0, status="ok", spec=floor_spec,
                       filling="counterfactual", metrics=(Metric("merged", "v", "accuracy", 0.6),))
    return [base, merge, floor]


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

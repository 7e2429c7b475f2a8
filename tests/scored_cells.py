"""Hand-built cells for the scoring and leaderboard tests: specs as `bench.plan` writes them (so references
are found by `counterpart_spec`), per-example outcomes as `bench.outcomes` stores them."""

from __future__ import annotations

import numpy as np

from bench.outcomes import encode
from bench.plan import counterpart_spec, spec_id
from bench.store import CellRecord, Metric

SUITE = "toy"
RECIPE = "r1"
N = 400


def outcomes(acc: float, n: int = N) -> np.ndarray:
    """``round(acc·n)`` correct examples, the first ones: fillings built this way are nested (paired)."""
    v = np.zeros(n)
    v[: round(acc * n)] = 1.0
    return v


def metric(role: str, task: str, acc: float, n: int = N, hib: bool = True, examples: bool = True) -> Metric:
    v = outcomes(acc, n)
    value = float(v.mean()) if hib else acc
    return Metric(role, task, "accuracy" if hib else "perplexity", value, hib, encode(v) if examples and hib else "")


def plugin(name: str, **params) -> dict:
    return {"name": name, "version": "1", "params": params}


def merge_spec(victim: str, partners: tuple[str, ...], seed: int, defense: str | None, attack: str, merge: str,
               filling: str = "protected", attack_params: dict | None = None, merge_params: dict | None = None,
               suite: str = SUITE) -> dict:
    return {"kind": "merge", "suite": suite, "recipe_hash": RECIPE, "victim": victim, "partners": list(partners),
            "seed": seed, "defense": plugin(defense) if defense else None,
            "attack": plugin(attack, **(attack_params or {})), "merge": plugin(merge, **(merge_params or {})),
            "filling": filling}


def record(spec: dict, metrics: list[Metric], *, status: str = "ok", reason: str = "", created: float = 2.0,
           provenance: dict | None = None, run_id: str = "") -> CellRecord:
    filling = spec.get("filling", "protected")
    label = {"unprotected": "none", "counterfactual": "counterfactual"}.get(filling) or (spec["defense"] or {}).get("name", "-")
    return CellRecord(
        cell_id=spec_id(spec), kind=spec["kind"], suite=spec["suite"], victim=spec["victim"],
        partners=tuple(spec["partners"]), defense=label, attack=(spec["attack"] or {}).get("name", "-"),
        merge=(spec["merge"] or {}).get("name", "-"), seed=spec["seed"], status=status, reason=reason, spec=spec,
        provenance=provenance or {"timings": {}}, metrics=tuple(metrics) if status == "ok" else (), created=created,
        filling=filling, run_id=run_id,
    )


def baseline(victim: str = "v", seed: int = 0, pre: float = 0.5, ft: float = 0.9, partners: tuple[str, ...] = ("p",),
             suite: str = SUITE) -> CellRecord:
    spec = {"kind": "baseline", "suite": suite, "recipe_hash": RECIPE, "victim": victim, "partners": list(partners),
            "seed": seed, "defense": None, "attack": None, "merge": None}
    return record(spec, [metric("pretrained", victim, pre), metric("expert", victim, ft)], created=1.0)


def utility_cell(defense: str, value: float, victim: str = "v", seed: int = 0, partners: tuple[str, ...] = ("p",),
                 flags: dict | None = None, status: str = "ok") -> CellRecord:
    spec = {"kind": "utility", "suite": SUITE, "recipe_hash": RECIPE, "victim": victim, "partners": list(partners),
            "seed": seed, "defense": plugin(defense), "attack": None, "merge": None}
    prov = {"timings": {"protect": 5.0}, "flags": {"function_preservation": flags} if flags else {}}
    return record(spec, [metric("utility", victim, value)], provenance=prov, status=status)


def pipeline(defense: str, attack: str, merge: str, *, p: float, u: float, z: float, victim: str = "v",
             partners: tuple[str, ...] = ("p",), seed: int = 0, utility: float = 0.88, attack_params: dict | None = None,
             merge_params: dict | None = None, timings: dict | None = None, partner: tuple[float, float] | None = None,
             with_refs: bool = True) -> list[CellRecord]:
    """The protected cell of ``defense`` and, with ``with_refs``, its unprotected and counterfactual cells."""
    spec = merge_spec(victim, partners, seed, defense, attack, merge, attack_params=attack_params, merge_params=merge_params)
    pm = [metric("utility", victim, utility), metric("merged", victim, p)]
    um = [metric("merged", victim, u)]
    if partner is not None:
        pm += [metric("merged", t, partner[0]) for t in partners]
        um += [metric("merged", t, partner[1]) for t in partners]
    out = [record(spec, pm, provenance={"timings": timings or {"prepare": 0.0, "finish": 0.0}})]
    if with_refs:
        out.append(record(counterpart_spec(spec, "unprotected"), um))
        out.append(record(counterpart_spec(spec, "counterfactual"), [metric("merged", victim, z)]))
    return out


def unique(records: list[CellRecord]) -> list[CellRecord]:
    return list({r.cell_id: r for r in records}.values())

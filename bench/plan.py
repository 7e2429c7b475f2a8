"""The cross-product of a run: suite x victim x partner set x defense x attack x merge x seed.

Every pipeline (victim, partners, attack, merge, seed) is planned with three fillings of the
victim's slot (DESIGN §4): the protected artifact of each defense ('protected'), the unprotected
expert ('unprotected') and θ_pre ('counterfactual': the same free-rider, data and partners without
the victim). The last two run the attack's *honest counterpart* (`Attack.counterpart`: what the same
free-rider, with the same data, runs on an unprotected release) and do not depend on the defense: one
cell each serves every defense and every attack with that counterpart, and `counterpart_spec` is the
one rule that finds them from a protected cell's spec.

Cells that cannot run are kept with an N/A reason and its kind: *structural* (a defense that needs
attention on a CNN, a structure-changed release merged by an attack that cannot restore the
structure) or *budget* (an attack or tuned merge that needs more data than the threat model's
budget grants: a misconfiguration, never an excuse), so the results say *why* a number is missing.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from bench.families.base import ArchitectureMap
from bench.merging import MergeMethod, merge_method_by_name
from bench.params import ParamError, params_dict, parse_params
from bench.plugins import DEFAULT_BUDGET, Attack, AttackNeeds, CompositeAttack, Defense
from bench.registry import RegistryError, attacks, defenses, merges
from bench.suite import Suite
from bench.weights import hash_json

PartnerMode = Literal["rest", "pairs"]
Filling = Literal["protected", "unprotected", "counterfactual"]
FILLINGS: tuple[Filling, ...] = ("protected", "unprotected", "counterfactual")
NaKind = Literal["structural", "architecture", "budget"]
"""'architecture': the defense cannot act on the suite's architecture at all (a structural reason that
makes the defense no entry there); 'structural': this pipeline cannot combine the release; 'budget'."""


@dataclass(frozen=True)
class MergeChoice:
    """A merge method with its parameters."""

    method: MergeMethod
    params: Any

    @property
    def label(self) -> str:
        return self.method.name

    def spec(self) -> dict[str, Any]:
        return self.method.spec(self.params)

    def __reduce__(self) -> tuple:
        # The params class is made at registration time, so it pickles as its values (for worker processes).
        return (_merge_choice, (self.method.name, {f.name: getattr(self.params, f.name) for f in fields(self.params)}))


def _merge_choice(name: str, values: dict[str, Any]) -> MergeChoice:
    method = merge_method_by_name(name)
    return MergeChoice(method, method.Params(**values))


@dataclass(frozen=True)
class Cell:
    """One (suite, victim, partners, defense, attack, merge, seed) (kind='merge'); or the standalone
    evaluations: θ_pre and the unprotected expert (kind='baseline'), a defense's artifact alone (kind='utility')."""

    kind: Literal["baseline", "utility", "merge"]
    suite: str
    recipe_hash: str
    """Hash of the suite's expert recipe: experts change when it does, so cells do too."""
    victim: str
    partners: tuple[str, ...]
    seed: int
    defense: Defense | None = None
    attack: Attack | None = None
    merge: MergeChoice | None = None
    na_reason: str = ""
    """Non-empty when the cell cannot run; stored with status 'na'."""
    evaluate_partners: bool = True
    """Evaluate the merged model on the partner tasks too (their side effect), or on the victim only."""
    filling: Filling = "protected"
    """What fills the victim's slot of a merge cell (the defense is None unless 'protected')."""
    na_kind: NaKind = "structural"
    """Why an N/A cell cannot run: by the architecture or release ('structural'), or by the budget."""

    @property
    def defense_label(self) -> str:
        """The store's defense column: the defense's variant label (`Defense.label`: its name at the default
        params, ``NAME[key=value,...]`` otherwise); 'none' for the unprotected filling (it is what defense
        ``none`` releases); 'counterfactual' for θ_pre in the victim's slot; '-' for a baseline."""
        if self.kind == "merge" and self.filling != "protected":
            return "none" if self.filling == "unprotected" else "counterfactual"
        return self.defense.label if self.defense else "-"

    @property
    def attack_label(self) -> str:
        return attack_label(self.attack) if self.attack else "-"

    @property
    def merge_label(self) -> str:
        return self.merge.label if self.merge else "-"

    def spec(self) -> dict[str, Any]:
        """The frozen identity of the cell: its store key (`cell_id`) and the key its references are found by."""
        spec = {
            "kind": self.kind, "suite": self.suite, "recipe_hash": self.recipe_hash, "victim": self.victim,
            "partners": list(self.partners), "seed": self.seed,
            "defense": self.defense.spec() if self.defense else None,
            "attack": self.attack.spec() if self.attack else None,
            "merge": self.merge.spec() if self.merge else None,
        }
        if self.kind == "merge":
            spec["filling"] = self.filling
            if self.filling != "counterfactual" and not self.evaluate_partners:
                spec["evaluate"] = "victim"  # a different measurement, so a different cell
        return spec

    @property
    def evaluated_tasks(self) -> tuple[str, ...]:
        """Tasks the merged model is evaluated on: the counterfactual only on the victim (it is the floor
        of the victim's score); the protected and unprotected fillings on every task (the partners' side
        effect and its reference) unless the plan evaluates the victim only."""
        if self.filling == "counterfactual":
            return (self.victim,)
        return (self.victim, *self.partners) if self.evaluate_partners else (self.victim,)

    @property
    def cell_id(self) -> str:
        return spec_id(self.spec())


def shared_reference(cell: Cell) -> bool:
    """An unprotected merge that trains on task data but tunes for no victim (AdaMerging): the same merge of
    the same experts whichever member is the victim, so it is computed once for all of them."""
    return (cell.kind == "merge" and cell.filling == "unprotected" and cell.merge is not None
            and cell.merge.method.needs_data and cell.merge.method.labelled(cell.merge.params) == 0)


def attack_from_spec(spec: Mapping[str, Any]) -> Attack:
    """The installed attack (or '+'-composite) a stored attack spec names, with the spec's params.
    Raises `RegistryError` (not installed) or `ParamError` (params it no longer accepts)."""
    name, params = str(spec.get("name", "")), spec.get("params") or {}
    if "+" in name:
        return CompositeAttack([attacks.get(part).from_overrides(params.get(part) or {}) for part in name.split("+")])
    return attacks.get(name).from_overrides(params)


@functools.lru_cache(maxsize=4096)
def _counterpart_attack(frozen: str) -> str:
    spec = json.loads(frozen)
    if spec.get("name") == "none":
        return frozen
    try:
        attack = attack_from_spec(spec)
    except (RegistryError, ParamError, TypeError, ValueError):
        return frozen  # a plugin no longer installed: read against its own pipeline (the rule before scoring v3)
    own, other = attack.spec(), attack.counterpart().spec()
    return frozen if other == own else json.dumps(other, sort_keys=True)


def counterpart_attack_spec(spec: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The spec of the attack's honest counterpart (`Attack.counterpart`); the spec itself when the attack is
    its own counterpart (so a stored cell of an older plugin version still finds its own references)."""
    if spec is None:
        return None
    return json.loads(_counterpart_attack(json.dumps(spec, sort_keys=True)))


def counterpart_spec(spec: dict[str, Any], filling: Filling) -> dict[str, Any]:
    """The spec of the merge cell that runs ``spec``'s pipeline (suite, recipe, victim, partners, merge with its
    params and version, seed) with ``filling`` in the victim's slot. The unprotected and counterfactual
    fillings carry no defense and run the attack's *honest counterpart* (`Attack.counterpart`: ``none`` for a
    data-free undo attack, plain merge-finetune for GradErase), so one such cell serves every defense and every
    attack with that counterpart, and an attack is never credited for what it destroys in the unprotected
    expert. They are evaluated as `Cell.evaluated_tasks` says; a protected cell evaluated on the victim only is
    read against an unprotected cell evaluated the same way, or one evaluated on every task
    (`reference_ids`)."""
    if spec.get("kind") != "merge":
        raise ValueError(f"only merge cells have counterparts; this is a {spec.get('kind')!r} cell")
    if filling not in FILLINGS:
        raise ValueError(f"unknown filling {filling!r}; use one of {', '.join(FILLINGS)}")
    out = {k: v for k, v in spec.items() if k not in ("defense", "evaluate", "filling")}
    out["defense"] = None if filling != "protected" else spec.get("defense")
    if filling != "protected":
        out["attack"] = counterpart_attack_spec(spec.get("attack"))
    out["filling"] = filling
    if filling != "counterfactual" and "evaluate" in spec:
        out["evaluate"] = spec["evaluate"]
    return out


def reference_ids(spec: dict[str, Any], filling: Filling) -> tuple[str, ...]:
    """Store keys of the ``filling`` reference of a protected cell, in the order to try them: the counterpart
    evaluated as the protected cell was, then the same merge evaluated on every task (its victim metric is
    the same: the merged model does not depend on which tasks it is evaluated on)."""
    exact = counterpart_spec(spec, filling)
    ids = [spec_id(exact)]
    if "evaluate" in exact:
        ids.append(spec_id({k: v for k, v in exact.items() if k != "evaluate"}))
    return tuple(ids)


def spec_id(spec: dict[str, Any]) -> str:
    """The store key of a cell spec (what `Cell.cell_id` is)."""
    return hash_json(spec)[:24]


def attack_label(attack: Attack) -> str:
    """The attack's name, with its swept parameters when it is one point of a sweep (`Attack.label`)."""
    return attack.label


@dataclass
class Plan:
    suite: Suite
    cells: list[Cell] = field(default_factory=list)

    @property
    def not_applicable(self) -> list[Cell]:
        return [c for c in self.cells if c.na_reason]


# ---------------------------------------------------------------- selecting plugins


_LABEL = re.compile(r"\s*([^\[\],=\s]+)\s*(?:\[(.*)\])?\s*", re.DOTALL)
_ITEM_SPLIT = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*\s*=)")


def split_names(text: str) -> list[str]:
    """A comma list of plugin names, where a defense may be a variant: ``none,params[low=0.1,high=5]`` ->
    ``["none", "params[low=0.1,high=5]"]`` (commas inside brackets do not split)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])  # an unclosed bracket keeps the rest together (and fails as a label)
    return [p.strip() for p in parts if p.strip()]


def parse_variant(label: str) -> tuple[str, dict[str, str]]:
    """``"params[high=5,low=0.1]"`` -> ``("params", {"high": "5", "low": "0.1"})``; a plain name -> (name, {}).
    Raises `ParamError` for text that is neither ``NAME`` nor ``NAME[key=value,...]``."""
    m = _LABEL.fullmatch(label)
    if m is None:
        raise ParamError(f"defense {label!r}: expected NAME or NAME[key=value,...], e.g. params[high=5]")
    name, inner = m.group(1), m.group(2)
    if inner is None:
        return name, {}
    overrides: dict[str, str] = {}
    for item in _ITEM_SPLIT.split(inner):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ParamError(f"defense {label!r}: {item.strip()!r} is not key=value (e.g. {name}[key=value])")
        if key in overrides:
            raise ParamError(f"defense {label!r} sets {key} twice")
        overrides[key] = value.strip()
    return name, overrides


def _select(names: str | Sequence[str], available: Sequence[str], kind: str) -> list[str]:
    if isinstance(names, str):
        names = split_names(names)
    if not names:
        raise ValueError(f"no {kind} selected")
    if list(names) == ["all"]:
        return list(available)
    return list(names)


def _overrides(params: Mapping[str, Mapping[str, str]], name: str) -> dict[str, str]:
    return dict(params.get(name, {}))


def make_defense(name: str, overrides: Mapping[str, str] | None = None) -> Defense:
    """The defense ``name`` names, a plain name or a variant label ``NAME[key=value,...]`` (`parse_variant`),
    with ``overrides`` on top; parameters are validated against its ``Params`` (`ParamError` naming the label)."""
    base, given = parse_variant(name)
    cls = defenses.get(base)
    try:
        return cls.from_overrides({**given, **(overrides or {})})
    except ParamError as exc:
        raise ParamError(f"defense {name}: {exc}") from exc


def make_attacks(name: str, params: Mapping[str, Mapping[str, str]] | None = None) -> list[Attack]:
    """One attack, a '+'-composite, or every point of an attack's declared sweep."""
    params = params or {}
    if "+" in name:
        # Steps of a composite run with their defaults (or --param values), not their sweeps.
        steps = [attacks.get(part).from_overrides(_overrides(params, part)) for part in name.split("+")]
        return [CompositeAttack(steps)]
    cls = attacks.get(name)
    given = _overrides(params, name)
    sweep = {k: v for k, v in cls.sweep.items() if k not in given}
    if not sweep:
        return [cls.from_overrides(given)]
    out = []
    keys = sorted(sweep)
    for values in itertools.product(*(sweep[k] for k in keys)):
        point = dict(zip(keys, values))
        out.append(cls(parse_params(cls.Params, {**given, **point}), sweep_point=point))
    return out


def standard_attacks() -> list[str]:
    """Every registered attack plus the composites the attack modules declare as standard."""
    names = list(attacks.names())
    for n in list(names):
        for composite in attacks.get(n).standard_composites:
            # a composite is standard only when every step is registered
            if composite not in names and all(part in attacks for part in composite.split("+")):
                names.append(composite)
    return names


def make_merge(name: str, overrides: Mapping[str, str] | None = None) -> MergeChoice:
    method = merges.get(name)
    return MergeChoice(method, method.parse(overrides))


# ---------------------------------------------------------------- the plan


def partner_sets(tasks: Sequence[str], victim: str, mode: PartnerMode) -> list[tuple[str, ...]]:
    others = tuple(t for t in tasks if t != victim)
    if mode == "rest":
        return [others]
    if mode == "pairs":
        return [(o,) for o in others]
    raise ValueError(f"unknown partner mode {mode!r}; use 'rest' or 'pairs'")


def defense_applicability(defense: Defense, arch: ArchitectureMap) -> str:
    """Why a defense cannot act on a suite's architecture, or '' when it can."""
    missing = arch.missing(defense.applies_to)
    if missing:
        return f"defense {defense.name} needs {', '.join(sorted(missing))}, which this architecture lacks"
    return ""


def pipeline_needs(attack: Attack, merge: MergeChoice) -> AttackNeeds:
    """What an (attack, merge) pipeline asks of the threat model. A tuned merge tunes on the same
    labelled victim samples the attack may fine-tune on (the first k of one seeded draw), so the
    labelled need is the larger of the two, not their sum."""
    needs = attack.needs()
    labelled = max(needs.labelled, merge.method.labelled(merge.params))
    return AttackNeeds(anchor=needs.anchor, labelled=labelled, unlabelled=needs.unlabelled,
                       finetune_steps=needs.finetune_steps, knows_defense=needs.knows_defense)


def pipeline_applicability(attack: Attack, merge: MergeChoice, arch: ArchitectureMap,
                           budget: AttackNeeds) -> tuple[str, NaKind]:
    """Why an (attack, merge) pipeline cannot run on a suite whatever fills the victim's slot ('' when it can)."""
    missing = arch.missing(attack.requires_features)
    if missing:
        return f"attack {attack_label(attack)} needs {', '.join(sorted(missing))}", "structural"
    over = pipeline_needs(attack, merge).exceeds(budget)
    if over:
        return f"attack {attack_label(attack)} with merge {merge.label} " + "; ".join(over), "budget"
    return "", "structural"


def applicability(defense: Defense, attack: Attack, merge: MergeChoice, arch: ArchitectureMap,
                  budget: AttackNeeds) -> tuple[str, NaKind]:
    """Why a (defense, attack, merge) cannot run on a suite, and the reason's kind; ('', _) when it can."""
    reason = defense_applicability(defense, arch)
    if reason:
        return reason, "architecture"
    reason, kind = pipeline_applicability(attack, merge, arch, budget)
    if reason:
        return reason, kind
    if defense.changes_structure and not attack.restores_structure:
        return (f"defense {defense.name} releases a structure θ_pre does not have; a plain merge cannot combine it "
                f"(attack {attack_label(attack)} does not restore the structure)"), "structural"
    return "", "structural"


def build_plan(suite: Suite, *, defense: str | Sequence[str] = "none", attack: str | Sequence[str] = "none",
               merge: str | Sequence[str] = "ta", seeds: Sequence[int] = (0,), victims: Sequence[str] | None = None,
               partners: PartnerMode = "rest", params: Mapping[str, Mapping[str, str]] | None = None,
               budget: AttackNeeds = DEFAULT_BUDGET, evaluate: Literal["all", "victim"] = "all") -> Plan:
    """Cells of the cross-product. Per (seed, victim): a baseline cell, one utility cell per defense (its
    standalone metric, measured even where every merge cell is N/A), and per (partner set, attack,
    merge) an unprotected and a counterfactual cell shared by every defense, plus a protected cell per
    defense other than ``none`` (whose protected filling *is* the unprotected cell). The plain merge
    (attack ``none``) is always planned: it is the honest merger's row.
    ``evaluate="victim"`` evaluates protected and unprotected merges on the victim task only (partner
    side effects are then not measured)."""
    if evaluate not in ("all", "victim"):
        raise ValueError(f"evaluate must be 'all' or 'victim'; got {evaluate!r}")
    params = params or {}
    defense_names = _select(defense, defenses.names(), "defense")
    attack_names = _select(attack, standard_attacks(), "attack")
    merge_names = _select(merge, merges.names(), "merge method")
    # Scores are relative to the unprotected plain merge: always plan it alongside.
    if "none" not in defense_names:
        defense_names = ["none", *defense_names]
    if "none" not in attack_names:
        attack_names = ["none", *attack_names]
    # one object per variant label (a variant named twice, or its default spelled out, runs once)
    defense_objs = list({d.label: d for d in (make_defense(n, _overrides(params, parse_variant(n)[0]))
                                              for n in defense_names)}.values())
    attack_objs = [a for n in attack_names for a in make_attacks(n, params)]
    merge_objs = [make_merge(n, _overrides(params, n)) for n in merge_names]
    tasks = list(victims) if victims else list(suite.tasks)
    for t in tasks:
        suite.check_task(t)
    arch = suite.arch_map()
    recipe = suite.recipe_hash()
    plan = Plan(suite)
    for seed, victim in itertools.product(seeds, tasks):
        others = tuple(t for t in suite.tasks if t != victim)
        plan.cells.append(Cell("baseline", suite.name, recipe, victim, others, seed))
        for d in defense_objs:
            if d.name != "none":  # the unprotected expert's metric is the baseline cell's
                reason = defense_applicability(d, arch)
                plan.cells.append(Cell("utility", suite.name, recipe, victim, others, seed, d, na_reason=reason,
                                       na_kind="architecture" if reason else "structural"))
        for group in partner_sets(suite.tasks, victim, partners):
            planned: set[str] = set()
            for a, m in itertools.product(attack_objs, merge_objs):
                # the references run the attack's honest counterpart, shared by every attack that has it
                ref = a.counterpart()
                reason, kind = pipeline_applicability(ref, m, arch, budget)
                for filling in ("unprotected", "counterfactual"):
                    cell = Cell("merge", suite.name, recipe, victim, group, seed, None, ref, m, reason,
                                evaluate_partners=evaluate == "all", filling=filling, na_kind=kind)
                    if cell.cell_id not in planned:
                        planned.add(cell.cell_id)
                        plan.cells.append(cell)
                for d in defense_objs:
                    if d.name == "none":
                        continue
                    reason, kind = applicability(d, a, m, arch, budget)
                    plan.cells.append(Cell("merge", suite.name, recipe, victim, group, seed, d, a, m, reason,
                                           evaluate_partners=evaluate == "all", na_kind=kind))
    return plan


def parse_param_args(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["params.alpha_high=10", "ta.lambda_=0.5"]`` -> ``{"params": {"alpha_high": "10"}, ...}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"--param {item!r}: expected PLUGIN.KEY=VALUE, e.g. ta.lambda_=0.5")
        key, value = item.split("=", 1)
        plugin, name = key.rsplit(".", 1)
        out.setdefault(plugin, {})[name] = value
    return out


__all__ = ["FILLINGS", "Cell", "Filling", "MergeChoice", "Plan", "attack_from_spec", "build_plan", "counterpart_attack_spec", "counterpart_spec",
           "reference_ids", "spec_id", "make_attacks", "make_defense", "make_merge",
           "parse_param_args", "parse_variant", "params_dict", "split_names", "standard_attacks"]

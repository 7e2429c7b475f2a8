"""Defense submission bundles: what a defense author sends (`bench leaderboard submit`) and what a maintainer
checks before publishing it (`bench leaderboard verify`).

A bundle is one zip file::

    bundle.json                      format version, defense, suites, protocol, date, sha256 of every other file
    plugin.json                      the defense plugin: name, version, default params, the params its cells used,
                                     its module and the sha256 of its source file(s)
    environment.json                 `bench.runner.environment()` of the machine that wrote the bundle
    entries/<suite>/<defense>.json   per suite, the defense's entry exactly as `bench leaderboard export` writes it:
                                     scores and every cell they rest on (its own cells, the shared U/∅ references,
                                     the baselines), each with its spec, provenance and per-example outcomes

`verify` checks the file hashes, checks that the installed plugin is the one that produced the cells (same
version, same source hash), draws a seeded random sample of the cells (the defense's own protected merge and
utility cells first), re-computes each from its stored spec with the local harness into a temporary store and
artifact cache, and compares the per-example outcomes with the stored ones. A cell can only be re-computed on
the same experts: when the local experts (or θ_pre) differ from those the cells record, verification stops with
an error instead of reporting mismatches.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from leaderboard import export as lb_export

FORMAT = "mergearena-submission"
FORMAT_VERSION = 1
BUNDLE = "bundle.json"
PLUGIN = "plugin.json"
ENVIRONMENT = "environment.json"
RTOL, ATOL = 1e-6, 1e-9
"""Two per-example outcomes agree when they are equal up to float rounding (0/1 outcomes must be equal)."""
KINDS = ("protected merge", "utility", "reference merge", "baseline")
"""What a sampled cell is, in the order `verify` reports the draw."""


class SubmissionError(ValueError):
    """A bundle cannot be written or verified (bad input, tampered file, other plugin or experts): one line."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- the plugin


def plugin_sources(cls: type) -> list[dict[str, str]]:
    """The source files a defense class is made of, each with its sha256: the modules defining the class, its
    ``Params`` and its base classes outside the harness (`bench`)."""
    classes = [c for c in (*cls.__mro__, getattr(cls, "Params", object)) if c is not object]
    files: dict[str, str] = {}
    for c in classes:
        if c.__module__.split(".")[0] == "bench":
            continue
        try:
            path = inspect.getsourcefile(c)
        except TypeError:  # a class with no Python source
            path = None
        if path:
            files[c.__module__] = path
    return [{"module": m, "file": Path(p).name, "sha256": _sha256(Path(p).read_bytes())}
            for m, p in sorted(files.items())]


def plugin_document(name: str, cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``plugin.json``: the installed defense ``name`` and the params its ``cells`` (entry cell dicts) ran with."""
    from bench.params import params_dict
    from bench.registry import defenses

    cls = defenses.get(name)
    used: dict[str, Any] = {}
    for c in cells:
        spec = (c.get("spec") or {}).get("defense")
        if isinstance(spec, dict) and spec.get("name") == name:
            used[json.dumps(spec.get("params"), sort_keys=True)] = spec.get("params")
    return {"name": name, "version": cls.version, "default_params": lb_export._clean(params_dict(cls.Params())),
            "params_used": [used[k] for k in sorted(used)], "module": cls.__module__,
            "sources": plugin_sources(cls)}


def check_plugin(doc: dict[str, Any]) -> None:
    """Raise `SubmissionError` unless the defense ``doc`` (``plugin.json``) names is installed here with the same
    version and the same source files (by sha256)."""
    from bench.registry import RegistryError, defenses

    name = doc.get("name")
    try:
        cls = defenses.get(name)
    except RegistryError as exc:
        raise SubmissionError(f"the bundle's defense plugin {name!r} is not installed here ({exc}); install the "
                              "author's package first") from None
    if str(cls.version) != str(doc.get("version")):
        raise SubmissionError(f"plugin {name}: the bundle was made with version {doc.get('version')!r}, the installed "
                              f"plugin is version {cls.version!r}")
    here = {s["module"]: s for s in plugin_sources(cls)}
    there = {s["module"]: s for s in doc.get("sources") or []}
    for module in sorted(set(here) | set(there)):
        a, b = here.get(module), there.get(module)
        if a is None or b is None:
            where = "the bundle only" if a is None else "the installed plugin only"
            raise SubmissionError(f"plugin {name}: source module {module} is in {where}; the installed plugin is not "
                                  "the code that produced the bundle")
        if a["sha256"] != b["sha256"]:
            raise SubmissionError(f"plugin {name}: source hash mismatch for {module} ({a['file']}): sha256 "
                                  f"{a['sha256'][:12]}… installed, {b['sha256'][:12]}… in the bundle; the installed "
                                  "plugin is not the code that produced the bundle")


# ---------------------------------------------------------------- submit


def submit(store: str | os.PathLike, defense: str, out: str | os.PathLike, *, suites: Sequence[str] | None = None,
           protocol: Any = None) -> Path:
    """Write the submission bundle of ``defense`` from the results ``store`` to ``out`` (a zip file); returns it.

    The entries are those `leaderboard.export.export` writes from the store under ``protocol`` (a
    `bench.protocol.Protocol`; None: an ad-hoc export of every stored cell), one per suite of ``suites``
    (default: every suite where the store holds cells of the defense)."""
    from bench.registry import defenses
    from bench.runner import environment
    from bench.store import Store

    defenses.get(defense)  # an unknown defense fails here, with a did-you-mean
    path = Path(store)
    if not path.is_file():
        raise SubmissionError(f"no results store at {path}; run `bench run --protocol standard --defense {defense} "
                              "--store STORE` first or pass the right --store")
    with Store(path, readonly=True) as st:
        held = sorted({c.suite for c in st.cells(defense=defense)})
    if not held:
        raise SubmissionError(f"the store {path} holds no cells of defense {defense!r}; run `bench run --protocol "
                              f"standard --suite S --defense {defense} --store {path}` first")
    chosen = list(suites) if suites else held
    missing = [s for s in chosen if s not in held]
    if missing:
        raise SubmissionError(f"the store {path} holds no cells of defense {defense!r} on suite(s) "
                              f"{', '.join(missing)} (it has {', '.join(held)})")
    texts: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="mergearena-submit-") as tmp:
        lb_export.export(path, tmp, protocol=protocol)
        for suite in chosen:
            rel = lb_export.entry_path(suite, defense)
            entry = Path(tmp) / rel
            if not entry.is_file():
                raise SubmissionError(f"the export of {path} has no entry for {defense} on suite {suite} (the defense "
                                      "cannot act on it, or the suite is withheld: see the lines above)")
            texts[rel] = entry.read_text(encoding="utf-8")
    cells = [c for t in texts.values() for c in json.loads(t)["cells"]]
    texts[PLUGIN] = lb_export.dumps(plugin_document(defense, cells))
    texts[ENVIRONMENT] = lb_export.dumps(lb_export._clean(environment()))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "defense": defense, "suites": chosen,
            "protocol": protocol.stamp() if protocol is not None else None,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "files": {rel: _sha256(t.encode()) for rel, t in sorted(texts.items())}}
    texts[BUNDLE] = lb_export.dumps(meta)
    return write_zip(out, texts)


def write_zip(out: str | os.PathLike, texts: dict[str, str]) -> Path:
    """Write ``texts`` (name -> UTF-8 text) as a zip file at ``out``, atomically."""
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for name, text in sorted(texts.items()):
                z.writestr(name, text.encode("utf-8"))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


# ---------------------------------------------------------------- reading a bundle


@dataclass
class Bundle:
    """A bundle whose files all match the hashes its ``bundle.json`` lists."""

    meta: dict[str, Any]
    plugin: dict[str, Any]
    environment: dict[str, Any]
    entries: dict[str, dict[str, Any]]
    """Entry path -> entry document."""

    def cells(self) -> list[dict[str, Any]]:
        """Every cell of every entry, once."""
        seen: dict[str, dict[str, Any]] = {}
        for doc in self.entries.values():
            for c in doc["cells"]:
                seen.setdefault(c["cell_id"], c)
        return [seen[k] for k in sorted(seen)]


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Open a bundle and check it: format, every listed file present with its sha256, no unlisted file, every
    entry valid against the published schema. Raises `SubmissionError` naming the first problem."""
    p = Path(path)
    if not p.is_file():
        raise SubmissionError(f"no bundle at {p}")
    try:
        with zipfile.ZipFile(p) as z:
            raw = {name: z.read(name) for name in z.namelist() if not name.endswith("/")}
    except (zipfile.BadZipFile, OSError) as exc:
        raise SubmissionError(f"{p} is not a readable zip file: {exc}") from None
    if BUNDLE not in raw:
        raise SubmissionError(f"{p} holds no {BUNDLE}; write bundles with `bench leaderboard submit`")
    meta = json.loads(raw[BUNDLE])
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise SubmissionError(f"{p} is not a {FORMAT} bundle of format version {FORMAT_VERSION} "
                              f"(format {meta.get('format')!r}, version {meta.get('format_version')!r})")
    files: dict[str, str] = meta.get("files") or {}
    for name in sorted(files):
        if name not in raw:
            raise SubmissionError(f"{p}: {name} is listed in {BUNDLE} but missing from the zip")
        if _sha256(raw[name]) != files[name]:
            raise SubmissionError(f"{p}: file hash mismatch for {name}: its sha256 is {_sha256(raw[name])[:12]}…, "
                                  f"{BUNDLE} lists {files[name][:12]}… (the file was changed after submit)")
    extra = sorted(set(raw) - set(files) - {BUNDLE})
    if extra:
        raise SubmissionError(f"{p}: {', '.join(extra)} in the zip but not listed in {BUNDLE}")
    for name in (PLUGIN, ENVIRONMENT):
        if name not in files:
            raise SubmissionError(f"{p}: {BUNDLE} lists no {name}")
    entries = {}
    for name in sorted(n for n in files if n.startswith("entries/")):
        doc = json.loads(raw[name])
        try:
            lb_export.validate(doc, "entry")
        except lb_export.ExportError as exc:
            raise SubmissionError(f"{p}: {name}: {exc}") from None
        entries[name] = doc
    if not entries:
        raise SubmissionError(f"{p} holds no entry")
    plugin = json.loads(raw[PLUGIN])
    if plugin.get("name") != meta.get("defense"):
        raise SubmissionError(f"{p}: {PLUGIN} describes {plugin.get('name')!r}, {BUNDLE} names {meta.get('defense')!r}")
    return Bundle(meta, plugin, json.loads(raw[ENVIRONMENT]), entries)


# ---------------------------------------------------------------- verify


def cell_kind(cell: dict[str, Any], defense: str) -> str:
    """Which of `KINDS` an entry cell is, for ``defense``'s bundle."""
    if cell["kind"] == "merge":
        own = cell["filling"] == "protected" and cell["defense"] == defense
        return "protected merge" if own else "reference merge"
    return "utility" if cell["kind"] == "utility" else "baseline"


def sample_cells(cells: Sequence[dict[str, Any]], defense: str, k: int, seed: int = 0
                 ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """``k`` stored 'ok' cells drawn at random (``seed``): the defense's own protected merge and utility cells
    first, the references and baselines only when those run out. Also how many of each `KINDS` were drawn."""
    if k < 1:
        raise SubmissionError(f"--sample {k}: draw at least one cell")
    ok = sorted((c for c in cells if c["status"] == "ok"), key=lambda c: c["cell_id"])
    if not ok:
        raise SubmissionError("the bundle holds no successful cell to re-compute")
    own = [c for c in ok if cell_kind(c, defense) in ("protected merge", "utility")]
    rest = [c for c in ok if c not in own]
    rng = random.Random(seed)
    drawn = rng.sample(own, min(k, len(own)))
    drawn += rng.sample(rest, min(k - len(drawn), len(rest)))
    counts = {kind: sum(cell_kind(c, defense) == kind for c in drawn) for kind in KINDS}
    return drawn, counts


def rebuild_cell(stored: dict[str, Any]) -> Any:
    """The `bench.plan.Cell` a stored cell ran, rebuilt from its spec with the installed plugins. Raises
    `SubmissionError` when the harness here would plan another cell (a plugin version or the suite's expert
    recipe differs), naming what differs."""
    from bench.plan import Cell, attack_from_spec, make_merge
    from bench.registry import defenses

    spec = stored["spec"]
    d, a, m = spec.get("defense"), spec.get("attack"), spec.get("merge")

    def params(values: dict[str, Any] | None) -> dict[str, Any]:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in (values or {}).items()}

    defense = defenses.get(d["name"]).from_overrides(params(d.get("params"))) if d else None
    cell = Cell(spec["kind"], spec["suite"], spec["recipe_hash"], spec["victim"], tuple(spec["partners"]),
                int(spec["seed"]), defense, attack_from_spec(a) if a else None,
                make_merge(m["name"], params(m.get("params"))) if m else None,
                evaluate_partners=spec.get("evaluate") != "victim", filling=spec.get("filling", "protected"))
    if cell.cell_id != stored["cell_id"]:
        here = cell.spec()
        diff = next((key for key in sorted(set(here) | set(spec)) if here.get(key) != spec.get(key)), "spec")
        raise SubmissionError(f"cell {stored['cell_id']} cannot be re-computed here: its {diff} is "
                              f"{spec.get(diff)!r} in the bundle, {here.get(diff)!r} with the installed harness")
    return cell


def check_experts(suite: Any, cells: Sequence[dict[str, Any]]) -> None:
    """Raise `SubmissionError` when θ_pre or an expert of ``suite`` here differs from what ``cells`` record
    (their provenance hashes): their outcomes then differ for that reason, not because of the defense."""
    from bench.weights import state_hash

    local: dict[str, str] = {}

    def expert_hash(task: str) -> str:
        if task not in local:
            local[task] = state_hash(suite.expert(task).body)
        return local[task]

    pre = suite.pretrained_hash()
    for c in cells:
        hashes = (c.get("provenance") or {}).get("hashes") or {}
        pairs = [("θ_pre", hashes.get("pretrained"), lambda: pre),
                 (f"the expert of {c['victim']}", hashes.get("expert"), lambda c=c: expert_hash(c["victim"]))]
        pairs += [(f"the expert of {t}", h, lambda t=t: expert_hash(t))
                  for t, h in zip(c["partners"], hashes.get("partners") or [])]
        for what, recorded, here in pairs:
            if recorded and recorded != here():
                raise SubmissionError(
                    f"{what} on suite {suite.name} differs from the bundle's (sha {here()[:12]}… here, {recorded[:12]}… "
                    f"in cell {c['cell_id']}): these experts cannot re-compute its cells; use the experts the author "
                    "used (--cache-dir), or build them on a CPU that gives the same weights")


@dataclass
class CellCheck:
    """One re-computed cell against its stored outcomes."""

    cell_id: str
    label: str
    examples: int
    """Stored per-example outcomes compared (values, for a metric stored without them)."""
    differing: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        if self.ok:
            return f"match     {self.cell_id}  {self.label}: {self.examples} examples agree"
        return f"MISMATCH  {self.cell_id}  {self.label}: " + "; ".join(self.problems)


def describe(cell: dict[str, Any]) -> str:
    """One readable line of a cell's coordinates."""
    where = f"{cell['suite']}/{cell['victim']} seed {cell['seed']}"
    if cell["kind"] == "merge" and cell["filling"] == "protected":
        return f"{where} merge {cell['defense']} / {cell['attack']} / {cell['merge']}"
    if cell["kind"] == "merge":  # a U or ∅ reference, shared by every defense
        return f"{where} {cell['filling']} reference {cell['attack']} / {cell['merge']}"
    return f"{where} {cell['kind']}" + (f" {cell['defense']}" if cell["kind"] == "utility" else "")


def compare(stored: dict[str, Any], record: Any) -> CellCheck:
    """Compare a stored cell's per-example outcomes (every metric's ``examples``) with a re-computed `CellRecord`."""
    from bench.outcomes import OutcomeError, decode

    check = CellCheck(stored["cell_id"], describe(stored), 0, 0)
    if record.status != "ok":
        check.problems.append(f"re-computed as {record.status}: {record.reason}")
        return check
    fresh = {(m.role, m.task, m.metric): m for m in record.metrics}
    for m in stored["metrics"]:
        key = (m["role"], m["task"], m["metric"])
        name = "/".join(key)
        new = fresh.get(key)
        if new is None:
            check.problems.append(f"{name} was not re-computed")
            continue
        if not m["examples"]:  # a suite that gives no per-example outcomes: compare the value
            check.examples += 1
            if m["value"] is None or not np.isclose(new.value, m["value"], rtol=RTOL, atol=ATOL):
                check.differing += 1
                check.problems.append(f"{name}: value {new.value!r} re-computed, {m['value']!r} stored")
            continue
        try:
            old, now = decode(m["examples"]), decode(new.examples) if new.examples else np.array([])
        except OutcomeError as exc:
            check.problems.append(f"{name}: {exc}")
            continue
        check.examples += old.size
        if old.size != now.size:
            n = max(old.size, now.size)
            check.differing += n
            check.problems.append(f"{name}: {now.size} examples re-computed, {old.size} stored")
            continue
        n = int(np.sum(~np.isclose(now, old, rtol=RTOL, atol=ATOL)))
        if n:
            check.differing += n
            check.problems.append(f"{n} of {old.size} examples differ ({name})")
    return check


@dataclass
class VerifyReport:
    """What `verify` found."""

    defense: str
    drawn: dict[str, int]
    checks: list[CellCheck]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def mismatched(self) -> list[str]:
        return [c.cell_id for c in self.checks if not c.ok]


def verify(bundle_path: str | os.PathLike, sample: int, *, seed: int = 0, cache_dir: str | None = None,
           log: Callable[[str], None] = print) -> VerifyReport:
    """Check a bundle (`read_bundle`, `check_plugin`), then re-compute ``sample`` of its cells (`sample_cells`,
    seeded) with the local harness into a temporary store and artifact cache, on the experts of ``cache_dir``,
    and compare their per-example outcomes with the stored ones; ``log`` gets one line per cell."""
    from bench.registry import suites
    from bench.runner import ArtifactCache, Runner
    from bench.store import Store

    bundle = read_bundle(bundle_path)
    check_plugin(bundle.plugin)
    defense = bundle.meta["defense"]
    drawn, counts = sample_cells(bundle.cells(), defense, sample, seed)
    log(f"verify {defense}: drew {len(drawn)} cells (seed {seed}): "
        + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    cells = [(c, rebuild_cell(c)) for c in drawn]
    by_suite: dict[str, Any] = {}
    for c, _ in cells:
        if c["suite"] not in by_suite:
            by_suite[c["suite"]] = suites.get(c["suite"])(cache_dir=cache_dir)
    for name, suite in by_suite.items():
        check_experts(suite, [c for c, _ in cells if c["suite"] == name])
    checks = []
    with tempfile.TemporaryDirectory(prefix="mergearena-verify-") as tmp, Store(Path(tmp) / "verify.sqlite") as store:
        runners = {}
        for name, suite in by_suite.items():
            runners[name] = Runner(suite, store, run_id="verify")
            runners[name].artifacts = ArtifactCache(Path(tmp))  # artifacts are re-computed, never read from a cache
        for stored, cell in cells:
            check = compare(stored, runners[stored["suite"]].run_cell(cell).record)
            checks.append(check)
            log(check.line())
    return VerifyReport(defense, counts, checks)

"""Executes planned cells stage by stage, with content-addressed caching.

Stages of a merge cell (DESIGN §3): fill the victim's slot (protect -> utility for the protected
filling; the expert or θ_pre otherwise) -> prepare -> merge -> finish -> evaluate. A utility cell
runs protect -> utility only, and a baseline cell evaluates θ_pre and the expert. Every cache is
indexed by a typed key of its inputs (`bench.keys`): artifacts on disk under
``<cache>/artifacts/<ArtifactKey>``, evaluations (metrics and per-example outcomes) and merges in
the store's stage table. Cells already in the store are skipped before any model work, so a warm
re-run of a finished matrix only hashes cell specs. A failing plugin fails its cell (status
'failed' with the reason), never the run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from bench.artifact import Artifact
from bench.keys import ArtifactKey, EvalKey, MergeKey, canonical
from bench.merging import MergeContext
from bench.outcomes import Evaluation, encode
from bench.plan import Cell, shared_reference
from bench.plugins import PRESERVATION_TOLERANCE, AttackContext, DefenseContext
from bench.store import CellRecord, Metric, Store
from bench.suite import Expert, NotApplicableError, Suite
from bench.weights import StateDict, assert_finite, save_state, state_hash


class InputDamagedError(RuntimeError):
    """A plugin changed, in place, weights the harness handed it (an expert, θ_pre, a partner, an artifact)."""


def environment() -> dict[str, Any]:
    """Package versions, git hash, host: the run-level provenance."""
    pkgs = {}
    for name in ("mergearena", "torch", "transformers", "safetensors", "numpy", "scipy", "lm-eval", "diffusers", "ray"):
        try:
            pkgs[name] = version(name)
        except PackageNotFoundError:
            pass
    return {
        "packages": pkgs, "git": git_hash(), "python": platform.python_version(), "host": platform.node(),
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_identity(),
    }


KERNEL_SWITCHES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Environment variables that choose CPU kernels (and so the bits of a fine-tune): recorded with every run."""


def cpu_identity() -> dict[str, Any]:
    """What decides which CPU kernels ran: the processor's model and instruction-set flags, the kernel level ATen
    dispatched to, and the switches that cap it. The same code and seed fine-tune different weights on CPUs
    that differ here (oneDNN, MKL and ATen pick kernels by instruction set), so every run records them."""
    model, flags = platform.processor() or "", []
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model.strip():
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value.split()
            if model and flags:
                break
    except OSError:
        pass
    isa = sorted(f for f in flags if f.startswith(("avx", "sse", "fma", "amx", "f16c", "bmi")))
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # an old torch without the query
        capability = ""
    return {"model": model or platform.machine(), "isa_flags": isa, "aten_capability": capability,
            "cores": os.cpu_count(), "switches": {k: os.environ[k] for k in KERNEL_SWITCHES if k in os.environ}}


def git_hash() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class ArtifactCache:
    """Protected artifacts on disk, keyed by a hash of their inputs.

    Each file records its content hash when written and is checked against it on load: an entry that
    is unreadable or does not match (a truncated copy, a full disk) is evicted with one line on stderr
    and `load` reports a miss, so the artifact is recomputed instead of failing every later run.
    """

    root: Path

    def path(self, key: str) -> Path:
        return self.root / "artifacts" / key

    def load(self, key: str) -> tuple[Artifact, dict[str, Any]] | None:
        from bench.weights import CheckpointError, CorruptFileError, load_verified

        d = self.path(key)
        meta_path = d / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            # entries written before `has_head` was recorded: a head file present means a head
            has_head = meta.pop("has_head", (d / "head.safetensors").is_file())
            head = load_verified(d / "head.safetensors") if has_head else None
            art = Artifact(state=load_verified(d / "state.safetensors"), variant=meta["variant"], head=head,
                           notes=meta["notes"])
        except (CheckpointError, OSError, ValueError, KeyError, TypeError) as exc:
            self.evict(key, exc.reason if isinstance(exc, CorruptFileError) else f"unreadable: {exc}")
            return None
        return art, meta

    def evict(self, key: str, reason: str) -> None:
        """Delete a corrupt entry and say so (one line on stderr; workers share the driver's)."""
        import sys

        print(f"cached artifact {key} is corrupt ({reason}); recomputing", file=sys.stderr, flush=True)
        shutil.rmtree(self.path(key), ignore_errors=True)

    def save(self, key: str, art: Artifact, meta: dict[str, Any]) -> None:
        import os
        import uuid

        from bench.store import strict_json

        d = self.path(key)
        # unique per writer: two workers that recompute the same evicted entry must not share a directory
        tmp = d.with_name(f"{d.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        tmp.mkdir(parents=True)
        try:
            save_state(art.state, tmp / "state.safetensors", record_hash=True)
            if art.head is not None:
                save_state(art.head, tmp / "head.safetensors", record_hash=True)
            (tmp / "meta.json").write_text(strict_json({**meta, "variant": art.variant, "notes": art.notes,
                                                        "has_head": art.head is not None}, sort_keys=True))
            shutil.rmtree(d, ignore_errors=True)
            try:
                tmp.rename(d)  # a finished directory appears at once or not at all
            except OSError:
                if not (d / "meta.json").is_file():
                    raise
                # another process stored the same entry meanwhile: keep it
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class StageCache:
    """Evaluation results keyed by content hash, read from the store; writes either go straight to
    the store (in the driver) or are collected and handed back (in workers, which never write)."""

    def __init__(self, store: Store, collect: bool = False) -> None:
        self.store = store
        self.collect = collect
        self.pending: dict[str, Any] = {}

    def get(self, key: str) -> Any | None:
        return self.pending.get(key) if key in self.pending else self.store.get_stage(key)

    def put(self, key: str, value: Any) -> None:
        if self.collect:
            self.pending[key] = value
        else:
            self.store.put_stage(key, value)

    def drain(self) -> dict[str, Any]:
        out, self.pending = self.pending, {}
        return out


@dataclass
class CellOutcome:
    record: CellRecord
    worked: bool
    """Whether any model work ran (False when every stage came from a cache)."""


@dataclass
class Runner:
    """Runs cells of one suite against a store and a cache directory."""

    suite: Suite
    store: Store
    run_id: str = ""
    collect_stages: bool = False
    """Workers set this: stage results are collected (`stages.drain()`) for the driver to write."""

    def __post_init__(self) -> None:
        self.artifacts = ArtifactCache(self.suite.cache_dir)
        self.stages = StageCache(self.store, collect=self.collect_stages)
        self._expert_hashes: dict[str, str] = {}
        self._pretrained_hash: str | None = None

    # ------------------------------------------------------------ evaluation with a cache

    def _eval_key(self, body_hash: str, head: dict, task: str, merged: bool) -> EvalKey:
        return EvalKey(body=body_hash, head=state_hash(head), task=task, merged=merged, suite=self.suite.name,
                       recipe=self.suite.recipe_hash())

    def _evaluate(self, body: dict | Artifact | None, head: dict, task: str, merged: bool,
                  body_hash: str | None = None) -> tuple[Evaluation, bool]:
        """Metrics and per-example outcomes of (body, head) on task; second value True when computed now
        (``body`` may be None when the caller knows the evaluation is cached under ``body_hash``)."""
        if body_hash is None:
            body_hash = body.content_hash() if isinstance(body, Artifact) else state_hash(body)
        key = self._eval_key(body_hash, head, task, merged).digest()
        cached = self.stages.get(key)
        if cached is not None:
            return Evaluation.from_json(cached), False
        if body is None:
            raise RuntimeError(f"evaluation of body {body_hash[:12]} on {task} is not cached and no body was given")
        evaluation = self.suite.evaluate_examples(body, head, task, merged=merged)
        self.stages.put(key, evaluation.to_json())
        return evaluation, True

    def _body_hash(self, task: str, body: StateDict) -> str:
        """Hash of an unprotected expert's body (computed once per runner)."""
        if task not in self._expert_hashes:
            self._expert_hashes[task] = state_hash(body)
        return self._expert_hashes[task]

    def _pre_hash(self) -> str:
        """θ_pre's hash, computed once from the weights as loaded (before any plugin saw them)."""
        if self._pretrained_hash is None:
            self._pretrained_hash = self.suite.pretrained_hash()
        return self._pretrained_hash

    def _verify_inputs(self, plugin: str, inputs: list[tuple[str, StateDict, str | None]], *,
                       artifact_hash: str | None = None, art: Artifact | None = None) -> None:
        """Fail the cell when a plugin changed, in place, weights it was handed (shared by every cell of the run);
        the suite then reloads its experts and θ_pre from disk, so every other cell stays exact."""
        damaged = []
        for label, state, expected in inputs:
            if expected is None:  # the artifact: compared with the hash it was released (and cached) with
                if art is not None and artifact_hash is not None and art.content_hash() != artifact_hash:
                    damaged.append(label)
            elif state_hash(state) != expected:
                damaged.append(label)
        if damaged:
            self.suite.forget_loaded()
            self._expert_hashes.clear()
            raise InputDamagedError(f"{plugin} modified {', '.join(damaged)} in place; plugins must not change "
                                    "their inputs (the cell fails, and the weights are reloaded from disk)")

    def _metrics(self, role: str, task: str, evaluation: Evaluation) -> list[Metric]:
        return [Metric(role, task, k, float(v), self.suite.higher_is_better,
                       encode(evaluation.examples[k]) if k in evaluation.examples else "")
                for k, v in sorted(evaluation.metrics.items())]

    # ------------------------------------------------------------ cells

    def run_cell(self, cell: Cell) -> CellOutcome:
        """Execute one cell; exceptions become a 'failed' record with the reason."""
        start = time.time()
        base_fields = dict(cell_id=cell.cell_id, kind=cell.kind, suite=cell.suite, victim=cell.victim,
                           partners=cell.partners, defense=cell.defense_label, attack=cell.attack_label,
                           merge=cell.merge_label, seed=cell.seed, spec=cell.spec(), run_id=self.run_id,
                           filling=cell.filling)
        if cell.na_reason:
            return CellOutcome(CellRecord(status="na", reason=cell.na_reason, provenance={"na_kind": cell.na_kind},
                                          **base_fields), False)
        try:
            if cell.kind == "baseline":
                metrics, prov, worked = self._baseline(cell)
            elif cell.kind == "utility":
                metrics, prov, worked = self._utility(cell)
            else:
                metrics, prov, worked = self._merge_cell(cell)
        except NotApplicableError as exc:  # discovered only when running (a suite without a fine-tuning recipe)
            return CellOutcome(CellRecord(status="na", reason=str(exc), provenance={"na_kind": "structural"},
                                          **base_fields), True)
        except Exception as exc:  # a failing plugin fails its cell, not the run
            reason = f"{type(exc).__name__}: {exc}"
            prov = {"traceback": traceback.format_exc(limit=8), "wall_seconds": time.time() - start}
            return CellOutcome(CellRecord(status="failed", reason=reason, provenance=prov, **base_fields), True)
        prov["wall_seconds"] = round(time.time() - start, 3)
        prov["peak_rss_mb"] = round(peak_rss_mb(), 1)
        return CellOutcome(CellRecord(status="ok", metrics=tuple(metrics), provenance=prov, **base_fields), worked)

    def _baseline(self, cell: Cell) -> tuple[list[Metric], dict[str, Any], bool]:
        expert = self.suite.expert(cell.victim)
        pre, w1 = self._evaluate(self.suite.pretrained(), expert.head, cell.victim, merged=False,
                                 body_hash=self.suite.pretrained_hash())
        ft, w2 = self._evaluate(expert.body, expert.head, cell.victim, merged=False)
        prov = {"hashes": {"pretrained": self.suite.pretrained_hash(), "expert": state_hash(expert.body)}}
        return self._metrics("pretrained", cell.victim, pre) + self._metrics("expert", cell.victim, ft), prov, w1 or w2

    def _protected(self, cell: Cell, expert: Expert) -> tuple[Artifact, dict[str, Any], StateDict, Evaluation, bool]:
        """Stages protect and utility: the artifact, its metadata, its head and its metrics alone on the victim task."""
        art, meta, worked = self.protect(cell, expert)
        head = art.head if art.head is not None else expert.head
        utility, w = self._evaluate(art, head, cell.victim, merged=False, body_hash=meta["artifact_hash"])
        return art, meta, head, utility, worked or w

    def _utility(self, cell: Cell) -> tuple[list[Metric], dict[str, Any], bool]:
        """The defense's artifact alone on the victim task (the same cached evaluation its merge cells record)."""
        art, meta, _head, utility, worked = self._protected(cell, self.suite.expert(cell.victim))
        prov = {
            "hashes": {"pretrained": self.suite.pretrained_hash(), "expert": meta["expert_hash"],
                       "artifact": meta["artifact_hash"]},
            "timings": {"protect": meta["protect_seconds"]},
            "defense_notes": art.notes,
            "flags": {"function_preservation": meta.get("function_preservation")},
        }
        return self._metrics("utility", cell.victim, utility), prov, worked

    def protect(self, cell: Cell, expert: Expert) -> tuple[Artifact, dict[str, Any], bool]:
        """The defense's artifact for the victim expert: from the artifact cache, or computed and cached."""
        assert cell.defense is not None
        expert_hash, head_hash = state_hash(expert.body), state_hash(expert.head)
        key = ArtifactKey(expert=expert_hash, head=head_hash, defense=canonical(cell.defense.spec()),
                          seed=cell.seed, suite=cell.suite, task=cell.victim).digest()
        cached = self.artifacts.load(key)
        if cached is not None:
            return cached[0], cached[1], False
        ctx = DefenseContext(suite=self.suite, task=cell.victim, base=self.suite.pretrained(), arch=self.suite.arch_map(),
                             family=self.suite.family(), seed=cell.seed)
        t0 = time.time()
        art = cell.defense.protect(expert, ctx)
        seconds = time.time() - t0
        self._verify_inputs(f"defense {cell.defense.name}", [("the expert", expert.body, expert_hash),
                                                              ("the expert's head", expert.head, head_hash),
                                                              ("θ_pre", self.suite.pretrained(), self._pre_hash())])
        assert_finite(art.state, f"the artifact of defense {cell.defense.name}")
        if art.head is not None:
            assert_finite(art.head, f"the head released by defense {cell.defense.name}")
        meta = {"protect_seconds": round(seconds, 3), "expert_hash": expert_hash, "defense": cell.defense.spec(),
                "artifact_hash": art.content_hash()}
        meta["function_preservation"] = self._check_preservation(cell, expert, art) if cell.defense.function_preserving else None
        self.artifacts.save(key, art, meta)
        return art, meta, True

    def _check_preservation(self, cell: Cell, expert: Expert, art: Artifact) -> dict[str, Any]:
        """Compare logits of artifact and expert on probe inputs (the victim's first test batch)."""
        batch = next(iter(self.suite.batches(cell.victim, "test", batch_size=16, limit=16)))
        head = art.head if art.head is not None else expert.head
        with torch.no_grad():
            ref = self.suite.task_model(expert.body, expert.head, cell.victim)(**batch.inputs)
            out = self.suite.task_model(art, head, cell.victim)(**batch.inputs)
        diff = float((ref - out).abs().max())
        scale = max(1.0, float(ref.abs().max()))
        return {"claimed": True, "max_abs_diff": diff, "tolerance": PRESERVATION_TOLERANCE * scale,
                "ok": diff <= PRESERVATION_TOLERANCE * scale}

    def _slot(self, cell: Cell, expert: Expert) -> tuple[Artifact, dict[str, Any], StateDict, list[Metric], bool]:
        """What fills the victim's slot: (artifact the attacker receives, its hashes and timings, the victim head,
        the metrics recorded of it, whether work ran). Protected: the defense's artifact (its utility is
        recorded); unprotected: the expert; counterfactual: θ_pre with the expert's head (no victim at all)."""
        if cell.filling == "protected":
            art, meta, head, utility, worked = self._protected(cell, expert)
            return art, meta, head, self._metrics("utility", cell.victim, utility), worked
        if cell.filling == "unprotected":
            body_hash = self._body_hash(cell.victim, expert.body)
            return Artifact(state=expert.body), {"expert_hash": body_hash, "artifact_hash": body_hash}, expert.head, [], False
        pre_hash = self.suite.pretrained_hash()
        return Artifact(state=self.suite.pretrained()), {"artifact_hash": pre_hash}, expert.head, [], False

    @staticmethod
    def _shared_reference(cell: Cell, prepared_hash: str, meta: dict[str, Any]) -> bool:
        """Whether a freshly computed merge is also every other member's unprotected reference, costly to merge
        again: an unprotected merge that trains and tunes for no victim (`shared_reference`: AdaMerging), with
        the expert left as it is by the attack and nothing changed after merging."""
        return shared_reference(cell) and not cell.attack.has_finish() and prepared_hash == meta["artifact_hash"]

    def _merge_cell(self, cell: Cell) -> tuple[list[Metric], dict[str, Any], bool]:
        assert cell.attack and cell.merge
        assert (cell.defense is not None) == (cell.filling == "protected"), "only the protected filling has a defense"
        suite = self.suite
        expert = suite.expert(cell.victim)
        partners = [suite.expert(t) for t in cell.partners]
        art, meta, victim_head, metrics, worked = self._slot(cell, expert)
        timings: dict[str, float] = {"protect": meta["protect_seconds"]} if "protect_seconds" in meta else {}
        knows = cell.attack.needs().knows_defense
        defense_name = (cell.defense.name if cell.defense else "none") if knows else None
        ctx = AttackContext(
            suite=suite, victim=cell.victim, partners=cell.partners, base=suite.pretrained(), arch=suite.arch_map(),
            family=suite.family(), artifact=art, partner_bodies=[p.body for p in partners], victim_head=victim_head,
            merge_name=cell.merge.label, merge_params=cell.merge.spec()["params"], defense_name=defense_name,
            seed=cell.seed,
        )
        # prepare -> merge -> finish; the merged weights' evaluation is cached by their hash
        rss0 = peak_rss_mb()
        t0 = time.time()
        prepared = cell.attack.prepare(art, ctx)
        timings["prepare"] = round(time.time() - t0, 3)
        if prepared.variant is not None:
            raise RuntimeError(f"attack {cell.attack_label} left a structure-changed artifact; it cannot be merged")
        assert_finite(prepared.state, f"the artifact prepared by attack {cell.attack_label}")
        # Merging is symmetric in its models, so they enter in task-name order: the unprotected merge
        # seen from each victim is then one computation, cached under a key of its inputs.
        prepared_hash = state_hash(prepared.state)
        members = sorted([(cell.victim, prepared.state, victim_head, prepared_hash),
                          *[(t, p.body, p.head, self._body_hash(t, p.body)) for t, p in zip(cell.partners, partners)]],
                         key=lambda m: m[0])
        tuned = cell.merge.method.labelled(cell.merge.params) > 0
        mctx = MergeContext(suite=suite, tasks=tuple(m[0] for m in members), heads=[m[2] for m in members],
                            seed=cell.seed, victim=cell.victim)
        merge_key = MergeKey(suite=suite.name, base=suite.pretrained_hash(), merge=canonical(cell.merge.spec()),
                             seed=cell.seed, members=tuple((m[0], m[3]) for m in members),
                             objective=cell.victim if tuned else "").digest()
        heads = {m[0]: m[2] for m in members}
        tasks = cell.evaluated_tasks
        merged: StateDict | None = None
        known = self.stages.get(merge_key) if not cell.attack.has_finish() else None
        if known is not None and all(self.stages.get(self._eval_key(known["merged"], heads[t], t, True).digest()) is not None
                                     for t in tasks):
            merged_hash, timings["merge"], timings["finish"] = known["merged"], known["seconds"], 0.0
            merge_notes = known.get("notes", {})
        else:
            t0 = time.time()
            merged = cell.merge.method.merge(suite.pretrained(), [m[1] for m in members], cell.merge.params, ctx=mctx,
                                             seed=cell.seed)
            timings["merge"] = round(time.time() - t0, 3)
            merge_notes = dict(mctx.notes)
            if not cell.attack.has_finish():
                self.stages.put(merge_key, {"merged": state_hash(merged), "seconds": timings["merge"], "notes": merge_notes})
            t0 = time.time()
            merged = cell.attack.finish(merged, ctx)
            timings["finish"] = round(time.time() - t0, 3)
            assert_finite(merged, f"the merged model ({cell.attack_label} / {cell.merge_label})")
            merged_hash = state_hash(merged)
            worked = True
            inputs = [("θ_pre", suite.pretrained(), self._pre_hash()),
                      (f"the expert of {cell.victim}", expert.body, self._body_hash(cell.victim, expert.body)),
                      *[(f"the expert of {t}", p.body, self._body_hash(t, p.body)) for t, p in zip(cell.partners, partners)]]
            if cell.filling == "protected":
                inputs.append(("the released artifact", art.state, None))
            self._verify_inputs(f"attack {cell.attack_label} or merge {cell.merge_label}", inputs,
                                artifact_hash=meta.get("artifact_hash") if cell.filling == "protected" else None, art=art)
        t0 = time.time()
        for task in tasks:
            evaluation, w = self._evaluate(merged, heads[task], task, merged=True, body_hash=merged_hash)
            worked |= w
            metrics += self._metrics("merged", task, evaluation)
        timings["evaluate"] = round(time.time() - t0, 3)
        if merged is not None and self._shared_reference(cell, prepared_hash, meta):
            # Every member's unprotected reference is this same merge (members enter in task order): evaluate it
            # for the other members now, so their cells find the evaluations cached instead of merging again.
            for task in heads.keys() - set(tasks):
                self._evaluate(merged, heads[task], task, merged=True, body_hash=merged_hash)
        hashes = {"pretrained": suite.pretrained_hash(), "expert": self._body_hash(cell.victim, expert.body),
                  "partners": [self._body_hash(t, p.body) for t, p in zip(cell.partners, partners)],
                  "filling": meta["artifact_hash"], "prepared": prepared_hash, "merged": merged_hash}
        if cell.filling == "protected":
            hashes["artifact"] = meta["artifact_hash"]
        prov = {
            "hashes": hashes,
            "timings": timings,
            "attack_cost": {"seconds": round(timings["prepare"] + timings["finish"], 3),
                            "peak_rss_mb_delta": round(peak_rss_mb() - rss0, 1)},
            "merge_notes": merge_notes,
        }
        if cell.filling == "protected":
            prov["defense_notes"] = art.notes
            prov["flags"] = {"function_preservation": meta.get("function_preservation")}
        return metrics, prov, worked


# ---------------------------------------------------------------- driving a plan


@dataclass
class RunSummary:
    total: int
    skipped: int
    ok: int = 0
    na: int = 0
    failed: int = 0
    worked: int = 0
    seconds: float = 0.0
    records: list[CellRecord] = field(default_factory=list)
    ran: int = 0
    """Cells this run computed (each claimed in the store first, so no other run computed it too)."""
    by_other: int = 0
    """Pending cells another run on the same store claimed and finished."""
    elsewhere: int = 0
    """Pending cells another run still holds."""


def pending(cells: Iterable[Cell], store: Store) -> tuple[list[Cell], int]:
    """Cells not yet in the store, or stored as failed (hashing only: no model is loaded)."""
    cells = list(cells)
    done = store.done_cells(c.cell_id for c in cells)
    todo, seen = [], set(done)
    for c in cells:
        if c.cell_id not in seen:
            seen.add(c.cell_id)
            todo.append(c)
    return todo, len(cells) - len(todo)

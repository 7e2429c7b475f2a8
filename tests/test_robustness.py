"""Nothing poisons a run (issue 16, items 2-6): non-finite numbers never pass, `bench merge` writes
atomically and never over its inputs, user mistakes are one line, workers die with their driver, and
a corrupt cache file is evicted and recomputed."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pytest
import torch
import transformers
from conftest import subprocess_env
from test_protect import perturbed, tiny_config

from bench.artifact import Artifact
from bench.checkpoint_io import merge_checkpoints
from bench.cli import main
from bench.params import ParamError, Range, parse_params
from bench.plugins import Defense
from bench.registry import defenses, merges
from bench.report import to_format
from bench.runner import ArtifactCache
from bench.store import CellRecord, Metric, Store
from bench.weights import (
    CheckpointError,
    NonFiniteError,
    assert_finite,
    load_state,
    read_metadata,
    save_state,
    state_hash,
)


def strict_loads(text: str):
    """json.loads that rejects NaN / Infinity, as strict parsers and SQLite's json_extract do."""
    return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"bare {c} in JSON")))


@pytest.fixture()
def tensors(tmp_path) -> dict[str, Path]:
    files = {"base": {"w": torch.zeros(2, 2)}, "a": {"w": torch.ones(2, 2)}, "b": {"w": torch.full((2, 2), 3.0)},
             "inf": {"w": torch.tensor([[1.0, float("inf")], [0.0, 0.0]])}, "small": {"w": torch.zeros(3)}}
    out = {}
    for name, sd in files.items():
        out[name] = tmp_path / "in" / f"{name}.safetensors"
        save_state(sd, out[name])
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny BERT directories: θ_pre, an expert, and the expert with one NaN weight."""
    root = tmp_path_factory.mktemp("hf-robust")
    torch.manual_seed(0)
    base = transformers.BertModel(tiny_config())
    base.save_pretrained(str(root / "base"))
    expert = transformers.BertModel(tiny_config())
    expert.load_state_dict(base.state_dict())
    perturbed(expert, 1)
    expert.save_pretrained(str(root / "expert"))
    with torch.no_grad():
        expert.encoder.layer[0].attention.self.query.weight[0, 0] = float("nan")
    expert.save_pretrained(str(root / "nan"))
    return {"base": root / "base", "expert": root / "expert", "nan": root / "nan"}


# ---------------------------------------------------------------- item 2: non-finite numbers never pass


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "NaN"])
def test_params_reject_non_finite_floats(raw) -> None:
    with pytest.raises(ParamError, match="finite"):
        merges.get("ta").parse({"lambda_": raw})


def test_declared_ranges_are_checked_when_params_are_parsed() -> None:
    with pytest.raises(ParamError, match=r"k must lie in \(0, 1\]"):
        merges.get("ties").parse({"k": "5"})
    with pytest.raises(ParamError, match=r"k must lie in \(0, 1\]"):
        merges.get("ties-global").parse({"k": "0"})
    with pytest.raises(ParamError, match=r"p must lie in \[0, 1\)"):
        merges.get("dare-ties").parse({"p": "1.5"})
    assert merges.get("ties").parse({"k": "1"}).k == 1.0

    @dataclass(frozen=True)
    class Scaled:
        factor: Annotated[float, Range(0, None, low_open=True, hint="a scale")] = 2.0

    assert parse_params(Scaled, {"factor": "3"}).factor == 3.0
    with pytest.raises(ParamError, match=r"must lie in \(0, inf\) \(a scale\); got -1.0"):
        parse_params(Scaled, {"factor": "-1"})


def test_assert_finite_names_the_first_non_finite_tensor() -> None:
    state = {"ok": torch.ones(2), "ids": torch.tensor([1, 2]), "bad": torch.tensor([0.0, float("nan")]),
             "worse": torch.tensor([float("inf")])}
    with pytest.raises(NonFiniteError, match=r"the merged model has non-finite weights: tensor 'bad' holds NaN"):
        assert_finite(state, "the merged model")
    assert issubclass(NonFiniteError, CheckpointError)  # the CLI prints it as one line
    assert_finite({"ok": torch.ones(2), "ids": torch.tensor([1])}, "fine")


def test_bench_merge_refuses_non_finite_inputs_params_and_results(tensors, tmp_path) -> None:
    out = tmp_path / "m.safetensors"
    with pytest.raises(NonFiniteError, match=r"inf.safetensors has non-finite weights: tensor 'w' holds Inf"):
        merge_checkpoints("ta", str(tensors["base"]), [str(tensors["a"]), str(tensors["inf"])], str(out), {})
    with pytest.raises(ParamError, match="finite"):
        merge_checkpoints("ta", str(tensors["base"]), [str(tensors["a"])], str(out), {"lambda_": "nan"})
    # finite inputs, finite λ, but the result overflows float32
    with pytest.raises(NonFiniteError, match="the merged model .* tensor 'w' holds Inf"):
        merge_checkpoints("ta", str(tensors["base"]), [str(tensors["b"])], str(out), {"lambda_": "1e39"})
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


class NanDefense(Defense):
    """Returns NaN weights (a broken plugin)."""

    name = "nan-test"

    def protect(self, expert, ctx):
        return Artifact({k: v * float("nan") if v.is_floating_point() else v for k, v in expert.body.items()})


def test_bench_protect_refuses_a_nan_model_and_a_nan_artifact(hf_dirs, tmp_path) -> None:
    from bench.protect import protect_checkpoint

    with pytest.raises(NonFiniteError, match=r"model .*nan has non-finite weights: tensor "
                                             r"'encoder.layer.0.attention.self.query.weight' holds NaN"):
        protect_checkpoint("mergelock", hf_dirs["nan"], hf_dirs["base"], tmp_path / "a", {})
    if "nan-test" not in defenses:
        defenses.register("nan-test", obj=NanDefense)
    with pytest.raises(NonFiniteError, match="the nan-test artifact has non-finite weights"):
        protect_checkpoint("nan-test", hf_dirs["expert"], hf_dirs["base"], tmp_path / "b", {})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_store_and_results_json_are_strict(tmp_path) -> None:
    with Store(tmp_path / "r.sqlite") as store:
        store.put_cell(CellRecord(cell_id="ok", kind="baseline", suite="toy", victim="t10", partners=("t20",),
                                  defense="-", attack="-", merge="-", seed=0, status="ok",
                                  spec={"merge": {"params": {"lambda_": 0.3}}},
                                  provenance={"flags": {"max_abs_diff": float("nan"), "ratio": float("inf")}},
                                  metrics=(Metric("expert", "t10", "accuracy", 0.9),)))
        store.put_cell(CellRecord(cell_id="failed", kind="merge", suite="toy", victim="t10", partners=("t20",),
                                  defense="none", attack="none", merge="ta", seed=0, status="failed", reason="boom"))
        # SQLite's own JSON functions reject a bare NaN ("malformed JSON")
        rows = store._conn.execute("SELECT json_extract(provenance, '$.flags.max_abs_diff') FROM cells").fetchall()
        assert rows == [(None,), (None,)]
        records = store.cells()
    assert records[0].provenance["flags"] == {"max_abs_diff": None, "ratio": None}
    exported = strict_loads(to_format(records, "json"))  # the failed cell has no metrics: null, not NaN
    assert {r["cell_id"]: r["value"] for r in exported} == {"ok": 0.9, "failed": None}


def test_a_diverged_expert_fails_with_the_tensor_named_and_is_not_cached(plugin_site, tmp_path) -> None:
    from toyplugin import ToySuite

    class Diverging(ToySuite):
        def finetune(self, task, body, head=None, **kwargs):
            expert = super().finetune(task, body, head, **kwargs)
            return type(expert)({**expert.body, "embeddings.word_embeddings.weight": torch.full((2, 2), float("nan"))},
                                expert.head)

    suite = Diverging(cache_dir=tmp_path, steps=1)
    with pytest.raises(NonFiniteError, match=r"expert toy/t10 has non-finite weights: tensor 'embeddings.word_embeddings"):
        suite.expert("t10")
    assert not suite.expert_cached("t10")


# ---------------------------------------------------------------- item 3: bench merge writes atomically


def test_bench_merge_refuses_to_overwrite_an_input(tensors) -> None:
    before = load_state(tensors["a"])
    with pytest.raises(ValueError, match="is the input"):
        merge_checkpoints("ta", str(tensors["base"]), [str(tensors["a"]), str(tensors["b"])], str(tensors["a"]), {})
    with pytest.raises(ValueError, match="is the input .* or holds it"):
        merge_checkpoints("ta", str(tensors["base"]), [str(tensors["a"])], str(tensors["a"].parent), {})
    assert torch.equal(load_state(tensors["a"])["w"], before["w"])


def test_bench_merge_refuses_files_it_did_not_write_but_replaces_its_own(tensors, tmp_path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files bench merge did not write"):
        merge_checkpoints("ta", str(tensors["base"]), [str(tensors["a"])], str(busy), {})
    assert (busy / "notes.txt").read_text() == "mine" and sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    foreign = tmp_path / "foreign.safetensors"
    save_state({"w": torch.ones(1)}, foreign)
    with pytest.raises(ValueError, match="not written by bench merge"):
        merge_checkpoints("ta", str(tensors["base"]), [str(tensors["a"])], str(foreign), {})
    # a previous merge's output is replaced, as a file and as a directory
    for out in (tmp_path / "m.safetensors", tmp_path / "mdir"):
        merge_checkpoints("ta", str(tensors["base"]), [str(tensors["a"])], str(out), {"lambda_": "1"})
        merge_checkpoints("ta", str(tensors["base"]), [str(tensors["a"])], str(out), {"lambda_": "2"})
        merged = load_state(out if out.is_file() else out / "model.safetensors")
        assert torch.equal(merged["w"], torch.full((2, 2), 2.0))
    assert sorted(p.name for p in (tmp_path / "mdir").iterdir()) == ["merge.json", "model.safetensors"]


def test_failed_merge_leaves_no_output(tensors, tmp_path) -> None:
    for out in (tmp_path / "new" / "dir", tmp_path / "new" / "m.safetensors"):
        with pytest.raises(CheckpointError, match="shape"):
            merge_checkpoints("ta", str(tensors["base"]), [str(tensors["a"]), str(tensors["small"])], str(out), {})
    assert not (tmp_path / "new").exists()
    # a failure while replacing a previous output keeps the previous output whole
    out = tmp_path / "kept"
    merge_checkpoints("ta", str(tensors["base"]), [str(tensors["a"])], str(out), {"lambda_": "1"})
    with pytest.raises(NonFiniteError):
        merge_checkpoints("ta", str(tensors["base"]), [str(tensors["inf"])], str(out), {})
    assert torch.equal(load_state(out / "model.safetensors")["w"], torch.ones(2, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "kept"]


def test_written_files_get_the_usual_permissions(tensors, tmp_path) -> None:
    old = os.umask(0o022)
    try:
        merge_checkpoints("ta", str(tensors["base"]), [str(tensors["a"])], str(tmp_path / "m.safetensors"), {})
        merge_checkpoints("ta", str(tensors["base"]), [str(tensors["a"])], str(tmp_path / "d"), {})
        save_state({"w": torch.ones(1)}, tmp_path / "s.safetensors")
    finally:
        os.umask(old)
    for f in (tmp_path / "m.safetensors", tmp_path / "d" / "model.safetensors", tmp_path / "s.safetensors"):
        assert f.stat().st_mode & 0o777 == 0o644, f


# ---------------------------------------------------------------- item 4: one line for every user mistake


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture()
def mistakes(tmp_path, tensors, hf_dirs) -> dict[str, Path]:
    (tmp_path / "notdb.sqlite").write_text("not a database")
    (tmp_path / "file").write_text("a regular file")
    (tmp_path / "adir").mkdir()
    return {"notdb": tmp_path / "notdb.sqlite", "file": tmp_path / "file", "dir": tmp_path / "adir",
            "store": tmp_path / "s.sqlite", "cache": tmp_path / "cache", **tensors, **{f"hf_{k}": v for k, v in hf_dirs.items()}}


MISTAKES = [
    ("run-store-not-sqlite", ["run", "--suite", "toy", "--merge", "ta", "--victims", "t10", "--store", "{notdb}"],
     "results store {notdb} is not a SQLite database"),
    ("dry-run-store-not-sqlite", ["run", "--suite", "toy", "--merge", "ta", "--dry-run", "--store", "{notdb}"],
     "is not a SQLite database"),
    ("results-store-not-sqlite", ["results", "--store", "{notdb}"], "is not a SQLite database"),
    ("store-under-a-file", ["run", "--suite", "toy", "--merge", "ta", "--victims", "t10", "--store", "{file}/r.sqlite"],
     "{file} is a file, not a directory"),
    ("store-is-a-directory", ["run", "--suite", "toy", "--merge", "ta", "--victims", "t10", "--store", "{dir}"],
     "results store {dir} is a directory"),
    ("seeds-not-integers", ["run", "--suite", "toy", "--seeds", "abc", "--store", "{store}"], "--seeds 'abc': expected"),
    ("jobs-zero", ["run", "--suite", "toy", "--jobs", "0", "--dry-run", "--store", "{store}"], "--jobs 0: expected at least 1"),
    ("jobs-negative", ["run", "--suite", "toy", "--jobs", "-3", "--dry-run", "--store", "{store}"], "--jobs -3"),
    ("param-for-a-plugin-not-in-the-run", ["run", "--suite", "toy", "--merge", "ta", "--param", "foo.k=1", "--dry-run",
                                           "--store", "{store}"], "--param foo.k=1: no plugin 'foo' in this run"),
    ("ties-k-out-of-range", ["run", "--suite", "toy", "--merge", "ties", "--param", "ties.k=5", "--dry-run",
                             "--store", "{store}"], "k must lie in (0, 1]"),
    ("dare-p-out-of-range", ["run", "--suite", "toy", "--merge", "dare-ties", "--param", "dare-ties.p=1.5", "--dry-run",
                             "--store", "{store}"], "p must lie in [0, 1)"),
    ("lambda-nan", ["run", "--suite", "toy", "--merge", "ta", "--param", "ta.lambda_=nan", "--dry-run",
                    "--store", "{store}"], "lambda_ must be a finite number"),
    ("merge-param-without-value", ["merge", "--method", "ta", "--base", "{base}", "--models", "{a}", "--param", "k",
                                   "--out", "{dir}/m.safetensors"], "--param 'k': expected KEY=VALUE"),
    ("merge-out-under-a-file", ["merge", "--method", "ta", "--base", "{base}", "--models", "{a}", "--out", "{file}/m"],
     "--out {file}/m: {file} is a file, not a directory"),
    ("merge-out-under-a-file-st", ["merge", "--method", "ta", "--base", "{base}", "--models", "{a}",
                                   "--out", "{file}/m.safetensors"], "{file} is a file, not a directory"),
    ("attack-param-for-a-plugin-not-in-the-run", ["attack", "--attack", "anchor-align", "--artifact", "{hf_expert}",
                                                  "--base", "{hf_base}", "--param", "foo.k=1", "--out", "{dir}/o"],
     "--param foo.k=1: no plugin 'foo' in this run (it uses anchor-align)"),
    ("protect-out-under-a-file", ["protect", "--defense", "none", "--model", "{hf_expert}", "--base", "{hf_base}",
                                  "--out", "{file}/p"], "--out {file}/p: {file} is a file, not a directory"),
]


@pytest.mark.parametrize("argv,needle", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_user_mistakes_are_one_line(plugin_site, mistakes, capsys, argv, needle) -> None:
    argv = [a.format(**mistakes) for a in argv] + (["--cache-dir", str(mistakes["cache"])] if argv[0] == "run" else [])
    code, err = _cli(argv, capsys)
    assert code == 2, err
    assert err.startswith("bench: error: ") and len(err.strip().splitlines()) == 1, err
    assert needle.format(**mistakes) in err
    assert not mistakes["store"].exists() and not mistakes["cache"].exists()  # nothing was written


def test_dry_run_writes_nothing(plugin_site, tmp_path, capsys) -> None:
    store = tmp_path / "new" / "sub" / "r.sqlite"
    code, err = _cli(["run", "--suite", "toy", "--merge", "ta", "--victims", "t10", "--dry-run", "--store", store,
                      "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------- item 5: workers die with their driver


def _proc_state(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) of a live process, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), fields[0]


def _alive(pid: int) -> bool:
    state = _proc_state(pid)
    return state is not None and state[1] not in ("Z", "X")  # a zombie has exited; only its entry remains


def _workers_of(parent: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (_proc_state(int(entry.name)) or (0, ""))[0] == parent:
            try:
                if b"spawn_main" in (entry / "cmdline").read_bytes():
                    out.append(int(entry.name))
            except OSError:
                pass
    return sorted(out)


def _stored_cells(store: Path) -> int:
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_driver(plugin_site, toy_cache, tmp_path) -> None:
    env = subprocess_env(plugin_site, toy_cache)
    store = tmp_path / "r.sqlite"
    argv = [sys.executable, "-m", "bench.cli", "run", "--suite", "toy", "--defense", "toy-scale", "--merge", "ta,wa,ties",
            "--seeds", "0,1,2", "--jobs", "2", "--store", str(store)]
    driver = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and driver.poll() is None:
            workers = _workers_of(driver.pid)
            if len(workers) == 2 and _stored_cells(store) >= 1:  # both started, and cells are running
                break
            time.sleep(0.2)
        assert driver.poll() is None and len(workers) == 2, "the run ended before its workers could be seen"
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, as `kill -9 <pid>` does
        driver.wait()
        deadline = time.time() + 5
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert [w for w in workers if _alive(w)] == [], "workers outlived their killed driver"
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        if driver.poll() is None:
            driver.kill()
            driver.wait()


# ---------------------------------------------------------------- item 6: corrupt cache files are evicted


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _flip_one_weight(path: Path) -> None:
    """Change one value but keep a valid file (header, sizes): only the recorded hash can tell."""
    from safetensors.torch import save_file

    state, meta = load_state(path), read_metadata(path)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel())
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1.0
    save_file(state, str(path), metadata=meta)


@pytest.mark.parametrize("damage", [_truncate, _flip_one_weight], ids=["truncated", "one-weight-changed"])
def test_corrupt_cached_expert_is_evicted_and_rebuilt(plugin_site, tmp_path, capsys, damage) -> None:
    from toyplugin import ToySuite

    built = ToySuite(cache_dir=tmp_path, steps=3).expert("t10")
    body_file = ToySuite(cache_dir=tmp_path, steps=3).expert_dir() / "t10.body.safetensors"
    damage(body_file)
    capsys.readouterr()
    again = ToySuite(cache_dir=tmp_path, steps=3).expert("t10")  # a fresh process would do the same
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cached expert toy/t10 is corrupt (") and "recomputing" in err
    assert state_hash(again.body) == state_hash(built.body)
    assert state_hash(load_state(body_file)) == state_hash(built.body)  # the rebuilt file replaced the bad one
    capsys.readouterr()
    ToySuite(cache_dir=tmp_path, steps=3).expert("t10")
    assert capsys.readouterr().err == ""  # and is read silently from then on


@pytest.mark.parametrize("damage", [_truncate, _flip_one_weight], ids=["truncated", "one-weight-changed"])
def test_corrupt_cached_artifact_is_evicted(tmp_path, capsys, damage) -> None:
    cache = ArtifactCache(tmp_path)
    art = Artifact({"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor([1])}, head={"h": torch.ones(2)}, notes={"x": 1})
    cache.save("k", art, {"artifact_hash": art.content_hash()})
    loaded = cache.load("k")
    assert loaded is not None and loaded[0].content_hash() == art.content_hash() and "has_head" not in loaded[1]
    damage(cache.path("k") / "state.safetensors")
    capsys.readouterr()
    assert cache.load("k") is None  # a miss: the runner recomputes and saves it again
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cached artifact k is corrupt (") and "recomputing" in err
    assert not cache.path("k").exists()


def test_run_recomputes_a_truncated_artifact(plugin_site, tmp_path) -> None:
    from toyplugin import ToySuite

    from bench.executors.local import run_local
    from bench.plan import build_plan

    suite = ToySuite(cache_dir=tmp_path / "cache", steps=3)
    plan = build_plan(suite, defense="toy-scale", merge="ta", victims=["t10"])
    with Store(tmp_path / "first.sqlite") as store:
        assert run_local(suite, store, plan.cells, run_id="a", log=lambda m: None).failed == 0
    artifacts = list((tmp_path / "cache" / "artifacts").glob("*/state.safetensors"))
    assert artifacts
    for f in artifacts:
        _truncate(f)
    for name in ("second", "third"):  # each later run works, not only the first after the damage
        with Store(tmp_path / f"{name}.sqlite") as store:
            summary = run_local(ToySuite(cache_dir=tmp_path / "cache", steps=3), store, plan.cells, run_id=name,
                                log=lambda m: None)
        assert summary.failed == 0 and summary.ok > 0, summary

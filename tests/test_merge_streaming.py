"""`bench merge` out of core: shards written block by block, the in-memory result bit for bit, bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bench.checkpoint_io import merge_checkpoints, write_sharded
from bench.outofcore import ShardWriter, row_blocks
from bench.registry import merges
from bench.weights import CheckpointError, load_state, open_checkpoint

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["wa", "ta", "ties", "dare-ta", "dare-ties", "dare-ties-mergelm", "ties-global"]


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_state(f).items()}


def small_model(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"embed.weight": torch.randn(50, 8, generator=g), "layers.0.w": torch.randn(8, 8, generator=g),
             "layers.0.b": torch.randn(8, generator=g), "scale": torch.randn((), generator=g)}
    state = {k: v.to(dtype) for k, v in state.items()}
    state["position_ids"] = torch.arange(5)
    return state


def write_models(root: Path, n_experts: int = 3, dtype: torch.dtype = torch.float32) -> tuple[Path, list[Path]]:
    base = small_model(0, dtype)
    write_sharded(base.items(), root / "base", shard_bytes=600)
    experts = []
    for i in range(n_experts):
        e = {k: (v + 0.1 * small_model(i + 1, dtype)[k]) if v.is_floating_point() else v for k, v in base.items()}
        experts.append(write_sharded(e.items(), root / f"expert{i}", shard_bytes=600))
    return root / "base", experts


def test_shard_writer_lays_out_shards_as_write_sharded_does(tmp_path):
    tensors = {"a": torch.randn(30, 4), "b": torch.arange(7), "c": torch.randn(3, 2, 2).to(torch.bfloat16),
               "d": torch.tensor(2.5), "e": torch.randn(100)}
    reference = write_sharded(tensors.items(), tmp_path / "ref", shard_bytes=256)
    layout = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with ShardWriter(tmp_path / "out", layout, shard_bytes=256, metadata={"note": "x"}) as writer:
        for name, t in tensors.items():
            for start, stop in reversed(row_blocks(t.shape, 9)):  # any order, in pieces
                writer.write(name, start, t if t.dim() == 0 else t[start:stop])
    ref_files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ref_files and len(ref_files) > 2
    ref_index = json.loads((reference / "model.safetensors.index.json").read_text())["weight_map"]
    assert json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"] == ref_index
    out = load_dir(tmp_path / "out")
    assert set(out) == set(tensors) and all(torch.equal(out[k], tensors[k]) and out[k].dtype == tensors[k].dtype for k in tensors)
    with safe_open(str(tmp_path / "out" / ref_index["a"]), framework="pt") as f:
        assert f.metadata() == {"note": "x"}


def test_shard_writer_refuses_to_close_an_incomplete_output(tmp_path):
    writer = ShardWriter(tmp_path / "m.safetensors", [("a", (4, 2), torch.float32)], shard_bytes=1 << 20)
    writer.write("a", 0, torch.zeros(2, 2))
    with pytest.raises(CheckpointError, match="incomplete"):
        writer.close()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bench_merge_out_of_core_equals_the_in_memory_merge(tmp_path, name, dtype):
    base_dir, expert_dirs = write_models(tmp_path, dtype=dtype)
    method = merges.get(name)
    params = method.parse({})
    expected = method.merge(load_dir(base_dir), [load_dir(e) for e in expert_dirs], params, seed=5)
    out = merge_checkpoints(name, str(base_dir), [str(e) for e in expert_dirs], str(tmp_path / "out"), {}, seed=5,
                            shard_bytes=700, block_elements=13)
    got = load_dir(out)
    assert len(list(out.glob("*.safetensors"))) > 1
    assert set(got) == set(expected)
    for k in expected:  # same bytes, same dtype
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k].view(-1).view(torch.uint8),
                                                                 expected[k].contiguous().view(-1).view(torch.uint8)), k


def test_bench_merge_runs_ties_global_to_a_single_file(tmp_path):
    base_dir, expert_dirs = write_models(tmp_path)
    out = merge_checkpoints("ties-global", str(base_dir), [str(e) for e in expert_dirs], str(tmp_path / "m.safetensors"),
                            {"k": "0.1"}, block_elements=5)
    method = merges.get("ties-global")
    expected = method.merge(load_dir(base_dir), [load_dir(e) for e in expert_dirs], method.parse({"k": "0.1"}))
    got = load_state(out)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_bench_merge_names_what_a_refused_method_needs(tmp_path):
    base_dir, expert_dirs = write_models(tmp_path, n_experts=2)
    with pytest.raises(CheckpointError, match="unlabelled inputs") as refused:
        merge_checkpoints("adamerging-task", str(base_dir), [str(e) for e in expert_dirs], str(tmp_path / "out"), {})
    assert "bench run --merge adamerging-task" in str(refused.value)
    tuned = [n for n in merges.names() if getattr(merges.get(n), "labelled_param", "")]
    for name in tuned:
        with pytest.raises(CheckpointError, match="labelled samples of a victim task"):
            merge_checkpoints(name, str(base_dir), [str(e) for e in expert_dirs], str(tmp_path / "out"), {})
    assert not (tmp_path / "out").exists()


_PEAK_CHILD = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from bench.checkpoint_io import merge_checkpoints
    from bench.registry import merges

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    root, methods = sys.argv[1], sys.argv[2].split(",")
    experts = [f"{root}/expert{i}" for i in range(3)]
    for name in methods:  # warm up every code path on a tiny model first
        merges.get(name)
        merge_checkpoints(name, f"{root}/tiny-base", [f"{root}/tiny-expert"] * 3, f"{root}/tiny-out-{name}", {},
                          block_elements=1 << 10)
    peaks = {}
    for name in methods:
        open("/proc/self/clear_refs", "w").write("5")  # the high-water mark restarts from the RSS now
        before = rss("VmRSS:")
        merge_checkpoints(name, f"{root}/base", experts, f"{root}/out-{name}", {}, block_elements=1 << 15)
        peaks[name] = rss("VmHWM:") - before
    print(json.dumps(peaks))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status and resets the peak RSS")
def test_bench_merge_holds_a_few_blocks_not_the_output(tmp_path):
    # A 64 MiB output (inputs 4 x 64 MiB) merged in blocks of 128 KiB: the peak resident memory grows by
    # less than a quarter of the output (measured: 8-12 MiB, most of it fixed), so neither the merged
    # model nor a shard (2 GiB by default, so the whole output here) is ever held.
    g = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (8192, 1024), **{f"layers.{i}.w": (1024, 1024) for i in range(8)}}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    write_sharded(base.items(), tmp_path / "base", shard_bytes=8 << 20)
    for i in range(3):
        write_sharded(((k, v + 0.01 * torch.randn(v.shape, generator=g)) for k, v in base.items()), tmp_path / f"expert{i}",
                      shard_bytes=8 << 20)
    del base
    tiny = {"w": torch.randn(40, 40)}
    write_sharded(tiny.items(), tmp_path / "tiny-base")
    write_sharded(((k, v + 1) for k, v in tiny.items()), tmp_path / "tiny-expert")
    output_bytes = sum(4 * a * b for a, b in shapes.values())
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    # A fixed mmap threshold stops glibc from keeping freed blocks in its heap (its default raises the
    # threshold as large blocks are freed), so the peak RSS counts what the merge holds, not what malloc kept.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(tmp_path), "ta,ties,ties-global"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, peak in peaks.items():
        assert peak < output_bytes / 4, f"{name}: peak grew by {peak / 2**20:.1f} MiB for a {output_bytes / 2**20:.0f} MiB output"
    assert len(open_checkpoint(tmp_path / "out-ties-global")) == len(shapes)


def test_bench_merge_cli_runs_ties_global_and_refuses_a_data_method_in_one_line(tmp_path, capsys):
    from bench.cli import main

    base_dir, expert_dirs = write_models(tmp_path, n_experts=2)
    models = [str(e) for e in expert_dirs]
    assert main(["merge", "--method", "ties-global", "--base", str(base_dir), "--models", *models,
                 "--out", str(tmp_path / "out"), "--param", "k=0.3"]) == 0
    assert set(open_checkpoint(tmp_path / "out")) == set(small_model(0))
    capsys.readouterr()
    assert main(["merge", "--method", "adamerging-task", "--base", str(base_dir), "--models", *models,
                 "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unlabelled inputs" in err[0] and "learns its coefficients on task data" not in err[0]

"""Throughput and peak memory of the tensor-wise merges, in memory and out of core.

A Llama-shaped model (default: SmolLM2-135M's sizes, random weights) and ``--experts`` experts of it
are written as sharded safetensors to a temporary directory. Each merge method then runs twice,
each time in a fresh Python process, so that ``ru_maxrss`` (peak resident set size) belongs to one
path only:

* **in memory**: every shard of θ_pre and the experts is loaded (``load_state``), the method merges
  the whole dicts (``MergeMethod.merge``) and the result is written in shards (``write_sharded``);
* **out of core**: ``bench.checkpoint_io.merge_checkpoints`` reads one tensor at a time through
  ``LazyStateDict`` and writes shards of ``--shard-mb``, as ``bench merge`` does.

The tables give seconds and tensors/s per method and path, and each path's peak RSS as a multiple
of the model size, also net of the interpreter's own footprint (its RSS after imports and a warm-up
merge, before any weight is read) and, for the out-of-core path, as a multiple of the largest tensor.
The in-memory path holds every model (θ_pre, the experts, the result); the out-of-core path holds
a few row blocks (`bench.outofcore`: each merged block is written to its shard at once, and a large
tensor is merged a block of rows at a time), whatever the model size. Peak
RSS is ``VmHWM`` on Linux (see `_common.peak_rss_bytes` for why not ``ru_maxrss`` there).
Each measuring process runs ``--threads`` torch threads (default 1: on a shared machine more
threads mostly wait for each other).

    .venv/bin/python benchmarks/merge_throughput.py                 # ~135M params, 3 experts
    .venv/bin/python benchmarks/merge_throughput.py --methods ta,ties --layers 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    MiB,
    comma_list,
    current_rss_bytes,
    environment,
    expert_tensors,
    peak_rss_bytes,
    print_table,
    random_tensors,
    write_json,
)

METHODS = ("wa", "ta", "ties", "dare-ta", "dare-ties", "dare-ties-mergelm")
PATHS = ("in-memory", "out-of-core")
CHILD_TIMEOUT_S = 900


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Seconds, tensors/s and peak RSS of tensor-wise merges: in memory vs out of core "
                    "(merge_checkpoints). Defaults: a random Llama of SmolLM2-135M's sizes (~135M params, "
                    "fp32, ~513 MiB), 3 experts, 128 MiB shards, 5 methods x 2 paths in fresh processes: about 3 minutes "
                    "on a shared 2-core CPU (--methods ta,ties or --layers 8 for less).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--methods", type=comma_list(METHODS), default="all", help="comma-separated merge methods, or all")
    p.add_argument("--paths", type=comma_list(PATHS), default="all", help="which merge paths to measure")
    p.add_argument("--experts", type=int, default=3, help="number of experts merged onto θ_pre")
    p.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M: 30)")
    p.add_argument("--hidden", type=int, default=576, help="hidden size (SmolLM2-135M: 576)")
    p.add_argument("--intermediate", type=int, default=1536, help="FFN size (SmolLM2-135M: 1536)")
    p.add_argument("--heads", type=int, default=9, help="query heads (SmolLM2-135M: 9)")
    p.add_argument("--kv-heads", type=int, default=3, help="key/value heads (SmolLM2-135M: 3)")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary (SmolLM2-135M: 49152; tied embeddings)")
    p.add_argument("--shard-mb", type=float, default=128.0, help="shard size of the inputs and of the merged output, MiB")
    p.add_argument("--tv-scale", type=float, default=0.01, help="task-vector size relative to each θ_pre tensor's RMS")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads of each measuring process (1 avoids thread contention on a shared "
                        "machine; 0 keeps torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="where the temporary checkpoints go (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    # internal: one measurement in a fresh process
    p.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    p.add_argument("--child-method", help=argparse.SUPPRESS)
    p.add_argument("--child-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.experts < 1:
        p.error("--experts must be at least 1")
    if args.shard_mb <= 0:
        p.error("--shard-mb must be positive")
    if args.workdir is not None and not args.workdir.is_dir():
        p.error(f"--workdir {args.workdir} is not a directory; create it or leave the flag out")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be a multiple of --heads, and --heads a multiple of --kv-heads")
    return args


# ---------------------------------------------------------------- the model


def llama_shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    """Body keys and shapes of a Llama with the requested sizes (built on the meta device)."""
    import transformers

    from bench.families.hf import body_shapes
    from bench.families.llama import LlamaFamily

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048, hidden_act="silu", tie_word_embeddings=True,
    )
    return body_shapes(LlamaFamily(config))


def write_checkpoints(args: argparse.Namespace, shapes: dict[str, tuple[int, ...]], root: Path) -> tuple[Path, list[Path]]:
    """θ_pre and the experts as sharded safetensors, streamed one tensor at a time."""
    from bench.checkpoint_io import write_sharded

    shard = int(args.shard_mb * MiB)
    base = write_sharded(random_tensors(shapes, args.seed), root / "base", shard_bytes=shard)
    experts = [
        write_sharded(expert_tensors(shapes, args.seed, args.seed + 1 + i, args.tv_scale), root / f"expert{i}", shard_bytes=shard)
        for i in range(args.experts)
    ]
    return base, experts


# ---------------------------------------------------------------- one measurement (child process)


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench.checkpoint_io import merge_checkpoints, write_sharded
    from bench.registry import merges
    from bench.weights import load_state

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    method = merges.get(args.child_method)  # imports the method's module before the baseline
    params = method.parse({})
    root = args.child_dir
    experts = sorted(p for p in root.iterdir() if p.name.startswith("expert"))
    out = root / f"out-{args.child}-{args.child_method}"
    shard = int(args.shard_mb * MiB)
    # Warm up: the first tensor ops start thread pools and allocators; that belongs to the baseline.
    probe = {"w": torch.randn(256, 256)}
    method.merge(probe, [{"w": probe["w"] + 0.01}] * len(experts), params)
    # The baseline is the resident set now, after every import and before any weight is read.
    result: dict[str, Any] = {"baseline_rss": current_rss_bytes(), "import_peak_rss": peak_rss_bytes()}
    start = time.perf_counter()
    if args.child == "in-memory":
        def load(d: Path) -> dict:
            return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_state(f).items()}

        base_sd, expert_sds = load(root / "base"), [load(e) for e in experts]
        loaded = time.perf_counter()
        merged = method.merge(base_sd, expert_sds, params, seed=args.seed)
        result["merge_s"] = time.perf_counter() - loaded
        result["load_s"] = loaded - start
        written = time.perf_counter()
        write_sharded(merged.items(), out, shard_bytes=shard)
        result["write_s"] = time.perf_counter() - written
    else:
        merge_checkpoints(args.child_method, str(root / "base"), [str(e) for e in experts], str(out), {},
                          seed=args.seed, shard_bytes=shard)
    result["total_s"] = time.perf_counter() - start
    result["peak_rss"] = peak_rss_bytes()
    shutil.rmtree(out, ignore_errors=True)
    return result


def measure(args: argparse.Namespace, root: Path, path: str, method: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", path, "--child-method", method,
           "--child-dir", str(root), "--shard-mb", str(args.shard_mb), "--seed", str(args.seed), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"{path} merge with {method} failed in its subprocess:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- report


def speed_row(method: str, n_tensors: int, n_params: int, r: dict[str, dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method}
    if "in-memory" in r:
        m = r["in-memory"]
        row.update({"in-mem merge s": m["merge_s"], "tensors/s": n_tensors / m["merge_s"],
                    "Mparams/s": n_params / m["merge_s"] / 1e6,
                    "in-mem load+merge+write s": m["total_s"]})
    if "out-of-core" in r:
        o = r["out-of-core"]
        row.update({"out-of-core s": o["total_s"], "ooc tensors/s": n_tensors / o["total_s"]})
    if len(r) == 2:
        row["ooc ÷ in-mem total"] = r["out-of-core"]["total_s"] / r["in-memory"]["total_s"]
    return row


def memory_row(method: str, model_bytes: int, largest_bytes: int, r: dict[str, dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method}
    for path, short in (("in-memory", "in-mem"), ("out-of-core", "ooc")):
        if path in r:
            m = r[path]
            net = m["peak_rss"] - m["baseline_rss"]
            row[f"{short} peak MiB"] = round(m["peak_rss"] / MiB)
            row[f"{short} peak ÷ model"] = m["peak_rss"] / model_bytes
            row[f"{short} net ÷ model"] = net / model_bytes
            if path == "out-of-core":
                row["ooc net ÷ largest tensor"] = net / largest_bytes
    if len(r) == 2:
        row["in-mem ÷ ooc (net)"] = ((r["in-memory"]["peak_rss"] - r["in-memory"]["baseline_rss"])
                                     / max(1, r["out-of-core"]["peak_rss"] - r["out-of-core"]["baseline_rss"]))
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    shapes = llama_shapes(args)
    n_params = sum(_numel(s) for s in shapes.values())
    model_bytes = 4 * n_params  # fp32
    largest = max(shapes, key=lambda k: _numel(shapes[k]))
    root = Path(tempfile.mkdtemp(prefix="mergearena-merge-bench-", dir=args.workdir))
    try:
        start = time.perf_counter()
        write_checkpoints(args, shapes, root)
        setup_s = time.perf_counter() - start
        shards = len(list((root / "base").glob("*.safetensors")))
        print(f"model: Llama {args.layers} layers, hidden {args.hidden}, FFN {args.intermediate}, vocab {args.vocab}: "
              f"{n_params / 1e6:.1f}M params, {len(shapes)} tensors, {model_bytes / MiB:.0f} MiB fp32 in {shards} shard(s); "
              f"largest tensor {largest} {_numel(shapes[largest]) * 4 / MiB:.0f} MiB; {args.experts} experts; "
              f"written in {setup_s:.1f} s")
        results: dict[str, dict[str, dict[str, Any]]] = {}
        for method in args.methods:
            for path in args.paths:
                results.setdefault(method, {})[path] = measure(args, root, path, method)
                r = results[method][path]
                print(f"  {method:10s} {path:12s} {r['total_s']:7.2f} s  peak RSS {r['peak_rss'] / MiB:7.0f} MiB", flush=True)
    finally:
        if args.keep:
            print(f"checkpoints kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    speed = [speed_row(m, len(shapes), n_params, results[m]) for m in args.methods]
    memory = [memory_row(m, model_bytes, 4 * _numel(shapes[largest]), results[m]) for m in args.methods]
    baselines = [r["baseline_rss"] / MiB for m in results.values() for r in m.values()]
    threads = args.threads or "default"
    print_table(f"Merge speed ({args.experts} experts onto θ_pre; torch threads: {threads}; one run)", speed)
    print_table(f"Peak RSS, each in a fresh process (model {model_bytes / MiB:.0f} MiB, shards {args.shard_mb:g} MiB; "
                f"net = peak − RSS after imports, {min(baselines):.0f}-{max(baselines):.0f} MiB)", memory, floatfmt=".3g")
    if args.json:
        write_json(args.json, {
            "benchmark": "merge_throughput", "environment": environment(), "args": _jsonable(vars(args)),
            "model": {"params": n_params, "tensors": len(shapes), "bytes": model_bytes, "largest_tensor": largest,
                      "largest_tensor_bytes": 4 * _numel(shapes[largest]), "shards": shards},
            "raw": results, "speed": speed, "memory": memory,
        })
    return 0


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items() if not k.startswith("child")}


if __name__ == "__main__":
    sys.exit(main())

"""`bench merge` against mergekit: wall time and peak memory of whole processes, and whether the outputs agree.

For each size, random Llama checkpoints (θ_pre and ``--experts`` experts, sharded safetensors in
the Hugging Face layout) are written to a temporary directory. Then, per method, the two programs
run one after the other (bench, mergekit, bench, mergekit ... for ``--repeats``), each as a fresh
process with one thread, as a user runs them:

    bench merge --method M --base B --models E0 E1 E2 --out OUT [--param ...]
    mergekit-yaml config.yml OUT --random-seed 0 -j 1 --no-copy-tokenizer --no-write-model-card --quiet

Wall time is the process's; peak memory is its maximum resident set size (``ru_maxrss`` of the
child from ``wait4``; this driver imports no torch, so the child's figure is its own). "net"
subtracts each program's peak on a tiny model (interpreter, imports): what the merge itself adds.
mergekit lives in its own virtual environment (it pins its own stack); give its Python with
``--mergekit-python`` or ``$MERGEKIT_PYTHON``.

Methods and what they are compared with (same parameters on both sides):

| bench | mergekit | parameters |
|---|---|---|
| wa | linear | weight 1 each |
| ta | task_arithmetic | λ = 0.3 (mergekit ``lambda: 0.3``, weights 1) |
| ties | ties | k = density = 0.2, disjoint mean, λ = 1 |
| dare-ta | dare_linear | p = 0.9 (density 0.1), λ = 0.3 |
| dare-ties | dare_ties | p = 0.9 (density 0.1), disjoint sum, λ = 1 |
| ties-global | (none) | k = 0.2 over the whole model; bench only |

After each pair the outputs are compared tensor by tensor (equal entries, entries each side
changed from θ_pre, the norm of each merged task vector). Where the semantics match the outputs
must agree; the script names the documented differences where they do not: TIES keeps every
entry tied with its k-th magnitude (mergekit's argsort keeps exactly k), bench resolves a zero
sum of signs by the tensor's majority (mergekit takes +), DARE masks come from different
generators and mergekit rescales survivors to the tensor's L1 norm where bench divides by 1 − p,
and mergekit computes in the checkpoint dtype (``dtype`` in its config) where bench computes in
float32 and rounds once.

    MERGEKIT_PYTHON=/tmp/mk/bin/python .venv/bin/python benchmarks/vs_mergekit.py --sizes 135m
    .venv/bin/python benchmarks/vs_mergekit.py --mergekit-python /tmp/mk/bin/python --sizes 135m,415m,1b --json out.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024**2

SIZES: dict[str, dict[str, Any]] = {
    # SmolLM2-135M: 134.5M parameters, tied embeddings
    "135m": {"hidden": 576, "layers": 30, "intermediate": 1536, "heads": 9, "kv_heads": 3, "vocab": 49152, "tied": True},
    # a wider, deeper SmolLM-like model: 415.2M parameters, tied embeddings
    "415m": {"hidden": 1024, "layers": 24, "intermediate": 4096, "heads": 16, "kv_heads": 4, "vocab": 49152, "tied": True},
    # TinyLlama-1.1B: 1.10B parameters, separate lm_head
    "1b": {"hidden": 2048, "layers": 22, "intermediate": 5632, "heads": 32, "kv_heads": 4, "vocab": 32000, "tied": False},
    # for trying the script out
    "tiny": {"hidden": 64, "layers": 2, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 256, "tied": True},
}

METHODS = ("wa", "ta", "ties", "dare-ta", "dare-ties", "ties-global")
PEERS: dict[str, dict[str, Any]] = {
    "wa": {"bench": {}, "mergekit": "linear", "model": {"weight": 1.0}, "global": {}},
    "ta": {"bench": {"lambda_": 0.3}, "mergekit": "task_arithmetic", "model": {"weight": 1.0}, "global": {"lambda": 0.3}},
    "ties": {"bench": {"k": 0.2}, "mergekit": "ties", "model": {"weight": 1.0, "density": 0.2}, "global": {}},
    "dare-ta": {"bench": {"p": 0.9, "lambda_": 0.3}, "mergekit": "dare_linear", "model": {"weight": 1.0, "density": 0.1},
                "global": {"lambda": 0.3}},
    "dare-ties": {"bench": {"p": 0.9}, "mergekit": "dare_ties", "model": {"weight": 1.0, "density": 0.1}, "global": {}},
    "ties-global": {"bench": {"k": 0.2}, "mergekit": None},
}
DIFFERENCES = {
    "wa": "none (same arithmetic)",
    "ta": "none (same arithmetic)",
    "ties": "ties at the k-th magnitude (bench keeps them all, mergekit's argsort exactly k); zero sign sums "
            "(bench: tensor majority, mergekit: +)",
    "dare-ta": "random masks; survivors ÷ (1 − p) in bench, rescaled to the L1 norm in mergekit",
    "dare-ties": "random masks; rescaling (1 − p vs L1 norm); zero sign sums (majority vs +)",
}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
RUN_TIMEOUT_S = 4 * 3600


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Wall time and peak RSS of `bench merge` vs mergekit-yaml on random Llama checkpoints, whole "
                    "processes at one thread, run alternately; checks that the outputs agree. 135m takes ~10 min "
                    "on a shared 2-core CPU, 1b about an hour.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sizes", default="135m", help=f"comma list of {', '.join(SIZES)}")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    p.add_argument("--mergekit-python", default=os.environ.get("MERGEKIT_PYTHON"),
                   help="python of mergekit's own virtual environment (default $MERGEKIT_PYTHON)")
    p.add_argument("--bench", default=None, help="the bench executable (default: beside this Python)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype of the checkpoints")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--shard-mb", type=int, default=128, help="shard size of the input checkpoints, MiB")
    p.add_argument("--tv-scale", type=float, default=0.01, help="task-vector size relative to each tensor's RMS")
    p.add_argument("--repeats", type=int, default=1, help="runs of each program per method (alternating)")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of both programs")
    p.add_argument("--no-check", action="store_true", help="skip comparing the outputs")
    p.add_argument("--workdir", type=Path, default=None, help="where checkpoints go (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep checkpoints and outputs")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    # internal: work that needs torch, in a child process
    p.add_argument("--child-write", nargs=2, metavar=("SIZE", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--child-check", nargs=4, metavar=("METHOD", "BENCH", "MERGEKIT", "BASE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [s for s in args.sizes if s not in SIZES] + [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown size or method: {', '.join(bad)}")
    if args.child_write or args.child_check:
        return args
    if not args.mergekit_python:
        p.error("give mergekit's Python with --mergekit-python or $MERGEKIT_PYTHON (install it in its own venv: "
                "python3 -m venv /tmp/mk && /tmp/mk/bin/pip install torch mergekit)")
    if args.workdir is not None and not args.workdir.is_dir():
        p.error(f"--workdir {args.workdir} is not a directory")
    return args


# ---------------------------------------------------------------- children (import torch)


def llama_config(size: dict[str, Any], dtype: str) -> Any:
    import transformers

    return transformers.LlamaConfig(
        vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
        max_position_embeddings=2048, hidden_act="silu", tie_word_embeddings=size["tied"], torch_dtype=DTYPES[dtype],
        architectures=["LlamaForCausalLM"],
    )


def hf_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Checkpoint names and shapes of a LlamaForCausalLM (built on the meta device; a tied lm_head is not saved)."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def child_write(args: argparse.Namespace) -> dict[str, Any]:
    """θ_pre, the experts and a tiny model (for the interpreter baseline) as HF directories."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    from _common import expert_tensors, random_tensors

    from bench.checkpoint_io import write_sharded

    torch.set_num_threads(max(1, args.threads))
    size_name, root = args.child_write[0], Path(args.child_write[1])
    dtype = getattr(torch, DTYPES[args.dtype])
    shard = args.shard_mb * MiB
    info: dict[str, Any] = {}
    for label, size in (("", SIZES[size_name]), ("tiny-", SIZES["tiny"])):
        config = llama_config(size, args.dtype)
        shapes = hf_shapes(config)
        dirs = [root / f"{label}base"] + [root / f"{label}expert{i}" for i in range(args.experts)]
        write_sharded(random_tensors(shapes, args.seed, dtype=dtype), dirs[0], shard_bytes=shard)
        for i, d in enumerate(dirs[1:]):
            write_sharded(expert_tensors(shapes, args.seed, args.seed + 1 + i, args.tv_scale, dtype=dtype), d, shard_bytes=shard)
        for d in dirs:
            config.save_pretrained(d)
        if not label:
            largest = max(shapes, key=lambda k: _numel(shapes[k]))
            info = {"params": sum(_numel(s) for s in shapes.values()), "tensors": len(shapes),
                    "bytes": sum(_numel(s) for s in shapes.values()) * dtype.itemsize, "largest_tensor": largest,
                    "largest_tensor_bytes": _numel(shapes[largest]) * dtype.itemsize,
                    "shards": len(list(dirs[0].glob("*.safetensors")))}
    return info


def child_check(args: argparse.Namespace) -> dict[str, Any]:
    """Compare two merged checkpoints tensor by tensor against θ_pre."""
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.weights import open_checkpoint

    torch.set_num_threads(max(1, args.threads))
    method, bench_dir, mk_dir, base_dir = args.child_check
    ours, theirs, base = open_checkpoint(bench_dir), open_checkpoint(mk_dir), open_checkpoint(base_dir)
    missing = sorted(set(base) - set(theirs)) + sorted(set(base) - set(ours))
    totals = {"entries": 0, "equal": 0, "changed_bench": 0, "changed_mergekit": 0, "tau2_bench": 0.0,
              "tau2_mergekit": 0.0, "diff2": 0.0, "max_ulps": 0}
    for name in base:
        if name in missing:
            continue
        b, o, t = base[name], ours[name], theirs[name]
        totals["entries"] += b.numel()
        totals["equal"] += int((o == t).sum())
        totals["changed_bench"] += int((o != b).sum())
        totals["changed_mergekit"] += int((t != b).sum())
        totals["tau2_bench"] += float((o.double() - b.double()).pow(2).sum())
        totals["tau2_mergekit"] += float((t.double() - b.double()).pow(2).sum())
        totals["diff2"] += float((o.double() - t.double()).pow(2).sum())
        if o.dtype in (torch.bfloat16, torch.float16, torch.float32):  # distance in units in the last place
            bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[o.dtype]
            oi, ti = o.view(bits).long(), t.to(o.dtype).view(bits).long()
            same_sign = (oi >= 0) == (ti >= 0)
            ulps = torch.where(same_sign, (oi - ti).abs(), torch.full_like(oi, 1 << 30))
            totals["max_ulps"] = max(totals["max_ulps"], int(ulps.max()) if ulps.numel() else 0)
    n = max(1, totals["entries"])
    return {
        "missing": missing[:5], "entries": totals["entries"], "differing": totals["entries"] - totals["equal"],
        "equal_fraction": totals["equal"] / n,
        "changed_fraction_bench": totals["changed_bench"] / n, "changed_fraction_mergekit": totals["changed_mergekit"] / n,
        "tau_norm_ratio": (totals["tau2_bench"] / max(totals["tau2_mergekit"], 1e-300)) ** 0.5,
        "relative_difference": (totals["diff2"] / max(totals["tau2_mergekit"], 1e-300)) ** 0.5,
        "max_ulps": totals["max_ulps"],
    }


# ---------------------------------------------------------------- running the programs (no torch here)


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` to completion: wall seconds, peak RSS (MiB, ru_maxrss from wait4), exit status."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return {"wall_s": wall, "peak_mib": usage.ru_maxrss / 1024}


def bench_command(args: argparse.Namespace, method: str, base: Path, experts: list[Path], out: Path) -> list[str]:
    exe = args.bench or str(Path(sys.executable).with_name("bench"))
    cmd = [exe, "merge", "--method", method, "--base", str(base), "--models", *map(str, experts), "--out", str(out),
           "--seed", str(args.seed)]
    for k, v in PEERS[method]["bench"].items():
        cmd += ["--param", f"{k}={v}"]
    return cmd


def mergekit_command(args: argparse.Namespace, method: str, base: Path, experts: list[Path], out: Path,
                     config_path: Path) -> list[str]:
    peer = PEERS[method]
    config: dict[str, Any] = {
        "merge_method": peer["mergekit"], "dtype": DTYPES[args.dtype],
        "models": [{"model": str(e), "parameters": dict(peer["model"])} for e in experts],
    }
    if peer["mergekit"] != "linear":
        config["base_model"] = str(base)
    if peer["global"]:
        config["parameters"] = dict(peer["global"])
    config_path.write_text(json.dumps(config, indent=1))  # YAML is a superset of JSON
    exe = str(Path(args.mergekit_python).with_name("mergekit-yaml"))
    return [exe, str(config_path), str(out), "--random-seed", str(args.seed), "-j", str(args.threads),
            "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]


def child_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def run_child_json(args: argparse.Namespace, extra: list[str], env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra, "--dtype", args.dtype, "--experts", str(args.experts),
           "--shard-mb", str(args.shard_mb), "--tv-scale", str(args.tv_scale), "--threads", str(args.threads),
           "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"{extra[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_size(args: argparse.Namespace, size: str, env: dict[str, str]) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"mergearena-vs-mergekit-{size}-", dir=args.workdir))
    result: dict[str, Any] = {"size": size, "config": SIZES[size], "methods": {}}
    try:
        start = time.perf_counter()
        result["model"] = run_child_json(args, ["--child-write", size, str(root)], env)
        result["model"]["write_s"] = time.perf_counter() - start
        m = result["model"]
        print(f"\n{size}: {m['params'] / 1e6:.1f}M params, {m['bytes'] / MiB:.0f} MiB {args.dtype} per checkpoint in "
              f"{m['shards']} shards; largest tensor {m['largest_tensor']} {m['largest_tensor_bytes'] / MiB:.0f} MiB; "
              f"written in {m['write_s']:.0f} s", flush=True)
        result["baseline"] = baselines(args, root, env)
        for method in args.methods:
            result["methods"][method] = measure_method(args, root, method, env)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return result


def baselines(args: argparse.Namespace, root: Path, env: dict[str, str]) -> dict[str, float]:
    """Peak RSS of each program merging the tiny model with TA: its interpreter and imports."""
    experts = [root / f"tiny-expert{i}" for i in range(args.experts)]
    b = run_measured(bench_command(args, "ta", root / "tiny-base", experts, root / "tiny-out-bench"), env, root / "tiny-bench.log")
    k = run_measured(mergekit_command(args, "ta", root / "tiny-base", experts, root / "tiny-out-mk", root / "tiny.yml"),
                     env, root / "tiny-mergekit.log")
    print(f"  interpreter baselines (tiny model): bench {b['peak_mib']:.0f} MiB, mergekit {k['peak_mib']:.0f} MiB", flush=True)
    return {"bench_mib": b["peak_mib"], "mergekit_mib": k["peak_mib"]}


def measure_method(args: argparse.Namespace, root: Path, method: str, env: dict[str, str]) -> dict[str, Any]:
    experts = [root / f"expert{i}" for i in range(args.experts)]
    out_b, out_k = root / f"out-bench-{method}", root / f"out-mergekit-{method}"
    runs: dict[str, list[dict[str, Any]]] = {"bench": [], "mergekit": []}
    for r in range(args.repeats):
        for program in ("bench", "mergekit"):
            if program == "mergekit" and PEERS[method]["mergekit"] is None:
                continue
            shutil.rmtree(out_b if program == "bench" else out_k, ignore_errors=True)
            if program == "bench":
                cmd = bench_command(args, method, root / "base", experts, out_b)
            else:
                cmd = mergekit_command(args, method, root / "base", experts, out_k, root / f"{method}.yml")
            res = run_measured(cmd, env, root / f"{program}-{method}-{r}.log")
            try:
                res["load_1min"] = os.getloadavg()[0]
            except OSError:
                pass
            runs[program].append(res)
            print(f"  {method:11s} {program:8s} {res['wall_s']:8.1f} s  peak {res['peak_mib']:7.0f} MiB", flush=True)
    out: dict[str, Any] = {"runs": runs}
    if runs["mergekit"] and not args.no_check:
        out["check"] = run_child_json(args, ["--child-check", method, str(out_b), str(out_k), str(root / "base")], env)
        c = out["check"]
        print(f"  {method:11s} check: {100 * c['equal_fraction']:.3f} % equal, changed {100 * c['changed_fraction_bench']:.2f} % "
              f"(bench) / {100 * c['changed_fraction_mergekit']:.2f} % (mergekit), ‖τ‖ ratio {c['tau_norm_ratio']:.4f}, "
              f"max {c['max_ulps']} ulp", flush=True)
    for o in (out_b, out_k):
        if not args.keep:
            shutil.rmtree(o, ignore_errors=True)
    return out


# ---------------------------------------------------------------- report


def best(runs: list[dict[str, Any]], key: str) -> float:
    return min(r[key] for r in runs)


def tables(args: argparse.Namespace, results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The issue's table with sizes as columns, and the net-of-interpreter peaks."""
    main_rows, net_rows = [], []
    for method in args.methods:
        peer = PEERS[method]["mergekit"] or "(none)"
        row: dict[str, Any] = {"method": f"{method} / {peer}"}
        net: dict[str, Any] = {"method": method}
        for res in results:
            s = res["size"]
            runs = res["methods"][method]["runs"]
            bw, bp = best(runs["bench"], "wall_s"), best(runs["bench"], "peak_mib")
            if runs["mergekit"]:
                kw, kp = best(runs["mergekit"], "wall_s"), best(runs["mergekit"], "peak_mib")
                row[f"{s} wall bench/mk"] = f"{bw / kw:.2f} ({bw:.0f} s / {kw:.0f} s)"
                row[f"{s} peak bench"] = f"{bp:.0f} MiB"
                row[f"{s} peak mk"] = f"{kp:.0f} MiB"
                net[f"{s} net mk MiB"] = round(kp - res["baseline"]["mergekit_mib"])
            else:
                row[f"{s} wall bench/mk"] = f"{bw:.0f} s (bench only)"
                row[f"{s} peak bench"] = f"{bp:.0f} MiB"
                row[f"{s} peak mk"] = "-"
                net[f"{s} net mk MiB"] = "-"
            net[f"{s} net bench MiB"] = round(bp - res["baseline"]["bench_mib"])
        main_rows.append(row)
        net_rows.append(net)
    return main_rows, net_rows


def check_rows(args: argparse.Namespace, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    # mergekit computes in its config's dtype (the checkpoints'), bench in float32, rounding once at the end
    rounding = "" if args.dtype == "fp32" else f"; mergekit rounds each step to {args.dtype}"
    for res in results:
        for method in args.methods:
            c = res["methods"][method].get("check")
            if c:
                rows.append({"size": res["size"], "method": method, "differing entries": c.get("differing", ""),
                             "equal %": round(100 * c["equal_fraction"], 3),
                             "changed % bench": round(100 * c["changed_fraction_bench"], 2),
                             "changed % mk": round(100 * c["changed_fraction_mergekit"], 2),
                             "‖τ‖ bench/mk": round(c["tau_norm_ratio"], 4), "‖Δ‖/‖τ‖": f"{c['relative_difference']:.2e}",
                             "max ulp": c["max_ulps"] if c["max_ulps"] < 1 << 30 else "sign",
                             "documented difference": DIFFERENCES.get(method, "") + rounding})
    return rows


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    if not rows:
        print("(no rows)")
        return
    headers = list(rows[0])
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for r in rows:
        print("| " + " | ".join(str(r.get(h, "")) for h in headers) + " |")


def mergekit_version(python: str) -> str:
    proc = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"cannot import mergekit with {python}: {proc.stderr.strip()[-500:]}")
    return proc.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_write:
        print(json.dumps(child_write(args)))
        return 0
    if args.child_check:
        print(json.dumps(child_check(args)))
        return 0
    env = child_env(args)
    versions = mergekit_version(args.mergekit_python)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    print(f"mergekit {versions.split()[0]} (torch {versions.split()[1]}) vs bench merge; {args.dtype} checkpoints, "
          f"{args.experts} experts, {args.shard_mb} MiB input shards, {args.threads} thread(s); started {started}", flush=True)
    results = [measure_size(args, size, env) for size in args.sizes]
    main_rows, net_rows = tables(args, results)
    print_table(f"bench merge vs mergekit {versions.split()[0]} ({args.dtype}, {args.experts} experts, one thread, "
                f"best of {args.repeats}; wall = whole process, peak = max RSS)", main_rows)
    print_table("Peak RSS net of each program's interpreter (its peak on a tiny model), MiB", net_rows)
    if not args.no_check:
        print_table("Outputs compared (bench vs mergekit)", check_rows(args, results))
    if args.json:
        payload = {"benchmark": "vs_mergekit", "started": started, "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   "mergekit": versions, "platform": platform.platform(), "cpu_count": os.cpu_count(),
                   "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not k.startswith("child")},
                   "results": results, "table": main_rows, "net": net_rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1, default=str))
        print(f"\nwrote {args.json}")
    return 0


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


if __name__ == "__main__":
    sys.exit(main())

"""Does an expert fine-tune to the same bits on another CPU? Builds one expert of an embedded suite twice, in
fresh processes with empty caches: with the default CPU kernels and the suite's own portable build
(`bench.portable`), and prints each body's content hash, the seconds it took and the CPU it ran on.

    .venv/bin/python benchmarks/expert_determinism.py [--suite vision-effnet] [--task digits] [--json out.json]

Compare the printed hashes with another machine's: the torch CPU wheel picks kernels by instruction set in
three libraries (ATen's vectorised kernels, oneDNN, MKL), so with the defaults two CPU types fine-tune
different weights from the same code, recipe and seed; the portable settings cap all three.

Measured (digits, vision-effnet recipe f6435a2c25d4d938, 2 threads):
  AMD EPYC, AVX2:                  default 7d2cd27b…   portable d2ace124…
  Intel Xeon, AVX-512 + AMX:       default 1fcf2bed…   portable d2ace124…
  the machine that built the shipped experts (CPU not recorded): default f7b9ee79…
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from bench.portable import IN_BUILD, PORTABLE_KERNELS

CHILD = """
import json, sys, time
from bench.registry import suites
from bench.runner import cpu_identity
from bench.weights import state_hash
suite = suites.get(sys.argv[1])(cache_dir=sys.argv[3])
t = time.time()
expert = suite.expert(sys.argv[2])
print(json.dumps({"recipe": suite.recipe_hash(), "hash": state_hash(expert.body), "seconds": round(time.time() - t, 1),
                  "cpu": cpu_identity()}))
"""


def build(suite: str, task: str, threads: int, portable: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "MERGEARENA_QUIET": "1"}
    for key in (*PORTABLE_KERNELS, IN_BUILD):
        env.pop(key, None)
    if not portable:
        env[IN_BUILD] = "1"  # fine-tune in this child with the default kernels (the suite would start a portable one)
    with tempfile.TemporaryDirectory(prefix="mergearena-expert-") as cache:
        out = subprocess.run([sys.executable, "-c", CHILD, suite, task, cache], env=env, capture_output=True,
                             text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="vision-effnet")
    ap.add_argument("--task", default="digits")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    rows = []
    for portable in (False, True):
        r = build(args.suite, args.task, args.threads, portable)
        rows.append({"kernels": "portable" if portable else "default", **r})
        cpu = r["cpu"]
        print(f"{rows[-1]['kernels']:<9} {r['hash'][:16]}…  {r['seconds']:>7.1f} s  recipe {r['recipe']}  "
              f"{cpu['model']} ({cpu['aten_capability']})", flush=True)
    print(f"portable ÷ default time: {rows[1]['seconds'] / rows[0]['seconds']:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

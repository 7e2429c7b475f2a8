"""Portable expert builds: the same experts, bit for bit, on every CPU.

Cause (issue 27, `benchmarks/expert_determinism.py`): the torch CPU wheel chooses its kernels by the
processor's instruction set in three libraries — ATen's vectorised kernels (AVX2 or AVX-512 paths), oneDNN
(convolutions, matmuls; AMX on recent Xeons) and MKL (BLAS) — and those kernels sum in different orders. So
the same code, recipe and seed fine-tuned digits to body hash 7d2cd27b… on an AMD EPYC (AVX2) and 1fcf2bed…
on an Intel Xeon (AVX-512 + AMX): from the first optimiser step the weights differ in the last bits, and
hundreds of steps of SGD carry that into different experts and different merge gains.

Fix: an embedded suite (``Suite.portable_build``) fine-tunes each expert in a child process that starts with
the switches of `PORTABLE_KERNELS` (each library capped at a level every x86-64 CPU has, MKL in its
conditional-numerical-reproducibility mode) and a fixed thread count (`BUILD_THREADS`: a parallel reduction's
order depends on how many threads split it). They are read when the libraries load, so they cannot be set in
a running process. Measured on digits (vision-effnet, 2 threads): the same body hash d2ace124… on the AMD
EPYC and the Intel Xeon, at 1.41 times the default kernels' time (91 s against 65 s on the Xeon).

Only the experts are built so: they are the inputs every cell shares and the slowest thing to re-make.
Everything downstream (defenses, merges, attacks, evaluation) runs with the fast default kernels; how much a
different CPU moves those numbers is measured (`benchmarks/expert_determinism.py --downstream`) and stated
on the site.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

PORTABLE_KERNELS: dict[str, str] = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                                    "MKL_CBWR": "COMPATIBLE"}
"""Kernel switches read when the libraries load: the lowest level every x86-64 CPU runs, for all three."""

BUILD_THREADS = 2
"""Threads of a portable build, on every machine (a reduction's order depends on how many threads split it)."""

IN_BUILD = "MERGEARENA_PORTABLE_BUILD"
"""Set in the child process: it builds in place instead of spawning another child."""


class PortableBuildError(RuntimeError):
    """The child process that fine-tunes an expert failed; its stderr was shown as it ran."""


def build_environment() -> dict[str, Any]:
    """What of the build environment enters a portable suite's recipe (so its hash names bit-exact experts)."""
    import torch

    return {"kernels": dict(sorted(PORTABLE_KERNELS.items())), "threads": BUILD_THREADS,
            "torch": torch.__version__.split("+")[0]}


def in_portable_build() -> bool:
    """True inside the child that `build_expert` started (the kernel switches are in force there)."""
    return os.environ.get(IN_BUILD) == "1"


def child_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the portable switches and thread counts pinned."""
    env = dict(os.environ if base is None else base)
    env.update(PORTABLE_KERNELS)
    env.update({"OMP_NUM_THREADS": str(BUILD_THREADS), "MKL_NUM_THREADS": str(BUILD_THREADS), IN_BUILD: "1"})
    return env


_CHILD = """
import sys
import torch
torch.set_num_threads(int(sys.argv[4]))
from bench.registry import suites
suite = suites.get(sys.argv[1])(cache_dir=sys.argv[3])
if suite.recipe_hash() != sys.argv[5]:
    sys.exit(f"the registered suite {sys.argv[1]!r} has recipe {suite.recipe_hash()}, the caller's has {sys.argv[5]}: "
             "a portable build fine-tunes the registered recipe only (set portable_build = False on a modified suite)")
suite.expert(sys.argv[2])
"""


def build_expert(suite_name: str, task: str, cache_dir: str | os.PathLike, recipe_hash: str) -> None:
    """Fine-tune ``task``'s expert of the registered suite ``suite_name`` into ``cache_dir`` in a child process
    with the portable kernels; its output goes to this process's. The child refuses to build when its suite's
    recipe is not ``recipe_hash`` (the caller's instance was modified). Raises `PortableBuildError`."""
    root = Path(__file__).resolve().parent.parent
    env = child_environment()
    # the child imports what this process can (a plugin's suite found on sys.path, the package itself)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in (str(root), *sys.path) if p))
    proc = subprocess.run([sys.executable, "-c", _CHILD, suite_name, task, str(cache_dir), str(BUILD_THREADS),
                           recipe_hash],
                          env=env, check=False)
    if proc.returncode != 0:
        raise PortableBuildError(f"the portable build of expert {suite_name}/{task} failed (exit {proc.returncode}); "
                                 "its error is printed above")

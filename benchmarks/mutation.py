"""Mutation testing of the modules whose numbers the leaderboard publishes: which one-line breakages do the tests miss?

Runs mutmut (3.x; the ``dev`` extra installs it) on a snapshot of the repository: every module given
with ``--modules`` is mutated one small change at a time (an operator flipped, a constant moved, an
argument dropped), and each mutant is run against the tests given with ``--tests`` that reach it. A
mutant is *killed* when a test fails (or it runs past mutmut's timeout); it *survives* when every
test still passes. The script prints the kill rate per module and the diff of every survivor.

It is slow (minutes to an hour: one test run per mutant), so it is a script, not a test:

    .venv/bin/python benchmarks/mutation.py \\
        --modules merges/basic.py,merges/ties.py,merges/dare.py,merges/tuned.py \\
        --tests tests/test_merges.py,tests/test_merges_tuned.py
    .venv/bin/python benchmarks/mutation.py --modules bench/scoring,bench/protocol.py \\
        --tests tests/test_scoring.py,tests/test_protocol.py --fail-under 90

A module is a file or a package directory (every ``.py`` under it). The snapshot is taken when the
script starts, so edits made to the working tree during the run do not reach it; ``--workdir`` keeps
the snapshot (with mutmut's ``mutants/``) for `mutmut show NAME` or `mutmut browse` run inside it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "defenses", "attacks", "merges", "tasks", "leaderboard")
"""What the snapshot holds besides tests/ and pyproject.toml: every package of the distribution."""
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
"""mutmut statuses that count as detected (a mutant that hangs or crashes the run is caught too)."""
RESULT_LINE = re.compile(r"^\s+(?P<name>\S+): (?P<status>.+)$")
PYTEST_MARKERS = "not slow and not network and not gpu"


def split_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def selected(mutant: str, globs: list[str]) -> bool:
    """Whether a mutant name matches one of the ``--functions`` globs."""
    return any(fnmatch.fnmatchcase(mutant, g) for g in globs)


def module_pattern(module: str) -> str:
    """mutmut's ``only_mutate`` glob for a file or a package directory, relative to the repository root."""
    path = (ROOT / module).resolve()
    if not path.exists():
        raise SystemExit(f"--modules: {module} does not exist under {ROOT}")
    relative = path.relative_to(ROOT).as_posix()
    if path.is_dir():
        return relative + "/*"
    if path.suffix != ".py":
        raise SystemExit(f"--modules: {module} is neither a .py file nor a package directory")
    return relative


def module_of(mutant: str, patterns: list[str]) -> str:
    """The --modules entry a mutant name (``merges.basic.x_fn__mutmut_3``) belongs to."""
    dotted = mutant.split(".x")[0] if ".x" in mutant else mutant.rsplit(".", 1)[0]
    for pattern in patterns:
        stem = pattern.removesuffix("/*").removesuffix(".py").replace("/", ".")
        if dotted == stem or dotted.startswith(stem + "."):
            return pattern.removesuffix("/*")
    return dotted


def snapshot(workdir: Path) -> None:
    """Copy the packages, tests/ and pyproject.toml into ``workdir`` (no caches, no earlier mutants)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "mutants", ".pytest_cache")
    for name in (*PACKAGES, "tests"):
        shutil.copytree(ROOT / name, workdir / name, ignore=ignore)
    text = (ROOT / "pyproject.toml").read_text()
    if "[tool.mutmut]" in text:  # mutmut would read that table and ignore the setup.cfg written below
        raise SystemExit("pyproject.toml has a [tool.mutmut] table; this script writes its own configuration")
    (workdir / "pyproject.toml").write_text(text)


def write_config(workdir: Path, patterns: list[str], tests: list[str]) -> None:
    """mutmut's configuration (setup.cfg, one value per line): what to copy, mutate and run."""
    def block(key: str, values: list[str]) -> str:
        return f"{key} =\n" + "".join(f"    {v}\n" for v in values)

    (workdir / "setup.cfg").write_text(
        "[mutmut]\n"
        + block("source_paths", list(PACKAGES))
        + block("only_mutate", patterns)
        + block("pytest_add_cli_args_test_selection", tests)
        + block("pytest_add_cli_args", ["-m", PYTEST_MARKERS, "-p", "no:cacheprovider"])
        # forked from a clean server, not from a process that has run torch (torch is not fork-safe)
        + "process_isolation = forkserver\n"
    )


def mutmut(workdir: Path, *args: str, capture: bool = True) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MERGEARENA_QUIET": "1"}
    done = subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=workdir, env=env, text=True,
                          capture_output=capture)
    if done.returncode != 0:
        tail = (done.stdout or "")[-2000:] + (done.stderr or "")[-2000:] if capture else ""
        raise SystemExit(f"mutmut {' '.join(args)} exited with {done.returncode}\n{tail}")
    return done.stdout or ""


def results(workdir: Path) -> dict[str, str]:
    """mutant name -> status, for every mutant of the run."""
    out = {}
    for line in mutmut(workdir, "results", "--all", "true").splitlines():
        match = RESULT_LINE.match(line)
        if match:
            out[match["name"]] = match["status"].strip()
    return out


def survivor_diff(workdir: Path, name: str) -> str:
    """The changed lines of one mutant (mutmut's unified diff, headers dropped)."""
    lines = mutmut(workdir, "show", name).splitlines()
    return "\n".join(f"      {x}" for x in lines if x[:1] in "+-" and not x.startswith(("+++", "---")))


def summary_rows(statuses: dict[str, str], patterns: list[str]) -> list[dict[str, Any]]:
    per_module: dict[str, Counter[str]] = {}
    for name, status in statuses.items():
        per_module.setdefault(module_of(name, patterns), Counter())[status] += 1
    rows = []
    for module, counts in sorted(per_module.items()) + [("all", sum(per_module.values(), Counter()))]:
        killed = sum(counts[s] for s in KILLED)
        counted = sum(counts.values()) - counts["skipped"] - counts["not checked"]
        rows.append({"module": module, "mutants": sum(counts.values()), "killed": killed,
                     "survived": counts["survived"], "no tests": counts["no tests"],
                     "other": counted - killed - counts["survived"] - counts["no tests"],
                     "kill rate %": round(100 * killed / counted, 1) if counted else float("nan")})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modules", type=split_list, required=True,
                    help="comma-separated files or package directories to mutate, relative to the repository root")
    ap.add_argument("--tests", type=split_list, required=True,
                    help="comma-separated test files (or pytest node ids) that should kill the mutants")
    ap.add_argument("--functions", type=split_list, default=[],
                    help="comma-separated globs on mutant names (module.x_function*, module.xǁClassǁmethod*): mutate "
                         "and report only the functions they match, e.g. the planner's counterpart rule "
                         "'bench.plan.x_counterpart_spec*,bench.plan.x_reference_ids*'")
    ap.add_argument("--workers", type=int, default=2, help="mutants run in parallel (default 2)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the snapshot and mutmut's mutants/ go, kept afterwards (default: a temporary "
                         "directory, removed)")
    ap.add_argument("--rerun", action="store_true",
                    help="in the --workdir of an earlier run: take a new snapshot, let mutmut re-test the functions "
                         "that changed, then re-run every mutant not killed (after adding tests: much faster than a "
                         "fresh run, since killed mutants of unchanged functions stay killed)")
    ap.add_argument("--fail-under", type=float, default=None, help="exit 1 when the overall kill rate (%%) is below this")
    ap.add_argument("--json", default=None, help="write the figures and the survivors to this JSON file")
    args = ap.parse_args(argv)

    patterns = [module_pattern(m) for m in args.modules]
    for t in args.tests:
        if not (ROOT / t.split("::")[0]).exists():
            raise SystemExit(f"--tests: {t} does not exist under {ROOT}")
    workdir = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="mergearena-mutation-"))
    if args.rerun and not (workdir / "mutants").is_dir():
        raise SystemExit("--rerun needs the --workdir of an earlier run (it holds mutants/)")
    if args.workdir and not args.rerun:
        if workdir.exists() and any(workdir.iterdir()):
            raise SystemExit(f"--workdir {workdir} is not empty; give a new directory (or --rerun)")
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.rerun:
            # the current sources and tests replace the snapshot; mutmut regenerates the mutants of changed
            # functions (their earlier verdicts are dropped), and every mutant still not killed runs again
            for name in (*PACKAGES, "tests"):
                shutil.rmtree(workdir / name)
            snapshot(workdir)
            write_config(workdir, patterns, args.tests)
            print(f"refreshing the mutants of {', '.join(patterns)} in {workdir} (changed functions only)", flush=True)
            mutmut(workdir, "run", "--max-children", str(args.workers), capture=False)
            names = [n for n, s in results(workdir).items() if s not in KILLED]
            print(f"re-running the {len(names)} mutants that were not killed, against the current tests", flush=True)
        else:
            snapshot(workdir)
            write_config(workdir, patterns, args.tests)
            names = []
            print(f"mutating {', '.join(patterns)} against {', '.join(args.tests)} in {workdir}", flush=True)
        if args.functions:
            names = [n for n in names if selected(n, args.functions)] if names else list(args.functions)
        start = time.time()
        if names or not args.rerun:
            mutmut(workdir, "run", "--max-children", str(args.workers), *names, capture=False)
        seconds = time.time() - start
        statuses = {n: s for n, s in results(workdir).items() if not args.functions or selected(n, args.functions)}
        rows = summary_rows(statuses, patterns)
        survivors = sorted(n for n, s in statuses.items() if s not in KILLED | {"skipped", "not checked"})
        print(f"\nsurvivors ({len(survivors)}):")
        diffs = {}
        for name in survivors:
            diffs[name] = survivor_diff(workdir, name)
            print(f"  {name}: {statuses[name]}\n{diffs[name]}")
        sys.path.insert(0, str(ROOT))
        from benchmarks._common import environment, print_table, write_json

        print_table(f"mutation testing ({seconds / 60:.1f} min, mutmut, {args.workers} workers)", rows, floatfmt=".1f")
        if args.json:
            write_json(args.json, {"date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": environment(),
                                   "modules": args.modules, "tests": args.tests, "seconds": seconds, "rows": rows,
                                   "survivors": {n: {"status": statuses[n], "diff": diffs[n]} for n in survivors}})
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    overall = rows[-1]["kill rate %"]
    if args.fail_under is not None and not overall >= args.fail_under:
        print(f"kill rate {overall}% is below --fail-under {args.fail_under}%")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

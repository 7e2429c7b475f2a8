"""The scoring and protocol mutations of the tests-that-can-fail issue: each breaks one line the leaderboard's
numbers rest on, in a scratch copy of the repository, and runs the test that must catch it.

    .venv/bin/python benchmarks/row_mutations.py                 # every mutation
    .venv/bin/python benchmarks/row_mutations.py "drop the split (all examples)"

Prints one line per mutation: KILLED (its test failed, as it must) or SURVIVED. Exit status 1 if any
survived. Not a test (it copies the repository and runs pytest once per mutation: about a minute);
`benchmarks/mutation.py` runs a mutation tool over whole modules.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns(".venv", ".git", ".cache", "site", "*.sqlite", "__pycache__", "data")

MUTATIONS = [  # (name, file, line(s) as written, the mutation, the tests that must fail)
    ("report the selection half", "bench/scoring/selection.py",
  "point = float(pair_statistics(chosen, held_w, ones_r).recovered[0])",
  "point = float(pair_statistics(chosen, sel_w, ones_r).recovered[0])",
  "tests/test_scoring.py::test_the_reported_worst_case_is_read_on_the_held_out_half_only"),
    ("drop the split (all examples)", "bench/scoring/selection.py",
  "point = float(pair_statistics(chosen, held_w, ones_r).recovered[0])",
  "point = float(pair_statistics(chosen, all_w, ones_r).recovered[0])",
  "tests/test_scoring.py::test_the_reported_worst_case_is_read_on_the_held_out_half_only"),
    ("drop the lower-bound selection", "bench/scoring/selection.py",
  "        if selection_counts is not None:\n            # replicates",
  "        if False:\n            # replicates",
  "tests/test_scoring.py::test_selection_reads_the_lower_bound_not_the_point_value_at_score_level"),
    ("break on the held-out half", "bench/protocol.py",
  "if vs.selection_recovered is not None and vs.selection_recovered >= self.protocol.break_threshold:",
  "if vs.best_recovered is not None and vs.best_recovered >= self.protocol.break_threshold:",
  "tests/test_protocol_breaks.py"),
    ("break on the all-example maximum", "bench/protocol.py",
  "if vs.selection_recovered is not None and vs.selection_recovered >= self.protocol.break_threshold:",
  "if max((p.recovered or 0) for p in vs.pairs) >= self.protocol.break_threshold:",
  "tests/test_protocol_breaks.py"),
    ("broken_by always None", "bench/protocol.py",
  "        if w is None or w.broken_at is None:\n            return None",
  "        if True:\n            return None",
  "tests/test_protocol_breaks.py"),
    ("stability reports no flips", "bench/scoring/ranking.py",
  "return RankStability(names, (counts / n_draws).tolist(), flips, same / n_draws)",
  "return RankStability(names, (counts / n_draws).tolist(), [(a, b, 0.0) for a, b, _ in flips], 1.0)",
  "tests/test_scoring.py::test_stability_counts_the_draws_that_reorder_the_point_ranking"),
    ("references under the attack itself (v2 rule)", "bench/plan.py",
  "        out[\"attack\"] = counterpart_attack_spec(spec.get(\"attack\"))",
  "        pass",
  "tests/test_scoring.py::test_an_undo_attack_is_credited_only_for_what_it_takes_from_the_protected_model tests/test_scoring.py::test_a_finetuning_attack_is_read_against_plain_merge_finetune_with_the_same_samples"),
    ("every attack against the plain merge", "bench/plan.py",
  "        out[\"attack\"] = counterpart_attack_spec(spec.get(\"attack\"))",
  "        out[\"attack\"] = {\"name\": \"none\", \"version\": \"1\", \"params\": {}}",
  "tests/test_scoring.py::test_a_finetuning_attack_is_read_against_plain_merge_finetune_with_the_same_samples"),
    ("drop undefined bootstrap draws", "bench/scoring/bootstrap.py",
  "    lo = np.percentile(np.where(nan, undefined[0], draws), 50 * (1 - level))\n    hi = np.percentile(np.where(nan, undefined[1], draws), 100 - 50 * (1 - level))",
  "    lo = np.percentile(draws[~nan], 50 * (1 - level))\n    hi = np.percentile(draws[~nan], 100 - 50 * (1 - level))",
  "tests/test_scoring_statistics.py"),
    ("selection value is the held-out value", "bench/scoring/selection.py",
  "return Selection(best, None if math.isnan(point) else point, draws, naive, best_sel)",
  "return Selection(best, None if math.isnan(point) else point, draws, naive, point)",
  "tests/test_scoring_statistics.py::test_stopping_on_the_selection_half_leaves_the_reported_held_out_value_unbiased tests/test_protocol_breaks.py"),
    ("utility not capped in the order", "bench/scoring/ranking.py",
  "return (-(ds.security or 0.0), -min(ds.utility or 0.0, 1.0), ds.defense)",
  "return (-(ds.security or 0.0), -(ds.utility or 0.0), ds.defense)",
  "tests/test_scoring.py::test_utility_above_one_earns_no_credit_in_the_order"),
    ("point ranks instead of bands", "bench/scoring/ranking.py",
  "        ds.rank_band = (1 + better, n - worse)",
  "        ds.rank_band = (1 + sum(rank_key(o) < rank_key(ds) for o in rankable),) * 2",
  "tests/test_scoring.py::test_ranking_separates_what_the_bootstrap_separates_and_bands_the_rest"),
    ("the reference row gets a worst case", "bench/scoring/victim.py",
  "        if self.defense != REFERENCE:  # the reference row shows gains",
  "        if True:  # the reference row shows gains",
  "tests/test_scoring.py::test_reference_row_shows_the_gains_has_no_security_and_is_never_ranked"),
    ("cross-suite overall rank", "bench/scoring/summaries.py",
  "    if len(coverage) > 1:",
  "    if False:",
  "tests/test_scoring.py::test_no_cross_suite_rank_when_defenses_cover_different_suites"),
    ("entry pairs: mean of per-victim ratios over every victim", "bench/scoring/summaries.py",
  "        victims = covered.get((suite, a, m), ())",
  "        victims = tuple(sorted(per_victim))",
  "tests/test_scoring.py::test_entry_pair_rows_cover_one_stated_set_of_victims_and_agree_with_their_values"),
]


def run(names: list[str]) -> int:
    survived = 0
    with tempfile.TemporaryDirectory(prefix="mergearena-mut-") as tmp:
        root = Path(tmp) / "repo"
        shutil.copytree(REPO, root, ignore=IGNORE)
        shutil.copytree(REPO / "leaderboard" / "data", root / "leaderboard" / "data")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
        for name, path, old, new, tests in MUTATIONS:
            if names and name not in names:
                continue
            f = root / path
            src = f.read_text()
            if old not in src:
                print(f"STALE    | {name} | {path} no longer holds the line it mutates", flush=True)
                survived += 1
                continue
            f.write_text(src.replace(old, new, 1))
            try:
                r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests.split()],
                                   cwd=root, capture_output=True, text=True, env=env)
                last = (r.stdout.strip().splitlines() or [r.stderr[-200:]])[-1]
                survived += r.returncode == 0
                print(f"{'KILLED' if r.returncode else 'SURVIVED':8s} | {name} | {tests} | {last}", flush=True)
            finally:
                f.write_text(src)
    return 1 if survived else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    return run(ap.parse_args().names)


if __name__ == "__main__":
    raise SystemExit(main())

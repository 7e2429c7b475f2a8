"""A frontier victim by victim: does any strength setting keep the model and break the merge?

For every stored setting of a defense's frontier (the manifest's ``frontiers``, `bench frontier`), per victim:
the setting's utility with its interval, and under each plain merge (no attack) the merged victim metric V_P
beside V_∅ (the merge without the victim) and V_U (the merge with the unprotected expert), with the recovered
fraction and its interval; then the setting's security (the worst case over the whole protocol). A setting
*keeps the model* when its utility is at least ``--floor`` on every victim and *stops the plain merge* when, on
every victim and plain merge, the upper bound of recovered is at most ``--near`` (the merged victim is within
that share of its contribution of V_∅; the claims ledger's "regresses to pretrained" reads 0.1 too).

    .venv/bin/python benchmarks/frontier_victims.py --defense mergeguard [--suite vision-effnet]
        [--data leaderboard/data] [--floor 0.9] [--near 0.1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_json  # noqa: E402
from leaderboard.claims import PLAIN  # noqa: E402  (the plain merges: the protocol's first step group)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ci(c: list[float] | None) -> str:
    return "-" if c is None else f"[{c[0]:.3f}, {c[1]:.3f}]"


def setting_rows(entry: dict[str, Any], merges: tuple[str, ...] = PLAIN) -> list[dict[str, Any]]:
    """Per victim and plain merge of one setting's entry: utility, V_P, V_∅, V_U and recovered with intervals."""
    rows = []
    for v in entry["victims"]:
        for p in v["recovered"]:
            if p["attack"] != "none" or p["merge"] not in merges:
                continue
            rows.append({"victim": v["victim"], "utility": v["utility"], "utility_ci": v["utility_ci"],
                         "merge": p["merge"], "v_protected": p["v_protected"], "v_counterfactual": p["v_counterfactual"],
                         "v_unprotected": p["v_unprotected"], "recovered": p["recovered"],
                         "recovered_ci": p["recovered_ci"]})
    return rows


def verdict(entry: dict[str, Any], rows: list[dict[str, Any]], floor: float, near: float) -> dict[str, Any]:
    """Whether the setting keeps the model (utility ≥ floor on every victim, point and lower bound both reported)
    and stops every plain merge (recovered's upper bound ≤ near on every victim and plain merge)."""
    utilities = [v["utility"] for v in entry["victims"]]
    lows = [v["utility_ci"][0] if v["utility_ci"] else None for v in entry["victims"]]
    uppers = [r["recovered_ci"][1] if r["recovered_ci"] else None for r in rows]
    return {"keeps_model": all(u is not None and u >= floor for u in utilities),
            "keeps_model_lower_bound": all(x is not None and x >= floor for x in lows),
            "stops_plain_merges": bool(rows) and all(x is not None and x <= near for x in uppers),
            "worst_plain_recovered": max((r["recovered"] for r in rows if r["recovered"] is not None), default=None)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--defense", required=True, help="the defense whose frontier to read (its plain name)")
    ap.add_argument("--suite", default="vision-effnet")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "leaderboard" / "data"),
                    help="an export directory (default: the shipped results)")
    ap.add_argument("--floor", type=float, default=0.9, help="utility every victim must keep")
    ap.add_argument("--near", type=float, default=0.1, help="largest upper bound of recovered that counts as V_∅")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    data = Path(args.data)
    manifest = json.loads((data / "manifest.json").read_text())
    found = [f for f in manifest.get("frontiers", []) if (f["suite"], f["defense"]) == (args.suite, args.defense)]
    if not found:
        print(f"no frontier of {args.defense} on {args.suite} in {data} (run: bench frontier --defense "
              f"{args.defense} --suite {args.suite}, then bench leaderboard export)", file=sys.stderr)
        return 2
    out = []
    for label in dict.fromkeys(p["label"] for p in found[0]["points"]):
        point = next(p for p in found[0]["points"] if p["label"] == label)
        entry = json.loads((data / point["file"]).read_text())
        rows = setting_rows(entry)
        summary = entry["summary"]
        out.append({"label": label, "knob": point["knob"], "value": point["value"], "default": point["default"],
                    "utility": summary["utility"], "utility_ci": summary["utility_ci"],
                    "security": summary["security"], "security_ci": summary["security_ci"],
                    "rows": rows, **verdict(entry, rows, args.floor, args.near)})
    for s in out:
        print(f"\n## {s['label']}{' (default)' if s['default'] else ''}: utility {_f(s['utility'])} "
              f"{_ci(s['utility_ci'])}, security {_f(s['security'])} {_ci(s['security_ci'])}; keeps the model "
              f"(≥ {args.floor:g} on every victim): {'yes' if s['keeps_model'] else 'no'} (lower bounds: "
              f"{'yes' if s['keeps_model_lower_bound'] else 'no'}); plain merges within {args.near:g} of V_∅: "
              f"{'yes' if s['stops_plain_merges'] else 'no'}\n")
        print("| victim | utility | merge | V_P | V_∅ | V_U | recovered |")
        print("|---|---|---|---|---|---|---|")
        for r in s["rows"]:
            print(f"| {r['victim']} | {_f(r['utility'])} {_ci(r['utility_ci'])} | {r['merge']} | {_f(r['v_protected'])} | "
                  f"{_f(r['v_counterfactual'])} | {_f(r['v_unprotected'])} | {_f(r['recovered'])} {_ci(r['recovered_ci'])} |")
    both = [s["label"] for s in out if s["keeps_model"] and s["stops_plain_merges"]]
    print(f"\nsettings that keep the model and bring every plain merge within {args.near:g} of V_∅: "
          f"{', '.join(both) if both else 'none'}")
    if args.json:
        write_json(args.json, {"suite": args.suite, "defense": args.defense, "floor": args.floor, "near": args.near,
                               "settings": out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The claims ledger (`leaderboard.claims`): every verdict rule on hand-built measurements, the ledger of an
export of hand-built cells, the ledger of the shipped data re-checked against its own numbers, missing cells,
the quoted passages, and the page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from markupsafe import escape
from scored_cells import SUITE, baseline, pipeline, unique, utility_cell  # (tests/ is on sys.path)

from leaderboard import claims as lc
from leaderboard.export import SHIPPED, dumps, export, load_export

SHARED = Path("/work/shared")
CLAIM = {c.id: c for c in lc.CLAIMS}


def row(lo: float, hi: float, victim: str = "v", merge: str = "ta") -> dict:
    return {"victim": victim, "merge": merge, "attack": "none", "value": (lo + hi) / 2, "ci": [lo, hi], "cells": []}


# ---------------------------------------------------------------- the rules, by hand


@pytest.mark.parametrize("ci, op, t, expected", [
    ((0.986, 0.994), ">=", 0.985, "holds"), ((0.95, 0.98), ">=", 0.985, "fails"), ((0.97, 1.01), ">=", 0.985, "undecided"),
    ((0.985, 1.0), ">=", 0.985, "holds"), ((0.0, 0.0), ">", 0.0, "fails"), ((0.01, 0.2), ">", 0.0, "holds"),
    ((0.0, 0.08), "<=", 0.1, "holds"), ((0.12, 0.3), "<=", 0.1, "fails"), ((0.0, 1.0), "<", 1.0, "undecided"),
    ((0.2, 0.9), "<", 1.0, "holds"), ((1.0, 1.0), "<", 1.0, "fails"), (None, ">=", 0.5, "undecided"),
])
def test_interval_status_by_hand(ci, op, t, expected) -> None:
    assert lc.interval_status(ci, op, t) == expected


def test_quantifiers_by_hand() -> None:
    every = lc.Condition("c", lc.Measure("removed", "d"), ">=", 0.5, "every", "")
    some = lc.Condition("c", lc.Measure("removed", "d"), ">=", 0.5, "some", "")
    rows = [row(0.6, 0.8, "a"), row(0.2, 0.7, "b"), row(0.1, 0.3, "c")]
    assert lc.condition_status(every, rows) == ("fails", 2)  # c fails: its whole interval is below 0.5
    assert lc.condition_status(every, rows[:2]) == ("undecided", 1)  # b straddles 0.5
    assert lc.condition_status(every, rows[:1]) == ("holds", 0)
    assert lc.condition_status(every, rows[:1], complete=False) == ("incomplete", 0)
    assert lc.condition_status(some, rows) == ("holds", 0)  # a's lower bound 0.6 clears 0.5
    assert lc.condition_status(some, rows[1:]) == ("undecided", 0)  # best lower bound is b's 0.2, but b may hold
    assert lc.condition_status(some, rows[2:]) == ("fails", 0)
    assert lc.condition_status(every, []) == ("missing", None)


@pytest.mark.parametrize("statuses, expected", [
    (["holds", "holds"], lc.REPRODUCED), (["holds", "fails"], lc.PARTLY), (["holds", "undecided"], lc.PARTLY),
    (["holds", "missing"], lc.PARTLY), (["incomplete"], lc.PARTLY), (["fails", "undecided"], lc.NOT_REPRODUCED),
    (["undecided"], lc.NOT_REPRODUCED), (["missing", "missing"], lc.NOT_MEASURED), (["fails", "missing"], lc.NOT_REPRODUCED),
    (["uninformative"], lc.NOT_TESTABLE), (["n/a"], lc.NOT_TESTABLE), (["holds", "n/a"], lc.REPRODUCED),
    (["missing", "n/a"], lc.NOT_MEASURED),
])
def test_suite_verdict_by_hand(statuses, expected) -> None:
    assert lc.suite_verdict(statuses) == expected


@pytest.mark.parametrize("verdicts, expected", [
    ([lc.REPRODUCED, lc.NOT_MEASURED, lc.NOT_TESTABLE], lc.REPRODUCED),
    ([lc.REPRODUCED, lc.NOT_REPRODUCED], lc.PARTLY), ([lc.NOT_REPRODUCED, lc.NOT_MEASURED], lc.NOT_REPRODUCED),
    ([lc.NOT_MEASURED, lc.NOT_TESTABLE], lc.NOT_MEASURED), ([lc.NOT_TESTABLE], lc.NOT_TESTABLE),
])
def test_claim_verdict_by_hand(verdicts, expected) -> None:
    assert lc.claim_verdict(verdicts) == expected


def judge(claim: lc.Claim, rows: dict[str, list[dict]]) -> str:
    return lc.suite_verdict([lc.condition_status(c, rows.get(c.name, []))[0] for c in claim.conditions])


def test_mergeguard_headline_by_hand() -> None:
    """Fidelity: utility lower bound ≥ 0.985 on every victim; collapse: removed lower bound ≥ 0.5 on some pair."""
    c = CLAIM["mergeguard-headline"]
    good_utility = [row(0.986, 0.999, "a"), row(0.99, 1.01, "b")]
    assert judge(c, {"fidelity": good_utility, "collapse": [row(0.2, 0.4), row(0.51, 0.8)]}) == lc.REPRODUCED
    assert judge(c, {"fidelity": good_utility + [row(0.97, 1.0, "c")], "collapse": [row(0.51, 0.8)]}) == lc.PARTLY
    assert judge(c, {"fidelity": [row(0.92, 0.97)], "collapse": [row(0.3, 0.6)]}) == lc.NOT_REPRODUCED
    assert judge(c, {}) == lc.NOT_MEASURED


def test_mergeguard_unmask_and_graderase_by_hand() -> None:
    assert judge(CLAIM["mergeguard-unmask"], {"regresses to pretrained": [row(0.0, 0.08), row(0.0, 0.1)]}) == lc.REPRODUCED
    assert judge(CLAIM["mergeguard-unmask"], {"regresses to pretrained": [row(0.0, 0.08), row(0.2, 0.4)]}) == lc.NOT_REPRODUCED
    assert judge(CLAIM["mergeguard-graderase"], {"not fully restored": [row(0.3, 0.99)]}) == lc.REPRODUCED
    assert judge(CLAIM["mergeguard-graderase"], {"not fully restored": [row(0.3, 1.0)]}) == lc.NOT_REPRODUCED


def test_mergebarrier_ablation_by_hand() -> None:
    """Three paired gaps, each on its mean: full > attention-only, full > FFN-only, attention-only > FFN-only."""
    c = CLAIM["mergebarrier-ablation"]
    names = [k.name for k in c.conditions]
    assert judge(c, {n: [row(0.05, 0.3)] for n in names}) == lc.REPRODUCED
    assert judge(c, {names[0]: [row(0.05, 0.3)], names[1]: [row(0.0, 0.3)], names[2]: [row(-0.3, -0.1)]}) == lc.PARTLY
    assert judge(c, {n: [row(-0.3, -0.01)] for n in names}) == lc.NOT_REPRODUCED


def hold_row(cond: lc.Condition) -> dict:
    """An interval just on the claim's side of the condition's threshold (0.01 to 0.05 beyond it)."""
    t = cond.threshold
    return row(t + 0.01, t + 0.05) if cond.bound == "lo" else row(t - 0.05, t - 0.01)


def fail_row(cond: lc.Condition) -> dict:
    """An interval wholly on the other side of the threshold."""
    t = cond.threshold
    return row(t - 0.05, t - 0.01) if cond.bound == "lo" else row(t + 0.01, t + 0.05)


@pytest.mark.parametrize("claim", lc.CLAIMS, ids=lambda c: c.id)
def test_every_claims_rule_on_hand_built_rows(claim: lc.Claim) -> None:
    conds = claim.conditions
    assert judge(claim, {c.name: [hold_row(c), hold_row(c)] for c in conds}) == lc.REPRODUCED
    some = [c.over == "some" for c in conds]  # one row holds and one fails: only an existential condition holds
    assert judge(claim, {c.name: [hold_row(c), fail_row(c)] for c in conds}) == (
        lc.REPRODUCED if all(some) else lc.PARTLY if any(some) else lc.NOT_REPRODUCED)
    assert judge(claim, {c.name: [fail_row(c)] for c in conds}) == lc.NOT_REPRODUCED
    if len(conds) > 1:
        assert judge(claim, {conds[0].name: [hold_row(conds[0])]}) == lc.PARTLY  # the others never measured
    assert judge(claim, {}) == lc.NOT_MEASURED
    assert claim.rule().startswith("reproduced if ") and all(c.text() in claim.rule() for c in conds)


# ---------------------------------------------------------------- an export of hand-built cells


def toy_records() -> list:
    """Victim v: U 0.8, ∅ 0.6 under TA. MergeGuard keeps 0.62 (recovered 0.1, removed 0.9), its stage 1 alone
    0.78 (removed 0.1), its stage 2 alone 0.70 (removed 0.5); PaRaMS's cells carry no gain (U = ∅ = 0.6)."""
    out = [baseline(pre=0.5, ft=0.9)]
    for defense, p in (("mergeguard", 0.62), ("mergeguard-stage1", 0.78), ("mergeguard-stage2", 0.70)):
        out += [utility_cell(defense, 0.9), *pipeline(defense, "none", "ta", p=p, u=0.8, z=0.6)]
    out += [utility_cell("params", 0.9), *pipeline("params", "none", "wa", p=0.6, u=0.6, z=0.6)]
    return unique(out)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("toy")
    export(toy_records(), out, attacks=["none"], n_bootstrap=200)
    return out, json.loads((out / lc.CLAIMS_FILE).read_text())


def suite_row(ledger: dict, claim: str, suite: str = SUITE) -> dict:
    return next(s for s in next(c for c in ledger["claims"] if c["id"] == claim)["suites"] if s["suite"] == suite)


def test_export_writes_the_ledger_and_lists_it(toy) -> None:
    out, ledger = toy
    manifest, _ = load_export(out)
    assert lc.CLAIMS_FILE in {f["path"] for f in manifest["files"]}
    assert ledger == json.loads(dumps(lc.build_claims(out)))  # what the export wrote is what the export gives
    assert ledger["suites"] == sorted({*lc.EMBEDDED, SUITE})


def test_gap_of_hand_built_cells(toy) -> None:
    """removed(mergeguard) − removed(stage k) = recovered(stage k) − recovered(mergeguard): 0.9 − 0.1 and 0.5 − 0.1."""
    _, ledger = toy
    s = suite_row(ledger, "mergeguard-stages")
    one, two = s["conditions"]
    assert [r["value"] for r in one["rows"]] == [pytest.approx(0.8)]
    assert [r["value"] for r in two["rows"]] == [pytest.approx(0.4)]
    assert one["ci"][0] > 0 and two["ci"][0] > 0 and (one["status"], two["status"]) == ("holds", "holds")
    assert s["verdict"] == lc.REPRODUCED and s["n_cells"] == 5  # 3 protected cells and the U and ∅ they share
    assert "--merge wa,ties,dare-ties" in s["commands"][0]  # the plain merges never run are named


def test_utility_and_removed_of_hand_built_cells(toy) -> None:
    _, ledger = toy
    s = suite_row(ledger, "mergeguard-headline")
    fidelity, collapse = s["conditions"]
    assert (fidelity["value"], fidelity["ci"]) == (1.0, [1.0, 1.0])  # 0.9 / 0.9 on the same examples
    assert collapse["value"] == pytest.approx(0.9) and collapse["at"] == "v / ta / none"
    assert s["verdict"] == lc.REPRODUCED


def test_missing_cells_are_not_measured_with_the_command_that_measures_them(toy) -> None:
    _, ledger = toy
    s = suite_row(ledger, "taylorattack-inverts")
    assert s["verdict"] == lc.NOT_MEASURED and s["n_cells"] == 0
    command = f"bench run --suite {SUITE} --defense taylormlp --attack taylor-invert --merge ta"
    assert s["commands"] == [command] and command in s["reason"]
    assert suite_row(ledger, "taylorattack-inverts", "text-mix")["verdict"] == lc.NOT_MEASURED


def test_a_claim_on_an_attack_the_protocol_omits_says_why_it_is_not_measured(toy) -> None:
    out, _ = toy
    _, entries = load_export(out)
    why = "under task arithmetic it returns the merge without the victim"
    for e in entries:
        e["config"] = {**e["config"], "protocol": {"omitted": {"unmask": why}}}
    doc = lc.claims_document(entries)
    s = suite_row(doc, "mergeguard-unmask")
    assert s["verdict"] == lc.NOT_MEASURED and f"the protocol omits unmask: {why}" in s["reason"]
    assert s["conditions"][0]["note"] == f"the protocol omits unmask: {why}"
    # the adaptive-margin claim reads unmask and graderase: only its unmask condition carries the reason
    margin = suite_row(doc, "mergeguard-adaptive-margin")
    unmask, graderase = margin["conditions"]
    assert why in unmask["note"] and why not in graderase["note"]
    # without the protocol's word, a missing cell is just missing
    assert suite_row(lc.claims_document(load_export(out)[1]), "mergeguard-unmask")["conditions"][0]["note"] == ""


def test_a_pair_without_gain_or_a_defense_that_cannot_act_is_not_testable(toy) -> None:
    out, ledger = toy
    s = suite_row(ledger, "params-disrupts")  # PaRaMS's only pair has U = ∅: the victim adds nothing
    assert s["verdict"] == lc.NOT_TESTABLE and "no significant merge gain on v / wa" in s["reason"]
    _, entries = load_export(out)
    na = [{"suite": SUITE, "defense": "taylormlp", "reason": "needs mlp"}]
    doc = lc.claims_document(entries, na)
    s = suite_row(doc, "taylorattack-inverts")
    assert s["verdict"] == lc.NOT_TESTABLE and "needs mlp" in s["reason"]
    assert suite_row(doc, "mergeguard-gsm8k")["verdict"] == lc.NOT_TESTABLE  # a claim about 7B-13B LLMs


# ---------------------------------------------------------------- the shipped ledger, re-checked by hand


@pytest.fixture(scope="module")
def shipped() -> tuple[dict, dict]:
    _manifest, entries = load_export(SHIPPED, older=True)
    return lc.build_claims(SHIPPED), {(e["suite"], e["defense"]): e for e in entries}


def holds(ci: list[float], op: str, t: float) -> bool:
    return {">=": ci[0] >= t, ">": ci[0] > t, "<=": ci[1] <= t, "<": ci[1] < t}[op]


def fails(ci: list[float], op: str, t: float) -> bool:
    return {">=": ci[1] < t, ">": ci[1] <= t, "<=": ci[0] > t, "<": ci[0] >= t}[op]


def recheck(cond: dict, res: dict) -> str:
    """The condition's status from its own rows, by the rule the claim states, written again here."""
    if res["status"] == "n/a":
        return "n/a"
    rows = [{"ci": res["ci"]}] if cond["over"] == "mean" and res["rows"] else res["rows"]
    if not rows:
        return res["status"]  # missing or uninformative: checked against the export below
    ok = [holds(r["ci"], cond["op"], cond["threshold"]) for r in rows]
    bad = [fails(r["ci"], cond["op"], cond["threshold"]) for r in rows]
    if cond["over"] == "some":
        return "holds" if any(ok) else "fails" if all(bad) else "undecided"
    if any(bad):
        return "fails"
    if all(ok):
        return "incomplete" if cond["over"] == "every" and res["commands"] else "holds"
    return "undecided"


def victim(entries: dict, suite: str, defense: str, name: str) -> dict:
    return next(v for v in entries[(suite, defense)]["victims"] if v["victim"] == name)


def pair(entries: dict, suite: str, defense: str, name: str, attack: str, merge: str) -> dict:
    return next(p for p in victim(entries, suite, defense, name)["recovered"] if (p["attack"], p["merge"]) == (attack, merge))


def replicates(entries: dict, suite: str, defense: str, name: str, attack: str, merge: str) -> int:
    """How many replicates an exported pair rests on: the victim's worst pair has the victim's replicates, every
    other pair seed 0 alone."""
    v = victim(entries, suite, defense, name)
    return len(v["replicates"]) if (attack, merge) == (v["best_attack"], v["best_merge"]) else 1


def informative(entries: dict, suite: str, cond: dict) -> list[dict]:
    """The exported pairs a recovered / removed condition may read (listed attacks and merges, with a value)."""
    return [p for v in (entries[(suite, cond["defense"])]["victims"] if (suite, cond["defense"]) in entries else [])
            for p in v["recovered"] if p["attack"] in cond["attacks"] and p["merge"] in cond["merges"]
            and p["recovered"] is not None]


def test_shipped_rows_are_the_exported_numbers(shipped) -> None:
    """Every row is read from the export: utility and recovered with their intervals, the attacker's best listed
    attack, and a gap's point equal to the difference of the two exported recovered fractions."""
    ledger, entries = shipped
    checked = 0
    for claim in ledger["claims"]:
        for s in claim["suites"]:
            for cond, res in zip(claim["conditions"], s["conditions"]):
                for r in res["rows"]:
                    checked += 1
                    if cond["kind"] == "utility":
                        v = victim(entries, s["suite"], cond["defense"], r["victim"])
                        assert (r["value"], r["ci"]) == (v["utility"], v["utility_ci"])
                        continue
                    mine = pair(entries, s["suite"], cond["defense"], r["victim"], r["attack"], r["merge"])
                    if cond["kind"] == "gap":
                        theirs = pair(entries, s["suite"], cond["versus"], r["victim"], r["versus_attack"], r["merge"])
                        seeds = {replicates(entries, s["suite"], d, r["victim"], a, r["merge"])
                                 for d, a in ((cond["defense"], r["attack"]), (cond["versus"], r["versus_attack"]))}
                        if len(seeds) == 1:  # both pairs on the same replicates: the difference of the exported values
                            assert r["value"] == pytest.approx(theirs["recovered"] - mine["recovered"], abs=1e-5)
                        else:  # read on the replicates both share (seed 0), which the export does not list per pair
                            assert r["ci"][0] <= r["value"] <= r["ci"][1]
                        continue
                    listed = [p["recovered"] for p in victim(entries, s["suite"], cond["defense"], r["victim"])["recovered"]
                              if p["attack"] in cond["attacks"] and p["merge"] == r["merge"] and p["recovered"] is not None]
                    assert mine["recovered"] == max(listed)  # the attacker's pick among the listed attacks
                    lo, hi = mine["recovered_ci"]
                    expected = (mine["recovered"], [lo, hi]) if cond["kind"] == "recovered" else (
                        pytest.approx(1 - mine["recovered"]), [pytest.approx(1 - hi), pytest.approx(1 - lo)])
                    assert (r["value"], r["ci"]) == expected
                    assert r["cells"], "every row names the cells it rests on"
    assert checked > 50  # vision-effnet alone: 67 rows


def test_shipped_verdicts_agree_with_their_own_numbers(shipped) -> None:
    """Re-apply every claim's thresholds to the rows it reports: a verdict that disagrees with its numbers fails."""
    ledger, entries = shipped
    for claim in ledger["claims"]:
        assert claim["verdict"] in lc.VERDICTS
        for s in claim["suites"]:
            if claim["scale"] and s["suite"] not in claim["scale"]["suites"]:
                assert s["verdict"] == lc.NOT_TESTABLE and not s["conditions"]
                continue
            statuses = []
            for cond, res in zip(claim["conditions"], s["conditions"]):
                status = recheck(cond, res)
                assert status == res["status"], (claim["id"], s["suite"], cond["name"])
                if status in ("missing", "uninformative") and cond["kind"] in ("recovered", "removed"):
                    assert not informative(entries, s["suite"], cond), (claim["id"], s["suite"], cond["name"])
                statuses.append(status)
            applicable = [x for x in statuses if x != "n/a"]
            measured = [x for x in applicable if x in ("holds", "fails", "undecided", "incomplete")]
            if not measured:
                expected = lc.NOT_MEASURED if "missing" in applicable else lc.NOT_TESTABLE
            elif all(x == "holds" for x in applicable):
                expected = lc.REPRODUCED
            elif any(x in ("holds", "incomplete") for x in measured):
                expected = lc.PARTLY
            else:
                expected = lc.NOT_REPRODUCED
            assert s["verdict"] == expected, (claim["id"], s["suite"])
            if expected == lc.NOT_MEASURED:
                assert s["commands"] and all(c.startswith(f"bench run --suite {s['suite']} ") for c in s["commands"])
        suites = [s["verdict"] for s in claim["suites"]]
        assert claim["verdict"] == lc.claim_verdict(suites)


def test_shipped_ledger_is_the_written_one_and_deterministic(shipped) -> None:
    ledger, _ = shipped
    assert dumps(lc.build_claims(SHIPPED)) == dumps(ledger)
    written = SHIPPED / lc.CLAIMS_FILE
    assert written.is_file(), "run `python -m leaderboard.claims` after changing the claims or the data"
    assert json.loads(written.read_text()) == json.loads(dumps(ledger))


# ---------------------------------------------------------------- passages and page


def normalise(text: str) -> str:
    """The paper texts carry LaTeX residue after numbers ('20%20\\%', '75.775.7%'): keep one copy."""
    text = re.sub(r"\b(\d+(?:\.\d+)?)%\1\\%", r"\1%", text)
    text = re.sub(r"\b(\d+\.\d+)\1%", r"\1%", text)
    return re.sub(r"\s+", " ", text)


@pytest.mark.skipif(not SHARED.is_dir(), reason="the papers are in /work/shared")
@pytest.mark.parametrize("claim", lc.CLAIMS, ids=lambda c: c.id)
def test_passages_are_quoted_verbatim(claim: lc.Claim) -> None:
    source = normalise((SHARED / claim.source).read_text(encoding="utf-8"))
    at = 0
    for part in claim.passage.split("…"):
        part = normalise(part).strip()
        found = source.find(part, at)
        assert found >= 0, f"{claim.id}: {part!r} is not in {claim.source}"
        at = found + len(part)


def test_claims_page_lists_every_claim_with_its_verdicts(tmp_path: Path) -> None:
    from leaderboard.site import build_site

    index = build_site(SHIPPED, tmp_path / "site")
    html = (tmp_path / "site" / "claims.html").read_text()
    assert 'href="claims.html"' in index.read_text()
    ledger = json.loads((SHIPPED / lc.CLAIMS_FILE).read_text())
    for c in ledger["claims"]:
        assert f'id="claim-{c["id"]}" data-verdict="{c["verdict"]}"' in html
        assert str(escape(c["passage"])) in html and str(escape(c["reason"])) in html
        for s in c["suites"]:
            assert str(escape(s["reason"])) in html

"""The claims ledger: every quantitative claim of the papers we implement, checked against the exported numbers.

A `Claim` quotes one passage of a paper (MergeGuard arXiv 2511.11851, MergeBarrier arXiv 2511.10712, the PaRaMS
listing of arXiv 2503.07661, and the published attacks as quoted in ``research/defenses-attacks.md``) and states,
as data, the conditions under which our numbers reproduce it. Each `Condition` reads one `Measure` on the cells
of an export and compares one bound of each measured interval with a threshold stated in the claim:

* ``utility``: the victim's utility (artifact alone / expert) with the interval the export carries;
* ``recovered``: the recovered fraction of a (victim, merge) under the attacker's best listed attack, with the
  export's interval: 0 = the merge is no better on the victim's task than a merge without the victim (V_∅),
  1 = as good as merging the unprotected expert (V_U);
* ``removed`` = 1 − recovered: the share of the victim's contribution to the merge the defense takes away
  (the papers' "merged accuracy drop", read against V_∅ rather than against chance, so it does not depend on
  how many classes a task has or on what the partners already give);
* ``gap``: removed(defense) − removed(versus) on the same victim and merge, an interval from a paired bootstrap
  of the per-example outcomes of both protected cells and their references (`bench.scoring.bootstrap`).

A measured interval *holds* when it lies entirely on the claim's side of the threshold, *fails* when it lies
entirely on the other side, and is *undecided* otherwise. A condition quantifies over rows: ``every`` (all hold;
one failing row fails it), ``some`` (one row holds) or ``mean`` (the interval of the mean over rows). Verdict
per suite (`suite_verdict`): ``reproduced`` when every applicable condition holds, ``partly`` when at least one
does, ``not reproduced`` when none does; ``not measured`` when none of its cells is in the export (each suite
row then names the ``bench run`` command that measures it), ``not testable at this scale`` when the claim is
about models or tasks no embedded suite has, the defense cannot act on the suite's architecture, or the cells
exist but the victim adds nothing significant to the merge. A condition over ``every`` row that holds on the
merges measured but lacks one the claim lists counts as *incomplete* (at most ``partly``).

Numbers are read from an export only (`build_claims`), never typed in: `write_claims` writes ``claims.json``
next to the manifest, and `leaderboard.export.export` writes it with every export. Run it on the shipped data
with ``python -m leaderboard.claims [--from DIR] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bench.outcomes import OutcomeError, decode
from bench.plan import reference_ids
from bench.scoring import CI_LEVEL, N_BOOTSTRAP
from bench.scoring.bootstrap import PairOutcomes, bootstrap_counts, pair_statistics, percentile_ci, stable_rng

REPRODUCED, PARTLY, NOT_REPRODUCED = "reproduced", "partly", "not reproduced"
NOT_TESTABLE, NOT_MEASURED = "not testable at this scale", "not measured"
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_TESTABLE, NOT_MEASURED)
EMBEDDED = ("text-minilm", "text-mix", "vision-effnet")
"""Suites every ledger reports on (with any other suite the export holds)."""
CLAIMS_FILE = "claims.json"
CLAIMS_VERSION = 1
SHIPPED = Path(__file__).resolve().parent / "data"
"""The shipped export (`leaderboard.export.SHIPPED`; named here because the export imports this module)."""
DIGITS = 6
"""Rounding of every number written, as the export rounds its own (`leaderboard.export.DIGITS`)."""
PLAIN = ("wa", "ta", "ties", "dare-ties")
"""The merges of the standard protocol's first group (plain merges, no attack)."""

Kind = Literal["utility", "recovered", "removed", "gap"]
Op = Literal[">=", ">", "<=", "<"]
Over = Literal["every", "some", "mean"]
Status = Literal["holds", "fails", "undecided", "incomplete", "missing", "uninformative", "n/a"]


# ---------------------------------------------------------------- claims as data


@dataclass(frozen=True)
class Measure:
    """What a condition reads: a quantity of ``defense`` under the best of ``attacks`` per (victim, merge)."""

    kind: Kind
    defense: str
    attacks: tuple[str, ...] = ("none",)
    merges: tuple[str, ...] = ("ta",)
    versus: str = ""
    """``gap`` only: the defense compared with (removed(defense) − removed(versus))."""
    versus_attacks: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "utility":
            return f"utility of {self.defense}"
        under = f"{' or '.join(self.attacks)} / {', '.join(self.merges)}"
        if self.kind == "gap":
            theirs = " or ".join(self.versus_attacks or self.attacks)
            return f"removed by {self.defense} ({under}) minus removed by {self.versus} ({theirs})"
        return f"{self.kind} of {self.defense} under {under}"

    def command(self, suite: str, merges: Sequence[str] = ()) -> str:
        """The ``bench run`` that stores the cells this measure reads on ``suite`` (under ``merges``: default all)."""
        defenses = ",".join(d for d in (self.defense, self.versus) if d)
        if self.kind == "utility":
            return f"bench run --suite {suite} --defense {defenses} --attack none --merge ta"
        attacks = ",".join(dict.fromkeys((*self.attacks, *self.versus_attacks)))
        return f"bench run --suite {suite} --defense {defenses} --attack {attacks} --merge {','.join(merges or self.merges)}"


@dataclass(frozen=True)
class Condition:
    """One testable part of a claim: ``bound(measure) op threshold`` on every / some row, or on their mean."""

    name: str
    measure: Measure
    op: Op
    threshold: float
    over: Over
    why: str
    """Where the threshold comes from (the passage or table it rests on)."""

    @property
    def bound(self) -> Literal["lo", "hi"]:
        """The end of the interval that must clear the threshold: the lower one for ≥ and >, else the upper."""
        return "lo" if self.op in (">=", ">") else "hi"

    def text(self) -> str:
        unit = "victim" if self.measure.kind == "utility" else "victim and merge"
        where = {"every": f"on every {unit}", "some": f"on some {unit}",
                 "mean": "on the mean over victims and merges"}[self.over]
        bound = "lower" if self.bound == "lo" else "upper"
        return f"{self.measure.describe()}: {bound} bound {self.op} {self.threshold:g} {where}"


@dataclass(frozen=True)
class Claim:
    """One quantitative claim: the passage, where it is, what we measure, and the conditions of its verdict."""

    id: str
    paper: str
    source: str
    """The file under ``/work/shared`` the passage is quoted from (``…`` marks elided text)."""
    where: str
    passage: str
    measures: str
    conditions: tuple[Condition, ...]
    suites: tuple[str, ...] = ()
    """When set, the only suites whose models and tasks the claim is about."""
    scale: str = ""
    """Why the claim cannot be tested on the other suites."""

    def rule(self) -> str:
        """The verdict rule in words, written from the conditions themselves (so text and code cannot differ)."""
        if len(self.conditions) == 1:
            return f"reproduced if {self.conditions[0].text()}; not reproduced otherwise"
        return ("reproduced if " + " and ".join(c.text() for c in self.conditions)
                + "; partly if some of these hold; not reproduced if none does")


MG = "Chen et al., Defending Unauthorized Model Merging via Dual-Stage Weight Protection (MergeGuard), arXiv 2511.11851"
MB = ("Li et al., Do Not Merge My Model! Safeguarding Open-Source LLMs Against Unauthorized Model Merging "
      "(MergeBarrier), AAAI 2026, arXiv 2511.10712")
PR = "Wei, Yu, Sakuma, Disrupting Model Merging: A Parameter-Level Defense Without Sacrificing Accuracy (PaRaMS), ICCV 2025"
AGA = "Guo et al., On the Vulnerability of Parameter-Level Defenses to Model Merging (AGA), ECCV 2026, arXiv 2606.30360"
TA_ = "TaylorAttack, Towards Provable (In)Security of Model Protection via Taylor Expansion (vegetable-yx/TaylorAttack)"
MG_SRC, MB_SRC = "papers/mergeguard-2511.11851.txt", "papers/mergebarrier-2511.10712.txt"
PR_SRC, NOTES = "papers/params-2503.07661-listing.txt", "research/defenses-attacks.md"

FIDELITY = 0.985
"""Utility lower bound of a "negligible" loss: MergeGuard's "less than 1.5%" (abstract), which is also the worst
relative loss of MergeBarrier's Table 3 (WizardMath 58.76 → 57.88)."""
SUPPRESSED = 0.3
"""Recovered upper bound of a suppressed merge: MergeBarrier's worst protected Table 2 cell keeps 29% of the
unprotected accuracy (DARE-TIES, three models, MBPP 7.50 vs 25.60)."""
BYPASSED = 0.75
"""Recovered lower bound of a defense that "fails to protect": MergeBarrier's Table 2 ratios put PaRaMS at
8.15/8.27 = 0.99 and TaylorMLP at 7.17/8.27 = 0.87 of the unprotected merge."""
UNDONE = 0.9
"""Recovered lower bound of a protection fully undone: the standard protocol's break threshold."""


def _gap(defense: str, versus: str, merges: tuple[str, ...], attacks: tuple[str, ...] = ("none",),
         versus_attacks: tuple[str, ...] = ()) -> Measure:
    return Measure("gap", defense, attacks, merges, versus, versus_attacks)


CLAIMS: tuple[Claim, ...] = (
    Claim("mergeguard-headline", MG, MG_SRC, "Abstract",
          "MergeGuard reduces merged model accuracy by up to 90% with less than 1.5% performance loss on the "
          "protected model.",
          "Utility of each victim's MergeGuard artifact, and the share of the victim's contribution a plain merge "
          "loses (removed). The paper's 90% is its best cell (MNIST, TA: 98.9 → 11.35); its Table 5 average is "
          "84.47 → 40.26, a 52% drop.",
          (Condition("fidelity", Measure("utility", "mergeguard"), ">=", FIDELITY, "every",
                     "less than 1.5% performance loss"),
           Condition("collapse", Measure("removed", "mergeguard", ("none",), (*PLAIN, "adamerging-layer")), ">=",
                     0.5, "some", "a drop of at least half, as Table 5's 52% average; 90% is the paper's maximum"))),
    Claim("mergeguard-every-merge", MG, MG_SRC, "§6.2.1, Table 2",
          "Across all evaluated merging paradigms, MergeGuard consistently enforces significant degradation on the "
          "merged models while preserving the original model’s performance.",
          "Removed share under each merge the paper evaluates (WA, TA, TIES, AdaMerging); significant = the "
          "interval excludes 0.",
          (Condition("every merge degrades", Measure("removed", "mergeguard", ("none",),
                                                      ("wa", "ta", "ties", "adamerging-layer")),
                     ">", 0.0, "every", "significant degradation under every merging paradigm"),)),
    Claim("mergeguard-stages", MG, MG_SRC, "§6.3, Table 4",
          "We observe that although the standalone stages cause a similar minor accuracy drop before merging, their "
          "combination (Stage 1 + 2) leads to a much larger degradation in the merged model’s accuracy.",
          "Paired difference of the removed share between MergeGuard (stages 1+2) and each stage alone, on the "
          "same victims and plain merges.",
          (Condition("beats stage 1", _gap("mergeguard", "mergeguard-stage1", PLAIN), ">", 0.0, "mean",
                     "stages 1+2 degrade the merge more than stage 1 alone"),
           Condition("beats stage 2", _gap("mergeguard", "mergeguard-stage2", PLAIN), ">", 0.0, "mean",
                     "stages 1+2 degrade the merge more than stage 2 alone"))),
    Claim("mergeguard-vs-params", MG, MG_SRC, "§6.2.1, Table 3",
          "MergeGuard consistently enforces stronger degradation on the merged models while maintaining "
          "near-original accuracy on the protected model.",
          "Paired difference of the removed share between MergeGuard and PaRaMS under task arithmetic (Table 3: "
          "average drop 52.11 for MergeGuard against 30.76 for PaRaMS).",
          (Condition("stronger than PaRaMS", _gap("mergeguard", "params", ("ta",)), ">", 0.0, "mean",
                     "MergeGuard's average drop exceeds PaRaMS's"),)),
    Claim("mergeguard-unmask", MG, MG_SRC, "§7, Table 5",
          "For Unmask, although subtracting the protected model’s parameters can partially neutralize MergeGuard’s "
          "perturbations, it concurrently removes essential task-specific information, causing the merged model’s "
          "performance on … to regress to the pretrained level",
          "Recovered fraction under Unmask: 0 is the merge with θ_pre in the victim's slot, the pretrained level "
          "of the victim's task inside the merge. Our Unmask subtracts λ(θ̂_def − θ_pre) with the merge's own λ, "
          "so under TA it returns that merge exactly: the claim holds by construction wherever it runs.",
          (Condition("regresses to pretrained", Measure("recovered", "mergeguard", ("unmask",)), "<=", 0.1, "every",
                     "at the pretrained level: within 0.1 of the merge without the victim"),)),
    Claim("mergeguard-graderase", MG, MG_SRC, "§7, Table 5",
          "However, as the estimation of … is inherently noisy and incomplete, this attack fails to fully restore "
          "merging compatibility.",
          "Recovered fraction under GradErase, read against merge-finetune on the unprotected expert (its honest "
          "counterpart, the same labelled data).",
          (Condition("not fully restored", Measure("recovered", "mergeguard", ("graderase",)), "<", 1.0, "every",
                     "fails to fully restore"),)),
    Claim("mergeguard-adaptive-margin", MG, MG_SRC, "§7",
          "Although adaptive attacks such as Unmask and GradErase can partially recover performance to 64.64% and "
          "51.77% respectively, MergeGuard consistently maintains a substantial degradation margin of at least 20% "
          "across all tasks.",
          "Removed share under each adaptive attack (the margin, as a share of the victim's contribution; under "
          "Unmask it is 1 by construction, see mergeguard-unmask).",
          (Condition("margin under Unmask", Measure("removed", "mergeguard", ("unmask",)), ">=", 0.2, "every",
                     "a degradation margin of at least 20%"),
           Condition("margin under GradErase", Measure("removed", "mergeguard", ("graderase",)), ">=", 0.2, "every",
                     "a degradation margin of at least 20%"))),
    Claim("mergeguard-gsm8k", MG, MG_SRC, "§6.2.3, Figure 4",
          "Notably, on the GSM8K mathematical reasoning benchmark, merged models become virtually nonfunctional, "
          "frequently skipping reasoning steps or making elementary calculation errors, with accuracy often "
          "plunging to single digits (e.g., Mistral with TA drops from 75.7% to 0%).",
          "Removed share of a MergeGuard-protected LLM expert under plain merges.",
          (Condition("near-total collapse", Measure("removed", "mergeguard", ("none",), ("ta", "ties", "dare-ties")),
                     ">=", UNDONE, "some", "accuracy plunging to single digits"),),
          suites=("llama2-13b-experts",),
          scale="about generative 7B-13B language models on GSM8K; the embedded suites are classifiers of at most "
                "23M parameters, so only the llama2-13b-experts suite (GPU) can test it"),
    Claim("mergebarrier-utility", MB, MB_SRC, "Abstract; §4.4, Table 3",
          "Extensive experiments show that MergeBarrier effectively prevents model merging stealing with negligible "
          "accuracy loss.",
          "Utility of each victim's MergeBarrier artifact (attention projection exact, FFN Taylor-approximated).",
          (Condition("negligible loss", Measure("utility", "mergebarrier"), ">=", FIDELITY, "every",
                     "Table 3's worst loss is 1.5% (WizardMath 58.76 → 57.88)"),)),
    Claim("mergebarrier-suppression", MB, MB_SRC, "§4.2, Table 2",
          "MergeBarrier achieves the lowest score (1.00×), indicating near-complete suppression of merging-based "
          "theft.",
          "Recovered fraction when the attacker reverts the modified layers to θ_pre before merging (§4.1: "
          "\"attackers revert modified layers to the base model’s original weights before merging\"), under TA, "
          "TIES and DARE.",
          (Condition("suppressed", Measure("recovered", "mergebarrier", ("revert-to-base",), ("ta", "ties", "dare-ties")),
                     "<=", SUPPRESSED, "every", "the worst protected Table 2 cell keeps 29% of the unprotected one"),)),
    Claim("mergebarrier-ablation", MB, MB_SRC, "§4.5, Table 4",
          "individually protecting either the attention or FFN module provides only limited defense against model "
          "merging attacks. Specifically, the full MergeBarrier achieves the lowest relative mean accuracy for the "
          "merged model (1.00 \\times), while the attention-only and FFN-only variants reach 3.79 \\times and "
          "7.19 \\times , respectively.",
          "Paired differences of the removed share: full MergeBarrier (layers reverted) against the attention-only "
          "variant (merged as released or reverted) and the FFN-only variant (reverted), and attention-only against "
          "FFN-only.",
          (Condition("full beats attention-only",
                     _gap("mergebarrier", "mergebarrier-att", ("ta", "ties", "dare-ties"), ("revert-to-base",),
                          ("none", "revert-to-base")), ">", 0.0, "mean", "1.00× against 3.79×"),
           Condition("full beats FFN-only",
                     _gap("mergebarrier", "mergebarrier-ffn", ("ta", "ties", "dare-ties"), ("revert-to-base",),
                          ("revert-to-base", "revert-ffn")), ">", 0.0, "mean", "1.00× against 7.19×"),
           Condition("attention-only beats FFN-only",
                     _gap("mergebarrier-att", "mergebarrier-ffn", ("ta", "ties", "dare-ties"), ("none", "revert-to-base"),
                          ("revert-to-base", "revert-ffn")), ">", 0.0, "mean", "3.79× against 7.19×"))),
    Claim("mergebarrier-finetune", MB, MB_SRC, "§4.2, Figure 2",
          "As shown in Figure 2, MergeBarrier remains highly robust: even with more labeled data, the merged model’s "
          "performance improves only slightly. In contrast, TaylorMLP is easily compromised: minor fine-tuning "
          "significantly improves task performance.",
          "Recovered fraction when the reverted merge is fine-tuned on the attacker's labelled victim samples, read "
          "against fine-tuning the unprotected merge with the same samples.",
          (Condition("MergeBarrier robust", Measure("recovered", "mergebarrier", ("revert-to-base+merge-finetune",)),
                     "<=", 0.5, "every", "improves only slightly: less than half of the contribution comes back"),
           Condition("TaylorMLP compromised", Measure("recovered", "taylormlp", ("revert-to-base+merge-finetune",)),
                     ">=", 0.5, "every", "easily compromised: at least half comes back"))),
    Claim("mergebarrier-inversion", MB, MB_SRC, "§1",
          "Interestingly, our analysis reveals that this error can serve as a built-in safeguard by reducing weight "
          "inversion to an Learning With Errors (LWE) problem (Regev 2009), i.e., a NP-hard problem, which makes "
          "such attacks computationally infeasible.",
          "Recovered fraction after Taylor inversion (the coefficient-ratio attack of TaylorAttack) of the FFN-only "
          "release, and of the full release with its attention then aligned to θ_pre.",
          (Condition("FFN inversion fails", Measure("recovered", "mergebarrier-ffn", ("taylor-invert",)), "<=",
                     SUPPRESSED, "every", "inversion is infeasible: the merge stays suppressed"),
           Condition("full inversion fails",
                     Measure("recovered", "mergebarrier", ("taylor-invert", "taylor-invert+anchor-align",
                                                           "taylor-invert+realign+scale-division")),
                     "<=", SUPPRESSED, "every", "inversion is infeasible: the merge stays suppressed"))),
    Claim("mergebarrier-baselines-fail", MB, MB_SRC, "§4.2, Table 2",
          "In contrast, PaRaMS and TaylorMLP fail to provide effective protection, with the merged models retaining "
          "up to 31.10% and 30.80% MBPP accuracy, and significantly higher average scores of 8.15× and 7.17×, "
          "respectively.",
          "Recovered fraction of PaRaMS decoded with θ_pre (appendix D: permutation re-alignment and scale division) "
          "and of TaylorMLP with its modified layers reverted.",
          (Condition("PaRaMS decoded", Measure("recovered", "params", ("realign+scale-division",)), ">=", BYPASSED,
                     "every", "PaRaMS keeps 8.15/8.27 of the unprotected average"),
           Condition("TaylorMLP reverted", Measure("recovered", "taylormlp", ("revert-to-base",)), ">=", BYPASSED,
                     "every", "TaylorMLP keeps 7.17/8.27 of the unprotected average"))),
    Claim("realign-undoes-params", MB, MB_SRC, "§2; appendix D",
          "permutation can be reversed via weight alignment (Zhang et al. 2023), and scaling can be undone by "
          "dividing with base model parameters (see Appendix D).",
          "Recovered fraction of PaRaMS after permutation re-alignment to θ_pre (Git Re-Basin weight matching), alone "
          "or followed by scale division, whichever recovers more (on a CNN PaRaMS only permutes, so re-alignment "
          "alone is the whole attack, and the protocol stops before the composite once it breaks).",
          (Condition("undone", Measure("recovered", "params", ("realign", "realign+scale-division")), ">=", UNDONE, "every",
                     "reversed and undone: the protocol's break threshold"),)),
    Claim("aga-bypasses-linear", AGA, NOTES, "Abstract (quoted in research/defenses-attacks.md §8.4)",
          "consistently bypasses both individual and composite defenses",
          "Recovered fraction under the anchor-guided attack (coupled or the public code's independent solve, "
          "whichever recovers more) against the linear, function-preserving defenses.",
          tuple(Condition(f"bypasses {d}", Measure("recovered", d, ("anchor-align", "anchor-align-indep")), ">=",
                          BYPASSED, "every", "bypassed: the attacker gets most of the contribution back")
                for d in ("params", "mergelock", "mergebarrier-att"))),
    Claim("params-function", PR, PR_SRC, "Abstract",
          "our defense method modifies the model parameters so that the model is disrupted if the model is merged "
          "with any other model, while its functionality is kept unchanged if not merged with others.",
          "Utility of the PaRaMS artifact (an exact reparameterisation: 1 up to float rounding).",
          (Condition("unchanged", Measure("utility", "params"), ">=", 0.995, "every",
                     "kept unchanged: within float rounding of the expert"),)),
    Claim("params-disrupts", PR, PR_SRC, "Abstract",
          "We conduct extensive experiments on image classification, image generation, and text classification to "
          "demonstrate that our defense severely disrupts merging while retaining the functionality of the "
          "post-protect model.",
          "Recovered fraction of the PaRaMS artifact merged as released, under every plain merge.",
          (Condition("severely disrupted", Measure("recovered", "params", ("none",), PLAIN), "<=", SUPPRESSED,
                     "every", "severely disrupts merging"),)),
    Claim("params-dropout-robust", PR, PR_SRC, "Abstract",
          "Moreover, we analyze potential adaptive attacks and further propose a dropout-based pruning to improve "
          "our proposal's robustness.",
          "Paired difference of the removed share between PaRaMS with dropout-based pruning and plain PaRaMS, each "
          "under the adaptive attack that recovers most of it (re-alignment with scale division, scale division, "
          "anchor-guided alignment).",
          (Condition("more robust", _gap("params+dropout", "params", ("ta",),
                                         ("realign+scale-division", "scale-division", "anchor-align",
                                          "anchor-align-indep")),
                     ">", 0.0, "mean", "improves robustness against adaptive attacks"),)),
    Claim("taylormlp-function", MB, MB_SRC, "§1 (on TaylorMLP, Wang et al., EMNLP 2024)",
          "In contrast, TaylorMLP (Wang et al. 2024) preserves performance by applying Taylor expansion",
          "Utility of the TaylorMLP artifact (order-6 Taylor series of 70% of the FFN neurons).",
          (Condition("preserved", Measure("utility", "taylormlp"), ">=", FIDELITY, "every",
                     "preserves performance, as negligible as MergeBarrier's Table 3"),)),
    Claim("taylorattack-inverts", TA_, NOTES, "Results tables (quoted in research/defenses-attacks.md §0)",
          "recovers 100.00% of the protected parameters of Llama-3-8B-Instruct in 106 s",
          "Recovered fraction after Taylor inversion of the TaylorMLP release, then task arithmetic.",
          (Condition("inverted", Measure("recovered", "taylormlp", ("taylor-invert",)), ">=", UNDONE, "every",
                     "100% of the parameters recovered: the protection is undone"),)),
)


# ---------------------------------------------------------------- reading an export


Cell = dict[str, Any]
"""A cell as an entry publishes it (`leaderboard.export`: spec, provenance, metrics with per-example outcomes)."""


@dataclass
class Source:
    """What the ledger reads of an export: its entries, the cells they publish, and the N/A (suite, defense) pairs."""

    entries: dict[tuple[str, str], dict[str, Any]]
    cells: dict[str, Cell]
    not_applicable: dict[tuple[str, str], str]
    n_bootstrap: int = N_BOOTSTRAP
    ci_level: float = CI_LEVEL
    omitted: dict[str, str] = field(default_factory=dict)
    """Attacks the export's protocol leaves out on purpose, with its reason (`bench.protocol.Protocol.omitted`):
    a condition that reads only such attacks is not measured *because of that reason*, which the row says."""

    def __post_init__(self) -> None:
        self._protected: dict[tuple[str, ...], list[Cell]] = defaultdict(list)
        for c in sorted(self.cells.values(), key=lambda c: (str(c.get("date")), c["cell_id"])):
            if c["kind"] == "merge" and c["filling"] == "protected" and c["status"] == "ok":
                self._protected[(c["suite"], c["defense"], c["victim"], c["attack"], c["merge"])].append(c)

    @classmethod
    def of(cls, entries: Sequence[dict[str, Any]], not_applicable: Iterable[dict[str, Any]] = ()) -> Source:
        config = entries[0].get("config", {}) if entries else {}
        return cls({(e["suite"], e["defense"]): e for e in entries},
                   {c["cell_id"]: c for e in entries for c in e.get("cells", [])},
                   {(n["suite"], n["defense"]): n["reason"] for n in not_applicable},
                   int(config.get("n_bootstrap", N_BOOTSTRAP)), float(config.get("ci_level", CI_LEVEL)),
                   dict((config.get("protocol") or {}).get("omitted") or {}))

    def victims(self, suite: str, defense: str) -> list[dict[str, Any]]:
        entry = self.entries.get((suite, defense))
        return list(entry["victims"]) if entry else []

    def protected(self, suite: str, defense: str, victim: str, attack: str, merge: str) -> list[Cell]:
        """The ok protected cells of a pair, one per replicate (partners, seed), the newest where repeated."""
        newest = {(tuple(c["partners"]), c["seed"]): c for c in self._protected[(suite, defense, victim, attack, merge)]}
        return [newest[k] for k in sorted(newest)]

    def reference(self, protected: Cell, filling: Literal["unprotected", "counterfactual"]) -> Cell | None:
        """The published U or ∅ cell a protected cell is read against (`bench.plan.reference_ids`)."""
        return next((self.cells[i] for i in reference_ids(protected["spec"], filling) if i in self.cells), None)

    def pair_cells(self, suite: str, defense: str, victim: str, attack: str, merge: str) -> list[str]:
        """Ids of the protected cells of a pair and of the references they are read against."""
        ids: set[str] = set()
        for p in self.protected(suite, defense, victim, attack, merge):
            ids.add(p["cell_id"])
            ids.update(r["cell_id"] for f in ("unprotected", "counterfactual") if (r := self.reference(p, f)) is not None)
        return sorted(ids)

    def utility_cells(self, suite: str, defense: str, victim: str) -> list[str]:
        """Ids of the utility cells of a defense on a victim and of the victim's baseline (its expert)."""
        return sorted(c["cell_id"] for c in self.cells.values() if (c["suite"], c["victim"], c["status"]) ==
                      (suite, victim, "ok") and ((c["kind"], c["defense"]) == ("utility", defense) or c["kind"] == "baseline"))


def outcomes_of(cell: Cell, victim: str, metric: str, higher_is_better: bool) -> np.ndarray | None:
    """The per-example outcomes of a merged cell on the victim's task, sign-adjusted so larger is better
    (its single value where the suite stored none, as `bench.scoring.cells.examples` reads them)."""
    for m in cell["metrics"]:
        if (m["role"], m["task"], m["metric"]) != ("merged", victim, metric) or m["value"] is None:
            continue
        s = 1.0 if higher_is_better else -1.0
        if not m.get("examples"):
            return np.array([s * float(m["value"])])
        try:
            return s * decode(m["examples"])
        except OutcomeError:
            return None
    return None


def _rnd(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), DIGITS) + 0.0  # + 0.0 turns -0.0 into 0.0


def _ci(ci: Sequence[float] | None) -> list[float] | None:
    return None if ci is None else [_rnd(ci[0]), _rnd(ci[1])]  # type: ignore[list-item]


# ---------------------------------------------------------------- rows


@dataclass
class Rows:
    """What a measure found on one suite: its rows, the merges it found cells for, uninformative pairs."""

    rows: list[dict[str, Any]]
    merges_seen: set[str]
    uninformative: list[str]


def _best(victim: dict[str, Any], attacks: Sequence[str], merge: str) -> tuple[dict[str, Any] | None, bool]:
    """The attacker's pick among ``attacks`` on one (victim, merge): the informative pair recovering most
    (ties: the first listed); and whether any listed pair was stored at all."""
    pairs = [p for p in victim["recovered"] if p["merge"] == merge and p["attack"] in attacks]
    scored = [p for p in pairs if p["recovered"] is not None]
    if not scored:
        return None, bool(pairs)
    return max(scored, key=lambda p: (p["recovered"], -attacks.index(p["attack"]))), True


def _pair_rows(src: Source, suite: str, m: Measure) -> Rows:
    out = Rows([], set(), [])
    for v in src.victims(suite, m.defense):
        for merge in m.merges:
            best, stored = _best(v, m.attacks, merge)
            if stored:
                out.merges_seen.add(merge)
            if best is None:
                if stored:
                    out.uninformative.append(f"{v['victim']} / {merge}")
                continue
            value, ci = best["recovered"], best["recovered_ci"]
            if m.kind == "removed":
                value, ci = 1.0 - value, (None if ci is None else [1.0 - ci[1], 1.0 - ci[0]])
            out.rows.append({"victim": v["victim"], "merge": merge, "attack": best["attack"], "value": _rnd(value),
                             "ci": _ci(ci), "cells": src.pair_cells(suite, m.defense, v["victim"], best["attack"], merge)})
    return out


def _utility_rows(src: Source, suite: str, m: Measure) -> Rows:
    out = Rows([], set(), [])
    for v in src.victims(suite, m.defense):
        out.merges_seen.update(m.merges)
        if v.get("utility") is None:
            out.uninformative.append(v["victim"])
            continue
        out.rows.append({"victim": v["victim"], "merge": "", "attack": "", "value": _rnd(v["utility"]),
                         "ci": _ci(v.get("utility_ci")), "cells": src.utility_cells(suite, m.defense, v["victim"])})
    return out


def _outcomes(src: Source, suite: str, defense: str, victim: dict[str, Any], attack: str,
              merge: str) -> dict[tuple[tuple[str, ...], int], tuple[np.ndarray, ...]]:
    """Per replicate (partners, seed): the sign-adjusted per-example outcomes on the victim's task of the
    protected merge and of its unprotected and counterfactual references (replicates lacking one are left out)."""
    out: dict[tuple[tuple[str, ...], int], tuple[np.ndarray, ...]] = {}
    for p in src.protected(suite, defense, victim["victim"], attack, merge):
        cells = (p, src.reference(p, "unprotected"), src.reference(p, "counterfactual"))
        arrays = [outcomes_of(c, victim["victim"], victim["metric"], victim["higher_is_better"]) if c else None
                  for c in cells]
        if all(a is not None for a in arrays):
            out[(tuple(p["partners"]), p["seed"])] = tuple(arrays)  # type: ignore[arg-type]
    return out


def _gap_rows(src: Source, suite: str, m: Measure, key: str) -> tuple[Rows, np.ndarray | None]:
    """Rows of removed(defense) − removed(versus) per (victim, merge), each with a paired bootstrap interval,
    and the draws of their mean (NaN where a draw leaves a victim without a positive gain)."""
    out, draws = Rows([], set(), []), []
    mine = {v["victim"]: v for v in src.victims(suite, m.defense)}
    theirs = {v["victim"]: v for v in src.victims(suite, m.versus)}
    for victim in sorted(set(mine) & set(theirs)):
        rng = stable_rng("claims", key, suite, victim)
        counts: dict[int, np.ndarray] = {}
        for merge in m.merges:
            a, stored_a = _best(mine[victim], m.attacks, merge)
            b, stored_b = _best(theirs[victim], m.versus_attacks or m.attacks, merge)
            if stored_a and stored_b:
                out.merges_seen.add(merge)
            if a is None or b is None:
                if stored_a and stored_b:
                    out.uninformative.append(f"{victim} / {merge}")
                continue
            oa = _outcomes(src, suite, m.defense, mine[victim], a["attack"], merge)
            ob = _outcomes(src, suite, m.versus, theirs[victim], b["attack"], merge)
            reps = sorted(set(oa) & set(ob))
            mats = [np.stack([x[r][i] for r in reps]) for x in (oa, ob) for i in range(3)] if reps else []
            if not mats or len({x.shape[1] for x in mats}) != 1:
                continue
            n, r = mats[0].shape[1], len(reps)
            if n not in counts:  # one resampling of the victim's test examples for every merge compared on it
                counts[n] = bootstrap_counts(rng, n, src.n_bootstrap)
            reps_w = bootstrap_counts(rng, r, src.n_bootstrap) if r > 1 else np.ones((src.n_bootstrap, 1))
            ours, other = PairOutcomes(*mats[:3]), PairOutcomes(*mats[3:])
            ones = (np.ones((1, n)), np.ones((1, r)))
            point = float((pair_statistics(other, *ones).recovered - pair_statistics(ours, *ones).recovered)[0])
            diff = (pair_statistics(other, counts[n], reps_w).recovered
                    - pair_statistics(ours, counts[n], reps_w).recovered)
            draws.append(diff)
            out.rows.append({"victim": victim, "merge": merge, "attack": a["attack"], "versus_attack": b["attack"],
                             "value": _rnd(point), "ci": _ci(percentile_ci(diff, src.ci_level, (-1.0, 1.0))),
                             "cells": sorted(set(src.pair_cells(suite, m.defense, victim, a["attack"], merge))
                                             | set(src.pair_cells(suite, m.versus, victim, b["attack"], merge)))})
    return out, (np.mean(np.stack(draws), axis=0) if draws else None)


# ---------------------------------------------------------------- statuses and verdicts


def interval_status(ci: Sequence[float] | None, op: Op, threshold: float) -> Status:
    """``holds`` when the whole interval is on the claim's side of the threshold, ``fails`` when it is wholly on
    the other side, ``undecided`` when it straddles it (or there is none)."""
    if ci is None or ci[0] is None or ci[1] is None:
        return "undecided"
    lo, hi = ci
    side = {">=": (lo >= threshold, hi < threshold), ">": (lo > threshold, hi <= threshold),
            "<=": (hi <= threshold, lo > threshold), "<": (hi < threshold, lo >= threshold)}[op]
    return "holds" if side[0] else "fails" if side[1] else "undecided"


def _bound(row: dict[str, Any], which: Literal["lo", "hi"]) -> float:
    ci = row["ci"]
    if ci is None:
        return -np.inf if which == "lo" else np.inf
    return ci[0] if which == "lo" else ci[1]


def condition_status(cond: Condition, rows: Sequence[dict[str, Any]], complete: bool = True) -> tuple[Status, int | None]:
    """The condition's status over its rows, and the index of the row it rests on (the worst row for
    ``every``, a failing one if any fails; the best row for ``some``; the one mean row for ``mean``)."""
    if not rows:
        return "missing", None
    st = [interval_status(r["ci"], cond.op, cond.threshold) for r in rows]
    up = cond.bound == "lo"  # a larger lower bound (smaller upper bound) is better for the claim

    def goodness(i: int) -> float:
        b = _bound(rows[i], cond.bound)
        return b if up else -b

    order = sorted(range(len(rows)), key=lambda i: (goodness(i), i))
    if cond.over == "some":
        best = order[-1]
        return ("holds" if st[best] == "holds" else "fails" if all(s == "fails" for s in st) else "undecided"), best
    failing = [i for i in order if st[i] == "fails"]
    if failing:
        return "fails", failing[0]
    if all(s == "holds" for s in st):
        return ("holds" if complete or cond.over == "mean" else "incomplete"), order[0]
    return "undecided", order[0]


def suite_verdict(statuses: Sequence[Status]) -> str:
    """``reproduced`` when every applicable condition holds; ``partly`` when one holds (or holds on what was
    measured); ``not reproduced`` when none does; without any measurement ``not testable at this scale`` when
    the cells exist but say nothing (or the defense cannot act there), else ``not measured``."""
    applicable = [s for s in statuses if s != "n/a"]
    measured = [s for s in applicable if s in ("holds", "fails", "undecided", "incomplete")]
    if not measured:
        return NOT_MEASURED if "missing" in applicable else NOT_TESTABLE
    if all(s == "holds" for s in applicable):
        return REPRODUCED
    if any(s in ("holds", "incomplete") for s in measured):
        return PARTLY
    return NOT_REPRODUCED


def claim_verdict(verdicts: Sequence[str]) -> str:
    """Over suites: ``reproduced`` (or ``not reproduced``) when every measured suite says so, ``partly`` when
    they differ; without a measured suite ``not measured`` if some suite only lacks cells, else not testable."""
    measured = [v for v in verdicts if v in (REPRODUCED, PARTLY, NOT_REPRODUCED)]
    if not measured:
        return NOT_MEASURED if NOT_MEASURED in verdicts else NOT_TESTABLE
    if all(v == REPRODUCED for v in measured):
        return REPRODUCED
    if all(v == NOT_REPRODUCED for v in measured):
        return NOT_REPRODUCED
    return PARTLY


# ---------------------------------------------------------------- evaluating


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _at(row: dict[str, Any]) -> str:
    parts = [row["victim"], row["merge"], row["attack"]]
    if row.get("versus_attack"):
        parts[-1] = f"{row['attack']} vs {row['versus_attack']}"
    return " / ".join(p for p in parts if p)


def evaluate_condition(src: Source, suite: str, cond: Condition, key: str) -> dict[str, Any]:
    """One condition on one suite: its rows, status, the row it rests on, and what is missing."""
    m = cond.measure
    defenses = [d for d in (m.defense, m.versus) if d]
    na = [src.not_applicable[(suite, d)] for d in defenses if (suite, d) in src.not_applicable]
    base: dict[str, Any] = {"name": cond.name, "value": None, "ci": None, "at": "", "rows": [], "n_cells": 0,
                            "commands": []}
    if na:
        return {**base, "status": "n/a", "note": "; ".join(na)}
    mean_draws = None
    if m.kind == "utility":
        found = _utility_rows(src, suite, m)
    elif m.kind == "gap":
        found, mean_draws = _gap_rows(src, suite, m, f"{key}/{cond.name}")
    else:
        found = _pair_rows(src, suite, m)
    rows = found.rows
    lacking = [mg for mg in m.merges if mg not in found.merges_seen]
    commands = [m.command(suite, lacking)] if lacking else []
    cells = sorted({c for r in rows for c in r["cells"]})
    if cond.over == "mean" and rows:
        assert mean_draws is not None
        label = f"mean over {len(rows)} victim-merge pair{'s' if len(rows) > 1 else ''}"
        mean_row = {"victim": label, "merge": "", "attack": "", "value": _rnd(float(np.mean([r["value"] for r in rows]))),
                    "ci": _ci(percentile_ci(mean_draws, src.ci_level, (-1.0, 1.0))), "cells": cells}
        status, at = condition_status(cond, [mean_row])
        decisive = mean_row
    else:
        status, at = condition_status(cond, rows, complete=not lacking)
        decisive = rows[at] if at is not None else None
    if status == "missing" and found.uninformative:
        status = "uninformative"
    note = ""
    omitted = [a for a in dict.fromkeys((*m.attacks, *m.versus_attacks)) if a in src.omitted]
    if status == "missing" and omitted:
        note = "; ".join(f"the protocol omits {a}: {src.omitted[a]}" for a in omitted)
    if found.uninformative:
        note = f"no significant merge gain on {', '.join(found.uninformative)}"
    if lacking and rows:
        note = "; ".join(x for x in (note, f"never measured under {', '.join(lacking)}") if x)
    return {**base, "status": status, "value": decisive["value"] if decisive else None,
            "ci": decisive["ci"] if decisive else None, "at": _at(decisive) if decisive else "", "rows": rows,
            "n_cells": len(cells), "commands": commands, "note": note}


def _phrase(cond: Condition, res: dict[str, Any]) -> str:
    status = res["status"]
    if status == "n/a":
        return f"{cond.name}: not applicable ({res['note']})"
    if status == "missing":
        return f"{cond.name}: not measured" + (f" ({res['note']})" if res["note"] else "")
    if status == "uninformative":
        return f"{cond.name}: no informative cell ({res['note']})"
    ci = res["ci"]
    interval = f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "[no interval]"
    bound = "lower" if cond.bound == "lo" else "upper"
    word = {"incomplete": "holds where measured"}.get(status, status)
    scope = {"every": f"worst of {len(res['rows'])}: ", "some": f"best of {len(res['rows'])}: ", "mean": ""}[cond.over]
    return (f"{cond.name} {word} ({scope}{res['at']} {_fmt(res['value'])} {interval}; needs the {bound} bound "
            f"{cond.op} {cond.threshold:g})")


def evaluate_claim(src: Source, claim: Claim, suites: Sequence[str]) -> dict[str, Any]:
    """A claim's verdict on every suite, with the measurements each rests on, and its verdict overall."""
    per_suite = []
    for suite in suites:
        if claim.suites and suite not in claim.suites:
            per_suite.append({"suite": suite, "verdict": NOT_TESTABLE, "reason": f"The claim is {claim.scale}.",
                              "n_cells": 0, "commands": [], "conditions": []})
            continue
        results = [evaluate_condition(src, suite, c, claim.id) for c in claim.conditions]
        verdict = suite_verdict([r["status"] for r in results])
        commands = sorted({x for r in results for x in r["commands"]})
        reason = "; ".join(_phrase(c, r) for c, r in zip(claim.conditions, results))
        if commands and verdict != NOT_TESTABLE:
            reason += f" (measure it with: {' && '.join(commands)})"
        per_suite.append({"suite": suite, "verdict": verdict, "reason": f"{verdict.capitalize()}: {reason}.",
                          "n_cells": len({c for r in results for row in r["rows"] for c in row["cells"]}),
                          "commands": commands, "conditions": results})
    verdict = claim_verdict([s["verdict"] for s in per_suite])
    by_verdict: dict[str, list[str]] = {}
    for s in per_suite:
        by_verdict.setdefault(s["verdict"], []).append(s["suite"])
    reason = "; ".join(f"{v} on {', '.join(ss)}" for v, ss in by_verdict.items())
    return {"id": claim.id, "paper": claim.paper, "source": claim.source, "where": claim.where,
            "passage": claim.passage, "measures": claim.measures, "rule": claim.rule(),
            "scale": {"suites": list(claim.suites), "reason": claim.scale} if claim.suites else None,
            "conditions": [{"name": c.name, "text": c.text(), "kind": c.measure.kind, "defense": c.measure.defense,
                            "attacks": list(c.measure.attacks), "merges": list(c.measure.merges),
                            "versus": c.measure.versus, "versus_attacks": list(c.measure.versus_attacks),
                            "op": c.op, "threshold": c.threshold, "over": c.over, "why": c.why}
                           for c in claim.conditions],
            "verdict": verdict, "reason": f"{verdict.capitalize()}: {reason}.", "suites": per_suite}


def claims_document(entries: Sequence[dict[str, Any]], not_applicable: Iterable[dict[str, Any]] = (),
                    claims: Sequence[Claim] = CLAIMS) -> dict[str, Any]:
    """The ledger of an export's entries: their victims, pair rows and the cells they publish (with per-example
    outcomes); ``not_applicable`` as the manifest lists it."""
    src = Source.of(entries, not_applicable)
    suites = sorted(set(EMBEDDED) | {s for s, _d in src.entries})
    return {"claims_version": CLAIMS_VERSION, "verdicts": list(VERDICTS), "suites": suites,
            "ci_level": src.ci_level, "n_bootstrap": src.n_bootstrap,
            "claims": [evaluate_claim(src, c, suites) for c in claims]}


def read_export(export_dir: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The manifest and entry documents of an export directory, of any schema version, read as they are: the
    ledger needs only their victims and cells (`leaderboard.export.load_export` validates them; it is not
    called here because the export imports this module to write the ledger)."""
    root = Path(export_dir)
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"{root} holds no manifest.json; create it with `bench leaderboard export`")
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    return manifest, [json.loads((root / e["file"]).read_text(encoding="utf-8")) for e in manifest["entries"]]


def build_claims(export_dir: str | os.PathLike) -> dict[str, Any]:
    """The claims ledger of an export directory (any schema version whose entries carry their cells)."""
    manifest, entries = read_export(export_dir)
    return claims_document(entries, manifest.get("not_applicable", []))


def dumps(doc: Any) -> str:
    """The ledger as the export writes every JSON file: sorted keys, one-space indent, a final newline."""
    return json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def write_claims(export_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the ledger of ``export_dir`` (default: ``claims.json`` inside it); returns the path written."""
    path = Path(out) if out is not None else Path(export_dir) / CLAIMS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dumps(build_claims(export_dir)), encoding="utf-8", newline="\n")
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m leaderboard.claims [--from DIR] [--out FILE]``: write the ledger of an export."""
    parser = argparse.ArgumentParser(prog="python -m leaderboard.claims", description=main.__doc__)
    parser.add_argument("--from", dest="source", default=str(SHIPPED), help="export directory (default the shipped data)")
    parser.add_argument("--out", default=None, help="output file (default claims.json in the export directory)")
    args = parser.parse_args(argv)
    path = write_claims(args.source, args.out)
    print(f"claims written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Merge-then-finetune (MergeBarrier, Li et al., AAAI 2026, §4 "Security Against Stealing with
Fine-Tuning", Fig. 2): fine-tune the merged model on k labelled victim samples.

The paper varies the amount of labelled data; the budgets k ∈ {16, 64, 256} are swept by default
(`bench run --attack merge-finetune` plans one cell per k; ``--param merge-finetune.samples=K``
pins one). The paper names no fine-tuning recipe, so the attacker uses the one the experts were
trained with (`Suite.make_optimizer`: AdamW lr 5e-5, weight decay 0.01 on text-minilm; SGD lr 0.005,
momentum 0.9 on vision-effnet). Version 1 used AdamW 5e-5 on every suite, which on vision-effnet
left the attacker with an optimiser its experts never used. Other choices: the released head stays
frozen and the body is trained (what is merged is the body), for ``steps`` steps over the fixed set
of k samples; the k samples are the first k of the victim's training split in a seeded order, so
the budget is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attacks._train import TrainBudget, finetune_body
from bench.plugins import Attack, AttackContext, AttackNeeds
from bench.registry import attacks
from bench.weights import StateDict


@dataclass(frozen=True)
class MergeFinetuneParams:
    samples: int = 64
    """k: labelled victim samples."""
    steps: int = 25
    batch_size: int = 16


@attacks.register()
class MergeFinetune(Attack):
    """Merge, then fine-tune the merged body on k labelled victim samples (MergeBarrier Fig. 2)."""

    name = "merge-finetune"
    version = "2"
    Params = MergeFinetuneParams
    paper = "Li et al., Do Not Merge My Model! Safeguarding Open-Source LLMs Against Unauthorized Model Merging, AAAI 2026 (arXiv 2511.10712), Fig. 2"
    sweep: ClassVar[dict[str, tuple[int, ...]]] = {"samples": (16, 64, 256)}
    standard_composites: ClassVar[tuple[str, ...]] = (
        "realign+scale-division+merge-finetune",
        "anchor-align+merge-finetune",
        "revert-to-base+merge-finetune",
    )

    def needs(self) -> AttackNeeds:
        return AttackNeeds(anchor=False, labelled=self.params.samples, finetune_steps=self.params.steps)

    def finish(self, merged: StateDict, ctx: AttackContext) -> StateDict:
        p = self.params
        return finetune_body(ctx.suite, merged, ctx.victim_head, ctx.victim, TrainBudget(p.samples, p.steps, p.batch_size), seed=ctx.seed)

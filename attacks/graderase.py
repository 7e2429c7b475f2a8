"""GradErase (MergeGuard, Chen et al., CVPR 2026, §7): retrain the merge with gradients orthogonal to
an estimated disturbance direction.

The paper: "the free-rider estimates the disturbance vector v_disturb = −τ_G from limited training
data and modifies each gradient update as g' = g − ⟨g, v⟩/‖v‖² v". It does not say how τ_G is
estimated. Choice made here (documented and tested): τ_G is the task vector the free-rider gets by
fine-tuning θ_pre on its own limited victim data (the same labelled budget) for ``estimate_steps``
steps with the suite's optimiser — a data-driven estimate of the task direction that MergeGuard's
stage 2 pushes against (θ̂ = θ' − βM⊙τ'). Then the merged body is fine-tuned on that data for
``steps`` steps, every gradient projected orthogonally to v over the whole flattened body (one
inner product across all tensors, as the formula is written for the parameter vector). The
projection acts on gradients as the paper says; with an adaptive optimiser (AdamW) the resulting
update is not exactly orthogonal to v, as it would be with plain SGD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks._train import TrainBudget, finetune_body
from bench.plugins import Attack, AttackContext, AttackNeeds
from bench.registry import attacks
from bench.weights import StateDict


@dataclass(frozen=True)
class GradEraseParams:
    samples: int = 64
    """Labelled victim samples used both to estimate v and to retrain."""
    estimate_steps: int = 20
    steps: int = 25
    batch_size: int = 16


def project_out(grads: list[torch.Tensor], direction: list[torch.Tensor]) -> None:
    """In place: g ← g − ⟨g, v⟩/‖v‖² v, the inner product taken over all tensors together."""
    dot = sum((g.double() * v.double()).sum() for g, v in zip(grads, direction))
    norm2 = sum(v.double().pow(2).sum() for v in direction)
    if float(norm2) == 0.0:
        return
    coef = (dot / norm2).to(grads[0].dtype)
    for g, v in zip(grads, direction):
        g.sub_(coef * v.to(g.dtype))


@attacks.register("graderase")
class GradErase(Attack):
    """GradErase (MergeGuard §7): fine-tune the merge with gradients projected orthogonally to v = −τ_G."""

    name = "graderase"
    Params = GradEraseParams
    paper = "Chen et al., Defending Unauthorized Model Merging via Dual-Stage Weight Protection, CVPR 2026 (arXiv 2511.11851), §7"

    def needs(self) -> AttackNeeds:
        p = self.params
        return AttackNeeds(anchor=True, labelled=p.samples, finetune_steps=p.estimate_steps + p.steps, knows_defense=True)

    def disturbance(self, ctx: AttackContext) -> dict[str, torch.Tensor]:
        """v = −τ_G, τ_G from fine-tuning θ_pre on the attacker's budget data."""
        p = self.params
        budget = TrainBudget(p.samples, p.estimate_steps, p.batch_size)
        estimate = finetune_body(ctx.suite, ctx.base, ctx.victim_head, ctx.victim, budget, seed=ctx.seed)
        return {k: -(estimate[k] - ctx.base[k]) for k in ctx.base if ctx.base[k].is_floating_point()}

    def finish(self, merged: StateDict, ctx: AttackContext) -> StateDict:
        p = self.params
        v = self.disturbance(ctx)
        model = ctx.suite.task_model(merged, ctx.victim_head, ctx.victim)
        names = [n for n, q in model.body.named_parameters() if q.is_floating_point()]
        missing = [n for n in names if n not in v]
        if missing:
            raise KeyError(f"graderase: body parameter {missing[0]!r} is not in θ_pre")
        direction = [v[n] for n in names]

        def hook(grads: list[torch.Tensor]) -> None:
            project_out(grads, direction)

        budget = TrainBudget(p.samples, p.steps, p.batch_size)
        return finetune_body(ctx.suite, merged, ctx.victim_head, ctx.victim, budget, seed=ctx.seed + 1, gradient_hook=hook)

"""GradErase (MergeGuard, Chen et al., CVPR 2026, §7): retrain the merge with gradients orthogonal to
an estimated disturbance direction.

The paper: "the free-rider estimates the disturbance vector v_disturb = −τ_G from limited training
data and modifies each gradient update as g' = g − ⟨g, v⟩/‖v‖² v, thereby eliminating the defensive
direction during retraining". It does not say how τ_G is estimated, and MergeGuard has no public
code. Choices made here (documented and tested):

* **What the estimate starts from: the released artifact.** The disturbance MergeGuard hides is in
  the artifact (θ̂ = θ' − βM⊙τ', Eq. 4), and the attacker holds the artifact and knows the defense
  (``knows_defense``). Fine-tuning θ̂ on the attacker's labelled data for ``estimate_steps`` steps
  moves it back along the directions the negation damaged; that update is τ_G = θ̂_ft − θ̂, and
  v = −τ_G points along the disturbance (only the line matters: the projection is sign-free). Why
  the estimate is "inherently noisy and incomplete" (the paper's words) is visible here: θ̂ still
  works standalone, so its gradients are small and mix the negated directions with ordinary task
  learning. Version 1 fine-tuned θ_pre instead, which estimates the task direction and never looks
  at the artifact, although the attack declared that it knows the defense.
  For a structure-changed artifact (a variant) v is taken on the tensors the artifact shares with
  the merged body and is zero elsewhere.
* **Data: exactly the declared budget.** One seeded draw of ``samples`` labelled victim examples
  (`budget_batches`, seed = the cell's seed) serves both the estimate and the re-training. Version 1
  drew the estimate's set with ``seed`` and the re-training's with ``seed + 1``, so it used up to
  twice the ``samples`` it declared.
* **Re-training.** The merged body is fine-tuned on that set for ``steps`` steps with the suite's
  recipe optimiser (`Suite.make_optimizer`), every gradient projected orthogonally to v over the
  whole flattened body (one inner product across all tensors, as the formula is written for the
  parameter vector). The projection acts on gradients as the paper says; with an adaptive
  optimiser (AdamW) the resulting update is not exactly orthogonal to v, as it would be with
  plain SGD. The released head stays frozen in both fine-tunes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attacks._train import TrainBudget, budget_batches, finetune_body
from attacks.merge_finetune import MergeFinetune, MergeFinetuneParams
from bench.plugins import Attack, AttackContext, AttackNeeds
from bench.registry import attacks
from bench.suite import Batch
from bench.weights import StateDict


@dataclass(frozen=True)
class GradEraseParams:
    samples: int = 64
    """Labelled victim samples: one draw, used both to estimate v and to retrain."""
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


@attacks.register()
class GradErase(Attack):
    """GradErase (MergeGuard §7): fine-tune the merge with gradients projected orthogonally to v = −τ_G."""

    name = "graderase"
    version = "2"
    Params = GradEraseParams
    paper = "Chen et al., Defending Unauthorized Model Merging via Dual-Stage Weight Protection, CVPR 2026 (arXiv 2511.11851), §7"

    def needs(self) -> AttackNeeds:
        p = self.params
        return AttackNeeds(anchor=True, labelled=p.samples, finetune_steps=p.estimate_steps + p.steps, knows_defense=True)

    def counterpart(self) -> Attack:
        """Plain merge-finetune with the same samples, steps and batch size: on an unprotected release the
        free-rider has no defense direction to erase and simply fine-tunes the merge on its labelled budget."""
        p = self.params
        return MergeFinetune(MergeFinetuneParams(samples=p.samples, steps=p.steps, batch_size=p.batch_size))

    def labelled_set(self, ctx: AttackContext) -> list[Batch]:
        """The attacker's labelled victim examples: one seeded draw of exactly ``samples``, used by both fine-tunes."""
        p = self.params
        return budget_batches(ctx.suite, ctx.victim, TrainBudget(p.samples, p.steps, p.batch_size), ctx.seed)

    def disturbance(self, ctx: AttackContext, data: Sequence[Batch]) -> dict[str, torch.Tensor]:
        """v = −τ_G with τ_G = (the artifact fine-tuned on ``data``) − the artifact, per released tensor."""
        p = self.params
        released = ctx.artifact.state
        budget = TrainBudget(p.samples, p.estimate_steps, p.batch_size)
        estimate = finetune_body(ctx.suite, ctx.artifact, ctx.victim_head, ctx.victim, budget, seed=ctx.seed, data=data)
        return {k: -(estimate[k] - released[k]) for k in released if released[k].is_floating_point()}

    def finish(self, merged: StateDict, ctx: AttackContext) -> StateDict:
        p = self.params
        data = self.labelled_set(ctx)
        v = self.disturbance(ctx, data)
        model = ctx.suite.task_model(merged, ctx.victim_head, ctx.victim)
        params = [(n, q) for n, q in model.body.named_parameters() if q.is_floating_point()]
        if not any(n in v for n, _ in params):
            raise KeyError("graderase: the artifact shares no trainable tensor with the merged body, so it gives no direction")
        # a tensor the artifact does not release in standard form (a variant's replaced MLP) has no estimate: v = 0 there
        direction = [v[n] if n in v and v[n].shape == q.shape else torch.zeros_like(q) for n, q in params]

        def hook(grads: list[torch.Tensor]) -> None:
            project_out(grads, direction)

        budget = TrainBudget(p.samples, p.steps, p.batch_size)
        # same examples as the estimate; seed + 1 only varies the dropout of the second fine-tune
        return finetune_body(ctx.suite, merged, ctx.victim_head, ctx.victim, budget, seed=ctx.seed + 1,
                             gradient_hook=hook, data=data)

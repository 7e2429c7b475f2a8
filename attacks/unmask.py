"""Unmask (MergeGuard, Chen et al., CVPR 2026, §7): subtract the protected model's scaled contribution.

The paper writes θ_Unmask = Merge(θ_pre, θ̂_def, θ_fr) − λ·θ̂_def with λ the task-arithmetic
coefficient (0.3). Read literally (subtracting 0.3 of a whole weight vector) the model would be
destroyed, not "regress to the pretrained level" as the paper reports; the task-vector reading
θ_Unmask = Merge(...) − λ(θ̂_def − θ_pre) removes exactly the victim's task-arithmetic contribution and
matches the reported outcome, so it is the one implemented. λ defaults to the merge's own
``lambda_`` when the merge method has one (TA, TIES, DARE), else to ``1/n`` for weight averaging
over n models, else to the paper's 0.3; a value given as a parameter wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.plugins import Attack, AttackContext, AttackNeeds
from bench.registry import attacks
from bench.weights import StateDict


@dataclass(frozen=True)
class UnmaskParams:
    lambda_: float | None = None
    """Scale of the subtracted task vector; None: the merge's λ (see the module docstring)."""


def unmask_lambda(ctx: AttackContext, given: float | None) -> float:
    if given is not None:
        return given
    if "lambda_" in ctx.merge_params:
        return float(ctx.merge_params["lambda_"])
    if ctx.merge_name == "wa":
        return 1.0 / (1 + len(ctx.partners))
    return 0.3


@attacks.register()
class Unmask(Attack):
    """Unmask (MergeGuard §7): merged − λ(θ̂_def − θ_pre), λ the merge's coefficient."""

    name = "unmask"
    Params = UnmaskParams
    paper = "Chen et al., Defending Unauthorized Model Merging via Dual-Stage Weight Protection, CVPR 2026 (arXiv 2511.11851), §7"

    def needs(self) -> AttackNeeds:
        return AttackNeeds(anchor=True, knows_defense=True)

    def finish(self, merged: StateDict, ctx: AttackContext) -> StateDict:
        lam = unmask_lambda(ctx, self.params.lambda_)
        released = ctx.artifact.state
        return {k: (v - lam * (released[k].to(v.dtype) - ctx.base[k].to(v.dtype)))
                if v.is_floating_point() and k in released else v for k, v in merged.items()}

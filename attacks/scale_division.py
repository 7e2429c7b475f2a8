"""Scale division: estimate per-dimension attention scales against θ_pre and divide them out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from attacks._align import require_standard
from bench.artifact import Artifact
from bench.families.base import AttentionMap, get_qkv
from bench.plugins import Attack, AttackContext, AttackNeeds
from bench.registry import attacks
from bench.weights import StateDict
from defenses._linear import HeadTransform, split_columns, split_rows, transform_attention

Estimator = Literal["least_squares", "median_ratio"]


@dataclass(frozen=True)
class ScaleDivisionParams:
    estimator: Estimator = "least_squares"
    """'least_squares': ⟨W', W_pre⟩/‖W_pre‖² per scaled slice; 'median_ratio': median of W'/W_pre (MergeBarrier eq. 36)."""


@attacks.register()
class ScaleDivision(Attack):
    """Scale division: undo per-dimension Q/K and V/O scaling using θ_pre (MergeBarrier appendix D).

    Li et al., AAAI 2026, arXiv 2511.10712, appendix D ("Decode PaRaMS"): PaRaMS scales
    ``Q_i <- α_i Q_i, K_i <- K_i/α_i, V_i <- γ_i V_i, O[:, i] <- O[:, i]/γ_i``; because the task
    vector is small, each protected row is close to α_i times θ_pre's row, so α_i can be read off
    against θ_pre and divided out.

    Choices where appendix D is vague:

    * **Estimator.** Default ``least_squares``: α̂ = ⟨W', W_pre⟩ / ‖W_pre‖² over the scaled slice
      (the projection of the protected slice on θ_pre's). ``median_ratio`` is appendix D's
      "element-wise division ... median" (entries with |W_pre| below 1e-12 are skipped).
    * **Both sides.** α is estimated from the Q rows (α̂_q) and, independently, from the K rows
      (which carry 1/α: α̂_k = 1 / estimate); γ from the V rows and the O columns alike. The two
      estimates are combined by their geometric mean (sign kept when both agree; when their signs
      disagree the one whose slice is more collinear with θ_pre wins). Degenerate estimates
      (zero, non-finite) fall back to 1.
    * **Consistency keeps the function.** The same α̂ divides Q and multiplies K, the same γ̂
      divides V and multiplies O's columns (Q/K/V biases alike), so any estimation error cancels in
      every score and head output: the result computes exactly what the artifact computes, and
      lies near the expert because α̂ ≈ α.
    * **Granularity.** One scale per output dimension of each kv group: with GQA the slice of
      dimension i of group g is K/V row i of g plus row i of every query head of g (and O's column
      i of those heads), since one α must serve the whole group; with RoPE both dimensions of a
      rotary pair share one scale (their slices are estimated together), since a per-dimension
      scale within a pair would change the rotated scores.

    It also undoes any diagonal per-head transform of this form, e.g. MergeBarrier's RoPE plane
    flips (α = −1 on whole rotary planes). MLPs are left alone (compose with ``realign``).

    **On an unprotected expert** (W' = W_pre + τ) the estimate is α̂ = 1 + ⟨τ, W_pre⟩/‖W_pre‖²: the
    component of τ along θ_pre's slice reads as a scale and is moved from Q/V into K/O. The function
    is kept exactly, the weights move by a small fraction of ‖τ‖ (measured 0.02-0.08 ‖τ‖ on the tiny
    transformers with 2 % noise, 0.017 on MiniLM; nothing on a CNN, which has no attention;
    ``tests/test_attack_invariants.py``). No estimate from θ_pre can tell that component from a
    defense's scale, and a PaRaMS release keeps the same error after the division.
    """

    name = "scale-division"
    version = "1"
    Params = ScaleDivisionParams
    paper = ("Li et al., Do Not Merge My Model! Safeguarding Open-Source LLMs Against Unauthorized Model "
             "Merging, AAAI 2026, arXiv:2511.10712, appendix D")
    code = ""

    def needs(self) -> AttackNeeds:
        return AttackNeeds(anchor=True)

    def prepare(self, artifact: Artifact, ctx: AttackContext) -> Artifact:
        state = require_standard(artifact, ctx.base, self.name)
        spread: list[float] = []
        for layer in ctx.arch.attention_layers():
            att = layer.attention
            assert att is not None
            alpha, gamma = estimate_scales(state, ctx.base, att, self.params.estimator)
            # Q <- Q/α̂, K <- α̂K, V <- V/γ̂, O <- Oγ̂: the inverse of the estimated scaling
            transform_attention(state, att, HeadTransform.diagonal(1 / alpha, 1 / gamma))
            spread.append(float(torch.cat([alpha, gamma]).abs().log().abs().max().exp()))
        notes: dict[str, Any] = {"attack": self.name, "estimator": self.params.estimator,
                                 "attention_layers": len(spread), "largest_scale_divided": max(spread, default=1.0)}
        return Artifact(state=state, head=artifact.head, notes=notes)


def estimate_scales(state: StateDict, base: StateDict, att: AttentionMap, estimator: Estimator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(α̂, γ̂)``, each ``[num_kv_heads, head_dim]``: the Q/K and V/O scales of every kv-group dimension."""
    q, k, v, _ = get_qkv(state, att)
    q0, k0, v0, _ = get_qkv(base, att)
    hkv, size, hd = att.num_kv_heads, att.group_size, att.head_dim
    pairs = att.rope_pairs()

    def by_dim(w: torch.Tensor, rows_per_group: int) -> torch.Tensor:
        """Rows -> [kv group, head_dim, rows of that dimension (over the group's heads) × d]."""
        x = split_rows(w.double(), hkv * rows_per_group, hd).reshape(hkv, rows_per_group, hd, -1)
        return x.permute(0, 2, 1, 3).reshape(hkv, hd, -1)

    def o_by_dim(o: torch.Tensor) -> torch.Tensor:
        cols = split_columns(o.double(), hkv * size, hd)  # [H, d_out, hd]
        return cols.reshape(hkv, size, -1, hd).permute(0, 3, 1, 2).reshape(hkv, hd, -1)

    a_q = _estimate(by_dim(q, size), by_dim(q0, size), estimator, pairs)
    a_k = _estimate(by_dim(k, 1), by_dim(k0, 1), estimator, pairs)
    g_v = _estimate(by_dim(v, 1), by_dim(v0, 1), estimator, [])
    g_o = _estimate(o_by_dim(state[att.o]), o_by_dim(base[att.o]), estimator, [])
    alpha = _combine(a_q, _invert(a_k))
    gamma = _combine(g_v, _invert(g_o))
    return alpha[0], gamma[0]


Estimate = tuple[torch.Tensor, torch.Tensor]
"""(scale [groups, head_dim], |cosine| of the slice with θ_pre's, same shape): the cosine ranks reliability."""


def _tie_pairs(x: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """``[groups, head_dim]`` with both dimensions of each rotary pair holding the pair's sum."""
    if not pairs:
        return x
    out = x.clone()
    for i, j in pairs:
        out[:, i] = out[:, j] = x[:, i] + x[:, j]
    return out


def _estimate(w: torch.Tensor, w0: torch.Tensor, estimator: Estimator, pairs: list[tuple[int, int]]) -> Estimate:
    """Scale of each slice ``w[g, i, :]`` relative to ``w0[g, i, :]`` (rotary pairs estimated jointly)."""
    cross = _tie_pairs((w * w0).sum(-1), pairs)
    norm0 = _tie_pairs((w0 * w0).sum(-1), pairs)
    norm = _tie_pairs((w * w).sum(-1), pairs)
    cosine = (cross / (norm0 * norm).sqrt().clamp_min(1e-300)).abs()
    if estimator == "least_squares":
        scale = cross / norm0
    else:
        scale = _median_ratio(w, w0, pairs)
    return _sanitize(scale), cosine


def _median_ratio(w: torch.Tensor, w0: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Median of the element-wise ratios ``w / w0`` per slice (entries where θ_pre is ~0 skipped)."""
    usable = w0.abs() > 1e-12
    ratio = torch.where(usable, w / torch.where(usable, w0, torch.ones_like(w0)), torch.nan)
    if not pairs:
        return ratio.nanmedian(dim=-1).values
    # both dimensions of a rotary pair share the median of all their entries
    out = torch.empty(ratio.shape[:2], dtype=torch.float64)
    for i, j in pairs:
        out[:, i] = out[:, j] = torch.cat([ratio[:, i], ratio[:, j]], dim=-1).nanmedian(dim=-1).values
    return out


def _sanitize(scale: torch.Tensor) -> torch.Tensor:
    """Non-finite or zero estimates (a θ_pre slice of zeros) become 1: nothing is divided there."""
    ok = torch.isfinite(scale) & (scale != 0)
    return torch.where(ok, scale, torch.ones_like(scale))


def _invert(est: Estimate) -> Estimate:
    return 1 / est[0], est[1]


def _combine(first: Estimate, second: Estimate) -> Estimate:
    """Geometric mean of two estimates of one scale; on a sign disagreement the more collinear one."""
    (s1, c1), (s2, c2) = first, second
    agree = torch.sign(s1) == torch.sign(s2)
    geometric = torch.sign(s1) * (s1.abs() * s2.abs()).sqrt()
    pick = torch.where(c1 >= c2, s1, s2)
    return torch.where(agree, geometric, pick), torch.maximum(c1, c2)

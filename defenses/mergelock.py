"""MergeLock: per-head random invertible matrices on the QK and VO branches of attention."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.artifact import Artifact
from bench.families.base import ATTENTION, AttentionMap
from bench.params import ParamError
from bench.plugins import Defense, DefenseContext
from bench.registry import defenses
from bench.suite import Expert
from bench.weights import StateDict, l2_distance
from defenses._linear import HeadTransform, log_uniform, rope_block_rotations, transform_attention, uniform

MAX_DRAWS = 100
"""Draws of one matrix before the condition-number guard gives up."""


class ConditioningError(ValueError):
    """No draw of an invertible matrix met the condition-number bound."""


@dataclass(frozen=True)
class MergeLockParams:
    low: float = 0.1
    """Lower end of the log-uniform scales s (the composite-defense config of the PaRaMS apply script)."""
    high: float = 15.0
    """Upper end of the log-uniform scales s."""
    eps: float = 1e-3
    """Identity added to the Gaussian factor G (keeps it away from singular)."""
    max_cond: float = 1e4
    """Condition-number guard: a matrix with a larger 2-norm condition number is drawn again."""
    qk: bool = True
    """Transform the QK branch (R on Q, R^{-T} on K)."""
    vo: bool = True
    """Transform the VO branch (S on V, S^{-1} on the output projection)."""

    def __post_init__(self) -> None:
        if not (self.qk or self.vo):
            raise ParamError("MergeLock needs qk=true or vo=true; with both off it would release the expert unchanged")
        if not 0 < self.low <= self.high:
            raise ParamError(f"MergeLock scale range needs 0 < low <= high; got low={self.low}, high={self.high}")
        if self.max_cond < self.high / self.low:
            raise ParamError(f"MergeLock max_cond={self.max_cond} is below high/low={self.high / self.low:g}, "
                             "which almost every draw exceeds; raise max_cond or narrow the scale range")


@defenses.register()
class MergeLock(Defense):
    """MergeLock ("Model Unmerging", arXiv 2509.01548): per-head invertible maps on QK and VO, exactly function-preserving.

    Per attention layer and kv group g: ``Q_h <- R_g Q_h`` for the group's query heads and
    ``K_g <- R_g^{-T} K_g`` (every score q^T k unchanged); ``V_g <- S_g V_g`` and
    ``O_h <- O_h S_g^{-1}`` (every head output unchanged). Q/K/V biases take the same matrices;
    the output bias is untouched. The MLP is left alone, as in the paper.

    The official code (hetailang/Merge-Lock) was not available; the paper's abstract and reviews
    say the matrices combine random, permutation and scaling factors. Choices:
    ``R = Π · diag(s) · (G + εI)`` with Π a random permutation, s log-uniform in [low, high] and
    G ~ N(0, 1) per entry (the non-symmetric composite variant of the PaRaMS code, scales
    [0.1, 15], ε = 1e-3); R and S are drawn independently (S ≠ R, unlike PaRaMS's variant); a
    draw whose condition number exceeds ``max_cond`` (default 1e4) is redrawn, since float32
    weights lose about cond·2^-24 relative precision per score (lower ``max_cond`` for a
    float16/bfloat16 release, whose rounding is 2^13 to 2^16 times coarser). With RoPE the QK matrix must commute
    with every rotary rotation, so R is restricted to a scaled rotation ``c_p·Rot(φ_p)`` on each
    rotary pair (c_p log-uniform, φ_p uniform in [0, 2π)); S is unrestricted. With GQA one R and
    one S per kv group, shared by its query heads. Arithmetic in float64, cast back to the stored
    dtype. ``Artifact.notes`` records the L2 distance to θ_pre of the artifact and of the expert,
    the largest condition number used and how many draws the guard rejected.
    """

    name = "mergelock"
    version = "1"
    Params = MergeLockParams
    paper = ("Wang, Yang, Yin, Liu, Shen. Model Unmerging: Making Your Models Unmergeable for Secure "
             "Model Sharing. arXiv 2509.01548. https://arxiv.org/abs/2509.01548")
    code = ""
    applies_to = frozenset({ATTENTION})
    function_preserving = True
    frontier = {"high": ("1.5", "5", "15", "30"), "low": ("1", "0.3", "0.1", "0.05")}
    """One end of the log-uniform scale range at a time, ratios high/low of 15, 50, 150 (the default [0.1, 15]) and
    300: wider ranges scale each dimension more unevenly. 300 is the widest the condition guard (max_cond 1e4) still
    draws at head_dim 128 (about 18 % of draws accepted; at 450 under 5 %, and a 40-layer model runs out of draws)."""

    def protect(self, expert: Expert, ctx: DefenseContext) -> Artifact:
        layers = ctx.arch.attention_layers()
        if not layers:
            raise ValueError(f"mergelock needs attention layers and family {ctx.arch.family!r} has none; "
                             "pick another defense for this suite")
        state: StateDict = dict(expert.body)
        stats = DrawStats()
        for layer in layers:
            att = layer.attention
            assert att is not None
            gen = ctx.generator("mergelock", layer.index)
            qk = torch.stack([self.draw_qk(att, gen, stats) for _ in range(att.num_kv_heads)]) if self.params.qk else None
            vo = torch.stack([self.draw_general(att.head_dim, gen, stats) for _ in range(att.num_kv_heads)]) if self.params.vo else None
            transform_attention(state, att, HeadTransform(qk=qk, vo=vo))
        notes = {"transformed_attention_layers": len(layers), "max_condition_number": stats.max_cond,
                 "rejected_draws": stats.rejected, "l2_to_pre": l2_distance(state, ctx.base),
                 "expert_l2_to_pre": l2_distance(expert.body, ctx.base)}
        return Artifact(state=state, notes=notes)

    def draw_qk(self, att: AttentionMap, gen: torch.Generator, stats: DrawStats) -> torch.Tensor:
        """R for one kv group: general under plain attention, per-pair scaled rotations under RoPE."""
        if not att.rope:
            return self.draw_general(att.head_dim, gen, stats)
        half = att.head_dim // 2
        p = self.params
        return self.guarded(lambda: rope_block_rotations(log_uniform((half,), p.low, p.high, gen),
                                                         uniform((half,), 0.0, 2 * math.pi, gen), att), stats)

    def draw_general(self, n: int, gen: torch.Generator, stats: DrawStats) -> torch.Tensor:
        """Π · diag(s) · (G + εI), redrawn until its condition number is within the bound."""
        p = self.params

        def draw() -> torch.Tensor:
            g = torch.randn(n, n, generator=gen, dtype=torch.float64) + p.eps * torch.eye(n, dtype=torch.float64)
            s = log_uniform((n,), p.low, p.high, gen)
            perm = torch.randperm(n, generator=gen)
            return (s[:, None] * g)[perm]

        return self.guarded(draw, stats)

    def guarded(self, draw: Callable[[], torch.Tensor], stats: DrawStats) -> torch.Tensor:
        """The first of up to MAX_DRAWS draws whose condition number is within ``max_cond``."""
        for _ in range(MAX_DRAWS):
            m = draw()
            cond = float(torch.linalg.cond(m))
            if math.isfinite(cond) and cond <= self.params.max_cond:
                stats.max_cond = max(stats.max_cond, cond)
                return m
            stats.rejected += 1
        raise ConditioningError(f"mergelock drew {MAX_DRAWS} matrices with condition number above "
                                f"max_cond={self.params.max_cond:g}; raise max_cond or narrow low/high")


@dataclass
class DrawStats:
    """Running record of the condition-number guard."""

    max_cond: float = 0.0
    rejected: int = 0

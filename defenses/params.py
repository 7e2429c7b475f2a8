"""PaRaMS: MLP parameter rearrangement and random multi-head scaling (plus a dropout variant)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bench.artifact import Artifact
from bench.families.base import AttentionMap, LayerMap
from bench.params import ParamError
from bench.plugins import Defense, DefenseContext
from bench.registry import defenses
from bench.suite import Expert
from bench.weights import StateDict, l2_distance
from defenses._linear import (
    HeadTransform,
    assignment_value,
    expand_rope_pairs,
    hidden_inner_products,
    permute_hidden,
    projection_tensors,
    solve_assignment,
    transform_attention,
    uniform,
)

PAPER = ("Wei, Yu, Sakuma. Disrupting Model Merging: A Parameter-Level Defense Without Sacrificing "
         "Accuracy. ICCV 2025. https://arxiv.org/abs/2503.07661")


@dataclass(frozen=True)
class PaRaMSParams:
    permute: bool = True
    """Rearrange every MLP / CNN channel block's hidden units to minimise the inner product with θ_pre."""
    scale: bool = True
    """Random multi-head scaling of attention (Q/K by α, V/O by γ); skipped where the map has no attention."""
    low: float = 0.05
    """Lower end of the uniform range of α and γ (the official apply script's value)."""
    high: float = 20.0
    """Upper end of the uniform range of α and γ."""

    def __post_init__(self) -> None:
        if not (self.permute or self.scale):
            raise ParamError("PaRaMS needs permute=true or scale=true; with both off it would release the expert unchanged")
        if not 0 < self.low <= self.high:
            raise ParamError(f"PaRaMS scaling range needs 0 < low <= high; got low={self.low}, high={self.high}")


@defenses.register()
class PaRaMS(Defense):
    """PaRaMS (ICCV 2025): optimal MLP hidden-unit rearrangement + random per-dimension attention scaling.

    Follows the official code (ISCT-W/PaRaMS, ``src/PaRaMS/PaRaMS.py`` at 009d7b3 and
    ``PaRaMS_algorithm.py``), generalised from CLIP ViT to any family through the architecture map.

    **Rearrangement.** Per MLP (or CNN channel) block, the hidden-unit permutation minimising the
    inner product with θ_pre's block, i.e. maximising the L2 distance to it ("mismatching"). The
    cost ``C = W1 W1_pre^T + b1 b1_pre^T + W2^T W2_pre`` runs over the block's projection weights
    (gate rows too for SwiGLU, flattened expand/project kernels for CNN blocks); channelwise tensors
    (BatchNorm, depthwise conv) follow the permutation but are not in the cost, as in the code's
    spec (``c_fc.weight``, ``c_fc.bias``, ``c_proj.weight``). The residual stream is not permuted, so
    blocks are independent and one exact linear assignment per block
    (``scipy.optimize.linear_sum_assignment``) is the optimum the code's coordinate descent reaches.
    Choice: the code solves for π and then applies π to the victim, while the exact minimiser
    applies π^{-1}; the difference is negligible because the cost is nearly symmetric, and we
    apply the exact minimiser (tested: its cost is the minimum).

    **Scaling.** Paper-time diagonal variant: per output dimension, ``Q <- αQ, K <- K/α, V <- γV``,
    output-projection columns ``<- /γ``, Q/K/V biases alike, α, γ ~ U(low, high) i.i.d. (official
    apply script: U(0.05, 20)), every attention layer, float64 arithmetic cast back to the stored
    dtype. Extensions beyond CLIP (the paper reports Llama-2 and SD results without code): with
    RoPE both dimensions of a rotary pair share α (a per-dimension α would change the scores);
    with GQA one α and γ per kv-group dimension, shared by the group's query heads.

    **Applicability.** ``applies_to`` is empty: the defense runs wherever the map has MLP / channel
    blocks or attention. Without attention (CNNs) only the rearrangement runs (a channel permutation
    that BatchNorm follows); without MLPs only the scaling. A map with neither raises.

    Randomness comes only from ``ctx.generator`` salted with the layer, so the same seed gives the
    same artifact. ``Artifact.notes`` records the L2 distance to θ_pre of the artifact and of the
    expert, and the summed MLP inner product with θ_pre before and after rearrangement.
    """

    name = "params"
    version = "1"
    Params = PaRaMSParams
    paper = PAPER
    code = "ISCT-W/PaRaMS"
    function_preserving = True
    frontier = {"high": ("1.25", "5", "20", "80")}
    """The scaling range's upper end in steps of 4 about the apply script's 20: α, γ ~ U(low, high) draw far from 1
    as the range widens. ``low`` is not a knob: under a uniform law the mass below 0.05 is 0.25 % of U(0.05, 20),
    so moving it changes almost no draw."""

    def protect(self, expert: Expert, ctx: DefenseContext) -> Artifact:
        arch = ctx.arch
        mlp_layers = arch.mlp_layers() if self.params.permute else []
        att_layers = arch.attention_layers() if self.params.scale else []
        if not mlp_layers and not att_layers:
            wanted = (["MLP or channel blocks"] if self.params.permute else []) + (["attention layers"] if self.params.scale else [])
            raise ValueError(f"{self.name} has nothing to act on in family {arch.family!r}: its map has no "
                             f"{' and no '.join(wanted)}; pick another defense for this suite")
        state: StateDict = dict(expert.body)
        notes: dict[str, Any] = {}
        notes.update(self.before_rearrangement(state, ctx))
        notes.update(rearrange_mlps(state, ctx.base, mlp_layers))
        for layer in att_layers:
            assert layer.attention is not None
            gen = ctx.generator("params", "scale", layer.index)
            transform_attention(state, layer.attention, sample_scaling(layer.attention, self.params.low, self.params.high, gen))
        notes["scaled_attention_layers"] = len(att_layers)
        notes["scaling"] = "applied" if att_layers else ("n/a: no attention in the map" if self.params.scale else "off")
        notes["l2_to_pre"] = l2_distance(state, ctx.base)
        notes["expert_l2_to_pre"] = l2_distance(expert.body, ctx.base)
        return Artifact(state=state, notes=notes)

    def before_rearrangement(self, state: StateDict, ctx: DefenseContext) -> dict[str, Any]:
        """Hook run on the state before the permutation (the dropout variant prunes here)."""
        return {}


def rearrange_mlps(state: StateDict, base: StateDict, layers: list[LayerMap]) -> dict[str, Any]:
    """Permute every listed block's hidden units to minimise the inner product with ``base``, in place."""
    before = after = 0.0
    for layer in layers:
        assert layer.mlp is not None
        cost = hidden_inner_products(state, base, layer.mlp)
        order = solve_assignment(cost, maximize=False)
        before += float(cost.trace())
        after += assignment_value(cost, order)
        permute_hidden(state, layer.mlp, order)
    return {"permuted_blocks": len(layers), "mlp_inner_product_with_pre_before": before,
            "mlp_inner_product_with_pre_after": after}


def sample_scaling(att: AttentionMap, low: float, high: float, generator: torch.Generator) -> HeadTransform:
    """Diagonal α (QK) and γ (VO) per kv-group dimension, α tied across each RoPE pair."""
    shape = (att.num_kv_heads, att.head_dim)
    if att.rope:
        alpha = expand_rope_pairs(uniform((att.num_kv_heads, att.head_dim // 2), low, high, generator), att)
    else:
        alpha = uniform(shape, low, high, generator)
    gamma = uniform(shape, low, high, generator)
    return HeadTransform.diagonal(alpha, gamma)


# ---------------------------------------------------------------- dropout variant


@dataclass(frozen=True)
class PaRaMSDropoutParams(PaRaMSParams):
    p: float = 0.5
    """Drop rate of the task-vector entries before rearrangement (kept ones are rescaled by 1/(1-p))."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.p < 1:
            raise ParamError(f"PaRaMS dropout rate p must be in [0, 1); got {self.p}")
        if not self.permute:
            raise ParamError("params+dropout prunes before the rearrangement, so it needs permute=true")


@defenses.register()
class PaRaMSDropout(PaRaMS):
    """PaRaMS with dropout-based pruning before rearrangement (a reconstruction; not function-preserving).

    The paper proposes "a dropout-based pruning to improve our proposal's robustness" against
    adaptive attacks that recover the permutation, but publishes no code or exact rule for it.
    Reconstruction (DARE-style, by analogy with DARE which the repository cites): on the task
    vector τ = θ_expert − θ_pre of every MLP / channel block's projection weights and biases (the
    tensors the rearrangement is computed on; BatchNorm statistics are left alone, since a doubled
    variance update can turn negative), keep each entry with probability 1 − p and rescale the kept
    ones by 1/(1 − p); then run PaRaMS. The default p = 0.5 sits mid-way in the 0.1-0.9 sweep this
    choice calls for. The pruned expert differs from the expert, so the artifact is not
    function-preserving; an attacker who undoes the permutation recovers only the pruned model.
    """

    name = "params+dropout"
    version = "1"
    Params = PaRaMSDropoutParams
    function_preserving = False
    frontier = {"p": ("0.1", "0.3", "0.5", "0.7", "0.9")}
    """The 0.1-0.9 sweep of the drop rate that the reconstruction's choice calls for (its default 0.5 mid-way): more of
    the task vector is dropped before the rearrangement."""

    def before_rearrangement(self, state: StateDict, ctx: DefenseContext) -> dict[str, Any]:
        dropped = total = 0
        for layer in ctx.arch.mlp_layers():
            assert layer.mlp is not None
            for name, _ in projection_tensors(layer.mlp):
                gen = ctx.generator("params+dropout", name)
                state[name], n_dropped = dare(state[name], ctx.base[name], self.params.p, gen)
                dropped += n_dropped
                total += state[name].numel()
        return {"dropout_p": self.params.p, "dropped_fraction": dropped / total if total else 0.0}


def dare(expert: torch.Tensor, base: torch.Tensor, p: float, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """θ_pre + m ⊙ τ / (1 − p) with m ~ Bernoulli(1 − p) per entry; returns the tensor and how many entries dropped."""
    if p == 0:
        return expert, 0
    keep = (torch.rand(expert.shape, generator=generator) >= p).to(expert.device)  # the generator is a CPU one
    tau = expert.double() - base.double()
    out = base.double() + torch.where(keep, tau / (1 - p), torch.zeros_like(tau))
    return out.to(expert.dtype), int((~keep).sum())


"""Permutation re-alignment (Git Re-Basin weight matching) of MLP hidden units and attention heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from attacks._align import AttackInputError, hidden_similarity, require_standard
from bench.artifact import Artifact
from bench.families.base import AttentionMap, get_qkv, set_qkv
from bench.plugins import Attack, AttackContext, AttackNeeds
from bench.registry import attacks
from bench.weights import StateDict
from defenses._linear import merge_columns, permute_hidden, solve_assignment, split_columns, split_rows


@dataclass(frozen=True)
class RealignParams:
    reference: Literal["pretrained", "partner"] = "pretrained"
    """Align to θ_pre (PaRaMS's own reference) or to a partner model (PaRaMS's adaptive attack)."""
    partner: int = 0
    """Which partner body to align to when reference=partner (index into the cell's partners)."""
    heads: bool = True
    """Also match attention heads (and kv groups), by a similarity that per-head transforms leave unchanged."""


@attacks.register()
class Realign(Attack):
    """Permutation re-alignment: Git Re-Basin weight matching of the artifact to a reference model.

    Ainsworth et al., Git Re-Basin, ICLR 2023 (samuela/git-re-basin ``src/weight_matching.py``);
    PaRaMS's adaptive attack (ISCT-W/PaRaMS ``parameter_rearrangement(obj='matching')``, aligning the
    protected model to a free-rider) and MergeBarrier appendix D.2 (arXiv 2511.10712: MLP
    permutations "reversed via weight alignment" against the base model).

    **MLP / CNN channel blocks.** Per block, ``C[i, j]`` = Σ over every floating-point weight indexed by
    hidden unit (`MLPMap.hidden_weights`: up, gate, their biases, down columns, depthwise kernels,
    BatchNorm scale and shift) of ⟨unit i of the artifact, unit j of the reference⟩, and
    ``scipy.optimize.linear_sum_assignment(C, maximize=True)`` gives the reordering, applied to all
    tensors indexed by hidden unit together, BatchNorm running statistics included (function-preserving).
    The residual stream is not permuted, so the blocks share no permutation axis and Git Re-Basin's
    coordinate descent is exact after one sweep: one assignment per block is its fixed point.

    **BatchNorm running statistics do not enter the cost** (version 2). Git Re-Basin matches
    parameters only (its flax models keep BatchNorm averages in ``batch_stats``, outside the
    ``params`` that ``weight_matching`` reads). Version 1 summed them in, and on EfficientNet that
    broke the invariant that an expert fine-tuned from θ_pre is already aligned with it: each
    statistic adds a rank-one term ``v_i·v'_j`` whose best assignment sorts units by value; Lite0's
    expand-BN running variances (~46 per channel, so ~2,000 per pair against ~1 for the weights)
    dominated the cost, and a fine-tune re-estimates them on its own data (30-60 % change), so the
    assignment followed their new order: an unprotected vision-effnet expert had 7,084 channels
    moved (0.88 of its task vector) and its merges were destroyed. Without them the identity is
    found on the real experts and a defense's permutation is still undone.

    **Attention heads** (``heads=true``). Reordering whole heads (Q/K/V rows, O columns, biases), or
    with GQA whole kv groups together with their query heads and the query heads inside a group,
    preserves the function. Heads are matched by the cosine similarities of ``W_qᵀW_k`` and
    ``W_o W_v`` per query head (computed as ``Σ (Q_a Q_rᵀ)⊙(K_a K_rᵀ)`` without forming d×d
    matrices); both products are invariant to every per-head transform a function-preserving
    defense may apply (PaRaMS scaling, MergeLock, MergeBarrier), so the head order is found even
    under those transforms. With GQA, kv groups are matched by the best within-group assignment of
    their query heads (a nested assignment). Defenses in this benchmark do not permute heads; the
    step then finds the identity and changes nothing.

    The reference is θ_pre by default (as PaRaMS's code uses the zero-shot model) or
    ``ctx.partner_bodies[partner]``. Needs only the anchor, no data.
    """

    name = "realign"
    standard_composites: ClassVar[tuple[str, ...]] = ("realign+scale-division",)
    version = "2"
    Params = RealignParams
    paper = "Ainsworth, Hayase, Srinivasa. Git Re-Basin: Merging Models modulo Permutation Symmetries. ICLR 2023. https://arxiv.org/abs/2209.04836"
    code = "samuela/git-re-basin"

    def needs(self) -> AttackNeeds:
        return AttackNeeds(anchor=True)

    def prepare(self, artifact: Artifact, ctx: AttackContext) -> Artifact:
        state = require_standard(artifact, ctx.base, self.name)
        reference = self.reference(ctx)
        moved_units = moved_heads = 0
        for layer in ctx.arch.mlp_layers():
            assert layer.mlp is not None
            order = solve_assignment(hidden_similarity(state, reference, layer.mlp), maximize=True)
            moved_units += int((order != torch.arange(len(order))).sum())
            permute_hidden(state, layer.mlp, order)
        if self.params.heads:
            for layer in ctx.arch.attention_layers():
                assert layer.attention is not None
                q_order, kv_order = match_heads(state, reference, layer.attention)
                moved_heads += int((q_order != torch.arange(len(q_order))).sum())
                reorder_heads(state, layer.attention, q_order, kv_order)
        notes: dict[str, Any] = {"attack": self.name, "reference": self.params.reference,
                                 "moved_hidden_units": moved_units, "moved_heads": moved_heads}
        return Artifact(state=state, head=artifact.head, notes=notes)

    def reference(self, ctx: AttackContext) -> StateDict:
        if self.params.reference == "pretrained":
            return ctx.base
        if not ctx.partner_bodies:
            raise AttackInputError("realign reference=partner needs a partner model and this cell has none; "
                                   "use reference=pretrained")
        if not 0 <= self.params.partner < len(ctx.partner_bodies):
            raise AttackInputError(f"realign partner={self.params.partner} is out of range: the cell has "
                                   f"{len(ctx.partner_bodies)} partner(s), indices 0..{len(ctx.partner_bodies) - 1}")
        return ctx.partner_bodies[self.params.partner]


# ---------------------------------------------------------------- heads


def _head_blocks(state: StateDict, att: AttentionMap) -> tuple[torch.Tensor, ...]:
    """Per query head: Q rows [H, hd, d], its group's K and V rows [H, hd, d], O columns [H, d_out, hd] (float64)."""
    q, k, v, _ = get_qkv(state, att)
    groups = torch.arange(att.num_heads) // att.group_size
    qh = split_rows(q.double(), att.num_heads, att.head_dim)
    kh = split_rows(k.double(), att.num_kv_heads, att.head_dim)[groups]
    vh = split_rows(v.double(), att.num_kv_heads, att.head_dim)[groups]
    oh = split_columns(state[att.o].double(), att.num_heads, att.head_dim)
    return qh, kh, vh, oh


def _product_inner(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """``⟨A1ᵀB1, A2ᵀB2⟩_F`` for every head pair: ``[H1, H2]`` from blocks ``[H, r, d]`` (A rows, B rows)."""
    (h1, r, d), h2 = a1.shape, a2.shape[0]
    # ⟨A1ᵀB1, A2ᵀB2⟩ = tr(B1ᵀA1A2ᵀB2) = Σ (A1A2ᵀ) ⊙ (B1B2ᵀ): r×r blocks instead of d×d products
    aa = (a1.reshape(-1, d) @ a2.reshape(-1, d).T).reshape(h1, r, h2, r)
    bb = (b1.reshape(-1, b1.shape[-1]) @ b2.reshape(-1, b2.shape[-1]).T).reshape(h1, r, h2, r)
    return (aa * bb).sum((1, 3))


def head_similarity(art: StateDict, ref: StateDict, att: AttentionMap) -> torch.Tensor:
    """``S[a, r]`` = cos(W_qᵀW_k) + cos(W_oW_v) between query head a of ``art`` and head r of ``ref``."""
    qa, ka, va, oa = _head_blocks(art, att)
    qr, kr, vr, or_ = _head_blocks(ref, att)
    # W_o W_v = O V with O columns as rows of Oᵀ: ⟨O_a V_a, O_r V_r⟩ = Σ (O_aᵀO_r) ⊙ (V_a V_rᵀ)
    oa_t, or_t = oa.transpose(1, 2), or_.transpose(1, 2)

    def cos(x1: torch.Tensor, y1: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        cross = _product_inner(x1, y1, x2, y2)
        n1 = _product_inner(x1, y1, x1, y1).diagonal().clamp_min(0).sqrt()
        n2 = _product_inner(x2, y2, x2, y2).diagonal().clamp_min(0).sqrt()
        return cross / (n1[:, None] * n2[None, :]).clamp_min(1e-300)

    return cos(qa, ka, qr, kr) + cos(oa_t, va, or_t, vr)


def match_heads(art: StateDict, ref: StateDict, att: AttentionMap) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_order, kv_order)``: query head ``q_order[j]`` and kv group ``kv_order[g]`` of ``art`` move to positions j, g.

    kv groups are matched first, scored by the best assignment of their query heads; then the query
    heads inside each matched pair of groups. Without GQA every group is one head.
    """
    sim = head_similarity(art, ref, att)
    g, size = att.num_kv_heads, att.group_size
    blocks = sim.reshape(g, size, g, size).permute(0, 2, 1, 3)  # [art group, ref group, art head, ref head]
    inner: dict[tuple[int, int], torch.Tensor] = {}
    group_score = torch.empty(g, g, dtype=torch.float64)
    for a in range(g):
        for r in range(g):
            order = solve_assignment(blocks[a, r], maximize=True)
            inner[a, r] = order
            group_score[a, r] = blocks[a, r][order, torch.arange(size)].sum()
    kv_order = solve_assignment(group_score, maximize=True)
    q_order = torch.cat([kv_order[r] * size + inner[int(kv_order[r]), r] for r in range(g)])
    return q_order, kv_order


def reorder_heads(state: StateDict, att: AttentionMap, q_order: torch.Tensor, kv_order: torch.Tensor) -> None:
    """Move query head ``q_order[j]`` to position j and kv group ``kv_order[g]`` to g (rows, biases, O columns)."""
    if torch.equal(q_order, torch.arange(att.num_heads)) and torch.equal(kv_order, torch.arange(att.num_kv_heads)):
        return
    q, k, v, (bq, bk, bv) = get_qkv(state, att)

    def rows(t: torch.Tensor | None, heads: int, order: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else split_rows(t, heads, att.head_dim)[order].reshape(t.shape)

    hq, hkv = att.num_heads, att.num_kv_heads
    set_qkv(state, att, rows(q, hq, q_order), rows(k, hkv, kv_order), rows(v, hkv, kv_order),
            (rows(bq, hq, q_order), rows(bk, hkv, kv_order), rows(bv, hkv, kv_order)))
    o = state[att.o]
    state[att.o] = merge_columns(split_columns(o, hq, att.head_dim)[q_order])

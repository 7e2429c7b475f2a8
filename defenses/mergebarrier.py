"""MergeBarrier: orthogonal Q/K projection plus Taylor reparameterisation of the feed-forward blocks.

Li et al., "Do Not Merge My Model! Safeguarding Open-Source LLMs Against Unauthorized Model
Merging", AAAI 2026, arXiv 2511.10712 (§3, appendices B.1/B.2/B.5/B.6/C). No public code: the paper
is the specification; the choices below fill its gaps.

Attention (§3.2). For each kv group g (each head without GQA) one orthogonal ``P_g`` is applied to the
group's query-head rows and its key-head rows of W_q, W_k (and their biases): ``q' = P q``,
``k' = P k`` so ``q'ᵀk' = qᵀk`` (eq. 1, Theorem 1) and the attention output is unchanged. ``P`` maximises
the displacement ``‖(P − I)W_q‖² + ‖(P − I)W_k‖²`` (Theorem 2) under the paper's relaxation "flip the
top-k eigen-directions": ``P = I − 2UUᵀ`` with U the top-k eigenvectors of
``M_g = Σ_h W_q,h W_q,hᵀ + W_k,g W_k,gᵀ`` (row form of the paper's ``W_qᵀW_q``), which gives
``‖(P − I)W‖² = 4‖UᵀW‖²`` = 4 × the sum of the top-k eigenvalues.

* k defaults to head_dim / 4 (the paper ablates k but reports no default).
* Biases are part of the rows being displaced, so they enter ``M_g`` as one more column.
* ``rsvd=true`` computes the top-k eigenvectors by the randomized SVD of appendix C (Halko et al.:
  Gaussian sketch, power iterations, QR, small eigendecomposition), seeded from the run's seed.
* RoPE: a generic reflection does not commute with the rotary rotations and changes the attention
  scores. The orthogonal maps that commute with every rotation of a rotary plane are the 2-D
  rotations of each plane; the one displacing most is the rotation by π, i.e. negating both dims of
  the plane. So for RoPE models the ⌈k/2⌉ planes (pairs from `AttentionMap.rope_pairs`) with the most
  energy (squared norm of their Q/K rows in the group, biases included) are flipped (2⌈k/2⌉ dims).
* V and O are left untouched (the paper transforms only Q and K).

FFN (§3.3, B.5/B.6): an order-N Taylor series of the activation replaces the FFN's down projection
(see `defenses.taylor` for the release format and numerics). The paper fixes *where* each neuron is
expanded and leaves *which* neurons and *which* N unstated:

* **Where** (stated): "The expansion point z_0 is set as the midpoint between z_max and z_min in the
  set Z, which is constructed from the feature representations z of training samples" (§3.3), here
  ``calibration_samples`` training examples of the victim task.
* **Which neurons and which N** (unstated). The paper's claim is about utility: "By selecting the
  optimal expansion point based on the training set, we ensure that the approximation error has a
  provably negligible impact on model performance" (§1), measured as 27.80 % vs 27.80 % on MBPP and
  58.76 vs 57.88 on GSM8K (Table 3). It takes the expansion from TaylorMLP, its own baseline, which
  it credits with "preserv[ing] performance by applying Taylor expansion" (§2). The one public
  implementation of that expansion, TaylorMLP's code (guanchuwang/Taylor-Unswift), expands only the
  neurons with the narrowest calibration range and keeps the others exact (``dim_selection`` /
  ``Tylor_expansion_PhiMLP``: ``max_min_gap.argsort()[:select_dim]``). Its configuration with
  N = 8, ``protection/llama_wikitext_test.py``, expands ``select_dim = 8000`` of Llama-3-8B's 14336
  neurons per layer. So the defaults are **N = 8 and the 8000/14336 ≈ 0.558 narrowest-range
  neurons of every FFN** (``expand_fraction``), the rest released exact (``exact_*`` tensors), so
  as in TaylorMLP the other 44 % of each W_down's columns are in the release as they are (what
  ``revert-ffn`` and ``taylor-invert`` then recover is measured by the attacks). Unlike TaylorMLP there is no random sign flip and no order mask (the paper has neither, and the
  code's mask only acts on orders above 8).
* **Why not every neuron.** Eq. 3 is written over all columns of W, and version 1 read it that way
  (``expand_fraction=1``, still available). On all-MiniLM-L6-v2 the widest calibration ranges
  reach |Δ| ≈ 20, where an order-8 series of GELU is far off: on rt-sentiment the six FFNs' relative
  errors on calibration inputs ran from 1.8 to 3.6·10³ and the release was at chance (rt-sentiment 0.500
  against the expert's 0.798), which contradicts the negligible loss the paper reports and
  measures. For SiLU and QuickGELU a larger N would not help either: their series diverge beyond
  ``|Δ| = sqrt(z0² + π²)``.
* **Measured** (text-minilm, seed 0, standalone test accuracy; utility = release / expert). On
  rt-sentiment the expanded 55.8 % of each FFN have calibration ranges of at most 4.7–6.0 (|Δ| ≤ 3)
  and relative FFN errors of 0.007–0.09:

  ==================  =======  ==============================  ==================================
  victim              expert   version 1 (all neurons, N = 8)  version 2 (0.558 narrowest, N = 8)
  ==================  =======  ==============================  ==================================
  rt-sentiment        0.798    0.500 (utility 0.63)            0.794 (utility 0.995)
  rt-subjectivity     0.912    0.500 (utility 0.55)            0.910 (utility 0.997)
  debate-party        0.722    0.500 (utility 0.69)            0.711 (utility 0.985)
  convention-party    0.598    0.533 (utility 0.89)            0.588 (utility 0.983)
  ==================  =======  ==============================  ==================================

  (Chance is 0.5 on every task.) TaylorMLP's other configuration (N = 6, 10000/14336 ≈ 0.7,
  ``llama_protection.py``) gives 0.792 on rt-sentiment: either reading of the code keeps the loss
  near the paper's.

  ``vision-effnet`` has no transformer FFN (its blocks are ReLU6 convolutions), so the defense is
  N/A there. The artifact records the per-layer relative FFN error on calibration inputs and the
  number of expanded neurons, so a utility loss can be traced to it. The paper's remainder/LWE and
  DP arguments are claims about security, not steps to run.

Ablations (Table 4): ``mergebarrier-att`` (attention only; function-preserving) and
``mergebarrier-ffn`` (FFN only).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from bench.artifact import Artifact
from bench.families.base import ATTENTION, MLP, AttentionMap, LayerMap, get_qkv, set_qkv
from bench.plugins import Defense, DefenseContext
from bench.registry import defenses
from bench.suite import Expert
from bench.weights import StateDict
from defenses.taylor import (
    VARIANT,
    calibrate_expert,
    check_expandable,
    expand_mlp,
    measure_relative_error,
    replace_mlp,
    select_neurons,
)

PAPER = "Li et al., Do Not Merge My Model! Safeguarding Open-Source LLMs Against Unauthorized Model Merging, AAAI 2026, arXiv:2511.10712"


# ---------------------------------------------------------------- params


@dataclass(frozen=True)
class AttentionParams:
    k: int | None = None
    """Directions flipped per head (per kv group); None: head_dim // 4. Under RoPE, ⌈k/2⌉ whole planes."""
    rsvd: bool = False
    """Top-k eigenvectors by randomized SVD (appendix C) instead of an exact eigendecomposition."""
    rsvd_oversample: int = 8
    rsvd_power_iters: int = 2


@dataclass(frozen=True)
class FFNParams:
    order: int = 8
    """Taylor order N."""
    calibration_samples: int = 256
    """Victim-task training examples whose pre-activations fix the expansion points."""
    batch_size: int = 32
    expand_fraction: float = 0.558
    """Fraction of each MLP's neurons released as a series: the narrowest calibration ranges first, the
    rest released exact (TaylorMLP's code, 8000 of 14336 at N = 8; see the module docstring). 1.0
    expands every neuron (version 1's literal reading of Eq. 3)."""


@dataclass(frozen=True)
class MergeBarrierParams(FFNParams, AttentionParams):
    """Attention projection and FFN reparameterisation together."""


# ---------------------------------------------------------------- attention projection


@dataclass(frozen=True)
class GroupProjection:
    """The orthogonal map of one kv group and what it flipped."""

    layer: int
    group: int
    matrix: torch.Tensor
    """P [head_dim, head_dim], float64."""
    flipped: int
    """Number of directions with eigenvalue −1."""
    displacement: float
    """‖(P − I)W‖² over the group's Q/K rows (biases included)."""
    energy: float
    """‖W‖² over the same rows (so displacement / energy ≤ 4)."""


def _group_rows(att: AttentionMap, group: int) -> tuple[list[slice], slice]:
    """Row slices of the query heads of kv group ``group``, and of its key head."""
    hd, gs = att.head_dim, att.group_size
    q_rows = [slice(h * hd, (h + 1) * hd) for h in range(group * gs, (group + 1) * gs)]
    return q_rows, slice(group * hd, (group + 1) * hd)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _with_bias(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """[rows, in(+1)]: the weight rows with the bias as one more column."""
    return w if b is None else torch.cat([w, b.unsqueeze(1)], dim=1)


def top_eigenvectors(m: torch.Tensor, k: int, *, generator: torch.Generator | None = None,
                     oversample: int = 8, power_iters: int = 2) -> torch.Tensor:
    """[n, k] orthonormal top-k eigenvectors of the symmetric PSD ``m``: exact, or by randomized SVD
    (appendix C) when a ``generator`` is given."""
    n = m.shape[0]
    if generator is None or k + oversample >= n:
        _, vecs = torch.linalg.eigh(m)  # ascending eigenvalues
        return vecs[:, -k:].flip(1) if k else vecs[:, :0]
    omega = torch.randn(n, k + oversample, generator=generator, dtype=torch.float64)
    y = m @ omega
    for _ in range(power_iters):  # power iterations sharpen the captured range
        y = m @ torch.linalg.qr(y).Q
    q = torch.linalg.qr(y).Q
    _, small = torch.linalg.eigh(q.T @ m @ q)
    return (q @ small)[:, -k:].flip(1)


def reflection(blocks: list[torch.Tensor], k: int, *, generator: torch.Generator | None = None,
               oversample: int = 8, power_iters: int = 2) -> torch.Tensor:
    """P = I − 2UUᵀ flipping the top-k eigen-directions of Σ B Bᵀ over the [head_dim, ·] row blocks."""
    m = sum(b @ b.T for b in blocks)
    u = top_eigenvectors(m, k, generator=generator, oversample=oversample, power_iters=power_iters)
    return torch.eye(m.shape[0], dtype=torch.float64) - 2 * u @ u.T


def plane_flip(blocks: list[torch.Tensor], pairs: list[tuple[int, int]], planes: int) -> torch.Tensor:
    """Diagonal P negating both dims of the ``planes`` rotary planes with the most row energy (commutes with RoPE)."""
    energy = sum(b.pow(2).sum(1) for b in blocks)
    plane_energy = torch.stack([energy[i] + energy[j] for i, j in pairs])
    # stable sort: ties broken by plane index, so the choice is deterministic
    order = torch.sort(-plane_energy, stable=True).indices[:planes]
    diag = torch.ones(energy.shape[0], dtype=torch.float64)
    for p in order.tolist():
        i, j = pairs[p]
        diag[i] = diag[j] = -1.0
    return torch.diag(diag)


def flipped_directions(head_dim: int, k: int | None) -> int:
    k = head_dim // 4 if k is None else k
    if not 1 <= k <= head_dim:
        raise ValueError(f"MergeBarrier k must be between 1 and head_dim={head_dim}; got k={k}")
    return k


def project_attention(
    state: StateDict,
    layer: LayerMap,
    k: int | None = None,
    *,
    rope_aware: bool = True,
    generator: torch.Generator | None = None,
    oversample: int = 8,
    power_iters: int = 2,
) -> list[GroupProjection]:
    """Apply MergeBarrier's per-kv-group orthogonal P to ``layer``'s Q/K rows in ``state`` (in place).

    ``rope_aware=False`` applies the generic reflection even under RoPE (which breaks the function;
    kept to show why the plane rule is needed). ``generator`` switches to randomized SVD.
    """
    att = layer.attention
    assert att is not None
    kk = flipped_directions(att.head_dim, k)
    q, kw, v, (bq, bk, bv) = get_qkv(state, att)
    dtype = q.dtype
    q, kw = q.double().clone(), kw.double().clone()
    bq = None if bq is None else bq.double().clone()
    bk = None if bk is None else bk.double().clone()
    pairs = att.rope_pairs() if rope_aware else []
    out = []
    for g in range(att.num_kv_heads):
        q_rows, k_rows = _group_rows(att, g)
        blocks = [_with_bias(q[r], None if bq is None else bq[r]) for r in q_rows]
        blocks.append(_with_bias(kw[k_rows], None if bk is None else bk[k_rows]))
        if pairs:
            p = plane_flip(blocks, pairs, math.ceil(kk / 2))
        else:
            p = reflection(blocks, kk, generator=generator, oversample=oversample, power_iters=power_iters)
        for r in q_rows:
            q[r] = p @ q[r]
            if bq is not None:
                bq[r] = p @ bq[r]
        kw[k_rows] = p @ kw[k_rows]
        if bk is not None:
            bk[k_rows] = p @ bk[k_rows]
        eye = torch.eye(p.shape[0], dtype=torch.float64)
        out.append(GroupProjection(
            layer=layer.index,
            group=g,
            matrix=p,
            flipped=int(round((p.shape[0] - torch.trace(p).item()) / 2)),
            displacement=float(sum(((p - eye) @ b).pow(2).sum() for b in blocks)),
            energy=float(sum(b.pow(2).sum() for b in blocks)),
        ))
    set_qkv(state, att, q.to(dtype), kw.to(dtype), v, (_cast(bq, dtype), _cast(bk, dtype), bv))
    return out


def protect_attention(state: StateDict, ctx: DefenseContext, params: AttentionParams, salt: str) -> dict[str, object]:
    """`project_attention` on every attention layer; returns the notes to record."""
    layers = ctx.arch.attention_layers()
    if not layers:
        raise ValueError(f"{ctx.arch.family} has no attention layers for MergeBarrier's Q/K projection")
    projections = []
    for lay in layers:
        gen = ctx.generator(salt, "rsvd", lay.index) if params.rsvd else None
        projections += project_attention(state, lay, params.k, generator=gen,
                                         oversample=params.rsvd_oversample, power_iters=params.rsvd_power_iters)
    return {
        "attention_layers": len(layers),
        "flipped_per_group": sorted({p.flipped for p in projections}),
        "rope_planes": bool(layers[0].attention.rope),
        "qk_relative_displacement": sum(p.displacement for p in projections) / max(sum(p.energy for p in projections), 1e-30),
    }


# ---------------------------------------------------------------- FFN reparameterisation


def protect_ffn(expert: Expert, state: StateDict, ctx: DefenseContext, params: FFNParams) -> dict[str, object]:
    """Replace every MLP of ``state`` by its Taylor release around the calibration midpoints: the
    ``expand_fraction`` narrowest-range neurons as a series, the others exact."""
    layers = check_expandable(ctx.arch)
    if params.order < 0:
        raise ValueError(f"MergeBarrier order must be >= 0; got order={params.order}")
    if not 0.0 < params.expand_fraction <= 1.0:
        raise ValueError(f"MergeBarrier expand_fraction must be in (0, 1]; got {params.expand_fraction}")
    calib = calibrate_expert(expert, ctx, layers, params.calibration_samples, params.batch_size)
    errors, expanded, radius = {}, {}, 0.0
    for lay in layers:
        c = calib[lay.index]
        width = c.stats.spread.numel()
        selected = None
        if params.expand_fraction < 1.0:
            selected, _ = select_neurons(c.stats.spread, max(1, round(params.expand_fraction * width)), max_gap=0.0)
        release = expand_mlp(expert.body, lay.mlp, c.stats.midpoint, params.order, selected=selected)
        errors[str(lay.index)] = measure_relative_error(expert.body, release, lay.mlp, c.inputs)
        expanded[str(lay.index)] = width if selected is None else len(selected)
        spread = c.stats.spread if selected is None else c.stats.spread[selected]
        radius = max(radius, float(spread.max()) / 2)
        replace_mlp(state, lay, release)
    return {
        "ffn_layers": len(layers),
        "order": params.order,
        "expanded_neurons": expanded,
        "calibration_tokens": calib[layers[0].index].stats.count,
        "ffn_relative_error": errors,  # per layer, on calibration inputs
        "max_preactivation_radius": max(float(calib[lay.index].stats.spread.max()) / 2 for lay in layers),
        "max_expanded_radius": radius,  # largest |Δ| on calibration data among the expanded neurons
    }


# ---------------------------------------------------------------- the plugins


class _MergeBarrierBase(Defense):
    paper = PAPER
    code = ""

    def _protect(self, expert: Expert, ctx: DefenseContext, attention: bool, ffn: bool) -> Artifact:
        start = time.perf_counter()
        state = dict(expert.body)
        notes: dict[str, object] = {}
        if attention:
            notes.update(protect_attention(state, ctx, self.params, self.name))
        if ffn:
            notes.update(protect_ffn(expert, state, ctx, self.params))
        notes["protect_seconds"] = time.perf_counter() - start
        return Artifact(state=state, variant=VARIANT if ffn else None, notes=notes)


@defenses.register()
class MergeBarrier(_MergeBarrierBase):
    """MergeBarrier: per-head orthogonal Q/K projection (exact) + Taylor-reparameterised FFNs (approximate)."""

    name = "mergebarrier"
    version = "2"
    Params = MergeBarrierParams
    applies_to = frozenset({ATTENTION, MLP})
    frontier = {"order": ("4", "6", "8", "10"), "expand_fraction": ("0.25", "0.558", "0.7", "1.0")}
    """N in even steps through TaylorMLP's two configurations (6 and 8): more orders, a longer series (the cost of the
    released form grows with N). Expanded neurons: a quarter, the code's 8000/14336 (default), its 10000/14336 and
    every neuron (Eq. 3 read literally, version 1): fewer columns of W_down released exact. The attention's k is
    ``mergebarrier-att``'s knob."""
    needs_data = True  # the Taylor FFN is calibrated on the victim's pre-activations
    changes_structure = True

    def protect(self, expert: Expert, ctx: DefenseContext) -> Artifact:
        return self._protect(expert, ctx, attention=True, ffn=True)


@defenses.register()
class MergeBarrierAttention(_MergeBarrierBase):
    """MergeBarrier's attention projection alone (ablation MergeBarrier_Att, Table 4): function-preserving."""

    name = "mergebarrier-att"
    Params = AttentionParams
    applies_to = frozenset({ATTENTION})
    function_preserving = True
    frontier = {"k": ("1", "2", "4", "none")}
    """Directions flipped per head (the paper ablates k, reports no default), up to the default head_dim / 4: k is an
    absolute count and head_dim differs per suite (32 to 128 here), so larger counts would not be valid, or not
    larger than the default, on every suite; with head_dim >= 16 the values rise weak to strong."""

    def protect(self, expert: Expert, ctx: DefenseContext) -> Artifact:
        return self._protect(expert, ctx, attention=True, ffn=False)


@defenses.register()
class MergeBarrierFFN(_MergeBarrierBase):
    """MergeBarrier's FFN Taylor reparameterisation alone (ablation MergeBarrier_FFN, Table 4)."""

    name = "mergebarrier-ffn"
    version = "2"
    Params = FFNParams
    applies_to = frozenset({MLP})
    frontier = MergeBarrier.frontier
    """As ``mergebarrier``'s: N through TaylorMLP's configurations, the expanded share through the code's settings."""
    needs_data = True  # the Taylor FFN is calibrated on the victim's pre-activations
    changes_structure = True

    def protect(self, expert: Expert, ctx: DefenseContext) -> Artifact:
        return self._protect(expert, ctx, attention=False, ffn=True)


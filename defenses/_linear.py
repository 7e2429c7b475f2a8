"""Function-preserving linear reparameterisations of attention and MLP blocks, through the architecture map.

Two symmetries of a transformer (or CNN) block leave its function unchanged, and the
parameter-level defenses (PaRaMS, MergeLock) and the attacks that undo them (scale division,
anchor-guided alignment, permutation re-alignment) all act through them:

* **Per-head transforms of attention.** For query head ``h`` in kv group ``g``,
  ``Q_h <- A_g Q_h`` and ``K_g <- A_g^{-T} K_g`` keep every score ``q^T k``; ``V_g <- B_g V_g`` and
  ``O_h <- O_h B_g^{-1}`` keep every head output. Q/K/V slices are rows, O slices are columns
  (``nn.Linear`` layout). Biases of Q/K/V take the same matrices; the output bias is untouched.
  With GQA one kv group's matrices are shared by all query heads reading that group. With RoPE
  the QK matrix must commute with every rotary rotation, i.e. act on each rotary pair as a scaled
  2x2 rotation (a per-dimension scale must be shared by both dimensions of a pair).
* **Hidden-unit permutations of an MLP / CNN channel block.** Reordering the hidden units (rows of
  up/gate and their biases, dim 0 of channelwise tensors, columns of down) keeps the output.

All arithmetic runs in float64 and the results are cast back to each tensor's stored dtype, so
the transforms stay exact up to one rounding of the stored weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from bench.families.base import AttentionMap, MLPMap, get_qkv, set_qkv
from bench.weights import StateDict

# ---------------------------------------------------------------- attention


@dataclass(frozen=True)
class HeadTransform:
    """Per-kv-group matrices of one attention block; ``None`` leaves that branch unchanged."""

    qk: torch.Tensor | None = None
    """[num_kv_heads, head_dim, head_dim]: A_g, with Q_h <- A_g Q_h and K_g <- A_g^{-T} K_g."""
    vo: torch.Tensor | None = None
    """[num_kv_heads, head_dim, head_dim]: B_g, with V_g <- B_g V_g and O_h <- O_h B_g^{-1}."""

    @classmethod
    def diagonal(cls, alpha: torch.Tensor | None, gamma: torch.Tensor | None) -> HeadTransform:
        """Diagonal transforms from per-dimension factors ``[num_kv_heads, head_dim]`` (PaRaMS scaling)."""
        return cls(qk=None if alpha is None else torch.diag_embed(alpha.double()),
                   vo=None if gamma is None else torch.diag_embed(gamma.double()))

    def inverse(self) -> HeadTransform:
        """The transform that undoes this one (A -> A^{-1}, B -> B^{-1})."""
        return HeadTransform(qk=None if self.qk is None else torch.linalg.inv(self.qk.double()),
                             vo=None if self.vo is None else torch.linalg.inv(self.vo.double()))


def query_head_groups(att: AttentionMap) -> torch.Tensor:
    """The kv group of every query head: head h reads kv head h // group_size."""
    return torch.arange(att.num_heads) // att.group_size


def split_rows(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """``[heads*head_dim, ...]`` -> ``[heads, head_dim, ...]`` (per-head row blocks of Q/K/V or their biases)."""
    return w.reshape(heads, head_dim, *w.shape[1:])


def split_columns(o: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Output projection ``[d_out, heads*head_dim]`` -> ``[heads, d_out, head_dim]`` (per-head column blocks)."""
    return o.reshape(o.shape[0], heads, head_dim).permute(1, 0, 2)


def merge_columns(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of `split_columns`."""
    heads, d_out, head_dim = blocks.shape
    return blocks.permute(1, 0, 2).reshape(d_out, heads * head_dim)


def _left(mats: torch.Tensor, rows: torch.Tensor | None, heads: int, head_dim: int) -> torch.Tensor | None:
    """Multiply each head's row block by its matrix: ``rows_h <- M_h rows_h`` (weights or biases)."""
    if rows is None:
        return None
    x = split_rows(rows.double(), heads, head_dim)
    if x.dim() == 2:  # a bias: [heads, head_dim]
        return torch.einsum("hij,hj->hi", mats, x).reshape(rows.shape)
    return torch.matmul(mats, x.reshape(heads, head_dim, -1)).reshape(rows.shape)


def transform_attention(state: StateDict, att: AttentionMap, t: HeadTransform) -> None:
    """Apply ``t`` to one attention block of ``state`` in place (new tensors, original dtypes)."""
    q, k, v, (bq, bk, bv) = get_qkv(state, att)
    groups = query_head_groups(att)
    hq, hkv, hd = att.num_heads, att.num_kv_heads, att.head_dim
    if t.qk is not None:
        a = t.qk.double()
        a_inv_t = torch.linalg.inv(a).transpose(-1, -2)
        q, bq = _left(a[groups], q, hq, hd), _left(a[groups], bq, hq, hd)
        k, bk = _left(a_inv_t, k, hkv, hd), _left(a_inv_t, bk, hkv, hd)
    if t.vo is not None:
        b = t.vo.double()
        b_inv = torch.linalg.inv(b)
        v, bv = _left(b, v, hkv, hd), _left(b, bv, hkv, hd)
        o = state[att.o]
        cols = torch.matmul(split_columns(o.double(), hq, hd), b_inv[groups])
        state[att.o] = merge_columns(cols).to(o.dtype)
    set_qkv(state, att, q, k, v, (bq, bk, bv))


def expand_rope_pairs(per_pair: torch.Tensor, att: AttentionMap) -> torch.Tensor:
    """Per-dimension factors ``[..., head_dim]`` from per-rotary-pair factors ``[..., head_dim/2]``:
    both dimensions of a pair get the pair's factor (the only diagonal scaling RoPE commutes with)."""
    pairs = att.rope_pairs()
    if not pairs:
        raise ValueError("expand_rope_pairs needs an attention map with RoPE pairing")
    out = torch.empty(*per_pair.shape[:-1], att.head_dim, dtype=per_pair.dtype)
    for p, (i, j) in enumerate(pairs):
        out[..., i] = per_pair[..., p]
        out[..., j] = per_pair[..., p]
    return out


def rope_block_rotations(scales: torch.Tensor, angles: torch.Tensor, att: AttentionMap) -> torch.Tensor:
    """``[..., head_dim, head_dim]`` matrices acting on each rotary pair (i, j) as ``c_p * Rot(phi_p)``.

    A scaled 2x2 rotation commutes with every RoPE rotation of its plane, so ``(R q)`` and
    ``(R^{-T} k)`` rotated by positions m and n still give the original score.
    """
    pairs = att.rope_pairs()
    if not pairs:
        raise ValueError("rope_block_rotations needs an attention map with RoPE pairing")
    scales, angles = scales.double(), angles.double()
    out = torch.zeros(*scales.shape[:-1], att.head_dim, att.head_dim, dtype=torch.float64)
    cos, sin = scales * torch.cos(angles), scales * torch.sin(angles)
    for p, (i, j) in enumerate(pairs):
        out[..., i, i], out[..., i, j] = cos[..., p], -sin[..., p]
        out[..., j, i], out[..., j, j] = sin[..., p], cos[..., p]
    return out


def uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """Samples of U(low, high) in float64."""
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def log_uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """Samples whose logarithm is U(log low, log high), in float64."""
    return torch.exp(uniform(shape, math.log(low), math.log(high), generator))


# ---------------------------------------------------------------- MLP hidden units


def projection_tensors(mlp: MLPMap) -> list[tuple[str, int]]:
    """(name, hidden dim) of the block's projection weights and biases: up, gate, their biases, down.

    These define what a hidden unit computes; channelwise tensors (BatchNorm, depthwise conv) only
    follow the permutation. It is the PaRaMS code's permutation spec (c_fc weight and bias, c_proj
    weight) generalised through the map.
    """
    out = [(mlp.up, 0)]
    out += [(n, 0) for n in (mlp.up_bias, mlp.gate, mlp.gate_bias) if n]
    out.append((mlp.down, 1))
    return out


def hidden_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """A tensor as one flattened row per hidden unit (``dim`` moved first), in float64."""
    return t.double().movedim(dim, 0).reshape(t.shape[dim], -1)


def hidden_inner_products(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], mlp: MLPMap) -> torch.Tensor:
    """``C[i, j]`` = inner product of hidden unit i of ``a`` with hidden unit j of ``b`` over `projection_tensors`.

    For a plain MLP this is ``W1_a W1_b^T + b1_a b1_b^T + W2_a^T W2_b`` (gate rows added for SwiGLU,
    conv kernels flattened for CNN blocks).
    """
    cost: torch.Tensor | None = None
    for name, dim in projection_tensors(mlp):
        term = hidden_rows(a[name], dim) @ hidden_rows(b[name], dim).T
        cost = term if cost is None else cost + term
    assert cost is not None
    return cost


def solve_assignment(cost: torch.Tensor, maximize: bool = False) -> torch.Tensor:
    """The order minimising (or maximising) ``sum_j cost[order[j], j]`` (exact, Hungarian / LAPJV).

    ``order[j]`` is the unit of the first model placed at position j; apply it with `permute_hidden`.
    """
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy(), maximize=maximize)
    order = np.empty_like(rows)
    order[cols] = rows
    return torch.as_tensor(order, dtype=torch.long)


def assignment_value(cost: torch.Tensor, order: torch.Tensor) -> float:
    """``sum_j cost[order[j], j]``: the inner product of the reordered model with the reference."""
    return float(cost[order, torch.arange(len(order))].sum())


def permute_hidden(state: StateDict, mlp: MLPMap, order: torch.Tensor) -> None:
    """Reorder the block's hidden units in place: unit ``order[j]`` moves to position j, in every hidden tensor."""
    for name, dim in mlp.hidden_tensors():
        t = state[name]
        if t.shape[dim] != len(order):
            raise ValueError(f"tensor {name!r} has {t.shape[dim]} hidden units on dim {dim}, the permutation {len(order)}")
        state[name] = t.index_select(dim, order.to(t.device))

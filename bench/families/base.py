"""Architecture maps: where attention and MLP tensors live in a state dict, per layer.

Defenses and attacks act on a map, never on hard-coded key names, so one implementation serves
BERT, HF CLIP vision, open_clip ViT (fused ``in_proj``), Llama (RoPE, GQA, SwiGLU) and CNN blocks.

Conventions (PyTorch ``nn.Linear``): a weight is ``[out_features, in_features]``; per-head slices of
Q/K/V are *rows*, per-head slices of the output projection are *columns*. `get_qkv` / `set_qkv`
hide whether Q, K, V are separate tensors or one fused ``in_proj`` tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from bench.weights import StateDict

#: Features a map can expose; defenses declare which they need (``applies_to``).
ATTENTION = "attention"  # multi-head self-attention with q/k/v/o tensors
FUSED_QKV = "fused_qkv"  # q/k/v stacked in one in_proj tensor
ROPE = "rope"  # rotary position embedding on q/k
GQA = "gqa"  # fewer kv heads than query heads
MLP = "mlp"  # up (-> act) -> down feed-forward with an elementwise activation
GATED_MLP = "gated_mlp"  # SwiGLU-style gate * up
CHANNEL_BLOCK = "channel_block"  # CNN inverted-residual block: expand conv ... project conv
BATCHNORM = "batchnorm"

RopePairing = Literal["half", "interleaved"]


@dataclass(frozen=True)
class AttentionMap:
    """Tensor names and head layout of one self-attention block."""

    num_heads: int
    """Number of query heads."""
    head_dim: int
    num_kv_heads: int
    """Number of key/value heads (== num_heads without GQA); query head h uses kv head h // (num_heads // num_kv_heads)."""
    o: str
    """Output projection weight [d_model, num_heads*head_dim]."""
    o_bias: str | None = None
    q: str | None = None
    k: str | None = None
    v: str | None = None
    q_bias: str | None = None
    k_bias: str | None = None
    v_bias: str | None = None
    fused_qkv: str | None = None
    """Fused in_proj weight [3*d, d] (open_clip / nn.MultiheadAttention), Q, K, V stacked on dim 0."""
    fused_qkv_bias: str | None = None
    rope: RopePairing | None = None
    """RoPE pairing inside a head: 'half' pairs dim i with i + head_dim/2 (HF rotate_half); 'interleaved' pairs 2i with 2i+1."""

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def rope_pairs(self) -> list[tuple[int, int]]:
        """The (i, j) dimension pairs rotated together inside one head."""
        half = self.head_dim // 2
        if self.rope == "half":
            return [(i, i + half) for i in range(half)]
        if self.rope == "interleaved":
            return [(2 * i, 2 * i + 1) for i in range(half)]
        return []


@dataclass(frozen=True)
class MLPMap:
    """Tensor names of one feed-forward (or CNN channel) block.

    Hidden unit j is row j of ``up`` (and ``gate``), element j of their biases, dim 0 of every
    tensor in ``hidden_channelwise``, and column j of ``down``; permuting all of them together
    preserves the block's function.
    """

    up: str
    down: str
    activation: str
    """Elementwise activation name: gelu, gelu_new, quick_gelu, silu, relu, relu6."""
    up_bias: str | None = None
    gate: str | None = None
    gate_bias: str | None = None
    down_bias: str | None = None
    hidden_channelwise: tuple[str, ...] = ()
    """Other tensors indexed by hidden unit on dim 0 (BatchNorm params/stats, depthwise conv)."""
    kind: Literal["mlp", "channel_block"] = "mlp"
    """'mlp': down(act(up x)) (x gate). 'channel_block': CNN block with per-channel ops between up and down."""
    hidden_statistics: tuple[str, ...] = ()
    """The names in ``hidden_channelwise`` that are statistics of the data, not learned weights (BatchNorm
    running mean and variance): they follow a permutation of the hidden units but never decide one."""

    def hidden_tensors(self) -> list[tuple[str, int]]:
        """(name, dim) of every tensor indexed by hidden unit."""
        out = [(self.up, 0)]
        out += [(n, 0) for n in (self.up_bias, self.gate, self.gate_bias) if n]
        out += [(n, 0) for n in self.hidden_channelwise]
        out.append((self.down, 1))
        return out

    def hidden_weights(self) -> list[tuple[str, int]]:
        """(name, dim) of every learned tensor indexed by hidden unit: `hidden_tensors` without ``hidden_statistics``."""
        return [(n, d) for n, d in self.hidden_tensors() if n not in self.hidden_statistics]


@dataclass(frozen=True)
class LayerMap:
    index: int
    attention: AttentionMap | None = None
    mlp: MLPMap | None = None
    norms: tuple[str, ...] = ()
    prefix: str = ""
    """Common key prefix of the layer's tensors (used to group tensors per layer)."""


@dataclass(frozen=True)
class ArchitectureMap:
    family: str
    layers: tuple[LayerMap, ...]
    embeddings: tuple[str, ...] = ()
    final_norms: tuple[str, ...] = ()
    features: frozenset[str] = field(default_factory=frozenset)
    head: tuple[str, ...] = ()
    """Tensors of an output head inside the state dict (LM head); MergeGuard leaves these alone."""

    def attention_layers(self) -> list[LayerMap]:
        return [lay for lay in self.layers if lay.attention is not None]

    def mlp_layers(self) -> list[LayerMap]:
        return [lay for lay in self.layers if lay.mlp is not None]

    def layer_of(self, key: str) -> int | None:
        """Index of the layer a tensor belongs to (by prefix), or None for embeddings/norms/heads."""
        best: LayerMap | None = None
        for lay in self.layers:
            if lay.prefix and key.startswith(lay.prefix) and (best is None or len(lay.prefix) > len(best.prefix)):
                best = lay
        return None if best is None else best.index

    def missing(self, needed: frozenset[str] | set[str]) -> set[str]:
        """The features in ``needed`` this architecture lacks: the one applicability rule of defenses
        (``applies_to``) and attacks (``requires_features``), for the planner and `bench validate` alike."""
        return set(needed) - set(self.features)


# ---------------------------------------------------------------- Q/K/V access


def get_qkv(state: StateDict, att: AttentionMap) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """(W_q, W_k, W_v, (b_q, b_k, b_v)) whether stored separately or fused."""
    if att.fused_qkv:
        w = state[att.fused_qkv]
        dq = att.num_heads * att.head_dim
        dkv = att.num_kv_heads * att.head_dim
        q, k, v = w.split([dq, dkv, dkv], dim=0)
        biases: tuple[torch.Tensor | None, ...] = (None, None, None)
        if att.fused_qkv_bias:
            biases = tuple(state[att.fused_qkv_bias].split([dq, dkv, dkv], dim=0))
        return q, k, v, biases
    assert att.q and att.k and att.v, "attention map needs q/k/v or fused_qkv"
    biases = tuple(state[n] if n else None for n in (att.q_bias, att.k_bias, att.v_bias))
    return state[att.q], state[att.k], state[att.v], biases


def set_qkv(
    state: StateDict,
    att: AttentionMap,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    biases: tuple[torch.Tensor | None, ...] = (None, None, None),
) -> None:
    """Write Q/K/V (and biases, where the map has them) back in the map's layout."""
    if att.fused_qkv:
        state[att.fused_qkv] = torch.cat([q, k, v], dim=0).to(state[att.fused_qkv].dtype)
        if att.fused_qkv_bias and all(b is not None for b in biases):
            state[att.fused_qkv_bias] = torch.cat(list(biases), dim=0).to(state[att.fused_qkv_bias].dtype)
        return
    for name, t in ((att.q, q), (att.k, k), (att.v, v)):
        state[name] = t.to(state[name].dtype)
    for name, b in zip((att.q_bias, att.k_bias, att.v_bias), biases):
        if name and b is not None:
            state[name] = b.to(state[name].dtype)

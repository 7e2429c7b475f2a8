"""Revert-to-base: replace the modules a defense changed by θ_pre's, keep the rest of the artifact."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from bench.artifact import Artifact
from bench.families.base import ArchitectureMap, AttentionMap, LayerMap, get_qkv, set_qkv
from bench.params import ParamError
from bench.plugins import Attack, AttackContext, AttackNeeds
from bench.registry import attacks
from bench.weights import StateDict, is_mergeable

Scope = Literal["all", "attention", "ffn"]
Criterion = Literal["changed", "always"]


@dataclass(frozen=True)
class RevertParams:
    criterion: Criterion = "changed"
    """'changed': revert a unit only when it is structurally changed or fails the compatibility check; 'always': every unit in scope."""
    min_cosine: float = 0.9
    """Compatibility check: a unit fails when one of its weight matrices has cosine similarity with θ_pre's below this."""

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ParamError(f"min_cosine is a cosine similarity and must lie in [-1, 1]; got {self.min_cosine}")


@dataclass(frozen=True)
class RevertPartParams(RevertParams):
    criterion: Criterion = "always"
    """'always' (default here): revert every unit of this kind; 'changed': only those that fail the checks."""


@dataclass(frozen=True)
class Unit:
    """A set of tensors reverted together because only their joint values are meaningful."""

    layer: int
    kind: Literal["qk", "vo", "ffn"]
    names: tuple[str, ...] = field(default=())
    """Logical tensor names (q, k, ... for attention; state keys for an MLP)."""


@attacks.register()
class RevertToBase(Attack):
    """Revert-to-base: modules the artifact changed go back to θ_pre; everything else is merged as released.

    MergeBarrier §4.1 (Li et al., AAAI 2026, arXiv 2511.10712): "for defenses that modify model
    structures (MergeBarrier and TaylorMLP), attackers revert modified layers to the base model's
    original weights before merging". No public code; choices:

    * **Units.** Tensors are reverted in units whose values only make sense together: per layer the
      QK branch (Q, K and their biases), the VO branch (V, O and their biases) and the feed-forward
      block (every tensor of its MLP map: up, gate, down, biases, channelwise tensors). Mixing θ_pre's
      K with a released Q, or θ_pre's down with a released (re-ordered) up, would be meaningless.
    * **Structurally changed.** A unit is changed when any of its standard tensors is missing from
      the artifact or has another shape, e.g. a Taylor FFN release (variant ``taylor-ffn``) removes a
      layer's up/gate/down and adds its own coefficient tensors.
    * **Compatibility check** (our definition): a unit fails when any of its weight matrices (tensors
      of two or more dimensions) has cosine similarity with θ_pre's below ``min_cosine`` (default
      0.9). A fine-tune moves weights by far less than their norm (cosine above 0.99); a permutation
      (PaRaMS MLPs, about −0.3 to 0 on the tiny test models), per-dimension scaling (PaRaMS attention:
      K and O about 0.3–0.6, since they carry 1/α), a flip of the top eigen-directions (MergeBarrier)
      or a random invertible map (MergeLock) falls well below. Biases and other vectors are not
      tested: θ_pre's can be near zero and a fine-tune may legitimately turn them, while a transform
      of the unit always shows in its matrices. An all-zero θ_pre matrix cannot be judged by angle.
    * **Everything else** (embeddings, norms, units that pass) is kept from the artifact; a standard
      tensor the artifact lacks outside any unit is taken from θ_pre, non-standard tensors are
      dropped. The output is a standard artifact (variant None) with exactly θ_pre's keys.

    ``revert-attention`` and ``revert-ffn`` (MergeBarrier §4.4-style ablations: revert only the
    attention or only the FFN) consider only their own units and by default revert all of them
    (``criterion=always``); with ``criterion=changed`` they revert only those that fail the checks
    (e.g. only the flipped Q/K of a MergeBarrier artifact).
    """

    name = "revert-to-base"
    version = "1"
    Params: ClassVar[type] = RevertParams
    paper = ("Li et al., Do Not Merge My Model! Safeguarding Open-Source LLMs Against Unauthorized Model "
             "Merging, AAAI 2026, arXiv:2511.10712, §4.1")
    code = ""
    restores_structure = True
    scope: ClassVar[Scope] = "all"

    def needs(self) -> AttackNeeds:
        return AttackNeeds(anchor=True)

    def prepare(self, artifact: Artifact, ctx: AttackContext) -> Artifact:
        released = artifact.state
        base = ctx.base
        # Start from θ_pre's keys: a standard tensor the artifact lacks comes from θ_pre, extra ones are dropped.
        state: StateDict = {k: released[k] if _same_shape(released, base, k) else base[k] for k in base}
        reverted: list[str] = []
        reasons: dict[str, str] = {}
        for unit in units(ctx.arch, self.scope):
            reason = "always" if self.params.criterion == "always" else self.check(unit, released, base, ctx.arch)
            if reason:
                revert_unit(state, base, unit, ctx.arch)
                label = f"layer{unit.layer}.{unit.kind}"
                reverted.append(label)
                reasons[label] = reason
        outside = sorted(k for k in base if not _same_shape(released, base, k))
        notes: dict[str, Any] = {"attack": self.name, "scope": self.scope, "criterion": self.params.criterion,
                                 "reverted_units": reverted, "reasons": reasons,
                                 "tensors_from_base": len(outside), "dropped_tensors": len(set(released) - set(base))}
        return Artifact(state=state, head=artifact.head, notes=notes)

    def check(self, unit: Unit, released: Mapping[str, torch.Tensor], base: StateDict, arch: ArchitectureMap) -> str:
        """Why ``unit`` must be reverted ('' when it may be kept)."""
        layer = _layer(arch, unit.layer)
        tensors = unit_tensors(released, base, unit, layer)
        if tensors is None:
            return "structurally changed (tensor missing or reshaped)"
        art, pre = tensors
        for name in art:
            if pre[name].dim() < 2:
                continue
            cos = _cosine(art[name], pre[name])
            if cos is not None and cos < self.params.min_cosine:
                return f"{name} cosine {cos:.3f} < {self.params.min_cosine}"
        return ""


@attacks.register()
class RevertAttention(RevertToBase):
    """Revert-to-base restricted to attention: Q/K and V/O branches go back to θ_pre, the rest is kept."""

    name = "revert-attention"
    Params = RevertPartParams
    scope = "attention"


@attacks.register()
class RevertFFN(RevertToBase):
    """Revert-to-base restricted to the feed-forward (or CNN channel) blocks: they go back to θ_pre."""

    name = "revert-ffn"
    Params = RevertPartParams
    scope = "ffn"


# ---------------------------------------------------------------- units


def units(arch: ArchitectureMap, scope: Scope) -> list[Unit]:
    out: list[Unit] = []
    for layer in arch.layers:
        if layer.attention is not None and scope in ("all", "attention"):
            out.append(Unit(layer.index, "qk", ("q", "k", "q_bias", "k_bias")))
            out.append(Unit(layer.index, "vo", ("v", "v_bias", "o", "o_bias")))
        if layer.mlp is not None and scope in ("all", "ffn"):
            names = tuple(n for n, _ in layer.mlp.hidden_tensors()) + ((layer.mlp.down_bias,) if layer.mlp.down_bias else ())
            out.append(Unit(layer.index, "ffn", names))
    return out


def _layer(arch: ArchitectureMap, index: int) -> LayerMap:
    return next(lay for lay in arch.layers if lay.index == index)


def _same_shape(state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], key: str) -> bool:
    return key in state and tuple(state[key].shape) == tuple(base[key].shape)


def _attention_keys(att: AttentionMap) -> list[str]:
    names = [att.fused_qkv, att.fused_qkv_bias, att.q, att.k, att.v, att.q_bias, att.k_bias, att.v_bias, att.o, att.o_bias]
    return [n for n in names if n]


def _attention_parts(state: Mapping[str, torch.Tensor], att: AttentionMap) -> dict[str, torch.Tensor]:
    q, k, v, (bq, bk, bv) = get_qkv(dict(state), att)
    parts = {"q": q, "k": k, "v": v, "o": state[att.o], "q_bias": bq, "k_bias": bk, "v_bias": bv,
             "o_bias": state[att.o_bias] if att.o_bias else None}
    return {n: t for n, t in parts.items() if t is not None}


def unit_tensors(released: Mapping[str, torch.Tensor], base: StateDict, unit: Unit,
                 layer: LayerMap) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """The unit's tensors in the artifact and in θ_pre, or None when the artifact lacks or reshaped one."""
    if unit.kind == "ffn":
        keys = list(unit.names)
    else:
        assert layer.attention is not None
        keys = _attention_keys(layer.attention)
    if not all(_same_shape(released, base, k) for k in keys):
        return None
    if unit.kind == "ffn":
        return {k: released[k] for k in keys}, {k: base[k] for k in keys}
    assert layer.attention is not None
    art, pre = _attention_parts(released, layer.attention), _attention_parts(base, layer.attention)
    wanted = [n for n in unit.names if n in pre]
    return {n: art[n] for n in wanted}, {n: pre[n] for n in wanted}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Cosine similarity of two tensors (None for non-float tensors or an all-zero θ_pre tensor)."""
    if not (is_mergeable(a) and is_mergeable(b)):
        return None
    a, b = a.double().flatten(), b.double().flatten()
    nb = float(b.norm())
    if nb == 0.0:
        return None
    return float(a @ b) / (max(float(a.norm()), 1e-300) * nb)


def revert_unit(state: StateDict, base: StateDict, unit: Unit, arch: ArchitectureMap) -> None:
    """Write θ_pre's values of ``unit`` into ``state`` (in place; fused QKV tensors keep the other branch)."""
    layer = _layer(arch, unit.layer)
    if unit.kind == "ffn":
        for k in unit.names:
            state[k] = base[k].clone()
        return
    att = layer.attention
    assert att is not None
    q, k, v, (bq, bk, bv) = get_qkv(state, att)
    q0, k0, v0, (bq0, bk0, bv0) = get_qkv(base, att)
    if unit.kind == "qk":
        set_qkv(state, att, q0.clone(), k0.clone(), v, (bq0, bk0, bv))
    else:
        set_qkv(state, att, q, k, v0.clone(), (bq, bk, bv0))
        state[att.o] = base[att.o].clone()
        if att.o_bias:
            state[att.o_bias] = base[att.o_bias].clone()

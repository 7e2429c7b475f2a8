"""Stable Diffusion UNets (``diffusers.UNet2DConditionModel``): the map of their transformer blocks.

A UNet's attention lives in the ``BasicTransformerBlock`` s of its cross-attention down, mid and up
blocks (16 in SD 1.5). Each block is ``x += attn1(norm1 x)`` (self-attention), ``x += attn2(norm2
x, text)`` (cross-attention), ``x += ff(norm3 x)``. One `LayerMap` per block, in module order, with
the block's key prefix (``down_blocks.0.attentions.0.transformer_blocks.0.``):

- **attention = ``attn1`` only.** Self-attention's Q, K, V and O all act on the block's hidden
  states: ``to_q/to_k/to_v`` [inner, d] (no biases in SD), ``to_out.0`` [d, inner] with bias, ``heads``
  read from the module (SD 1.5 has 8 heads at every level; diffusers' config calls the head count
  ``attention_head_dim``). ``attn2`` is not exposed: its K and V read the text encoder's states
  ([inner, 768]), not the hidden states, so a defense that transforms attention through the map
  (head scaling, permutation, re-basing the residual stream) would need a different rule for it. Its
  tensors stay in the body (merged like every other tensor) but no defense touches them.
- **mlp = the GEGLU feed-forward as a gated MLP.** diffusers computes ``h, g = proj(x).chunk(2);
  ff(x) = net.2(h * gelu(g))`` with one fused ``proj`` [2·inner, d]. That is the gated-MLP form
  ``down(up(x) ⊙ act(gate(x)))`` with up = the first ``inner`` rows, gate = the last ``inner`` rows,
  act = exact GELU. So that hidden unit j is row j of two separate tensors (the map's contract),
  **the body stores the fused projection split**: ``ff.net.0.up.{weight,bias}`` and
  ``ff.net.0.gate.{weight,bias}`` instead of ``ff.net.0.proj.*``, and the family's module runs the
  split layer (`SplitGEGLU`, the same function). `to_body` / `to_diffusers` convert a diffusers
  state dict and back; element-wise merges are unaffected by the split. A plain-GELU feed-forward
  (``activation_fn="gelu"``) is mapped as an ungated MLP on ``ff.net.0.proj``; other kinds are left
  unmapped.
- norms: ``norm1``, ``norm2``, ``norm3`` (LayerNorm in SD). ResNet and conv tensors are not mapped.

Features: attention, MLP, gated MLP (no RoPE, no GQA).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bench.families.base import ATTENTION, GATED_MLP, MLP, ArchitectureMap, AttentionMap, LayerMap, MLPMap
from bench.families.family import Family
from bench.registry import families
from bench.suite import MissingAssetError
from bench.weights import CheckpointError, StateDict

FUSED = "ff.net.0.proj"
SPLIT_UP, SPLIT_GATE = "ff.net.0.up", "ff.net.0.gate"


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as exc:
        raise MissingAssetError("the unet family needs diffusers: pip install mergearena[diffusion]") from exc
    return diffusers


class SplitGEGLU(nn.Module):
    """diffusers' ``GEGLU`` with its fused projection held as two layers: ``up(x) * gelu(gate(x))``."""

    def __init__(self, dim_in: int, inner: int, bias: bool = True) -> None:
        super().__init__()
        self.up = nn.Linear(dim_in, inner, bias=bias)
        self.gate = nn.Linear(dim_in, inner, bias=bias)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.up(hidden_states) * F.gelu(self.gate(hidden_states))


@families.register()
class UNetFamily(Family):
    """A ``UNet2DConditionModel`` for one config (a dict, as ``unet/config.json``), GEGLU projections split."""

    name = "unet"

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)
        self._map: ArchitectureMap | None = None
        self._blocks: list[tuple[str, str]] | None = None

    @classmethod
    def from_pretrained(cls, unet_dir: Any) -> UNetFamily:
        """The family of a diffusers ``unet`` directory (reads its ``config.json`` only)."""
        return cls(_diffusers().UNet2DConditionModel.load_config(str(unet_dir)))

    # ------------------------------------------------------------ module

    def new_module(self) -> nn.Module:
        """A ``UNet2DConditionModel`` whose GEGLU feed-forwards are `SplitGEGLU` layers."""
        diffusers = _diffusers()
        from diffusers.models.activations import GEGLU

        unet = diffusers.UNet2DConditionModel.from_config(self.config)
        for _, block in self._transformer_blocks(unet):
            first = block.ff.net[0]
            if isinstance(first, GEGLU):
                proj = first.proj
                split = SplitGEGLU(proj.in_features, proj.out_features // 2, bias=proj.bias is not None)
                split.to(device=proj.weight.device, dtype=proj.weight.dtype)
                block.ff.net[0] = split
        return unet

    def install_mlp(self, module: nn.Module, layer: int, mlp: nn.Module) -> None:
        """``block.ff = mlp``: BasicTransformerBlock adds ``ff(norm3 x)`` to the residual."""
        self._block(module, layer).ff = mlp

    def mlp_projection(self, module: nn.Module, layer: int, which: str = "up") -> nn.Module:
        ff = getattr(self._block(module, layer), "ff", None)
        first = ff.net[0] if ff is not None and hasattr(ff, "net") else None
        if isinstance(first, SplitGEGLU):
            if which not in ("up", "gate"):
                raise ValueError(f"a GEGLU feed-forward has 'up' and 'gate' projections, not {which!r}")
            return getattr(first, which)
        if first is not None and which == "up" and isinstance(getattr(first, "proj", None), nn.Linear):
            return first.proj
        raise ValueError(f"transformer block {layer} has no {which!r} projection (its feed-forward was replaced?)")

    def _block(self, module: nn.Module, layer: int) -> nn.Module:
        blocks = self._transformer_blocks(module)
        if not 0 <= layer < len(blocks):
            raise IndexError(f"layer {layer} out of range: this UNet has {len(blocks)} transformer blocks")
        return blocks[layer][1]

    @staticmethod
    def _transformer_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
        from diffusers.models.attention import BasicTransformerBlock

        return [(n, m) for n, m in module.named_modules() if isinstance(m, BasicTransformerBlock)]

    # ------------------------------------------------------------ diffusers <-> body

    def to_body(self, state: Mapping[str, torch.Tensor]) -> StateDict:
        """A diffusers UNet state dict in the body's layout (every fused GEGLU projection split in two)."""
        out: StateDict = {}
        for key, tensor in state.items():
            head, sep, tail = key.rpartition(FUSED + ".")
            if sep and tail in ("weight", "bias") and self._is_geglu(head):
                up, gate = tensor.chunk(2, dim=0)
                out[f"{head}{SPLIT_UP}.{tail}"] = up.contiguous()
                out[f"{head}{SPLIT_GATE}.{tail}"] = gate.contiguous()
            else:
                out[key] = tensor
        return out

    def to_diffusers(self, body: Mapping[str, torch.Tensor]) -> StateDict:
        """The body back in diffusers' layout (fused ``ff.net.0.proj``), e.g. to save a merged UNet."""
        out: StateDict = {}
        for key, tensor in body.items():
            head, sep, tail = key.rpartition(SPLIT_UP + ".")
            if sep:
                gate = body.get(f"{head}{SPLIT_GATE}.{tail}")
                if gate is None:
                    raise CheckpointError(f"{key} has no matching {SPLIT_GATE}.{tail}")
                out[f"{head}{FUSED}.{tail}"] = torch.cat([tensor, gate], dim=0)
            elif SPLIT_GATE + "." not in key:
                out[key] = tensor
        return out

    def _is_geglu(self, block_prefix: str) -> bool:
        return any(lay.prefix == block_prefix and lay.mlp is not None and lay.mlp.gate for lay in self.arch_map().layers)

    # ------------------------------------------------------------ map

    def arch_map(self) -> ArchitectureMap:
        if self._map is None:
            with torch.device("meta"):
                module = self.new_module()
            layers = tuple(self._layer_map(i, name + ".", block)
                           for i, (name, block) in enumerate(self._transformer_blocks(module)))
            features = {ATTENTION} if any(lay.attention for lay in layers) else set()
            if any(lay.mlp for lay in layers):
                features.add(MLP)
            if any(lay.mlp and lay.mlp.gate for lay in layers):
                features.add(GATED_MLP)
            self._map = ArchitectureMap(family=self.name, layers=layers, features=frozenset(features))
        return self._map

    @staticmethod
    def _layer_map(index: int, p: str, block: nn.Module) -> LayerMap:
        attention = None
        attn1 = block.attn1
        if not getattr(block, "only_cross_attention", False) and not attn1.is_cross_attention:
            names = {n: p + f"attn1.{n}.weight" for n in ("to_q", "to_k", "to_v")}
            biases = {n: (p + f"attn1.{n}.bias" if getattr(attn1, n).bias is not None else None) for n in names}
            out = attn1.to_out[0]
            attention = AttentionMap(
                num_heads=attn1.heads, head_dim=attn1.inner_dim // attn1.heads, num_kv_heads=attn1.heads,
                q=names["to_q"], k=names["to_k"], v=names["to_v"],
                q_bias=biases["to_q"], k_bias=biases["to_k"], v_bias=biases["to_v"],
                o=p + "attn1.to_out.0.weight", o_bias=p + "attn1.to_out.0.bias" if out.bias is not None else None,
            )
        mlp = None
        first, down = block.ff.net[0], block.ff.net[2]
        down_bias = p + "ff.net.2.bias" if down.bias is not None else None
        if isinstance(first, SplitGEGLU):
            has_bias = first.up.bias is not None
            mlp = MLPMap(up=p + SPLIT_UP + ".weight", up_bias=p + SPLIT_UP + ".bias" if has_bias else None,
                         gate=p + SPLIT_GATE + ".weight", gate_bias=p + SPLIT_GATE + ".bias" if has_bias else None,
                         down=p + "ff.net.2.weight", down_bias=down_bias, activation="gelu")
        elif type(first).__name__ == "GELU":  # diffusers' plain GELU feed-forward: proj -> gelu
            activation = "gelu" if first.approximate == "none" else "gelu_new"
            mlp = MLPMap(up=p + FUSED + ".weight", up_bias=p + FUSED + ".bias" if first.proj.bias is not None else None,
                         down=p + "ff.net.2.weight", down_bias=down_bias, activation=activation)
        norms = tuple(p + f"{n}.{t}" for n in ("norm1", "norm2", "norm3") if hasattr(block, n)
                      for t in ("weight", "bias") if getattr(getattr(block, n), t, None) is not None)
        return LayerMap(index=index, attention=attention, mlp=mlp, norms=norms, prefix=p)

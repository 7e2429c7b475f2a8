"""CLIP vision towers in the Hugging Face layout (``transformers.CLIPVisionModel``).

Body keys are ``prefix + <CLIPVisionModel key>``. The default prefix ``"vision_model."`` is the
layout of the checkpoints this benchmark merges: the vision tower inside a full ``CLIPModel``
(``openai/clip-vit-base-patch32``) and the FusionBench experts ``tanganke/clip-vit-*_<task>``
(``CLIPVisionModel`` saved by transformers 4, which nested the tower under ``vision_model``). So
the body of a real checkpoint is selected without renaming, and a merged body written back lands on
the same keys. ``prefix=""`` gives transformers 5's flat ``CLIPVisionModel`` keys (``encoder.*``).

Per layer the map exposes separate Q/K/V/O tensors with biases (no RoPE, no GQA) and the
feed-forward ``fc2(act(fc1 x))`` with ``config.hidden_act`` (``quick_gelu`` for OpenAI CLIP).
CLIP is pre-LN: ``layer_norm1`` / ``layer_norm2`` normalise the inputs of attention / MLP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import transformers
from torch import nn

from bench.families.base import ATTENTION, MLP, ArchitectureMap, AttentionMap, LayerMap, MLPMap
from bench.families.family import Family
from bench.families.prefixed import Prefixed, check_prefix, unwrap
from bench.registry import families


@families.register()
class ClipVisionFamily(Family):
    """``transformers.CLIPVisionModel`` for one ``CLIPVisionConfig``, its keys under ``prefix``."""

    name = "clip-vision"
    hf_model_types = ("clip", "clip_vision_model")

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], keys: Sequence[str] | None) -> tuple[ClipVisionFamily, str]:
        if config.get("model_type") == "clip":
            # Only the vision tower of a full CLIPModel is merged; its keys sit under "vision_model.".
            return cls(transformers.CLIPConfig.from_dict(dict(config)).vision_config, prefix="vision_model."), ""
        # transformers 4 saved CLIPVisionModel under "vision_model."; transformers 5 saves it flat.
        if keys is not None:
            prefix = "vision_model." if any(k.startswith("vision_model.") for k in keys) else ""
        else:
            major = str(config.get("transformers_version", "4")).split(".", 1)[0]
            prefix = "" if major.isdigit() and int(major) >= 5 else "vision_model."
        return cls(transformers.CLIPVisionConfig.from_dict(dict(config)), prefix=prefix), ""

    def __init__(self, config: transformers.CLIPVisionConfig, prefix: str = "vision_model.") -> None:
        if isinstance(config, transformers.CLIPConfig):
            config = config.vision_config  # a full CLIP config: the vision tower is what is merged
        if not isinstance(config.hidden_act, str):
            raise ValueError("ClipVisionFamily needs config.hidden_act to be an activation name such as 'quick_gelu'")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not divisible by num_attention_heads {config.num_attention_heads}"
            )
        self.config = config
        self.prefix = check_prefix(prefix)
        self._map: ArchitectureMap | None = None

    # ------------------------------------------------------------ module

    def new_module(self) -> nn.Module:
        """A ``CLIPVisionModel`` (held under ``prefix`` by a `Prefixed` wrapper when the prefix is not empty)."""
        model = transformers.CLIPVisionModel(self.config)
        return Prefixed(model, self.prefix) if self.prefix else model

    def vision_model(self, module: nn.Module) -> transformers.CLIPVisionModel:
        """The ``CLIPVisionModel`` inside a module built by this family."""
        return unwrap(module)

    def install_mlp(self, module: nn.Module, layer: int, mlp: nn.Module) -> None:
        """``layer.mlp = mlp``: CLIPEncoderLayer adds its output to the residual after ``layer_norm2``."""
        self._layer(module, layer).mlp = mlp

    def mlp_projection(self, module: nn.Module, layer: int, which: str = "up") -> nn.Module:
        if which != "up":
            raise ValueError(f"CLIP's feed-forward has no {which!r} projection; only 'up' (mlp.fc1)")
        projection = getattr(self._layer(module, layer).mlp, "fc1", None)
        if not isinstance(projection, nn.Module):
            raise ValueError(f"layer {layer}'s feed-forward was replaced by install_mlp; it has no up projection")
        return projection

    def _layer(self, module: nn.Module, layer: int) -> nn.Module:
        n = self.config.num_hidden_layers
        if not 0 <= layer < n:
            raise IndexError(f"layer {layer} out of range: this CLIP vision tower has {n} layers")
        return self.vision_model(module).encoder.layers[layer]

    # ------------------------------------------------------------ map

    def arch_map(self) -> ArchitectureMap:
        if self._map is None:
            p = self.prefix
            self._map = ArchitectureMap(
                family=self.name,
                layers=tuple(self._layer_map(i) for i in range(self.config.num_hidden_layers)),
                # The pre-encoder LayerNorm (sic: "pre_layrnorm" in transformers) normalises the
                # embedding sum, so it is grouped with the embedding stage.
                embeddings=(
                    p + "embeddings.class_embedding",
                    p + "embeddings.patch_embedding.weight",
                    p + "embeddings.position_embedding.weight",
                    p + "pre_layrnorm.weight",
                    p + "pre_layrnorm.bias",
                ),
                final_norms=(p + "post_layernorm.weight", p + "post_layernorm.bias"),
                features=frozenset({ATTENTION, MLP}),
            )
        return self._map

    def _layer_map(self, i: int) -> LayerMap:
        cfg = self.config
        p = f"{self.prefix}encoder.layers.{i}."
        heads = cfg.num_attention_heads
        attention = AttentionMap(
            num_heads=heads,
            head_dim=cfg.hidden_size // heads,
            num_kv_heads=heads,
            q=p + "self_attn.q_proj.weight",
            k=p + "self_attn.k_proj.weight",
            v=p + "self_attn.v_proj.weight",
            q_bias=p + "self_attn.q_proj.bias",
            k_bias=p + "self_attn.k_proj.bias",
            v_bias=p + "self_attn.v_proj.bias",
            o=p + "self_attn.out_proj.weight",
            o_bias=p + "self_attn.out_proj.bias",
        )
        mlp = MLPMap(
            up=p + "mlp.fc1.weight",
            up_bias=p + "mlp.fc1.bias",
            down=p + "mlp.fc2.weight",
            down_bias=p + "mlp.fc2.bias",
            activation=cfg.hidden_act,
        )
        norms = tuple(p + f"{n}.{t}" for n in ("layer_norm1", "layer_norm2") for t in ("weight", "bias"))
        return LayerMap(index=i, attention=attention, mlp=mlp, norms=norms, prefix=p)

"""Llama decoders (``transformers.LlamaForCausalLM``): SmolLM2, Llama-2/3 and tiny test configs.

Body keys are those of ``LlamaForCausalLM``: ``model.embed_tokens.weight``, ``model.layers.{i}.*``,
``model.norm.weight`` and ``lm_head.weight``. Per layer the map exposes separate Q/K/V/O tensors
with RoPE in Hugging Face's ``rotate_half`` pairing (dim i with i + head_dim/2, as HF's Llama
checkpoints are permuted to), grouped-query attention (``num_key_value_heads``; query head h reads
kv head h // group_size, HF ``repeat_kv``), and the gated feed-forward
``down(act(gate x) * up x)`` with ``config.hidden_act`` (silu). Norms are RMSNorm (weight only).

Tied embeddings (``tie_word_embeddings``, e.g. SmolLM2): ``lm_head.weight`` *is*
``model.embed_tokens.weight``. The body then holds the embedding once and no ``lm_head.weight``
(safetensors refuses two names for one storage, and merging the same tensor twice would be wrong),
the module's ``state_dict()`` omits it, and loading a body restores the tie through the embedding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import transformers
from torch import nn

from bench.families.base import ATTENTION, GATED_MLP, GQA, MLP, ROPE, ArchitectureMap, AttentionMap, LayerMap, MLPMap
from bench.families.family import Family
from bench.registry import families

LM_HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"


@families.register()
class LlamaFamily(Family):
    """``transformers.LlamaForCausalLM`` for one ``LlamaConfig``."""

    name = "llama"
    hf_model_types = ("llama",)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], keys: Sequence[str] | None) -> tuple[LlamaFamily, str]:
        return cls(transformers.LlamaConfig.from_dict(dict(config))), ""

    def __init__(self, config: transformers.LlamaConfig) -> None:
        if not isinstance(config.hidden_act, str):
            raise ValueError("LlamaFamily needs config.hidden_act to be an activation name such as 'silu'")
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {config.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {config.num_key_value_heads}"
            )
        if self.head_dim_of(config) % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim_of(config)}")
        self.config = config
        self._map: ArchitectureMap | None = None

    @staticmethod
    def head_dim_of(config: transformers.LlamaConfig) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @property
    def tied(self) -> bool:
        """Whether the LM head shares the input embedding's tensor."""
        return bool(getattr(self.config, "tie_word_embeddings", False))

    # ------------------------------------------------------------ module

    def new_module(self) -> nn.Module:
        model = transformers.LlamaForCausalLM(self.config)
        if self.tied:
            _hide_tied_head(model)
        return model

    def install_mlp(self, module: nn.Module, layer: int, mlp: nn.Module) -> None:
        """``layer.mlp = mlp``: LlamaDecoderLayer adds its output to the residual after ``post_attention_layernorm``."""
        self._layer(module, layer).mlp = mlp

    def mlp_projection(self, module: nn.Module, layer: int, which: str = "up") -> nn.Module:
        if which not in ("up", "gate"):
            raise ValueError(f"Llama's feed-forward has 'up' and 'gate' projections, not {which!r}")
        projection = getattr(self._layer(module, layer).mlp, f"{which}_proj", None)
        if not isinstance(projection, nn.Module):
            raise ValueError(f"layer {layer}'s feed-forward was replaced by install_mlp; it has no {which} projection")
        return projection

    def _layer(self, module: nn.Module, layer: int) -> nn.Module:
        n = self.config.num_hidden_layers
        if not 0 <= layer < n:
            raise IndexError(f"layer {layer} out of range: this Llama has {n} layers")
        return module.model.layers[layer]

    # ------------------------------------------------------------ map

    def arch_map(self) -> ArchitectureMap:
        if self._map is None:
            cfg = self.config
            features = {ATTENTION, ROPE, MLP, GATED_MLP}
            if cfg.num_key_value_heads < cfg.num_attention_heads:
                features.add(GQA)
            self._map = ArchitectureMap(
                family=self.name,
                layers=tuple(self._layer_map(i) for i in range(cfg.num_hidden_layers)),
                embeddings=(EMBEDDING,),
                final_norms=("model.norm.weight",),
                features=frozenset(features),
                # Tied: the embedding doubles as the head and is listed once, under embeddings.
                head=() if self.tied else (LM_HEAD,),
            )
        return self._map

    def _layer_map(self, i: int) -> LayerMap:
        cfg = self.config
        p = f"model.layers.{i}."
        attn_bias = bool(getattr(cfg, "attention_bias", False))
        mlp_bias = bool(getattr(cfg, "mlp_bias", False))

        def bias(name: str, present: bool) -> str | None:
            return p + name + ".bias" if present else None

        attention = AttentionMap(
            num_heads=cfg.num_attention_heads,
            head_dim=self.head_dim_of(cfg),
            num_kv_heads=cfg.num_key_value_heads,
            q=p + "self_attn.q_proj.weight",
            k=p + "self_attn.k_proj.weight",
            v=p + "self_attn.v_proj.weight",
            o=p + "self_attn.o_proj.weight",
            q_bias=bias("self_attn.q_proj", attn_bias),
            k_bias=bias("self_attn.k_proj", attn_bias),
            v_bias=bias("self_attn.v_proj", attn_bias),
            o_bias=bias("self_attn.o_proj", attn_bias),
            rope="half",
        )
        mlp = MLPMap(
            up=p + "mlp.up_proj.weight",
            gate=p + "mlp.gate_proj.weight",
            down=p + "mlp.down_proj.weight",
            up_bias=bias("mlp.up_proj", mlp_bias),
            gate_bias=bias("mlp.gate_proj", mlp_bias),
            down_bias=bias("mlp.down_proj", mlp_bias),
            activation=cfg.hidden_act,
        )
        norms = (p + "input_layernorm.weight", p + "post_attention_layernorm.weight")
        return LayerMap(index=i, attention=attention, mlp=mlp, norms=norms, prefix=p)


def _hide_tied_head(model: nn.Module) -> None:
    """Make ``state_dict()`` omit the tied ``lm_head.weight`` and loading not require it.

    The head stays tied: it is the embedding's Parameter, so loading the embedding loads the head.
    The hooks are module-level functions so that the module stays picklable and deep-copyable.
    """
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        raise ValueError("tie_word_embeddings is set but transformers did not tie lm_head to embed_tokens")
    model.register_state_dict_post_hook(_drop_tied_head)
    model.register_load_state_dict_post_hook(_tied_head_not_missing)


def _drop_tied_head(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
    state.pop(prefix + LM_HEAD, None)


def _tied_head_not_missing(module: nn.Module, incompatible: Any) -> None:
    missing = incompatible.missing_keys
    for key in [k for k in missing if k == LM_HEAD or k.endswith("." + LM_HEAD)]:
        missing.remove(key)

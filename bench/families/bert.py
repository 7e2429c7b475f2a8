"""BERT encoders (``transformers.BertModel`` without pooler): all-MiniLM-L6-v2 and tiny test configs.

Body keys are those of ``BertModel(config, add_pooling_layer=False).state_dict()``:
``embeddings.*`` and ``encoder.layer.{i}.*``. Per layer the map exposes separate Q/K/V/O tensors with
biases (no RoPE, no GQA) and a two-matrix feed-forward ``output.dense(act(intermediate.dense x))``.
BERT is post-LN: ``attention.output.LayerNorm`` and ``output.LayerNorm`` follow the residual sums.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import transformers
from torch import nn

from bench.families.base import ATTENTION, MLP, ArchitectureMap, AttentionMap, LayerMap, MLPMap
from bench.families.family import Family
from bench.registry import families


@families.register()
class BertFamily(Family):
    """``transformers.BertModel`` (no pooling layer) for one ``BertConfig``.

    ``init_seed`` makes `new_module` deterministic (tiny test models); the global RNG is left alone.
    """

    name = "bert"
    hf_model_types = ("bert",)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], keys: Sequence[str] | None) -> tuple[BertFamily, str]:
        # BertFor* task models nest the encoder under "bert."; a bare BertModel (sentence-transformers) does not.
        if keys is not None:
            key_prefix = "bert." if any(k.startswith("bert.") for k in keys) else ""
        else:
            architectures = config.get("architectures") or ["BertModel"]
            key_prefix = "" if architectures[0] == "BertModel" else "bert."
        return cls(transformers.BertConfig.from_dict(dict(config))), key_prefix

    def __init__(self, config: transformers.BertConfig, init_seed: int | None = None) -> None:
        if not isinstance(config.hidden_act, str):
            raise ValueError("BertFamily needs config.hidden_act to be an activation name such as 'gelu'")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not divisible by num_attention_heads {config.num_attention_heads}"
            )
        self.config = config
        self.init_seed = init_seed
        self._map: ArchitectureMap | None = None

    @classmethod
    def tiny(cls, seed: int = 0) -> BertFamily:
        """A 2-layer, hidden-32, 4-head, FFN-64 BERT whose fresh modules are initialised from ``seed``."""
        config = transformers.BertConfig(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            hidden_act="gelu",
        )
        return cls(config, init_seed=seed)

    # ------------------------------------------------------------ module

    def new_module(self) -> nn.Module:
        if self.init_seed is None:
            return transformers.BertModel(self.config, add_pooling_layer=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            return transformers.BertModel(self.config, add_pooling_layer=False)

    def install_mlp(self, module: nn.Module, layer: int, mlp: nn.Module) -> None:
        """``layer.intermediate = mlp``; ``layer.output.dense`` becomes the identity.

        BertOutput then applies dropout, the residual sum and its LayerNorm to ``mlp``'s output, so
        ``mlp`` must return ``down(act(up x))`` including the down bias.
        """
        block = self._layer(module, layer)
        block.intermediate = mlp
        block.output.dense = nn.Identity()

    def mlp_projection(self, module: nn.Module, layer: int, which: str = "up") -> nn.Module:
        if which != "up":
            raise ValueError(f"BERT feed-forward has no {which!r} projection; only 'up' (intermediate.dense)")
        projection = getattr(self._layer(module, layer).intermediate, "dense", None)
        if not isinstance(projection, nn.Module):
            raise ValueError(f"layer {layer}'s feed-forward was replaced by install_mlp; it has no up projection")
        return projection

    def _layer(self, module: nn.Module, layer: int) -> nn.Module:
        n = self.config.num_hidden_layers
        if not 0 <= layer < n:
            raise IndexError(f"layer {layer} out of range: this BERT has {n} layers")
        return module.encoder.layer[layer]

    # ------------------------------------------------------------ map

    def arch_map(self) -> ArchitectureMap:
        if self._map is None:
            cfg = self.config
            layers = tuple(self._layer_map(i) for i in range(cfg.num_hidden_layers))
            self._map = ArchitectureMap(
                family=self.name,
                layers=layers,
                # The embedding LayerNorm belongs to the embedding module (it normalises their sum).
                embeddings=(
                    "embeddings.word_embeddings.weight",
                    "embeddings.position_embeddings.weight",
                    "embeddings.token_type_embeddings.weight",
                    "embeddings.LayerNorm.weight",
                    "embeddings.LayerNorm.bias",
                ),
                features=frozenset({ATTENTION, MLP}),
            )
        return self._map

    def _layer_map(self, i: int) -> LayerMap:
        cfg = self.config
        p = f"encoder.layer.{i}."
        heads = cfg.num_attention_heads
        attention = AttentionMap(
            num_heads=heads,
            head_dim=cfg.hidden_size // heads,
            num_kv_heads=heads,
            q=p + "attention.self.query.weight",
            k=p + "attention.self.key.weight",
            v=p + "attention.self.value.weight",
            q_bias=p + "attention.self.query.bias",
            k_bias=p + "attention.self.key.bias",
            v_bias=p + "attention.self.value.bias",
            o=p + "attention.output.dense.weight",
            o_bias=p + "attention.output.dense.bias",
        )
        mlp = MLPMap(
            up=p + "intermediate.dense.weight",
            up_bias=p + "intermediate.dense.bias",
            down=p + "output.dense.weight",
            down_bias=p + "output.dense.bias",
            activation=cfg.hidden_act,
        )
        norms = tuple(p + f"{m}.LayerNorm.{t}" for m in ("attention.output", "output") for t in ("weight", "bias"))
        return LayerMap(index=i, attention=attention, mlp=mlp, norms=norms, prefix=p)

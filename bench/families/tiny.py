"""Tiny random-init models of every transformer family, for tests (built in-process, in milliseconds).

``tiny(name, seed) -> (family, state)`` and ``tiny_inputs(name, seed) -> forward kwargs`` for

- ``"bert"``: `BertFamily.tiny`'s sizes (2 layers, hidden 32, 4 heads, FFN 64, vocab 128);
- ``"clip-vision"``: HF CLIP vision tower, 2 layers, hidden 32, 4 heads, FFN 64, QuickGELU,
  16x16 images in 8x8 patches (5 tokens), keys under ``vision_model.``;
- ``"llama"``: 2 layers, hidden 32, 4 query heads and 2 kv heads (GQA) of dim 8, RoPE, SwiGLU FFN 48,
  vocab 64, tied embeddings (as SmolLM2);
- ``"open-clip-vit"``: open_clip ViT, 2 layers, width 32, 4 heads, FFN 128, QuickGELU, 16x16 images,
  8x8 patches, output 16. Only the state dict: its module needs open_clip (the ``[clip]`` extra).

The states are deterministic in ``seed`` and leave the global RNG alone. Weights are scaled so that
attention is far from uniform, and every 1-D tensor (biases, norm weights, embeddings of one
vector) is moved off its initial 0 / 1, so a defense or attack that forgets a bias, a norm or a
head's scores changes outputs by much more than test tolerances. ``**overrides`` change the
configuration (e.g. ``tiny("llama", tie_word_embeddings=False)``, ``tiny("open-clip-vit", prefix="visual.")``).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

from bench.families.family import Family
from bench.weights import StateDict

TINY_NAMES = ("bert", "clip-vision", "llama", "open-clip-vit")

_IMAGE = 16
_SEQ = 8
_CONFIGS: dict[str, dict[str, Any]] = {
    "bert": dict(initializer_range=0.2),  # on top of BertFamily.tiny()'s sizes
    "clip-vision": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=_IMAGE,
        patch_size=8,
        hidden_act="quick_gelu",
        initializer_factor=2.0,
    ),
    "llama": dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        hidden_act="silu",
        tie_word_embeddings=True,
        initializer_range=0.2,
    ),
    "open-clip-vit": dict(
        width=32,
        layers=2,
        heads=4,
        mlp_ratio=4.0,
        patch_size=8,
        image_size=_IMAGE,
        output_dim=16,
        activation="quick_gelu",
    ),
}


def tiny_family(name: str, **overrides: Any) -> Family:
    """The family of ``tiny(name)`` without weights."""
    if name == "bert":
        from bench.families.bert import BertFamily

        config = BertFamily.tiny().config.to_dict()
        return BertFamily(transformers.BertConfig.from_dict({**config, **_CONFIGS[name], **overrides}))
    if name == "clip-vision":
        from bench.families.clip import ClipVisionFamily

        kw = {**_CONFIGS[name], **overrides}
        prefix = kw.pop("prefix", "vision_model.")
        return ClipVisionFamily(transformers.CLIPVisionConfig(**kw), prefix=prefix)
    if name == "llama":
        from bench.families.llama import LlamaFamily

        return LlamaFamily(transformers.LlamaConfig(**{**_CONFIGS[name], **overrides}))
    if name == "open-clip-vit":
        from bench.families.open_clip import OpenClipVisionFamily

        return OpenClipVisionFamily(**{**_CONFIGS[name], **overrides})
    raise ValueError(f"no tiny model {name!r}; choose one of {', '.join(TINY_NAMES)}")


def tiny(name: str, seed: int = 0, **overrides: Any) -> tuple[Family, StateDict]:
    """A tiny family and a deterministic random body for it."""
    family = tiny_family(name, **overrides)
    if name == "open-clip-vit":
        state = _open_clip_state(family.state_shapes(), family.width, seed)  # type: ignore[attr-defined]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = family.new_module()
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return family, _move_vectors(state, seed)


def tiny_inputs(name: str, seed: int = 0, batch: int = 2) -> dict[str, torch.Tensor]:
    """Probe inputs for a forward pass of ``tiny(name)``'s module, as keyword arguments.

    Text models get token ids (BERT also an attention mask whose last row pads its last 3 tokens);
    vision models get images: ``pixel_values`` (HF) or ``x`` (open_clip's ``VisionTransformer.forward``).
    """
    g = torch.Generator().manual_seed(10_000 + seed)
    if name in ("bert", "llama"):
        vocab = tiny_family(name).config.vocab_size  # type: ignore[attr-defined]
        ids = torch.randint(0, vocab, (batch, _SEQ), generator=g)
        if name == "llama":
            return {"input_ids": ids}
        mask = torch.ones(batch, _SEQ, dtype=torch.long)
        mask[-1, -3:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    if name in ("clip-vision", "open-clip-vit"):
        images = torch.randn(batch, 3, _IMAGE, _IMAGE, generator=g)
        return {"pixel_values": images} if name == "clip-vision" else {"x": images}
    raise ValueError(f"no tiny model {name!r}; choose one of {', '.join(TINY_NAMES)}")


def _move_vectors(state: StateDict, seed: int) -> StateDict:
    """Add N(0, 0.1²) to every floating 1-D tensor (zero biases, unit norm weights), seeded."""
    g = torch.Generator().manual_seed(20_000 + seed)
    out = {}
    for key in sorted(state):
        t = state[key]
        if t.is_floating_point() and t.dim() == 1:
            t = t + 0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype)
        out[key] = t
    return {k: out[k] for k in state}


def _open_clip_state(shapes: dict[str, tuple[int, ...]], width: int, seed: int) -> StateDict:
    """open_clip-like init: weights N(0, 1/fan_in), embeddings and ``proj`` N(0, 1/width), biases 0, norms 1."""
    g = torch.Generator().manual_seed(seed)
    state: StateDict = {}
    for key, shape in shapes.items():
        if len(shape) == 1 and (key.endswith(".bias") or key.endswith("_bias")):
            state[key] = torch.zeros(shape)
        elif len(shape) == 1 and key.endswith(".weight"):
            state[key] = torch.ones(shape)
        elif key.endswith(("class_embedding", "positional_embedding", "proj")):
            state[key] = torch.randn(shape, generator=g) * width**-0.5
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            state[key] = torch.randn(shape, generator=g) * fan_in**-0.5
    return state

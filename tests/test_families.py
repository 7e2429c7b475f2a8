"""Architecture maps of the HF CLIP vision, Llama and open_clip ViT families, pinned against real modules.

Every attention and MLP output is recomputed from the map's tensors alone (get_qkv, o, up/gate/down,
the activation named by the map, RoPE from the map's pairing) and compared with the module's own
submodule output, captured with hooks. open_clip itself is an optional extra (it needs torchvision),
so its fused ``in_proj`` layout is pinned against `RefViT` below: a tower with open_clip's key names
built on ``nn.MultiheadAttention``, as open_clip's ``ResidualAttentionBlock`` is.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from torch import nn
from transformers.activations import ACT2FN

from bench.families.base import FUSED_QKV, GATED_MLP, GQA, ROPE, ArchitectureMap, AttentionMap, MLPMap, get_qkv, set_qkv
from bench.families.clip import ClipVisionFamily
from bench.families.family import Family
from bench.families.hf import (
    UnsupportedModelError,
    detect_family,
    replace_body,
    select_body,
)
from bench.families.llama import LlamaFamily
from bench.families.open_clip import OpenClipVisionFamily
from bench.families.prefixed import Prefixed
from bench.families.tiny import TINY_NAMES, tiny, tiny_inputs
from bench.registry import families
from bench.suite import MissingAssetError
from bench.weights import CheckpointError, StateDict, load_state, open_checkpoint, save_state

ATOL = 1e-5


def load_body(path: str | os.PathLike) -> tuple[Family, StateDict, str]:
    """(family, body, key_prefix) of a Hugging Face model directory."""
    family, key_prefix = detect_family(path)
    return family, select_body(open_checkpoint(path), family, key_prefix), key_prefix


# ---------------------------------------------------------------- a reference open_clip ViT


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class RefBlock(nn.Module):
    """open_clip's ``ResidualAttentionBlock`` (no LayerScale): sequence-first nn.MultiheadAttention."""

    def __init__(self, d: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(d, mlp_width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(mlp_width, d))])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(RefBlock(d, heads, mlp_width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(0, 1)  # NLD -> LND, as open_clip
        for block in self.resblocks:
            x = block(x)
        return x.transpose(0, 1)


class RefViT(nn.Module):
    """open_clip's ``VisionTransformer`` forward (class-token pooling, ``pooled @ proj``)."""

    def __init__(self, family: OpenClipVisionFamily) -> None:
        super().__init__()
        d, grid = family.width, family.image_size // family.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, d))
        self.proj = nn.Parameter(torch.zeros(d, family.output_dim))
        self.conv1 = nn.Conv2d(3, d, family.patch_size, family.patch_size, bias=False)
        self.ln_pre = nn.LayerNorm(d)
        self.transformer = RefTransformer(d, family.layers, family.heads, family.mlp_width)
        self.ln_post = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)[:, 0] @ self.proj


def build(name: str, seed: int = 0, **overrides) -> tuple[object, dict, nn.Module]:
    """(family, state, module in eval mode carrying state); open_clip through `RefViT`."""
    family, state = tiny(name, seed, **overrides)
    if name == "open-clip-vit":
        module = RefViT(family)
        if family.prefix:
            module = Prefixed(module, family.prefix)
        module.load_state_dict(state, strict=True)
        return family, state, module.eval()
    return family, state, family.build(state)


def run(name: str, module: nn.Module, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        out = module(**tiny_inputs(name, seed))
    return out if isinstance(out, torch.Tensor) else out[0]


def blocks(name: str, family, module: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(attention submodule, MLP submodule) per layer."""
    if name == "clip-vision":
        return [(lay.self_attn, lay.mlp) for lay in family.vision_model(module).encoder.layers]
    if name == "llama":
        return [(lay.self_attn, lay.mlp) for lay in module.model.layers]
    ref = module.inner if isinstance(module, Prefixed) else module
    return [(blk.attn, blk.mlp) for blk in ref.transformer.resblocks]


def capture(submodule: nn.Module, run_model) -> tuple[torch.Tensor, torch.Tensor]:
    """(input hidden states, output) of one call of ``submodule`` while ``run_model()`` runs."""
    seen: dict[str, torch.Tensor] = {}

    def hook(mod, args, kwargs, output):
        seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen["y"] = output[0] if isinstance(output, tuple) else output

    handle = submodule.register_forward_hook(hook, with_kwargs=True)
    try:
        run_model()
    finally:
        handle.remove()
    return seen["x"], seen["y"]


# ---------------------------------------------------------------- recomputation from the map alone


def apply_rope(x: torch.Tensor, att: AttentionMap, theta: float) -> torch.Tensor:
    """Rotate the map's dimension pairs of x [B, H, T, hd]; pair r turns at frequency theta^(-2r/hd)."""
    pos = torch.arange(x.shape[2], dtype=torch.float32)
    out = x.clone()
    for r, (i, j) in enumerate(att.rope_pairs()):
        angle = pos * theta ** (-2 * r / att.head_dim)
        cos, sin = angle.cos(), angle.sin()
        out[..., i] = x[..., i] * cos - x[..., j] * sin
        out[..., j] = x[..., j] * cos + x[..., i] * sin
    return out


def attention_from_map(
    state: dict, att: AttentionMap, x: torch.Tensor, *, causal: bool = False, theta: float | None = None
) -> torch.Tensor:
    """Multi-head attention of x [B, T, d] computed only from the map's tensors and head layout."""
    wq, wk, wv, (bq, bk, bv) = get_qkv(state, att)
    b, t, _ = x.shape

    def heads(w, bias, n):
        return F.linear(x, w, bias).view(b, t, n, att.head_dim).transpose(1, 2)

    q, k, v = heads(wq, bq, att.num_heads), heads(wk, bk, att.num_kv_heads), heads(wv, bv, att.num_kv_heads)
    if att.rope:
        q, k = apply_rope(q, att, theta), apply_rope(k, att, theta)
    kv_of = torch.arange(att.num_heads) // att.group_size  # query head h reads kv head h // group_size
    scores = q @ k[:, kv_of].transpose(-1, -2) / att.head_dim**0.5
    if causal:
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    ctx = (scores.softmax(-1) @ v[:, kv_of]).transpose(1, 2).reshape(b, t, -1)
    return F.linear(ctx, state[att.o], state[att.o_bias] if att.o_bias else None)


def mlp_from_map(state: dict, mlp: MLPMap, x: torch.Tensor) -> torch.Tensor:
    def opt(name):
        return state[name] if name else None

    hidden = ACT2FN[mlp.activation](
        F.linear(x, state[mlp.gate or mlp.up], opt(mlp.gate_bias if mlp.gate else mlp.up_bias))
    )
    if mlp.gate:
        hidden = hidden * F.linear(x, state[mlp.up], opt(mlp.up_bias))
    return F.linear(hidden, state[mlp.down], opt(mlp.down_bias))


class MapMLP(nn.Module):
    """A feed-forward computed from the map's tensors (what install_mlp must accept)."""

    def __init__(self, state: dict, mlp: MLPMap) -> None:
        super().__init__()
        self.state, self.mlp = {k: v.clone() for k, v in state.items()}, mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mlp_from_map(self.state, self.mlp, x)


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def map_tensors(arch: ArchitectureMap) -> set[str]:
    names = set(arch.embeddings) | set(arch.final_norms) | set(arch.head)
    for lay in arch.layers:
        names |= set(lay.norms)
        if lay.attention:
            a = lay.attention
            names |= {
                n
                for n in (a.q, a.k, a.v, a.o, a.q_bias, a.k_bias, a.v_bias, a.o_bias, a.fused_qkv, a.fused_qkv_bias)
                if n
            }
        if lay.mlp:
            names |= {n for n, _ in lay.mlp.hidden_tensors()} | ({lay.mlp.down_bias} if lay.mlp.down_bias else set())
    return names


FAMILIES = ["clip-vision", "llama", "open-clip-vit"]


# ---------------------------------------------------------------- maps vs modules


@pytest.mark.parametrize("name", FAMILIES)
def test_map_names_exactly_the_module_tensors_with_consistent_head_shapes(name):
    family, state, module = build(name)
    arch = family.arch_map()
    assert map_tensors(arch) == set(module.state_dict()) == set(state)
    d = state[arch.layers[0].attention.o].shape[0]
    for lay in arch.layers:
        att = lay.attention
        q, k, v, _ = get_qkv(state, att)
        assert q.shape == (att.num_heads * att.head_dim, d)
        assert k.shape == v.shape == (att.num_kv_heads * att.head_dim, d)
        assert state[att.o].shape == (d, att.num_heads * att.head_dim)
        assert arch.layer_of(att.o) == lay.index and all(arch.layer_of(n) == lay.index for n in lay.norms)


def test_llama_map_has_gqa_rope_half_pairing_and_gated_silu_mlp():
    family, state, module = build("llama")
    arch = family.arch_map()
    att, mlp = arch.layers[0].attention, arch.layers[0].mlp
    assert (att.num_heads, att.num_kv_heads, att.group_size, att.head_dim) == (4, 2, 2, 8)
    assert module.model.layers[0].self_attn.num_key_value_groups == att.group_size
    assert att.rope == "half" and att.rope_pairs()[:2] == [(0, 4), (1, 5)]
    assert {GQA, ROPE, GATED_MLP} <= arch.features and mlp.activation == "silu" and mlp.gate
    assert GQA not in tiny("llama", num_key_value_heads=4)[0].arch_map().features


def test_clip_and_open_clip_maps_name_quick_gelu_and_their_qkv_layout():
    clip_arch = tiny("clip-vision")[0].arch_map()
    oc_arch = tiny("open-clip-vit")[0].arch_map()
    assert clip_arch.layers[1].mlp.activation == oc_arch.layers[1].mlp.activation == "quick_gelu"
    assert clip_arch.layers[1].attention.q == "vision_model.encoder.layers.1.self_attn.q_proj.weight"
    assert oc_arch.layers[1].attention.fused_qkv == "transformer.resblocks.1.attn.in_proj_weight"
    assert FUSED_QKV in oc_arch.features and FUSED_QKV not in clip_arch.features


@pytest.mark.parametrize("name", FAMILIES)
def test_attention_recomputed_from_map_equals_module_attention(name):
    family, state, module = build(name)
    kw = {"causal": True, "theta": rope_theta(family.config)} if name == "llama" else {}
    for lay, (attn, _) in zip(family.arch_map().layers, blocks(name, family, module)):
        x, y = capture(attn, lambda: run(name, module))
        if name == "open-clip-vit":  # nn.MultiheadAttention is sequence-first: x is [T, B, d]
            mine = attention_from_map(state, lay.attention, x.transpose(0, 1)).transpose(0, 1)
        else:
            mine = attention_from_map(state, lay.attention, x, **kw)
        torch.testing.assert_close(mine, y, atol=ATOL, rtol=1e-4)


def test_llama_attention_without_rope_differs_from_module():
    # Control for the test above: the RoPE rotation is what makes the recomputation match.
    family, state, module = build("llama")
    att = family.arch_map().layers[0].attention
    x, y = capture(module.model.layers[0].self_attn, lambda: run("llama", module))
    no_rope = attention_from_map(state, AttentionMap(**{**att.__dict__, "rope": None}), x, causal=True)
    interleaved = attention_from_map(
        state, AttentionMap(**{**att.__dict__, "rope": "interleaved"}), x, causal=True, theta=rope_theta(family.config)
    )
    assert (no_rope - y).abs().max() > 1e-2 and (interleaved - y).abs().max() > 1e-2


@pytest.mark.parametrize("name", FAMILIES)
def test_mlp_recomputed_from_map_equals_module_mlp_and_up_projection(name):
    family, state, module = build(name)
    for lay, (_, mlp) in zip(family.arch_map().layers, blocks(name, family, module)):
        x, y = capture(mlp, lambda: run(name, module))
        torch.testing.assert_close(mlp_from_map(state, lay.mlp, x), y, atol=ATOL, rtol=1e-4)
        up_in, up_out = capture(family.mlp_projection(module, lay.index, "up"), lambda: run(name, module))
        bias = state[lay.mlp.up_bias] if lay.mlp.up_bias else None
        torch.testing.assert_close(up_out, F.linear(up_in, state[lay.mlp.up], bias), atol=ATOL, rtol=1e-4)


def test_llama_gate_projection_is_the_gate_tensor_and_others_have_none():
    family, state, module = build("llama")
    gate = family.mlp_projection(module, 1, "gate")
    assert gate.weight is module.model.layers[1].mlp.gate_proj.weight
    torch.testing.assert_close(gate.weight, state[family.arch_map().layers[1].mlp.gate], atol=0, rtol=0)
    clip_family, _, clip_module = build("clip-vision")
    with pytest.raises(ValueError, match="no 'gate' projection"):
        clip_family.mlp_projection(clip_module, 0, "gate")


# ---------------------------------------------------------------- install_mlp


@pytest.mark.parametrize("name", FAMILIES)
def test_install_mlp_with_the_same_function_leaves_model_outputs_unchanged(name):
    family, state, module = build(name)
    before = run(name, module)
    for lay in family.arch_map().layers:
        family.install_mlp(module, lay.index, MapMLP(state, lay.mlp))
    torch.testing.assert_close(run(name, module), before, atol=ATOL, rtol=1e-4)
    # Control: the installed module is really on the forward path.
    family.install_mlp(module, 0, MapMLP({k: v * 0 for k, v in state.items()}, family.arch_map().layers[0].mlp))
    assert (run(name, module) - before).abs().max() > 1e-3
    with pytest.raises(ValueError, match="replaced by install_mlp"):
        family.mlp_projection(module, 0, "up")


# ---------------------------------------------------------------- get_qkv / set_qkv


@pytest.mark.parametrize("name", FAMILIES)
def test_set_qkv_of_get_qkv_round_trips_exactly(name):
    _, state, _ = build(name)
    family = tiny(name)[0]
    copy = {k: v.clone() for k, v in state.items()}
    for lay in family.arch_map().layers:
        set_qkv(copy, lay.attention, *get_qkv(copy, lay.attention))
    assert all(torch.equal(copy[k], state[k]) for k in state)


def test_set_qkv_on_fused_in_proj_writes_q_k_v_row_blocks():
    family, state = tiny("open-clip-vit")
    att = family.arch_map().layers[0].attention
    d = family.width
    q, k, v, (bq, bk, bv) = get_qkv(state, att)
    set_qkv(state, att, q + 1, k + 2, v + 3, (bq + 1, bk + 2, bv + 3))
    fused, fused_bias = state[att.fused_qkv], state[att.fused_qkv_bias]
    for block, delta in enumerate((1, 2, 3)):
        rows = slice(block * d, (block + 1) * d)
        torch.testing.assert_close(fused[rows], (q, k, v)[block] + delta, atol=0, rtol=0)
        torch.testing.assert_close(fused_bias[rows], (bq, bk, bv)[block] + delta, atol=0, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_per_kv_group_qk_and_vo_rescaling_through_the_map_preserves_outputs(name):
    # Scale query head h's rows by a[g(h)] and kv head g's key rows by 1/a[g] (scores unchanged,
    # RoPE commutes with scalars), value rows of kv head g by c[g] and the output-projection columns of
    # every query head reading g by 1/c[g]. Exact only if the map's head, group and column layout is right.
    family, state, module = build(name)
    before = run(name, module)
    for lay in family.arch_map().layers:
        att = lay.attention
        q, k, v, (bq, bk, bv) = get_qkv(state, att)
        a = torch.linspace(0.5, 2.0, att.num_kv_heads)
        c = torch.linspace(3.0, 0.25, att.num_kv_heads)
        per_q = torch.arange(att.num_heads) // att.group_size
        q_scale = a[per_q].repeat_interleave(att.head_dim)
        k_scale, v_scale = (1 / a).repeat_interleave(att.head_dim), c.repeat_interleave(att.head_dim)
        scaled = [(w * s[:, None] if w is not None else None) for w, s in ((q, q_scale), (k, k_scale), (v, v_scale))]
        biases = tuple(b * s if b is not None else None for b, s in ((bq, q_scale), (bk, k_scale), (bv, v_scale)))
        set_qkv(state, att, *scaled, biases)
        state[att.o] = state[att.o] / c[per_q].repeat_interleave(att.head_dim)[None, :]
    module.load_state_dict(state)
    torch.testing.assert_close(run(name, module), before, atol=1e-4, rtol=1e-4)
    # Control: scaling queries alone changes the model.
    att = family.arch_map().layers[0].attention
    q, k, v, biases = get_qkv(state, att)
    set_qkv(state, att, q * 3, k, v, biases)
    module.load_state_dict(state)
    assert (run(name, module) - before).abs().max() > 1e-3


# ---------------------------------------------------------------- build round trips


@pytest.mark.parametrize("name", ["clip-vision", "llama"])
def test_build_carries_the_state_exactly(name):
    family, state, module = build(name)
    built = module.state_dict()
    assert set(built) == set(state) and all(torch.equal(built[k], state[k]) for k in state)
    assert not module.training


def test_tied_llama_body_has_no_lm_head_saves_and_reloads_with_tie_intact(tmp_path):
    family, state, module = build("llama")
    assert family.tied and "lm_head.weight" not in state and family.arch_map().head == ()
    assert module.lm_head.weight is module.model.embed_tokens.weight
    save_state(state, tmp_path / "body.safetensors")  # safetensors refuses shared storage: one name only
    reloaded = family.build(load_state(tmp_path / "body.safetensors"))
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    torch.testing.assert_close(run("llama", reloaded), run("llama", module), atol=0, rtol=0)
    copied = pickle.loads(pickle.dumps(module))  # executors may ship modules to other processes
    assert copied.lm_head.weight is copied.model.embed_tokens.weight and "lm_head.weight" not in copied.state_dict()
    strict = family.new_module()
    strict.load_state_dict(state, strict=True)  # the tied head is not reported missing
    torch.testing.assert_close(strict.lm_head.weight, state["model.embed_tokens.weight"], atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="lacks 1 tensor"):
        family.build({k: v for k, v in state.items() if k != "model.norm.weight"})


def test_untied_llama_body_keeps_its_own_lm_head():
    family, state, module = build("llama", tie_word_embeddings=False)
    assert not family.tied and family.arch_map().head == ("lm_head.weight",)
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    torch.testing.assert_close(module.lm_head.weight, state["lm_head.weight"], atol=0, rtol=0)
    assert module.lm_head.weight is not module.model.embed_tokens.weight


def test_clip_prefix_option_moves_every_key_and_keeps_the_function():
    family, state, module = build("clip-vision")
    flat_family, flat_state, flat_module = build("clip-vision", prefix="")
    assert all(k.startswith("vision_model.") for k in state)
    assert {"vision_model." + k for k in flat_state} == set(state)
    assert isinstance(flat_module, transformers.CLIPVisionModel) and isinstance(
        family.vision_model(module), transformers.CLIPVisionModel
    )
    module_from_flat = family.build({"vision_model." + k: v for k, v in flat_state.items()})
    torch.testing.assert_close(run("clip-vision", module_from_flat), run("clip-vision", flat_module), atol=0, rtol=0)
    assert module.config is family.vision_model(module).config  # the wrapper reads attributes through
    with pytest.raises(ValueError, match="must be empty or dotted identifiers"):
        ClipVisionFamily(family.config, prefix="vision_model")


# ---------------------------------------------------------------- open_clip specifics


def test_open_clip_state_shapes_equal_the_reference_tower_with_and_without_prefix():
    for prefix in ("", "model.visual."):
        family, state = tiny("open-clip-vit", prefix=prefix)
        ref = RefViT(family)
        ref_shapes = {prefix + k: tuple(v.shape) for k, v in ref.state_dict().items()}
        assert family.state_shapes() == ref_shapes
        assert {k: tuple(v.shape) for k, v in state.items()} == ref_shapes


def test_open_clip_state_shapes_equal_open_clip_vision_transformer():
    pytest.importorskip("open_clip", reason="open_clip is the optional [clip] extra")
    family = tiny("open-clip-vit")[0]
    module = family.new_module()
    assert family.state_shapes() == {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_open_clip_from_state_dict_infers_sizes_prefix_and_heads():
    family, state = tiny("open-clip-vit", prefix="model.visual.")
    inferred = OpenClipVisionFamily.from_state_dict(state, heads=4)
    sizes = ("width", "layers", "heads", "mlp_width", "patch_size", "image_size", "output_dim", "prefix")
    assert [getattr(inferred, s) for s in sizes] == [getattr(family, s) for s in sizes]
    assert inferred.arch_map() == family.arch_map()
    # Without heads, open_clip's head width of 64 decides: a 128-wide tower has 2 heads.
    wide = tiny("open-clip-vit", width=128)[1]
    assert OpenClipVisionFamily.from_state_dict(wide).heads == 2
    with pytest.raises(ValueError, match="LayerScale"):
        OpenClipVisionFamily.from_state_dict(
            {**state, "model.visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32)}
        )
    with pytest.raises(ValueError, match="found no"):
        OpenClipVisionFamily.from_state_dict(tiny("clip-vision")[1])


def test_open_clip_new_module_without_open_clip_names_the_clip_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    monkeypatch.setitem(sys.modules, "open_clip.transformer", None)
    with pytest.raises(MissingAssetError, match=r"pip install mergearena\[clip\]") as info:
        tiny("open-clip-vit")[0].new_module()
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- tiny fixtures and registry


def test_tiny_is_deterministic_per_seed_and_leaves_the_global_rng_alone():
    for name in TINY_NAMES:
        torch.manual_seed(123)
        expected_next = torch.rand(3)
        torch.manual_seed(123)
        _, a = tiny(name, seed=1)
        assert torch.equal(torch.rand(3), expected_next)
        _, b = tiny(name, seed=1)
        _, c = tiny(name, seed=2)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a)
        assert torch.equal(next(iter(tiny_inputs(name, 3).values())), next(iter(tiny_inputs(name, 3).values())))


def test_tiny_vectors_are_off_their_zero_and_one_initialisation():
    for name in TINY_NAMES:
        _, state = tiny(name)
        for key, t in state.items():
            if t.is_floating_point() and t.dim() == 1:
                assert (t - 0).abs().min() > 0 and (t - 1).abs().min() > 0, key


@pytest.mark.parametrize("name", ["bert", "clip-vision", "llama"])
def test_tiny_modules_run_on_tiny_inputs_with_non_uniform_attention(name):
    family, state = tiny(name)
    module = family.build(state)
    module.config._attn_implementation = "eager"
    with torch.no_grad():
        out = module(**tiny_inputs(name), output_attentions=True)
    assert torch.isfinite(out[0]).all()
    tokens = out.attentions[0].shape[-1]
    assert out.attentions[0].max(-1).values.mean() > 2.0 / tokens  # far from uniform attention


def test_families_are_registered_under_their_names():
    assert families.get("clip-vision") is ClipVisionFamily
    assert families.get("llama") is LlamaFamily
    assert families.get("open-clip-vit") is OpenClipVisionFamily
    assert [families.get(n).name for n in ("clip-vision", "llama", "open-clip-vit")] == [
        "clip-vision",
        "llama",
        "open-clip-vit",
    ]


# ---------------------------------------------------------------- Hugging Face directories


def _assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_detect_family_on_a_transformers5_clip_vision_dir_uses_flat_keys(tmp_path):
    family, state = tiny("clip-vision", prefix="")
    family.build(state).save_pretrained(tmp_path)
    detected, key_prefix = detect_family(tmp_path)
    assert isinstance(detected, ClipVisionFamily) and (detected.prefix, key_prefix) == ("", "")
    assert detected.arch_map() == family.arch_map()
    _, body, _ = load_body(tmp_path)
    _assert_same_state(body, state)


def test_detect_family_on_a_vision_model_prefixed_clip_vision_dir(tmp_path):
    # transformers 4 saved CLIPVisionModel (e.g. FusionBench experts) with keys under "vision_model.".
    family, state = tiny("clip-vision")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    config = {**family.config.to_dict(), "model_type": "clip_vision_model", "transformers_version": "4.40.0"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    detected, key_prefix = detect_family(tmp_path)
    assert (detected.prefix, key_prefix) == ("vision_model.", "")
    _assert_same_state(load_body(tmp_path)[1], state)
    assert detect_family(tmp_path / "config.json")[0].prefix == "vision_model."  # config only: version decides


def test_detect_family_on_a_full_clip_dir_selects_the_vision_tower_only(tmp_path):
    vision = tiny("clip-vision")[0].config
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=64,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    config = transformers.CLIPConfig(vision_config=vision.to_dict(), text_config=text, projection_dim=16)
    model = transformers.CLIPModel(config)
    model.save_pretrained(tmp_path)
    family, key_prefix = detect_family(tmp_path)
    assert isinstance(family, ClipVisionFamily) and (family.prefix, key_prefix) == ("vision_model.", "")
    assert ClipVisionFamily(config).arch_map() == family.arch_map()  # a full CLIPConfig maps its vision tower
    _, body, _ = load_body(tmp_path)
    full = model.state_dict()
    _assert_same_state(body, {k: v for k, v in full.items() if k.startswith("vision_model.")})
    merged = replace_body(full, {k: v + 1 for k, v in body.items()})
    assert torch.equal(merged["text_projection.weight"], full["text_projection.weight"])
    assert torch.equal(merged["vision_model.post_layernorm.bias"], full["vision_model.post_layernorm.bias"] + 1)


def test_detect_family_on_a_tied_llama_dir(tmp_path):
    family, state, module = build("llama")
    module.save_pretrained(tmp_path)
    detected, key_prefix = detect_family(tmp_path)
    assert isinstance(detected, LlamaFamily) and detected.tied and key_prefix == ""
    assert detected.arch_map() == family.arch_map()
    _, body, _ = load_body(tmp_path)
    _assert_same_state(body, state)


def test_detect_family_on_bert_dirs_finds_the_bert_prefix_of_task_models(tmp_path):
    family, state = tiny("bert")
    family.build(state).save_pretrained(tmp_path / "base")
    assert detect_family(tmp_path / "base")[1] == ""
    _assert_same_state(load_body(tmp_path / "base")[1], state)
    classifier = transformers.BertForSequenceClassification(family.config)
    classifier.save_pretrained(tmp_path / "cls")
    detected, key_prefix = detect_family(tmp_path / "cls")
    assert detected.name == "bert" and key_prefix == "bert."
    body = load_body(tmp_path / "cls")[1]
    assert set(body) == set(state)  # pooler and classifier stay out of the body
    assert torch.equal(
        body["encoder.layer.0.output.dense.weight"], classifier.bert.encoder.layer[0].output.dense.weight
    )
    assert (
        detect_family({"model_type": "bert", **family.config.to_dict(), "architectures": ["BertForMaskedLM"]})[1]
        == "bert."
    )


def test_detect_family_accepts_config_objects_and_rejects_unknown_types_in_one_line(tmp_path):
    assert isinstance(detect_family(tiny("llama")[0].config)[0], LlamaFamily)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError) as info:
        detect_family(tmp_path)
    message = str(info.value)
    assert "'gpt2'" in message and "bert, clip, clip_vision_model, llama" in message and "\n" not in message
    with pytest.raises(CheckpointError, match="no config.json"):
        detect_family(tmp_path / "missing")


def test_select_body_names_missing_tensors():
    family, state = tiny("clip-vision")
    with pytest.raises(CheckpointError, match="lacks 1 of the clip-vision body's 39 tensors"):
        select_body({k: v for k, v in state.items() if k != "vision_model.post_layernorm.bias"}, family)

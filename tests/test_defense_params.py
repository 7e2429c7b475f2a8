"""PaRaMS (ICCV 2025): exact function preservation, the optimal rearrangement, the scaling rules, the dropout variant."""

from __future__ import annotations

import itertools

import pytest
import torch
from linear_defense_helpers import context, forward, max_abs_diff, minilm_case, tiny_case

from bench.families.base import ArchitectureMap, LayerMap, MLPMap
from bench.families.efficientnet import EfficientNetFamily
from bench.params import ParamError, parse_params
from bench.registry import defenses
from bench.suite import Expert
from bench.weights import l2_distance
from defenses._linear import HeadTransform, expand_rope_pairs, transform_attention, uniform
from defenses.params import PaRaMS, PaRaMSDropout, PaRaMSDropoutParams, PaRaMSParams, dare, sample_scaling

TRANSFORMERS = ("bert", "clip-vision", "llama", "open-clip-vit")
RTOL = 1e-5
"""Float32 tolerance relative to the output's largest magnitude (one rounding of each scaled weight)."""


def protect(name: str, params: PaRaMSParams | None = None, seed: int = 0):
    family, base, expert, inputs = tiny_case(name)
    art = PaRaMS(params).protect(expert, context(family, base, seed=seed))
    return family, base, expert, inputs, art


def mlp_inner_product(a, b, mlp: MLPMap) -> float:
    """Inner product of two states over one block's projection weights, computed from the tensors themselves."""
    names = [mlp.up, mlp.down] + [n for n in (mlp.up_bias, mlp.gate, mlp.gate_bias) if n]
    return sum(float((a[n].double() * b[n].double()).sum()) for n in names)


# ---------------------------------------------------------------- function preservation


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_params_preserves_outputs_of_tiny_transformers(name: str) -> None:
    family, base, expert, inputs, art = protect(name)
    ref = forward(family, expert.body, inputs)
    diff = max_abs_diff(forward(family, art.state, inputs), ref)
    print(f"{name}: max |protected - expert| = {diff:.2e} (outputs up to {ref.abs().max():.2f})")
    assert diff <= RTOL * float(ref.abs().max())
    # Both parts really ran: every MLP and attention block changed.
    arch = family.arch_map()
    assert art.notes["permuted_blocks"] == len(arch.mlp_layers())
    assert art.notes["scaled_attention_layers"] == len(arch.attention_layers())
    for layer in arch.layers:
        assert not torch.equal(art.state[layer.mlp.up], expert.body[layer.mlp.up])
        assert not torch.equal(art.state[layer.attention.o], expert.body[layer.attention.o])


def test_params_moves_weights_far_from_pretrained() -> None:
    family, base, expert, _, art = protect("clip-vision")
    expert_distance, artifact_distance = l2_distance(expert.body, base), l2_distance(art.state, base)
    print(f"L2 to θ_pre: expert {expert_distance:.2f}, artifact {artifact_distance:.2f}")
    assert artifact_distance > 20 * expert_distance
    assert art.notes["l2_to_pre"] == pytest.approx(artifact_distance)
    assert art.notes["expert_l2_to_pre"] == pytest.approx(expert_distance)


def test_params_permutes_efficientnet_channels_preserving_outputs() -> None:
    family = EfficientNetFamily(image_size=32)
    base = family.load_pretrained()
    g = torch.Generator().manual_seed(0)
    # Multiplicative noise keeps BatchNorm variances positive.
    expert = Expert({k: v * (1 + 0.05 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
                     for k, v in base.items()}, {})
    art = PaRaMS().protect(expert, context(family, base))
    images = torch.randn(2, 3, 32, 32, generator=g)
    ref = forward(family, expert.body, {"pixel_values": images})
    diff = max_abs_diff(forward(family, art.state, {"pixel_values": images}), ref)
    print(f"efficientnet-lite0: max |protected - expert| = {diff:.2e} (outputs up to {ref.abs().max():.2f})")
    assert diff <= RTOL * float(ref.abs().max())
    assert art.notes["scaling"] == "n/a: no attention in the map"
    assert art.notes["permuted_blocks"] == len(family.arch_map().mlp_layers()) > 0
    # The channelwise tensors (BatchNorm statistics, depthwise kernels) moved with their channels.
    block = family.arch_map().mlp_layers()[-1].mlp
    for name in block.hidden_channelwise:
        assert not torch.equal(art.state[name], expert.body[name])
        assert torch.equal(art.state[name].sort(dim=0).values, expert.body[name].sort(dim=0).values)


@pytest.mark.slow
def test_params_preserves_real_minilm_outputs_and_moves_far() -> None:
    family, base, expert, inputs = minilm_case()
    art = PaRaMS().protect(expert, context(family, base))
    ref = forward(family, expert.body, inputs)
    diff = max_abs_diff(forward(family, art.state, inputs), ref)
    print(f"MiniLM: max diff {diff:.2e}; L2 to θ_pre: expert {art.notes['expert_l2_to_pre']:.1f}, "
          f"artifact {art.notes['l2_to_pre']:.1f}")
    assert diff <= RTOL * float(ref.abs().max())
    assert art.notes["l2_to_pre"] > 20 * art.notes["expert_l2_to_pre"]


# ---------------------------------------------------------------- the rearrangement


def test_rearrangement_is_the_exact_minimiser_of_the_inner_product_with_pretrained() -> None:
    # A 6-unit MLP: all 720 orders can be tried.
    g = torch.Generator().manual_seed(3)
    mlp = MLPMap(up="up", up_bias="up_b", down="down", activation="gelu")
    arch = ArchitectureMap(family="toy", layers=(LayerMap(index=0, mlp=mlp),))
    base = {"up": torch.randn(6, 4, generator=g), "up_b": torch.randn(6, generator=g), "down": torch.randn(4, 6, generator=g)}
    expert = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    ctx = context(None, base, arch=arch)
    art = PaRaMS(PaRaMSParams(scale=False)).protect(Expert(expert, {}), ctx)

    def permuted(order: tuple[int, ...]) -> dict[str, torch.Tensor]:
        idx = torch.tensor(order)
        return {"up": expert["up"][idx], "up_b": expert["up_b"][idx], "down": expert["down"][:, idx]}

    every = [mlp_inner_product(permuted(o), base, mlp) for o in itertools.permutations(range(6))]
    chosen = mlp_inner_product(art.state, base, mlp)
    assert chosen == pytest.approx(min(every), abs=1e-9)
    assert chosen < mlp_inner_product(expert, base, mlp)
    assert art.notes["mlp_inner_product_with_pre_after"] == pytest.approx(chosen)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_rearrangement_beats_identity_and_random_orders(name: str) -> None:
    family, base, expert, _, art = protect(name, PaRaMSParams(scale=False))
    g = torch.Generator().manual_seed(0)
    for layer in family.arch_map().mlp_layers():
        mlp = layer.mlp
        chosen = mlp_inner_product(art.state, base, mlp)
        identity = mlp_inner_product(expert.body, base, mlp)
        width = expert.body[mlp.up].shape[0]
        randoms = []
        for _ in range(50):
            idx = torch.randperm(width, generator=g)
            shuffled = {n: expert.body[n].index_select(d, idx) for n, d in mlp.hidden_tensors()}
            randoms.append(mlp_inner_product(shuffled, base, mlp))
        print(f"{name} layer {layer.index}: identity {identity:.2f}, best random {min(randoms):.2f}, PaRaMS {chosen:.2f}")
        assert chosen < min(randoms) < identity


# ---------------------------------------------------------------- the scaling rules


def test_rope_scaling_shares_alpha_within_each_rotary_pair() -> None:
    family, _, _, _ = tiny_case("llama")
    att = family.arch_map().layers[0].attention
    t = sample_scaling(att, 0.05, 20.0, torch.Generator().manual_seed(0))
    alpha = torch.diagonal(t.qk, dim1=-2, dim2=-1)
    for i, j in att.rope_pairs():
        assert torch.equal(alpha[:, i], alpha[:, j])
    assert len(set(alpha.flatten().tolist())) == att.num_kv_heads * att.head_dim // 2  # otherwise independent


def test_per_dimension_alpha_would_break_rope_outputs() -> None:
    # The rule matters: scaling the two dims of a rotary pair differently changes the scores.
    family, _, expert, inputs = tiny_case("llama")
    ref = forward(family, expert.body, inputs)

    def scaled(tied: bool) -> torch.Tensor:
        state, g = dict(expert.body), torch.Generator().manual_seed(0)
        for layer in family.arch_map().attention_layers():
            att = layer.attention
            shape = (att.num_kv_heads, att.head_dim)
            alpha = expand_rope_pairs(uniform(shape[:1] + (att.head_dim // 2,), 0.05, 20, g), att) if tied \
                else uniform(shape, 0.05, 20, g)
            transform_attention(state, att, HeadTransform.diagonal(alpha, None))
        return forward(family, state, inputs)

    tied_diff, naive_diff = max_abs_diff(scaled(True), ref), max_abs_diff(scaled(False), ref)
    print(f"llama: per-pair α diff {tied_diff:.2e}, per-dimension α diff {naive_diff:.2e}")
    assert tied_diff <= RTOL * float(ref.abs().max())
    assert naive_diff > 1e-2 * float(ref.abs().max())


def test_gqa_scaling_is_shared_by_the_query_heads_of_a_kv_group() -> None:
    family, _, expert, _, art = protect("llama", PaRaMSParams(permute=False))
    att = family.arch_map().layers[0].attention
    hd = att.head_dim
    q_ratio = (art.state[att.q].double() / expert.body[att.q].double())[:, 0].reshape(att.num_heads, hd)
    k_ratio = (art.state[att.k].double() / expert.body[att.k].double())[:, 0].reshape(att.num_kv_heads, hd)
    for h in range(att.num_heads):
        g = h // att.group_size
        torch.testing.assert_close(q_ratio[h], 1 / k_ratio[g], rtol=1e-5, atol=0)
    assert att.num_kv_heads < att.num_heads  # the tiny Llama really has GQA


def test_scaling_factors_lie_in_the_configured_range() -> None:
    family, _, expert, _, art = protect("bert", PaRaMSParams(permute=False, low=2.0, high=3.0))
    att = family.arch_map().layers[0].attention
    ratio = art.state[att.q].double() / expert.body[att.q].double()
    assert ratio.min() >= 2.0 - 1e-6 and ratio.max() <= 3.0 + 1e-6
    assert torch.equal(art.state[att.o_bias], expert.body[att.o_bias])  # output bias untouched


# ---------------------------------------------------------------- determinism, params, registry


def test_same_seed_gives_the_same_artifact_hash() -> None:
    first, second, other_seed = (protect("bert", seed=s)[-1] for s in (0, 0, 1))
    assert first.content_hash() == second.content_hash()
    assert first.content_hash() != other_seed.content_hash()


def test_params_rejects_settings_that_protect_nothing_or_bad_ranges() -> None:
    with pytest.raises(ParamError, match="permute=true or scale=true"):
        parse_params(PaRaMSParams, {"permute": "false", "scale": "false"})
    with pytest.raises(ParamError, match="0 < low <= high"):
        parse_params(PaRaMSParams, {"low": "0"})
    with pytest.raises(ParamError, match=r"\[0, 1\)"):
        parse_params(PaRaMSDropoutParams, {"p": "1.0"})
    assert parse_params(PaRaMSParams, {"low": "0.1", "high": "5"}) == PaRaMSParams(low=0.1, high=5.0)


def test_params_raises_when_the_map_has_nothing_to_protect() -> None:
    family, base, expert, _ = tiny_case("bert")
    ctx = context(family, base, arch=ArchitectureMap(family="empty", layers=()))
    with pytest.raises(ValueError, match="nothing to act on"):
        PaRaMS().protect(expert, ctx)


def test_defenses_are_registered_with_their_claims() -> None:
    assert defenses.get("params") is PaRaMS and PaRaMS.function_preserving
    assert defenses.get("params+dropout") is PaRaMSDropout and not PaRaMSDropout.function_preserving
    assert PaRaMS.applies_to == frozenset()  # runs on CNNs too; scaling only where attention exists


# ---------------------------------------------------------------- the dropout variant


def test_dropout_with_rate_zero_reduces_to_params() -> None:
    family, base, expert, _ = tiny_case("bert")
    ctx = context(family, base)
    plain = PaRaMS().protect(expert, ctx)
    no_drop = PaRaMSDropout(PaRaMSDropoutParams(p=0.0)).protect(expert, ctx)
    assert no_drop.content_hash() == plain.content_hash()


def test_dare_keeps_or_drops_each_task_vector_entry_and_rescales() -> None:
    g = torch.Generator().manual_seed(0)
    base, expert = torch.randn(200, 50, generator=g), torch.randn(200, 50, generator=g)
    out, dropped = dare(expert, base, 0.7, torch.Generator().manual_seed(1))
    kept = (out - base).abs() > 0
    torch.testing.assert_close(out[kept], (base + (expert - base) / 0.3)[kept])
    assert torch.equal(out[~kept], base[~kept])
    assert dropped == int((~kept).sum())
    assert abs(dropped / out.numel() - 0.7) < 0.02


def test_dropout_prunes_only_mlp_weights_before_rearranging() -> None:
    family, base, expert, inputs = tiny_case("bert")
    ctx = context(family, base)
    plain, pruned = PaRaMS().protect(expert, ctx), PaRaMSDropout().protect(expert, ctx)
    att = family.arch_map().layers[0].attention
    assert torch.equal(pruned.state[att.q], plain.state[att.q])  # same scaling, attention not pruned
    assert 0.45 < pruned.notes["dropped_fraction"] < 0.55
    ref = forward(family, expert.body, inputs)
    assert max_abs_diff(forward(family, pruned.state, inputs), ref) > 1e-3 * float(ref.abs().max())  # not exact

"""MergeLock (arXiv 2509.01548): exact function preservation, RoPE-compatible QK maps, the conditioning guard."""

from __future__ import annotations

import pytest
import torch
from linear_defense_helpers import context, forward, max_abs_diff, minilm_case, rope_rotation, tiny_case

from bench.families.base import ATTENTION
from bench.families.efficientnet import EfficientNetFamily
from bench.params import ParamError, parse_params
from bench.registry import defenses
from bench.weights import l2_distance
from defenses._linear import HeadTransform, transform_attention
from defenses.mergelock import ConditioningError, DrawStats, MergeLock, MergeLockParams

TRANSFORMERS = ("bert", "clip-vision", "llama", "open-clip-vit")
RTOL = 1e-4
"""Float32 tolerance relative to the output's largest magnitude: weights are rounded after a map of
condition number up to 1e4, so a score keeps about 1e4 * 2^-24 ≈ 6e-4 relative precision at worst."""


def protect(name: str, params: MergeLockParams | None = None, seed: int = 0):
    family, base, expert, inputs = tiny_case(name)
    art = MergeLock(params).protect(expert, context(family, base, seed=seed))
    return family, base, expert, inputs, art


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_mergelock_preserves_outputs_of_tiny_transformers(name: str) -> None:
    family, _, expert, inputs, art = protect(name)
    ref = forward(family, expert.body, inputs)
    diff = max_abs_diff(forward(family, art.state, inputs), ref)
    print(f"{name}: max |protected - expert| = {diff:.2e} (outputs up to {ref.abs().max():.2f})")
    assert diff <= RTOL * float(ref.abs().max())
    for layer in family.arch_map().attention_layers():  # every attention block really changed
        assert not torch.equal(art.state[layer.attention.o], expert.body[layer.attention.o])


def test_mergelock_moves_attention_far_and_leaves_mlps_alone() -> None:
    family, base, expert, _, art = protect("clip-vision")
    expert_distance, artifact_distance = l2_distance(expert.body, base), l2_distance(art.state, base)
    print(f"L2 to θ_pre: expert {expert_distance:.2f}, artifact {artifact_distance:.2f}")
    assert artifact_distance > 20 * expert_distance
    assert art.notes["l2_to_pre"] == pytest.approx(artifact_distance)
    for layer in family.arch_map().mlp_layers():
        for name, _ in layer.mlp.hidden_tensors():
            assert torch.equal(art.state[name], expert.body[name])


@pytest.mark.slow
def test_mergelock_preserves_real_minilm_outputs_and_moves_far() -> None:
    family, base, expert, inputs = minilm_case()
    art = MergeLock().protect(expert, context(family, base))
    ref = forward(family, expert.body, inputs)
    diff = max_abs_diff(forward(family, art.state, inputs), ref)
    print(f"MiniLM: max diff {diff:.2e}; L2 to θ_pre: expert {art.notes['expert_l2_to_pre']:.1f}, "
          f"artifact {art.notes['l2_to_pre']:.1f}; max cond {art.notes['max_condition_number']:.0f}")
    assert diff <= RTOL * float(ref.abs().max())
    assert art.notes["l2_to_pre"] > 20 * art.notes["expert_l2_to_pre"]


# ---------------------------------------------------------------- RoPE and GQA


def test_rope_qk_maps_commute_with_every_rotary_rotation() -> None:
    family, _, _, _ = tiny_case("llama")
    att = family.arch_map().layers[0].attention
    r = MergeLock().draw_qk(att, torch.Generator().manual_seed(0), DrawStats())
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        rot = rope_rotation(att.rope_pairs(), att.head_dim, 6.3 * torch.rand(att.head_dim // 2, generator=g))
        torch.testing.assert_close(r @ rot, rot @ r)
    assert not torch.allclose(r, torch.diag(torch.diagonal(r)))  # rotations, not mere scalings


def test_unrestricted_qk_map_would_break_rope_outputs() -> None:
    # The rule matters: a general invertible R on a RoPE model changes the scores.
    family, _, expert, inputs = tiny_case("llama")
    ref = forward(family, expert.body, inputs)
    lock, g = MergeLock(), torch.Generator().manual_seed(0)

    def draw(att, general: bool) -> torch.Tensor:
        return lock.draw_general(att.head_dim, g, DrawStats()) if general else lock.draw_qk(att, g, DrawStats())

    def locked(general: bool) -> torch.Tensor:
        state = dict(expert.body)
        for layer in family.arch_map().attention_layers():
            att = layer.attention
            qk = torch.stack([draw(att, general) for _ in range(att.num_kv_heads)])
            transform_attention(state, att, HeadTransform(qk=qk))
        return forward(family, state, inputs)

    restricted, general = max_abs_diff(locked(False), ref), max_abs_diff(locked(True), ref)
    print(f"llama: per-pair scaled rotations diff {restricted:.2e}, general R diff {general:.2e}")
    assert restricted <= RTOL * float(ref.abs().max())
    assert general > 1e-2 * float(ref.abs().max())


def test_gqa_kv_group_map_is_shared_by_its_query_heads() -> None:
    # Q_h = R_g Q_h for both heads of a group: Q_h2 (Q_h1)^+ is the same before and after.
    family, _, expert, _, art = protect("llama", MergeLockParams(vo=False))
    att = family.arch_map().layers[0].attention
    hd = att.head_dim
    for g in range(att.num_kv_heads):
        heads = [g * att.group_size + i for i in range(att.group_size)]
        q_before = [expert.body[att.q][h * hd:(h + 1) * hd].double() for h in heads]
        q_after = [art.state[att.q][h * hd:(h + 1) * hd].double() for h in heads]
        r = q_after[0] @ torch.linalg.pinv(q_before[0])  # R_g recovered from the first head (hd <= d_model)
        for before, after in zip(q_before[1:], q_after[1:]):
            torch.testing.assert_close(after, r @ before, rtol=1e-4, atol=1e-4)
    assert att.num_kv_heads < att.num_heads


# ---------------------------------------------------------------- the conditioning guard


def test_condition_guard_bounds_every_matrix_and_redraws() -> None:
    family, base, expert, inputs = tiny_case("bert")
    loose = MergeLock().protect(expert, context(family, base))
    tight_params = MergeLockParams(low=1.0, high=1.0, max_cond=30.0)
    tight = MergeLock(tight_params).protect(expert, context(family, base))
    assert loose.notes["max_condition_number"] <= 1e4
    assert tight.notes["max_condition_number"] <= 30.0
    assert tight.notes["rejected_draws"] > 0
    ref = forward(family, expert.body, inputs)
    assert max_abs_diff(forward(family, tight.state, inputs), ref) <= RTOL * float(ref.abs().max())


def test_condition_guard_gives_up_with_an_actionable_error() -> None:
    family, base, expert, _ = tiny_case("bert")
    with pytest.raises(ConditioningError, match="raise max_cond"):
        MergeLock(MergeLockParams(low=1.0, high=1.0, max_cond=1.0001)).protect(expert, context(family, base))


def test_mergelock_params_reject_useless_settings() -> None:
    with pytest.raises(ParamError, match="qk=true or vo=true"):
        parse_params(MergeLockParams, {"qk": "false", "vo": "false"})
    with pytest.raises(ParamError, match="below high/low"):
        parse_params(MergeLockParams, {"max_cond": "10"})
    assert parse_params(MergeLockParams, {"eps": "0.01"}).eps == 0.01


# ---------------------------------------------------------------- determinism, applicability, registry


def test_same_seed_gives_the_same_artifact_hash() -> None:
    first, second, other_seed = (protect("llama", seed=s)[-1] for s in (0, 0, 1))
    assert first.content_hash() == second.content_hash()
    assert first.content_hash() != other_seed.content_hash()


def test_mergelock_needs_attention_and_says_so_on_cnns() -> None:
    assert MergeLock.applies_to == frozenset({ATTENTION})
    family = EfficientNetFamily(image_size=32)
    assert family.arch_map().missing(MergeLock.applies_to) == {ATTENTION}
    base = family.new_module().state_dict()
    with pytest.raises(ValueError, match="needs attention layers"):
        MergeLock().protect(tiny_case("bert")[2], context(family, base))


def test_mergelock_is_registered_as_function_preserving() -> None:
    assert defenses.get("mergelock") is MergeLock and MergeLock.function_preserving

"""Algebraic attacks: realign, scale-division, anchor-align, revert-to-base (+ variants), taylor-invert.

Each attack runs on tiny random-init models protected by the real defenses; a synthetic expert is
θ_pre moved 1% of the way towards an unrelated model (a stand-in for a small task vector τ). Tests
pin that the attacked artifact computes what the expert computes and how close its weights come
back to the expert's (relative to ‖τ‖), and the invariants of each step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import pytest
import torch
import torch.nn.functional as F
from linear_defense_helpers import context, forward, max_abs_diff, simulated_expert
from torch import nn

from attacks._align import AttackInputError
from attacks.anchor_align import AnchorAlign, AnchorAlignIndependent, AnchorAlignParams
from attacks.realign import Realign, RealignParams, match_heads, reorder_heads
from attacks.revert import RevertAttention, RevertFFN, RevertParams, RevertPartParams, RevertToBase
from attacks.scale_division import ScaleDivision, ScaleDivisionParams, estimate_scales
from attacks.taylor_invert import TaylorInvert, activation_derivatives
from bench.artifact import Artifact
from bench.families.base import ArchitectureMap, LayerMap, MLPMap, get_qkv
from bench.families.family import Family
from bench.families.tiny import tiny, tiny_inputs
from bench.params import ParamError, parse_params
from bench.plugins import Attack, AttackContext, CompositeAttack
from bench.registry import attacks
from bench.suite import Batch, Expert
from bench.weights import StateDict, is_mergeable
from defenses import taylor as taylor_defense
from defenses._linear import HeadTransform, split_columns, split_rows, transform_attention
from defenses.mergebarrier import MergeBarrier, MergeBarrierAttention, MergeBarrierFFN
from defenses.mergelock import MergeLock
from defenses.params import PaRaMS, PaRaMSParams
from defenses.taylormlp import TaylorMLP

TRANSFORMERS = ("bert", "clip-vision", "llama", "open-clip-vit")
STEP = 0.01
"""Size of the synthetic task vector: the expert is θ_pre + 0.01·(other − θ_pre)."""
RTOL = 1e-5
"""Output tolerance relative to the output's largest magnitude (float32 rounding of transformed weights)."""


def relative_error(recovered: Mapping[str, torch.Tensor], truth: Mapping[str, torch.Tensor],
                   keys: Iterable[str] | None = None) -> float:
    """``‖recovered − truth‖ / ‖truth‖`` over the floating-point tensors ``keys`` (default: all of ``truth``)."""
    num = torch.zeros((), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    for k in keys if keys is not None else truth:
        if not is_mergeable(truth[k]):
            continue
        num += (recovered[k].double() - truth[k].double()).pow(2).sum()
        den += truth[k].double().pow(2).sum()
    return float(num.sqrt() / den.sqrt().clamp_min(1e-300))


def case(name: str, seed: int = 0) -> tuple[Family, StateDict, Expert, dict[str, torch.Tensor]]:
    family, base = tiny(name, seed)
    _, other = tiny(name, seed + 1)
    return family, base, Expert(simulated_expert(base, other, STEP), {}), tiny_inputs(name, seed)


def attack_context(family: Family | None, base: StateDict, artifact: Artifact, arch: ArchitectureMap | None = None,
                   partners: tuple[StateDict, ...] = ()) -> AttackContext:
    arch = arch if arch is not None else family.arch_map()  # type: ignore[union-attr]
    return AttackContext(suite=None, victim="victim", partners=tuple(f"p{i}" for i in range(len(partners))),  # type: ignore[arg-type]
                         base=base, arch=arch, family=family, artifact=artifact, partner_bodies=partners)  # type: ignore[arg-type]


def run(attack: Attack, family: Family, base: StateDict, artifact: Artifact) -> Artifact:
    return attack.prepare(artifact, attack_context(family, base, artifact))


def rel_out(family: Family, state: StateDict | Artifact, expert: StateDict, inputs: dict[str, torch.Tensor]) -> float:
    y = forward(family, expert, inputs)
    return max_abs_diff(forward(family, state, inputs), y) / float(y.abs().max())


def tau_ratio(recovered: StateDict, expert: StateDict, base: StateDict) -> float:
    """‖recovered − expert‖ / ‖expert − θ_pre‖: how much of a task vector's size separates them."""
    return relative_error(recovered, expert) / relative_error(expert, base)


# ---------------------------------------------------------------- registry


def test_algebraic_attacks_are_registered_with_anchor_needs_and_no_data():
    expected = {"realign": Realign, "scale-division": ScaleDivision, "anchor-align": AnchorAlign,
                "anchor-align-indep": AnchorAlignIndependent, "revert-to-base": RevertToBase, "revert-attention": RevertAttention, "revert-ffn": RevertFFN,
                "taylor-invert": TaylorInvert}
    for name, cls in expected.items():
        assert attacks.get(name) is cls
        needs = cls().needs()
        assert needs.anchor and needs.labelled == needs.unlabelled == needs.finetune_steps == 0
        assert not needs.knows_defense
        assert cls.name == name
    restoring = {n for n, c in expected.items() if c.restores_structure}
    assert restoring == {"revert-to-base", "revert-attention", "revert-ffn", "taylor-invert"}


# ---------------------------------------------------------------- realign


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_realign_undoes_params_permutation_exactly(name):
    family, base, expert, inputs = case(name)
    art = PaRaMS(PaRaMSParams(scale=False)).protect(expert, context(family, base))
    assert any(not torch.equal(art.state[k], expert.body[k]) for k in expert.body)  # the defense did permute
    out = run(Realign(), family, base, art)
    assert out.variant is None
    assert all(torch.equal(out.state[k], expert.body[k]) for k in expert.body)
    assert rel_out(family, out.state, expert.body, inputs) < RTOL


def random_head_orders(name: str, family: Family, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random kv-group order and, inside each group, a random order of its query heads (function-preserving)."""
    g = torch.Generator().manual_seed(seed)
    att = family.arch_map().layers[0].attention
    assert att is not None
    kv = torch.randperm(att.num_kv_heads, generator=g)
    q = torch.cat([kv[r] * att.group_size + torch.randperm(att.group_size, generator=g) for r in range(att.num_kv_heads)])
    if torch.equal(q, torch.arange(att.num_heads)):
        q, kv = q.flip(0), kv.flip(0)
    return q, kv


@pytest.mark.parametrize("name", ["bert", "llama", "open-clip-vit"])
def test_realign_restores_permuted_heads_exactly(name):
    family, base, expert, inputs = case(name)
    state = dict(expert.body)
    for lay in family.arch_map().attention_layers():
        reorder_heads(state, lay.attention, *random_head_orders(name, family, lay.index))
    assert rel_out(family, state, expert.body, inputs) < RTOL  # head permutation is function-preserving
    assert relative_error(state, expert.body) > 0.1
    out = run(Realign(), family, base, Artifact(state))
    assert all(torch.equal(out.state[k], expert.body[k]) for k in expert.body)
    assert out.notes["moved_heads"] > 0


@pytest.mark.parametrize("name", ["clip-vision", "llama"])
def test_realign_finds_head_order_under_per_head_transforms(name):
    # MergeLock's invertible maps change every head's weights; the QK and OV products still identify the head.
    family, base, expert, _ = case(name)
    art = MergeLock().protect(expert, context(family, base))
    att = family.arch_map().layers[1].attention
    q_order, kv_order = random_head_orders(name, family, seed=7)
    state = dict(art.state)
    reorder_heads(state, att, q_order, kv_order)
    found_q, found_kv = match_heads(state, base, att)
    assert torch.equal(q_order[found_q], torch.arange(att.num_heads))
    assert torch.equal(kv_order[found_kv], torch.arange(att.num_kv_heads))


def cnn_case(width: int = 6, hidden: int = 10, seed: int = 0) -> tuple[ArchitectureMap, StateDict, StateDict]:
    """A one-block inverted-residual CNN (expand conv, BN, depthwise conv, BN, project conv): map, θ_pre, expert."""
    g = torch.Generator().manual_seed(seed)
    stats = ("weight", "bias", "running_mean", "running_var")
    channelwise = tuple(f"b._bn0.{s}" for s in stats) + ("b._dw.weight",) + tuple(f"b._bn1.{s}" for s in stats)
    mlp = MLPMap(up="b._expand.weight", down="b._project.weight", activation="relu6",
                 hidden_channelwise=channelwise, kind="channel_block")
    arch = ArchitectureMap(family="toy-cnn", layers=(LayerMap(0, mlp=mlp, prefix="b."),), features=frozenset({"channel_block"}))

    def draw() -> StateDict:
        s = {"b._expand.weight": torch.randn(hidden, width, 1, 1, generator=g),
             "b._dw.weight": torch.randn(hidden, 1, 3, 3, generator=g),
             "b._project.weight": torch.randn(width, hidden, 1, 1, generator=g)}
        for bn in ("b._bn0.", "b._bn1."):
            s[bn + "weight"] = 1 + 0.3 * torch.randn(hidden, generator=g)
            s[bn + "bias"] = 0.3 * torch.randn(hidden, generator=g)
            s[bn + "running_mean"] = 0.3 * torch.randn(hidden, generator=g)
            s[bn + "running_var"] = 1 + torch.rand(hidden, generator=g)
        return s

    base, other = draw(), draw()
    return arch, base, simulated_expert(base, other, STEP)


def cnn_forward(state: StateDict, x: torch.Tensor) -> torch.Tensor:
    def bn(h: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(h, state[p + "running_mean"], state[p + "running_var"], state[p + "weight"], state[p + "bias"])

    h = F.relu6(bn(F.conv2d(x, state["b._expand.weight"]), "b._bn0."))
    h = F.relu6(bn(F.conv2d(h, state["b._dw.weight"], padding=1, groups=h.shape[1]), "b._bn1."))
    return F.conv2d(h, state["b._project.weight"])


def test_realign_aligns_every_channelwise_tensor_of_a_cnn_block():
    arch, base, expert = cnn_case()
    mlp = arch.layers[0].mlp
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    permuted = {k: v.index_select(dim, order) for k, v in expert.items() for n, dim in mlp.hidden_tensors() if n == k}
    art = Artifact({**expert, **permuted})
    x = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(cnn_forward(art.state, x), cnn_forward(expert, x), atol=1e-5)  # the permutation is exact
    out = Realign().prepare(art, attack_context(None, base, art, arch=arch))
    assert all(torch.equal(out.state[k], expert[k]) for k in expert)


def test_realign_aligns_to_a_partner_when_asked():
    family, base, expert, _ = case("bert")
    _, far = tiny("bert", 5)
    partner = simulated_expert(base, far, STEP)
    art = PaRaMS(PaRaMSParams(scale=False)).protect(expert, context(family, base))
    out = Realign(RealignParams(reference="partner")).prepare(art, attack_context(family, base, art, partners=(partner,)))
    assert all(torch.equal(out.state[k], expert.body[k]) for k in expert.body)
    with pytest.raises(AttackInputError, match="needs a partner"):
        Realign(RealignParams(reference="partner")).prepare(art, attack_context(family, base, art))
    with pytest.raises(AttackInputError, match="out of range"):
        Realign(RealignParams(reference="partner", partner=3)).prepare(art, attack_context(family, base, art, partners=(partner,)))


@pytest.mark.parametrize("attack", [Realign(), ScaleDivision(), AnchorAlign()])
def test_alignment_attacks_reject_structure_changed_artifacts(attack):
    family, base, expert, _ = case("bert")
    variant = Artifact({k: v for k, v in expert.body.items() if "intermediate" not in k}, variant="taylor-ffn")
    with pytest.raises(AttackInputError, match="taylor-invert"):
        run(attack, family, base, variant)
    missing = Artifact({k: v for k, v in expert.body.items() if "intermediate" not in k})
    with pytest.raises(AttackInputError, match="θ_pre's tensors"):
        run(attack, family, base, missing)


# ---------------------------------------------------------------- scale division


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_realign_then_scale_division_recover_a_params_expert(name):
    family, base, expert, inputs = case(name)
    art = PaRaMS().protect(expert, context(family, base))
    assert tau_ratio(art.state, expert.body, base) > 50  # protected weights are far from the expert
    out = CompositeAttack([Realign(), ScaleDivision()]).prepare(art, attack_context(family, base, art))
    assert rel_out(family, out.state, expert.body, inputs) < RTOL
    # Equal to the expert up to the defense's equivalence (a leftover diagonal α/α̂): head products match ...
    assert relative_error(head_products(out.state, family), head_products(expert.body, family)) < 1e-5
    # ... and the weights are close: measured 0.04-0.07 ‖τ‖ here (0.014 on MiniLM), the scale estimates' error.
    assert tau_ratio(out.state, expert.body, base) < 0.15


def test_scale_division_estimates_the_applied_scales():
    family, base, expert, _ = case("llama")
    att = family.arch_map().layers[0].attention
    g = torch.Generator().manual_seed(1)
    alpha = torch.empty(att.num_kv_heads, att.head_dim // 2, dtype=torch.float64).uniform_(0.05, 20, generator=g)
    alpha = torch.cat([alpha, alpha], dim=1)  # 'half' RoPE pairing: dims i and i + hd/2 share a scale
    gamma = torch.empty(att.num_kv_heads, att.head_dim, dtype=torch.float64).uniform_(0.05, 20, generator=g)
    state = dict(expert.body)
    transform_attention(state, att, HeadTransform.diagonal(alpha, gamma))
    for estimator in ("least_squares", "median_ratio"):
        a_hat, g_hat = estimate_scales(state, base, att, estimator)  # type: ignore[arg-type]
        for i, j in att.rope_pairs():
            assert torch.equal(a_hat[:, i], a_hat[:, j])  # one scale per rotary pair
        assert (a_hat / alpha - 1).abs().max() < 0.1
        assert (g_hat / gamma - 1).abs().max() < 0.1


@pytest.mark.parametrize("estimator", ["least_squares", "median_ratio"])
def test_scale_division_undoes_mergebarrier_plane_flips_on_rope_models(estimator):
    family, base, expert, inputs = case("llama")
    art = MergeBarrierAttention().protect(expert, context(family, base))
    assert tau_ratio(art.state, expert.body, base) > 10
    out = run(ScaleDivision(ScaleDivisionParams(estimator=estimator)), family, base, art)
    assert rel_out(family, out.state, expert.body, inputs) < RTOL
    assert tau_ratio(out.state, expert.body, base) < 0.1


# ---------------------------------------------------------------- anchor-guided attack


def head_products(state: StateDict, family: Family) -> StateDict:
    """Per layer and query head, W_qᵀW_k and W_oW_v (d×d): what every function-preserving head transform keeps."""
    out = {}
    for lay in family.arch_map().attention_layers():
        att = lay.attention
        q, k, v, _ = get_qkv(state, att)
        groups = torch.arange(att.num_heads) // att.group_size
        qh = split_rows(q.double(), att.num_heads, att.head_dim)
        kh = split_rows(k.double(), att.num_kv_heads, att.head_dim)[groups]
        vh = split_rows(v.double(), att.num_kv_heads, att.head_dim)[groups]
        oh = split_columns(state[att.o].double(), att.num_heads, att.head_dim)
        out[f"{lay.index}.qk"] = qh.transpose(1, 2) @ kh
        out[f"{lay.index}.ov"] = oh @ vh
    return out


@pytest.mark.parametrize("defense", [PaRaMS, MergeLock, MergeBarrierAttention])
@pytest.mark.parametrize("name", TRANSFORMERS)
def test_anchor_align_recovers_expert_up_to_head_transforms(name, defense):
    family, base, expert, inputs = case(name)
    art = defense().protect(expert, context(family, base))
    out = run(AnchorAlign(), family, base, art)
    assert out.notes["skipped_transforms"] == 0
    assert rel_out(family, out.state, expert.body, inputs) < 10 * RTOL  # MergeLock maps have condition numbers up to 1e4
    # Equal to the expert up to per-head transforms: the QK and OV products match to float32 precision ...
    assert relative_error(head_products(out.state, family), head_products(expert.body, family)) < 1e-5
    # ... the MLPs match exactly (a permutation) ...
    mlp_keys = [n for lay in family.arch_map().mlp_layers() for n, _ in lay.mlp.hidden_tensors()]
    assert all(torch.equal(out.state[k], expert.body[k]) for k in mlp_keys)
    # ... and the weights come back within the task vector's size (measured 0.19-0.52 ‖τ‖, from ~30-900 ‖τ‖):
    # least squares against θ_pre also absorbs the part of τ that a head transform can express.
    assert tau_ratio(art.state, expert.body, base) > 10
    assert tau_ratio(out.state, expert.body, base) < 0.7


@pytest.mark.parametrize("coupling", ["paired", "independent"])
@pytest.mark.parametrize("name", ["clip-vision", "open-clip-vit", "bert", "llama"])
def test_anchor_align_inverts_a_transformed_anchor_exactly(name, coupling):
    # With τ = 0 the released heads are exactly T(θ_pre); both solvers must return θ_pre up to float32
    # rounding of the released weights, amplified by T's condition number (MergeLock allows up to 1e4).
    family, base, _, _ = case(name)
    art = MergeLock().protect(Expert(dict(base), {}), context(family, base))
    art = PaRaMS(PaRaMSParams(scale=False)).protect(Expert(art.state, {}), context(family, base))
    out = run(AnchorAlign(AnchorAlignParams(coupling=coupling)), family, base, art)
    assert relative_error(out.state, base) < 1e-4


def test_both_anchor_align_solves_are_in_the_standard_attack_set():
    from bench.plan import standard_attacks

    names = standard_attacks()
    assert "anchor-align" in names and "anchor-align-indep" in names
    assert AnchorAlign().params.coupling == "paired"


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_anchor_align_indep_solves_q_k_v_o_alone_as_the_public_code(name):
    family, base, expert, inputs = case(name)
    art = MergeLock().protect(expert, context(family, base))
    paired = run(AnchorAlign(), family, base, art)
    indep = run(AnchorAlignIndependent(), family, base, art)
    assert (paired.notes["coupling"], indep.notes["coupling"]) == ("paired", "independent")
    same = run(AnchorAlign(AnchorAlignParams(coupling="independent")), family, base, art)
    assert relative_error(indep.state, same.state) < 1e-6  # the ridge solves are not bitwise repeatable
    # The coupled solve keeps every attention score exactly; the independent estimates do not satisfy
    # T_q T_kᵀ = I, so the attacked model only approximates the artifact (measured 2-3e-2 on these models).
    assert rel_out(family, paired.state, expert.body, inputs) < 10 * RTOL
    assert rel_out(family, indep.state, expert.body, inputs) > 1e-3
    att = family.arch_map().layers[0].attention
    assert relative_error({"q": indep.state[att.q]}, {"q": paired.state[att.q]}) > 1e-3
    # Each independent solve projects θ_pre's head onto the released rows' span, which no invertible head
    # transform changes: the result is the same as on the unprotected expert.
    plain = run(AnchorAlignIndependent(), family, base, Artifact(dict(expert.body)))
    assert relative_error({k: indep.state[k] for k in attention_keys(family)},
                          {k: plain.state[k] for k in attention_keys(family)}) < 1e-4


def test_anchor_align_params_are_validated():
    with pytest.raises(ParamError):
        parse_params(AnchorAlignParams, {"ridge": "-1"})
    with pytest.raises(ParamError):
        parse_params(AnchorAlignParams, {"attention": "false", "mlp": "false"})


# ---------------------------------------------------------------- revert to base


def attention_keys(family: Family) -> set[str]:
    keys = set()
    for lay in family.arch_map().attention_layers():
        a = lay.attention
        keys |= {n for n in (a.q, a.k, a.v, a.o, a.q_bias, a.k_bias, a.v_bias, a.o_bias, a.fused_qkv, a.fused_qkv_bias) if n}
    return keys


def mlp_keys(family: Family) -> set[str]:
    keys = set()
    for lay in family.arch_map().mlp_layers():
        keys |= {n for n, _ in lay.mlp.hidden_tensors()} | ({lay.mlp.down_bias} if lay.mlp.down_bias else set())
    return keys


def test_revert_to_base_reverts_failing_units_and_keeps_the_rest():
    family, base, expert, _ = case("bert")
    art = PaRaMS().protect(expert, context(family, base))
    out = run(RevertToBase(), family, base, art)
    assert out.variant is None and set(out.state) == set(base)
    reverted = set(out.notes["reverted_units"])
    # Permuted MLPs are about orthogonal to θ_pre; scaled K and O (rows ×1/α) fall below the cosine threshold.
    assert {"layer0.ffn", "layer1.ffn", "layer0.qk", "layer0.vo", "layer1.qk", "layer1.vo"} == reverted
    for k in mlp_keys(family) | attention_keys(family):
        assert torch.equal(out.state[k], base[k])
    for k in set(base) - mlp_keys(family) - attention_keys(family):
        assert torch.equal(out.state[k], art.state[k])


def test_revert_to_base_keeps_an_unprotected_expert():
    family, base, expert, _ = case("llama")
    out = run(RevertToBase(), family, base, Artifact(dict(expert.body)))
    assert out.notes["reverted_units"] == []
    assert all(torch.equal(out.state[k], expert.body[k]) for k in base)


class ProbeSuite:
    """Just enough of a suite for the Taylor defenses' calibration: the bare module on fixed probe batches."""

    def __init__(self, family: Family, inputs: dict[str, torch.Tensor]) -> None:
        self.family, self.inputs = family, inputs

    def task_model(self, body: StateDict | Artifact, head: StateDict, task: str) -> nn.Module:
        return _BodyOnly(self.family.build(body))

    def batches(self, task: str, split: str, *, batch_size: int = 32, limit: int | None = None) -> Iterator[Batch]:
        yield Batch(self.inputs, torch.zeros(len(next(iter(self.inputs.values())))))


class _BodyOnly(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.body(**inputs)[0]


def calibrated_context(family: Family, base: StateDict, name: str, seed: int = 0):
    ctx = context(family, base, seed=seed)
    ctx.suite = ProbeSuite(family, tiny_inputs(name, seed, batch=4))  # type: ignore[assignment]
    return ctx


def test_revert_to_base_restores_the_structure_of_a_taylor_release():
    family, base, expert, inputs = case("bert")
    art = MergeBarrier().protect(expert, calibrated_context(family, base, "bert"))
    assert art.variant == "taylor-ffn"
    out = run(RevertToBase(), family, base, art)
    assert out.variant is None and set(out.state) == set(base)
    assert all(torch.equal(out.state[k], base[k]) for k in mlp_keys(family))
    assert {"layer0.ffn", "layer1.ffn"} <= set(out.notes["reverted_units"])
    assert out.notes["dropped_tensors"] > 0
    family.build(out.state)  # a standard module loads it


@pytest.mark.parametrize("name", ["open-clip-vit", "llama"])
def test_revert_attention_and_revert_ffn_touch_only_their_modules(name):
    family, base, expert, _ = case(name)
    art = Artifact(dict(expert.body))
    att = run(RevertAttention(), family, base, art)
    ffn = run(RevertFFN(), family, base, art)
    for k in base:
        assert torch.equal(att.state[k], base[k] if k in attention_keys(family) else expert.body[k])
        assert torch.equal(ffn.state[k], base[k] if k in mlp_keys(family) else expert.body[k])


@pytest.mark.parametrize("name", ["bert", "open-clip-vit"])
def test_revert_attention_on_changed_units_reverts_only_the_flipped_qk(name):
    family, base, expert, _ = case(name)
    art = MergeBarrierAttention().protect(expert, context(family, base))
    out = run(RevertAttention(RevertPartParams(criterion="changed")), family, base, art)
    assert sorted(out.notes["reverted_units"]) == ["layer0.qk", "layer1.qk"]
    for lay in family.arch_map().attention_layers():
        q, k, v, _ = get_qkv(out.state, lay.attention)
        q0, k0, _, _ = get_qkv(base, lay.attention)
        _, _, v_art, _ = get_qkv(art.state, lay.attention)
        assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v_art)
        assert torch.equal(out.state[lay.attention.o], art.state[lay.attention.o])


def test_revert_params_are_validated():
    with pytest.raises(ParamError):
        parse_params(RevertParams, {"min_cosine": "2"})
    with pytest.raises(ParamError):
        parse_params(RevertParams, {"criterion": "sometimes"})


# ---------------------------------------------------------------- Taylor inversion


@pytest.mark.parametrize("activation", ["gelu", "silu", "quick_gelu"])
def test_activation_derivatives_match_autograd_and_the_defense(activation):
    x = torch.linspace(-9, 9, 37, dtype=torch.float64)
    ours = activation_derivatives(activation, x, 10)
    # independent check of the low orders by automatic differentiation
    fn = {"gelu": F.gelu, "silu": F.silu, "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t)}[activation]
    xs = x.clone().requires_grad_(True)
    cur = fn(xs)
    for n in range(0, 5):
        assert torch.allclose(ours[n], cur.detach(), rtol=1e-9, atol=1e-12), f"order {n}"
        (cur,) = torch.autograd.grad(cur.sum(), xs, create_graph=True)
    # and all orders against the defense's own recursion
    theirs = taylor_defense.activation_derivatives(activation, x, 10)
    scale = theirs.abs().amax(dim=1, keepdim=True)
    assert ((ours - theirs).abs() / scale).max() < 1e-9


@pytest.mark.parametrize("name", ["bert", "clip-vision", "llama"])
def test_taylor_invert_recovers_mergebarrier_ffn_weights(name):
    family, base, expert, inputs = case(name)
    art = MergeBarrierFFN().protect(expert, calibrated_context(family, base, name))
    assert art.variant == "taylor-ffn"
    out = run(TaylorInvert(), family, base, art)
    assert out.variant is None and set(out.state) == set(base)
    assert out.notes["failed_neurons"] == 0 and out.notes["inverted_layers"] == 2
    # Measured ~1e-8: only float32 rounding of the released coefficients stands between them.
    assert relative_error(out.state, expert.body) < 1e-6
    assert rel_out(family, out.state, expert.body, inputs) < RTOL


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_taylor_invert_recovers_taylormlp_signs_selection_and_order(name):
    family, base, expert, inputs = case(name)
    art = TaylorMLP(parse_params(TaylorMLP.Params, {"latency_repeats": "0"})).protect(
        expert, calibrated_context(family, base, name))
    mlp = family.arch_map().layers[0].mlp
    expanded = art.state[next(k for k in art.state if k.endswith("taylor.act_weight"))].shape[0]
    assert 0 < expanded < expert.body[mlp.up].shape[0]  # TaylorMLP expands only a selection
    out = run(TaylorInvert(), family, base, art)
    assert out.notes["moved_hidden_units"] > 0  # the release grouped expanded and exact neurons
    assert relative_error(out.state, expert.body) < 1e-6
    assert rel_out(family, out.state, expert.body, inputs) < RTOL


def test_taylor_invert_then_anchor_align_recover_a_full_mergebarrier_release():
    family, base, expert, inputs = case("bert")
    art = MergeBarrier().protect(expert, calibrated_context(family, base, "bert"))
    out = CompositeAttack([TaylorInvert(), AnchorAlign()]).prepare(art, attack_context(family, base, art))
    assert rel_out(family, out.state, expert.body, inputs) < RTOL
    assert tau_ratio(out.state, expert.body, base) < 0.7


def test_taylor_invert_rejects_releases_it_cannot_identify():
    family, base, expert, _ = case("bert")
    state = dict(expert.body)
    lay = family.arch_map().layers[0]
    width = expert.body[lay.mlp.up].shape[0]
    release = taylor_defense.expand_mlp(expert.body, lay.mlp, torch.zeros(width), order=1)
    taylor_defense.replace_mlp(state, lay, release)
    with pytest.raises(AttackInputError, match="order >= 2"):
        run(TaylorInvert(), family, base, Artifact(state, variant="taylor-ffn"))
    with pytest.raises(AttackInputError, match="revert-to-base"):
        run(TaylorInvert(), family, base, Artifact(dict(expert.body), variant="some-other-release"))


def test_taylor_invert_passes_a_standard_artifact_through():
    family, base, expert, _ = case("llama")
    art = Artifact(dict(expert.body))
    out = run(TaylorInvert(), family, base, art)
    assert out.state is art.state and out.notes["inverted_layers"] == 0


# ---------------------------------------------------------------- real scale


@pytest.mark.slow
def test_attacks_recover_a_minilm_expert_from_params_and_mergelock():
    # all-MiniLM-L6-v2's real weights with a 1e-3-per-entry task vector (‖τ‖ ≈ 1.7% of ‖θ_pre‖).
    from linear_defense_helpers import minilm_case

    family, base, expert, inputs = minilm_case()
    params_art = PaRaMS().protect(expert, context(family, base))
    lock_art = MergeLock().protect(expert, context(family, base))
    for art, attack, bound in ((params_art, CompositeAttack([Realign(), ScaleDivision()]), 0.05),  # measured 0.014
                               (params_art, AnchorAlign(), 0.2),  # measured 0.11
                               (lock_art, AnchorAlign(), 0.2)):  # measured 0.11
        out = attack.prepare(art, attack_context(family, base, art))
        assert rel_out(family, out.state, expert.body, inputs) < 10 * RTOL
        assert tau_ratio(out.state, expert.body, base) < bound

"""TaylorMLP: neuron selection, sign obfuscation undone by its own forward, exact neurons, the mask, the artifact."""

from __future__ import annotations

import pytest
import torch

from bench.artifact import Artifact
from bench.families.family import Family
from bench.families.tiny import tiny, tiny_inputs
from bench.plugins import DefenseContext
from bench.registry import defenses
from bench.suite import Batch, Expert
from bench.weights import StateDict
from defenses.taylor import (
    VARIANT,
    PreActivationStats,
    TaylorFFN,
    expand_mlp,
    mlp_reference,
    select_neurons,
    standard_mlp_keys,
    taylor_prefix,
)
from defenses.taylormlp import TaylorMLP, random_signs


class TaskModel(torch.nn.Module):
    def __init__(self, body: torch.nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.body(**inputs)[0]


class FakeSuite:
    """Fixed calibration batches and `task_model`: what TaylorMLP asks of a suite."""

    def __init__(self, family: Family, train: list[dict[str, torch.Tensor]]) -> None:
        self.family_, self.train = family, train

    def batches(self, task, split, *, batch_size=32, limit=None, shuffle=False, seed=0):
        for inputs in self.train:
            yield Batch(inputs, torch.zeros(next(iter(inputs.values())).shape[0], dtype=torch.long))

    def task_model(self, body, head, task):
        return TaskModel(self.family_.build(body)).eval()


def setup(name: str, seed: int = 0, ctx_seed: int = 0, calm: float | None = None):
    family, state = tiny(name, seed)
    if calm is not None:  # shrink the activation-input projections: pre-activations within the series' reach
        state = dict(state)
        for lay in family.arch_map().mlp_layers():
            for key in (lay.mlp.gate or lay.mlp.up, lay.mlp.gate_bias if lay.mlp.gate else lay.mlp.up_bias):
                if key:
                    state[key] = state[key] * calm
    train = [tiny_inputs(name, seed=s, batch=4) for s in range(3)]
    ctx = DefenseContext(suite=FakeSuite(family, train), task="victim", base=state,  # type: ignore[arg-type]
                         arch=family.arch_map(), family=family, seed=ctx_seed)
    return family, Expert(state, {}), ctx, train[1]


def logits(family: Family, body: StateDict | Artifact, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return family.build(body)(**inputs)[0]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def llama_mlp_case():
    family, state = tiny("llama", 0)
    lay = family.arch_map().layers[0]
    x = torch.randn(64, family.config.hidden_size, generator=torch.Generator().manual_seed(3))
    stats = PreActivationStats.from_values(torch.nn.functional.linear(x, state[lay.mlp.gate]))
    return state, lay, x, stats


def test_sign_obfuscation_is_undone_exactly_by_the_forward() -> None:
    state, lay, x, stats = llama_mlp_case()
    width = stats.midpoint.numel()
    selected = torch.arange(width)
    signs = random_signs(width, torch.Generator().manual_seed(0))
    assert (signs < 0).any() and (signs > 0).any()
    plain = expand_mlp(state, lay.mlp, stats.midpoint, 6, selected=selected)
    hidden = expand_mlp(state, lay.mlp, stats.midpoint, 6, selected=selected, signs=signs)
    # the released tensors carry the signs: flipped gate rows and expansion points, sⁿ on order n ...
    flip = signs < 0
    assert torch.equal(hidden.act_weight[flip], -plain.act_weight[flip])
    assert torch.equal(hidden.expansion_point[flip], -plain.expansion_point[flip])
    assert torch.equal(hidden.coefficients[1][:, flip], -plain.coefficients[1][:, flip])
    assert torch.equal(hidden.coefficients[2], plain.coefficients[2])
    # ... and the forward cancels them exactly: negation is exact in floating point, (−a)(−b) = ab
    with torch.no_grad():
        out_plain = TaylorFFN(plain, lay.mlp.activation)(x)
        out_hidden = TaylorFFN(hidden, lay.mlp.activation)(x)
    assert torch.equal(out_hidden, out_plain)


def test_neuron_selection_follows_dim_selection() -> None:
    spread = torch.tensor([5.0, 1.0, 3.0, 0.5, 4.0, 2.0])
    expanded, exact = select_neurons(spread, 3, max_gap=0.0)  # the code's default: smallest ranges
    assert expanded.tolist() == [3, 1, 5] and sorted(exact.tolist()) == [0, 2, 4]
    expanded, exact = select_neurons(spread, 2, max_gap=3.5)  # enough below the cap: the largest of those
    assert expanded.tolist() == [5, 2] and sorted(exact.tolist()) == [0, 1, 3, 4]


def test_unexpanded_neurons_stay_exact() -> None:
    family, expert, ctx, probe = setup("bert")
    artifact = TaylorMLP.from_overrides({"select_dim": "0", "latency_repeats": "0"}).protect(expert, ctx)
    assert artifact.variant == VARIANT
    torch.testing.assert_close(logits(family, artifact, probe), logits(family, expert.body, probe), rtol=0, atol=1e-5)


def test_mask_rule_drops_high_orders_far_from_the_expansion_point() -> None:
    state, lay, x, stats = llama_mlp_case()
    order0 = expand_mlp(state, lay.mlp, stats.midpoint, 0)
    masked = expand_mlp(state, lay.mlp, stats.midpoint, 6, mask_rule=(0, 0.0))  # every |Δ| > 0: orders ≥ 1 dropped
    unmasked = expand_mlp(state, lay.mlp, stats.midpoint, 6, mask_rule=(6, 0.0))  # no order above 6: mask inactive
    with torch.no_grad():
        torch.testing.assert_close(TaylorFFN(masked, "silu")(x), TaylorFFN(order0, "silu")(x))
        exact = mlp_reference(state, lay.mlp, x)
        assert relative(TaylorFFN(unmasked, "silu")(x), exact) < relative(TaylorFFN(order0, "silu")(x), exact)


# The tiny CLIP's pre-activations reach ±5, beyond QuickGELU's radius of convergence (≈1.85 around 0),
# where no order helps; its MLP inputs are scaled down so the test pins the plumbing, not the divergence.
# Measured relative logit errors: 1.27e-2 (bert), 6.8e-4 (clip-vision), 2.87e-2 (llama); each bound is 3-4x its
# measurement, so a Taylor expansion one order short or a wrong coefficient fails.
@pytest.mark.parametrize("name,calm,bound", [("bert", None, 5e-2), ("clip-vision", 0.3, 2.5e-3), ("llama", None, 0.1)])
def test_artifact_runs_as_a_variant_close_to_the_expert(name: str, calm: float | None, bound: float) -> None:
    family, expert, ctx, probe = setup(name, calm=calm)
    artifact = TaylorMLP().protect(expert, ctx)
    error = relative(logits(family, artifact, probe), logits(family, expert.body, probe))
    print(f"\ntaylormlp on tiny {name}: relative logit error {error:.2e}, latency ratio "
          f"{artifact.notes['latency_ratio']:.2f}, FFN errors {artifact.notes['ffn_relative_error']}")
    assert error < bound
    assert artifact.notes["latency_protected_s"] > 0 and artifact.notes["latency_original_s"] > 0


def test_artifact_withholds_w_down_and_expands_the_selected_fraction() -> None:
    family, expert, ctx, _ = setup("llama")
    artifact = TaylorMLP.from_overrides({"select_fraction": "0.5", "latency_repeats": "0"}).protect(expert, ctx)
    for lay in family.arch_map().mlp_layers():
        assert not set(standard_mlp_keys(lay.mlp)) & set(artifact.state)
        p = taylor_prefix(lay)
        width = expert.body[lay.mlp.gate].shape[0]
        assert artifact.state[p + "coefficients"].shape[0] == 7  # orders 0..6
        assert artifact.state[p + "coefficients"].shape[2] == width // 2 == artifact.notes["expanded_neurons"][str(lay.index)]
        assert artifact.state[p + "exact_down_weight"].shape[1] == width - width // 2
    assert "latency_ratio" not in artifact.notes


def test_same_seed_same_hash_other_seed_other_signs() -> None:
    kw = {"latency_repeats": "0"}
    family, expert, ctx, _ = setup("bert")
    first, second = TaylorMLP.from_overrides(kw).protect(expert, ctx), TaylorMLP.from_overrides(kw).protect(expert, ctx)
    assert first.content_hash() == second.content_hash()
    _, _, other_ctx, _ = setup("bert", ctx_seed=1)
    third = TaylorMLP.from_overrides(kw).protect(expert, other_ctx)
    assert third.content_hash() != first.content_hash()
    key = taylor_prefix(family.arch_map().layers[0]) + "coefficients"
    # the other seed changes the signs only: magnitudes are the same
    torch.testing.assert_close(third.state[key].abs(), first.state[key].abs())


def test_registered() -> None:
    assert defenses.get("taylormlp") is TaylorMLP
    assert TaylorMLP.changes_structure and not TaylorMLP.function_preserving

"""MergeGuard (arXiv:2511.11851) on a tiny residual-MLP family and a learnable synthetic task."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from bench.families.base import MLP, ROPE, ArchitectureMap, LayerMap, MLPMap
from bench.families.family import Family
from bench.params import ParamError, parse_params
from bench.plugins import DefenseContext
from bench.registry import defenses
from bench.suite import Batch, Expert, Regularizer, Suite
from bench.weights import StateDict, task_vector
from defenses.mergeguard import (
    LayerwiseL2,
    MergeGuardParams,
    NegationParams,
    adversarial_weight_negation,
    critical_units,
    heldout_accuracy,
    layerwise_l2,
    lm_io_keys,
    negate,
    negation_units,
    round_half_up,
    top_fraction_mask,
)

D_IN, WIDTH, CLASSES, LAYERS = 6, 16, 3, 4


# ---------------------------------------------------------------- a tiny family and suite


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, 2 * WIDTH)
        self.down = nn.Linear(2 * WIDTH, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.down(torch.relu(self.up(x))))


class Body(nn.Module):
    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(D_IN, WIDTH)
        self.embed_norm = nn.BatchNorm1d(WIDTH) if batchnorm else nn.Identity()
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.final_norm = nn.LayerNorm(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed_norm(self.embed(x))
        for block in self.blocks:
            h = block(h)
        return self.final_norm(h)


class TinyMLPFamily(Family):
    name = "tiny-mlp"

    def __init__(self, features: frozenset[str] = frozenset({MLP}), batchnorm: bool = False) -> None:
        self.features = features
        self.batchnorm = batchnorm

    def new_module(self) -> nn.Module:
        return Body(self.batchnorm)

    def arch_map(self) -> ArchitectureMap:
        layers = tuple(
            LayerMap(
                index=i,
                prefix=f"blocks.{i}.",
                norms=(f"blocks.{i}.norm.weight", f"blocks.{i}.norm.bias"),
                mlp=MLPMap(
                    up=f"blocks.{i}.up.weight",
                    up_bias=f"blocks.{i}.up.bias",
                    down=f"blocks.{i}.down.weight",
                    down_bias=f"blocks.{i}.down.bias",
                    activation="relu",
                ),
            )
            for i in range(LAYERS)
        )
        return ArchitectureMap(
            family=self.name,
            layers=layers,
            embeddings=("embed.weight", "embed.bias"),
            final_norms=("final_norm.weight", "final_norm.bias"),
            features=self.features,
        )

    def install_mlp(self, module: nn.Module, layer: int, mlp: nn.Module) -> None:
        raise NotImplementedError

    def mlp_projection(self, module: nn.Module, layer: int, which: str = "up") -> nn.Module:
        return module.blocks[layer].up


class TaskModel(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TinySuite(Suite):
    """Two synthetic 3-class tasks (labels = argmax of a fixed random projection); full-batch-free Adam recipe."""

    name = "tiny-mlp-suite"

    def __init__(self, features: frozenset[str] = frozenset({MLP}), steps: int = 150, cache_dir=None,
                 batchnorm: bool = False) -> None:
        super().__init__(cache_dir=cache_dir)
        self._family = TinyMLPFamily(features, batchnorm)
        self.steps = steps
        self.finetune_calls: list[dict] = []

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("a", "b")

    def family(self) -> Family:
        return self._family

    def load_pretrained(self) -> StateDict:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return {k: v.detach().clone() for k, v in self._family.new_module().state_dict().items()}

    def recipe(self) -> dict:
        return {"steps": self.steps}

    def _data(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        g = _seeded(100 + self.tasks.index(task))
        projection = torch.randn(D_IN, CLASSES, generator=g)
        n, offset = (384, 0) if split == "train" else (256, 1)
        x = torch.randn(n, D_IN, generator=_seeded(200 + 10 * self.tasks.index(task) + offset))
        return x, (x @ projection).argmax(dim=1)

    def batches(
        self, task: str, split, *, batch_size: int = 32, limit: int | None = None, shuffle: bool = False, seed: int = 0
    ) -> Iterator[Batch]:
        x, y = self._data(task, split)
        order = torch.randperm(len(x), generator=_seeded(seed)) if shuffle else torch.arange(len(x))
        order = order[:limit] if limit is not None else order
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield Batch({"x": x[idx]}, y[idx])

    def _head(self, head: StateDict | None, seed: int) -> nn.Linear:
        module = nn.Linear(WIDTH, CLASSES)
        if head:
            module.load_state_dict(head)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module.reset_parameters()
        return module

    def task_model(self, body, head, task) -> nn.Module:
        return TaskModel(self._family.build(body), self._head(head, 0)).eval()

    def finetune(self, task, body, head=None, *, seed=0, regularizer: Regularizer | None = None, steps=None) -> Expert:
        self.finetune_calls.append({"task": task, "seed": seed, "regularizer": regularizer, "steps": steps})
        model = TaskModel(self._family.build(body), self._head(head, seed)).train()
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
        x, y = self._data(task, "train")
        g = _seeded(seed)
        for _ in range(steps or self.steps):
            idx = torch.randint(0, len(x), (64,), generator=g)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            if regularizer is not None:
                loss = loss + regularizer(model)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        state = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731
        return Expert(state(model.body), state(model.head))

    def evaluate(self, body, head, task, *, merged=False) -> dict[str, float]:
        model = self.task_model(body, head, task)
        return {"accuracy": heldout_accuracy(model, list(self.batches(task, "test", batch_size=128)))}


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> TinySuite:
    return TinySuite(cache_dir=tmp_path_factory.mktemp("mergeguard-cache"))


@pytest.fixture(scope="module")
def expert(suite: TinySuite) -> Expert:
    return suite.finetune("a", suite.pretrained(), seed=0)


def context(suite: TinySuite, seed: int = 0) -> DefenseContext:
    return DefenseContext(
        suite=suite, task="a", base=suite.pretrained(), arch=suite.arch_map(), family=suite.family(), seed=seed
    )


def stage2(suite: TinySuite, expert: Expert, **params) -> tuple[StateDict, dict[str, torch.Tensor], dict]:
    p = NegationParams(**{"heldout_samples": 128, **params})
    return adversarial_weight_negation(expert.body, expert.head, context(suite), p)


# ---------------------------------------------------------------- stage 2


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_stage2_negated_entries_follow_eq4_and_the_rest_is_untouched(suite, expert, beta):
    protected, masks, _ = stage2(suite, expert, beta=beta)
    base, theta = suite.pretrained(), expert.body
    assert sum(int(m.sum()) for m in masks.values()) > 0
    for key, value in protected.items():
        mask = masks.get(key, torch.zeros_like(value, dtype=torch.bool))
        tv = theta[key] - base[key] if value.is_floating_point() else None
        assert torch.equal(value[~mask], theta[key][~mask]), key
        if mask.any():
            # θ̂ = θ' − β τ' = θ_pre + (1 − β) τ' on M = 1
            assert torch.allclose(value[mask], (theta[key] - beta * tv)[mask], atol=1e-6, rtol=0)
            expected = (base[key].double() + (1 - beta) * (theta[key].double() - base[key].double())).float()
            assert torch.equal(value[mask], expected[mask])
            if beta == 1.0:
                assert torch.equal(value[mask], base[key][mask])


def test_stage2_leaves_the_most_important_layer_untouched(suite, expert):
    # k' = 0.25 of 6 units (4 blocks, embed, final norm) -> round(1.5) = 2 critical units.
    protected, masks, notes = stage2(suite, expert, k_layers=0.25)
    drops = notes["unit_drops"]
    assert len(drops) == LAYERS + 2
    critical = notes["critical_units"]
    assert len(critical) == 2
    assert min(drops[n] for n in critical) >= max(drops[n] for n in drops if n not in critical)
    units = {
        u.name: u
        for u in negation_units(task_vector(expert.body, suite.pretrained()), suite.arch_map(), "block", set())
    }
    for name in notes["critical_units"]:
        for key in units[name].keys:
            assert key not in masks
            assert torch.equal(protected[key], expert.body[key])


@pytest.mark.parametrize("layer_mask", ["task_vector", "zero"])
def test_stage2_drops_are_measured_by_masking_each_layer(suite, expert, layer_mask):
    _, _, notes = stage2(suite, expert, layer_mask=layer_mask)
    base, theta = suite.pretrained(), expert.body
    batches = list(suite.batches("a", "train", batch_size=32, limit=128, shuffle=True, seed=0))
    reference = heldout_accuracy(suite.task_model(theta, expert.head, "a"), batches)
    assert notes["heldout_accuracy"] == pytest.approx(reference)
    masked = base if layer_mask == "task_vector" else {k: torch.zeros_like(v) for k, v in theta.items()}
    for unit in ("blocks.2", "final_norm"):
        state = {k: (masked[k] if k.startswith(unit + ".") else v) for k, v in theta.items()}
        dropped = reference - heldout_accuracy(suite.task_model(state, expert.head, "a"), batches)
        assert notes["unit_drops"][unit] == pytest.approx(dropped)


def test_stage2_unit_scope_negates_an_exact_top_k_fraction_of_each_layer_by_task_vector_magnitude(suite, expert):
    k = 0.1
    _, masks, notes = stage2(suite, expert, k_params=k, mask_scope="unit")
    tv = task_vector(expert.body, suite.pretrained())
    for unit in negation_units(tv, suite.arch_map(), "block", set()):
        if unit.name in notes["critical_units"]:
            continue
        chosen = torch.cat([masks[key].flatten() for key in unit.keys])
        magnitude = torch.cat([tv[key].abs().flatten() for key in unit.keys])
        assert int(chosen.sum()) == round_half_up(k * magnitude.numel())
        assert magnitude[chosen].min() >= magnitude[~chosen].max()


def test_stage2_ranks_the_top_k_within_each_tensor_not_across_a_units_tensors(suite, expert):
    """Tensors of unlike scale share a unit (a norm's γ beside a projection): with the paper's k each of
    them loses its own top-k |τ'|, so the large-τ' tensor is not reset to θ_pre wholesale."""
    base = suite.pretrained()
    theta = dict(expert.body)
    for i in range(LAYERS):  # norm affine weights with a τ' far above the projections'
        for key in (f"blocks.{i}.norm.weight", f"blocks.{i}.norm.bias"):
            theta[key] = base[key] + 50.0 * (expert.body[key] - base[key]) + 0.5
    _, masks, _ = adversarial_weight_negation(theta, expert.head, context(suite), NegationParams(heldout_samples=64))
    assert masks
    for key, mask in masks.items():
        tv = (theta[key] - base[key]).abs()
        assert int(mask.sum()) == round_half_up(0.1 * mask.numel()), key
        if mask.any() and not mask.all():
            assert float(tv[mask].min()) >= float(tv[~mask].max()), key


def test_stage2_measures_each_units_drop_with_re_estimated_batchnorm_statistics(bn_suite, bn_expert, monkeypatch):
    """A masked unit's drop is measured after re-estimating the statistics, as the released model is repaired."""
    calls = []
    recalibrate = bn_suite.recalibrate
    monkeypatch.setattr(
        bn_suite,
        "recalibrate",
        lambda model, task, *, seed=0: calls.append(task) or recalibrate(model, task, seed=seed),
    )
    p = NegationParams(heldout_samples=128)
    _, _, notes = adversarial_weight_negation(bn_expert.body, bn_expert.head, context(bn_suite), p)
    units = len(notes["unit_drops"])
    assert len(calls) == units + 2  # θ', every masked unit, and the released body
    base = bn_suite.pretrained()
    batches = list(bn_suite.batches("a", "train", batch_size=32, limit=128, shuffle=True, seed=0))

    def accuracy(body: StateDict) -> float:
        model = bn_suite.task_model(body, bn_expert.head, "a")
        recalibrate(model, "a", seed=0)
        return heldout_accuracy(model, batches)

    masked = {**bn_expert.body, "embed.weight": base["embed.weight"], "embed.bias": base["embed.bias"]}
    assert notes["unit_drops"]["embed"] == pytest.approx(accuracy(bn_expert.body) - accuracy(masked))


def test_top_fraction_mask_breaks_ties_by_position_and_keeps_the_count_exact():
    values = [torch.tensor([1.0, -2.0, 2.0]), torch.tensor([[2.0, 0.5], [-2.0, 3.0]])]
    masks = top_fraction_mask(values, 3 / 7)  # 3 of 7: the 3.0, then the first two |2.0|
    assert masks[0].tolist() == [False, True, True]
    assert masks[1].tolist() == [[False, False], [False, True]]
    assert sum(int(m.sum()) for m in top_fraction_mask(values, 0.5)) == 4  # round_half_up(3.5)


def test_critical_units_round_half_up_and_prefer_earlier_units_on_ties():
    assert critical_units([0.1, 0.3, 0.3, 0.0], 0.25) == [1]
    assert critical_units([0.1, 0.3, 0.3, 0.0], 0.5) == [1, 2]
    assert critical_units([0.5] * 10, 0.1) == [0]
    assert critical_units([0.5] * 4, 0.1) == []


def test_stage2_records_the_mask_evaluation_cost(suite, expert):
    _, _, notes = stage2(suite, expert)
    assert notes["mask_evaluations"] == LAYERS + 2 + 1  # one per unit, one for θ'
    assert notes["mask_eval_seconds"] > 0
    assert notes["heldout_samples"] == 128


def test_language_models_keep_embeddings_final_norm_and_head(expert):
    lm_suite = TinySuite(features=frozenset({MLP, ROPE}))
    protected, masks, notes = stage2(lm_suite, expert, k_layers=0.0, k_params=0.5)
    io_keys = {"embed.weight", "embed.bias", "final_norm.weight", "final_norm.bias"}
    assert set(notes["excluded_tensors"]) == io_keys
    assert not io_keys & set(masks) and not {"embed", "final_norm"} & set(notes["unit_drops"])
    for key in io_keys:
        assert torch.equal(protected[key], expert.body[key])
    # A vision/encoder map undergoes the full operation (§5): the same keys are negated there.
    assert lm_io_keys(expert.body, TinyMLPFamily().arch_map(), "auto") == set()


def test_module_granularity_makes_one_unit_per_leaf_module(suite, expert):
    _, _, notes = stage2(suite, expert, granularity="module")
    assert "blocks.0.up" in notes["unit_drops"] and "blocks.0.norm" in notes["unit_drops"]
    assert len(notes["unit_drops"]) == 3 * LAYERS + 2


@pytest.fixture(scope="module")
def bn_suite(tmp_path_factory) -> TinySuite:
    return TinySuite(cache_dir=tmp_path_factory.mktemp("mergeguard-bn-cache"), batchnorm=True)


@pytest.fixture(scope="module")
def bn_expert(bn_suite: TinySuite) -> Expert:
    return bn_suite.finetune("a", bn_suite.pretrained(), seed=0)


BN_STATISTICS = {"embed_norm.running_mean", "embed_norm.running_var", "embed_norm.num_batches_tracked"}


def test_stage2_on_batchnorm_keeps_statistics_out_of_the_mask_and_re_estimates_them(bn_suite, bn_expert):
    p = NegationParams(heldout_samples=128, k_layers=0.0, k_params=0.5)
    protected, masks, notes = adversarial_weight_negation(bn_expert.body, bn_expert.head, context(bn_suite), p)
    assert not BN_STATISTICS & set(masks) and masks["embed.weight"].any()  # the parameters are negated
    assert notes["recalibrated_statistics"] == 3
    # Every one of the 384 training inputs (fewer than recalibration_samples): the statistics are exactly
    # those of the negated embedding on the training split, whatever the order.
    x, _ = bn_suite._data("a", "train")
    assert notes["recalibration_samples"] == len(x) == 384
    with torch.no_grad():
        h = nn.functional.linear(x, protected["embed.weight"], protected["embed.bias"])
    torch.testing.assert_close(protected["embed_norm.running_mean"], h.mean(dim=0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(protected["embed_norm.running_mean"], bn_expert.body["embed_norm.running_mean"])
    for key in set(protected) - BN_STATISTICS:  # parameters: exactly Eq. 4, untouched by the repair
        expected = negate(bn_expert.body, bn_suite.pretrained(), masks, 1.0)[key]
        assert torch.equal(protected[key], expected), key


def test_stage2_without_recalibration_negates_statistics_like_any_tensor(bn_suite, bn_expert):
    p = NegationParams(heldout_samples=128, k_layers=0.0, k_params=0.5, recalibrate_batchnorm=False)
    protected, masks, notes = adversarial_weight_negation(bn_expert.body, bn_expert.head, context(bn_suite), p)
    assert {"embed_norm.running_mean", "embed_norm.running_var"} <= set(masks)
    assert notes["recalibrated_statistics"] == 0 and notes["recalibration_samples"] == 0
    assert torch.equal(protected["embed_norm.running_mean"],
                       negate(bn_expert.body, bn_suite.pretrained(), masks, 1.0)["embed_norm.running_mean"])


def test_stage2_without_batchnorm_recalibrates_nothing(suite, expert):
    _, _, notes = stage2(suite, expert)
    assert notes["recalibrated_statistics"] == 0 and notes["recalibration_samples"] == 0


# ---------------------------------------------------------------- stage 1


def test_theta_l2sq_value_and_gradient_match_the_formula():
    arch = TinyMLPFamily().arch_map()
    model = TaskModel(Body(), nn.Linear(WIDTH, CLASSES))
    alpha = 0.01
    penalty = LayerwiseL2(alpha, arch, "theta_l2sq")(model)
    body_params = dict(model.body.named_parameters())
    expected = alpha * sum(float(p.detach().double().pow(2).sum()) for p in body_params.values())
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-5)
    penalty.backward()
    for name, p in body_params.items():
        # d/dθ α Σ_ℓ ||θ^(ℓ)||² = 2αθ: pulled toward zero, not toward θ_pre (Eq. 2)
        assert torch.allclose(p.grad, 2 * alpha * p.detach(), atol=1e-7), name
    assert model.head.weight.grad is None  # the task head is not part of the penalty


def test_default_stage1_penalty_pulls_every_layer_with_the_same_strength(suite, expert):
    """"Applied layer-wise so that each layer is regularized independently" (§5): the default term is
    α Σ_ℓ ||θ^(ℓ)||₂, whose gradient has norm α in every layer, large or small; a squared sum would
    give 2αθ, a pull that grows with the layer's weights."""
    defense = defenses.get("mergeguard-stage1")(parse_params(defenses.get("mergeguard-stage1").Params, {"steps": "2"}))
    defense.protect(expert, context(suite, seed=11))
    regularizer = suite.finetune_calls[-1]["regularizer"]
    model = TaskModel(Body(), nn.Linear(WIDTH, CLASSES))
    with torch.no_grad():
        model.body.blocks[0].up.weight.mul_(30.0)  # one layer far larger than the others
    regularizer(model).backward()
    grads = {}
    for name, p in model.body.named_parameters():
        layer = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else name.split(".")[0]
        grads[layer] = grads.get(layer, 0.0) + float(p.grad.pow(2).sum())
    assert len(grads) == LAYERS + 2
    for layer, squared in grads.items():
        assert math.sqrt(squared) == pytest.approx(0.01, rel=1e-4), layer


@pytest.mark.parametrize("penalty", ["theta_l2sq", "layer_l2", "layer_mean_l2sq", "tau_l2sq"])
def test_layerwise_l2_readings_match_their_formulas(penalty):
    arch = TinyMLPFamily().arch_map()
    body = Body()
    anchor = {k: v.detach() + 0.1 for k, v in body.state_dict().items()}
    params = dict(body.named_parameters())
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in params.items():
        x = p.detach().double() - (anchor[name].double() if penalty == "tau_l2sq" else 0.0)
        layer = name.split(".")[0] + (f".{name.split('.')[1]}" if name.startswith("blocks.") else "")
        groups.setdefault(layer, []).append(x)
    expected = 0.0
    for tensors in groups.values():
        squared = sum(float(t.pow(2).sum()) for t in tensors)
        n = sum(t.numel() for t in tensors)
        readings = {"theta_l2sq": squared, "layer_l2": math.sqrt(squared), "layer_mean_l2sq": squared / n}
        expected += readings.get(penalty, squared)
    assert len(groups) == LAYERS + 2  # one group per block, the embedding, the final norm
    assert float(layerwise_l2(body, arch, penalty, anchor).detach()) == pytest.approx(expected, rel=1e-5)


def test_stage1_refinetunes_the_expert_with_the_regulariser_and_releases_its_head(suite, expert):
    defense = defenses.get("mergeguard-stage1")(parse_params(defenses.get("mergeguard-stage1").Params, {"steps": "40"}))
    calls = len(suite.finetune_calls)
    artifact = defense.protect(expert, context(suite, seed=3))
    call = suite.finetune_calls[calls]
    assert call["task"] == "a" and call["seed"] == 3 and call["steps"] == 40
    assert isinstance(call["regularizer"], LayerwiseL2) and call["regularizer"].alpha == 0.01
    assert artifact.head is not None and not torch.equal(artifact.head["weight"], expert.head["weight"])
    # the regulariser shrinks the weights
    norm = lambda s: sum(float(v.pow(2).sum()) for k, v in s.items() if k.endswith("weight"))  # noqa: E731
    assert norm(artifact.state) < norm(expert.body)
    assert "unit_drops" not in artifact.notes


def test_stage1_is_fine_tuned_once_for_mergeguard_and_its_stage1_ablation(suite, expert):
    params = {"steps": "30", "heldout_samples": "64"}
    stage1 = defenses.get("mergeguard-stage1")(parse_params(defenses.get("mergeguard-stage1").Params, {"steps": "30"}))
    full = defenses.get("mergeguard")(parse_params(defenses.get("mergeguard").Params, params))
    calls = len(suite.finetune_calls)
    first = stage1.protect(expert, context(suite, seed=5))
    assert len(suite.finetune_calls) == calls + 1
    protected = full.protect(expert, context(suite, seed=5))
    assert len(suite.finetune_calls) == calls + 1  # stage 1 came from the cache
    assert torch.equal(protected.head["weight"], first.head["weight"])
    other_seed = stage1.protect(expert, context(suite, seed=6))
    assert len(suite.finetune_calls) == calls + 2 and other_seed.content_hash() != first.content_hash()


# ---------------------------------------------------------------- the whole defense


def test_mergeguard_keeps_standalone_accuracy_within_five_points(suite, expert):
    defense = defenses.get("mergeguard")(MergeGuardParams(steps=100, heldout_samples=128))
    artifact = defense.protect(expert, context(suite))
    before = suite.evaluate(expert.body, expert.head, "a")["accuracy"]
    after = suite.evaluate(artifact.state, artifact.head, "a")["accuracy"]
    assert before > 0.85
    assert after >= before - 0.05
    assert artifact.notes["stages"] == [1, 2] and artifact.notes["negated_entries"] > 0
    assert artifact.head is not None


def test_mergeguard_is_deterministic_per_seed(suite, expert):
    params = MergeGuardParams(steps=20, heldout_samples=64)
    first = defenses.get("mergeguard")(params).protect(expert, context(suite, seed=1))
    again = defenses.get("mergeguard")(params).protect(expert, context(suite, seed=1))
    other = defenses.get("mergeguard")(params).protect(expert, context(suite, seed=2))
    assert first.content_hash() == again.content_hash()
    assert first.content_hash() != other.content_hash()


def test_stage2_ablation_works_on_the_unregularised_expert(suite, expert):
    calls = len(suite.finetune_calls)
    artifact = defenses.get("mergeguard-stage2")(NegationParams(heldout_samples=64)).protect(expert, context(suite))
    assert len(suite.finetune_calls) == calls
    assert artifact.head is None
    changed = [k for k in expert.body if not torch.equal(artifact.state[k], expert.body[k])]
    assert changed and all(
        torch.equal(
            artifact.state[k][artifact.state[k] != expert.body[k]],
            suite.pretrained()[k][artifact.state[k] != expert.body[k]],
        )
        for k in changed
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"k_layers": "1.5"},
        {"k_params": "-0.1"},
        {"beta": "0"},
        {"heldout_samples": "0"},
        {"alpha": "-1"},
        {"penalty": "l1"},
        {"mask_scope": "model"},
    ],
)
def test_invalid_params_raise_a_param_error(bad):
    with pytest.raises(ParamError):
        parse_params(MergeGuardParams, bad)


def test_the_three_variants_are_registered_with_their_params():
    assert defenses.get("mergeguard").Params is MergeGuardParams
    stage1_fields = {f.name for f in dataclasses.fields(defenses.get("mergeguard-stage1").Params)}
    assert stage1_fields == {"alpha", "steps", "penalty"}
    assert "alpha" not in {f.name for f in dataclasses.fields(defenses.get("mergeguard-stage2").Params)}
    assert MergeGuardParams().alpha == 0.01 and MergeGuardParams().beta == 1.0
    assert math.isclose(MergeGuardParams().k_layers, 0.1) and math.isclose(MergeGuardParams().k_params, 0.1)


@pytest.mark.parametrize("tied", [True, False])
def test_llama_maps_exclude_embed_tokens_final_norm_and_lm_head(tied):
    from bench.families.tiny import tiny

    family, state = tiny("llama", tie_word_embeddings=tied)
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tied else {"lm_head.weight"})
    assert lm_io_keys(state, family.arch_map(), "auto") == expected
    assert lm_io_keys(state, family.arch_map(), "no") == set()


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["rt-sentiment", "rt-subjectivity", "debate-party", "convention-party"])
def test_mergeguard_on_text_minilm_clears_the_utility_floor_on_every_victim(tmp_path, victim):
    """The real suite: utility (artifact / expert) at or above the leaderboard's 0.9 floor on every victim
    (the paper's worst standalone drop is 4.35 points, Table 1)."""
    from bench.scoring import UTILITY_FLOOR
    from tasks.text_minilm import TextMiniLM

    real = TextMiniLM(cache_dir=tmp_path)
    expert = real.expert(victim)
    ctx = DefenseContext(suite=real, task=victim, base=real.pretrained(), arch=real.arch_map(), family=real.family())
    artifact = defenses.get("mergeguard")().protect(expert, ctx)
    before = real.evaluate(expert.body, expert.head, victim)["accuracy"]
    after = real.evaluate(artifact.state, artifact.head, victim)["accuracy"]
    assert after / before >= UTILITY_FLOOR, (victim, before, after)
    assert 0.05 < artifact.notes["negated_fraction"] <= 0.1


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["digits", "mnist5k", "animal-mnist"])
def test_mergeguard_on_vision_effnet_clears_the_utility_floor_on_every_victim(tmp_path, victim):
    """The CNN suite (BatchNorm, SGD recipe): utility at or above the 0.9 floor on every victim."""
    from bench.scoring import UTILITY_FLOOR
    from tasks.vision_effnet import VisionEffNet

    real = VisionEffNet(cache_dir=tmp_path)
    expert = real.expert(victim)
    ctx = DefenseContext(suite=real, task=victim, base=real.pretrained(), arch=real.arch_map(), family=real.family())
    artifact = defenses.get("mergeguard")().protect(expert, ctx)
    before = real.evaluate(expert.body, expert.head, victim)["accuracy"]
    after = real.evaluate(artifact.state, artifact.head, victim)["accuracy"]
    assert after / before >= UTILITY_FLOOR, (victim, before, after)

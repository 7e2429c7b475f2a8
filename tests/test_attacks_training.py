from __future__ import annotations

import torch

from attacks.graderase import GradErase, project_out
from attacks.merge_finetune import MergeFinetune
from attacks.unmask import Unmask
from bench.artifact import Artifact
from bench.plan import make_attacks
from bench.plugins import AttackContext


def _ctx(suite, artifact: Artifact, merge_name: str = "ta", merge_params=None) -> AttackContext:
    expert = suite.expert("t10")
    return AttackContext(suite=suite, victim="t10", partners=("t20",), base=suite.pretrained(), arch=suite.arch_map(),
                         family=suite.family(), artifact=artifact, partner_bodies=[suite.expert("t20").body],
                         victim_head=expert.head, merge_name=merge_name, merge_params=merge_params or {}, seed=0)


def test_unmask_subtracts_the_scaled_task_vector_by_hand() -> None:
    base = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([7])}
    released = {"w": torch.tensor([3.0, -2.0]), "n": torch.tensor([7])}
    merged = {"w": torch.tensor([10.0, 10.0]), "n": torch.tensor([7])}
    ctx = AttackContext(suite=None, victim="v", partners=("p",), base=base, arch=None, family=None,
                        artifact=Artifact(released), merge_name="ta", merge_params={"lambda_": 0.5})
    out = Unmask().finish(merged, ctx)
    # 10 - 0.5 * (3 - 1) = 9 ; 10 - 0.5 * (-2 - 2) = 12
    assert torch.equal(out["w"], torch.tensor([9.0, 12.0])) and torch.equal(out["n"], torch.tensor([7]))
    ctx_wa = AttackContext(suite=None, victim="v", partners=("p",), base=base, arch=None, family=None,
                           artifact=Artifact(released), merge_name="wa")
    assert torch.allclose(Unmask().finish(merged, ctx_wa)["w"], torch.tensor([9.0, 12.0]))  # λ = 1/2 for 2 models
    assert torch.allclose(Unmask.from_overrides({"lambda_": "1"}).finish(merged, ctx)["w"], torch.tensor([8.0, 14.0]))


def test_unmask_on_task_arithmetic_of_one_model_returns_the_base() -> None:
    base = {"w": torch.randn(5)}
    released = {"w": torch.randn(5)}
    merged = {"w": base["w"] + 0.3 * (released["w"] - base["w"])}
    ctx = AttackContext(suite=None, victim="v", partners=(), base=base, arch=None, family=None,
                        artifact=Artifact(released), merge_name="ta", merge_params={"lambda_": 0.3})
    assert torch.allclose(Unmask().finish(merged, ctx)["w"], base["w"], atol=1e-6)


def test_projection_removes_the_component_along_v_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=g), torch.randn(7, generator=g)]
    v = [torch.randn(4, 3, generator=g), torch.randn(7, generator=g)]
    before = [x.clone() for x in grads]
    project_out(grads, v)
    dot = sum((a * b).sum() for a, b in zip(grads, v))
    assert abs(float(dot)) < 1e-5
    # only the component along v was removed: the difference is parallel to v
    diff = torch.cat([(b - a).flatten() for a, b in zip(grads, before)])
    vv = torch.cat([x.flatten() for x in v])
    cos = torch.nn.functional.cosine_similarity(diff, vv, dim=0)
    assert abs(abs(float(cos)) - 1) < 1e-5


def test_graderase_update_follows_projected_gradients(toy_suite, monkeypatch) -> None:
    """Every gradient the retraining optimiser steps on is orthogonal to v = −τ_G, read at `step()` itself."""
    import attacks.graderase as ge

    directions: list[dict[str, torch.Tensor]] = []
    real_disturbance = ge.GradErase.disturbance

    def keep_direction(self, ctx, data):
        directions.append(real_disturbance(self, ctx, data))
        return directions[-1]

    raw_cosines: list[float] = []  # ⟨g, v⟩ before projection: the hook has something to remove
    real_project = ge.project_out

    def spy_project(grads, direction):
        raw_cosines.append(_cosine(grads, direction))
        real_project(grads, direction)

    stepped: list[list[list[torch.Tensor]]] = []  # per optimiser, per step: the gradients step() reads
    real_make = toy_suite.make_optimizer

    def spying_optimizer(params):
        params = list(params)
        opt = real_make(params)
        record: list[list[torch.Tensor]] = []
        stepped.append(record)
        real_step = opt.step

        def step(*args, **kw):
            record.append([q.grad.detach().clone() for q in params])
            return real_step(*args, **kw)

        opt.step = step
        return opt

    expert = toy_suite.expert("t10")
    ctx = _ctx(toy_suite, Artifact(dict(expert.body)))  # the experts are fine-tuned (or loaded) before the spies
    monkeypatch.setattr(ge.GradErase, "disturbance", keep_direction)
    monkeypatch.setattr(ge, "project_out", spy_project)
    monkeypatch.setattr(toy_suite, "make_optimizer", spying_optimizer)
    attack = GradErase.from_overrides({"samples": "32", "estimate_steps": "2", "steps": "3", "batch_size": "16"})
    out = attack.finish(dict(expert.body), ctx)
    # the body's trainable tensors in the order the optimiser holds them, and v in that order
    names = [n for n, q in toy_suite.task_model(expert.body, expert.head, "t10").body.named_parameters()
             if q.is_floating_point()]
    (v,) = directions
    direction = [v[n] for n in names]
    assert [len(r) for r in stepped] == [2, 3]  # the estimate's fine-tune, then the projected one
    # measured: cos(g, v) 0.23-0.26 before the projection, |cos| ≤ 1.3e-8 (float32 rounding) at step()
    assert len(raw_cosines) == 3 and min(abs(c) for c in raw_cosines) > 0.1
    assert max(abs(_cosine(grads, direction)) for grads in stepped[1]) < 5e-8
    assert set(out) == set(expert.body)
    assert any(not torch.equal(out[k], expert.body[k]) for k in out if out[k].is_floating_point())


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """cos(a, b) over all tensors together, in float64."""
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    na = sum(float(x.double().pow(2).sum()) for x in a) ** 0.5
    nb = sum(float(y.double().pow(2).sum()) for y in b) ** 0.5
    return dot / (na * nb)


def test_merge_finetune_uses_exactly_its_sample_budget(toy_suite, monkeypatch) -> None:
    seen: set[tuple[int, ...]] = set()
    real = toy_suite.batches

    def spy(task, split, **kw):
        for b in real(task, split, **kw):
            seen.update(tuple(row.tolist()) for row in b.inputs["input_ids"])
            yield b

    monkeypatch.setattr(toy_suite, "batches", spy)
    expert = toy_suite.expert("t10")
    attack = MergeFinetune.from_overrides({"samples": "16", "steps": "5", "batch_size": "8"})
    attack.finish(dict(expert.body), _ctx(toy_suite, Artifact(dict(expert.body))))
    assert len(seen) == 16
    assert attack.needs().labelled == 16 and attack.needs().finetune_steps == 5


def test_merge_finetune_sweeps_its_budgets_and_composites_use_defaults(plugin_site) -> None:
    points = make_attacks("merge-finetune")
    assert [a.label for a in points] == [f"merge-finetune[samples={k}]" for k in (16, 64, 256)]
    assert [a.params.samples for a in points] == [16, 64, 256]
    (comp,) = make_attacks("unmask+merge-finetune")
    assert comp.name == "unmask+merge-finetune" and comp.steps[1].params.samples == 64
    assert comp.needs().labelled == 64 and comp.needs().knows_defense


def test_merge_finetune_recovers_accuracy_on_a_damaged_merge(toy_suite) -> None:
    expert = toy_suite.expert("t10")
    damaged = {k: (toy_suite.pretrained()[k] if v.is_floating_point() else v) for k, v in expert.body.items()}
    before = toy_suite.evaluate(damaged, expert.head, "t10")["accuracy"]
    attack = MergeFinetune.from_overrides({"samples": "256", "steps": "40", "batch_size": "32"})
    out = attack.finish(damaged, _ctx(toy_suite, Artifact(dict(expert.body))))
    after = toy_suite.evaluate(out, expert.head, "t10")["accuracy"]
    assert after > before + 0.1, (before, after)


def _count_training_samples(suite, monkeypatch, task: str) -> set[tuple[int, ...]]:
    """Distinct training examples of ``task`` drawn from ``suite`` from now on (filled as the attack runs)."""
    seen: set[tuple[int, ...]] = set()
    real = suite.batches

    def spy(name, split, **kw):
        for b in real(name, split, **kw):
            if (name, split) == (task, "train"):
                seen.update(tuple(row.tolist()) for row in b.inputs["input_ids"])
            yield b

    monkeypatch.setattr(suite, "batches", spy)
    return seen


def test_graderase_uses_exactly_its_declared_labelled_budget(toy_suite, monkeypatch) -> None:
    # One draw of k examples serves the estimate of v and the re-training (version 1 drew two sets of k).
    expert = toy_suite.expert("t10")
    ctx = _ctx(toy_suite, Artifact(dict(expert.body)))  # builds the partner's expert before counting starts
    seen = _count_training_samples(toy_suite, monkeypatch, "t10")
    attack = GradErase.from_overrides({"samples": "16", "estimate_steps": "3", "steps": "3", "batch_size": "8"})
    attack.finish(dict(expert.body), ctx)
    assert len(seen) == attack.needs().labelled == 16


def test_graderase_estimates_the_disturbance_from_the_released_artifact(toy_suite) -> None:
    """v = −(the artifact fine-tuned on the attacker's k samples − the artifact): it moves with the artifact."""
    import attacks.graderase as ge
    from attacks._train import TrainBudget, finetune_body

    expert = toy_suite.expert("t10")
    base = toy_suite.pretrained()
    # a MergeGuard-like release: the largest 10% of each tensor's task-vector entries reset to θ_pre
    negated = {}
    for k, v in expert.body.items():
        tau = v - base[k]
        if v.is_floating_point() and tau.numel() > 10:
            cut = tau.abs().flatten().kthvalue(int(0.9 * tau.numel())).values
            negated[k] = torch.where(tau.abs() > cut, base[k], v)
        else:
            negated[k] = v
    attack = GradErase.from_overrides({"samples": "16", "estimate_steps": "4", "steps": "1", "batch_size": "8"})
    released = _ctx(toy_suite, Artifact(negated))
    data = attack.labelled_set(released)
    v = attack.disturbance(released, data)
    tuned = finetune_body(toy_suite, Artifact(negated), expert.head, "t10", TrainBudget(16, 4, 8), seed=0, data=data)
    for k in v:
        assert torch.equal(v[k], -(tuned[k] - negated[k]))
    other = attack.disturbance(_ctx(toy_suite, Artifact(dict(expert.body))), data)
    assert any(not torch.allclose(v[k], other[k]) for k in v)
    assert ge.GradErase.version == "2"


def test_attack_fine_tuning_uses_the_optimizer_of_each_embedded_suites_recipe(tmp_path) -> None:
    from tasks.text_minilm import TextMiniLM
    from tasks.vision_effnet import VisionEffNet

    for suite in (TextMiniLM(cache_dir=tmp_path), VisionEffNet(cache_dir=tmp_path)):
        declared = suite.recipe()["optimizer"]
        opt = suite.make_optimizer([torch.nn.Parameter(torch.zeros(2))])
        assert type(opt).__name__ == declared["name"], suite.name
        for field in ("lr", "weight_decay", "momentum"):
            if field in declared:
                assert opt.defaults[field] == declared[field], (suite.name, field)


def test_merge_finetune_on_vision_effnet_trains_with_the_suites_sgd(tmp_path, monkeypatch) -> None:
    """The vision experts were trained with SGD (lr 0.005, momentum 0.9): so is the attacker's fine-tune."""
    from tasks.vision_effnet import VisionEffNet

    suite = VisionEffNet(cache_dir=tmp_path)
    made: list[torch.optim.Optimizer] = []
    real = suite.make_optimizer
    monkeypatch.setattr(suite, "make_optimizer", lambda params: made.append(real(params)) or made[-1])
    body = suite.pretrained()
    head = {"weight": 0.01 * torch.randn(10, 1280, generator=torch.Generator().manual_seed(0)), "bias": torch.zeros(10)}
    ctx = AttackContext(suite=suite, victim="digits", partners=(), base=body, arch=suite.arch_map(),
                        family=suite.family(), artifact=Artifact(dict(body)), victim_head=head, seed=0)
    out = MergeFinetune.from_overrides({"samples": "8", "steps": "1", "batch_size": "8"}).finish(dict(body), ctx)
    (opt,) = made
    assert type(opt) is torch.optim.SGD
    assert opt.defaults["lr"] == 0.005 and opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 0
    assert opt.state and any(not torch.equal(out[k], body[k]) for k in body if body[k].is_floating_point())

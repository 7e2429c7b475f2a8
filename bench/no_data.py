"""The data source of a protection given no task data: θ_pre and the family, and a refusal for the rest.

`bench protect` without ``--data`` and `bench validate` hand a defense this suite. A defense that
declares `Defense.needs_data` is turned away before it runs; one that reads data without declaring
it meets `DataRequiredError` here, whose message names the ``--data`` forms, instead of a crash
deep inside its own code.
"""

from __future__ import annotations

from typing import Any

from bench.families.family import Family
from bench.suite import Suite
from bench.weights import StateDict

DATA_FORMS = '--data FILE.jsonl (one {"text": ..., "label": ...} per line) or --data suite:NAME/TASK'
NO_DATA_TASK = "checkpoint"
"""The one task of `NoDataSuite`: the checkpoint itself, which has no data."""


class DataRequiredError(ValueError):
    """A defense needs task data that the caller did not provide."""


def data_required(defense: str) -> DataRequiredError:
    """The error for ``defense`` run without task data (one message, wherever the need is found)."""
    return DataRequiredError(f"defense {defense!r} runs the model on task data; pass {DATA_FORMS}")


class NoDataSuite(Suite):
    """The context suite of a data-free protection: θ_pre and the family, and no task data."""

    name = "checkpoint"

    def __init__(self, family: Family, base: StateDict, defense: str) -> None:
        super().__init__()
        self._family, self._base, self._defense = family, base, defense

    @property
    def tasks(self) -> tuple[str, ...]:
        return (NO_DATA_TASK,)

    def family(self) -> Family:
        return self._family

    def load_pretrained(self) -> StateDict:
        return self._base

    def recipe(self) -> dict[str, Any]:
        return {}

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise data_required(self._defense)

    batches = task_model = finetune = evaluate = _refuse  # type: ignore[assignment]

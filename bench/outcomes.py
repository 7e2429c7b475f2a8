"""Per-example outcomes of an evaluation: what the intervals of every published number rest on.

An evaluation of a model on a task's test split gives its metrics (``{"accuracy": 0.81}``) and,
where the suite can say, one outcome per test example for each metric (1/0 for a correct/incorrect
prediction, or a per-example score) whose mean is the metric. Scoring resamples these outcomes
(a paired bootstrap over test examples, `bench.scoring`), so a cell stores them next to its metrics.

They are stored compactly as text: a 0/1 vector as ``bits:<n>:<base64 of packed bits>`` (500 test
examples take 88 characters), any other vector as ``f8:<n>:<base64 of little-endian float64>``.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


class OutcomeError(ValueError):
    """Stored per-example outcomes that cannot be decoded, or that disagree with their metric."""


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one model on one task, with per-example outcomes where the suite provides them."""

    metrics: Mapping[str, float]
    examples: Mapping[str, np.ndarray] = field(default_factory=dict)
    """metric -> one value per test example (in test-split order) whose mean is the metric."""

    def __post_init__(self) -> None:
        bad = [k for k, v in self.metrics.items() if not math.isfinite(float(v))]
        if bad:  # a NaN metric would pass for a number everywhere downstream: fail the cell instead
            raise OutcomeError(f"the evaluation returned a non-finite {bad[0]} ({self.metrics[bad[0]]})")
        for name, values in self.examples.items():
            if name not in self.metrics:
                raise OutcomeError(f"per-example outcomes for {name!r}, which is not among the metrics")
            if len(values) == 0:
                raise OutcomeError(f"per-example outcomes for {name!r} are empty")
            if not math.isclose(float(np.mean(values)), float(self.metrics[name]), rel_tol=1e-9, abs_tol=1e-9):
                raise OutcomeError(f"per-example outcomes for {name!r} average {float(np.mean(values))!r}, "
                                   f"not the metric {float(self.metrics[name])!r}")

    @classmethod
    def from_examples(cls, examples: Mapping[str, Sequence[float] | np.ndarray]) -> Evaluation:
        """Metrics as the means of per-example outcomes."""
        arrays = {k: np.asarray(v, dtype=np.float64) for k, v in examples.items()}
        return cls({k: float(v.mean()) for k, v in arrays.items()}, arrays)

    def to_json(self) -> dict[str, dict[str, object]]:
        """A JSON-safe form (what the stage cache stores)."""
        return {"metrics": {k: float(v) for k, v in self.metrics.items()},
                "examples": {k: encode(v) for k, v in self.examples.items()}}

    @classmethod
    def from_json(cls, value: Mapping[str, Mapping[str, object]]) -> Evaluation:
        return cls({k: float(v) for k, v in value["metrics"].items()},  # type: ignore[arg-type]
                   {k: decode(str(v)) for k, v in value.get("examples", {}).items()})


def encode(values: Sequence[float] | np.ndarray) -> str:
    """Compact text of a per-example vector (bits when every value is 0 or 1)."""
    a = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(a)):
        raise OutcomeError("per-example outcomes must be finite")
    if np.all((a == 0) | (a == 1)):
        return f"bits:{a.size}:" + base64.b64encode(np.packbits(a.astype(np.uint8))).decode("ascii")
    return f"f8:{a.size}:" + base64.b64encode(a.astype("<f8").tobytes()).decode("ascii")


def decode(text: str) -> np.ndarray:
    """The vector `encode` wrote."""
    try:
        kind, n_text, payload = text.split(":", 2)
        n = int(n_text)
        raw = base64.b64decode(payload.encode("ascii"), validate=True)
    except (ValueError, TypeError) as exc:
        raise OutcomeError(f"cannot decode per-example outcomes {text[:40]!r}: {exc}") from exc
    if kind == "bits":
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))
        if bits.size < n:
            raise OutcomeError(f"per-example outcomes hold {bits.size} bits, expected {n}")
        return bits[:n].astype(np.float64)
    if kind == "f8":
        a = np.frombuffer(raw, dtype="<f8").astype(np.float64)
        if a.size != n:
            raise OutcomeError(f"per-example outcomes hold {a.size} values, expected {n}")
        return a
    raise OutcomeError(f"unknown per-example encoding {kind!r}")


__all__ = ["Evaluation", "OutcomeError", "decode", "encode"]

"""Plugin parameters: frozen dataclasses parsed from ``key=value`` strings with type checks.

Every float must be finite (``nan`` and ``inf`` never reach a merge or a stored spec), and a field
may declare its valid range in its annotation, checked when the parameters are parsed (so when a
plan is built, before any model work)::

    TrimFraction = Annotated[float, Range(0, 1, low_open=True, hint="0.2 keeps the top 20 %")]

    @merge_method("ties")
    def ties(base, experts, *, generator, k: TrimFraction = 0.2): ...
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ParamError(ValueError):
    """A plugin parameter is unknown, has a value of the wrong type, or lies outside its range."""


@dataclass(frozen=True)
class Range:
    """The interval a numeric parameter must lie in, declared as ``Annotated[float, Range(...)]``."""

    low: float | None = None
    """Lower bound (None: unbounded below)."""
    high: float | None = None
    """Upper bound (None: unbounded above)."""
    low_open: bool = False
    """Exclude ``low`` itself."""
    high_open: bool = False
    """Exclude ``high`` itself."""
    hint: str = ""
    """What the parameter means, for the error message (``"the fraction of entries kept"``)."""

    def __str__(self) -> str:
        left = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        right = "inf)" if self.high is None else f"{self.high:g}{')' if self.high_open else ']'}"
        return f"{left}, {right}"

    def contains(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def check(self, name: str, value: Any) -> None:
        """Raise `ParamError` unless ``value`` (a number, or a tuple of numbers) lies in this range."""
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not self.contains(v):
                hint = f" ({self.hint})" if self.hint else ""
                raise ParamError(f"parameter {name} must lie in {self}{hint}; got {v!r}")


def _split_annotation(annotation: Any) -> tuple[Any, tuple[Range, ...]]:
    """(the type, its declared ranges) of a possibly ``Annotated`` field type."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        return base, tuple(e for e in extras if isinstance(e, Range))
    return annotation, ()


def _check_finite(name: str, value: Any) -> None:
    for v in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(v, float) and not math.isfinite(v):
            raise ParamError(f"parameter {name} must be a finite number; got {v!r}")


@dataclasses.dataclass(frozen=True)
class NoParams:
    """This plugin takes no parameters."""


def _convert(name: str, raw: Any, annotation: Any) -> Any:
    annotation, _ = _split_annotation(annotation)
    if not isinstance(raw, str):
        return raw
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if raw.lower() in ("none", "null", ""):
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(name, raw, inner[0]) if inner else raw
    if origin in (tuple, list):
        item = args[0] if args else str
        values = tuple(_convert(name, part.strip(), item) for part in raw.split(",") if part.strip())
        return values if origin is tuple else list(values)
    if origin is typing.Literal:
        if raw not in args:
            raise ParamError(f"parameter {name!r} must be one of {', '.join(map(str, args))}; got {raw!r}")
        return raw
    try:
        if annotation is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if annotation in (int, float, str):
            return annotation(raw)
    except ValueError as exc:
        raise ParamError(f"parameter {name!r} expects {annotation.__name__}; got {raw!r}") from exc
    return raw


def parse_params(cls: type, overrides: Mapping[str, Any] | None) -> Any:
    """Instantiate the params dataclass ``cls`` with ``overrides`` (strings are converted by field type)."""
    overrides = dict(overrides or {})
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ParamError(
            f"unknown parameter(s) {', '.join(unknown)} for {cls.__qualname__}; "
            f"accepted: {', '.join(sorted(fields)) or '(none)'}"
        )
    values = {k: _convert(k, v, hints[k]) for k, v in overrides.items()}
    for k, v in values.items():
        _check_finite(k, v)
        for declared in _split_annotation(hints[k])[1]:
            declared.check(k, v)
    return cls(**values)


def params_dict(params: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a params dataclass (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()}


def param_text(value: Any) -> str:
    """``value`` as a ``--param`` string that `parse_params` reads back to it: ``4`` for 4.0, ``0.558``, ``true``,
    ``none``, ``a,b`` for a sequence (the canonical text of a variant label, `bench.plugins.Defense.label`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, (list, tuple)):
        return ",".join(param_text(v) for v in value)
    return str(value)


def describe_params(cls: type) -> list[dict[str, str]]:
    """Name, type and default of each field, for `bench list` and the methods page."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        ann, ranges = _split_annotation(hints[f.name])
        kind = getattr(ann, "__name__", str(ann)) + "".join(f" in {r}" for r in ranges)
        out.append({"name": f.name, "type": kind, "default": repr(default)})
    return out

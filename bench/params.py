"""Plugin parameters: frozen dataclasses parsed from ``key=value`` strings with type checks."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any


class ParamError(ValueError):
    """A plugin parameter is unknown or has a value of the wrong type."""


@dataclasses.dataclass(frozen=True)
class NoParams:
    """This plugin takes no parameters."""


def _convert(name: str, raw: Any, annotation: Any) -> Any:
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
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ParamError(
            f"unknown parameter(s) {', '.join(unknown)} for {cls.__qualname__}; "
            f"accepted: {', '.join(sorted(fields)) or '(none)'}"
        )
    values = {k: _convert(k, v, hints[k]) for k, v in overrides.items()}
    return cls(**values)


def params_dict(params: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a params dataclass (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()}


def describe_params(cls: type) -> list[dict[str, str]]:
    """Name, type and default of each field, for `bench list` and the methods page."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        ann = hints[f.name]
        out.append({"name": f.name, "type": getattr(ann, "__name__", str(ann)), "default": repr(default)})
    return out

"""Merge methods as typed functions (the mergekit `easy_define` idea).

Two shapes of method, both registered with `merge_method`:

* **tensor-wise** — ``fn(base: Tensor, experts: list[Tensor], *, generator, <params>) -> Tensor``,
  applied tensor by tensor over an iterator of names, so peak memory is a few tensors; one that
  also declares a row-block job (``@blockwise``, `bench.outofcore`) merges a large tensor a block of
  rows at a time, so peak memory is a few blocks;
* **model-wise** — ``fn(base: StateDict, experts: list[StateDict], *, ctx: MergeContext, <params>)
  -> StateDict``, for methods that must run the model (AdaMerging) or see the whole model
  (``ties-global``, which also declares a block stream with ``@streams`` so `bench merge` runs it
  out of core).

Keyword parameters after the tensors are the method's parameters; the decorator turns them into a
frozen dataclass (the schema ``bench list`` prints and the CLI's ``--param k=v`` parses), and
fails at import on a parameter without an annotation or default.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.outofcore import merged_tensor
from bench.params import describe_params, params_dict, parse_params
from bench.registry import merges
from bench.weights import CheckpointError, StateDict

_RESERVED = {"base", "experts", "generator", "ctx"}


@dataclass
class MergeContext:
    """What a model-wise merge may use: the suite, the merged tasks (in the order of the experts) and their heads."""

    suite: Any
    tasks: Sequence[str]
    heads: Sequence[StateDict]
    seed: int = 0
    victim: str = ""
    """The task whose capability the free-rider wants (what a tuned merge tunes for); '' when none."""
    notes: dict[str, Any] = field(default_factory=dict)
    """What the merge chose (a tuned coefficient, ...): recorded in the cell's provenance."""


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., Any]
    Params: type
    tensorwise: bool
    version: str = "1"
    paper: str = ""
    needs_data: bool = False
    """Model-wise methods that run the model on task data (unlabelled inputs, or labelled victim samples)."""
    labelled_param: str = ""
    """The parameter giving the number of labelled victim samples the method tunes on ('' = it uses none)."""

    def labelled(self, params: Any) -> int:
        """Labelled victim samples a merge with ``params`` uses (counted against the attacker's budget)."""
        return int(getattr(params, self.labelled_param)) if self.labelled_param else 0

    def __reduce__(self) -> tuple:
        # Pickled by name (for worker processes): the registry gives back the same method.
        return (merge_method_by_name, (self.name,))

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.fn) or ""

    def parse(self, overrides: Mapping[str, Any] | None = None) -> Any:
        return parse_params(self.Params, overrides)

    def spec(self, params: Any) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "params": params_dict(params)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "summary": self.doc.splitlines()[0] if self.doc else "",
                "doc": self.doc, "paper": self.paper, "code": "", "params": describe_params(self.Params)}

    def merge_iter(self, base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                   params: Any, *, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield merged tensors one at a time (tensor-wise methods only)."""
        if not self.tensorwise:
            raise TypeError(f"merge method {self.name!r} runs the model; call merge() with a context")
        if not experts:
            raise CheckpointError("a merge needs at least one expert")
        kwargs = params_dict(params)
        for k in base:
            # in row blocks when the method declares a block job (bench.outofcore): a few blocks of
            # temporaries, not a few copies of the tensor; the same result as merging it whole
            yield k, merged_tensor(self, base, experts, kwargs, k, seed=seed)

    def merge(self, base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
              params: Any = None, *, ctx: MergeContext | None = None, seed: int = 0) -> StateDict:
        params = params if params is not None else self.Params()
        if self.tensorwise:
            return dict(self.merge_iter(base, experts, params, seed=seed))
        if ctx is None and self.needs_data:
            raise ValueError(f"merge method {self.name!r} learns its coefficients on task data and needs a suite context")
        return self.fn(dict(base), [dict(e) for e in experts], ctx=ctx, **params_dict(params))


def merge_method_by_name(name: str) -> MergeMethod:
    """The registered merge method ``name`` (a module-level function, so pickles refer to it by name)."""
    return merges.get(name)


def merge_method(name: str, *, tensorwise: bool = True, version: str = "1", paper: str = "",
                 needs_data: bool = False, labelled_param: str = "") -> Callable[[Callable[..., Any]], MergeMethod]:
    """Register ``fn`` as merge method ``name``; its keyword parameters become its params schema."""

    def wrap(fn: Callable[..., Any]) -> MergeMethod:
        hints = typing.get_type_hints(fn, include_extras=True)  # keeps Annotated ranges (bench.params.Range)
        fields = []
        for p in inspect.signature(fn).parameters.values():
            if p.name in _RESERVED:
                continue
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                raise TypeError(f"merge method {name!r}: parameter {p.name!r} must be keyword-only")
            if p.name not in hints or p.default is inspect.Parameter.empty:
                raise TypeError(f"merge method {name!r}: parameter {p.name!r} needs a type annotation and a default")
            fields.append((p.name, hints[p.name], dataclasses.field(default=p.default)))
        params_cls = dataclasses.make_dataclass(f"{fn.__name__}_params", fields, frozen=True)
        params_cls.__doc__ = f"Parameters of merge method {name!r}."
        if labelled_param and labelled_param not in {f[0] for f in fields}:
            raise TypeError(f"merge method {name!r}: labelled_param {labelled_param!r} is not one of its parameters")
        method = MergeMethod(name=name, fn=fn, Params=params_cls, tensorwise=tensorwise, version=version,
                             paper=paper, needs_data=needs_data, labelled_param=labelled_param)
        merges.register(name, obj=method)
        return method

    return wrap

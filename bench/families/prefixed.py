"""`Prefixed`: a module nested under a dotted key prefix, so a family's body keys match its checkpoints.

``vision_model.`` (a full ``CLIPModel``'s vision tower, FusionBench experts saved by transformers 4)
and ``model.visual.`` (open_clip) are where real checkpoints keep the towers this benchmark merges;
building the module under the same path lets a body be selected and written back without renaming.
Its own module because the families that wrap their modules (CLIP, open_clip) and the checkpoint
reader (`bench.families.hf`) both need it, and neither should import the other.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def check_prefix(prefix: str) -> str:
    """``prefix`` if it is empty or a dotted path ending in a dot (``"vision_model."``)."""
    if prefix and (not prefix.endswith(".") or any(not part.isidentifier() for part in prefix[:-1].split("."))):
        raise ValueError(
            f"key prefix {prefix!r} must be empty or dotted identifiers ending in '.', e.g. 'vision_model.'"
        )
    return prefix


class _Hop(nn.Module):
    """An intermediate container on a `Prefixed` path (holds one child, computes nothing)."""


class Prefixed(nn.Module):
    """Holds ``inner`` under the dotted path ``prefix`` so every state-dict key starts with it.

    ``Prefixed(CLIPVisionModel(cfg), "vision_model.").state_dict()`` has the keys of a full
    ``CLIPModel``'s vision tower; ``forward`` is ``inner``'s forward, `inner` returns the model, and
    other attributes (``config``, ``encoder``) are read from it.
    """

    def __init__(self, inner: nn.Module, prefix: str) -> None:
        super().__init__()
        if not check_prefix(prefix):
            raise ValueError("Prefixed needs a non-empty key prefix such as 'vision_model.'")
        self._path = tuple(prefix[:-1].split("."))
        holder: nn.Module = self
        for part in self._path[:-1]:
            hop = _Hop()
            holder.add_module(part, hop)
            holder = hop
        holder.add_module(self._path[-1], inner)

    @property
    def inner(self) -> nn.Module:
        module: nn.Module = self
        for part in self._path:
            module = getattr(module, part)
        return module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Attributes of the held model (``config``, ``encoder``) read through, as on the model itself.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in self.__dict__.get("_path", ()):  # the path itself is never delegated
                raise
            return getattr(self.inner, name)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a `Prefixed` wrapper (or ``module`` itself)."""
    return module.inner if isinstance(module, Prefixed) else module

"""The family interface: build a module from a state dict and describe it with an architecture map.

Also here: `Variant`, which runs a structure-changed artifact, and the `variants` registry. They sit
next to `Family.build`, their one caller, so that `bench.artifact` needs nothing from the families.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from bench.artifact import Artifact
from bench.families.base import ArchitectureMap
from bench.registry import Registry
from bench.weights import CheckpointError, StateDict


class Family(ABC):
    """An adapter for one architecture, bound to one configuration (sizes, heads, activation)."""

    name: str = ""
    hf_model_types: ClassVar[tuple[str, ...]] = ()
    """Hugging Face ``model_type`` values this family reads (`bench.families.hf.detect_family`); none by default."""

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], keys: Sequence[str] | None) -> tuple[Family, str]:
        """This family for a Hugging Face config dict of one of `hf_model_types`, and the key prefix the
        checkpoint puts before the body's keys. ``keys`` are the checkpoint's tensor names when its weights
        are at hand (the layout is then read from them), else None (the layout is inferred from the config)."""
        raise NotImplementedError(f"family {cls.name!r} reads no Hugging Face config")

    @abstractmethod
    def arch_map(self) -> ArchitectureMap:
        """Where every attention and MLP tensor of this configuration lives."""

    @abstractmethod
    def new_module(self) -> nn.Module:
        """A freshly initialised module whose ``state_dict()`` keys are the body's keys."""

    @abstractmethod
    def install_mlp(self, module: nn.Module, layer: int, mlp: nn.Module) -> None:
        """Replace layer ``layer``'s feed-forward by ``mlp``.

        ``mlp`` maps the hidden states entering the up projection to the output of the down
        projection (bias included), before any residual, dropout or norm the architecture applies.
        Structure-changing releases (Taylor FFN) run through this hook.
        """

    @abstractmethod
    def mlp_projection(self, module: nn.Module, layer: int, which: str = "up") -> nn.Module:
        """The module computing layer ``layer``'s ``which`` ('up' or 'gate') projection (for calibration hooks:
        its output is the pre-activation)."""

    def build(self, state: StateDict | Artifact) -> nn.Module:
        """A module in eval mode carrying ``state``; an artifact with a variant installs its own modules."""
        module = self.new_module()
        if isinstance(state, Artifact):
            if state.variant:
                variant = variants.get(state.variant)
                variant.install(module, state, self)
                return module.eval()
            state = state.state
        expected = module.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise CheckpointError(f"{self.name}: state dict lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
        module.load_state_dict(_as_dtypes(state, expected), strict=False)
        return module.eval()


class Variant(Protocol):
    """Runs an artifact whose structure the standard module cannot hold."""

    def install(self, module: nn.Module, artifact: Artifact, family: Family) -> None:
        """Load ``artifact.state`` into ``module``, replacing what the standard structure cannot run."""


variants: Registry = Registry("module variant")
"""Module variants by the tag an `Artifact` carries (``"taylor-ffn"``)."""


def _as_dtypes(state: StateDict, like: dict[str, torch.Tensor]) -> StateDict:
    return {k: v.to(like[k].dtype) if k in like else v for k, v in state.items()}

"""The family interface: build a module from a state dict and describe it with an architecture map."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

from bench.families.base import ArchitectureMap
from bench.weights import CheckpointError, StateDict

if TYPE_CHECKING:
    from bench.artifact import Artifact


class Family(ABC):
    """An adapter for one architecture, bound to one configuration (sizes, heads, activation)."""

    name: str = ""

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
        from bench.artifact import Artifact, variants

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


def _as_dtypes(state: StateDict, like: dict[str, torch.Tensor]) -> StateDict:
    return {k: v.to(like[k].dtype) if k in like else v for k, v in state.items()}

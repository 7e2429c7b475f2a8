"""BatchNorm running statistics: which tensors they are, and re-estimating them from data.

A BatchNorm network's running statistics belong to the weights they were measured under. A merge,
or a defense that edits weights (MergeGuard's negation), leaves them stale; the repair is to measure
them again on a few training inputs (the suites apply it to merged bodies, `Suite.recalibrate`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def batchnorm_layers(module: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """``(name, layer)`` of every BatchNorm layer that tracks running statistics, in module order."""
    return [(name, m) for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def batchnorm_statistic_keys(module: nn.Module) -> frozenset[str]:
    """State-dict keys of ``module``'s BatchNorm running statistics (empty for a network without BatchNorm)."""
    return frozenset(f"{name}.{stat}" if name else stat for name, _ in batchnorm_layers(module) for stat in STATISTICS)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, inputs: Iterable[Mapping[str, torch.Tensor]]) -> int:
    """Recompute the running statistics of every BatchNorm in ``model`` by running ``model(**x)`` over ``inputs``.

    Returns the number of samples seen (the first dimension of each input). Statistics are reset and
    averaged cumulatively (momentum None) over all batches; only the BatchNorm layers run in train
    mode (dropout stays off). ``model`` is left in eval mode with its momenta restored.
    """
    norms = [m for _, m in batchnorm_layers(model)]
    momenta = [bn.momentum for bn in norms]
    model.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    seen = 0
    try:
        for x in inputs:
            model(**x)
            seen += len(next(iter(x.values())))
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        model.eval()
    if seen == 0:
        raise ValueError("BatchNorm recalibration needs at least one input")
    return seen

"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., NeurIPS 2023).

Paper: "TIES-Merging: Resolving Interference When Merging Models", https://arxiv.org/abs/2306.01708;
code prateeky2806/ties-merging, whose ``ties_merging_utils.py`` is reused unchanged by AdaMerging
(EnnengYang/AdaMerging), PaRaMS (ISCT-W/PaRaMS ``src/eval_merging``) and FusionBench.

Per task vector τ_i = θ_i − θ_pre:

1. **trim** — keep the entries of largest magnitude (fraction ``k``), zero the rest;
2. **elect** — per entry, the sign of Σ_i trimmed τ_i (the sign of the larger total mass); entries
   whose sum is exactly 0 take the majority of the elected signs (``resolve_zero_signs``, "majority");
3. **disjoint merge** — aggregate only the trimmed entries that agree with the elected sign:
   ``mean`` over the agreeing experts (the paper's Algorithm 1), ``sum`` or ``max`` (the code's
   ``dis-sum`` / ``dis-max`` variants);

then θ = θ_pre + λ·τ_merged.

Two scopes of trimming:

* ``ties`` trims **per tensor** (as mergekit does), so it runs tensor by tensor, out of core. This
  deviates from the original, which flattens the whole model per task and keeps its global top-k;
  the zero-sign majority is likewise taken per tensor.
* ``ties-global`` is the original global rule: one magnitude threshold per task over all its
  floating-point tensors, and one majority sign over the whole model. It holds whole state dicts
  (a model-wise method) and needs no data. Use it to reproduce the published CLIP numbers.

Trim count: the top ``⌊k·d⌋`` magnitudes (at least one) are kept, plus any entry tied with the
smallest kept magnitude. The original ``topk_values_mask`` thresholds at the ``(d − ⌊k·d⌋)``-th
smallest magnitude and so keeps ``⌊k·d⌋ + 1`` entries: immaterial over a flattened model, but
twice the intended density on a 5-element bias, so per-tensor trimming here drops the extra one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from bench.merging import MergeContext, merge_method
from bench.params import ParamError
from bench.weights import CheckpointError, StateDict, check_compatible, is_mergeable

Aggregate = Literal["mean", "sum", "max"]
_AGGREGATES = ("mean", "sum", "max")

TIES_PAPER = "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023, https://arxiv.org/abs/2306.01708"


def check_ties_params(k: float, aggregate: str) -> None:
    """Raise `ParamError` for a trim fraction outside (0, 1] or an unknown aggregation."""
    if not 0.0 < k <= 1.0:
        raise ParamError(f"TIES parameter k is the fraction of entries kept and must lie in (0, 1] (0.2 keeps the top 20 %); got {k}")
    if aggregate not in _AGGREGATES:
        raise ParamError(f"TIES parameter aggregate must be one of {', '.join(_AGGREGATES)}; got {aggregate!r}")


def magnitude_threshold(magnitudes: torch.Tensor, k: float) -> torch.Tensor:
    """The smallest magnitude kept when the top fraction ``k`` of ``magnitudes`` (any shape) is kept."""
    flat = magnitudes.reshape(-1)
    keep = max(1, int(flat.numel() * k))
    # The keep-th largest value is the (d - keep + 1)-th smallest.
    return flat.kthvalue(flat.numel() - keep + 1).values


def trim(tau: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``tau`` with every entry of magnitude below ``threshold`` set to zero."""
    return tau * (tau.abs() >= threshold)


def elected_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """Per entry, the sign of the sum over experts (dim 0) of the trimmed task vectors; 0 where it is 0."""
    return torch.sign(trimmed.sum(dim=0))


def resolve_zero_signs(sign: torch.Tensor, majority: torch.Tensor) -> torch.Tensor:
    """Entries without an elected sign take the majority sign (the original's "majority" rule)."""
    return torch.where(sign == 0, majority.to(sign.dtype), sign)


def disjoint_merge(trimmed: torch.Tensor, sign: torch.Tensor, aggregate: str) -> torch.Tensor:
    """Aggregate, per entry, the trimmed values (stacked on dim 0) that agree with ``sign``.

    Mirrors ``disjoint_merge`` of the original: where the sign is still 0 (no majority either) the
    negative entries are the ones selected, as ``torch.where(sign > 0, T > 0, T < 0)`` does.
    """
    agrees = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agrees
    if aggregate == "mean":
        count = (selected != 0).sum(dim=0).clamp(min=1)
        return selected.sum(dim=0) / count
    if aggregate == "sum":
        return selected.sum(dim=0)
    if aggregate == "max":
        return selected.abs().amax(dim=0) * sign
    raise ParamError(f"TIES parameter aggregate must be one of {', '.join(_AGGREGATES)}; got {aggregate!r}")


def ties_task_vector(taus: Sequence[torch.Tensor], k: float, aggregate: str) -> torch.Tensor:
    """The merged task vector of one tensor, trimmed per tensor (the ``ties`` scope)."""
    trimmed = torch.stack([trim(t, magnitude_threshold(t.abs(), k)) for t in taus])
    sign = elected_sign(trimmed)
    sign = resolve_zero_signs(sign, torch.sign(sign.sum()))
    return disjoint_merge(trimmed, sign, aggregate)


@merge_method("ties", paper=TIES_PAPER)
def ties(base: torch.Tensor, experts: list[torch.Tensor], *, generator: torch.Generator, k: float = 0.2,
         lambda_: float = 1.0, aggregate: Aggregate = "mean") -> torch.Tensor:
    """TIES-Merging with per-tensor trimming: θ_pre + λ·disjoint_merge(elect(trim_k(τ_i))).

    Defaults follow the paper: keep the top ``k`` = 20 % of each task vector, disjoint ``mean``
    (Algorithm 1) and ``lambda_`` = 1 (the official README sweeps λ over [0.8, 2.5] with top-20 and
    dis-mean). The vision re-implementations differ: PaRaMS merges two models with ``dis-sum`` and
    λ = 0.8 (``src/eval_merging/bin_ties_merging.py``), AdaMerging's baseline uses ``dis-sum`` with
    λ = 0.3 (``src/main_ties_merging.py``); both are ``aggregate=sum`` here. Trimming is per tensor
    (see the module docstring; ``ties-global`` trims over the whole model as the original does).
    """
    check_ties_params(k, aggregate)
    return base + lambda_ * ties_task_vector([e - base for e in experts], k, aggregate)


# ---------------------------------------------------------------- global (whole-model) scope


def global_thresholds(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                      keys: Sequence[str], k: float) -> list[torch.Tensor]:
    """Per expert, the magnitude threshold of its top-``k`` entries over all ``keys`` together."""
    out = []
    for expert in experts:
        magnitudes = torch.cat([(expert[n].float() - base[n].float()).abs().reshape(-1) for n in keys])
        out.append(magnitude_threshold(magnitudes, k))
        del magnitudes
    return out


def _trimmed_stack(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]], key: str,
                   thresholds: Sequence[torch.Tensor]) -> torch.Tensor:
    b = base[key].float()
    return torch.stack([trim(e[key].float() - b, thr) for e, thr in zip(experts, thresholds)])


def ties_merge_global(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]], *,
                      k: float, lambda_: float, aggregate: str) -> StateDict:
    """TIES over the whole model: one trim threshold per task and one zero-sign majority, as the original."""
    check_ties_params(k, aggregate)
    if not experts:
        raise CheckpointError("a merge needs at least one expert")
    for i, expert in enumerate(experts):
        check_compatible(base, expert, what=f"expert {i}")
    keys = [n for n in base if is_mergeable(base[n])]
    if not keys:
        return dict(base)
    thresholds = global_thresholds(base, experts, keys, k)
    # Pass 1: the majority of the elected signs over the whole flattened model.
    sign_total = sum(float(elected_sign(_trimmed_stack(base, experts, n, thresholds)).sum()) for n in keys)
    majority = torch.sign(torch.tensor(sign_total))
    # Pass 2: elect, resolve zeros with the global majority, merge disjointly.
    merged: StateDict = {}
    for name, b in base.items():
        if not is_mergeable(b):
            merged[name] = b
            continue
        trimmed = _trimmed_stack(base, experts, name, thresholds)
        sign = resolve_zero_signs(elected_sign(trimmed), majority)
        merged[name] = (b.float() + lambda_ * disjoint_merge(trimmed, sign, aggregate)).to(b.dtype)
    return merged


@merge_method("ties-global", tensorwise=False, paper=TIES_PAPER)
def ties_global(base: StateDict, experts: list[StateDict], *, ctx: MergeContext | None, k: float = 0.2,
                lambda_: float = 1.0, aggregate: Aggregate = "mean") -> StateDict:
    """TIES-Merging with the original whole-model trimming (one top-``k`` threshold per task).

    Same defaults as ``ties`` (k = 0.2, λ = 1, disjoint mean). Each task vector is flattened over all
    floating-point tensors and its top-``k`` magnitudes kept, as ``ties_merging_utils.topk_values_mask``
    does on ``state_dict_to_vector``; the zero-sign majority is also taken over the whole model.
    Holds whole state dicts (model-wise); needs no data, so ``ctx`` may be None.
    """
    return ties_merge_global(base, experts, k=k, lambda_=lambda_, aggregate=aggregate)

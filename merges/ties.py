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
  floating-point tensors, and one majority sign over the whole model. It needs no data. Use it to
  reproduce the published CLIP numbers. It runs out of core too (``bench merge --method
  ties-global``): passes 1 and 2 find each task's exact global threshold, pass 3 merges tensor by
  tensor (see `ties_global_blocks`).

Both find thresholds exactly without sorting: `bench.outofcore.TopMagnitude` selects the k-th
largest magnitude by counting float32 bit patterns, 16 bits per pass, so a tensor or a whole model
is trimmed in row blocks and gives the same result as ``kthvalue`` over the flattened magnitudes.
A tensor merged in row blocks takes its zero-sign majority as a guess (+) and is merged again only
if some entry depended on it and the guess was wrong; the result is the same as merging it whole.

Trim count. The original ``topk_values_mask`` (prateeky2806/ties-merging ``src/utils/merge_utils.py``)
computes ``k = int(d * K); k = d - k``, then ``kth_values = M.abs().kthvalue(k)`` and keeps
``M.abs() >= kth_values``: the threshold is the ``(d − ⌊k·d⌋)``-th smallest magnitude, i.e. the
``(⌊k·d⌋ + 1)``-th largest, so it keeps ``⌊k·d⌋ + 1`` entries (plus any tied with the threshold).

* ``ties-global`` reproduces that count exactly (`original_keep_count`; version 2). Version 1 kept
  ``⌊k·d⌋``, one entry fewer per task vector, so its merge differed from the original's wherever
  that entry decided an elected sign or a mean (3 of 14,352 entries of three random experts).
* ``ties`` keeps the top ``⌊k·d⌋`` magnitudes of each tensor (at least one), plus ties: over a
  flattened model one entry more is immaterial, but per tensor it would be twice the intended
  density on a 5-element bias, so per-tensor trimming drops it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Annotated, Any, Literal, Protocol

import torch

from bench.merging import MergeContext, merge_method
from bench.outofcore import (
    BLOCK_ELEMENTS,
    Block,
    BlockInputs,
    TensorSpec,
    TopMagnitude,
    assemble,
    blockwise,
    keep_count,
    largest_block,
    merge_whole,
    mergeable_names,
    read_rows,
    row_blocks,
    streams,
    tensor_dtype,
    tensor_shape,
    top_magnitude,
)
from bench.params import ParamError, Range
from bench.weights import CheckpointError, StateDict

Aggregate = Literal["mean", "sum", "max"]
_AGGREGATES = ("mean", "sum", "max")
TrimFraction = Annotated[float, Range(0.0, 1.0, low_open=True, hint="the fraction of entries kept; 0.2 keeps the top 20 %")]

TIES_PAPER = "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023, https://arxiv.org/abs/2306.01708"


def check_ties_params(k: float, aggregate: str) -> None:
    """Raise `ParamError` for a trim fraction outside (0, 1] or an unknown aggregation."""
    if not 0.0 < k <= 1.0:
        raise ParamError(f"TIES parameter k is the fraction of entries kept and must lie in (0, 1] (0.2 keeps the top 20 %); got {k}")
    if aggregate not in _AGGREGATES:
        raise ParamError(f"TIES parameter aggregate must be one of {', '.join(_AGGREGATES)}; got {aggregate!r}")


def trim_(tau: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Zero, in place and in one pass, every entry of ``tau`` whose magnitude is below ``threshold``:
    ``hardshrink`` at the float just below ``threshold`` keeps |τ| ≥ threshold.

    Kept entries are unchanged and the others become +0 (the mask ``tau * (|tau| >= threshold)``
    gives −0 for negative ones: no later step tells them apart).
    """
    if bool(torch.isnan(threshold)):  # every magnitude compares false: as the mask does
        return tau.mul_(tau.abs() >= threshold)
    below = float(torch.nextafter(threshold.float(), threshold.new_tensor(float("-inf"), dtype=torch.float32)))
    return torch.ops.aten.hardshrink.out(tau, below, out=tau)


def elected_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """Per entry, the sign of the sum over experts (dim 0) of the trimmed task vectors; 0 where it is 0."""
    return torch.sign(trimmed.sum(dim=0))


def resolve_zero_signs(sign: torch.Tensor, majority: torch.Tensor) -> torch.Tensor:
    """Entries without an elected sign take the majority sign (the original's "majority" rule)."""
    return torch.where(sign == 0, majority.to(sign.dtype), sign)


def disjoint_merge(trimmed: torch.Tensor, sign: torch.Tensor, aggregate: str) -> torch.Tensor:
    """Aggregate, per entry, the trimmed values (stacked on dim 0) that agree with ``sign``.

    Mirrors ``disjoint_merge`` of the original: where the sign is still 0 (no majority either) the
    negative entries are the ones selected, as ``torch.where(sign > 0, T > 0, T < 0)`` does. This and
    `elected_sign` / `resolve_zero_signs` are the readable form; merges run `elect_and_merge`, which
    a test pins to them.
    """
    if aggregate not in _AGGREGATES:
        raise ParamError(f"TIES parameter aggregate must be one of {', '.join(_AGGREGATES)}; got {aggregate!r}")
    agrees = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agrees
    if aggregate == "mean":
        return selected.sum(dim=0) / (selected != 0).sum(dim=0).clamp(min=1)
    if aggregate == "sum":
        return selected.sum(dim=0)
    return selected.abs().amax(dim=0) * sign


class TiesWorkspace:
    """Buffers for electing and merging blocks of up to ``size`` entries of ``n`` task vectors, reused block after block.

    Reusing them keeps a merge from allocating (and page-faulting in) fresh memory for every block.
    """

    def __init__(self, n: int, size: int, device: torch.device | str) -> None:
        self.stacked = torch.empty((n, size), device=device)
        self.sign, self.free, self.total, self.count, self.scratch = (torch.empty(size, device=device) for _ in range(5))

    def task_vectors(self, size: int) -> torch.Tensor:
        """The first ``size`` entries of each stacked row (rows are contiguous)."""
        return self.stacked[:, :size]


def elect_and_merge(trimmed: torch.Tensor, aggregate: str, majority: float | None,
                    work: TiesWorkspace | None = None) -> tuple[torch.Tensor, int, bool]:
    """Elect signs, resolve entries with none, merge disjointly: ``(merged τ, Σ elected signs, ambiguous)``.

    ``majority`` None: the block is the whole scope (a tensor), so its own majority resolves its zero
    sums, as the original does. Otherwise ``majority`` is a guess for a scope larger than the block
    (a tensor in row blocks, the whole model); ``ambiguous`` says whether the block has an entry whose
    result depends on the guess (trimmed values that sum to exactly 0). The caller compares the guess
    with the sign of the summed tallies once the scope is done, and merges again only if it was
    wrong and something was ambiguous.

    Same result as `elected_sign`, `resolve_zero_signs` and `disjoint_merge` (experts summed in order),
    in a few passes over preallocated vectors: agreeing magnitudes are ``clamp(τ·s, 0)`` and the sign
    is put back at the end (a sum of same-signed values is its magnitude's sum, negated exactly).
    The merged τ is ``work``'s buffer, overwritten by the next call.
    """
    if aggregate not in _AGGREGATES:
        raise ParamError(f"TIES parameter aggregate must be one of {', '.join(_AGGREGATES)}; got {aggregate!r}")
    size = trimmed.shape[1]
    w = work if work is not None else TiesWorkspace(trimmed.shape[0], size, trimmed.device)
    sign, free, total, count, scratch = (v[:size] for v in (w.sign, w.free, w.total, w.count, w.scratch))
    sign.zero_()
    for tau in trimmed:  # summed in expert order: the same result whatever the block's shape
        sign.add_(tau)
    sign.sign_()
    tally = int(sign.sum(dtype=torch.float64) if size >= 1 << 24 else sign.sum())  # exact count of + minus −
    torch.abs(sign, out=free).neg_().add_(1.0)  # 1 where no sign was elected
    unresolved = bool(free.sum() > 0)
    guessed = majority is not None
    if majority is None:
        majority = float((tally > 0) - (tally < 0))
    if unresolved and majority != 0:
        sign.add_(free, alpha=majority)
    # τ agrees where τ·s > 0; where no sign is left (majority 0) the negative entries, as the original
    select = torch.sub(sign, free) if unresolved and majority == 0 else sign
    total.zero_()
    if aggregate == "mean":
        count.zero_()
    for tau in trimmed:
        agreeing = torch.mul(tau, select, out=scratch).clamp_(min=0)  # |τ| where τ agrees, else 0
        if aggregate == "max":
            torch.maximum(total, agreeing, out=total)
            continue
        total.add_(agreeing)
        if aggregate == "mean":
            count.add_(agreeing.sign_())
    ambiguous = guessed and unresolved and float(torch.dot(free, total)) > 0
    if aggregate == "mean":
        total.div_(count.clamp_(min=1))
    return total.mul_(sign if aggregate == "max" else select), tally, ambiguous


class TaskVectorDrop(Protocol):
    """What sparsifies task vectors before trimming (DARE, `merges.dare.DropMasks`)."""

    def restart(self) -> None: ...

    def apply(self, i: int, tau: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor: ...


class TiesJob:
    """TIES over one tensor in row blocks (a `bench.outofcore.TensorJob`).

    Whole (one block): τ_i are stacked once, each thresholded at its exact top-``k`` magnitude and
    the tensor's own majority resolves zero sums. In row blocks: two passes find each expert's
    threshold over the whole tensor (`TopMagnitude`), then each block is trimmed and merged with the
    majority guessed +1; the tensor is merged again only if the guess was wrong and some entry
    depended on it. ``k`` = 1 keeps every entry and skips the trim (no pass, no magnitude).
    ``drop`` sparsifies τ_i first (DARE) and is restarted before every pass.
    """

    def __init__(self, spec: TensorSpec, *, generator: torch.Generator, k: float, lambda_: float, aggregate: str,
                 drop: TaskVectorDrop | None = None) -> None:
        check_ties_params(k, aggregate)
        self.spec, self.k, self.lambda_, self.aggregate, self.drop = spec, k, lambda_, aggregate, drop
        self.trim = k < 1.0
        self.passes = 2 if self.trim and not spec.whole else 0
        self.selectors = [TopMagnitude(keep_count(spec.numel, k)) for _ in range(spec.n_experts)] if self.passes else []
        self.thresholds: list[torch.Tensor] | None = None
        self.guess = 1.0
        self.tally = 0
        self.ambiguous = False
        self._work: TiesWorkspace | None = None

    def workspace(self, inputs: BlockInputs) -> TiesWorkspace:
        """Buffers for this tensor's blocks, on the inputs' device, made at the first block."""
        if self._work is None:
            self._work = TiesWorkspace(self.spec.n_experts, self.spec.block_numel, inputs.base.device)
        return self._work

    def begin(self, pass_index: int) -> None:
        if self.drop is not None:
            self.drop.restart()
        if pass_index == 1:
            for s in self.selectors:
                s.next_pass()
        if pass_index == self.passes:
            if self.selectors and self.thresholds is None:
                self.thresholds = [s.value for s in self.selectors]
            self.tally, self.ambiguous = 0, False

    def observe(self, pass_index: int, inputs: BlockInputs) -> None:
        work = self.workspace(inputs)
        for i in range(inputs.n):
            tau = inputs.task_vector(i, out=work.scratch[:inputs.numel])
            if self.drop is not None:
                self.drop.apply(i, tau, work.total[:inputs.numel])
            self.selectors[i].add(tau.abs_())

    def merge(self, inputs: BlockInputs) -> torch.Tensor:
        work = self.workspace(inputs)
        stacked = work.task_vectors(inputs.numel)
        for i, tau in enumerate(stacked):
            inputs.task_vector(i, out=tau)
            if self.drop is not None:
                self.drop.apply(i, tau, work.scratch[:inputs.numel])
            if not self.trim:
                continue
            if self.thresholds is not None:
                trim_(tau, self.thresholds[i])
            elif tau.numel():
                trim_(tau, top_magnitude(torch.abs(tau, out=work.scratch[:inputs.numel]), keep_count(tau.numel(), self.k)))
        merged, tally, ambiguous = elect_and_merge(stacked, self.aggregate, None if self.spec.whole else self.guess, work)
        self.tally += tally
        self.ambiguous |= ambiguous
        return self.finish(merged, inputs.base)

    def finish(self, direction: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """θ_pre + λ·τ_merged from the direction τ_merged: the one step that depends on λ (`merges.tuned` reuses the rest)."""
        return torch.mul(direction, self.lambda_).add_(base)  # a new tensor: the workspace is reused

    def again(self) -> bool:
        majority = float((self.tally > 0) - (self.tally < 0))
        if self.spec.whole or not self.ambiguous or majority == self.guess:
            return False
        self.guess = majority
        return True


@merge_method("ties", paper=TIES_PAPER)
@blockwise(TiesJob)
def ties(base: torch.Tensor, experts: list[torch.Tensor], *, generator: torch.Generator, k: TrimFraction = 0.2,
         lambda_: float = 1.0, aggregate: Aggregate = "mean") -> torch.Tensor:
    """TIES-Merging with per-tensor trimming: θ_pre + λ·disjoint_merge(elect(trim_k(τ_i))).

    Defaults follow the paper: keep the top ``k`` = 20 % of each task vector, disjoint ``mean``
    (Algorithm 1) and ``lambda_`` = 1 (the official README sweeps λ over [0.8, 2.5] with top-20 and
    dis-mean). The vision re-implementations differ: PaRaMS merges two models with ``dis-sum`` and
    λ = 0.8 (``src/eval_merging/bin_ties_merging.py``), AdaMerging's baseline uses ``dis-sum`` with
    λ = 0.3 (``src/main_ties_merging.py``); both are ``aggregate=sum`` here. Trimming is per tensor
    (see the module docstring; ``ties-global`` trims over the whole model as the original does).
    """
    return merge_whole(TiesJob, base, experts, generator=generator, k=k, lambda_=lambda_, aggregate=aggregate)


# ---------------------------------------------------------------- global (whole-model) scope


def check_same_tensors(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Raise `CheckpointError` unless every expert has exactly θ_pre's tensor names and shapes (read lazily)."""
    for i, expert in enumerate(experts):
        missing = sorted(set(base) - set(expert))
        extra = sorted(set(expert) - set(base))
        if missing or extra:
            raise CheckpointError(f"expert {i} does not match the base: {len(missing)} tensor(s) missing (e.g. {missing[:3]}), "
                                  f"{len(extra)} unexpected (e.g. {extra[:3]})")
        for name in base:
            if tensor_shape(expert, name) != tensor_shape(base, name):
                raise CheckpointError(f"expert {i} does not match the base: tensor {name!r} differs in shape, "
                                      f"{tensor_shape(expert, name)} vs base {tensor_shape(base, name)}")


def original_keep_count(numel: int, k: float) -> int:
    """Entries the original ``topk_values_mask`` keeps of ``numel`` for a fraction ``k`` < 1: ``⌊k·numel⌋ + 1``.

    Its threshold is ``kthvalue(numel − ⌊k·numel⌋)`` of the magnitudes, the ``(⌊k·numel⌋ + 1)``-th largest.
    (At ``k`` = 1 it would call ``kthvalue(0)``, an error; here ``k`` = 1 skips the trim.)
    """
    return min(numel, int(numel * k) + 1)


def global_thresholds(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                      keys: Sequence[str], k: float, *, block_elements: int = BLOCK_ELEMENTS) -> list[torch.Tensor]:
    """Per expert, the exact magnitude threshold of the original's top-``k`` trim over all ``keys`` together
    (`original_keep_count` entries, plus ties).

    Two passes over the model in row blocks (`TopMagnitude`): the magnitudes are never concatenated.
    """
    numel = sum(_numel(tensor_shape(base, n)) for n in keys)
    selectors = [TopMagnitude(original_keep_count(numel, k)) for _ in experts]
    size = largest_block((tensor_shape(base, n) for n in keys), block_elements)
    scratch: torch.Tensor | None = None
    for pass_index in range(2):
        if pass_index:
            for s in selectors:
                s.next_pass()
        for name in keys:
            for rows in row_blocks(tensor_shape(base, name), block_elements):
                inputs = BlockInputs(base, experts, name, rows)
                if scratch is None:
                    scratch = torch.empty(size, device=inputs.base.device)
                for i, s in enumerate(selectors):
                    s.add(inputs.task_vector(i, out=scratch[:inputs.numel]).abs_())
    return [s.value for s in selectors]


def ties_global_blocks(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                       params: Mapping[str, Any], *, seed: int = 0, block_elements: int = BLOCK_ELEMENTS) -> Iterator[Block]:
    """TIES with whole-model scope as a block stream: threshold passes, then a merge pass tensor by tensor.

    Pass 1 and 2 find each expert's global threshold (exact); pass 3 trims, elects and merges each
    block with the whole-model majority guessed +1 and counts the elected signs. Only if some entry
    summed to exactly 0 with nonzero trimmed values *and* the count says the majority is not +1 does
    a fourth pass merge (and yield) every block again with the true majority.
    """
    k, lambda_, aggregate = float(params["k"]), float(params["lambda_"]), str(params["aggregate"])
    check_ties_params(k, aggregate)
    if not experts:
        raise CheckpointError("a merge needs at least one expert")
    check_same_tensors(base, experts)
    keys = mergeable_names(base)
    trimmed = k < 1.0 and sum(_numel(tensor_shape(base, n)) for n in keys) > 0
    thresholds = global_thresholds(base, experts, keys, k, block_elements=block_elements) if trimmed else None
    size = largest_block((tensor_shape(base, n) for n in keys), block_elements)
    work: TiesWorkspace | None = None
    guess = 1.0
    while True:
        tally, ambiguous = 0, False
        for name in base:
            shape = tensor_shape(base, name)
            dtype = tensor_dtype(base, name)
            for rows in row_blocks(shape, block_elements):
                if not dtype.is_floating_point:
                    yield name, rows[0], read_rows(base, name, rows)
                    continue
                inputs = BlockInputs(base, experts, name, rows)
                if work is None:
                    work = TiesWorkspace(len(experts), size, inputs.base.device)
                stacked = work.task_vectors(inputs.numel)
                for i, tau in enumerate(stacked):
                    inputs.task_vector(i, out=tau)
                    if thresholds is not None:
                        trim_(tau, thresholds[i])
                merged, block_tally, block_ambiguous = elect_and_merge(stacked, aggregate, guess, work)
                tally += block_tally
                ambiguous |= block_ambiguous
                merged = torch.mul(merged, lambda_).add_(inputs.base)
                yield name, rows[0], (merged.reshape(-1, *shape[1:]) if shape else merged.reshape(())).to(dtype)
        majority = float((tally > 0) - (tally < 0))
        if not ambiguous or majority == guess:
            return
        guess = majority


def ties_merge_global(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]], *,
                      k: float, lambda_: float, aggregate: str, block_elements: int = BLOCK_ELEMENTS) -> StateDict:
    """TIES over the whole model: one trim threshold per task and one zero-sign majority, as the original."""
    blocks = ties_global_blocks(base, experts, {"k": k, "lambda_": lambda_, "aggregate": aggregate},
                                block_elements=block_elements)
    merged = assemble(blocks, {n: tensor_shape(base, n) for n in base})
    return {n: merged[n] for n in base}


@merge_method("ties-global", tensorwise=False, version="2", paper=TIES_PAPER)
@streams(ties_global_blocks)
def ties_global(base: StateDict, experts: list[StateDict], *, ctx: MergeContext | None, k: TrimFraction = 0.2,
                lambda_: float = 1.0, aggregate: Aggregate = "mean") -> StateDict:
    """TIES-Merging with the original whole-model trimming (one top-``k`` threshold per task).

    Same defaults as ``ties`` (k = 0.2, λ = 1, disjoint mean). Each task vector is flattened over all
    floating-point tensors and trimmed as ``topk_values_mask`` does on ``state_dict_to_vector``: the
    entries with magnitude at least the ``(d − ⌊k·d⌋)``-th smallest, ⌊k·d⌋ + 1 of them (see the module
    docstring); the zero-sign majority is also taken over the whole model.
    Needs no data, so ``ctx`` may be None. Runs out of core (``bench merge --method ties-global``):
    two passes find the exact global thresholds by radix selection, a third merges tensor by tensor
    (a fourth only when the whole-model majority sign was guessed wrong and mattered).
    """
    return ties_merge_global(base, experts, k=k, lambda_=lambda_, aggregate=aggregate)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n

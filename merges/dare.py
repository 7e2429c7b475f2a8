"""DARE: drop and rescale task-vector entries before merging (Yu et al., ICML 2024).

Paper: "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", https://arxiv.org/abs/2311.03099; code yule-BUAA/MergeLM
(``model_merging_methods/mask_weights_utils.py``: ``mask_input_with_mask_rate``, strategy
"random"). Each entry of every task vector τ_i is dropped independently with probability ``p`` and
the survivors are multiplied by 1/(1 − p), so E[DARE(τ)] = τ. The sparsified task vectors are then
merged by one of three compositions:

* ``dare-ta`` — task arithmetic, θ_pre + λ Σ DARE(τ_i) (mergekit's ``dare_linear``);
* ``dare-ties`` — sign election and disjoint merge of the DARE(τ_i), **no magnitude trim**: what
  mergekit's ``dare_ties`` does and what most users mean by DARE-TIES;
* ``dare-ties-mergelm`` — full TIES (trim to the top ``k`` magnitudes, elect, disjoint mean) of the
  DARE(τ_i): MergeLM's ``mask_merging`` with ``mask_apply_method="ties_merging"``.

Randomness: the masks come from the per-tensor generator `MergeMethod.merge_iter` hands over
(seeded from the run seed, the method name and the tensor name), drawn for expert 0, then expert 1,
...: a fixed seed gives the same masks whatever order the tensors are visited in, and whether the
tensor is merged whole or in row blocks (`DropMasks` positions one generator per expert at that
expert's place in the stream). Every floating-point tensor is sparsified (MergeLM's default excludes
no parameter; FusionBench's ``only_on_linear_weights: false``).
"""

from __future__ import annotations

from typing import Annotated

import torch

from bench.merging import merge_method
from bench.outofcore import TensorSpec, blockwise, merge_whole
from bench.params import ParamError, Range
from merges.basic import TaskArithmeticJob
from merges.ties import Aggregate, TiesJob, TrimFraction

DropRate = Annotated[float, Range(0.0, 1.0, high_open=True, hint="the drop probability; 0.9 drops 90 % of τ")]

DARE_PAPER = ("Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a "
              "Free Lunch, ICML 2024, https://arxiv.org/abs/2311.03099")


def check_drop_rate(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ParamError(f"DARE parameter p is the drop probability and must lie in [0, 1) (0.9 drops 90 % of τ); got {p}")


def _advance(generator: torch.Generator, draws: int, chunk: int) -> None:
    """Move ``generator`` past ``draws`` float32 uniforms, ``chunk`` at a time (as if they had been drawn)."""
    buffer = torch.empty(max(1, min(draws, chunk)), device="cpu")  # a CPU generator draws into CPU memory
    while draws > 0:
        n = min(draws, buffer.numel())
        buffer[:n].uniform_(generator=generator)
        draws -= n


class DropMasks:
    """The DARE masks of one tensor, applied in place to τ_i, in blocks or whole, always the same masks.

    The masks are those of one generator drawn for expert 0's whole tensor, then expert 1's, ...
    Merged whole, that generator is used as it comes. In row blocks, expert i's mask starts
    i·numel draws into the stream, so a generator per expert is positioned there once (skipping
    the draws before it) and then draws its blocks in order. `restart` rewinds all of them, for a
    method that reads the sparsified τ_i in several passes.
    """

    def __init__(self, generator: torch.Generator, spec: TensorSpec, p: float, rescale: bool) -> None:
        check_drop_rate(p)
        self.p, self.rescale, self.n = p, rescale, spec.n_experts
        self.states = [generator.get_state()]
        if not spec.whole and p > 0:
            walker = torch.Generator().set_state(self.states[0])
            for _ in range(1, spec.n_experts):
                _advance(walker, spec.numel, spec.block_numel)
                self.states.append(walker.get_state())
        self.restart()

    def restart(self) -> None:
        generators = [torch.Generator().set_state(s) for s in self.states]
        self.generators = generators if len(generators) == self.n else generators * self.n

    def apply(self, i: int, tau: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """DARE of expert i's next rows, in place: τ·mask, divided by 1 − p when rescaling.

        ``scratch`` (float32, τ's size) receives the uniforms, the draws of ``torch.rand``, and becomes
        the 0/1 mask in place: τ times a float mask equals τ times the boolean one.
        """
        if self.p == 0:  # every entry kept: the same result without drawing
            return tau
        if tau.device.type == "cpu":
            draws = scratch if scratch is not None else torch.empty(tau.shape, device="cpu")
            draws.uniform_(generator=self.generators[i]).ge_(self.p)
        else:  # the generators are CPU ones: the same draws, moved to τ's device
            draws = torch.empty(tau.shape, device="cpu").uniform_(generator=self.generators[i]).ge_(self.p).to(tau.device)
        tau.mul_(draws.view(tau.shape))
        return tau.div_(1.0 - self.p) if self.rescale else tau


def dare_ta_job(spec: TensorSpec, *, generator: torch.Generator, p: float, lambda_: float, rescale: bool) -> TaskArithmeticJob:
    return TaskArithmeticJob(spec, generator=generator, lambda_=lambda_, drop=DropMasks(generator, spec, p, rescale))


def dare_ties_job(spec: TensorSpec, *, generator: torch.Generator, p: float, lambda_: float, aggregate: str,
                  rescale: bool) -> TiesJob:
    return TiesJob(spec, generator=generator, k=1.0, lambda_=lambda_, aggregate=aggregate,
                   drop=DropMasks(generator, spec, p, rescale))


def dare_ties_mergelm_job(spec: TensorSpec, *, generator: torch.Generator, p: float, k: float, lambda_: float,
                          aggregate: str, rescale: bool) -> TiesJob:
    return TiesJob(spec, generator=generator, k=k, lambda_=lambda_, aggregate=aggregate,
                   drop=DropMasks(generator, spec, p, rescale))


@merge_method("dare-ta", paper=DARE_PAPER)
@blockwise(dare_ta_job)
def dare_task_arithmetic(base: torch.Tensor, experts: list[torch.Tensor], *, generator: torch.Generator,
                         p: DropRate = 0.9, lambda_: float = 0.3, rescale: bool = True) -> torch.Tensor:
    """DARE + task arithmetic: θ_pre + λ Σ_i DARE_p(τ_i).

    ``p`` = 0.9 is the paper's headline rate (90 % of the delta parameters of its LLM experts dropped
    with no loss) and the rate of this benchmark's evaluation grid; the paper reports that smaller
    models tolerate lower rates and FusionBench's CLIP configs use 0.5, so an attacker should sweep it. ``lambda_`` = 0.3 as ``ta``
    (FusionBench ``config/method/dare/task_arithmetic.yaml`` too), so DARE is the only difference
    from ``ta``. ``rescale`` = False drops without rescaling (the paper's ablation, "DropOnly").
    """
    return merge_whole(dare_ta_job, base, experts, generator=generator, p=p, lambda_=lambda_, rescale=rescale)


@merge_method("dare-ties", version="2", paper=DARE_PAPER)
@blockwise(dare_ties_job)
def dare_ties(base: torch.Tensor, experts: list[torch.Tensor], *, generator: torch.Generator, p: DropRate = 0.9,
              lambda_: float = 1.0, aggregate: Aggregate = "sum", rescale: bool = True) -> torch.Tensor:
    """DARE + TIES sign election and disjoint merge, no magnitude trim (follows mergekit's ``dare_ties``).

    θ_pre + λ·disjoint_merge(elect(DARE_p(τ_i))): drop and rescale each task vector (``p`` = 0.9, as
    ``dare-ta``), elect each entry's sign by the sum of the sparsified values, and add up the values
    that agree with it (``aggregate`` = ``sum``, λ = 1): the composition of arcee-ai/mergekit's
    ``dare_ties`` (``merge_methods/generalized_task_arithmetic.py``: random sparsification, sum
    consensus, ``normalize`` false). No second trim, so each expert keeps about 1 − p of its entries.
    Documented differences from mergekit: survivors are rescaled by 1/(1 − p) as the DARE paper does
    (mergekit 0.1.5 rescales the survivors so that each tensor keeps its L1 norm); entries whose sparsified
    values sum to exactly 0 take the tensor's majority sign (TIES's rule) where mergekit takes +;
    the masks come from this harness's seeded generators. Version 2: version 1 was the MergeLM
    composition, now ``dare-ties-mergelm``.
    """
    return merge_whole(dare_ties_job, base, experts, generator=generator, p=p, lambda_=lambda_, aggregate=aggregate,
                       rescale=rescale)


@merge_method("dare-ties-mergelm", paper=DARE_PAPER)
@blockwise(dare_ties_mergelm_job)
def dare_ties_mergelm(base: torch.Tensor, experts: list[torch.Tensor], *, generator: torch.Generator,
                      p: DropRate = 0.9, k: TrimFraction = 0.2, lambda_: float = 1.0, aggregate: Aggregate = "mean",
                      rescale: bool = True) -> torch.Tensor:
    """DARE, then full TIES (trim to the top ``k``, elect, disjoint mean) of the sparsified τ_i (follows MergeLM).

    yule-BUAA/MergeLM ``mask_merging`` with ``mask_apply_method="ties_merging"``: drop and rescale
    (``p`` = 0.9), then TIES with the ``ties`` defaults (k = 0.2, disjoint mean, λ = 1), as
    FusionBench's ``DareTiesMerging`` also composes them (it uses p = 0.5, dis-sum and λ = 0.5 for CLIP;
    all reachable through the parameters). The trim ranks the magnitudes of the sparsified vector,
    dropped zeros included, as MergeLM's ``mask_smallest_magnitude_param_values`` does: with
    k > 1 − p it removes nothing (each expert keeps about 1 − p of its entries, 10 % at the
    defaults) and with k < 1 − p it keeps the top k. Trimming is per tensor, as ``ties`` (MergeLM trims
    over the whole model, as ``ties-global``). Up to version 1 of ``dare-ties`` this was ``dare-ties``;
    the masks differ from that version's at the same seed, since the method's name seeds them.
    """
    return merge_whole(dare_ties_mergelm_job, base, experts, generator=generator, p=p, k=k, lambda_=lambda_,
                       aggregate=aggregate, rescale=rescale)

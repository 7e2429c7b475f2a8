"""DARE: drop and rescale task-vector entries before merging (Yu et al., ICML 2024).

Paper: "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", https://arxiv.org/abs/2311.03099; code yule-BUAA/MergeLM
(``model_merging_methods/mask_weights_utils.py``: ``mask_input_with_mask_rate``, strategy
"random"). Each entry of every task vector τ_i is dropped independently with probability ``p`` and
the survivors are multiplied by 1/(1 − p), so E[DARE(τ)] = τ. The sparsified task vectors are then
merged by task arithmetic (``dare-ta``) or TIES (``dare-ties``).

Randomness: the masks come from the per-tensor generator `MergeMethod.merge_iter` hands over
(seeded from the run seed, the method name and the tensor name), drawn for expert 0, then expert 1,
...: a fixed seed gives the same masks whatever order the tensors are visited in. Every
floating-point tensor is sparsified (MergeLM's default excludes no parameter; FusionBench's
``only_on_linear_weights: false``).
"""

from __future__ import annotations

import torch

from bench.merging import merge_method
from bench.params import ParamError
from merges.ties import Aggregate, check_ties_params, ties_task_vector

DARE_PAPER = ("Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a "
              "Free Lunch, ICML 2024, https://arxiv.org/abs/2311.03099")


def check_drop_rate(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ParamError(f"DARE parameter p is the drop probability and must lie in [0, 1) (0.9 drops 90 % of τ); got {p}")


def drop_and_rescale(tau: torch.Tensor, p: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """Zero each entry of ``tau`` with probability ``p``; scale the survivors by 1/(1 − p) when ``rescale``."""
    check_drop_rate(p)
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float32) >= p
    dropped = tau * keep
    return dropped / (1.0 - p) if rescale else dropped


def sparsified_task_vectors(base: torch.Tensor, experts: list[torch.Tensor], p: float, generator: torch.Generator,
                            rescale: bool) -> list[torch.Tensor]:
    """DARE(τ_i) for every expert, masks drawn in expert order from one generator."""
    return [drop_and_rescale(e - base, p, generator, rescale) for e in experts]


@merge_method("dare-ta", paper=DARE_PAPER)
def dare_task_arithmetic(base: torch.Tensor, experts: list[torch.Tensor], *, generator: torch.Generator,
                         p: float = 0.9, lambda_: float = 0.3, rescale: bool = True) -> torch.Tensor:
    """DARE + task arithmetic: θ_pre + λ Σ_i DARE_p(τ_i).

    ``p`` = 0.9 is the paper's headline rate (90 % of the delta parameters of its LLM experts dropped
    with no loss) and the rate of this benchmark's evaluation grid; the paper reports that smaller
    models tolerate lower rates and FusionBench's CLIP configs use 0.5, so an attacker should sweep it. ``lambda_`` = 0.3 as ``ta``
    (FusionBench ``config/method/dare/task_arithmetic.yaml`` too), so DARE is the only difference
    from ``ta``. ``rescale`` = False drops without rescaling (the paper's ablation, "DropOnly").
    """
    taus = sparsified_task_vectors(base, experts, p, generator, rescale)
    total = torch.zeros_like(base)
    for tau in taus:
        total += tau
    return base + lambda_ * total


@merge_method("dare-ties", paper=DARE_PAPER)
def dare_ties(base: torch.Tensor, experts: list[torch.Tensor], *, generator: torch.Generator, p: float = 0.9,
              k: float = 0.2, lambda_: float = 1.0, aggregate: Aggregate = "mean", rescale: bool = True) -> torch.Tensor:
    """DARE + TIES: TIES-Merging (per-tensor trimming) of the DARE-sparsified task vectors.

    Drop and rescale first (``p`` = 0.9, as ``dare-ta``), then trim / elect / disjoint-merge with the
    ``ties`` defaults (k = 0.2, disjoint mean, λ = 1), as FusionBench's ``DareTiesMerging`` composes
    them (it uses p = 0.5, dis-sum and λ = 0.5 for CLIP; all reachable through the parameters).
    """
    check_ties_params(k, aggregate)
    taus = sparsified_task_vectors(base, experts, p, generator, rescale)
    return base + lambda_ * ties_task_vector(taus, k, aggregate)

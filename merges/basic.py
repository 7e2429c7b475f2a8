"""Linear merges: weight averaging (``wa``) and task arithmetic (``ta``).

Both are tensor-wise: `bench.merging.MergeMethod.merge_iter` calls them once per floating-point
tensor (integer buffers are carried over from θ_pre before they are called), so a merge of large
checkpoints holds a few tensors at a time.
"""

from __future__ import annotations

import torch

from bench.merging import merge_method


@merge_method(
    "wa",
    paper="Wortsman et al., Model soups, ICML 2022, https://arxiv.org/abs/2203.05482",
)
def weight_average(base: torch.Tensor, experts: list[torch.Tensor], *, generator: torch.Generator) -> torch.Tensor:
    """Weight averaging: the element-wise mean of the experts, θ = (1/n) Σ θ_i.

    The uniform soup of Wortsman et al. (2022) and FusionBench's ``simple_average``
    (tanganke/fusion_bench ``fusion_bench/method/simple_average.py``). θ_pre takes no part: the mean
    of experts fine-tuned from θ_pre equals θ_pre + (1/n) Σ τ_i, i.e. task arithmetic with λ = 1/n.
    """
    total = torch.zeros_like(base)
    for expert in experts:
        total += expert
    return total / len(experts)


@merge_method(
    "ta",
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, https://arxiv.org/abs/2212.04089",
)
def task_arithmetic(base: torch.Tensor, experts: list[torch.Tensor], *, generator: torch.Generator,
                    lambda_: float = 0.3) -> torch.Tensor:
    """Task arithmetic: θ = θ_pre + λ Σ_i τ_i with task vectors τ_i = θ_i − θ_pre.

    Ilharco et al. (2023), code mlfoundations/task_vectors. ``lambda_`` defaults to 0.3, the
    multi-task value of the paper's protocol as used by PaRaMS (ISCT-W/PaRaMS
    ``src/eval_merging/multiple_add_task_arithmetic.py``), AdaMerging's TA baseline and FusionBench
    (``config/method/task_arithmetic.yaml``, ``scaling_factor: 0.3``). PaRaMS sweeps 0.3–0.8 for
    two-model merges; a strong attacker sweeps it too (``--param lambda_=...``).
    """
    total = torch.zeros_like(base)
    for expert in experts:
        total += expert - base
    return base + lambda_ * total

"""Linear merges: weight averaging (``wa``) and task arithmetic (``ta``).

Both are tensor-wise and run in row blocks (`bench.outofcore`): a large tensor is merged a block
of rows at a time with one running sum, so a merge of large checkpoints holds a few blocks, and the
result is the same, bit for bit, as on the whole tensor. Integer buffers come from θ_pre.
"""

from __future__ import annotations

from typing import Protocol

import torch

from bench.merging import merge_method
from bench.outofcore import BlockInputs, TensorSpec, blockwise, merge_whole


class TaskVectorDrop(Protocol):
    """What sparsifies each task vector in place before it is summed (DARE, `merges.dare.DropMasks`)."""

    def restart(self) -> None: ...

    def apply(self, i: int, tau: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor: ...


class WeightAverageJob:
    """WA over row blocks (a `bench.outofcore.TensorJob`): one running sum, one expert block at a time; θ_pre unread."""

    passes = 0

    def __init__(self, spec: TensorSpec, *, generator: torch.Generator) -> None:
        self.spec = spec
        self.scratch: torch.Tensor | None = None

    def begin(self, pass_index: int) -> None:
        pass

    def merge(self, inputs: BlockInputs) -> torch.Tensor:
        total: torch.Tensor | None = None
        for i in range(inputs.n):
            expert = inputs.stored_expert(i)
            if total is None:
                total = torch.zeros(expert.shape, device=expert.device)  # 0 + θ_0 + ..., signed zeros as whole
            if expert.dtype != torch.float32:  # converted into a reused buffer, then added in float32
                if self.scratch is None:
                    self.scratch = torch.empty(self.spec.block_numel, device=expert.device)
                expert = self.scratch[:expert.numel()].copy_(expert)
            total += expert
        assert total is not None
        return total.div_(inputs.n)

    def again(self) -> bool:
        return False


class TaskArithmeticJob:
    """TA over row blocks: θ_pre + λ Σ_i τ_i with one running sum; ``drop`` sparsifies each τ_i first (DARE)."""

    passes = 0

    def __init__(self, spec: TensorSpec, *, generator: torch.Generator, lambda_: float,
                 drop: TaskVectorDrop | None = None) -> None:
        self.spec, self.lambda_, self.drop = spec, lambda_, drop
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def begin(self, pass_index: int) -> None:
        if self.drop is not None:
            self.drop.restart()

    def merge(self, inputs: BlockInputs) -> torch.Tensor:
        size, device = inputs.numel, inputs.base.device
        if self.buffers is None:  # τ_i and DARE's draws, reused block after block
            self.buffers = (torch.empty(self.spec.block_numel, device=device), torch.empty(self.spec.block_numel, device=device))
        total = torch.zeros(size, device=device)  # becomes the merged block: a new tensor each time
        for i in range(inputs.n):
            tau = inputs.task_vector(i, out=self.buffers[0][:size])
            if self.drop is not None:
                self.drop.apply(i, tau, self.buffers[1][:size])
            total += tau
        return self.finish(total, inputs.base)

    def finish(self, direction: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """θ_pre + λ·Σ τ_i from the direction Σ τ_i: the one step that depends on λ (`merges.tuned` reuses the rest)."""
        # λ·Σ + θ_pre is θ_pre + λ·Σ bit for bit (products and sums commute), without two more temporaries
        return direction.mul_(self.lambda_).add_(base)

    def again(self) -> bool:
        return False


@merge_method(
    "wa",
    paper="Wortsman et al., Model soups, ICML 2022, https://arxiv.org/abs/2203.05482",
)
@blockwise(WeightAverageJob)
def weight_average(base: torch.Tensor, experts: list[torch.Tensor], *, generator: torch.Generator) -> torch.Tensor:
    """Weight averaging: the element-wise mean of the experts, θ = (1/n) Σ θ_i.

    The uniform soup of Wortsman et al. (2022) and FusionBench's ``simple_average``
    (tanganke/fusion_bench ``fusion_bench/method/simple_average.py``). θ_pre takes no part: the mean
    of experts fine-tuned from θ_pre equals θ_pre + (1/n) Σ τ_i, i.e. task arithmetic with λ = 1/n.
    """
    return merge_whole(WeightAverageJob, base, experts, generator=generator)


@merge_method(
    "ta",
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, https://arxiv.org/abs/2212.04089",
)
@blockwise(TaskArithmeticJob)
def task_arithmetic(base: torch.Tensor, experts: list[torch.Tensor], *, generator: torch.Generator,
                    lambda_: float = 0.3) -> torch.Tensor:
    """Task arithmetic: θ = θ_pre + λ Σ_i τ_i with task vectors τ_i = θ_i − θ_pre.

    Ilharco et al. (2023), code mlfoundations/task_vectors. ``lambda_`` defaults to 0.3, the
    multi-task value of the paper's protocol as used by PaRaMS (ISCT-W/PaRaMS
    ``src/eval_merging/multiple_add_task_arithmetic.py``), AdaMerging's TA baseline and FusionBench
    (``config/method/task_arithmetic.yaml``, ``scaling_factor: 0.3``). PaRaMS sweeps 0.3–0.8 for
    two-model merges; a strong attacker sweeps it too (``--param lambda_=...``).
    """
    return merge_whole(TaskArithmeticJob, base, experts, generator=generator, lambda_=lambda_)

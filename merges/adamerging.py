"""AdaMerging: merging coefficients learned by entropy minimisation on unlabelled test inputs.

Paper: Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024,
https://arxiv.org/abs/2310.02575; code EnnengYang/AdaMerging (``src/main_task_wise_adamerging.py``,
``src/main_layer_wise_adamerging.py``), re-implemented in FusionBench
(``fusion_bench/models/wrappers/layer_wise_fusion.py``).

θ(λ) = θ_pre + Σ_i λ_i ⊙ τ_i, with one λ per task (``adamerging-task``) or one λ per task per
coefficient group (``adamerging-layer``). λ is initialised to the prior 0.3 and trained with Adam
(betas 0.9/0.999, no weight decay) to minimise Σ_tasks mean_batch H(softmax(f_task(x; θ(λ)))), the
Shannon entropy of each task model's predictions on unlabelled test inputs of the merged tasks;
labels are never read. As in the official code, λ is clamped to [0, 1] in the forward pass (the raw
parameter is what Adam updates) and θ_pre's coefficient is fixed at 1.

Choices where this harness differs from, or must pin down, the official scripts:

* **Groups of ``adamerging-layer``.** The official code and FusionBench give one λ per parameter
  *tensor* (each weight and each bias: ``len(paramslist[0])`` coefficients per task); that is the
  default ``granularity="tensor"``. ``granularity="block"`` gives one λ per transformer/CNN block
  (`ArchitectureMap.layer_of`), one for the embeddings, one for the final norms, one for an
  in-body head, and one per remaining tensor.
* **Which tensors.** Every floating-point tensor of the body is merged with its group's λ, float
  buffers (BatchNorm statistics) included, as task arithmetic over state dicts does; the official
  ViT has no float buffers. Integer buffers are carried over from θ_pre.
* **BatchNorm** (CNN suites; the official code has none). Merged running statistics are not the
  statistics of any network (a merged variance can even turn negative), so in the entropy
  objective BatchNorm layers normalise with the statistics of each batch, which is what the
  suites' post-merge recalibration estimates; other float buffers are constants of the objective.
  A non-finite loss stops the merge with an error instead of returning NaN weights.
* **Schedule.** The paper runs 500 Adam steps at lr 1e-3, each step on 2 freshly shuffled batches of
  16 test inputs per task (``if i > 0: break``). A step costs a forward and backward pass of every
  task model, far too slow on CPU for 500 steps, so the default is ``steps=100`` at ``lr=5e-3``:
  Adam moves each λ by about ``lr`` per step, so the product steps × lr — how far λ can travel from
  the prior — equals the paper's 500 × 1e-3. ``steps=500 lr=0.001`` is the paper's schedule.
* **Data budget.** Instead of the whole test split, each task draws a pool of ``samples`` test inputs
  once (``suite.batches(task, "test", shuffle=True, seed=ctx.seed, limit=samples)``) and the steps
  cycle through it, ``batches_per_step`` batches per task per step: bounded memory and a declared
  unlabelled-data budget.
* **Token-level outputs.** For logits with a sequence axis (``[B, T, C]``) the entropy is averaged
  over positions, weighted by the ``attention_mask`` input when there is one.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from bench.batchnorm import batchnorm_layers, batchnorm_statistic_keys
from bench.families.base import ArchitectureMap
from bench.merging import MergeContext, merge_method
from bench.params import ParamError
from bench.weights import CheckpointError, StateDict, check_compatible, is_mergeable

ADAMERGING_PAPER = ("Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024, "
                    "https://arxiv.org/abs/2310.02575")

Granularity = Literal["task", "tensor", "block"]


@dataclass
class AdaMergingResult:
    """The merged body and how it was learned."""

    state: StateDict
    coefficients: torch.Tensor
    """Effective (clamped) λ, shape [groups, experts]."""
    groups: tuple[str, ...]
    """Name of each coefficient group (row of ``coefficients``)."""
    losses: list[float] = field(default_factory=list)
    """The summed entropy loss of each step, before its update."""
    entropy_before: float | None = None
    """Σ_tasks mean entropy over the whole pool at the prior (when measured)."""
    entropy_after: float | None = None
    """The same at the learned coefficients (when measured)."""


# ---------------------------------------------------------------- coefficient groups


def coefficient_groups(keys: Sequence[str], granularity: str,
                       arch: ArchitectureMap | None = None) -> tuple[tuple[str, ...], list[int]]:
    """Group names and, for each key, the index of its group."""
    if granularity == "task":
        names = ["all"] * len(keys)
    elif granularity == "tensor":
        names = list(keys)
    elif granularity == "block":
        if arch is None:
            raise ValueError("block-wise AdaMerging needs the suite's architecture map")
        names = [_block_of(k, arch) for k in keys]
    else:
        raise ParamError(f"AdaMerging granularity must be one of task, tensor, block; got {granularity!r}")
    groups = tuple(dict.fromkeys(names))
    position = {g: i for i, g in enumerate(groups)}
    return groups, [position[n] for n in names]


def _block_of(key: str, arch: ArchitectureMap) -> str:
    layer = arch.layer_of(key)
    if layer is not None:
        return f"layer {layer}"
    if key in arch.embeddings:
        return "embeddings"
    if key in arch.final_norms:
        return "final norms"
    if key in arch.head:
        return "head"
    return key


# ---------------------------------------------------------------- the merged body as a function of λ


class _MergedBody:
    """θ_pre and the task vectors of the mergeable tensors, combined for a given λ."""

    def __init__(self, base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                 keys: Sequence[str], group_index: Sequence[int]) -> None:
        self.keys = list(keys)
        self.group_index = list(group_index)
        self.dtypes = {k: base[k].dtype for k in keys}
        self.base = {k: base[k].detach().float() for k in keys}
        self.taus = {k: [e[k].detach().float() - self.base[k] for e in experts] for k in keys}

    def __call__(self, lambdas: torch.Tensor) -> dict[str, torch.Tensor]:
        """Merged tensors (differentiable in ``lambdas``, shape [groups, experts]) in the base dtypes."""
        out = {}
        for key, g in zip(self.keys, self.group_index):
            t = self.base[key]
            for i, tau in enumerate(self.taus[key]):
                t = t + lambdas[g, i] * tau
            out[key] = t.to(self.dtypes[key])
        return out


# ---------------------------------------------------------------- entropy on unlabelled inputs


def prediction_entropy(logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over the last axis (``softmax_entropy`` of the official code)."""
    h = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    if h.dim() >= 2 and attention_mask is not None and tuple(attention_mask.shape) == tuple(h.shape):
        w = attention_mask.to(h.dtype)
        return (h * w).sum() / w.sum().clamp(min=1)
    return h.mean()


def _body_prefix(model: nn.Module) -> str:
    body = getattr(model, "body", None)
    if not isinstance(body, nn.Module):
        raise TypeError(f"{type(model).__name__} has no .body module; Suite.task_model must expose the merged body as .body")
    for name, module in model.named_modules():
        if module is body:
            return f"{name}." if name else ""
    raise TypeError("the task model's .body is not one of its submodules")


@dataclass
class _TaskForward:
    """One task's model (head fixed, body replaced functionally) and its pool of unlabelled inputs."""

    model: nn.Module
    prefix: str
    pool: list[dict[str, torch.Tensor]]
    buffers: frozenset[str] = frozenset()
    """Body buffers the model still uses: merged with λ but constants of the objective."""
    batch_statistics: frozenset[str] = frozenset()
    """BatchNorm running statistics, which the objective replaces by batch statistics."""

    def entropy(self, merged: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        params = {self.prefix + k: (v.detach() if k in self.buffers else v) for k, v in merged.items()
                  if k not in self.batch_statistics}
        logits = functional_call(self.model, params, args=(), kwargs=dict(inputs), tie_weights=True, strict=False)
        return prediction_entropy(logits, inputs.get("attention_mask"))


def use_batch_statistics(body: nn.Module) -> frozenset[str]:
    """Make every BatchNorm of ``body`` normalise with batch statistics (no running statistics kept or
    updated, in train and eval mode alike); returns the names of the running-statistics buffers removed."""
    removed = batchnorm_statistic_keys(body)
    for _, module in batchnorm_layers(body):
        module.track_running_stats = False
        module.running_mean = module.running_var = module.num_batches_tracked = None
    return removed


def unlabelled_pool(suite: Any, task: str, *, samples: int, batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """The inputs of up to ``samples`` shuffled test examples of ``task``, in batches; labels are dropped."""
    pool = [dict(b.inputs) for b in suite.batches(task, "test", batch_size=batch_size, limit=samples,
                                                  shuffle=True, seed=seed)]
    if not pool:
        raise ValueError(f"suite {getattr(suite, 'name', '?')!r} yielded no test inputs for task {task!r}; AdaMerging needs some")
    return pool


def _task_forwards(base: StateDict, ctx: MergeContext, keys: Sequence[str], samples: int, batch_size: int) -> list[_TaskForward]:
    if not ctx.tasks:
        raise ValueError("AdaMerging needs at least one task in the merge context")
    if len(ctx.heads) != len(ctx.tasks):
        raise ValueError(f"the merge context has {len(ctx.tasks)} task(s) but {len(ctx.heads)} head(s); give one head per task")
    forwards = []
    for task, head in zip(ctx.tasks, ctx.heads):
        model = ctx.suite.task_model(base, head, task).eval()
        model.requires_grad_(False)  # only λ is trained
        prefix = _body_prefix(model)
        body_keys = set(model.body.state_dict())
        unknown = [k for k in keys if k not in body_keys]
        if unknown:
            raise CheckpointError(f"suite {ctx.suite.name!r}'s body module has no tensor(s) {unknown[:3]} of the merged state")
        pool = unlabelled_pool(ctx.suite, task, samples=samples, batch_size=batch_size, seed=ctx.seed)
        stats = use_batch_statistics(model.body)
        forwards.append(_TaskForward(model, prefix, pool, frozenset(name for name, _ in model.body.named_buffers()), stats))
    return forwards


def _pool_entropy(forwards: Sequence[_TaskForward], merged: Mapping[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(sum(torch.stack([f.entropy(merged, x) for x in f.pool]).mean() for f in forwards))


# ---------------------------------------------------------------- training


def check_adamerging_params(steps: int, lr: float, batch_size: int, batches_per_step: int, samples: int) -> None:
    if steps < 0:
        raise ParamError(f"AdaMerging steps must be >= 0; got {steps}")
    if lr <= 0:
        raise ParamError(f"AdaMerging lr must be positive; got {lr}")
    if batch_size < 1 or batches_per_step < 1 or samples < 1:
        raise ParamError("AdaMerging batch_size, batches_per_step and samples must be >= 1; "
                         f"got {batch_size}, {batches_per_step}, {samples}")


def learn_coefficients(base: StateDict, experts: Sequence[StateDict], ctx: MergeContext, *, granularity: str,
                       steps: int, lr: float, prior: float, batch_size: int, batches_per_step: int, samples: int,
                       clamp: bool, measure: bool = False) -> AdaMergingResult:
    """Learn λ by entropy minimisation and return the merged body (see the module docstring)."""
    check_adamerging_params(steps, lr, batch_size, batches_per_step, samples)
    if not experts:
        raise CheckpointError("a merge needs at least one expert")
    for i, expert in enumerate(experts):
        check_compatible(base, expert, what=f"expert {i}")
    keys = [k for k in base if is_mergeable(base[k])]
    arch = ctx.suite.arch_map() if granularity == "block" else None
    groups, group_index = coefficient_groups(keys, granularity, arch)
    body = _MergedBody(base, experts, keys, group_index)
    forwards = _task_forwards(base, ctx, keys, samples, batch_size)

    raw = nn.Parameter(torch.full((len(groups), len(experts)), float(prior)))
    optimizer = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    def effective() -> torch.Tensor:
        return raw.clamp(0.0, 1.0) if clamp else raw

    before = _pool_entropy(forwards, body(effective().detach())) if measure else None
    losses = []
    cursors = [itertools.cycle(range(len(f.pool))) for f in forwards]
    with torch.enable_grad():
        for step in range(steps):
            merged = body(effective())
            loss = sum(f.entropy(merged, f.pool[next(c)]) for f, c in zip(forwards, cursors)
                       for _ in range(batches_per_step))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"AdaMerging's entropy became {float(loss)} at step {step}; "
                                         "lower lr or check the task models")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))

    lambdas = effective().detach().clone()
    with torch.no_grad():
        merged = body(lambdas)
    after = _pool_entropy(forwards, merged) if measure else None
    state = {k: (merged[k] if k in merged else v) for k, v in base.items()}
    return AdaMergingResult(state, lambdas, groups, losses, before, after)


# ---------------------------------------------------------------- the two registered methods


@merge_method("adamerging-task", tensorwise=False, needs_data=True, version="2", paper=ADAMERGING_PAPER)
def adamerging_task(base: StateDict, experts: list[StateDict], *, ctx: MergeContext, steps: int = 100,
                    lr: float = 5e-3, prior: float = 0.3, batch_size: int = 16, batches_per_step: int = 2,
                    samples: int = 256, clamp: bool = True) -> StateDict:
    """Task-wise AdaMerging: one λ per task, learned by test-time entropy minimisation.

    Defaults: prior 0.3, clamp to [0, 1] and 2 batches of 16 per task per step as the official code;
    100 Adam steps at lr 5e-3 instead of its 500 at 1e-3 (same travel for λ, a fifth of the compute);
    a pool of 256 unlabelled test inputs per task. See the module docstring for every choice.
    """
    return learn_coefficients(base, experts, ctx, granularity="task", steps=steps, lr=lr, prior=prior,
                              batch_size=batch_size, batches_per_step=batches_per_step, samples=samples,
                              clamp=clamp).state


@merge_method("adamerging-layer", tensorwise=False, needs_data=True, version="2", paper=ADAMERGING_PAPER)
def adamerging_layer(base: StateDict, experts: list[StateDict], *, ctx: MergeContext, steps: int = 100,
                     lr: float = 5e-3, prior: float = 0.3, batch_size: int = 16, batches_per_step: int = 2,
                     samples: int = 256, clamp: bool = True,
                     granularity: Literal["tensor", "block"] = "tensor") -> StateDict:
    """Layer-wise AdaMerging: one λ per task per parameter tensor (or per block), learned by entropy minimisation.

    ``granularity="tensor"`` is the official code's "layer" (every weight and bias has its own λ);
    ``"block"`` groups the tensors of one transformer/CNN block. Other defaults as ``adamerging-task``.
    """
    return learn_coefficients(base, experts, ctx, granularity=granularity, steps=steps, lr=lr, prior=prior,
                              batch_size=batch_size, batches_per_step=batches_per_step, samples=samples,
                              clamp=clamp).state

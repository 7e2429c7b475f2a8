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

Cost (version 3). Version 2 computed the same objective and ran every step. The figures come from
``benchmarks/eval_cost.py``, one run on 2026-11-30 on a shared 2-core CPU with 1 torch thread; the
full table is in ``benchmarks/README.md``:

* **No model per step.** The task models are built once. Each step merges the body from λ and runs
  it through `torch.func.functional_call` (already so in version 2). The task vectors are now stacked
  once per tensor, so a step's merge is one matrix-vector product per tensor, and so is its
  backward pass to λ.
* **Pools cached.** Each task's unlabelled pool is drawn, tokenised and padded once per merge.
* **Length-regrouped steps** (token inputs with an ``attention_mask``, models without BatchNorm).
  The examples of a step's batches run in length-sorted micro-batches of ``batch_size // 2``, each
  padded only to its longest member. Every example keeps the weight of its own batch
  (`bench.bucketing.regroup_by_length`), so each step's loss is the same sum over the same examples,
  up to float rounding. On text-minilm's pools the padded positions drop to about 70 %.
* **Convergence stop** (``tol``, default 1e-3; 0 runs every step). After every step, `ConvergenceStop`
  compares the objective over the last full pass over the pools with the pass before. Both passes
  see the same inputs, so the comparison carries no batch noise. The run stops when the relative
  change is below ``tol``. The steps taken and why the run stopped go into the merge notes (a cell's
  ``provenance.merge_notes``).
* **Measured.** On text-minilm, version 3 takes 0.71 of version 2's time per merge (task-wise 423 s
  vs 596 s, layer-wise 419 s vs 580 s, with all four experts merged). Per-example outcomes on all
  four test splits were identical. On vision-effnet, regrouping does not apply (BatchNorm) and
  stacking saves little.
* **The stop does not fire at the defaults.** Seed-0 trajectories of version 2 were measured on both
  suites, task- and layer-wise. At step 100 the objective still improved by 5 to 7 % per pass on
  text-minilm and about 2 % on vision-effnet, and test accuracy was still moving by 1 to 5 points
  between steps 50 and 100. So on these suites every run takes all 100 steps, and a looser ``tol``
  that cut them would move results. The stop never ends a run still improving by more than 0.1 %
  per pass. It saves time only when a run has settled, for example with every λ at a clamp bound.
* **Rejected: channels_last** for the CNN suite. It was 1.6 times faster per step, but on CPU
  (oneDNN, torch 2.13) it is far less accurate in float32. On vision-effnet the first step's
  λ-gradient was off by 19 % against a float64 reference (the default layout: 0.8 %), and merged
  logits were off by up to 1.2e-2 (default layout: 1.6e-4).
* **Numerics.** On a convolutional body, a λ whose true gradient is zero (a scale that BatchNorm
  cancels) moves only by rounding noise under Adam. Such a λ differs between any two numerically
  different runs. On a toy CNN, version 2 with 1 and with 2 torch threads gave a λ 0.16 apart for a
  convolution bias that feeds a BatchNorm.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from bench.batchnorm import batchnorm_layers, batchnorm_statistic_keys
from bench.bucketing import MicroBatch, has_batch_dependent_layers, regroup_by_length, sequence_inputs
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
    steps_taken: int = 0
    """Adam steps actually taken (fewer than ``steps`` when the convergence stop ended the run)."""
    converged: bool = False
    """Whether the convergence stop ended the run."""
    improvement: float | None = None
    """Relative improvement of the last pass over the pools on the one before (`ConvergenceStop`)."""


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
    """θ_pre and the task vectors of the mergeable tensors, combined for a given λ.

    The task vectors of each tensor are stacked once into an ``[experts, numel]`` matrix, so a step's
    merge is one matrix-vector product per tensor (and so is its backward pass, to λ). With
    ``stacked=False`` the experts are added one at a time, as version 2 did (same values up to float
    rounding; kept for `benchmarks/eval_cost.py`).
    """

    def __init__(self, base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                 keys: Sequence[str], group_index: Sequence[int], *, stacked: bool = True) -> None:
        self.keys = list(keys)
        self.group_index = list(group_index)
        self.stacked = stacked
        self.dtypes = {k: base[k].dtype for k in keys}
        self.base = {k: base[k].detach().float() for k in keys}
        self.taus = {k: torch.stack([e[k].detach().float().reshape(-1) for e in experts])
                     .sub_(self.base[k].reshape(1, -1)) for k in keys}

    def __call__(self, lambdas: torch.Tensor) -> dict[str, torch.Tensor]:
        """Merged tensors (differentiable in ``lambdas``, shape [groups, experts]) in the base dtypes."""
        out = {}
        for key, g in zip(self.keys, self.group_index):
            base, taus = self.base[key], self.taus[key]
            if self.stacked:
                t = base + (lambdas[g] @ taus).view(base.shape)
            else:
                t = base
                for i in range(taus.shape[0]):
                    t = t + lambdas[g, i] * taus[i].view(base.shape)
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


def weighted_entropy(logits: torch.Tensor, micro: MicroBatch) -> torch.Tensor:
    """Σ of the entropies of a regrouped micro-batch, each weighted as `prediction_entropy` weighs it in its
    original batch (per example, or per real token when the outputs are per position)."""
    h = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    if h.dim() == 1:
        return (h * micro.weights).sum()
    if tuple(h.shape) == tuple(micro.token_weights.shape):
        return (h * micro.token_weights).sum()
    return (h.flatten(1).mean(1) * micro.weights).sum()


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
    micro_batch: int = 0
    """Regroup each step's examples into length-sorted micro-batches of this size (0: never)."""
    _regrouped: dict[tuple[int, ...], list[MicroBatch]] = field(default_factory=dict)

    def _params(self, merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.prefix + k: (v.detach() if k in self.buffers else v) for k, v in merged.items()
                if k not in self.batch_statistics}

    def entropy(self, merged: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = functional_call(self.model, self._params(merged), args=(), kwargs=dict(inputs), tie_weights=True,
                                 strict=False)
        return prediction_entropy(logits, inputs.get("attention_mask"))

    def step_entropy(self, merged: Mapping[str, torch.Tensor], batch_ids: Sequence[int]) -> torch.Tensor:
        """Σ over the pool batches ``batch_ids`` of each one's mean entropy (one step's share of this task).

        With ``micro_batch`` the batches' examples are regrouped by length (`bench.bucketing`, once per
        distinct set of batches) and weighted as in their own batch: the same sum with less padding."""
        if not self.micro_batch:
            return sum((self.entropy(merged, self.pool[b]) for b in batch_ids), torch.zeros(()))
        key = tuple(batch_ids)
        if key not in self._regrouped:
            self._regrouped[key] = regroup_by_length([self.pool[b] for b in batch_ids], self.micro_batch)
        params = self._params(merged)
        total = torch.zeros(())
        for micro in self._regrouped[key]:
            logits = functional_call(self.model, params, args=(), kwargs=dict(micro.inputs), tie_weights=True,
                                     strict=False)
            total = total + weighted_entropy(logits, micro)
        return total


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


def _task_forwards(base: StateDict, ctx: MergeContext, keys: Sequence[str], samples: int, batch_size: int,
                   micro_batch: int = 0) -> list[_TaskForward]:
    """Each task's model and unlabelled pool; ``micro_batch`` > 0 regroups steps by length where that is exact
    (token inputs with an attention mask, no BatchNorm: an example's output does not depend on its batch)."""
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
        regroup = micro_batch if (micro_batch and not has_batch_dependent_layers(model)
                                  and all(sequence_inputs(x) for x in pool)) else 0
        stats = use_batch_statistics(model.body)
        forwards.append(_TaskForward(model, prefix, pool, frozenset(name for name, _ in model.body.named_buffers()), stats,
                                     regroup))
    return forwards


def _pool_entropy(forwards: Sequence[_TaskForward], merged: Mapping[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(sum(torch.stack([f.entropy(merged, x) for x in f.pool]).mean() for f in forwards))


# ---------------------------------------------------------------- training


def check_adamerging_params(steps: int, lr: float, batch_size: int, batches_per_step: int, samples: int,
                            tol: float = 0.0) -> None:
    if steps < 0:
        raise ParamError(f"AdaMerging steps must be >= 0; got {steps}")
    if lr <= 0:
        raise ParamError(f"AdaMerging lr must be positive; got {lr}")
    if batch_size < 1 or batches_per_step < 1 or samples < 1:
        raise ParamError("AdaMerging batch_size, batches_per_step and samples must be >= 1; "
                         f"got {batch_size}, {batches_per_step}, {samples}")
    if not tol >= 0:  # also rejects NaN
        raise ParamError(f"AdaMerging tol must be >= 0 (0: always run every step); got {tol}")


def pass_lengths(pool_sizes: Sequence[int], batches_per_step: int) -> list[int]:
    """Steps after which each task's cursor has visited every batch of its pool equally often:
    ``n / gcd(n, batches_per_step)`` for a pool of ``n`` batches (8 for 16 batches and 2 per step)."""
    return [n // math.gcd(n, batches_per_step) for n in pool_sizes]


@dataclass
class ConvergenceStop:
    """Stop AdaMerging once a pass over the unlabelled pools improves the entropy objective by less than ``tol``.

    Each step adds every task's share of the loss (its ``batches_per_step`` batch means). Task ``t``'s
    pool is covered evenly by the last ``windows[t]`` steps (`pass_lengths`), so the mean of those
    shares estimates the task's entropy over its whole pool. Summed over tasks this gives the
    objective of the latest pass, ``E_now``, and of the pass before it, ``E_prev``. Both passes see
    exactly the same inputs, so the difference comes from λ alone and not from batch noise.
    ``improvement = (E_prev − E_now) / E_prev`` is checked after every step once two passes exist;
    ``converged`` when its size is below ``tol``. A pass that is worse by more than ``tol`` (Adam
    overshooting) is not convergence, so the run goes on. ``tol = 0`` never stops early.
    """

    windows: Sequence[int]
    tol: float
    history: list[list[float]] = field(default_factory=list)

    def record(self, shares: Sequence[float]) -> None:
        if len(shares) != len(self.windows):
            raise ValueError(f"{len(shares)} task losses for {len(self.windows)} tasks")
        self.history.append([float(x) for x in shares])

    def passes(self) -> tuple[float, float] | None:
        """``(E_prev, E_now)``, or None before two passes."""
        steps = len(self.history)
        if not self.windows or steps < 2 * max(self.windows):
            return None
        prev = now = 0.0
        for t, w in enumerate(self.windows):
            column = [h[t] for h in self.history[steps - 2 * w:]]
            prev += sum(column[:w]) / w
            now += sum(column[w:]) / w
        return prev, now

    def improvement(self) -> float | None:
        p = self.passes()
        if p is None:
            return None
        prev, now = p
        return (prev - now) / prev if prev > 0 else 0.0

    def converged(self) -> bool:
        r = self.improvement()
        return self.tol > 0 and r is not None and abs(r) < self.tol


def learn_coefficients(base: StateDict, experts: Sequence[StateDict], ctx: MergeContext, *, granularity: str,
                       steps: int, lr: float, prior: float, batch_size: int, batches_per_step: int, samples: int,
                       clamp: bool, measure: bool = False, tol: float = 0.0, regroup: bool = True,
                       stacked: bool = True, micro_batch: int | None = None) -> AdaMergingResult:
    """Learn λ by entropy minimisation and return the merged body (see the module docstring).

    ``tol`` > 0 stops early (`ConvergenceStop`); ``steps`` is then the most steps taken. ``regroup`` (token
    inputs, no BatchNorm) evaluates each step's examples in length-sorted micro-batches of ``micro_batch``
    (default half of ``batch_size``); ``stacked`` merges with the task vectors stacked once. ``tol=0,
    regroup=False, stacked=False`` is version 2's computation, kept for benchmarks and tests.
    """
    check_adamerging_params(steps, lr, batch_size, batches_per_step, samples, tol)
    if not experts:
        raise CheckpointError("a merge needs at least one expert")
    for i, expert in enumerate(experts):
        check_compatible(base, expert, what=f"expert {i}")
    keys = [k for k in base if is_mergeable(base[k])]
    arch = ctx.suite.arch_map() if granularity == "block" else None
    groups, group_index = coefficient_groups(keys, granularity, arch)
    body = _MergedBody(base, experts, keys, group_index, stacked=stacked)
    forwards = _task_forwards(base, ctx, keys, samples, batch_size,
                              micro_batch=(micro_batch or max(1, batch_size // 2)) if regroup else 0)

    raw = nn.Parameter(torch.full((len(groups), len(experts)), float(prior)))
    optimizer = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    def effective() -> torch.Tensor:
        return raw.clamp(0.0, 1.0) if clamp else raw

    before = _pool_entropy(forwards, body(effective().detach())) if measure else None
    losses = []
    stop = ConvergenceStop(pass_lengths([len(f.pool) for f in forwards], batches_per_step), tol)
    cursors = [itertools.cycle(range(len(f.pool))) for f in forwards]
    converged = False
    with torch.enable_grad():
        for step in range(steps):
            merged = body(effective())
            shares = [f.step_entropy(merged, [next(c) for _ in range(batches_per_step)])
                      for f, c in zip(forwards, cursors)]
            loss = sum(shares, torch.zeros(()))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"AdaMerging's entropy became {float(loss)} at step {step}; "
                                         "lower lr or check the task models")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            stop.record([float(x.detach()) for x in shares])
            if stop.converged():
                converged = True
                break

    lambdas = effective().detach().clone()
    with torch.no_grad():
        merged = body(lambdas)
    after = _pool_entropy(forwards, merged) if measure else None
    state = {k: (merged[k] if k in merged else v) for k, v in base.items()}
    return AdaMergingResult(state, lambdas, groups, losses, before, after, steps_taken=len(losses),
                            converged=converged, improvement=stop.improvement())


def record_notes(ctx: MergeContext, result: AdaMergingResult, steps: int, tol: float) -> None:
    """What the merge's provenance keeps (``merge_notes``): the steps actually taken and why it stopped."""
    ctx.notes.update({
        "steps_taken": result.steps_taken,
        "max_steps": steps,
        "tol": tol,
        "stopped": "converged" if result.converged else "step limit",
        "last_pass_improvement": None if result.improvement is None else round(result.improvement, 6),
        "final_loss": round(result.losses[-1], 6) if result.losses else None,
        "mean_coefficient_per_expert": [round(float(v), 4) for v in result.coefficients.mean(0)],
    })


# ---------------------------------------------------------------- the two registered methods


ADAMERGING_VERSION = "3"
"""3: convergence stop (``tol``), task vectors stacked once, length-regrouped steps on token inputs
(see "Cost" in the module docstring); 2: the fixed-step computation."""
DEFAULT_TOL = 1e-3


@merge_method("adamerging-task", tensorwise=False, needs_data=True, version=ADAMERGING_VERSION, paper=ADAMERGING_PAPER)
def adamerging_task(base: StateDict, experts: list[StateDict], *, ctx: MergeContext, steps: int = 100,
                    lr: float = 5e-3, prior: float = 0.3, batch_size: int = 16, batches_per_step: int = 2,
                    samples: int = 256, clamp: bool = True, tol: float = DEFAULT_TOL) -> StateDict:
    """Task-wise AdaMerging: one λ per task, learned by test-time entropy minimisation.

    Defaults: prior 0.3, clamp to [0, 1] and 2 batches of 16 per task per step as the official code;
    at most 100 Adam steps at lr 5e-3 instead of its 500 at 1e-3 (same travel for λ, a fifth of the
    compute), stopping early once a pass over the pools improves the entropy by less than ``tol``
    (relative; 0 runs every step); a pool of 256 unlabelled test inputs per task. The steps taken are
    recorded in the merge notes. See the module docstring for every choice and for the cost.
    """
    result = learn_coefficients(base, experts, ctx, granularity="task", steps=steps, lr=lr, prior=prior,
                                batch_size=batch_size, batches_per_step=batches_per_step, samples=samples,
                                clamp=clamp, tol=tol)
    record_notes(ctx, result, steps, tol)
    return result.state


@merge_method("adamerging-layer", tensorwise=False, needs_data=True, version=ADAMERGING_VERSION, paper=ADAMERGING_PAPER)
def adamerging_layer(base: StateDict, experts: list[StateDict], *, ctx: MergeContext, steps: int = 100,
                     lr: float = 5e-3, prior: float = 0.3, batch_size: int = 16, batches_per_step: int = 2,
                     samples: int = 256, clamp: bool = True,
                     granularity: Literal["tensor", "block"] = "tensor", tol: float = DEFAULT_TOL) -> StateDict:
    """Layer-wise AdaMerging: one λ per task per parameter tensor (or per block), learned by entropy minimisation.

    ``granularity="tensor"`` is the official code's "layer" (every weight and bias has its own λ);
    ``"block"`` groups the tensors of one transformer/CNN block. Other defaults, the convergence stop
    and the notes as ``adamerging-task``.
    """
    result = learn_coefficients(base, experts, ctx, granularity=granularity, steps=steps, lr=lr, prior=prior,
                                batch_size=batch_size, batches_per_step=batches_per_step, samples=samples,
                                clamp=clamp, tol=tol)
    record_notes(ctx, result, steps, tol)
    return result.state

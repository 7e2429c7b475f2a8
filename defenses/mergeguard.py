"""MergeGuard (arXiv:2511.11851): density-aware fine-tuning, then adversarial weight negation.

The method, and every choice made where the paper is vague, is documented on `MergeGuard`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from bench.artifact import Artifact
from bench.batchnorm import batchnorm_statistic_keys
from bench.families.base import ROPE, ArchitectureMap
from bench.params import ParamError
from bench.plugins import Defense, DefenseContext
from bench.registry import defenses
from bench.suite import Batch, Expert
from bench.weights import StateDict, hash_json, is_mergeable, load_state, save_state, state_hash

PENALTIES = ("theta_l2sq", "layer_l2", "layer_mean_l2sq", "tau_l2sq")

PAPER = "Chen et al., Defending Unauthorized Model Merging via Dual-Stage Weight Protection, arXiv:2511.11851"


# ---------------------------------------------------------------- parameters


@dataclass(frozen=True)
class DensityParams:
    """Stage 1: density-aware fine-tuning."""

    alpha: float = 0.01
    """Weight α of the layer-wise L2 term (Eq. 1; 0.01 in §6.1)."""
    penalty: Literal["theta_l2sq", "layer_l2", "layer_mean_l2sq", "tau_l2sq"] = "layer_l2"
    """Reading of Eq. 2's term (`layerwise_l2`): theta_l2sq Σ_ℓ‖θ^(ℓ)‖²₂ (version 2), layer_l2 Σ_ℓ‖θ^(ℓ)‖₂,
    layer_mean_l2sq Σ_ℓ‖θ^(ℓ)‖²₂/n_ℓ, tau_l2sq Σ_ℓ‖θ^(ℓ) − θ_pre^(ℓ)‖²₂."""
    steps: int | None = None
    """Fine-tuning steps of the re-fine-tune (None: the suite's recipe)."""

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ParamError(f"alpha must be >= 0; got {self.alpha}")
        if self.steps is not None and self.steps < 1:
            raise ParamError(f"steps must be a positive integer or None; got {self.steps}")
        if self.penalty not in PENALTIES:
            raise ParamError(f"penalty must be one of {', '.join(PENALTIES)}; got {self.penalty!r}")


@dataclass(frozen=True)
class NegationParams:
    """Stage 2: adversarial weight negation."""

    k_layers: float = 0.1
    """k': fraction of units (most important first) left untouched (10 % in §6.1)."""
    k_params: float = 0.1
    """k: fraction of each remaining unit's entries, by |τ'|, that are negated (0.1 in §6.1)."""
    beta: float = 1.0
    """β of Eq. 4 (1 in §6.1)."""
    heldout_samples: int = 256
    """Training-split samples used to measure each unit's accuracy drop."""
    batch_size: int = 32
    """Batch size of the importance evaluations."""
    granularity: Literal["block", "module"] = "block"
    """Unit of importance: an architecture-map layer ('block') or a leaf module ('module')."""
    layer_mask: Literal["task_vector", "zero"] = "task_vector"
    """How a unit is masked when measuring its importance: reset to θ_pre, or zero the weights."""
    exclude_lm_io: Literal["auto", "yes", "no"] = "auto"
    """Leave embeddings, final norms and the LM head alone ('auto': only for causal LMs)."""
    recalibrate_batchnorm: bool = True
    """BatchNorm networks: keep running statistics out of the mask and re-estimate them after negation."""
    mask_scope: Literal["tensor", "unit"] = "tensor"
    """Where the top-k |τ'| entries are ranked: within each tensor, or jointly across a unit's tensors (version 2)."""
    recalibrate_importance: bool = True
    """BatchNorm networks: re-estimate running statistics for every masked unit before measuring its drop."""

    def __post_init__(self) -> None:
        for name in ("k_layers", "k_params"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ParamError(f"{name} is a fraction and must lie in [0, 1]; got {value}")
        if self.beta <= 0:
            raise ParamError(
                f"beta must be > 0 (Eq. 4 subtracts a positive multiple of the task vector); got {self.beta}"
            )
        if self.heldout_samples < 1:
            raise ParamError(f"heldout_samples must be at least 1; got {self.heldout_samples}")
        if self.batch_size < 1:
            raise ParamError(f"batch_size must be at least 1; got {self.batch_size}")
        if self.mask_scope not in ("tensor", "unit"):
            raise ParamError(f"mask_scope must be 'tensor' or 'unit'; got {self.mask_scope!r}")


@dataclass(frozen=True)
class MergeGuardParams(NegationParams, DensityParams):
    """Both stages (the paper's defaults)."""

    def __post_init__(self) -> None:
        DensityParams.__post_init__(self)
        NegationParams.__post_init__(self)


# ---------------------------------------------------------------- stage 1


def layer_groups(names: Iterable[str], arch: ArchitectureMap) -> dict[str, list[str]]:
    """Tensor names grouped per layer: one group per architecture-map layer, one per other parent module."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_block_unit(name, arch), []).append(name)
    return groups


def layerwise_l2(
    module: nn.Module, arch: ArchitectureMap, penalty: str = "layer_l2", anchor: StateDict | None = None
) -> torch.Tensor:
    """The layer-wise L2 term of Eqs. 2–3 over ``module``'s trainable parameters, in the reading ``penalty``.

    ``theta_l2sq``: Σ_ℓ ||θ^(ℓ)||²₂. ``layer_l2``: Σ_ℓ ||θ^(ℓ)||₂. ``layer_mean_l2sq``: Σ_ℓ ||θ^(ℓ)||²₂ / n_ℓ.
    ``tau_l2sq``: Σ_ℓ ||θ^(ℓ) − θ_pre^(ℓ)||²₂, with θ_pre given as ``anchor``.
    """
    if penalty not in PENALTIES:
        raise ValueError(f"unknown penalty {penalty!r}; expected one of {', '.join(PENALTIES)}")
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the module has no trainable parameters to regularise")
    if penalty == "tau_l2sq":
        if anchor is None:
            raise ValueError("the tau_l2sq penalty needs θ_pre as its anchor")
        params = {n: p - anchor[n].to(p) for n, p in params.items()}
    per_layer = []
    for names in layer_groups(params, arch).values():
        squared = sum(params[n].pow(2).sum() for n in names)
        if penalty == "layer_l2":
            squared = squared.clamp_min(1e-24).sqrt()  # the layer's ‖·‖₂; the clamp keeps the gradient finite
        elif penalty == "layer_mean_l2sq":
            squared = squared / sum(params[n].numel() for n in names)
        per_layer.append(squared)
    return torch.stack(per_layer).sum()


class LayerwiseL2:
    """The stage-1 regulariser ``α · layerwise_l2`` on the task model's body (a `bench.suite.Regularizer`)."""

    def __init__(
        self, alpha: float, arch: ArchitectureMap, penalty: str = "layer_l2", anchor: StateDict | None = None
    ) -> None:
        self.alpha = alpha
        self.arch = arch
        self.penalty = penalty
        self.anchor = anchor

    def __call__(self, model: nn.Module) -> torch.Tensor:
        body = getattr(model, "body", None)
        if not isinstance(body, nn.Module):
            raise TypeError("MergeGuard's regulariser needs the task model's body as `.body` (see Suite.task_model)")
        return self.alpha * layerwise_l2(body, self.arch, self.penalty, self.anchor)


def density_aware_finetune(expert: Expert, ctx: DefenseContext, params: DensityParams) -> Expert:
    """θ'_def: the expert fine-tuned again on its task under the layer-wise L2 penalty.

    The result is cached in the suite's cache directory under a hash of everything it depends on,
    so ``mergeguard`` and ``mergeguard-stage1`` (and re-runs) fine-tune once per expert."""
    key = hash_json({"suite": ctx.suite.name, "recipe": ctx.suite.recipe_hash(), "task": ctx.task, "seed": ctx.seed,
                     "expert": state_hash(expert.body), "head": state_hash(expert.head),
                     "alpha": params.alpha, "steps": params.steps,
                     # theta_l2sq (version 2's only reading) keeps its old key, so its cached fine-tunes stay valid
                     **({} if params.penalty == "theta_l2sq" else {"penalty": params.penalty})})[:32]
    directory = ctx.suite.cache_dir / "mergeguard-stage1"
    body_path, head_path = directory / f"{key}.body.safetensors", directory / f"{key}.head.safetensors"
    if body_path.is_file() and head_path.is_file():
        return Expert(load_state(body_path), load_state(head_path))
    regularizer = LayerwiseL2(params.alpha, ctx.arch, params.penalty, ctx.base)
    refined = ctx.suite.finetune(
        ctx.task, expert.body, expert.head, seed=ctx.seed, regularizer=regularizer, steps=params.steps
    )
    save_state(refined.head, head_path)
    save_state(refined.body, body_path)  # body last: its presence marks a complete entry
    return refined


# ---------------------------------------------------------------- stage 2: units and masks


@dataclass(frozen=True)
class Unit:
    """A group of tensors masked together when measuring importance (a layer)."""

    name: str
    keys: tuple[str, ...]


def _block_unit(key: str, arch: ArchitectureMap) -> str:
    index = arch.layer_of(key)
    if index is not None:
        layer = next(lay for lay in arch.layers if lay.index == index)
        return layer.prefix.rstrip(".") or f"layer{index}"
    return key.rsplit(".", 1)[0] if "." in key else key


def _module_unit(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else key


def is_causal_lm(arch: ArchitectureMap) -> bool:
    """A decoder LM: its output head sits in the body, or its attention is rotary."""
    return bool(arch.head) or ROPE in arch.features


def lm_io_keys(state: StateDict, arch: ArchitectureMap, mode: str) -> set[str]:
    """The embedding, final-norm and head tensors stage 2 leaves alone (§5: excluded for LLMs only)."""
    if mode == "no" or (mode == "auto" and not is_causal_lm(arch)):
        return set()
    named = (*arch.embeddings, *arch.final_norms, *arch.head)
    return {k for k in state if any(k == n or k.startswith(n + ".") for n in named)}


def negation_units(tv: StateDict, arch: ArchitectureMap, granularity: str, exclude: set[str]) -> list[Unit]:
    """The units of stage 2, in model order, over the task vector's tensors that are not excluded."""
    groups: dict[str, list[str]] = {}
    for key in tv:
        if key in exclude:
            continue
        name = _block_unit(key, arch) if granularity == "block" else _module_unit(key)
        groups.setdefault(name, []).append(key)
    return [Unit(name, tuple(keys)) for name, keys in groups.items()]


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def top_fraction_mask(values: Sequence[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """Boolean masks selecting exactly ``round_half_up(fraction·n)`` entries of largest |value| across ``values``.

    Ties at the threshold are broken by position (tensor order, then flat index), so the count is
    exact and the choice deterministic.
    """
    flat = torch.cat([v.detach().reshape(-1).abs().float() for v in values]) if values else torch.zeros(0)
    n = flat.numel()
    keep = round_half_up(fraction * n)
    if keep <= 0:
        chosen = torch.zeros(n, dtype=torch.bool)
    elif keep >= n:
        chosen = torch.ones(n, dtype=torch.bool)
    else:
        threshold = torch.kthvalue(flat, n - keep + 1).values  # the keep-th largest magnitude
        chosen = flat > threshold
        ties = (flat == threshold).nonzero().flatten()
        chosen[ties[: keep - int(chosen.sum())]] = True
    masks, start = [], 0
    for v in values:
        masks.append(chosen[start : start + v.numel()].reshape(v.shape))
        start += v.numel()
    return masks


def critical_units(drops: Sequence[float], fraction: float) -> list[int]:
    """Indices of the ``round_half_up(fraction·units)`` units whose masking costs most accuracy (stable on ties)."""
    count = round_half_up(fraction * len(drops))
    order = sorted(range(len(drops)), key=lambda i: (-drops[i], i))
    return sorted(order[:count])


def negate(theta: StateDict, base: StateDict, masks: dict[str, torch.Tensor], beta: float) -> StateDict:
    """Eq. 4, θ̂ = θ' − β M ⊙ τ', evaluated as θ_pre + (1 − β)τ' on masked entries (float64, cast back)."""
    out = dict(theta)
    for key, mask in masks.items():
        t, b = theta[key].double(), base[key].double()
        negated = b + (1.0 - beta) * (t - b)
        out[key] = torch.where(mask, negated, t).to(theta[key].dtype)
    return out


# ---------------------------------------------------------------- stage 2: importance


def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, counted) predictions: per-sample classes, or next-token ids for [B, T, V] logits.

    Token labels follow the Hugging Face convention: aligned with the inputs (the model shifts them),
    with -100 marking positions that are not scored.
    """
    if logits.dim() == labels.dim() + 1 and logits.dim() == 3:
        logits, labels = logits[:, :-1], labels[:, 1:]
    predicted = logits.argmax(dim=-1)
    scored = labels != -100
    return int(((predicted == labels) & scored).sum()), int(scored.sum())


@torch.no_grad()
def heldout_accuracy(model: nn.Module, batches: Sequence[Batch]) -> float:
    correct = total = 0
    for batch in batches:
        output = model(**batch.inputs)
        logits = output.logits if hasattr(output, "logits") else output
        c, n = count_correct(logits, batch.labels)
        correct, total = correct + c, total + n
    if total == 0:
        raise ValueError("the held-out batches contain no scored labels")
    return correct / total


@dataclass
class Importance:
    """Accuracy drop of every unit, and what measuring it cost."""

    accuracy: float
    """Held-out accuracy of θ' itself."""
    drops: list[float]
    seconds: float
    evaluations: int


def unit_importance(
    model: nn.Module,
    units: Sequence[Unit],
    theta: StateDict,
    base: StateDict,
    batches: Sequence[Batch],
    layer_mask: str,
    recalibrate: Callable[[nn.Module], object] | None = None,
) -> Importance:
    """Mask each unit in turn inside ``model`` (whose ``.body`` carries θ') and measure the accuracy drop.

    With ``recalibrate`` (BatchNorm networks), the running statistics are re-estimated before θ' and
    before every masked unit is measured, so a drop is the cost of the unit's weights and not of
    statistics gone stale; θ''s own statistics are put back at the end.
    """
    start = time.perf_counter()
    live = _live_tensors(model, [k for u in units for k in u.keys])
    statistics = {k: v.detach().clone() for k, v in model.body.state_dict().items()} if recalibrate else {}
    if recalibrate:
        recalibrate(model)
    reference = heldout_accuracy(model, batches)
    drops = []
    with torch.no_grad():
        for unit in units:
            for k in unit.keys:
                live[k].copy_(base[k] if layer_mask == "task_vector" else torch.zeros_like(live[k]))
            if recalibrate:
                recalibrate(model)
            drops.append(reference - heldout_accuracy(model, batches))
            for k in unit.keys:
                live[k].copy_(theta[k])
        if recalibrate:
            model.body.load_state_dict(statistics)
    return Importance(reference, drops, time.perf_counter() - start, len(units) + 1)


def _live_tensors(model: nn.Module, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The body module's own tensors (sharing storage), so a unit can be masked in place."""
    body = getattr(model, "body", None)
    if not isinstance(body, nn.Module):
        raise TypeError("MergeGuard needs the task model's body as `.body` (see Suite.task_model)")
    state = body.state_dict(keep_vars=True)
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"the task model's body lacks {len(missing)} tensor(s) of the state dict, e.g. {missing[:3]}")
    return {k: state[k].data for k in keys}


def negation_masks(
    units: Sequence[Unit], tv: StateDict, critical: set[int], fraction: float, scope: str
) -> dict[str, torch.Tensor]:
    """M per tensor: the top ``fraction`` of |τ'| in every non-critical unit, ranked per tensor or per unit."""
    masks: dict[str, torch.Tensor] = {}
    for i, unit in enumerate(units):
        if i in critical:
            continue
        if scope == "tensor":
            masks.update({k: top_fraction_mask([tv[k]], fraction)[0] for k in unit.keys})
        else:
            masks.update(zip(unit.keys, top_fraction_mask([tv[k] for k in unit.keys], fraction)))
    return masks


def adversarial_weight_negation(
    theta: StateDict, head: StateDict, ctx: DefenseContext, params: NegationParams
) -> tuple[StateDict, dict[str, torch.Tensor], dict[str, Any]]:
    """Stage 2 on θ' with ``head``: (θ̂, the mask M per tensor, notes)."""
    base = ctx.base
    tv = {k: theta[k] - base[k] for k in base if is_mergeable(base[k])}
    model = ctx.suite.task_model(theta, head, ctx.task)
    statistics = batchnorm_statistic_keys(model.body) if params.recalibrate_batchnorm else frozenset()
    excluded = lm_io_keys(tv, ctx.arch, params.exclude_lm_io)
    units = negation_units(tv, ctx.arch, params.granularity, excluded | statistics)
    batches = list(
        ctx.suite.batches(
            ctx.task, "train", batch_size=params.batch_size, limit=params.heldout_samples, shuffle=True, seed=ctx.seed
        )
    )
    if not batches:
        raise ValueError(f"task {ctx.task!r} yielded no training samples to measure layer importance on")
    recalibrate = None
    if statistics and params.recalibrate_importance:

        def recalibrate(m: nn.Module) -> object:
            return ctx.suite.recalibrate(m, ctx.task, seed=ctx.seed)

    importance = unit_importance(model, units, theta, base, batches, params.layer_mask, recalibrate)
    critical = set(critical_units(importance.drops, params.k_layers))
    masks = negation_masks(units, tv, critical, params.k_params, params.mask_scope)
    protected = negate(theta, base, masks, params.beta)
    recalibrated = 0
    if statistics:
        protected, recalibrated = ctx.suite.recalibrate_statistics(protected, head, ctx.task, seed=ctx.seed)

    negated = sum(int(m.sum()) for m in masks.values())
    considered = sum(tv[k].numel() for u in units for k in u.keys)
    notes = {
        "mask_eval_seconds": round(importance.seconds, 4),
        "mask_evaluations": importance.evaluations,
        "heldout_samples": sum(len(b.labels) for b in batches),
        "heldout_accuracy": importance.accuracy,
        "unit_drops": {u.name: d for u, d in zip(units, importance.drops)},
        "critical_units": [units[i].name for i in sorted(critical)],
        "excluded_tensors": sorted(excluded),
        "recalibrated_statistics": len(statistics),
        "importance_recalibrated": recalibrate is not None,
        "recalibration_samples": recalibrated,
        "negated_entries": negated,
        "negated_fraction": negated / considered if considered else 0.0,
    }
    return protected, masks, notes


# ---------------------------------------------------------------- the defenses


@defenses.register()
class MergeGuard(Defense):
    """MergeGuard: layer-wise L2 re-fine-tune (stage 1), then negate the top-|τ'| entries of non-critical layers (stage 2).

    Paper: W.-J. Chen, M.-Y. Tsai, C.-Y. Lee, C.-M. Yu, "Defending Unauthorized Model Merging via
    Dual-Stage Weight Protection", arXiv:2511.11851 (§5, §6.1, Table 4, Appendix C). No public code:
    the paper is the spec. Where it is vague, the choices below are ours and each one names the passage
    it rests on.

    **Stage 1 — density-aware fine-tuning** (Eqs. 1–3). The defender's expert θ_def is fine-tuned again
    with the suite's own recipe and the loss ``L_task + α Σ_ℓ ‖θ^(ℓ)‖₂`` (α = 0.01, §6.1), giving θ'.

    * *Which L2 term* (``penalty``; version 3). Eqs. 2–3 write ``α Σ_ℓ ||θ^(ℓ)||²₂`` and the text adds
      "Crucially, the L2 penalty is applied layer-wise so that each layer is regularized
      independently". Taken together with the square, that sentence says nothing: a sum of squared
      per-layer norms is the squared norm of the whole model, plain weight decay, and no layer is
      regularised independently of the others. The readings under which "layer-wise" matters are
      offered: ``layer_l2`` (default), ``α Σ_ℓ ||θ^(ℓ)||₂``, a group norm per layer whose gradient
      α·θ^(ℓ)/||θ^(ℓ)|| has norm α in every layer whatever its size; ``layer_mean_l2sq``,
      ``α Σ_ℓ ||θ^(ℓ)||²₂ / n_ℓ``; ``tau_l2sq``, ``α Σ_ℓ ||θ^(ℓ) − θ_pre^(ℓ)||²₂``; and ``theta_l2sq``,
      the squared sum of version 2. All but ``tau_l2sq`` keep the penalty on θ itself, as §5 says the
      term "drives model parameters toward zero" and Eqs. 2–3 write ``θ^(ℓ)``; ``layer_l2`` keeps that
      and the layer-wise structure, and drops only the square. §6.1 adds that stage 1 "requires no
      additional hyperparameter tuning" with α = 0.01 on ViT-L-14 and 7–9B LLMs, which fits a
      per-layer penalty, whose pull does not grow with a layer's size, better than a squared sum,
      whose pull on each weight is 2αθ whatever the model.
    * *Why not the squared sum* (measured, seed 0, nothing tuned). With ``theta_l2sq`` and α = 0.01 the
      gradient 2αθ dominates the trained expert's task gradient, and θ' is a shrunken θ_pre rather than a
      fine-tune: on ``text-minilm`` (AdamW) cos(τ', −θ_pre) is 0.78–0.83 and |τ'| is 9.7–36 against the
      expert's |τ| of 1.8–3.8. On ``vision-effnet`` (SGD, lr η = 0.005, momentum μ = 0.9) every weight
      scales by about exp(−2αη/(1−μ)·(T − μ/(1−μ))) over the recipe's T steps, predicted 0.895
      (digits, T = 120) and 0.860 (T = 160), measured 0.894 and 0.859, with cos(τ', −θ_pre) 0.97 on
      the convolutions and 1.000 on the BatchNorm affine weights. The largest |τ'| are then the largest
      |θ_pre|, and stage 2 resets exactly those to θ_pre (the measurements below). Such a τ' of about
      −0.1·θ_pre also flips the sign of the weights DARE keeps when it is rescaled by 1/(1−p) = 10
      and merged without TA's λ (measured under version 2 with DARE composed with full TIES, today's
      ``dare-ties-mergelm``: digits 0.15 against 0.70 unprotected).
    * *Measured standalone utility* (accuracy(artifact) / accuracy(expert), seed 0, the suites'
      recipes; `protect` called with a `DefenseContext` built as `bench.runner.Runner.protect` builds
      it, then `Suite.evaluate` on the test split). ``text-minilm`` rt-sentiment (expert 0.798):
      version 2 (``theta_l2sq``, ``mask_scope="unit"``) 0.925; its stage 1 alone 0.985; ``theta_l2sq``
      with the per-tensor mask 0.880; ``layer_l2`` stage 1 alone 1.008; ``layer_l2`` with the
      per-tensor mask (version 3's defaults) 0.997; debate-party under version 3 1.008.
      ``vision-effnet`` digits (expert 0.977): version 3 0.949; stage 2 alone on the expert 0.942
      with version 2's mask (unit-ranked, stale importance, statistics re-estimated after negation)
      and 0.952 with version 3's. Version 2 measured 0.716 mean accuracy on ``text-minilm`` (experts
      0.758) and 0.117 on ``vision-effnet`` (its stage 1 alone 0.957). The standard protocol's
      utility cells (shipped in ``leaderboard/data``) then measured version 3 on the other victims:
      rt-subjectivity 1.005, MNIST-5k 0.981, Animal-MNIST 0.956 (stage 2 alone 0.980 and 0.932). Under
      text data version 2 (debate-party by sentence, convention-party's 1,600-sentence test split) the
      protocol's cells measured convention-party 1.000 (expert 0.608; stage 1 alone 1.013, stage 2
      alone 0.991) and debate-party 1.000 (expert 0.730; 1.020 and 0.961), with rt-sentiment 0.997 and
      rt-subjectivity 1.005 unchanged: all seven victims clear the 0.9 floor. TA merge (λ 0.3,
      rt-sentiment with the three other tasks): victim accuracy 0.548 protected, 0.566 unprotected,
      0.528 for θ_pre; on this suite the unprotected TA merge is itself near θ_pre.
    * It covers the body (the released, merged part) and not the task head. The paper's CLIP protocol
      trains the image encoder under a frozen zero-shot head, so there its "trainable parameters" are
      exactly the body. Layers are grouped by `layer_groups`: one group per architecture-map layer,
      one per other parent module.
    * Fine-tuning starts from the expert θ_def ("given θ_def, we obtain θ'_def after Stage 1") and from
      the expert's head. Because it retrains the head too, that head is released as ``Artifact.head``.

    **Stage 2 — adversarial weight negation** (Eq. 4). This stage needs no training.

    1. *Layer importance.* "We begin by masking each layer of the model and measuring the resulting
       accuracy drop." Masking a layer here means zeroing its part of τ' = θ' − θ_pre, which resets the
       layer to θ_pre (``layer_mask="task_vector"``). That is the same binary mask on τ' that Eq. 4
       applies, and the drop then measures what the *fine-tuning* put in the layer: Appendix C speaks
       of "task-critical weights". Zeroing the weights themselves (``layer_mask="zero"``) is offered as
       the literal alternative. Accuracy is measured on ``heldout_samples`` samples of the task's
       *training* split, in a seeded shuffle. The test split is kept for the benchmark's utility score.
       The cost is one evaluation per unit plus one for θ', recorded in ``Artifact.notes``. The paper
       reports 52–641 minutes per model (Appendix C, Tables 7–8).
    2. *Critical layers.* The top k' = 10 % of units by accuracy drop are left untouched, with
       ``round_half_up(k'·units)`` units excluded and ties broken by model order. §6.1 writes k' = 10
       and means 10 %.
    3. *Mask M.* Inside every other unit, M = 1 on exactly ``round_half_up(k·n)`` entries (k = 0.1)
       of each **tensor** (``mask_scope="tensor"``, version 3), those with the largest |τ'|, ties broken by
       position. Over the model this gives the paper's k(1−k') fraction. The paper calls single tensors
       "layers" ("we exclude three layers, model.embed_tokens.weight, model.norm.weight, and
       lm_head.weight"), and the mask selects "the least significant … parameters": a significance
       that compares a BatchNorm γ with a convolution weight, or a LayerNorm gain with a projection,
       ranks scales, not importance. Ranked jointly across a unit's tensors (``mask_scope="unit"``,
       version 2), the mask took 60–97 % of a block's BatchNorm γ/β on ``vision-effnet``. The paper
       names no importance criterion. Task-vector magnitude is the one its §3 describes for TIES
       trimming ("retaining only the top-k% parameters with the largest magnitudes"), and it is also
       the quantity that Eq. 4 moves.
    4. *Negation.* θ̂ = θ' − β M ⊙ τ' with β = 1 (Eq. 4, §6.1). It is evaluated as θ_pre + (1−β)τ' in
       float64, so with β = 1 the negated entries are exactly θ_pre.

    *Units* (``granularity``): "block" makes one unit per architecture-map layer (transformer block),
    grouped with `ArchitectureMap.layer_of`. Every tensor outside the blocks (embeddings, final norms)
    is grouped by its parent module. "module" makes one unit per leaf module (a Linear, a LayerNorm):
    the paper calls ``model.norm.weight`` and ``lm_head.weight`` "layers", which points to this
    finer reading.

    *Tensors.* Stage 2 acts on every floating tensor of the body, the same tensors a merge combines,
    except BatchNorm running statistics (below). Integer buffers are carried over unchanged.

    *BatchNorm networks* (beyond the paper, which protects ViTs and LLMs). Running statistics are not
    parameters: they describe the activations of the weights they were measured under, and negating
    10 % of a conv layer's weights leaves them stale (on ``vision-effnet``, stage 2 alone takes the
    digits / MNIST-5k / Animal-MNIST experts from 0.98 / 0.97 / 0.94 to 0.35 / 0.34 / 0.28 with stale
    statistics, to 0.89 / 0.91 / 0.87 with re-estimated ones).
    A defender releasing such a network re-estimates them on its own training data, as every merged
    BatchNorm body is repaired here (`Suite.recalibrate`). So with ``recalibrate_batchnorm`` (default)
    the statistics are kept out of the units, the importance evaluation masks parameters only, and
    after negation the statistics are re-estimated on ``Suite.recalibration_samples`` training inputs
    of the task (seeded by the cell's seed). With ``recalibrate_importance`` (default, version 3) the
    importance evaluation repairs the same way: the statistics are re-estimated for θ' and for every
    masked unit before its accuracy is measured, so a unit's drop is the cost of its weights, the one
    the released (repaired) model pays, and not of statistics gone stale (version 2 measured with
    θ''s statistics). ``recalibrate_batchnorm=false`` negates the statistics like any other floating
    tensor and never recalibrates (version 1's behaviour).

    *Language models.* "To prevent collapse in LLMs, we exclude ... model.embed_tokens.weight,
    model.norm.weight, and lm_head.weight", while "ViT-based models undergo the full operation". With
    ``exclude_lm_io="auto"``, the map's embeddings, final norms and head are excluded from evaluation
    and negation when the map describes a causal LM: one with an in-body output head or with RoPE.

    Ablations (Table 4): ``mergeguard-stage1`` runs stage 1 only. ``mergeguard-stage2`` runs stage 2
    only, on the unregularised expert (θ' = θ_def).
    """

    name = "mergeguard"
    version = "3"
    Params = MergeGuardParams
    paper = PAPER
    code = ""
    needs_data = True  # stage 1 re-fine-tunes on the task; stage 2 measures on it which units the task needs
    stages: ClassVar[tuple[int, ...]] = (1, 2)
    frontier = {"alpha": ("0.001", "0.01", "0.1"), "k_params": ("0.05", "0.1", "0.4"), "beta": ("0.5", "1", "2")}
    """Three points per knob, the paper's value (§6.1) in the middle, seven settings in all. α (Eq. 1, 0.01) a decade
    either side, each value a re-fine-tune of the expert. k (share of each non-critical unit's entries negated) from
    half the paper's 0.1 to 0.4: more of the task vector is moved. β (Eq. 4, 1) from halving the masked task-vector
    entries (0.5) through resetting them to θ_pre (1, the paper) to reflecting them through θ_pre (2, the literal
    negation). The intermediate k 0.2 and β 1.5 are swept on ``mergeguard-stage2`` (the same negation on the
    unregularised expert), which keeps a vision-effnet run of every frontier inside one session; the stages are the
    ablations ``mergeguard-stage1`` and ``mergeguard-stage2``, each with its own frontier."""

    def protect(self, expert: Expert, ctx: DefenseContext) -> Artifact:
        notes: dict[str, object] = {"stages": list(self.stages)}
        body, head, released_head = expert.body, expert.head, None
        if 1 in self.stages:
            start = time.perf_counter()
            refined = density_aware_finetune(expert, ctx, self.params)
            notes["stage1_seconds"] = round(time.perf_counter() - start, 4)
            body, head = refined.body, refined.head
            released_head = head  # stage 1 retrained the head: the protected body only works with it
        if 2 in self.stages:
            body, _, stage2 = adversarial_weight_negation(body, head, ctx, self.params)
            notes.update(stage2)
        return Artifact(state=dict(body), head=released_head, notes=notes)


@defenses.register()
class MergeGuardStage1(MergeGuard):
    """MergeGuard ablation (Table 4): density-aware fine-tuning only."""

    name = "mergeguard-stage1"
    version = "2"  # version 2: the ``penalty`` reading (default layer_l2); stage 2's changes do not reach it
    Params = DensityParams
    stages = (1,)
    frontier = {"alpha": ("0.001", "0.01", "0.1")}
    """α (Eq. 1, 0.01 in §6.1) a decade either side: a weaker and a stronger pull of the layer-wise L2 term; each
    value re-fine-tunes the expert, so three points only."""


@defenses.register()
class MergeGuardStage2(MergeGuard):
    """MergeGuard ablation (Table 4): adversarial weight negation only, on the unregularised expert."""

    name = "mergeguard-stage2"
    Params = NegationParams
    stages = (2,)
    frontier = {"k_params": ("0.05", "0.1", "0.2", "0.4"), "beta": ("0.5", "1", "2")}
    """Six settings. k (share of each non-critical unit's entries negated) doubles from half the paper's 0.1 (§6.1)
    to 0.4: more of the task vector is moved. β (Eq. 4, 1 in §6.1) runs from halving the masked task-vector entries
    (0.5) through resetting them to θ_pre (1, the paper) to reflecting them through θ_pre (2, the literal negation);
    β 1.5, between the last two, is left out to keep the frontier at six settings."""

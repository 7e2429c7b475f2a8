"""TaylorMLP: release the feed-forward blocks as Taylor series whose coefficients hide W_down.

Wang et al., "Taylor Unswift: Secured Weight Release for Large Language Models via Taylor
Expansion", EMNLP 2024, arXiv 2410.05331; official code guanchuwang/Taylor-Unswift
(``tylor_expansion/src/{llama,phi,utils}.py``, ``protection/llama_protection.py``). Followed step by step:

1. **Calibration** (``LlamaMLP_``): per-neuron min / max / mean / std of the pre-activation that enters
   the activation (the gate projection of a gated MLP, else the up projection), here on the victim
   task's training split (the code used pile-val text; the defender's own data is what a benchmark
   defender has).
2. **Neuron selection** (``dim_selection``): neurons sorted by range ``max − min``; among those with
   range < ``max_gap`` the ``select_dim`` largest; if too few, the ``select_dim`` smallest-range
   neurons. With the code's default ``max_gap = 0`` this is always the smallest-range neurons. The
   others stay exact. ``select_dim`` is given as a fraction of the width by default (0.7, the
   10000/14336 of ``llama_protection.py``) so it scales to every model here.
3. **Expansion point** ``z0 = (min + max) / 2``; **coefficients** ``W_down[:, j] · act⁽ⁿ⁾(z0_j)`` for
   n = 0..N (the code's ``local_approx_output`` and ``fuse_weight``), N = 6 as in ``llama_protection.py``
   (the paper and ``llama_wikitext_test.py`` also use 8).
4. **Obfuscation** (``perturb_generation`` / ``weight_perturb``): a random sign ``s_j`` per selected
   neuron multiplies its act-projection row and its expansion point, and ``sⁿ`` its order-n
   coefficient; the forward undoes it exactly. The code applies it to Llama/Mistral; here it is
   applied to every family (``phi.py`` has none), since it costs nothing and is exact.
5. **Forward** ``approx_output_log_exp`` with its ``over_act_mask``: terms of order > ``grad_order_min``
   are dropped where ``|Δ| > delta_threshold`` (defaults 8 and 2.5 as in both scripts, so with N ≤ 8 the
   mask never triggers).

Shared machinery, release format and numerical choices: `defenses.taylor`. The artifact records the
measured inference latency of the protected task model against the original one (the paper reports
about 4× on Llama-3-8B) and the relative error of every reparameterised MLP on calibration inputs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from bench.artifact import Artifact
from bench.families.base import MLP
from bench.plugins import Defense, DefenseContext
from bench.registry import defenses
from bench.suite import Expert
from defenses.taylor import (
    VARIANT,
    calibrate_expert,
    check_expandable,
    expand_mlp,
    measure_relative_error,
    replace_mlp,
    select_neurons,
)


@dataclass(frozen=True)
class TaylorMLPParams:
    order: int = 6
    """Taylor order N (``grad_order``)."""
    select_fraction: float = 0.7
    """Fraction of each MLP's neurons to expand (``select_dim`` / intermediate size)."""
    select_dim: int | None = None
    """Absolute number of expanded neurons per MLP; overrides select_fraction when set."""
    max_gap: float = 0.0
    """``dim_selection``'s range cap (0: expand the smallest-range neurons)."""
    grad_order_min: int = 8
    """Orders above this are masked where |Δ| > delta_threshold."""
    delta_threshold: float = 2.5
    calibration_samples: int = 256
    batch_size: int = 32
    latency_repeats: int = 3
    """Timed forward passes (median) of the original and protected task models; 0 skips the timing."""


def neuron_count(width: int, params: TaylorMLPParams) -> int:
    count = params.select_dim if params.select_dim is not None else round(params.select_fraction * width)
    if not 0 <= count <= width:
        raise ValueError(f"TaylorMLP cannot expand {count} of {width} neurons; choose select_dim/select_fraction within the width")
    return count


def random_signs(count: int, generator: torch.Generator) -> torch.Tensor:
    """±1 per neuron, as the code's ``randint(0, 2) * 2 − 1``."""
    return torch.randint(0, 2, (count,), generator=generator) * 2 - 1


@torch.no_grad()
def _median_forward_seconds(model: torch.nn.Module, inputs: dict[str, torch.Tensor], repeats: int) -> float:
    model(**inputs)  # warm-up: first calls allocate
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_latency(expert: Expert, artifact: Artifact, ctx: DefenseContext, params: TaylorMLPParams) -> dict[str, float]:
    """Median forward time of the original and the protected task model on one calibration batch."""
    if params.latency_repeats <= 0:
        return {}
    batch = next(iter(ctx.suite.batches(ctx.task, "train", batch_size=params.batch_size, limit=params.batch_size)), None)
    if batch is None:
        return {}
    original = _median_forward_seconds(ctx.suite.task_model(expert.body, expert.head, ctx.task), batch.inputs, params.latency_repeats)
    protected = _median_forward_seconds(ctx.suite.task_model(artifact, expert.head, ctx.task), batch.inputs, params.latency_repeats)
    return {"latency_original_s": original, "latency_protected_s": protected, "latency_ratio": protected / max(original, 1e-12)}


@defenses.register()
class TaylorMLP(Defense):
    """TaylorMLP: selected MLP neurons released as sign-obfuscated Taylor coefficients (W_down folded in)."""

    name = "taylormlp"
    Params = TaylorMLPParams
    paper = ("Wang et al., Taylor Unswift: Secured Weight Release for Large Language Models via Taylor Expansion, "
             "EMNLP 2024, arXiv:2410.05331")
    code = "guanchuwang/Taylor-Unswift"
    applies_to = frozenset({MLP})
    needs_data = True  # neurons are selected and expanded on calibration data, and latency is timed on it
    changes_structure = True
    frontier = {"order": ("4", "6", "8", "10")}
    """N in even steps through the code's two configurations (6, ``llama_protection.py``, the default; 8, the paper
    and ``llama_wikitext_test.py``): the paper's protection is the cost of running the series, which grows with N."""

    def protect(self, expert: Expert, ctx: DefenseContext) -> Artifact:
        p = self.params
        if p.order < 0:
            raise ValueError(f"TaylorMLP order must be >= 0; got order={p.order}")
        start = time.perf_counter()
        layers = check_expandable(ctx.arch)
        calib = calibrate_expert(expert, ctx, layers, p.calibration_samples, p.batch_size)
        state = dict(expert.body)
        errors, expanded = {}, {}
        for lay in layers:
            stats = calib[lay.index].stats
            selected, _ = select_neurons(stats.spread, neuron_count(stats.spread.numel(), p), p.max_gap)
            signs = random_signs(len(selected), ctx.generator(self.name, "signs", lay.index))
            release = expand_mlp(expert.body, lay.mlp, stats.midpoint, p.order, selected=selected, signs=signs,
                                 mask_rule=(p.grad_order_min, p.delta_threshold))
            errors[str(lay.index)] = measure_relative_error(expert.body, release, lay.mlp, calib[lay.index].inputs)
            expanded[str(lay.index)] = len(selected)
            replace_mlp(state, lay, release)
        artifact = Artifact(state=state, variant=VARIANT, notes={
            "order": p.order,
            "expanded_neurons": expanded,
            "calibration_tokens": calib[layers[0].index].stats.count,
            "ffn_relative_error": errors,
        })
        artifact.notes["protect_seconds"] = time.perf_counter() - start
        artifact.notes.update(measure_latency(expert, artifact, ctx, p))
        return artifact

"""Taylor reparameterisation of feed-forward blocks: shared by MergeBarrier (FFN part) and TaylorMLP.

A feed-forward block ``y = W_down (act(a) ⊙ u) + c`` with pre-activation ``a = W_act x + b_act``
(``W_act`` is the gate projection of a gated MLP and the up projection otherwise; ``u = W_up x + b_up``
for a gated MLP and 1 otherwise) is released as a truncated Taylor series of ``act`` around a
per-neuron expansion point ``z0`` (the midpoint of the calibration pre-activations):

    y ≈ Σ_{n=0..N} Ŵⁿ [ (Δⁿ / n!) ⊙ u ] + c,     Δ = a − z0,     Ŵⁿ[:, j] = W_down[:, j] · act⁽ⁿ⁾(z0_j)

(MergeBarrier §3.3 eq. 3, Li et al., AAAI 2026, arXiv 2511.10712; TaylorMLP, Wang et al., EMNLP 2024,
code guanchuwang/Taylor-Unswift ``tylor_expansion/src/{llama,phi,utils}.py``). ``W_down`` is not
released: only the coefficient tensors Ŵ⁰..Ŵᴺ are.

Choices (documented where the sources are vague or disagree):

* **Δ = a − z0**, not ``z0 − a`` as printed in MergeBarrier eq. 3 (with ``z0 − a`` the odd terms would
  carry the wrong sign; both the official TaylorMLP code and Taylor's theorem use ``a − z0``).
* **Derivatives at the biased point.** The expansion point is the midpoint of the pre-activation
  *including* its bias, and every derivative is taken there (MergeBarrier writes ``Act⁽ⁿ⁾(z0 + b)``).
  The bias is then folded into the released point (``z0_released = z0 − b_act``), so ``b_act`` is not
  released and ``Δ = W_act x − z0_released``, as TaylorMLP's ``phi.py`` computes ``Δ``. (``phi.py``
  evaluates the derivatives at the unbiased point but the 0th term at the biased one, an
  inconsistency we do not copy.)
* **1/n! applied at run time**, through TaylorMLP's stable form ``sign(Δ)ⁿ · exp(n·log|Δ| − log n!)``
  (``approx_output_log_exp``); the released Ŵⁿ therefore hold ``W_down · act⁽ⁿ⁾(z0)`` (TaylorMLP's
  ``fuse_weight``), which differs from MergeBarrier's Ŵⁿ by the public constant 1/n! only.
  ``|Δ|`` is clamped at the dtype's smallest normal number so ``Δ = 0`` gives a zero term, not NaN.
* **Derivative recursions**: GELU by MergeBarrier B.5 (Hermite recursion of the Gaussian density),
  SiLU by B.6 with the sigmoid recursion written as the official ``silu_grad`` computes it
  (``σ⁽ⁿ⁾ = σ⁽ⁿ⁻¹⁾ − Σ_k C(n−1,k) σ⁽ᵏ⁾ σ⁽ⁿ⁻¹⁻ᵏ⁾``; B.6 as printed drops the first term), QuickGELU
  ``x·σ(1.702x)`` by the same sigmoid recursion with the chain-rule factor 1.702ⁿ. ReLU is not
  analytic and tanh-approximated GELU has no recursion in the sources: both raise.
* **Convergence**: GELU's series converges everywhere; SiLU's (and QuickGELU's) only within
  ``|Δ| < sqrt(z0² + π²)`` (σ has poles at ±iπ), so pre-activations far from ``z0`` grow worse with N.
  This is the methods' own behaviour and is left as is; the defenses record the error they measure.

Release format (a *variant* ``taylor-ffn`` of the family's module): for a replaced layer every
standard tensor of its MLP map (up, gate, down and their biases) is removed, and these tensors are
added under ``<layer prefix>taylor.``:

=====================  ==================  =================================================================
name                   shape               meaning
=====================  ==================  =================================================================
expansion_point        [S]                 s ⊙ (z0 − b_act) of the S expanded neurons
act_weight             [S, d]              s ⊙ rows of W_act (gate if gated, else up)
coefficients           [N+1, d_out, S]     sⁿ ⊙ W_down[:, j] · act⁽ⁿ⁾(z0_j), n = 0..N
mul_weight, mul_bias   [S, d], [S]         rows of W_up, b_up (gated MLPs only)
out_bias               [d_out]             the down bias c (when the MLP has one)
exact_*                                    the F − S neurons left exact (TaylorMLP's neuron selection):
                                           exact_act_weight/_bias, exact_mul_weight/_bias, exact_down_weight
mask_rule              [2]                 (order_min, threshold): terms of order > order_min are dropped
                                           where |Δ| > threshold (TaylorMLP's ``over_act_mask``)
=====================  ==================  =================================================================

``s`` is TaylorMLP's random per-neuron sign (all ones for MergeBarrier): ``(sa − sz0)ⁿ = sⁿ(a − z0)ⁿ``,
so the forward undoes it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from bench.artifact import Artifact
from bench.families.base import ArchitectureMap, LayerMap, MLPMap
from bench.families.family import variants
from bench.weights import CheckpointError, StateDict

if TYPE_CHECKING:
    from bench.families.family import Family
    from bench.plugins import DefenseContext
    from bench.suite import Batch, Expert

VARIANT = "taylor-ffn"
QUICK_GELU_ALPHA = 1.702

#: Activations with a Taylor recursion (MergeBarrier B.5/B.6); aliases map to the same recursion.
EXPANDABLE_ACTIVATIONS = frozenset({"gelu", "silu", "swish", "quick_gelu"})


class TaylorError(ValueError):
    """A feed-forward block cannot be Taylor-reparameterised as asked."""


# ---------------------------------------------------------------- activations and their derivatives


def activation_fn(name: str, x: torch.Tensor) -> torch.Tensor:
    """The elementwise activation ``name`` of an `MLPMap` (HF ``ACT2FN`` semantics)."""
    if name == "gelu":
        return F.gelu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return F.gelu(x, approximate="tanh")
    if name in ("silu", "swish"):
        return F.silu(x)
    if name == "quick_gelu":
        return x * torch.sigmoid(QUICK_GELU_ALPHA * x)
    if name == "relu":
        return F.relu(x)
    if name == "relu6":
        return F.relu6(x)
    raise TaylorError(f"unknown activation {name!r}; expected one of gelu, gelu_new, silu, quick_gelu, relu, relu6")


def sigmoid_derivatives(x: torch.Tensor, order: int) -> list[torch.Tensor]:
    """σ⁽ⁿ⁾(x) for n = 0..order, by σ' = σ − σ² and Leibniz (the official ``silu_grad`` recursion)."""
    h = [torch.sigmoid(x)]
    for n in range(1, order + 1):
        acc = h[n - 1].clone()
        for k in range(n):
            acc = acc - math.comb(n - 1, k) * h[k] * h[n - 1 - k]
        h.append(acc)
    return h


def gaussian_pdf_derivatives(x: torch.Tensor, order: int) -> list[torch.Tensor]:
    """φ⁽ᵐ⁾(x) for m = 0..order by the Hermite recursion φ⁽ᵐ⁾ = −xφ⁽ᵐ⁻¹⁾ − (m−1)φ⁽ᵐ⁻²⁾ (MergeBarrier eq. 24)."""
    p = [torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)]
    for m in range(1, order + 1):
        nxt = -x * p[m - 1]
        if m >= 2:
            nxt = nxt - (m - 1) * p[m - 2]
        p.append(nxt)
    return p


def activation_derivatives(name: str, x: torch.Tensor, order: int) -> torch.Tensor:
    """``[act⁽⁰⁾(x), ..., act⁽ᴺ⁾(x)]`` stacked on a new dim 0, computed in float64.

    GELU: ``gelu⁽ⁿ⁾ = xΦ⁽ⁿ⁾ + nΦ⁽ⁿ⁻¹⁾`` with ``Φ⁽ᵐ⁾ = φ⁽ᵐ⁻¹⁾`` (B.5). SiLU: ``xσ⁽ⁿ⁾ + nσ⁽ⁿ⁻¹⁾`` (B.6).
    QuickGELU ``xσ(αx)``: ``xαⁿσ⁽ⁿ⁾(αx) + nαⁿ⁻¹σ⁽ⁿ⁻¹⁾(αx)``.
    """
    if order < 0:
        raise TaylorError(f"Taylor order must be >= 0, got {order}")
    x = x.double()
    if name == "gelu":
        phi = gaussian_pdf_derivatives(x, max(order - 1, 0))
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
        out = [x * cdf]
        if order >= 1:
            out.append(cdf + x * phi[0])
        for n in range(2, order + 1):
            out.append(x * phi[n - 1] + n * phi[n - 2])
        return torch.stack(out)
    if name in ("silu", "swish", "quick_gelu"):
        alpha = QUICK_GELU_ALPHA if name == "quick_gelu" else 1.0
        h = sigmoid_derivatives(alpha * x, order)
        out = [x * h[0]]
        for n in range(1, order + 1):
            out.append(x * alpha**n * h[n] + n * alpha ** (n - 1) * h[n - 1])
        return torch.stack(out)
    raise TaylorError(
        f"activation {name!r} has no Taylor recursion here (supported: gelu, silu, quick_gelu); "
        "ReLU-type activations are not analytic and cannot be reparameterised"
    )


# ---------------------------------------------------------------- calibration


@dataclass(frozen=True)
class PreActivationStats:
    """Per-neuron statistics of one MLP's pre-activation (bias included) over calibration tokens."""

    minimum: torch.Tensor
    maximum: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    count: int
    """Number of tokens (positions) seen."""

    @property
    def midpoint(self) -> torch.Tensor:
        """(min + max) / 2: the expansion point of both papers."""
        return (self.minimum + self.maximum) / 2

    @property
    def spread(self) -> torch.Tensor:
        """max − min: TaylorMLP's ``max_min_gap``, its neuron-selection criterion."""
        return self.maximum - self.minimum

    @classmethod
    def from_values(cls, values: torch.Tensor) -> PreActivationStats:
        """Statistics of ``values`` [tokens, neurons] (tests and explicit calibrations)."""
        v = values.detach().double().reshape(-1, values.shape[-1])
        return cls(v.min(0).values, v.max(0).values, v.mean(0), v.std(0, unbiased=False), v.shape[0])


class _RunningStats:
    """Streaming min / max / mean / std of [tokens, neurons] blocks, in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.total_sq: torch.Tensor | None = None
        self.minimum: torch.Tensor | None = None
        self.maximum: torch.Tensor | None = None

    def add(self, block: torch.Tensor) -> None:
        if block.shape[0] == 0:
            return
        b = block.detach().double()
        lo, hi = b.min(0).values, b.max(0).values
        if self.total is None:
            self.total, self.total_sq, self.minimum, self.maximum = b.sum(0), (b * b).sum(0), lo, hi
        else:
            self.total += b.sum(0)
            self.total_sq += (b * b).sum(0)
            self.minimum = torch.minimum(self.minimum, lo)
            self.maximum = torch.maximum(self.maximum, hi)
        self.count += b.shape[0]

    def stats(self) -> PreActivationStats:
        assert self.total is not None and self.total_sq is not None
        mean = self.total / self.count
        var = (self.total_sq / self.count - mean * mean).clamp_min(0)
        return PreActivationStats(self.minimum, self.maximum, mean, var.sqrt(), self.count)


@dataclass(frozen=True)
class LayerCalibration:
    """What calibration learned about one MLP: pre-activation statistics and a sample of its inputs."""

    stats: PreActivationStats
    inputs: torch.Tensor
    """Up to ``keep_inputs`` MLP input rows [tokens, d] (for error and latency reports)."""


def expanded_projection(mlp: MLPMap) -> str:
    """Which projection's output enters the activation: 'gate' for a gated MLP, else 'up'."""
    return "gate" if mlp.gate else "up"


def _token_rows(t: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[tokens, features] rows of a hooked tensor, without padding positions when a mask says which they are."""
    rows = t.reshape(-1, t.shape[-1])
    mask = inputs.get("attention_mask")
    # Padding tokens never reach a prediction; TaylorMLP calibrates on unpadded text, so skip them.
    if isinstance(mask, torch.Tensor) and mask.numel() == rows.shape[0] and t.dim() >= 3:
        rows = rows[mask.reshape(-1).bool()]
    return rows


@torch.no_grad()
def calibrate(
    model: nn.Module,
    family: Family,
    layers: Sequence[LayerMap],
    batches: Iterable[Batch],
    keep_inputs: int = 256,
) -> dict[int, LayerCalibration]:
    """Run ``model`` (a task model whose ``.body`` is the family module) over ``batches`` and record,
    for each layer's MLP, the statistics of its pre-activation (output of the gate or up projection,
    bias included) and up to ``keep_inputs`` of its input rows."""
    running = {lay.index: _RunningStats() for lay in layers}
    kept: dict[int, list[torch.Tensor]] = {lay.index: [] for lay in layers}
    current: dict[str, dict[str, torch.Tensor]] = {"inputs": {}}

    def hook_for(index: int):
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            batch_inputs = current["inputs"]
            running[index].add(_token_rows(output, batch_inputs))
            have = sum(r.shape[0] for r in kept[index])
            if have < keep_inputs:
                kept[index].append(_token_rows(args[0], batch_inputs)[: keep_inputs - have].detach().clone())

        return hook

    handles = []
    try:
        for lay in layers:
            assert lay.mlp is not None
            proj = family.mlp_projection(model.body, lay.index, expanded_projection(lay.mlp))
            handles.append(proj.register_forward_hook(hook_for(lay.index)))
        model.eval()
        for batch in batches:
            current["inputs"] = batch.inputs
            model(**batch.inputs)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for lay in layers:
        if running[lay.index].count == 0:
            raise TaylorError("calibration saw no tokens: the victim task's training split yielded no batches")
        out[lay.index] = LayerCalibration(running[lay.index].stats(), torch.cat(kept[lay.index]) if kept[lay.index] else torch.empty(0))
    return out


def calibrate_expert(
    expert: Expert, ctx: DefenseContext, layers: Sequence[LayerMap], samples: int, batch_size: int, keep_inputs: int = 256
) -> dict[int, LayerCalibration]:
    """`calibrate` the expert's task model on up to ``samples`` examples of the victim task's training split."""
    if samples < 1:
        raise TaylorError(f"calibration needs at least one sample; got calibration_samples={samples}")
    model = ctx.suite.task_model(expert.body, expert.head, ctx.task)
    batches = ctx.suite.batches(ctx.task, "train", batch_size=batch_size, limit=samples)
    return calibrate(model, ctx.family, layers, batches, keep_inputs=keep_inputs)


# ---------------------------------------------------------------- the release


@dataclass
class TaylorRelease:
    """The tensors that replace one MLP (see the module docstring for their meaning)."""

    expansion_point: torch.Tensor
    act_weight: torch.Tensor
    coefficients: torch.Tensor
    mul_weight: torch.Tensor | None = None
    mul_bias: torch.Tensor | None = None
    out_bias: torch.Tensor | None = None
    exact_act_weight: torch.Tensor | None = None
    exact_act_bias: torch.Tensor | None = None
    exact_mul_weight: torch.Tensor | None = None
    exact_mul_bias: torch.Tensor | None = None
    exact_down_weight: torch.Tensor | None = None
    mask_rule: torch.Tensor | None = None

    @property
    def order(self) -> int:
        return self.coefficients.shape[0] - 1

    @property
    def gated(self) -> bool:
        return self.mul_weight is not None

    def to_state(self, prefix: str) -> StateDict:
        return {prefix + f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_state(cls, state: StateDict, prefix: str) -> TaylorRelease | None:
        """The release stored under ``prefix``, or None when the layer was not reparameterised."""
        if prefix + "coefficients" not in state:
            return None
        missing = [n for n in ("expansion_point", "act_weight") if prefix + n not in state]
        if missing:
            raise CheckpointError(f"Taylor release under {prefix!r} lacks {', '.join(missing)}")
        return cls(**{f.name: state.get(prefix + f.name) for f in fields(cls)})


def taylor_prefix(layer: LayerMap) -> str:
    """Key prefix of a layer's Taylor tensors: under the layer's own prefix, so `layer_of` finds them."""
    return f"{layer.prefix}taylor." if layer.prefix else f"taylor.{layer.index}."


def standard_mlp_keys(mlp: MLPMap) -> list[str]:
    """The standard tensors a Taylor release replaces."""
    return [n for n in (mlp.up, mlp.up_bias, mlp.gate, mlp.gate_bias, mlp.down, mlp.down_bias) if n]


def check_expandable(arch: ArchitectureMap) -> list[LayerMap]:
    """The MLP layers a Taylor reparameterisation can act on; raises when there are none or the activation has no recursion."""
    layers = [lay for lay in arch.mlp_layers() if lay.mlp is not None and lay.mlp.kind == "mlp"]
    if not layers:
        raise TaylorError(f"{arch.family} has no transformer feed-forward blocks to reparameterise")
    bad = sorted({lay.mlp.activation for lay in layers if lay.mlp.activation not in EXPANDABLE_ACTIVATIONS})
    if bad:
        raise TaylorError(
            f"{arch.family} uses activation {', '.join(bad)}, which has no Taylor recursion (supported: gelu, silu, quick_gelu)"
        )
    return layers


def select_neurons(spread: torch.Tensor, count: int, max_gap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(expanded, exact) neuron indices by TaylorMLP's ``dim_selection`` rule on the ranges ``spread``."""
    ranges, order = torch.sort(spread, stable=True)
    below = ranges < max_gap
    if int(below.sum()) >= count:
        valid = order[below]
        expanded = valid[len(valid) - count:]
        exact = torch.cat([valid[: len(valid) - count], order[~below]])
    else:
        expanded, exact = order[:count], order[count:]
    return expanded, exact


def expand_mlp(
    state: StateDict,
    mlp: MLPMap,
    midpoint: torch.Tensor,
    order: int,
    *,
    selected: torch.Tensor | None = None,
    signs: torch.Tensor | None = None,
    mask_rule: tuple[int, float] | None = None,
) -> TaylorRelease:
    """Taylor-reparameterise one MLP around ``midpoint`` (per neuron, pre-activation incl. bias).

    ``selected``: indices of the neurons to expand (None: all; the rest stay exact). ``signs``: ±1 per
    selected neuron (TaylorMLP's obfuscation; None: no flips). Coefficients are computed in float64
    and stored in the dtype of the down weight.
    """
    if order < 0:
        raise TaylorError(f"Taylor order must be >= 0, got {order}")
    act_name = mlp.gate or mlp.up
    act_bias_name = mlp.gate_bias if mlp.gate else mlp.up_bias
    w_act = state[act_name].double()
    width = w_act.shape[0]
    b_act = state[act_bias_name].double() if act_bias_name else torch.zeros(width, dtype=torch.float64)
    w_down = state[mlp.down].double()
    dtype = state[mlp.down].dtype
    if midpoint.shape != (width,):
        raise TaylorError(f"expansion point has shape {tuple(midpoint.shape)}; this MLP has {width} neurons")
    sel = torch.arange(width) if selected is None else selected.long()
    rest = torch.tensor(sorted(set(range(width)) - set(sel.tolist())), dtype=torch.long)
    s = torch.ones(len(sel), dtype=torch.float64) if signs is None else signs.double()
    z0 = midpoint.double()[sel]
    derivs = activation_derivatives(mlp.activation, z0, order)  # [N+1, S]
    powers = torch.arange(order + 1, dtype=torch.float64)
    sign_powers = s.unsqueeze(0) ** powers.unsqueeze(1)  # [N+1, S]: sⁿ
    coefficients = w_down[:, sel].unsqueeze(0) * (derivs * sign_powers).unsqueeze(1)  # [N+1, d_out, S]

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dtype).contiguous()

    release = TaylorRelease(
        expansion_point=cast(s * (z0 - b_act[sel])),
        act_weight=cast(s.unsqueeze(1) * w_act[sel]),
        coefficients=cast(coefficients),
        out_bias=cast(state[mlp.down_bias].double()) if mlp.down_bias else None,
        mask_rule=None if mask_rule is None else torch.tensor([float(mask_rule[0]), float(mask_rule[1])], dtype=dtype),
    )
    if mlp.gate:
        w_up = state[mlp.up].double()
        b_up = state[mlp.up_bias].double() if mlp.up_bias else None
        release.mul_weight = cast(w_up[sel])
        release.mul_bias = cast(None if b_up is None else b_up[sel])
    if len(rest):
        release.exact_act_weight = cast(w_act[rest])
        release.exact_act_bias = cast(b_act[rest]) if act_bias_name else None
        release.exact_down_weight = cast(w_down[:, rest])
        if mlp.gate:
            release.exact_mul_weight = cast(state[mlp.up].double()[rest])
            release.exact_mul_bias = cast(state[mlp.up_bias].double()[rest]) if mlp.up_bias else None
    return release


def replace_mlp(state: StateDict, layer: LayerMap, release: TaylorRelease) -> None:
    """Swap ``layer``'s standard MLP tensors in ``state`` for ``release``'s (in place)."""
    assert layer.mlp is not None
    for k in standard_mlp_keys(layer.mlp):
        state.pop(k, None)
    state.update(release.to_state(taylor_prefix(layer)))


def mlp_reference(state: StateDict, mlp: MLPMap, x: torch.Tensor) -> torch.Tensor:
    """The exact output of a standard MLP (down bias included) from its tensors: the baseline of error reports."""

    def linear(w: str, b: str | None, inp: torch.Tensor) -> torch.Tensor:
        return F.linear(inp, state[w].to(inp.dtype), state[b].to(inp.dtype) if b else None)

    hidden = activation_fn(mlp.activation, linear(mlp.gate or mlp.up, mlp.gate_bias if mlp.gate else mlp.up_bias, x))
    if mlp.gate:
        hidden = hidden * linear(mlp.up, mlp.up_bias, x)
    return linear(mlp.down, mlp.down_bias, hidden)


# ---------------------------------------------------------------- the module that runs a release


class TaylorFFN(nn.Module):
    """Runs a `TaylorRelease`: maps the MLP input to the down projection's output (bias included).

    Forward as TaylorMLP's ``approx_output_log_exp``: one matmul per order with the term
    ``sign(Δ)ⁿ·exp(n·log|Δ| − log n!)`` (times ``u`` for a gated MLP), plus the exact neurons.
    """

    def __init__(self, release: TaylorRelease, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.order = release.order
        self.gated = release.gated
        for f in fields(release):
            t = getattr(release, f.name)
            if f.name == "mask_rule":
                self.register_buffer(f.name, None if t is None else t.detach().clone())
            else:
                setattr(self, f.name, None if t is None else nn.Parameter(t.detach().clone()))
        # log n! for n = 0..N, the discount of the stable power form
        self.register_buffer("log_factorial", torch.tensor([math.lgamma(n + 1) for n in range(self.order + 1)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coeff = self.coefficients
        x = x.to(coeff.dtype)
        delta = F.linear(x, self.act_weight) - self.expansion_point
        magnitude = delta.abs()
        log_mag = magnitude.clamp_min(torch.finfo(delta.dtype).tiny).log()
        sign = torch.where(delta > 0, 1.0, -1.0).to(delta.dtype)
        u = F.linear(x, self.mul_weight, self.mul_bias) if self.gated else None
        out = F.linear(u, coeff[0]) if u is not None else coeff[0].sum(-1).expand(*x.shape[:-1], coeff.shape[1])
        order_min, threshold = (None, None) if self.mask_rule is None else (int(self.mask_rule[0]), float(self.mask_rule[1]))
        log_fact = self.log_factorial.to(delta.dtype)
        for n in range(1, self.order + 1):
            term = torch.exp(n * log_mag - log_fact[n])
            if n % 2:
                term = term * sign
            if order_min is not None and n > order_min:
                term = term * (magnitude <= threshold).to(term.dtype)
            if u is not None:
                term = term * u
            out = out + F.linear(term, coeff[n])
        if self.exact_down_weight is not None:
            hidden = activation_fn(self.activation, F.linear(x, self.exact_act_weight, self.exact_act_bias))
            if self.gated:
                hidden = hidden * F.linear(x, self.exact_mul_weight, self.exact_mul_bias)
            out = out + F.linear(hidden, self.exact_down_weight)
        if self.out_bias is not None:
            out = out + self.out_bias
        return out


class TaylorFFNVariant:
    """Runs artifacts whose MLPs are released as Taylor coefficients (MergeBarrier FFN, TaylorMLP)."""

    def install(self, module: nn.Module, artifact: Artifact, family: Family) -> None:
        arch = family.arch_map()
        state = artifact.state
        expected = module.state_dict()
        replaced = {lay.index: TaylorRelease.from_state(state, taylor_prefix(lay)) for lay in arch.mlp_layers()}
        replaced = {i: r for i, r in replaced.items() if r is not None}
        covered = {k for lay in arch.mlp_layers() if lay.index in replaced for k in standard_mlp_keys(lay.mlp)}
        missing = sorted(set(expected) - set(state) - covered)
        if missing:
            raise CheckpointError(f"{family.name}: Taylor artifact lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
        standard = {k: v.to(expected[k].dtype) for k, v in state.items() if k in expected}
        module.load_state_dict(standard, strict=False)
        for lay in arch.mlp_layers():
            if lay.index in replaced:
                family.install_mlp(module, lay.index, TaylorFFN(replaced[lay.index], lay.mlp.activation))


#: The registered instance (`Family.build` calls ``variants.get(name).install(...)``).
TAYLOR_FFN = TaylorFFNVariant()
variants.register(VARIANT, obj=TAYLOR_FFN)


def measure_relative_error(state: StateDict, release: TaylorRelease, mlp: MLPMap, inputs: torch.Tensor) -> float:
    """‖TaylorFFN(x) − MLP(x)‖ / ‖MLP(x)‖ over ``inputs`` (0.0 when there are none)."""
    if inputs.numel() == 0:
        return 0.0
    with torch.no_grad():
        exact = mlp_reference(state, mlp, inputs.to(state[mlp.down].dtype))
        approx = TaylorFFN(release, mlp.activation)(inputs)
    return float((approx - exact).norm() / exact.norm().clamp_min(1e-30))

"""Taylor inversion: recover standard MLP weights from a Taylor-series FFN release by the coefficient ratios."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from attacks._align import AttackInputError, hidden_similarity
from bench.artifact import Artifact
from bench.families.base import LayerMap, MLPMap
from bench.params import ParamError
from bench.plugins import Attack, AttackContext, AttackNeeds
from bench.registry import attacks
from bench.weights import CheckpointError, StateDict, check_compatible
from defenses._linear import permute_hidden, solve_assignment
from defenses.taylor import VARIANT, TaylorRelease, taylor_prefix

QUICK_GELU_ALPHA = 1.702
FAILED_RESIDUAL = 1e-4
"""A neuron whose coefficients keep more than this fraction of their energy off the fitted direction counts as failed."""


@dataclass(frozen=True)
class TaylorInvertParams:
    search_radius: float = 20.0
    """Expansion points are searched in [-radius, radius] when the bias must be recovered too."""
    grid_points: int = 8001
    """Points of the coarse search grid (refined per neuron by golden-section search)."""
    align: bool = True
    """Reorder the recovered hidden units to θ_pre's order (weight matching); a release with exact neurons loses the order."""

    def __post_init__(self) -> None:
        if self.search_radius <= 0 or self.grid_points < 3:
            raise ParamError("taylor-invert needs search_radius > 0 and grid_points >= 3")


@attacks.register()
class TaylorInvert(Attack):
    """Taylor inversion (TaylorAttack): solve each neuron's expansion point, sign and down column from its coefficients.

    Source: vegetable-yx/TaylorAttack ``TaylorAttack/taylor_attack/recovery.py`` ("Towards Provable
    (In)Security of Model Protection via Taylor Expansion"), which recovers 100% of TaylorMLP's
    parameters. It applies to any release of the `defenses.taylor` format (TaylorMLP, and the FFN
    part of MergeBarrier, arXiv 2511.10712 §3.3), whose released coefficients of neuron j are

        Ŵⁿ[:, j] = sⁿ · W_down[:, j] · act⁽ⁿ⁾(z0_j),   n = 0..N,   public point e_j = s(z0_j − b_j).

    Every column of orders is the outer product of one vector (W_down[:, j]) with
    ``c(z0, s) = [sⁿ act⁽ⁿ⁾(z0)]ₙ``, whose ratios ``cₙ/c₀`` depend on z0 and s only. Per neuron:

    * **Unbiased activation input** (e.g. Llama): z0 = s·e, so only s ∈ {±1} is unknown; both are
      tried and the one whose c explains more of the coefficients' energy (rank-1 least squares,
      TaylorAttack's ``_fit_down_column``) wins. This is TaylorAttack's main path.
    * **Biased activation input** (BERT, CLIP): the release folds the bias into e, so z0 is unknown
      too. We find (z0, s) maximising the same explained energy ``cᵀGc/‖c‖²`` (G = the neuron's
      Gram matrix over orders): a grid over [−radius, radius] for both signs, then golden-section
      refinement. This generalises TaylorAttack's fallback (inverting the ratio c₂/c₀ on a
      200k-point grid and refining) from one ratio to all of them. Then b = z0 − s·e.
    * **Down column** W_down[:, j] = O_j c / ‖c‖² (rank-1 least squares); act row = s · released row;
      the gated MLP's up rows, the exact neurons and the biases are released as they are.

    Derivatives of the activation are computed here independently of the defense's code (closed
    forms: σ⁽ⁿ⁾ as a polynomial in σ, evaluated on the negative half-line for stability; Φ⁽ⁿ⁾ by
    Hermite polynomials). Neurons whose coefficients are all zero (a dead W_down column) cannot be
    identified and get s = +1 and bias 0 (the neuron contributes nothing, so the function is unaffected).

    A release with exact neurons (TaylorMLP's selection) stores expanded and exact neurons in two
    groups, losing the original order; with ``align=true`` (default) the recovered units are put back
    in θ_pre's order by weight matching (a function-preserving permutation; the identity when the
    order was kept).

    **Threat model.** It reads the release format from the artifact's variant tag (anyone who runs
    the release must know it) and uses no secret: not the signs, the bias, W_down or the
    calibration. So ``knows_defense`` is False: it does not need to know which defense produced
    the release. θ_pre is used only for the optional re-ordering and the output dtypes. Other modules are
    returned as released (compose with ``anchor-align`` for MergeBarrier's Q/K projection).
    """

    name = "taylor-invert"
    standard_composites: ClassVar[tuple[str, ...]] = ("taylor-invert+anchor-align", "taylor-invert+realign+scale-division")
    version = "1"
    Params = TaylorInvertParams
    paper = ("Towards Provable (In)Security of Model Protection via Taylor Expansion (TaylorAttack), "
             "https://github.com/vegetable-yx/TaylorAttack")
    code = "vegetable-yx/TaylorAttack"
    restores_structure = True

    def needs(self) -> AttackNeeds:
        return AttackNeeds(anchor=True, knows_defense=False)

    def prepare(self, artifact: Artifact, ctx: AttackContext) -> Artifact:
        if artifact.variant is None:
            return Artifact(state=artifact.state, head=artifact.head,
                            notes={"attack": self.name, "inverted_layers": 0, "reason": "no Taylor release in the artifact"})
        if artifact.variant != VARIANT:
            raise AttackInputError(f"taylor-invert inverts {VARIANT!r} releases; this artifact is a {artifact.variant!r} "
                                   "release: use revert-to-base instead")
        state = dict(artifact.state)
        reports = []
        for layer in ctx.arch.mlp_layers():
            release = TaylorRelease.from_state(state, taylor_prefix(layer))
            if release is None:
                continue
            reports.append(invert_layer(state, ctx.base, layer, release, self.params))
        try:
            check_compatible(ctx.base, state, what="the inverted artifact")
        except CheckpointError as exc:
            raise AttackInputError(f"taylor-invert could not restore θ_pre's structure: {exc}") from exc
        notes: dict[str, Any] = {
            "attack": self.name,
            "inverted_layers": len(reports),
            "neurons": sum(r["neurons"] for r in reports),
            "failed_neurons": sum(r["failed"] for r in reports),
            "dead_neurons": sum(r["dead"] for r in reports),
            "max_residual": max((r["max_residual"] for r in reports), default=0.0),
            "moved_hidden_units": sum(r["moved"] for r in reports),
        }
        return Artifact(state=state, head=artifact.head, notes=notes)


# ---------------------------------------------------------------- activation derivatives


def _sigmoid_polynomials(order: int) -> list[list[float]]:
    """Coefficients (in powers of y) of P_n with σ⁽ⁿ⁾ = P_n(σ): P_0 = y, P_{n+1} = P_n'(y) · y(1 − y)."""
    polys = [[0.0, 1.0]]
    for _ in range(order):
        p = polys[-1]
        deriv = [k * p[k] for k in range(1, len(p))]  # coefficients of P' in powers y^0..
        nxt = [0.0] * (len(p) + 1)
        for k, c in enumerate(deriv):  # c y^k · (y − y²)
            nxt[k + 1] += c
            nxt[k + 2] -= c
        polys.append(nxt)
    return polys


def sigmoid_derivatives(x: torch.Tensor, order: int) -> torch.Tensor:
    """σ⁽ⁿ⁾(x) for n = 0..order, ``[order+1, *x.shape]`` in float64.

    Evaluated at −|x| (where σ is small and the polynomial has no cancellation) and reflected with
    σ⁽ⁿ⁾(x) = (−1)ⁿ⁺¹ σ⁽ⁿ⁾(−x) for n ≥ 1 (from σ(x) = 1 − σ(−x)).
    """
    x = x.double()
    y = torch.sigmoid(-x.abs())
    positive = x > 0
    out = []
    for n, poly in enumerate(_sigmoid_polynomials(order)):
        value = torch.zeros_like(y)
        for c in reversed(poly):  # Horner
            value = value * y + c
        if n == 0:
            value = torch.where(positive, 1 - value, value)
        elif n % 2 == 0:  # (−1)^(n+1) = −1
            value = torch.where(positive, -value, value)
        out.append(value)
    return torch.stack(out)


def gaussian_cdf_derivatives(x: torch.Tensor, order: int) -> torch.Tensor:
    """Φ⁽ⁿ⁾(x) for n = 0..order: Φ⁽ⁿ⁾ = (−1)ⁿ⁻¹ Heₙ₋₁(x) φ(x) for n ≥ 1 (probabilists' Hermite polynomials)."""
    x = x.double()
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    out = [0.5 * torch.erfc(-x / math.sqrt(2))]
    he_prev, he = torch.zeros_like(x), torch.ones_like(x)  # He_{-1} (unused), He_0
    for n in range(1, order + 1):
        m = n - 1  # Φ⁽ⁿ⁾ uses He_m
        out.append((-1) ** m * he * pdf)
        he_prev, he = he, x * he - m * he_prev  # He_{m+1} = x He_m − m He_{m−1}
    return torch.stack(out)


def _product_rule(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Derivatives of x·f(x) from those of f: (x f)⁽ⁿ⁾ = x f⁽ⁿ⁾ + n f⁽ⁿ⁻¹⁾."""
    out = [x * f[0]]
    for n in range(1, f.shape[0]):
        out.append(x * f[n] + n * f[n - 1])
    return torch.stack(out)


def activation_derivatives(name: str, x: torch.Tensor, order: int) -> torch.Tensor:
    """``[act⁽⁰⁾(x), ..., act⁽ᴺ⁾(x)]`` in float64 for gelu (erf), silu/swish and quick_gelu."""
    x = x.double()
    if name == "gelu":
        return _product_rule(x, gaussian_cdf_derivatives(x, order))
    if name in ("silu", "swish"):
        return _product_rule(x, sigmoid_derivatives(x, order))
    if name == "quick_gelu":
        a = QUICK_GELU_ALPHA
        scaled = sigmoid_derivatives(a * x, order) * torch.tensor([a**n for n in range(order + 1)], dtype=torch.float64).reshape(-1, *([1] * x.dim()))
        return _product_rule(x, scaled)
    raise AttackInputError(f"taylor-invert has no derivatives for activation {name!r} (supported: gelu, silu, quick_gelu)")


def signed_coefficients(name: str, z: torch.Tensor, sign: torch.Tensor | float, order: int) -> torch.Tensor:
    """``c(z, s)ₙ = sⁿ act⁽ⁿ⁾(z)``: ``[order+1, *z.shape]``."""
    d = activation_derivatives(name, z, order)
    powers = torch.arange(order + 1, dtype=torch.float64).reshape(-1, *([1] * z.dim()))
    s = torch.as_tensor(sign, dtype=torch.float64)
    return d * s**powers


# ---------------------------------------------------------------- per-neuron fit


def explained(gram: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``cᵀGc / ‖c‖²`` per neuron: the coefficient energy explained by direction c (gram [S, n, n], c [n, S])."""
    ct = c.T
    num = (gram * ct[:, :, None] * ct[:, None, :]).sum((1, 2))
    return num / (c * c).sum(0).clamp_min(1e-300)


def _grid_search(gram: torch.Tensor, name: str, order: int, sign: float, params: TaylorInvertParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Best grid point and its explained energy per neuron, for one sign."""
    grid = torch.linspace(-params.search_radius, params.search_radius, params.grid_points, dtype=torch.float64)
    c = signed_coefficients(name, grid, sign, order)  # [n, K]
    outer = torch.einsum("nk,mk->knm", c, c) / (c * c).sum(0).clamp_min(1e-300)[:, None, None]
    outer = outer.reshape(len(grid), -1)
    best_z, best_e = [], []
    for chunk in gram.reshape(gram.shape[0], -1).split(256):
        energy = chunk @ outer.T  # [chunk, K]
        e, k = energy.max(dim=1)
        best_z.append(grid[k])
        best_e.append(e)
    return torch.cat(best_z), torch.cat(best_e)


def _golden_refine(gram: torch.Tensor, name: str, order: int, sign: float, z: torch.Tensor, half_width: float,
                   iterations: int = 40) -> torch.Tensor:
    """Maximise the explained energy per neuron on [z − h, z + h] by golden-section search."""
    ratio = (math.sqrt(5) - 1) / 2
    lo, hi = z - half_width, z + half_width

    def f(points: torch.Tensor) -> torch.Tensor:
        return explained(gram, signed_coefficients(name, points, sign, order))

    x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    f1, f2 = f(x1), f(x2)
    for _ in range(iterations):
        right = f1 < f2  # the maximum lies in [x1, hi]
        lo = torch.where(right, x1, lo)
        hi = torch.where(right, hi, x2)
        x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        f1, f2 = f(x1), f(x2)
    return (lo + hi) / 2


def fit_neurons(coefficients: torch.Tensor, point: torch.Tensor, name: str, biased: bool,
                params: TaylorInvertParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z0, s, residual)`` per neuron from coefficients ``[N+1, d_out, S]`` and public points ``e`` ``[S]``.

    ``residual`` = fraction of the neuron's coefficient energy the fitted direction leaves unexplained.
    """
    order = coefficients.shape[0] - 1
    coeff = coefficients.double()
    per_neuron = coeff.permute(2, 0, 1)  # [S, n, d_out]
    gram = torch.bmm(per_neuron, per_neuron.transpose(1, 2))
    total = gram.diagonal(dim1=1, dim2=2).sum(-1)
    e = point.double()
    candidates = []
    for sign in (1.0, -1.0):
        if biased:
            z, _ = _grid_search(gram, name, order, sign, params)
            step = 2 * params.search_radius / (params.grid_points - 1)
            z = _golden_refine(gram, name, order, sign, z, step)
        else:
            z = sign * e
        candidates.append((z, explained(gram, signed_coefficients(name, z, sign, order))))
    (z_pos, e_pos), (z_neg, e_neg) = candidates
    positive = e_pos >= e_neg
    z0 = torch.where(positive, z_pos, z_neg)
    s = torch.where(positive, 1.0, -1.0).double()
    residual = 1 - torch.maximum(e_pos, e_neg) / total.clamp_min(1e-300)
    return z0, s, torch.where(total > 0, residual, torch.zeros_like(residual))


# ---------------------------------------------------------------- one layer


def invert_layer(state: StateDict, base: StateDict, layer: LayerMap, release: TaylorRelease,
                 params: TaylorInvertParams) -> dict[str, Any]:
    """Replace ``layer``'s Taylor tensors in ``state`` by recovered standard MLP tensors (in place)."""
    mlp = layer.mlp
    assert mlp is not None
    act_bias = mlp.gate_bias if mlp.gate else mlp.up_bias
    biased = act_bias is not None
    order = release.order
    if order < (2 if biased else 1):
        raise AttackInputError(
            f"taylor-invert cannot identify the expansion point of an order-{order} release of layer {layer.index} "
            f"(needs order >= {2 if biased else 1}); use revert-to-base instead"
        )
    coeff = release.coefficients.double()
    e = release.expansion_point.double()
    z0, s, residual = fit_neurons(coeff, e, mlp.activation, biased, params)
    c = signed_coefficients(mlp.activation, z0, s, order)  # [n, S]
    down = (coeff * c[:, None, :]).sum(0) / (c * c).sum(0).clamp_min(1e-300)
    dead = coeff.abs().amax(dim=(0, 1)) == 0
    # Nothing identifies a neuron whose down column is zero; it contributes nothing, so any sign and bias do.
    s = torch.where(dead, 1.0, s)
    act_rows = s[:, None] * release.act_weight.double()
    bias = torch.where(dead, 0.0, z0 - s * e)
    down[:, dead] = 0
    _write_mlp(state, base, mlp, release, act_rows, bias if biased else None, down)
    prefix = taylor_prefix(layer)
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]
    moved = 0
    if params.align:
        order_units = solve_assignment(hidden_similarity(state, base, mlp), maximize=True)
        moved = int((order_units != torch.arange(len(order_units))).sum())
        permute_hidden(state, mlp, order_units)
    return {"neurons": len(e), "failed": int((residual > FAILED_RESIDUAL).sum()), "dead": int(dead.sum()),
            "max_residual": float(residual.max()) if len(residual) else 0.0, "moved": moved}


def _write_mlp(state: StateDict, base: StateDict, mlp: MLPMap, release: TaylorRelease, act_rows: torch.Tensor,
               act_bias: torch.Tensor | None, down: torch.Tensor) -> None:
    """Store expanded neurons first, then the exact ones, under the map's standard names (θ_pre's dtypes)."""

    def put(name: str | None, expanded: torch.Tensor | None, exact: torch.Tensor | None, dim: int = 0) -> None:
        if name is None or expanded is None:
            return
        parts = [expanded.double()] + ([exact.double()] if exact is not None else [])
        state[name] = torch.cat(parts, dim=dim).to(base[name].dtype)

    if mlp.gate:
        put(mlp.gate, act_rows, release.exact_act_weight)
        put(mlp.gate_bias, act_bias, release.exact_act_bias)
        put(mlp.up, release.mul_weight, release.exact_mul_weight)
        put(mlp.up_bias, release.mul_bias, release.exact_mul_bias)
    else:
        put(mlp.up, act_rows, release.exact_act_weight)
        put(mlp.up_bias, act_bias, release.exact_act_bias)
    put(mlp.down, down, release.exact_down_weight, dim=1)
    if mlp.down_bias and release.out_bias is not None:
        state[mlp.down_bias] = release.out_bias.to(base[mlp.down_bias].dtype)

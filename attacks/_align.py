"""Shared algebra of the alignment attacks: input checks, matching, ridge least squares, error reports.

The attacks act through the architecture map only; the reparameterisations themselves (per-head
transforms of attention, hidden-unit permutations) come from `defenses._linear`, which both the
defenses and the attacks that undo them use, so a transform and its inverse share one definition.
All solves run in float64; the results are cast back to each tensor's stored dtype.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from bench.artifact import Artifact
from bench.families.base import MLPMap
from bench.weights import CheckpointError, StateDict, check_compatible, is_mergeable
from defenses._linear import hidden_rows


class AttackInputError(ValueError):
    """An attack was given an input it cannot act on (the message says what to run instead)."""


def require_standard(artifact: Artifact, base: Mapping[str, torch.Tensor], attack: str) -> StateDict:
    """A shallow copy of the artifact's state, after checking it has θ_pre's structure.

    Alignment attacks act on the standard weights; a structure-changed release (a variant) must
    first be turned back into standard weights by an attack that restores structure.
    """
    if artifact.variant is not None:
        raise AttackInputError(
            f"{attack} acts on standard weights but the artifact is a {artifact.variant!r} release; "
            f"put an attack that restores structure first, e.g. --attack taylor-invert+{attack} or revert-to-base+{attack}"
        )
    try:
        check_compatible(base, artifact.state, what="the artifact")
    except CheckpointError as exc:
        raise AttackInputError(f"{attack} needs an artifact with θ_pre's tensors: {exc}") from exc
    return dict(artifact.state)


def hidden_similarity(art: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], mlp: MLPMap) -> torch.Tensor:
    """``C[i, j]`` = inner product of hidden unit i of ``art`` with unit j of ``ref``, summed over every
    floating-point *weight* indexed by hidden unit (`MLPMap.hidden_weights`: projections, biases,
    depthwise kernels, BatchNorm scale and shift): Git Re-Basin's weight-matching objective over the
    block's permutation spec.

    Statistics of the data (`MLPMap.hidden_statistics`: BatchNorm running means and variances) are
    left out, as Git Re-Basin's code leaves them out (``weight_matching`` sums over the spec's
    ``params``; a flax BatchNorm keeps its running averages in the separate ``batch_stats``
    collection). They must not decide the assignment: each contributes a rank-one term
    ``C[i, j] += v_i·v'_j``, whose best assignment sorts the units by ``v'`` to follow the order of
    ``v``. EfficientNet-Lite0's expand-BN running variances are ~46 per channel, so that term
    (~2,000 per pair) outweighs every weight term (~1), and a fine-tune re-estimates the statistics
    on its own data (30-60 % change), reordering them: matched against θ_pre, an unprotected Lite0
    expert was permuted (7,084 channels moved, 0.88 of its task vector). The statistics are still
    permuted with their units (`defenses._linear.permute_hidden`).
    """
    total: torch.Tensor | None = None
    for name, dim in mlp.hidden_weights():
        if not is_mergeable(art[name]):
            continue
        term = hidden_rows(art[name], dim) @ hidden_rows(ref[name], dim).T
        total = term if total is None else total + term
    assert total is not None, "an MLP map always has up and down tensors"
    return total


def cosine_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``S[i, j]`` = cosine similarity of row i of ``a`` with row j of ``b`` (float64; rows flattened).

    The ``eps`` guard on the norms is the anchor-guided attack code's (``solve_permutation``).
    """
    a = a.double().reshape(a.shape[0], -1)
    b = b.double().reshape(b.shape[0], -1)
    a = a / (a.norm(dim=1, keepdim=True) + eps)
    b = b / (b.norm(dim=1, keepdim=True) + eps)
    return a @ b.T


def ridge_solve(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """``T`` minimising ``‖X T − Y‖² + λ‖T‖²``: ``(XᵀX + λI)⁻¹ XᵀY`` in float64.

    As the anchor-guided attack code's ``solve_linear_transformation`` (krumpguo/secure-merge-attack
    ``utils_attack_B32.py``): the normal equations solved with ``torch.linalg.lstsq``.
    """
    x, y = x.double(), y.double()
    gram = x.T @ x + lam * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.lstsq(gram, x.T @ y).solution


def sylvester_ridge(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, lam: float) -> torch.Tensor:
    """``S`` solving ``A S + S B + λ S = C`` for symmetric positive semi-definite ``A`` and ``B``.

    These are the normal equations of ``min_S ‖S X − Y‖² + ‖Z S − W‖² + λ‖S‖²`` with
    ``A = ZᵀZ``, ``B = X Xᵀ``, ``C = Y Xᵀ + ZᵀW``: one transform fitted to two sets of equations at
    once. Diagonalising A and B turns it into an elementwise division (Bartels–Stewart for
    symmetric matrices); ``λ > 0`` keeps every denominator positive.
    """
    la, ua = torch.linalg.eigh(a.double())
    lb, ub = torch.linalg.eigh(b.double())
    rotated = ua.T @ c.double() @ ub
    return ua @ (rotated / (la[:, None] + lb[None, :] + lam)) @ ub.T

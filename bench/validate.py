"""`bench validate`: check a defense plugin on tiny models of every family, in seconds.

For each tiny family (BERT, HF CLIP vision, Llama with RoPE+GQA; open_clip's fused layout when its
package is installed): the defense runs on an expert θ_pre + τ (τ a small seeded perturbation) or
is reported N/A (features it needs are missing, or it declares `Defense.needs_data`; a defense that
reads task data without declaring it fails); the same seed gives the same
artifact; a function-preservation claim holds on probe inputs; a structure-changed release runs
through its variant. A family whose module cannot be built here (open_clip without its package) is
checked at the state level only and reported *unverified*, never ok: nothing ran its outputs.
A defense author runs this before `bench run`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bench.families.tiny import TINY_NAMES, tiny, tiny_inputs
from bench.no_data import NO_DATA_TASK, DataRequiredError, NoDataSuite
from bench.plugins import PRESERVATION_TOLERANCE, Defense, DefenseContext
from bench.registry import defenses
from bench.suite import Expert, MissingAssetError
from bench.weights import l2_distance

TASK_VECTOR_SCALE = 0.02
"""τ's size relative to each tensor's RMS (fine-tuning moves weights by a few percent)."""


@dataclass
class Check:
    family: str
    status: str
    """'ok', 'n/a', 'unverified' (the artifact was made but no module of this family could run it) or 'FAIL'."""
    detail: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)


def synthetic_expert(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in base.items():
        if v.is_floating_point():
            rms = float(v.pow(2).mean().sqrt()) or 1.0
            out[k] = v + TASK_VECTOR_SCALE * rms * torch.randn(v.shape, generator=g)
        else:
            out[k] = v
    return out


def _forward(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = module(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def validate_on(defense: Defense, name: str, seed: int = 0) -> Check:
    family, base = tiny(name, seed=seed)
    arch = family.arch_map()
    missing = arch.missing(defense.applies_to)
    if missing:
        return Check(name, "n/a", f"needs {', '.join(sorted(missing))}")
    if defense.needs_data:
        return Check(name, "n/a", "needs task data (check it with `bench run` on a suite)")
    expert = Expert(synthetic_expert(base, seed + 1), {})
    ctx = DefenseContext(suite=NoDataSuite(family, base, defense.name), task=NO_DATA_TASK, base=base, arch=arch,
                         family=family, seed=seed)
    try:
        art = defense.protect(expert, ctx)
    except DataRequiredError:
        return Check(name, "FAIL", f"reads task data but does not declare it; set needs_data = True on "
                                   f"{type(defense).__name__}")
    again = defense.protect(expert, ctx)
    numbers: dict[str, Any] = {"distance_expert": l2_distance(expert.body, base), "distance_artifact": l2_distance(art.state, base)}
    if art.content_hash() != again.content_hash():
        return Check(name, "FAIL", "the same seed gave two different artifacts", numbers)
    try:
        built = family.build(art)
    except MissingAssetError as exc:  # open_clip's module needs its optional package: no output was compared
        return Check(name, "unverified", f"state-level only, outputs not compared: {exc}", numbers)
    inputs = tiny_inputs(name, seed)
    ref = _forward(family.build(expert.body), inputs)
    diff = float((_forward(built, inputs) - ref).abs().max())
    numbers["max_abs_diff"] = diff
    tol = PRESERVATION_TOLERANCE * max(1.0, float(ref.abs().max()))
    if defense.function_preserving and diff > tol:
        return Check(name, "FAIL", f"claims function preservation but outputs differ by {diff:.3g} (tolerance {tol:.3g})", numbers)
    detail = "function preserved" if defense.function_preserving else f"outputs differ by {diff:.3g} (not claimed preserving)"
    if art.variant:
        detail += f"; runs as variant {art.variant!r}"
    return Check(name, "ok", detail, numbers)


def validate(defense_name: str, params: dict[str, str] | None = None, seed: int = 0) -> list[Check]:
    defense = defenses.get(defense_name).from_overrides(params)
    out = []
    for name in TINY_NAMES:
        try:
            out.append(validate_on(defense, name, seed))
        except Exception as exc:  # a plugin error is a failed check, reported with its message
            out.append(Check(name, "FAIL", f"{type(exc).__name__}: {exc}"))
    return out

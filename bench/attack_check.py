"""How far an attack moves a checkpoint: ``bench attack`` without ``--out``, the check anyone can run on their model.

An undo attack (realign, scale-division, anchor-align, revert-to-base, taylor-invert, ...) exists to
turn a protected release back into its expert. Given the *unprotected* expert it has nothing to
undo, so it must leave the expert as it is: an expert fine-tuned from θ_pre is already aligned with
θ_pre. `check_attack` runs the attack exactly as ``bench attack --out`` does
(`bench.attack_checkpoint.attack_checkpoint`, into a temporary directory) and reports the relative
change of the body:

* ``‖out − in‖ / ‖in − θ_pre‖``: in units of the input's own task vector (0 = untouched; 1 = moved
  as far as the whole fine-tune did);
* ``‖out − in‖ / ‖in‖``: relative to the weights themselves;
* the tensor that changed most (relative to its own norm), and how many tensors changed at all.

With ``merge`` (and partners) it also compares the attacked merge with the plain merge of the
input, ``‖M(out) − M(in)‖ / ‖M(in) − θ_pre‖``: the part of the attack that reaches a free-rider's model.
Norms run in float64 over the floating-point tensors of θ_pre's body (BatchNorm statistics
included), after the same float32 reading the attack itself gets.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.attack_checkpoint import attack_checkpoint
from bench.checkpoint_io import read_checkpoint, resolve_family, split_body
from bench.families.family import Family
from bench.weights import CheckpointError, StateDict, is_mergeable


@dataclass(frozen=True)
class BodyChange:
    """The distance between an attack's output and its input, with the two scales it is read against."""

    change: float
    """‖out − in‖ over the compared tensors."""
    task_vector: float
    """‖in − θ_pre‖: the input's distance from θ_pre."""
    weights: float
    """‖in‖."""
    tensors: int
    """Floating-point tensors compared (θ_pre's body keys present in both with θ_pre's shape)."""
    changed: int
    """Of those, how many differ at all."""
    largest: str
    """The tensor with the largest ‖out − in‖ / ‖in‖ ('' when none changed)."""
    largest_change: float
    """That tensor's ‖out − in‖ / ‖in‖."""

    @property
    def relative_to_task_vector(self) -> float:
        """``‖out − in‖ / ‖in − θ_pre‖`` (inf when the input is θ_pre itself and the output is not)."""
        return _ratio(self.change, self.task_vector)

    @property
    def relative_to_weights(self) -> float:
        """``‖out − in‖ / ‖in‖``."""
        return _ratio(self.change, self.weights)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "relative_to_task_vector": self.relative_to_task_vector,
                "relative_to_weights": self.relative_to_weights}


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else float("inf")


def body_change(out: Mapping[str, torch.Tensor], inp: Mapping[str, torch.Tensor],
                base: Mapping[str, torch.Tensor]) -> BodyChange:
    """How far ``out`` is from ``inp``, against ``‖inp − base‖`` and ``‖inp‖`` (float64, θ_pre's float tensors)."""
    keys = [k for k, v in base.items() if is_mergeable(v) and k in out and k in inp
            and tuple(out[k].shape) == tuple(v.shape) == tuple(inp[k].shape)]
    change = task = norm = 0.0
    changed, largest, largest_change = 0, "", 0.0
    for k in keys:
        a, b, c = out[k].double(), inp[k].double(), base[k].double()
        diff = float((a - b).pow(2).sum())
        weight = float(b.pow(2).sum())
        change += diff
        task += float((b - c).pow(2).sum())
        norm += weight
        if diff > 0:
            changed += 1
            relative = _ratio(diff**0.5, weight**0.5)
            if relative > largest_change:
                largest, largest_change = k, relative
    return BodyChange(change=change**0.5, task_vector=task**0.5, weights=norm**0.5, tensors=len(keys),
                      changed=changed, largest=largest, largest_change=largest_change)


def _body(path: str | os.PathLike, family: Family) -> StateDict:
    return split_body(read_checkpoint(path), family)[0]


def check_attack(attack: str | Sequence[str], artifact_path: str | os.PathLike, base_path: str | os.PathLike, *,
                 partners: Sequence[str | os.PathLike] = (), merge: str | None = None,
                 merge_params: Mapping[str, str] | None = None, params: Mapping[str, Mapping[str, str]] | None = None,
                 family: str | None = None, data: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Run ``attack`` on a checkpoint as ``bench attack`` does and measure how far the result is from the input.

    Returns ``{"attack", "notes", "body": BodyChange}`` and, with ``merge``, ``"merge"``: the attacked
    merge against the plain merge of the input with the same partners. Raises `CheckpointError` for a
    structure-changed input (a release whose body θ_pre's tensors do not describe): there the input
    is not a model to leave unchanged; run the attack with ``--out`` instead.
    """
    base_ckpt = read_checkpoint(base_path)
    try:
        fam = resolve_family(base_ckpt, family)
    except CheckpointError:  # θ_pre as a bare .safetensors file: the input's config.json names the family
        fam = resolve_family(read_checkpoint(artifact_path), family)
    base = split_body(base_ckpt, fam)[0]
    try:
        inp = _body(artifact_path, fam)
    except CheckpointError as exc:
        raise CheckpointError(f"{artifact_path} is not a standard {fam.name} checkpoint ({exc}); the check compares "
                              "an attack's output with a standard input, e.g. the unprotected expert") from exc
    common = dict(partners=partners, merge_params=merge_params, params=params, family=fam.name if family else None,
                  data=data, seed=seed)
    with tempfile.TemporaryDirectory(prefix="mergearena-attack-check-") as tmp:
        note = attack_checkpoint(attack, artifact_path, base_path, Path(tmp) / "out", merge=merge, **common)
        out = _body(Path(tmp) / "out", fam)
        result: dict[str, Any] = {"attack": note["attack"]["name"], "artifact": str(artifact_path), "base": str(base_path)}
        if merge is None:
            result["body"] = body_change(out, inp, base)
            return result
        # the input's own merge: the plain free-rider with the same partners, method and parameters
        attack_checkpoint("none", artifact_path, base_path, Path(tmp) / "plain", merge=merge, **common)
        plain = _body(Path(tmp) / "plain", fam)
        result["merge"] = body_change(out, plain, base)
        result["merge_method"] = merge
        return result


def report_lines(result: Mapping[str, Any]) -> list[str]:
    """The check's result as the lines `bench attack` prints."""
    lines = []
    for key, what in (("body", "the body"), ("merge", f"the {result.get('merge_method', '')} merge")):
        if key not in result:
            continue
        c: BodyChange = result[key]
        reference = "its input" if key == "body" else "the plain merge of the input (in)"
        scale = "the input's task vector" if key == "body" else "the plain merge's task vector"
        lines.append(f"{result['attack']} moved {what} away from {reference}:")
        lines.append(f"  ||out - in|| / ||in - base|| = {c.relative_to_task_vector:.3e}   (in units of {scale})")
        lines.append(f"  ||out - in|| / ||in||        = {c.relative_to_weights:.3e}")
        lines.append(f"  tensors changed: {c.changed} of {c.tensors}"
                     + (f"; most: {c.largest} ({c.largest_change:.2e} of its norm)" if c.changed else ""))
    return lines

"""Checkpoint-level protection for model owners: ``bench protect --defense D --model DIR --base DIR --out DIR``.

`protect_checkpoint` reads a fine-tuned checkpoint, which is a Hugging Face model directory (sharded
or not) or a ``.safetensors`` state dict, together with the θ_pre it was fine-tuned from. It applies
a defense to the checkpoint's body and writes the release in the same format. The body tensors are
replaced, keep their key prefix and dtype, and stay in their original shard files. Every other
tensor (a classifier, a text tower, a pooler) is copied unchanged. Config and tokenizer files are
copied. Pickled weights are never copied, because they would ship the unprotected model next to
the protected one. A release whose structure changed (a variant, such as a Taylor FFN) is one file,
``model.<variant>.safetensors``, so that transformers never mistakes it for the standard model. A
``protection.json`` note records the defense spec, the hashes of input and
output, the date and what changed.

Data. A defense that runs the model on task data (MergeGuard, the Taylor releases; those that declare
`Defense.needs_data`) takes it from ``data`` (`bench.checkpoint_data`: a JSONL file or
``suite:NAME/TASK``), with a linear head first fitted on the frozen body. A head the defense retrains
(MergeGuard stage 1) is written next to the body as ``head.safetensors``. Such a defense given no data
fails with a `DataRequiredError`, which names the ``--data`` forms.

Reading checkpoints is `bench.checkpoint_io`'s; this module writes the release and its note.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bench import __version__
from bench.artifact import Artifact
from bench.checkpoint_data import data_suite, fit_probe_head
from bench.checkpoint_io import (
    VARIANT_KEY,
    WEIGHT_SUFFIXES,
    Checkpoint,
    check_out_parent,
    copy_side_files,
    read_checkpoint,
    resolve_family,
    split_body,
)
from bench.families.family import Family
from bench.no_data import data_required
from bench.plugins import Defense, DefenseContext
from bench.registry import defenses
from bench.store import strict_json
from bench.suite import Expert
from bench.weights import (
    CheckpointError,
    StateDict,
    assert_finite,
    check_compatible,
    is_mergeable,
    save_state,
    state_hash,
)

# ---------------------------------------------------------------- writing


def _prepare_out(out: Path, sources: list[Path]) -> None:
    check_out_parent(out)
    resolved = out.resolve()
    for src in sources:
        if resolved == src.resolve():
            raise ValueError(f"--out {out} is an input checkpoint; write the protected model somewhere else")
    if out.is_dir():
        weights = [f for f in out.iterdir() if f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json")]
        if weights and not (out / "protection.json").is_file():
            raise ValueError(f"--out {out} already holds model weights ({weights[0].name}); choose an empty directory")
        for f in weights:  # a previous protection's files, replaced now
            f.unlink()


def write_release(checkpoint: Checkpoint, tensors: StateDict, out: Path, variant: str | None) -> list[Path]:
    """Write ``tensors`` in the checkpoint's layout: same shard files (directory) or one file."""

    def meta(name: str) -> dict[str, str]:
        m = {**checkpoint.metadata.get(name, {}), "format": "pt"}
        if variant:
            m[VARIANT_KEY] = variant
        return m

    if variant:
        # The standard module cannot run this release: one file, never named like a transformers checkpoint.
        target = out if out.suffix == ".safetensors" else out / f"model.{variant}.safetensors"
        save_state(_unshare(tensors), target, meta(next(iter(checkpoint.metadata), "")))
        return [target]
    if out.suffix == ".safetensors":
        save_state(_unshare(tensors), out, meta(next(iter(checkpoint.metadata), "")))
        return [out]
    shards: dict[str, StateDict] = {}
    for k, v in tensors.items():
        shards.setdefault(
            checkpoint.files.get(k, "model.safetensors") if checkpoint.is_dir else "model.safetensors", {}
        )[k] = v
    written = []
    for name, shard in shards.items():
        save_state(_unshare(shard), out / name, meta(name))
        written.append(out / name)
    return written


def _unshare(tensors: StateDict) -> StateDict:
    """Clone tensors that share storage with an earlier one (safetensors refuses shared tensors)."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        if ptr != -1:
            seen.add(ptr)
    return out


# ---------------------------------------------------------------- the protection


def protect_checkpoint(
    defense_name: str,
    model_path: str | os.PathLike,
    base_path: str | os.PathLike,
    out_path: str | os.PathLike,
    params: Mapping[str, Any] | None = None,
    family: str | Family | None = None,
    data: str | os.PathLike | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Protect the checkpoint at ``model_path`` (fine-tuned from ``base_path``) and write it to ``out_path``.

    Returns the note also written as ``protection.json`` (beside a ``.safetensors`` output, as
    ``<name>.protection.json``).
    """
    defense: Defense = defenses.get(defense_name).from_overrides(params or {})
    model_path, base_path, out = Path(model_path), Path(base_path), Path(out_path)
    _prepare_out(out, [model_path, base_path])

    checkpoint = read_checkpoint(model_path)
    assert_finite(checkpoint.tensors, f"model {model_path}")
    fam = resolve_family(checkpoint, family)
    body, prefix = split_body(checkpoint, fam)
    base_checkpoint = read_checkpoint(base_path)
    assert_finite(base_checkpoint.tensors, f"base {base_path}")
    base, _ = split_body(base_checkpoint, fam)
    check_compatible(base, body, what=f"{model_path} (its body)")

    if data is None and defense.needs_data:
        raise data_required(defense_name)
    suite, task, data_note = data_suite(data, defense_name, fam, base, body, model_path)
    head = fit_probe_head(suite, task, body, seed=seed) if data is not None else {}
    ctx = DefenseContext(suite=suite, task=task, base=base, arch=fam.arch_map(), family=fam, seed=seed)
    artifact = defense.protect(Expert(body=body, head=head), ctx)
    assert_finite(artifact.state, f"the {defense_name} artifact")
    assert_finite(artifact.head or {}, f"the {defense_name} artifact's head")

    released = _released_tensors(checkpoint, body, artifact, prefix)
    if out.suffix != ".safetensors":
        out.mkdir(parents=True, exist_ok=True)
    files = write_release(checkpoint, released, out, artifact.variant)
    side = copy_side_files(model_path, out) if model_path.is_dir() and out.suffix != ".safetensors" else []
    head_file = None
    if artifact.head is not None:
        head_file = out.with_suffix(".head.safetensors") if out.suffix == ".safetensors" else out / "head.safetensors"
        save_state(artifact.head, head_file, {"mergearena.defense": defense_name, "mergearena.data": data_note})

    note = _note(
        defense,
        checkpoint,
        base_checkpoint,
        body,
        artifact,
        released,
        prefix,
        fam,
        data_note,
        seed,
        files,
        side,
        head_file,
    )
    note_path = out.with_suffix(".protection.json") if out.suffix == ".safetensors" else out / "protection.json"
    tmp = note_path.with_name(note_path.name + ".tmp")
    tmp.write_text(strict_json(note, indent=1, sort_keys=True))
    os.replace(tmp, note_path)
    return note


def _released_tensors(checkpoint: Checkpoint, body: StateDict, artifact: Artifact, prefix: str) -> StateDict:
    """The checkpoint with its body replaced by the artifact's (original key prefix and dtypes).

    Body tensors the artifact lacks are dropped, never copied from the input: a variant replaces
    them with its own, and shipping the originals would ship the unprotected weights.
    """
    missing = sorted(set(body) - set(artifact.state))
    if missing and not artifact.variant:
        raise CheckpointError(f"the defense's artifact lacks {len(missing)} body tensor(s), e.g. {missing[:3]}")
    out = {k: v for k, v in checkpoint.tensors.items() if not (k.startswith(prefix) and k[len(prefix) :] in body)}
    for k, v in artifact.state.items():
        original = checkpoint.tensors.get(prefix + k)
        out[prefix + k] = v.to(original.dtype) if original is not None else v
    return out


def _note(
    defense: Defense,
    checkpoint: Checkpoint,
    base: Checkpoint,
    body: StateDict,
    artifact: Artifact,
    released: StateDict,
    prefix: str,
    family: Family,
    data_note: str,
    seed: int,
    files: list[Path],
    side: list[str],
    head_file: Path | None,
) -> dict[str, Any]:
    kept = [k for k in body if k in artifact.state and artifact.state[k].shape == body[k].shape]
    changed = [k for k in kept if not torch.equal(artifact.state[k].to(body[k].dtype), body[k])]
    removed = sorted(set(body) - set(artifact.state))
    added = sorted(set(artifact.state) - set(body))
    num = sum(
        float((artifact.state[k].double() - body[k].double()).pow(2).sum()) for k in changed if is_mergeable(body[k])
    )
    den = sum(float(body[k].double().pow(2).sum()) for k in kept if is_mergeable(body[k]))
    relative = (num / den) ** 0.5 if den else 0.0
    what = f"{defense.name} changed {len(changed)} of {len(body)} body tensors (relative L2 change {relative:.4g}); "
    if artifact.variant:
        what += (
            f"replaced {len(removed)} by {len(added)} tensors of variant {artifact.variant!r}, "
            "which runs only through MergeArena's variant module"
        )
    else:
        what += "structure unchanged, loads like the input"
    if head_file is not None:
        what += f"; the defense retrained the task head, released as {head_file.name}"
    return {
        "defense": defense.name,
        "spec": defense.spec(),
        "what": what,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mergearena_version": __version__,
        "seed": seed,
        "family": family.name,
        "key_prefix": prefix,
        "data": data_note,
        "input": str(checkpoint.path),
        "input_hash": state_hash(checkpoint.tensors),
        "base": str(base.path),
        "base_hash": state_hash(base.tensors),
        "output": [str(f) for f in files],
        "output_hash": state_hash(released),
        "head_file": str(head_file) if head_file else None,
        "copied_files": side,
        "changed_tensors": changed,
        "removed_tensors": removed,
        "added_tensors": added,
        "relative_l2_change": relative,
        "variant": artifact.variant,
        "loadable_by_transformers": artifact.variant is None and "config.json" in side,
        "defense_notes": artifact.notes,
    }

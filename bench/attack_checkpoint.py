"""Attacks on released checkpoints, outside any suite: ``bench attack`` for researchers.

``attack_checkpoint`` reads a released artifact (a Hugging Face directory or ``.safetensors`` file,
standard or structure-changed — a variant release carries its tag in the file metadata written by
`bench protect`), θ_pre and optional partner checkpoints, runs the attack (several names run in
order, as a composite) and writes either the recovered standard checkpoint or, with ``merge``, the
merged one, in the artifact's layout with its config and tokenizer files. Attacks that need
labelled data take it from ``data`` in the forms `bench protect` accepts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.artifact import Artifact
from bench.checkpoint_data import data_suite, fit_probe_head
from bench.checkpoint_io import (
    Checkpoint,
    check_out_parent,
    copy_side_files,
    read_checkpoint,
    release_variant,
    resolve_family,
    split_body,
    write_sharded,
)
from bench.families.family import Family
from bench.no_data import NO_DATA_TASK
from bench.plan import make_attacks, make_merge
from bench.plugins import Attack, AttackContext, CompositeAttack
from bench.runner import peak_rss_mb
from bench.store import strict_json
from bench.weights import CheckpointError, StateDict, assert_finite, is_mergeable, state_hash


def _artifact_body(ckpt: Checkpoint, family: Family, base: StateDict, variant: str | None) -> tuple[StateDict, str]:
    """The released body keyed by body key, and its key prefix; a variant keeps its own tensors too."""
    if variant is None:
        return split_body(ckpt, family)
    candidates = sorted({k[: len(k) - len(b)] for k in ckpt.tensors for b in base if k.endswith(b)}, key=len)
    layer_prefixes = [lay.prefix for lay in family.arch_map().layers if lay.prefix]
    for prefix in candidates:
        body = {k[len(prefix):]: v.float() if is_mergeable(v) else v for k, v in ckpt.tensors.items()
                if k.startswith(prefix) and (k[len(prefix):] in base or any(k[len(prefix):].startswith(p) for p in layer_prefixes))}
        if body and any(k in base for k in body):
            return body, prefix
    raise CheckpointError(f"{ckpt.path}: no {family.name} body found in the release")


def attack_checkpoint(attack: str | Sequence[str], artifact_path: str | os.PathLike, base_path: str | os.PathLike,
                      out_path: str | os.PathLike, *, partners: Sequence[str | os.PathLike] = (), merge: str | None = None,
                      merge_params: Mapping[str, str] | None = None, params: Mapping[str, Mapping[str, str]] | None = None,
                      family: str | None = None, data: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Run ``attack`` on a released checkpoint; returns (and writes as ``attack.json``) a note with its cost."""
    names = [attack] if isinstance(attack, str) else list(attack)
    steps = [make_attacks(n, params)[0] for n in names]
    atk: Attack = steps[0] if len(steps) == 1 else CompositeAttack(steps)
    out = Path(out_path)
    check_out_parent(out)
    art_ckpt = read_checkpoint(artifact_path)
    assert_finite(art_ckpt.tensors, f"artifact {artifact_path}")
    base_ckpt = read_checkpoint(base_path)
    assert_finite(base_ckpt.tensors, f"base {base_path}")
    try:
        fam = resolve_family(base_ckpt, family)
    except CheckpointError:  # θ_pre given as a bare .safetensors file: the release's config.json says the family
        fam = resolve_family(art_ckpt, family)
    base, _ = split_body(base_ckpt, fam)
    variant = release_variant(art_ckpt)
    body, prefix = _artifact_body(art_ckpt, fam, base, variant)
    partner_bodies = [split_body(read_checkpoint(p), fam)[0] for p in partners]
    needs = atk.needs()
    if variant and not atk.restores_structure:
        raise CheckpointError(f"the release is a {variant!r} variant; attack {atk.name!r} cannot restore the standard structure "
                              "(use revert-to-base or taylor-invert first)")
    if merge is None and atk.has_finish():
        raise ValueError(f"attack {atk.name!r} acts after the merge; pass --merge (and --partner) to run it")
    suite, task = None, NO_DATA_TASK
    if needs.labelled or needs.unlabelled or needs.finetune_steps:
        suite, task, _ = data_suite(data, atk.name, fam, base, {k: v for k, v in body.items() if k in base} if variant else body,
                                    Path(artifact_path))
    merge_choice = make_merge(merge, merge_params) if merge else None
    if merge_choice and not merge_choice.method.tensorwise and merge_choice.method.needs_data:
        raise ValueError(f"merge method {merge!r} learns its coefficients on task data; use it through `bench run`")
    ctx = AttackContext(suite=suite, victim=task, partners=tuple(str(p) for p in partners), base=base, arch=fam.arch_map(),
                        family=fam, artifact=Artifact(body, variant=variant), partner_bodies=partner_bodies,
                        merge_name=merge or "", merge_params=merge_choice.spec()["params"] if merge_choice else {}, seed=seed)
    rss0, t0 = peak_rss_mb(), time.time()
    prepared = atk.prepare(ctx.artifact, ctx)
    timings = {"prepare": round(time.time() - t0, 3)}
    if prepared.variant is not None:
        raise CheckpointError(f"attack {atk.name!r} left a {prepared.variant!r} release; it cannot be written as a standard checkpoint")
    result = prepared.state
    if merge_choice is not None:
        t0 = time.time()
        result = merge_choice.method.merge(base, [result, *partner_bodies], merge_choice.params, seed=seed)
        timings["merge"] = round(time.time() - t0, 3)
        if suite is not None:
            ctx.victim_head = fit_probe_head(suite, task, result, seed=seed)
        t0 = time.time()
        result = atk.finish(result, ctx)
        timings["finish"] = round(time.time() - t0, 3)
    assert_finite(result, "the attacked model" if merge_choice is None else "the attacked merge")
    # The output: the artifact checkpoint's non-body tensors, the attacked body under the original prefix.
    body_keys = {prefix + k for k in body}
    tensors: StateDict = {k: v for k, v in art_ckpt.tensors.items() if k not in body_keys}
    tensors.update({prefix + k: v.to(base_ckpt.tensors[k].dtype) if k in base_ckpt.tensors else v for k, v in result.items()})
    if out.suffix != ".safetensors":
        out.mkdir(parents=True, exist_ok=True)
    write_sharded(tensors.items(), out, metadata={"mergearena.attack": atk.name})
    if Path(artifact_path).is_dir() and out.suffix != ".safetensors":
        copy_side_files(Path(artifact_path), out, shard_index=False)
    note = {"attack": atk.spec(), "merge": merge_choice.spec() if merge_choice else None, "artifact": str(artifact_path),
            "artifact_variant": variant, "base": str(base_path), "partners": [str(p) for p in partners],
            "artifact_hash": state_hash(body), "output_hash": state_hash(result), "seed": seed,
            "cost": {"seconds": timings, "peak_rss_mb_delta": round(peak_rss_mb() - rss0, 1)}}
    note_path = out.with_suffix(".attack.json") if out.suffix == ".safetensors" else out / "attack.json"
    note_path.write_text(strict_json(note, indent=1, sort_keys=True))
    return note

"""Checkpoints on disk: Hugging Face directories (sharded or not) or ``.safetensors`` files.

Reading (`read_checkpoint`, `resolve_family`, `split_body`): every tensor with the shard it came
from, the family its ``config.json`` describes, and the body of that family under its key prefix;
what `bench protect` and `bench attack` start from. A structure-changed release carries its variant
in each file's metadata under `VARIANT_KEY` (`release_variant`).

Merging (`merge_checkpoints`, for `bench merge`): read lazily and merged tensor by tensor (a large
tensor in row blocks), each block written straight to its place in the output shards, so peak
memory is a few blocks rather than a few models or a shard (`bench.outofcore`; mergekit's
out-of-core pattern, without its whole-shard buffer).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.families.family import Family
from bench.families.hf import body_shapes, detect_family, select_body
from bench.outofcore import BLOCK_ELEMENTS, Block, ShardWriter, output_layout, tensorwise_blocks
from bench.params import params_dict
from bench.registry import merges
from bench.weights import (
    CheckpointError,
    FiniteChecked,
    StateDict,
    check_finite_tensor,
    is_mergeable,
    load_state,
    open_checkpoint,
    quick_finite,
    read_metadata,
    save_state,
)

SHARD_BYTES = 2 * 1024**3
VARIANT_KEY = "mergearena.variant"
"""Safetensors metadata key of a structure-changed release: the name of the variant that runs it."""


# ---------------------------------------------------------------- reading checkpoints


@dataclass
class Checkpoint:
    """A checkpoint read into memory: every tensor, the file each came from, and each file's metadata."""

    path: Path
    tensors: StateDict
    files: dict[str, str]
    """Tensor name -> name of the safetensors file that holds it."""
    metadata: dict[str, dict[str, str]]
    """File name -> that file's safetensors metadata."""

    @property
    def is_dir(self) -> bool:
        return self.path.is_dir()


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Every tensor of a Hugging Face directory or a ``.safetensors`` file, with its shard of origin."""
    path = Path(path)
    open_checkpoint(path)  # one clear error for a missing path, pickled-only weights or a corrupt file
    shards = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    tensors: StateDict = {}
    files: dict[str, str] = {}
    metadata: dict[str, dict[str, str]] = {}
    for shard in shards:
        part = load_state(shard)
        tensors.update(part)
        files.update(dict.fromkeys(part, shard.name))
        metadata[shard.name] = read_metadata(shard)
    return Checkpoint(path, tensors, files, metadata)


def release_variant(checkpoint: Checkpoint) -> str | None:
    """The variant a release's files are tagged with (`VARIANT_KEY`), or None for a standard checkpoint."""
    tags = {m.get(VARIANT_KEY) for m in checkpoint.metadata.values()} - {None}
    if len(tags) > 1:
        raise CheckpointError(f"{checkpoint.path}: files disagree on the release variant ({', '.join(sorted(tags))})")
    return next(iter(tags), None)


def resolve_family(checkpoint: Checkpoint, family: str | Family | None) -> Family:
    """The checkpoint's family: given as an object, or detected from its ``config.json`` (checked against a given name)."""
    if isinstance(family, Family):
        return family
    config = _config_path(checkpoint.path)
    if config is None:
        raise CheckpointError(
            f"{checkpoint.path}: no config.json to read the architecture from; pass a Hugging Face model directory "
            "or put the model's config.json beside the .safetensors file"
        )
    detected, _ = detect_family(config)
    if family is not None and family != detected.name:
        raise CheckpointError(f"{config} describes a {detected.name!r} model, not {family!r}; drop --family or fix it")
    return detected


def _config_path(path: Path) -> Path | None:
    config = path / "config.json" if path.is_dir() else path.parent / "config.json"
    return config if config.is_file() else None


def body_prefix(keys: Mapping[str, Any], family: Family) -> str:
    """The key prefix under which ``family``'s body sits in a checkpoint (``""``, ``"bert."``, ...)."""
    body = sorted(body_shapes(family), key=len, reverse=True)
    probe = body[0]
    candidates = sorted({k[: len(k) - len(probe)] for k in keys if k.endswith(probe)}, key=len)
    for prefix in candidates:
        if all(prefix + k in keys for k in body):
            return prefix
    raise CheckpointError(
        f"checkpoint does not hold a {family.name} body of this configuration (no tensor named like {probe!r})"
    )


def split_body(checkpoint: Checkpoint, family: Family) -> tuple[StateDict, str]:
    """(body keyed by body key, in float32 where floating, key prefix)."""
    prefix = body_prefix(checkpoint.tensors, family)
    body = select_body(checkpoint.tensors, family, prefix)
    return {k: v.float() if is_mergeable(v) else v for k, v in body.items()}, prefix


# ---------------------------------------------------------------- writing checkpoints


def write_sharded(tensors: Iterable[tuple[str, torch.Tensor]], out: str | os.PathLike, *, shard_bytes: int = SHARD_BYTES,
                  metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``(name, tensor)`` pairs as one ``.safetensors`` file (``out`` ends in .safetensors) or as
    HF shards plus ``model.safetensors.index.json`` in directory ``out``."""
    out = Path(out)
    if out.suffix == ".safetensors":
        save_state(dict(tensors), out, metadata)
        return out
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    written: list[tuple[str, list[str]]] = []

    def flush(final: bool) -> None:
        nonlocal size
        if shards[-1]:
            name = f"model-{len(written) + 1:05d}.safetensors"
            save_state(shards[-1], out / name, metadata)
            written.append((name, list(shards[-1])))
            shards[-1] = {}
            size = 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            flush(False)
        shards[-1][name] = t
        size += nbytes
    flush(True)
    total = len(written)
    if total == 1:
        os.replace(out / written[0][0], out / "model.safetensors")
        return out
    index: dict[str, Any] = {"metadata": dict(metadata or {}), "weight_map": {}}
    for i, (name, keys) in enumerate(written, 1):
        final = f"model-{i:05d}-of-{total:05d}.safetensors"
        os.replace(out / name, out / final)
        index["weight_map"].update({k: final for k in keys})
    (out / SHARD_INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))
    return out


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".pkl")
MERGE_NOTE = "merge.json"
_NOTES = ("protection.json", "attack.json", MERGE_NOTE)
SHARD_INDEX = "model.safetensors.index.json"


def copy_side_files(src: Path, out: Path, *, shard_index: bool = True) -> list[str]:
    """Config, tokenizer and other small files of an HF directory, never weights (pickled or not).

    ``shard_index=False`` leaves out the shard index, for outputs whose shards are laid out anew.
    """
    copied = []
    for f in sorted(Path(src).iterdir()):
        if not f.is_file() or f.suffix in WEIGHT_SUFFIXES or f.name in _NOTES or (f.name == SHARD_INDEX and not shard_index):
            continue
        shutil.copy2(f, Path(out) / f.name)
        copied.append(f.name)
    return copied


# ---------------------------------------------------------------- output paths


def check_out_parent(out: Path) -> None:
    """Raise `ValueError` when ``out`` cannot be created because a parent of it is not a directory."""
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {out}: {parent} is a file, not a directory")
            return


def _written_by_merge(path: Path) -> bool:
    try:
        return "mergearena.method" in read_metadata(path)
    except Exception:
        return False


def check_merge_out(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an ``--out`` that is (or holds) an input, or that holds anything a previous `bench merge`
    did not write (a directory is recognised by its `MERGE_NOTE`, a file by its safetensors metadata)."""
    check_out_parent(out)
    resolved = out.resolve()
    for src in inputs:
        if src.resolve() == resolved or resolved in src.resolve().parents:
            raise ValueError(f"--out {out} is the input {src} or holds it; write the merge somewhere else")
    if not out.exists():
        return
    if out.suffix == ".safetensors":
        if not out.is_file() or not _written_by_merge(out):
            raise ValueError(f"--out {out} exists and was not written by bench merge; remove it or choose another path")
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a new directory or a path ending in .safetensors")
    present = sorted(f.name for f in out.iterdir())
    if not present:
        return
    try:
        listed = set(json.loads((out / MERGE_NOTE).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()
    stray = [name for name in present if name not in listed and name != MERGE_NOTE]
    if stray or not listed:
        raise ValueError(f"--out {out} holds files bench merge did not write (e.g. {(stray or present)[0]}); "
                         "choose a new or empty directory")


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A temporary path beside ``out`` to write to; moved into place (replacing a previous output) only
    when the block completes, removed, with any parent directory it created, when it fails."""
    created = [p for p in reversed(out.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    if out.suffix == ".safetensors":
        tmp = out.with_name(f".{out.stem}.partial-{tag}{out.suffix}")
    else:
        tmp = out.with_name(f".{out.name}.partial-{tag}")
    try:
        yield tmp
        if tmp.is_dir() and out.is_dir():
            old = out.with_name(f".{out.name}.old-{tag}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        for parent in reversed(created):
            try:
                parent.rmdir()
            except OSError:
                break
        raise


# ---------------------------------------------------------------- bench merge


def refusal_reason(method: Any) -> str:
    """Why `bench merge` cannot run ``method`` on checkpoints alone: what it needs that a checkpoint merge lacks."""
    name = method.name
    if getattr(method, "labelled_param", ""):
        return (f"merge method {name!r} tunes its coefficients on labelled samples of a victim task "
                f"(parameter {method.labelled_param!r}), which checkpoints alone do not provide; run it through "
                f"`bench run --merge {name}` on a suite")
    if method.needs_data:
        return (f"merge method {name!r} learns its coefficients by running the merged model on unlabelled inputs "
                f"of the merged tasks, which checkpoints alone do not provide; run it through `bench run --merge {name}` "
                "on a suite")
    return (f"merge method {name!r} merges whole models in memory and has no out-of-core form; call its "
            "MergeMethod.merge on loaded state dicts")


def merged_blocks(method: Any) -> Callable[..., Iterator[Block]]:
    """``blocks(base, experts, params, *, seed, block_elements)`` of a method `bench merge` can stream, else
    `CheckpointError` with the reason it cannot."""
    if method.tensorwise:
        return functools.partial(tensorwise_blocks, method)
    stream = getattr(method.fn, "model_blocks", None)
    if stream is None:
        raise CheckpointError(refusal_reason(method))
    return stream


def merge_checkpoints(method_name: str, base: str, models: list[str], out: str, params: Mapping[str, str],
                      seed: int = 0, *, shard_bytes: int = SHARD_BYTES, block_elements: int = BLOCK_ELEMENTS) -> Path:
    """Merge ``models`` onto ``base`` and write the result, out of core (`bench.outofcore`).

    Tensor-wise methods merge tensor by tensor, a large tensor in row blocks of ``block_elements``
    entries; ``ties-global`` first passes over the model for its global thresholds. Each merged block
    is written at once at its place in the output (one ``.safetensors`` file when ``out`` ends in it,
    else shards of at most ``shard_bytes``), so what is held is a few blocks, whatever the model size.

    The output appears only when complete (written beside it, then renamed into place); an ``out`` that
    is an input or holds files a previous merge did not write is refused, and every input and merged
    tensor must be finite (a NaN or Inf names its tensor and writes nothing).
    """
    method = merges.get(method_name)
    blocks_of = merged_blocks(method)
    parsed = method.parse(params)
    out_path = Path(out)
    check_merge_out(out_path, [Path(base), *map(Path, models)])
    base_sd = FiniteChecked(open_checkpoint(base), f"base {base}")
    experts = [FiniteChecked(open_checkpoint(m), f"model {m}") for m in models]
    for path, e in zip(models, experts):
        missing = [k for k in base_sd if k not in e]
        if missing:
            raise CheckpointError(f"{path} lacks {len(missing)} tensor(s) of the base, e.g. {missing[:3]}")
    meta = {"mergearena.method": method_name, "mergearena.params": json.dumps(method.spec(parsed)["params"], sort_keys=True)}
    blocks = blocks_of(base_sd, experts, params_dict(parsed), seed=seed, block_elements=block_elements)
    with staged_output(out_path) as tmp:
        with ShardWriter(tmp, output_layout(base_sd), shard_bytes=shard_bytes, metadata=meta) as writer:
            for name, start, block in blocks:
                if not quick_finite(block):
                    check_finite_tensor(name, block, "the merged model")
                writer.write(name, start, block)
        src = Path(models[0]) if Path(models[0]).is_dir() else Path(base)
        if tmp.is_dir():
            if src.is_dir():
                copy_side_files(src, tmp, shard_index=False)
            note = {"method": method.spec(parsed), "seed": seed, "base": str(base), "models": [str(m) for m in models],
                    "files": sorted(f.name for f in tmp.iterdir())}
            (tmp / MERGE_NOTE).write_text(json.dumps(note, indent=1, sort_keys=True, allow_nan=False))
    return out_path

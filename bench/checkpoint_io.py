"""Checkpoint-level merging for `bench merge`: Hugging Face directories or `.safetensors` files,
read lazily and merged tensor by tensor, written in shards, so peak memory is a shard plus a few
tensors rather than a few models (mergekit's out-of-core pattern)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from bench.registry import merges
from bench.weights import CheckpointError, open_checkpoint, save_state

SHARD_BYTES = 2 * 1024**3


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
_NOTES = ("protection.json", "attack.json")
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


def merge_checkpoints(method_name: str, base: str, models: list[str], out: str, params: Mapping[str, str],
                      seed: int = 0, *, shard_bytes: int = SHARD_BYTES) -> Path:
    """Merge ``models`` onto ``base`` with a tensor-wise method and write the result (shards of at most
    ``shard_bytes`` when ``out`` is a directory: the shard being filled is the largest buffer held)."""
    method = merges.get(method_name)
    if not method.tensorwise:
        raise CheckpointError(f"merge method {method_name!r} learns its coefficients on task data; use it through `bench run`")
    parsed = method.parse(params)
    base_sd = open_checkpoint(base)
    experts = [open_checkpoint(m) for m in models]
    for path, e in zip(models, experts):
        missing = [k for k in base_sd if k not in e]
        if missing:
            raise CheckpointError(f"{path} lacks {len(missing)} tensor(s) of the base, e.g. {missing[:3]}")
    meta = {"mergearena.method": method_name, "mergearena.params": json.dumps(method.spec(parsed)["params"], sort_keys=True)}
    result = write_sharded(method.merge_iter(base_sd, experts, parsed, seed=seed), out, shard_bytes=shard_bytes,
                           metadata=meta)
    src = Path(models[0]) if Path(models[0]).is_dir() else Path(base)
    if src.is_dir() and Path(out).suffix != ".safetensors":
        copy_side_files(src, Path(out), shard_index=False)
    return result

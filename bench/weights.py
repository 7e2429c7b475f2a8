"""State-dict algebra, task vectors, content hashing and safetensors I/O.

A *state dict* here is a plain ``dict[str, torch.Tensor]`` of the merged body of a model (task
heads live outside it). Floating-point tensors take part in arithmetic; integer buffers (BatchNorm
``num_batches_tracked``, position ids) are carried over from the base unchanged, as the task-vector
code of PaRaMS and the anchor-guided attack does.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

StateDict = dict[str, torch.Tensor]


class CheckpointError(Exception):
    """A checkpoint is missing, corrupt, or does not match what it is combined with."""


def is_mergeable(t: torch.Tensor) -> bool:
    """Whether a tensor takes part in weight arithmetic (floating point only)."""
    return t.is_floating_point()


def task_vector(expert: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> StateDict:
    """τ = θ_expert − θ_base over the mergeable tensors both share."""
    check_compatible(base, expert)
    return {k: expert[k] - base[k] for k in base if is_mergeable(base[k])}


def apply_task_vector(base: Mapping[str, torch.Tensor], tv: Mapping[str, torch.Tensor], scale: float = 1.0) -> StateDict:
    """θ_base + scale·τ; tensors τ lacks are copied from the base."""
    return {k: (v + scale * tv[k]) if k in tv else v.clone() for k, v in base.items()}


def check_compatible(base: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Raise `CheckpointError` unless ``other`` has exactly the base's tensor names and shapes."""
    missing = sorted(set(base) - set(other))
    extra = sorted(set(other) - set(base))
    if missing or extra:
        raise CheckpointError(
            f"{what} does not match the base: {len(missing)} tensor(s) missing (e.g. {missing[:3]}), "
            f"{len(extra)} unexpected (e.g. {extra[:3]})"
        )
    bad = [k for k in base if tuple(base[k].shape) != tuple(other[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"{what} does not match the base: {len(bad)} tensor(s) differ in shape, e.g. {k!r} "
            f"{tuple(other[k].shape)} vs base {tuple(base[k].shape)}"
        )


def clone(state: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v.detach().clone() for k, v in state.items()}


def l2_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Euclidean distance over the mergeable tensors both share."""
    total = 0.0
    for k, v in a.items():
        if k in b and is_mergeable(v) and v.shape == b[k].shape:
            total += float((v.double() - b[k].to(v.device).double()).pow(2).sum())
    return total**0.5


# ---------------------------------------------------------------- hashing

def tensor_digest(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def state_hash(state: Mapping[str, torch.Tensor]) -> str:
    """Content hash of a state dict: names, dtypes, shapes and bytes, independent of dict order."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode() + b"\0")
        h.update(tensor_digest(state[k]))
    return h.hexdigest()


def hash_json(obj: object) -> str:
    """Hash of a JSON-serialisable object with sorted keys (plugin params, stage keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------- I/O

def save_state(state: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temporary file + rename): a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=dict(metadata or {}))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_state(path: str | os.PathLike) -> StateDict:
    """Read a safetensors file; a corrupt or missing one raises `CheckpointError` with its path."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from exc


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A read-only view over one or more safetensors files that loads one tensor at a time.

    Merging large checkpoints through this keeps peak memory at a few tensors, not a few models
    (the out-of-core pattern of mergekit's lazy tensor loader).
    """

    def __init__(self, files: Iterable[str | os.PathLike]) -> None:
        self._where: dict[str, str] = {}
        for f in files:
            f = str(f)
            try:
                with safe_open(f, framework="pt") as handle:
                    for k in handle.keys():
                        self._where[k] = f
            except Exception as exc:
                raise CheckpointError(f"cannot read {f} as safetensors: {exc}") from exc
        if not self._where:
            raise CheckpointError("no tensors found in " + ", ".join(map(str, files)))

    def __getitem__(self, key: str) -> torch.Tensor:
        with safe_open(self._where[key], framework="pt") as handle:
            return handle.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(self._where[key], framework="pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def open_checkpoint(path: str | os.PathLike) -> LazyStateDict:
    """A `.safetensors` file or a Hugging Face model directory (sharded or not), read lazily."""
    path = Path(path)
    if path.is_file():
        return LazyStateDict([path])
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if files:
            return LazyStateDict(files)
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise CheckpointError(f"{path} holds only pickled weights; convert them to safetensors first (pickles are never loaded)")
        raise CheckpointError(f"{path} contains no .safetensors file")
    raise CheckpointError(f"checkpoint not found: {path}")

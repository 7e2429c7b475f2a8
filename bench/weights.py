"""State-dict algebra, task vectors, content hashing and safetensors I/O.

A *state dict* here is a plain ``dict[str, torch.Tensor]`` of the merged body of a model (task
heads live outside it). Floating-point tensors take part in arithmetic; integer buffers (BatchNorm
``num_batches_tracked``, position ids) are carried over from the base unchanged, as the task-vector
code of PaRaMS and the anchor-guided attack does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

StateDict = dict[str, torch.Tensor]


class CheckpointError(Exception):
    """A checkpoint is missing, corrupt, or does not match what it is combined with."""


class NonFiniteError(CheckpointError):
    """A state dict holds NaN or Inf: weights that would poison every number computed from them."""


class CorruptFileError(CheckpointError):
    """A cached safetensors file is unreadable or no longer matches the hash recorded when it was written."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def is_mergeable(t: torch.Tensor) -> bool:
    """Whether a tensor takes part in weight arithmetic (floating point only)."""
    return t.is_floating_point()


def task_vector(expert: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> StateDict:
    """τ = θ_expert − θ_base over the mergeable tensors both share."""
    check_compatible(base, expert)
    return {k: expert[k] - base[k] for k in base if is_mergeable(base[k])}


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


def check_finite_tensor(name: str, t: torch.Tensor, what: str) -> None:
    """Raise `NonFiniteError` naming ``name`` when the floating-point tensor ``t`` holds NaN or Inf."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise NonFiniteError(f"{what} has non-finite weights: tensor {name!r} holds {kind}")


def assert_finite(state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise `NonFiniteError` naming the first tensor of ``state`` that holds NaN or Inf (``what`` names
    the state in the message: "the merged model", "expert t10"); integer tensors are never non-finite."""
    for name in state:
        check_finite_tensor(name, state[name], what)


def quick_finite(t: torch.Tensor) -> bool:
    """True when the floating-point tensor ``t`` surely holds no NaN or Inf: its sum (or min and max) is finite.

    One pass and no temporary (``isfinite`` makes a few copies of its input): a NaN or an Inf makes
    the sum, the min or the max non-finite. False can also mean a sum too large for its dtype (a
    sign something is off); follow it with `check_finite_tensor`, which decides and names the tensor.
    """
    if not t.is_floating_point() or not t.numel():
        return True
    if t.dtype.itemsize < 4:  # half types: min and max in one pass (NaN propagates) beat a float32 sum
        low, high = torch.aminmax(t)
        return bool(torch.isfinite(low) & torch.isfinite(high))
    return bool(torch.isfinite(t.sum()))


class FiniteChecked(Mapping[str, torch.Tensor]):
    """A read-only view of ``state`` that checks each tensor for NaN/Inf as it is read, so a lazily read
    checkpoint is checked in the same single pass that merges it (no second read of the files)."""

    def __init__(self, state: Mapping[str, torch.Tensor], what: str) -> None:
        self._state, self._what = state, what

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._state[key]
        check_finite_tensor(key, t, self._what)
        return t

    def __contains__(self, key: object) -> bool:
        return key in self._state

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``key`` (`LazyStateDict.rows` when wrapped), checked the first time
        each block is read: a merge that reads a block in several passes checks it once."""
        reader = getattr(self._state, "rows", None)
        if reader is not None:
            t = reader(key, start, stop)
        else:
            whole = self._state[key]
            t = whole if whole.dim() == 0 else whole[start:stop]
        checked = self.__dict__.setdefault("_checked_rows", set())
        if (key, start, stop) not in checked:
            if not quick_finite(t):
                check_finite_tensor(key, t, self._what)
            checked.add((key, start, stop))
        return t

    def __getattr__(self, name: str) -> object:  # what the wrapped mapping offers besides (LazyStateDict.shape)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._state, name)


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

HASH_KEY = "mergearena.state_hash"
"""Safetensors metadata key of the content hash (`state_hash`) a cached file was written with."""


def default_file_mode() -> int:
    """0666 less the process umask (0644 under the usual 022): what ``open()`` would have created."""
    try:  # Linux says it without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status") as status:
            mask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def save_state(state: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
               *, record_hash: bool = False) -> str | None:
    """Write a safetensors file atomically (temporary file + rename): a crash never leaves half a file.

    ``record_hash`` stores the state's `state_hash` in the metadata (returned too), which
    `load_verified` checks: caches use it to detect a file truncated or changed on disk.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = dict(metadata or {})
    digest = state_hash(tensors) if record_hash else None
    if digest is not None:
        meta[HASH_KEY] = digest
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, default_file_mode())  # mkstemp creates 0600; a written model is as readable as any file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return digest


def load_verified(path: str | os.PathLike) -> StateDict:
    """Read a safetensors file written with ``save_state(..., record_hash=True)`` and check it against
    the hash recorded then; raises `CorruptFileError` (with a short ``reason``) when it is unreadable or
    does not match. A file without a recorded hash (written before hashes were recorded) is only read."""
    path = Path(path)
    try:
        state = load_file(str(path))
        recorded = read_metadata(path).get(HASH_KEY)
    except Exception as exc:
        raise CorruptFileError(path, f"unreadable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if recorded is not None and state_hash(state) != recorded:
        raise CorruptFileError(path, "hash mismatch")
    return state


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


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16, "U32": torch.uint32,
    "U64": torch.uint64,
}


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A read-only view over one or more safetensors files that loads one tensor at a time.

    Merging large checkpoints through this keeps peak memory at a few tensors, not a few models
    (the out-of-core pattern of mergekit's lazy tensor loader). Names, shapes, dtypes and byte
    offsets are read from the headers once; `rows` reads a block of rows with one ``pread``.
    """

    def __init__(self, files: Iterable[str | os.PathLike]) -> None:
        self._where: dict[str, str] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str, int]] = {}
        """name -> (shape, safetensors dtype, byte offset of its data in the file)"""
        for f in files:
            f = str(f)
            try:
                with safe_open(f, framework="pt") as handle:
                    for k in handle.keys():
                        self._where[k] = f
                self._meta.update(_header_entries(f))
            except Exception as exc:
                raise CheckpointError(f"cannot read {f} as safetensors: {exc}") from exc
        if not self._where:
            raise CheckpointError("no tensors found in " + ", ".join(map(str, files)))

    def __getitem__(self, key: str) -> torch.Tensor:
        with safe_open(self._where[key], framework="pt") as handle:
            return handle.get_tensor(key)

    def __contains__(self, key: object) -> bool:  # without reading the tensor (Mapping's default would)
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of ``key``, without reading the tensor."""
        name = self._meta[key][1]
        if name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {key!r} has safetensors dtype {name}, which this harness does not read")
        return _SAFETENSORS_DTYPES[name]

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``key`` (the whole tensor for a 0-d one), reading only those bytes.

        One ``pread`` into a new tensor: no memory map stays behind, so reading a model block by
        block keeps a block resident, not a file.
        """
        shape, _, offset = self._meta[key]
        dtype = self.dtype(key)
        if sys.byteorder != "little":  # safetensors is little-endian; let it swap bytes
            with safe_open(self._where[key], framework="pt") as handle:
                return handle.get_tensor(key) if not shape else handle.get_slice(key)[start:stop]
        row_shape = shape[1:]
        row_bytes = math.prod(row_shape) * dtype.itemsize
        out = torch.empty((stop - start, *row_shape) if shape else (), dtype=dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        position = offset + (start * row_bytes if shape else 0)
        fd = os.open(self._where[key], os.O_RDONLY)
        try:
            while len(view):
                n = os.preadv(fd, [view], position)
                if n <= 0:
                    raise CheckpointError(f"{self._where[key]} ends inside tensor {key!r}")
                view, position = view[n:], position + n
        finally:
            os.close(fd)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _header_entries(path: str) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """name -> (shape, dtype, absolute byte offset of the data) from a safetensors header."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: (tuple(int(d) for d in v["shape"]), v["dtype"], 8 + size + int(v["data_offsets"][0]))
            for k, v in header.items() if k != "__metadata__"}


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

"""Shared helpers of the benchmark scripts: random bodies of a family's shapes, timing, tables, JSON.

Benchmarks print figures; they assert nothing. Every figure comes from one run on whatever machine
runs the script, so the scripts report ratios measured within that run next to absolute numbers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

# The scripts run as `python benchmarks/X.py`: put the repository root on the path so that the
# harness imports even without an installed package.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.families.family import Family  # noqa: E402
from bench.families.hf import body_shapes  # noqa: E402
from bench.weights import StateDict  # noqa: E402

T = TypeVar("T")
WEIGHT_STD = 0.02
"""Standard deviation of random weight matrices and embeddings (the Hugging Face ``initializer_range``)."""
MiB = 1024**2


# ---------------------------------------------------------------- random bodies


def key_seed(seed: int, *salt: object) -> int:
    """A 63-bit seed from ``seed`` and a salt (a tensor name): each tensor is reproducible on its own."""
    digest = hashlib.sha256(repr((seed, *salt)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _normal(shape: Sequence[int], seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, device=device, dtype=dtype)


def random_tensor(key: str, shape: Sequence[int], seed: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A θ_pre-like tensor: 1-D ``*weight`` (norm scales) 1 + N(0, 0.1²), other 1-D N(0, 0.02²), matrices N(0, 0.02²).

    Norm scales near 1 and small biases keep activations of deep random stacks finite in bf16.
    """
    device = torch.device(device)
    noise = _normal(shape, key_seed(seed, key), device, dtype)
    if len(shape) == 1 and key.endswith("weight"):
        return noise.mul_(0.1).add_(1.0)
    return noise.mul_(WEIGHT_STD)


def random_tensors(shapes: Mapping[str, Sequence[int]], seed: int, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of a random body, one tensor at a time (to stream large bodies to disk)."""
    for key, shape in shapes.items():
        yield key, random_tensor(key, shape, seed, device, dtype)


def expert_tensor(key: str, base: torch.Tensor, seed: int, tv_scale: float) -> torch.Tensor:
    """``base + tv_scale · rms(base) · N(0, 1)``: a fine-tuned-like tensor whose task vector is ``tv_scale`` of it."""
    rms = float(base.float().pow(2).mean().sqrt()) if base.numel() else 0.0
    noise = _normal(base.shape, key_seed(seed, "task-vector", key), base.device, base.dtype)
    return base + noise.mul_(tv_scale * max(rms, 1e-3))


def expert_tensors(shapes: Mapping[str, Sequence[int]], base_seed: int, seed: int, tv_scale: float,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """An expert of the body ``random_tensors(shapes, base_seed)`` made one tensor at a time (θ_pre regenerated per key)."""
    for key, base in random_tensors(shapes, base_seed, device, dtype):
        yield key, expert_tensor(key, base, seed, tv_scale)


def random_body(family: Family, seed: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> StateDict:
    """A random body with the keys and shapes of ``family``'s module (no module is built)."""
    return dict(random_tensors(body_shapes(family), seed, device, dtype))


def make_expert(base: Mapping[str, torch.Tensor], seed: int, tv_scale: float) -> StateDict:
    """An expert of ``base``: every floating tensor moved by a task vector of relative size ``tv_scale``."""
    return {k: expert_tensor(k, v, seed, tv_scale) if v.is_floating_point() else v for k, v in base.items()}


# ---------------------------------------------------------------- timing and memory


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels, so a timer stops when the work is done, not when it was queued."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, float]:
    """``(fn(), seconds)`` with the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    On Linux this is ``VmHWM`` of ``/proc/self/status``, the high-water mark of the process's own
    address space: ``getrusage(RUSAGE_SELF).ru_maxrss`` keeps the peak of the parent's image across
    fork + exec, so a subprocess started by a large parent would report the parent's peak. Elsewhere
    ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def current_rss_bytes() -> int:
    """This process's resident set size now (Linux ``/proc/self/statm``; elsewhere the peak so far)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory window: CUDA's allocator statistics, or (Linux) the process's VmHWM."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak RSS to the current RSS
    except OSError:
        pass  # no reset: the peak covers the whole run so far


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory since `reset_peak_memory`: tensors allocated on a CUDA device, or this process's peak RSS."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def available_memory_bytes(device: torch.device | str) -> int | None:
    """Free memory of a CUDA device, or MemAvailable of the machine (None when unknown)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# ---------------------------------------------------------------- reporting


def fastest(fn: Callable[[], T], repeats: int) -> tuple[T, float]:
    """``(fn(), seconds)`` of the fastest of ``repeats`` calls (the last call's value)."""
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        out, seconds = timed(fn)
        best = min(best, seconds)
    return out, best  # type: ignore[return-value]


def environment() -> dict[str, Any]:
    """Where and when the figures were measured."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        env["load_average_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return env


def print_table(title: str, rows: Sequence[Mapping[str, Any]], floatfmt: str = ".4g") -> None:
    """A GitHub-style table (tabulate; plain tab-separated lines where tabulate is not installed)."""
    print(f"\n{title}")
    if not rows:
        print("(no rows)")
        return
    try:
        from tabulate import tabulate
    except ImportError:  # never lose a long run's figures to a missing pretty-printer
        headers = list(rows[0])
        print("\t".join(headers))
        for r in rows:
            print("\t".join(format(v, floatfmt) if isinstance(v, float) else str(v) for v in r.values()))
        return
    print(tabulate([dict(r) for r in rows], headers="keys", floatfmt=floatfmt, tablefmt="github"))


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` atomically (a temporary file renamed), so a killed run leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)
    print(f"\nwrote {path}")


def comma_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated subset of ``choices`` ('all' for every one)."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if names == ["all"]:
            return list(choices)
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(choices)} or all")
        return names

    return parse

"""Speed of the harness at real model sizes on one device, with random weights of the real shapes.

Sizes: ``vit-l14`` (the CLIPVisionConfig of ViT-L/14: hidden 1024, 24 layers, 16 heads, FFN 4096,
patch 14, 224 px), ``vit-b32`` (hidden 768, 12 layers, 12 heads, FFN 3072, patch 32), ``llama-7b``
(LlamaConfig: hidden 4096, 32 layers, 32 heads, 32 kv heads, FFN 11008, vocab 32000) and ``tiny``
(the tiny test Llama and CLIP vision tower, for a CPU check). Measured per size:

1. **build**: random θ_pre and ``--experts`` experts (θ_pre + a task vector of ``--tv-scale``) made on the device;
2. **merge**: ``ta`` and ``ties`` of the experts, tensor by tensor on the device (``MergeMethod.merge_iter``;
   the merged tensors are dropped as they come, so no merged copy is held);
3. **protect**: each data-free defense (params, mergelock, mergebarrier-att) on expert 0, through
   ``bench.plan.make_defense`` with a `DefenseContext` on `bench.no_data.NoDataSuite`;
4. **attack**: the algebraic attack of each artifact (realign+scale-division on params, anchor-align on
   the others) through ``bench.plan.make_attacks``, with its relative weight error;
5. **forward**: latency of a batch through the family's module holding θ_pre (after warm-up).

Timings synchronise the device before and after (``torch.cuda.synchronize``); every stage is warmed
up first (the plugins on the tiny model of the same family). ``--plugin-layers K`` gives the
defenses and attacks a K-layer slice of the model (its first K layers plus embeddings, final norm
and head; default 2 for llama-7b, whose Hungarian matchings over 11008 FFN units run on the CPU
through scipy and take tens of seconds per layer); the table then also gives the time scaled to all
layers (slightly high: the slice's embeddings are scaled too). Displacement and errors are measured
over the layer tensors the plugins act on. With ``--plugin-device auto`` a plugin that fails on the
device (a CPU tensor meeting a CUDA one) runs on CPU copies instead, from then on for that family,
and the table says where each ran and why.

Memory: one copy of Llama-7B is ~13.5 GB in bf16 (27 GB in fp32); θ_pre + 3 experts + the TIES
working set of the largest tensor fit an 80 GB GPU in bf16 only. The script checks free memory
before building and says what to change when it will not fit.

    .venv/bin/python benchmarks/real_scale_speed.py --size tiny --device cpu
    .venv/bin/python benchmarks/real_scale_speed.py --size vit-l14 --dtype bf16 --device cuda
    .venv/bin/python benchmarks/real_scale_speed.py --size llama-7b --dtype bf16 --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import statistics
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import (
    available_memory_bytes,
    environment,
    make_expert,
    peak_memory_bytes,
    print_table,
    random_body,
    reset_peak_memory,
    synchronize,
    timed,
    write_json,
)

from bench.artifact import Artifact
from bench.families.base import ArchitectureMap
from bench.families.family import Family

GiB = 1024**3
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFENSE_ATTACKS = {
    "params": "realign+scale-division",
    "mergelock": "anchor-align",
    "mergebarrier-att": "anchor-align",
}
MERGES = ("ta", "ties")
STAGES = ("build", "merge", "protect", "attack", "forward")
TIES_WORKING_SET = 24
"""Float32 copies of one tensor that TIES holds at once with 3 experts (measured: ~24x the largest tensor)."""


@dataclass(frozen=True)
class SizeSpec:
    """One model size: its family, the default plugin layers and the default forward batch."""

    name: str
    family: Callable[[], Family]
    plugin_layers: int | None
    """Layers the defenses and attacks act on by default (None: all)."""
    batch: int
    seq: int = 0
    """Tokens per sequence (language models); 0 for image models."""


def _llama(**kw: Any) -> Family:
    import transformers

    from bench.families.llama import LlamaFamily

    return LlamaFamily(transformers.LlamaConfig(**kw))


def _clip(**kw: Any) -> Family:
    import transformers

    from bench.families.clip import ClipVisionFamily

    return ClipVisionFamily(transformers.CLIPVisionConfig(hidden_act="quick_gelu", image_size=224, **kw))


def _tiny(name: str) -> Family:
    from bench.families.tiny import tiny_family

    return tiny_family(name)


SIZES: dict[str, SizeSpec] = {
    "tiny-llama": SizeSpec("tiny-llama", lambda: _tiny("llama"), None, batch=2, seq=8),
    "tiny-vit": SizeSpec("tiny-vit", lambda: _tiny("clip-vision"), None, batch=2),
    "vit-b32": SizeSpec("vit-b32", lambda: _clip(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                                 intermediate_size=3072, patch_size=32), None, batch=64),
    "vit-l14": SizeSpec("vit-l14", lambda: _clip(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                                 intermediate_size=4096, patch_size=14), None, batch=32),
    "llama-7b": SizeSpec("llama-7b", lambda: _llama(vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                                                    num_attention_heads=32, num_key_value_heads=32,
                                                    intermediate_size=11008, max_position_embeddings=4096,
                                                    hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False),
                         2, batch=4, seq=512),
}
ALIASES = {"tiny": ("tiny-llama", "tiny-vit")}


def parse_sizes(text: str) -> list[str]:
    out: list[str] = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name in ALIASES:
            out.extend(ALIASES[name])
        elif name in SIZES:
            out.append(name)
        else:
            raise argparse.ArgumentTypeError(f"unknown size {name!r}; choose from {', '.join([*ALIASES, *SIZES])}")
    if not out:
        raise argparse.ArgumentTypeError("no size given")
    return out


def parse_subset(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if names == ["all"]:
            return list(choices)
        if names == ["none"]:
            return []
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(choices)}, all or none")
        return names

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Build, merge (ta, ties), data-free defense, algebraic attack and forward timings at real model "
                    "sizes with random weights, on one device. Memory: Llama-7B is ~13.5 GB per copy in bf16 "
                    "(27 GB in fp32); θ_pre + 3 experts (~54 GB) plus the merge working set (~12 GB) fit an 80 GB "
                    "GPU in bf16, not in fp32 (use --dtype bf16, or --experts 1 with fp32); free memory is checked "
                    "before building. ViT-L/14 is ~0.6 GB per copy in bf16. The defenses and attacks solve Hungarian "
                    "matchings on the CPU (scipy), tens of seconds per layer for Llama-7B's 11008 FFN units: on "
                    "llama-7b they act on --plugin-layers layers (default 2) and the table also scales their time "
                    "to all layers; expect several minutes for llama-7b, mostly there (--stages build,merge,forward "
                    "skips them). CPU check: --size tiny --device cpu.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--size", type=parse_sizes, default="tiny",
                   help=f"comma-separated sizes: {', '.join([*ALIASES, *SIZES])}")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype of every copy")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--experts", type=int, default=3, help="experts merged onto θ_pre")
    p.add_argument("--stages", type=parse_subset(STAGES), default="all", help="comma-separated stages, or all")
    p.add_argument("--merges", type=parse_subset(MERGES), default="all", help="merge methods (ta, ties), all or none")
    p.add_argument("--defenses", type=parse_subset(tuple(DEFENSE_ATTACKS)), default="all",
                   help="data-free defenses (each followed by its attack in the attack stage)")
    p.add_argument("--plugin-layers", type=int, default=None,
                   help="layers the defenses and attacks act on; 0: all; %(default)s: per size (2 for llama-7b, all otherwise)")
    p.add_argument("--plugin-device", choices=("auto", "device", "cpu"), default="auto",
                   help="where defenses and attacks run: auto = on --device, again on CPU copies if that fails; "
                        "device = on --device only; cpu = on CPU copies")
    p.add_argument("--batch", type=int, default=None, help="forward batch size; %(default)s: per size (llama-7b 4, vit-l14 32, vit-b32 64, tiny 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence of a language model; %(default)s: per size (llama-7b 512, tiny 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forward passes before timing")
    p.add_argument("--repeats", type=int, default=5, help="timed forward passes (the median is reported)")
    p.add_argument("--tv-scale", type=float, default=0.05, help="task-vector size relative to each θ_pre tensor's RMS")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-memory-check", action="store_true", help="build even when the estimate exceeds free memory")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.experts < 1:
        p.error("--experts must be at least 1")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be at least 1 and --warmup at least 0")
    if args.plugin_layers is not None and args.plugin_layers < 0:
        p.error("--plugin-layers must be 0 (all) or a positive number of layers")
    try:
        args.device = check_device(args.device, args.dtype)
    except ValueError as exc:
        p.error(str(exc))
    return args


def check_device(name: str, dtype: str) -> torch.device:
    """The device, after checking that it exists and supports ``dtype``."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a device name; use cuda, cuda:N or cpu") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} but CUDA is not available (torch {torch.__version__}, built for CUDA "
                             f"{torch.version.cuda or 'none: a CPU build'}); run on a GPU machine, or use --device cpu "
                             "--size tiny")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        device = torch.device("cuda", index)
        if dtype == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"{torch.cuda.get_device_name(index)} does not support bf16; use --dtype fp32")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cuda and cpu are supported")
    return device


# ---------------------------------------------------------------- results


@dataclass
class Report:
    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: int = 0

    def add(self, size: str, stage: str, item: str, **figures: Any) -> dict[str, Any]:
        row = {"size": size, "stage": stage, "item": item, **figures}
        self.rows.append(row)
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
        print(f"  {size:10s} {stage:8s} {item:40s} {shown}", flush=True)
        return row

    def fail(self, size: str, stage: str, item: str, exc: BaseException) -> None:
        self.errors += 1
        self.add(size, stage, item, error=f"{type(exc).__name__}: {first_line(exc)}")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- placement of states


class Placement:
    """θ_pre and expert 0 (or their slices) on the main device, with CPU copies made once when a plugin needs them."""

    def __init__(self, device: torch.device, states: dict[str, dict[str, torch.Tensor]]) -> None:
        self.device = device
        self._states = {(name, str(device)): s for name, s in states.items()}

    def get(self, name: str, device: torch.device) -> dict[str, torch.Tensor]:
        key = (name, str(device))
        if key not in self._states:
            self._states[key] = {k: v.to(device) for k, v in self._states[(name, str(self.device))].items()}
        return self._states[key]


def on_device(artifact: Artifact, device: torch.device) -> Artifact:
    return dataclasses.replace(artifact, state={k: v.to(device) for k, v in artifact.state.items()})


CPU_ONLY: dict[tuple[str, str], str] = {}
"""(family, plugin) -> why it runs on the CPU: its first run on the device (the warm-up) failed there."""


def run_plugin(setup: Callable[[torch.device], Any], run: Callable[[Any], Any], device: torch.device, mode: str,
               key: tuple[str, str]) -> tuple[Any, float, str, str]:
    """``(result, seconds, device it ran on, note)`` of ``run(setup(dev))``, timing ``run`` only (copies are
    ``setup``'s): on ``device``; in mode auto, on the CPU when that fails (remembered per family and plugin)."""
    if mode != "cpu" and device.type != "cpu" and key not in CPU_ONLY:
        try:
            inputs = setup(device)
            out, seconds = timed(lambda: run(inputs), device)
            return out, seconds, str(device), ""
        except Exception as exc:  # a plugin not written for this device: measure it where it runs
            if mode == "device":
                raise
            CPU_ONLY[key] = f"fails on {device}: {type(exc).__name__}: {first_line(exc)}"
            inputs = None
            free_device_memory(device)
    cpu = torch.device("cpu")
    inputs = setup(cpu)
    out, seconds = timed(lambda: run(inputs), cpu)
    fallback = mode != "cpu" and device.type != "cpu"
    return out, seconds, "cpu (fallback)" if fallback else "cpu", CPU_ONLY.get(key, "") if fallback else ""


def restricted(arch: ArchitectureMap, layers: int) -> ArchitectureMap:
    """The map of the first ``layers`` layers only."""
    return dataclasses.replace(arch, layers=arch.layers[:layers])


def model_slice(state: Mapping[str, torch.Tensor], arch: ArchitectureMap, layers: int) -> dict[str, torch.Tensor]:
    """The first ``layers`` layers plus the tensors outside any layer (embeddings, final norm, head); no copy."""
    out = {}
    for k, v in state.items():
        index = arch.layer_of(k)
        if index is None or index < layers:
            out[k] = v
    return out


def layer_keys(state: Mapping[str, torch.Tensor], arch: ArchitectureMap) -> list[str]:
    """Floating tensors that belong to a layer of ``arch`` (what the defenses and attacks act on)."""
    return [k for k, v in state.items() if v.is_floating_point() and arch.layer_of(k) is not None]


def distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], keys: list[str]) -> float:
    total = 0.0
    for k in keys:
        total += float((a[k].double() - b[k].to(a[k].device).double()).pow(2).sum())
    return total**0.5


def norm(a: Mapping[str, torch.Tensor], keys: list[str]) -> float:
    return sum(float(a[k].double().pow(2).sum()) for k in keys) ** 0.5


# ---------------------------------------------------------------- stages


def check_memory(spec: SizeSpec, family: Family, args: argparse.Namespace) -> None:
    """Refuse to build what cannot fit (θ_pre + experts + the merge working set of the largest tensor)."""
    from bench.families.hf import body_shapes

    shapes = body_shapes(family)
    numels = [_numel(s) for s in shapes.values()]
    copy = sum(numels) * DTYPES[args.dtype].itemsize
    working = max(numels) * 4 * (TIES_WORKING_SET if "ties" in args.merges else args.experts + 2)
    need = (args.experts + 1) * copy + working
    free = available_memory_bytes(args.device)
    if free is not None and need > free and not args.skip_memory_check:
        raise MemoryError(
            f"{spec.name} in {args.dtype} needs ~{need / GiB:.1f} GiB on {args.device} ({args.experts + 1} copies of "
            f"{copy / GiB:.2f} GiB + {working / GiB:.1f} GiB merge working set) and {free / GiB:.1f} GiB is free; use "
            "--dtype bf16, fewer --experts, --merges ta, or --skip-memory-check")


def stage_build(spec: SizeSpec, family: Family, args: argparse.Namespace, report: Report) -> tuple[dict, list[dict]]:
    dtype, device = DTYPES[args.dtype], args.device
    reset_peak_memory(device)
    base, seconds = timed(lambda: random_body(family, args.seed, device, dtype), device)
    params = sum(v.numel() for v in base.values())
    report.add(spec.name, "build", f"θ_pre ({params / 1e6:.4g}M params, {params * dtype.itemsize / GiB:.3g} GiB)",
               seconds=seconds, rate=f"{params / seconds / 1e6:.3g} Mparams/s")
    experts, seconds = timed(lambda: [make_expert(base, args.seed + 1 + i, args.tv_scale) for i in range(args.experts)],
                             device)
    report.add(spec.name, "build", f"{args.experts} experts", seconds=seconds,
               rate=f"{args.experts * params / seconds / 1e6:.3g} Mparams/s",
               **{"peak GiB": peak_memory_bytes(device) / GiB})
    return base, experts


def stage_merge(spec: SizeSpec, base: dict, experts: list[dict], args: argparse.Namespace, report: Report) -> None:
    from bench.registry import merges

    device = args.device
    model_bytes = sum(v.numel() * v.element_size() for v in base.values())
    for name in args.merges:
        try:
            method = merges.get(name)
            params = method.parse({})
            first = list(base)[:4]  # warm-up: the kernels of this method, on a few tensors
            drain(method.merge_iter({k: base[k] for k in first}, [{k: e[k] for k in first} for e in experts], params))
            reset_peak_memory(device)
            run = method.merge_iter  # bound now: the timed call must use this loop's method and params
            count, seconds = timed(lambda run=run, params=params: drain(run(base, experts, params, seed=args.seed)),
                                   device)
            read = (len(experts) + 1) * model_bytes
            report.add(spec.name, "merge", f"{name} of {len(experts)} experts, tensor by tensor", seconds=seconds,
                       rate=f"{count / seconds:.1f} tensors/s, {read / seconds / GiB:.1f} GiB/s read",
                       **{"peak GiB": peak_memory_bytes(device) / GiB})
        except Exception as exc:
            report.fail(spec.name, "merge", name, exc)
        free_device_memory(device)


def drain(pairs: Any) -> int:
    """Consume merged ``(name, tensor)`` pairs, dropping each tensor as soon as the next one comes."""
    count = 0
    for _name, _tensor in pairs:
        count += 1
    return count


def plugin_layers(spec: SizeSpec, family: Family, args: argparse.Namespace) -> int:
    total = len(family.arch_map().layers)
    k = args.plugin_layers if args.plugin_layers else (spec.plugin_layers or total)
    return min(k, total)


def plugin_stages(spec: SizeSpec, family: Family, base: dict, expert: dict, layers: int, args: argparse.Namespace,
                  report: Report) -> None:
    """Each defense on (a slice of) expert 0, then (attack stage) its attack on the artifact.

    With ``layers`` below the model's depth the plugins see a shallower model: the first ``layers``
    layers plus embeddings, final norm and head, and the map of those layers. Per-layer work (the
    matchings) then scales with depth, so the time is also given scaled to every layer.
    """
    from bench.no_data import NoDataSuite
    from bench.plan import make_attacks, make_defense
    from bench.plugins import AttackContext, DefenseContext
    from bench.suite import Expert

    full = family.arch_map()
    arch = restricted(full, layers)
    placement = Placement(args.device, {"base": model_slice(base, full, layers), "expert": model_slice(expert, full, layers)})
    keys = layer_keys(placement.get("expert", args.device), arch)
    tau = distance(placement.get("expert", args.device), placement.get("base", args.device), keys)
    scale_up = len(full.layers) / layers
    span = f"{layers}/{len(full.layers)} layers"

    for name in args.defenses:
        def protect_inputs(dev: torch.device, name: str = name) -> tuple[Any, Any, Any]:
            sliced_base = placement.get("base", dev)
            suite = NoDataSuite(family, sliced_base, name)
            ctx = DefenseContext(suite=suite, task=suite.tasks[0], base=sliced_base, arch=arch, family=family,
                                 seed=args.seed)
            return make_defense(name), Expert(body=placement.get("expert", dev), head={}), ctx

        try:
            artifact, seconds, ran_on, note = run_plugin(protect_inputs, lambda x: x[0].protect(x[1], x[2]), args.device,
                                                         args.plugin_device, (family.name, name))
        except Exception as exc:
            report.fail(spec.name, "protect", name, exc)
            continue
        if "protect" in args.stages:
            shift = distance(artifact.state, placement.get("base", torch.device(ran_on.split()[0])), keys)
            report.add(spec.name, "protect", f"{name} ({span})", seconds=seconds,
                       **{"all layers s": seconds * scale_up, "displacement": shift / tau, "ran on": ran_on,
                          "note": note})
        if "attack" in args.stages:
            for attack in make_attacks(DEFENSE_ATTACKS[name]):
                label = f"{getattr(attack, 'label', '') or attack.name} on {name}"

                def attack_inputs(dev: torch.device, attack: Any = attack, artifact: Artifact = artifact) -> tuple:
                    sliced_base = placement.get("base", dev)
                    suite = NoDataSuite(family, sliced_base, attack.name)
                    ctx = AttackContext(suite=suite, victim=suite.tasks[0], partners=(), base=sliced_base, arch=arch,
                                        family=family, artifact=on_device(artifact, dev), merge_name="ta",
                                        seed=args.seed)
                    return attack, ctx.artifact, ctx

                try:
                    recovered, seconds, ran_on, note = run_plugin(
                        attack_inputs, lambda x: x[0].prepare(x[1], x[2]), args.device, args.plugin_device,
                        (family.name, attack.name))
                except Exception as exc:
                    report.fail(spec.name, "attack", label, exc)
                    continue
                truth = placement.get("expert", torch.device(ran_on.split()[0]))
                err = distance(recovered.state, truth, keys)
                report.add(spec.name, "attack", f"{label} ({span})", seconds=seconds,
                           **{"all layers s": seconds * scale_up, "rel. error": err / norm(truth, keys),
                              "error ÷ ‖τ‖": err / tau, "ran on": ran_on, "note": note})
                del recovered
        del artifact
        free_device_memory(args.device)


def stage_forward(spec: SizeSpec, family: Family, base: dict, args: argparse.Namespace, report: Report) -> None:
    device, dtype = args.device, DTYPES[args.dtype]
    module = build_module(family, base, device, dtype)
    batch = args.batch or spec.batch
    inputs, unit, count = forward_inputs(spec, family, batch, args, device, dtype)
    with torch.inference_mode():
        for _ in range(args.warmup):
            module(**inputs)
        synchronize(device)
        reset_peak_memory(device)
        latencies = [timed(lambda: module(**inputs), device)[1] for _ in range(args.repeats)]
    median = statistics.median(latencies)
    size = family.config.image_size if unit == "images" else 0  # type: ignore[attr-defined]
    report.add(spec.name, "forward", f"batch of {batch}x{count // batch} tokens" if unit == "tokens" else
               f"batch of {batch} images, {size}px", seconds=median,
               rate=f"{count / median:.4g} {unit}/s (median of {args.repeats}, min {min(latencies):.4g} s)",
               **{"peak GiB": peak_memory_bytes(device) / GiB})


def build_module(family: Family, state: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The family's module made directly on ``device`` in ``dtype`` (no CPU float32 copy), holding ``state``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = family.new_module()
    finally:
        torch.set_default_dtype(previous)
    missing = sorted(set(module.state_dict()) - set(state))
    if missing:
        raise RuntimeError(f"{family.name} module expects {len(missing)} tensor(s) the random body lacks, e.g. {missing[:3]}")
    module.load_state_dict(state, strict=False)  # copies: assign=True would untie a tied LM head
    return module.eval()


def forward_inputs(spec: SizeSpec, family: Family, batch: int, args: argparse.Namespace, device: torch.device,
                   dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], str, int]:
    g = torch.Generator(device=device).manual_seed(args.seed)
    config = family.config  # type: ignore[attr-defined]
    if family.name == "llama":
        seq = args.seq or spec.seq or 8
        if seq > config.max_position_embeddings:
            raise ValueError(f"--seq {seq} exceeds max_position_embeddings {config.max_position_embeddings}")
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g, device=device)
        return {"input_ids": ids, "use_cache": False}, "tokens", batch * seq
    size = config.image_size
    images = torch.randn(batch, config.num_channels, size, size, generator=g, device=device, dtype=dtype)
    return {"pixel_values": images}, "images", batch


# ---------------------------------------------------------------- main


def run_size(name: str, args: argparse.Namespace, report: Report) -> None:
    spec = SIZES[name]
    family = spec.family()
    print(f"\n{name}: {family.name}, {args.dtype} on {args.device}", flush=True)
    check_memory(spec, family, args)
    base, experts = stage_build(spec, family, args, report)
    if "merge" in args.stages:
        stage_merge(spec, base, experts, args, report)
    expert0 = experts[0]
    del experts  # keep θ_pre and expert 0 only: the plugins need nothing more
    free_device_memory(args.device)
    if {"protect", "attack"} & set(args.stages) and args.defenses:
        warm_up_plugins(family.name, args)
        plugin_stages(spec, family, base, expert0, plugin_layers(spec, family, args), args, report)
    del expert0
    free_device_memory(args.device)
    if "forward" in args.stages:
        try:
            stage_forward(spec, family, base, args, report)
        except Exception as exc:
            report.fail(spec.name, "forward", "forward", exc)
    del base
    free_device_memory(args.device)


_warmed: set[tuple[str, str]] = set()


def warm_up_plugins(family_name: str, args: argparse.Namespace) -> None:
    """Run the plugins once, untimed, on the tiny model of the family on the same device: module imports,
    cuBLAS / cuSOLVER handles, and (mode auto) which plugins fail on the device and must run on the CPU."""
    if (family_name, str(args.device)) in _warmed:
        return
    _warmed.add((family_name, str(args.device)))
    family = _tiny(family_name)
    base = random_body(family, args.seed, args.device, DTYPES[args.dtype])
    expert = make_expert(base, args.seed + 1, args.tv_scale)
    tiny_args = argparse.Namespace(**{**vars(args), "stages": ["protect", "attack"]})
    with contextlib.redirect_stdout(io.StringIO()):
        plugin_stages(SIZES["tiny-llama"], family, base, expert, len(family.arch_map().layers), tiny_args, Report())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    report = Report()
    for name in args.size:
        try:
            run_size(name, args, report)
        except MemoryError as exc:
            report.fail(name, "build", "memory check", exc)
        except torch.cuda.OutOfMemoryError as exc:
            report.fail(name, "build", "out of device memory", exc)
        except Exception as exc:  # one size failing must not lose the others' figures
            report.fail(name, "run", "unexpected failure", exc)
        free_device_memory(args.device)
    rows = tabulated(report.rows)
    print_table(f"Real-scale speed ({args.dtype} on {args.device}"
                + (f", {torch.cuda.get_device_name(args.device)}" if args.device.type == "cuda" else
                   f", {torch.get_num_threads()} CPU threads") + "; one run)", rows)
    if args.json:
        write_json(args.json, {"benchmark": "real_scale_speed", "environment": environment(),
                               "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    if report.errors:
        print(f"\n{report.errors} measurement(s) failed; see the error column", file=sys.stderr)
    return 1 if report.errors else 0


COLUMNS = ("size", "stage", "item", "seconds", "all layers s", "rate", "displacement", "rel. error", "error ÷ ‖τ‖",
           "peak GiB", "ran on", "note", "error")


def tabulated(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the same columns in a fixed order; columns empty in every row are left out."""
    used = [c for c in COLUMNS if any(r.get(c) not in (None, "") for r in rows)]
    return [{c: r.get(c, "") for c in used} for r in rows]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    sys.exit(main())

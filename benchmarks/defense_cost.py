"""Cost of the data-free defenses and of the algebraic attacks that undo them, on random bodies.

For each family (BERT, Llama, CLIP vision) and size, a random θ_pre and an expert
``θ_pre + τ`` (τ of relative size ``--tv-scale`` per tensor) are built in-process. Each data-free
defense protects the expert through the registry (``bench.plan.make_defense``) with a
`DefenseContext` whose suite is `bench.no_data.NoDataSuite` (any data access raises), and its
algebraic attack recovers it through ``bench.plan.make_attacks`` with an `AttackContext` on the
same suite:

==================  =====================================
defense             attack
==================  =====================================
params              realign+scale-division
mergelock           anchor-align
mergebarrier-att    anchor-align
==================  =====================================

Reported per row: protect seconds; the artifact's displacement ``‖θ_art − θ_pre‖ / ‖θ_exp − θ_pre‖``
(how far the release sits from θ_pre relative to the expert, 1 = no displacement);
attack seconds; the recovered weights' relative error ``‖θ_rec − θ_exp‖ / ‖θ_exp‖`` and the same
error over ``‖τ‖`` (below 1: the recovery is closer to the expert than θ_pre is; the artifact's
own value is in the ``art err ÷ ‖τ‖`` column).

    .venv/bin/python benchmarks/defense_cost.py                        # tiny + MiniLM-sized, ~1 min
    .venv/bin/python benchmarks/defense_cost.py --sizes base --families llama --json out.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from _common import comma_list, environment, make_expert, print_table, random_body, timed, write_json

from bench.families.family import Family

FAMILIES = ("bert", "llama", "clip-vision")
SIZES = ("tiny", "small", "base")
DEFENSE_ATTACKS = {
    "params": "realign+scale-division",
    "mergelock": "anchor-align",
    "mergebarrier-att": "anchor-align",
}
# MiniLM-sized (all-MiniLM-L6-v2: 6 layers, hidden 384, 12 heads, FFN 1536) and base-sized (BERT-base,
# ViT-B: 12 layers, hidden 768, 12 heads, FFN 3072) bodies of each family.
SHAPES = {
    "small": dict(layers=6, hidden=384, heads=12, ffn=1536),
    "base": dict(layers=12, hidden=768, heads=12, ffn=3072),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Protect time and displacement of the data-free defenses (params, mergelock, mergebarrier-att) "
                    "and recovery time and weight error of their algebraic attacks, on random BERT / Llama / "
                    "CLIP-vision bodies. Sizes: tiny (test models), small (MiniLM: 6x384, 12 heads, FFN 1536), "
                    "base (12x768, 12 heads, FFN 3072). Defaults take about a minute on 2 CPU cores.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--families", type=comma_list(FAMILIES), default="all", help="comma-separated families")
    p.add_argument("--sizes", type=comma_list(SIZES), default="tiny,small", help="comma-separated sizes")
    p.add_argument("--defenses", type=comma_list(tuple(DEFENSE_ATTACKS)), default="all",
                   help="comma-separated data-free defenses")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers of small/base sizes")
    p.add_argument("--tv-scale", type=float, default=0.02, help="task-vector size relative to each θ_pre tensor's RMS")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 avoids thread contention on a shared machine; 0 keeps torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.tv_scale <= 0:
        p.error("--tv-scale must be positive: the attacks recover a task vector, which must not be zero")
    return args


# ---------------------------------------------------------------- families


def make_family(name: str, size: str, layers: int | None = None) -> Family:
    """``name``'s family at ``size``: the tiny test configuration, or a MiniLM- / base-sized one."""
    import transformers

    if size == "tiny":
        from bench.families.tiny import tiny_family

        return tiny_family(name)
    s = dict(SHAPES[size])
    if layers is not None:
        s["layers"] = layers
    if name == "bert":
        from bench.families.bert import BertFamily

        return BertFamily(transformers.BertConfig(
            vocab_size=30522, hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
            intermediate_size=s["ffn"], max_position_embeddings=512, hidden_act="gelu"))
    if name == "llama":
        from bench.families.llama import LlamaFamily

        # GQA with 4 kv heads and RoPE, as the Llama family runs them; untied head.
        return LlamaFamily(transformers.LlamaConfig(
            vocab_size=32000, hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
            num_key_value_heads=4, intermediate_size=s["ffn"], max_position_embeddings=2048, hidden_act="silu",
            tie_word_embeddings=False))
    if name == "clip-vision":
        from bench.families.clip import ClipVisionFamily

        return ClipVisionFamily(transformers.CLIPVisionConfig(
            hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
            intermediate_size=s["ffn"], image_size=224, patch_size=32, hidden_act="quick_gelu"))
    raise ValueError(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}")


# ---------------------------------------------------------------- measures


def distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """‖a − b‖ over the floating-point tensors of ``b`` (float64)."""
    total = torch.zeros((), dtype=torch.float64)
    for k, v in b.items():
        if v.is_floating_point():
            total += (a[k].double() - v.double()).pow(2).sum()
    return float(total.sqrt())


def norm(a: Mapping[str, torch.Tensor]) -> float:
    return float(sum(v.double().pow(2).sum() for v in a.values() if v.is_floating_point()) ** 0.5)


def measure(family: Family, family_name: str, size: str, defense_name: str, args: argparse.Namespace,
            base: dict[str, torch.Tensor], expert: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Protect ``expert`` with one defense, then run its attack(s) on the artifact."""
    from bench.no_data import NoDataSuite
    from bench.plan import make_attacks, make_defense
    from bench.plugins import AttackContext, DefenseContext
    from bench.suite import Expert

    arch = family.arch_map()
    suite = NoDataSuite(family, base, defense_name)
    defense = make_defense(defense_name)
    ctx = DefenseContext(suite=suite, task=suite.tasks[0], base=base, arch=arch, family=family, seed=args.seed)
    artifact, protect_s = timed(lambda: defense.protect(Expert(body=expert, head={}), ctx))
    tau = distance(expert, base)
    expert_norm = norm(expert)
    common = {"family": family_name, "size": size, "Mparams": sum(v.numel() for v in base.values()) / 1e6,
              "defense": defense_name, "protect s": protect_s,
              "displacement": distance(artifact.state, base) / tau,
              "art err ÷ ‖τ‖": distance(artifact.state, expert) / tau}
    rows = []
    for attack in make_attacks(DEFENSE_ATTACKS[defense_name]):
        actx = AttackContext(suite=suite, victim=suite.tasks[0], partners=(), base=base, arch=arch, family=family,
                             artifact=artifact, merge_name="ta", seed=args.seed)
        recovered, attack_s = timed(lambda attack=attack, actx=actx: attack.prepare(artifact, actx))
        err = distance(recovered.state, expert)
        rows.append({**common, "attack": getattr(attack, "label", "") or attack.name, "attack s": attack_s,
                     "rel. error": err / expert_norm, "error ÷ ‖τ‖": err / tau})
    return rows


def warm_up(args: argparse.Namespace) -> None:
    """Run every defense and attack once on a tiny body, untimed: module imports and first-call
    initialisation would otherwise be charged to the first row."""
    family = make_family("llama", "tiny")
    base = random_body(family, args.seed)
    expert = make_expert(base, args.seed + 1, args.tv_scale)
    for defense_name in args.defenses:
        measure(family, "llama", "tiny", defense_name, args, base, expert)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # plugins draw from their own seeded generators; this only pins stray draws
    warm_up(args)
    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        for family_name in args.families:
            family = make_family(family_name, size, args.layers)
            base = random_body(family, args.seed)
            expert = make_expert(base, args.seed + 1, args.tv_scale)
            for defense_name in args.defenses:
                for row in measure(family, family_name, size, defense_name, args, base, expert):
                    rows.append(row)
                    print(f"  {row['family']:11s} {row['size']:5s} {row['defense']:16s} protect {row['protect s']:7.3f} s  "
                          f"{row['attack']:22s} {row['attack s']:7.3f} s", flush=True)
    print_table(f"Data-free defenses and their algebraic attacks (random bodies, task vector {args.tv_scale:g} "
                f"of each tensor's RMS; {torch.get_num_threads()} torch thread(s); one run)", rows)
    if args.json:
        write_json(args.json, {"benchmark": "defense_cost", "environment": environment(),
                               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

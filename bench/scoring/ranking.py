"""Ranks the data support: rank bands from a paired bootstrap, and how stable the point order is.

Two defenses share a rank unless the paired bootstrap (the same test-example and replicate draws for
both) separates their security: the central ``level`` interval of the difference of their security
draws excludes 0. A defense's **rank band** is (1 + the number of defenses significantly more secure,
N − the number significantly less secure); its ``rank`` is the band's best end. Entries are listed by
security, then utility **capped at 1** (a release better than its expert earns no extra credit), then name;
the order inside a band is not a ranking. A draw in which either security is undefined (the held-out gain
≤ 0) is no evidence of a difference (counted as 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bench.scoring.results import REFERENCE, DefenseScore, RankStability

UNRANKING = ("failed_cells", "budget_exceeded", "incomplete", "utility_below_floor", "function_preservation_violated",
             "mixed_experts")
"""Flags that unrank an entry (besides having no security)."""


def rank_key(ds: DefenseScore) -> tuple:
    return (-(ds.security or 0.0), -min(ds.utility or 0.0, 1.0), ds.defense)


def separated(a: np.ndarray, b: np.ndarray, level: float) -> bool:
    """Whether security draws ``a`` are significantly above ``b`` (paired: the same draws)."""
    diff = np.nan_to_num(np.asarray(a) - np.asarray(b), nan=0.0)
    return bool(np.percentile(diff, 50 * (1 - level)) > 0)


def unranked_reason(ds: DefenseScore) -> str:
    blocking = [f for f in ds.flags if f.code in UNRANKING]
    if ds.defense == REFERENCE:
        return "the reference row: an unprotected release (shows each victim's gain; never ranked)"
    if "[" in ds.defense:  # a variant label NAME[key=value] (`bench.plugins.Defense.label`)
        return ("a strength setting other than the default (`bench frontier`): drawn on the frontiers page; "
                "the defense is ranked at its default setting")
    if blocking:
        return "; ".join(f"{f.code}: {f.message}" for f in blocking)
    if ds.security is None:
        return "no informative victim: no security could be scored"
    if ds.utility is None:
        return "no utility measured"
    return ""


def assign_ranks(group: list[DefenseScore], draws: Mapping[str, np.ndarray], level: float) -> None:
    """Rank bands for the rankable entries of one group (``draws``: defense -> security draws); the others
    say why they are unranked."""
    rankable = []
    for ds in group:
        ds.rank, ds.rank_band = None, None
        ds.unranked_reason = unranked_reason(ds)
        if not ds.unranked_reason:
            rankable.append(ds)
    n = len(rankable)
    for ds in rankable:
        better = sum(separated(draws[o.defense], draws[ds.defense], level) for o in rankable if o is not ds)
        worse = sum(separated(draws[ds.defense], draws[o.defense], level) for o in rankable if o is not ds)
        ds.rank_band = (1 + better, n - worse)
        ds.rank = ds.rank_band[0]


def stability(group: list[DefenseScore], draws: Mapping[str, Any]) -> RankStability:
    """How often resampling reproduces the point order of the ranked entries (security, then utility capped at 1)."""
    ranked = sorted((d for d in group if d.rank is not None), key=rank_key)
    names = [d.defense for d in ranked]
    if not ranked:
        return RankStability([], [], [], 1.0)
    sec = np.stack([draws[d.defense].security for d in ranked])  # [defense, draw] (`summaries.EntryDraws`)
    util = np.minimum(np.stack([draws[d.defense].utility for d in ranked]), 1.0)
    n, n_draws = sec.shape
    counts = np.zeros((n, n))
    same = 0
    for b in range(n_draws):
        # NaN (a defense with no resampled value) sorts last, like an unscored entry.
        order = sorted(range(n), key=lambda i: (np.nan_to_num(-sec[i, b], nan=np.inf),
                                                np.nan_to_num(-util[i, b], nan=np.inf), names[i]))
        for r, i in enumerate(order):
            counts[i, r] += 1
        same += order == list(range(n))
    flips = [(names[i], names[i + 1], float(np.mean(sec[i + 1] > sec[i]))) for i in range(n - 1)]
    return RankStability(names, (counts / n_draws).tolist(), flips, same / n_draws)

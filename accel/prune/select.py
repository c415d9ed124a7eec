"""Hierarchical Position Pruning: which blocks to remove for a ratio or a latency budget.

Candidates are the blocks after a protected prefix (the first ``protect_first`` of the model: early blocks
set the semantic layout) that are not pinned by the architecture. Each candidate gets a priority

    priority(i) = (1 - position_weight) * sensitivity_score(i) + position_weight * (1 - i / (n - 1))

and the lowest priorities go first: late, insensitive blocks. Without a measured profile the score is 0
and the rule falls back to the position hierarchy alone (the last candidates first).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def protected_prefix(n: int, protect_first: float) -> int:
    """How many leading blocks are never removed (at least one when ``protect_first > 0``)."""
    return min(n, math.ceil(protect_first * n)) if protect_first > 0 else 0


def blocks_for_ratio(n: int, ratio: float) -> int:
    """The smallest block count that is at least ``ratio`` of ``n`` (0.3 of 8 -> 3: at least 30% removed)."""
    return math.ceil(ratio * n - 1e-9)


def rank_candidates(
    n: int,
    *,
    score: Sequence[float] | None,
    pinned: Mapping[int, str],
    protect_first: float,
    position_weight: float,
) -> list[int]:
    """Removable block indices, most removable first."""
    start = protected_prefix(n, protect_first)
    candidates = [i for i in range(start, n) if i not in pinned]

    def priority(i: int) -> tuple[float, int]:
        position = 1.0 - i / max(1, n - 1)
        sensitivity = score[i] if score is not None else 0.0
        return ((1 - position_weight) * sensitivity + position_weight * position, -i)

    return sorted(candidates, key=priority)


def select_blocks(
    n: int,
    *,
    ratio: float | None = None,
    latency_budget: float | None = None,
    score: Sequence[float] | None = None,
    time_fraction: Sequence[float] | None = None,
    pinned: Mapping[int, str] | None = None,
    protect_first: float = 0.25,
    position_weight: float = 0.3,
) -> list[int]:
    """Block indices to remove (sorted), for exactly one of ``ratio`` and ``latency_budget``.

    ``latency_budget`` is a fraction of the unpruned forward's time; a block's share is
    ``time_fraction[i]`` (measured by ``analyze_blocks`` or estimated from parameters).
    """
    pinned = dict(pinned or {})
    ranked = rank_candidates(n, score=score, pinned=pinned, protect_first=protect_first,
                             position_weight=position_weight)
    keep_note = (f"the first {protected_prefix(n, protect_first)} blocks are protected (protect_first="
                 f"{protect_first})" + (f" and blocks {sorted(pinned)} are pinned by the architecture" if pinned else ""))
    if ratio is not None:
        count = blocks_for_ratio(n, ratio)
        if count >= n:
            raise ValueError(f"ratio={ratio} removes all {n} blocks; the largest ratio that leaves a model is "
                             f"{(n - 1) / n:.3f} ({n - 1} of {n}).")
        if count > len(ranked):
            raise ValueError(f"ratio={ratio} asks for {count} of {n} blocks but only {len(ranked)} may be removed: "
                             f"{keep_note}. Lower the ratio or protect_first.")
        return sorted(ranked[:count])
    if latency_budget is None:
        raise ValueError("select_blocks needs ratio or latency_budget.")
    if time_fraction is None or len(time_fraction) != n:
        raise ValueError(f"A latency budget needs each block's time share ({n} values).")
    fixed = 1.0 - sum(time_fraction)
    floor = fixed + sum(time_fraction[i] for i in range(n) if i not in ranked)
    if floor > latency_budget:
        raise ValueError(f"latency_budget={latency_budget} is below what the blocks that must stay cost: "
                         f"{floor:.3f} of the unpruned latency ({keep_note}; the rest of the model is {fixed:.3f}). "
                         f"Use latency_budget >= {math.ceil(floor * 100) / 100:.2f} or a smaller protect_first.")
    removed: list[int] = []
    predicted = 1.0
    for i in ranked:
        if predicted <= latency_budget:
            break
        removed.append(i)
        predicted -= time_fraction[i]
    if len(removed) >= n:
        raise ValueError(f"latency_budget={latency_budget} would remove all {n} blocks; raise the budget.")
    return sorted(removed)


def predicted_latency(time_fraction: Sequence[float], removed: Sequence[int]) -> float:
    """Latency of the pruned forward as a fraction of the unpruned one, by the time-share model."""
    return 1.0 - sum(time_fraction[i] for i in removed)

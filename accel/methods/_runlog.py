"""What caching methods report: per step, which units (blocks or branches) ran."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunLog:
    """Counts executed vs. total units per (step, branch) of the latest sequence, and over all calls.

    ``cost`` weights units (e.g. FFN vs attention FLOPs) so ``compute_fraction`` reflects work, not calls.
    """

    units: int
    cost: dict[str, float] = field(default_factory=dict)
    _ran: dict[tuple[int, int], list[str]] = field(default_factory=lambda: defaultdict(list))
    _skipped: dict[tuple[int, int], list[str]] = field(default_factory=lambda: defaultdict(list))
    total_ran_cost: float = 0.0
    total_cost: float = 0.0

    def reset(self) -> None:
        self._ran.clear()
        self._skipped.clear()

    def totals(self) -> tuple[float, float]:
        return self.total_ran_cost, self.total_cost

    def rewind(self, totals: tuple[float, float]) -> None:
        """Forget the latest sequence and go back to ``totals`` (taken before a call that is not to count)."""
        self.reset()
        self.total_ran_cost, self.total_cost = totals

    def record(self, step: int, branch: int, unit: str, ran: bool) -> None:
        weight = self.cost.get(unit, 1.0)
        (self._ran if ran else self._skipped)[(step, branch)].append(unit)
        self.total_cost += weight
        if ran:
            self.total_ran_cost += weight

    @property
    def compute_fraction(self) -> float:
        """Fraction of cached-unit compute executed since the patch was attached (1.0 before any call)."""
        return self.total_ran_cost / self.total_cost if self.total_cost else 1.0

    def per_step(self) -> list[str]:
        rows = []
        for key in sorted(set(self._ran) | set(self._skipped)):
            ran, skipped = self._ran.get(key, []), self._skipped.get(key, [])
            step, branch = key
            label = f"step {step:>3}" + (f" branch {branch}" if branch else "")
            detail = f"skipped {_compact(skipped)}" if skipped else "all ran"
            rows.append(f"{label}: ran {len(ran)}/{len(ran) + len(skipped)}; {detail}")
        return rows

    @property
    def last_call_fraction(self) -> float | None:
        """Fraction of cached-unit compute executed in the latest sequence (what ``per_step`` lists)."""
        ran = sum(self.cost.get(u, 1.0) for units in self._ran.values() for u in units)
        skipped = sum(self.cost.get(u, 1.0) for units in self._skipped.values() for u in units)
        return ran / (ran + skipped) if ran + skipped else None

    def report(self) -> dict[str, Any]:
        last = self.last_call_fraction
        return {
            "compute_fraction": round(self.compute_fraction, 4),  # over every call since patching
            "compute_fraction_last_call": None if last is None else round(last, 4),
            "per_step": self.per_step(),  # the last call
        }


def _compact(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 6 else ", ".join(names[:3]) + f", ... ({len(names)} in all)"

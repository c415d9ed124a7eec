"""BAC's offline half: similarity matrices, the Adaptive Caching Scheduler (a DP) and the Bubbling Union.

Paper: Ji et al., "Block-wise Adaptive Caching for Accelerating Diffusion Policy" (BAC). Pure
functions over numpy arrays, so each can be checked against brute force on small inputs.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accel.artifacts import architecture_fingerprint, read_artifact, write_artifact
from accel.errors import ArtifactMismatchError
from accel.noise import step_inputs

SCHEDULE_FORMAT = "accel.bac.schedule"
SCHEDULE_VERSION = 1


class Metric(str, enum.Enum):
    """How alike two steps' outputs are. Cosine is a similarity; L1/L2 are distances (minimised)."""

    COSINE = "cosine"
    L1 = "l1"
    L2 = "l2"


def similarity_matrix(features: np.ndarray, metric: Metric) -> np.ndarray:
    """(T, F) per-step features -> (T, T) matrix where larger always means more alike.

    Distances are negated so the scheduler maximises in every case (the reference code maximises
    the L2 distance by mistake; minimising it is what caching wants).
    """
    x = features.astype(np.float64)
    if metric is Metric.COSINE:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        unit = x / np.maximum(norms, 1e-12)
        return unit @ unit.T
    if metric is Metric.L1:
        return -np.abs(x[:, None, :] - x[None, :, :]).mean(axis=-1)
    squared = (x * x).sum(1)
    dist2 = np.maximum(squared[:, None] + squared[None, :] - 2 * x @ x.T, 0.0)
    return -np.sqrt(dist2 / x.shape[1])


def volatility(features: np.ndarray) -> float:
    """Mean L1 change of a branch's output over all pairs of steps (the Bubbling Union's ranking)."""
    x = features.astype(np.float64)
    t = x.shape[0]
    if t < 2:
        return 0.0
    pair_dist = np.abs(x[:, None, :] - x[None, :, :]).mean(axis=-1)
    return float(pair_dist[np.triu_indices(t, k=1)].mean())


def segment_gain(sim: np.ndarray) -> np.ndarray:
    """gain[a, b] = Σ_{t=a..b} sim[a, t]: the similarity collected when step a's output serves a..b."""
    t = sim.shape[0]
    upper = np.triu(sim)
    gain = np.cumsum(upper, axis=1)
    gain[np.tril_indices(t, k=-1)] = -np.inf
    return gain


def schedule_updates(sim: np.ndarray, updates: int) -> list[int]:
    """The K update steps (step 0 first) maximising total similarity between each cached output
    and the steps that reuse it; exact dynamic program, O(K·T²).

    dp[k, i] = best total over steps 0..i using k updates, the last segment ending at i.
    """
    t = sim.shape[0]
    k_max = max(1, min(updates, t))
    gain = segment_gain(sim)
    dp = np.full((k_max + 1, t), -np.inf)
    back = np.zeros((k_max + 1, t), dtype=np.int64)
    dp[1] = gain[0]
    for k in range(2, k_max + 1):
        for i in range(k - 1, t):
            # previous segment ends at j (>= k-2); the new one starts at j+1 and ends at i
            j = np.arange(k - 2, i)
            candidates = dp[k - 1, j] + gain[j + 1, i]
            best = int(np.argmax(candidates))
            dp[k, i] = candidates[best]
            back[k, i] = j[best]
    starts = []
    i = t - 1
    for k in range(k_max, 1, -1):
        j = int(back[k, i])
        starts.append(j + 1)
        i = j
    starts.append(0)
    return sorted(starts)


def bubbling_union(
    schedules: Mapping[str, Sequence[int]],
    volatilities: Mapping[str, float],
    count: int,
    layer_of: Mapping[str, int],
    ffn_branches: set[str],
) -> dict[str, list[int]]:
    """Give the ``count`` most volatile branches the update steps of every FFN at their layer or later,
    so a branch with large caching error is refreshed before downstream FFNs amplify it."""
    result = {name: sorted(steps) for name, steps in schedules.items()}
    ranked = sorted(volatilities, key=lambda name: volatilities[name], reverse=True)[: max(count, 0)]
    for name in ranked:
        merged = set(schedules[name])
        for other in ffn_branches:
            if layer_of[other] >= layer_of[name]:
                merged |= set(schedules[other])
        result[name] = sorted(merged)
    return result


@dataclass
class NoiseLevelDistances:
    """Each unit's mean squared feature distance between every pair of steps of one recorded uncached run,
    kept over noise level: ``tau`` are the run's noise levels (1 = pure noise, descending) and
    ``matrix[unit][i][j]`` = mean ‖f_i − f_j‖². Interpolated at another step count's noise levels it
    gives that count the distances the DP needs, so one calibration serves every step count. (A
    path-length model, ‖f_a − f_t‖ ≈ the summed step changes, does worse at few steps on an ancestral
    sampler, whose noise makes nearby steps' features jitter apart: the measured matrix keeps that.)

    Recorded at the finest step count calibrated, so coarser schedules interpolate rather than invent.
    ``weights`` are per-step weights probed on that run (sensitivities), interpolated the same way;
    ``volatility`` the units' ranking for the Bubbling Union.
    """

    tau: list[float]
    matrix: dict[str, list[list[float]]]
    weights: list[float] | None = None
    volatility: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_features(cls, tau: Sequence[float], features: Mapping[str, np.ndarray],
                      weights: Sequence[float] | None = None,
                      volatilities: Mapping[str, float] | None = None) -> NoiseLevelDistances:
        """``features[unit]``: (T, F) recorded at noise levels ``tau`` (T of them)."""
        matrix = {key: [[float(f"{v:.6g}") for v in row] for row in squared_distances(x)]
                  for key, x in features.items()}
        return cls(tau=[float(t) for t in tau], matrix=matrix,
                   weights=None if weights is None else [float(w) for w in weights],
                   volatility=dict(volatilities or {}))

    @property
    def steps(self) -> int:
        return len(self.tau)

    def _cells(self, tau: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """For each noise level: the recorded step at or before it and its weight towards the next one
        (levels outside the recorded range are held at its ends)."""
        grid = -np.asarray(self.tau, dtype=np.float64)  # ascending
        query = -np.asarray(tau, dtype=np.float64)
        if grid.size == 1:
            return np.zeros(query.size, dtype=np.int64), np.zeros(query.size)
        index = np.clip(np.searchsorted(grid, query, side="right") - 1, 0, grid.size - 2)
        weight = np.clip((query - grid[index]) / (grid[index + 1] - grid[index]), 0.0, 1.0)
        return index, weight

    def distances(self, unit: str, tau: Sequence[float]) -> np.ndarray:
        """(T, T) mean squared feature distances between the steps at noise levels ``tau``, bilinear in the
        recorded matrix; zero on the diagonal (a step does not move from itself)."""
        d = np.asarray(self.matrix[unit], dtype=np.float64)
        if d.shape[0] == 1:
            return np.zeros((len(tau), len(tau)))
        i, w = self._cells(tau)
        lo, hi = (1 - w)[:, None], w[:, None]
        rows = d[i] * lo + d[i + 1] * hi  # (T, recorded)
        result = rows[:, i] * lo.T + rows[:, i + 1] * hi.T
        np.fill_diagonal(result, 0.0)
        return result

    def weights_at(self, tau: Sequence[float]) -> list[float] | None:
        if self.weights is None:
            return None
        i, w = self._cells(tau)
        values = np.asarray(self.weights, dtype=np.float64)
        if values.size == 1:
            return [float(values[0])] * len(tau)
        return (values[i] * (1 - w) + values[i + 1] * w).tolist()

    def to_json(self) -> dict[str, Any]:
        return {"tau": self.tau, "matrix": self.matrix, "weights": self.weights,
                "volatility": self.volatility}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NoiseLevelDistances:
        return cls(tau=list(data["tau"]), matrix={k: [list(r) for r in v] for k, v in data["matrix"].items()},
                   weights=data.get("weights"), volatility=dict(data.get("volatility", {})))


@dataclass
class BACSchedule:
    """Per-branch update steps for each calibrated step count, tied to one model, and the feature distances
    over noise level that derive a schedule for any other step count (:class:`NoiseLevelDistances`)."""

    model: str
    metric: str
    updates: int
    bubbling: int
    steps: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    volatility: dict[int, dict[str, float]] = field(default_factory=dict)
    sensitivity: dict[int, list[float]] = field(default_factory=dict)  # per step, when probed
    call: dict[str, Any] = field(default_factory=dict)  # the call calibrated on (accel.calls.call_shape)
    distances: NoiseLevelDistances | None = None
    # Schedules derived from the distances for step counts met so far (a cache, not saved).
    derived: dict[int, dict[str, frozenset[int]]] = field(default_factory=dict, repr=False, compare=False)

    def empty_copy(self) -> BACSchedule:
        """A schedule for the same model and settings with nothing calibrated yet."""
        return BACSchedule(model=self.model, metric=self.metric, updates=self.updates, bubbling=self.bubbling)

    def for_steps(self, num_steps: int) -> dict[str, list[int]] | None:
        return self.steps.get(num_steps)

    def check_model(self, model: torch.nn.Module) -> None:
        found = architecture_fingerprint(model)
        if found != self.model:
            raise ArtifactMismatchError(
                f"This BAC schedule belongs to model {self.model}, not {found}. Calibrate this model: "
                "accel.methods.bac.calibrate(pipe, num_inference_steps=...)."
            )

    def to_json(self) -> dict[str, Any]:
        """The payload of the schedule's envelope (``accel.artifacts``)."""
        return {
            "model": self.model, "metric": self.metric,
            "updates": self.updates, "bubbling": self.bubbling,
            "steps": {str(k): v for k, v in self.steps.items()},
            "volatility": {str(k): v for k, v in self.volatility.items()},
            "sensitivity": {str(k): v for k, v in self.sensitivity.items()},
            "call": self.call,
            "distances": None if self.distances is None else self.distances.to_json(),
        }

    def save(self, path: str | Path) -> Path:
        return write_artifact(path, SCHEDULE_FORMAT, SCHEDULE_VERSION, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> BACSchedule:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"BAC schedule {str(path)!r} does not exist; write one with BACSchedule.save().")
        data, _ = read_artifact(path, SCHEDULE_FORMAT, SCHEDULE_VERSION, "BAC schedule",
                                "Calibrate again with accel.methods.bac.calibrate(..., save_to=path).")
        return cls(
            model=data["model"], metric=data["metric"], updates=data["updates"], bubbling=data["bubbling"],
            steps={int(k): v for k, v in data["steps"].items()},
            volatility={int(k): v for k, v in data.get("volatility", {}).items()},
            sensitivity={int(k): v for k, v in data.get("sensitivity", {}).items()},
            call=data.get("call", {}),
            distances=NoiseLevelDistances.from_json(data["distances"]) if data.get("distances") else None,
        )


def squared_distances(features: np.ndarray) -> np.ndarray:
    """(T, F) -> (T, T) mean squared distance between steps' features."""
    x = features.astype(np.float64)
    squared = (x * x).sum(1)
    return np.maximum(squared[:, None] + squared[None, :] - 2 * x @ x.T, 0.0) / x.shape[1]


def reuse_error(features: np.ndarray, sensitivity: Sequence[float]) -> np.ndarray:
    """(T, T) predicted output error when step a's value serves step t: s_t · mean‖f_a − f_t‖².

    First-order error propagation: a reuse error e at step t moves the final output by about s_t·‖e‖²
    (in energy), where s_t is measured by ``calibrate``'s probes. Late steps of an ancestral sampler have
    s_t tens of times larger than early ones, which a plain similarity DP cannot see.
    """
    return squared_distances(features) * np.asarray(sensitivity, dtype=np.float64)[None, :]


def step_moves(unit_features: Sequence[np.ndarray]) -> list[float]:
    """m_t = mean ‖f_{t−1} − f_t‖² over units of recorded (T, F) features: what reusing step t − 1's value
    at step t moves them (m_0 = 0: step 0 always runs)."""
    num_steps = unit_features[0].shape[0]
    return [0.0] + [float(np.mean([np.mean((f[t].astype(np.float64) - f[t - 1]) ** 2)
                                   for f in unit_features])) for t in range(1, num_steps)]


def step_sensitivity(output_errors: Mapping[int, float], unit_features: Sequence[np.ndarray]) -> list[float]:
    """s_t = (output error after reusing step t−1's values at step t) / (mean ‖f_{t−1} − f_t‖² over units).

    ``output_errors[t]``: mean squared output change of a probe run that reused every unit at step t only.
    ``unit_features``: (T, F) recorded features of each unit in the reference run. s_0 is 0 (always updated).
    """
    moves = step_moves(unit_features)
    result = [0.0] * len(moves)
    for t, error in output_errors.items():
        result[t] = float(error) / max(moves[t], 1e-20)
    return result


def probe_groups(num_steps: int, groups: int) -> list[list[int]]:
    """The steps each pooled probe reuses at: every other step of ``groups`` equal spans of steps 1..T−1,
    so that each reused step reuses its own predecessor, as a one-step probe does."""
    edges = np.linspace(1, num_steps, min(groups, num_steps - 1) + 1).round().astype(int)
    return [list(range(int(a), int(b), 2)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def pooled_sensitivity(group_errors: Sequence[float], groups: Sequence[Sequence[int]],
                       unit_features: Sequence[np.ndarray]) -> list[float]:
    """Per-step sensitivities from pooled probes: group g's probe reused at every step of ``groups[g]`` at
    once, changing the output by ``group_errors[g]`` (mean squared).

    Errors made at steps far apart add up in energy (they point in unrelated directions), so a group's
    sensitivity is its error over the feature moves it reused, Σ_{t∈g} m_t; between the groups' centres
    log s is interpolated linearly over the step index, and held beyond them. s_0 is 0.
    """
    moves = step_moves(unit_features)
    centres, logs = [], []
    for error, steps in zip(group_errors, groups):
        moved = sum(moves[t] for t in steps)
        centres.append(float(np.mean(steps)))
        logs.append(math.log(max(float(error), 1e-30) / max(moved, 1e-20)))
    values = np.exp(np.interp(np.arange(len(moves)), centres, logs))
    return [0.0] + [float(v) for v in values[1:]]


def noise_weights(scheduler: Any, num_steps: int) -> list[float] | None:
    """A probe-free stand-in for per-step sensitivity: √SNR of each step's input, α_t / σ_t.

    An error made at a noisy step is mostly drowned by the noise still to be removed; one made near the end
    lands in the output. Measured against probed sensitivities (benchmarks/RESULTS.md, "Caching"), √SNR
    tracks them after the first steps and its schedules lose little. ``None`` when the scheduler exposes no
    noise levels accel can read.
    """
    inputs = step_inputs(scheduler, num_steps)
    return None if inputs is None else [step.snr_sqrt for step in inputs]


# ---- schedule strategies: what the DP optimises for each cached unit ------------------------------------

class Weighting(str, enum.Enum):
    """What the scheduler's DP optimises: feature similarity (the paper) or predicted output error."""

    SIMILARITY = "similarity"
    SENSITIVITY = "sensitivity"
    SNR = "snr"
    POOLED = "pooled"


class ScheduleStrategy:
    """How a unit's (T, T) gain matrix for the DP is built from its recorded features (T, F).

    ``online``: it can build a schedule from recorded calls alone, so BAC can calibrate by itself (a call
    of its own before a pipeline call with new settings). ``step_weights`` are per-step weights known
    without probing (``None``: none, or they must be probed by :func:`accel.methods.bac.calibrate`).
    """

    weighting: Weighting
    online: bool = True
    needs_weights: bool = False  # the gain weighs steps (by probed sensitivity or √SNR)
    probes: bool = False  # calibration measures each step's sensitivity with extra pipeline calls

    def step_weights(self, scheduler: Any, num_steps: int) -> list[float] | None:
        return None

    def probe_plan(self, num_steps: int, groups: int) -> list[list[int]]:
        """The steps each probe call reuses at (one call per list); none for strategies that do not probe."""
        return []

    def weights_from_probes(self, errors: Sequence[float], plan: Sequence[Sequence[int]],
                            unit_features: Sequence[np.ndarray]) -> list[float]:
        """Per-step weights from the probes' output errors (``errors[i]`` for ``plan[i]``)."""
        raise NotImplementedError(f"weighting={self.weighting.value!r} does not probe.")

    def gain(self, features: np.ndarray, weights: Sequence[float] | None, metric: Metric) -> np.ndarray:
        raise NotImplementedError

    def derived_gain(self, distances: np.ndarray, weights: Sequence[float] | None) -> np.ndarray:
        """The gain from interpolated :class:`NoiseLevelDistances` (a step count that was not recorded):
        squared distances, so every strategy minimises them, weighted where it weighs steps."""
        if not self.needs_weights:
            return -distances
        if weights is None:
            raise ValueError(f"weighting={self.weighting.value!r} needs per-step weights to derive a "
                             "schedule.")
        return -distances * np.asarray(weights, dtype=np.float64)[None, :]


class SimilarityStrategy(ScheduleStrategy):
    """The paper: maximise the similarity between each reused step and the update it reuses."""

    weighting = Weighting.SIMILARITY

    def gain(self, features: np.ndarray, weights: Sequence[float] | None, metric: Metric) -> np.ndarray:
        return similarity_matrix(features, metric)


class SensitivityStrategy(ScheduleStrategy):
    """Minimise the predicted output error Σ s_t·‖f_a − f_t‖², s_t probed per step."""

    weighting = Weighting.SENSITIVITY
    online = False
    needs_weights = True
    probes = True

    def gain(self, features: np.ndarray, weights: Sequence[float] | None, metric: Metric) -> np.ndarray:
        if weights is None:
            raise ValueError(f"weighting={self.weighting.value!r} needs probed per-step sensitivities.")
        return -reuse_error(features, weights)

    def probe_plan(self, num_steps: int, groups: int) -> list[list[int]]:
        return [[t] for t in range(1, num_steps)]

    def weights_from_probes(self, errors: Sequence[float], plan: Sequence[Sequence[int]],
                            unit_features: Sequence[np.ndarray]) -> list[float]:
        return step_sensitivity({steps[0]: e for e, steps in zip(errors, plan)}, unit_features)


class PooledStrategy(SensitivityStrategy):
    """As ``sensitivity``, with s_t estimated from a few pooled probes (``BACConfig.probe_groups`` calls,
    each reusing at every other step of one span of the steps) instead of one probe per step, so that
    online calibration can afford them."""

    weighting = Weighting.POOLED
    online = True

    def probe_plan(self, num_steps: int, groups: int) -> list[list[int]]:
        return probe_groups(num_steps, groups)

    def weights_from_probes(self, errors: Sequence[float], plan: Sequence[Sequence[int]],
                            unit_features: Sequence[np.ndarray]) -> list[float]:
        return pooled_sensitivity(errors, plan, unit_features)


class SNRStrategy(SensitivityStrategy):
    """As ``sensitivity``, with each step's √SNR (read from the scheduler) in place of probes."""

    weighting = Weighting.SNR
    online = True
    probes = False

    def step_weights(self, scheduler: Any, num_steps: int) -> list[float] | None:
        return noise_weights(scheduler, num_steps)


STRATEGIES: dict[Weighting, ScheduleStrategy] = {
    s.weighting: s for s in (SimilarityStrategy(), SensitivityStrategy(), SNRStrategy(), PooledStrategy())
}

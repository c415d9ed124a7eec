"""BAC, block-wise adaptive caching: each residual branch (self-attention, cross-attention, FFN) of
each block gets its own update steps, chosen by a DP over calibrated feature similarity; the
Bubbling Union refreshes the most volatile branches whenever a downstream FFN updates.

Paper: Ji et al., "Block-wise Adaptive Caching for Accelerating Diffusion Policy" (BAC).

What is cached: the branch module's output (attention / FFN, before the block applies its gate and
adds it to the residual). The block still computes its current adaLN gate and adds the reused output
to the *current* residual stream; for adaLN models the gate is timestep-dependent and cheap, so
reusing the pre-gate output keeps the gate exact, which is never worse than caching it gated.

Calibration is one uncached run per step count (``calibrate``), or happens online: with
``calibrate_online=True`` the first call at a new step count runs in full, records, and later calls
at that step count use the schedule. A schedule is never applied to another step count.

Example::

    schedule = accel.methods.bac.calibrate(pipe, num_inference_steps=50)
    schedule.save("bac-50.json")
    patch = accel.patch(pipe, accel.BACConfig(updates=15, schedule="bac-50.json"))
"""

from __future__ import annotations

import zlib
import enum
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from accel.config import MethodConfig, check_choice, check_int
from accel.errors import ArtifactMismatchError
from accel.hooks import SkipHook
from accel.methods._runlog import RunLog
from accel.methods.bac_schedule import (
    BACSchedule,
    Metric,
    bubbling_union,
    model_fingerprint,
    schedule_updates,
    similarity_matrix,
    volatility,
)
from accel.registry import Stage, register_method


class Granularity(str, enum.Enum):
    """What one cached unit is: a residual branch (the paper) or a whole block reused as a Δ."""

    BRANCH = "branch"
    BLOCK = "block"


@dataclass(frozen=True, kw_only=True)
class BACConfig(MethodConfig):
    """BAC settings.

    Args:
        updates: K, update steps per branch (step 0 always one); clamped to the step count.
            ``None`` (default) uses half the steps, so one config serves every step count.
        metric: similarity used by the scheduler: ``"cosine"`` (default), ``"l1"``, ``"l2"``.
        bubbling: n, the most volatile branches that take the update steps of downstream FFNs (0: off).
        schedule: path of a saved :class:`BACSchedule` (JSON); ``None`` calibrates online.
        calibrate_online: a call at a step count with no schedule runs in full and calibrates.
        max_features: output elements sampled per branch and step for the similarity (bounds memory).
        granularity: ``"branch"`` caches each attention/FFN output (the paper); ``"block"`` gives each
            whole block its own DP schedule and reuses its deviation Δ = output − input (Δ-DiT's cache)
            on skipped steps, which also skips the block's norms and modulation.
        order: 0 reuses a unit's last computed value (the paper); 1 extrapolates linearly from its
            last two computed values (TaylorSeer-style), our extension for longer reuse spans.
    """

    updates: int | None = None
    metric: Metric = Metric.COSINE
    bubbling: int = 3
    schedule: str | None = None
    calibrate_online: bool = True
    max_features: int = 4096
    granularity: Granularity = Granularity.BRANCH
    order: int = 0

    def __post_init__(self) -> None:
        check_int("BACConfig.order", self.order, low=0, high=1)
        object.__setattr__(self, "granularity", check_choice("BACConfig.granularity", self.granularity, Granularity))
        if self.updates is not None:
            check_int("BACConfig.updates", self.updates, low=1)
        object.__setattr__(self, "metric", check_choice("BACConfig.metric", self.metric, Metric))
        check_int("BACConfig.bubbling", self.bubbling, low=0)
        check_int("BACConfig.max_features", self.max_features, low=16)

    def resolved_updates(self, num_steps: int) -> int:
        """K for a given step count."""
        return self.updates if self.updates is not None else math.ceil(num_steps / 2)

    @classmethod
    def sweep_grid(cls, num_steps: int) -> list[dict[str, Any]]:
        """Settings ``accel-bench --sweep`` tries: update budgets from 60% down to 16% of the steps."""
        paper = [{"updates": max(2, round(f * num_steps))} for f in (0.7, 0.6, 0.5, 0.4, 0.3)]
        ours = [{"updates": max(2, round(f * num_steps)), "granularity": "block", "order": 1} for f in (0.6, 0.4)]
        return paper + ours


@dataclass(frozen=True)
class _Branch:
    key: str
    module: torch.nn.Module
    layer: int
    kind: str
    cost: float
    io: Any = None  # a block's BlockIO when the unit is a whole block (Δ reuse)


class BAC:
    """Runtime of one BAC patch: the schedule in force, cached branch outputs, calibration records."""

    def __init__(self, config: BACConfig, branches: list[_Branch], tracker: Any, schedule: BACSchedule) -> None:
        self.config = config
        self.branches = branches
        self.tracker = tracker
        self.schedule = schedule
        self.log = RunLog(units=len(branches), cost={b.key: b.cost for b in branches})
        self.cache: dict[tuple[int, str], Any] = {}
        self.active: dict[str, frozenset[int]] | None = None
        self.recording = False
        self.force_record = False
        self._sequence = -1
        self._inputs: dict[tuple[int, str], dict[str, Any]] = {}
        self._records: dict[int, list[dict[str, dict[int, np.ndarray]]]] = defaultdict(list)

    # -- sequence handling -------------------------------------------------------------------
    def on_reset(self) -> None:
        if not self.force_record:  # ``calibrate`` gathers several calls before building
            self.finish_recording()
        self.cache.clear()
        self.log.reset()

    def _begin_sequence(self) -> None:
        state = self.tracker.state
        self._sequence = state.sequence
        self.cache.clear()
        num_steps = state.num_steps
        plan = self.schedule.for_steps(num_steps) if num_steps is not None else self._single_schedule()
        if self.force_record or (plan is None and self.config.calibrate_online and num_steps is not None):
            self.recording = True
            self.active = None
            self._records[num_steps].append({b.key: {} for b in self.branches})
            return
        if plan is None:
            calibrated = sorted(self.schedule.steps) or "none"
            raise ArtifactMismatchError(
                f"BAC has no schedule for {num_steps if num_steps is not None else 'an unknown number of'} steps "
                f"(calibrated: {calibrated}). Calibrate with accel.methods.bac.calibrate(pipe, "
                f"num_inference_steps={num_steps or 'N'}), or set calibrate_online=True."
            )
        self.recording = False
        self.active = {key: frozenset(steps) for key, steps in plan.items()}

    def _single_schedule(self) -> dict[str, list[int]] | None:
        # A bare model loop has no step count; a schedule with exactly one step count is unambiguous.
        return next(iter(self.schedule.steps.values())) if len(self.schedule.steps) == 1 else None

    # -- hooks ------------------------------------------------------------------------------
    def decide(self, branch: _Branch, args: tuple, kwargs: dict) -> Any:
        state = self.tracker.state
        if state.sequence != self._sequence:
            self._begin_sequence()
        step = state.step_index
        steps = None if self.active is None else self.active.get(branch.key)
        entry = self.cache.get((state.branch, branch.key))
        if self.recording or steps is None or step in steps or entry is None:
            self.log.record(step, state.branch, branch.key, ran=True)
            if branch.io is not None:
                self._inputs[(state.branch, branch.key)] = branch.io.read_inputs(args, kwargs)
            return None
        self.log.record(step, state.branch, branch.key, ran=False)
        cached = entry.estimate(step, self.config.order)
        if branch.io is None:
            return cached
        streams = branch.io.read_inputs(args, kwargs)
        return branch.io.make_output({k: v + cached[k] if v is not None and cached.get(k) is not None else v
                                      for k, v in streams.items()})

    def after(self, branch: _Branch, output: Any) -> Any:
        state = self.tracker.state
        value = output
        if branch.io is not None:  # whole block: what is cached and compared is its deviation Δ
            inputs = self._inputs.pop((state.branch, branch.key), {})
            value = {k: v - inputs[k] if v is not None and inputs.get(k) is not None and inputs[k].shape == v.shape
                     else None for k, v in branch.io.read_outputs(output).items()}
        if self.recording:
            self._record(branch, state.step_index, value)
        elif self.active is not None:
            key = (state.branch, branch.key)
            self.cache[key] = _Cached(value, state.step_index, self.cache.get(key))
        return output

    def _record(self, branch: _Branch, step: int, output: Any) -> None:
        flat = _flatten(output)
        generator = torch.Generator().manual_seed(zlib.crc32(branch.key.encode()))
        count = min(self.config.max_features, flat.numel())
        index = torch.randperm(flat.numel(), generator=generator)[:count]
        record = self._records[self.tracker.state.num_steps][-1][branch.key]
        sample = flat[index].float().cpu().numpy()
        record[step] = np.concatenate([record[step], sample]) if step in record else sample

    # -- calibration ------------------------------------------------------------------------
    def finish_recording(self) -> None:
        """Turn complete recorded sequences into schedules (called at each reset and by ``calibrate``)."""
        if not self.recording:
            return
        self.recording = False
        for num_steps, runs in list(self._records.items()):
            complete = [run for run in runs if all(len(run[b.key]) == num_steps for b in self.branches)]
            if num_steps is None or not complete:
                continue
            self._build(num_steps, complete)
        self._records.clear()

    def _build(self, num_steps: int, runs: list[dict[str, dict[int, np.ndarray]]]) -> None:
        schedules, volatilities = {}, {}
        for branch in self.branches:
            features = np.stack(
                [np.concatenate([run[branch.key][t] for run in runs]) for t in range(num_steps)]
            )  # (T, F * runs)
            sim = similarity_matrix(features, self.config.metric)
            schedules[branch.key] = schedule_updates(sim, self.config.resolved_updates(num_steps))
            volatilities[branch.key] = volatility(features)
        layer_of = {b.key: b.layer for b in self.branches}
        ffns = {b.key for b in self.branches if b.kind in ("ffn", "context_ffn")}
        self.schedule.steps[num_steps] = bubbling_union(
            schedules, volatilities, self.config.bubbling, layer_of, ffns
        )
        self.schedule.volatility[num_steps] = volatilities

    def report(self) -> dict[str, Any]:
        calibrated = sorted(self.schedule.steps)
        summary = {}
        for num_steps in calibrated:
            counts = [len(steps) for steps in self.schedule.steps[num_steps].values()]
            summary[num_steps] = f"{min(counts)}-{max(counts)} updates per branch over {len(counts)} branches"
        return {"schedules": summary or "none yet (calibrates on the first call)", **self.log.report()}


class _Cached:
    """A unit's latest computed value and the one before, for zero- or first-order reuse."""

    __slots__ = ("value", "step", "prev_value", "prev_step")

    def __init__(self, value: Any, step: int, previous: _Cached | None) -> None:
        self.value, self.step = value, step
        self.prev_value = previous.value if previous is not None else None
        self.prev_step = previous.step if previous is not None else None

    def estimate(self, step: int, order: int) -> Any:
        """order 0: reuse the value; order 1: extrapolate along the last two computed values (a
        finite-difference Taylor step, as TaylorSeer does), which tracks features that drift steadily."""
        if order == 0 or self.prev_value is None or self.prev_step == self.step:
            return self.value
        weight = (step - self.step) / (self.step - self.prev_step)
        return _extrapolate(self.value, self.prev_value, weight)


def _extrapolate(value: Any, previous: Any, weight: float) -> Any:
    if isinstance(value, torch.Tensor) and isinstance(previous, torch.Tensor) and value.shape == previous.shape:
        return value + weight * (value - previous)
    if isinstance(value, dict):
        return {k: _extrapolate(v, previous.get(k), weight) for k, v in value.items()}
    if isinstance(value, (tuple, list)) and isinstance(previous, (tuple, list)) and len(value) == len(previous):
        return type(value)(_extrapolate(v, p, weight) for v, p in zip(value, previous))
    return value


def _flatten(output: Any) -> torch.Tensor:
    tensors = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else (output,)
    return torch.cat([t.detach().reshape(-1) for t in tensors if isinstance(t, torch.Tensor)])


def _units(adapter: Any, granularity: Granularity) -> list[_Branch]:
    """The cached units: every residual branch of every block, or every whole block."""
    result = []
    for block in adapter.blocks():
        if granularity is Granularity.BLOCK:
            cost = float(sum(p.numel() for p in block.module.parameters())) or 1.0
            # every block holds an FFN, so for the Bubbling Union each block counts as one
            result.append(_Branch(block.name, block.module, block.index, "ffn", cost, block.io))
            continue
        for kind, module in block.branches().items():
            cost = float(sum(p.numel() for p in module.parameters())) or 1.0
            result.append(_Branch(f"{block.name}.{kind}", module, block.index, kind, cost))
    return result


@register_method(BACConfig, name="bac", stage=Stage.CACHE, needs_denoiser=True,
                 summary="BAC: per-branch update schedules from a similarity DP, with the Bubbling Union")
def _apply(ctx: Any, config: BACConfig) -> BAC:
    fingerprint = model_fingerprint(ctx.model)
    if config.schedule is not None:
        schedule = BACSchedule.load(config.schedule)
        schedule.check_model(ctx.model)
    else:
        schedule = BACSchedule(model=fingerprint, metric=config.metric.value, updates=config.updates or 0,
                               bubbling=config.bubbling)
    runtime = BAC(config, _units(ctx.adapter, config.granularity), ctx.tracker, schedule)
    _check_units(schedule, runtime.branches, config)
    ctx.tracker.on_reset(runtime.on_reset)
    for branch in runtime.branches:
        hook = SkipHook(
            decide=lambda m, a, k, b=branch: runtime.decide(b, a, k),
            after=lambda m, a, k, out, b=branch: runtime.after(b, out),
        )
        ctx.hooks.add_hook(branch.module, hook, f"unit.{branch.key}")
    return runtime


def _check_units(schedule: BACSchedule, units: list[_Branch], config: BACConfig) -> None:
    """A schedule must name exactly this model's units; otherwise steps would silently misalign."""
    expected = {u.key for u in units}
    for num_steps, plan in schedule.steps.items():
        if set(plan) != expected:
            raise ArtifactMismatchError(
                f"The BAC schedule for {num_steps} steps names other cached units than this patch "
                f"(granularity={config.granularity.value!r}): e.g. {sorted(set(plan) ^ expected)[:3]}. "
                "Calibrate again with the same granularity."
            )


def default_calls(pipe: Any, seeds: Sequence[int] = (101, 102)) -> list[dict[str, Any]]:
    """Calibration calls for class-conditional pipelines: every class, a few seeds unlike the benchmark's."""
    return [
        {"class_labels": list(range(10)), "generator": torch.Generator().manual_seed(seed)} for seed in seeds
    ]


def calibrate(
    pipe: Any,
    *,
    num_inference_steps: int | Sequence[int],
    config: BACConfig | None = None,
    calls: Sequence[dict[str, Any]] | None = None,
    save_to: str | None = None,
) -> BACSchedule:
    """Run ``pipe`` uncached at each step count, recording every branch, and return the schedule.

    ``calls``: keyword arguments of each calibration call (default: every class label, two seeds —
    suits class-conditional pipelines such as ``digits-dit``; text pipelines pass their prompts).
    """
    import accel

    config = (config or BACConfig()).replace(schedule=None, calibrate_online=True)
    step_counts = [num_inference_steps] if isinstance(num_inference_steps, int) else list(num_inference_steps)
    calls = list(calls) if calls is not None else default_calls(pipe)
    with accel.patch(pipe, config) as patch:
        runtime: BAC = patch._attached[-1].handle
        runtime.force_record = True
        with tqdm(total=len(step_counts) * len(calls), desc="BAC calibration") as bar:
            for steps in step_counts:
                for kwargs in calls:
                    pipe(**kwargs, num_inference_steps=steps, output_type="np")
                    bar.update()
                runtime.finish_recording()
        schedule = runtime.schedule
    if save_to is not None:
        schedule.save(save_to)
    return schedule

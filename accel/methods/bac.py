"""BAC, block-wise adaptive caching: each residual branch (self-attention, cross-attention, FFN) of
each block gets its own update steps, chosen by a DP over calibrated feature similarity; the
Bubbling Union refreshes the most volatile branches whenever a downstream FFN updates.

Paper: Ji et al., "Block-wise Adaptive Caching for Accelerating Diffusion Policy" (BAC).

What is cached: the branch module's output (attention / FFN, before the block applies its gate and
adds it to the residual). The block still computes its current adaLN gate and adds the reused output
to the *current* residual stream; for adaLN models the gate is timestep-dependent and cheap, so
reusing the pre-gate output keeps the gate exact, which is never worse than caching it gated.

Calibration records uncached runs: explicitly (``calibrate``, on the calls and step counts given), or,
with ``calibrate_online=True`` and no schedule, before the first pipeline call with new settings (sizes,
frames, guidance), by one call of accel's own fixed conditions and seeds with those settings at
``calibration_steps``. Either way the schedule keeps each unit's feature distances between steps over noise
level (``bac_schedule.NoiseLevelDistances``), from which the DP derives the schedule of any step count the
pipeline is later called with. With online calibration every call, the first included, runs cached, and a
call's output depends only on the model, the calibration and its own inputs, never on the calls before it.
A bare model (no pipeline to run a calibration call on) records its first loop at each step count instead.

Where each part lives: this module is the per-step path (units, reuse decisions, cache, recording);
``bac_schedule`` the DP, the Bubbling Union and the schedule strategies (similarity, probed sensitivity,
√SNR); ``bac_calibrate`` the offline calibration; ``bac_stack`` the whole-stack Δ or x̂0 reuse that
``granularity="stack"`` selects, which is accel's extension and not the paper's method.

Example::

    schedule = accel.methods.bac.calibrate(pipe, num_inference_steps=50)
    schedule.save("bac-50.json")
    patch = accel.patch(pipe, accel.BACConfig(updates=15, schedule="bac-50.json"))
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import warnings
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from accel.artifacts import architecture_fingerprint
from accel.config import MethodConfig, check_choice, check_float, check_int
from accel.contract import PatchContext
from accel.errors import ArtifactMismatchError, UnsupportedModelError
from accel.hooks import SkipHook
from accel.methods._runlog import RunLog
from accel.methods._streams import add_streams, require_residual_chain, subtract_streams
from accel.methods.bac_schedule import (
    STRATEGIES,
    BACSchedule,
    Metric,
    NoiseLevelDistances,
    Weighting,
    bubbling_union,
    schedule_updates,
    volatility,
)
from accel.noise import noise_levels
from accel.parallel import check_agreement, context_parallel_group, gather_records
from accel.precision import computed_in_fp32
from accel.registry import Stage, register_method


class Granularity(str, enum.Enum):
    """What one cached unit is: a residual branch (the paper), a whole block reused as a Δ, or the
    whole block stack reused as one Δ (not the paper's method: ``accel.methods.bac_stack``)."""

    BRANCH = "branch"
    BLOCK = "block"
    STACK = "stack"


class Reuse(str, enum.Enum):
    """What a reused step of the stack unit returns: the blocks' cached Δ added to the current input
    (the embeddings and output layer run), or the denoiser's cached clean-sample estimate x̂0 re-expressed
    at the current noisy input (nothing runs; ``accel.methods.bac_stack``)."""

    DELTA = "delta"
    X0 = "x0"


@dataclass(frozen=True, kw_only=True)
class BACConfig(MethodConfig):
    """BAC settings.

    Args:
        updates: K, update steps per branch (step 0 always one); clamped to the step count.
            ``None`` (default) uses ``update_fraction`` of the steps, so one config serves every step count.
        metric: similarity used by the scheduler: ``"cosine"`` (default), ``"l1"``, ``"l2"``.
        bubbling: n, the most volatile branches that take the update steps of downstream FFNs (0: off).
        schedule: path of a saved :class:`BACSchedule` (JSON); ``None`` calibrates online.
        calibrate_online: with no schedule, calibrate before the first pipeline call with new settings: one
            recorded call of ``calibration_batch`` spread conditions on fixed seeds, with that call's sizes
            and guidance, at ``calibration_steps``. On a bare model (no pipeline to call) the first loop at
            each step count runs in full and records instead.
        max_features: output elements sampled per branch and step for the similarity (bounds memory).
        granularity: ``"branch"`` caches each attention/FFN output (the paper); ``"block"`` gives each
            whole block its own DP schedule and reuses its deviation Δ = output − input (Δ-DiT's cache)
            on skipped steps, which also skips the block's norms and modulation; ``"stack"`` treats all
            blocks as one unit (Δ of the whole stack, one schedule): a skipped step costs only the
            embeddings and the output layer, which still see the current timestep.
        order: 0 reuses a unit's last computed value (the paper); 1 extrapolates linearly from its
            last two computed values (TaylorSeer-style), our extension for longer reuse spans.
        weighting: ``"similarity"`` (the paper) maximises feature similarity; ``"sensitivity"`` minimises
            the predicted output error Σ s_t·‖f_a − f_t‖², with each step's sensitivity s_t measured by
            probes in :func:`calibrate` (one extra pipeline call per step). It needs ``calibrate``:
            online calibration cannot probe. ``"snr"`` uses √SNR of each step (read from the pipeline's
            scheduler) in place of the probed s_t: no probes, so it calibrates online too. ``"pooled"``
            estimates s_t from ``probe_groups`` pooled probes (each reuses at every other step of one span
            of the steps; log s_t interpolated between them), cheap enough for online calibration:
            1 + ``probe_groups`` calls of accel's own, with any scheduler.
        update_fraction: K as a fraction of the step count (rounded up) when ``updates`` is ``None``.
        calibration_steps: step count of the online calibration call: the feature distances are recorded at
            this resolution and serve every step count (finer than the calls they serve keeps them exact).
        calibration_batch: samples in the online calibration call.
        fp32_calibration: accel's own calibration calls (online, and :func:`calibrate`'s) compute a half
            precision denoiser in float32, each module's weights upcast only while it runs
            (``accel.precision``); the schedule then does not depend on the dtype the model is stored
            in. bf16 arithmetic adds an error of the size of the small feature distances the DP compares
            near its ties, so a schedule calibrated from bf16 features flips some of them and loses
            quality a float32 one keeps (RESULTS, bf16). ``False`` calibrates in the model's dtype (no
            conversions).
        probe_groups: pooled probe calls of ``weighting="pooled"`` (spans of the steps it measures).
        reuse: with ``granularity="stack"``, what a reused step returns. ``"delta"`` adds the stack's cached
            Δ to the current input and runs the embeddings and output layer. ``"x0"`` runs nothing: the
            denoiser's last output, held as the clean-sample estimate x̂0 it stands for (read with the
            scheduler's prediction type and noise levels, ``accel.noise``), is re-expressed at the current
            noisy input. Under a sampler that adds fresh noise each step (ancestral DDPM) or combines past
            outputs (DPM-Solver++), x̂0 moves far less from step to step than ε or the features do, so the
            same schedule loses less. Needs a pipeline whose scheduler gives both.

    Our recipe (benchmarks/RESULTS.md, "Caching"): ``granularity="stack"`` with a sensitivity-weighted DP
    (``"sensitivity"``, ``"pooled"`` or ``"snr"``), which beat cosine-similarity weighting at the same update
    budget: an ancestral sampler's last steps are far more sensitive than its first, so the weighted DP
    spends its updates late, where the plain DP spends them early; and ``reuse="x0"`` where the pipeline's
    scheduler allows it, which lost less than Δ reuse at every budget measured.
    """

    updates: int | None = None
    metric: Metric = Metric.COSINE
    bubbling: int = 3
    schedule: str | None = None
    calibrate_online: bool = True
    max_features: int = 4096
    granularity: Granularity = Granularity.BRANCH
    order: int = 0
    weighting: Weighting = Weighting.SIMILARITY
    update_fraction: float = 0.5
    calibration_steps: int = 50
    calibration_batch: int = 4
    fp32_calibration: bool = True
    probe_groups: int = 2
    reuse: Reuse = Reuse.DELTA

    def __post_init__(self) -> None:
        check_int("BACConfig.calibration_steps", self.calibration_steps, low=2)
        check_int("BACConfig.calibration_batch", self.calibration_batch, low=1)
        check_int("BACConfig.probe_groups", self.probe_groups, low=1)
        check_float("BACConfig.update_fraction", self.update_fraction, low=0.0, high=1.0)
        if self.update_fraction == 0:
            raise ValueError("BACConfig.update_fraction must be > 0 (step 0 is always an update), got 0.")
        check_int("BACConfig.order", self.order, low=0, high=1)
        object.__setattr__(self, "granularity", check_choice("BACConfig.granularity", self.granularity, Granularity))
        object.__setattr__(self, "weighting", check_choice("BACConfig.weighting", self.weighting, Weighting))
        if self.updates is not None:
            check_int("BACConfig.updates", self.updates, low=1)
        object.__setattr__(self, "metric", check_choice("BACConfig.metric", self.metric, Metric))
        check_int("BACConfig.bubbling", self.bubbling, low=0)
        object.__setattr__(self, "reuse", check_choice("BACConfig.reuse", self.reuse, Reuse))
        if self.reuse is Reuse.X0 and self.granularity is not Granularity.STACK:
            raise ValueError(f"BACConfig(reuse='x0') reuses the whole denoiser's output, so it needs "
                             f"granularity='stack', got granularity={self.granularity.value!r}.")
        check_int("BACConfig.max_features", self.max_features, low=16)

    def resolved_updates(self, num_steps: int) -> int:
        """K for a given step count."""
        return self.updates if self.updates is not None else max(1, math.ceil(self.update_fraction * num_steps))

    @classmethod
    def sweep_grid(cls, num_steps: int) -> list[dict[str, Any]]:
        """Settings ``accel-bench --sweep`` tries: the paper's recipe at 70% down to 30% of the steps, the
        stack unit with pooled probes at 40% down to 12% (its error stays low far below the paper's
        budgets), the probe-free √SNR weighting, and √SNR with x̂0 reuse from 60% down to 20% (one setting
        per distinct update count)."""
        paper = [{"updates": max(2, round(f * num_steps))} for f in (0.7, 0.6, 0.5, 0.4, 0.3)]
        budgets = sorted({max(2, round(f * num_steps)) for f in (0.4, 0.3, 0.22, 0.16, 0.12)}, reverse=True)
        pooled = [{"updates": k, "granularity": "stack", "weighting": "pooled"} for k in budgets]
        snr = [{"granularity": "stack", "weighting": "snr", "update_fraction": f} for f in (0.5, 0.34)]
        by_count = {math.ceil(f * num_steps): f for f in (0.2, 0.24, 0.3, 0.4, 0.45, 0.5, 0.6)}
        x0 = [{"granularity": "stack", "weighting": "snr", "reuse": "x0", "update_fraction": f}
              for _, f in sorted(by_count.items(), reverse=True)]
        return paper + pooled + snr + x0


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

    def __init__(self, config: BACConfig, branches: list[_Branch], tracker: Any, schedule: BACSchedule,
                 scheduler: Any = None, model: torch.nn.Module | None = None) -> None:
        self.config = config
        self.model = model  # read for its context-parallel group when schedules are built
        self.scheduler = scheduler
        self.strategy = STRATEGIES[config.weighting]
        self.prior_weights: dict[int, list[float]] = {}  # per-step weights known before calibration (√SNR)
        self.branches = branches
        self.tracker = tracker
        self.schedule = schedule
        self.log = RunLog(units=len(branches), cost={b.key: b.cost for b in branches})
        self.cache: dict[tuple[int, str], Any] = {}
        self.active: dict[str, frozenset[int]] | None = None
        self.override: dict[str, frozenset[int]] | None = None  # calibration probes
        self.order = config.order
        self.recording = False
        self.force_record = False
        self._sequence = -1
        self._inputs: dict[tuple[int, str], dict[str, Any]] = {}
        self._records: dict[int, list[dict[str, dict[int, np.ndarray]]]] = defaultdict(list)
        self._recorded_levels: dict[int, list[float] | None] = {}  # noise levels of each recorded step count
        self.by_settings: dict[str, BACSchedule] = {}  # online calibration: a schedule per call settings
        self.calibration_generations = 0
        self.calibrated_in: str | None = None  # the dtype accel's own calibration calls computed in
        self._no_calibration_call = False

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
        if self.override is not None:
            self.recording, self.active = False, self.override
            return
        num_steps = state.num_steps
        plan = self._plan(num_steps)
        online = self.config.calibrate_online and self.strategy.online
        if self.force_record or (plan is None and online and num_steps is not None):
            if self.strategy.needs_weights and not self.strategy.probes:
                self.prior_weights[num_steps] = self._step_weights(num_steps)
            self._recorded_levels[num_steps] = noise_levels(self.scheduler, num_steps)
            self.recording = True
            self.active = None
            self._records[num_steps].append({b.key: {} for b in self.branches})
            return
        if plan is None:
            calibrated = sorted(self.schedule.steps) or "none"
            raise ArtifactMismatchError(
                f"BAC has no schedule for {num_steps if num_steps is not None else 'an unknown number of'} steps "
                f"(calibrated: {calibrated}"
                + (f", on calls {self.schedule.call}" if self.schedule.call else "")
                + "). Calibrate with accel.methods.bac.calibrate(pipe, "
                f"num_inference_steps={num_steps or 'N'}, config=...)"
                + (", or set calibrate_online=True." if self.strategy.online
                   else " (weighting='sensitivity' probes the pipeline, which online calibration cannot).")
            )
        self.recording = False
        self.active = {key: frozenset(steps) for key, steps in plan.items()}

    def _plan(self, num_steps: int | None) -> dict[str, Any] | None:
        """The update steps per unit for a call of ``num_steps``: calibrated at that count, or derived from
        the recorded feature distances at this call's noise levels."""
        if num_steps is None:
            return self._single_schedule()
        plan = self.schedule.for_steps(num_steps)
        if plan is None and self.schedule.distances is not None:
            plan = self.schedule.derived.get(num_steps) or self._derive(num_steps)
        return plan

    def _derive(self, num_steps: int) -> dict[str, frozenset[int]] | None:
        recorded = self.schedule.distances
        levels = noise_levels(self.scheduler, num_steps)
        if recorded is None or levels is None:
            return None
        if not self.strategy.needs_weights:
            weights = None
        elif self.strategy.probes:
            weights = recorded.weights_at(levels)
        else:
            weights = self._step_weights(num_steps)
        updates = self.config.resolved_updates(num_steps)
        schedules = {}
        for unit in self.branches:
            gain = self.strategy.derived_gain(recorded.distances(unit.key, levels), weights)
            schedules[unit.key] = schedule_updates(gain, updates)
        plan = bubbling_union(schedules, recorded.volatility, self.config.bubbling, *self._layout())
        self.schedule.derived[num_steps] = {key: frozenset(steps) for key, steps in plan.items()}
        return self.schedule.derived[num_steps]

    def _layout(self) -> tuple[dict[str, int], set[str]]:
        """Each unit's layer and the FFN units, as the Bubbling Union needs them."""
        ffns = {b.key for b in self.branches if b.kind in ("ffn", "context_ffn")}
        return {b.key: b.layer for b in self.branches}, ffns

    @property
    def calibrates_per_call(self) -> bool:
        """Online calibration on a pipeline: a recorded call of accel's own before calls with new settings."""
        return (self.config.schedule is None and self.config.calibrate_online and self.strategy.online
                and not self._no_calibration_call)

    def before_call(self, pipeline: Any, kwargs: dict[str, Any]) -> None:
        """Runs before each pipeline call: selects the schedule for this call's settings (sizes, frames,
        guidance...), calibrated the first time they are seen by one recorded call of accel's own conditions
        and seeds with those settings at ``calibration_steps``. Its feature distances serve every step count,
        so the output depends on the call alone, not on the calls before it."""
        if not self.calibrates_per_call:
            return
        from accel.methods.bac_calibrate import calibration_settings

        settings = calibration_settings(kwargs)
        key = json.dumps(settings, sort_keys=True, default=str)
        if key not in self.by_settings:
            self.by_settings[key] = self._calibrate_for(pipeline, settings)
        self.schedule = self.by_settings[key]

    def _calibrate_for(self, pipeline: Any, settings: dict[str, Any]) -> BACSchedule:
        from accel.calls import UnsupportedPipelineError, call_shape
        from accel.methods.bac_calibrate import calibration_call

        steps = self.config.calibration_steps
        try:
            kwargs = {**calibration_call(pipeline, batch=self.config.calibration_batch), **settings,
                      "num_inference_steps": steps}
        except UnsupportedPipelineError as error:
            warnings.warn(
                f"BAC cannot build its calibration call ({error}); it records the first call at each step "
                "count instead, so later calls depend on which came first. For reproducible output pass "
                "schedule= a file from accel.methods.bac.calibrate(pipe, num_inference_steps=N, "
                "calls=[...]).",
                stacklevel=3)
            self._no_calibration_call = True
            return self.schedule
        previous, self.schedule = self.schedule, self.schedule.empty_copy()
        totals = self.log.totals()
        calls = 1
        try:
            with self.calibration_precision() as upcast:
                calls += self._record_calibration(pipeline, kwargs, steps)
            self.calibrated_in = _dtype_name(torch.float32 if upcast else _stored_dtype(self.model))
        finally:
            self.log.rewind(totals)  # a calibration call is no user's call
            calibrated, self.schedule = self.schedule, previous
        calibrated.call = call_shape(kwargs)
        self.calibration_generations += calls
        return calibrated

    def calibration_precision(self) -> contextlib.AbstractContextManager[bool]:
        """The context accel's own calibration calls run in (``BACConfig.fp32_calibration``)."""
        return computed_in_fp32(self.model) if self.config.fp32_calibration else contextlib.nullcontext(False)

    def _record_calibration(self, pipeline: Any, kwargs: dict[str, Any], steps: int) -> int:
        """One recorded call of ``kwargs`` and the strategy's probes; builds the schedule into
        ``self.schedule``. Returns the probe calls run."""
        from accel.methods.bac_calibrate import _generator_states, probe_sensitivity, record_run

        states = _generator_states(kwargs)
        reference = record_run(self, pipeline, kwargs, steps)
        records = self.take_records()
        if len(records) != 1:
            raise RuntimeError(f"BAC's calibration call recorded no complete {steps}-step run (recorded: "
                               f"{sorted(records) or 'none'}); does the pipeline call its denoiser once "
                               "per step?")
        (forwards, runs), = records.items()
        weights, probes = self.prior_weights.get(forwards), 0
        if self.strategy.probes:
            weights, probes = probe_sensitivity(self, pipeline, kwargs, steps, forwards, states,
                                                reference, runs[0])
        self.build(forwards, runs, weights)
        return probes

    def _step_weights(self, num_steps: int) -> list[float]:
        weights = self.strategy.step_weights(self.scheduler, num_steps)
        if weights is None:
            raise UnsupportedModelError(
                f"BAC weighting='snr' cannot read per-step noise levels from {type(self.scheduler).__name__} "
                f"(for {num_steps} steps). Use weighting='sensitivity' with accel.methods.bac.calibrate, "
                "or weighting='similarity'."
            )
        return weights

    def _single_schedule(self) -> dict[str, list[int]] | None:
        # A bare model loop has no step count; a schedule with exactly one step count is unambiguous.
        return next(iter(self.schedule.steps.values())) if len(self.schedule.steps) == 1 else None

    # -- hooks ------------------------------------------------------------------------------
    def _reuse(self, unit: _Branch) -> Any:
        """The value ``unit`` reuses at the current step, or ``None`` when it must run."""
        state = self.tracker.state
        if state.sequence != self._sequence:
            self._begin_sequence()
        steps = None if self.active is None else self.active.get(unit.key)
        entry = self.cache.get((state.branch, unit.key))
        if self.recording or steps is None or state.step_index in steps or entry is None:
            return None
        return entry.estimate(state.step_index, self.order)

    def decide(self, branch: _Branch, args: tuple, kwargs: dict) -> Any:
        state = self.tracker.state
        cached = self._reuse(branch)
        self.log.record(state.step_index, state.branch, branch.key, ran=cached is None)
        if cached is None:
            if branch.io is not None:
                self._inputs[(state.branch, branch.key)] = branch.io.read_inputs(args, kwargs)
            return None
        if branch.io is None:
            return cached
        return branch.io.make_output(add_streams(branch.io.read_inputs(args, kwargs), cached))

    def after(self, branch: _Branch, output: Any, io: Any = None) -> Any:
        state = self.tracker.state
        value = output
        io = io or branch.io
        if io is not None:  # whole block(s): what is cached and compared is the deviation Δ
            inputs = self._inputs.pop((state.branch, branch.key), {})
            value = subtract_streams(io.read_outputs(output), inputs)
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
        for num_steps, runs in self.take_records().items():
            self.build(num_steps, runs, self.prior_weights.get(num_steps))

    def take_records(self) -> dict[int, list[dict[str, dict[int, np.ndarray]]]]:
        """Stop recording and hand over the complete recorded runs per step count."""
        if not self.recording:
            return {}
        self.recording = False
        result = {}
        for num_steps, runs in self._records.items():
            complete = [run for run in runs if all(len(run[b.key]) == num_steps for b in self.branches)]
            if num_steps is not None and complete:
                result[num_steps] = complete
        self._records.clear()
        # Under context parallelism each rank recorded its own slice of the tokens: every rank builds from
        # all slices, so every rank skips the same units (a unit skipped on one rank only would hang the
        # others in attention's collectives).
        return gather_records(result, context_parallel_group(self.model))

    def build(self, num_steps: int, runs: list[dict[str, dict[int, np.ndarray]]],
              weights: list[float] | None = None) -> None:
        """Schedules for ``num_steps`` from recorded runs and per-step weights (probed sensitivities or
        √SNR; unused by the similarity strategy)."""
        schedules, volatilities, recorded = {}, {}, {}
        for branch in self.branches:
            features = np.stack(
                [np.concatenate([run[branch.key][t] for run in runs]) for t in range(num_steps)]
            )  # (T, F * runs)
            gain = self.strategy.gain(features, weights, self.config.metric)
            schedules[branch.key] = schedule_updates(gain, self.config.resolved_updates(num_steps))
            volatilities[branch.key] = volatility(features)
            recorded[branch.key] = features
        self.schedule.steps[num_steps] = bubbling_union(
            schedules, volatilities, self.config.bubbling, *self._layout()
        )
        check_agreement(f"BAC's {num_steps}-step schedule", self.schedule.steps[num_steps],
                        context_parallel_group(self.model))
        self.schedule.volatility[num_steps] = volatilities
        if weights is not None:
            # six significant digits, not six decimals: sensitivities span decades (1e-5 .. 1)
            self.schedule.sensitivity[num_steps] = [float(f"{w:.6g}") for w in weights]
        levels = self._recorded_levels.get(num_steps)
        known = self.schedule.distances
        if levels is not None and (known is None or num_steps >= known.steps):
            probed = weights if self.strategy.probes else None
            self.schedule.distances = NoiseLevelDistances.from_features(levels, recorded, probed,
                                                                        volatilities)
            self.schedule.derived.clear()

    def remove(self) -> None:
        self.cache.clear()
        self._inputs.clear()

    def report(self) -> dict[str, Any]:
        summary = {}
        plans = {**{k: ("calibrated", v) for k, v in self.schedule.steps.items()},
                 **{k: ("derived over noise level", v) for k, v in self.schedule.derived.items()}}
        for num_steps in sorted(plans):
            source, plan = plans[num_steps]
            counts = [len(steps) for steps in plan.values()]
            summary[num_steps] = (f"{min(counts)}-{max(counts)} updates per branch over {len(counts)} "
                                  f"branches ({source})")
        pending = sorted(k for k, runs in self._records.items() if k is not None and runs)
        if summary:
            schedules: Any = summary
        elif pending:
            schedules = (f"recorded a {', '.join(map(str, pending))}-step call; its schedule is built when "
                         "the next call starts")
        else:
            schedules = "none yet (calibrates on the first call)"
        calibrated_on = {"calibrated_on": self.schedule.call} if self.schedule.call else {}
        # Pipeline calls this patch ran to calibrate (0 with a saved or explicitly calibrated schedule).
        cost = {"calibration_generations": self.calibration_generations}
        if self.calibrated_in is not None:
            stored = _dtype_name(_stored_dtype(self.model))
            cost["calibrated_in"] = f"{self.calibrated_in} (model stored in {stored})"
        return {"schedules": schedules, **calibrated_on, **cost, **self.log.report()}


def _stored_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype most of the model's floating parameters are stored in."""
    counts: dict[torch.dtype, int] = defaultdict(int)
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] += p.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Cached:
    """A unit's latest computed value and the one before, for zero- or first-order reuse."""

    __slots__ = ("prev_step", "prev_value", "step", "value")

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


def _cost(module: torch.nn.Module) -> float:
    """A unit's compute weight in the run log: its parameter count (at least 1)."""
    return float(sum(p.numel() for p in module.parameters())) or 1.0


def _units(adapter: Any, granularity: Granularity) -> list[_Branch]:
    """The cached units: every residual branch of every block, every whole block, or the whole stack."""
    result = []
    if granularity is Granularity.STACK:
        from accel.methods.bac_stack import stack_unit

        return [stack_unit(adapter)]
    for block in adapter.blocks():
        if granularity is Granularity.BLOCK:
            cost = _cost(block.module)
            # every block holds an FFN, so for the Bubbling Union each block counts as one
            result.append(_Branch(block.name, block.module, block.index, "ffn", cost, block.io))
            continue
        for kind, module in block.branches().items():
            cost = _cost(module)
            result.append(_Branch(f"{block.name}.{kind}", module, block.index, kind, cost))
    return result


@register_method(BACConfig, name="bac", stage=Stage.CACHE, needs_denoiser=True,
                 summary="BAC: per-branch update schedules from a similarity DP, with the Bubbling Union")
def _apply(ctx: PatchContext, config: BACConfig) -> BAC:
    fingerprint = architecture_fingerprint(ctx.model)
    if config.schedule is not None:
        schedule = BACSchedule.load(config.schedule)
        schedule.check_model(ctx.model)
    else:
        schedule = BACSchedule(model=fingerprint, metric=config.metric.value, updates=config.updates or 0,
                               bubbling=config.bubbling)
    if config.granularity is Granularity.STACK:
        require_residual_chain(ctx, "BAC granularity 'stack'", "Use granularity 'branch'.")
    scheduler = getattr(ctx.pipeline, "scheduler", None)
    strategy = STRATEGIES[config.weighting]
    if strategy.needs_weights and not strategy.probes and scheduler is None and config.schedule is None:
        raise ValueError(
            "BACConfig(weighting='snr') reads noise levels from the pipeline's scheduler; patch the pipeline, "
            "not the bare model (or use weighting='similarity')."
        )
    if strategy.probes and strategy.online and config.schedule is None and ctx.pipeline is None:
        raise ValueError(
            "BACConfig(weighting='pooled') probes the pipeline with calls of accel's own; patch the "
            "pipeline, not the bare model, or pass schedule= a file from accel.methods.bac.calibrate(pipe, ...)."
        )
    if strategy.probes and not strategy.online and config.schedule is None and config.calibrate_online:
        raise ValueError(
            "BACConfig(weighting='sensitivity') needs a schedule from accel.methods.bac.calibrate(pipe, "
            "num_inference_steps=N, config=...), which probes each step's sensitivity; online calibration "
            "cannot. Pass schedule=<the saved JSON>, or use weighting='similarity'."
        )
    if config.granularity is Granularity.STACK:
        from accel.methods.bac_stack import StackReuse, hook_stack

        stack = StackReuse(config, _units(ctx.adapter, config.granularity), ctx.tracker, schedule, scheduler,
                           ctx.model)
        _check_units(schedule, stack.branches, config)
        ctx.tracker.on_reset(stack.on_reset)
        hook_stack(ctx, stack)
        return stack
    runtime = BAC(config, _units(ctx.adapter, config.granularity), ctx.tracker, schedule, scheduler,
                  ctx.model)
    _check_units(schedule, runtime.branches, config)
    ctx.tracker.on_reset(runtime.on_reset)
    # Decisions run compiler-disabled: they read per-unit schedules and the step, which as guards would
    # recompile at every step; each unit's own compute still compiles, shared across blocks of a kind.
    for branch in runtime.branches:
        hook = SkipHook(
            decide=torch.compiler.disable(lambda m, a, k, b=branch: runtime.decide(b, a, k)),
            after=torch.compiler.disable(lambda m, a, k, out, b=branch: runtime.after(b, out)),
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


# Calibration lives in its own module; ``accel.methods.bac.calibrate`` stays the public name.
from accel.methods.bac_calibrate import calibrate, default_calls  # noqa: E402,F401

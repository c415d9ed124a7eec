"""BAC's offline step: run the pipeline uncached, record every cached unit, build the schedules.

Kept out of ``accel.methods.bac`` (the per-step hot path). ``accel.methods.bac.calibrate`` is the public
name of :func:`calibrate`.

    schedule = accel.methods.bac.calibrate(pipe, num_inference_steps=50, config=accel.BACConfig())
    schedule.save("bac-50.json")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from accel.methods.bac import BAC, BACConfig
from accel.methods.bac_schedule import STRATEGIES, BACSchedule


def default_calls(pipe: Any, seeds: Sequence[int] = (101, 102)) -> list[dict[str, Any]]:
    """Calibration calls when none are given: built-in prompts or spread class labels, other seeds than
    a benchmark's (see :func:`accel.calls.default_calls`)."""
    from accel.calls import default_calls as calls_for

    return calls_for(pipe, seeds)


def calibration_call(pipe: Any, *, batch: int, seed: int = 101) -> dict[str, Any]:
    """accel's own calibration call: ``batch`` conditions spread over the classes (or the folder's / built-in
    prompts), a fixed seed, the pipeline's other defaults. Fixed, so an online calibration never depends on
    what the user asks for."""
    from accel.calls import default_calls as calls_for
    from accel.calls import default_conditions

    return calls_for(pipe, [seed], conditions=default_conditions(pipe, batch))[0]


#: What a calibration call for another call takes from it: its scalar settings (sizes, frames, guidance, text
#: length...), not its conditions, seeds, steps, inputs, callbacks or output format, which are accel's own.
_NOT_SETTINGS = ("prompt", "negative", "pooled", "class_labels", "generator", "latents",
                 "num_inference_steps", "timesteps", "sigmas", "output_type", "return_dict", "callback",
                 "image", "mask", "control", "video", "ip_adapter")


def calibration_settings(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The settings of a call that its calibration call shares (see ``_NOT_SETTINGS``)."""
    return {k: v for k, v in kwargs.items()
            if isinstance(v, (bool, int, float, str)) and not k.startswith(_NOT_SETTINGS)}


def record_run(runtime: BAC, pipe: Any, kwargs: dict[str, Any], steps: int) -> np.ndarray:
    """One uncached pipeline call with every unit recorded; its output."""
    runtime.force_record = True
    try:
        return _run(pipe, kwargs, steps)
    finally:
        runtime.force_record = False


def calibrate(
    pipe: Any,
    *,
    num_inference_steps: int | Sequence[int],
    config: BACConfig | None = None,
    calls: Sequence[dict[str, Any]] | None = None,
    save_to: str | None = None,
    sensitivity: Mapping[int, Sequence[float]] | None = None,
) -> BACSchedule:
    """Run ``pipe`` uncached at each step count, recording every unit, and return the schedule.

    ``calls``: keyword arguments of each calibration call (default: every class label, two seeds —
    suits class-conditional pipelines such as ``digits-dit``; text pipelines pass their prompts).
    With ``config.weighting == "sensitivity"`` each step count also costs T − 1 probe calls (the first
    call again, reusing every unit at one step t): the output change per unit of feature change is
    that step's sensitivity s_t; ``"pooled"`` costs ``config.probe_groups`` calls, each reusing at
    every other step of one span of the steps. ``sensitivity`` (e.g. an earlier schedule's
    ``.sensitivity``) skips the probes for the step counts it covers: s_t depends on the model, sampler
    and step count, not on the update budget.
    """
    import accel
    from accel.registry import spec_for_config

    config = (config or BACConfig()).replace(schedule=None, calibrate_online=False)
    step_counts = [num_inference_steps] if isinstance(num_inference_steps, int) else list(num_inference_steps)
    calls = list(calls) if calls is not None else default_calls(pipe)
    strategy = STRATEGIES[config.weighting]
    known = dict(sensitivity or {})
    total = sum(len(calls) + (0 if steps in known else len(strategy.probe_plan(steps, config.probe_groups)))
                for steps in step_counts)
    with accel.patch(pipe, config) as patch, tqdm(total=total, desc="BAC calibration") as bar:
        runtime: BAC = patch.handle(spec_for_config(config).name)
        with runtime.calibration_precision():
            _calibrate_step_counts(runtime, pipe, step_counts, calls, known, bar)
        schedule = runtime.schedule
        from accel.calls import call_shape

        schedule.call = call_shape(calls[0])
    if save_to is not None:
        schedule.save(save_to)
    return schedule


def _calibrate_step_counts(runtime: BAC, pipe: Any, step_counts: Sequence[int],
                           calls: Sequence[dict[str, Any]], known: Mapping[int, Sequence[float]],
                           bar: Any) -> None:
    """``calibrate``'s recorded calls and probes at each step count, built into ``runtime.schedule``."""
    weighted = runtime.strategy.probes
    for steps in step_counts:
        # Recording stays on from call to call: each call's reset does not build a schedule early.
        states = _generator_states(calls[0])
        reference = record_run(runtime, pipe, calls[0], steps)
        bar.update()
        for kwargs in calls[1:]:
            record_run(runtime, pipe, kwargs, steps)
            bar.update()
        records = runtime.take_records()
        # Schedules are keyed by the denoiser steps a call runs, which some samplers make differ
        # from num_inference_steps (PNDM runs one more).
        key = next(iter(records)) if steps not in records and len(records) == 1 else steps
        if key not in records:
            raise RuntimeError(f"BAC calibration recorded no complete {steps}-step run (recorded: "
                               f"{sorted(records) or 'none'}); does the pipeline call its denoiser "
                               "each step?")
        runs = records[key]
        weights = list(known[key]) if weighted and key in known else runtime.prior_weights.get(key)
        if weighted and weights is None:
            weights, _ = probe_sensitivity(runtime, pipe, calls[0], steps, key, states, reference,
                                           runs[0], bar.update)
        runtime.build(key, runs, weights)


def probe_sensitivity(runtime: BAC, pipe: Any, kwargs: dict[str, Any], steps: int, forwards: int,
                      states: list[torch.Tensor], reference: np.ndarray,
                      recorded: dict[str, dict[int, np.ndarray]],
                      done: Any = None) -> tuple[list[float], int]:
    """Per-step sensitivities of the ``forwards`` denoiser steps a ``steps``-step call of ``kwargs`` runs,
    from probe calls of it (the generators rewound to ``states`` each time) that reuse every unit at the
    steps of the strategy's probe plan, against ``reference``, the recorded run's output; ``recorded``
    that run's features. ``done`` is called after each probe. Returns the sensitivities and the number
    of probe calls run."""
    strategy = runtime.strategy
    plan = strategy.probe_plan(forwards, runtime.config.probe_groups)
    errors = []
    runtime.order = 0  # probes measure plain reuse; the DP's distances are order-0 distances
    try:
        for reused in plan:
            runtime.override = {u.key: frozenset(s for s in range(forwards) if s not in reused)
                                for u in runtime.branches}
            _restore_generators(kwargs, states)
            errors.append(float(np.mean((_run(pipe, kwargs, steps) - reference) ** 2)))
            if done is not None:
                done()
    finally:
        runtime.override, runtime.order = None, runtime.config.order
    features = [np.stack([recorded[u.key][t] for t in range(forwards)]) for u in runtime.branches]
    return strategy.weights_from_probes(errors, plan, features), len(plan)


def _run(pipe: Any, kwargs: dict[str, Any], steps: int) -> np.ndarray:
    """One pipeline call; its first output (images / frames) as float64."""
    result = pipe(**{**kwargs, "num_inference_steps": steps, "output_type": "np"})
    if hasattr(result, "to_tuple"):  # diffusers BaseOutput
        result = result.to_tuple()
    if isinstance(result, (tuple, list)):
        result = result[0]
    if isinstance(result, torch.Tensor):
        result = result.detach().float().cpu()
    return np.asarray(result, dtype=np.float64)


def _generators(kwargs: dict[str, Any]) -> list[torch.Generator]:
    found = kwargs.get("generator")
    items = found if isinstance(found, (list, tuple)) else [found]
    return [g for g in items if isinstance(g, torch.Generator)]


def _generator_states(kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """Probes must see the reference call's noise, so the generators are rewound before each."""
    return [g.get_state() for g in _generators(kwargs)]


def _restore_generators(kwargs: dict[str, Any], states: list[torch.Tensor]) -> None:
    for generator, state in zip(_generators(kwargs), states):
        generator.set_state(state)

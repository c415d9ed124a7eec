"""Timestep-aware calibration: activation ranges of every ``nn.Linear`` input over whole denoising runs.

Diffusion activations drift with the timestep, so ranges are gathered over every sampler step of a few
labels and seeds (QuEST, Q-Diffusion), not one step. Memory stays bounded: each layer keeps a running
min/max and a fixed-size uniform reservoir sample (for percentile and MSE range search), and at most
``max_inputs`` model calls are kept (a reservoir over calls, so they cover the trajectory) for the
sensitivity scan and the finetuning that follow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from accel.steps import StepTracker, timestep_value

logger = logging.getLogger(__name__)


class RangeObserver:
    """Running min/max plus a uniform reservoir of at most ``size`` values of one layer's input."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size = size
        self.gen = generator
        self.lo = float("inf")
        self.hi = float("-inf")
        self.seen = 0
        self.samples = torch.empty(0)
        self.calls = 0
        self.rows = 0
        self.token_input = False  # saw (B, N, C) inputs; False for (B, C) conditioning vectors
        self.steps: set[int] = set()

    def update(self, x: torch.Tensor, step: int) -> None:
        x = x.detach()
        self.calls += 1
        self.rows = max(self.rows, x.numel() // max(x.shape[-1], 1))
        self.token_input = self.token_input or x.dim() >= 3
        self.steps.add(step)
        flat = x.reshape(-1).float()
        self.lo = min(self.lo, float(flat.min()))
        self.hi = max(self.hi, float(flat.max()))
        n_new = flat.numel()
        take = min(n_new, self.size)
        new = flat[torch.randint(n_new, (take,), generator=self.gen)] if n_new > take else flat
        if self.seen == 0:
            self.samples = new.clone()
        else:
            # Keep each slot from the old sample with probability seen / (seen + n_new).
            keep_old = (
                int(
                    torch.distributions.Binomial(
                        self.size, torch.tensor(self.seen / (self.seen + n_new))
                    ).sample()
                )
                if self.samples.numel() >= self.size
                else self.samples.numel()
            )
            old = self.samples[torch.randperm(self.samples.numel(), generator=self.gen)[:keep_old]]
            room = self.size - old.numel()
            new = new[torch.randperm(new.numel(), generator=self.gen)[:room]]
            self.samples = torch.cat([old, new])
        self.seen += n_new


@dataclass
class Calibration:
    """What calibration recorded: per-layer observers, execution order, timesteps, kept model calls."""

    observers: dict[str, RangeObserver]
    order: list[str]
    timesteps: list[float]
    steps_per_call: list[int]
    inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    recorded_steps: list[int] = field(default_factory=list)
    call: dict[str, Any] = field(default_factory=dict)  # the pipeline call it ran (accel.calls.call_shape)

    def summary(self) -> dict[str, Any]:
        return {
            "layers": len(self.observers),
            "calls": len(self.steps_per_call),
            **({"call": self.call} if self.call else {}),
            "timesteps": len(self.timesteps),
            "steps_recorded": sorted(set(self.recorded_steps)),
            "kept_inputs": len(self.inputs),
        }


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every ``nn.Linear`` of ``model`` by qualified name (the layers QuEST quantizes)."""
    return {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}


@torch.no_grad()
def collect(
    model: torch.nn.Module,
    adapter: Any,
    runs: Sequence[Callable[[], Any]],
    *,
    steps: Sequence[int] | None = None,
    reservoir: int = 8192,
    max_inputs: int = 48,
    seed: int = 0,
    desc: str = "QuEST calibration",
    progress: bool = True,
) -> Calibration:
    """Run each of ``runs`` (a pipeline call, a model call) with observers on every linear layer.

    ``steps``: record only these step indices of each run (e.g. ``[0]`` for one-step calibration,
    the failure mode QuEST's timestep-aware calibration fixes); ``None`` records every step. A step
    is a change of timestep within a run (cond/uncond forwards at one timestep are one step).
    """
    gen = torch.Generator().manual_seed(seed)
    layers = linear_layers(model)
    observers = {name: RangeObserver(reservoir, gen) for name in layers}
    order: list[str] = []
    tracker = StepTracker()  # the patch's own step logic: a new timestep starts a step, a repeat is a branch
    state = {"step": -1, "record": False}
    timesteps: set[float] = set()
    kept: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    kept_steps: list[int] = []
    calls_seen = [0]
    steps_per_call: list[int] = []
    wanted = None if steps is None else set(steps)

    def model_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        t = timestep_value(adapter.timestep(args, kwargs)) if adapter.timestep_arg else None
        # A model without timesteps (a classifier) runs one step per call.
        state["step"] = tracker.begin_forward(t, batch_size=0, layout=None).step_index if t is not None else 0
        state["record"] = wanted is None or state["step"] in wanted
        if not state["record"]:
            return
        if t is not None:
            timesteps.add(t)
        calls_seen[0] += 1
        if len(kept) < max_inputs:
            kept.append((_clone(args), _clone(kwargs)))
            kept_steps.append(state["step"])
        else:  # reservoir over calls: every call is kept with the same probability
            j = int(torch.randint(calls_seen[0], (1,), generator=gen))
            if j < max_inputs:
                kept[j] = (_clone(args), _clone(kwargs))
                kept_steps[j] = state["step"]

    def layer_hook(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            if state["record"] and args:
                if observers[name].calls == 0:
                    order.append(name)
                observers[name].update(args[0], state["step"])

        return hook

    handles = [model.register_forward_pre_hook(model_hook, with_kwargs=True)]
    handles += [layer.register_forward_pre_hook(layer_hook(name)) for name, layer in layers.items()]
    try:
        for run in tqdm(runs, desc=desc, disable=not progress):
            tracker.reset()
            state.update(step=-1, record=False)
            run()
            steps_per_call.append(state["step"] + 1)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, obs in observers.items() if obs.calls == 0]
    if missing:
        logger.info(
            "QuEST calibration: %d linear layers never ran (%s...); they stay unquantized.",
            len(missing),
            ", ".join(missing[:3]),
        )
    return Calibration(
        {n: o for n, o in observers.items() if o.calls},
        order,
        sorted(timesteps, reverse=True),
        steps_per_call,
        kept,
        kept_steps,
    )

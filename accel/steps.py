"""Step tracking: the one place that knows the denoising step, the CFG branch and the token layout.

The tracker is fed by a pre-forward hook on the denoiser. It needs no pipeline cooperation:
- a new, lower timestep starts the next step; the same timestep again is another CFG branch
  (pipelines such as Wan and Flux true-CFG run cond and uncond as separate forwards);
- a higher timestep, a step past the known step count, or another input size starts a new sequence;
- on a pipeline, ``scheduler.set_timesteps`` (called at the start of every pipeline call) resets it
  and tells the step count, and ``scheduler.step`` ends each step: once the scheduler has stepped, forwards
  between two of its steps are branches of one step whatever their timesteps (PNDM runs its first
  timestep twice, as two steps).
diffusers' ``cache_context`` is used when a pipeline sets it (its name becomes the branch name), but
not required: DiT, PixArt and SD3 pipelines never set it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from accel.adapters.base import TokenLayout


@dataclass(frozen=True)
class StepState:
    """Where the denoising loop is. ``step_index`` is -1 before the first forward of a sequence."""

    step_index: int = -1
    num_steps: int | None = None
    timestep: float | None = None
    branch: int = 0
    branch_name: str | None = None
    batch_size: int = 0
    layout: TokenLayout | None = None
    sequence: int = 0
    first_timestep: float | None = None  # of this sequence: the noise scale the progress is read against

    @property
    def is_last_step(self) -> bool:
        return self.num_steps is not None and self.step_index == self.num_steps - 1

    @property
    def progress(self) -> float | None:
        """Fraction of the schedule done at this step: ``step / num_steps`` when the count is known, else
        the fraction of the first timestep already removed (the noise level; a uniform schedule makes
        the two equal), else None (no count and no timesteps)."""
        if self.num_steps:
            return self.step_index / self.num_steps
        if self.timestep is None or not self.first_timestep:
            return None
        return 1.0 - self.timestep / self.first_timestep

    @property
    def progress_by(self) -> str:
        """What :attr:`progress` is read from, for reports."""
        if self.num_steps:
            return "step count"
        return ("timestep (the step count is unknown: a loop without patch.reset(num_steps=N))"
                if self.first_timestep else "nothing (no step count, no timesteps)")


class StepTracker:
    """Owned by one Patch; methods read ``tracker.state`` and subscribe to resets."""

    def __init__(self) -> None:
        self.state = StepState()
        self._reset_callbacks: list[Callable[[], None]] = []
        self._forward_callbacks: list[Callable[[StepState], None]] = []
        self.forwards = 0
        # None until the scheduler steps in this sequence (then step boundaries come from it), else
        # whether it stepped since the last forward.
        self._stepped: bool | None = None

    def on_reset(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever a new sequence starts (methods drop their caches there)."""
        self._reset_callbacks.append(callback)

    def on_forward(self, callback: Callable[[StepState], None]) -> None:
        """Call ``callback(state)`` at the start of every denoiser forward, once the state has advanced.

        This is where step-dependent decisions belong: it runs outside ``torch.compile``'s graphs (the
        tracker's hook is compiler-disabled), so a compiled block sees only the few values a decision can
        take, not a step counter that would be guarded and recompiled on every step."""
        self._forward_callbacks.append(callback)

    def reset(self, num_steps: int | None = None) -> None:
        """Start a new sequence; ``num_steps`` is the step count when the caller knows it."""
        self.state = StepState(num_steps=num_steps, sequence=self.state.sequence + 1)
        self._stepped = None
        for callback in self._reset_callbacks:
            callback()

    def next_step_index(self) -> int | None:
        """The step the next forward belongs to once the scheduler drives the steps: after each
        ``scheduler.step`` the next one, before it the same one (another CFG branch). ``None`` until the
        scheduler has stepped in this sequence: a loop may use the scheduler's timesteps without its step."""
        if self._stepped is None:
            return None
        return self.state.step_index + (1 if self._stepped else 0)

    def end_step(self) -> None:
        """The sampler finished a step (``scheduler.step`` returned): the next forward starts the next."""
        self._stepped = True

    def begin_forward(
        self, timestep: float | None, batch_size: int, layout: TokenLayout | None, branch_name: str | None = None
    ) -> StepState:
        """Advance the state for one denoiser forward and return it."""
        self.forwards += 1
        prev = self.state
        started = prev.step_index >= 0
        if started:
            restart = self._restart_reason(prev, timestep, batch_size, layout)
            if restart is not None:
                # A schedule that ran to its known end and starts again keeps its step count;
                # any other restart (higher timestep, new size) has an unknown count.
                self.reset(prev.num_steps if restart == "finished" else None)
                prev = self.state
                started = False
        same_step = (not self._stepped) if self._stepped is not None else (
            timestep is not None and timestep == prev.timestep)
        if not started:
            state = dataclasses.replace(prev, step_index=0, timestep=timestep, branch=0, first_timestep=timestep)
        elif same_step:
            state = dataclasses.replace(prev, branch=prev.branch + 1)
        else:
            state = dataclasses.replace(prev, step_index=prev.step_index + 1, timestep=timestep, branch=0)
        if self._stepped is not None:
            self._stepped = False
        self.state = dataclasses.replace(state, batch_size=batch_size, layout=layout, branch_name=branch_name)
        for callback in self._forward_callbacks:
            callback(self.state)
        return self.state

    @staticmethod
    def _restart_reason(
        prev: StepState, timestep: float | None, batch_size: int, layout: TokenLayout | None
    ) -> str | None:
        same_step = timestep is not None and timestep == prev.timestep
        if same_step:
            return None
        if timestep is not None and prev.timestep is not None and timestep > prev.timestep:
            return "timestep-increased"
        if prev.num_steps is not None and prev.step_index + 1 >= prev.num_steps:
            return "finished"
        if layout != prev.layout or batch_size != prev.batch_size:
            return "new-shape"
        return None


def host_timestep(timestep: Any, host_timesteps: list[float] | None, step_index: int | None) -> float | None:
    """The forward's timestep as a float without a device sync where one can be avoided: a timestep on an
    accelerator is read from ``host_timesteps`` (the scheduler's timesteps, copied to the host once per
    call) at the step the forward belongs to; anything else is read directly (:func:`timestep_value`)."""
    on_device = isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu"
    known = host_timesteps is not None and step_index is not None and 0 <= step_index < len(host_timesteps)
    if on_device and known:
        return host_timesteps[step_index]
    return timestep_value(timestep)


def timestep_value(timestep: Any) -> float | None:
    """A scalar timestep from what models receive: a number, a 0-d or batched tensor (first entry)."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        return float(timestep.detach().reshape(-1)[0].float().cpu())
    return float(timestep)

"""Whole-stack reuse: every block of the denoiser as one cached unit, on a BAC-style DP schedule.

This is not the paper's BAC (which caches each attention/FFN branch, see ``accel.methods.bac``); it is
what ``BACConfig(granularity="stack")`` selects and what ``accel.patch(pipe)`` uses by default. On an
update step the stack runs and its deviation Δ = output − input is cached; on a reused step the first
block returns input + Δ and every later block passes its input through, so a reused step costs only
the embeddings and the output layer, which still see the current timestep. The update steps come from
the same DP and schedule strategies as BAC's (``accel.methods.bac_schedule``); the Bubbling Union has
nothing to do with one unit.

With ``reuse="x0"`` a hook on the denoiser itself takes the decision before anything runs: on an update
step the whole model runs and its output is cached as the clean-sample estimate x̂0 it stands for; on a
reused step the model does not run at all and returns the output that says the same x̂0 at the current
noisy input and noise level (``accel.noise``). The schedule is still chosen over the stack's Δ features.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from accel.adapters.base import ModelAdapter
from accel.contract import PatchContext
from accel.errors import UnsupportedModelError
from accel.hooks import SkipHook
from accel.methods._runlog import RunLog
from accel.methods._streams import add_streams, pass_through
from accel.methods.bac import BAC, Reuse, _Branch, _Cached, _cost
from accel.noise import (
    NoisyInput,
    Prediction,
    current_input,
    from_clean,
    prediction_of,
    prediction_split,
    to_clean,
)


def stack_unit(adapter: ModelAdapter) -> _Branch:
    """The one cached unit: keyed ``stack``, placed at the first block, weighing all blocks."""
    blocks = adapter.blocks()
    return _Branch("stack", blocks[0].module, blocks[0].index, "ffn", sum(_cost(b.module) for b in blocks))


class StackReuse(BAC):
    """BAC's runtime (schedules, recording, cache) with the decision taken once per forward."""

    _span_value: Any = None
    clean: CleanReuse | None = None  # reuse="x0": the denoiser-level decision

    def blocks_needed(self) -> bool:
        """Whether the block hooks have work this call: recording the stack's Δ, or Δ reuse. With x̂0 reuse
        the denoiser's hook decides and counts, so once calibrated the compiled stack runs unbroken."""
        return self.clean is None or self.recording

    def decide_span(self, block: Any, args: tuple, kwargs: dict) -> Any:
        """The first block decides for all; on a reused step it returns input + Δ and every later
        block passes its input through."""
        state, unit = self.tracker.state, self.branches[0]
        if block.index == unit.layer:
            self._span_value = self._reuse(unit)
            if self._span_value is None:
                self._inputs[(state.branch, unit.key)] = block.io.read_inputs(args, kwargs)
        cached = self._span_value
        self.log.record(state.step_index, state.branch, block.name, ran=cached is None)
        if cached is None:
            return None
        if block.index == unit.layer:
            return block.io.make_output(add_streams(block.io.read_inputs(args, kwargs), cached))
        return pass_through(block.io, args, kwargs)

    def after_span(self, block: Any, output: Any, last: int) -> Any:
        if block.index == last and self._span_value is None:
            if self.clean is not None and not self.recording:  # the denoiser's hook caches x̂0 instead
                self._inputs.pop((self.tracker.state.branch, self.branches[0].key), None)
                return output
            return self.after(self.branches[0], output, io=block.io)
        return output


class CleanReuse:
    """``reuse="x0"``: the denoiser's forward as the decision point; its output cached as x̂0."""

    def __init__(self, stack: StackReuse, adapter: ModelAdapter, prediction: Prediction) -> None:
        self.stack, self.adapter, self.prediction = stack, adapter, prediction
        self.block_names = [b.name for b in adapter.blocks()]
        self.templates: dict[int, Any] = {}  # per CFG branch: the latest output, whose form reuse returns
        self.enabled = True
        self._checked = False

    def _check_output(self, out: torch.Tensor, sample: torch.Tensor) -> bool:
        """The first output decides, once per patch, whether it can be read as an estimate of the input's
        clean sample; if not, the stack falls back to Δ reuse with one warning (the default recipe must
        not fail on an inpainting model whose input carries extra condition channels)."""
        if self._checked:
            return self.enabled
        self._checked = True
        try:
            prediction_split(out.shape, sample.shape)
        except ValueError as error:
            warnings.warn(f"BAC reuse='x0': {error} Reusing the stack's Δ instead.", stacklevel=2)
            self.enabled, self.stack.clean = False, None
        return self.enabled

    def _noisy_input(self) -> NoisyInput:
        state = self.stack.tracker.state
        at = current_input(self.stack.scheduler, state.step_index, state.timestep)
        if at is None:
            raise UnsupportedModelError(
                f"BAC reuse='x0' cannot read the noise level of step {state.step_index} from "
                f"{type(self.stack.scheduler).__name__}; use reuse='delta'.")
        return at

    def decide(self, args: tuple, kwargs: dict) -> Any:
        if not self.enabled:
            return None
        stack, state = self.stack, self.stack.tracker.state
        cached = stack._reuse(stack.branches[0])
        if cached is None:
            if not stack.blocks_needed():  # the blocks run unhooked: count them here
                for name in self.block_names:
                    stack.log.record(state.step_index, state.branch, name, ran=True)
            return None
        for name in self.block_names:
            stack.log.record(state.step_index, state.branch, name, ran=False)
        sample = self.adapter.sample(args, kwargs)
        template = self.templates[state.branch]
        out = _prediction(template)
        fresh = from_clean(self.prediction, cached["x0"], sample, self._noisy_input()).to(out.dtype)
        if cached["rest"] is not None:
            fresh = torch.cat([fresh, cached["rest"]], dim=cached["dim"])
        return _with_prediction(template, fresh)

    def after(self, args: tuple, kwargs: dict, output: Any) -> Any:
        stack, state = self.stack, self.stack.tracker.state
        sample, out = self.adapter.sample(args, kwargs), _prediction(output)
        if not self._check_output(out, sample) or stack.recording or stack.active is None:
            return output
        dim = prediction_split(out.shape, sample.shape)
        head, rest = (out, None) if dim is None else out.split(sample.shape[dim], dim=dim)
        value = {"x0": to_clean(self.prediction, head, sample, self._noisy_input()), "rest": rest, "dim": dim}
        key = (state.branch, stack.branches[0].key)
        stack.cache[key] = _Cached(value, state.step_index, stack.cache.get(key))
        self.templates[state.branch] = output
        return output


def _prediction(output: Any) -> torch.Tensor:
    """The prediction tensor of a denoiser's output: ``.sample`` of diffusers' output classes, the first
    entry of the ``return_dict=False`` tuple, or the tensor itself."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output[next(iter(output.keys()))]


def _with_prediction(template: Any, prediction: torch.Tensor) -> Any:
    """An output of ``template``'s form holding ``prediction``."""
    if isinstance(template, torch.Tensor):
        return prediction
    if isinstance(template, (tuple, list)):
        return type(template)([prediction, *template[1:]])
    first = next(iter(template.keys()))
    return type(template)(**{**dict(template), first: prediction})


def hook_stack(ctx: PatchContext, runtime: StackReuse) -> None:
    """Hooks on every block (and with ``reuse="x0"`` on the denoiser); the log counts blocks run, so the
    compute fraction is per block."""
    blocks = ctx.adapter.blocks()
    if runtime.config.reuse is Reuse.X0:
        clean = runtime.clean = CleanReuse(runtime, ctx.adapter, x0_prediction(ctx))
        # Registered before the step tracker's hook (added last, so outermost): the state has advanced
        # when this decides.
        ctx.hooks.add_hook(ctx.model, SkipHook(
            decide=torch.compiler.disable(lambda m, a, k: clean.decide(a, k)),
            after=torch.compiler.disable(lambda m, a, k, out: clean.after(a, k, out)),
        ), "denoiser")
    runtime.log = RunLog(units=len(blocks), cost={b.name: _cost(b.module) for b in blocks})
    last = blocks[-1].index
    for block in blocks:  # every block: the first decides, the rest pass through on reused steps
        hook = SkipHook(
            decide=torch.compiler.disable(lambda m, a, k, b=block: runtime.decide_span(b, a, k)),
            after=torch.compiler.disable(lambda m, a, k, out, b=block: runtime.after_span(b, out, last)),
            needed=runtime.blocks_needed,
        )
        ctx.hooks.add_hook(block.module, hook, f"block.{block.name}")


def x0_prediction(ctx: PatchContext) -> Prediction:
    """The parameterisation ``reuse="x0"`` reads the denoiser's output in, from the pipeline's scheduler."""
    scheduler = getattr(ctx.pipeline, "scheduler", None)
    if scheduler is None:
        raise ValueError("BACConfig(reuse='x0') reads the prediction type and noise levels from the "
                         "pipeline's scheduler: patch the pipeline, not the bare model (or reuse='delta').")
    prediction = prediction_of(scheduler)
    if prediction is None:
        raise UnsupportedModelError(
            f"BACConfig(reuse='x0'): {type(scheduler).__name__} names no prediction type accel reads "
            f"({', '.join(p.value for p in Prediction)}); use reuse='delta'.")
    return prediction

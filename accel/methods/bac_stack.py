"""Whole-stack Δ reuse: every block of the denoiser as one cached unit, on a BAC-style DP schedule.

This is not the paper's BAC (which caches each attention/FFN branch, see ``accel.methods.bac``); it is
what ``BACConfig(granularity="stack")`` selects and what ``accel.patch(pipe)`` uses by default. On an
update step the stack runs and its deviation Δ = output − input is cached; on a reused step the first
block returns input + Δ and every later block passes its input through, so a reused step costs only
the embeddings and the output layer, which still see the current timestep. The update steps come from
the same DP and schedule strategies as BAC's (``accel.methods.bac_schedule``); the Bubbling Union has
nothing to do with one unit.
"""

from __future__ import annotations

from typing import Any

import torch

from accel.adapters.base import ModelAdapter
from accel.contract import PatchContext
from accel.hooks import SkipHook
from accel.methods._runlog import RunLog
from accel.methods._streams import add_streams, pass_through
from accel.methods.bac import BAC, _Branch, _cost


def stack_unit(adapter: ModelAdapter) -> _Branch:
    """The one cached unit: keyed ``stack``, placed at the first block, weighing all blocks."""
    blocks = adapter.blocks()
    return _Branch("stack", blocks[0].module, blocks[0].index, "ffn", sum(_cost(b.module) for b in blocks))


class StackReuse(BAC):
    """BAC's runtime (schedules, recording, cache) with the decision taken once per forward."""

    _span_value: Any = None

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
            return self.after(self.branches[0], output, io=block.io)
        return output


def hook_stack(ctx: PatchContext, runtime: StackReuse) -> None:
    """Hooks on every block; the log counts blocks run, so the compute fraction is per block."""
    blocks = ctx.adapter.blocks()
    runtime.log = RunLog(units=len(blocks), cost={b.name: _cost(b.module) for b in blocks})
    last = blocks[-1].index
    for block in blocks:  # every block: the first decides, the rest pass through on reused steps
        hook = SkipHook(
            decide=torch.compiler.disable(lambda m, a, k, b=block: runtime.decide_span(b, a, k)),
            after=torch.compiler.disable(lambda m, a, k, out, b=block: runtime.after_span(b, out, last)),
        )
        ctx.hooks.add_hook(block.module, hook, f"block.{block.name}")

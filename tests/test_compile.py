"""Patched models under torch.compile: same outputs as eager, compute still skipped, and a bounded number of
compiled frames that does not grow from one call to the next (dynamo counters, no timing)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import accel
from tiny import TinyPipe

STEPS = 8


def _compiled_calls(
    method: str | None, calls: int = 2
) -> tuple[list[int], list[torch.Tensor], torch.Tensor, accel.Patch | None]:
    """Frames compiled after each of ``calls`` compiled 8-step calls, their outputs, the output of an eager
    call of the same patch made just before compiling (after one call, so methods that calibrate online
    already have their schedule) and the patch."""
    pipe = TinyPipe(layers=4)
    patch = accel.patch(pipe, method) if method else None
    pipe([1, 2], num_inference_steps=STEPS)
    eager = pipe([1, 2], num_inference_steps=STEPS)
    torch._dynamo.reset()
    counter = CompileCounter()
    pipe.transformer = torch.compile(pipe.transformer, backend=counter)
    frames, outputs = [], []
    for _ in range(calls):
        outputs.append(pipe([1, 2], num_inference_steps=STEPS))
        frames.append(counter.frame_count)
    return frames, outputs, eager, patch


def test_unpatched_model_compiles_to_one_frame():
    frames, outputs, eager, _ = _compiled_calls(None)
    assert frames == [1, 1]
    torch.testing.assert_close(outputs[1], eager)


@pytest.mark.parametrize("method,bound", [("delta-dit", 6), ("hierarchical-prune", 4)])
def test_step_decisions_do_not_recompile(method, bound):
    """Decisions are planned outside the graph: a few frames (one per kind of step), none added by the
    second call, and the compiled outputs are the eager ones."""
    frames, outputs, eager, patch = _compiled_calls(method)
    assert frames[0] <= bound, frames
    assert frames[1] == frames[0], f"the second call compiled {frames[1] - frames[0]} more frames"
    for got in outputs:
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    if method == "delta-dit":
        facts = patch.report().methods["delta-dit"]
        assert facts["compute_fraction_last_call"] < 0.7  # blocks really skipped inside the compiled model
    patch.remove()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bac", "quest"])
def test_other_methods_match_eager_and_stop_compiling(method):
    frames, outputs, eager, patch = _compiled_calls(method, calls=3)
    assert frames[2] == frames[1], frames
    for got in outputs:
        torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
    patch.remove()

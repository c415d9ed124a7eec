"""Δ arithmetic on a block's named streams (hidden, encoder, ...), shared by the Δ-reusing caches."""

from __future__ import annotations

from typing import Any

import torch

from accel.contract import PatchContext
from accel.errors import UnsupportedModelError

Streams = dict[str, "torch.Tensor | None"]


def add_streams(streams: Streams, delta: Streams) -> Streams:
    """``streams + delta`` per stream; streams without a Δ pass unchanged."""
    return {k: v + delta[k] if v is not None and delta.get(k) is not None else v for k, v in streams.items()}


def subtract_streams(outputs: Streams, inputs: Streams) -> Streams:
    """Δ = output − input per stream; ``None`` where the stream has no same-shaped input to subtract."""
    return {
        k: (v - inputs[k]) if v is not None and inputs.get(k) is not None and inputs[k].shape == v.shape else None
        for k, v in outputs.items()
    }


def pass_through(io: Any, args: tuple, kwargs: dict) -> Any:
    """A skipped block inside a cached span returns its inputs in the form of its outputs."""
    return io.make_output(io.read_inputs(args, kwargs))


def require_residual_chain(ctx: PatchContext, what: str, instead: str) -> None:
    """A Δ over a range of blocks needs blocks that form one residual chain (a UNet's do not)."""
    if not getattr(ctx.adapter, "sequential_blocks", True):
        raise UnsupportedModelError(
            f"{what} needs blocks that form one residual chain; {type(ctx.model).__name__} (a UNet) does not. "
            f"{instead}"
        )

"""The method contract: what ``apply(ctx, config)`` receives and what it returns.

    @register_method(MyConfig, name="my-method", stage=Stage.CACHE, needs_denoiser=True)
    def _apply(ctx: PatchContext, config: MyConfig) -> MyRuntime:   # MyRuntime satisfies Handle
        ...

A method attaches only through ``ctx.hooks`` (removed for it by the patch) and reads the denoising
step from ``ctx.tracker``; its handle reports what ran and drops whatever state it holds on removal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from accel.adapters.base import ModelAdapter
from accel.hooks import HookSet
from accel.steps import StepTracker

if TYPE_CHECKING:
    from accel.config import MethodConfig
    from accel.registry import MethodSpec


@runtime_checkable
class Handle(Protocol):
    """What a method's apply function returns."""

    def report(self) -> dict[str, Any]:
        """Facts about what ran (blocks skipped per step, density, bits...), JSON-serialisable."""
        ...

    def remove(self) -> None:
        """Drop caches and other state; called after the method's hooks are removed."""
        ...

    # Optional: ``before_call(pipeline, kwargs)`` runs before each call of a patched pipeline, with the call's
    # arguments (BAC calibrates for new call settings there). Not part of the protocol, so handles without it
    # still satisfy ``isinstance(handle, Handle)``.


@dataclass
class PatchContext:
    """Everything a method's apply function may use. ``hooks`` belongs to that method alone."""

    target: Any
    pipeline: Any | None
    model: torch.nn.Module
    adapter: ModelAdapter
    tracker: StepTracker
    hooks: HookSet
    method: str
    applied: list[tuple[MethodSpec, MethodConfig]] = field(default_factory=list)

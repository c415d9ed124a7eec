"""Shared fixtures: a test-only identity method that hooks every block and branch of any family."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import pytest
import torch

import accel
from accel.config import MethodConfig, check_int
from accel.hooks import SkipHook
from accel.registry import Stage, register_method, unregister_method


@dataclasses.dataclass(frozen=True, kw_only=True)
class IdentityConfig(MethodConfig):
    """Hooks every block and residual branch, runs them unchanged and counts the calls."""

    level: int = 1

    def __post_init__(self) -> None:
        check_int("IdentityConfig.level", self.level, low=0, high=3)


class IdentityHandle:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.steps: list[tuple[int, int]] = []

    def report(self) -> dict[str, Any]:
        return {"calls": sum(self.calls.values())}

    def remove(self) -> None:
        self.removed = True


def _apply_identity(ctx: accel.PatchContext, config: IdentityConfig) -> IdentityHandle:
    handle = IdentityHandle()

    def counter(key: str, record_step: bool = False):
        def decide(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            handle.calls[key] += 1
            if record_step:
                state = ctx.tracker.state
                handle.steps.append((state.step_index, state.branch))
            return None

        return decide

    for block in ctx.adapter.blocks():
        ctx.hooks.add_hook(block.module, SkipHook(counter(block.name, record_step=block.index == 0)), block.name)
        for kind, module in block.branches().items():
            ctx.hooks.add_hook(module, SkipHook(counter(f"{block.name}.{kind}")), f"{block.name}.{kind}")
    return handle


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread: on shared cores, thread hand-offs cost more than the work
    (measured 10-100x slower with two). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def identity_method():
    """Registers the test-only ``identity`` method for one test."""
    register_method(IdentityConfig, name="identity", stage=Stage.CACHE)(_apply_identity)
    yield IdentityConfig
    unregister_method("identity")

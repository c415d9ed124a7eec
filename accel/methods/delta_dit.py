"""Δ-DiT: cache the deviation (output − input) of a contiguous range of DiT blocks.

Paper: Chen et al., "Δ-DiT: A Training-Free Acceleration Method Tailored for Diffusion Transformers"
(arXiv:2406.01125). On a full step the range's Δ = F(x) − x is stored; on a cached step the range is
skipped and its output is x_now + Δ, so the current input still flows through (DiT has no UNet skip
connection that would carry it otherwise). Stage-adaptive: before the boundary step the *rear* blocks
are cached (early steps shape the outline, which front blocks make), after it the *front* blocks.

Example::

    patch = accel.patch(pipe, accel.DeltaDiTConfig(cached_blocks=4, interval=2, boundary=0.5))
    images = pipe(class_labels=[1, 2], num_inference_steps=50).images
    print(patch.report())   # per step: blocks skipped, compute fraction
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from accel.config import MethodConfig, check_float, check_int
from accel.contract import PatchContext
from accel.hooks import SkipHook
from accel.methods._runlog import RunLog
from accel.methods._streams import Streams, add_streams, require_residual_chain, subtract_streams
from accel.registry import Stage, register_method


@dataclass(frozen=True, kw_only=True)
class DeltaDiTConfig(MethodConfig):
    """Δ-DiT settings.

    Args:
        cached_blocks: N_c, blocks in the cached range; ``None`` caches all but one block.
        boundary: b as a fraction of the step count: steps before ``round(b * steps)`` cache the rear
            range, later steps the front range.
        interval: N, a full recompute every N steps (1 disables caching).
        warmup_steps: first steps always computed in full.

    Defaults, by measurement (benchmarks/RESULTS.md, "Caching", digits-dit at 50 steps): caching all blocks
    but one every other step was the fastest setting above 30 dB; caching fewer blocks kept more quality but
    saved little, and a longer interval fell below 30 dB.
    """

    cached_blocks: int | None = None
    boundary: float = 0.5
    interval: int = 2
    warmup_steps: int = 1

    def __post_init__(self) -> None:
        if self.cached_blocks is not None:
            check_int("DeltaDiTConfig.cached_blocks", self.cached_blocks, low=1)
        check_float("DeltaDiTConfig.boundary", self.boundary, low=0.0, high=1.0)
        check_int("DeltaDiTConfig.interval", self.interval, low=1, hint="use interval=1 to disable caching.")
        check_int("DeltaDiTConfig.warmup_steps", self.warmup_steps, low=1,
                  hint="step 0 must be computed in full to have a Δ to reuse.")

    @classmethod
    def sweep_grid(cls, num_steps: int) -> list[dict[str, Any]]:
        """Settings ``accel-bench --sweep`` tries, from accurate to fast."""
        return [
            {"cached_blocks": 2, "interval": 2}, {"cached_blocks": 4, "interval": 2},
            {"cached_blocks": 4, "interval": 3}, {"interval": 2}, {"interval": 3}, {"interval": 4},
        ]


@dataclass(frozen=True)
class _Range:
    name: str
    start: int
    stop: int  # exclusive

    def __contains__(self, index: int) -> bool:
        return self.start <= index < self.stop


class DeltaDiT:
    """Runtime state of one Δ-DiT patch: the Δ per CFG branch and range, and the run log.

    What a forward does is planned once, when it starts (:meth:`plan`, a step-tracker callback outside
    any compiled graph); the block hooks read only that plan (``mode``: ``"full"`` or the reused range's
    name, and ``branch``), so under ``torch.compile`` a step costs no recompilation.
    """

    def __init__(self, config: DeltaDiTConfig, block_names: list[str], tracker: Any) -> None:
        num_blocks = len(block_names)
        cached = config.cached_blocks if config.cached_blocks is not None else num_blocks - 1
        if cached > num_blocks:
            raise ValueError(
                f"DeltaDiTConfig.cached_blocks must be <= the model's {num_blocks} blocks, got {cached}."
            )
        self.config = config
        self.tracker = tracker
        self.block_names = block_names
        self.front = _Range("front", 0, cached)
        self.rear = _Range("rear", num_blocks - cached, num_blocks)
        self._ranges = {"front": self.front, "rear": self.rear}  # by plan mode; "full" reuses none
        self.inputs: dict[tuple[int, str], Streams] = {}
        self.deltas: dict[tuple[int, str], Streams] = {}
        self.log = RunLog(units=num_blocks)
        self.mode = "full"
        self.branch = 0

    def reset(self) -> None:
        self.inputs.clear()
        self.deltas.clear()
        self.log.reset()
        self.mode = "full"

    def is_full_step(self, step: int) -> bool:
        return step < self.config.warmup_steps or step % self.config.interval == 0

    def active_range(self, step: int) -> _Range:
        """Rear blocks before the boundary, front blocks after. Without a step count (a hand-written loop
        that never said it), the boundary is placed by noise level instead: the fraction of the first
        timestep already removed, which a uniform schedule makes equal to the fraction of steps done."""
        state = self.tracker.state
        if state.num_steps is not None:
            return self.rear if step < round(self.config.boundary * state.num_steps) else self.front
        progress = state.progress
        if progress is None:
            raise RuntimeError(
                "delta-dit needs the step count or the timesteps to place its boundary: this model's forward "
                "passes no timestep. Call patch.reset(num_steps=N) before a hand-written denoising loop."
            )
        return self.rear if progress < self.config.boundary - 1e-9 else self.front

    def plan(self, state: Any) -> None:
        """Decide this forward: reuse a range's Δ (when the step is cached and that branch has one) or run
        everything; record which blocks run."""
        step, self.branch = state.step_index, state.branch
        self.mode = "full"
        if not self.is_full_step(step):
            rng = self.active_range(step)
            if (self.branch, rng.name) in self.deltas:
                self.mode = rng.name
        skipped = self._range(self.mode)
        for index, name in enumerate(self.block_names):
            self.log.record(step, self.branch, name, ran=skipped is None or index not in skipped)

    def _range(self, mode: str) -> _Range | None:
        return self._ranges.get(mode)

    def decide(self, index: int, io: Any, args: tuple, kwargs: dict) -> Any:
        rng = self._range(self.mode)
        if rng is not None and index in rng:
            streams = io.read_inputs(args, kwargs)
            if index == rng.start:
                streams = add_streams(streams, self.deltas[(self.branch, rng.name)])
            return io.make_output(streams)
        if self.mode == "full":
            for rng in (self.front, self.rear):
                if index == rng.start:
                    self.inputs[(self.branch, rng.name)] = io.read_inputs(args, kwargs)
        return None

    def after(self, index: int, io: Any, output: Any) -> Any:
        if self.mode == "full":
            for rng in (self.front, self.rear):
                if index == rng.stop - 1:
                    key = (self.branch, rng.name)
                    self.deltas[key] = subtract_streams(io.read_outputs(output), self.inputs.pop(key, {}))
        return output

    def remove(self) -> None:
        self.inputs.clear()
        self.deltas.clear()

    def report(self) -> dict[str, Any]:
        return {
            "ranges": {"front": [self.front.start, self.front.stop - 1], "rear": [self.rear.start, self.rear.stop - 1]},
            "boundary_by": self.tracker.state.progress_by,
            **self.log.report(),
        }


@register_method(DeltaDiTConfig, name="delta-dit", stage=Stage.CACHE, needs_denoiser=True,
                 summary="Δ-DiT: cache the output−input deviation of rear (early steps) / front (late steps) blocks")
def _apply(ctx: PatchContext, config: DeltaDiTConfig) -> DeltaDiT:
    require_residual_chain(ctx, "delta-dit", "Use 'bac', which caches per branch.")
    blocks = ctx.adapter.blocks()
    runtime = DeltaDiT(config, [block.name for block in blocks], ctx.tracker)
    ctx.tracker.on_reset(runtime.reset)
    ctx.tracker.on_forward(runtime.plan)
    for block in blocks:
        hook = SkipHook(
            decide=lambda m, a, k, b=block: runtime.decide(b.index, b.io, a, k),
            after=lambda m, a, k, out, b=block: runtime.after(b.index, b.io, out),
        )
        ctx.hooks.add_hook(block.module, hook, f"block.{block.name}")
    return runtime


"""How much of an embedded pipeline's time is attention: the ceiling sparse attention works under.

    python -m accel.benchmarks.attention_share --model digits-video-dit --steps 3
    python -m accel.benchmarks.attention_share --model shape:wan-1.3b:blocks=1:frames=11 --steps 1

Profiles one sampling call (after one warm-up call) and sums the self time of the SDPA kernels against the
whole call. By Amdahl's law, attention that is a share ``a`` of the step and runs ``x`` times faster gives
``1 / (1 - a + a / x)`` per sparse step. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

# The CPU SDPA kernels (fused flash, the math fallback's pieces are counted by their own names).
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math")


def sampling_call(name: str, steps: int) -> Any:
    """A zero-argument callable running one sampling call of embedded model ``name`` (one sample of digit 3,
    the generation settings the reported numbers use), or of a published shape (``shape:...``, one seed)."""
    from accel.benchmarks.shapes import ShapePipeline, is_shape, parse_shape
    from accel.pipelines import default_generation_kwargs, generate, load

    if is_shape(name):
        shape_pipe = ShapePipeline(parse_shape(name))
        return lambda: shape_pipe(num_inference_steps=steps, seeds=[0])

    pipe, kwargs = load(name), default_generation_kwargs(name)
    kwargs["steps"] = steps
    return lambda: generate(pipe, [3], [0], **kwargs)


def attention_share(call: Any) -> tuple[float, float]:
    """``(attention seconds, total seconds)`` of one profiled ``call()`` (self CPU time)."""
    call()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    attention = sum(e.self_cpu_time_total for e in events if e.key in ATTENTION_OPS) / 1e6
    return attention, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-video-dit",
                        help="digits-dit, digits-video-dit or a published shape (shape:wan-1.3b:blocks=1:frames=11)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    attention, total = attention_share(sampling_call(args.model, args.steps))
    print(f"{args.model}, {args.steps} steps, {torch.get_num_threads()} threads: attention {attention:.3f} s "
          f"of {total:.3f} s = {attention / total:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

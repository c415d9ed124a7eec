"""accel methods under ``torch.compile``: eager and compiled, unpatched and patched, in one run.

    python -m accel.benchmarks.compile_bench --model digits-dit --methods default,delta-dit,bac --steps 20

``default`` is ``accel.patch(pipe)`` with no method named (the default recipe).

For each method: the pipeline is patched, one eager call is made (methods that calibrate online do so
there), then the denoiser is compiled (inductor unless ``--backend``) and called until two calls in a row
compile nothing new. Reported per method: eager and compiled latency (medians of ``--repeats``), the eager
speedup against the unpatched model timed just before in the same row, the compiled speedup against the
unpatched compiled model (timed once, first), the frames dynamo compiled and the graphs among them, whether a
later call recompiled, and the largest difference between the compiled and the eager output. The
allocator's mmap threshold is fixed first (:func:`fix_allocator`). Compile seconds come
from a fresh process per method with an empty inductor cache directory (in one process inductor reuses the
kernels an earlier model compiled, so a method's first compiled call would look cheap): ``compile_s`` =
first compiled call - a steady one, and ``compile_s_added`` is the method's ``compile_s`` minus the
unpatched model's. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from accel.timing import median_time


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _frames() -> int:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure(pipe: Any, run: Callable[[], torch.Tensor], method: str | None, backend: str, repeats: int
            ) -> dict[str, Any]:
    """One method's eager and compiled figures against the unpatched model in both modes."""
    original = pipe.transformer
    eager_none = median_time(run, repeats, warmup=0)[0]  # this row's own unpatched eager time
    patch = _patch(pipe, method)
    try:
        run()  # online calibration, kernel choice
        eager_out = run()
        eager = median_time(run, repeats, warmup=0)[0]
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        pipe.transformer = torch.compile(original, backend=backend)
        first = _timed(run)
        frames_first = _frames()
        compiled_out = run()
        steady_frames = _frames()
        compiled = median_time(run, repeats, warmup=0)[0]
        recompiled = _frames() != steady_frames
        graphs = _graphs()
        report = next(iter(patch.report().methods.values()), {}) if patch else {}
    finally:
        pipe.transformer = original
        if patch is not None:
            patch.remove()
    return {"method": method or "none", "eager_s": eager, "eager_none_s": eager_none, "compiled_s": compiled,
            "first_compiled_call_s": first, "frames": steady_frames, "graphs": graphs,
            "frames_after_first_call": frames_first,
            "recompiled_after_warmup": recompiled,
            "max_abs_diff_compiled_vs_eager": float((compiled_out - eager_out).abs().max()),
            "compute_fraction": report.get("compute_fraction")}


def fix_allocator() -> bool:
    """Fix glibc's mmap threshold (and stop it trimming) for this process; False where that is not possible.

    glibc serves large tensors from fresh mmaps (a page fault per page, on every call) until a large enough
    free raises its mmap threshold. Compiling frees that much, so without this eager calls after a compile
    ran 20-30% faster here than the same calls before one, and an eager baseline timed first would be timed
    in the slow state (``MALLOC_MMAP_THRESHOLD_`` in the environment has the same effect as this)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def allocator_effect(pipe: Any, run: Callable[[], torch.Tensor], backend: str, repeats: int
                     ) -> tuple[float, float]:
    """Eager seconds per unpatched call before and after one compiled call, in this process's allocator
    state (``--allocator-effect`` leaves glibc's threshold as it is: what :func:`fix_allocator` is for)."""
    run()
    before = median_time(run, repeats, warmup=0)[0]
    original = pipe.transformer
    pipe.transformer = torch.compile(original, backend=backend)
    try:
        run()
    finally:
        pipe.transformer = original
    return before, median_time(run, repeats, warmup=0)[0]


def denoiser_inputs(pipe: Any, run: Callable[[], torch.Tensor]) -> tuple[tuple, dict]:
    """The arguments of the denoiser's first forward in one call of ``run``, copied."""
    captured: list[tuple[tuple, dict]] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not captured:
            clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
            captured.append((tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()}))

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return captured[0]


def _nudged(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The same inputs with the first floating tensor (the noisy latents) moved up by one ulp."""
    done = [False]

    def nudge(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not done[0]:
            done[0] = True
            return value.nextafter(torch.full_like(value, float("inf")))
        return value
    return tuple(nudge(a) for a in args), {k: nudge(v) for k, v in kwargs.items()}


def rounding_check(pipe: Any, run: Callable[[], torch.Tensor], method: str | None, backend: str
                   ) -> dict[str, Any]:
    """One denoiser forward on recorded inputs: the largest change of its output when compiled, beside the
    largest change when its input moves by one ulp in eager mode. A compiled-vs-eager difference of the order
    of the second is the model's own rounding sensitivity (int8 activations sit on rounding steps: inductor's
    float ops differ from eager's in the last bits, as a one-ulp input change does), not a compile error.
    For methods whose forward does not depend on earlier ones (quantization, pruning)."""
    args, kwargs = denoiser_inputs(pipe, run)
    patch = _patch(pipe, method)
    model = pipe.transformer
    try:
        run()  # calibration, kernel choice
        with torch.no_grad():
            eager = model(*args, **kwargs)[0]
            nudged = model(*_nudged(args, kwargs)[0], **_nudged(args, kwargs)[1])[0]
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=backend)(*args, **kwargs)[0]
    finally:
        if patch is not None:
            patch.remove()
    return {"method": method or "none", "output_max_abs": float(eager.abs().max()),
            "compiled_vs_eager": float((compiled - eager).abs().max()),
            "eager_one_ulp_input": float((nudged - eager).abs().max())}


def _patch(pipe: Any, method: str | None) -> Any:
    """``method`` patched onto ``pipe``: ``"default"`` is ``accel.patch(pipe)``'s own recipe."""
    import accel

    if method is None:
        return None
    return accel.patch(pipe) if method == "default" else accel.patch(pipe, method)


def compile_seconds(pipe: Any, run: Callable[[], torch.Tensor], method: str | None, backend: str) -> float:
    """First compiled call minus a steady one, for a process that has compiled nothing yet."""
    patch = _patch(pipe, method)
    run()  # online calibration, kernel choice: not compile time
    pipe.transformer = torch.compile(pipe.transformer, backend=backend)
    first = _timed(run)
    run()
    seconds = first - _timed(run)
    if patch is not None:
        patch.remove()
    return seconds


def _fresh_compile_seconds(args: argparse.Namespace, method: str | None) -> float:
    """:func:`compile_seconds` in a new interpreter with an empty inductor cache directory."""
    with tempfile.TemporaryDirectory(prefix="accel-inductor-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        command = [sys.executable, "-m", "accel.benchmarks.compile_bench", "--model", args.model, "--steps",
                   str(args.steps), "--backend", args.backend, "--compile-seconds-of", method or "none"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"compile-time run of {method or 'none'} failed:\n{done.stderr[-2000:]}")
        return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from accel.pipelines.generation import generate
    from accel.pipelines.loading import load

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="digits-dit")
    p.add_argument("--methods", default="delta-dit,bac")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--out", type=Path, default=Path("bench-out/compile"))
    p.add_argument("--no-compile-times", action="store_true", help="skip the fresh-process compile timings")
    p.add_argument("--compile-seconds-of", help=argparse.SUPPRESS)  # the fresh-process child
    p.add_argument("--allocator-effect", action="store_true",
                   help="only time eager unpatched calls before and after one compile (allocator untouched)")
    p.add_argument("--rounding-check", action="store_true",
                   help="only compare one compiled denoiser forward with eager and with a one-ulp input "
                        "change, for none and each of --methods (quantization, pruning: stateless forwards)")
    args = p.parse_args(argv)
    allocator_fixed = False if args.allocator_effect else fix_allocator()
    pipe = load(args.model)
    labels = list(range(10))

    def run() -> torch.Tensor:
        return generate(pipe, labels, seeds=labels, steps=args.steps)

    if args.allocator_effect:
        before, after = allocator_effect(pipe, run, args.backend, max(args.repeats, 5))
        print(f"eager before a compile {before:.3f} s, after {after:.3f} s, ratio {before / after:.2f}")
        return 0
    if args.rounding_check:
        for method in [None, *[m for m in args.methods.split(",") if m]]:
            print(json.dumps(rounding_check(pipe, run, method, args.backend)), flush=True)
        return 0
    if args.compile_seconds_of:
        method = None if args.compile_seconds_of == "none" else args.compile_seconds_of
        print(compile_seconds(pipe, run, method, args.backend))
        return 0
    rows = [measure(pipe, run, None, args.backend, args.repeats)]
    base = rows[0]
    for method in [m for m in args.methods.split(",") if m]:
        row = measure(pipe, run, method, args.backend, args.repeats)
        row["eager_speedup"] = row["eager_none_s"] / row["eager_s"]
        row["compiled_speedup_vs_compiled_none"] = base["compiled_s"] / row["compiled_s"]
        row["compiled_speedup_vs_eager_none"] = row["eager_none_s"] / row["compiled_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.no_compile_times:
        for row in rows:
            method = None if row["method"] == "none" else row["method"]
            row["compile_s"] = _fresh_compile_seconds(args, method)
        for row in rows[1:]:
            row["compile_s_added"] = row["compile_s"] - base["compile_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "model": args.model, "steps": args.steps, "backend": args.backend,
           "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
           "allocator_fixed": allocator_fixed}
    (args.out / "compile.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    print(json.dumps(base))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

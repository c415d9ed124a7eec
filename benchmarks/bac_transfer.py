"""One BAC calibration for every step count, and outputs that do not depend on earlier calls.

For each step count: the online recipe (BAC calibrates itself once, at 50 steps, on its own conditions and
seeds, and derives every other step count's schedule from the recorded feature distances over noise level)
against a fresh calibration at that step count on the same calibration call (the best a per-step-count
calibration gives), both scored by PSNR against the uncached pipeline on the evaluation batch. Then the
determinism check of the same patch: the evaluation call, other calls (other conditions, batch and step
count), the evaluation call again: bit-identical or not. Quality only; no timing (the compute fraction is
the work that ran).

    python -m accel.benchmarks.bac_transfer --model digits-dit --steps 50 30 20 8
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import accel
from accel.api import DEFAULT_DENOISER_RECIPE
from accel.calls import build_call, default_conditions, run_call
from accel.methods.bac import BACConfig, calibrate
from accel.methods.bac_calibrate import calibration_call
from accel.metrics import psnr
from accel.registry import resolve_method


@dataclass(frozen=True)
class Row:
    steps: int
    online_psnr: float
    fresh_psnr: float
    online_compute: float
    fresh_compute: float
    calibration_generations: int
    same_after_other_calls: bool


def measure(pipe: object, config: BACConfig, steps: int, samples: int) -> Row:
    conditions = default_conditions(pipe, samples)

    def evaluation() -> dict:
        return build_call(pipe, conditions, seeds=list(range(samples)), steps=steps)

    base = run_call(pipe, evaluation())
    with accel.patch(pipe, config) as patch:
        online = run_call(pipe, evaluation())
        facts = patch.report().methods["bac"]
        others = default_conditions(pipe, 3)[::-1]
        run_call(pipe, build_call(pipe, others, seeds=[7, 8, 9], steps=max(2, steps // 2 + 1)))
        again = run_call(pipe, evaluation())
    # Fresh: the same calibration call, recorded at this step count, used only there.
    calls = [{**calibration_call(pipe, batch=config.calibration_batch), "num_inference_steps": steps}]
    schedule = calibrate(pipe, num_inference_steps=steps, config=config, calls=calls)
    schedule.distances = None
    path = Path(tempfile.mkdtemp()) / "fresh.json"
    schedule.save(path)
    with accel.patch(pipe, config.replace(schedule=str(path), calibrate_online=False)) as patch:
        fresh = run_call(pipe, evaluation())
        fresh_compute = patch.report().methods["bac"]["compute_fraction"]
    return Row(steps, psnr(base, online), psnr(base, fresh), facts["compute_fraction"], fresh_compute,
               facts["calibration_generations"], torch.equal(online, again))


def table(model: str, spec: str, rows: list[Row]) -> str:
    lines = [f"`{model}`, `{spec}`", "",
             "| steps | online: PSNR | compute | fresh at this count: PSNR | compute | calibration calls "
             "| same output after other calls |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.steps} | {r.online_psnr:.2f} | {r.online_compute:.3f} | {r.fresh_psnr:.2f} | "
                     f"{r.fresh_compute:.3f} | {r.calibration_generations} | "
                     f"{'yes' if r.same_after_other_calls else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits-dit")
    parser.add_argument("--method", default=DEFAULT_DENOISER_RECIPE[0],
                        help="a BAC spec that calibrates online (default: accel.patch's recipe)")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 30, 20, 8])
    parser.add_argument("--samples", type=int, default=10, help="evaluation batch")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the table here as Markdown")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from accel.pipelines.loading import load

    _, config = resolve_method(args.method)
    if not isinstance(config, BACConfig) or not config.calibrate_online:
        parser.error(f"--method must be a BAC spec that calibrates online, got {args.method!r}")
    pipe = load(args.model)
    rows = []
    for steps in args.steps:
        rows.append(measure(pipe, config, steps, args.samples))
        print(f"{steps} steps: online {rows[-1].online_psnr:.2f} dB, fresh {rows[-1].fresh_psnr:.2f} dB",
              flush=True)
    text = table(args.model, args.method, rows)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

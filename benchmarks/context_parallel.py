"""accel methods under diffusers' Ulysses context parallelism, against the same method in one process.

    python -m accel.benchmarks.context_parallel --model digits-video-dit --methods delta-dit,bac,vmoba

Each rank (``--world`` processes over gloo, one thread each) loads the model, enables
``ContextParallelConfig(ulysses_degree=world)`` on the denoiser before or after ``accel.patch`` (``--orders``)
and runs the call; one process without parallelism runs the same call first. Reported per method and
order: PSNR of rank 0's output against the one-process output of the same method, whether every rank
returned the same output and the same report (the same blocks skipped, the same attention density), and each
rank's compute fraction or density. A rank-dependent caching decision shows up as a hang: the run stops after
``--timeout`` seconds and says so. Speed is not the point on one CPU (the ranks share its cores); correctness
is.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accel.metrics import psnr


def _call(pipe: Any, args: argparse.Namespace) -> np.ndarray:
    from accel.pipelines.generation import generate

    labels = list(range(args.batch))
    kwargs = {"num_frames": args.frames} if args.frames else {}
    return generate(pipe, labels, seeds=labels, steps=args.steps, **kwargs).numpy()


def _facts(patch: Any) -> dict[str, Any]:
    if patch is None:
        return {"text": ""}
    report = patch.report()
    facts: dict[str, Any] = {"text": str(report)}
    for section in report.methods.values():
        for key in ("compute_fraction", "density"):
            if section.get(key) is not None:
                facts[key] = section[key]
    return facts


def _run(args: argparse.Namespace, method: str, order: str | None) -> dict[str, Any]:
    """One method in this process: ``order`` None runs without parallelism."""
    from accel.pipelines.loading import load
    from diffusers import ContextParallelConfig

    import accel

    pipe = load(args.model)

    def enable() -> None:
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=args.world))

    if order == "enable-first":
        enable()
    patch = None if method == "none" else accel.patch(pipe, *([] if method == "default" else [method]))
    if order == "patch-first":
        enable()
    start = time.perf_counter()
    output = _call(pipe, args)
    return {"output": output, "seconds": time.perf_counter() - start, **_facts(patch)}


def run_on_ranks(task: Callable[[int, Any], Any], payload: Any, world: int,
                 timeout: float) -> list[Any] | None:
    """``task(rank, payload)`` in ``world`` spawned processes joined in one gloo group (one thread each);
    their results by rank, or ``None`` when not every rank answered within ``timeout`` seconds (a rank
    stuck in a collective). An exception escaping ``task`` on a rank is raised here with its traceback.
    ``task`` must be importable by name (a module-level function)."""
    context = torch.multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = str(random.Random().randrange(20000, 40000))
    processes = [context.Process(target=_rank_main, args=(rank, world, port, task, payload, queue))
                 for rank in range(world)]
    for process in processes:
        process.start()
    try:
        answers = {rank: (ok, value) for rank, ok, value in (queue.get(timeout=timeout) for _ in processes)}
    except Exception:  # queue.Empty
        answers = None
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    if answers is None:
        return None
    for rank, (ok, value) in sorted(answers.items()):
        if not ok:
            raise RuntimeError(f"rank {rank} failed:\n{value}")
    return [answers[rank][1] for rank in range(world)]


def _rank_main(rank: int, world: int, port: str, task: Callable[[int, Any], Any], payload: Any,
               queue: Any) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    # diffusers picks each rank's device as rank % torch.accelerator.device_count(): zero on CPU only
    torch.accelerator.device_count = lambda: 1
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, True, task(rank, payload)))
    except Exception:  # noqa: BLE001 - raised in the parent
        queue.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


def _jobs_on_rank(rank: int, payload: tuple[argparse.Namespace, list[tuple[str, str]]]) -> dict[str, Any]:
    args, jobs = payload
    results: dict[str, Any] = {}
    for method, order in jobs:
        try:
            results[f"{method}|{order}"] = _run(args, method, order)
        except Exception:  # noqa: BLE001 - reported in the table
            results[f"{method}|{order}"] = {"error": traceback.format_exc(limit=3)[-800:]}
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="digits-video-dit")
    p.add_argument("--methods", default="none,delta-dit,bac,default,vmoba,adaspa")
    p.add_argument("--orders", default="enable-first,patch-first")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--frames", type=int, default=16, help="video frames (0: the model is an image model)")
    p.add_argument("--batch", type=int, default=2, help="labels 0..batch-1, seeds the same")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=Path("bench-out/context-parallel"))
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    orders = [o for o in args.orders.split(",") if o]
    single = {method: _run(args, method, None) for method in methods}
    jobs = [(method, order) for method in methods for order in orders]
    ranks = run_on_ranks(_jobs_on_rank, (args, jobs), args.world, args.timeout)
    rows = []
    for method, order in jobs:
        alone = single[method]
        facts = {k: alone[k] for k in ("compute_fraction", "density") if k in alone}
        row: dict[str, Any] = {"method": method, "order": order, "one_process_s": round(alone["seconds"], 3),
                               "one_process": facts}
        key = f"{method}|{order}"
        if ranks is None:
            row["error"] = f"no result within {args.timeout:.0f} s: a rank hung in a collective"
        elif any("error" in r[key] for r in ranks):
            row["error"] = next(r[key]["error"] for r in ranks if "error" in r[key])
        else:
            got = [r[key] for r in ranks]
            row.update(
                psnr_vs_one_process=psnr(torch.from_numpy(single[method]["output"]),
                                         torch.from_numpy(got[0]["output"])),
                max_abs_diff=float(np.abs(got[0]["output"] - single[method]["output"]).max()),
                ranks_same_output=all(np.array_equal(g["output"], got[0]["output"]) for g in got),
                ranks_same_report=all(g["text"] == got[0]["text"] for g in got),
                per_rank={k: [g.get(k) for g in got] for k in ("compute_fraction", "density") if k in got[0]},
                parallel_s=round(max(g["seconds"] for g in got), 3),
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "model": args.model, "world": args.world, "steps": args.steps,
           "frames": args.frames, "batch": args.batch, "date": time.strftime("%Y-%m-%d")}
    (args.out / "context_parallel.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

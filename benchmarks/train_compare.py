"""Dense vs sparse-attention training, from the step logs ``train_video_dit --log`` writes.

    python -m accel.benchmarks.train_compare dense.jsonl vmoba.jsonl --out compare   # table + loss curves

Seconds per step are the median after ``--warmup`` steps; the final loss is the mean of the last ``--tail``
steps (single steps are noisy: each draws its own noise level per sample). Writes ``compare.md`` (a table)
and ``compare.png`` (both loss curves, a running mean over ``--tail`` steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path} holds no steps.")
    return rows


def summary(rows: list[dict], warmup: int, tail: int) -> dict:
    timed = [r["seconds"] for r in rows[warmup:]] or [r["seconds"] for r in rows]
    last = [r["loss"] for r in rows[-tail:]]
    return {"steps": len(rows), "s_per_step": statistics.median(timed), "final_loss": sum(last) / len(last)}


def running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(logs: dict[str, list[dict]], tail: int, path: Path) -> None:
    from accel.extras import require

    matplotlib = require("matplotlib", "bench", "the loss-curve figure")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, rows in logs.items():
        ax.plot([r["step"] for r in rows], running_mean([r["loss"] for r in rows], tail), label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"flow loss (running mean of {tail})")
    ax.set_title("digits-video-dit, 16-frame clips: dense vs sparse attention")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path, help="the dense run's log")
    parser.add_argument("others", type=Path, nargs="+", help="the sparse runs' logs")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tail", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.png")
    args = parser.parse_args(argv)
    logs = {p.stem: read_log(p) for p in [args.baseline, *args.others]}
    base = summary(logs[args.baseline.stem], args.warmup, args.tail)
    lines = ["| run | steps | s/step | speedup | final loss | vs dense |", "|---|---|---|---|---|---|"]
    for name, rows in logs.items():
        s = summary(rows, args.warmup, args.tail)
        lines.append(f"| {name} | {s['steps']} | {s['s_per_step']:.2f} | {base['s_per_step'] / s['s_per_step']:.2f}x | "
                     f"{s['final_loss']:.4f} | {100 * (s['final_loss'] / base['final_loss'] - 1):+.1f}% |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(logs, args.tail, args.out.with_suffix(".png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

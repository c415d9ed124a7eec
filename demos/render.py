"""What the demo shows: upscaled image rows, animated GIFs and frame strips, the numbers, the history, the Pareto plot.

Generated digits are 16-32 px; they are enlarged with nearest-neighbour so that pixels stay pixels
(smoothing would hide exactly the artefacts a comparison is looking for).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from accel.extras import require

TILE = 128  # displayed side of one sample, px
GAP = 4
GIF_FRAME_MS = 120

HISTORY_COLUMNS = ["#", "model", "recipe", "steps", "seed", "label", "samples", "baseline s", "accel s",
                   "speedup", "PSNR dB", "SSIM", "judge base", "judge accel"]


def _tile(frame: torch.Tensor, tile: int = TILE) -> np.ndarray:
    """(H, W) or (C, H, W) in [0, 1] -> uint8 (h, w) grey or (h, w, 3) colour, enlarged by a whole factor
    (nearest neighbour)."""
    if frame.dim() == 3:
        frame = frame[0] if frame.shape[0] == 1 else frame[:3].permute(1, 2, 0)
    array = (frame.float().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    factor = max(1, tile // max(array.shape[:2]))
    block = np.ones((factor, factor) + (1,) * (array.ndim - 2), dtype=np.uint8)
    return np.kron(array, block)


def _grid(frames: list[torch.Tensor], tile: int = TILE, columns: int | None = None) -> Image.Image:
    """Frames in a near-square grid (or ``columns`` wide) on a light background, ``GAP`` px apart."""
    tiles = [_tile(frame, tile) for frame in frames]
    colour = any(t.ndim == 3 for t in tiles)
    if colour:
        tiles = [t if t.ndim == 3 else np.repeat(t[..., None], 3, axis=2) for t in tiles]
    columns = columns or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    side_h = max(t.shape[0] for t in tiles)
    side_w = max(t.shape[1] for t in tiles)
    shape = ((rows * side_h + GAP * (rows - 1), columns * side_w + GAP * (columns - 1))
             + ((3,) if colour else ()))
    canvas = np.full(shape, 235, dtype=np.uint8)
    for index, t in enumerate(tiles):
        y, x = divmod(index, columns)
        y, x = y * (side_h + GAP), x * (side_w + GAP)
        canvas[y : y + t.shape[0], x : x + t.shape[1]] = t
    return Image.fromarray(canvas, mode="RGB" if colour else "L")


def image_grid(images: torch.Tensor) -> Image.Image:
    """Images (N, C, H, W) -> one enlarged near-square grid of the N samples (seed order, row by row)."""
    return _grid(list(images))


def video_gif(video: torch.Tensor, folder: str | Path | None = None) -> str:
    """Videos (N, F, H, W) or (N, F, C, H, W) -> an animated GIF (samples in a grid) on disk; returns its
    path."""
    frames = [_grid([sample[f] for sample in video]).convert("P") for f in range(video.shape[1])]
    folder = Path(folder or tempfile.mkdtemp(prefix="accel-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    handle, path = tempfile.mkstemp(dir=folder, suffix=".gif")
    os.close(handle)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)
    return path


def frame_strip(baseline: torch.Tensor, accelerated: torch.Tensor, max_frames: int = 8) -> Image.Image:
    """First sample's frames, baseline above accelerated, ``max_frames`` evenly spaced frames."""
    count = baseline.shape[1]
    picks = sorted({round(i * (count - 1) / max(max_frames - 1, 1)) for i in range(min(max_frames, count))})
    top = _grid([baseline[0, f] for f in picks], tile=64, columns=len(picks))
    bottom = _grid([accelerated[0, f] for f in picks], tile=64, columns=len(picks))
    strip = Image.new(top.mode, (top.width, top.height + bottom.height + GAP), "white")
    strip.paste(top, (0, 0))
    strip.paste(bottom, (0, top.height + GAP))
    return strip


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def metrics_markdown(record: dict[str, Any]) -> str:
    """The numbers of one run as a small Markdown table (what a person reads first)."""
    psnr = "∞ (identical)" if record["psnr_db"] is None else f"{record['psnr_db']:.2f} dB"
    lines = [
        (f"**{record['recipe']}** on `{record['model']}` · {record['steps']} steps · label {record['label']} · "
         f"seeds {record['seed']}–{record['seed'] + record['samples'] - 1}"),
        "",
        "| | Baseline | Accelerated |",
        "|---|---|---|",
        f"| Latency (median of {record['repeats']}) | {record['baseline_s']:.3f} s | {record['accelerated_s']:.3f} s |",
        f"| Speedup | 1.00× | **{record['speedup']:.2f}×** |",
        f"| PSNR vs baseline | — | {psnr} |",
        f"| SSIM vs baseline | — | {record['ssim']:.4f} |",
        f"| Judge accuracy | {_pct(record['judge_baseline'])} | {_pct(record['judge_accelerated'])} |",
    ]
    if record.get("compute_fraction") is not None:
        lines.append(f"| Compute executed | 100% | {_pct(record['compute_fraction'])} |")
    lines.extend(f"\n_Note: {note}_" for note in record.get("notes", []))
    return "\n".join(lines)


def history_rows(history: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows for the history table, one per run of this session (``HISTORY_COLUMNS``)."""
    rows = []
    for index, r in enumerate(history, 1):
        rows.append([index, r["model"], r["recipe"], r["steps"], r["seed"], r["label"], r["samples"],
                     r["baseline_s"], r["accelerated_s"], r["speedup"],
                     "inf" if r["psnr_db"] is None else r["psnr_db"], r["ssim"],
                     _pct(r["judge_baseline"]), _pct(r["judge_accelerated"])])
    return rows


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats in both speedup and PSNR (higher is better for both)."""
    front = []
    for i, (s, q) in enumerate(points):
        dominated = any((s2 >= s and q2 >= q) and (s2 > s or q2 > q) for j, (s2, q2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def pareto_figure(history: list[dict[str, Any]]) -> Any:
    """Speedup vs PSNR of this session's runs, the Pareto front joined; identical outputs sit on top."""
    # no pyplot: no global figure registry to leak between requests
    figure = require("matplotlib.figure", "demo", "accel-demo's Pareto plot")
    fig = figure.Figure(figsize=(6, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_xlabel("speedup over baseline (×)")
    ax.set_ylabel("PSNR vs baseline (dB)")
    ax.grid(alpha=0.3)
    if not history:
        ax.text(0.5, 0.5, "Runs appear here after Compare", ha="center", va="center", transform=ax.transAxes)
        return fig
    finite = [r["psnr_db"] for r in history if r["psnr_db"] is not None]
    top = (max(finite) if finite else 40.0) + 5.0  # where bit-identical runs (PSNR = inf) are drawn
    points = [(r["speedup"], top if r["psnr_db"] is None else r["psnr_db"]) for r in history]
    families = sorted({r["method"] for r in history})
    colors = {name: f"C{i % 10}" for i, name in enumerate(families)}
    for family in families:
        idx = [i for i, r in enumerate(history) if r["method"] == family]
        ax.scatter([points[i][0] for i in idx], [points[i][1] for i in idx], color=colors[family], label=family, zorder=3)
    for i, (x, y) in enumerate(points):
        ax.annotate(f"#{i + 1}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = pareto_front(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", lw=1, alpha=0.6,
            label="Pareto front", zorder=2)
    if len(finite) < len(history):
        ax.axhline(top, color="grey", lw=0.5)
        ax.text(ax.get_xlim()[0], top, " identical (∞)", va="bottom", fontsize=8, color="grey")
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.legend(fontsize=8, loc="best")
    return fig

"""Benchmark outputs: the stdout table, results.json, results.md, pareto.png and side-by-side grids."""

from __future__ import annotations

import json
import platform
import re
import sys
from pathlib import Path
from typing import Any

import torch

from accel.benchmarks.runner import Record
from accel.extras import require

COLUMNS = (
    ("model", "model", "{}"), ("method", "method", "{}"), ("settings", "settings", "{}"),
    ("steps", "steps", "{}"), ("batch", "batch", "{}"), ("latency_s", "latency s", "{:.3f}"),
    ("latency_spread_s", "spread s", "{:.3f}"), ("baseline_latency_s", "none s", "{:.3f}"),
    ("speedup", "speedup", "{:.2f}x"), ("speedup_spread", "± pairs", "{:.2f}"), ("psnr", "PSNR", "{:.2f}"),
    ("ssim", "SSIM", "{:.4f}"), ("lpips", "LPIPS", "{:.4f}"), ("clip_score", "CLIP", "{:.2f}"),
    ("judge_acc", "judge", "{:.3f}"), ("attr_acc", "attributes", "{:.3f}"), ("fid_digits", "FID-digits", "{:.1f}"),
    ("top1", "top1", "{:.3f}"),
    ("compute_fraction", "compute", "{:.3f}"), ("peak_mem_mb", "peak MB", "{:.0f}"),
    ("params_bytes", "params MB", "{}"),
)


def environment(command: list[str]) -> dict[str, Any]:
    """The command, versions and hardware, written once per results file."""
    import diffusers
    import timm

    return {
        "command": " ".join(["accel-bench", *command]),
        "python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
        "timm": timm.__version__, "platform": platform.platform(), "processor": platform.processor(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _cell(record: Record, key: str, fmt: str) -> str:
    value = getattr(record, key)
    if key == "psnr" and value is None and record.method == "none" and record.error is None:
        return "inf"
    if value is None:
        return "-"
    if key == "params_bytes":
        return f"{value / 2**20:.2f}"
    return fmt.format(value)


def table(records: list[Record], selected_only: bool = False) -> str:
    """A fixed-width text table (markdown-compatible) of the records."""
    rows = [r for r in records if r.selected or not selected_only]
    used = [c for c in COLUMNS if any(getattr(r, c[0]) is not None for r in rows)]
    header = [title for _, title, _ in used] + ["note"]
    body = []
    for r in rows:
        note = r.error or "; ".join(r.notes)
        body.append([_cell(r, key, fmt) for key, _, fmt in used] + [note])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def write_json(path: Path, env: dict[str, Any], records: list[Record]) -> None:
    payload = {"environment": env, "fields": [c[0] for c in COLUMNS], "records": [r.to_dict() for r in records]}
    path.write_text(json.dumps(payload, indent=1, allow_nan=False))


def write_markdown(path: Path, env: dict[str, Any], records: list[Record]) -> None:
    text = [
        "# accel-bench results", "", f"Command: `{env['command']}`", "",
        f"torch {env['torch']}, diffusers {env['diffusers']}, {env['platform']}, {env['cpu_threads']} threads"
        + (f", {env['cuda']}" if env.get("cuda") else ""), "",
        "Reported points (per method: the fastest setting meeting the quality floor when sweeping):", "",
        table(records, selected_only=True), "",
    ]
    if any(not r.selected for r in records):
        text += ["All measured points:", "", table(records), ""]
    path.write_text("\n".join(text))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (speedup, PSNR) points no other point beats on both, by speedup: a method's best trade-offs."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):  # fastest first
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


def write_pareto(path: Path, records: list[Record]) -> None:
    """Speedup vs PSNR: every point of a method as a marker, its Pareto front as a line (the baseline's
    infinite PSNR is drawn at the top). Lines through all points would zigzag between settings families."""
    matplotlib = require("matplotlib", "bench", "accel-bench's pareto.png")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in records if r.error is None and r.speedup is not None]
    finite = [r.psnr for r in points if r.psnr is not None]
    top = (max(finite) if finite else 40.0) + 5
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family in dict.fromkeys(r.method for r in points):
        series = [(r.speedup, r.psnr if r.psnr is not None else top) for r in points if r.method == family]
        front = pareto_front(series)
        (line,) = ax.plot([x for x, _ in front], [y for _, y in front], marker="o", label=family)
        ax.scatter([x for x, _ in series], [y for _, y in series], s=14, color=line.get_color(), alpha=0.45)
    ax.set_xlabel("speedup vs none (same run)")
    ax.set_ylabel("PSNR vs none (dB)")
    ax.axhline(top, color="grey", linewidth=0.6, linestyle=":")
    ax.annotate("no finite PSNR (the baseline itself, identical output, or not measured)", (0.01, top),
                xycoords=("axes fraction", "data"), xytext=(0, 4), textcoords="offset points", fontsize=7,
                color="grey")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _side_by_side(cells: list[torch.Tensor]) -> torch.Tensor:
    """(C, H, W) cells in a row, one white pixel column between neighbours (so each reads as one picture)."""
    gap = torch.ones(cells[0].shape[0], cells[0].shape[1], 1)
    return torch.cat([piece for cell in cells for piece in (cell, gap)][:-1], dim=2)


def grid_strip(outputs: torch.Tensor, max_samples: int = 10) -> torch.Tensor | None:
    """One method's row of the grid as (C, H, W'): images side by side, or for videos the frames of
    the first two samples side by side. ``None`` for outputs that are not pictures (logits)."""
    outputs = outputs[:max_samples].float().clamp(0, 1)
    if outputs.dim() == 4 and outputs.shape[1] in (1, 3):  # (N, C, H, W) images
        return _side_by_side(list(outputs))
    if outputs.dim() == 4:  # (N, F, H, W) single-channel videos
        outputs = outputs.unsqueeze(2)
    if outputs.dim() == 5:  # (N, F, C, H, W) videos
        return _side_by_side([frame for video in outputs[:2] for frame in video])
    return None


LABEL_CHARS, LABEL_LINE_PX = 24, 12  # what fits PIL's default font in the grid's 150 px label column
LABEL_FONT_PX = 11  # the default font's line height: spacing adds the rest of a label line


def label_lines(name: str, width: int = LABEL_CHARS, max_lines: int = 4) -> list[str]:
    """``name`` in lines of at most ``width`` characters, broken after the ``:``, ``=`` and ``+`` of a method
    spec (so ``quest:keep_float_when_faster=False`` keeps its settings readable); a part longer than a
    line is cut, and a name needing more than ``max_lines`` lines ends in ``...``."""
    lines: list[str] = []
    for part in re.split(r"(?<=[:+=])", name):
        while len(part) > width:
            lines.append(part[:width])
            part = part[width:]
        if lines and len(lines[-1]) + len(part) <= width:
            lines[-1] += part
        elif part:
            lines.append(part)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 3] + "..."
    return lines


def write_grid(path: Path, rows: dict[str, torch.Tensor], max_samples: int = 10, scale: int = 4) -> None:
    """Side-by-side outputs: one labelled row per method, each sample enlarged ``scale`` times
    (nearest neighbour, so pixels stay pixels)."""
    from PIL import Image, ImageDraw

    tiles = [(name, strip) for name, outputs in rows.items()
             if (strip := grid_strip(outputs, max_samples)) is not None]
    if not tiles:
        return
    label_w, row_gap = 150, scale  # rows apart, so that similar rows do not read as one tall picture
    width = max(t.shape[2] for _, t in tiles) * scale + label_w
    height = sum(t.shape[1] * scale + row_gap for _, t in tiles) - row_gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for name, strip in tiles:
        rgb = strip.expand(3, -1, -1) if strip.shape[0] == 1 else strip[:3]
        array = (rgb.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        img = Image.fromarray(array, mode="RGB").resize((strip.shape[2] * scale, strip.shape[1] * scale),
                                                        Image.NEAREST)
        canvas.paste(img, (label_w, y))
        lines = label_lines(name, max_lines=max(1, (strip.shape[1] * scale - 4) // LABEL_LINE_PX))
        draw.text((4, y + 4), "\n".join(lines), fill="black", spacing=LABEL_LINE_PX - LABEL_FONT_PX)
        y += strip.shape[1] * scale + row_gap
    canvas.save(path)

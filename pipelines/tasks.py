"""Task metrics of the embedded generators: what "quality kept" means beyond PSNR against the baseline.

    kind = task_kind(pipe)                  # "digits", "digit-captions" or None (no task metric)
    task_scores(kind, images, conditions)   # {"judge_acc": ..., "attr_acc": ..., "fid_digits": ...}

``digits``: the class-conditional digit pipelines, scored by the digit judge. ``digit-captions``:
digits-pixart, whose prompts state a digit and its attributes; the canvas judge scores the digit, the
attribute rules of ``accel.pipelines.captions`` the rest, and FID-digits the variety against real digits.
A pipeline folder declares its task in ``train_info.json`` (``"task"``), so copies of it keep their metric.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TASKS = ("digits", "digit-captions")


def task_kind(pipe: Any) -> str | None:
    """The task metric that applies to ``pipe``'s outputs, if any."""
    from accel.pipelines.digits_dit import DigitsDiTPipeline
    from accel.pipelines.digits_video import DigitsVideoPipeline

    if isinstance(pipe, (DigitsDiTPipeline, DigitsVideoPipeline)):
        return "digits"
    folder = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    info = Path(folder) / "train_info.json" if isinstance(folder, str) and folder else None
    if info is None or not info.is_file():
        return None
    try:
        task = json.loads(info.read_text()).get("task")
    except (json.JSONDecodeError, AttributeError):
        return None
    return task if task in TASKS else None


def task_scores(kind: str | None, outputs: torch.Tensor, conditions: list[Any]) -> dict[str, float]:
    """Scores of ``outputs`` generated from ``conditions`` (one per output) under the task ``kind``."""
    from accel.pipelines import judges

    if kind == "digits":
        return {"judge_acc": float(judges.judge_accuracy(outputs, torch.tensor(conditions)))}
    if kind == "digit-captions":
        return judges.caption_scores(outputs, [str(c) for c in conditions])
    return {}

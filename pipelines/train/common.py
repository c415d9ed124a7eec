"""Helpers shared by the training scripts: seeding, EMA, learning-rate schedule, progress logging."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


def seed_everything(seed: int, threads: int | None = None) -> torch.Generator:
    """Seeds python, numpy and torch and pins the thread count.

    One thread by default (``ACCEL_TRAIN_THREADS`` overrides): on the 2 shared cores, two OpenMP threads
    competing with another process wait on each other at every small op and ran 5-10x slower.
    """
    threads = threads or int(os.environ.get("ACCEL_TRAIN_THREADS", "1"))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # denormal weights/grads make CPU matmuls many times slower
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 5% of the peak: stable for small transformers trained briefly."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of a model's weights (sampling quality of diffusion models relies on it)."""

    def __init__(self, model: torch.nn.Module, decay: float, warm_up: bool = True) -> None:
        self.decay = decay
        # warm_up: for a random init, whose weights no average should keep. A run continued from saved
        # (averaged) weights starts the average at full decay: warmed up, its first steps' average would be
        # the live weights, which a fresh optimizer moves most.
        self.warm_up = warm_up
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step)) if self.warm_up else self.decay
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - decay)


class Progress:
    """Prints step, loss and elapsed time every ``every`` steps (logs go to a file in the background)."""

    def __init__(self, total: int, every: int = 25) -> None:
        self.total, self.every, self.start = total, every, time.time()
        self.losses: list[float] = []

    def log(self, step: int, loss: float, **extra: float) -> None:
        self.losses.append(loss)
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            recent = sum(self.losses[-self.every:]) / len(self.losses[-self.every:])
            more = " ".join(f"{k}={v:.4g}" for k, v in extra.items())
            print(f"step {step + 1}/{self.total} loss {recent:.4f} {more} {self.elapsed():.0f}s", flush=True)

    def elapsed(self) -> float:
        return time.time() - self.start


def write_train_info(folder: Path, info: dict) -> None:
    """Records how the weights were made (seed, steps, wall time) beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, model: torch.nn.Module, step: int,
                   ema: EMA | None = None, clip: float | None = 1.0) -> None:
    """One update of every training script: backward, clip the gradient norm, step, update the EMA."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    if ema is not None:
        ema.update(model, step)

"""Block analysis: how much quality drops when each block is removed alone (the sensitivity profile).

Paper: "HierarchicalPrune" scores one-block removals by generating and scoring images; late blocks cost
little, early blocks collapse the layout. Here a profile is measured with:

- ``"quality"``: pipelines: PSNR against the unpruned outputs of the same calls, plus the task metric the
  caller passes as ``score`` (e.g. a judge's accuracy of generated digits). Classifiers (timm ViT): top-1.
- ``"output"``: a fast, data-free proxy for any model: the normalized error of the model's output on
  recorded inputs (the teacher trajectory) with the block removed.

Example::

    profile = analyze_blocks(pipe, score=my_task_metric)   # PSNR + the task metric per block
    print(profile.table()); profile.plot("sensitivity.png"); profile.save("sensitivity.json")
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from accel.artifacts import architecture_fingerprint, read_json, unwrap, write_artifact
from accel.modules import output_tensor, resolve_target
from accel.prune.distill import InputPool
from accel.prune.structure import PrunableBlock, pinned_blocks, prunable_blocks, swap_blocks
from accel.registry import find_adapter

PROFILE_FORMAT = "accel.hierarchical-prune.profile"
PROFILE_VERSION = 1
#: Metrics where higher is better; a block's damage is the baseline minus the value without it.
HIGHER_IS_BETTER = {"judge_accuracy": True, "psnr": True, "top1": True, "output_error": False}


@dataclass
class SensitivityProfile:
    """Per-block quality without that block, the baseline, a combined score and measured time shares.

    ``score[i]`` in [0, 1]: the mean over metrics of block ``i``'s damage, min-max normalised across blocks
    (0: the least harmful removal, 1: the most). ``time_fraction[i]``: block ``i``'s share of one forward.
    """

    model: str
    blocks: list[str]
    metrics: dict[str, list[float]]
    baseline: dict[str, float]
    time_fraction: list[float] = field(default_factory=list)
    pinned: list[int] = field(default_factory=list)
    setting: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> list[float]:
        n = len(self.blocks)
        parts = []
        for name, values in self.metrics.items():
            higher = HIGHER_IS_BETTER.get(name, True)
            finite = [v if math.isfinite(v) else (1e3 if v > 0 else -1e3) for v in values]
            damage = [-v if higher else v for v in finite]  # larger = worse without the block
            lo, hi = min(damage), max(damage)
            parts.append([(d - lo) / (hi - lo) if hi > lo else 0.0 for d in damage])
        return [sum(p[i] for p in parts) / len(parts) if parts else 0.0 for i in range(n)]

    def table(self) -> str:
        """A Markdown table: one row per block position."""
        names = list(self.metrics)
        head = "| block | name | " + " | ".join(f"{m} w/o block" for m in names) + " | score | time share |"
        rule = "|" + "---|" * (len(names) + 4)
        base = "| - | (unpruned) | " + " | ".join(_fmt(self.baseline.get(m, float("nan"))) for m in names) + " | | |"
        rows = [head, rule, base]
        score = self.score
        for i, name in enumerate(self.blocks):
            share = f"{self.time_fraction[i]:.3f}" if self.time_fraction else ""
            pin = " (pinned)" if i in self.pinned else ""
            cells = " | ".join(_fmt(self.metrics[m][i]) for m in names)
            rows.append(f"| {i} | {name}{pin} | {cells} | {score[i]:.3f} | {share} |")
        return "\n".join(rows)

    def plot(self, path: str | Path) -> Path:
        """A PNG: each metric without block i, by position, with the baseline as a dashed line."""
        from accel.extras import require

        matplotlib = require("matplotlib", "bench", "SensitivityProfile.plot")
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.metrics) + ["score"]
        fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.0), squeeze=False)
        positions = list(range(len(self.blocks)))
        for ax, name in zip(axes[0], names):
            values = self.score if name == "score" else [v if math.isfinite(v) else float("nan")
                                                           for v in self.metrics[name]]
            ax.bar(positions, values, color="#4c72b0")
            base = self.baseline.get(name)
            if base is not None and math.isfinite(base):
                ax.axhline(base, color="#c44e52", linestyle="--", label="unpruned")
                ax.legend(fontsize=7)
            ax.set_title(f"{name} without block" if name != "score" else "sensitivity score", fontsize=9)
            ax.set_xlabel("block position")
            ax.set_xticks(positions)
        fig.suptitle(f"{self.model}: one block removed at a time", fontsize=10)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def to_json(self) -> dict[str, Any]:
        """The profile's fields (saved files wrap them in the ``accel.artifacts`` envelope; prune artifacts
        embed them as they are)."""
        return {"model": self.model, "blocks": self.blocks,
                "metrics": {k: [_json_float(v) for v in vs] for k, vs in self.metrics.items()},
                "baseline": {k: _json_float(v) for k, v in self.baseline.items()},
                "time_fraction": self.time_fraction, "pinned": self.pinned, "setting": self.setting}

    def save(self, path: str | Path) -> Path:
        return write_artifact(path, PROFILE_FORMAT, PROFILE_VERSION, self.to_json())

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "this data") -> SensitivityProfile:
        if "_type" in data or "format" in data:  # a saved file (or an embedded profile from before)
            data, _ = unwrap(data, PROFILE_FORMAT, PROFILE_VERSION, where, "sensitivity profile")
        return cls(model=data["model"], blocks=list(data["blocks"]),
                   metrics={k: [float(v) for v in vs] for k, vs in data["metrics"].items()},
                   baseline={k: float(v) for k, v in data["baseline"].items()},
                   time_fraction=list(data.get("time_fraction", [])), pinned=list(data.get("pinned", [])),
                   setting=dict(data.get("setting", {})))

    @classmethod
    def load(cls, path: str | Path) -> SensitivityProfile:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Sensitivity profile {str(path)!r} does not exist; write one with "
                                    "analyze_blocks(...).save(path).")
        return cls.from_json(read_json(path, "sensitivity profile",
                                       "Write one with analyze_blocks(...).save(path)."), str(path))


def _fmt(value: float) -> str:
    return "inf" if value == math.inf else f"{value:.4g}"


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


@contextmanager
def without_block(model: torch.nn.Module, blocks: list[PrunableBlock], index: int):
    """Temporarily remove one block (the container is swapped back on exit, also on error)."""
    undo: list[tuple[Any, str, Any]] = []

    def setter(obj: Any, name: str, value: Any) -> None:
        undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    try:
        swap_blocks(model, blocks, [index], setter=setter)
        yield
    finally:
        for obj, name, old in reversed(undo):
            setattr(obj, name, old)


class _BlockTimer:
    """Wall time spent in each block and in the whole model over the forwards it watches."""

    def __init__(self, model: torch.nn.Module, blocks: list[PrunableBlock]) -> None:
        self.total = 0.0
        self.per_block = [0.0] * len(blocks)
        self._handles = []
        for i, block in enumerate(blocks):
            self._watch(block.module, i)
        self._watch(model, -1)

    def _watch(self, module: torch.nn.Module, index: int) -> None:
        start: list[float] = []

        def pre(*_: Any) -> None:
            start.append(time.perf_counter())

        def post(*_: Any) -> None:
            elapsed = time.perf_counter() - start.pop()
            if index < 0:
                self.total += elapsed
            else:
                self.per_block[index] += elapsed

        self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def fractions(self) -> list[float]:
        return [t / self.total if self.total > 0 else 0.0 for t in self.per_block]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


#: Scores of one evaluation's outputs: ``(outputs, calls) -> {metric: value}`` (e.g. a task judge's accuracy).
Score = Callable[[torch.Tensor, Sequence[dict[str, Any]]], dict[str, float]]


def generation_evaluator(pipe: Any, calls: Sequence[dict[str, Any]], score: Score | None = None
                         ) -> Callable[[], dict[str, Any]]:
    """PSNR of the pipeline's outputs over ``calls`` against the first (unpruned) evaluation, plus
    whatever ``score`` measures on them (the caller knows its task metric; the library does not)."""
    from accel import metrics
    from accel.calls import run_call

    reference: list[torch.Tensor] = []

    def evaluate() -> dict[str, float]:
        outputs = torch.cat([run_call(pipe, dict(kwargs)) for kwargs in calls])
        if not reference:
            reference.append(outputs)
        return {**(score(outputs, calls) if score is not None else {}),
                "psnr": metrics.psnr(reference[0], outputs)}

    return evaluate


def classifier_evaluator(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
                         ) -> Callable[[], dict[str, float]]:
    """Top-1 accuracy of a classifier on ``images``."""
    from accel import metrics

    return lambda: {"top1": metrics.top1(model, images, labels)}


def output_evaluator(model: torch.nn.Module, pool: InputPool, batch_size: int = 64
                     ) -> Callable[[], dict[str, float]]:
    """Normalized output error vs the first (unpruned) evaluation, over every input of ``pool``."""
    reference: list[torch.Tensor] = []

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        outputs = [output_tensor(model(**chunk)).float() for chunk in pool.chunks(batch_size)]
        if not reference:
            reference.extend(outputs)
        err = sum(float((o - r).pow(2).sum()) for o, r in zip(outputs, reference))
        scale = sum(float(r.pow(2).sum()) for r in reference) or 1.0
        return {"output_error": err / scale}

    return evaluate


def analyze_blocks(
    target: Any,
    evaluate: Callable[[], dict[str, float]] | None = None,
    *,
    per_class: int = 4,
    steps: int = 50,
    guidance_scale: float = 4.0,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    pool: InputPool | None = None,
    calls: Sequence[dict[str, Any]] | None = None,
    score: Score | None = None,
    progress: bool = True,
) -> SensitivityProfile:
    """Remove each block alone, evaluate, restore; returns the sensitivity profile.

    Args:
        target: a diffusers pipeline, a timm classifier, or any adapter-supported model.
        evaluate: ``() -> {metric: value}`` run on the current state of ``target``; chosen by target when None:
            pipelines -> PSNR vs the unpruned outputs of ``calls`` (default: ``per_class`` samples of each
            default prompt or class label, ``steps``, CFG ``guidance_scale``) and ``score(outputs, calls)``;
            classifiers -> top-1 on ``images``/``labels``; any model with ``pool`` -> normalized output
            error on the recorded inputs.
        progress: show a progress bar over blocks.

    The first evaluation is the unpruned baseline; it also times each block's share of a forward.
    """
    pipe, model = resolve_target(target)
    adapter = find_adapter(model)
    blocks = prunable_blocks(adapter)
    if evaluate is None:
        evaluate, setting = _default_evaluator(pipe, model, adapter, per_class, steps, guidance_scale,
                                               images, labels, pool, calls, score)
    else:
        setting = {"evaluator": getattr(evaluate, "__name__", "custom")}
    timer = _BlockTimer(model, blocks)
    try:
        baseline = evaluate()
    finally:
        timer.close()
    pinned = pinned_blocks(model, blocks)
    results: dict[str, list[float]] = {k: [] for k in baseline}
    for block in tqdm(blocks, desc=f"block analysis ({type(model).__name__})", disable=not progress):
        with without_block(model, blocks, block.index):
            values = evaluate()
        for key in results:
            results[key].append(float(values[key]))
    return SensitivityProfile(model=architecture_fingerprint(model), blocks=[b.name for b in blocks], metrics=results,
                              baseline={k: float(v) for k, v in baseline.items()},
                              time_fraction=timer.fractions(), pinned=sorted(pinned), setting=setting)


def _default_evaluator(pipe: Any, model: torch.nn.Module, adapter: Any, per_class: int, steps: int,
                       guidance_scale: float, images: torch.Tensor | None, labels: torch.Tensor | None,
                       pool: InputPool | None, calls: Sequence[dict[str, Any]] | None, score: Score | None
                       ) -> tuple[Callable[[], dict[str, float]], dict[str, Any]]:
    if pool is not None:
        return output_evaluator(model, pool), {"evaluator": "output_error", "inputs": len(pool)}
    if pipe is not None:
        from accel.calls import call_shape, default_calls, default_conditions

        if calls is None:
            conditions = [c for c in default_conditions(pipe) for _ in range(per_class)]
            calls = default_calls(pipe, [1], steps, conditions, guidance_scale=guidance_scale)
        shapes = [call_shape(kwargs) for kwargs in calls]
        setting = {"evaluator": "generation", "images": sum(s.get("batch", 1) for s in shapes)}
        for key, name in (("num_inference_steps", "steps"), ("guidance_scale", "guidance_scale")):
            if key in shapes[0]:
                setting[name] = shapes[0][key]
        return generation_evaluator(pipe, calls, score), setting
    if not adapter.is_denoiser and images is not None and labels is not None:
        return classifier_evaluator(model, images, labels), {"evaluator": "top1", "images": len(labels)}
    what = "images=..., labels=... (a held-out set)" if not adapter.is_denoiser else "the pipeline, not its denoiser"
    raise ValueError(f"analyze_blocks has no default evaluation for {type(model).__name__}: pass {what}, "
                     "evaluate=() -> {metric: value}, or pool=record_inputs(pipe, calls) for the output-error proxy.")

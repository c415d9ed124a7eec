"""The demo's engine: load a generator once per process, run baseline and accelerated outputs, score them.

Nothing here imports Gradio, so the engine is testable and reusable on its own:

    cache = ModelCache()
    result = compare(CompareRequest(model="digits-dit", recipe="delta-dit:interval=2", steps=6), cache)
    print(result.speedup, result.psnr)

A request parses its recipe with the benchmark's parser (the same ``name:key=value`` + ``a+b`` syntax as
``accel-bench --methods``) and attaches it with the benchmark's ``apply_method``, so calibration steps
(BAC) and baselines behave exactly as in the benchmark. Each cached model carries a lock: two requests
never share a patched model mid-run, and the patch is removed in ``finally`` whatever happens.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import accel
from accel.benchmarks.runner import Applied, apply_method
from accel.benchmarks.spec import NONE, BenchMethod, available_names, parse_item
from accel.benchmarks.workloads import Workload

logger = logging.getLogger(__name__)

#: ``progress(fraction in [0, 1], description)``; the app adapts ``gr.Progress`` to it.
ProgressFn = Callable[[float, str], None]

MAX_STEPS = 200
MAX_SAMPLES = 16
MAX_REPEATS = 10


class DemoError(ValueError):
    """A request the demo cannot run, with a message meant for the person who made it."""


def generator_names() -> list[str]:
    """Embedded models the demo can compare (generators; the classifiers have no denoising loop)."""
    from accel.pipelines import EMBEDDED, default_generation_kwargs

    names = []
    for name in EMBEDDED:
        try:
            default_generation_kwargs(name)
        except ValueError:
            continue
        names.append(name)
    return names


def is_text_model(name: str) -> bool:
    """Whether ``name`` (embedded or a local diffusers folder) takes prompts, read from its
    model_index.json and its pipeline class's call, without loading any weights."""
    import inspect
    import json

    index = _model_folder(name) / "model_index.json"
    if not index.is_file():
        return False
    try:
        import diffusers

        cls = getattr(diffusers, json.loads(index.read_text()).get("_class_name", ""), None)
        return cls is not None and "prompt" in inspect.signature(cls.__call__).parameters
    except (ValueError, TypeError, AttributeError):  # a broken index is reported when the model loads
        return False


def _model_folder(name: str) -> Path:
    """Where an embedded model or a local folder named ``name`` lives (nothing is loaded)."""
    from accel.pipelines import EMBEDDED, WEIGHTS_DIR

    return WEIGHTS_DIR / name if name in EMBEDDED else Path(name or "").expanduser()


def first_prompt(name: str) -> str:
    """The first of an embedded model's or a folder's ``prompts.txt`` prompts (the prompt box's start), or ""."""
    from accel.calls import read_prompts

    prompts = read_prompts(_model_folder(name))
    return prompts[0] if prompts else ""


def method_choices() -> list[str]:
    """Names the method dropdown offers: available accel methods and baselines, then ``none``."""
    names = [name for name, status in available_names().items() if status.startswith("available")]
    return [name for name in names if name != NONE] + [NONE]


def build_recipe(method: str | None, settings: str | None) -> str:
    """Join the dropdown's method and the settings box into one recipe string.

    The box takes either settings for the chosen method (``interval=3`` or ``interval=3, warmup_steps=1``)
    or a whole recipe that replaces the dropdown's choice (``bac``, ``delta-dit:interval=3+bac``): text
    whose first item has no ``=`` and that names a method or has ``:``/``+`` in it is read as a recipe.
    """
    import re

    method = (method or "").strip()
    text = re.sub(r"\s*=\s*", "=", (settings or "").strip())
    first = text.split("+")[0].split(":")[0].strip()
    if text and "=" not in first and (first in available_names() or ":" in text or "+" in text):
        return text
    if not method:
        raise DemoError("Pick a method (or type a whole recipe such as 'delta-dit:interval=3' in the settings box).")
    pairs = [pair for pair in re.split(r"[\s,:;]+", text) if pair]
    if method == NONE and pairs:
        raise DemoError(f"'none' (the unaccelerated baseline) takes no settings, got {text!r}.")
    return ":".join([method, *pairs])


def parse_recipe(recipe: str) -> BenchMethod:
    """The recipe as the benchmark reads it; errors name what was wrong and what is accepted."""
    if not recipe or not recipe.strip():
        raise DemoError("The recipe is empty; pick a method, e.g. 'delta-dit'.")
    return parse_item(recipe)


@dataclass
class CachedModel:
    """A loaded generator, its generation settings and the lock that serializes runs on it."""

    name: str
    pipe: Any
    kind: str  # "image" | "video"
    extra: dict[str, Any]
    text: bool = False  # conditioned on prompts (else on class labels)
    task: str | None = None  # the embedded generators' task metric (accel.pipelines.tasks)
    lock: threading.Lock = field(default_factory=threading.Lock)
    warm: bool = False


class ModelCache:
    """Generators loaded once per process, by embedded name or resolved local path."""

    def __init__(self, loader: Callable[[str], Any] | None = None) -> None:
        self._loader = loader
        self._models: dict[str, CachedModel] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> CachedModel:
        name = (name or "").strip()
        if not name:
            raise DemoError(f"Pick a model: an embedded one ({', '.join(generator_names())}) or a local folder.")
        key = str(Path(name).expanduser().resolve()) if Path(name).expanduser().exists() else name
        with self._lock:  # one load per model even when two requests ask for it at once
            if key not in self._models:
                self._models[key] = self._load(name)
            return self._models[key]

    def _load(self, name: str) -> CachedModel:
        from accel.calls import UnsupportedPipelineError, call_signature
        from accel.pipelines import DigitsVideoPipeline, default_generation_kwargs, load
        from accel.pipelines.tasks import task_kind

        try:
            pipe = (self._loader or load)(name)
        except (OSError, ValueError) as exc:  # missing folder, unknown name, unreachable hub
            raise DemoError(str(exc)) from exc
        try:
            sig = call_signature(pipe)
        except UnsupportedPipelineError as exc:
            raise DemoError(f"{name!r} loads as {type(pipe).__name__}, which the demo cannot drive: "
                            f"{exc}") from None
        extra = default_generation_kwargs("digits-video-dit") if isinstance(pipe, DigitsVideoPipeline) else {}
        for key in ("steps", "guidance_scale"):
            extra.pop(key, None)
        logger.info("accel-demo: loaded %s (%s)", name, type(pipe).__name__)
        return CachedModel(name=name, pipe=pipe, kind="video" if sig.is_video else "image", extra=extra,
                           text=sig.is_text, task=task_kind(pipe))


@dataclass(frozen=True)
class CompareRequest:
    """One comparison: ``samples`` outputs of ``prompt`` (text pipelines) or class ``label`` with seeds
    ``seed, seed + 1, ...``. Sizes and frames of ``None`` (or 0) leave the pipeline's own defaults."""

    model: str = "digits-dit"
    recipe: str = "delta-dit"
    steps: int = 20
    seed: int = 0
    label: int = 3
    samples: int = 4
    guidance_scale: float = 4.0
    repeats: int = 1
    prompt: str = ""
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None

    def sizes(self) -> dict[str, Any]:
        """The call's size settings that were given (the rest stay at the model's defaults)."""
        given = {"height": self.height, "width": self.width, "num_frames": self.num_frames}
        return {key: int(value) for key, value in given.items() if value}

    def check(self) -> None:
        def whole(name: str, value: Any, low: int, high: int) -> None:
            if isinstance(value, bool) or not float(value).is_integer() or not low <= value <= high:
                raise DemoError(f"{name} must be a whole number from {low} to {high}, got {value!r}.")

        whole("Steps", self.steps, 1, MAX_STEPS)
        whole("Label", self.label, 0, 999)
        for name, value in (("Height", self.height), ("Width", self.width), ("Frames", self.num_frames)):
            if value:
                whole(name, value, 1, 4096)
        whole("Samples", self.samples, 1, MAX_SAMPLES)
        whole("Repeats", self.repeats, 1, MAX_REPEATS)
        whole("Seed", self.seed, 0, 2**63 - MAX_SAMPLES)
        if not 0 <= self.guidance_scale <= 30:
            raise DemoError(f"Guidance scale must be from 0 to 30, got {self.guidance_scale!r}.")


@dataclass
class CompareResult:
    """Both outputs (in [0, 1]; images (N, C, H, W) or videos (N, F, C, H, W)) and the numbers."""

    request: CompareRequest
    method: str  # the recipe as parsed, e.g. "delta-dit"
    settings: str
    kind: str
    baseline: torch.Tensor
    accelerated: torch.Tensor
    baseline_latency_s: float
    accelerated_latency_s: float
    psnr: float
    ssim: float
    judge_baseline: float | None
    judge_accelerated: float | None
    report: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.baseline_latency_s / max(self.accelerated_latency_s, 1e-9)

    def record(self) -> dict[str, Any]:
        """A JSON-safe row for the history table and the API (PSNR of identical outputs is ``None``)."""
        r = self.request
        return {
            "model": r.model, "recipe": r.recipe, "method": self.method, "settings": self.settings,
            "steps": r.steps, "seed": r.seed, "label": r.prompt or r.label, "samples": r.samples,
            "repeats": r.repeats, **r.sizes(),
            "baseline_s": round(self.baseline_latency_s, 4), "accelerated_s": round(self.accelerated_latency_s, 4),
            "speedup": round(self.speedup, 3),
            "psnr_db": None if math.isinf(self.psnr) else round(self.psnr, 2),
            "ssim": round(self.ssim, 4),
            "judge_baseline": self.judge_baseline, "judge_accelerated": self.judge_accelerated,
            "compute_fraction": self.report.get("compute_fraction"), "notes": list(self.notes),
        }


class _StepBar:
    """Stands in for a pipeline's tqdm bar in both uses diffusers makes of it: ``for t in bar(timesteps)``
    and ``with bar(total=n) as bar: ... bar.update()``."""

    def __init__(self, on_step: Callable[[int, int], None], iterable: Any = None,
                 total: int | None = None) -> None:
        self.items = list(iterable) if iterable is not None else None
        self.total = len(self.items) if self.items is not None else int(total or 0)
        self.on_step, self.done = on_step, 0

    def __iter__(self) -> Iterator[Any]:
        for index, item in enumerate(self.items if self.items is not None else range(self.total)):
            self.on_step(index, self.total)
            yield item
        self.on_step(self.total, self.total)

    def __enter__(self) -> _StepBar:
        self.on_step(0, self.total)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.on_step(self.total, self.total)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done < self.total:
            self.on_step(self.done, self.total)


@contextmanager
def _step_progress(pipe: Any, on_step: Callable[[int, int], None]) -> Iterator[None]:
    """Report denoising steps through the pipeline's own ``progress_bar`` hook (removed afterwards)."""

    def progress_bar(iterable: Any = None, total: int | None = None) -> _StepBar:
        return _StepBar(on_step, iterable, total)

    pipe.progress_bar = progress_bar  # an instance attribute shadows the class method while we run
    try:
        yield
    finally:
        pipe.__dict__.pop("progress_bar", None)


class _CallProgress:
    """Turns per-step callbacks of successive pipeline calls into one fraction for the whole request."""

    def __init__(self, report: ProgressFn, expected_calls: int) -> None:
        self.report = report
        self.expected = max(expected_calls, 1)
        self.done = 0
        self.desc = ""

    def on_step(self, step: int, total: int) -> None:
        if step >= total:  # the pipeline finished this call
            self.done += 1
            return
        fraction = min((self.done + step / max(total, 1)) / self.expected, 1.0)
        self.report(0.95 * fraction, f"{self.desc}: step {step + 1}/{total}")


def _timed_calls(workload: Workload, applied: Applied, repeats: int) -> tuple[torch.Tensor, float]:
    """The output of the first call and the median latency of ``repeats`` calls (the first included)."""
    output, times = None, []
    for _ in range(repeats):
        start = time.perf_counter()  # per-call hooks count, as in accel-bench's timing
        applied.before_call()
        try:
            result = workload.run_batch(workload.samples)
        finally:
            applied.after_call()
        times.append(time.perf_counter() - start)
        output = result if output is None else output
    return output, statistics.median(times)


def _judge(outputs: torch.Tensor, task: str | None, conditions: list[Any], notes: list[str]) -> float | None:
    """Judge accuracy (embedded digit models only: ``task`` is ``None`` otherwise), or ``None`` with a
    note when the judge model is not available."""
    from accel.pipelines.tasks import task_scores

    if task is None:
        return None
    try:
        value = task_scores(task, outputs, conditions).get("judge_acc")
        return None if value is None else round(float(value), 4)
    except (OSError, ValueError) as exc:
        note = f"judge accuracy unavailable: {exc}"
        if note not in notes:
            notes.append(note)
        return None


def compare(request: CompareRequest, cache: ModelCache, progress: ProgressFn | None = None) -> CompareResult:
    """Run the baseline and the accelerated recipe on the same seeds; time and score both.

    Raises:
        DemoError, ValueError, TypeError: a request that cannot run (messages are for people).
    """
    from accel import metrics

    report_progress = progress or (lambda fraction, desc: None)
    request.check()
    method = parse_recipe(request.recipe)  # fail fast, before loading anything
    report_progress(0.0, f"Loading {request.model}")
    model = cache.get(request.model)
    if not model.text:
        from accel.calls import class_count

        classes = class_count(model.pipe) or 1000
        if request.label >= classes:
            raise DemoError(f"Label must be a whole number from 0 to {classes - 1}, got {request.label}.")
    if model.text and not request.prompt.strip():
        raise DemoError(f"{request.model} is a text-to-{model.kind} pipeline: type a prompt.")
    condition: Any = request.prompt.strip() if model.text else int(request.label)
    samples = [(condition, int(request.seed) + i) for i in range(int(request.samples))]
    extra = {**model.extra, **request.sizes()}
    if model.text and request.negative_prompt.strip():
        extra["negative_prompt"] = request.negative_prompt.strip()
    workload = Workload(model.name, model.pipe, model.kind, int(request.steps), samples, len(samples),
                        float(request.guidance_scale), extra=extra or None, task=model.task)
    tracker = _CallProgress(report_progress, 2 * request.repeats + (0 if model.warm else 1))
    none = Applied(remove=lambda: None, report=dict)

    with model.lock, _step_progress(model.pipe, tracker.on_step):
        stale = accel.active_patch(model.pipe)
        if stale is not None:  # never expected: every run removes its patch in ``finally``
            logger.warning("accel-demo: removing a patch left on %s: %r", model.name, stale)
            stale.remove()
        if not model.warm:  # first-call overheads (allocations, lazy init) stay out of the timing
            tracker.desc = "Warming up"
            _timed_calls(workload, none, 1)
            model.warm = True
        tracker.desc = "Baseline"
        baseline, base_s = _timed_calls(workload, none, request.repeats)
        tracker.desc = "Calibrating"  # only methods with an offline step (BAC) call the pipeline here
        report_progress(0.95 * tracker.done / tracker.expected, f"Applying {request.recipe}")
        applied = apply_method(method, workload, None)
        try:
            patch = accel.active_patch(model.pipe)
            if patch is not None:  # BAC calibrates for new call settings here, not inside the timed call
                patch.prepare(**workload.call_kwargs(workload.samples))
            tracker.desc = "Accelerated"
            fast, fast_s = _timed_calls(workload, applied, request.repeats)
            report = applied.report()
        finally:
            applied.remove()
    report_progress(0.97, "Scoring")
    notes: list[str] = []
    conditions = [condition for condition, _ in samples]
    return CompareResult(
        request=request, method=method.family, settings=method.settings_text(), kind=model.kind,
        baseline=baseline, accelerated=fast, baseline_latency_s=base_s, accelerated_latency_s=fast_s,
        psnr=float(metrics.psnr(baseline, fast)), ssim=float(metrics.ssim(baseline, fast)),
        judge_baseline=_judge(baseline, model.task, conditions, notes),
        judge_accelerated=_judge(fast, model.task, conditions, notes),
        report=report, notes=notes,
    )

"""Measure one (model, method) pair: quality against the baseline, then timed repeats.

Speed is a ratio to ``none`` measured in the same run (the machine is noisy); quality is PSNR/SSIM
against the baseline output of the same seeds plus the task metric. Timed calls come after warm-up and
alternate with unaccelerated calls of the same batch (A B A B ...): the speedup is the median of the
per-pair ratios, so a neighbour's load that comes and goes hits both sides of a pair alike.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accel.benchmarks.spec import DEFAULT, BenchMethod
from accel.benchmarks.workloads import Workload
from accel.extras import require

import accel

RECORD_FIELDS = (
    "model", "method", "settings", "steps", "batch", "latency_s", "latency_spread_s", "speedup", "speedup_spread",
    "psnr", "ssim",
    "judge_acc", "attr_acc", "fid_digits", "top1", "compute_fraction", "peak_mem_mb", "params_bytes",
)


@dataclass
class Record:
    """One measured (model, method, settings) point. ``selected`` marks a sweep's reported point."""

    model: str
    method: str
    settings: str
    steps: int
    batch: int
    latency_s: float | None = None
    latency_spread_s: float | None = None
    speedup: float | None = None
    speedup_spread: float | None = None  # max - min of the per-pair ratios
    psnr: float | None = None
    ssim: float | None = None
    lpips: float | None = None
    clip_score: float | None = None
    judge_acc: float | None = None
    attr_acc: float | None = None  # digits-pixart: mean accuracy of the attributes its prompts state
    fid_digits: float | None = None  # digits-pixart: FID on the canvas judge's features vs real digits
    top1: float | None = None
    compute_fraction: float | None = None
    peak_mem_mb: float | None = None
    params_bytes: int | None = None
    repeats: int = 0
    baseline_latency_s: float | None = None  # median of the ``none`` calls paired with this method's
    pairs: list[tuple[float, float]] = field(default_factory=list)  # (none s, method s) per timed pair
    label: str = ""
    selected: bool = True
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Applied:
    """An attached method with the hooks the runner calls around each pipeline call."""

    remove: Callable[[], None]
    report: Callable[[], dict[str, Any]]
    before_call: Callable[[], None] = lambda: None
    after_call: Callable[[], None] = lambda: None
    #: Attaches the same method again without repeating its offline steps (calibration, quantization),
    #: so timed calls can alternate with unaccelerated ones; None when that is not cheap (recompiling).
    reattach: Callable[[], Applied] | None = None
    #: The methods and settings that ran, where the entry did not name them (``default``).
    recipe: Callable[[], str] | None = None


def apply_method(method: BenchMethod, workload: Workload, calibration: Callable[[Any], None] | None) -> Applied:
    """Attach ``method`` to the workload's target (nothing for ``none``)."""
    if method.kind == "none":
        return Applied(remove=lambda: None, report=dict)
    if method.kind == "baseline":
        from accel.benchmarks.baselines import BASELINES

        baseline = BASELINES[method.baseline]

        def attach_baseline() -> Applied:
            handle = baseline.apply(workload.target, dict(method.settings), workload.steps)
            return Applied(handle.remove, handle.report, handle.before_call, handle.after_call,
                           attach_baseline if baseline.cheap_to_reattach else None)

        return attach_baseline()
    configs = [prepare_config(config, workload) for config in method.configs]

    def attach() -> Applied:
        patch = accel.patch(workload.target, *configs)  # no configs (``default``): the model's recipe
        recipe = (lambda: recipe_text(patch)) if method.kind == DEFAULT else None
        return Applied(patch.remove, lambda: _compute_fraction(patch), reattach=attach, recipe=recipe)

    return attach()


def recipe_text(patch: accel.Patch) -> str:
    """A patch's methods and their non-default settings, written as ``--methods`` takes them."""
    parts = []
    for name, facts in patch.report().methods.items():
        settings = facts.get("settings") or {}
        parts.append(":".join([name, *(f"{k}={v}" for k, v in settings.items())]))
    return "+".join(parts)


_SENSITIVITY: dict[tuple[int, Any], dict[int, list[float]]] = {}
#: Offline preparation at least this long is noted in the record.
PREPARATION_NOTE_S = 5.0


def prepare_config(config: Any, workload: Workload) -> Any:
    """Offline steps a method needs before timing, done on seeds the evaluation does not use."""
    from accel.methods.bac_schedule import STRATEGIES

    online_bac = isinstance(config, accel.BACConfig) and STRATEGIES[config.weighting].online
    if online_bac and config.calibrate_online and workload.kind != "shape":
        # What a user gets: BAC calibrates itself before the first call with the evaluation's settings
        # (an untimed call after each re-attach), on its own conditions and seeds.
        return config
    if isinstance(config, accel.BACConfig) and config.schedule is None and workload.is_denoiser:
        import tempfile

        from accel.methods.bac import calibrate

        # The evaluation's batch (labels and size) on other seeds: a video call costs as much as the run.
        calls = workload.calibration_calls()
        path = tempfile.NamedTemporaryFile(suffix=".bac.json", delete=False).name
        # Probed sensitivities do not depend on the update budget: one probe pass serves a whole sweep.
        known = _SENSITIVITY.setdefault((id(workload.target), config.granularity), {})
        schedule = calibrate(workload.target, num_inference_steps=workload.steps, config=config, calls=calls,
                             save_to=path, sensitivity=known)
        known.update(schedule.sensitivity)
        return config.replace(schedule=path, calibrate_online=False)
    prune_default = isinstance(config, accel.HierarchicalPruneConfig) and config.artifact is None
    if prune_default and workload.kind != "shape":
        shipped = _shipped_prune(config, workload.name)
        if shipped is not None:  # what a user of the embedded model would load: its distilled blocks
            return config.replace(artifact=str(shipped))
    quest_to_calibrate = isinstance(config, accel.QuESTConfig) and config.artifact is None
    if quest_to_calibrate and config.needs_calibration and workload.is_denoiser:
        import tempfile

        from accel.methods.quest import quantize

        # Calibrated on the evaluation's kind of call (its conditions, size, steps) on other seeds.
        calls = workload.calibration_calls(config.calib_seeds)
        folder = tempfile.mkdtemp(suffix=".quest")
        quantize(workload.target, config, calls=calls, progress=False).save(folder)
        return config.replace(artifact=folder)
    return config


def _shipped_prune(config: Any, model_name: str) -> Any:
    """The prune artifact shipped with an embedded model, when ``config`` asks for what it holds (its
    ratio, or no ratio or latency budget: the defaults)."""
    from accel.pipelines.loading import shipped_artifact
    from accel.prune.artifact import PruneArtifact

    folder = shipped_artifact(model_name, "hierarchical-prune")
    if folder is None or config.latency_budget is not None:
        return None
    shipped = type(config).from_dict(PruneArtifact.load(folder, weights=False).settings)
    return folder if config.ratio is None or config.ratio == shipped.ratio else None


def _compute_fraction(patch: accel.Patch) -> dict[str, Any]:
    """The patch's compute fraction, the pipeline calls its methods ran to calibrate themselves and the
    artifacts they loaded."""
    methods = patch.report().methods.values()
    fractions = [facts["compute_fraction"] for facts in methods if "compute_fraction" in facts]
    calibration = sum(facts.get("calibration_generations", 0) for facts in methods)
    artifacts = [str(facts["chosen_by"])[len("artifact "):] for facts in methods
                 if str(facts.get("chosen_by", "")).startswith("artifact ")]
    return {**({"compute_fraction": min(fractions)} if fractions else {}),
            **({"calibration_generations": calibration} if calibration else {}),
            **({"artifacts": artifacts} if artifacts else {})}


def workload_device(workload: Workload) -> torch.device:
    """Where the workload's model runs (its first parameter's device; CPU for parameterless models)."""
    model = getattr(workload, "model", None)
    param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    return param.device if param is not None else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers the kernels it launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def peak_memory_mb(device: torch.device) -> Iterator[list[float]]:
    """Peak memory while the block runs, in MiB: the CUDA allocator's peak on a GPU (what the model's
    tensors took), else the process's resident memory sampled every 10 ms. Yields a one-item list."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        peak = [0.0]
        try:
            yield peak
        finally:
            peak[0] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    psutil = require("psutil", "bench", "accel-bench's CPU peak memory")
    process = psutil.Process()
    peak = [process.memory_info().rss / 2**20]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], process.memory_info().rss / 2**20)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


def params_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers as stored (packed low-bit weights count at their real size)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _call(workload: Workload, applied: Applied, batch: list[tuple[Any, int]]) -> torch.Tensor:
    applied.before_call()
    try:
        return workload.run_batch(batch)
    finally:
        applied.after_call()


def _timed_call(workload: Workload, applied: Applied, batch: list[tuple[Any, int]]) -> float:
    device = workload_device(workload)
    synchronize(device)
    start = time.perf_counter()
    _call(workload, applied, batch)
    synchronize(device)
    return time.perf_counter() - start


_NONE = Applied(remove=lambda: None, report=dict)


def timed_pairs(workload: Workload, applied: Applied, batch: list[tuple[Any, int]], repeats: int
                ) -> tuple[Applied, list[tuple[float, float]]]:
    """``repeats`` pairs (unaccelerated s, accelerated s) of calls of ``batch`` made back to back: the
    method is removed for the first call of each pair and attached again for the second. After each
    re-attach one untimed call runs, so methods that learn online (BAC's own calibration call, MagCache's
    warm-up) are timed as a user meets them from the second call on. Returns the attached method (a new
    handle) and the pairs. Methods that cannot re-attach cheaply get their unaccelerated calls after all of
    theirs."""
    pairs: list[tuple[float, float]] = []
    if applied.reattach is None:
        times = [_timed_call(workload, applied, batch) for _ in range(repeats)]
        facts = applied.report()
        applied.remove()
        bases = [_timed_call(workload, _NONE, batch) for _ in range(repeats)]
        return Applied(remove=lambda: None, report=lambda: facts), list(zip(bases, times))
    for _ in range(repeats):
        applied.remove()
        base = _timed_call(workload, _NONE, batch)
        applied = applied.reattach()
        _call(workload, applied, batch)
        pairs.append((base, _timed_call(workload, applied, batch)))
    return applied, pairs


def pair_speedup(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """Median and spread (max - min) of the per-pair ratios unaccelerated / accelerated."""
    ratios = [base / max(t, 1e-12) for base, t in pairs]
    return statistics.median(ratios), max(ratios) - min(ratios)


def measure(
    workload: Workload,
    method: BenchMethod,
    warmup: int,
    repeats: int,
    shard: Callable[[list[Any]], list[Any]] = lambda items: items,
) -> tuple[Record, list[torch.Tensor] | None]:
    """Outputs for this process's share of the samples, then ``repeats`` timed calls of one batch.

    Quality is scored afterwards by :func:`score`, once every process's outputs are gathered.
    """
    record = Record(model=workload.name, method=method.family, settings=method.settings_text(),
                    steps=workload.steps, batch=workload.batch, label=method.label)
    started = time.perf_counter()
    try:
        applied = apply_method(method, workload, None)
    except Exception as exc:  # a method that cannot apply is a finding for the table, not a crash
        record.error = f"{type(exc).__name__}: {exc}"
        return record, None
    prepared_s = time.perf_counter() - started
    if applied.recipe is not None:
        record.settings = applied.recipe()
    if prepared_s >= PREPARATION_NOTE_S:  # offline steps (calibration, finetuning) a user waits for once
        record.notes.append(f"prepared offline in {prepared_s:.0f} s before timing (untimed)")
    try:
        batches = workload.batches()
        first = batches[0]
        for _ in range(warmup):
            _call(workload, applied, first)
        outputs = [_call(workload, applied, batch) for batch in shard(batches)]
        record.params_bytes = params_bytes(workload.model)
        with peak_memory_mb(workload_device(workload)) as peak:
            if method.kind == "none":
                times = [_timed_call(workload, applied, first) for _ in range(repeats)]
                record.pairs = [(t, t) for t in times]
            else:
                if applied.reattach is None:
                    record.notes.append("not re-attached between timed calls (re-attaching recompiles): "
                                        "the unaccelerated calls ran after the accelerated ones")
                applied, record.pairs = timed_pairs(workload, applied, first, repeats)
        times = [t for _, t in record.pairs]
        record.latency_s = statistics.median(times)
        record.latency_spread_s = max(times) - min(times)
        record.baseline_latency_s = statistics.median(b for b, _ in record.pairs)
        record.speedup, record.speedup_spread = pair_speedup(record.pairs)
        record.repeats = repeats
        record.peak_mem_mb = round(peak[0], 1)
        facts = applied.report()
        record.compute_fraction = facts.get("compute_fraction")
        if facts.get("calibration_generations"):
            calls = facts["calibration_generations"]
            record.notes.append(f"calibrated itself with {calls} call(s) of its own before the first call "
                                "(untimed)")
        for folder in facts.get("artifacts", []):
            record.notes.append(f"blocks and distilled weights from the artifact {Path(folder).name}")
    except Exception as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        return record, None
    finally:
        applied.remove()
    return record, outputs


def score(record: Record, workload: Workload, outputs: torch.Tensor | None,
          reference: torch.Tensor | None) -> list[str]:
    """Fill the quality fields from all outputs (gathered from every process) against the baseline's.

    The baseline itself is scored against its own outputs (PSNR infinite, stored as null in JSON).
    Returns the metrics that were skipped, each with why (missing weights).
    """
    skipped: list[str] = []
    if outputs is None:
        return skipped
    for key, value in workload.quality(outputs, reference if reference is not None else outputs).items():
        if isinstance(value, str):
            skipped.append(value)
            continue
        if hasattr(record, key):
            setattr(record, key, None if isinstance(value, float) and value == float("inf") else value)
    return skipped


def select_fastest(records: list[Record], min_psnr: float | None) -> list[Record]:
    """Per method family, mark the fastest record meeting the quality floor as ``selected``: the highest
    paired speedup (each point's ratio to its own interleaved baseline calls; absolute latencies drift with
    the host over a long sweep), by latency where no speedup was measured.

    A family with no point over the floor keeps its most accurate point, with a note saying so.
    """
    families: dict[str, list[Record]] = {}
    for record in records:
        families.setdefault(record.method, []).append(record)
    for family, group in families.items():
        valid = [r for r in group if r.error is None and r.latency_s is not None]
        for r in group:
            r.selected = False
        if not valid:
            continue
        meets = [r for r in valid if min_psnr is None or r.psnr is None or r.psnr >= min_psnr]
        if meets:
            best = max(meets, key=lambda r: (r.speedup if r.speedup is not None else 0.0, -r.latency_s))
        else:
            best = max(valid, key=lambda r: r.psnr if r.psnr is not None else float("-inf"))
            best.notes.append(f"no setting reached PSNR >= {min_psnr}; the most accurate is shown")
        best.selected = True
    return records

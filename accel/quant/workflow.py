"""QuEST's offline steps: timestep-aware calibration, then quantize + select + distill + freeze.

Used through ``accel.methods.quest`` (``calibrate``, ``finetune``, ``quantize``, ``load``); the method's
apply function calls :func:`quantize` when ``accel.patch`` gets no artifact.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from accel.artifacts import model_fingerprint
from accel.errors import UnsupportedModelError
from accel.modules import resolve_target
from accel.quant import kernels as qkernels
from accel.quant.artifact import QuantizedModel
from accel.quant.calibration import Calibration, collect
from accel.quant.config import QuESTConfig
from accel.quant.finetune import (
    distill,
    evaluate,
    pick_sensitive,
    sensitivity,
    swapped,
    teacher_outputs,
    temporal_layers,
)
from accel.quant.options import ActGranularity, Kernel, WeightGranularity
from accel.quant.qlinear import LayerSpec, LSQLinear, QuantLinear
from accel.quant.quantizers import act_qparams, weight_qparams
from accel.registry import find_adapter
from accel.timing import median_time

logger = logging.getLogger(__name__)


def _default_config() -> QuESTConfig:
    return QuESTConfig()


def default_calls(pipe: Any, seeds: int, steps: int | None) -> list[dict[str, Any]]:
    """Calibration calls when none are given: ``seeds`` calls over the built-in prompts (text pipelines)
    or up to ten class labels spread over the classes, on other seeds than a benchmark's."""
    from accel.calls import UnsupportedPipelineError
    from accel.calls import default_calls as calls_for

    try:
        return calls_for(pipe, [1 + s for s in range(seeds)], steps)
    except UnsupportedPipelineError as exc:
        raise UnsupportedModelError(
            f"QuEST cannot build calibration inputs for {type(pipe).__name__} ({exc}) Pass "
            "calls=[{...}, ...] to accel.methods.quest.calibrate(pipe, config, calls=...)."
        ) from None


def calibrate(
    target: Any,
    config: QuESTConfig | None = None,
    *,
    calls: Sequence[dict[str, Any]] | None = None,
    images: torch.Tensor | None = None,
    inputs: Sequence[tuple[tuple, dict]] | None = None,
    steps: Sequence[int] | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> Calibration:
    """Record every linear layer's input range over whole denoising runs (or image batches).

    Data, first that applies: ``calls`` (keyword arguments of pipeline calls), ``images`` (N, C, H, W)
    for classifiers (run in batches of ``batch_size``), ``inputs`` (``(args, kwargs)`` model calls), or,
    for a class-conditional pipeline, every label over ``config.calib_seeds`` seeds.
    ``steps``: record only these step indices (``[0]``: the one-step calibration that fails).
    """
    config = config or _default_config()
    pipeline, model = resolve_target(target)
    adapter = find_adapter(model)
    if images is not None:
        runs = [lambda b=b: model(b) for b in images.split(batch_size)]
    elif inputs is not None:
        runs = [lambda a=a, k=k: model(*a, **k) for a, k in inputs]
    elif pipeline is not None:
        calls = (
            list(calls)
            if calls is not None
            else default_calls(pipeline, config.calib_seeds, config.calib_steps)
        )
        runs = [lambda kw=kw: pipeline(**kw) for kw in calls]
    else:
        raise UnsupportedModelError(
            f"QuEST calibration of a bare {type(model).__name__} needs data: pass images=(N, C, H, W) for a "
            "classifier, inputs=[(args, kwargs), ...] for a denoiser, or calibrate the pipeline instead."
        )
    was_training = model.training
    model.eval()
    try:
        calib = collect(model, adapter, runs, steps=steps, max_inputs=config.max_inputs, progress=progress)
    finally:
        model.train(was_training)
    if images is None and inputs is None and calls:
        from accel.calls import call_shape

        calib.call = call_shape(calls[0])
    return calib


def _specs(
    config: QuESTConfig, linears: dict[str, torch.nn.Linear], order: Sequence[str]
) -> dict[str, LayerSpec]:
    edge = {order[0], order[-1]} if (config.first_last_8bit and order) else set()
    dynamic = config.act_granularity is ActGranularity.PER_TOKEN
    return {
        name: LayerSpec(
            layer.in_features,
            layer.out_features,
            config.bits.weight,
            8 if name in edge and not config.bits.weight_only else config.bits.act,
            config.weight_symmetric,
            config.act_symmetric,
            dynamic,
            layer.bias is not None,
        )
        for name, layer in linears.items()
    }


def lsq_layers(
    model: torch.nn.Module, config: QuESTConfig, calib: Calibration | None, names: Sequence[str]
) -> dict[str, LSQLinear]:
    linears = {name: model.get_submodule(name) for name in names}
    specs = _specs(config, linears, calib.order if calib is not None else list(names))
    result = {}
    for name, linear in linears.items():
        spec = specs[name]
        w = linear.weight.detach().float()
        if config.weight_granularity is WeightGranularity.PER_TENSOR:
            scale, zero = weight_qparams(w.reshape(1, -1), spec.w_bits, spec.w_symmetric)
            scale, zero = scale.expand(w.shape[0]), zero.expand(w.shape[0])
        else:
            scale, zero = weight_qparams(w, spec.w_bits, spec.w_symmetric)
        a_scale = a_zero = None
        if spec.static_acts:
            obs = calib.observers[name]
            a_scale, a_zero = act_qparams(
                obs.lo,
                obs.hi,
                obs.samples,
                spec.a_bits,
                spec.a_symmetric,
                config.act_range.value,
                config.percentile,
            )
        result[name] = LSQLinear(linear, spec, scale, zero, a_scale, a_zero)
    return result


def choose_kernels(
    layers: dict[str, QuantLinear],
    rows: dict[str, int],
    kernel: Kernel,
    dtypes: dict[str, torch.dtype] | None = None,
) -> dict[str, Any]:
    """Set each layer's kernel: the one asked for, or (``auto``) the fastest correct one measured at the
    layer's own shape from activations in its model's dtype (``dtypes``, by layer name; fp32 when absent).
    Layers of one shape share one measurement. Returns the measurements, keyed by :func:`timing_label`."""
    measured: dict[tuple, dict[str, Any]] = {}
    for name, layer in layers.items():
        if kernel is not Kernel.AUTO:
            fits = qkernels.unavailable(kernel.value, layer.spec, layer.qweight.device) is None
            layer.set_kernel(kernel.value if fits else "fake")  # a wrong kernel falls back, warned once
            continue
        dtype = (dtypes or {}).get(name, torch.float32)
        key = (layer.spec, rows.get(name, qkernels.DEFAULT_ROWS), dtype)
        if key not in measured:
            measured[key] = qkernels.measure(layer, key[1], dtype=dtype)
        layer.set_kernel(qkernels.fastest(measured[key]))
    return {qkernels.timing_label(s, r, d): t for (s, r, d), t in measured.items()}


# The quantized model must run at least this much faster than the float model on a recorded call to keep
# its integer layers: per-layer timings can promise gains the whole model does not show (bf16 at width 128).
WHOLE_MODEL_GAIN = 1.03


def kept_in_float(
    layers: dict[str, QuantLinear], meta: dict[str, Any], config: QuESTConfig, dtypes: dict[str, torch.dtype]
) -> set[str]:
    """Layers the auto choice leaves unquantized: no integer kernel is correct here, or none beat the float
    layer in the model's own dtype at the layer's shape, so quantizing would only slow them; and all of them
    when the whole model with its integer layers was not faster than the float model
    (``meta["whole_model"]``, measured by :func:`finetune`). Weight-only layers (``w4a16``) are asked for
    their memory and stay quantized on the fused kernel even at equal speed."""
    if config.kernel is not Kernel.AUTO or not config.keep_float_when_faster:
        return set()
    timings = meta.get("kernel_timings", {})
    rows = meta.get("rows", {})
    whole = meta.get("whole_model") or {}
    no_gain = whole.get("speedup", WHOLE_MODEL_GAIN) < WHOLE_MODEL_GAIN
    kept = set()
    for name, layer in layers.items():
        if layer.spec.weight_only and layer.kernel != "fake":
            continue  # weight-only layers are there for memory: quantized wherever an integer path runs
        label = qkernels.timing_label(layer.spec, rows.get(name, qkernels.DEFAULT_ROWS), dtypes[name])
        slower = layer.kernel == "fake" or qkernels.float_is_faster(timings.get(label, {}), layer.kernel)
        if no_gain or slower:
            kept.add(name)
    return kept


@torch.no_grad()
def whole_model_speed(
    model: torch.nn.Module, layers: dict[str, QuantLinear], call: tuple[tuple, dict], repeats: int = 3
) -> dict[str, float]:
    """Median forward time of ``model`` on one recorded ``call`` as it is and with ``layers`` in place of its
    linear layers, interleaved; ``speedup`` = float time / quantized time."""
    args, kwargs = call

    def run() -> None:
        model(*args, **kwargs)

    times: dict[str, list[float]] = {"float_s": [], "quantized_s": []}
    run()
    with swapped(model, layers):
        run()  # warm-up of both
    for _ in range(repeats):  # one timed call each way per round: drift on a shared host hits both alike
        times["float_s"] += median_time(run, 1, warmup=0)[2]
        with swapped(model, layers):
            times["quantized_s"] += median_time(run, 1, warmup=0)[2]
    result = {key: statistics.median(values) for key, values in times.items()}
    result["speedup"] = result["float_s"] / max(result["quantized_s"], 1e-12)
    return {key: round(value, 6) for key, value in result.items()}


def linear_dtypes(model: torch.nn.Module, names: Any) -> dict[str, torch.dtype]:
    """The weight dtype of each named linear layer (what its activations arrive in)."""
    return {name: model.get_submodule(name).weight.dtype for name in names}


def finetune(
    target: Any,
    calibration: Calibration | None,
    config: QuESTConfig | None = None,
    *,
    iters: int | None = None,
    progress: bool = True,
) -> QuantizedModel:
    """Quantize every calibrated linear layer, select temporal + activation-sensitive layers, distill
    them (and all step sizes) into the full-precision model over the kept timesteps, and freeze.

    ``iters=0`` (or ``config.finetune_iters=0``) gives naive PTQ with the same quantizers. The model
    itself is not changed; apply the result with ``accel.patch`` (``QuESTConfig(artifact=...)``).
    """
    config = config or _default_config()
    iters = config.finetune_iters if iters is None else iters
    _, model = resolve_target(target)
    adapter = find_adapter(model)
    if calibration is None:
        if iters > 0 or config.needs_calibration:
            raise ValueError(
                "QuEST needs a calibration here (static activation ranges or finetuning): "
                "calib = accel.methods.quest.calibrate(pipe_or_model, config, ...)."
            )
        names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    else:
        names = [n for n in calibration.observers if type(model.get_submodule(n)) is torch.nn.Linear]
    fingerprint = model_fingerprint(model)
    lsq = lsq_layers(model, config, calibration, names)
    temporal = temporal_layers(
        {n: calibration.observers[n].token_input for n in names} if calibration else {}, adapter.is_denoiser
    )
    meta: dict[str, Any] = {
        "temporal": temporal,
        "sensitive": [],
        "finetuned": [],
        "sensitivity": {},
        "calibration": calibration.summary() if calibration else None,
        "calib_timesteps": calibration.timesteps if calibration else [],
    }
    if iters > 0 and calibration is not None and calibration.inputs:
        was_training = model.training
        model.eval()
        try:
            targets = teacher_outputs(model, calibration.inputs)
            # A few kept calls spread over the trajectory (early, middle and late steps).
            by_step = sorted(range(len(targets)), key=lambda i: calibration.recorded_steps[i])
            probe = (
                [by_step[round(j * (len(by_step) - 1) / 3)] for j in range(4)]
                if len(by_step) > 4
                else by_step
            )
            inputs = [calibration.inputs[i] for i in probe]
            scores = sensitivity(model, lsq, inputs, [targets[i] for i in probe], progress)
            sensitive = pick_sensitive(scores, config.sensitive_layers, exclude=temporal)
            trainable = temporal + sensitive
            meta.update(
                sensitive=sensitive,
                finetuned=trainable,
                sensitivity={n: round(v, 6) for n, v in scores.items()},
            )
            # Hold out every 4th kept call (spread over steps) to check that finetuning helped.
            held = set(by_step[3::4]) if len(by_step) >= 8 else set()
            train = [i for i in range(len(targets)) if i not in held]
            val_inputs = [calibration.inputs[i] for i in sorted(held)]
            val_targets = [targets[i] for i in sorted(held)]
            before = evaluate(model, lsq, val_inputs, val_targets) if held else None
            snapshot = {
                name: {k: v.clone() for k, v in layer.state_dict().items()} for name, layer in lsq.items()
            }
            facts = distill(
                model,
                lsq,
                trainable,
                [calibration.inputs[i] for i in train],
                [targets[i] for i in train],
                iters=iters,
                lr=config.lr,
                step_lr=config.step_lr,
                progress=progress,
            )
            if held:
                after = evaluate(model, lsq, val_inputs, val_targets)
                facts.update(val_before=before, val_after=after, reverted=after > before)
                if after > before:  # never return a model worse than its PTQ starting point
                    logger.warning(
                        "QuEST finetuning raised the held-out error (%.4g -> %.4g); keeping the PTQ scales.",
                        before,
                        after,
                    )
                    for name, layer in lsq.items():
                        layer.load_state_dict(snapshot[name])
            meta["finetune"] = facts
        finally:
            model.train(was_training)
    layers = {name: layer.freeze() for name, layer in lsq.items()}
    rows = {n: calibration.observers[n].rows for n in names} if calibration else {}
    meta["rows"] = rows
    dtypes = linear_dtypes(model, layers)
    meta["kernel_timings"] = choose_kernels(layers, rows, config.kernel, dtypes)
    kept = kept_in_float(layers, meta, config, dtypes)
    candidates = {n: layer for n, layer in layers.items() if n not in kept}
    checked = config.kernel is Kernel.AUTO and config.keep_float_when_faster
    if candidates and checked and calibration is not None and calibration.inputs:
        was_training = model.training
        model.eval()
        try:
            for name, layer in candidates.items():
                layer.take_place_of(model.get_submodule(name))  # device and reported dtype, as when patched
            call = calibration.inputs[len(calibration.inputs) // 2]  # a mid-trajectory call
            meta["whole_model"] = whole_model_speed(model, candidates, call)
        finally:
            model.train(was_training)
    return QuantizedModel(fingerprint, config.replace(artifact=None).to_dict(), layers, meta)


def quantize(
    target: Any, config: QuESTConfig | None = None, *, progress: bool = True, **calibrate_kwargs: Any
) -> QuantizedModel:
    """``calibrate`` then ``finetune`` in one call (what ``accel.patch`` does without an artifact)."""
    config = config or _default_config()
    calib = (
        calibrate(target, config, progress=progress, **calibrate_kwargs) if config.needs_calibration else None
    )
    return finetune(target, calib, config, progress=progress)


def load(path: str) -> QuantizedModel:
    """Read a saved quantized model (``QuantizedModel.save``)."""
    return QuantizedModel.load(path)

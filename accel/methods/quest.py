"""QuEST (diffusion): low-bit quantization of DiTs and ViTs with timestep-aware calibration and
selective finetuning, running W8A8 / W4A8 / W4A4 linear layers on integer kernels where one exists.

Paper: Wang et al., "QuEST: Low-bit Diffusion Model Quantization via Efficient Selective Finetuning"
(not the LLM quantized-training method of the same name). Official code (hatchetProject/QuEST) only
simulates quantization; here every quantized ``nn.Linear`` becomes a ``QuantLinear`` with integer
weights (4-bit ones packed two per byte) run on ``torch._int_mm`` or oneDNN, chosen by measurement.

Example::

    calib = accel.methods.quest.calibrate(pipe, accel.QuESTConfig(bits="w4a8"))    # all timesteps
    qm = accel.methods.quest.finetune(pipe, calib, accel.QuESTConfig(bits="w4a8"))  # ~1 min on CPU
    qm.save("dit-w4a8")
    patch = accel.patch(pipe, accel.QuESTConfig(bits="w4a8", artifact="dit-w4a8"))
    print(patch.report()); patch.remove()                                           # fp32 again
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from accel.contract import PatchContext
from accel.errors import ArtifactMismatchError, UnsupportedModelError
from accel.modules import parent_of
from accel.parallel import broadcast_from_first, carries_parallel_hooks, context_parallel_group
from accel.quant import kernels as qkernels
from accel.quant.artifact import QuantizedModel
from accel.quant.config import QuESTConfig
from accel.quant.finetune import swapped
from accel.quant.options import ActGranularity, Bits, Kernel, RangeMethod, WeightGranularity
from accel.quant.workflow import (
    WHOLE_MODEL_GAIN,
    calibrate,
    choose_kernels,
    finetune,
    kept_in_float,
    linear_dtypes,
    load,
    quantize,
)
from accel.registry import Stage, register_method

logger = logging.getLogger(__name__)


# -- the runtime the patch holds ------------------------------------------------------------------


def linear_names(modules: dict[str, torch.nn.Module]) -> set[str]:
    """Names of the plain ``nn.Linear`` layers among ``modules`` (what QuEST replaces)."""
    return {name for name, m in modules.items() if type(m) is torch.nn.Linear}


def _model_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


class QuEST:
    """One QuEST patch: the quantized layers in place and what to report about them."""

    def __init__(
        self, config: QuESTConfig, qmodel: QuantizedModel, fp32_bytes: int, quant_bytes: int,
        kept: set[str] | None = None, kept_dtype: str = "fp32",
    ) -> None:
        self.config = config
        self.qmodel = qmodel
        self.fp32_bytes = fp32_bytes
        self.quant_bytes = quant_bytes
        self.kept = kept or set()
        self.kept_dtype = kept_dtype
        self.parallel_kept: set[str] = set()  # layers diffusers' context parallelism hooks (split/gather)
        self.replaced: dict[str, torch.nn.Module] = {}

    def before_call(self, pipeline: Any, kwargs: dict[str, Any]) -> None:
        """Refuse a model whose context parallelism was enabled after the patch on a replaced layer: its
        split/gather hooks would sit on accel's layer and be lost with it when the patch is removed."""
        hooked = sorted(name for name, layer in self.replaced.items() if carries_parallel_hooks(layer))
        if hooked:
            raise UnsupportedModelError(
                f"QuEST: context parallelism was enabled after accel.patch, and diffusers hooked the quantized "
                f"layer(s) {', '.join(hooked)}; removing the patch would lose those hooks. Call "
                "model.enable_parallelism(...) before accel.patch(...)."
            )

    def remove(self) -> None:
        """Nothing to drop: the float layers come back through the patch's hooks."""

    def report(self) -> dict[str, Any]:
        layers = [layer for name, layer in self.qmodel.layers.items() if name not in self.kept]
        kernels: dict[str, int] = {}
        bits: dict[str, int] = {}
        for layer in layers:
            kernels[layer.kernel] = kernels.get(layer.kernel, 0) + 1
            key = f"w{layer.spec.w_bits}a{layer.spec.a_bits}"
            bits[key] = bits.get(key, 0) + 1
        meta = self.qmodel.meta
        facts: dict[str, Any] = {
            "bits": bits,
            "kernels": kernels,
            "model_bytes": f"{self.quant_bytes:,} (fp32 {self.fp32_bytes:,}, "
            f"{self.quant_bytes / max(self.fp32_bytes, 1):.2f}x)",
            "finetuned": f"{len(meta.get('finetuned', []))} layers ({len(meta.get('temporal', []))} temporal, "
            f"{len(meta.get('sensitive', []))} sensitive)",
            "calibration": meta.get("calibration"),
            "finetune_run": meta.get("finetune"),
            "float": "attention matmuls, norms, embeddings and convolutions stay in float",
        }
        if self.parallel_kept:
            facts["kept_float_for_parallelism"] = (
                f"{', '.join(sorted(self.parallel_kept))}: diffusers' context parallelism splits or gathers "
                "the sequence in hooks on these layers, which stay float so the hooks stay where they are"
            )
        if self.kept:
            facts["kept_float"] = (
                f"{len(self.kept)} of {len(self.qmodel.layers)} layers kept in {self.kept_dtype}: too small "
                f"to gain (no integer kernel here is correct or faster than the {self.kept_dtype} layer at "
                "their shape, so quantizing would only slow them; keep_float_when_faster=False quantizes "
                "them for the memory)"
            )
            if not layers:
                facts["warning"] = ("no layer is quantized: this model's layers are too small for an integer "
                                    "speedup here (or this CPU has no correct int8 kernel); the patch "
                                    "changes nothing")
        whole = meta.get("whole_model")
        if whole:
            kept_all = whole["speedup"] < WHOLE_MODEL_GAIN
            facts["whole_model_check"] = (
                f"with its integer layers the model ran {whole['speedup']:.2f}x its float speed on a "
                + ("recorded call: below 1.03x, so every layer stays float" if kept_all else "recorded call")
            )
        fake = [layer for layer in layers if layer.kernel == "fake"]
        if fake:
            no_kernel = sum(
                not any(qkernels.runnable(k, layer.spec, layer.qweight.device)
                        for k in qkernels.INTEGER_KERNELS)
                for layer in fake
            )
            why = []
            if no_kernel:
                why.append(f"{no_kernel} have no integer kernel here")
            if len(fake) - no_kernel:
                how = (
                    "were asked to"
                    if self.config.kernel is Kernel.FAKE
                    else "measured faster than int8 at their shape"
                )
                why.append(f"{len(fake) - no_kernel} {how}")
            facts["warning"] = (
                f"{len(fake)} of {len(layers)} quantized layers run fake-quant "
                f"({'; '.join(why)}): quantized accuracy, no speedup there."
            )
        return facts


_SHORT_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # the report's names


@register_method(
    QuESTConfig,
    name="quest",
    stage=Stage.QUANTIZE,
    summary="QuEST: W8A8/W4A8/W4A4 linear layers, timestep-aware calibration, selective finetuning",
)
def _apply(ctx: PatchContext, config: QuESTConfig) -> QuEST:
    fp32_bytes = _model_bytes(ctx.model)
    if config.artifact is not None:
        qmodel = QuantizedModel.load(config.artifact)
        qmodel.check_model(ctx.model)
        saved = qmodel.config.get("_data", {}).get("bits")
        if saved != config.bits.value:
            raise ArtifactMismatchError(
                f"The QuEST artifact {config.artifact!r} holds a {saved} model but the config asks for "
                f"bits={config.bits.value!r}; pass bits={saved!r} or make a {config.bits.value} artifact."
            )
        # Kernels saved with the artifact were measured on the machine that made it: re-measure where one
        # cannot run here or computes wrong products here (e.g. int8 without VNNI).
        if config.kernel is not Kernel.AUTO or any(
            not qkernels.runnable(layer.kernel, layer.spec, layer.qweight.device)
            for layer in qmodel.layers.values()
        ):
            qmodel.meta["kernel_timings"] = choose_kernels(
                qmodel.layers, qmodel.meta.get("rows", {}), config.kernel,
                linear_dtypes(ctx.model, qmodel.layers),
            )
    else:
        if config.needs_calibration and context_parallel_group(ctx.model) is not None:
            raise UnsupportedModelError(
                "QuEST cannot calibrate or finetune under context parallelism: each rank sees only its slice of "
                "the tokens (its ranges and gradients would differ between ranks). Quantize in one process and "
                "pass the artifact on every rank: accel.methods.quest.finetune(pipe, "
                "accel.methods.quest.calibrate(pipe, config), config).save(path), then QuESTConfig(artifact=path); "
                "or use act_granularity='per_token', finetune_iters=0 (no data needed)."
            )
        if config.needs_calibration and ctx.pipeline is None:
            raise UnsupportedModelError(
                f"QuEST on a bare {type(ctx.model).__name__} cannot calibrate (no pipeline to run). Quantize "
                "offline and pass the artifact: calib = accel.methods.quest.calibrate(model, config, images=... "
                "or inputs=...); accel.methods.quest.finetune(model, calib, config).save(path); then "
                "QuESTConfig(artifact=path). Or use act_granularity='per_token', finetune_iters=0 (no data needed)."
            )
        qmodel = quantize(ctx.pipeline if ctx.pipeline is not None else ctx.model, config)
    dtypes = linear_dtypes(ctx.model, qmodel.layers)
    kept = kept_in_float(qmodel.layers, qmodel.meta, config, dtypes)
    parallel_kept = {name for name in qmodel.layers if carries_parallel_hooks(ctx.model.get_submodule(name))}
    kept = _agreed_choice(qmodel, kept, context_parallel_group(ctx.model))
    replaced, bytes_replaced = {}, 0
    for name, layer in qmodel.layers.items():
        if name in kept or name in parallel_kept:
            continue
        parent, child = parent_of(ctx.model, name)
        original = parent._modules[child]
        bytes_replaced += _model_bytes(original)
        replaced[name] = layer.take_place_of(original)
        ctx.hooks.set_attr(parent, child, replaced[name])
    quant_bytes = fp32_bytes - bytes_replaced + qmodel.nbytes(exclude=kept | parallel_kept)
    kept_dtypes = sorted({_SHORT_DTYPE.get(dtypes[n], str(dtypes[n]).removeprefix("torch.")) for n in kept})
    runtime = QuEST(config, qmodel, fp32_bytes, quant_bytes, kept, "/".join(kept_dtypes) or "fp32")
    runtime.parallel_kept, runtime.replaced = parallel_kept, replaced
    return runtime


def _agreed_choice(qmodel: QuantizedModel, kept: set[str], group: Any | None) -> set[str]:
    """Under context parallelism, every rank takes the first rank's measured choice (kernels, layers kept
    float), so all ranks compute their slices the same way. Returns the layers kept float."""
    if group is None:
        return kept
    choice = broadcast_from_first({"kernels": {n: layer.kernel for n, layer in qmodel.layers.items()},
                                   "kept": sorted(kept)}, group)
    for name, kernel in choice["kernels"].items():
        qmodel.layers[name].set_kernel(kernel)
    return set(choice["kept"])


__all__ = [
    "ActGranularity",
    "Bits",
    "Kernel",
    "QuESTConfig",
    "QuantizedModel",
    "RangeMethod",
    "WeightGranularity",
    "calibrate",
    "choose_kernels",
    "finetune",
    "load",
    "quantize",
    "swapped",
]

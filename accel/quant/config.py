"""QuEST's settings: the config of the ``quest`` method, beside the quantization code that reads it."""

from __future__ import annotations

from dataclasses import dataclass

from accel.config import MethodConfig, check_choice, check_float, check_int
from accel.quant.options import ActGranularity, Bits, Kernel, RangeMethod, WeightGranularity


@dataclass(frozen=True, kw_only=True)
class QuESTConfig(MethodConfig):
    """QuEST settings.

    Args:
        bits: ``"w8a8"``, ``"w4a8"``, ``"w4a4"`` (weight / activation bits of every linear layer) or
            ``"w4a16"`` (4-bit weights only, 16-bit activations: no activation calibration; the weight is
            unpacked one column tile at a time, and the GEMM runs in bf16 where the CPU multiplies bf16
            natively, else in the model's dtype).
        weight_granularity: ``"per_channel"`` (one scale per output channel) or ``"per_tensor"``.
        act_granularity: ``"per_tensor"`` (static, calibrated) or ``"per_token"`` (dynamic).
        weight_symmetric / act_symmetric: symmetric (zero point 0) or asymmetric quantizers.
        act_range: how static ranges are set: ``"minmax"``, ``"percentile"`` or ``"mse"``.
        percentile: the percentile ``act_range="percentile"`` clips at.
        first_last_8bit: keep 8-bit activations in the first and last linear layers (as QuEST does).
        calib_seeds: pipeline calibration runs (every class label, one seed each).
        calib_steps: sampler steps of the calibration runs (``None``: the pipeline's default).
        finetune_iters: distillation iterations (0: plain PTQ with timestep-aware calibration).
        sensitive_layers: how many activation-sensitive layers are finetuned besides the temporal ones.
        lr / step_lr: Adam learning rates of finetuned weights and of (log) quantizer step sizes.
        max_inputs: model calls kept from calibration for the sensitivity scan and finetuning.
        kernel: ``"auto"`` (fastest correct, measured at the model's shapes in the model's dtype),
            ``"fused"`` (accel's C++ int8 linear), ``"int_mm"``, ``"onednn"`` or ``"fake"``; layers a kernel
            cannot run fall back to fake-quant.
        keep_float_when_faster: with ``kernel="auto"``, a layer no integer kernel can speed up (none is
            correct on this CPU, or none beats the unquantized layer in the model's dtype at its shape)
            stays an unquantized float layer (reported as kept in fp32 / bf16), and every layer does when
            the whole model with its integer layers was not faster on a recorded calibration call.
            ``False`` quantizes every layer: the memory saving first.
        artifact: folder of a saved quantized model (``QuantizedModel.save``); skips all calibration.
    """

    bits: Bits = Bits.W8A8
    weight_granularity: WeightGranularity = WeightGranularity.PER_CHANNEL
    act_granularity: ActGranularity = ActGranularity.PER_TENSOR
    weight_symmetric: bool = True
    act_symmetric: bool = False
    act_range: RangeMethod = RangeMethod.MSE
    percentile: float = 99.99
    first_last_8bit: bool = True
    calib_seeds: int = 2
    calib_steps: int | None = None
    finetune_iters: int = 200
    sensitive_layers: int = 8
    lr: float = 1e-5
    step_lr: float = 1e-3
    max_inputs: int = 48
    kernel: Kernel = Kernel.AUTO
    keep_float_when_faster: bool = True
    artifact: str | None = None

    def __post_init__(self) -> None:
        for name, enum_cls in (
            ("bits", Bits),
            ("weight_granularity", WeightGranularity),
            ("act_granularity", ActGranularity),
            ("act_range", RangeMethod),
            ("kernel", Kernel),
        ):
            object.__setattr__(self, name, check_choice(f"QuESTConfig.{name}", getattr(self, name), enum_cls))
        check_float("QuESTConfig.percentile", self.percentile, low=50.0, high=100.0)
        check_int("QuESTConfig.calib_seeds", self.calib_seeds, low=1)
        if self.calib_steps is not None:
            check_int("QuESTConfig.calib_steps", self.calib_steps, low=1)
        check_int("QuESTConfig.finetune_iters", self.finetune_iters, low=0, hint="Use 0 for plain PTQ.")
        check_int("QuESTConfig.sensitive_layers", self.sensitive_layers, low=0)
        check_float("QuESTConfig.lr", self.lr, low=0.0)
        check_float("QuESTConfig.step_lr", self.step_lr, low=0.0)
        check_int("QuESTConfig.max_inputs", self.max_inputs, low=1)
        if self.artifact is not None and not isinstance(self.artifact, str):
            raise TypeError(
                f"QuESTConfig.artifact must be a folder path (str) or None, got {self.artifact!r}."
            )

    @property
    def needs_calibration(self) -> bool:
        static = self.act_granularity is ActGranularity.PER_TENSOR and not self.bits.weight_only
        return static or self.finetune_iters > 0

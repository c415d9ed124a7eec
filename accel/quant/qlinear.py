"""Quantized linear layers: ``LSQLinear`` (fake-quant, learnable, for calibration and finetuning) and
``QuantLinear`` (integer weights, int4 packed, run on an integer kernel or fake-quant as a fallback).

Both compute ``y = Q_a(x) @ Q_w(W)^T + b`` with ``Q(v) = scale * (q - zero)``; ``LSQLinear.freeze()``
turns one into the other with the same scales, so the frozen layer reproduces the finetuned one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from accel.quant import kernels
from accel.quant.packing import pack_int4, unpack_int4
from accel.quant.quantizers import dequantize, fake_quant, qrange, quantize, token_qparams


@dataclass(frozen=True)
class LayerSpec:
    """How one ``nn.Linear`` is quantized. ``a_dynamic``: per-token ranges at run time (else one
    static per-tensor range from calibration)."""

    in_features: int
    out_features: int
    w_bits: int
    a_bits: int
    w_symmetric: bool
    a_symmetric: bool
    a_dynamic: bool
    bias: bool

    @property
    def weight_only(self) -> bool:
        """Only the weights are quantized (``a_bits`` 16): activations stay in the model's float dtype."""
        return self.a_bits >= 16

    @property
    def static_acts(self) -> bool:
        """Activations quantized with one calibrated per-tensor range."""
        return not self.a_dynamic and not self.weight_only

    def to_json(self) -> dict:
        return asdict(self)


class _ActQuant:
    """Shared activation logic: static per-tensor or dynamic per-token ``(scale, zero)`` for (M, K)."""

    spec: LayerSpec

    def act_qparams(
        self, x2d: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.a_dynamic:
            return token_qparams(x2d, self.spec.a_bits, self.spec.a_symmetric)
        return scale, zero


class LSQLinear(torch.nn.Module, _ActQuant):
    """Fake-quantized copy of an ``nn.Linear`` with LSQ step sizes (log-parametrised, so Adam moves
    them by relative amounts). The original layer is never modified: its weight is cloned.

    ``quantize_weights`` / ``quantize_acts`` switch the two quantizers off for sensitivity scans.
    """

    def __init__(
        self,
        linear: torch.nn.Linear,
        spec: LayerSpec,
        w_scale: torch.Tensor,
        w_zero: torch.Tensor,
        a_scale: torch.Tensor | None,
        a_zero: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.weight = torch.nn.Parameter(linear.weight.detach().float().clone())
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float().clone())
        self.log_w_scale = torch.nn.Parameter(w_scale.float().log())
        self.register_buffer("w_zero", w_zero.float())
        if not spec.static_acts:
            self.log_a_scale, self.a_zero = None, None
        else:
            self.log_a_scale = torch.nn.Parameter(a_scale.float().reshape(()).log())
            self.register_buffer("a_zero", a_zero.float().reshape(()))
        self.quantize_weights = True
        self.quantize_acts = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x2d = x.reshape(-1, self.spec.in_features).float()
        if self.quantize_acts and not self.spec.weight_only:
            a_scale = None if self.log_a_scale is None else self.log_a_scale.exp()
            scale, zero = self.act_qparams(x2d, a_scale, self.a_zero)
            x2d = fake_quant(x2d, scale, zero, *qrange(self.spec.a_bits, self.spec.a_symmetric))
        weight = self.weight
        if self.quantize_weights:
            weight = fake_quant(
                weight,
                self.log_w_scale.exp()[:, None],
                self.w_zero[:, None],
                *qrange(self.spec.w_bits, self.spec.w_symmetric),
            )
        out = F.linear(x2d, weight, self.bias)
        return out.reshape(*x.shape[:-1], self.spec.out_features).to(dtype)

    def step_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in (self.log_w_scale, self.log_a_scale) if p is not None]

    @torch.no_grad()
    def freeze(self) -> QuantLinear:
        """The integer layer with this layer's current weights and step sizes."""
        a_scale = None if self.log_a_scale is None else self.log_a_scale.exp()
        return QuantLinear.from_float(
            self.spec, self.weight, self.bias, self.log_w_scale.exp(), self.w_zero, a_scale, self.a_zero
        )


class QuantLinear(torch.nn.Module, _ActQuant):
    """Integer ``Linear``: int8 weights (N, K), or 4-bit weights packed two per byte (N, ceil(K/2)).

    ``kernel`` picks the execution: ``"fused"`` (accel's C++ int8 linear: quantization, int8 GEMM and
    epilogue in one call, fp32 or bf16 activations, 4-bit weights unpacked per tile), ``"int_mm"``
    (``torch._int_mm``, int8 x int8 -> int32, exact, then one float rescale), ``"onednn"`` (x86 oneDNN
    static qlinear, W8 symmetric + per-tensor A8) or ``"fake"`` (dequantize and run a float matmul:
    correct everywhere, no speedup).
    """

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__()
        self.spec = spec
        n, k = spec.out_features, spec.in_features
        packed = spec.w_bits <= 4
        self.register_buffer(
            "qweight",
            torch.zeros(n, (k + 1) // 2 if packed else k, dtype=torch.uint8 if packed else torch.int8),
        )
        self.register_buffer("w_scale", torch.ones(n))
        self.register_buffer("w_zero", torch.zeros(n, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(n) if spec.bias else None)
        self.register_buffer("a_scale", torch.ones(()) if spec.static_acts else None)
        self.register_buffer("a_zero", torch.zeros((), dtype=torch.int32) if spec.static_acts else None)
        # Models read their dtype from their first parameter (diffusers' Wan does
        # ``next(self.time_embedder.parameters()).dtype``); a module made only of quantized layers would have
        # none. This empty parameter carries the replaced weight's dtype and is never saved.
        self.dtype_anchor = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        self.kernel = "fake"
        self._runtime: dict = {}  # derived data (column sums, oneDNN packed weight); never saved

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_float(
        cls,
        spec: LayerSpec,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        w_scale: torch.Tensor,
        w_zero: torch.Tensor,
        a_scale: torch.Tensor | None,
        a_zero: torch.Tensor | None,
    ) -> QuantLinear:
        layer = cls(spec)
        q = quantize(
            weight.detach().float(), w_scale[:, None], w_zero[:, None], *qrange(spec.w_bits, spec.w_symmetric)
        )
        layer.qweight = pack_int4(q) if spec.w_bits <= 4 else q
        layer.w_scale = w_scale.detach().float().clone()
        layer.w_zero = w_zero.detach().round().to(torch.int32)
        if spec.bias:
            layer.bias = bias.detach().float().clone()
        if spec.static_acts:
            layer.a_scale = a_scale.detach().float().reshape(()).clone()
            layer.a_zero = a_zero.detach().round().to(torch.int32).reshape(())
        return layer

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        self._runtime.clear()  # .to() / .cuda(): derived tensors are rebuilt on the new device
        return super()._apply(fn, recurse)

    def take_place_of(self, linear: torch.nn.Module) -> QuantLinear:
        """Move to ``linear``'s device and report its weight's dtype (what code reading parameters sees)."""
        weight = linear.weight
        self.to(weight.device)
        self.dtype_anchor = torch.nn.Parameter(torch.empty(0, dtype=weight.dtype, device=weight.device),
                                               requires_grad=False)
        return self

    def int_weight(self) -> torch.Tensor:
        """(N, K) int8 weight integers (unpacked on the fly for 4-bit layers)."""
        if self.spec.w_bits <= 4:
            return unpack_int4(self.qweight, self.spec.in_features)
        return self.qweight

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized float weight (for code that peeks at ``.weight.dtype`` / ``.device``)."""
        return dequantize(self.int_weight(), self.w_scale[:, None], self.w_zero[:, None].float())

    def set_kernel(self, kernel: str) -> None:
        """Run on ``kernel``; one that cannot take this layer is an error, one that computes wrong
        integer products on this machine is replaced by :func:`kernels.fallback_kernel` (one warning)."""
        device = self.qweight.device
        reason = kernels.unavailable(kernel, self.spec, device)
        if reason is not None:
            raise ValueError(f"Kernel {kernel!r} cannot run this layer: {reason}")
        if kernels.wrong_results(kernel, device) is not None:
            fallback = kernels.fallback_kernel(self.spec, device)
            kernels.warn_wrong_once(kernel, device, fallback)
            kernel = fallback
        self.kernel = kernel
        self._runtime.clear()

    # -- execution -----------------------------------------------------------------------------
    def quantize_input(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Activation integers (M, K) int8 with their scale and zero (0-d or (M, 1))."""
        a_zero = None if self.a_zero is None else self.a_zero.float()
        scale, zero = self.act_qparams(x2d, self.a_scale, a_zero)
        return quantize(x2d, scale, zero, *qrange(self.spec.a_bits, self.spec.a_symmetric)), scale, zero

    def fused_forward(self, x2d: torch.Tensor) -> torch.Tensor:
        """The ``fused`` kernel on (M, K) fp32 or bf16 activations, output in their dtype."""
        from accel.kernels.cpu_int8_linear import int8_linear, weight_only_linear

        if self.spec.weight_only:
            # W4A16 means 16-bit activations: fp32 inputs take the bf16 GEMM where the CPU has one
            return weight_only_linear(
                x2d, self.qweight, self.spec.in_features, self.w_scale, self.w_zero, self.bias,
                bf16_compute=x2d.dtype == torch.float32 and kernels.native_bf16(),
            )
        rt = self._runtime
        if "colsum" not in rt:  # derived once per layer: host reads here would break a compiled graph
            rt["colsum"] = self.int_weight().sum(1, dtype=torch.int32)
            rt["qrange"] = qrange(self.spec.a_bits, self.spec.a_symmetric)
            rt["a_scale"] = None if self.spec.a_dynamic else float(self.a_scale)
            rt["a_zero"] = 0.0 if self.spec.a_dynamic else float(self.a_zero)
        return int8_linear(
            x2d, self.qweight, self.spec.in_features, self.w_scale, self.w_zero, rt["colsum"], self.bias,
            rt["qrange"], self.spec.a_symmetric, rt["a_scale"], rt["a_zero"],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.kernel == "fused":
            x2d = x.reshape(-1, self.spec.in_features)
            if x2d.dtype not in (torch.float32, torch.bfloat16):
                x2d = x2d.float()
            return self.fused_forward(x2d).reshape(*x.shape[:-1], self.spec.out_features).to(dtype)
        x2d = x.reshape(-1, self.spec.in_features).float()
        if self.spec.weight_only:  # fake: the dequantized weight in a float matmul
            out = F.linear(x2d, self.weight, self.bias)
            return out.reshape(*x.shape[:-1], self.spec.out_features).to(dtype)
        qx, scale, zero = self.quantize_input(x2d)
        kernel = self.kernel
        if kernel != "fake" and not kernels.shape_ok(kernel, qx.shape[0], self.spec, qx.device):
            kernel = "fake"  # e.g. torch._int_mm on CUDA needs M > 16 and K, N multiples of 8
        if kernel == "int_mm":
            out = kernels.int_mm_linear(
                qx, scale, zero, self.int_weight(), self.w_scale, self.w_zero, self.bias, self._runtime
            )
        elif kernel == "onednn":
            out = _onednn_outside_graph()(
                qx, scale, zero, self.int_weight(), self.w_scale, self.bias, self._runtime
            )
        else:
            x_hat = dequantize(qx, scale, zero)
            out = F.linear(x_hat, self.weight, self.bias)
        return out.reshape(*x.shape[:-1], self.spec.out_features).to(dtype)

    def extra_repr(self) -> str:
        s = self.spec
        acts = "float" if s.weight_only else "per-token dynamic" if s.a_dynamic else "per-tensor static"
        return (
            f"in_features={s.in_features}, out_features={s.out_features}, w{s.w_bits}a{s.a_bits}, "
            f"acts={acts}, kernel={self.kernel}"
        )


_ONEDNN_EAGER: list = []


def _onednn_outside_graph() -> Any:
    """``kernels.onednn_linear``, compiler-disabled: inductor lowers oneDNN's qlinear only with its packed
    weight frozen into the graph, and the prepacked weight here is runtime state. Built on first use, since
    ``torch.compiler`` imports dynamo (importing accel must not)."""
    if not _ONEDNN_EAGER:
        _ONEDNN_EAGER.append(torch.compiler.disable(kernels.onednn_linear))
    return _ONEDNN_EAGER[0]

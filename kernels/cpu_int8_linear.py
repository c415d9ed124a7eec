"""The fused CPU int8 linear (``cpu_int8_linear.cpp``): activation quantization, the int8 GEMM and the
dequantize + bias epilogue in one call, with 4-bit weights unpacked one column tile at a time.

Built on first use (:mod:`accel.kernels.cpp_build`); :func:`available` says whether it built. QuEST's
``fused`` kernel runs on it (:mod:`accel.quant.kernels`), and layers fall back to ``int_mm`` when it did
not build.
"""

from __future__ import annotations

from typing import Any

import torch
from accel.kernels.cpp_build import CppExtension

EXTENSION = CppExtension("cpu_int8_linear.cpp", "the fused CPU int8 linear", "the unfused int8 path")


def available() -> bool:
    return EXTENSION.available()


def unavailable_reason() -> str | None:
    return EXTENSION.failure


def int8_linear(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    in_features: int,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    w_colsum: torch.Tensor,
    bias: torch.Tensor | None,
    qrange: tuple[int, int],
    symmetric: bool,
    a_scale: float | None = None,
    a_zero: float = 0.0,
    tile_n: int = 0,
    accumulators: bool = False,
) -> torch.Tensor:
    """``Q_a(x) @ Q_w(W)^T * scales + bias`` for ``x2d`` (M, K) float32 or bfloat16 on CPU.

    ``qweight``: (N, K) int8, or (N, ceil(K/2)) uint8 with two 4-bit values per byte
    (:mod:`accel.quant.packing`). ``a_scale=None`` quantizes each row with its own range (dynamic per
    token); otherwise ``a_scale``/``a_zero`` are the static per-tensor parameters. ``w_colsum``: the int32
    row sums of the integer weight. Returns (M, N) in ``x2d``'s dtype, or with ``accumulators`` the exact
    int32 values ``sum_k (qx - zx)(qw - zw)``."""
    if x2d.device.type != "cpu":
        raise ValueError(f"the fused int8 linear runs on CPU tensors, got {x2d.device}.")
    return torch.ops.accel.int8_linear(
        x2d.contiguous(), qweight, int(in_features), w_scale, w_zero, w_colsum, bias, int(qrange[0]),
        int(qrange[1]), bool(symmetric), None if a_scale is None else float(a_scale), float(a_zero),
        int(tile_n), bool(accumulators),
    )


def weight_only_linear(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    in_features: int,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    tile_n: int = 0,
    bf16_compute: bool = False,
) -> torch.Tensor:
    """``x2d @ dequant(W)^T + bias`` with float activations (M, K) (float32 or bfloat16, output in that
    dtype): the integer weight (int8, or packed 4-bit) is dequantized one column tile at a time. The GEMM
    runs in ``x2d``'s dtype, or with ``bf16_compute`` in bfloat16 (16-bit activations, W4A16)."""
    if x2d.device.type != "cpu":
        raise ValueError(f"the weight-only linear runs on CPU tensors, got {x2d.device}.")
    return torch.ops.accel.weight_only_linear(
        x2d.contiguous(), qweight, int(in_features), w_scale, w_zero, bias, int(tile_n), bool(bf16_compute)
    )


# Registered as custom ops (with shape-only fake implementations) so a compiled model keeps these layers
# inside its graph instead of breaking it at every quantized linear.
@torch.library.custom_op("accel::int8_linear", mutates_args=())
def _int8_linear_op(
    x2d: torch.Tensor, qweight: torch.Tensor, in_features: int, w_scale: torch.Tensor, w_zero: torch.Tensor,
    w_colsum: torch.Tensor, bias: torch.Tensor | None, qmin: int, qmax: int, symmetric: bool,
    a_scale: float | None, a_zero: float, tile_n: int, accumulators: bool,
) -> torch.Tensor:
    module: Any = EXTENSION.require()
    return module.int8_linear(
        x2d, qweight, in_features, a_scale is None, symmetric, 1.0 if a_scale is None else a_scale, a_zero,
        qmin, qmax, w_scale, w_zero, w_colsum, torch.empty(0) if bias is None else bias, tile_n, accumulators,
    )


@_int8_linear_op.register_fake
def _(x2d, qweight, in_features, w_scale, w_zero, w_colsum, bias, qmin, qmax, symmetric, a_scale, a_zero,
      tile_n, accumulators):
    return x2d.new_empty((x2d.shape[0], qweight.shape[0]), dtype=torch.int32 if accumulators else x2d.dtype)


@torch.library.custom_op("accel::weight_only_linear", mutates_args=())
def _weight_only_op(
    x2d: torch.Tensor, qweight: torch.Tensor, in_features: int, w_scale: torch.Tensor, w_zero: torch.Tensor,
    bias: torch.Tensor | None, tile_n: int, bf16_compute: bool,
) -> torch.Tensor:
    module: Any = EXTENSION.require()
    return module.weight_only_linear(
        x2d, qweight, in_features, w_scale, w_zero, torch.empty(0) if bias is None else bias, tile_n,
        bf16_compute,
    )


@_weight_only_op.register_fake
def _(x2d, qweight, in_features, w_scale, w_zero, bias, tile_n, bf16_compute):
    return x2d.new_empty((x2d.shape[0], qweight.shape[0]))

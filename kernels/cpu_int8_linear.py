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
    module: Any = EXTENSION.require()
    empty = torch.empty(0)
    return module.int8_linear(
        x2d.contiguous(), qweight, int(in_features), a_scale is None, bool(symmetric),
        1.0 if a_scale is None else float(a_scale), float(a_zero), int(qrange[0]), int(qrange[1]),
        w_scale, w_zero, w_colsum, empty if bias is None else bias, int(tile_n), bool(accumulators),
    )


def weight_only_linear(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    in_features: int,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    tile_n: int = 0,
) -> torch.Tensor:
    """``x2d @ dequant(W)^T + bias`` with float activations (M, K) (float32 or bfloat16, computed in that
    dtype): the integer weight (int8, or packed 4-bit) is dequantized one column tile at a time."""
    if x2d.device.type != "cpu":
        raise ValueError(f"the weight-only linear runs on CPU tensors, got {x2d.device}.")
    module: Any = EXTENSION.require()
    return module.weight_only_linear(
        x2d.contiguous(), qweight, int(in_features), w_scale, w_zero,
        torch.empty(0) if bias is None else bias, int(tile_n),
    )

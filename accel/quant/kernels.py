"""Integer execution of quantized linear layers, and choosing the fastest correct kernel per shape.

Candidates (CPU):
- ``int_mm``: ``torch._int_mm`` (int8 (M, K) x int8 (K, N) -> int32, exact). Zero points are folded in
  exactly with row/column sums: ``sum (qx - zx)(qw - zw) = qx.qw - zw*sum(qx) - zx*sum(qw) + K*zx*zw``.
  Works for 4-bit values too (they sit in int8 containers). On CUDA it needs M > 16 and K, N
  multiples of 8; other shapes fall back to fake-quant.
- ``onednn``: ``torch.ops.onednn.qlinear_pointwise`` (x86 oneDNN): uint8 activations with one scale and
  zero point, symmetric int8 weights per channel, fp32 output. W8 symmetric + static A8 only.
- ``fake``: dequantize and run a float matmul (always correct, no speedup).

Nothing here imports triton or torchao.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from accel.timing import median_time

if TYPE_CHECKING:
    from accel.quant.qlinear import LayerSpec

KERNELS = ("int_mm", "onednn", "fake")


def unavailable(kernel: str, spec: LayerSpec, device: torch.device) -> str | None:
    """Why ``kernel`` cannot run a layer of ``spec`` on ``device`` (``None`` if it can)."""
    if kernel not in KERNELS:
        return f"unknown kernel {kernel!r}; accepted: {', '.join(KERNELS)}."
    if kernel == "fake":
        return None
    if kernel == "int_mm" and not hasattr(torch, "_int_mm"):
        return "this torch has no torch._int_mm."
    if kernel == "onednn":
        if device.type != "cpu" or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
            return "oneDNN qlinear runs on CPU builds with oneDNN only."
        if spec.w_bits != 8 or not spec.w_symmetric or spec.a_dynamic or spec.a_bits != 8:
            return "oneDNN qlinear takes symmetric 8-bit weights and static per-tensor 8-bit activations."
    return None


def shape_ok(kernel: str, m: int, spec: LayerSpec, device: torch.device) -> bool:
    """Shape constraints checked per call (M varies with the batch)."""
    if kernel == "int_mm" and device.type == "cuda":
        return m > 16 and spec.in_features % 8 == 0 and spec.out_features % 8 == 0
    return True


def int_mm_linear(
    qx: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor,
    qw: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    cache: dict[str, Any],
) -> torch.Tensor:
    """``(qx - zx) (qw - zw)^T`` exactly in int32, then ``* sx * sw + b``. qx (M, K), qw (N, K)."""
    acc = torch._int_mm(qx, qw.t())  # (M, N) int32
    if "w_colsum" not in cache:
        cache["w_colsum"] = qw.sum(1, dtype=torch.int32)  # (N,)
        cache["w_asym"] = bool(w_zero.any())
    k = qx.shape[1]
    zx = x_zero.round().to(torch.int32)  # 0-d (static) or (M, 1) (per token)
    if x_zero.dim() == 0:  # static: the zero-point terms are one integer vector, computed once
        if "corr" not in cache:
            cache["corr"] = k * zx * w_zero - zx * cache["w_colsum"]  # (N,) int32
            cache["scale"] = x_scale * w_scale  # (N,)
        if cache["w_asym"]:
            acc -= w_zero * qx.sum(1, keepdim=True, dtype=torch.int32)
        if bool(cache["corr"].any()):
            acc += cache["corr"]
        scale = cache["scale"]
    else:
        acc -= zx * cache["w_colsum"]
        if cache["w_asym"]:
            acc -= w_zero * qx.sum(1, keepdim=True, dtype=torch.int32) - k * zx * w_zero
        scale = x_scale * w_scale  # (M, N) by broadcasting
    out = acc.float()
    return out.mul_(scale) if bias is None else torch.addcmul(bias, out, scale)


def onednn_linear(
    qx: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor,
    qw: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    cache: dict[str, Any],
) -> torch.Tensor:
    """oneDNN static qlinear; the weight is prepacked once per layer (kept beside ``qweight``)."""
    if "packed" not in cache:
        cache["packed"] = torch.ops.onednn.qlinear_prepack(qw, None)
        cache["w_zeros"] = torch.zeros(qw.shape[0], dtype=torch.long)
    xu8 = (qx.to(torch.int16) + 128).to(torch.uint8)
    return torch.ops.onednn.qlinear_pointwise(
        xu8,
        float(x_scale),
        int(x_zero) + 128,
        cache["packed"],
        w_scale,
        cache["w_zeros"],
        bias,
        1.0,
        0,
        torch.float32,
        "none",
        [None],
        "",
    )


def _median_time(fn: Any, repeats: int, warmup: int = 3) -> tuple[float, float]:
    median, spread, _ = median_time(fn, repeats, warmup)
    return median, spread


@torch.no_grad()
def measure(
    layer: Any, rows: int, candidates: tuple[str, ...] = KERNELS, repeats: int = 15, rtol: float = 1e-4
) -> dict[str, Any]:
    """Time each runnable candidate on ``layer`` (a QuantLinear) at its own shape (rows x in_features),
    beside fp32 and bf16 ``F.linear``. A kernel counts as correct when it matches fake-quant within
    ``rtol`` of the output's scale (float summation order is the only difference)."""
    spec = layer.spec
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, spec.in_features, generator=gen).to(layer.qweight.device)
    if not spec.a_dynamic:  # inputs inside the calibrated range exercise the kernels honestly
        x = x * float(layer.a_scale) * 40
    w = layer.weight.detach()
    bias = layer.bias
    timings: dict[str, Any] = {"rows": rows, "shape": [spec.in_features, spec.out_features]}
    timings["fp32"] = _median_time(lambda: F.linear(x, w, bias), repeats)[0]
    xb, wb = x.bfloat16(), w.bfloat16()
    bb = None if bias is None else bias.bfloat16()
    timings["bf16"] = _median_time(lambda: F.linear(xb, wb, bb), repeats)[0]
    saved = layer.kernel
    layer.set_kernel("fake")
    reference = layer(x)
    scale = float(reference.abs().max()) or 1.0
    for kernel in candidates:
        if unavailable(kernel, spec, x.device) is not None:
            continue
        try:
            layer.set_kernel(kernel)
            error = float((layer(x) - reference).abs().max()) / scale
            if error > rtol:
                timings[kernel] = f"wrong (rel. error {error:.2e})"
                continue
            timings[kernel] = _median_time(lambda: layer(x), repeats)[0]
        except RuntimeError as exc:  # a kernel missing from this build
            timings[kernel] = f"failed: {str(exc).splitlines()[0][:80]}"
    layer.set_kernel(saved)
    return timings


def fastest(timings: dict[str, Any]) -> str:
    """The fastest correct candidate in a :func:`measure` result."""
    runnable = {k: v for k, v in timings.items() if k in KERNELS and isinstance(v, float)}
    return min(runnable, key=runnable.get) if runnable else "fake"

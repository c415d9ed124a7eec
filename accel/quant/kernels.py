"""Integer execution of quantized linear layers, and choosing the fastest correct kernel per shape.

Candidates (CPU):
- ``fused``: accel's C++ int8 linear (``accel.kernels.cpu_int8_linear``, built on first use): activation
  quantization, ``torch._int_mm`` over column tiles and the dequantize + bias epilogue in one call, from
  fp32 or bf16 activations; 4-bit weights unpacked one tile at a time. Every bit width and granularity.
- ``int_mm``: ``torch._int_mm`` (int8 (M, K) x int8 (K, N) -> int32, exact). Zero points are folded in
  exactly with row/column sums: ``sum (qx - zx)(qw - zw) = qx.qw - zw*sum(qx) - zx*sum(qw) + K*zx*zw``.
  Works for 4-bit values too (they sit in int8 containers). On CUDA it needs M > 16 and K, N
  multiples of 8; other shapes fall back to fake-quant.
- ``onednn``: ``torch.ops.onednn.qlinear_pointwise`` (x86 oneDNN): uint8 activations with one scale and
  zero point, symmetric int8 weights per channel, fp32 output. W8 symmetric + static A8 only.
- ``fake``: dequantize and run a float matmul (always correct, no speedup).

Integer kernels are not trusted blindly: on x86 CPUs without VNNI/AMX (AVX2 only) oneDNN, and
``torch._int_mm`` through it, multiply u8 x s8 with ``vpmaddubsw``, whose int16 pair sums saturate, so
ordinary 8-bit activations give wrong products there. Each integer kernel is therefore checked once per
process, at first use, against an exact int64 product on worst-case and random integers
(:func:`wrong_results`); a kernel that fails is never chosen, and a layer asked for it falls back with one
warning (:func:`fallback_kernel`).

Nothing here imports triton or torchao.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from accel.kernels.cpp_build import bf16_dot_products, cpu_flags
from accel.quant.options import Kernel
from accel.timing import median_time

if TYPE_CHECKING:
    from accel.quant.qlinear import LayerSpec

KERNELS: tuple[str, ...] = tuple(k.value for k in Kernel if k is not Kernel.AUTO)
INTEGER_KERNELS: tuple[str, ...] = (Kernel.FUSED.value, Kernel.INT_MM.value, Kernel.ONEDNN.value)


def unavailable(kernel: str, spec: LayerSpec, device: torch.device) -> str | None:
    """Why ``kernel`` cannot run a layer of ``spec`` on ``device`` (``None`` if it can)."""
    if kernel not in KERNELS:
        return f"unknown kernel {kernel!r}; accepted: {', '.join(KERNELS)}."
    if kernel == "fake":
        return None
    if kernel in ("int_mm", "fused") and not hasattr(torch, "_int_mm"):
        return "this torch has no torch._int_mm."
    if kernel == "fused" and device.type != "cpu":
        return "the fused int8 linear runs on CPU."
    if spec.weight_only and kernel != "fused":
        return "weight-only layers (float activations) run on the fused kernel or fake-quant."
    if kernel == "onednn":
        if device.type != "cpu" or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
            return "oneDNN qlinear runs on CPU builds with oneDNN only."
        if spec.w_bits != 8 or not spec.w_symmetric or spec.a_dynamic or spec.a_bits != 8:
            return "oneDNN qlinear takes symmetric 8-bit weights and static per-tensor 8-bit activations."
    return None


# oneDNN ISA names, by the int8 dot product they bring: a cap below VNNI means saturating u8 x s8 pairs.
_ISA_LEVEL = {"no_vnni": 0, "vnni": 1, "amx": 2}


def _isa_cap_level(cap: str) -> int | None:
    if not cap or cap in ("ALL", "DEFAULT"):
        return None
    if "AMX" in cap:
        return _ISA_LEVEL["amx"]
    return _ISA_LEVEL["vnni"] if any(t in cap for t in ("VNNI", "BF16", "FP16", "AVX10")) else 0


@lru_cache(maxsize=1)
def native_bf16() -> bool:
    """This x86 CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16), so a bf16 GEMM beats fp32; honours a
    ``ONEDNN_MAX_CPU_ISA`` cap below those."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper()
    capped = cap not in ("", "ALL", "DEFAULT") and not any(t in cap for t in ("BF16", "AMX", "AVX10"))
    return bf16_dot_products() and not capped


@lru_cache(maxsize=1)
def int8_isa() -> str:
    """The int8 dot product x86 oneDNN can use here: ``"amx"``, ``"vnni"`` (AVX-512 or AVX VNNI),
    ``"no_vnni"`` (AVX2 or AVX-512 without VNNI: u8 x s8 pair sums saturate int16) or ``"unknown"``.
    Honours ``ONEDNN_MAX_CPU_ISA``, which caps what oneDNN dispatches to."""
    flags = cpu_flags()
    if not flags:
        return "unknown"
    if "avx2" not in flags:
        return "unknown"
    level = 2 if "amx_int8" in flags else 1 if flags & {"avx512_vnni", "avx_vnni"} else 0
    cap = _isa_cap_level(os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper())
    if cap is not None:
        level = min(level, cap)
    return {v: k for k, v in _ISA_LEVEL.items()}[level]


def _probe_operands(m: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 activations (M, K) and weights (N, K) with rows at the range ends (the saturation worst
    case: every product large and of one sign) beside random rows."""
    gen = torch.Generator().manual_seed(m * 7919 + k * 31 + n)
    qx = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int16).to(torch.int8)
    qw = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int16).to(torch.int8)
    quarter = max(m // 4, 1)
    qx[:quarter] = 127
    qx[quarter : 2 * quarter] = -128
    qw[: max(n // 4, 1)] = 127
    qw[max(n // 4, 1) : max(n // 2, 2)] = -127
    return qx, qw


def _probe_shapes(device: torch.device) -> tuple[tuple[int, int, int], ...]:
    if device.type == "cuda":  # torch._int_mm on CUDA needs M > 16 and K, N multiples of 8
        return ((32, 64, 32), (48, 200, 72))
    return ((97, 200, 72), (1, 72, 40), (17, 128, 24))


def _probe_error(kernel: str, qx: torch.Tensor, qw: torch.Tensor) -> float:
    """Largest absolute deviation of ``kernel``'s ``qx @ qw^T`` from the exact integer product."""
    exact = qx.long() @ qw.long().t()
    if kernel == "int_mm":
        return float((torch._int_mm(qx, qw.t()).long() - exact).abs().max())
    if kernel == "fused":
        from accel.kernels import cpu_int8_linear

        n = qw.shape[0]
        acc = cpu_int8_linear.int8_linear(  # unit scale, zero 0: the float integers quantize to themselves
            qx.float(), qw, qx.shape[1], torch.ones(n), torch.zeros(n, dtype=torch.int32),
            qw.sum(1, dtype=torch.int32), None, (-128, 127), False, a_scale=1.0, accumulators=True,
        )
        return float((acc.long() - exact).abs().max())
    ones = torch.ones(qw.shape[0], device=qw.device)
    out = onednn_linear(qx, torch.ones(()), torch.zeros(()), qw, ones, None, {})
    # Unit scales: the float output is the int32 accumulator, exact below 2^24 (|acc| <= 200*128*127).
    return float((out.double() - exact.double()).abs().max())


_WRONG: dict[tuple[str, str], str | None] = {}


def wrong_results(kernel: str, device: torch.device) -> str | None:
    """Why integer ``kernel`` cannot be trusted on ``device`` (``None`` when it matched the exact
    reference), checked once per process and kernel."""
    if kernel not in INTEGER_KERNELS:
        return None
    key = (kernel, str(device))
    if key not in _WRONG:
        _WRONG[key] = _check_kernel(kernel, device)
    return _WRONG[key]


def _check_kernel(kernel: str, device: torch.device) -> str | None:
    if kernel == "fused":
        from accel.kernels import cpu_int8_linear

        if not cpu_int8_linear.available():
            return f"it did not build ({cpu_int8_linear.unavailable_reason()})"
    worst = 0.0
    try:
        for m, k, n in _probe_shapes(device):
            qx, qw = _probe_operands(m, k, n)
            worst = max(worst, _probe_error(kernel, qx.to(device), qw.to(device)))
    except (RuntimeError, NotImplementedError) as exc:  # a kernel missing from this build
        return f"it failed on a probe ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
    if worst == 0.0:
        return None
    why = f"its int8 products were off by up to {worst:.0f} on a probe (exact: 0)"
    if device.type == "cpu" and int8_isa() == "no_vnni":
        why += (
            "; this CPU runs int8 GEMMs without VNNI/AMX, where u8 x s8 pair sums saturate int16"
        )
    return why


def fallback_kernel(spec: LayerSpec, device: torch.device) -> str:
    """The first integer kernel that can run ``spec`` and computes exact products here, else fake."""
    return next((kernel for kernel in INTEGER_KERNELS if runnable(kernel, spec, device)), "fake")


_WARNED: set[tuple[str, str]] = set()


def warn_wrong_once(kernel: str, device: torch.device, fallback: str) -> None:
    key = (kernel, str(device))
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"accel QuEST: the {kernel!r} int8 kernel cannot be used on this machine "
        f"({wrong_results(kernel, device)}); layers asked for it run {fallback!r} instead.",
        RuntimeWarning,
        stacklevel=3,
    )


def runnable(kernel: str, spec: LayerSpec, device: torch.device) -> bool:
    """``kernel`` can run ``spec`` on ``device`` and computes exact integer products there."""
    return unavailable(kernel, spec, device) is None and wrong_results(kernel, device) is None


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
            cache["corr_any"] = bool(cache["corr"].any())  # read once: a per-call host read breaks graphs
            cache["scale"] = x_scale * w_scale  # (N,)
        if cache["w_asym"]:
            acc -= w_zero * qx.sum(1, keepdim=True, dtype=torch.int32)
        if cache["corr_any"]:
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
    # The tensor overload takes scale and zero point as tensors: no host read per call, so a compiled
    # model keeps this layer inside its graph.
    return torch.ops.onednn.qlinear_pointwise.tensor(
        xu8,
        x_scale.float().reshape(()),
        (x_zero.round().to(torch.int32) + 128).reshape(()),
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
    layer: Any,
    rows: int,
    candidates: tuple[str, ...] = KERNELS,
    repeats: int = 15,
    rtol: float = 1e-4,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Time each runnable candidate on ``layer`` (a QuantLinear) at its own shape (rows x in_features) from
    activations in the model's ``dtype``, beside the unquantized layer in that dtype (``"float"``) and fp32 /
    bf16 ``F.linear`` for reference. A kernel counts as correct when it matches fake-quant within ``rtol`` of
    the output's scale (float summation order is the only difference; ``dtype``'s rounding of the output is
    allowed on top)."""
    spec = layer.spec
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, spec.in_features, generator=gen).to(layer.qweight.device)
    if spec.static_acts:  # inputs inside the calibrated range exercise the kernels honestly
        x = x * float(layer.a_scale) * 40
    x = x.to(dtype)
    w = layer.weight.detach()
    bias = layer.bias
    timings: dict[str, Any] = {
        "rows": rows, "shape": [spec.in_features, spec.out_features], "dtype": str(dtype)
    }
    for name, cast in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("float", dtype)):
        xc, wc, bc = x.to(cast), w.to(cast), None if bias is None else bias.to(cast)
        timings[name] = _median_time(lambda xc=xc, wc=wc, bc=bc: F.linear(xc, wc, bc), repeats)[0]
    saved = layer.kernel
    layer.set_kernel("fake")
    reference = layer(x.float())
    scale = float(reference.abs().max()) or 1.0
    # dtype's rounding of the output; weight-only layers may run their GEMM in bf16 (16-bit activations)
    tolerance = max(rtol, 2 * torch.finfo(torch.bfloat16 if spec.weight_only else dtype).eps)
    for kernel in candidates:
        if not runnable(kernel, spec, x.device):
            continue
        try:
            layer.set_kernel(kernel)
            error = float((layer(x).float() - reference).abs().max()) / scale
            if error > tolerance:
                timings[kernel] = f"wrong (rel. error {error:.2e})"
                continue
            timings[kernel] = _median_time(lambda: layer(x), repeats)[0]
        except RuntimeError as exc:  # a kernel missing from this build
            timings[kernel] = f"failed: {str(exc).splitlines()[0][:80]}"
    layer.set_kernel(saved)
    return timings


DEFAULT_ROWS = 256  # rows a layer is measured at when calibration recorded none


def timing_label(spec: LayerSpec, rows: int, dtype: torch.dtype = torch.float32) -> str:
    """The key of one shape's :func:`measure` result in a model's ``kernel_timings``."""
    label = f"{spec.in_features}x{spec.out_features} w{spec.w_bits}a{spec.a_bits} rows={rows}"
    return label if dtype == torch.float32 else f"{label} {str(dtype).removeprefix('torch.')}"


def fastest(timings: dict[str, Any]) -> str:
    """The fastest correct candidate in a :func:`measure` result."""
    runnable = {k: v for k, v in timings.items() if k in KERNELS and isinstance(v, float)}
    return min(runnable, key=runnable.get) if runnable else "fake"


# An integer kernel must beat the unquantized layer by this much to replace it: a layer timed alone gains
# more than it does inside the model (its quantize pass competes for cache with its neighbours), the float
# layer is exact, and the timings carry noise.
FLOAT_MARGIN = 0.9


def float_is_faster(timings: dict[str, Any], kernel: str) -> bool:
    """The unquantized layer (in the model's dtype) beat ``kernel`` in a :func:`measure` result; ``fake``
    always loses to it (it dequantizes, then runs the same float matmul)."""
    if kernel == "fake":
        return True
    own, plain = timings.get(kernel), timings.get("float", timings.get("fp32"))
    return isinstance(own, float) and isinstance(plain, float) and own > FLOAT_MARGIN * plain

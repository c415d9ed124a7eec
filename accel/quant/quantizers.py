"""Uniform quantizers: integer ranges, quantize/dequantize, range search and LSQ-style fake quantization.

Weights are quantized per output channel (rows of a ``Linear`` weight, (N, K)), symmetric or asymmetric;
activations per tensor (a static range calibrated across timesteps) or per token (a dynamic range per
row, computed at run time). Every quantizer is ``x ~ scale * (q - zero)`` with integer ``q`` in
``[qmin, qmax]``; ``zero`` is 0 for symmetric quantizers.

Learnable step sizes follow LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020): the
rounding is a straight-through estimator, so ``d fake_quant / d scale`` is ``round(x/s) - x/s`` inside
the range and ``q - zero`` at the clip points.
"""

from __future__ import annotations

import torch


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range: symmetric ``[-(2^(b-1)-1), 2^(b-1)-1]`` (zero exact, no lone -2^(b-1)),
    asymmetric ``[-2^(b-1), 2^(b-1)-1]`` (fits int8 containers for the integer kernels)."""
    if bits < 2 or bits > 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}.")
    high = 2 ** (bits - 1) - 1
    return (-high, high) if symmetric else (-(high + 1), high)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward. Bit-identical to ``x.round()`` (``r - x`` is exact)."""
    return (x.round() - x).detach() + x


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integers (int8 container) of ``x``; ``scale``/``zero`` broadcast against ``x``."""
    # In place after the division: same values as clamp(round(x / scale) + zero), fewer allocations.
    return (x / scale).round_().add_(zero).clamp_(qmin, qmax).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero) * scale


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in float, differentiable in ``x`` and ``scale`` (STE, LSQ gradient).

    Uses the same float operations as ``dequantize(quantize(...))`` so the two agree bit for bit.
    """
    q = torch.clamp(round_ste(x / scale) + zero, qmin, qmax)
    return (q - zero) * scale


def _range_qparams(
    lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point mapping ``[lo, hi]`` (which must contain 0) onto ``[qmin, qmax]``."""
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / qmax
        return scale.clamp_min(1e-8), torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
    zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero


def weight_qparams(
    weight: torch.Tensor, bits: int, symmetric: bool, search: bool = True, grid: int = 40
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel ``(scale, zero)``, each (N,), for a weight (N, K).

    With ``search`` the clipping range is shrunk per channel (ratios 1.0 down to 0.3 at 4 bits,
    0.6 at 8 bits) to minimise the squared quantization error, as QuEST/Q-Diffusion's MSE init does.
    """
    w = weight.detach().float()
    qmin, qmax = qrange(bits, symmetric)
    lo0, hi0 = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    best_scale, best_zero = _range_qparams(lo0, hi0, qmin, qmax, symmetric)
    if not search:
        return best_scale, best_zero
    best_err = torch.full_like(best_scale, float("inf"))
    low = 0.3 if bits <= 4 else 0.6
    for ratio in torch.linspace(1.0, low, grid).tolist():
        scale, zero = _range_qparams(lo0 * ratio, hi0 * ratio, qmin, qmax, symmetric)
        err = (fake_quant(w, scale[:, None], zero[:, None], qmin, qmax) - w).pow(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def act_qparams(
    lo: float,
    hi: float,
    samples: torch.Tensor | None,
    bits: int,
    symmetric: bool,
    method: str,
    percentile: float = 99.99,
    grid: int = 60,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static per-tensor ``(scale, zero)`` (0-d tensors) from a calibrated range.

    ``method``: ``"minmax"`` (the observed range), ``"percentile"`` (clip to the ``percentile`` /
    ``100 - percentile`` quantiles of the reservoir sample) or ``"mse"`` (shrink the range to minimise
    the quantization MSE on the reservoir sample, the best at 4 bits where outliers cost most).
    """
    qmin, qmax = qrange(bits, symmetric)
    lo_t, hi_t = torch.tensor(min(lo, 0.0)), torch.tensor(max(hi, 0.0))
    if method == "minmax" or samples is None or samples.numel() == 0:
        return _range_qparams(lo_t, hi_t, qmin, qmax, symmetric)
    s = samples.float()
    if method == "percentile":
        q = torch.quantile(s, torch.tensor([1 - percentile / 100, percentile / 100]))
        return _range_qparams(q[0].clamp(max=0), q[1].clamp(min=0), qmin, qmax, symmetric)
    best, best_err = _range_qparams(lo_t, hi_t, qmin, qmax, symmetric), float("inf")
    for ratio in torch.linspace(1.0, 0.05 if bits <= 4 else 0.2, grid).tolist():
        scale, zero = _range_qparams(lo_t * ratio, hi_t * ratio, qmin, qmax, symmetric)
        err = float((fake_quant(s, scale, zero, qmin, qmax) - s).pow(2).mean())
        if err < best_err:
            best, best_err = (scale, zero), err
    return best


def token_qparams(x: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token ``(scale, zero)``, each (M, 1), for activations (M, K)."""
    qmin, qmax = qrange(bits, symmetric)
    x = x.detach()
    return _range_qparams(
        x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0), qmin, qmax, symmetric
    )

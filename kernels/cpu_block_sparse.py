"""The CPU block-sparse attention kernels (``cpu_block_sparse.cpp``): built on first use, then cached.

Same contract as the Triton launcher: ``q, k, v`` (B, H, S, D), ``kv_counts`` / ``kv_indices`` in the
``BlockMask`` layout, block 64 or 128, any ``S`` (tail keys never enter the softmax); returns the output and
the per-row LSE. Also takes a key-padding mask (padded prompt tokens in joint text+video attention). Computes
in fp32, except that bf16 inputs run their GEMMs in bf16 (fp32 accumulation, softmax and output) on CPUs
with native bf16 dot products once MKL's bf16 GEMM has matched an fp32 product there
(:func:`bf16_gemm_problem`); other fp16/bf16 inputs are converted to fp32 and the output converted back.
:func:`block_sparse_attention_backward_cpu` is its backward (dQ, dK, dV from the saved output and LSE, no
key padding), for training.

The extension is built on first use for this machine's CPU (:mod:`accel.kernels.cpp_build`);
:func:`available` says whether it built, and why not (``unavailable_reason``), and callers fall back to the
PyTorch gather path."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from accel.kernels.cpp_build import CppExtension, bf16_dot_products
from accel.kernels.reference import check_backward_inputs, check_block_sparse_inputs

EXTENSION = CppExtension("cpu_block_sparse.cpp", "the CPU block-sparse kernel", "the gather path")


def load_kernel() -> Any:
    """The compiled module, building it on first call; ``None`` if the build fails."""
    return EXTENSION.load()


def available() -> bool:
    return EXTENSION.available()


def unavailable_reason() -> str | None:
    return EXTENSION.failure


# MKL's bf16 GEMM multiplies bf16 values exactly and sums in fp32: against an fp32 product of the same values
# it may differ only by summation order.
_PROBE_TOLERANCE = 1e-4


@lru_cache(maxsize=1)
def bf16_gemm_problem() -> str | None:
    """Why bf16 inputs are converted to fp32 on this machine, or ``None`` when the kernel runs them in bf16.
    Checked once per process: the CPU has native bf16 dot products and the GEMM calls the kernel makes give an
    fp32 product of the same values."""
    module = EXTENSION.load()
    if module is None:
        return f"the kernel did not build ({unavailable_reason()})"
    if not bf16_dot_products():  # elsewhere MKL's bf16 GEMM converts inside, no faster than converting first
        return "this CPU has no native bf16 dot products (avx512_bf16 or amx_bf16)"
    if not module.has_bf16_gemm():
        return "this torch build's BLAS has no bf16 GEMM"
    return _probe_bf16_gemm(module)


def _probe_bf16_gemm(module: Any) -> str | None:
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(*shape, generator=gen) for shape in ((64, 80), (72, 80), (64, 72)))
    a, b = a.bfloat16(), b.bfloat16()
    scores = module.bf16_gemm_probe(a, b)  # a b^T, as Q K^T
    a_, b_ = a[:, :72].contiguous(), b[:, :72].contiguous()
    product = module.bf16_gemm_probe(a_, b_, c)  # c + a b, as O += P V
    errors = [float((got - want).abs().max() / want.abs().max()) for got, want in (
        (scores, a.float() @ b.float().T), (product, c + a_.float() @ b_.float()))]
    if all(error <= _PROBE_TOLERANCE for error in errors):  # a NaN fails too
        return None
    worst = next((e for e in errors if e != e), max(errors))
    return f"MKL's bf16 GEMM was off by {worst:.1e} (relative) against fp32 on a probe"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernel's GEMMs read for inputs of ``dtype``."""
    return torch.bfloat16 if dtype == torch.bfloat16 and bf16_gemm_problem() is None else torch.float32


def block_sparse_attention_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_counts: torch.Tensor, kv_indices: torch.Tensor,
    block_size: int, scale: float | None = None, key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention on the CPU: ``(out (B, H, Sq, D) in q's dtype, lse (B, H, Sq) fp32)``.
    ``key_mask``: optional (B, Sk) bool, False for keys no query may attend. Rows that attend nothing (no
    listed block, or only masked keys) get output 0 and LSE -inf."""
    out, lse, _ = _run(q, k, v, kv_counts, kv_indices, block_size, scale, key_mask, with_block_sums=False)
    return out, lse


def attention_with_block_sums_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_counts: torch.Tensor, kv_indices: torch.Tensor,
    block_size: int, scale: float | None = None, key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`block_sparse_attention_cpu`, plus AdaSpa's block scores from the same score tiles:
    ``sums (B, H, Qb, Kb)`` fp32, per (query block, KV block) the summed softmax weight
    ``sum exp(q.k * scale - LSE_row)`` (0 for unlisted blocks). With every block listed this is the exact
    two-pass search (``block_sums_reference``) at the cost of one attention call, and the output is dense
    attention's."""
    return _run(q, k, v, kv_counts, kv_indices, block_size, scale, key_mask, with_block_sums=True)


def block_sparse_attention_backward_cpu(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, kv_counts: torch.Tensor, kv_indices: torch.Tensor, block_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` in the inputs' dtypes for :func:`block_sparse_attention_cpu`'s output ``out`` and
    ``lse`` over the same block lists (without a key mask)."""
    check_block_sparse_inputs(q, k, v, kv_counts, kv_indices, block_size)
    check_backward_inputs(grad_out, out, lse, q)
    module = _module_for(q)
    g32, q32, k32, v32, o32, l32 = (t.float().contiguous() for t in (grad_out, q, k, v, out, lse))
    dq, dk, dv = module.backward(g32, q32, k32, v32, o32, l32, kv_counts.contiguous(),
                                 kv_indices.contiguous(), int(block_size), float(scale))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _module_for(q: torch.Tensor) -> Any:
    """The built extension for CPU tensors ``q``; a clear error for other devices or a failed build."""
    if q.device.type != "cpu":
        raise ValueError(f"the CPU block-sparse kernel runs on CPU tensors, got {q.device}.")
    return EXTENSION.require()


def _work_order(counts: torch.Tensor) -> torch.Tensor:
    """The order the threads claim (b, h, query block) items from one counter: head by head, so both threads
    read the same head's K/V while it is in the last-level cache (random order over heads streams every head's
    K/V from DRAM, slower at 16K tokens), and within a head the longest KV lists first, so the threads
    finish a head together instead of one waiting on a long item."""
    flat = counts.reshape(-1).long()
    per_head = counts.shape[-1]
    head = torch.arange(flat.numel(), device=flat.device) // per_head
    return torch.argsort(head * (int(flat.max()) + 1 if flat.numel() else 1) - flat, stable=True)


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_counts: torch.Tensor, kv_indices: torch.Tensor,
         block_size: int, scale: float | None, key_mask: torch.Tensor | None, with_block_sums: bool,
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_block_sparse_inputs(q, k, v, kv_counts, kv_indices, block_size)
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (q.shape[0], k.shape[2])):
        raise ValueError(f"key_mask must be a (B, Sk) = {(q.shape[0], k.shape[2])} bool tensor, got "
                         f"{key_mask.dtype} {tuple(key_mask.shape)}.")
    module = _module_for(q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    counts = kv_counts.contiguous()  # int32, as checked above
    order = _work_order(counts)
    read = compute_dtype(q.dtype)
    qc, kc, vc = (t.to(read).contiguous() for t in (q, k, v))
    key_ok = torch.empty(0, dtype=torch.uint8) if key_mask is None else key_mask.to(torch.uint8).contiguous()
    out, lse, sums = module.forward(qc, kc, vc, counts, kv_indices.contiguous(), order,
                                    int(block_size), scale, with_block_sums, key_ok)
    return out.to(q.dtype), lse, sums

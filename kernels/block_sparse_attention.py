"""Triton block-sparse flash-attention forward and backward over per-query-block KV index lists.

Paper context: AdaSpa (arXiv:2502.21079) and VMoBA (arXiv:2506.23858) select KV blocks per query block;
this kernel computes attention over exactly those blocks (FlashAttention-2 online softmax, Triton
tutorial 06). Layouts (see ``accel.kernels.reference``):

- ``q, k, v``: (B, H, S, D) fp16/bf16/fp32, any strides; accumulation in fp32.
- ``kv_counts`` (B, H, Qb) int32 and ``kv_indices`` (B, H, Qb, n) int32: FlexAttention ``BlockMask``
  ``kv_num_blocks`` / ``kv_indices``.
- returns ``out`` (B, H, Sq, D) in q's dtype and ``lse`` (B, H, Sq) fp32, natural log (-inf, and out 0,
  for rows that attend nothing).

Blocks of 64 or 128 tokens; any sequence length (tail rows and keys are masked, padded keys never enter
the softmax); head dims 16..256 (non powers of two such as 72, 80, 96 are padded to the next power of
two inside the kernel, with masked loads).

The backward (:func:`block_sparse_attention_backward`, FlashAttention-2's two-kernel form) recomputes the
probabilities from the forward's LSE: one kernel per KV block accumulates dK/dV over the query blocks that
list it (the transposed lists, :func:`query_lists`, built once per call), one per query block accumulates
dQ over its own list. Neither reads an unlisted block.

Importing this module imports triton; ``accel`` itself never does (the attention backends import it
only on CUDA).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from accel.kernels.reference import (
    block_sparse_attention_reference,
    check_backward_inputs,
    check_block_sparse_inputs,
    dense_block_table,
)

__all__ = ["block_sparse_attention", "block_sparse_attention_backward", "block_sparse_attention_reference",
           "query_lists"]

_LOG2E = 1.4426950408889634  # exp(x) == exp2(x * log2(e)): exp2 is the fast instruction
_LN2 = 0.6931471805599453


@triton.jit
def _scores_tile(
    q, k_base, kv_block, cols, dims, dim_ok, SEQ_K, stride_ks, stride_kd, qk_scale,
    BLOCK: tl.constexpr, UPCAST: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """Scaled scores (log2 domain) of ``q`` (BLOCK, D_PAD) against key block ``kv_block``, with keys past
    ``SEQ_K`` at -inf so they never enter a softmax. Returns ``(qk, k (D_PAD, BLOCK), keys, key_ok)``; shared
    by the forward, the search and the dQ kernels."""
    keys = kv_block * BLOCK + cols
    key_ok = keys < SEQ_K
    k = tl.load(k_base + keys[None, :] * stride_ks + dims[:, None] * stride_kd,
                mask=key_ok[None, :] & dim_ok[:, None], other=0.0)  # (D_PAD, BLOCK)
    if UPCAST:  # the interpreter's bf16/fp16 tl.dot is silently wrong: compute in fp32 there
        k = k.to(tl.float32)
    if FP32_DOT:
        qk = tl.dot(q, k, input_precision="ieee")
    else:
        qk = tl.dot(q, k)
    qk = tl.where(key_ok[None, :], qk * qk_scale, float("-inf"))
    return qk, k, keys, key_ok


@triton.jit
def _load_tile(base, rows, dims, row_ok, dim_ok, stride_s, stride_d, UPCAST: tl.constexpr):
    """A (rows, D_PAD) tile of one head, zeros outside ``row_ok`` x ``dim_ok``; fp32 under the interpreter,
    whose bf16/fp16 tl.dot is silently wrong."""
    tile = tl.load(base + rows[:, None] * stride_s + dims[None, :] * stride_d,
                   mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _block_sparse_fwd(
    Q, K, V, Out, Lse, Counts, Indices,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    stride_cb, stride_ch, stride_cq,
    stride_ib, stride_ih, stride_iq, stride_in,
    H, SEQ_Q, SEQ_K, HEAD_DIM, qk_scale,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, UPCAST: tl.constexpr, FP32_DOT: tl.constexpr,
):
    tl.static_assert(BLOCK == 64 or BLOCK == 128)
    tl.static_assert(D_PAD >= 16)
    qblock = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H

    rows = qblock * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    dims = tl.arange(0, D_PAD)
    row_ok = rows < SEQ_Q
    dim_ok = dims < HEAD_DIM

    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, dims, row_ok, dim_ok,
                   stride_qs, stride_qd, UPCAST)

    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, D_PAD], dtype=tl.float32)

    count = tl.load(Counts + b * stride_cb + h * stride_ch + qblock * stride_cq)
    idx_base = Indices + b * stride_ib + h * stride_ih + qblock * stride_iq
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for i in range(count):
        kv_block = tl.load(idx_base + i * stride_in)
        qk, _, keys, key_ok = _scores_tile(q, k_base, kv_block, cols, dims, dim_ok, SEQ_K, stride_ks,
                                           stride_kd, qk_scale, BLOCK, UPCAST, FP32_DOT)
        v = tl.load(v_base + keys[:, None] * stride_vs + dims[None, :] * stride_vd,
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0)  # (BLOCK, D_PAD)
        if UPCAST:
            v = v.to(tl.float32)
        # A listed block always holds at least one valid key, so m_new is finite after it.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if FP32_DOT:
            acc += tl.dot(p, v, input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    o_ptrs = Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + dims[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(Lse + b * stride_lb + h * stride_lh + rows * stride_ls, lse, mask=row_ok)


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _check_device(q: torch.Tensor) -> None:
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"The Triton kernel runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got {q.device}. "
            "Use accel.attention.sparse_attention(...), which picks a CPU backend."
        )


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_counts: torch.Tensor, kv_indices: torch.Tensor,
    block_size: int, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query block over its listed KV blocks: ``(out (B, H, Sq, D), lse (B, H, Sq))``.

    Example::

        counts, idx = mask.kv_counts, mask.kv_indices       # (B, H, Qb), (B, H, Qb, n) int32
        out, lse = block_sparse_attention(q, k, v, counts, idx, block_size=64)
    """
    check_block_sparse_inputs(q, k, v, kv_counts, kv_indices, block_size, head_dims=(16, 256))
    _check_device(q)
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, Sq, device=q.device, dtype=torch.float32)
    d_pad = max(16, triton.next_power_of_2(D))
    upcast = interpreting()
    grid = (triton.cdiv(Sq, block_size), B * H)
    num_warps = 4 if block_size == 64 else 8
    _block_sparse_fwd[grid](
        q, k, v, out, lse, kv_counts, kv_indices,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        *kv_counts.stride(), *kv_indices.stride(),
        H, Sq, Sk, D, scale * _LOG2E,
        BLOCK=block_size, D_PAD=d_pad, UPCAST=upcast, FP32_DOT=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=2,
    )
    return out, lse


@triton.jit
def _block_sparse_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV, QCounts, QIndices,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_lb, stride_lh, stride_ls,
    stride_cb, stride_ch, stride_ck,
    stride_ib, stride_ih, stride_ik, stride_in,
    H, SEQ_Q, SEQ_K, HEAD_DIM, qk_scale, scale,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, UPCAST: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """dK, dV of one KV block over the query blocks that list it. ``DK``/``DV`` strides equal ``K``'s
    (they are allocated contiguous like it); ``DO``'s are ``stride_g*``; ``Lse``/``Delta`` share strides."""
    kblock = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    keys = kblock * BLOCK + tl.arange(0, BLOCK)
    rows0 = tl.arange(0, BLOCK)
    dims = tl.arange(0, D_PAD)
    key_ok = keys < SEQ_K
    dim_ok = dims < HEAD_DIM
    kv_mask = key_ok[:, None] & dim_ok[None, :]
    k = _load_tile(K + b * stride_kb + h * stride_kh, keys, dims, key_ok, dim_ok,
                   stride_ks, stride_kd, UPCAST)
    v = _load_tile(V + b * stride_vb + h * stride_vh, keys, dims, key_ok, dim_ok,
                   stride_vs, stride_vd, UPCAST)
    dk = tl.zeros([BLOCK, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK, D_PAD], dtype=tl.float32)
    count = tl.load(QCounts + b * stride_cb + h * stride_ch + kblock * stride_ck)
    idx_base = QIndices + b * stride_ib + h * stride_ih + kblock * stride_ik
    for i in range(count):
        qblock = tl.load(idx_base + i * stride_in)
        rows = qblock * BLOCK + rows0
        row_ok = rows < SEQ_Q
        q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, dims, row_ok, dim_ok, stride_qs, stride_qd,
                       UPCAST)
        do = _load_tile(DO + b * stride_gb + h * stride_gh, rows, dims, row_ok, dim_ok, stride_gs, stride_gd,
                        UPCAST)
        lse = tl.load(Lse + b * stride_lb + h * stride_lh + rows * stride_ls, mask=row_ok, other=0.0)
        delta = tl.load(Delta + b * stride_lb + h * stride_lh + rows * stride_ls, mask=row_ok, other=0.0)
        if FP32_DOT:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(key_ok[None, :], qk * qk_scale, float("-inf"))
        p = tl.math.exp2(qk - lse[:, None] * 1.4426950408889634)
        p = tl.where(row_ok[:, None], p, 0.0)  # rows past SEQ_Q must add nothing
        if FP32_DOT:
            dv += tl.dot(tl.trans(p), do, input_precision="ieee")
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        if FP32_DOT:
            dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
        else:
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    dk = dk * scale
    out_k = DK + b * stride_kb + h * stride_kh + keys[:, None] * stride_ks + dims[None, :] * stride_kd
    tl.store(out_k, dk.to(DK.dtype.element_ty), mask=kv_mask)
    out_v = DV + b * stride_kb + h * stride_kh + keys[:, None] * stride_ks + dims[None, :] * stride_kd
    tl.store(out_v, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _block_sparse_bwd_dq(
    Q, K, V, DO, Lse, Delta, DQ, Counts, Indices,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_lb, stride_lh, stride_ls,
    stride_cb, stride_ch, stride_cq,
    stride_ib, stride_ih, stride_iq, stride_in,
    H, SEQ_Q, SEQ_K, HEAD_DIM, qk_scale, scale,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, UPCAST: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """dQ of one query block over its listed KV blocks. ``DQ``'s strides equal ``Q``'s."""
    qblock = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = qblock * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    dims = tl.arange(0, D_PAD)
    row_ok = rows < SEQ_Q
    dim_ok = dims < HEAD_DIM
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, dims, row_ok, dim_ok,
                   stride_qs, stride_qd, UPCAST)
    do = _load_tile(DO + b * stride_gb + h * stride_gh, rows, dims, row_ok, dim_ok,
                    stride_gs, stride_gd, UPCAST)
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + rows * stride_ls, mask=row_ok, other=0.0)
    delta = tl.load(Delta + b * stride_lb + h * stride_lh + rows * stride_ls, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK, D_PAD], dtype=tl.float32)
    count = tl.load(Counts + b * stride_cb + h * stride_ch + qblock * stride_cq)
    idx_base = Indices + b * stride_ib + h * stride_ih + qblock * stride_iq
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for i in range(count):
        kv_block = tl.load(idx_base + i * stride_in)
        qk, k_t, keys, key_ok = _scores_tile(q, k_base, kv_block, cols, dims, dim_ok, SEQ_K, stride_ks,
                                             stride_kd, qk_scale, BLOCK, UPCAST, FP32_DOT)
        v_t = tl.load(v_base + keys[None, :] * stride_vs + dims[:, None] * stride_vd,
                      mask=key_ok[None, :] & dim_ok[:, None], other=0.0)  # (D_PAD, BLOCK)
        if UPCAST:
            v_t = v_t.to(tl.float32)
        p = tl.math.exp2(qk - lse[:, None] * 1.4426950408889634)
        if FP32_DOT:
            dp = tl.dot(do, v_t, input_precision="ieee")
        else:
            dp = tl.dot(do, v_t)
        ds = p * (dp - delta[:, None])
        if FP32_DOT:
            dq += tl.dot(ds, tl.trans(k_t), input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t))
    dq = dq * scale
    out = DQ + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + dims[None, :] * stride_qd
    tl.store(out, dq.to(DQ.dtype.element_ty), mask=q_mask)


def query_lists(kv_counts: torch.Tensor, kv_indices: torch.Tensor, num_kv_blocks: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The transposed lists: per KV block, the query blocks that list it, ``(q_counts (B, H, Kb) int32,
    q_indices (B, H, Kb, Qb) int32)`` (listed first, in ascending order)."""
    table = dense_block_table(kv_counts, kv_indices, num_kv_blocks).transpose(-1, -2)  # (B, H, Kb, Qb)
    counts = table.sum(-1, dtype=torch.int32)
    indices = torch.argsort(table.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.contiguous(), indices.contiguous()


def block_sparse_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, kv_counts: torch.Tensor, kv_indices: torch.Tensor, block_size: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`block_sparse_attention` given its ``out`` and ``lse`` and the output's
    gradient ``grad_out``, over the same lists. Rows that attend nothing get dQ 0; keys no query lists get
    dK = dV = 0."""
    check_block_sparse_inputs(q, k, v, kv_counts, kv_indices, block_size, head_dims=(16, 256))
    _check_device(q)
    check_backward_inputs(grad_out, out, lse, q)
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    kb = triton.cdiv(Sk, block_size)
    lse = lse.float().contiguous()
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # rowsum(dO ∘ O), (B, H, Sq)
    q_counts, q_indices = query_lists(kv_counts, kv_indices, kb)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(k)
    d_pad = max(16, triton.next_power_of_2(D))
    meta = dict(BLOCK=block_size, D_PAD=d_pad, UPCAST=interpreting(), FP32_DOT=q.dtype == torch.float32,
                num_warps=4 if block_size == 64 else 8, num_stages=2)
    common = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride())
    _block_sparse_bwd_dkdv[(kb, B * H)](
        q, k, v, grad_out, lse, delta, dk, dv, q_counts, q_indices, *common,
        *q_counts.stride(), *q_indices.stride(), H, Sq, Sk, D, scale * _LOG2E, scale, **meta,
    )
    _block_sparse_bwd_dq[(triton.cdiv(Sq, block_size), B * H)](
        q, k, v, grad_out, lse, delta, dq, kv_counts, kv_indices, *common,
        *kv_counts.stride(), *kv_indices.stride(), H, Sq, Sk, D, scale * _LOG2E, scale, **meta,
    )
    return dq, dk, dv

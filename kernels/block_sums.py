"""AdaSpa's search kernel: per-block sums of softmax weights, two-pass or one-pass with a cached LSE.

Paper: Xia et al., "Training-free and Adaptive Sparse Attention for Efficient Long Video Generation"
(AdaSpa, arXiv:2502.21079), "Fused LSE-Cached Search". For every (query block, KV block) the kernel
sums ``exp(q.k * scale - LSE_row)`` over the block's valid rows and keys: the exact attention mass the
block carries. Two-pass: a first sweep over all KV blocks computes each row's LSE (online max/sum),
the second sums the weights. One-pass: the LSE cached at an earlier search is reused (the paper's
observation: LSE barely changes across denoising steps).

Layouts: ``q, k`` (B, H, S, D) fp16/bf16/fp32; ``lse`` (B, H, Sq) fp32 natural log (the vendored
reference keeps base 2; we convert at the boundary). Returns ``sums`` (B, H, Qb, Kb) fp32 and ``lse``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from accel.kernels.block_sparse_attention import _load_tile, _scores_tile, interpreting
from accel.kernels.reference import block_sums_reference

__all__ = ["block_sums", "block_sums_reference"]

_LOG2E = 1.4426950408889634


@triton.jit
def _block_sums_kernel(
    Q, K, Lse, Sums,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_lb, stride_lh, stride_ls,
    stride_sb, stride_sh, stride_sq, stride_sk,
    H, SEQ_Q, SEQ_K, HEAD_DIM, NUM_KV_BLOCKS, qk_scale,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, COMPUTE_LSE: tl.constexpr, UPCAST: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    tl.static_assert(BLOCK == 64 or BLOCK == 128)
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
    k_base = K + b * stride_kb + h * stride_kh
    lse_ptrs = Lse + b * stride_lb + h * stride_lh + rows * stride_ls

    if COMPUTE_LSE:
        m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(NUM_KV_BLOCKS):
            qk, _, keys, key_ok = _scores_tile(q, k_base, j, cols, dims, dim_ok, SEQ_K, stride_ks,
                                               stride_kd, qk_scale, BLOCK, UPCAST, FP32_DOT)
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(qk - m_new[:, None]), 1)
            m_i = m_new
        lse2 = m_i + tl.math.log2(l_i)
        tl.store(lse_ptrs, lse2 * 0.6931471805599453, mask=row_ok)
    else:
        lse2 = tl.load(lse_ptrs, mask=row_ok, other=0.0) * 1.4426950408889634

    sums_base = Sums + b * stride_sb + h * stride_sh + qblock * stride_sq
    for j in range(NUM_KV_BLOCKS):
        qk, _, keys, key_ok = _scores_tile(q, k_base, j, cols, dims, dim_ok, SEQ_K, stride_ks, stride_kd,
                                           qk_scale, BLOCK, UPCAST, FP32_DOT)
        p = tl.math.exp2(qk - lse2[:, None])
        p = tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0)
        tl.store(sums_base + j * stride_sk, tl.sum(tl.sum(p, 1), 0))


def block_sums(
    q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float | None = None, lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums (B, H, Qb, Kb) fp32, lse (B, H, Sq) fp32)``; pass ``lse`` to skip the LSE sweep (one-pass).

    Example::

        sums, lse = block_sums(q, k, 64)            # step-10 search: two passes, LSE cached
        sums, _ = block_sums(q2, k2, 64, lse=lse)   # step-30 search: one pass
    """
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4 or t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name} must be a (B, H, S, D) fp16/bf16/fp32 tensor, got {tuple(t.shape)} {t.dtype}.")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1] or q.dtype != k.dtype:
        raise ValueError(f"q and k must share batch, heads, head dim and dtype; got {tuple(q.shape)} {q.dtype} "
                         f"and {tuple(k.shape)} {k.dtype}.")
    if block_size not in (64, 128):
        raise ValueError(f"block_size must be 64 or 128, got {block_size}.")
    B, H, Sq, D = q.shape
    if not 16 <= D <= 256:
        raise ValueError(f"head dim must be in [16, 256], got {D}.")
    if lse is not None and (tuple(lse.shape) != (B, H, Sq) or lse.dtype != torch.float32):
        raise ValueError(f"lse must be a (B, H, Sq) = {(B, H, Sq)} float32 tensor, got {tuple(lse.shape)} {lse.dtype}.")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"The Triton kernel runs on CUDA (or under TRITON_INTERPRET=1), got {q.device}; "
                         "use accel.kernels.block_sums_reference on CPU.")
    Sk = k.shape[2]
    qb, kb = triton.cdiv(Sq, block_size), triton.cdiv(Sk, block_size)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    sums = torch.empty(B, H, qb, kb, device=q.device, dtype=torch.float32)
    compute = lse is None
    lse_buf = torch.empty(B, H, Sq, device=q.device, dtype=torch.float32) if compute else lse
    _block_sums_kernel[(qb, B * H)](
        q, k, lse_buf, sums, *q.stride(), *k.stride(), *lse_buf.stride(), *sums.stride(),
        H, Sq, Sk, D, kb, scale * _LOG2E,
        BLOCK=block_size, D_PAD=max(16, triton.next_power_of_2(D)), COMPUTE_LSE=compute,
        UPCAST=interpreting(), FP32_DOT=q.dtype == torch.float32,
        num_warps=4 if block_size == 64 else 8, num_stages=2,
    )
    return sums, lse_buf

"""AdaSpa's block scores off the GPU: summed softmax weight per (query block, KV block), chunked.

Same result as ``accel.kernels.block_sums`` (the Triton kernel, used on CUDA) without materialising the
(S, S) score matrix: query blocks are processed a chunk at a time. On the CPU, :func:`attention_and_block_sums`
takes the scores from the C++ attention kernel's own tiles instead, so a search step costs one attention call.
"""

from __future__ import annotations

import math

import torch

# Scores per chunk (fp32: 4 MiB): small enough to stay in cache between the matmul and the exp / block
# reductions; 128 MiB chunks took 2x as long on digits-video-dit's 4,096 tokens (2 threads).
_CHUNK_ELEMENTS = 1 << 20


def attention_and_block_sums(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, scale: float,
                             key_mask: torch.Tensor | None, backend: str,
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Dense attention and the exact block scores in one pass of the C++ CPU kernel:
    ``(out (B, H, Sq, D), sums (B, H, Qb, Kb), lse (B, H, Sq))``, or ``None`` where that kernel does not
    apply (not CPU, another backend asked for, or it did not build). ``key_mask``: (B, Sk) bool or None."""
    from accel.attention.backends import choose_backend

    if q.device.type != "cpu" or backend not in ("auto", "cpp"):
        return None
    if choose_backend(backend, q.device, q.shape[2]) != "cpp":
        return None
    from accel.attention.format import BlockSparseMask
    from accel.kernels.cpu_block_sparse import attention_with_block_sums_cpu

    full = BlockSparseMask.full(q.shape[0], q.shape[1], block_size, q.shape[2], k.shape[2], device=q.device)
    out, lse, sums = attention_with_block_sums_cpu(q, k, v, full.kv_counts, full.kv_indices, block_size, scale,
                                                   key_mask)
    return out, sums, lse


def block_sums(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float, lse: torch.Tensor | None = None,
               key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums (B, H, Qb, Kb) fp32, lse (B, H, Sq) fp32)``; a given ``lse`` is reused (one pass).

    ``key_mask``: optional (B, Sk) bool; masked keys carry no weight.
    """
    if q.device.type == "cuda" and key_mask is None and block_size in (64, 128) and 16 <= q.shape[-1] <= 256:
        from accel.kernels.block_sums import block_sums as triton_block_sums

        return triton_block_sums(q, k, block_size, scale, lse)
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    qb, kb = math.ceil(Sq / block_size), math.ceil(Sk / block_size)
    sums = torch.zeros(B, H, qb, kb, dtype=torch.float32, device=q.device)
    lse_out = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    rows_per_chunk = max(block_size, (_CHUNK_ELEMENTS // max(1, B * H * Sk)) // block_size * block_size)
    kt = k.float().transpose(-1, -2)
    bias = None
    if key_mask is not None:
        bias = torch.zeros(B, 1, 1, Sk, device=q.device).masked_fill(~key_mask[:, None, None, :], float("-inf"))
    for start in range(0, Sq, rows_per_chunk):
        stop = min(Sq, start + rows_per_chunk)
        c, cb = stop - start, math.ceil((stop - start) / block_size)
        # Few full passes over the (c, Sk) scores: they dominate the cost (4x faster than logsumexp + exp + pad).
        scores = torch.matmul(q[:, :, start:stop].float() * scale, kt)  # (B, H, c, Sk)
        if bias is not None:
            scores += bias
        if lse is None:
            shift = scores.amax(-1, keepdim=True)
            shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))  # rows with no key
        else:
            shift = lse[:, :, start:stop].float().unsqueeze(-1)
        scores.sub_(shift).exp_()
        if c != cb * block_size or Sk != kb * block_size:
            scores = torch.nn.functional.pad(scores, (0, kb * block_size - Sk, 0, cb * block_size - c))
        per_row = scores.view(B, H, cb, block_size, kb, block_size).sum(5)  # (B, H, cb, bs, Kb)
        if lse is None:  # normalise per row after the key-block reduction: a pass over Kb, not Sk
            total = per_row.sum(-1, keepdim=True)
            lse_out[:, :, start:stop] = (shift.squeeze(-1) + total.reshape(B, H, -1)[:, :, :c].log())
            per_row = per_row / total.clamp_min(1e-30)
        else:
            lse_out[:, :, start:stop] = shift.squeeze(-1)
        sums[:, :, start // block_size:start // block_size + cb] = per_row.sum(3)
    return sums, lse_out

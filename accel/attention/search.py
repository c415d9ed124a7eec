"""AdaSpa's block scores off the GPU: summed softmax weight per (query block, KV block), chunked.

Same result as ``accel.kernels.block_sums`` (the Triton kernel, used on CUDA) without materialising the
(S, S) score matrix: query blocks are processed a chunk at a time.
"""

from __future__ import annotations

import math

import torch

_CHUNK_ELEMENTS = 1 << 25  # scores per chunk (fp32: 128 MiB)


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
    kf = k.float()
    bias = None
    if key_mask is not None:
        bias = torch.zeros(B, 1, 1, Sk, device=q.device).masked_fill(~key_mask[:, None, None, :], float("-inf"))
    for start in range(0, Sq, rows_per_chunk):
        stop = min(Sq, start + rows_per_chunk)
        scores = torch.matmul(q[:, :, start:stop].float(), kf.transpose(-1, -2)) * scale  # (B, H, c, Sk)
        if bias is not None:
            scores = scores + bias
        row_lse = torch.logsumexp(scores, -1) if lse is None else lse[:, :, start:stop].float()
        lse_out[:, :, start:stop] = row_lse
        probs = torch.exp(scores - row_lse.unsqueeze(-1))
        c = stop - start
        cb = math.ceil(c / block_size)
        probs = torch.nn.functional.pad(probs, (0, kb * block_size - Sk, 0, cb * block_size - c))
        sums[:, :, start // block_size:start // block_size + cb] = probs.reshape(
            B, H, cb, block_size, kb, block_size).sum(dim=(3, 5))
    return sums, lse_out

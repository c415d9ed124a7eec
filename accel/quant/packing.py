"""4-bit weights stored two per byte, so a W4 model really takes half the bytes of a W8 one.

Layout: row-major (N, ceil(K/2)) uint8; element ``2j`` in the low nibble, ``2j+1`` in the high nibble,
each stored as ``q + 8`` (so the signed range [-8, 7] maps onto [0, 15]).
"""

from __future__ import annotations

import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 in [-8, 7] -> (N, ceil(K/2)) uint8."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"pack_int4 takes a 2-D int8 tensor, got {q.dim()}-D {q.dtype}.")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"pack_int4 values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}].")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[1] % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: (N, ceil(K/2)) uint8 -> (N, K) int8."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)[:, :k]

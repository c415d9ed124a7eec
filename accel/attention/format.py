"""The one block-sparse format every selection method produces and every backend consumes.

Per (batch, head, query block): a padded list of KV block indices plus a count, exactly FlexAttention's
``BlockMask`` ``kv_num_blocks`` / ``kv_indices`` (and FastVideo's q2k index). A dense bool block table
converts to it with a stable descending argsort, so the selected indices come first, in ascending order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from accel.kernels.reference import dense_block_table


@dataclass(frozen=True)
class BlockSparseMask:
    """Which KV blocks each query block attends.

    Attributes:
        kv_counts: (B, H, Qb) int32, blocks attended by each query block.
        kv_indices: (B, H, Qb, Kb) int32, the attended block indices first (ascending), then padding.
        block_size: tokens per block (queries and keys alike).
        q_len: query tokens (``Qb = ceil(q_len / block_size)``).
        kv_len: key tokens (``Kb = ceil(kv_len / block_size)``); tail keys are masked by every backend.
    """

    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    block_size: int
    q_len: int
    kv_len: int

    @property
    def num_q_blocks(self) -> int:
        return math.ceil(self.q_len / self.block_size)

    @property
    def num_kv_blocks(self) -> int:
        return math.ceil(self.kv_len / self.block_size)

    @classmethod
    def from_dense(cls, table: torch.Tensor, block_size: int, q_len: int, kv_len: int) -> BlockSparseMask:
        """From a (B, H, Qb, Kb) bool block table (stable descending argsort keeps the index order)."""
        qb, kb = math.ceil(q_len / block_size), math.ceil(kv_len / block_size)
        if table.dim() != 4 or tuple(table.shape[-2:]) != (qb, kb):
            raise ValueError(f"A block table for {q_len}x{kv_len} tokens in blocks of {block_size} must be "
                             f"(B, H, {qb}, {kb}), got {tuple(table.shape)}.")
        table = table.bool()
        counts = table.sum(-1, dtype=torch.int32)
        indices = torch.argsort(table.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return cls(counts.contiguous(), indices.contiguous(), block_size, q_len, kv_len)

    @classmethod
    def full(cls, batch: int, heads: int, block_size: int, q_len: int, kv_len: int,
             device: torch.device | str = "cpu") -> BlockSparseMask:
        """Every query block attends every KV block (dense attention in this format)."""
        qb, kb = math.ceil(q_len / block_size), math.ceil(kv_len / block_size)
        return cls.from_dense(torch.ones(batch, heads, qb, kb, dtype=torch.bool, device=device),
                              block_size, q_len, kv_len)

    def to_dense(self) -> torch.Tensor:
        """(B, H, Qb, Kb) bool block table."""
        return dense_block_table(self.kv_counts, self.kv_indices, self.num_kv_blocks)

    def density(self) -> float:
        """Attended fraction of the (query token, key token) pairs: tail blocks weigh by their valid size,
        so this is the fraction of dense attention's work the mask leaves."""
        rows = _block_sizes(self.q_len, self.block_size, self.kv_counts.device)  # (Qb,)
        cols = _block_sizes(self.kv_len, self.block_size, self.kv_counts.device)  # (Kb,)
        table = self.to_dense().float()
        kept = torch.einsum("bhqk,q,k->", table, rows, cols)
        total = table.shape[0] * table.shape[1] * self.q_len * self.kv_len
        return float(kept) / total if total else 1.0

    def block_density(self) -> float:
        """Attended fraction of the (query block, KV block) pairs."""
        total = self.kv_counts.numel() * self.num_kv_blocks
        return float(self.kv_counts.sum()) / total if total else 1.0

    def to(self, device: torch.device | str) -> BlockSparseMask:
        return BlockSparseMask(self.kv_counts.to(device), self.kv_indices.to(device), self.block_size,
                               self.q_len, self.kv_len)

    def to_flex(self, key_mask: torch.Tensor | None = None) -> Any:
        """A FlexAttention ``BlockMask`` from the same index lists, with a ``mask_mod`` reading the same
        block table (eager flex applies only ``mask_mod``; tail keys are masked there too)."""
        from torch.nn.attention.flex_attention import BlockMask

        mask_mod = table_mask_mod(self.to_dense(), self.block_size, self.kv_len, key_mask)
        return BlockMask.from_kv_blocks(self.kv_counts, self.kv_indices, BLOCK_SIZE=self.block_size,
                                        mask_mod=mask_mod, seq_lengths=(self.q_len, self.kv_len))


def table_mask_mod(table: torch.Tensor, block_size: int, kv_len: int, key_mask: torch.Tensor | None = None) -> Any:
    """A FlexAttention ``mask_mod`` reading a (B, H, Qb, Kb) block table (and an optional (B, Sk) key mask)."""
    if key_mask is None:
        def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return table[b, h, q_idx // block_size, kv_idx // block_size] & (kv_idx < kv_len)
    else:
        def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            inside = table[b, h, q_idx // block_size, kv_idx // block_size] & (kv_idx < kv_len)
            return inside & key_mask[b, kv_idx]
    return mask_mod


def _block_sizes(length: int, block_size: int, device: torch.device) -> torch.Tensor:
    n = math.ceil(length / block_size)
    sizes = torch.full((n,), float(block_size), device=device)
    if n:
        sizes[-1] = length - (n - 1) * block_size
    return sizes


def rows_by_count(kv_counts: torch.Tensor, kv_indices: torch.Tensor, num_kv_blocks: int,
                  rows_per_chunk: Callable[[int], int]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The query blocks grouped by how many KV blocks they list, for backends that attend a group at once
    with no padded slots: per count ``c > 0`` and chunk of at most ``rows_per_chunk(c)`` rows,
    ``(c, rows, kv_rows)``: ``rows`` index the (B*H*Qb) query blocks, ``kv_rows`` (rows, c) the (B*H*Kb) KV
    blocks of the same head. Rows that list nothing are not yielded."""
    qb = kv_counts.shape[-1]
    counts = kv_counts.reshape(-1).long()
    offsets = torch.arange(counts.numel(), device=counts.device) // qb * num_kv_blocks
    indices = kv_indices.reshape(counts.numel(), -1).long() + offsets[:, None]
    for count in counts.unique().tolist():
        if count == 0:
            continue
        rows = (counts == count).nonzero().squeeze(1)
        step = max(1, rows_per_chunk(count))
        for start in range(0, rows.numel(), step):
            part = rows[start:start + step]
            yield count, part, indices.index_select(0, part)[:, :count]

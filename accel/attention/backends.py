"""Block-sparse attention backends over one :class:`BlockSparseMask`, and the dispatch between them.

- ``triton``: the Triton kernel (CUDA).
- ``cpp``: the C++ CPU kernel (``accel.kernels.cpu_block_sparse``, built on first use): each query block
  walks its KV list in place with MKL GEMMs on whole blocks and a vectorised online softmax; takes key
  padding; the fastest CPU path (RESULTS.md, "Sparse attention").
- ``flex``: ``torch.compile(flex_attention)`` with a ``BlockMask`` from the same index lists and a
  ``mask_mod`` reading the same table (CPU, torch >= 2.5; inductor's C++ kernel skips unlisted blocks).
- ``gather``: PyTorch block gather: each query block's listed K/V blocks are gathered and attended with
  dense SDPA, in chunks of query blocks to bound memory. Runs anywhere; no compile. When blocks are whole
  and no key is padded, query blocks with equal counts share one *unmasked* SDPA call, which takes the
  fused CPU kernel, over cache-sized gathers into reused buffers; faster than compiled flex on CPU.
- ``reference``: dense masked attention in fp32 (tests, tiny inputs).

``auto`` picks triton on CUDA (gather where keys are padded: the Triton kernel has no key-padding input); on
CPU cpp when it builds, else gather when the sequence is whole blocks, else flex for sequences long enough to
repay its compile (``FLEX_MIN_TOKENS``), else gather (the masked variant). A backend that fails falls back to
gather with one warning.
"""

from __future__ import annotations

import enum
import logging
import math
import warnings
from typing import Any

import torch

from accel.attention.format import BlockSparseMask, rows_by_count
from accel.kernels.reference import block_sparse_attention_reference

logger = logging.getLogger(__name__)

class AttentionBackend(str, enum.Enum):
    """Where block-sparse attention runs: ``auto`` = Triton on CUDA; on CPU the C++ kernel, else
    compiled FlexAttention or block gather."""

    AUTO = "auto"
    TRITON = "triton"
    CPP = "cpp"
    FLEX = "flex"
    GATHER = "gather"
    REFERENCE = "reference"


BACKENDS: tuple[str, ...] = tuple(b.value for b in AttentionBackend)
FLEX_MIN_TOKENS = 2048
_GATHER_CHUNK_ELEMENTS = 1 << 25  # score elements per masked gather chunk (fp32: 128 MiB)
# Gathered K+V bytes per unmasked SDPA call: small enough that the copy is still in cache when SDPA reads
# it (much larger chunks spill the last-level cache and run at half the speed); much smaller ones pay
# SDPA's per-call overhead instead.
_GATHER_CHUNK_BYTES = 4 << 20
_compiled_flex: Any = None
_flex_failed: set[str] = set()


def flex_available() -> bool:
    """FlexAttention with ``BlockMask.from_kv_blocks`` exists (torch >= 2.5)."""
    try:
        major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    except ValueError:
        return False
    if (major, minor) < (2, 5):
        return False
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(requested: str, device: torch.device, seq_len: int, whole_blocks: bool = False) -> str:
    """The backend ``requested`` resolves to on ``device`` for a sequence of ``seq_len`` tokens
    (``whole_blocks``: every block full and no key padding, where the unmasked gather path applies)."""
    if requested not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {requested!r}.")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "triton"
    if cpu_kernel_available():
        return "cpp"
    if whole_blocks:
        return "gather"
    if seq_len >= FLEX_MIN_TOKENS and flex_available() and "cpu" not in _flex_failed:
        return "flex"
    return "gather"


def cpu_kernel_available() -> bool:
    """The C++ CPU kernel built (or was already built) on this machine."""
    from accel.kernels.cpu_block_sparse import available

    return available()


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, *, scale: float | None = None,
    key_mask: torch.Tensor | None = None, backend: str = "auto",
) -> tuple[torch.Tensor, str]:
    """Block-sparse attention of ``q, k, v`` (B, H, S, D) under ``mask``: ``(out (B, H, Sq, D), backend used)``.

    ``key_mask``: optional (B, Sk) bool, False for keys nobody may attend (padded prompt tokens).
    Rows that attend nothing get output 0.
    """
    bs = mask.block_size
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        if key_mask is None:  # training: the operator with a backward over the same block lists
            from accel.attention.trainable import block_sparse_attention_trainable

            return block_sparse_attention_trainable(q, k, v, mask, scale), "trainable"
        return gather_attention(q, k, v, mask, scale, key_mask, differentiable=True), "gather"
    whole = key_mask is None and q.shape[2] % bs == 0 and k.shape[2] % bs == 0
    name = choose_backend(backend, q.device, q.shape[2], whole_blocks=whole)
    if name == "triton" and key_mask is not None:
        name = "gather"  # the kernel has no key-padding input
    try:
        if name == "triton":
            from accel.kernels.block_sparse_attention import block_sparse_attention

            out, _ = block_sparse_attention(q, k, v, mask.kv_counts, mask.kv_indices, mask.block_size, scale)
            return out, name
        if name == "cpp":
            from accel.kernels.cpu_block_sparse import block_sparse_attention_cpu

            out, _ = block_sparse_attention_cpu(q, k, v, mask.kv_counts, mask.kv_indices, mask.block_size, scale,
                                                key_mask)
            return out, name
        if name == "flex":
            return _flex(q, k, v, mask, scale, key_mask), name
        if name == "reference":
            out, _ = block_sparse_attention_reference(q, k, v, mask.kv_counts, mask.kv_indices, mask.block_size,
                                                      scale, key_mask)
            return out, name
    except Exception as exc:
        if backend != "auto":
            raise
        _flex_failed.add(q.device.type) if name == "flex" else None
        warnings.warn(f"accel sparse attention: the {name} backend failed ({type(exc).__name__}: {exc}); "
                      "using the PyTorch block-gather path instead.", stacklevel=2)
    return gather_attention(q, k, v, mask, scale, key_mask), "gather"


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float | None,
          key_mask: torch.Tensor | None) -> torch.Tensor:
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        # One compiled callable per process, as torch's own docs do; the graph is shape-specialised.
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    block_mask = mask.to_flex(key_mask)
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale)


def gather_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float | None = None,
    key_mask: torch.Tensor | None = None, differentiable: bool = False,
) -> torch.Tensor:
    """PyTorch block gather: per query block, attend the concatenation of its listed KV blocks.
    ``differentiable``: skip the whole-block fast path, whose reused buffers autograd cannot follow."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    bs = mask.block_size
    qb, kb = mask.num_q_blocks, mask.num_kv_blocks
    if key_mask is None and Sk == kb * bs and Sq == qb * bs and not differentiable:
        return _gather_by_count(q, k, v, mask, scale)
    width = max(1, int(mask.kv_counts.max())) if mask.kv_counts.numel() else 1
    # Key blocks padded to whole blocks; padded keys are masked out below.
    k_blocks = torch.nn.functional.pad(k, (0, 0, 0, kb * bs - Sk)).reshape(B, H, kb, bs, D)
    v_blocks = torch.nn.functional.pad(v, (0, 0, 0, kb * bs - Sk)).reshape(B, H, kb, bs, D)
    q_blocks = torch.nn.functional.pad(q, (0, 0, 0, qb * bs - Sq)).reshape(B, H, qb, bs, D)
    key_ok = torch.arange(kb * bs, device=q.device) < Sk  # (Kb*bs,)
    key_ok = key_ok.expand(B, -1) if key_mask is None else key_ok & torch.nn.functional.pad(key_mask, (0, kb * bs - Sk))
    key_ok = key_ok.reshape(B, 1, kb, bs)
    indices = mask.kv_indices[..., :width].long()  # (B, H, Qb, W)
    slot_ok = torch.arange(width, device=q.device) < mask.kv_counts.unsqueeze(-1).long()  # (B, H, Qb, W)
    out = torch.empty(B, H, qb, bs, D, dtype=q.dtype, device=q.device)
    chunk = max(1, _GATHER_CHUNK_ELEMENTS // max(1, B * H * bs * width * bs))
    b_idx = torch.arange(B, device=q.device)[:, None, None, None]
    h_idx = torch.arange(H, device=q.device)[None, :, None, None]
    for start in range(0, qb, chunk):
        stop = min(qb, start + chunk)
        idx = indices[:, :, start:stop]  # (B, H, c, W)
        kg = k_blocks[b_idx, h_idx, idx].flatten(3, 4)  # (B, H, c, W*bs, D)
        vg = v_blocks[b_idx, h_idx, idx].flatten(3, 4)
        ok = key_ok.expand(B, H, kb, bs)[b_idx, h_idx, idx]  # (B, H, c, W, bs)
        ok = (ok & slot_ok[:, :, start:stop, :, None]).flatten(3, 4)  # (B, H, c, W*bs)
        bias = torch.zeros(ok.shape, dtype=q.dtype, device=q.device).masked_fill_(~ok, float("-inf"))
        qc = q_blocks[:, :, start:stop]  # (B, H, c, bs, D)
        res = torch.nn.functional.scaled_dot_product_attention(qc, kg, vg, attn_mask=bias.unsqueeze(-2), scale=scale)
        empty = ~ok.any(-1)  # rows that attend nothing: SDPA gives NaN there
        if bool(empty.any()):
            res = res.masked_fill(empty[..., None, None], 0.0)
        out[:, :, start:stop] = res
    return out.reshape(B, H, qb * bs, D)[:, :, :Sq]


def _gather_by_count(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask,
                     scale: float | None) -> torch.Tensor:
    """Whole blocks, no key padding: query blocks that list the same number of KV blocks are attended
    together, one unmasked SDPA call per (count, chunk). No -inf bias is needed, so each call takes SDPA's
    fused CPU kernel instead of the masked math path; rows listing nothing stay 0."""
    B, H, Sq, D = q.shape
    bs, qb, kb = mask.block_size, mask.num_q_blocks, mask.num_kv_blocks
    # Blocks as rows of (B·H·Kb) / (B·H·Qb) and gathered with index_select: a plain row copy, faster on CPU
    # than broadcasting advanced indexing, and the copy is a large share of this path's time.
    k_rows, v_rows = k.reshape(B * H * kb, bs, D), v.reshape(B * H * kb, bs, D)
    q_rows = q.reshape(B * H * qb, bs, D)
    counts = mask.kv_counts.reshape(-1)
    out = torch.zeros_like(q_rows) if bool((counts == 0).any()) else torch.empty_like(q_rows)
    present = [c for c in counts.unique().tolist() if c > 0]
    row_bytes = bs * D * k.element_size()

    def chunk(count: int) -> int:
        return max(1, _GATHER_CHUNK_BYTES // (2 * count * row_bytes))

    # One pair of gather buffers reused by every call: fresh multi-MiB tensors per call come back from the
    # allocator as new pages, and faulting them in cost as much as the copy (bimodal timings).
    capacity = max((chunk(c) * c for c in present), default=0) * bs * D
    k_buf = k.new_empty(capacity)
    v_buf = v.new_empty(capacity)
    for count, part, kv_rows in rows_by_count(mask.kv_counts, mask.kv_indices, kb, chunk):
        flat = kv_rows.reshape(-1)
        shape = (flat.numel(), bs, D)
        kg = torch.index_select(k_rows, 0, flat, out=k_buf[:flat.numel() * bs * D].view(shape))
        vg = torch.index_select(v_rows, 0, flat, out=v_buf[:flat.numel() * bs * D].view(shape))
        qc = q_rows.index_select(0, part).unsqueeze(0)
        kv_shape = (1, part.numel(), count * bs, D)
        res = torch.nn.functional.scaled_dot_product_attention(
            qc, kg.view(kv_shape), vg.view(kv_shape), scale=scale)
        out.index_copy_(0, part, res[0])
    return out.reshape(B, H, Sq, D)


def dense_attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> float:
    """FLOPs of dense attention: two matmuls of 2*Sq*Sk*D each per head."""
    return 4.0 * batch * heads * q_len * kv_len * head_dim


def ideal_speedup(density: float) -> float:
    return math.inf if density <= 0 else 1.0 / density

"""Plain PyTorch references for the block-sparse kernels, and the input checks every backend shares.

Imports no triton: the CPU paths, the tests and the launchers all use these. Layouts:

- ``q, k, v``: (B, H, S, D); queries and keys may differ in length (``Sq``, ``Sk``).
- ``kv_counts``: (B, H, Qb) int32, how many KV blocks query block ``i`` attends.
- ``kv_indices``: (B, H, Qb, Kb) int32; the first ``kv_counts[..., i]`` entries of row ``i`` are the KV
  block indices it attends, the rest is padding (FlexAttention ``BlockMask`` ``kv_num_blocks`` /
  ``kv_indices`` layout). ``Qb = ceil(Sq / block)``, ``Kb = ceil(Sk / block)``; tail keys past ``Sk`` never
  enter the softmax.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BLOCKS = (64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_block_sparse_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_counts: torch.Tensor, kv_indices: torch.Tensor,
    block_size: int, *, head_dims: tuple[int, int] | None = None, blocks: tuple[int, ...] | None = SUPPORTED_BLOCKS,
) -> None:
    """Raise ``ValueError`` (what was wrong, what was received, what is accepted) on bad inputs."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a (B, H, S, D) tensor, got {getattr(t, 'shape', type(t))}.")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device == kv_counts.device == kv_indices.device):
        raise ValueError("q, k, v, kv_counts and kv_indices must be on one device.")
    B, H, Sq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H) or k.shape[-1] != D or k.shape[2] != v.shape[2]:
        raise ValueError(
            f"k and v must be (B, H, Sk, D) matching q's batch, heads and head dim; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}."
        )
    if v.shape[-1] != D:
        raise ValueError(f"v's head dim must equal q's ({D}), got {v.shape[-1]}.")
    if head_dims is not None and not head_dims[0] <= D <= head_dims[1]:
        raise ValueError(f"head dim must be in [{head_dims[0]}, {head_dims[1]}], got {D}.")
    if blocks is not None and block_size not in blocks:
        raise ValueError(f"block_size must be one of {blocks}, got {block_size}.")
    Sk = k.shape[2]
    qb, kb = math.ceil(Sq / block_size), math.ceil(Sk / block_size)
    if kv_counts.dtype != torch.int32 or kv_indices.dtype != torch.int32:
        raise ValueError(f"kv_counts and kv_indices must be int32, got {kv_counts.dtype}, {kv_indices.dtype}.")
    if tuple(kv_counts.shape) != (B, H, qb):
        raise ValueError(f"kv_counts must be (B, H, Qb) = {(B, H, qb)} for block {block_size}, got {tuple(kv_counts.shape)}.")
    if kv_indices.dim() != 4 or tuple(kv_indices.shape[:3]) != (B, H, qb) or kv_indices.shape[3] < 1:
        raise ValueError(f"kv_indices must be (B, H, Qb, n) with Qb = {qb}, got {tuple(kv_indices.shape)}.")
    if kv_counts.numel() and (int(kv_counts.min()) < 0 or int(kv_counts.max()) > min(kb, kv_indices.shape[3])):
        raise ValueError(f"kv_counts must be in [0, {min(kb, kv_indices.shape[3])}] (KV blocks), got "
                         f"[{int(kv_counts.min())}, {int(kv_counts.max())}].")
    if kv_indices.numel() and (int(kv_indices.min()) < 0 or int(kv_indices.max()) >= kb):
        raise ValueError(f"kv_indices must be KV block indices in [0, {kb}), got [{int(kv_indices.min())}, "
                         f"{int(kv_indices.max())}].")


def dense_block_table(kv_counts: torch.Tensor, kv_indices: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    """(B, H, Qb, Kb) bool: True where query block i attends KV block j (padding slots ignored)."""
    slots = torch.arange(kv_indices.shape[-1], device=kv_indices.device)
    valid = slots < kv_counts.unsqueeze(-1).long()  # (B, H, Qb, n)
    table = torch.zeros(*kv_indices.shape[:3], num_kv_blocks + 1, dtype=torch.bool, device=kv_indices.device)
    # Invalid slots write into a spare column that is dropped afterwards.
    cols = torch.where(valid, kv_indices.long(), torch.full_like(kv_indices, num_kv_blocks, dtype=torch.long))
    table.scatter_(-1, cols, True)
    return table[..., :num_kv_blocks]


def token_mask(table: torch.Tensor, block_size: int, q_len: int, kv_len: int) -> torch.Tensor:
    """Expand a (B, H, Qb, Kb) block table to a (B, H, Sq, Sk) token mask."""
    mask = table.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    return mask[..., :q_len, :kv_len]


def block_sparse_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_counts: torch.Tensor, kv_indices: torch.Tensor,
    block_size: int, scale: float | None = None, key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention in fp32: ``(out (B, H, Sq, D) in q's dtype, lse (B, H, Sq) fp32)``.

    Rows that attend no key get output 0 and LSE -inf (as FlexAttention and the Triton kernel).
    ``key_mask``: optional (B, Sk) bool, False for keys no query may see (padded prompt tokens).
    """
    Sq, Sk, D = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    table = dense_block_table(kv_counts, kv_indices, math.ceil(Sk / block_size))
    mask = token_mask(table, block_size, Sq, Sk)
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Sq)
    probs = torch.exp(scores - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    probs = probs.masked_fill(~mask, 0.0)
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v.float())
    return out.to(q.dtype), lse


def block_sums_reference(
    q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float | None = None, lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaSpa's block scores: per (query block, KV block) the summed softmax weight
    ``sum exp(q.k * scale - LSE_row)`` over the block's valid rows and keys, in fp32.

    Returns ``(sums (B, H, Qb, Kb), lse (B, H, Sq))``; ``lse`` (natural log) is computed when not given
    (two-pass) or reused (one-pass). Each row's weights sum to 1, so a query block's row of ``sums`` adds
    up to its number of valid rows.
    """
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.float().unsqueeze(-1))
    qb, kb = math.ceil(Sq / block_size), math.ceil(Sk / block_size)
    probs = torch.nn.functional.pad(probs, (0, kb * block_size - Sk, 0, qb * block_size - Sq))
    sums = probs.reshape(B, H, qb, block_size, kb, block_size).sum(dim=(3, 5))
    return sums, lse.float()


def random_block_case(
    seq_len: int, head_dim: int, block_size: int, seed: int = 0, batch: int = 1, heads: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random fp32 ``q, k, v`` (CPU) and a random block mask with the edge cases every kernel must get right:
    the first query block attends nothing, the second exactly one block (the tail block)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, generator=gen) for _ in range(3))
    nb = math.ceil(seq_len / block_size)
    table = torch.rand(batch, heads, nb, nb, generator=gen) < 0.5
    table[..., 0, :] = False
    if nb > 1:
        table[..., 1, :] = False
        table[..., 1, nb - 1] = True
    counts = table.sum(-1, dtype=torch.int32)
    indices = torch.argsort(table.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return q, k, v, counts, indices


def masked_attention_same_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_counts: torch.Tensor,
                                kv_indices: torch.Tensor, block_size: int) -> torch.Tensor:
    """The block-masked attention computed by torch in the inputs' own dtype: its rounding error against the
    fp32 reference is the yardstick of :func:`within_flash_rule`."""
    S = q.shape[2]
    mask = token_mask(dense_block_table(kv_counts, kv_indices, math.ceil(S / block_size)), block_size, S, S)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), -1).to(q.dtype).nan_to_num(0.0)
    return probs @ v


def within_flash_rule(out: torch.Tensor, same_dtype: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5
                      ) -> tuple[bool, float, float]:
    """FlashAttention's acceptance rule: the kernel's max error against the fp32 reference is at most twice
    torch's own error in the same dtype, plus ``eps``. Returns ``(ok, kernel error, torch error)``."""
    err = (out.float().cpu() - reference.float().cpu()).abs().max().item()
    err_torch = (same_dtype.float().cpu() - reference.float().cpu()).abs().max().item()
    return err <= 2 * err_torch + eps, err, err_torch


def check_backward_inputs(grad_out: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor
                          ) -> None:
    """The backward kernels' extra inputs: ``grad_out`` and ``out`` shaped like ``q``, ``lse`` (B, H, Sq)."""
    if tuple(grad_out.shape) != tuple(q.shape) or tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"grad_out and out must have q's shape {tuple(q.shape)}, got "
                         f"{tuple(grad_out.shape)} and {tuple(out.shape)}.")
    if tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"lse must be (B, H, Sq) = {tuple(q.shape[:3])}, got {tuple(lse.shape)}.")


def backward_reference(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       kv_counts: torch.Tensor, kv_indices: torch.Tensor, block_size: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 ``(dq, dk, dv)`` of block-masked attention (the PyTorch block-list walk, which
    ``torch.autograd.gradcheck`` verifies in the tests), on the inputs' device."""
    from accel.attention.trainable import backward_blocks, forward_blocks

    scale = 1.0 / math.sqrt(q.shape[-1])
    q64, k64, v64, g64 = (t.double() for t in (q, k, v, grad_out))
    out, lse = forward_blocks(q64, k64, v64, kv_counts, kv_indices, block_size, scale)
    return backward_blocks(g64, q64, k64, v64, out, lse, kv_counts, kv_indices, block_size, scale)


def masked_attention_grads_same_dtype(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                      v: torch.Tensor, kv_counts: torch.Tensor, kv_indices: torch.Tensor,
                                      block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`masked_attention_same_dtype` by torch's autograd in the inputs' own dtype (rows
    that attend nothing give 0, as the kernels do): the yardstick of the flash rule for a backward."""
    S = q.shape[2]
    a, b, c = (t.detach().clone().requires_grad_() for t in (q, k, v))
    mask = token_mask(dense_block_table(kv_counts, kv_indices, math.ceil(S / block_size)), block_size, S, S)
    has = mask.any(-1, keepdim=True)
    scores = (a @ b.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~has, 0.0)
    probs = torch.softmax(scores.float(), -1).to(q.dtype) * has
    (probs @ c).backward(grad_out)
    return a.grad, b.grad, c.grad


def gradients_within_flash_rule(grads: tuple[torch.Tensor, ...], same_dtype: tuple[torch.Tensor, ...],
                                reference: tuple[torch.Tensor, ...]) -> list[tuple[bool, float, float]]:
    """:func:`within_flash_rule` per gradient, with FlashAttention's backward slack: twice the rounding of
    the reference itself to the gradient's dtype (a gradient stored in fp16 cannot be closer than that)."""
    results = []
    for mine, same, ref in zip(grads, same_dtype, reference):
        rounding = (ref.to(mine.dtype).double() - ref.double()).abs().max().item()
        results.append(within_flash_rule(mine, same, ref.float(), eps=1e-5 + 2 * rounding))
    return results

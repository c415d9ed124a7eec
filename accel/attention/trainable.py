"""Block-sparse attention with a backward pass, for training through sparse attention (VMoBA's first use).

One operator, ``torch.ops.accel.block_sparse_attention(q, k, v, kv_counts, kv_indices, block_size, scale)``
-> ``(out, lse)``, registered with ``torch.library.custom_op``: a fake implementation for tracing, and an
autograd formula, so ``torch.autograd.gradcheck`` checks it and ``torch.compile`` keeps it as one node.

- Forward: the C++ CPU kernel (fp32/bf16/fp16 on CPU) or the Triton kernel (CUDA), both of which return the
  row log-sum-exp; float64 (gradcheck) and machines without either run the same block-list walk in PyTorch.
- Backward: FlashAttention's formula over the same index lists, recomputing each query block's
  probabilities from the saved log-sum-exp: ``dV += Pᵀ dO``, ``dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O))``,
  ``dQ = dS K · scale``, ``dK += dSᵀ Q · scale``. On CPU the C++ kernel runs it (whole-block GEMMs, the
  lists walked in place), on CUDA the Triton kernels (dK/dV over the transposed lists, then dQ); for
  float64 and elsewhere the PyTorch walk: query blocks that list the same number of KV blocks are
  processed together (no padded slots) and K/V gradients scattered back with ``index_add_``. None of them
  reads an unlisted block, so a NaN there cannot reach any gradient.

Key padding masks are not taken here (training clips have none); tail keys past ``Sk`` are masked.
"""

from __future__ import annotations

import math

import torch

from accel.attention.format import BlockSparseMask, rows_by_count

#: Score elements (rows x listed keys) processed per chunk of query blocks: bounds the recompute's memory.
_CHUNK_ELEMENTS = 1 << 19  # 2 MiB of fp32 scores: the chunk's working set stays in cache


def block_sparse_attention_trainable(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float | None = None
) -> torch.Tensor:
    """Block-sparse attention ``(B, H, Sq, D)`` that gradients flow through (to q, k and v)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = torch.ops.accel.block_sparse_attention(
        q, k, v, mask.kv_counts, mask.kv_indices, mask.block_size, scale
    )
    return out


# ---- the block-list walk (PyTorch) -------------------------------------------------------------------------


def _rows(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, H, S, D) -> (B*H*nb, bs, D), zero-padded to whole blocks."""
    B, H, S, D = x.shape
    nb = math.ceil(S / block_size)
    x = torch.nn.functional.pad(x, (0, 0, 0, nb * block_size - S))
    return x.reshape(B * H * nb, block_size, D)


def _key_valid(kv_len: int, num_kv_blocks: int, block_size: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(num_kv_blocks * block_size, device=device) < kv_len).reshape(
        num_kv_blocks, block_size
    )


def _scores(q_rows: torch.Tensor, k_rows: torch.Tensor, valid: torch.Tensor | None, part: torch.Tensor,
            kv_rows: torch.Tensor, num_kv_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (n, bs, c*bs) of rows ``part`` (``q_rows`` already scaled) over their listed keys, tail keys
    at -inf (``valid`` is None when there is no tail); and the gathered keys."""
    n, c = kv_rows.shape
    bs = q_rows.shape[1]
    kg = k_rows.index_select(0, kv_rows.reshape(-1)).reshape(n, c * bs, -1)
    s = torch.matmul(q_rows.index_select(0, part), kg.transpose(1, 2))
    if valid is not None:
        ok = valid.index_select(0, (kv_rows % num_kv_blocks).reshape(-1)).reshape(n, 1, c * bs)
        s.masked_fill_(~ok, float("-inf"))
    return s, kg


def forward_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_counts: torch.Tensor,
                   kv_indices: torch.Tensor, block_size: int, scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, H, Sq, D), lse (B, H, Sq))`` by walking the block lists in PyTorch (any dtype); the
    log-sum-exp is fp32, or float64 for float64 inputs (gradcheck needs it exact)."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    kb = math.ceil(Sk / block_size)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_rows, k_rows, v_rows = (_rows(t.to(work), block_size) for t in (q, k, v))
    q_rows = q_rows * scale
    valid = _key_valid(Sk, kb, block_size, q.device) if Sk % block_size else None
    out = torch.zeros_like(q_rows)
    lse = torch.full(q_rows.shape[:2], float("-inf"), dtype=work, device=q.device)
    width = max(1, _CHUNK_ELEMENTS // (block_size * block_size))
    for _, part, kv_rows in rows_by_count(kv_counts, kv_indices, kb, lambda c: width // c):
        s, _ = _scores(q_rows, k_rows, valid, part, kv_rows, kb)
        row_lse = torch.logsumexp(s, -1)  # (n, bs)
        vg = v_rows.index_select(0, kv_rows.reshape(-1)).reshape(part.numel(), -1, D)
        out.index_copy_(0, part, torch.matmul(s.sub_(row_lse[..., None]).exp_(), vg))
        lse.index_copy_(0, part, row_lse)
    qb = q_rows.shape[0] // (B * H)
    out = out.reshape(B, H, qb * block_size, D)[:, :, :Sq].to(q.dtype)
    return out, lse.reshape(B, H, qb * block_size)[:, :, :Sq]  # float64 for float64 inputs, else fp32


def backward_blocks(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, kv_counts: torch.Tensor,
                    kv_indices: torch.Tensor, block_size: int, scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` from the saved ``out`` and ``lse``, over the same block lists."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    kb = math.ceil(Sk / block_size)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_rows, k_rows, v_rows = (_rows(t.to(work), block_size) for t in (q, k, v))
    q_rows = q_rows * scale  # dK = dSᵀ (Q·scale); dQ is scaled once at the end
    do_rows, o_rows = _rows(grad_out.to(work), block_size), _rows(out.to(work), block_size)
    lse_rows = torch.nn.functional.pad(lse.to(work), (0, q_rows.shape[0] // (B * H) * block_size - Sq))
    lse_rows = lse_rows.reshape(-1, block_size)
    delta = (do_rows * o_rows).sum(-1)  # (rows, bs): rowsum(dO ∘ O)
    valid = _key_valid(Sk, kb, block_size, q.device) if Sk % block_size else None
    dq, dk, dv = torch.zeros_like(q_rows), torch.zeros_like(k_rows), torch.zeros_like(v_rows)
    width = max(1, _CHUNK_ELEMENTS // (block_size * block_size))
    for _, part, kv_rows in rows_by_count(kv_counts, kv_indices, kb, lambda c: width // c):
        n, c = kv_rows.shape
        flat = kv_rows.reshape(-1)
        s, kg = _scores(q_rows, k_rows, valid, part, kv_rows, kb)
        p = s.sub_(lse_rows.index_select(0, part)[..., None]).exp_()  # (n, bs, c*bs); 0 at masked keys
        do = do_rows.index_select(0, part)
        vg = v_rows.index_select(0, flat).reshape(n, c * block_size, D)
        dv.index_add_(0, flat, torch.matmul(p.transpose(1, 2), do).reshape(n * c, block_size, D))
        ds = torch.matmul(do, vg.transpose(1, 2)).sub_(delta.index_select(0, part)[..., None]).mul_(p)
        dq.index_copy_(0, part, torch.matmul(ds, kg))
        dk.index_add_(0, flat, torch.matmul(ds.transpose(1, 2), q_rows.index_select(0, part))
                      .reshape(n * c, block_size, D))
    qb = q_rows.shape[0] // (B * H)
    dq = dq.mul_(scale).reshape(B, H, qb * block_size, D)[:, :, :Sq]
    dk = dk.reshape(B, H, kb * block_size, D)[:, :, :Sk]
    dv = dv.reshape(B, H, kb * block_size, D)[:, :, :Sk]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---- the operator ------------------------------------------------------------------------------------------


def _kernel(q: torch.Tensor, block_size: int) -> str | None:
    """Which kernel runs both passes: ``"triton"`` (CUDA), ``"cpp"`` (CPU, where the extension builds) or
    ``None`` (the PyTorch walk: float64, other block sizes or devices)."""
    if q.dtype == torch.float64 or block_size not in (64, 128):  # the kernels' tiles
        return None
    if q.is_cuda and 16 <= q.shape[-1] <= 256:
        return "triton"
    if q.device.type == "cpu":
        from accel.attention.backends import cpu_kernel_available

        if cpu_kernel_available():
            return "cpp"
    return None


def _kernel_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_counts: torch.Tensor,
                    kv_indices: torch.Tensor, block_size: int, scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = _kernel(q, block_size)
    if kernel == "triton":
        from accel.kernels.block_sparse_attention import block_sparse_attention

        return block_sparse_attention(q, k, v, kv_counts, kv_indices, block_size, scale)
    if kernel == "cpp":
        from accel.kernels.cpu_block_sparse import block_sparse_attention_cpu

        return block_sparse_attention_cpu(q, k, v, kv_counts, kv_indices, block_size, scale, None)
    return forward_blocks(q, k, v, kv_counts, kv_indices, block_size, scale)


@torch.library.custom_op("accel::block_sparse_attention", mutates_args=())
def _op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_counts: torch.Tensor,
        kv_indices: torch.Tensor, block_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _kernel_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), kv_counts, kv_indices, block_size, scale
    )
    return out.contiguous(), lse.contiguous()


@_op.register_fake
def _(q, k, v, kv_counts, kv_indices, block_size, scale):
    return torch.empty_like(q), q.new_empty(
        q.shape[:3], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32
    )


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_counts, kv_indices, block_size, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_counts, kv_indices)
    ctx.block_size, ctx.scale = block_size, scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_counts, kv_indices = ctx.saved_tensors
    dq, dk, dv = torch.ops.accel.block_sparse_attention_backward(
        grad_out.contiguous(), q, k, v, out, lse, kv_counts, kv_indices, ctx.block_size, ctx.scale
    )
    return dq, dk, dv, None, None, None, None


def _kernel_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     out: torch.Tensor, lse: torch.Tensor, kv_counts: torch.Tensor, kv_indices: torch.Tensor,
                     block_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kernel = _kernel(q, block_size)
    if kernel == "triton":
        from accel.kernels.block_sparse_attention import block_sparse_attention_backward

        return block_sparse_attention_backward(grad_out, q, k, v, out, lse, kv_counts, kv_indices, block_size,
                                               scale)
    if kernel == "cpp":
        from accel.kernels.cpu_block_sparse import block_sparse_attention_backward_cpu

        return block_sparse_attention_backward_cpu(grad_out, q, k, v, out, lse, kv_counts, kv_indices,
                                                   block_size, scale)
    return backward_blocks(grad_out, q, k, v, out, lse, kv_counts, kv_indices, block_size, scale)


# The backward is an operator too, so a compiled training step keeps it as one node.
@torch.library.custom_op("accel::block_sparse_attention_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, kv_counts: torch.Tensor, kv_indices: torch.Tensor, block_size: int,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernel_backward(grad_out, q, k, v, out, lse, kv_counts, kv_indices, block_size, scale)


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, kv_counts, kv_indices, block_size, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_op.register_autograd(_backward, setup_context=_setup_context)

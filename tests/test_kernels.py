"""Triton kernels vs their PyTorch references, under triton's CPU interpreter (and on CUDA when present).

Triton decides at import whether to interpret, so the interpreter tests run in a child pytest process
with ``TRITON_INTERPRET=1`` (``test_kernels_under_interpreter_*``); in the parent they are skipped and the
variable never leaks into other tests. Tolerance (flash-attn's rule): err(kernel) <= 2 * err(torch in
the same dtype) + eps, both against an fp32 reference.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from accel.kernels.reference import (
    backward_reference,
    block_sparse_attention_reference,
    block_sums_reference,
    check_block_sparse_inputs,
    gradients_within_flash_rule,
    masked_attention_grads_same_dtype,
    masked_attention_same_dtype,
    random_block_case,
    within_flash_rule,
)

CHILD = os.environ.get("ACCEL_KERNEL_CHILD") == "1"
interp = pytest.mark.skipif(not CHILD, reason="runs in the TRITON_INTERPRET=1 child process")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}




CASES = (
    [(200, d, 64, name) for d in (64, 72, 80, 96, 128) for name in DTYPES]
    + [(97, 80, 64, name) for name in DTYPES]
    + [(130, 72, 128, name) for name in DTYPES]
    + [(200, 96, 128, "bf16"), (257, 64, 128, "fp32")]
)


@interp
@pytest.mark.parametrize("S,D,block,dtype", CASES)
def test_block_sparse_attention_matches_reference(S, D, block, dtype):
    from accel.kernels.block_sparse_attention import block_sparse_attention

    q, k, v, counts, indices = random_block_case(S, D, block)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, counts, indices, block)
    dt = DTYPES[dtype]
    ql, kl, vl = (t.to(dt) for t in (q, k, v))
    out, lse = block_sparse_attention(ql, kl, vl, counts, indices, block)
    assert out.dtype == dt and out.shape == q.shape
    ok, err, err_torch = within_flash_rule(out, masked_attention_same_dtype(ql, kl, vl, counts, indices, block), ref)
    assert ok, (err, err_torch)
    # Rows with no block: output 0 and LSE -inf, like the reference and FlexAttention.
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert torch.all(out[:, :, :block] == 0)
    finite = torch.isfinite(ref_lse)
    lse_tol = 1e-4 if dt == torch.float32 else 2e-2
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=lse_tol, rtol=0)


@interp
def test_block_sparse_attention_non_contiguous_inputs():
    from accel.kernels.block_sparse_attention import block_sparse_attention

    q, k, v, counts, indices = random_block_case(150, 64, 64, heads=3)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # (B, S, H, D) storage
    out, _ = block_sparse_attention(qt, kt, vt, counts, indices, 64)
    ref, _ = block_sparse_attention_reference(q, k, v, counts, indices, 64)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)


@interp
@pytest.mark.parametrize("S,D,block,dtype", [(200, 64, 64, "fp32"), (97, 72, 64, "bf16"), (130, 80, 128, "fp16"),
                                             (200, 96, 64, "fp16"), (257, 128, 128, "fp32")])
def test_block_sums_two_pass_and_one_pass(S, D, block, dtype):
    from accel.kernels.block_sums import block_sums

    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 2, S, D, generator=gen) for _ in range(2))
    dt = DTYPES[dtype]
    ref, ref_lse = block_sums_reference(q, k, block)
    sums, lse = block_sums(q.to(dt), k.to(dt), block)
    tol = 1e-4 if dt == torch.float32 else 5e-2
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=0)
    torch.testing.assert_close(sums, ref, atol=tol * block, rtol=tol)
    # Each valid row's weights sum to one.
    rows = torch.full((ref.shape[2],), float(block))
    rows[-1] = S - (ref.shape[2] - 1) * block
    torch.testing.assert_close(sums.sum(-1), rows.expand_as(sums.sum(-1)), atol=tol * block, rtol=0)
    # One pass: reuse a cached LSE (here of other inputs: the scores need not sum to one then).
    q2 = q + 0.1 * torch.randn(q.shape, generator=gen)
    ref2, _ = block_sums_reference(q2, k, block, lse=ref_lse)
    sums2, lse2 = block_sums(q2.to(dt), k.to(dt), block, lse=ref_lse)
    assert lse2 is ref_lse
    torch.testing.assert_close(sums2, ref2, atol=tol * block, rtol=tol)


BACKWARD_CASES = [(200, 64, 64, "fp32"), (97, 72, 64, "bf16"), (130, 80, 128, "fp16"), (257, 32, 128, "fp32"),
                  (200, 96, 64, "bf16"), (150, 128, 128, "fp16")]


@interp
@pytest.mark.parametrize("S,D,block,dtype", BACKWARD_CASES)
def test_block_sparse_backward_matches_reference(S, D, block, dtype):
    """dQ, dK, dV of the Triton backward against float64 gradients of the same block mask (the PyTorch
    block-list walk, which gradcheck verifies), by the flash rule; unlisted key blocks get exactly 0."""
    from accel.kernels.block_sparse_attention import block_sparse_attention, block_sparse_attention_backward

    q, k, v, counts, indices = random_block_case(S, D, block, seed=S + D, heads=2)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(7))
    listed = torch.zeros(k.shape[2], dtype=torch.bool)
    for j in indices[counts.unsqueeze(-1) > torch.arange(indices.shape[-1])].unique().tolist():
        listed[j * block:(j + 1) * block] = True
    reference = backward_reference(grad, q, k, v, counts, indices, block)
    dt = DTYPES[dtype]
    ql, kl, vl, gl = (t.to(dt) for t in (q, k, v, grad))
    out, lse = block_sparse_attention(ql, kl, vl, counts, indices, block)
    got = block_sparse_attention_backward(gl, ql, kl, vl, out, lse, counts, indices, block)
    assert all(g.dtype == dt and g.shape == r.shape for g, r in zip(got, reference))
    same = masked_attention_grads_same_dtype(gl, ql, kl, vl, counts, indices, block)
    for name, (ok, err, err_torch) in zip("qkv", gradients_within_flash_rule(got, same, reference)):
        assert ok, (name, err, err_torch)
    assert torch.all(got[0][:, :, :block] == 0)  # the first query block attends nothing
    if (~listed).any():
        assert torch.all(got[1][:, :, ~listed] == 0) and torch.all(got[2][:, :, ~listed] == 0)


@interp
def test_block_sparse_backward_never_reads_unlisted_blocks():
    from accel.kernels.block_sparse_attention import block_sparse_attention, block_sparse_attention_backward

    q, k, v, _, _ = random_block_case(256, 64, 64)
    table = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    table[..., 3] = False
    counts = table.sum(-1, dtype=torch.int32)
    indices = torch.argsort(table.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    k[:, :, 192:], v[:, :, 192:] = float("nan"), float("nan")
    out, lse = block_sparse_attention(q, k, v, counts, indices, 64)
    dq, dk, dv = block_sparse_attention_backward(torch.ones_like(q), q, k, v, out, lse, counts, indices, 64)
    assert torch.isfinite(dq).all() and torch.isfinite(dk[:, :, :192]).all()
    assert (dk[:, :, 192:] == 0).all() and (dv[:, :, 192:] == 0).all()


@interp
def test_gradcheck_through_the_triton_kernels():
    """The Triton forward and backward under gradcheck: float64 inputs cast to fp32 around the kernels (they
    take fp16/bf16/fp32), finite differences at a step fp32 resolves. Fast mode (random projections: the
    full Jacobian is minutes in the interpreter); each gradient's elementwise error is bounded by
    test_block_sparse_backward_matches_reference."""
    from accel.kernels.block_sparse_attention import block_sparse_attention, block_sparse_attention_backward

    _, _, _, counts, indices = random_block_case(80, 16, 64, seed=4, heads=1)

    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = block_sparse_attention(q, k, v, counts, indices, 64)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, out, lse = ctx.saved_tensors
            return block_sparse_attention_backward(grad.contiguous(), q, k, v, out, lse, counts, indices, 64)

    gen = torch.Generator().manual_seed(5)
    inputs = tuple(torch.randn(1, 1, 80, 16, generator=gen, dtype=torch.float64).requires_grad_()
                   for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda a, b, c: Attention.apply(a.float(), b.float(), c.float()).double(), inputs,
        eps=1e-3, atol=5e-4, rtol=5e-3, fast_mode=True,
    )


QUICK = [  # one of each: tail + odd head dim + bf16, zero/one-block rows, block 128, both search passes
    "test_block_sparse_attention_matches_reference[200-72-64-bf16]",
    "test_block_sparse_attention_matches_reference[130-72-128-fp16]",
    "test_block_sparse_attention_matches_reference[97-80-64-fp32]",
    "test_block_sums_two_pass_and_one_pass[97-72-64-bf16]",
    "test_block_sparse_backward_matches_reference[97-72-64-bf16]",
    "test_block_sparse_backward_matches_reference[130-80-128-fp16]",
    "test_block_sparse_backward_never_reads_unlisted_blocks",
    "test_gradcheck_through_the_triton_kernels",
]


def _run_child(node_ids: list[str]) -> str:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "ACCEL_KERNEL_CHILD": "1"}
    targets = [f"{__file__}::{node}" for node in node_ids] if node_ids else [
        __file__, "-k", "matches_reference or non_contiguous or two_pass or unlisted or gradcheck"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *targets],
        env=env, capture_output=True, text=True, check=False, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, result.stdout[-2000:]
    return summary


def test_kernels_under_interpreter_quick():
    """A few interpreter cases in a child process with TRITON_INTERPRET=1 (seconds)."""
    _run_child(QUICK)


@pytest.mark.slow
def test_kernels_under_interpreter_full():
    """Every interpreter case (all head dims, dtypes, tails, block sizes) in a child process (~40 s)."""
    _run_child([])


@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "block_size": 48}, r"block_size must be one of \(64, 128\), got 48"),
    (lambda a: {**a, "q": a["q"].to(torch.float16)}, "share a dtype"),
    (lambda a: {**a, "q": a["q"].to(torch.int32), "k": a["k"].to(torch.int32), "v": a["v"].to(torch.int32)},
     "float16, bfloat16 or float32"),
    (lambda a: {**a, "kv_counts": a["kv_counts"][:, :, :1]}, r"kv_counts must be \(B, H, Qb\)"),
    (lambda a: {**a, "kv_counts": a["kv_counts"].long()}, "must be int32"),
    (lambda a: {**a, "kv_indices": a["kv_indices"] + 10}, "kv_indices must be KV block indices"),
    (lambda a: {**a, "q": a["q"][0]}, r"\(B, H, S, D\)"),
    (lambda a: {**a, "k": a["k"][..., :32], "v": a["v"][..., :32]}, "matching q's batch, heads and head dim"),
])
def test_launcher_input_checks(change, match):
    q, k, v, counts, indices = random_block_case(130, 64, 64)
    args = {"q": q, "k": k, "v": v, "kv_counts": counts, "kv_indices": indices, "block_size": 64}
    with pytest.raises(ValueError, match=match):
        check_block_sparse_inputs(**change(args))


def test_launcher_refuses_cpu_without_interpreter():
    if CHILD:
        pytest.skip("the child interprets")
    code = (
        "import torch, math\n"
        "from accel.kernels.block_sparse_attention import block_sparse_attention\n"
        "q = torch.randn(1, 1, 64, 64); c = torch.ones(1, 1, 1, dtype=torch.int32)\n"
        "try:\n    block_sparse_attention(q, q, q, c, torch.zeros(1, 1, 1, 1, dtype=torch.int32), 64)\n"
        "except ValueError as e:\n    print('refused:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if "No module named 'triton'" in out.stderr:
        pytest.skip("triton not installed")
    assert "refused: The Triton kernel runs on CUDA" in out.stdout, out.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("S,D,block,dtype", CASES)
def test_block_sparse_attention_cuda(S, D, block, dtype):
    from accel.kernels.block_sparse_attention import block_sparse_attention

    q, k, v, counts, indices = random_block_case(S, D, block)
    ref, _ = block_sparse_attention_reference(q, k, v, counts, indices, block)
    dt = DTYPES[dtype]
    ql, kl, vl = (t.to("cuda", dt) for t in (q, k, v))
    out, _ = block_sparse_attention(ql, kl, vl, counts.cuda(), indices.cuda(), block)
    same_dtype = masked_attention_same_dtype(ql, kl, vl, counts.cuda(), indices.cuda(), block)
    ok, err, err_torch = within_flash_rule(out, same_dtype, ref)
    assert ok, (err, err_torch)

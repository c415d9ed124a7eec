"""The C++ CPU block-sparse kernel: matches the reference, reads only listed blocks, dispatch and fallback."""

from __future__ import annotations

import math

import pytest
import torch
from accel.kernels import cpu_block_sparse
from accel.kernels.cpp_build import CppExtension, bf16_dot_products
from accel.kernels.cpu_block_sparse import attention_with_block_sums_cpu, block_sparse_attention_cpu
from accel.kernels.reference import block_sparse_attention_reference, block_sums_reference

from accel.attention import BlockSparseMask, sparse_attention
from accel.attention.backends import choose_backend
from accel.attention.search import attention_and_block_sums


@pytest.fixture(scope="module", autouse=True)
def kernel_built():
    if not cpu_block_sparse.available():  # no compiler on this machine: the gather path covers it
        pytest.skip(f"the CPU kernel did not build: {cpu_block_sparse.unavailable_reason()}")


def mask_with_edge_rows(B, H, Sq, Sk, block, seed=0, p=0.4):
    """Random table plus a row attending nothing, a row with exactly one block (the tail) and a full row."""
    gen = torch.Generator().manual_seed(seed)
    qb, kb = math.ceil(Sq / block), math.ceil(Sk / block)
    table = torch.rand(B, H, qb, kb, generator=gen) < p
    table[0, 0, 0] = False
    if qb > 2:
        table[0, 0, 1] = False
        table[0, 0, 1, -1] = True
        table[0, 0, 2] = True
    return BlockSparseMask.from_dense(table, block, Sq, Sk)


@pytest.mark.parametrize("Sq,Sk,D,block", [
    (200, 330, 64, 64),   # tail query and key blocks, queries != keys
    (256, 256, 72, 64),
    (300, 300, 80, 128),
    (130, 200, 96, 64),
    (256, 384, 128, 128),
    (64 * 20, 64 * 20, 64, 64),  # lists longer than one 8-block score tile
])
def test_matches_reference(Sq, Sk, D, block):
    q, k, v = torch.randn(2, 3, Sq, D), torch.randn(2, 3, Sk, D), torch.randn(2, 3, Sk, D)
    mask = mask_with_edge_rows(2, 3, Sq, Sk, block)
    out, lse = block_sparse_attention_cpu(q, k, v, mask.kv_counts, mask.kv_indices, block, 0.1)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, mask.kv_counts, mask.kv_indices, block, 0.1)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)  # -inf exactly where nothing is attended
    assert bool(torch.isinf(lse[0, 0, :block]).all()) and bool((out[0, 0, :block] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_match_the_reference(dtype):
    q, k, v = (torch.randn(1, 2, 200, 64).to(dtype) for _ in range(3))
    mask = mask_with_edge_rows(1, 2, 200, 200, 64)
    out, _ = block_sparse_attention_cpu(q, k, v, mask.kv_counts, mask.kv_indices, 64)
    ref, _ = block_sparse_attention_reference(q, k, v, mask.kv_counts, mask.kv_indices, 64)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)


@pytest.fixture
def fresh_bf16_check():
    cpu_block_sparse.bf16_gemm_problem.cache_clear()
    yield
    cpu_block_sparse.bf16_gemm_problem.cache_clear()


def test_bf16_gemms_only_where_checked(fresh_bf16_check):
    problem = cpu_block_sparse.bf16_gemm_problem()
    native = bf16_dot_products()
    assert (problem is None) == (native and cpu_block_sparse.load_kernel().has_bf16_gemm()), problem
    expected = torch.bfloat16 if problem is None else torch.float32
    assert cpu_block_sparse.compute_dtype(torch.bfloat16) == expected
    assert cpu_block_sparse.compute_dtype(torch.float16) == torch.float32
    assert cpu_block_sparse.compute_dtype(torch.float32) == torch.float32


@pytest.mark.parametrize("Sq,Sk,block", [(200, 330, 64), (64 * 20, 64 * 20, 64), (300, 300, 128)])
def test_bf16_gemm_path_matches_fp32_on_the_same_values(Sq, Sk, block, fresh_bf16_check):
    if cpu_block_sparse.bf16_gemm_problem() is not None:
        pytest.skip(f"bf16 inputs run in fp32 here: {cpu_block_sparse.bf16_gemm_problem()}")
    q = torch.randn(2, 2, Sq, 64).bfloat16()
    k, v = torch.randn(2, 2, Sk, 64).bfloat16(), torch.randn(2, 2, Sk, 64).bfloat16()
    mask = mask_with_edge_rows(2, 2, Sq, Sk, block)  # tails, empty and full rows; lists in and out of order
    key_mask = padding(2, Sk, (Sk - 70, 10))
    poisoned_k, poisoned_v = k.clone(), v.clone()  # NaN in unlisted and masked keys reaches nothing
    unlisted = ~mask.to_dense().any(2).repeat_interleave(block, dim=-1)[..., :Sk]  # (B, H, Sk)
    poisoned_k[unlisted | ~key_mask[:, None, :]] = float("nan")
    poisoned_v[unlisted] = float("nan")
    out, lse, sums = attention_with_block_sums_cpu(q, poisoned_k, poisoned_v,
                                                   mask.kv_counts, mask.kv_indices, block, 0.125, key_mask)
    args = (q.float(), k.float(), v.float(), mask.kv_counts, mask.kv_indices, block, 0.125, key_mask)
    ref, ref_lse, ref_sums = attention_with_block_sums_cpu(*args)  # the fp32 kernel on the same values
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)  # P rounded to bf16 for P V
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)  # scores: exact products, fp32 sums
    torch.testing.assert_close(sums, ref_sums, atol=1e-4, rtol=1e-4)
    assert not torch.equal(out, ref.bfloat16())  # the bf16 GEMMs ran, not the fp32 ones


def test_bf16_without_native_bf16_dot_products_runs_in_fp32(monkeypatch, fresh_bf16_check):
    monkeypatch.setattr(cpu_block_sparse, "bf16_dot_products", lambda: False)  # an AVX2-only CPU
    assert "native bf16" in cpu_block_sparse.bf16_gemm_problem()
    q, k, v = (torch.randn(1, 2, 200, 64).bfloat16() for _ in range(3))
    mask = mask_with_edge_rows(1, 2, 200, 200, 64)
    out, _ = block_sparse_attention_cpu(q, k, v, mask.kv_counts, mask.kv_indices, 64)
    ref, _ = block_sparse_attention_cpu(q.float(), k.float(), v.float(), mask.kv_counts, mask.kv_indices, 64)
    assert torch.equal(out, ref.bfloat16())


class _TorchGemm:
    """Stands in for the extension's bf16 GEMM probe, exact or with every product off by ``error``."""

    def __init__(self, error: float = 0.0) -> None:
        self.error = error

    def bf16_gemm_probe(self, a, b, accumulate_into=None):
        if accumulate_into is None:
            return a.float() @ b.float().T * (1 + self.error)
        exact = accumulate_into + a.float() @ b.float()
        return exact * (1 + self.error)


def test_the_probe_refuses_a_wrong_bf16_gemm():
    assert cpu_block_sparse._probe_bf16_gemm(_TorchGemm()) is None
    assert "off by 1.0e-02" in cpu_block_sparse._probe_bf16_gemm(_TorchGemm(error=1e-2))
    assert "off by" in cpu_block_sparse._probe_bf16_gemm(_TorchGemm(error=float("nan")))


def test_reads_only_listed_blocks():
    """Compute really skipped: NaN in every unlisted K/V block never reaches the output."""
    q, k, v = torch.randn(1, 2, 256, 64), torch.randn(1, 2, 256, 64), torch.randn(1, 2, 256, 64)
    table = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    table[..., 0] = True  # every query block attends KV block 0 only
    table[0, 1, 3, 2] = True
    mask = BlockSparseMask.from_dense(table, 64, 256, 256)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[0, 0, 64:] = poisoned_v[0, 0, 64:] = float("nan")
    poisoned_k[0, 1, 64:128] = poisoned_v[0, 1, 192:] = float("nan")
    out, _ = block_sparse_attention_cpu(q, poisoned_k, poisoned_v, mask.kv_counts, mask.kv_indices, 64)
    ref, _ = block_sparse_attention_reference(q, k, v, mask.kv_counts, mask.kv_indices, 64)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_same_result_on_any_thread_count():
    q, k, v = (torch.randn(1, 4, 64 * 12, 64) for _ in range(3))
    mask = mask_with_edge_rows(1, 4, 64 * 12, 64 * 12, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = block_sparse_attention_cpu(q, k, v, mask.kv_counts, mask.kv_indices, 64)
        torch.set_num_threads(2)
        two, _ = block_sparse_attention_cpu(q, k, v, mask.kv_counts, mask.kv_indices, 64)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each query block is one thread's work, in a fixed order


@pytest.mark.parametrize("S,D,block", [(200, 64, 64), (64 * 20, 80, 64), (300, 96, 128)])
def test_fused_search_is_dense_attention_plus_exact_block_sums(S, D, block):
    q, k, v = (torch.randn(1, 2, S, D) for _ in range(3))
    fused = attention_and_block_sums(q, k, v, block, 0.1, None, "auto")
    assert fused is not None
    out, sums, lse = fused
    ref_sums, ref_lse = block_sums_reference(q, k, block, 0.1)  # two-pass: computes the LSE
    torch.testing.assert_close(sums, ref_sums, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.1),
                               atol=2e-5, rtol=1e-5)
    assert attention_and_block_sums(q, k, v, block, 0.1, None, "gather") is None  # another backend asked for


def test_block_sums_under_a_sparse_mask_cover_listed_blocks_only():
    q, k, v = (torch.randn(1, 2, 320, 64) for _ in range(3))
    mask = mask_with_edge_rows(1, 2, 320, 320, 64)
    _, _, sums = attention_with_block_sums_cpu(q, k, v, mask.kv_counts, mask.kv_indices, 64)
    table = mask.to_dense()
    assert bool((sums[~table] == 0).all())
    # Each attending row's weights sum to 1 over its listed blocks: a query block's sums add up to its rows.
    rows = sums.sum(-1)
    attending = mask.kv_counts > 0
    torch.testing.assert_close(rows[attending], torch.full_like(rows[attending], 64.0), atol=1e-3, rtol=0)
    assert bool((rows[~attending] == 0).all())


def test_bad_inputs_get_clear_errors():
    q = torch.randn(1, 2, 128, 64)
    mask = BlockSparseMask.full(1, 2, 64, 128, 128)
    with pytest.raises(ValueError, match="block_size must be one of"):
        block_sparse_attention_cpu(q, q, q, mask.kv_counts, mask.kv_indices, 48)
    with pytest.raises(ValueError, match="must be float16, bfloat16 or float32"):
        block_sparse_attention_cpu(q.double(), q.double(), q.double(), mask.kv_counts, mask.kv_indices, 64)
    with pytest.raises(ValueError, match=r"key_mask must be a \(B, Sk\) = \(1, 128\) bool tensor"):
        block_sparse_attention_cpu(q, q, q, mask.kv_counts, mask.kv_indices, 64, key_mask=torch.ones(1, 100))


def test_auto_takes_the_kernel_on_cpu():
    assert choose_backend("auto", torch.device("cpu"), 4096, whole_blocks=True) == "cpp"
    assert choose_backend("auto", torch.device("cpu"), 100) == "cpp"
    q, k, v = (torch.randn(1, 2, 150, 64) for _ in range(3))
    mask = mask_with_edge_rows(1, 2, 150, 150, 64)
    _, used = sparse_attention(q, k, v, mask)
    assert used == "cpp"


def padding(B, Sk, keep):
    key_mask = torch.zeros(B, Sk, dtype=torch.bool)
    for b, n in enumerate(keep):
        key_mask[b, :n] = True
    return key_mask


@pytest.mark.parametrize("Sq,Sk,block", [(150, 150, 64), (256, 300, 128), (64 * 10, 64 * 10, 64)])
def test_padded_keys_never_enter_the_softmax(Sq, Sk, block):
    q, k, v = torch.randn(2, 2, Sq, 64), torch.randn(2, 2, Sk, 64), torch.randn(2, 2, Sk, 64)
    mask = mask_with_edge_rows(2, 2, Sq, Sk, block)
    # Batch 0 drops the last 70 keys (part of a block and the whole tail block), batch 1 keeps only 10.
    key_mask = padding(2, Sk, (Sk - 70, 10))
    poisoned = k.clone()
    poisoned[~key_mask[:, None, :, None].expand_as(k)] = float("nan")  # a masked key's score is never used
    out, used = sparse_attention(q, poisoned, v, mask, key_mask=key_mask)
    assert used == "cpp"
    ref, ref_lse = block_sparse_attention_reference(q, k, v, mask.kv_counts, mask.kv_indices, block,
                                                    key_mask=key_mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    _, lse = block_sparse_attention_cpu(q, poisoned, v, mask.kv_counts, mask.kv_indices, block, key_mask=key_mask)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)  # -inf for rows whose listed keys are all masked
    # Batch 1: query blocks that do not list block 0 see only masked keys and attend nothing.
    no_first = ~mask.to_dense()[1, :, :, 0]
    rows = no_first.repeat_interleave(block, dim=-1)[..., :Sq]
    assert bool(torch.isinf(lse[1][rows]).all()) and bool((out[1][rows] == 0).all())


def test_fused_search_with_padded_keys_matches_the_reference():
    q, k, v = (torch.randn(2, 2, 200, 64) for _ in range(3))
    key_mask = padding(2, 200, (150, 90))
    out, sums, lse = attention_and_block_sums(q, k, v, 64, 0.125, key_mask, "auto")
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.125
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    ref_lse = torch.logsumexp(scores, -1)
    # Per (query block, KV block) softmax mass over the unmasked keys (200 tokens padded to 4 blocks of 64).
    probs = torch.exp(scores - ref_lse[..., None])
    ref_sums = torch.nn.functional.pad(probs, (0, 56, 0, 56)).reshape(2, 2, 4, 64, 4, 64).sum((3, 5))
    torch.testing.assert_close(sums, ref_sums, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :],
                                                             scale=0.125)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-5)


def test_failed_build_falls_back_to_gather(monkeypatch):
    def no_compiler():
        raise RuntimeError("no C++ compiler found")

    failing = CppExtension("cpu_block_sparse.cpp", "the CPU block-sparse kernel", "the gather path")
    failing.build = no_compiler
    monkeypatch.setattr(cpu_block_sparse, "EXTENSION", failing)
    assert not cpu_block_sparse.available()
    assert "no C++ compiler found" in cpu_block_sparse.unavailable_reason()
    assert choose_backend("auto", torch.device("cpu"), 4096, whole_blocks=True) == "gather"
    q, k, v = (torch.randn(1, 2, 128, 64) for _ in range(3))
    mask = BlockSparseMask.full(1, 2, 64, 128, 128)
    _, used = sparse_attention(q, k, v, mask)
    assert used == "gather"
    with pytest.raises(RuntimeError, match="CPU block-sparse kernel is unavailable .*no C\\+\\+ compiler"):
        block_sparse_attention_cpu(q, k, v, mask.kv_counts, mask.kv_indices, 64)
